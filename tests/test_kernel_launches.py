"""The launch check of tests/kernel_launch_check.py catches a constexpr left to its default."""

import os

import pytest
import torch
from kernel_launch_check import checked_wrap, constexpr_names

from leanformer.ops import _skinny_linear_kernel as kern
from leanformer.ops import fused_decay_attention as fda
from leanformer.ops import norm_linear


def test_constexpr_names_include_defaults():
    names = constexpr_names(kern.skinny_linear_kernel)
    assert {"ACT", "PDL", "LN", "BLOCK_N"} <= names and "M" not in names and "eps" not in names


def test_a_launch_leaving_a_default_constexpr_fails_and_names_it():
    launch = checked_wrap(fda._wrap)(kern.skinny_linear_kernel)[(1,)]
    with pytest.raises(AssertionError, match=r"skinny_linear_kernel launched without naming the constexprs \['PDL'\]"):
        launch(ACT=0, LN=False, LN_BIAS=False, HAS_BIAS=False, HAS_RES=False, BLOCK_M=1, BLOCK_N=16, BLOCK_K=16,
               EVEN_K=True, INTERPRET=True, FMA=False)


def test_norm_linear_names_every_constexpr():
    """The session-wide check (conftest) is on: the op's launch (PDL once omitted) runs (under Triton's
    interpreter, which conftest switches on where there is no CUDA; the GPU runs tests/test_norm_linear.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs its CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, generator=g), torch.randn(16, 32, generator=g)
    ln = (torch.ones(32), torch.zeros(32), 1e-5)
    y = norm_linear.norm_linear(x, w, None, norm=ln, residual=torch.zeros(2, 16))
    torch.testing.assert_close(y, norm_linear.reference(x, w, None, norm=ln, residual=torch.zeros(2, 16)))


def test_triton_check_inside_a_compiled_graph_does_not_recompile(monkeypatch):
    """The first check of Triton's import, traced inside a compiled model, must not leave a guard that fails at
    the next call (it cost one recompile of the whole GPT-2 model on the H100, 2026-12-06)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fda, "_TRITON_IMPORT", {})

    def f(x):
        return x * 2 if fda._triton_import_error() is None else x + 1
    torch._dynamo.reset()
    counters.clear()
    g = torch.compile(f, backend="eager")
    for _ in range(3):
        g(torch.ones(3))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
