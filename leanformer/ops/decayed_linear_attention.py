"""Decayed (RetNet-style) linear attention in three equivalent forms, plus fla's kernels as a fourth.

Per batch row and head h, with feature-mapped queries/keys ``q, k``: (B, H, T, m) and values ``v``:
(B, H, T, d), the output is

    o_i = Σ_{j≤i} exp((i−j)·logγ_h + n_j − n_i) (q_i · k_j) v_j                      (DiJiang eq. 13-14)

``log_gamma``: (H,) = log γ_h ≤ 0. ``log_norm`` n: (B, H, T) is an optional per-token log-normaliser
(``None`` = 0, the plain form ``Σ γ^(i−j) (q_i·k_j) v_j``). It divides every output o_i by exp(n_i) and
lets a caller keep all exponents ≤ 0 when its keys carry a large scale: DiJiang's exp feature map passes
keys already divided by exp(n_j) and picks ``n_i = max(n_{i−1} + logγ, …)`` so that
``n_i ≥ n_j + (i−j)·logγ`` for every j ≤ i (see :mod:`leanformer.layers.dijiang`). Nothing here requires
that inequality; it only decides whether the exponents stay ≤ 0.

Forms (shapes as above; all decays computed from ``i − j`` directly, never as γ^i · γ^-j):

* :func:`parallel` — masked T×T, O(T²·(m+d)): the reference, and fast for short sequences.
* :func:`chunk` — chunkwise, O(T·C·(m+d) + T·m·d): intra-chunk masked part + a carried state
  S: (B, H, m, d); every exponent is ≤ 0, so nothing overflows at any length.
* :func:`recurrent` — S ← γ·S + kᵀv, o = q·S, one token at a time (decoding).
* :func:`fused` — the parallel form's result with the masked part in a flash-style Triton kernel
  (:mod:`leanformer.ops.fused_decay_attention`): O(T²·(m+d)) time, O(T·(m+d)) memory; CUDA (or Triton's
  interpreter), float32/bf16/fp16, m and d powers of two in [16, 128]; no gradient to ``log_norm``.
* :func:`fla_chunk` / :func:`fla_recurrent` — fla's Triton kernels (``chunk_simple_gla`` /
  ``fused_recurrent_simple_gla``), imported lazily, CUDA only, always with a constant decay ``g_gamma``:
  a ``log_norm`` and a decay gradient reach them through :func:`leanformer.ops.constant_decay.via_constant_decay`
  (an exact shift), never through fla's per-token gate ``g``, whose backward fla 0.6.0 refuses on Hopper
  with Triton < 3.7.1. Checked on an H100 against float64 (docs/benchmarks.md, 2026-11-24).
* :func:`fla_gated` — fla's ``chunk_simple_gla`` forward with that per-token gate after all, g_t = logγ −
  (n_t − n_{t−1}) ≤ 0 (:mod:`leanformer.ops.token_gates`): exact with no shift and no host read; its gradient
  (no initial state) is three more forward passes (:mod:`leanformer.ops.gated_attention`), never fla's
  refused backward.

Every form has one signature, ``(q, k, v, log_gamma, initial_state=None, log_norm=None,
initial_log_norm=None) → (o, final_state)`` (``chunk`` adds the keyword ``chunk_size``, ``fused`` the
keyword ``output_final_state``); :data:`FORMS` names them.

A state S is always "normalised at" the log-normaliser of the last token it has absorbed:
``S = Σ_j exp((t−j)·logγ + n_j − n_t) k_jᵀ v_j`` for the last token t; ``initial_log_norm`` (B, H) is
that n_t for an ``initial_state`` (0 when omitted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from leanformer.ops import fused_decay_attention as fused_kernel
from leanformer.ops.constant_decay import PlainKernel, route_decay_gradient, via_constant_decay
from leanformer.ops.gated_attention import fla_gated_kernel, gated_form
from leanformer.ops.on_cuda import on_cuda_compiled
from leanformer.ops.token_gates import via_token_gates

Form = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
           log_norm: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k: (B, H, T, m) and v: (B, H, T, d) with matching B, H, T; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if log_gamma.shape != (q.shape[1],):
        raise ValueError(f"log_gamma must have shape (H,)=({q.shape[1]},), got {tuple(log_gamma.shape)}")
    if log_norm is not None and log_norm.shape != q.shape[:3]:
        raise ValueError(f"log_norm must have shape (B, H, T)={tuple(q.shape[:3])}, got {tuple(log_norm.shape)}")


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States accumulate in at least float32 (bf16/fp16 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _zeros_norm(q: torch.Tensor, initial_log_norm: torch.Tensor | None) -> torch.Tensor:
    if initial_log_norm is not None:
        return initial_log_norm.to(_state_dtype(q.dtype))
    return q.new_zeros(q.shape[:2], dtype=_state_dtype(q.dtype))


def decay_matrix(log_gamma: torch.Tensor, t_q: int, t_k: int | None = None,
                 log_norm_q: torch.Tensor | None = None, log_norm_k: torch.Tensor | None = None,
                 offset: int = 0) -> torch.Tensor:
    """exp((i−j)·logγ + n_j − n_i) for query i, key j ≤ i + offset, 0 above: (H or B,H, t_q, t_k).

    Query i sits at position ``offset + i`` of the keys' frame. The exponent is built from ``i − j``
    (and n differences), masked to −inf above the diagonal *before* ``exp``, so it never overflows.
    """
    t_k = t_q if t_k is None else t_k
    dev = log_gamma.device
    i = torch.arange(t_q, device=dev)[:, None] + offset
    j = torch.arange(t_k, device=dev)[None, :]
    diff = (i - j).to(log_gamma.dtype)
    expo = diff * log_gamma[:, None, None]  # (H, t_q, t_k)
    if log_norm_q is not None:
        expo = expo + log_norm_k[..., None, :] - log_norm_q[..., :, None]
    expo = torch.where(diff >= 0, expo, torch.full((), float("-inf"), dtype=expo.dtype, device=dev))
    return expo.exp()


def _initial(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    B, H, _, m = q.shape
    sd = _state_dtype(q.dtype)
    return initial_state.to(sd) if initial_state is not None else q.new_zeros(B, H, m, v.shape[-1], dtype=sd)


def parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
             initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
             initial_log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked quadratic form: ``((q kᵀ) ⊙ Γ) v`` with Γ_ij = exp((i−j)·logγ + n_j − n_i), j ≤ i, plus the
    initial state's share ``exp((i+1)·logγ + n₀ − n_i) q_i S₀``.

    q, k: (B, H, T, m); v: (B, H, T, d); log_gamma: (H,); initial_state: (B, H, m, d) or None;
    log_norm: (B, H, T) or None → (o: (B, H, T, d), state: (B, H, m, d)). The state is the chunk form's
    with a single chunk of length T (computed from the same decays).
    """
    _check(q, k, v, log_gamma, log_norm)
    _, _, T, _ = q.shape
    sd = _state_dtype(q.dtype)
    lg = log_gamma.to(sd)
    ln = log_norm.to(sd) if log_norm is not None else None
    if T == 0:
        return v.new_zeros(v.shape), _initial(q, v, initial_state)
    decay = decay_matrix(lg, T, log_norm_q=ln, log_norm_k=ln).to(q.dtype)
    o = (q @ k.transpose(-1, -2) * decay) @ v
    share, S = _boundary(q, k, v, lg, ln, initial_state, initial_log_norm, True)
    if share is not None:
        o = o + share.to(o.dtype)
    return o, S


