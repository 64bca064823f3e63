"""One matrix product for the linears of a layer that read the same input (q, k, v and DiJiang's gate).

A decoding step multiplies a handful of rows by each projection, and on a GPU each of those small products
costs a fixed ~3.8 µs (H100, 2026-12-05, ``benchmarks/decode_profile.py``: 72 such products per GPT-2
DiJiang step, 0.27 of its 0.52 ms of kernels) whatever its size. :func:`fuse_linears` stacks their weights
into one ``(Σ out, in)`` matrix whose row blocks the linears' own weights then view (no second copy); and
:func:`project_inputs` runs one product (``skinny_linear.linear``: ``F.linear`` or the few-row kernel) and
splits the result, or each linear when the layer was not fused. The function computed is unchanged.

For decoding copies (:func:`leanformer.decoding.decoding_copy`): the stacked matrix is a non-persistent
buffer (state_dict keys do not change) that shares storage with the linears' weights, so an in-place update
of those weights reaches it. Anything that breaks that sharing (``.to()``, ``deepcopy``,
``load_state_dict(assign=True)``, ``to_empty``, a linear replaced by an injected layer) is caught by
:func:`fusion_is_current`, which every eager call checks: the layer is then fused again from its linears'
current weights, or left unfused when they are no longer plain linears. Compiled code does not re-check
(``data_ptr`` would break the graph); :class:`leanformer.decoding.StaticDecoder` checks before it compiles
or captures its step. (A state_dict of a fused copy has weights that share storage: ``torch.save`` writes
it; safetensors refuses shared tensors.)

NOBLE layers (:class:`leanformer.layers.noble.NobleLinear`, CosNet with the plain sum, one rank) cannot share
one product: :func:`fuse_noble_linears` stacks each of their parameters instead (main weights and biases,
W_down and b_down, CosNet's, W_up: non-persistent buffers that the parameters view, checked as above by
:func:`noble_fusion_is_current`) for :func:`leanformer.ops.noble_decode.noble_group_linear`, which runs them
in one launch where each layer's own kernel would run. Where it cannot (its ``ROUTE``, more rows than a
step's, a gradient being recorded), :func:`project_inputs` calls each layer.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn as nn

from leanformer.layers.linear import PLAIN_LINEARS
from leanformer.layers.noble import CosNet, NobleLinear
from leanformer.ops import noble_decode, norm_linear

_SPEC = "_fused_inputs"  # (names, output widths) of the fused linears
_NOBLE_SPEC = "_fused_noble_inputs"  # (names, output widths, which have a bias) of NOBLE layers in one launch
_NOBLE_STACKS = ("noble_input_weight", "noble_input_bias", "noble_input_down", "noble_input_down_bias",
                 "noble_input_cosnet", "noble_input_mix", "noble_input_up")  # noble_group_linear's order


def fuse_linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Fuse ``module``'s linears ``names`` (each a plain ``nn.Linear`` or DecodeLinear, same input width,
    dtype and device); returns whether it did (False, module unchanged, when one is missing, of another type
    or mismatched)."""
    unfuse(module)
    layers = [getattr(module, n, None) for n in names]
    if len(layers) < 2 or any(type(lin) not in PLAIN_LINEARS for lin in layers):
        return False
    if len({(lin.in_features, lin.weight.dtype, lin.weight.device) for lin in layers}) != 1:
        return False
    if any(lin.weight.is_meta for lin in layers):
        return False
    widths = tuple(lin.out_features for lin in layers)
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in layers])
        bias = None
        if any(lin.bias is not None for lin in layers):
            bias = torch.cat([lin.bias if lin.bias is not None else weight.new_zeros(lin.out_features)
                              for lin in layers])
    module.register_buffer("fused_input_weight", weight, persistent=False)
    module.register_buffer("fused_input_bias", bias, persistent=False)
    biases = bias.split(widths) if bias is not None else [None] * len(widths)
    for lin, w, b in zip(layers, weight.split(widths), biases):
        lin.weight.data = w  # the linear's weight becomes a view of its row block
        if lin.bias is not None:
            lin.bias.data = b
    setattr(module, _SPEC, (tuple(names), widths))
    return True


def unfuse(module: nn.Module) -> None:
    """Undo :func:`fuse_linears` or :func:`fuse_noble_linears` (the layers keep their parameters; the stacked
    buffers go)."""
    if module.__dict__.pop(_SPEC, None) is not None:
        for name in ("fused_input_weight", "fused_input_bias"):
            module._buffers.pop(name, None)
    spec = module.__dict__.pop(_NOBLE_SPEC, None)
    if spec is not None:
        for name in (*_NOBLE_STACKS, "noble_input_offsets", "noble_input_sync"):
            module._buffers.pop(name, None)
        for name in spec[0]:
            layer = getattr(module, name, None)
            if isinstance(layer, NobleLinear):
                layer.group_fused = False


