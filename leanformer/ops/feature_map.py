"""DiJiang's feature map as Triton kernels: ``x @ P`` (the DCT and quasi-Monte Carlo scales), the log-gain,
the exponential or softmax and the stabiliser's shift, one pass over x forward and one backward.

For x: (B, H, T, D) (any strides), P: (D, M) float32 and log_d: (H, M) float32 or None, with
z = in_scale · (x @ P) + log_d (DiJiang eq. 10-12 in log space, see :mod:`leanformer.layers.dijiang`):

* :func:`exp_features` ``(x, …, shift)`` → ``exp(z − shift_t)`` (the paper map's keys, shift = the running
  log-normaliser n or a constant per row) or, with ``shift=None``, ``exp(z − max_f z)`` and the row maxima
  (its queries);
* :func:`softmax_features` → ``softmax(z)`` over the features (the official map);
* :func:`row_max` → ``max_f z`` per token, no features (the keys' maxima that n is a running max of).

Features come out as (B, H, T, M) views of (B, T, H, M) memory in the dtype asked for (what fla's kernels
and :mod:`leanformer.ops.fused_decay_attention` read in place). Gradients reach x and log_d (not the shift
or P); the backward recomputes z from x, so nothing but x is kept for it. Against the compiled PyTorch
form (:func:`leanformer.layers.dijiang.feature_pair`), whose float32 ``x @ P`` runs as FFMA cuBLAS products
on separately materialised float32 copies, and whose exp, max and shifts are further element-wise passes,
this reads x and writes f once per pass; products run on bf16 tensor cores split to float32 accuracy
(:mod:`leanformer.ops._feature_map_kernels`).

Ops are ``torch.library.triton_op``s (or opaque custom ops under ``TRITON_INTERPRET=1``), registered as
:mod:`leanformer.ops.fused_decay_attention`'s are, so ``torch.compile`` traces them. Supported
(else :func:`features_supported` says why): what every kernel of ours needs (CUDA on sm_80+, or the CPU
under the interpreter; float32, bfloat16 or float16 x; D and M powers of two in [16, 128]).
"""

from __future__ import annotations

import torch

from leanformer.ops.fused_decay_attention import (_cdiv, _interpret, _on_device, _register, _triton_import_error,
                                                  _wrap, kernel_reason)

BLOCK_T = 64  # tokens per program
NUM_WARPS = 4
MODES = {"max": 0, "shift": 1, "softmax": 2, "stats": 3}


def features_supported(x: torch.Tensor, proj: torch.Tensor) -> str | None:
    """Why the kernels cannot run x (B, H, T, D) with proj (D, M), or None when they can."""
    if x.dim() != 4 or proj.dim() != 2 or proj.shape[0] != x.shape[-1]:
        return f"expected x (B, H, T, D) and proj (D, M); got {tuple(x.shape)} and {tuple(proj.shape)}"
    reason = kernel_reason(x.device, x.dtype, (("head dim D", x.shape[-1]), ("feature dim M", proj.shape[1])))
    return reason if reason is not None else _triton_import_error()


def _kernels():
    from leanformer.ops import _feature_map_kernels as kern

    return kern.features_fwd_kernel, kern.features_bwd_kernel


def _meta(x: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None, in_scale: float) -> dict:
    return dict(D=x.shape[-1], M=proj.shape[1], BLOCK_T=BLOCK_T, IN_SCALE=float(in_scale),
                HAS_LOG_D=log_d is not None, SPLIT_X=x.dtype != torch.bfloat16, INTERPRET=_interpret(),
                num_warps=NUM_WARPS)


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """``t``, or a tensor the kernel never reads in its place (a constexpr switch turns the pointer off)."""
    return t if t is not None else placeholder


