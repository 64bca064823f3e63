"""Shaped attention (He & Hofmann, ICLR 2024, arXiv 2311.01906, Eq. 5; Noci et al. 2023).

Per head h, with queries at the last ``Tq`` of ``Tk`` positions::

    A_h = α_h I + β_h softmax(Q Kᵀ / √d + M) − γ_h C          (Eq. 5)

``I`` picks each query's own position, ``M`` is the causal mask and ``C`` the attention of zero logits:
causal, row ``i`` (absolute position ``i``, from 0) holds ``1/(i+1)`` on its first ``i+1`` entries;
bidirectional, ``C = 𝟙𝟙ᵀ/T``. With ``W_Q = 0`` at init the softmax equals ``C`` and, with
``α = β = γ = 1``, ``A = I``: the attention sub-block is the identity.

The fast form never builds a T×T matrix: ``β · SDPA(q, k, v) + α · v_own − γ · mean(v)``, the mean being
the causal running mean (a cumulative sum over time, continued from a cached sum when decoding) or the
global mean. The official code slices its identity ``[:Tk, :Tk]`` under a KV cache (wrong rows), which
:func:`shaped_attention` gets right; its :func:`shaped_attention_reference` twin materialises ``A``.

Padding (``key_mask`` (B, Tk), True = token; a full pass, no cache): the softmax gives padded keys no
weight, and ``C`` is the attention of zero logits over the tokens only: row ``i`` holds ``1/n_i`` on the
tokens it may see (causal: the tokens at positions ≤ i; bidirectional: all of them), ``n_i`` their
number, and 0 on padding. So a token's output is the one the sequence without its padding gives (padding
at the end keeps every position), and ``W_Q = 0`` still makes ``A = I`` on the tokens. A padded query
also sees itself in the softmax (no row is empty) and gets the same ``C`` row as a token there would
(all zero if it sees no token); its output is never read by a token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.config import TransformerConfig
from leanformer.decoding import cached_attention, is_static, starts_afresh, write_kv
from leanformer.layers.attention import (
    append_to_cache,
    causal_mask,
    check_full_pass,
    merge_heads,
    padding_mask,
    split_heads,
)
from leanformer.layers.fused_inputs import project_inputs
from leanformer.layers.linear import make_linear
from leanformer.layers.rope import Rotary
from leanformer.ops.on_cuda import kernel_switch_allows, on_cuda_compiled


def _per_head(g: torch.Tensor) -> torch.Tensor:
    """(H,) -> (1, H, 1, 1) for broadcasting over (B, H, T, D)."""
    return g.view(1, -1, 1, 1)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  key_mask: torch.Tensor | None = None) -> int:
    """Validate (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv) and a (B, Tk) ``key_mask``; return the number
    of past positions."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on B, H or T")
    past = k.shape[2] - q.shape[2]
    if past < 0:
        raise ValueError(f"{q.shape[2]} queries but only {k.shape[2]} keys: queries must be the last Tq of Tk")
    if past and not causal:
        raise ValueError("bidirectional shaped attention needs Tq == Tk (no decoding cache); "
                         f"got Tq={q.shape[2]}, Tk={k.shape[2]}")
    if key_mask is not None:
        if past:
            raise ValueError(f"a key mask needs Tq == Tk (a full pass, no cache); got Tq={q.shape[2]}, "
                             f"Tk={k.shape[2]}")
        if tuple(key_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_mask must be (B, Tk) = {(k.shape[0], k.shape[2])}, got {tuple(key_mask.shape)}")
    return past


def centring_matrix(t_new: int, t_total: int, causal: bool, device=None, dtype=None,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``C`` (t_new, t_total): rows of the uniform attention for queries at the last ``t_new`` positions.

    With ``key_mask`` (B, t_total), True = token (``t_new == t_total``): (B, t_new, t_total), each row
    uniform over the tokens it sees and 0 on padding (a row that sees no token is all 0).
    """
    pos = torch.arange(t_total - t_new, t_total, device=device)[:, None]
    allowed = torch.arange(t_total, device=device)[None, :] <= pos if causal else \
        torch.ones(t_new, t_total, dtype=torch.bool, device=device)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    allowed = allowed.to(dtype)
    return allowed / allowed.sum(-1, keepdim=True).clamp(min=1)


def shaped_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                               beta: torch.Tensor, gamma: torch.Tensor, causal: bool = True,
                               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Materialised ``A V`` with ``A = αI + β softmax(QKᵀ/√d + M) − γC`` (Eq. 5), per head.

    q, k: (B, H, Tq, D), (B, H, Tk, D); v: (B, H, Tk, Dv); alpha, beta, gamma: (H,).
    Queries sit at the last ``Tq`` of ``Tk`` positions (``Tq == Tk`` when bidirectional or with
    ``key_mask`` (B, Tk), True = token: the padding rule of the module docstring).
    Returns (B, H, Tq, Dv). O(Tq·Tk) memory: for tests.
    """
    past = _check_shapes(q, k, v, causal, key_mask)
    t_new, t_total = q.shape[2], k.shape[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        mask = padding_mask(key_mask, causal)
    else:
        mask = causal_mask(t_new, t_total, q.device) if causal else None
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    identity = torch.zeros(t_new, t_total, device=q.device, dtype=q.dtype)
    identity[torch.arange(t_new), torch.arange(past, t_total)] = 1.0
    C = centring_matrix(t_new, t_total, causal, q.device, q.dtype, key_mask)
    if key_mask is not None:
        C = C[:, None]  # (B, 1, Tq, Tk): the same for every head
    A = _per_head(alpha) * identity + _per_head(beta) * logits.softmax(-1) - _per_head(gamma) * C
    return A @ v


RUNNING_MEAN_CHUNK = 64  # positions per chunk of the chunked running mean

# A full causal pass mixes α v + β SDPA − γ C v through leanformer.ops.shaped_mix's Triton kernels: "cuda" on
# CUDA tensors the kernels take, "always" also on the CPU under TRITON_INTERPRET=1 (tests), "never" (the
# PyTorch form, the default: in SAS-P's compiled GPT-2 step on an H100 the kernels gave 38.89 ms against 38.77
# without them, 2026-12-06 22:24 UTC, docs/benchmarks.md; Inductor fuses the PyTorch chain into its neighbours)
MIX_KERNEL = "never"


def use_mix_kernel(v: torch.Tensor, soft: torch.Tensor) -> bool:
    """Whether :func:`shaped_attention` mixes v and SDPA's output ``soft`` (B, H, T, D) in the kernels."""
    if not kernel_switch_allows("MIX_KERNEL", MIX_KERNEL, v):
        return False
    from leanformer.ops.shaped_mix import shaped_mix_supported

    return shaped_mix_supported(v, soft) is None


def running_mean(v: torch.Tensor, past: int, prefix_sum: torch.Tensor | None = None) -> torch.Tensor:
    """``C v`` for causal rows: mean of v over positions ``0..p`` for the last Tq positions ``p``.

    v: (B, H, Tk, Dv) (all positions; only the last Tq = Tk − past are summed when ``prefix_sum``,
    (B, H, Dv), holds the sum of the first ``past``). Accumulates in at least float32.
    Without a past (training, prefill) it takes :func:`running_mean_chunked`; otherwise
    :func:`running_mean_cumsum`, its plain twin.
    """
    if past == 0 and prefix_sum is None and v.shape[2] > 1:
        return running_mean_chunked(v)
    return running_mean_cumsum(v, past, prefix_sum)


def running_mean_cumsum(v: torch.Tensor, past: int, prefix_sum: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`running_mean` as a cumulative sum over time (the reference form; any ``past``)."""
    acc = torch.promote_types(v.dtype, torch.float32)
    new = v[:, :, past:, :].to(acc)
    sums = new.cumsum(2)
    if prefix_sum is not None:
        sums = prefix_sum.to(acc).unsqueeze(2) + sums
    elif past:
        sums = v[:, :, :past, :].to(acc).sum(2, keepdim=True) + sums
    counts = torch.arange(past + 1, v.shape[2] + 1, device=v.device, dtype=acc)
    return (sums / counts[:, None]).to(v.dtype)


def running_mean_chunked(v: torch.Tensor, chunk: int = RUNNING_MEAN_CHUNK) -> torch.Tensor:
    """Causal running mean of v (B, H, T, D) over time as matrix products, no scan over a strided axis.

    Time is cut into chunks of ``c`` positions: inside a chunk the prefix sums are ``L @ v_chunk`` with
    ``L`` the (c, c) lower-triangular ones; each chunk then adds the exclusive prefix of the chunk totals
    (a cumulative sum over T/c entries, in at least float32), and row ``t`` is divided by ``t + 1``.
    The products run on the ``(B, T, H·D)`` layout the heads were split from (one batched product, coalesced
    reads), in v's dtype (bf16 under autocast: bf16 operands, float32 accumulation). Same result as
    :func:`running_mean_cumsum` with ``past = 0``. Returns (B, H, T, D) in v's dtype.
    """
    B, H, T, D = v.shape
    acc = torch.promote_types(v.dtype, torch.float32)
    pad = (-T) % chunk
    x = v.transpose(1, 2)  # (B, T, H, D): contiguous when v came from split_heads
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    n = (T + pad) // chunk
    blocks = x.reshape(B, n, chunk, H * D)
    lower = torch.ones(chunk, chunk, device=v.device, dtype=blocks.dtype).tril()
    inner = torch.matmul(lower, blocks)  # (B, n, c, H·D): prefix sums inside each chunk
    totals = inner[:, :, -1, :].to(acc)
    before = totals.cumsum(1) - totals  # (B, n, H·D): sum of all earlier chunks
    counts = torch.arange(1, n * chunk + 1, device=v.device, dtype=acc).view(n, chunk, 1)
    mean = (inner.to(acc) + before.unsqueeze(2)) / counts
    mean = mean.reshape(B, n * chunk, H, D)[:, :T]
    return mean.transpose(1, 2).to(v.dtype)


def masked_mean(v: torch.Tensor, key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """``C v`` under padding: v (B, H, T, Dv), key_mask (B, T) True = token → the mean of v over the tokens
    each position sees (causal: at or before it; else all), 0 where it sees none; (B, H, T or 1, Dv).
    Accumulates in at least float32."""
    acc = torch.promote_types(v.dtype, torch.float32)
    w = key_mask.to(acc)[:, None, :, None]  # (B, 1, T, 1)
    vw = v.to(acc) * w
    if causal:
        sums, counts = vw.cumsum(2), w.cumsum(2)
    else:
        sums, counts = vw.sum(2, keepdim=True), w.sum(2, keepdim=True)
    return (sums / counts.clamp(min=1)).to(v.dtype)


def shaped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                     beta: torch.Tensor, gamma: torch.Tensor | None, causal: bool = True,
                     v_prefix_sum: torch.Tensor | None = None, dropout_p: float = 0.0,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``A V`` of Eq. 5 without a T×T matrix: ``α v_own + β SDPA(q, k, v) − γ C v``.

    q: (B, H, Tq, D) at the last Tq of the Tk positions of k: (B, H, Tk, D) and v: (B, H, Tk, Dv);
    alpha, beta, gamma: (H,); ``gamma=None`` drops the centring (V-SkipInit, He et al. 2023).
    ``v_prefix_sum`` (B, H, Dv): the sum of v over the first Tk − Tq positions, when a decoding cache
    holds it (otherwise it is summed from ``v``). ``dropout_p`` applies to the softmax part only.
    ``key_mask`` (B, Tk), True = token: padding (module docstring; a full pass, Tq == Tk).
    Returns (B, H, Tq, Dv).
    """
    past = _check_shapes(q, k, v, causal, key_mask)
    t_new, t_total = q.shape[2], k.shape[2]
    if key_mask is not None:
        mask = padding_mask(key_mask, causal)
    else:
        mask = causal_mask(t_new, t_total, q.device) if causal and past else None
    soft = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal and mask is None and not past and t_new > 1)
    if (gamma is not None and causal and not past and v_prefix_sum is None and key_mask is None
            and use_mix_kernel(v, soft)):
        from leanformer.ops.shaped_mix import shaped_mix

        return shaped_mix(v, soft, alpha, beta, gamma)  # same function, one Triton pass each way
    dt = torch.promote_types(v.dtype, soft.dtype)  # gains follow the activations: no float32 promotion
    out = _per_head(alpha.to(dt)) * v[:, :, past:, :] + _per_head(beta.to(dt)) * soft
    if gamma is not None:
        if key_mask is not None:
            mean = masked_mean(v, key_mask, causal)
        else:
            mean = running_mean(v, past, v_prefix_sum) if causal else v.mean(2, keepdim=True)
        out = out - _per_head(gamma.to(dt)) * mean
    return out


def trainable_gain(shape: tuple[int, ...] | int, value: float) -> nn.Parameter:
    """A trainable gain filled with ``value`` (1-d: the trainer does not weight-decay it)."""
    return nn.Parameter(torch.full(shape if isinstance(shape, tuple) else (shape,), float(value)))


@torch.no_grad()
def _zero_linear(layer: nn.Module) -> None:
    """Zero a projection's output exactly: its weight (and bias), and a NOBLE branch's up-projection."""
    if layer.weight.is_meta:
        return
    layer.weight.zero_()
    if getattr(layer, "bias", None) is not None:
        layer.bias.zero_()
    if hasattr(layer, "reset_branch"):
        layer.reset_branch(zero_up=True)


class SkipValue(nn.Module):
    """Layer 0's value map ``W_V = α_V I + β_V ΔW`` (Eq. 6), ``ΔW = 0``, ``α_V = β_V = 1`` at init.

    (B, T, C) -> (B, T, C). The official code's ``first_layer_value_resid_gain = 1``,
    ``value_skip_gain = 1``, both trainable. ``ΔW`` is made through ``make_linear`` (role ``v``).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.delta = make_linear(cfg, "v", cfg.d_model, cfg.d_model, bias=False)
        self.alpha_v = trainable_gain(1, 1.0)
        self.beta_v = trainable_gain(1, 1.0)
        self.post_init()

    def post_init(self) -> None:
        _zero_linear(self.delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha_v * x + self.beta_v * self.delta(x)


class ShapedAttention(nn.Module):
    """Shaped self-attention, (B, T, C) -> (B, T, C); the attention contract of ``leanformer.registry``.

    Default (SAS, SAS-P): ``W_V = W_P = I``: the values are the (normed) input split into heads and
    there is no output projection; layer 0 keeps ``W_V = α_V I + β_V ΔW`` (:class:`SkipValue`).
    ``projections=True`` keeps ordinary ``v`` and ``o`` linears (orthogonal init, as the official
    V-SkipInit runs); ``centring=False`` drops ``γC``, which with ``beta_init=0`` is V-SkipInit
    ``αI + βA`` (He et al. 2023). ``causal=False`` is the bidirectional (encoder) form.

    Parameters: ``q`` (zero at init), ``k`` (N(0, 0.02)), per-head ``alpha``, ``beta``, ``gamma`` (H,).
    Decoding state: ``k`` (post-RoPE, kv heads), ``v`` (H heads), ``v_sum`` (B, H, D) and ``pos``.
    """

    def __init__(self, cfg: TransformerConfig, layer_idx: int, *, causal: bool | None = None,
                 projections: bool = False, centring: bool = True, beta_init: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = cfg.causal if causal is None else causal
        self.centring, self.init_std = centring, cfg.init_std
        C = cfg.d_model
        self.q = make_linear(cfg, "q", C, C)
        self.k = make_linear(cfg, "k", C, self.n_kv * self.head_dim)
        if projections:
            self.v, self.o = make_linear(cfg, "v", C, C), make_linear(cfg, "o", C, C)
        else:
            self.v = SkipValue(cfg) if layer_idx == 0 else None
            self.o = None
        self.rotary = (Rotary(cfg.head_dim, cfg.rotary_pct, cfg.rope_theta, cfg.rope_scaling)
                   if cfg.pos == "rope" else None)
        sh = cfg.shaped
        self.alpha = trainable_gain(self.n_heads, sh.alpha_init)
        self.beta = trainable_gain(self.n_heads, sh.beta_init if beta_init is None else beta_init)
        self.gamma = trainable_gain(self.n_heads, sh.gamma_init) if centring else None
        self.dropout = cfg.dropout
        self.post_init()

    @torch.no_grad()
    def post_init(self) -> None:
        """W_Q = 0 and W_K ~ N(0, init_std) (official code); ``v``/``o`` orthogonal when kept."""
        _zero_linear(self.q)
        if self.k.weight.is_meta:
            return
        self.k.weight.normal_(0.0, self.init_std)
        if self.o is not None:
            for layer in (self.v, self.o):
                nn.init.orthogonal_(layer.weight)

    def input_linears(self) -> tuple[str, ...]:
        """The linears that read the block input x (fused into one product in a decoding copy)."""
        return ("q", "k", "v") if isinstance(self.v, nn.Linear) else ("q", "k")

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) → q (B, H, T, D), k (B, H_kv, T, D), v (B, H, T, D): x itself when there is no v."""
        q, k, *v = project_inputs(self, x, self.input_linears())
        v = v[0] if v else (self.v(x) if self.v is not None else x)
        return split_heads(q, self.n_heads), split_heads(k, self.n_kv), split_heads(v, self.n_heads)

    def forward(self, x: torch.Tensor, state: dict | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_full_pass(state, attention_mask, self.causal, "shaped attention")
        if is_static(state):
            return self._static_forward(x, state)
        start = state.get("pos", 0) if state is not None else 0
        q, k, v = self._project(x)
        if self.rotary is not None:
            q, k = self.rotary(q, k, start)
        prefix_sum = None
        if state is not None:
            if self.centring:
                prefix_sum = state.get("v_sum")
                acc = torch.promote_types(v.dtype, torch.float32)
                new_sum = v.to(acc).sum(2)
                state["v_sum"] = new_sum if prefix_sum is None else prefix_sum + new_sum
            kv = append_to_cache(state, k=k, v=v)
            k, v = kv["k"], kv["v"]
            state["pos"] = start + x.shape[1]
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = shaped_attention(q, k, v, self.alpha, self.beta, self.gamma if self.centring else None,
                             causal=self.causal, v_prefix_sum=prefix_sum,
                             dropout_p=self.dropout if self.training else 0.0,
                             key_mask=attention_mask.bool() if attention_mask is not None else None)
        y = merge_heads(y)
        return self.o(y) if self.o is not None else y

    def _static_forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """The static-cache branch (:mod:`leanformer.decoding`), Eq. 5 at the positions ``state["pos"]``:
        K/V written in place into pre-allocated buffers (V in K's dtype: under autocast the attention
        product reads it in that dtype anyway), ``β`` · masked softmax attention over them, then
        :func:`static_mix` (with :data:`COMPILE_STEP_MIX` a one-token call on CUDA runs its compiled form: one
        fused kernel instead of some ten element-wise launches in the step's CUDA graph)."""
        p = state["positions"]
        q, k, v = self._project(x)
        if self.rotary is not None:
            q, k = self.rotary(q, k, p)
        kv = write_kv(state, k=k, v=v.to(k.dtype))  # SAS(-P)'s v is the block input (float32 under autocast):
        keys = kv["k"]                               # cached in the keys' dtype, as the attention matmul reads it
        if self.n_kv != self.n_heads:
            keys = keys.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        soft = cached_attention(q, keys, kv["v"], p)
        v_sum = inv_count = None
        if self.centring:
            acc = torch.promote_types(v.dtype, torch.float32)
            if "v_sum" not in state:  # the first call (a prefill): the running sum starts at 0
                state["v_sum"] = v.new_zeros(v.shape[0], v.shape[1], v.shape[3], dtype=acc)
            elif starts_afresh(state):  # a rewound cache's new sequence: in place (a captured graph's buffer)
                state["v_sum"].zero_()
            v_sum = state["v_sum"]
            inv_count = p.memo(("inv_count", acc), lambda: 1.0 / (p.index + 1).to(acc))  # (T,)
        mix = _static_mix_on_cuda if x.shape[1] == 1 else static_mix
        out = mix(v, soft, self.alpha, self.beta, self.gamma if self.centring else None, v_sum, inv_count)
        y = merge_heads(out)
        return self.o(y) if self.o is not None else y


def static_mix(v: torch.Tensor, soft: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               gamma: torch.Tensor | None, v_sum: torch.Tensor | None, inv_count: torch.Tensor | None) -> torch.Tensor:
    """Eq. 5 for new tokens over a static cache: ``α v_own + β soft − γ · running mean``.

    v, soft: (B, H, T, D) (the new tokens' values and their softmax attention); alpha, beta, gamma: (H,)
    (gamma None: no centring, and v_sum, inv_count are not read); v_sum: (B, H, D), at least float32, the sum
    of v over every earlier position, advanced in place by these T tokens; inv_count: (T,) 1 / (position + 1)
    of the new tokens. The running mean is ``(v_sum + cumsum(v)) · inv_count`` in v_sum's dtype, then v's.
    Returns (B, H, T, D).
    """
    out = torch.addcmul(_per_head(alpha) * v, _per_head(beta), soft)
    if gamma is None:
        return out
    new = v.to(v_sum.dtype)
    sums = (new.cumsum(2) if new.shape[2] > 1 else new) + v_sum.unsqueeze(2)
    v_sum.copy_(sums[:, :, -1])
    mean = (sums * inv_count[:, None]).to(v.dtype)
    return torch.addcmul(out, _per_head(gamma), mean, value=-1)


COMPILE_STEP_MIX = False  # one-token static steps run static_mix compiled on CUDA (one fused kernel instead of
# ~10 launches). Off until timed: Inductor fuses away the bf16 rounding of the mean (the review of 2026-12-05
# compiled it with Inductor on the CPU: ≈ 1e-3 relative from the eager mix under autocast, ≈ 3e-3 in a bf16
# copy; its script was not kept), so graph-path tokens may differ
# from the eager path's; benchmarks/decode_profile.py measures it on and off
_static_mix_on_cuda = on_cuda_compiled(static_mix, lambda: COMPILE_STEP_MIX)
