"""Softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

``softmax(Q Kᵀ / √d + M) V`` per head (Vaswani et al. 2017), with grouped-query attention
(``n_kv_heads < n_heads``, Ainslie et al. 2023), rotary positions and a KV cache for decoding.
``M`` is the causal mask (``cfg.causal``), or nothing for an encoder; an ``attention_mask`` (B, T) of
padding adds −∞ on the padded keys (:func:`padding_mask`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from leanformer.config import TransformerConfig
from leanformer.decoding import cached_attention, is_static, write_kv
from leanformer.layers.fused_inputs import project_inputs
from leanformer.layers.linear import DecodeLinear, make_linear
from leanformer.ops import norm_linear
from leanformer.layers.rope import Rotary


_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def causal_mask(t_new: int, t_total: int, device) -> torch.Tensor | None:
    """Boolean (t_new, t_total) mask for queries at the last ``t_new`` of ``t_total`` positions.

    ``None`` when SDPA's own ``is_causal`` is exact (no past) or no mask is needed (one query).
    """
    if t_new == 1:
        return None
    past = t_total - t_new
    q_pos = torch.arange(past, t_total, device=device)[:, None]
    return torch.arange(t_total, device=device)[None, :] <= q_pos


def padding_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask, True where query i may attend to key j, for a key-padding mask.

    attention_mask: (B, T), nonzero = a token, 0 = padding. A token query sees the tokens (the ones at or
    before it when ``causal``), never a padded key. A padded query also sees itself, so that no row is
    empty (an empty row would make the softmax 0/0); its output is never read by a token.
    """
    keep = attention_mask.bool()
    T = keep.shape[1]
    own = torch.eye(T, dtype=torch.bool, device=keep.device)
    allowed = keep[:, None, None, :] | own
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
    return allowed


