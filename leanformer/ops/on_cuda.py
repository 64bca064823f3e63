"""``torch.compile`` for small element-wise functions on CUDA tensors, eager elsewhere.

A layer's chain of element-wise ops (DiJiang's feature map and rescaled GroupNorm, shaped attention's
decoding-step mix) is one kernel launch per op when run eagerly, and a CUDA graph replays every launch;
Inductor fuses such a chain into one or two kernels. :func:`on_cuda_compiled` wraps a function so that
its CUDA calls go through one ``torch.compile`` form of it, while CPU and meta tensors (the tests, CI)
run it as written. A compiler failure falls back to the eager function for good, with a warning: it
must never stop a training run or a generation (except inside a CUDA graph capture, which the failure has
already broken: there it is raised). The eager retry runs the whole function again: a function that
mutates an input applies its mutation twice if the compiled call failed after writing it (a kernel's
launch failure; a compile error fails before anything runs).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

COMPILED: dict = {}  # fn → its torch.compile form, or False after a failure (benchmarks read it)


def on_cuda_compiled(fn: Callable, enabled: Callable[[], bool] = lambda: True) -> Callable:
    """``fn`` itself unless its first argument is a CUDA tensor and ``enabled()`` (read at each call, so a
    module's switch may turn it off); then its ``torch.compile`` form (static shapes first, dynamic after a
    second shape), falling back to ``fn`` with a warning if compiling fails."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced by an outer torch.compile: inline fn (torch.compile(fn) would
            return fn(*args, **kwargs)    # return fn itself here, and caching that would leave fn eager for good)
        if not (args[0].is_cuda and enabled()) or COMPILED.get(fn) is False:
            return fn(*args, **kwargs)
        if fn not in COMPILED:
            COMPILED[fn] = torch.compile(fn)
        try:
            return COMPILED[fn](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training or decoding
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # a broken capture
                raise
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running eager",
                          stacklevel=2)
            COMPILED[fn] = False
            return fn(*args, **kwargs)
    return run


KERNEL_SWITCH_CHOICES = ("cuda", "always", "never")  # a layer's switch for one of our Triton kernels


def kernel_switch_allows(name: str, value: str, t: torch.Tensor) -> bool:
    """Whether a kernel switch (module attribute ``name`` = ``value``) lets tensor ``t`` take the kernel:
    "cuda" on CUDA tensors, "always" also on the CPU (under TRITON_INTERPRET=1: tests), "never" not at all.
    A value outside :data:`KERNEL_SWITCH_CHOICES` is a ValueError naming it. Whether the kernel can run the
    inputs is the caller's second question."""
    if value not in KERNEL_SWITCH_CHOICES:
        raise ValueError(f"{name}={value!r} must be one of {KERNEL_SWITCH_CHOICES}")
    return value == "always" or (value == "cuda" and t.is_cuda)
