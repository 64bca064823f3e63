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

``noble_group_linear(x, stacks...)``: G such layers of one rank on the same x (an attention's q, k, v, and
DiJiang's gate) in one launch, their parameters stacked (:func:`leanformer.layers.fused_inputs.fuse_noble_linears`
builds the stacks), each group's columns equal to the single-layer kernel's bit for bit. A step's launch
costs a roughly fixed few µs whatever its size (GPT-2 NOBLE, H200, 2026-12-06: 6.41 µs per ``noble_decode``
launch, 6 per layer); q, k, v as one launch took GPT-2's step from 0.751 to 0.633 ms (H100, 2026-12-07,
docs/gpu/misc_2026-12-07/callD). Its op is ``leanformer::noble_decode_grouped``.

``noble_linear(layer, x, activation=...)``: an MLP's activation in the kernel's epilogue (:data:`ACTIVATION_IN_KERNEL`).
With :data:`SHARED_Z` (off, not timed) both go through ``leanformer::noble_decode_shared``: z computed once per
layer by a few programs that the column programs wait for (``noble_decode_shared_kernel``), instead of by every
program; it needs the layer's (or group's) ``sync`` and ``offsets`` buffers, which
:func:`leanformer.decoding.decoding_copy` and :func:`leanformer.layers.fused_inputs.fuse_noble_linears` make.

