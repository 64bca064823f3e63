"""The few-row product kernel (:mod:`leanformer.ops.skinny_linear`) against float64, its refusals and its
route, and the decoding copies whose plain linears go through it (:class:`leanformer.layers.linear.DecodeLinear`).

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")

from leanformer import TransformerConfig, TransformerLM  # noqa: E402
from decoding_routes import assert_same_decoding, decode_each_route  # noqa: E402
from leanformer.decoding import decoding_copy  # noqa: E402
from leanformer.layers.linear import DecodeLinear  # noqa: E402
from leanformer.ops import skinny_linear as sl  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def _inputs(lead, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.5 * torch.randn(N, generator=g) if bias else None
    return (t.to(DEV, dtype) if t is not None else None for t in (x, w, b))


@pytest.mark.parametrize("lead,K,N", [((8,), 256, 96), ((2, 1), 200, 40), ((32,), 64, 130), ((1, 1, 1), 512, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_product_is_the_float64_product_rounded_once(lead, K, N, dtype):
    """bf16/fp16 x, W, b: float32 accumulation and one rounding, so (but for a sum-order tie) every element is
    the float64 product rounded to the dtype; leading axes kept; K not a multiple of the block (200), N not
    a multiple of BLOCK_N (40, 130)."""
    x, w, b = _inputs(lead, K, N, dtype)
    y = sl.skinny_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert float((y == ref.to(dtype)).float().mean()) >= 0.995
    assert float(((y.double() - ref).abs() / ref.abs().clamp_min(1e-2)).max()) <= 2 ** -7


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
def test_activation_epilogue_equals_linear_then_the_eager_activation(activation, dtype, monkeypatch):
    """The activation on the rounded product, rounded again: bf16 results equal F.linear's then the eager
    activation's wherever F.linear's product is the correctly rounded one (so ≥ 99%), within an ulp elsewhere;
    ``linear`` with ROUTE "never" is F.linear then the activation."""
    x, w, b = _inputs((6,), 256, 80, dtype, seed=3)
    eager = {"gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "relu": F.relu}[activation]
    y = sl.skinny_linear(x, w, b, activation=activation)
    exact = F.linear(x.double(), w.double(), b.double()).to(dtype)  # the product rounded once, as the kernel's
    ref = eager(exact)
    if dtype == torch.bfloat16:
        assert float((y == ref).float().mean()) >= 0.99
        assert float(((y.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-2)).max()) <= 2 ** -7
    else:
        assert float((y.double() - ref.double()).abs().max() / ref.double().abs().max()) <= 1e-6
    monkeypatch.setattr(sl, "ROUTE", "never")
    assert torch.equal(sl.linear(x, w, b, activation=activation), eager(F.linear(x, w, b)))
    with pytest.raises(ValueError, match="activation 'silu' is not one of the kernel's"):
        sl.linear(x, w, b, activation="silu")


@pytest.mark.parametrize("bias", [True, False])
def test_float32_product_equals_float64(bias):
    x, w, b = _inputs((5,), 300, 70, torch.float32, bias=bias, seed=1)
    y = sl.skinny_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 1e-6


@pytest.mark.parametrize("block_n,block_k", [(16, 128), (64, 512), (32, 64)])
def test_block_switches_give_the_same_product(block_n, block_k, monkeypatch):
    x, w, b = _inputs((3,), 512, 100, torch.float32, seed=2)
    ref = sl.skinny_linear(x, w, b)
    monkeypatch.setattr(sl, "BLOCK_N", block_n)
    monkeypatch.setattr(sl, "BLOCK_K", block_k)
    assert sl.launch_config(3, 100, 512, torch.float32)["BLOCK_N"] == block_n
    assert torch.allclose(sl.skinny_linear(x, w, b), ref, rtol=1e-6, atol=1e-6)


def test_heuristic_narrows_blocks_until_the_output_has_enough_programs():
    assert sl.launch_config(8, 768, 768, torch.bfloat16)["BLOCK_N"] == 16  # 48 programs at most
    assert sl.launch_config(8, 3072, 768, torch.bfloat16)["BLOCK_N"] == 32  # 96 programs
    assert sl.launch_config(8, 50304, 768, torch.bfloat16)["BLOCK_N"] == 64
    assert sl.launch_config(1, 8, 40, torch.bfloat16)["BLOCK_K"] == 64  # K rounded up to a power of two
    assert sl.launch_config(20, 8, 4096, torch.float32)["BLOCK_M"] == 32
    assert sl.launch_config(8, 768, 3072, torch.bfloat16)["num_stages"] == 4


def test_narrow_tiles_for_a_few_rows_in_two_byte_dtypes(monkeypatch):
    """TILES "narrow": BLOCK_N 16 and 2 warps for ≤ 16 bf16 rows (the H100 sweep's best); float32, 32 rows and
    the NOBLE kernel's extra W_down rows keep the wide rule."""
    monkeypatch.setattr(sl, "TILES", "narrow")
    for n in (768, 3072, 50304):
        cfg = sl.launch_config(8, n, 768, torch.bfloat16)
        assert (cfg["BLOCK_N"], cfg["num_warps"], cfg["BLOCK_K"]) == (16, 2, 256)
    assert sl.launch_config(32, 50304, 768, torch.bfloat16)["BLOCK_N"] == 64
    assert sl.launch_config(8, 50304, 768, torch.float32)["num_warps"] == 4
    assert sl.launch_config(8, 50304, 768, torch.bfloat16, extra_rows=32)["BLOCK_N"] == 64


def test_pipeline_stages_fit_shared_memory(monkeypatch):
    """Wide float32 tiles get fewer stages (an H100 refused 320 KB of shared memory for 64 × 512 × 4 stages)."""
    monkeypatch.setattr(sl, "BLOCK_N", 64)
    monkeypatch.setattr(sl, "BLOCK_K", 512)
    cfg = sl.launch_config(3, 100, 512, torch.float32)
    per_stage = (cfg["BLOCK_M"] + 64) * 512 * 4
    assert cfg["num_stages"] == 1 and cfg["num_stages"] * per_stage <= sl.SMEM_BYTES


def test_refusals_name_the_problem():
    x, w, b = _inputs((4,), 64, 32, torch.float32)
    cases = [
        ((x, w[:, :32], b), "do not match"),
        ((x, w.double(), b), "weight must be torch.float32"),
        ((x, w, b[:5]), r"bias must be \(32,\)"),
        ((torch.zeros(33, 64, device=DEV), w, b), "33 rows: the kernel takes 1 to 32"),
        ((x, w.t().contiguous().t(), b), "unit stride along K"),
        ((x.double(), w.double(), b.double()), "dtype torch.float64 is not supported"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            sl.skinny_linear(*args)
    with torch.enable_grad(), pytest.raises(ValueError, match="no backward"):
        sl.skinny_linear(x, w.clone().requires_grad_(), b)


def test_route_switch(monkeypatch):
    """``linear``: F.linear with ROUTE "never" and for CPU tensors with "cuda"; the kernel with "always" (and on
    CUDA with "cuda"); F.linear for inputs the kernel refuses, whatever the route."""
    calls = [0]
    real = sl._skinny_op

    def counted(*a):
        calls[0] += 1
        return real(*a)
    monkeypatch.setattr(sl, "_skinny_op", counted)
    x, w, b = _inputs((2,), 64, 32, torch.float32)
    ref = F.linear(x, w, b)
    for route, expected in (("never", 0), ("cuda", int(DEV.type == "cuda")), ("always", 1)):
        monkeypatch.setattr(sl, "ROUTE", route)
        calls[0] = 0
        assert torch.allclose(sl.linear(x, w, b), ref, rtol=1e-5, atol=1e-6)
        assert calls[0] == expected, route
    calls[0] = 0
    sl.linear(torch.zeros(40, 64, device=DEV), w, b)  # 40 rows: refused, so F.linear
    assert calls[0] == 0


def _tiny(**kw):
    cfg = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(**cfg)).to(DEV).eval()


@pytest.mark.parametrize("kw", [{}, {"attention": "dijiang"}], ids=["softmax", "dijiang"])
def test_decoding_copy_routes_its_plain_linears_and_decodes_the_same(kw, monkeypatch):
    """The copy's plain linears are DecodeLinears (state_dict keys unchanged, the fused input product still
    fused); a static decoding through the kernel (ROUTE "always") gives the tokens of F.linear's and logits
    within float32 rounding."""
    model = _tiny(**kw)
    copy = decoding_copy(model, torch.float32)
    assert list(copy.state_dict()) == list(model.state_dict())
    linears = [m for m in copy.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is DecodeLinear for m in linears)
    assert any(hasattr(m, "fused_input_weight") for m in copy.modules())
    out = decode_each_route(copy, sl, "_skinny_op", monkeypatch, DEV)
    never, always = out["never"][2], out["always"][2]
    # never: none; always: every product of the prefill and the 3 steps (input, o, MLP in/out per layer, head)
    assert len(never) == 0 and len(always) == 4 * (4 * 2 + 1)
    assert sum(len(a) > 3 and a[3] != 0 for a in always) == 4 * 2  # the MLP's GELU in the epilogue
    assert_same_decoding(out)


def test_programmatic_dependent_launch_gives_the_same_product(monkeypatch):
    """With PDL on, the product is unchanged (on a Hopper GPU it is then launched as a programmatic dependent
    launch; elsewhere pdl_launch says no and the launch is the usual one)."""
    x, w, b = _inputs((6,), 256, 80, torch.float32, seed=4)
    ref = sl.skinny_linear(x, w, b)
    monkeypatch.setattr(sl, "PDL", True)
    expected = DEV.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert sl.pdl_launch(x.device) is expected
    assert sl.pdl_launch(torch.device("cpu")) is False and sl.pdl_launch(x.device, switch=False) is False
    assert torch.equal(sl.skinny_linear(x, w, b), ref)


@pytest.mark.parametrize("columns", [8, 4, 1])
@pytest.mark.parametrize("lead,K,N", [((8,), 200, 40), ((3,), 256, 24), ((1, 1), 64, 9)])
def test_multiply_add_blocks_give_the_product(columns, lead, K, N, monkeypatch):
    """FMA_COLUMNS: narrow column blocks by float32 multiply-adds (no tl.dot). float32 within 1e-6 of float64;
    bf16 the float64 product rounded once on ≥ 99.5% of elements; with an activation as F.linear then it."""
    monkeypatch.setattr(sl, "FMA_COLUMNS", columns)
    cfg = sl.launch_config(lead[0], N, K, torch.float32, fma=True)
    assert cfg["FMA"] and cfg["BLOCK_N"] == columns and cfg["BLOCK_M"] >= lead[0] and cfg["BLOCK_K"] <= 128
    x, w, b = _inputs(lead, K, N, torch.float32, seed=K)
    ref = F.linear(x.double(), w.double(), b.double())
    assert float((sl.skinny_linear(x, w, b).double() - ref).abs().max() / ref.abs().max()) <= 1e-6
    x, w, b = _inputs(lead, K, N, torch.bfloat16, seed=K)
    y = sl.skinny_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert float((y == ref.to(torch.bfloat16)).float().mean()) >= 0.995
    monkeypatch.setattr(sl, "ROUTE", "always")
    torch.testing.assert_close(sl.linear(x, w, b, activation="gelu"),
                               F.gelu(ref.to(torch.bfloat16).float()).to(torch.bfloat16), rtol=2 ** -7, atol=1e-2)


def test_multiply_add_blocks_only_for_narrow_few_row_products(monkeypatch):
    monkeypatch.setattr(sl, "FMA_COLUMNS", 8)
    bf = torch.bfloat16
    assert sl.launch_config(8, 768, 3072, bf, fma=True)["FMA"]  # 48 blocks of 16 columns
    assert not sl.launch_config(8, 3072, 768, bf, fma=True)["FMA"]  # 192 blocks: enough programs
    assert not sl.launch_config(16, 768, 768, bf, fma=True)["FMA"]  # more than 8 rows
    assert "FMA" not in sl.launch_config(8, 768, 768, bf)  # a caller that does not pass it (NOBLE's kernel)
    monkeypatch.setattr(sl, "FMA_COLUMNS", None)
    assert not sl.launch_config(8, 768, 3072, bf, fma=True)["FMA"]


def test_an_unknown_tiles_rule_is_named(monkeypatch):
    monkeypatch.setattr(sl, "TILES", "narow")
    with pytest.raises(ValueError, match="TILES='narow' must be 'wide' or 'narrow'"):
        sl.launch_config(8, 768, 768, torch.bfloat16)


def test_an_unusable_column_count_is_named(monkeypatch):
    monkeypatch.setattr(sl, "FMA_COLUMNS", 3)
    with pytest.raises(ValueError, match="FMA_COLUMNS=3 must be None, 1, 2, 4 or 8"):
        sl.launch_config(8, 768, 768, torch.bfloat16, fma=True)


@pytest.mark.parametrize("lead,K,N,parts", [((8,), 1024, 48, 4), ((3, 1), 600, 40, 5), ((32,), 512, 16, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_k_partials_sum_to_the_product_rounded_once(lead, K, N, parts, dtype):
    """split_linear: the partial products over parts of K (ragged last part at K 600: 3 tiles of 256, of which
    5 parts asked give 3; 32 rows), summed in float32 with the bias and rounded once, equal the float64
    product rounded to the dtype on ≥ 99% of elements, the rest within one unit in the last place; float32
    within 1e-5 of float64, x a strided slice."""
    x, w, b = _inputs(lead, K, N, dtype, seed=7)
    ref = F.linear(x.double(), w.double(), b.double())
    y = sl.split_linear(x, w, b, parts)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert float((y == ref.to(dtype)).float().mean()) >= 0.99  # the rest: ties the float32 sum order decides
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    assert float(((y.double() - ref).abs() / ref.abs().clamp_min(1e-2)).max()) <= ulp
    wide, w, _ = _inputs(lead, K + 37, N, torch.float32, seed=7)
    x, w = wide[..., 5:5 + K], w[:, :K].contiguous()  # x's rows K + 37 apart
    y = sl.split_linear(x, w, None, parts)
    assert torch.allclose(y.double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)


def test_split_k_parts_are_whole_tiles_none_empty():
    """_parts: 12 tiles of 256 asked in 5 parts run as 4 of 3 tiles; 3 tiles asked in 5 as 3; 1 as 1."""
    bf = torch.bfloat16
    assert sl._parts(8, 768, 3072, bf, 5) == 4 and sl._parts(8, 40, 600, bf, 5) == 3
    assert sl._parts(8, 768, 3072, bf, 1) == 1 and sl._parts(8, 768, 3072, bf, 64) == 12


def test_split_k_rule_and_route(monkeypatch):
    """SPLIT_K "auto" (the default; None: off): only a long K with too few column blocks is split (GPT-2's
    3072 → 768 into 4 parts, not 768 → 768 nor the head); linear() splits where the rule says so (eagerly only
    with SPLIT_K_EAGER) and gives the product; a bad switch value is named."""
    assert sl.SPLIT_K == "auto"  # the default since its H100 timing (2026-12-07)
    assert sl.split_count(8, 768, 3072, torch.bfloat16) == 4
    assert sl.split_count(8, 768, 768, torch.bfloat16) == 1
    assert sl.split_count(8, 50304, 768, torch.bfloat16) == 1
    monkeypatch.setattr(sl, "SPLIT_K", None)
    assert sl.split_count(8, 768, 3072, torch.bfloat16) == 1  # off
    monkeypatch.setattr(sl, "SPLIT_K", "auto")
    monkeypatch.setattr(sl, "ROUTE", "always")
    calls = []
    real = sl._partials_op
    monkeypatch.setattr(sl, "_partials_op", lambda *a: calls.append(a[2]) or real(*a))
    x, w, b = _inputs((4,), 1024, 16, torch.float32, seed=3)
    monkeypatch.setattr(sl, "ITERS_PER_SPLIT", 2)  # float32: 128-wide tiles, 8 of them → 4 parts
    sl.linear(x, w, b)
    assert calls == []  # eager: no split unless SPLIT_K_EAGER
    monkeypatch.setattr(sl, "SPLIT_K_EAGER", True)
    assert torch.allclose(sl.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5) and calls == [4]
    assert torch.equal(sl.linear(x, w, b, activation="relu"), sl.skinny_linear(x, w, b, "relu"))  # no split
    monkeypatch.setattr(sl, "SPLIT_K", 5)  # an int: at most that many parts, only where blocks are too few
    assert sl.split_count(8, 768, 3072, torch.bfloat16) == 4 and sl.split_count(8, 50304, 768, torch.bfloat16) == 1
    for bad in (0, True, "always"):
        monkeypatch.setattr(sl, "SPLIT_K", bad)
        with pytest.raises(ValueError, match=f"SPLIT_K={bad!r} must be None, 'auto' or a positive int"):
            sl.split_count(8, 768, 3072, torch.bfloat16)
    with pytest.raises(ValueError, match="splits must be a positive int"):
        sl.split_linear(x, w, b, 0)


def test_split_k_under_compile_gives_the_product(monkeypatch):
    """Traced by torch.compile (fullgraph; aot_eager, and Inductor, which fuses the sum), linear() takes the
    split path (is_compiling) and the compiled function gives the product."""
    monkeypatch.setattr(sl, "SPLIT_K", "auto")
    monkeypatch.setattr(sl, "ITERS_PER_SPLIT", 2)
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs((4,), 1024, 16, torch.float32, seed=5)
    calls = []
    real = sl.split_linear
    monkeypatch.setattr(sl, "split_linear", lambda *a: calls.append(a[3]) or real(*a))
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        calls.clear()
        y = torch.compile(lambda x: sl.linear(x, w, b) + 1.0, backend=backend, fullgraph=True)(x)
        assert calls == [4] and torch.allclose(y, F.linear(x, w, b) + 1.0, rtol=1e-5, atol=1e-5), backend
