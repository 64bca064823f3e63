"""Shaped attention's mix kernels (:mod:`leanformer.ops.shaped_mix`) against float64: the output and the
gradients to v, s and the three gains; ragged lengths, strided heads, bf16, empty input, refusals; the
layer's route (``shaped.MIX_KERNEL``) against the PyTorch form and the materialised Eq. 5, eager and under
torch.compile; what the op keeps for backward.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). They compute
in float32: float32 inputs are asserted within 1e-5 of float64 (relative to the largest reference value).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer.layers import shaped  # noqa: E402
from leanformer.ops import shaped_mix as sm  # noqa: E402

F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 1e-5
BF16_TOL = 1e-2  # the reference takes the bf16-rounded inputs: only the outputs' rounding (2^-8) and sums count

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    return float((out.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _inputs(B: int, H: int, T: int, D: int, dtype=torch.float32, seed: int = 0):
    """v as the projections give it ((B, T, H, D) memory, seen as (B, H, T, D)), s contiguous, gains (H,)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, H, D, generator=g).to(DEV, dtype).transpose(1, 2)
    s = torch.randn(B, H, T, D, generator=g).to(DEV, dtype)
    gains = [(torch.rand(H, generator=g) + 0.5).to(DEV) for _ in range(3)]
    return v, s, gains


def _reference(v, s, alpha, beta, gamma):
    """Eq. 5's mix in float64 through the library's plain running mean."""
    ph = shaped._per_head
    return ph(alpha) * v + ph(beta) * s - ph(gamma) * shaped.running_mean_cumsum(v, 0)


def _value_and_grads(fn, tensors, weight):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    return out, grads


@pytest.mark.parametrize("B,H,T,D", [(2, 3, 150, 32), (1, 2, 64, 16), (2, 2, 1, 64), (1, 1, 200, 128),
                                     (2, 2, 128, 64), (1, 2, 4100, 16)])
def test_float32_matches_float64_reference(B, H, T, D):
    v, s, gains = _inputs(B, H, T, D)
    weight = torch.randn(B, H, T, D, dtype=F64, generator=torch.Generator().manual_seed(1)).to(DEV)
    out, grads = _value_and_grads(sm.shaped_mix, [v, s, *gains], weight)
    ref, ref_grads = _value_and_grads(_reference, [t.double() for t in (v, s, *gains)], weight)
    assert out.shape == (B, H, T, D) and out.dtype == v.dtype
    assert rel(out, ref) < FP32_TOL
    for name, g, r in zip(("v", "s", "alpha", "beta", "gamma"), grads, ref_grads):
        assert g.shape == r.shape, name
        assert rel(g, r) < FP32_TOL, name


