"""The fused Triton kernel of decayed linear attention (:mod:`leanformer.ops.fused_decay_attention`, form
``dla.fused``) against the ``parallel`` form in float64: forward, gradients to q, k, v (and a learnable
decay), log-norm, ragged lengths, strided inputs, an initial state, bf16, the refusals, and a DiJiang layer.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
leanformer is imported); with CUDA the same tests run the compiled kernels. The interpreter has no float64
``tl.dot``, and the kernel refuses float64: the kernel gets the float64 inputs rounded to float32, so the
tolerance is float32's (measured ≤ 1e-6 relative; asserted 2e-5, on max |error| / max |reference|), except
a learnable decay's gradient (1e-3, see DECAY_GRAD_TOL).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")

from leanformer.config import TransformerConfig  # noqa: E402
from leanformer.layers.dijiang import DiJiangAttention, running_log_norm  # noqa: E402
from leanformer.layers import dijiang as dijiang_layer  # noqa: E402
from leanformer.ops import decayed_linear_attention as dla  # noqa: E402
from leanformer.ops import fused_decay_attention as fda  # noqa: E402

F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 2e-5
# A learnable decay's gradient reaches the kernel as a first moment of q·dq − k·dk (constant_decay's
# route), terms that cancel: measured 2e-7 to 2e-4 relative in float32 over random draws (parallel in
# float32: ≤ 1e-6).
DECAY_GRAD_TOL = 1e-3
BF16_TOL = 3e-2  # bf16 inputs (8-bit mantissa) and bf16 P in the second product; outputs in bf16

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _inputs(B=2, H=2, T=17, m=16, d=16, seed=0, log_norm=True, layout="bthd"):
    """Feature-like q, k ≥ 0, values, the official decay schedule's two ends, and DiJiang's running
    log-normaliser of random key maxima; float64. ``bthd``: (B, T, H, ·) memory viewed as (B, H, T, ·),
    as the feature map and projections make them."""
    g = torch.Generator().manual_seed(seed)

    def make(last, fn):
        x = fn(B, T, H, last, dtype=F64, generator=g)
        return x.transpose(1, 2) if layout == "bthd" else x.transpose(1, 2).contiguous()
    q, k, v = make(m, torch.rand), make(m, torch.rand), make(d, torch.randn)
    lg = torch.log1p(-torch.tensor([1 / 32, 1 / 512] * (H // 2) + [1 / 64] * (H % 2), dtype=F64))
    n = running_log_norm(3 * torch.randn(B, H, T, dtype=F64, generator=g), lg) if log_norm else None
    return [t.to(DEV) for t in (q, k, v)], lg.to(DEV), (n.to(DEV) if n is not None else None)


def _f32(t):
    return t.float() if t is not None else None


def _compare(T, log_norm=True, learnable=False, initial=False, layout="bthd", m=16, d=16, H=2):
    torch.manual_seed(1)
    (q, k, v), lg, n = _inputs(T=T, log_norm=log_norm, layout=layout, m=m, d=d, H=H)
    S0 = torch.randn(2, H, m, d, dtype=F64, device=DEV) if initial else None
    n0 = torch.randn(2, H, dtype=F64, device=DEV) if initial and log_norm else None
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    lg_ref = lg.clone().requires_grad_(learnable)
    S0_ref = S0.clone().requires_grad_() if initial else None
    o_ref, S_ref = dla.parallel(*ref_leaves, lg_ref, S0_ref, n, n0)
    g = torch.randn_like(o_ref)
    gS = torch.randn_like(S_ref)
    torch.autograd.backward((o_ref, S_ref), (g, gS))

    leaves = [t.float().requires_grad_() for t in (q, k, v)]  # .float() keeps the strides
    lg32 = lg.float().requires_grad_(learnable)
    S0_32 = S0.float().requires_grad_() if initial else None
    o, S = dla.fused(*leaves, lg32, S0_32, _f32(n), _f32(n0))
    torch.autograd.backward((o, S), (g.float(), gS.float()))
    assert o.dtype == torch.float32 and o.shape == o_ref.shape
    errs = {"o": rel(o, o_ref), "S": rel(S, S_ref)}
    errs.update({f"d{name}": rel(a.grad, b.grad) for name, a, b in zip("qkv", leaves, ref_leaves)})
    if initial:
        errs["dS0"] = rel(S0_32.grad, S0_ref.grad)
    assert max(errs.values()) <= FP32_TOL, errs
    if learnable:
        assert rel(lg32.grad, lg_ref.grad) <= DECAY_GRAD_TOL


@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("log_norm", [False, True], ids=["plain", "log_norm"])
def test_forward_and_gradients_match_parallel_float64(T, log_norm):
    _compare(T, log_norm=log_norm)


def test_learnable_decay_gradient():
    _compare(33, learnable=True)


def test_initial_state_and_its_log_norm():
    _compare(20, initial=True, learnable=True)


def test_contiguous_inputs_and_wider_heads():
    """(B, H, T, ·) contiguous memory (the other layout), m ≠ d, an odd head count."""
    _compare(40, layout="bhtd", m=32, d=16, H=3)


@pytest.mark.parametrize("T", [64, 128], ids=["one_block", "two_blocks"])
def test_lengths_that_fill_whole_blocks(T):
    """T a multiple of the 64-token block: no ragged block, the diagonal tile is the last one."""
    _compare(T)


@pytest.mark.parametrize("m,d", [(128, 32), (32, 128)], ids=["m128", "d128"])
def test_widest_dims_float32_use_the_small_block(m, d):
    """m or d = 128 in float32 runs 32-token blocks (shared memory); d > m and m > d."""
    assert fda._block(100, torch.float32, m, d) == 32
    _compare(40, m=m, d=d)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_TOL), (torch.float16, 5e-3)],
                         ids=["bf16", "fp16"])
def test_half_precision_within_tolerance(dtype, tol):
    """16-bit inputs (bf16: 8-bit mantissa; fp16: 11-bit) and P in that dtype for the second product;
    the output gradient is a non-contiguous view (the model's comes from a transpose)."""
    torch.manual_seed(2)
    (q, k, v), lg, n = _inputs(T=70)
    ref = dla.parallel(q, k, v, lg, log_norm=n)[0]
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o = dla.fused(*leaves, lg.float(), log_norm=n.float(), output_final_state=False)[0]
    assert o.dtype == dtype
    assert rel(o, ref) <= tol
    g = torch.randn(ref.shape[0], ref.shape[2], ref.shape[1], ref.shape[3], dtype=F64, device=DEV).transpose(1, 2)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dla.parallel(*ref_leaves, lg, log_norm=n)[0].backward(g)
    o.backward(g.to(dtype))
    for a, b in zip(leaves, ref_leaves):
        assert rel(a.grad, b.grad) <= tol


def test_inference_mode_gives_the_same_output():
    (q, k, v), lg, n = _inputs(T=30)
    args = [t.float() for t in (q, k, v)]
    with torch.inference_mode():
        o = dla.fused(*args, lg.float(), log_norm=n.float(), output_final_state=False)[0]
    torch.testing.assert_close(o, dla.fused(*args, lg.float(), log_norm=n.float())[0], rtol=0, atol=0)


def test_auto_keeps_the_cpu_choice_with_the_real_support_check():
    """On the CPU ``auto`` never picks the fused kernel, even where the interpreter could run it."""
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, attention="dijiang").validate()
    att = DiJiangAttention(cfg, 0)
    q = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    assert [att.form(T, cpu, False, q, q) for T in (100, 4096)] == ["parallel", "chunk"]
    assert att.form(100, cpu, True, q, q) == "chunk"


