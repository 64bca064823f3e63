"""A fused (flash-style) Triton kernel for the masked part of decayed linear attention, forward and backward.

Per batch row b and head h, with q, k: (B, H, T, m), v: (B, H, T, d), log γ: (H,) and an optional
log-normaliser n: (B, H, T) (see :mod:`leanformer.ops.decayed_linear_attention`, DiJiang eq. 13-14):

    o_i = Σ_{j≤i} exp((i−j)·logγ_h + n_j − n_i) (q_i·k_j) v_j,    i.e.  o = (Q Kᵀ ⊙ Γ) V,

Γ_ij = exp((i−j)·logγ + n_j − n_i) for j ≤ i and 0 above. No T×T matrix is ever stored: each program
holds one block of queries (or keys) and loops over the blocks of the other side up to (from) the diagonal,
recomputing Γ per tile from ``i − j`` and n, masked to −inf above the diagonal *before* ``exp`` (nothing
overflows). Accumulators are float32; the tile ``P = S ⊙ Γ`` is cast to the input dtype for the second
product (as FlashAttention does), so bf16/fp16 inputs run both products on tensor cores. There is no
softmax, hence no row statistics; the backward is

    dV = Pᵀ dO,   dS = (dO Vᵀ) ⊙ Γ,   dQ = dS K,   dK = dSᵀ Q,

in two kernels: dK/dV (one program per key block, looping over query blocks from the diagonal on) and dQ
(one program per query block). log γ and n get no gradient here: :func:`leanformer.ops.decayed_linear_attention.fused`
passes a learnable decay's gradient through q and k instead
(:func:`leanformer.ops.constant_decay._decay_gradient_through_qk`) and refuses an n that requires grad.

The op is a ``torch.library.triton_op`` (``leanformer::decayed_attention`` and its backward
``leanformer::decayed_attention_bwd``) with ``register_autograd``, so ``torch.compile`` sees the Triton
kernels without a graph break. Triton is imported lazily (on the first call), and the kernels are built
then: with ``TRITON_INTERPRET=1`` in the environment at that moment they run in Triton's interpreter on
CPU tensors (tests), otherwise they need CUDA tensors.

Supported (else :func:`fused_supported` says why, and the caller uses the ``parallel`` form): CUDA
tensors (or CPU tensors under the interpreter); float32, bfloat16 or float16, q, k, v of one dtype;
m and d powers of two in [16, 256] (what ``tl.dot`` and the register budget allow); any B, H, T ≥ 1
(the last block is masked); any strides (the feature map's (B, H, T, m) views of (B, T, H, m) memory
are read in place). Float32 products run in full IEEE precision (no TF32).
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK = 64  # query and key block (fixed: no autotuning, so the first call costs one compile per shape)
NUM_WARPS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_DIM, MAX_DIM = 16, 256


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def fused_reason(device: torch.device, dtype: torch.dtype, m: int, d: int) -> str | None:
    """Why the fused kernel cannot run q, k: (…, m) and v: (…, d) of ``dtype`` on ``device``; None if it can."""
    if device.type != "cuda" and not (device.type == "cpu" and _interpret()):
        return f"needs CUDA tensors (got {device.type}; CPU tensors run only under TRITON_INTERPRET=1)"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (float32, bfloat16, float16)"
    for name, x in (("feature dim m", m), ("value dim d", d)):
        if x < MIN_DIM or x > MAX_DIM or x & (x - 1):
            return f"{name}={x} must be a power of two in [{MIN_DIM}, {MAX_DIM}]"
    return _triton_import_error()


def fused_supported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why :func:`decayed_attention` refuses q: (B, H, T, m) with v: (B, H, T, d), or None when it runs them."""
    if q.dtype != v.dtype:
        return f"q and v must have one dtype (got {q.dtype} and {v.dtype})"
    if q.device != v.device:
        return f"q and v must be on one device (got {q.device} and {v.device})"
    return fused_reason(q.device, q.dtype, q.shape[-1], v.shape[-1])


# ------------------------------------------------------------------------------------------- kernels
def _kernels():
    """The three Triton kernels (their module is imported on first use, which reads TRITON_INTERPRET)."""
    from leanformer.ops import _fused_decay_kernels as kern

    return kern.fwd_kernel, kern.bwd_dkdv_kernel, kern.bwd_dq_kernel


def _block(T: int) -> int:
    """BLOCK, or the smallest power of two ≥ T (≥ 16, what tl.dot needs) for short sequences."""
    return min(BLOCK, max(MIN_DIM, 1 << (T - 1).bit_length()))


