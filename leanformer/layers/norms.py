"""Normalisation layers chosen by ``cfg.norm``: LayerNorm, RMSNorm (Zhang & Sennrich 2019) or none."""

from __future__ import annotations

import torch.nn as nn

from leanformer.config import TransformerConfig


def make_norm(cfg: TransformerConfig, kind: str | None = None) -> nn.Module:
    """A norm over ``d_model`` of ``kind`` (default ``cfg.norm``); ``none`` is the identity."""
    kind = kind or cfg.norm
    if kind == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias if cfg.norm_bias is None else cfg.norm_bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose layernorm, rmsnorm or none")
