"""The one place a projection is created, so NOBLE (or any other linear type) is added once.

Roles name what a projection is for: ``q``, ``k``, ``v``, ``o``, ``ffn_in``, ``ffn_out`` (NOBLE
targets), or anything else (``gate``, ``head``...), which is always a plain ``nn.Linear``.
"""

from __future__ import annotations

import torch.nn as nn

from leanformer.config import TransformerConfig


def make_linear(cfg: TransformerConfig, role: str, in_features: int, out_features: int,
                bias: bool | None = None) -> nn.Module:
    """A linear map ``in_features -> out_features`` for ``role``; NOBLE where ``cfg.noble`` targets it."""
    bias = cfg.linear_bias(role) if bias is None else bias
    noble = cfg.noble
    if noble.enabled and role in noble.targets:
        from leanformer.layers.noble import NobleLinear

        return NobleLinear(in_features, out_features, bias=bias, rank=noble.rank,
                           rank_ratio=noble.rank_ratio, activation=noble.activation,
                           fusion=noble.fusion, dropout=noble.dropout, alpha=noble.alpha,
                           fused=noble.fused, main_init=noble.main_init, lr_mults=noble.lr_mults,
                           compiled_form=noble.compiled_form)
    return nn.Linear(in_features, out_features, bias=bias)