def test_output_final_state_false_returns_none_and_same_output():
    (q, k, v), lg, n = _inputs(T=9)
    args = [t.float() for t in (q, k, v)]
    o1, S1 = dla.fused(*args, lg.float(), log_norm=n.float())
    o2, S2 = dla.fused(*args, lg.float(), log_norm=n.float(), output_final_state=False)
    assert S1 is not None and S2 is None
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)


def test_unsupported_inputs_have_a_reason():
    x = torch.zeros(1, 1, 4, 16, device=DEV)
    assert fda.fused_supported(x, x) is None
    assert "power of two" in fda.fused_supported(torch.zeros(1, 1, 4, 12, device=DEV), x)
    assert "power of two" in fda.fused_supported(x, torch.zeros(1, 1, 4, 8, device=DEV))
    assert "power of two" in fda.fused_supported(x, torch.zeros(1, 1, 4, 256, device=DEV))
    assert "dtype" in fda.fused_supported(x.double(), x.double())
    assert "one dtype" in fda.fused_supported(x, x.half())
    assert "CUDA" in fda.fused_reason(torch.device("meta"), torch.float32, 16, 16)
    with pytest.raises(ValueError, match="power of two.*parallel"):
        dla.fused(*(torch.zeros(1, 1, 4, 12, device=DEV),) * 3, torch.zeros(1, device=DEV))


