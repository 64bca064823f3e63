"""NOBLE's CosNet activation as two Triton kernels: one pass over z forward, one backward.

    s = cos(ω2 ⊙ (M cos(ω1 ⊙ z + φ1) + c) + φ2)              (NOBLE, CosNet; leanformer.layers.noble.CosNet)

for z (..., r) and the layer's parameters ω1, φ1, c, ω2, φ2 (r,), M (r, r). Under ``torch.compile`` the
PyTorch form is several kernels per layer (the element-wise chains, a rank-r product for M, and in the
backward one reduction kernel for each parameter's gradient: 432 small reductions per GPT-2 step with NOBLE
on all 72 linears, H200 profile of 2026-12-05, docs/benchmarks.md). Here the forward is one kernel and the
backward one kernel plus a sum of per-program partials, float32 inside, s and dz in z's dtype.

Ops are ``torch.library.triton_op``s (opaque custom ops under ``TRITON_INTERPRET=1``), registered as
:mod:`leanformer.ops.fused_decay_attention`'s are, so ``torch.compile`` traces them. Supported (else
:func:`cosnet_supported` says why): CUDA on sm_80+ or the CPU under the interpreter; float32, bfloat16 or
float16 z; r a power of two in [16, 64] (r = 128 would hold a 128 × 128 float32 M and its gradient per program:
register spills on sm_90 and more shared memory than sm_86 offers; review of 2026-12-05).
"""

from __future__ import annotations

import torch

from leanformer.ops.fused_decay_attention import (_cdiv, _on_device, _register, _triton_import_error, _wrap,
                                                  kernel_reason)

NUM_WARPS = 4
MAX_RANK = 64


def block_rows(r: int) -> int:
    """Rows of z per program: BLOCK_N · r = 1024 elements (r 16 → 64 rows, 32 → 32, 64 → 16), which keeps
    the backward's float32 tiles in registers without spilling (Triton 3.6, sm_90, review of 2026-12-05) and
    gives N / BLOCK_N ≥ 512 programs at GPT-2's 16,384 rows; tl.dot needs at least 16 rows."""
    return max(16, 1024 // r)


def cosnet_supported(z: torch.Tensor) -> str | None:
    """Why the kernels cannot run z (..., r), or None when they can."""
    if z.dim() < 1:
        return "z must have a last axis (r)"
    reason = kernel_reason(z.device, z.dtype, (("CosNet rank r", z.shape[-1]),))
    if reason is None and z.shape[-1] > MAX_RANK:
        reason = f"CosNet rank r={z.shape[-1]} is above {MAX_RANK}, the largest the kernels hold in registers"
    return reason if reason is not None else _triton_import_error()


def _kernels():
    from leanformer.ops import _cosnet_kernels as kern

    return kern.cosnet_fwd_kernel, kern.cosnet_bwd_kernel


def _new_s(z, omega1, phi1, m, c, omega2, phi2):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@_register("leanformer::cosnet", _new_s)
def _cosnet_op(z: torch.Tensor, omega1: torch.Tensor, phi1: torch.Tensor, m: torch.Tensor, c: torch.Tensor,
               omega2: torch.Tensor, phi2: torch.Tensor) -> torch.Tensor:
    """s (N, r) in z's dtype from z (N, r) with unit stride along r; parameters contiguous, float32, bfloat16
    or float16."""
    N, r = z.shape
    s = _new_s(z, omega1, phi1, m, c, omega2, phi2)
    if N:
        with _on_device(z):
            _wrap(_kernels()[0])[(_cdiv(N, block_rows(r)),)](
                z, omega1, phi1, m, c, omega2, phi2, s, z.stride(0), s.stride(0), N,
                R=r, BLOCK_N=block_rows(r), num_warps=NUM_WARPS)
    return s


def _new_grads(z, omega1, phi1, m, c, omega2, phi2, grad_s):
    r = z.shape[1]
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty(5 * r + r * r, dtype=torch.float32))


@_register("leanformer::cosnet_bwd", _new_grads)
def _cosnet_bwd_op(z: torch.Tensor, omega1: torch.Tensor, phi1: torch.Tensor, m: torch.Tensor, c: torch.Tensor,
                   omega2: torch.Tensor, phi2: torch.Tensor, grad_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz like z, the parameters' gradients flattened: dω1, dφ1, dc, dω2, dφ2 (r each), dM (r²), float32)."""
    N, r = z.shape
    dz, flat = _new_grads(z, omega1, phi1, m, c, omega2, phi2, grad_s)
    if not N:
        return dz, flat.zero_()
    n_prog = _cdiv(N, block_rows(r))
    partial = z.new_empty((n_prog, 5 * r + r * r), dtype=torch.float32)
    with _on_device(z):
        _wrap(_kernels()[1])[(n_prog,)](
            z, grad_s, omega1, phi1, m, c, omega2, phi2, dz, partial, z.stride(0), grad_s.stride(0),
            dz.stride(0), N, R=r, BLOCK_N=block_rows(r), num_warps=NUM_WARPS)
    return dz, partial.sum(dim=0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_s):
    z, omega1, phi1, m, c, omega2, phi2 = ctx.saved_tensors
    r = z.shape[1]
    dz, flat = _cosnet_bwd_op(z, omega1, phi1, m, c, omega2, phi2, grad_s.contiguous())
    d_omega1, d_phi1, dc, d_omega2, d_phi2, dm = flat.split([r, r, r, r, r, r * r])
    return dz, d_omega1, d_phi1, dm.view(r, r), dc, d_omega2, d_phi2


_cosnet_op.register_autograd(_backward, setup_context=_setup_context)


def cosnet(z: torch.Tensor, omega1: torch.Tensor, phi1: torch.Tensor, m: torch.Tensor, c: torch.Tensor,
           omega2: torch.Tensor, phi2: torch.Tensor) -> torch.Tensor:
    """CosNet of z (..., r) through the kernels: s (..., r) in z's dtype, differentiable in z and every
    parameter (ω1, φ1, c, ω2, φ2: (r,); M: (r, r), ``CosNet.M.weight``; c is ``CosNet.M.bias``).
    Raises ValueError with the reason when :func:`cosnet_supported` refuses z or a shape does not fit."""
    reason = cosnet_supported(z)
    if reason is not None:
        raise ValueError(f"the CosNet kernel cannot run this input: {reason}; use CosNet's PyTorch form")
    r = z.shape[-1]
    shapes = {"omega1": omega1, "phi1": phi1, "c": c, "omega2": omega2, "phi2": phi2}
    for name, t in shapes.items():
        if tuple(t.shape) != (r,):
            raise ValueError(f"{name} must be ({r},) for z (..., {r}); got {tuple(t.shape)}")
    if tuple(m.shape) != (r, r):
        raise ValueError(f"M must be ({r}, {r}); got {tuple(m.shape)}")
    lead = z.shape[:-1]
    z2 = z.reshape(-1, r)
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    return _cosnet_op(z2, *kernel_params((omega1, phi1, m, c, omega2, phi2), z.device)).view(*lead, r)


def kernel_params(params, device: torch.device) -> list[torch.Tensor]:
    """CosNet's parameters (ω1, φ1, M, c, ω2, φ2) as the kernels take them: on ``device``, contiguous, float32,
    bfloat16 or float16 as stored (the kernels take them to float32 on load: no cast launches for a half-precision
    decoding copy; their gradients come back float32 and autograd casts them), float32 when any is float64 or not
    a float."""
    params = [t.to(device=device).contiguous() for t in params]
    if any(not t.is_floating_point() or t.dtype == torch.float64 for t in params):
        params = [t.float() for t in params]
    return params