With :data:`SPLIT_K` (on since its timing) the single-layer op (with or without the activation; not the grouped or
shared-z kernels) runs a layer whose plain product :mod:`leanformer.ops.skinny_linear` would split along K
(``split_count`` > 1: GPT-2's MLP down, 3072 → 768), and with :data:`Z_APART` (off, not timed in a step) every
layer it takes, as two launches: ``leanformer::noble_decode_partials``,
float32 partial products of W's columns and W_down's rows over S parts of K (S times the programs, each with S
times fewer K tiles), then ``leanformer::noble_decode_finish``, their sums and the one-launch kernel's epilogue.
The result differs only in where the float32 K-sum is re-associated. It splits eagerly too (its second launch is
the sum; the plain product splits only under ``torch.compile``, where Inductor fuses its sum). Why: in GPT-2's
decoding step at batch 32 (compiled, CUDA graphs) ``noble_decode_kernel`` averaged 11.73 µs a launch (36 per
step) against 4.99 µs for Pre-LN's ``skinny_linear_kernel``, whose 3072 → 768 product is split; the NOBLE kernel
runs that layer's 12 K tiles serially on 48 programs, and halving its column blocks changed nothing, so recomputing
z is not the cost (H100, 2026-12-07 14:13, docs/gpu/misc_2026-12-07/callN2).
"""

from __future__ import annotations

import torch

from leanformer.ops import skinny_linear
from leanformer.ops.fused_decay_attention import _cdiv, _interpret, _on_device, _register, _wrap

ROUTE = "cuda"  # "cuda": noble_linear() runs the kernel on CUDA tensors it takes; "always": also on the CPU;
# "never": the layer's own ops. Default "cuda" since its first timing (H200, 2026-12-06 23:37, decode_profile.py,
# GPT-2 NOBLE at 512 x 1, compiled): 1.509 -> 0.721 ms per step, 546 -> 162 kernels (docs/gpu/decode_2026-12-06/call4)
PREFETCH = False  # the kernel issues the epilogue's loads (CosNet's parameters, b_down, its W_up slice) before its K
# loop, not after it (the values are the same). Off: no gain when timed (H100, 2026-12-07 02:24, GPT-2 NOBLE 512 x 1
# compiled: 0.636 against 0.633 ms per step; docs/gpu/misc_2026-12-07/callD)
ACTIVATION_IN_KERNEL = True  # an MLP's first NOBLE layer takes the activation in the kernel's epilogue
# (noble_linear(..., activation=...), leanformer.layers.mlp): one launch fewer per layer. On since its first timing
# (H100, 2026-12-07 02:24, decode_profile.py, GPT-2 NOBLE 512 x 1 compiled): 0.636 -> 0.600 ms per step, 138 -> 126
# kernels, the same tokens and logits sum (docs/gpu/misc_2026-12-07/callD)
SHARED_Z = False  # z = x W_downᵀ computed once per layer by a few programs of the launch, which the others
# wait for (noble_decode_shared_kernel), instead of by every program; off until timed
GROUPED = True  # a decoding copy's q, k, v NOBLE layers in one launch (noble_group_linear, through
# leanformer.layers.fused_inputs.project_inputs); False: each layer's own launch (for timing the difference).
# Timed on an H100 (2026-12-07 02:23, GPT-2 NOBLE 512 x 1 compiled): 0.751 -> 0.633 ms per step, 162 -> 138 kernels
SPLIT_K = True  # the single-layer op (noble_linear, with or without its activation) as two launches, split-K
# partial products of [W; W_down] then their sums and the epilogue, where the plain product of its shape is split
# (skinny_linear.split_count > 1: GPT-2's MLP down, 3072 -> 768). On since its timing (H100, 2026-12-07 16:47,
# decode_profile.py, GPT-2 NOBLE at 512, compiled, CUDA graph): 1.097 -> 1.040 ms per step at batch 32, 0.611 ->
# 0.593 at batch 1, the same tokens (docs/gpu/misc_2026-12-07/callS)
Z_APART = False  # every single-layer op (noble_linear) as those two launches, one part of K where the plain product
# is not split: z once, by column blocks of its own, then the epilogue per output column block. Not timed in a
# step. Why: one NOBLE launch's time over the plain product of [W; W_down] grew with the rank at 32 rows (2.6, 5.3,
# 9.7 µs at r 16, 32, 64), while z's columns cost the plain product nothing, and wider column blocks were slower
# (H100, 2026-12-07 19:02, benchmarks/noble_decode_gpu.py, docs/gpu/misc_2026-12-07/callY)
COSNET_PRECISION = "ieee"  # the epilogue's CosNet r x r product: "ieee" (float32 by FMAs, as the layer's own
# CosNet kernel), "tf32" (tensor cores: float32 inputs rounded to 10-bit mantissas; CosNet's output is then rounded
# to the layer's dtype). Not timed. Why: one launch's time over [W; W_down]'s plain product grew with the rank at
# 32 rows (2.6, 5.3, 9.7 µs at r 16, 32, 64; H100 2026-12-07 19:02, callY), as an r x r float32 product on FMAs
# per program would
COSNET_PRECISIONS = ("ieee", "tf32")


def noble_supported(layer, x: torch.Tensor) -> str | None:
    """Why :func:`noble_linear` cannot run ``layer`` (a NobleLinear) on x, or None when it can."""
    from leanformer.layers.noble import CosNet

    if not isinstance(layer.act, CosNet) or layer.gate is not None:
        return "the kernel computes CosNet with the plain sum (fusion 'add')"
    if layer.drop.training and not isinstance(layer.drop, torch.nn.Identity):
        return "the branch's dropout is on (training mode)"
    act = layer.act
    return _branch_reason(x, layer.weight, layer.bias, layer.rank, layer.down.weight, layer.down.bias,
                          [act.omega1, act.phi1, act.M.weight, act.M.bias, act.omega2, act.phi2], layer.up.weight)


def rank_reason(r: int) -> str | None:
    """Why the kernel cannot take a branch of rank r, or None."""
    return None if 16 <= r <= 128 and not r & (r - 1) else f"rank {r}: the kernel takes a power of two in [16, 128]"


def _branch_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r: int, wd: torch.Tensor,
                   bd: torch.Tensor, cosnet: list[torch.Tensor], wu: torch.Tensor) -> str | None:
    """Why the kernel cannot run x through these parameters (one layer's or a group's stacks), or None."""
    reason = rank_reason(r)
    if reason is not None:
        return reason
    params = [wd, bd, wu, *cosnet]
    if any(p.device != x.device for p in params):
        return f"the branch's parameters must be on {x.device} with x"
    if any(p.dtype != x.dtype for p in params) or (bias is not None and bias.dtype != x.dtype):
        return f"the layer's parameters must be {x.dtype} like x"
    if wd.stride(1) != 1 or not all(p.is_contiguous() for p in (bd, *cosnet)):
        return "W_down needs unit stride along K, and b_down and CosNet's parameters must be contiguous"
    return skinny_linear.skinny_supported(x, weight, bias) or (
        "a parameter requires grad (the kernel has no backward)"
        if torch.is_grad_enabled() and any(p.requires_grad for p in params) else None)


def _new_output(x, weight, bias, wd, bd, w1, p1, mw, mb, w2, p2, wu, act=0):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _launch(x, weight, bias, wd, bd, w1, p1, mw, mb, w2, p2, wu, offsets, width, act=0):
    """Run the kernel: x (..., K) → (..., N) with N = weight.shape[0]; ``offsets`` None (one layer) or
    (G + 1,) int32 (the grouped kernel, G = mw.shape[0]); ``width``: the widest group's columns; ``act``: the
    few-row kernel's activation code applied to the output (0: none)."""
    from leanformer.ops import _noble_decode_kernel as kern

    K, N, R = x.shape[-1], weight.shape[0], mw.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = x.new_empty(M, N)
    cfg = skinny_linear.launch_config(M, N, K, x.dtype, extra_rows=R)  # W_down's tiles share each stage
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    tensors = (x2, weight, bias if bias is not None else weight, wd, bd, w1, p1, mw, mb, w2, p2, wu, out)
    strides = (x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), wd.stride(0), wd.stride(1),
               wu.stride(0), wu.stride(1), out.stride(0), out.stride(1))
    consts = dict(HAS_BIAS=bias is not None, R=R, EVEN_K=K % cfg["BLOCK_K"] == 0, INTERPRET=_interpret(),
                  PREFETCH=bool(PREFETCH), ACT=act, COS_PRECISION=_cosnet_precision(), **meta, **opts)
    with _on_device(x):
        if offsets is None:
            _wrap(kern.noble_decode_kernel)[(_cdiv(N, cfg["BLOCK_N"]),)](*tensors, M, N, K, *strides, **consts)
        else:
            _wrap(kern.noble_decode_grouped_kernel)[(mw.shape[0], _cdiv(width, cfg["BLOCK_N"]))](
                *tensors, offsets, M, K, *strides, **consts)
    return out.view(*x.shape[:-1], N)