def fusion_is_current(module: nn.Module) -> bool:
    """Whether ``module``'s fused linears are still plain ``nn.Linear``s whose weights (and biases) view the
    stacked buffers at their row blocks."""
    names, widths = getattr(module, _SPEC)
    weight, bias = module.fused_input_weight, module.fused_input_bias
    row = 0
    for name, width in zip(names, widths):
        lin = getattr(module, name, None)
        if type(lin) not in PLAIN_LINEARS or lin.weight.dtype != weight.dtype or lin.weight.device != weight.device:
            return False
        if lin.weight.data_ptr() != weight.data_ptr() + row * weight.stride(0) * weight.element_size():
            return False
        if lin.bias is not None and (bias is None
                                     or lin.bias.data_ptr() != bias.data_ptr() + row * bias.element_size()):
            return False
        row += width
    return True


def refresh_fusion(module: nn.Module) -> None:
    """Fuse ``module`` again from its layers' current parameters if :func:`fusion_is_current` (or
    :func:`noble_fusion_is_current`) says the sharing broke, or leave it unfused when they no longer fuse; a
    no-op for an unfused module."""
    spec = getattr(module, _SPEC, None)
    if spec is not None and not fusion_is_current(module):
        fuse_linears(module, spec[0])
    spec = getattr(module, _NOBLE_SPEC, None)
    if spec is not None and not noble_fusion_is_current(module):
        fuse_noble_linears(module, spec[0])


# ---------------------------------------------------------------------------------------------- NOBLE
def _groupable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a NobleLinear that the grouped kernel computes: CosNet, the plain sum, no dropout,
    a rank the kernel takes."""
    return (type(layer) is NobleLinear and isinstance(layer.act, CosNet) and layer.gate is None
            and isinstance(layer.drop, nn.Identity) and noble_decode.rank_reason(layer.rank) is None)


def _noble_layout(layers: list[NobleLinear], widths: tuple[int, ...]):
    """(parameter, stack name, element offset) for every parameter of ``layers`` (one rank R, one K): each is
    the contiguous block of its shape at that offset of its stack (shapes in :func:`fuse_noble_linears`)."""
    G, R, K = len(layers), layers[0].rank, layers[0].in_features
    for g, (layer, row) in enumerate(zip(layers, accumulate(widths, initial=0))):
        act = layer.act
        yield layer.weight, "noble_input_weight", row * K
        if layer.bias is not None:
            yield layer.bias, "noble_input_bias", row
        yield layer.down.weight, "noble_input_down", g * R * K
        yield layer.down.bias, "noble_input_down_bias", g * R
        for i, p in enumerate((act.omega1, act.phi1, act.M.bias, act.omega2, act.phi2)):
            yield p, "noble_input_cosnet", (i * G + g) * R
        yield act.M.weight, "noble_input_mix", g * R * R
        yield layer.up.weight, "noble_input_up", row * R


def fuse_noble_linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Stack ``module``'s NOBLE layers ``names`` (CosNet, fusion "add", no dropout, one rank R the kernel
    takes, same input width K, dtype and device) for :func:`leanformer.ops.noble_decode.noble_group_linear`;
    returns whether it did (False, module unchanged, otherwise). Non-persistent buffers, each layer's
    parameters becoming views of their blocks (as :func:`fuse_linears`): ``noble_input_weight`` (ΣN, K),
    ``_bias`` (ΣN,; zeros for a layer without one) or None when no layer has one, ``_down`` (G·R, K),
    ``_down_bias`` (G·R,), ``_cosnet`` (5, G, R): ω₁, φ₁, c, ω₂, φ₂, ``_mix`` (G, R, R): M,
    ``_up`` (ΣN, R), ``noble_input_offsets`` (G + 1,) int32, each layer's first output column, and
    ``noble_input_sync`` (G + 2,) int32 zeros (the shared-z kernel's counts)."""
    unfuse(module)
    layers = [getattr(module, n, None) for n in names]
    if len(layers) < 2 or not all(_groupable(lin) for lin in layers):
        return False
    params = [p for lin in layers for p in lin.parameters()]
    dtype, device = params[0].dtype, params[0].device
    if (len({(lin.in_features, lin.rank) for lin in layers}) != 1
            or any(p.is_meta or p.dtype != dtype or p.device != device for p in params)):
        return False
    widths = tuple(lin.out_features for lin in layers)
    G, R, K, N = len(layers), layers[0].rank, layers[0].in_features, sum(widths)
    kw = {"dtype": dtype, "device": device}
    stacks = dict(zip(_NOBLE_STACKS, (
        torch.empty(N, K, **kw), torch.zeros(N, **kw) if any(lin.bias is not None for lin in layers) else None,
        torch.empty(G * R, K, **kw), torch.empty(G * R, **kw), torch.empty(5, G, R, **kw),
        torch.empty(G, R, R, **kw), torch.empty(N, R, **kw))))
    with torch.no_grad():
        for p, name, offset in _noble_layout(layers, widths):
            block = stacks[name].view(-1)[offset: offset + p.numel()].view(p.shape)
            block.copy_(p)
            p.data = block  # the parameter becomes a view of its block
    for lin in layers:
        lin.group_fused = True  # its restack() (after .to(), load_state_dict) would move W and W_down off the stacks
    for name, t in stacks.items():
        module.register_buffer(name, t, persistent=False)
    offsets = torch.tensor(list(accumulate(widths, initial=0)), dtype=torch.int32, device=device)
    module.register_buffer("noble_input_offsets", offsets, persistent=False)
    module.register_buffer("noble_input_sync", torch.zeros(G + 2, dtype=torch.int32, device=device),
                           persistent=False)  # noble_decode.SHARED_Z's counts (every launch leaves them zero)
    setattr(module, _NOBLE_SPEC, (tuple(names), widths, tuple(lin.bias is not None for lin in layers)))
    return True