def test_gpus_that_cannot_run_the_kernel_are_named(monkeypatch):
    """Pre-Ampere GPUs (no bf16 tensor-core dot) and, for m or d = 128, GPUs with < 160 KiB of shared
    memory per block are refused with a reason, so ``auto`` falls back instead of failing to compile."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fda, "_device_limits", lambda index: (7, 5, 64 * 1024))
    assert "Ampere" in fda.fused_reason(cuda, torch.bfloat16, 64, 64)
    monkeypatch.setattr(fda, "_device_limits", lambda index: (8, 6, 99 * 1024))
    assert fda.fused_reason(cuda, torch.bfloat16, 64, 64) is None or "triton" in fda.fused_reason(
        cuda, torch.bfloat16, 64, 64)
    assert "shared memory" in fda.fused_reason(cuda, torch.bfloat16, 128, 64)
    monkeypatch.setattr(fda, "_device_limits", lambda index: (9, 0, 227 * 1024))
    assert fda.fused_reason(cuda, torch.bfloat16, 128, 128) is None or "triton" in fda.fused_reason(
        cuda, torch.bfloat16, 128, 128)


def test_log_norm_requiring_grad_is_refused():
    (q, k, v), lg, n = _inputs(T=5)
    with pytest.raises(ValueError, match="log_norm.*'parallel' form"):
        dla.fused(q.float(), k.float(), v.float(), lg.float(), log_norm=n.float().requires_grad_())


def test_torch_compile_fullgraph():
    """No graph break: compile traces (CUDA: triton_op) or calls (interpreter: custom_op) the op."""
    (q, k, v), lg, n = _inputs(T=20)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return dla.fused(q, k, v, lg.float(), log_norm=n.float(), output_final_state=False)[0]

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager" if DEV.type == "cpu" else "inductor")(*leaves)
    out.sum().backward()
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    expect = f(*ref)
    expect.sum().backward()
    torch.testing.assert_close(out, expect)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


def _layers_in_modes(cfg: TransformerConfig, modes: tuple[str, ...]) -> dict[str, DiJiangAttention]:
    """One DiJiang layer of ``cfg`` (built under the current seed) per ``dijiang.mode``, all with its weights;
    each on a copy of ``cfg`` (a layer keeps ``cfg.dijiang`` itself, so one shared config would give every
    layer the last mode)."""
    base = DiJiangAttention(cfg, 0).to(DEV)
    layers = {}
    for mode in modes:
        att = DiJiangAttention(copy.deepcopy(cfg), 0).to(DEV)
        att.load_state_dict(base.state_dict())
        att.cfg.mode = mode
        layers[mode] = att
    return layers


@pytest.mark.parametrize("feature_map", ["paper", "official"])
def test_dijiang_layer_fused_equals_parallel(feature_map):
    """One DiJiang layer (head dim 16, learnable decay) in mode fused and mode parallel: outputs and every
    parameter's and the input's gradients."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, attention="dijiang").validate()
    cfg.dijiang.learnable_decay = True
    cfg.dijiang.feature_map = feature_map
    layers = _layers_in_modes(cfg, ("parallel", "fused"))
    x = torch.randn(2, 23, 32, device=DEV)
    results = {}
    for mode, att in layers.items():
        xi = x.clone().requires_grad_()
        with warnings.catch_warnings():  # mode fused must not fall back to parallel here (other warnings,
            warnings.filterwarnings("error", message=".*cannot run these inputs")  # e.g. Inductor's, may come)
            out = att(xi)
        out.square().sum().backward()
        results[mode] = (out, xi.grad, {n: p.grad for n, p in att.named_parameters()})
    (o_p, gx_p, gp_p), (o_f, gx_f, gp_f) = results["parallel"], results["fused"]
    torch.testing.assert_close(o_f, o_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-4, atol=1e-5)
    assert gp_f.keys() == gp_p.keys()
    for name in gp_p:
        torch.testing.assert_close(gp_f[name], gp_p[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_picks_fused_on_cuda_only(monkeypatch):
    """auto: fused on CUDA up to fused_max_len (None: 4096) when the kernel takes the inputs, whatever
    parallel_max_len says; the CPU choice does not change."""
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, attention="dijiang").validate()
    att = DiJiangAttention(cfg, 0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    q = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(dla, "fused_supported", lambda q, v: None)
    monkeypatch.setattr(dijiang_layer, "GATED_FLA_TRAINING_FROM", None)  # the choices without the gated route
    assert att.form(4096, cuda, False, q, q) == "fused"
    q32 = q.float()  # float32 features: the kernel's IEEE products were not timed; auto keeps parallel
    assert att.form(1024, cuda, False, q32, q32) == "parallel"
    assert att.form(100, cpu, False, q, q) == "parallel"
    assert att.form(4096, cpu, False, q, q) == "chunk"
    assert att.form(1, cuda, True, q, q) == "recurrent"
    monkeypatch.setattr(dijiang_layer, "_fla_usable", lambda: False)
    assert att.form(4097, cuda, False, q, q) == "fused"  # beyond the limit without fla: still the kernel
    monkeypatch.setattr(dijiang_layer, "_fla_usable", lambda: True)
    monkeypatch.setattr(dijiang_layer, "GATED_FLA_TRAINING_FROM", 4096)  # a full pass from 4096 tokens
    assert att.form(4096, cuda, False, q, q) == "fla_gated"
    monkeypatch.setattr(dijiang_layer, "GATED_FLA_TRAINING_FROM", None)
    assert att.form(4097, cuda, False, q, q) == "fla_chunk"
    assert att.form(4096, cuda, True, q, q) == "fused"  # a prompt continuing a decoding state
    assert att.form(4097, cuda, True, q, q) == "chunk"
    assert att.form(100, cpu, True, q, q) == "chunk"
    att.cfg.parallel_max_len = 512  # the masked form's limit: not the kernel's
    assert att.form(4096, cuda, False, q, q) == "fused"
    att.cfg.fused_max_len = 512
    assert att.form(512, cuda, False, q, q) == "fused"
    assert att.form(513, cuda, False, q, q) == "fla_chunk"
    assert att.form(513, cuda, True, q, q) == "chunk"
    monkeypatch.setattr(dla, "fused_supported", lambda q, v: "no")
    assert att.form(512, cuda, False, q, q) == "parallel"
    att.cfg.mode = "fused"
    with pytest.warns(UserWarning, match="using 'parallel'"):
        assert att.form(10, cuda, False, q, q) == "parallel"
    with pytest.warns(UserWarning, match="using 'chunk'"):
        assert att.form(10, cuda, True, q, q) == "chunk"
    monkeypatch.setattr(dla, "fused_supported", lambda q, v: None)
    assert att.form(10, cuda, True, q, q) == "fused"
    assert att.form(1, cuda, True, q, q) == "recurrent"


def test_prompt_continuing_a_state_through_the_fused_form():
    """Decoding a prompt in two pieces and then one token, mode fused (the kernel for the pieces, their
    states from parallel's boundary code) against mode chunk, on a DiJiang layer with learnable decay."""
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, attention="dijiang").validate()
    cfg.dijiang.learnable_decay = True
    layers = _layers_in_modes(cfg, ("chunk", "fused"))
    x = torch.randn(2, 30, 32, device=DEV)
    outs = {}
    for mode, att in layers.items():
        state: dict = {}
        with torch.no_grad(), warnings.catch_warnings():  # mode fused must not fall back to chunk here
            warnings.filterwarnings("error", message=".*cannot run these inputs")
            pieces = [att(x[:, :17], state), att(x[:, 17:29], state), att(x[:, 29:], state)]
        outs[mode] = (torch.cat(pieces, dim=1), state["S"], state["n"])
    for got, want in zip(outs["fused"], outs["chunk"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- factored variant, switches
@pytest.fixture
def factored(monkeypatch):
    """FACTORED on, with the host check of its precondition (a non-decreasing n − i·logγ) before each launch."""
    monkeypatch.setattr(fda, "FACTORED", True)
    monkeypatch.setattr(fda, "CHECK_MONOTONE", True)


def test_switch_defaults_are_the_measured_kernel():
    assert (fda.FACTORED, fda.BLOCK_M, fda.BLOCK_N, fda.NUM_WARPS, fda.NUM_STAGES, fda.REVERSE_ROWS) == (
        True, 64, 64, 4, 3, True)
    assert fda.FACTORED_SCALE == "operand" and fda.INTERPRETER_FULL_LOOPS
    assert [fda._block(T, torch.bfloat16, 64, 64) for T in (1, 17, 64, 4096)] == [16, 32, 64, 64]
    assert fda._block(4096, torch.float32, 128, 64) == 32 and fda._block(4096, torch.float32, 64, 64, 32) == 32
    with pytest.raises(ValueError, match="power of two"):
        fda._block(100, torch.float32, 16, 16, 48)
    assert fda._launch_options(1) == {"num_warps": 4, "num_stages": 3}


def test_per_kernel_warps_and_stages(factored, monkeypatch):
    """NUM_WARPS / NUM_STAGES as one value per kernel (forward, dK/dV, dQ); a wrong length is refused."""
    monkeypatch.setattr(fda, "NUM_WARPS", (4, 8, 2))
    monkeypatch.setattr(fda, "NUM_STAGES", (None, 2, 3))
    assert [fda._launch_options(i) for i in range(3)] == [
        {"num_warps": 4}, {"num_warps": 8, "num_stages": 2}, {"num_warps": 2, "num_stages": 3}]
    _compare(40)
    monkeypatch.setattr(fda, "NUM_WARPS", (4, 8))
    with pytest.raises(ValueError, match="one per kernel"):
        fda._launch_options(0)


@pytest.mark.parametrize("factored_on", [False, True], ids=["exact", "factored"])
@pytest.mark.parametrize("T", [1, 17, 64, 100, 130])
@pytest.mark.parametrize("log_norm,blocks", [(False, (32, 64)), (True, (64, 32))], ids=["plain", "log_norm"])
def test_query_and_key_blocks_differ(monkeypatch, factored_on, T, log_norm, blocks):
    """BLOCK_M ≠ BLOCK_N (query blocks of 32 with key blocks of 64 and the converse), the per-element
    kernel and the factored one: the off-diagonal tiles must lie wholly below (after) the pivot."""
    monkeypatch.setattr(fda, "FACTORED", factored_on)
    monkeypatch.setattr(fda, "CHECK_MONOTONE", True)
    monkeypatch.setattr(fda, "BLOCK_M", blocks[0])
    monkeypatch.setattr(fda, "BLOCK_N", blocks[1])
    _compare(T, log_norm=log_norm)


@pytest.mark.parametrize("scale", fda.SCALES)
@pytest.mark.parametrize("blocks", [(64, 64), (16, 32)], ids=["64x64", "16x32"])
def test_factored_scales_and_blocks(factored, monkeypatch, scale, blocks):
    """Both ways of applying the key (query) factor; equal blocks and several off-diagonal tiles per row."""
    monkeypatch.setattr(fda, "FACTORED_SCALE", scale)
    monkeypatch.setattr(fda, "BLOCK_M", blocks[0])
    monkeypatch.setattr(fda, "BLOCK_N", blocks[1])
    _compare(130 if blocks == (64, 64) else 50)


def test_factored_learnable_decay_initial_state_and_reversed_rows(factored, monkeypatch):
    monkeypatch.setattr(fda, "REVERSE_ROWS", True)
    monkeypatch.setattr(fda, "BLOCK_M", 32)
    monkeypatch.setattr(fda, "BLOCK_N", 16)
    _compare(50, initial=True, learnable=True)


@pytest.mark.parametrize("scale", fda.SCALES)
def test_factored_bf16_within_tolerance(factored, monkeypatch, scale):
    """bf16: "operand" rounds the scaled k (v, q) rows to bf16 once more; still within BF16_TOL."""
    monkeypatch.setattr(fda, "FACTORED_SCALE", scale)
    monkeypatch.setattr(fda, "BLOCK_M", 32)
    monkeypatch.setattr(fda, "BLOCK_N", 32)
    test_half_precision_within_tolerance(torch.bfloat16, BF16_TOL)


@pytest.mark.parametrize("jump", [40.0, 120.0])
def test_factored_running_norm_with_big_jumps(factored, monkeypatch, jump):
    """Keys' log-maxima jumping by +40 nats (and +120: exp(−120) underflows float32) twice mid-sequence:
    DiJiang's running n jumps with them, the pivot factors span the jump; no inf/NaN, float64 match."""
    monkeypatch.setattr(fda, "BLOCK_M", 32)
    monkeypatch.setattr(fda, "BLOCK_N", 32)
    B, H, T, m = 2, 2, 90, 16
    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(B, H, T, m, dtype=F64, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, m, dtype=F64, generator=g)
    lg = torch.log1p(-torch.tensor([1 / 32, 1 / 512], dtype=F64))
    mk = 3 * torch.randn(B, H, T, dtype=F64, generator=g)
    mk[..., 37:] += jump
    mk[..., 71:] += jump
    n = running_log_norm(mk, lg)
    q, k, v, lg, n = (t.to(DEV) for t in (q, k, v, lg, n))
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = dla.parallel(*ref_leaves, lg, log_norm=n)[0]
    go = torch.randn_like(o_ref)
    o_ref.backward(go)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    o = dla.fused(*leaves, lg.float(), log_norm=n.float(), output_final_state=False)[0]
    o.backward(go.float())
    for got, want in [(o, o_ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]:
        assert torch.isfinite(got).all()
        assert rel(got, want) <= FP32_TOL


def test_factored_precondition_check():
    """CHECK_MONOTONE's host check: DiJiang's running maximum in float32 over a long sequence passes (its
    rounding is within the tolerance); an arbitrary n, or a positive logγ without n, is refused."""
    lg = torch.log1p(-torch.tensor([1 / 32, 1 / 512]))
    n = running_log_norm(5 * torch.randn(2, 2, 20000), lg)
    fda._check_monotone(lg, n, 20000)
    fda._check_monotone(lg, None, 20000)
    with pytest.raises(ValueError, match="non-decreasing.*running maximum"):
        fda._check_monotone(lg, torch.randn(2, 2, 50), 50)
    with pytest.raises(ValueError, match="log_gamma ≤ 0"):
        fda._check_monotone(-lg, None, 50)


def test_factored_refuses_an_arbitrary_norm_when_checking(factored):
    (q, k, v), lg, _ = _inputs(T=40)
    with pytest.raises(ValueError, match="non-decreasing"):
        dla.fused(q.float(), k.float(), v.float(), lg.float(), log_norm=torch.randn(2, 2, 40, device=DEV))


def test_factored_dijiang_layer(factored):
    """The DiJiang layer's n (paper feature map: the running maximum) meets the precondition."""
    test_dijiang_layer_fused_equals_parallel("paper")


_NUMPY_MAJOR_MINOR = tuple(int(x) for x in __import__("numpy").__version__.split(".")[:2])


@pytest.mark.skipif(DEV.type == "cpu" and _NUMPY_MAJOR_MINOR >= (2, 4),
                    reason="Triton 3.6's interpreter cannot run loop bounds computed from the program id with "
                           "numpy ≥ 2.4 (triton-lang/triton#9171)")
@pytest.mark.parametrize("factored_on", [False, True], ids=["exact", "factored"])
def test_compiled_loop_bounds_in_the_interpreter(monkeypatch, factored_on):
    """The compiled kernels' loop bounds (not the interpreter's masked full loops), both block orders."""
    monkeypatch.setattr(fda, "INTERPRETER_FULL_LOOPS", False)
    monkeypatch.setattr(fda, "FACTORED", factored_on)
    for blocks in ((32, 16), (16, 32)):
        monkeypatch.setattr(fda, "BLOCK_M", blocks[0])
        monkeypatch.setattr(fda, "BLOCK_N", blocks[1])
        _compare(100)
        _compare(70, log_norm=False)


def test_arms_report_where_the_fused_mode_cannot_run(monkeypatch):
    """``leanformer.arms.unavailable_reason`` (compare, bench train/decode/attention) names why a
    ``dijiang.mode: fused`` model cannot run on a device, as it does for fla."""
    from leanformer.arms import unavailable_reason
    from leanformer.config import DiJiangConfig

    cfg = TransformerConfig(d_model=32, n_heads=2, attention="dijiang", dijiang=DiJiangConfig(mode="fused")).validate()
    assert unavailable_reason(cfg, DEV) is None  # CUDA, or the interpreter on the CPU
    monkeypatch.setattr(fda, "_interpret", lambda: False)
    assert "CUDA" in unavailable_reason(cfg, torch.device("cpu"))
    odd = TransformerConfig(d_model=48, n_heads=2, attention="dijiang", dijiang=DiJiangConfig(mode="fused")).validate()
    assert "power of two" in unavailable_reason(odd, DEV if DEV.type == "cuda" else torch.device("cuda"))