def _cosnet_precision() -> str:
    if COSNET_PRECISION not in COSNET_PRECISIONS:
        raise ValueError(f"noble_decode.COSNET_PRECISION={COSNET_PRECISION!r} must be one of {COSNET_PRECISIONS}")
    return "ieee" if _interpret() else COSNET_PRECISION  # the interpreter's products are float32 either way


@_register("leanformer::noble_decode", _new_output)
def _noble_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wd: torch.Tensor,
              bd: torch.Tensor, w1: torch.Tensor, p1: torch.Tensor, mw: torch.Tensor, mb: torch.Tensor,
              w2: torch.Tensor, p2: torch.Tensor, wu: torch.Tensor, act: int = 0) -> torch.Tensor:
    return _launch(x, weight, bias, wd, bd, w1, p1, mw, mb, w2, p2, wu, None, weight.shape[0], act)


# ---------------------------------------------------------------------------------------------- split K
def _split_count(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The K parts of the single-layer op under :data:`SPLIT_K`: those of the plain few-row product of the
    layer's main shape (:func:`leanformer.ops.skinny_linear.split_count`, so its switch and rule hold here too),
    or 1 (one launch) when SPLIT_K is off."""
    if not SPLIT_K:
        return 1
    K = x.shape[-1]
    return skinny_linear.split_count(x.numel() // K, weight.shape[0], K, x.dtype)


def _new_partials(x, weight, wd, splits):
    return x.new_empty(splits, x.numel() // x.shape[-1], weight.shape[0] + wd.shape[0], dtype=torch.float32)


@_register("leanformer::noble_decode_partials", _new_partials)
def _partials_op(x: torch.Tensor, weight: torch.Tensor, wd: torch.Tensor, splits: int) -> torch.Tensor:
    """x (..., K), W (N, K), W_down (R, K) → (splits, M, N + R) float32 partial products of [W; W_down] over
    ``splits`` parts of K (:func:`leanformer.ops._noble_decode_kernel.noble_partials_kernel`), each part whole
    BLOCK_K tiles of the plain product's tiles (``splits`` from :func:`_split_count`: no part empty)."""
    from leanformer.ops import _noble_decode_kernel as kern

    K, N, R = x.shape[-1], weight.shape[0], wd.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    weight, wd = (w if w.stride(1) == 1 else w.contiguous() for w in (weight, wd))  # one K stride for both: 1
    out = _new_partials(x, weight, wd, splits)
    cfg = skinny_linear.launch_config(M, N, K, x.dtype)  # the tiles split_count counted its parts in
    k_split = _cdiv(_cdiv(K, cfg["BLOCK_K"]), splits) * cfg["BLOCK_K"]
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    with _on_device(x):  # W_down's rows get column blocks of their own (a program reads one weight's tiles)
        _wrap(kern.noble_partials_kernel)[(_cdiv(N, cfg["BLOCK_N"]) + _cdiv(R, cfg["BLOCK_N"]), splits)](
            x2, weight, wd, out, M, N, K, k_split, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            wd.stride(0), out.stride(0), out.stride(1), out.stride(2), R=R,
            EVEN_K=K % cfg["BLOCK_K"] == 0, INTERPRET=_interpret(), **meta, **opts)
    return out


def _new_finished(parts, bias, bd, w1, p1, mw, mb, w2, p2, wu, act):
    return wu.new_empty(parts.shape[1], wu.shape[0])


@_register("leanformer::noble_decode_finish", _new_finished)
def _finish_op(parts: torch.Tensor, bias: torch.Tensor | None, bd: torch.Tensor, w1: torch.Tensor,
               p1: torch.Tensor, mw: torch.Tensor, mb: torch.Tensor, w2: torch.Tensor, p2: torch.Tensor,
               wu: torch.Tensor, act: int) -> torch.Tensor:
    """(S, M, N + R) float32 partials (:func:`_partials_op`) → the layer's (M, N) output in W_up's dtype (the
    layer's): their sums, then the single-layer kernel's epilogue
    (:func:`leanformer.ops._noble_decode_kernel.noble_finish_kernel`)."""
    from leanformer.ops import _noble_decode_kernel as kern

    S, M, N, R = parts.shape[0], parts.shape[1], wu.shape[0], mw.shape[-1]
    out = _new_finished(parts, bias, bd, w1, p1, mw, mb, w2, p2, wu, act)
    # the one-launch kernel's rows and column blocks (BLOCK_N follows N alone: the K given is only a placeholder)
    cfg = skinny_linear.launch_config(M, N, R, wu.dtype, extra_rows=R)
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"]}
    with _on_device(parts):
        _wrap(kern.noble_finish_kernel)[(_cdiv(N, cfg["BLOCK_N"]),)](
            parts, bias if bias is not None else wu, bd, w1, p1, mw, mb, w2, p2, wu, out, M, N, S,
            parts.stride(0), parts.stride(1), parts.stride(2), wu.stride(0), wu.stride(1), out.stride(0),
            out.stride(1), HAS_BIAS=bias is not None, R=R, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            INTERPRET=_interpret(), ACT=act, COS_PRECISION=_cosnet_precision(), **opts)
    return out


def _noble_split(layer, x: torch.Tensor, act: int, splits: int) -> torch.Tensor:
    """``layer(x)`` (then ``act``) as two launches: the partial products over ``splits`` parts of K, then
    their sums and the epilogue; x (..., K) → (..., N)."""
    cos = layer.act
    parts = _partials_op(x, layer.weight, layer.down.weight, splits)
    y = _finish_op(parts, layer.bias, layer.down.bias, cos.omega1, cos.phi1, cos.M.weight, cos.M.bias, cos.omega2,
                   cos.phi2, layer.up.weight, act)
    return y.view(*x.shape[:-1], layer.out_features)


# ---------------------------------------------------------------------------------------------- shared z
def _new_shared_output(x, weight, bias, wd, bd, w1, p1, mw, mb, w2, p2, wu, offsets, sync, width, act):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _shared_config(M: int, width: int, K: int, dtype: torch.dtype) -> dict:
    """The shared-z kernel's tiles (the few-row kernel's rule, with a producer's 16 rows of W_down per stage),
    column blocks per layer (``blocks``)."""
    cfg = skinny_linear.launch_config(M, width, K, dtype, extra_rows=16)
    return dict(cfg, blocks=_cdiv(width, cfg["BLOCK_N"]))


@_register("leanformer::noble_decode_shared", _new_shared_output, mutates_args=("sync",))
def _noble_shared_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wd: torch.Tensor,
                     bd: torch.Tensor, w1: torch.Tensor, p1: torch.Tensor, mw: torch.Tensor, mb: torch.Tensor,
                     w2: torch.Tensor, p2: torch.Tensor, wu: torch.Tensor, offsets: torch.Tensor,
                     sync: torch.Tensor, width: int, act: int) -> torch.Tensor:
    from leanformer.ops import _noble_decode_kernel as kern

    K, N, R = x.shape[-1], weight.shape[0], mw.shape[-1]
    G = offsets.shape[0] - 1
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = x.new_empty(M, N)
    z = x.new_empty(M, G * R)
    cfg = _shared_config(M, width, K, x.dtype)
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    with _on_device(x):
        _wrap(kern.noble_decode_shared_kernel)[(G * (R // 16) + G * cfg["blocks"],)](
            x2, weight, bias if bias is not None else weight, wd, bd, w1, p1, mw, mb, w2, p2, wu, out, offsets, z,
            sync, M, K, G, cfg["blocks"], x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1), out.stride(0), out.stride(1), z.stride(0),
            HAS_BIAS=bias is not None, R=R, RZ=16, EVEN_K=K % cfg["BLOCK_K"] == 0, INTERPRET=_interpret(),
            ACT=act, COS_PRECISION=_cosnet_precision(), **meta, **opts)
    return out.view(*x.shape[:-1], N)


def _shared_reason(x: torch.Tensor, offsets: torch.Tensor, sync: torch.Tensor | None) -> str | None:
    """Why the shared-z kernel cannot run (beyond what the per-program kernel checks), or None."""
    G = offsets.shape[0] - 1
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.device != x.device:
        return f"offsets must be (G + 1,) int32 on {x.device}"
    if sync is None or sync.dtype != torch.int32 or sync.shape != (G + 2,) or sync.device != x.device:
        return f"no ({G + 2},) int32 sync buffer on {x.device}"
    if G + 2 > 16:
        return f"{G} layers: the kernel zeroes at most 16 counts"
    return None


def noble_linear(layer, x: torch.Tensor, activation: str | None = None) -> torch.Tensor | None:
    """``layer(x)`` by the kernel where :data:`ROUTE` routes it and :func:`noble_supported` allows, else None
    (the caller computes the layer as usual). ``activation`` (None, "gelu", "gelu_tanh", "relu"): applied in
    the kernel's epilogue to the rounded output, rounded again, as the eager activation after the layer
    (an MLP's first NOBLE layer: one launch fewer); ValueError naming the choices for another."""
    code = skinny_linear.activation_code(activation)
    if not _routed(x) or noble_supported(layer, x) is not None:
        return None
    cos = layer.act
    sync, offsets = getattr(layer, "decode_sync", None), getattr(layer, "decode_offsets", None)
    if SHARED_Z and offsets is not None and _shared_reason(x, offsets, sync) is None:
        return _noble_shared_op(x, layer.weight, layer.bias, layer.down.weight, layer.down.bias, cos.omega1,
                                cos.phi1, cos.M.weight, cos.M.bias, cos.omega2, cos.phi2, layer.up.weight, offsets,
                                sync, layer.out_features, code)
    splits = _split_count(x, layer.weight)
    if splits > 1 or Z_APART:
        return _noble_split(layer, x, code, splits)
    return _noble_op(x, layer.weight, layer.bias, layer.down.weight, layer.down.bias, cos.omega1, cos.phi1,
                     cos.M.weight, cos.M.bias, cos.omega2, cos.phi2, layer.up.weight, code)


def _routed(x: torch.Tensor) -> bool:
    """Whether :data:`ROUTE` sends x to the kernel (before the checks of what it can run)."""
    return ROUTE == "always" or (ROUTE == "cuda" and x.is_cuda)


# ---------------------------------------------------------------------------------------------- grouped
def _new_group_output(x, weight, bias, wd, bd, cosnet, mw, wu, offsets, width):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_register("leanformer::noble_decode_grouped", _new_group_output)
def _noble_group_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wd: torch.Tensor,
                    bd: torch.Tensor, cosnet: torch.Tensor, mw: torch.Tensor, wu: torch.Tensor,
                    offsets: torch.Tensor, width: int) -> torch.Tensor:
    w1, p1, mb, w2, p2 = cosnet.unbind(0)
    return _launch(x, weight, bias, wd, bd, w1, p1, mw, mb, w2, p2, wu, offsets, width)


