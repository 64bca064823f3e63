"""Shaped attention's causal mix as two Triton kernels: ``α v + β s − γ C v`` in one pass each way.

    out = α_h v + β_h s − γ_h C v,    (C v)_t = (1/(t+1)) Σ_{j≤t} v_j          (SAS, He & Hofmann 2024, Eq. 5)

for v (B, H, T, D), s = SDPA(q, k, v) (B, H, T, D) and per-head gains α, β, γ (H,): the part of
:func:`leanformer.layers.shaped.shaped_attention` around SDPA in a full causal pass (no cache, no padding).
In PyTorch (compiled or not) it is a chain of kernels each way: the running mean (a chunked product and a
scan), the combination, and in the backward the reverse running sum, the two gradients and three
reductions for the gains. Here the forward is one kernel that writes ``out`` and the backward one kernel
that writes v's share of dv and SDPA's ds = β dout and the gains' partial sums (see
:mod:`leanformer.ops._shaped_mix_kernels`); a sequence cut into several chunks (:func:`chunk_len`: at most
:data:`CHUNK_T` positions, fewer when the batch and heads alone would leave the GPU idle) adds one pre-pass each
way (chunk sums, then a prefix over chunks) so that its chunks scan in parallel. Nothing is saved but v and s,
which SDPA's backward keeps anyway.

Ops are ``torch.library.triton_op``s (opaque custom ops under ``TRITON_INTERPRET=1``), registered as
:mod:`leanformer.ops.fused_decay_attention`'s are, so ``torch.compile`` traces them. Supported (else
:func:`shaped_mix_supported` says why): CUDA on sm_80+ or the CPU under the interpreter; float32, bfloat16 or
float16 v and s (each its own); D a power of two in [16, 128]; any strides with unit stride along D.
"""

from __future__ import annotations

import torch

from leanformer.ops.fused_decay_attention import (_cdiv, _on_device, _register, _triton_import_error, _wrap,
                                                  kernel_reason)

BLOCK_T = 64  # positions per tile of the time scan
CHUNK_T = 1024  # positions per program: longer sequences are cut into chunks scanned in parallel, each from the
# sum of the chunks before it (a pre-pass over v, or over dout backward, and a prefix sum over chunks); one
# serial scan over 32K positions kept too few loads in flight to use the GPU's bandwidth (review, H100)
NUM_WARPS = 4
MIN_PROGRAMS = 512  # programs that keep a GPU's SMs busy (an H100 has 132): short sequences at a small batch are
# cut into shorter chunks until there are this many (batch rows × heads × column blocks alone gave 96 programs
# at B 4, H 12, D 64, and 1,024 positions took 0.026 ms forward and 0.052 backward, ~20% of bandwidth: H100,
# 2026-12-06, docs/benchmarks.md)


def block_cols(d: int) -> int:
    """Value columns per program: 32 (D = 64 at B 4, H 12 → 96 programs), or D when smaller."""
    return min(32, d)


def shaped_mix_supported(v: torch.Tensor, s: torch.Tensor) -> str | None:
    """Why the kernels cannot mix v and s (B, H, T, D), or None when they can."""
    if v.dim() != 4 or v.shape != s.shape:
        return f"v and s must be (B, H, T, D) of one shape; got {tuple(v.shape)} and {tuple(s.shape)}"
    if v.device != s.device:
        return f"v and s must be on one device; got {v.device} and {s.device}"
    if v.stride(-1) != 1 or s.stride(-1) != 1:
        return "v and s need unit stride along D"
    for dtype in dict.fromkeys((v.dtype, s.dtype)):  # each its own: SAS's v is the block input, float32 under autocast
        reason = kernel_reason(v.device, dtype, (("head dim D", v.shape[-1]),))
        if reason is not None:
            return reason
    return _triton_import_error()


def _kernels():
    from leanformer.ops import _shaped_mix_kernels as kern

    return kern.shaped_mix_fwd_kernel, kern.shaped_mix_bwd_kernel, kern.chunk_sums_kernel


def _like_heads(v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, H, T, D) in (B, T, H, D) memory (merging the heads afterwards is a view), in ``dtype`` or v's."""
    B, H, T, D = v.shape
    return v.new_empty(B, T, H, D, dtype=dtype or v.dtype).transpose(1, 2)


def _new_out(v, s, alpha, beta, gamma):
    return _like_heads(v, torch.promote_types(v.dtype, s.dtype))  # as the PyTorch form's result


def chunk_len(v: torch.Tensor) -> int:
    """Positions per program for v (B, H, T, D): at most :data:`CHUNK_T`, at least two tiles, and short enough
    that there are :data:`MIN_PROGRAMS` programs where the sequence allows; a multiple of BLOCK_T."""
    B, H, T, D = v.shape
    rows = max(1, B * H * _cdiv(D, block_cols(D)))
    chunk = _cdiv(_cdiv(max(T, 1), _cdiv(MIN_PROGRAMS, rows)), BLOCK_T) * BLOCK_T
    return min(CHUNK_T, max(2 * BLOCK_T, chunk))


