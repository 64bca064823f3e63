"""NOBLE's training route: a CosNet NobleLinear's forward and backward, the branch inside the main products.

    y = x Wᵀ + b + σ(x W_downᵀ + b_down) W_upᵀ                      (NOBLE, Eq. 1; σ = CosNet)

For x (N, d_in) (leading axes flattened), W (d_out, d_in), W_down (r, d_in), W_up (d_out, r):

    forward   z = x W_downᵀ + b_down,  s = σ(z)       (N, r)       one launch reading x (noble_branch)
              y = x Wᵀ + s W_upᵀ + b                  (N, d_out)   two_segment_matmul: [x, s] [W, W_up]ᵀ in place
    backward  ds = dy W_up,  dz, dθ_σ = σ's backward  (N, r)       one launch reading dy (noble_branch)
              dx = dy W + dz W_down                   (N, d_in)    two_segment_matmul: [dy, dz] [W; W_down] in place
              dW = dyᵀ x,  dW_up = dyᵀ s,  dW_down = dzᵀ x,  db = Σ dy,  db_down = Σ dz

(:data:`BRANCH` "separate": each rank-r product by cuBLAS, then CosNet's own kernel.) Against Pre-LN's linear
this adds four rank-r products (each one read of x or dy: bandwidth-bound) and the
r-wide inner and outer steps of the two main products (the branch's FLOPs). The stacked form
(:meth:`leanformer.layers.noble.NobleLinear._main_and_down`) also writes the branch's (N, d_out) output and reads
it back in the next element-wise kernel, concatenates ``[dy, dz]`` in the backward (a copy of dy) and sums the
stacked bias gradient over ``[dy, dz]``: the passes that kept its GPT-2 step at +38–42% over Pre-LN's on an H100
(docs/benchmarks.md). Saved for the backward: x (Pre-LN's linear keeps it too), z and s ((N, r) each).

Under autocast the inputs are cast to autocast's dtype first, as ``F.linear`` casts them (CosNet's parameters stay
as stored: its kernels read them in float32). Switch: :data:`leanformer.layers.noble.TRAIN_KERNEL`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from leanformer.ops import cosnet as ck
from leanformer.ops import noble_branch as nb
from leanformer.ops.two_segment_matmul import two_segment_matmul, two_segment_supported


BRANCH = "separate"  # the rank-r products beside CosNet: "separate" (a cuBLAS product, then CosNet's kernel) or
# "fused" (leanformer.ops.noble_branch: z and σ(z) in one launch reading x, ds and σ's backward in one launch reading
# dy). Timed on an H100 (2026-12-07, callAE, callAF): the fused launches read at 0.64-2.3 TB/s against cuBLAS's rank-32
# product's 2.25-2.76, and the GPT-2 step was 53.89 ms fused against 51.36 separate
BRANCHES = ("fused", "separate")


class _NobleTrain(torch.autograd.Function):
    """The route's forward and backward (the module docstring); inputs already in one dtype, x 2-d."""

    @staticmethod
    def forward(ctx, x, w, b, wd, bd, wu, omega1, phi1, m, c, omega2, phi2):  # noqa: ANN001, ANN205
        params = (omega1, phi1, m, c, omega2, phi2)
        if BRANCH == "fused":
            z, s = nb.down_cosnet(x, wd, bd, *params)
        else:
            z = torch.addmm(bd, x, wd.t())
            s = ck._cosnet_op(z, *params)
        y = two_segment_matmul(x, w.t(), s, wu.t(), b)
        ctx.save_for_backward(x, w, wd, wu, z, s, *params)
        ctx.has_bias, ctx.branch = b is not None, BRANCH
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, w, wd, wu, z, s, *params = ctx.saved_tensors
        need = ctx.needs_input_grad
        r = z.shape[1]
        dy = dy.contiguous()
        with torch.autocast(dy.device.type, enabled=False):  # a backward run inside autocast: the products as stored
            if ctx.branch == "fused":
                dz, flat = nb.up_grad_cosnet_bwd(dy, wu, z, *params)
            else:
                dz, flat = ck._cosnet_bwd_op(z, *params, dy @ wu)
            dx = two_segment_matmul(dy, w, dz, wd) if need[0] else None
            dw = dy.t() @ x if need[1] else None
            db = dy.sum(0) if ctx.has_bias and need[2] else None
            dwd = dz.t() @ x if need[3] else None
            dbd = dz.sum(0) if need[4] else None
            dwu = dy.t() @ s if need[5] else None
        d_omega1, d_phi1, dc, d_omega2, d_phi2, dm = flat.split([r, r, r, r, r, r * r])
        d_params = [g.to(p.dtype) if ok else None for g, p, ok in
                    zip((d_omega1, d_phi1, dm.view(r, r), dc, d_omega2, d_phi2), params, need[6:])]
        return (dx, dw, db, dwd, dbd, dwu, *d_params)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype on x's device when autocast is on there and x is a float type other than float64 (which
    autocast leaves as it is), else x's dtype."""
    kind = x.device.type
    try:
        if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type autocast does not know
        pass
    return x.dtype