def noble_group_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wd: torch.Tensor,
                          bd: torch.Tensor, cosnet: torch.Tensor, mw: torch.Tensor, wu: torch.Tensor,
                          offsets: torch.Tensor) -> str | None:
    """Why :func:`noble_group_linear` cannot run these stacks on x, or None when it can."""
    G, R, N, K = mw.shape[0], mw.shape[-1], weight.shape[0], weight.shape[-1]
    shapes = [(t.shape, want) for t, want in ((wd, (G * R, K)), (bd, (G * R,)), (cosnet, (5, G, R)),
                                              (mw, (G, R, R)), (wu, (N, R)))]
    if any(have != want for have, want in shapes):
        return f"the stacks' shapes {[tuple(h) for h, _ in shapes]} are not {[w for _, w in shapes]}"
    if offsets.dtype != torch.int32 or offsets.shape != (G + 1,) or offsets.device != x.device:
        return f"offsets must be ({G + 1},) int32 on {x.device}"
    return _branch_reason(x, weight, bias, mw.shape[-1], wd, bd, [*cosnet.unbind(0), mw], wu)


def noble_group_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wd: torch.Tensor,
                       bd: torch.Tensor, cosnet: torch.Tensor, mw: torch.Tensor, wu: torch.Tensor,
                       offsets: torch.Tensor, width: int, sync: torch.Tensor | None = None) -> torch.Tensor | None:
    """G NOBLE layers (CosNet, plain sum, one rank R) on the same x in one launch, their outputs side by side:
    x (..., K) → (..., ΣN_g), group g's at columns ``offsets[g] : offsets[g + 1]``, each equal to the
    single-layer kernel's. Stacks: weight (ΣN_g, K), bias (ΣN_g,) or None, wd (G·R, K), bd (G·R,), cosnet
    (5, G, R) = ω₁, φ₁, c (M's bias), ω₂, φ₂, mw (G, R, R) = M's weight, wu (ΣN_g, R); offsets (G + 1,) int32
    on x's device; ``width``: max N_g; ``sync``: (G + 2,) int32 zeros for :data:`SHARED_Z` (the kernel leaves
    them zero). None where :data:`ROUTE` or :func:`noble_group_supported` refuses (the caller runs each layer)."""
    if not _routed(x) or noble_group_supported(x, weight, bias, wd, bd, cosnet, mw, wu, offsets) is not None:
        return None
    if SHARED_Z and _shared_reason(x, offsets, sync) is None:
        return _noble_shared_op(x, weight, bias, wd, bd, *cosnet[:2], mw, *cosnet[2:], wu, offsets, sync, width, 0)
    return _noble_group_op(x, weight, bias, wd, bd, cosnet, mw, wu, offsets, width)
