"""The standard wirings: Pre-LN (GPT-2), parallel (GPT-J / PaLM, one norm) and GPT-NeoX parallel (two norms).

Shapes: (B, T, C) -> (B, T, C); ``attention_mask`` (B, T) (1 = token, 0 = padding) goes to the attention.
* Pre-LN:        ``h = x + Attn(N₁x)``,  ``out = h + MLP(N₂h)``
* parallel:      ``out = x + Attn(Nx) + MLP(Nx)``
* neox_parallel: ``out = x + Attn(N₁x) + MLP(N₂x)`` (Pythia's ``use_parallel_residual``)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leanformer.config import TransformerConfig
from leanformer.layers.mlp import MLP
from leanformer.layers.norms import make_norm
from leanformer.registry import build_attention, mask_kwargs


class PreLNBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = build_attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), state, **mask_kwargs(attention_mask)))
        return x + self.mlp(self.norm2(x))


class DecodePreLNBlock(PreLNBlock):
    """A decoding copy's Pre-LN block (:func:`leanformer.decoding.decoding_copy`): the same function, with
    each LayerNorm handed to the product that reads it and each residual to the product that writes it, so
    that :mod:`leanformer.ops.norm_linear` can run them in those products' kernels (5 launches per layer
    instead of 7 where it runs; the eager ops, same values, where it does not). Eval only (no dropout)."""

    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.drop.p > 0:  # dropout between the products: the plain block's order
            return super().forward(x, state, attention_mask)
        h = self.attn(x, state, input_norm=self.norm1, residual=x, **mask_kwargs(attention_mask))
        return self.mlp(h, norm=self.norm2, residual=h)


class ParallelBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = build_attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        return x + self.drop(self.attn(h, state, **mask_kwargs(attention_mask))) + self.mlp(h)


class NeoXParallelBlock(PreLNBlock):
    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), state, **mask_kwargs(attention_mask))
        return x + self.drop(a) + self.mlp(self.norm2(x))
