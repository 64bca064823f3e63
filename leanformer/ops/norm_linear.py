"""LayerNorm before and a residual after a few-row product, in the product's kernel (a decoding step).

    y = residual + act(LayerNorm(x) Wᵀ + b)          (each part optional; roundings as the eager ops')

A Pre-LN decoding step runs, per layer, LayerNorm (fused by Inductor with the residual add before it), the
input product, the attention step, the output product, LayerNorm again, the MLP's two products: 7 launches
with the few-row kernel (DiJiang, compiled, H100, 2026-12-06). With the norm in the prologue of the product
that reads it and the residual in the epilogue of the product that writes it, 5 remain. This module is
the few-row kernel's op with its LayerNorm and residual on
(:func:`leanformer.ops._skinny_linear_kernel.skinny_linear_kernel`); a decoding copy's Pre-LN
blocks (:class:`leanformer.blocks.standard.DecodePreLNBlock`) call :func:`linear`, which runs it where
:data:`ROUTE` allows (off by default until timed on a GPU) and the eager ops otherwise.

``norm_linear(x, weight, bias, norm=(γ, β, eps), residual=r, activation=...)``: the kernel where
:func:`norm_linear_supported` allows, ValueError naming the reason otherwise; ``reference`` computes the
same with the eager ops (what the kernel must equal, rounding for rounding, up to the variance's sum order).
Shapes: x (..., K) with at most ``skinny_linear.MAX_ROWS`` rows; weight (N, K); bias, γ, β (N,), (K,), (K,)
or None; residual (..., N) like the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanformer.ops import skinny_linear
from leanformer.ops.fused_decay_attention import _cdiv, _interpret, _on_device, _register, _wrap


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
              residual: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """The eager ops: ``F.layer_norm``, ``F.linear``, the activation, ``residual + y``."""
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], norm[2])
    y = F.linear(x, weight, bias)
    if activation is not None:
        y = skinny_linear.EAGER_ACTIVATIONS[activation](y)
    return residual + y if residual is not None else y


def norm_linear_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          norm: tuple | None, residual: torch.Tensor | None) -> str | None:
    """Why the kernel cannot run these inputs, or None."""
    reason = skinny_linear.skinny_supported(x, weight, bias)
    if reason is not None:
        return reason
    K, N = weight.shape[1], weight.shape[0]
    if norm is not None:
        g, b, _ = norm
        for name, t in (("the norm's weight", g), ("the norm's bias", b)):
            if t is not None and (t.shape != (K,) or t.device != x.device or not t.is_contiguous()):
                return f"{name} must be a contiguous ({K},) tensor on {x.device}"
    if residual is not None and (residual.shape != (*x.shape[:-1], N) or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return f"residual must be {(*x.shape[:-1], N)} {x.dtype} on {x.device}, got {tuple(residual.shape)} " \
               f"{residual.dtype} on {residual.device}"
    extra = (*(norm[:2] if norm is not None else ()), residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in extra):
        return "the kernel has no backward (the norm's parameters or the residual require grad)"
    return None


def _new_output(x, weight, bias, ln_weight, ln_bias, eps, residual, act):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_register("leanformer::norm_linear", _new_output)
def _norm_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor | None,
                    ln_bias: torch.Tensor | None, eps: float, residual: torch.Tensor | None,
                    act: int) -> torch.Tensor:
    from leanformer.ops import _skinny_linear_kernel as kern

    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = x.new_empty(M, N)
    r2 = residual.reshape(M, N) if residual is not None else out
    cfg = skinny_linear.launch_config(M, N, K, x.dtype, fma=True)
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    placeholder = weight  # pointers the kernel never reads (their branch is compiled out)
    with _on_device(x):
        _wrap(kern.skinny_linear_kernel)[(_cdiv(N, cfg["BLOCK_N"]),)](
            x2, ln_weight if ln_weight is not None else placeholder, ln_bias if ln_bias is not None else placeholder,
            weight, bias if bias is not None else placeholder, r2, out, M, N, K, float(eps),
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), r2.stride(0), r2.stride(1),
            out.stride(0), out.stride(1), LN=ln_weight is not None, LN_BIAS=ln_bias is not None,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, EVEN_K=K % cfg["BLOCK_K"] == 0,
            INTERPRET=_interpret(), ACT=act, PDL=False, **meta, **opts)
    return out.view(*x.shape[:-1], N)


ROUTE = "never"  # "cuda": linear() runs the kernel on CUDA tensors it takes; "always": also on the CPU (tests)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
           residual: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """:func:`reference`'s function: by the kernel where :data:`ROUTE` routes it ("never", the default until
    timed; "cuda"; "always") and it runs the inputs, else as a decoding step ran it before: ``F.layer_norm``,
    the product (and activation) through :func:`leanformer.ops.skinny_linear.linear`, the sum."""
    if (ROUTE == "never" or (ROUTE == "cuda" and not x.is_cuda) or (norm is not None and norm[0] is None)
            or norm_linear_supported(x, weight, bias, norm, residual) is not None):
        if norm is not None:
            x = F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], norm[2])
        y = skinny_linear.linear(x, weight, bias, activation=activation)
        return residual + y if residual is not None else y
    return norm_linear(x, weight, bias, norm, residual, activation)


def norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
                residual: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """:func:`reference`'s function by the kernel; ValueError naming why it cannot run these inputs.
    ``norm``: (γ, β or None, eps) of a LayerNorm over K, a weight being required."""
    act = skinny_linear.activation_code(activation)
    if norm is not None and norm[0] is None:
        raise ValueError("norm needs its weight γ (a LayerNorm without elementwise affine: pass ones)")
    reason = norm_linear_supported(x, weight, bias, norm, residual)
    if reason is not None:
        raise ValueError(f"norm_linear cannot run these inputs: {reason}")
    g, b, eps = norm if norm is not None else (None, None, 0.0)
    return _norm_linear_op(x, weight, bias, g, b, eps, residual, act)
