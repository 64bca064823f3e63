"""NOBLE's training route (:mod:`leanformer.ops.noble_train`) and its two-segment product
(:mod:`leanformer.ops.two_segment_matmul`) against float64 references.

The product: ``A1 B1 + A2 B2 + bias`` at ragged shapes, strided (transposed) operands, an empty second segment, bf16;
refusals. The route: a NobleLinear's output and the gradient to x and to every parameter against the float64
two-product form (``forward_reference``), with and without the main bias, multi-axis input; bf16 autocast against
the stacked form; ``torch.compile`` against eager; what the backward keeps (no (tokens × d_out) tensor); the
layers it refuses fall back to their own forms.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in float32:
asserted within 1e-5 of float64, relative to the largest reference value.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer.layers import noble  # noqa: E402
from leanformer.layers.noble import NobleLinear  # noqa: E402
from leanformer.ops import noble_train as nt  # noqa: E402
from leanformer.ops.two_segment_matmul import two_segment_matmul  # noqa: E402

F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 1e-5

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    return float((out.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture
def route(monkeypatch):
    """NobleLinear takes the training route wherever the kernels run (the CPU under the interpreter)."""
    monkeypatch.setattr(noble, "TRAIN_KERNEL", "always")


# ----------------------------------------------------------------------------------------------- the product
@pytest.fixture(params=[False, True], ids=["two-loops", "one-loop"])
def one_loop(request, monkeypatch):
    """The kernel's two loop forms (ONE_LOOP), through the configuration the interpreter (or CUDA) launches."""
    from leanformer.ops import two_segment_matmul as ts

    monkeypatch.setattr(ts, "INTERPRETER_CONFIG", ts.INTERPRETER_CONFIG[:6] + (request.param,))
    monkeypatch.setattr(ts, "ONE_LOOP", request.param)
    return request.param


