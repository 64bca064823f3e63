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
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leanformer.layers.linear import PLAIN_LINEARS
from leanformer.ops import norm_linear

_SPEC = "_fused_inputs"  # (names, output widths) of the fused linears


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
    """Undo :func:`fuse_linears` (the linears keep their weights; the stacked buffers go)."""
    if module.__dict__.pop(_SPEC, None) is not None:
        for name in ("fused_input_weight", "fused_input_bias"):
            module._buffers.pop(name, None)


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
    """Fuse ``module`` again from its linears' current weights if :func:`fusion_is_current` says the sharing
    broke (or leave it unfused when they are no longer plain linears); a no-op for an unfused module."""
    spec = getattr(module, _SPEC, None)
    if spec is not None and not fusion_is_current(module):
        fuse_linears(module, spec[0])


def project_inputs(module: nn.Module, x: torch.Tensor, names: tuple[str, ...],
                   norm: nn.LayerNorm | None = None) -> list[torch.Tensor]:
    """``[module.<name>(norm(x)) for name in names]``, x (..., in) → each (..., out_name): one product when
    :func:`fuse_linears` fused exactly these names and no gradient is being recorded (the stacked matrix is
    a buffer: gradients must reach the linears' own weights), else one call per linear. ``norm`` (a
    decoding copy's Pre-LN block passes its LayerNorm): applied first, inside the fused product's kernel
    where :data:`leanformer.ops.norm_linear.ROUTE` allows."""
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
    return [getattr(module, n)(x) for n in names]
