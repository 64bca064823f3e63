"""The feed-forward sub-block: ``ffn_out(act(ffn_in x))``, or SwiGLU (Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.config import TransformerConfig
from leanformer.layers.linear import DecodeLinear, make_linear
from leanformer.ops import skinny_linear

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.ffn_in) is DecodeLinear and self.act_name in skinny_linear.ACTIVATIONS:
            # a decoding copy: the activation in the few-row kernel's epilogue where it runs (same function)
            h = skinny_linear.linear(x, self.ffn_in.weight, self.ffn_in.bias, activation=self.act_name)
            return self.drop(self.ffn_out(h))
        h = self.ffn_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return self.drop(self.ffn_out(h))