def noble_fusion_is_current(module: nn.Module) -> bool:
    """Whether ``module``'s NOBLE layers fused by :func:`fuse_noble_linears` still fuse and every parameter of
    theirs still views its block of the stacks."""
    names, widths, biased = getattr(module, _NOBLE_SPEC)
    layers = [getattr(module, n, None) for n in names]
    if not all(_groupable(lin) for lin in layers) or tuple(lin.bias is not None for lin in layers) != biased:
        return False  # (a bias removed since fusing would leave its rows in the bias stack)
    for p, name, offset in _noble_layout(layers, widths):
        stack = getattr(module, name)
        if (stack is None or p.device != stack.device or p.dtype != stack.dtype
                or p.data_ptr() != stack.data_ptr() + offset * stack.element_size()):
            return False
    return True


def _noble_outputs(module: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor] | None:
    """``[module.<name>(x) for name in names]`` by one launch when :func:`fuse_noble_linears` fused exactly
    these names, no gradient is being recorded and the kernel runs x; else None."""
    spec = getattr(module, _NOBLE_SPEC, None)
    if spec is None or spec[0] != names or torch.is_grad_enabled() or not noble_decode.GROUPED:
        return None
    if not torch.compiler.is_compiling():
        refresh_fusion(module)  # may unfuse
        spec = getattr(module, _NOBLE_SPEC, None)
        if spec is None:
            return None
    y = noble_decode.noble_group_linear(x, *(getattr(module, n) for n in _NOBLE_STACKS),
                                        module.noble_input_offsets, max(spec[1]), module.noble_input_sync)
    return None if y is None else list(y.split(spec[1], dim=-1))


def project_inputs(module: nn.Module, x: torch.Tensor, names: tuple[str, ...],
                   norm: nn.LayerNorm | None = None) -> list[torch.Tensor]:
    """``[module.<name>(norm(x)) for name in names]``, x (..., in) → each (..., out_name): one product when
    :func:`fuse_linears` fused exactly these names and no gradient is being recorded (the stacked matrix is
    a buffer: gradients must reach the linears' own weights), one NOBLE kernel launch when
    :func:`fuse_noble_linears` did and the kernel runs x, else one call per linear. ``norm`` (a decoding
    copy's Pre-LN block passes its LayerNorm): applied first, inside the fused product's kernel where
    :data:`leanformer.ops.norm_linear.ROUTE` allows (before the NOBLE launch: its kernel has no norm)."""
    spec = getattr(module, _SPEC, None)
    if spec is not None and spec[0] == tuple(names) and not torch.is_grad_enabled():
        if not torch.compiler.is_compiling():
            refresh_fusion(module)  # may unfuse
        if hasattr(module, _SPEC):
            ln = (norm.weight, norm.bias, norm.eps) if norm is not None else None
            return list(norm_linear.linear(x, module.fused_input_weight, module.fused_input_bias, norm=ln)
                        .split(spec[1], dim=-1))
    if norm is not None:
        x = norm(x)
    ys = _noble_outputs(module, x, tuple(names))
    return ys if ys is not None else [getattr(module, n)(x) for n in names]