@pytest.mark.parametrize("m,n,k1,k2", [(70, 50, 100, 32), (64, 64, 64, 16), (33, 17, 5, 3), (10, 96, 64, 0),
                                       (300, 40, 48, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_two_segment_product_matches_float64(m, n, k1, k2, bias, one_loop):
    """Ragged M, N, K1, K2 (tails masked; K2 = 0; K2 > one K2 tile), several groups of row tiles (M 300), B1 a
    transposed weight (strides (1, K1)) and B2 a column slice of a wider matrix (N-contiguous, row stride > N)."""
    g = torch.Generator().manual_seed(m + k2)
    a1, a2 = torch.randn(m, k1, dtype=F64, generator=g), torch.randn(m, k2, dtype=F64, generator=g)
    b1 = torch.randn(n, k1, dtype=F64, generator=g).t()
    b2 = torch.randn(k2, n + 8, dtype=F64, generator=g)[:, 3:n + 3]
    b = torch.randn(n, dtype=F64, generator=g) if bias else None
    ref = a1 @ b1 + a2 @ b2 + (b if bias else 0)
    ops = [a1.float().to(DEV), b1.t().float().to(DEV).t(), a2.float().to(DEV),
           torch.randn(k2, n + 8).to(DEV)[:, 3:n + 3].copy_(b2)]
    assert ops[1].stride() == (1, k1) and ops[3].stride() == (n + 8, 1)
    out = two_segment_matmul(*ops, b.float().to(DEV) if bias else None)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel(out, ref) < FP32_TOL


@pytest.fixture
def tma_launches(monkeypatch):
    """two_segment_matmul.TMA on; the list of the TMA form's launches (each one's (M, N, K1, K2))."""
    from leanformer.ops import two_segment_matmul as ts

    launches, launch = [], ts._launch_tma
    monkeypatch.setattr(ts, "TMA", True)
    monkeypatch.setattr(ts, "_launch_tma", lambda a1, b1, a2, b2, *rest: (
        launches.append((*a1.shape, b2.shape[0])), launch(a1, b1, a2, b2, *rest))[1])
    return launches


@pytest.mark.parametrize("m, n, k1, k2, dtype", [(300, 40, 48, 16, torch.float32), (70, 64, 40, 40, torch.float32),
                                                 (96, 48, 64, 32, torch.bfloat16)])
def test_tma_product_matches_float64(tma_launches, m, n, k1, k2, dtype):
    """The TMA form (two_segment_matmul.TMA): ragged M, N and K tails zero-filled by the descriptors, several
    groups of row tiles, B1 a transposed weight (a descriptor over the weight) and B2 N-contiguous."""
    g = torch.Generator().manual_seed(m + n)
    a1, a2 = torch.randn(m, k1, dtype=F64, generator=g), torch.randn(m, k2, dtype=F64, generator=g)
    w, b2, b = (torch.randn(n, k1, dtype=F64, generator=g), torch.randn(k2, n, dtype=F64, generator=g),
                torch.randn(n, dtype=F64, generator=g))
    ops = [t.to(dtype) for t in (a1, w, a2, b2, b)]
    ref = sum(x.double() @ y.double() for x, y in ((ops[0], ops[1].t()), (ops[2], ops[3]))) + ops[4].double()
    out = two_segment_matmul(ops[0].to(DEV), ops[1].to(DEV).t(), ops[2].to(DEV), ops[3].to(DEV), ops[4].to(DEV))
    assert tma_launches == [(m, k1, k2)] and out.dtype == dtype
    assert rel(out, ref) < (FP32_TOL if dtype == torch.float32 else 2 ** -7)  # one bf16 ulp (the interpreter's
    # float32 → bf16 conversion truncates: measured 2^-7.4 here, the pointer kernel alike)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_tma_product_matches_float64(tma_launches, monkeypatch, dtype):
    """The persistent TMA form (two_segment_matmul.PERSISTENT): 4 programs under the interpreter, each looping over
    several of the 20 tiles (ragged M, N, K1; K2 < one K2 tile), the bias and both B layouts."""
    from leanformer.ops import two_segment_matmul as ts

    monkeypatch.setattr(ts, "PERSISTENT", True)
    g = torch.Generator().manual_seed(5)
    m, n, k1, k2 = 300, 40, 48, 24
    a1, w, a2, b2, b = (torch.randn(*s, dtype=F64, generator=g).to(dtype) for s in ((m, k1), (n, k1), (m, k2),
                                                                                     (k2, n), (n,)))
    ref = a1.double() @ w.double().t() + a2.double() @ b2.double() + b.double()
    out = two_segment_matmul(a1.to(DEV), w.to(DEV).t(), a2.to(DEV), b2.to(DEV), b.to(DEV))
    assert tma_launches == [(m, k1, k2)]
    assert rel(out, ref) < (FP32_TOL if dtype == torch.float32 else 2 ** -7)  # (the interpreter truncates to bf16)


def test_tma_form_names_what_descriptors_cannot_cover_and_falls_back(tma_launches):
    """Operands a descriptor cannot cover (a start off 16 bytes, K2 = 0, a row stride along K) take the pointer
    kernel, with the same result."""
    from leanformer.ops import two_segment_matmul as ts

    a1, b1, a2, b2 = (torch.randn(*s, device=DEV) for s in ((40, 32), (32, 24), (40, 16), (16, 24)))
    assert ts.tma_reason(a1, b1, a2, b2) is None
    shifted = torch.randn(40 * 16 + 1, device=DEV)[1:].view(40, 16)
    assert "16-byte" in ts.tma_reason(a1, b1, shifted, b2)
    assert "K2 = 0" in ts.tma_reason(a1, b1, a2[:, :0], b2[:0])
    assert "K1 = 0" in ts.tma_reason(torch.randn(40, 16, device=DEV)[:, :0], b1[:0], a2, b2)
    assert "16-byte" in ts.tma_reason(a1.t().contiguous().t(), b1, a2, b2)
    assert "16-byte" in ts.tma_reason(a1[:1].expand(40, 32), b1, a2, b2)  # rows that overlap
    for ops in ((a1, b1, shifted, b2), (a1, b1, a2[:, :0], b2[:0]),
                (torch.randn(40, 16, device=DEV)[:, :0], b1[:0], a2, b2)):
        ref = ops[0].double() @ ops[1].double() + ops[2].double() @ ops[3].double()
        assert rel(two_segment_matmul(*ops), ref) < FP32_TOL
    assert tma_launches == []
    # compiled, the choice is made from shapes and strides; the op checks the start on the real tensor, falls back
    torch._dynamo.reset()
    out = torch.compile(lambda *ops: two_segment_matmul(*ops), fullgraph=True)(a1, b1, shifted, b2)
    torch._dynamo.reset()
    assert rel(out, a1.double() @ b1.double() + shifted.double() @ b2.double()) < FP32_TOL and tma_launches == []


def test_a_strided_bias_is_read_as_its_values(tma_launches):
    """Both kernels read the bias with unit stride: a strided one is made contiguous first (found by a review)."""
    from leanformer.ops import two_segment_matmul as ts

    a1, b1, a2, b2 = (torch.randn(*s, device=DEV) for s in ((40, 32), (32, 24), (40, 16), (16, 24)))
    bias = torch.randn(24, 2, device=DEV)[:, 0]
    ref = a1.double() @ b1.double() + a2.double() @ b2.double() + bias.double()
    for tma in (True, False):
        ts.TMA = tma
        assert rel(two_segment_matmul(a1, b1, a2, b2, bias), ref) < FP32_TOL
    assert len(tma_launches) == 1


def test_tile_choice_takes_symbolic_sizes(monkeypatch):
    """Compiled with dynamic shapes, the op's body sees SymInt sizes: the tile table (a dict) must not hash them
    (TypeError: unhashable type: non-nested SymInt, found by a review on 2026-12-07)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from leanformer.ops import two_segment_matmul as ts

    monkeypatch.setattr(ts, "_interpret", lambda: False)
    monkeypatch.setitem(ts.CONFIGS, (300, 200, 64, 32, "n"), (64, 64, 64, 8, 4, 3, True))

    def f(x):
        return x * ts.tile_config(x.shape[0], x.shape[1], 64, 32, "n")[0]

    make_fx(f, tracing_mode="symbolic")(torch.randn(300, 200))
    assert ts.tile_config(300, 200, 64, 32, "n") == (64, 64, 64, 8, 4, 3, True)
    assert ts.tile_config(300, 200, 64, 32, "k") != (64, 64, 64, 8, 4, 3, True)  # the forward's layout: its own entry
    assert ts.tile_config(4096, 768, 768, 32)[:2] == (128, 256)


def test_two_segment_product_in_bf16_rounds_once():
    g = torch.Generator().manual_seed(3)
    a1, b1 = torch.randn(40, 64, generator=g), torch.randn(64, 48, generator=g)
    a2, b2 = torch.randn(40, 32, generator=g), torch.randn(32, 48, generator=g)
    ops = [t.bfloat16() for t in (a1, b1, a2, b2)]
    ref = sum(x.double() @ y.double() for x, y in ((ops[0], ops[1]), (ops[2], ops[3])))
    out = two_segment_matmul(*(t.to(DEV) for t in ops))
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 2 ** -8  # one rounding of a float32 sum of exact bf16 products


def test_two_segment_product_refusals_name_the_problem():
    a, b = torch.randn(4, 8, device=DEV), torch.randn(8, 5, device=DEV)
    with pytest.raises(ValueError, match=r"A2 \(M, K2\)"):
        two_segment_matmul(a, b, torch.randn(3, 2, device=DEV), torch.randn(2, 5, device=DEV))
    with pytest.raises(ValueError, match="one dtype"):
        two_segment_matmul(a, b, a.double(), b.double())
    with pytest.raises(ValueError, match=r"bias must be \(5,\)"):
        two_segment_matmul(a, b, a, b, torch.randn(4, device=DEV))
    with pytest.raises(ValueError, match="2-d"):
        two_segment_matmul(a[None], b, a, b)


# ------------------------------------------------------------------------------------------------ the route
def _layers(d_in=48, d_out=40, r=16, bias=True, seed=0):
    """A float64 reference layer (its up-projection widened so the branch matters) and a float32 copy."""
    torch.manual_seed(seed)
    ref = NobleLinear(d_in, d_out, rank=r, bias=bias, dtype=F64)
    with torch.no_grad():
        ref.up.weight.normal_(0, 0.3)
        if bias:
            ref.bias.normal_(0, 0.1)
    return ref, copy.deepcopy(ref).float().to(DEV)


def _grads(layer, x, g, reference=False):
    x = x.detach().requires_grad_()
    y = layer.forward_reference(x) if reference else layer(x)
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad((y.double() * g).sum(), [x] + [p for _, p in layer.named_parameters()])
    return y, dict(zip(["x"] + names, grads))


def _took_route(y: torch.Tensor) -> bool:
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith("_NobleTrainBackward"):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


@pytest.mark.parametrize("branch", nt.BRANCHES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [16, 32])
def test_route_matches_float64_with_every_gradient(route, monkeypatch, bias, r, branch, one_loop):
    """Both forms of the branch (noble_train.BRANCH: rank-r products fused with CosNet, or cuBLAS then CosNet's
    kernel); d_in 48 is not a multiple of the fused kernels' 64-wide K tiles, so their tails are masked."""
    monkeypatch.setattr(nt, "BRANCH", branch)
    ref, layer = _layers(r=r, bias=bias)
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(3, 7, 48, dtype=F64, generator=gen), torch.randn(3, 7, 40, dtype=F64, generator=gen)
    y_ref, g_ref = _grads(ref, x, g, reference=True)
    y, grads = _grads(layer, x.float().to(DEV), g.to(DEV))
    assert _took_route(y)
    assert y.shape == (3, 7, 40) and y.dtype == torch.float32
    assert rel(y, y_ref) < FP32_TOL
    assert grads.keys() == g_ref.keys()
    for name in g_ref:
        assert grads[name].shape == g_ref[name].shape, name
        assert grads[name].dtype == torch.float32, name
        assert rel(grads[name], g_ref[name]) < FP32_TOL, name


def test_route_by_the_tma_form_matches_float64_with_every_gradient(route, tma_launches):
    """NOBLE's route with both of its products (y and dx) by the TMA form."""
    ref, layer = _layers(r=32, bias=True)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(3, 7, 48, dtype=F64, generator=gen), torch.randn(3, 7, 40, dtype=F64, generator=gen)
    y_ref, g_ref = _grads(ref, x, g, reference=True)
    y, grads = _grads(layer, x.float().to(DEV), g.to(DEV))
    assert _took_route(y) and tma_launches == [(21, 48, 32), (21, 40, 32)]
    assert rel(y, y_ref) < FP32_TOL
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < FP32_TOL, name


def test_route_by_the_tma_form_compiles_to_the_eager_result(route, tma_launches):
    """Compiled (fullgraph), the route's TMA products (on a GPU: descriptors made inside a ``triton_op`` that Inductor
    traces) give the eager result."""
    _, layer = _layers(r=32)
    x = torch.randn(24, 48, device=DEV)
    g = torch.randn(24, 40, device=DEV, dtype=F64)
    y, grads = _grads(layer, x, g)
    assert len(tma_launches) == 2
    tma_launches.clear()
    torch._dynamo.reset()
    y_c, grads_c = _grads(torch.compile(layer, fullgraph=True), x, g)
    torch._dynamo.reset()
    assert len(tma_launches) == 2  # the compiled forward and backward took the TMA form too
    assert rel(y_c, y) < 1e-6
    for a, b in zip(grads.values(), grads_c.values()):
        assert rel(b, a) < 1e-6


@pytest.mark.parametrize("rows", [None, 16, 64])
def test_fused_branch_kernels_at_even_widths_match_float64(route, monkeypatch, rows):
    """d_in and d_out multiples of 64 (the fused kernels' unmasked K loop) and rows past one program's block, with
    the rows per program CosNet's kernels choose (32 at r 32) and the benchmark's other choices."""
    from leanformer.ops import noble_branch

    monkeypatch.setattr(noble_branch, "ROWS", rows)
    monkeypatch.setattr(nt, "BRANCH", "fused")
    ref, layer = _layers(d_in=128, d_out=64, r=32)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(70, 128, dtype=F64, generator=gen), torch.randn(70, 64, dtype=F64, generator=gen)
    y_ref, g_ref = _grads(ref, x, g, reference=True)
    y, grads = _grads(layer, x.float().to(DEV), g.to(DEV))
    assert nt.BRANCH == "fused" and _took_route(y)
    assert rel(y, y_ref) < FP32_TOL
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < FP32_TOL, name


def test_route_skips_gradients_nobody_asked_for(route):
    """x without grad and frozen main and up weights: those gradients are None, the others as before."""
    ref, layer = _layers()
    gen = torch.Generator().manual_seed(4)
    x, g = torch.randn(20, 48, dtype=F64, generator=gen), torch.randn(20, 40, dtype=F64, generator=gen)
    _, g_ref = _grads(ref, x, g, reference=True)
    layer.weight.requires_grad_(False)
    layer.up.weight.requires_grad_(False)
    y = layer(x.float().to(DEV))
    assert _took_route(y)
    (y.double() * g.to(DEV)).sum().backward()
    assert layer.weight.grad is None and layer.up.weight.grad is None
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, g_ref[name]) < FP32_TOL, name


def test_route_has_no_double_backward_and_stays_off_without_autograd(route, monkeypatch):
    _, layer = _layers()
    x = torch.randn(6, 48, device=DEV, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    assert not gx.requires_grad  # once_differentiable: no graph through the backward, so no silent wrong 2nd order
    with pytest.raises(RuntimeError, match="does not require grad"):
        gx.sum().backward()

    def refuse(*args, **kwargs):
        raise AssertionError("the route ran without autograd")

    monkeypatch.setattr(nt, "noble_train_linear", refuse)
    with torch.no_grad():
        assert rel(layer(x), layer.forward_reference(x)) < FP32_TOL  # the stacked form (cuBLAS), not the route
    monkeypatch.undo()  # the route again (the fixture's switch), with a misspelt branch form
    monkeypatch.setattr(noble, "TRAIN_KERNEL", "always")
    monkeypatch.setattr(nt, "BRANCH", "fusd")
    with pytest.raises(ValueError, match=r"BRANCH='fusd' must be one of \('fused', 'separate'\)"):
        layer(x)


def test_shared_memory_fit_takes_the_element_size():
    """The bf16 tiles in float32 (TF32 training without autocast) would need 294,912 B: stages, then BLOCK_K, give."""
    from leanformer.ops import two_segment_matmul as ts

    assert ts.fit_shared_memory((128, 256, 64, 8, 8, 3, False), 2) == (128, 256, 64, 8, 8, 3, False)
    fitted = ts.fit_shared_memory((128, 256, 64, 8, 8, 3, False), 4)
    assert fitted == (128, 256, 64, 8, 8, 2, False) and (128 + 256) * 64 * 2 * 4 <= ts.SHARED_MEMORY
    assert ts.fit_shared_memory((256, 128, 128, 8, 8, 4, True), 4) == (256, 128, 64, 8, 8, 2, True)


def test_route_in_bf16_matches_float64_of_its_rounded_operands(route):
    """bf16 weights and input (no autocast): the route against float64 computed from the same bf16 values, so
    only the kernels' own rounding remains (z, s, dz and the outputs in bf16)."""
    ref, layer = _layers(d_in=64, d_out=64, r=32)
    layer = layer.to(torch.bfloat16)
    with torch.no_grad():
        for (_, p_ref), (_, p) in zip(ref.named_parameters(), layer.named_parameters()):
            p_ref.copy_(p.double())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 64, dtype=F64, generator=gen).bfloat16()
    g = torch.randn(40, 64, dtype=F64, generator=gen)
    y_ref, g_ref = _grads(ref, x.double(), g, reference=True)
    y, grads = _grads(layer, x.to(DEV), g.to(DEV))
    assert _took_route(y) and y.dtype == torch.bfloat16
    assert rel(y, y_ref) < 1e-2
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < 3e-2, name


def test_route_under_bf16_autocast_matches_the_stacked_form(monkeypatch):
    """Both forms cast to bf16 as F.linear does; they agree within bf16 rounding, and parameter gradients
    come back float32."""
    _, layer = _layers()
    x = torch.randn(2, 9, 48, device=DEV)
    g = torch.randn(2, 9, 40, device=DEV, dtype=F64)
    out = {}
    for switch in ("always", "never"):
        monkeypatch.setattr(noble, "TRAIN_KERNEL", switch)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            out[switch] = _grads(layer, x, g)
    (y, grads), (y_ref, g_ref) = out["always"], out["never"]
    assert _took_route(y) and not _took_route(y_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel(y, y_ref) < 2e-2
    for name in g_ref:
        assert grads[name].dtype == g_ref[name].dtype, name
        assert rel(grads[name], g_ref[name]) < 5e-2, name


def test_route_compiles_to_the_eager_result(route):
    _, layer = _layers()
    x = torch.randn(4, 48, device=DEV)
    g = torch.randn(4, 40, device=DEV, dtype=F64)
    y, grads = _grads(layer, x, g)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y_c, grads_c = _grads(compiled, x, g)
    assert rel(y_c, y) < 1e-6
    assert [n.removeprefix("_orig_mod.") for n in grads_c] == list(grads)
    for (name, a), b in zip(grads.items(), grads_c.values()):
        assert rel(b, a) < 1e-6, name


def test_route_keeps_only_rank_wide_tensors_beside_x(route):
    """The backward keeps x, z and σ(z) ((N, r) each) and the weights; never a (tokens × d_out) tensor (the stacked
    form's memory lesson, docs/benchmarks.md "NOBLE's memory")."""
    _, layer = _layers(d_in=48, d_out=40, r=16)
    x = torch.randn(64, 48, device=DEV, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    activations = [s for s in shapes if s and s[0] == 64]
    assert sorted(activations) == [(64, 16), (64, 16), (64, 48)]


@pytest.mark.parametrize("kwargs,reason", [
    (dict(fusion="gate"), "plain sum"),
    (dict(dropout=0.1), "plain sum"),
    (dict(activation="silu"), "CosNet"),
    (dict(rank=48), "power of two"),
])
def test_refused_layers_take_their_own_form(route, kwargs, reason):
    layer = NobleLinear(32, 24, **kwargs).to(DEV).eval()
    x = torch.randn(5, 32, device=DEV)
    assert reason in nt.noble_train_reason(layer, x)
    with pytest.raises(ValueError, match=reason):
        nt.noble_train_linear(layer, x)
    y = layer(x)
    assert not _took_route(y)
    assert rel(y, layer.forward_reference(x)) < 1e-5


def test_route_is_off_by_default_and_on_meta():
    layer = NobleLinear(32, 24)
    x = torch.randn(5, 32, requires_grad=True)
    assert noble.TRAIN_KERNEL == "cuda" and not _took_route(layer(x))  # on for CUDA tensors only
    meta = NobleLinear(32, 24, device="meta")
    assert "CUDA" in nt.noble_train_reason(meta, torch.empty(5, 32, device="meta"))


def test_a_noble_model_trains_alike_through_the_route(monkeypatch):
    """A tiny NOBLE language model: the route's loss and gradients equal the stacked form's (float32, every one of
    its NOBLE linears on the route)."""
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(arm_config(base_config(SIZES["tiny"], 32), "noble_fused")).to(DEV)
    tokens = torch.randint(0, SIZES["tiny"].vocab_size, (2, 33), device=DEV)
    out = {}
    for switch in ("never", "always"):
        monkeypatch.setattr(noble, "TRAIN_KERNEL", switch)
        model.zero_grad()
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])[1]
        loss.backward()
        out[switch] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_ref, g_ref), (loss, grads) = out["never"], out["always"]
    assert sum(isinstance(m, NobleLinear) for m in model.modules()) >= 4
    assert rel(loss, loss_ref) < 1e-6
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < 1e-4, name


def test_tile_table_file_round_trip_and_bad_entries(tmp_path):
    """The tile file benchmarks/noble_train_gpu.py writes is the table train_profile.py reads back; an entry that
    is not "M,N,K1,K2,layout": [7 settings] (an older 4-number key) is named."""
    from leanformer.ops import two_segment_matmul as ts

    table = {(16384, 768, 768, 32, "k"): (128, 256, 64, 8, 8, 4, False),
             (16384, 768, 3072, 32, "n"): (128, 256, 64, 8, 8, 3, True),
             (16384, 768, 3072, 32, "n+tma"): (256, 128, 64, 8, 8, 3, False)}
    path = tmp_path / "two_segment_configs.json"
    path.write_text(ts.configs_json(table))
    assert ts.load_configs(path) == table
    path.write_text('{"16384,768,768,32": [128, 256, 64, 8, 8, 4, false]}')
    with pytest.raises(ValueError, match=r"'16384,768,768,32'.*is not 'M,N,K1,K2,layout\[\+tma\]': \[7 tile"):
        ts.load_configs(path)
    path.write_text('{"16384,768,768,32,tma": [128, 256, 64, 8, 8, 4, false]}')
    with pytest.raises(ValueError, match="'16384,768,768,32,tma'"):
        ts.load_configs(path)
