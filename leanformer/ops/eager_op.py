"""Our Triton ops, called eagerly on plain tensors, without the custom-op dispatcher's host time.

Each kernel of :mod:`leanformer.ops` is a ``torch.library`` op (``triton_op``, or ``custom_op`` under the
interpreter), so that ``torch.compile`` traces it and fake tensors (the meta device, FakeTensorMode) get its
shapes. An eager call pays for that on the host: the dispatcher, the library's Python autograd wrapper
(``register_autograd``) and a second op for the backward. On this project's CPU, DiJiang's call (forward and
backward, kernel launches stubbed out) took 606 µs through the ops against 382 µs direct
(``benchmarks/attention_host_profile.py --cpu-no-launch``, docs/bench_cpu/eager_op). A lone DiJiang call at 4K
(four such ops) was host-bound on an H200: 2.24 ms of wall time for 1.32 ms of GPU kernels
(``benchmarks/attention_host_profile.py``, docs/gpu/misc_2026-12-07/callC/out/host).

:class:`EagerFastOp` wraps a registered op. A call on plain tensors (exact ``torch.Tensor``s, none on the meta
device; no torch.compile tracing, no dispatch or torch-function mode, no functorch transform, no
``torch.jit.trace``) runs the op's
Python function itself, through a ``torch.autograd.Function`` made of the op's registered backward and
setup_context when an input needs a gradient. Any other call goes to the registered op, as before. The function
and its backward are the op's own, so the results are the same bits (tests/test_eager_op.py).
Switch: :data:`EAGER_FAST_PATH` (False: every call goes through the op).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

EAGER_FAST_PATH = True
_DIRECT = threading.local()  # .active: a direct call is running (Triton kernels launch as themselves)


def direct_call_active() -> bool:
    """Whether the running code is an op's function called directly (:class:`EagerFastOp`): its Triton
    launches then skip ``torch.library.wrap_triton`` (which outside a ``triton_op`` call goes through the
    higher-order-op dispatch, about 1 ms per launch by torch's own note)."""
    return getattr(_DIRECT, "active", False)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # exact types: a subclass (FakeTensor, a wrapper) goes to the op


def plain_eager_call(args: tuple) -> bool:
    """Whether a call with ``args`` may bypass the registered op (the module docstring lists the conditions;
    also not while ``torch.jit.trace`` records: it cannot see a Triton launch)."""
    if torch.compiler.is_compiling() or not EAGER_FAST_PATH:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state() is not None:
        return False
    for a in args:  # a plain loop: a generator here cost ~5 µs per call
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.is_meta):
            return False
    return True


def _call_directly(fn: Callable, args: tuple):
    before = direct_call_active()
    _DIRECT.active = True
    try:
        return fn(*args)
    finally:
        _DIRECT.active = before


def _autograd_function(name: str, fn: Callable, backward: Callable, setup_context: Callable) -> type:
    """A ``torch.autograd.Function`` computing ``fn`` whose backward is the op's registered one."""
    def forward(ctx, *args):
        output = _call_directly(fn, args)
        setup_context(ctx, args, output)
        return output

    return type(f"Eager_{name.replace('::', '_')}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


class EagerFastOp:
    """A registered op (``op``) and the Python function it runs (``fn``); called like the op, positionally.
    ``register_autograd`` registers the backward with the op and builds the direct path's autograd Function."""

    def __init__(self, name: str, op, fn: Callable):
        self.name, self.op, self.fn = name, op, fn
        self._function: type | None = None
        functools.update_wrapper(self, fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self._function = _autograd_function(self.name, self.fn, backward, setup_context)

    def __call__(self, *args, **kwargs):
        if kwargs or not plain_eager_call(args):
            return self.op(*args, **kwargs)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._function is None:  # no backward (e.g. a backward op under create_graph=True): the op's
                return self.op(*args)   # own error, not a result silently detached from the graph
            return self._function.apply(*args)
        return _call_directly(self.fn, args)