def noble_train_reason(layer, x: torch.Tensor) -> str | None:  # noqa: ANN001 - a NobleLinear
    """Why :func:`noble_train_linear` cannot run ``layer`` on ``x``, or None when it can: a plain-sum CosNet
    layer (fusion "add", no dropout) with a bias on its down projection, plain tensors (not FSDP2's DTensors),
    operands the two kernels take (:func:`two_segment_supported`, :func:`leanformer.ops.cosnet.cosnet_supported`)."""
    from leanformer.layers.noble import CosNet

    if layer.gate is not None or not isinstance(layer.drop, torch.nn.Identity):
        return "the route computes the plain sum (fusion='add', no dropout)"
    if not isinstance(layer.act, CosNet):
        return f"the route's activation is CosNet (this layer's: {layer.activation})"
    if layer.down.bias is None:
        return "the route needs the down projection's bias"
    tensors = (x, layer.weight, layer.down.weight, layer.up.weight)
    if any(_is_dtensor(t) for t in tensors):
        return "DTensor parameters (FSDP2 between steps) take the stacked form"
    dt = _compute_dtype(x)
    probe = x.new_empty((0, layer.rank), dtype=dt)
    return two_segment_supported(probe, probe, probe, probe) or ck.cosnet_supported(probe)


def noble_train_linear(layer, x: torch.Tensor, checked: bool = False) -> torch.Tensor:  # noqa: ANN001 - a NobleLinear
    """``layer(x)`` for x (..., d_in) → (..., d_out) through the route (the module docstring), differentiable in x
    and every parameter of the layer (once: no double backward). Raises ValueError naming the reason when
    :func:`noble_train_reason` gives one (``checked``: the caller has asked it already). The layer's submodules
    (``down``, ``act``, ``up``) are not called, so hooks on them do not run."""
    if BRANCH not in BRANCHES:
        raise ValueError(f"noble_train.BRANCH={BRANCH!r} must be one of {BRANCHES}")
    reason = None if checked else noble_train_reason(layer, x)
    if reason is not None:
        raise ValueError(f"NOBLE's training route cannot run this layer: {reason}")
    dt = _compute_dtype(x)
    act = layer.act
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(dt)
    b = layer.bias.to(dt) if layer.bias is not None else None
    params = ck.kernel_params((act.omega1, act.phi1, act.M.weight, act.M.bias, act.omega2, act.phi2), x.device)
    with torch.autocast(x.device.type, enabled=False):
        y = _NobleTrain.apply(x2, layer.weight.to(dt), b, layer.down.weight.to(dt), layer.down.bias.to(dt),
                              layer.up.weight.to(dt), *params)
    return y.view(*lead, layer.out_features)