def _boundary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lg: torch.Tensor, ln: torch.Tensor | None,
              initial_state: torch.Tensor | None, initial_log_norm: torch.Tensor | None,
              output_final_state: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The parts of a T-token block (T ≥ 1) beside its masked T×T part, as :func:`parallel` defines them:
    the initial state's share ``exp((i+1)·logγ + n₀ − n_i) q_i S₀`` (B, H, T, d) in the state dtype (None
    without an initial state) and the final state (B, H, m, d) (None unless ``output_final_state``).

    lg: (H,) and ln: (B, H, T) or None, already in the state dtype.
    """
    if initial_state is None and not output_final_state:
        return None, None
    _, _, T, _ = q.shape
    sd = _state_dtype(q.dtype)
    S0 = _initial(q, v, initial_state)
    n0 = _zeros_norm(q, initial_log_norm) if ln is not None else None
    r = torch.arange(T, device=q.device, dtype=sd)
    from_start = (r + 1) * lg[:, None]                                    # (H, T): query i ← S₀
    to_end = (T - 1 - r) * lg[:, None]                                    # (H, T): key j → state
    carry = T * lg[None, :].expand(q.shape[0], -1)                        # (B, H): S₀ → state
    if ln is not None:
        from_start = from_start + n0[..., None] - ln
        to_end = to_end + ln - ln[..., -1:]
        carry = carry + n0 - ln[..., -1]
    else:
        from_start, to_end = from_start.expand(q.shape[:3]), to_end.expand(q.shape[:3])
    share = (q.to(sd) * from_start.exp()[..., None]) @ S0 if initial_state is not None else None
    S = None
    if output_final_state:
        S = carry.exp()[..., None, None] * S0 + keys_times_values(k.to(sd) * to_end.exp()[..., None], v.to(sd))
    return share, S


# The fused form's boundary terms (a prefill chunk's initial-state share and final state: about 40 element-wise
# ops, products and reductions per layer and chunk, counted on the CPU) through one torch.compile form on CUDA:
# a prefill is host-bound (docs/benchmarks.md, 8K prefill, 2026-12-06 23:43). False: eager (not timed yet).
COMPILE_BOUNDARY_ON_CUDA = True
_boundary_on_cuda = on_cuda_compiled(_boundary, lambda: COMPILE_BOUNDARY_ON_CUDA)

SPLIT_K_ROWS = 256  # positions per partial product in keys_times_values


def keys_times_values(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``kᵀ v`` summed over T: k (B, H, T, m), v (B, H, T, d) → (B, H, m, d), as partial products over
    :data:`SPLIT_K_ROWS` positions each, then their sum (split-K). One product with K = T and an m × d = 64 × 64
    output has a handful of tiles per (batch row, head): cuBLAS ran it as 12 tiles of 32 × 32 in float32 FFMA,
    3.1 ms in an 8K prefill at batch 1 (H100, 2026-12-06, docs/benchmarks.md); cut into T / 256 pieces it has
    that many times more. Same sum in another order."""
    B, H, T, m = k.shape
    n = T // SPLIT_K_ROWS
    if n < 2 or v.shape[:3] != k.shape[:3]:  # (broadcast batch dimensions: one product, as before)
        return k.transpose(-1, -2) @ v
    main = n * SPLIT_K_ROWS
    kp = k[:, :, :main].reshape(B, H, n, SPLIT_K_ROWS, m)
    vp = v[:, :, :main].reshape(B, H, n, SPLIT_K_ROWS, v.shape[-1])
    out = (kp.transpose(-1, -2) @ vp).sum(dim=2)
    if main < T:
        out = out + k[:, :, main:].transpose(-1, -2) @ v[:, :, main:]
    return out


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
          initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
          initial_log_norm: torch.Tensor | None = None, *, output_final_state: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`parallel`'s result with its masked part through the fused Triton kernel
    (:mod:`leanformer.ops.fused_decay_attention`: flash-style, no T×T tensor in memory).

    Arguments and result as :func:`parallel`; the initial state's share and the final state are
    :func:`parallel`'s own torch code. ``output_final_state=False`` skips the final state (returned as
    None), which a full pass without a decoding cache never reads. A learnable decay (``log_gamma``
    requiring grad) gets its gradient through q and k
    (:func:`leanformer.ops.constant_decay.route_decay_gradient`; the kernel and the state terms get
    the detached decay). ``log_norm`` gets no gradient here: one that requires grad is an error (the
    ``parallel`` form differentiates it). Unsupported inputs (:func:`fused_supported`: device, dtype,
    m or d not a power of two in [16, 128]) raise a ValueError naming the reason. The kernel's default
    (factored) tiles need ``log_norm`` to be a running maximum under the decay, n_i − i·logγ non-decreasing,
    as :func:`leanformer.layers.dijiang.running_log_norm` makes it (and logγ ≤ 0); for any other n set
    ``fused_decay_attention.FACTORED = False`` (``CHECK_MONOTONE = True`` checks it, with a device sync).
    """
    _check(q, k, v, log_gamma, log_norm)
    if log_norm is not None and log_norm.requires_grad:
        raise ValueError("dla.fused gives log_norm no gradient, but log_norm requires grad; detach it "
                         "(DiJiang's running log-normaliser is computed from detached values) or use the "
                         "'parallel' form, which differentiates it")
    T = q.shape[2]
    q, k, initial_state, state_factor = route_decay_gradient(q, k, log_gamma, initial_state)
    sd = _state_dtype(q.dtype)
    lg = log_gamma.detach().to(sd)
    ln = log_norm.to(sd) if log_norm is not None else None
    if T == 0:
        return v.new_zeros(v.shape), _initial(q, v, initial_state) if output_final_state else None
    o = fused_kernel.decayed_attention(q, k, v, lg, ln)
    if initial_state is None and not output_final_state:  # a full pass: no boundary terms (and no compiled call)
        return o, None
    share, S = _boundary_on_cuda(q, k, v, lg, ln, initial_state, initial_log_norm, output_final_state)
    if share is not None:
        o = o + share.to(o.dtype)
    if S is not None and state_factor is not None:
        S = S * state_factor
    return o, S


fused_supported = fused_kernel.fused_supported


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
              initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
              initial_log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step by step: ``S_t = exp(logγ + n_{t−1} − n_t) S_{t−1} + k_tᵀ v_t``, ``o_t = q_t S_t``.

    q, k: (B, H, T, m); v: (B, H, T, d); initial_state: (B, H, m, d) or None (zeros) →
    (o: (B, H, T, d), state: (B, H, m, d)). The state is kept in at least float32.
    """
    _check(q, k, v, log_gamma, log_norm)
    B, H, T, m = q.shape
    sd = _state_dtype(q.dtype)
    S = _initial(q, v, initial_state)
    lg = log_gamma.to(sd)[None, :, None, None]
    prev = None
    if log_norm is not None:  # with no initial state S is 0 and its carry is moot: take n_0 itself, so that the
        # carry exp(logγ + n_prev − n_0) stays finite (n_0 < −88 would make it inf, and inf·0 = NaN in float32)
        prev = log_norm[:, :, 0].to(sd) if initial_state is None and T else _zeros_norm(q, initial_log_norm)
    outs = []
    for t in range(T):
        step = lg
        if log_norm is not None:
            cur = log_norm[:, :, t].to(sd)
            step = lg + (prev - cur)[..., None, None]
            prev = cur
        kt, vt, qt = k[:, :, t].to(sd), v[:, :, t].to(sd), q[:, :, t].to(sd)
        S = step.exp() * S + kt[..., :, None] * vt[..., None, :]
        outs.append((qt[..., None, :] @ S).squeeze(-2))
    o = torch.stack(outs, dim=2).to(v.dtype) if T else v.new_zeros(B, H, 0, v.shape[-1])
    return o, S