def _grid(v: torch.Tensor, chunk: int) -> tuple[int, int, int]:
    """(batch rows × heads, column blocks, time chunks of ``chunk`` positions)."""
    B, H, T, D = v.shape
    return B * H, _cdiv(D, block_cols(D)), max(1, _cdiv(T, chunk))


def _carries(x: torch.Tensor, grid: tuple[int, int, int], chunk: int, per_position: bool) -> torch.Tensor | None:
    """The float32 sum each chunk starts its scan from, (B, H, n_chunks, D): of x before the chunk (forward),
    or of x_t / (t+1) after it (``per_position``, the backward's reverse scan); None for one chunk."""
    if grid[2] == 1:
        return None
    B, H, T, D = x.shape
    sums = x.new_empty((B, H, grid[2], D), dtype=torch.float32)
    _wrap(_kernels()[2])[grid](x, sums, T, H, D, *x.stride()[:3], chunk, BLOCK_T=BLOCK_T,
                               BLOCK_D=block_cols(D), PER_POSITION=per_position, num_warps=NUM_WARPS)
    if per_position:  # Σ over the chunks after each one
        return sums.flip(2).cumsum(2).flip(2) - sums
    return sums.cumsum(2) - sums  # Σ over the chunks before each one


@_register("leanformer::shaped_mix", _new_out)
def _mix_op(v: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
            gamma: torch.Tensor) -> torch.Tensor:
    """out (B, H, T, D) in the promoted dtype of v and s, (B, T, H, D) memory; gains (H,) float32, bfloat16
    or float16."""
    B, H, T, D = v.shape
    out = _new_out(v, s, alpha, beta, gamma)
    if out.numel():
        chunk = chunk_len(v)
        grid = _grid(v, chunk)
        with _on_device(v):
            carry = _carries(v, grid, chunk, per_position=False)
            _wrap(_kernels()[0])[grid](
                v, s, alpha, beta, gamma, out, carry if carry is not None else alpha, T, H, D, chunk,
                *v.stride()[:3], *s.stride()[:3], *out.stride()[:3],
                BLOCK_T=BLOCK_T, BLOCK_D=block_cols(D), HAS_CARRY=carry is not None, num_warps=NUM_WARPS)
    return out


def _new_grads(v, s, alpha, beta, gamma, grad_out):
    H = v.shape[1]
    return _like_heads(v), _like_heads(s), v.new_empty((H, 3), dtype=torch.float32)


@_register("leanformer::shaped_mix_bwd", _new_grads)
def _mix_bwd_op(v: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
                grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the mix's dv in v's dtype, ds = β dout in s's, the gains' gradients (H, 3) float32: dα, dβ, dγ per
    head)."""
    B, H, T, D = v.shape
    dv, ds, _ = _new_grads(v, s, alpha, beta, gamma, grad_out)
    if not dv.numel():
        return dv, ds, v.new_zeros((H, 3), dtype=torch.float32)
    chunk = chunk_len(v)
    grid = _grid(v, chunk)
    partial = v.new_empty((B, H, grid[1], grid[2], 3), dtype=torch.float32)
    with _on_device(v):
        carry = _carries(grad_out, grid, chunk, per_position=True)
        _wrap(_kernels()[1])[grid](
            v, s, grad_out, alpha, beta, gamma, dv, ds, partial, carry if carry is not None else alpha, T, H, D,
            chunk, *v.stride()[:3], *s.stride()[:3], *grad_out.stride()[:3], *dv.stride()[:3], *ds.stride()[:3],
            BLOCK_T=BLOCK_T, BLOCK_D=block_cols(D), HAS_CARRY=carry is not None, num_warps=NUM_WARPS)
    return dv, ds, partial.sum(dim=(0, 2, 3))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    v, s, alpha, beta, gamma = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dv, ds, gains = _mix_bwd_op(v, s, alpha, beta, gamma, grad_out)
    return dv, ds, gains[:, 0], gains[:, 1], gains[:, 2]


_mix_op.register_autograd(_backward, setup_context=_setup_context)


def shaped_mix(v: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               gamma: torch.Tensor) -> torch.Tensor:
    """``α v + β s − γ C v`` (C the causal running mean over T) through the kernels: v, s (B, H, T, D) →
    (B, H, T, D) in the promoted dtype of v and s (v may be float32 beside a bf16 s: SAS's values are the
    block input, which autocast leaves in float32, while SDPA's output is bf16), differentiable in v, s and
    the gains (H,). Raises ValueError with the reason when :func:`shaped_mix_supported` refuses the inputs or
    a gain's shape does not fit."""
    reason = shaped_mix_supported(v, s)
    if reason is not None:
        raise ValueError(f"the shaped-attention mix kernel cannot run these inputs: {reason}")
    H = v.shape[1]
    gains = []
    for name, g in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if tuple(g.shape) != (H,):
            raise ValueError(f"{name} must be ({H},) for v with {H} heads; got {tuple(g.shape)}")
        g = g.to(device=v.device)  # the kernels read gains[h] at offset h: contiguous, one element per head
        gains.append((g if g.dtype in (torch.float32, torch.bfloat16, torch.float16) else g.float()).contiguous())
    return _mix_op(v, s, *gains)
