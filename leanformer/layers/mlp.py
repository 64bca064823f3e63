"""The feed-forward sub-block: ``ffn_out(act(ffn_in x))``, or SwiGLU (Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.config import TransformerConfig
from leanformer.layers.linear import DecodeLinear, make_linear
from leanformer.ops import norm_linear, skinny_linear

_ACTIVATIONS = skinny_linear.EAGER_ACTIVATIONS  # relu, gelu, gelu_tanh (swiglu is handled in forward)


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C). For SwiGLU ``ffn_in`` holds ``[W_gate; W_up]`` stacked: (2F, C)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.swiglu = cfg.ffn_act == "swiglu"
        hidden = cfg.ffn_dim
        self.ffn_in = make_linear(cfg, "ffn_in", cfg.d_model, 2 * hidden if self.swiglu else hidden)
        self.ffn_out = make_linear(cfg, "ffn_out", hidden, cfg.d_model)
        self.act = None if self.swiglu else _ACTIVATIONS[cfg.ffn_act]
        self.act_name = cfg.ffn_act
        self.drop = nn.Dropout(cfg.dropout)

    def _noble_in_and_activation(self, x: torch.Tensor) -> torch.Tensor | None:
        """A decoding copy's NOBLE first layer and the activation in one launch
        (:func:`leanformer.ops.noble_decode.noble_linear` with ``activation``, where its
        ``ACTIVATION_IN_KERNEL`` asks), or None where it does not run."""
        if (not getattr(self.ffn_in, "decode_kernel", False) or self.act_name not in skinny_linear.ACTIVATIONS
                or (self.training and self.drop.p > 0)):
            return None
        from leanformer.ops import noble_decode

        if not noble_decode.ACTIVATION_IN_KERNEL:
            return None
        return noble_decode.noble_linear(self.ffn_in, x, activation=self.act_name)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``norm``, ``residual`` (a decoding copy's Pre-LN block): ``residual + MLP(norm(x))``, the norm in the
        first product's kernel and the sum in the second's where :mod:`leanformer.ops.norm_linear` runs them."""
        if (type(self.ffn_in) is DecodeLinear and type(self.ffn_out) is DecodeLinear
                and self.act_name in skinny_linear.ACTIVATIONS and not (self.training and self.drop.p > 0)):
            # a decoding copy: the activation in the few-row kernel's epilogue where it runs (same function)
            ln = (norm.weight, norm.bias, norm.eps) if norm is not None else None
            h = norm_linear.linear(x, self.ffn_in.weight, self.ffn_in.bias, norm=ln, activation=self.act_name)
            return norm_linear.linear(h, self.ffn_out.weight, self.ffn_out.bias, residual=residual)
        if norm is not None:
            x = norm(x)
        h = self._noble_in_and_activation(x)
        if h is None:
            h = self.ffn_in(x)
            if self.swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = self.act(h)
        y = self.drop(self.ffn_out(h))
        return residual + y if residual is not None else y