def _chunk_block(q, k, v, lg, ln, S0, n0, C: int):
    """Chunked form over T = N·C tokens (T a multiple of C). lg: (H,) float; ln: (B,H,T) or None;
    S0: (B,H,m,d) state-dtype; n0: (B,H) log-norm of S0 (or None when ln is None). Returns (o, S_end)."""
    B, H, T, m = q.shape
    d = v.shape[-1]
    N = T // C
    sd = S0.dtype
    qc, kc, vc = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    r = torch.arange(C, device=q.device, dtype=sd)
    lgh = lg[:, None]  # (H, 1)
    if ln is None:
        # Decays shared by every chunk: intra (H,C,C); key-to-chunk-end (H,C); chunk-start-to-query (H,C).
        intra = decay_matrix(lg, C)[None, :, None]                      # (1,H,1,C,C)
        to_end = ((C - 1 - r) * lgh).exp()[None, :, None, :]            # (1,H,1,C)
        from_start = ((r + 1) * lgh).exp()[None, :, None, :]            # (1,H,1,C)
        carry = (C * lg).exp()[None, :, None].expand(B, H, N)           # (B,H,N)
    else:
        lnc = ln.reshape(B, H, N, C).to(sd)
        n_end = lnc[..., -1]                                            # (B,H,N)
        n_prev = torch.cat((n0[..., None], n_end[..., :-1]), dim=-1)    # n of the token before each chunk
        base = (r[:, None] - r[None, :])                                # (C,C) i−j
        expo = base * lg[:, None, None][None, :, None] + lnc[..., None, :] - lnc[..., :, None]
        intra = torch.where(base >= 0, expo, torch.full((), float("-inf"), dtype=sd, device=q.device)).exp()
        to_end = ((C - 1 - r) * lgh[None, :, None] + lnc - n_end[..., None]).exp()
        from_start = ((r + 1) * lgh[None, :, None] + n_prev[..., None] - lnc).exp()
        carry = (C * lg[None, :, None] + n_prev - n_end).exp()
    # Intra-chunk (masked, in the input dtype) and each chunk's own contribution to the state.
    o = (qc @ kc.transpose(-1, -2) * intra.to(q.dtype)) @ vc                          # (B,H,N,C,d)
    U = (kc.to(sd) * to_end[..., None]).transpose(-1, -2) @ vc.to(sd)                 # (B,H,N,m,d)
    # State entering each chunk: S_c = carry_{c−1} S_{c−1} + U_{c−1} (a short loop over chunks).
    states = []
    S = S0
    for c in range(N):
        states.append(S)
        S = carry[:, :, c, None, None] * S + U[:, :, c]
    Sin = torch.stack(states, dim=2)                                                  # (B,H,N,m,d)
    o = o + ((qc.to(sd) * from_start[..., None]) @ Sin).to(o.dtype)
    return o.reshape(B, H, T, d), S


def chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
          initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
          initial_log_norm: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise form: O(T·C·(m+d) + T·m·d) time, O(T·(m+d) + (T/C)·m·d) memory.

    q, k: (B, H, T, m); v: (B, H, T, d); initial_state: (B, H, m, d) or None →
    (o: (B, H, T, d), state: (B, H, m, d)). A last chunk shorter than ``chunk_size`` (T not a multiple
    of C) is processed as one chunk of its own length.
    """
    _check(q, k, v, log_gamma, log_norm)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    B, H, T, m = q.shape
    sd = _state_dtype(q.dtype)
    S = _initial(q, v, initial_state)
    n0 = _zeros_norm(q, initial_log_norm) if log_norm is not None else None
    lg = log_gamma.to(sd)
    C = min(chunk_size, T) if T else 1
    main = (T // C) * C
    outs = []
    if main:
        ln = log_norm[..., :main] if log_norm is not None else None
        o, S = _chunk_block(q[:, :, :main], k[:, :, :main], v[:, :, :main], lg, ln, S, n0, C)
        outs.append(o)
        if log_norm is not None:
            n0 = log_norm[..., main - 1].to(sd)
    if main < T:  # ragged tail: one chunk of length T − main
        ln = log_norm[..., main:] if log_norm is not None else None
        o, S = _chunk_block(q[:, :, main:], k[:, :, main:], v[:, :, main:], lg, ln, S, n0, T - main)
        outs.append(o)
    o = torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return o, S


# ---------------------------------------------------------------------------------------------- fla
def _import_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as err:  # fla is optional
        raise RuntimeError(
            "dijiang mode='fla' needs the flash-linear-attention package (pip install flash-linear-attention) "
            f"and a CUDA GPU; import failed: {err}. Use mode='auto', 'chunk', 'parallel' or 'recurrent'."
        ) from err
    return chunk_simple_gla, fused_recurrent_simple_gla


def fla_available() -> bool:
    """True when fla imports (it is never imported at module import time)."""
    try:
        _import_fla()
    except RuntimeError:
        return False
    return True


def fla_unavailable_reason(device: torch.device) -> str | None:
    """Why the fla backend cannot run on ``device`` (no CUDA, not installed, broken import), or ``None``."""
    if device.type != "cuda":
        return "needs fla and CUDA"
    try:
        if not fla_available():
            return "fla is not installed"
    except Exception as e:  # noqa: BLE001 - fla present but broken (version mismatch with torch/triton)
        return f"fla import failed ({type(e).__name__}: {e})"[:300]
    return None


def _fla_kernel(recurrent_kernel: bool) -> PlainKernel:
    """fla's kernel for the plain form (no log-norm, constant decay ``g_gamma``, which gets no gradient)
    on our (B, H, T, ·) layout; fla's own is (B, T, H, ·): the transposes are free when the tensors were
    made from (B, T, H, ·) memory, as the model's projections and feature map make them."""
    def run(q, k, v, log_gamma, initial_state):
        if not q.is_cuda:
            raise RuntimeError(f"dijiang mode='fla' needs CUDA tensors, got device {q.device}; use mode='chunk'")
        kernel = _import_fla()[1 if recurrent_kernel else 0]
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        o, state = kernel(qt, kt, vt, g_gamma=log_gamma.float(), scale=1.0,  # fla scales q by 1/√m by default
                          initial_state=initial_state.float() if initial_state is not None else None,
                          output_final_state=True)
        return o.transpose(1, 2), state
    return run