@pytest.mark.parametrize("chunk", [64, 128, 192])
def test_time_chunks_scanned_in_parallel(monkeypatch, chunk):
    """Several chunks (each from the prefix of those before it, and backward from those after it) × several
    column blocks × batch rows and heads, a ragged last chunk: the same values and gradients."""
    monkeypatch.setattr(sm, "CHUNK_T", chunk)
    monkeypatch.setattr(sm, "MIN_PROGRAMS", 1)  # chunks of CHUNK_T exactly
    B, H, T, D = 2, 3, 300, 64
    v, s, gains = _inputs(B, H, T, D, seed=5)
    weight = torch.randn(B, H, T, D, dtype=F64, generator=torch.Generator().manual_seed(2)).to(DEV)
    out, grads = _value_and_grads(sm.shaped_mix, [v, s, *gains], weight)
    ref, ref_grads = _value_and_grads(_reference, [t.double() for t in (v, s, *gains)], weight)
    assert sm.chunk_len(v) == chunk and sm._grid(v, chunk)[2] == -(-T // chunk)
    assert rel(out, ref) < FP32_TOL
    for name, g, r in zip(("v", "s", "alpha", "beta", "gamma"), grads, ref_grads):
        assert rel(g, r) < FP32_TOL, name


@pytest.mark.parametrize("shape", [(4, 12, 512, 64), (4, 12, 1024, 64), (16, 12, 1024, 64), (4, 12, 32768, 64),
                                   (1, 1, 1, 16), (128, 12, 128, 64)])
def test_chunk_length_fills_the_gpu_within_its_bounds(shape):
    """Whole tiles, between two tiles and CHUNK_T, and MIN_PROGRAMS programs wherever the length allows."""
    v = torch.empty(shape, device="meta")
    chunk = sm.chunk_len(v)
    grid = sm._grid(v, chunk)
    assert chunk % sm.BLOCK_T == 0 and 2 * sm.BLOCK_T <= chunk <= sm.CHUNK_T
    assert grid[0] * grid[1] * grid[2] >= sm.MIN_PROGRAMS or chunk in (2 * sm.BLOCK_T, sm.CHUNK_T)


def test_strided_and_expanded_gains():
    """Gains as views (every other element of a buffer, one value expanded to every head) read as values."""
    v, s, _ = _inputs(1, 3, 70, 16)
    base = torch.rand(6, device=DEV) + 0.5
    gains = [base[::2], torch.tensor([0.7], device=DEV).expand(3), base[1::2]]
    ref = _reference(v.double(), s.double(), *(g.double() for g in gains))
    assert rel(sm.shaped_mix(v, s, *gains), ref) < FP32_TOL


def test_float16():
    v, s, gains = _inputs(2, 2, 100, 32, dtype=torch.float16, seed=3)
    ref = _reference(v.double(), s.double(), *(g.double() for g in gains))
    out = sm.shaped_mix(v, s, *gains)
    assert out.dtype == torch.float16 and rel(out, ref) < 2e-3


def test_bf16_within_its_rounding():
    v, s, gains = _inputs(2, 4, 130, 64, dtype=torch.bfloat16, seed=1)
    weight = torch.randn(2, 4, 130, 64, dtype=F64, generator=torch.Generator().manual_seed(1)).to(DEV)
    out, grads = _value_and_grads(sm.shaped_mix, [v, s, *gains], weight)
    ref, ref_grads = _value_and_grads(_reference, [t.double() for t in (v, s, *gains)], weight)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < BF16_TOL
    for name, g, r in zip(("v", "s", "alpha", "beta", "gamma"), grads, ref_grads):
        assert rel(g, r) < BF16_TOL, name


def test_output_merges_heads_as_a_view_and_empty_input():
    v, s, gains = _inputs(2, 3, 40, 16)
    out = sm.shaped_mix(v, s, *gains)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory
    v0, s0, _ = _inputs(0, 3, 40, 16)
    assert sm.shaped_mix(v0, s0, *gains).shape == (0, 3, 40, 16)


def test_float32_values_beside_a_bf16_sdpa_output():
    """SAS's values are the block input, which autocast leaves in float32, while SDPA's output is bf16 (the
    GPT-2 step on the H100 refused the kernel for this, 2026-12-06): float32 out, dv float32, ds bf16, the
    float32 inputs' share exact to 1e-5 of float64 given the bf16 s."""
    B, H, T, D = 2, 3, 150, 32
    v, s, gains = _inputs(B, H, T, D, seed=7)
    s = s.to(torch.bfloat16)
    assert shaped.use_mix_kernel(v, s) is (shaped.MIX_KERNEL != "never" and (DEV.type == "cuda"
                                                                            or shaped.MIX_KERNEL == "always"))
    weight = torch.randn(B, H, T, D, dtype=F64, generator=torch.Generator().manual_seed(3)).to(DEV)
    out, grads = _value_and_grads(sm.shaped_mix, [v, s, *gains], weight)
    ref, ref_grads = _value_and_grads(_reference, [t.double() for t in (v, s, *gains)], weight)
    assert out.dtype == torch.float32 and grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    assert rel(out, ref) < FP32_TOL
    for name, g, r in zip(("v", "s", "alpha", "beta", "gamma"), grads, ref_grads):
        assert rel(g, r) < (BF16_TOL if name == "s" else FP32_TOL), name


def test_sas_p_model_under_autocast_takes_the_kernel(monkeypatch):
    """The whole SAS-P model under bf16 autocast (how training runs) mixes through the kernel, compiled too,
    and gives the PyTorch form's loss and gradients."""
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.model import TransformerLM

    calls = []
    real = sm._mix_op
    monkeypatch.setattr(sm, "_mix_op", lambda *a: calls.append(1) or real(*a))
    cfg = arm_config(base_config(SIZES["tiny"], 32), "sas_p")
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(DEV)
    x = torch.randint(0, cfg.vocab_size, (2, 32), device=DEV)

    def loss_and_grads(kernel: str, compiled: bool = False):
        monkeypatch.setattr(shaped, "MIX_KERNEL", kernel)
        torch._dynamo.reset()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            loss = run(x, x)[1]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch._dynamo.reset()
        return loss, grads

    ref_loss, ref_grads = loss_and_grads("never")
    assert not calls
    for compiled in (False, True):
        loss, grads = loss_and_grads("always", compiled)
        assert calls, compiled
        calls.clear()
        assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-2 * abs(float(ref_loss.detach()))
        # all gradients as one vector (bf16 products: a tiny gain's gradient alone is mostly rounding)
        assert rel(torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref_grads])) < 2e-2


