"""DiJiang's feature-map kernels (:mod:`leanformer.ops.feature_map`) against float64: features, row maxima,
the gradients to x and log_d, both maps, a given shift (per token or per row), strided inputs, bf16; the
layer's kernel route (:func:`leanformer.layers.dijiang.kernel_feature_pair`, its constant key shift for fla's
kernel and its range guard) against :func:`feature_pair` and the float64 layer; the refusals.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), where the
products take the same bf16 pieces as on the GPU, in float32. Float32 inputs: x is split in two bf16
pieces, P in three (≈ 2^-16 of z), so features are within ~1e-4 of float64 (asserted: FP32_TOL on
max |error| / max |reference|).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer.config import DiJiangConfig, TransformerConfig  # noqa: E402
from leanformer.layers import dijiang as dj  # noqa: E402
from leanformer.ops import decayed_linear_attention as dla  # noqa: E402
from leanformer.ops import feature_map as fmk  # noqa: E402
from test_dijiang_gpu_path import StandIn  # noqa: E402

F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 2e-4
BF16_TOL = 2e-2

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    return float((out.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _case(kind="paper", B=2, H=3, T=70, D=16, M=32, scale=2.0, seed=0):
    """x (B, H, T, D) float64 viewed from (B, T, H, D) memory, P (D, M), log_d (H, M) or None, in_scale."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, H, D, dtype=F64, generator=g) * scale).transpose(1, 2)
    proj = dj.feature_projection(D, M, kind).float()
    log_d = torch.randn(H, M, dtype=F64, generator=g) * 0.3 if kind == "paper" else None
    return x, proj, log_d, D ** -0.25 if kind == "paper" else 1.0


def _z(x, proj, log_d, in_scale):
    z = (x * in_scale) @ proj.double()
    return z + log_d[None, :, None, :] if log_d is not None else z


def _leaf(t, dtype):
    return t.to(device=DEV, dtype=dtype).detach().requires_grad_() if t is not None else None


def _grads(out, ref, leaves, ref_leaves, g):
    (out.double() * g.to(out.device)).sum().backward()
    (ref * g).sum().backward()
    return [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves) if a is not None]


@pytest.mark.parametrize("dims", [(16, 32), (32, 16), (64, 64)])
def test_exp_features_at_own_max(dims):
    D, M = dims
    x, proj, log_d, s = _case(D=D, M=M)
    xk, ldk = _leaf(x, torch.float32), _leaf(log_d, torch.float32)
    f, mx = fmk.exp_features(xk, proj.to(DEV), ldk, s)
    assert f.shape == (2, 3, 70, M) and f.dtype == torch.float32 and f.transpose(1, 2).is_contiguous()
    xr, ldr = x.clone().requires_grad_(), log_d.clone().requires_grad_()
    z = _z(xr, proj, ldr, s)
    ref_max = z.detach().amax(-1)
    ref = (z - ref_max[..., None]).exp()
    assert rel(f, ref) < FP32_TOL and rel(mx, ref_max) < FP32_TOL
    for a, b in _grads(f, ref, [xk, ldk], [xr, ldr], torch.randn_like(ref)):
        assert rel(a, b) < FP32_TOL


@pytest.mark.parametrize("per_row", [False, True])
def test_exp_features_at_a_given_shift(per_row):
    x, proj, log_d, s = _case(T=33)
    B, H, T, _ = x.shape
    shift = (torch.randn(B, H, 1 if per_row else T, dtype=F64) + 4).expand(B, H, T)
    xk, ldk = _leaf(x, torch.float32), _leaf(log_d, torch.float32)
    f, none = fmk.exp_features(xk, proj.to(DEV), ldk, s, shift.float().to(DEV))
    assert none is None
    xr, ldr = x.clone().requires_grad_(), log_d.clone().requires_grad_()
    ref = (_z(xr, proj, ldr, s) - shift[..., None]).exp()
    assert rel(f, ref) < FP32_TOL
    for a, b in _grads(f, ref, [xk, ldk], [xr, ldr], torch.randn_like(ref)):
        assert rel(a, b) < FP32_TOL


