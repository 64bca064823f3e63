"""The one place a projection is created, so NOBLE (or any other linear type) is added once.

Roles name what a projection is for: ``q``, ``k``, ``v``, ``o``, ``ffn_in``, ``ffn_out`` (NOBLE
targets), or anything else (``gate``, ``head``...), which is always a plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leanformer.config import TransformerConfig
from leanformer.ops import skinny_linear


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


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` whose product goes through :func:`leanformer.ops.skinny_linear.linear`: the
    few-row kernel on CUDA when ``skinny_linear.ROUTE`` allows it and the input has at most
    ``skinny_linear.MAX_ROWS`` rows (a decoding step), ``F.linear`` otherwise (the same function).
    :func:`leanformer.decoding.decoding_copy` turns every plain ``nn.Linear`` of its copy into one; its
    parameters, state_dict keys and ``type``-based checks (:data:`PLAIN_LINEARS`) are those of nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear.linear(x, self.weight, self.bias)


PLAIN_LINEARS = (nn.Linear, DecodeLinear)  # the exact types that are a plain affine map (no branch, no adapter)