def _launch_args(q: torch.Tensor, log_norm: torch.Tensor | None):
    """n (a broadcast 0 when None), its strides, the block size and the kernels' constexpr arguments.

    Under the interpreter the loops run over every block (T_END = T rounded up to the block), masked:
    Triton 3.6's interpreter cannot take a loop bound computed from the program id with numpy ≥ 2.4
    (triton-lang/triton#9171); compiled kernels loop only up to (from) the diagonal.
    """
    B, H, T, _ = q.shape
    n = log_norm if log_norm is not None else q.new_zeros((), dtype=torch.float32).expand(B, H, T)
    bs = _block(T)
    interpret = _interpret()
    meta = dict(BLOCK_M=bs, BLOCK_N=bs, HAS_NORM=log_norm is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32: ignored for 16-bit inputs
                INTERPRET=interpret, T_END=_cdiv(T, bs) * bs if interpret else 0, num_warps=NUM_WARPS)
    return n, n.stride(), bs, meta


# ----------------------------------------------------------------------------------------------- ops
@functools.lru_cache(maxsize=1)
def _ops():
    """Register the custom ops (once, on first use: Triton is imported here) → (forward op, backward op)."""
    from torch.library import triton_op, wrap_triton

    fwd_k, dkdv_k, dq_k = _kernels()

    @triton_op("leanformer::decayed_attention", mutates_args=())
    def forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                   log_norm: torch.Tensor | None) -> torch.Tensor:
        B, H, T, m = q.shape
        d = v.shape[-1]
        o = v.new_empty(B, T, H, d).transpose(1, 2)  # (B, T, H, d) memory, as v comes from the projections
        n, sn, bs, meta = _launch_args(q, log_norm)
        wrap_triton(fwd_k)[(_cdiv(T, bs), B * H)](
            q, k, v, log_gamma, n, o, *q.stride(), *k.stride(), *v.stride(), *sn, *o.stride(),
            H, T, M=m, D=d, **meta)
        return o

    @triton_op("leanformer::decayed_attention_bwd", mutates_args=())
    def backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                    log_norm: torch.Tensor | None, grad_o: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, T, m = q.shape
        d = v.shape[-1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        n, sn, bs, meta = _launch_args(q, log_norm)
        grid = (_cdiv(T, bs), B * H)
        meta.update(M=m, D=d)
        wrap_triton(dkdv_k)[grid](
            q, k, v, log_gamma, n, grad_o, dk, dv, *q.stride(), *k.stride(), *v.stride(), *sn,
            *grad_o.stride(), *dk.stride(), *dv.stride(), H, T, **meta)
        wrap_triton(dq_k)[grid](
            k, v, log_gamma, n, grad_o, dq, *k.stride(), *v.stride(), *sn, *grad_o.stride(), *dq.stride(),
            H, T, **meta)
        return dq, dk, dv

    def setup_context(ctx, inputs, output):
        q, k, v, log_gamma, log_norm = inputs
        ctx.save_for_backward(q, k, v, log_gamma, log_norm)

    def backward(ctx, grad_o):
        q, k, v, log_gamma, log_norm = ctx.saved_tensors
        dq, dk, dv = backward_op(q, k, v, log_gamma, log_norm, grad_o)
        return dq, dk, dv, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def decayed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                      log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The masked part ``((q kᵀ) ⊙ Γ) v`` through the fused kernels, differentiable in q, k, v.

    q, k: (B, H, T, m); v: (B, H, T, d), one dtype (float32, bfloat16 or float16), any strides;
    log_gamma: (H,) (no gradient: detach it); log_norm: (B, H, T) or None (no gradient) →
    o: (B, H, T, d) in v's dtype, laid out as (B, T, H, d) memory. Raises ValueError with the reason when
    :func:`fused_supported` refuses the inputs, or when log_gamma / log_norm require grad.
    """
    reason = fused_supported(q, v)
    if reason is not None:
        raise ValueError(f"the fused decayed-attention kernel cannot run these inputs: {reason}; "
                         "use the 'parallel' form")
    if k.shape != q.shape or k.dtype != q.dtype or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k: (B, H, T, m) of one dtype and v: (B, H, T, d); got q {tuple(q.shape)} "
                         f"{q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}")
    if log_gamma.requires_grad or (log_norm is not None and log_norm.requires_grad):
        raise ValueError("the fused kernel gives log_gamma and log_norm no gradient: pass them detached "
                         "(decayed_linear_attention.fused routes a learnable decay's gradient through q and k)")
    B, H, T, _ = q.shape
    if T == 0:
        return v.new_zeros(v.shape)
    lg = log_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    ln = log_norm.to(torch.float32) if log_norm is not None else None
    return _ops()[0](q, k, v, lg, ln)