def test_refusals_name_the_problem():
    v, s, gains = _inputs(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head dim D=24"):
        sm.shaped_mix(torch.zeros(1, 2, 8, 24, device=DEV), torch.zeros(1, 2, 8, 24, device=DEV), *gains)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        sm.shaped_mix(v, s.double(), *gains)
    with pytest.raises(ValueError, match="one shape"):
        sm.shaped_mix(v, s[:, :, :4], *gains)
    with pytest.raises(ValueError, match=r"gamma must be \(2,\)"):
        sm.shaped_mix(v, s, gains[0], gains[1], gains[2][:1].expand(3))
    assert sm.shaped_mix_supported(v, s) is None


def test_op_keeps_only_its_inputs_for_backward():
    """v and s (which SDPA's backward keeps anyway) and the gains: no running mean, no output."""
    v, s, gains = _inputs(1, 2, 70, 16)
    leaves = [t.detach().requires_grad_() for t in (v, s, *gains)]
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        sm.shaped_mix(*leaves)
    assert saved and set(saved) <= inputs


def _layer_run(causal: bool, kernel: str, compiled: bool = False):
    """A shaped-attention layer's output and gradients (input and every parameter) with MIX_KERNEL set."""
    from leanformer.config import TransformerConfig

    cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=80, block="sas_p",
                            attention="shaped", causal=causal)
    torch.manual_seed(0)
    layer = shaped.ShapedAttention(cfg, layer_idx=1).to(DEV)
    with torch.no_grad():
        layer.q.weight.normal_(0, 0.05)  # a softmax away from uniform, so every term matters
        for g in (layer.alpha, layer.beta, layer.gamma):
            g.uniform_(0.5, 1.5)
    x = torch.randn(2, 77, 64, device=DEV, requires_grad=True)
    old, shaped.MIX_KERNEL = shaped.MIX_KERNEL, kernel
    try:
        fn = layer
        if compiled:
            torch._dynamo.reset()
            # on a GPU through Inductor (the triton_op route training takes); on the CPU the interpreted op is
            # opaque, traced with aot_eager
            fn = torch.compile(layer, backend="inductor" if DEV.type == "cuda" else "aot_eager", fullgraph=True)
        y = fn(x)
        params = [p for _, p in layer.named_parameters()]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 64, device=DEV)).sum(), [x, *params])
    finally:
        shaped.MIX_KERNEL = old
        torch._dynamo.reset()
    return y.detach(), grads


@pytest.mark.parametrize("compiled", [False, True])
def test_layer_route_matches_pytorch_form(compiled):
    y_ref, g_ref = _layer_run(True, "never")
    y, g = _layer_run(True, "always", compiled=compiled)
    assert rel(y, y_ref) < FP32_TOL
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert rel(a, b) < 1e-4, i


def test_layer_route_leaves_bidirectional_and_decoding_to_pytorch(monkeypatch):
    calls = []
    real = sm.shaped_mix
    monkeypatch.setattr(sm, "shaped_mix", lambda *a: calls.append(1) or real(*a))
    y_ref, _ = _layer_run(False, "never")
    y, _ = _layer_run(False, "always")
    assert not calls and torch.equal(y, y_ref)
    _layer_run(True, "always")
    assert calls


def test_shaped_attention_with_kernel_equals_materialised_eq5():
    torch.manual_seed(2)
    B, H, T, D = 2, 3, 90, 16
    q, k = (torch.randn(B, H, T, D, dtype=F64) * 0.5 for _ in range(2))
    v = torch.randn(B, H, T, D, dtype=F64)
    gains = [torch.rand(H, dtype=F64) + 0.5 for _ in range(3)]
    ref = shaped.shaped_attention_reference(q, k, v, *gains, causal=True)
    old, shaped.MIX_KERNEL = shaped.MIX_KERNEL, "always"
    try:
        out = shaped.shaped_attention(*(t.float().to(DEV) for t in (q, k, v)), *(g.float().to(DEV) for g in gains))
    finally:
        shaped.MIX_KERNEL = old
    assert rel(out, ref) < FP32_TOL


def test_switch_is_validated():
    old, shaped.MIX_KERNEL = shaped.MIX_KERNEL, "sometimes"
    try:
        with pytest.raises(ValueError, match="MIX_KERNEL='sometimes'"):
            shaped.use_mix_kernel(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))
    finally:
        shaped.MIX_KERNEL = old
