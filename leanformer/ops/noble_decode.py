"""A NOBLE layer (CosNet, plain sum) for a decoding step's few rows, as one Triton kernel.

    y = x Wᵀ + b + W_up CosNet(x W_downᵀ + b_down)                               (NOBLE, Eq. 1)

A decoding copy of NOBLE ran each layer as two products, CosNet, a third product and a sum: ≈ 5–8
launches per layer and 1,092 kernels per GPT-2 step in the graph path, 2.8× Pre-LN's step (H100,
2026-12-06, ``benchmarks/decode_profile.py``). Here one program per ``BLOCK_N`` output columns computes its
columns' main product, z (every program recomputes the r columns of z: W_down is small), CosNet and the
branch's contribution (:mod:`leanformer.ops._noble_decode_kernel`): one launch per layer, as a plain
linear's. The roundings are the layer's (main, z, CosNet's output, the branch, the sum, each to x's
dtype); CosNet itself runs in float32 as :mod:`leanformer.ops.cosnet`'s kernel does.

``noble_linear(layer, x)``: the kernel's result, or None when it cannot run these inputs
(:func:`noble_supported` says why), so the caller runs the layer as usual. It runs where :data:`ROUTE`
says ("cuda", the default: CUDA tensors; "never": the layer's own ops; "always": also CPU tensors under
``TRITON_INTERPRET=1``, for tests). Shapes: x (..., K), ≤ ``skinny_linear.MAX_ROWS`` rows, unit
stride along K; W (N, K), W_down (r, K), W_up (N, r) with r a power of two in [16, 128].
The op is ``leanformer::noble_decode`` (a ``triton_op``: ``torch.compile`` and CUDA graphs capture it).
"""

from __future__ import annotations

import torch

from leanformer.ops import skinny_linear
from leanformer.ops.fused_decay_attention import _cdiv, _interpret, _on_device, _register, _wrap

ROUTE = "cuda"  # "cuda": noble_linear() runs the kernel on CUDA tensors it takes; "always": also on the CPU;
# "never": the layer's own ops. Default "cuda" since its first timing (H200, 2026-12-06 23:37, decode_profile.py,
# GPT-2 NOBLE at 512 x 1, compiled): 1.509 -> 0.721 ms per step, 546 -> 162 kernels (docs/gpu/decode_2026-12-06/call4)


def noble_supported(layer, x: torch.Tensor) -> str | None:
    """Why :func:`noble_linear` cannot run ``layer`` (a NobleLinear) on x, or None when it can."""
    from leanformer.layers.noble import CosNet

    if not isinstance(layer.act, CosNet) or layer.gate is not None:
        return "the kernel computes CosNet with the plain sum (fusion 'add')"
    if layer.drop.training and not isinstance(layer.drop, torch.nn.Identity):
        return "the branch's dropout is on (training mode)"
    r = layer.rank
    if r < 16 or r > 128 or r & (r - 1):
        return f"rank {r}: the kernel takes a power of two in [16, 128]"
    params = [layer.down.weight, layer.down.bias, layer.up.weight, layer.act.omega1, layer.act.phi1,
              layer.act.M.weight, layer.act.M.bias, layer.act.omega2, layer.act.phi2]
    if any(p.device != x.device for p in params):
        return f"the branch's parameters must be on {x.device} with x"
    if any(p.dtype != x.dtype for p in params) or (layer.bias is not None and layer.bias.dtype != x.dtype):
        return f"the layer's parameters must be {x.dtype} like x"
    if layer.down.weight.stride(1) != 1 or not all(p.is_contiguous() for p in params[1:] if p is not layer.up.weight):
        return "W_down needs unit stride along K, and b_down and CosNet's parameters must be contiguous"
    return skinny_linear.skinny_supported(x, layer.weight, layer.bias) or (
        "a parameter requires grad (the kernel has no backward)"
        if torch.is_grad_enabled() and any(p.requires_grad for p in params) else None)


def _new_output(x, weight, bias, wd, bd, w1, p1, mw, mb, w2, p2, wu):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_register("leanformer::noble_decode", _new_output)
def _noble_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wd: torch.Tensor,
              bd: torch.Tensor, w1: torch.Tensor, p1: torch.Tensor, mw: torch.Tensor, mb: torch.Tensor,
              w2: torch.Tensor, p2: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    from leanformer.ops import _noble_decode_kernel as kern

    K, N, R = x.shape[-1], weight.shape[0], wd.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = x.new_empty(M, N)
    cfg = skinny_linear.launch_config(M, N, K, x.dtype, extra_rows=R)  # W_down's tiles share each stage
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    with _on_device(x):
        _wrap(kern.noble_decode_kernel)[(_cdiv(N, cfg["BLOCK_N"]),)](
            x2, weight, bias if bias is not None else weight, wd, bd, w1, p1, mw, mb, w2, p2, wu, out, M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), wd.stride(0), wd.stride(1),
            wu.stride(0), wu.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None, R=R,
            EVEN_K=K % cfg["BLOCK_K"] == 0, INTERPRET=_interpret(), **meta, **opts)
    return out.view(*x.shape[:-1], N)


def noble_linear(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` by the kernel where :data:`ROUTE` routes it and :func:`noble_supported` allows, else None
    (the caller computes the layer as usual)."""
    route = ROUTE
    if route == "never" or (route == "cuda" and not x.is_cuda) or noble_supported(layer, x) is not None:
        return None
    act = layer.act
    return _noble_op(x, layer.weight, layer.bias, layer.down.weight, layer.down.bias, act.omega1, act.phi1,
                     act.M.weight, act.M.bias, act.omega2, act.phi2, layer.up.weight)