def test_softmax_features_and_row_max():
    x, proj, _, _ = _case("official", T=65)
    xk = _leaf(x, torch.float32)
    f = fmk.softmax_features(xk, proj.to(DEV))
    xr = x.clone().requires_grad_()
    ref = _z(xr, proj, None, 1.0).softmax(-1)
    assert rel(f, ref) < FP32_TOL
    torch.testing.assert_close(f.sum(-1).cpu(), torch.ones(2, 3, 65), rtol=0, atol=1e-5)
    for a, b in _grads(f, ref, [xk], [xr], torch.randn_like(ref)):
        assert rel(a, b) < FP32_TOL
    x, proj, log_d, s = _case()
    mx = fmk.row_max(_leaf(x, torch.float32), proj.to(DEV), _leaf(log_d, torch.float32), s)
    assert not mx.requires_grad and mx.dtype == torch.float32
    assert rel(mx, _z(x, proj, log_d, s).amax(-1)) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_outputs(dtype):
    x, proj, log_d, s = _case(D=64, M=64, T=40)
    xh = x.to(dtype)
    xk, ldk = _leaf(xh, dtype), _leaf(log_d, torch.float32)
    f, _ = fmk.exp_features(xk, proj.to(DEV), ldk, s)
    assert f.dtype == dtype
    xr, ldr = xh.double().requires_grad_(), log_d.clone().requires_grad_()
    z = _z(xr, proj, ldr, s)
    ref = (z - z.detach().amax(-1, keepdim=True)).exp()
    assert rel(f, ref) < BF16_TOL
    for a, b in _grads(f, ref, [xk, ldk], [xr, ldr], torch.randn_like(ref)):
        assert rel(a, b) < BF16_TOL


def test_empty_sequence():
    x, proj, log_d, s = _case(T=0)
    xk, ldk = _leaf(x, torch.float32), _leaf(log_d, torch.float32)
    f, mx = fmk.exp_features(xk, proj.to(DEV), ldk, s)
    assert f.shape == (2, 3, 0, 32) and mx.shape == (2, 3, 0)
    f.sum().backward()
    assert xk.grad.shape == xk.shape and float(ldk.grad.abs().sum()) == 0.0


def test_refusals_name_the_problem():
    x, proj, log_d, s = _case()
    x32 = x.float().to(DEV)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        fmk.exp_features(x.to(DEV), proj.to(DEV), None, s)
    with pytest.raises(ValueError, match="feature dim M=24 must be a power of two"):
        fmk.exp_features(x32, torch.zeros(16, 24, device=DEV), None, s)
    with pytest.raises(ValueError, match=r"log_d must be \(H, M\)"):
        fmk.exp_features(x32, proj.to(DEV), torch.zeros(2, 32, device=DEV), s)
    with pytest.raises(ValueError, match="shift gets no gradient"):
        fmk.exp_features(x32, proj.to(DEV), None, s, torch.zeros(2, 3, 70, device=DEV, requires_grad=True))
    with pytest.raises(ValueError, match=r"shift must be \(B, H, T\)"):
        fmk.exp_features(x32, proj.to(DEV), None, s, torch.zeros(2, 3, 1, device=DEV))
    assert "expected x (B, H, T, D)" in fmk.features_supported(x32[0], proj.to(DEV))


