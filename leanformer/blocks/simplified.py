"""Simplified blocks of He & Hofmann (ICLR 2024, arXiv 2311.01906), Fig. 1; shapes (B, T, C) -> (B, T, C).

* SAS (Fig. 9):     ``h = β_SA · A(N₁x) N₁x``,  ``out = α_FF h + β_FF MLP(N₂h)``  (no attention skip)
* SAS-P (Fig. 10):  ``out = β_SA · A(Nx) Nx + β_FF MLP(Nx)``  (no skip at all, one norm)
* V-SkipInit:       SAS's sequential wiring with ``A = αI + βsoftmax`` (α = 1, β = 0) and V, P kept
  (He et al. 2023, the paper's Sec. 4.1 baseline); with ``attention="shaped"`` the centring ``−γC`` is
  added, as in the official V-SkipInit runs.

β_SA, α_FF, β_FF are trainable scalars (``cfg.shaped``; β_FF defaults to 0.1·√(18/L), the paper's 0.1
at 18 layers, O(1/√L)), never weight-decayed. ``cfg.norm == "none"`` removes every block norm except
layer 0's first one, which is a LayerNorm as in the official code ("always use LN in first layer to
normalise input activation norms"); the model's final norm stays. The MLP's output weight is N(0, σ)
like every other weight (official code), without GPT-2's 1/√(2L) residual scaling: β_FF downweights it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from leanformer.config import TransformerConfig
from leanformer.layers.mlp import MLP
from leanformer.layers.norms import make_norm
from leanformer.layers.shaped import ShapedAttention, trainable_gain
from leanformer.registry import build_attention, mask_kwargs


def block_norm(cfg: TransformerConfig, layer_idx: int, first: bool) -> nn.Module:
    """A block norm; with ``norm="none"`` the identity except layer 0's first norm (a LayerNorm)."""
    if cfg.norm != "none":
        return make_norm(cfg)
    return make_norm(cfg, "layernorm") if layer_idx == 0 and first else nn.Identity()


@torch.no_grad()
def unscaled_ffn_out(mlp: nn.Module, std: float) -> None:
    """Undo GPT-2's 1/√(2L) on a plain ``ffn_out``: the official blocks draw it from N(0, σ)."""
    if type(mlp.ffn_out) is nn.Linear and not mlp.ffn_out.weight.is_meta:
        mlp.ffn_out.weight.normal_(0.0, std)


def beta_ff_init(cfg: TransformerConfig) -> float:
    """``cfg.shaped.beta_ff_init``, or 0.1·√(18/L): 0.1 at the paper's 18 layers, O(1/√L)."""
    b = cfg.shaped.beta_ff_init
    return 0.1 * math.sqrt(18 / cfg.n_layers) if b is None else b


class SASBlock(nn.Module):
    """Skipless sequential block: ``h = β_SA A(N₁x) N₁x``, ``out = α_FF h + β_FF MLP(N₂h)``."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.norm1 = block_norm(cfg, layer_idx, first=True)
        self.norm2 = block_norm(cfg, layer_idx, first=False)
        self.attn = self._attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        sh = cfg.shaped
        self.beta_sa = trainable_gain(1, sh.beta_sa_init)
        self.alpha_ff = trainable_gain(1, sh.alpha_ff_init)
        self.beta_ff = trainable_gain(1, beta_ff_init(cfg))
        self.init_std = cfg.init_std

    def post_init(self) -> None:
        unscaled_ffn_out(self.mlp, self.init_std)

    def _attention(self, cfg: TransformerConfig, layer_idx: int) -> nn.Module:
        return build_attention(cfg, layer_idx)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.beta_sa * self.drop(self.attn(self.norm1(x), state, **mask_kwargs(attention_mask)))
        return self.alpha_ff * h + self.beta_ff * self.mlp(self.norm2(h))


class SASPBlock(nn.Module):
    """Skipless parallel block: ``out = β_SA A(Nx) Nx + β_FF MLP(Nx)``."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.norm1 = block_norm(cfg, layer_idx, first=True)
        self.attn = build_attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.beta_sa = trainable_gain(1, cfg.shaped.beta_sa_init)
        self.beta_ff = trainable_gain(1, beta_ff_init(cfg))
        self.init_std = cfg.init_std

    def post_init(self) -> None:
        unscaled_ffn_out(self.mlp, self.init_std)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        a = self.attn(h, state, **mask_kwargs(attention_mask))
        return self.beta_sa * self.drop(a) + self.beta_ff * self.mlp(h)


class VSkipInitBlock(SASBlock):
    """SAS wiring around V-SkipInit attention ``αI + βA`` with V and P kept (α = 1, β = 0 at init)."""

    def _attention(self, cfg: TransformerConfig, layer_idx: int) -> nn.Module:
        if cfg.attention not in ("softmax", "shaped"):
            raise ValueError(f"model.block='vskipinit' needs attention 'softmax' or 'shaped', "
                             f"got {cfg.attention!r}")
        if cfg.attention == "softmax":  # He et al. 2023: no centring, β = 0 at init
            return ShapedAttention(cfg, layer_idx, projections=True, centring=False, beta_init=0.0)
        return ShapedAttention(cfg, layer_idx, projections=True, centring=True)