def _shift_strides(shift: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(shift.stride()) if shift is not None else (0, 0, 0)


def _new_features(x, proj, log_d, shift, in_scale: float, mode: int, out_dtype: torch.dtype):
    B, H, T, _ = x.shape
    f = x.new_empty(B, T, H, proj.shape[1] if mode != MODES["stats"] else 0, dtype=out_dtype).transpose(1, 2)
    return f, x.new_empty(B, H, T, dtype=torch.float32)


@_register("leanformer::dijiang_features", _new_features)
def _features_op(x: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None, shift: torch.Tensor | None,
                 in_scale: float, mode: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(f (B, H, T, M) in (B, T, H, M) memory, row maxima (B, H, T) float32: written by modes max and stats)."""
    B, H, T, _ = x.shape
    f, rowmax = _new_features(x, proj, log_d, shift, in_scale, mode, out_dtype)
    if T == 0 or B * H == 0:
        return f, rowmax
    sf = f.stride() if mode != MODES["stats"] else (0, 0, 0, 0)
    with _on_device(x):
        _wrap(_kernels()[0])[(_cdiv(T, BLOCK_T), B * H)](
            x, proj, _or(log_d, proj), _or(shift, rowmax), f if mode != MODES["stats"] else rowmax, rowmax,
            *x.stride(), *_shift_strides(shift), *sf, H, T,
            MODE=mode, **_meta(x, proj, log_d, in_scale))
    return f, rowmax


def _new_grads(x, proj, log_d, shift, in_scale: float, softmax: bool, grad_f):
    H, M = x.shape[1], proj.shape[1]
    return torch.empty_like(x), x.new_empty((H, M) if log_d is not None else (0,), dtype=torch.float32)


@_register("leanformer::dijiang_features_bwd", _new_grads)
def _features_bwd_op(x: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None, shift: torch.Tensor | None,
                     in_scale: float, softmax: bool, grad_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dlog_d (H, M) float32, or (0,) without log_d)."""
    B, H, T, _ = x.shape
    M = proj.shape[1]
    dx, dlog_d = _new_grads(x, proj, log_d, shift, in_scale, softmax, grad_f)
    if T == 0 or B * H == 0:
        return dx.zero_(), dlog_d.zero_()
    n_t = _cdiv(T, BLOCK_T)
    partial = x.new_empty((n_t, B, H, M), dtype=torch.float32) if log_d is not None else None
    with _on_device(x):
        _wrap(_kernels()[1])[(n_t, B * H)](
            x, proj, _or(log_d, proj), _or(shift, proj), grad_f, dx, _or(partial, proj), *x.stride(),
            *_shift_strides(shift), *grad_f.stride(), *dx.stride(), B, H, T, SOFTMAX=softmax,
            **_meta(x, proj, log_d, in_scale))
    if log_d is not None:
        dlog_d = partial.sum(dim=(0, 1))
    return dx, dlog_d


def _setup_context(ctx, inputs, output):
    x, proj, log_d, shift, in_scale, mode, _ = inputs
    ctx.in_scale, ctx.softmax, ctx.has_log_d = in_scale, mode == MODES["softmax"], log_d is not None
    # the shift the features were taken at: given (mode shift) or the row maxima the forward wrote (mode max)
    used = output[1] if mode == MODES["max"] else shift
    ctx.mark_non_differentiable(output[1])  # the row maxima are constants to the gradient (a shift)
    ctx.save_for_backward(x, proj, log_d, used)


def _backward(ctx, grad_f, _grad_rowmax):
    x, proj, log_d, shift = ctx.saved_tensors
    dx, dlog_d = _features_bwd_op(x, proj, log_d, shift, ctx.in_scale, ctx.softmax, grad_f)
    return dx, None, (dlog_d.to(log_d.dtype) if ctx.has_log_d else None), None, None, None, None


_features_op.register_autograd(_backward, setup_context=_setup_context)


def _checked(x: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None, shift: torch.Tensor | None):
    reason = features_supported(x, proj)
    if reason is not None:
        raise ValueError(f"the feature-map kernel cannot run these inputs: {reason}; use "
                         "leanformer.layers.dijiang.feature_pair")
    B, H, T, _ = x.shape
    M = proj.shape[1]
    if log_d is not None and tuple(log_d.shape) != (H, M):
        raise ValueError(f"log_d must be (H, M) = {(H, M)}; got {tuple(log_d.shape)}")
    if shift is not None:
        if shift.requires_grad:
            raise ValueError("shift gets no gradient here: pass it detached")
        if tuple(shift.shape) != (B, H, T):
            raise ValueError(f"shift must be (B, H, T) = {(B, H, T)} (expand a per-row constant); "
                             f"got {tuple(shift.shape)}")
        shift = shift.to(torch.float32)
    return (proj.detach().to(device=x.device, dtype=torch.float32).contiguous(),
            log_d.to(torch.float32).contiguous() if log_d is not None else None, shift)


def exp_features(x: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None, in_scale: float,
                 shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    """``exp(z − shift)`` with z = in_scale · (x @ proj) + log_d: (B, H, T, M) in (B, T, H, M) memory and
    ``out_dtype`` (default x's), differentiable in x and log_d.

    x: (B, H, T, D); proj: (D, M); log_d: (H, M) or None; shift: (B, H, T), detached (a per-row constant
    may be an expanded (B, H, 1)), or None: each token's own max_f z, returned as the second result
    ((B, H, T) float32; None when a shift is given)."""
    proj, log_d, shift = _checked(x, proj, log_d, shift)
    f, rowmax = _features_op(x, proj, log_d, shift, float(in_scale), MODES["max" if shift is None else "shift"],
                             out_dtype or x.dtype)
    return f, (rowmax if shift is None else None)


def softmax_features(x: torch.Tensor, proj: torch.Tensor, in_scale: float = 1.0,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(in_scale · (x @ proj))`` over the features (the official map): (B, H, T, M) in
    (B, T, H, M) memory, differentiable in x."""
    proj, _, _ = _checked(x, proj, None, None)
    return _features_op(x, proj, None, None, float(in_scale), MODES["softmax"], out_dtype or x.dtype)[0]


def row_max(x: torch.Tensor, proj: torch.Tensor, log_d: torch.Tensor | None, in_scale: float) -> torch.Tensor:
    """``max_f z`` per token, (B, H, T) float32, no gradient (the keys' maxima of the paper map)."""
    proj, log_d, _ = _checked(x, proj, log_d, None)
    with torch.no_grad():
        return _features_op(x.detach(), proj, log_d.detach() if log_d is not None else None, None,
                            float(in_scale), MODES["stats"], x.dtype)[1]