# ------------------------------------------------------------------------------------- the layer's route
@pytest.mark.parametrize("kind", ["paper", "official"])
@pytest.mark.parametrize("with_state", [False, True])
def test_kernel_feature_pair_equals_feature_pair(kind, with_state):
    x, proj, log_d, s = _case(kind, T=50)
    k = _case(kind, T=50, seed=1)[0]
    lg = dj.default_log_gamma(3)
    n0 = torch.randn(2, 3, dtype=F64) + 2 if with_state and kind == "paper" else None
    ref = dj.feature_pair(x, k, proj.double(), log_d, s, lg, n0, F64)
    out = dj.kernel_feature_pair(x.float().to(DEV), k.float().to(DEV), proj.to(DEV),
                                 log_d.float().to(DEV) if log_d is not None else None, s, lg.float().to(DEV),
                                 n0.float().to(DEV) if n0 is not None else None, torch.float32)
    for a, b in zip(out, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(a, b) < FP32_TOL


def test_constant_key_shift_gives_the_plain_kernel_the_same_output():
    """Keys at c = max n: the plain form (no log-norm) times exp(−log_scale) is the true output, as the
    running-n features through the log-norm form are."""
    x, proj, log_d, s = _case(T=45, scale=4.0)
    k = _case(T=45, seed=1, scale=4.0)[0]
    v = torch.randn(2, 3, 45, 8, dtype=F64)
    lg = dj.default_log_gamma(3)
    args = (x.float().to(DEV), k.float().to(DEV), proj.to(DEV), log_d.float().to(DEV), s, lg.float().to(DEV),
            None, torch.float32)
    fq, fk, n, log_scale = dj.kernel_feature_pair(*args, constant_key_shift=True)
    assert n is None
    o = dla.parallel(fq.double().cpu(), fk.double().cpu(), v, lg)[0] * (-log_scale.double().cpu()).exp()[..., None]
    fq, fk, n, log_scale = dj.feature_pair(x, k, proj.double(), log_d, s, lg, None, F64)
    ref = dla.parallel(fq, fk, v, lg, log_norm=n)[0] * (-log_scale).exp()[..., None]
    assert rel(o, ref) < 1e-3


def test_constant_key_shift_keeps_n_when_the_spread_is_too_wide(monkeypatch):
    monkeypatch.setattr(dj.constant_decay, "SHIFT_LIMIT", 1e-3)
    x, proj, log_d, s = _case(T=20, scale=4.0)
    out = dj.kernel_feature_pair(x.float().to(DEV), x.float().to(DEV), proj.to(DEV), log_d.float().to(DEV), s,
                                 dj.default_log_gamma(3).float().to(DEV), None, torch.float32, constant_key_shift=True)
    ref = dj.feature_pair(x, x, proj.double(), log_d, s, dj.default_log_gamma(3), None, F64)
    assert out[2] is not None and rel(out[1], ref[1]) < FP32_TOL and rel(out[2], ref[2]) < FP32_TOL


@pytest.mark.parametrize("feature_map,learnable_decay", [("paper", False), ("official", False), ("paper", True)])
@pytest.mark.parametrize("mode", ["parallel", "fla"])
def test_layer_through_the_kernels_equals_the_float64_layer(monkeypatch, feature_map, learnable_decay, mode):
    """A DiJiang layer in float32 with its features from the kernels (FEATURE_KERNEL = "always"; mode fla:
    the plain-kernel stand-in, so the paper map's constant key shift runs) against the float64 layer in
    the parallel form: output and every parameter's gradient (a learnable decay's too)."""
    monkeypatch.setattr(dj, "FEATURE_KERNEL", "always")
    stand_in = StandIn()
    monkeypatch.setattr(dla, "_fla_kernel", lambda recurrent: stand_in)
    torch.manual_seed(0)

    def config(mode):
        return TransformerConfig(vocab_size=300, d_model=64, n_heads=4, n_layers=1, attention="dijiang",
                                 dijiang=DiJiangConfig(feature_map=feature_map, mode=mode,
                                                       learnable_decay=learnable_decay)).validate()
    ref_layer = dj.DiJiangAttention(config("parallel"), 0).double()
    layer = dj.DiJiangAttention(config(mode), 0).to(DEV)
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(2, 40, 64, dtype=F64) * 2
    routes = []
    real_pair = dj.kernel_feature_pair
    monkeypatch.setattr(dj, "kernel_feature_pair", lambda *a, **k: routes.append(k) or real_pair(*a, **k))
    out = layer(x.float().to(DEV))
    ref = ref_layer(x)
    assert routes == [{"constant_key_shift": mode == "fla"}]
    assert stand_in.calls == (mode == "fla")
    assert rel(out, ref) < 1e-3
    g = torch.randn_like(ref)
    (out.double() * g.to(DEV)).sum().backward()
    (ref * g).sum().backward()
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert rel(p.grad, p_ref.grad) < 2e-3, name


@pytest.mark.parametrize("kind", ["paper", "official"])
def test_torch_compile_fullgraph(kind):
    """No graph break: compile traces (CUDA: triton_op) or calls (interpreter: custom_op) the ops, whose fake
    outputs have the real ones' shapes and (B, T, H, M) strides; values and gradients as eager."""
    x, proj, log_d, s = _case(kind, T=20)
    proj = proj.to(DEV)
    n = dj.running_log_norm(torch.randn(2, 3, 20), dj.default_log_gamma(3).float()).to(DEV)

    def f(x, log_d):
        if log_d is None:
            return fmk.softmax_features(x, proj) * 1.0
        fq, mq = fmk.exp_features(x, proj, log_d, s)
        fk, _ = fmk.exp_features(x, proj, log_d, s, n)
        return fq * fk + mq[..., None] + fmk.row_max(x, proj, log_d, s)[..., None]

    leaves = [_leaf(x, torch.float32), _leaf(log_d, torch.float32)]
    refs = [_leaf(x, torch.float32), _leaf(log_d, torch.float32)]
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager" if DEV.type == "cpu" else "inductor")(*leaves)
    expect = f(*refs)
    g = torch.randn_like(expect)
    (out * g).sum().backward()
    (expect * g).sum().backward()
    torch.testing.assert_close(out, expect)
    for a, b in zip(leaves, refs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kind", ["paper", "official"])
def test_model_with_the_kernels_compiles_to_one_graph(monkeypatch, kind):
    """A DiJiang model whose layers run the feature-map kernels and the fused form (the training route up to
    FUSED_MAX_LEN on CUDA): torch.compile sees one graph, no break."""
    from leanformer.model import TransformerLM

    monkeypatch.setattr(dj, "FEATURE_KERNEL", "always")
    cfg = TransformerConfig(vocab_size=64, d_model=64, n_heads=4, n_layers=2, attention="dijiang",
                            dijiang=DiJiangConfig(feature_map=kind, mode="fused")).validate()
    model = TransformerLM(cfg).to(DEV)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 32), device=DEV))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