def append_to_cache(state: dict, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Append ``(B, H, T, D)`` tensors to those cached in ``state`` along time; returns the full ones.

    Each name keeps a pre-allocated buffer (``{name}_buf``, ``{name}_len``) that grows by 1.5× when full,
    so a decoding step writes one slot instead of copying the whole cache (amortised O(1) per token; at
    most 50% unused capacity). The returned tensors are views of the filled part.
    """
    out = {}
    for name, new in tensors.items():
        buf, used = state.get(f"{name}_buf"), state.get(f"{name}_len", 0)
        need = used + new.shape[2]
        if buf is None or need > buf.shape[2]:
            grown = new.new_empty(*new.shape[:2], max(need + need // 2, 64), new.shape[3])
            if used:
                grown[:, :, :used] = buf[:, :, :used]
            buf = grown
        buf[:, :, used:need] = new
        state[f"{name}_buf"], state[f"{name}_len"] = buf, need
        out[name] = buf[:, :, :need]
    return out


def add_projections(module: nn.Module, cfg: TransformerConfig) -> None:
    """Give ``module`` the q, k, v, o projections (grouped-query widths) and rotary positions, under the
    names every attention that keeps them shares, so a conversion between attention types inherits them."""
    module.n_heads, module.n_kv, module.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    C, kv_width = cfg.d_model, cfg.kv_heads * cfg.head_dim
    module.q = make_linear(cfg, "q", C, C)
    module.k = make_linear(cfg, "k", C, kv_width)
    module.v = make_linear(cfg, "v", C, kv_width)
    module.o = make_linear(cfg, "o", C, C)
    module.rotary = (Rotary(cfg.head_dim, cfg.rotary_pct, cfg.rope_theta, cfg.rope_scaling)
                     if cfg.pos == "rope" else None)


def project_qkv(module: nn.Module, x: torch.Tensor, start, rotate: bool = True,
                extra: tuple[str, ...] = (), norm: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """``x`` (B, T, C) → q (B, H, T, D), k and v (B, H_kv, T, D), q and k rotated at positions ``start + t``
    (or as :meth:`Rotary.rotate` reads a tensor or static positions; ``rotate=False``: not rotated, the
    caller rotates them); ``module`` holds what :func:`add_projections` gave it. ``extra``: names of more
    linears of ``module`` on the same x, whose (B, T, out) outputs follow v (one product for all of them
    in a decoding copy, :mod:`leanformer.layers.fused_inputs`); ``norm``: applied to x first (see there)."""
    q, k, v, *rest = project_inputs(module, x, ("q", "k", "v") + tuple(extra), norm)
    q, k, v = split_heads(q, module.n_heads), split_heads(k, module.n_kv), split_heads(v, module.n_kv)
    if rotate and module.rotary is not None:
        q, k = module.rotary(q, k, start)
    return (q, k, v, *rest)


def out_projection(o: nn.Module, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``o(y)``, plus ``residual`` when given: in the product's kernel for a decoding copy's plain linear
    (:func:`leanformer.ops.norm_linear.linear`, where its ROUTE allows), else ``residual + o(y)``."""
    if residual is None:
        return o(y)
    if type(o) is DecodeLinear:
        return norm_linear.linear(y, o.weight, o.bias, residual=residual)
    return residual + o(y)


def check_full_pass(state: dict | None, attention_mask: torch.Tensor | None, causal: bool, what: str) -> None:
    """An encoder layer has no decoding cache, and a padding mask belongs to a full pass (no cache)."""
    if state is not None and not causal:
        raise ValueError(f"bidirectional {what} cannot decode with a cache (state must be None)")
    if state is not None and attention_mask is not None:
        raise ValueError(f"{what}: attention_mask is for a full pass over the sequence, not with a decoding cache")


class SoftmaxAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention, causal or (``cfg.causal=False``) bidirectional;
    (B, T, C) -> (B, T, C). ``attention_mask`` (B, T): 1 = token, 0 = padding (no weight on padded keys)."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        add_projections(self, cfg)
        self.dropout = cfg.dropout
        self.causal = cfg.causal

    def input_linears(self) -> tuple[str, ...]:
        """The linears that read the block input x (fused into one product in a decoding copy)."""
        return ("q", "k", "v")

    def forward(self, x: torch.Tensor, state: dict | None = None, attention_mask: torch.Tensor | None = None,
                input_norm: nn.Module | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``input_norm`` and ``residual`` (a decoding copy's Pre-LN block): ``residual + o(attn(norm(x)))``,
        the norm and the sum inside the products' kernels where they run (:func:`out_projection`)."""
        check_full_pass(state, attention_mask, self.causal, "softmax attention")
        if is_static(state):
            return self._static_forward(x, state, input_norm, residual)
        start = state.get("pos", 0) if state is not None else 0
        q, k, v = project_qkv(self, x, start, norm=input_norm)
        if state is not None:
            kv = append_to_cache(state, k=k, v=v)
            k, v = kv["k"], kv["v"]
            state["pos"] = start + x.shape[1]
        if attention_mask is not None:
            mask = padding_mask(attention_mask, self.causal)
        else:
            mask = causal_mask(q.shape[2], k.shape[2], x.device) if start else None
        # Decoding: name the kernels, since SDPA's own choice costs ~50 ms on an H100 each time the key
        # length changes (measured 2026-11-23, torch 2.11), i.e. at every generated token.
        with sdpa_kernel(_DECODE_BACKENDS) if state is not None else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask,
                is_causal=self.causal and mask is None and start == 0 and q.shape[2] > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv != self.n_heads,
            )
        return out_projection(self.o, merge_heads(y), residual)

    def _static_forward(self, x: torch.Tensor, state: dict, input_norm: nn.Module | None = None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """The static-cache branch (:mod:`leanformer.decoding`): K/V written in place at the positions
        ``state["pos"]`` of a pre-allocated buffer, attention over it with the shared mask."""
        p = state["positions"]
        q, k, v = project_qkv(self, x, p, norm=input_norm)
        kv = write_kv(state, k=k, v=v)
        return out_projection(self.o, merge_heads(cached_attention(q, kv["k"], kv["v"], p)), residual)