def fla_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
              initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
              initial_log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fla ``chunk_simple_gla`` (Triton, CUDA) through :func:`via_constant_decay`: same arguments and
    result as :func:`recurrent`, forward and backward (log-norm, decay and state gradients included)."""
    return via_constant_decay(_fla_kernel(False), q, k, v, log_gamma, initial_state, log_norm, initial_log_norm)


def fla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                  initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
                  initial_log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fla ``fused_recurrent_simple_gla`` (Triton, CUDA) through :func:`via_constant_decay`: same
    arguments and result as :func:`recurrent`."""
    return via_constant_decay(_fla_kernel(True), q, k, v, log_gamma, initial_state, log_norm, initial_log_norm)


def fla_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
              initial_state: torch.Tensor | None = None, log_norm: torch.Tensor | None = None,
              initial_log_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fla ``chunk_simple_gla`` with one gate per token (:mod:`leanformer.ops.token_gates`): the log-norm enters
    as gates ≤ 0, so there is no shift, no range guard and no read back to the host (a prefill or a training
    step can be captured in a CUDA graph). Same arguments and result as :func:`recurrent`.

    Without an initial state it is the op ``leanformer::gated_attention`` (:mod:`leanformer.ops.gated_attention`),
    whose gradient to q, k, v is three more forward passes of fla's kernel (fla's own backward for a per-token
    gate is refused on Hopper with Triton < 3.7.1); a learnable decay's gradient goes through q and k
    (:func:`leanformer.ops.constant_decay.route_decay_gradient`). The final state then carries no gradient
    (:class:`leanformer.layers.dijiang.DiJiangAttention` sends a prompt with a state here only without
    gradients). A ``log_norm`` that requires grad (DiJiang detaches its normaliser), or a gradient with an
    initial state, runs :func:`fla_chunk` instead."""
    _check(q, k, v, log_gamma, log_norm)
    if not q.is_cuda:
        raise RuntimeError(f"dijiang form 'fla_gated' needs fla and CUDA tensors, got device {q.device}; use 'chunk'")
    grad = torch.is_grad_enabled()
    if initial_state is None and not (grad and log_norm is not None and log_norm.requires_grad):
        return gated_form(q, k, v, log_gamma, log_norm)
    if grad and any(t is not None and t.requires_grad
                    for t in (q, k, v, log_gamma, initial_state, log_norm, initial_log_norm)):
        return fla_chunk(q, k, v, log_gamma, initial_state, log_norm, initial_log_norm)
    return via_token_gates(fla_gated_kernel, q, k, v, log_gamma.detach(), initial_state, log_norm,
                           initial_log_norm)


# Every form, one signature: (q, k, v, log_gamma, initial_state=None, log_norm=None, initial_log_norm=None)
# → (o, final_state). ``chunk`` also takes ``chunk_size=``, ``fused`` ``output_final_state=`` (keywords).
FORMS: dict[str, Form] = {
    "parallel": parallel,
    "chunk": chunk,
    "recurrent": recurrent,
    "fla_chunk": fla_chunk,
    "fla_recurrent": fla_recurrent,
    "fla_gated": fla_gated,
    "fused": fused,
}
