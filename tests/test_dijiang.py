"""DiJiang: the three forms of decayed linear attention agree, the layer decodes exactly, nothing overflows,
the DCT / QMC building blocks are what they claim, and conversion inherits every weight bit-for-bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leanformer.config import ConfigError, DiJiangConfig, TransformerConfig
from leanformer.layers.dijiang import (
    DiJiangAttention,
    dct_matrix,
    feature_projection,
    qmc_points,
    qmc_scales,
    running_log_norm,
)
from leanformer.ops import decayed_linear_attention as dla

F64 = torch.float64


def _inputs(B=2, H=3, T=7, m=5, d=4, seed=0, log_norm=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, T, m, dtype=F64, generator=g)
    k = torch.rand(B, H, T, m, dtype=F64, generator=g)
    v = torch.randn(B, H, T, d, dtype=F64, generator=g)
    lg = torch.log1p(-0.3 * torch.rand(H, dtype=F64, generator=g))
    n = torch.randn(B, H, T, dtype=F64, generator=g) if log_norm else None
    return q, k, v, lg, n


def _grads(out, leaves, seed=1):
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * w).sum(), leaves)


# ------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("T", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("with_norm", [False, True])
def test_parallel_chunk_recurrent_agree_with_grads(T, with_norm):
    q, k, v, lg, n = _inputs(T=T, log_norm=with_norm)
    leaves = [t.requires_grad_() for t in (q, k, v, lg) + ((n,) if with_norm else ())]
    ref, S_par = dla.parallel(q, k, v, lg, log_norm=n)
    # plain definition for the smallest cases: a Python double loop
    if T <= 7:
        naive = torch.zeros_like(ref)
        nn_ = n if with_norm else torch.zeros(q.shape[:3], dtype=F64)
        for i in range(T):
            for j in range(i + 1):
                w = torch.exp((i - j) * lg + nn_[:, :, j] - nn_[:, :, i])[..., None]
                naive[:, :, i] += w * (q[:, :, i] * k[:, :, j]).sum(-1, keepdim=True) * v[:, :, j]
        torch.testing.assert_close(ref, naive)
    g_ref = _grads(ref, leaves)
    rec, S_rec = dla.recurrent(q, k, v, lg, log_norm=n)
    torch.testing.assert_close(rec, ref)
    torch.testing.assert_close(S_par, S_rec)
    for a, b in zip(_grads(rec, leaves), g_ref):
        torch.testing.assert_close(a, b)
    for C in (1, 16, 64):
        out, S = dla.chunk(q, k, v, lg, log_norm=n, chunk_size=C)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(S, S_rec)
        for a, b in zip(_grads(out, leaves), g_ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("split", [1, 5, 16, 33])
@pytest.mark.parametrize("with_norm", [False, True])
def test_chunk_continuing_from_state_equals_one_shot(split, with_norm):
    q, k, v, lg, n = _inputs(T=50, log_norm=with_norm)
    full, S_full = dla.chunk(q, k, v, lg, log_norm=n, chunk_size=16)
    n1 = n[..., :split] if with_norm else None
    n2 = n[..., split:] if with_norm else None
    o1, S1 = dla.chunk(q[:, :, :split], k[:, :, :split], v[:, :, :split], lg, log_norm=n1, chunk_size=16)
    n0 = n[..., split - 1] if with_norm else None
    o2, S2 = dla.chunk(q[:, :, split:], k[:, :, split:], v[:, :, split:], lg, S1, n2, n0, chunk_size=16)
    torch.testing.assert_close(torch.cat((o1, o2), 2), full)
    torch.testing.assert_close(S2, S_full)
    o3, S3 = dla.recurrent(q[:, :, split:], k[:, :, split:], v[:, :, split:], lg, S1, n2, n0)
    torch.testing.assert_close(o3, o2)
    torch.testing.assert_close(S3, S_full)
    o4, S4 = dla.parallel(q[:, :, split:], k[:, :, split:], v[:, :, split:], lg, S1, n2, n0)
    torch.testing.assert_close(o4, o2)
    torch.testing.assert_close(S4, S_full)


def test_every_form_has_one_signature():
    """Every entry of FORMS: (q, k, v, log_gamma, initial_state, log_norm, initial_log_norm) → (o, state)."""
    import inspect

    want = ["q", "k", "v", "log_gamma", "initial_state", "log_norm", "initial_log_norm"]
    for name, fn in dla.FORMS.items():
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert params == want, name


def test_chunk_gradcheck():
    q, k, v, lg, n = _inputs(B=1, H=2, T=5, m=3, d=2, log_norm=True)
    S0 = torch.randn(1, 2, 3, 2, dtype=F64)

    def f(q, k, v, lg, n, S0):
        return dla.chunk(q, k, v, lg, S0, n, chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v, lg, n, S0)))


def test_chunk_decay_never_overflows_at_16k():
    T = 16384
    q = torch.rand(1, 2, T, 4)
    k, v = torch.rand(1, 2, T, 4), torch.randn(1, 2, T, 4)
    lg = torch.log1p(-torch.tensor([1 / 32, 1 / 512]))
    out, S = dla.chunk(q, k, v, lg, chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(S).all()
    # the official code's separable γ^i · γ^-j overflows float32 here: ours does not use it
    assert not torch.isfinite(torch.exp(-lg[0] * T))


def test_op_errors_name_the_shapes():
    q, k, v, lg, _ = _inputs()
    with pytest.raises(ValueError, match="log_gamma must have shape"):
        dla.parallel(q, k, v, lg[:2])
    with pytest.raises(ValueError, match="expected q, k"):
        dla.chunk(q, k[..., :2], v, lg)
    with pytest.raises(ValueError, match="chunk_size=0"):
        dla.chunk(q, k, v, lg, chunk_size=0)


def test_fla_mode_without_fla_is_a_clear_error():
    q, k, v, lg, _ = _inputs(T=4)
    with pytest.raises(RuntimeError, match="fla"):
        dla.fla_chunk(q, k, v, lg)


# ---------------------------------------------------------------------------- DCT and QMC points
@pytest.mark.parametrize("n", [1, 8, 64, 100])
def test_dct_is_orthonormal_dct2(n):
    C = dct_matrix(n)
    assert C.dtype == F64
    torch.testing.assert_close(C @ C.T, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)
    # row f is the cosine of frequency f: a pure cosine of frequency 3 maps to a one-hot
    if n > 3:
        i = torch.arange(n, dtype=F64)
        y = C @ torch.cos(math.pi * (2 * i + 1) * 3 / (2 * n))
        expect = torch.zeros(n, dtype=F64)
        expect[3] = math.sqrt(n / 2)
        torch.testing.assert_close(y, expect, atol=1e-10, rtol=0)


def _star_discrepancy(t: torch.Tensor) -> float:
    """Exact 1-D star discrepancy: 1/(2n) + max_i |t_(i) − (2i−1)/(2n)|."""
    n = t.numel()
    s = t.sort().values
    mid = (2 * torch.arange(1, n + 1, dtype=F64) - 1) / (2 * n)
    return 1 / (2 * n) + (s - mid).abs().max().item()


@pytest.mark.parametrize("m", [16, 64, 100, 256])
def test_qmc_points_are_low_discrepancy_and_inside(m):
    iid = sum(_star_discrepancy(torch.rand(m, dtype=F64, generator=torch.Generator().manual_seed(s)))
              for s in range(20)) / 20
    for seed in range(4):
        t = qmc_points(m, seed)
        assert (t > 0).all() and (t < 1).all()
        D = _star_discrepancy(t)
        assert D <= math.log(m) / m, (m, seed, D)
        assert D < iid / 2
        assert torch.isfinite(qmc_scales(m, seed)).all()
    assert not torch.equal(qmc_points(m, 0), qmc_points(m, 1))


@pytest.mark.parametrize("m", [4, 8, 12])
def test_feature_projection_paper_and_official(m):
    d = 8
    C, t = dct_matrix(d), qmc_scales(m, 3)
    x = torch.randn(5, d, dtype=F64)
    rows = torch.arange(m) % d
    # paper: feature f = Φ⁻¹(t_f) · (C x)[f mod d]; official: (x C)[f mod d] · Φ⁻¹(t_f)
    torch.testing.assert_close(x @ feature_projection(d, m, "paper", 3), (x @ C.T)[:, rows] * t)
    torch.testing.assert_close(x @ feature_projection(d, m, "official", 3), (x @ C)[:, rows] * t)
    with pytest.raises(ValueError, match="feature_map='nope'"):
        feature_projection(d, m, "nope")


def test_running_log_norm_is_the_recurrence():
    mk = torch.randn(2, 3, 40, dtype=F64) * 5
    lg = torch.log1p(-torch.tensor([0.03, 0.2, 0.5], dtype=F64))
    init = torch.randn(2, 3, dtype=F64)
    n = running_log_norm(mk, lg, init)
    prev = init
    for t in range(40):
        prev = torch.maximum(prev + lg, mk[..., t])
        torch.testing.assert_close(n[..., t], prev)


# ---------------------------------------------------------------------------------------- layer
def _cfg(feature_map="paper", n_kv_heads=None, **dj):
    return TransformerConfig(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2,
                             attention="dijiang", dijiang=DiJiangConfig(feature_map=feature_map, **dj)).validate()


LAYER_CASES = [
    dict(feature_map="paper"),
    dict(feature_map="official"),
    dict(feature_map="paper", n_kv_heads=2, learnable_decay=True, feature_dim=12),
    dict(feature_map="official", feature_dim=5),
]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_decoding_equals_full_forward(case):
    torch.manual_seed(0)
    att = DiJiangAttention(_cfg(**case), layer_idx=1).double()
    x = torch.randn(2, 41, 32, dtype=F64) * 3
    full = att(x)
    state: dict = {}
    pieces = [att(x[:, :6], state)] + [att(x[:, t:t + 1], state) for t in range(6, 30)] + [att(x[:, 30:], state)]
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    assert state["pos"] == 41
    assert state["S"].shape == (2, 4, att.feature_dim, 8)
    for mode in ("parallel", "chunk", "recurrent"):
        att.cfg.mode, att.cfg.chunk_size = mode, 8
        torch.testing.assert_close(att(x), full)


def test_paper_stabiliser_is_exact():
    """Stabilised layer = the plain φ(x) = D ⊙ exp(T C x) reference (GroupNorm ε = 0 makes the per-query
    scale cancel exactly)."""
    torch.manual_seed(1)
    att = DiJiangAttention(_cfg(feature_dim=6), layer_idx=0).double()
    att.group_norm.eps = 0.0
    with torch.no_grad():
        att.group_norm.weight.uniform_(0.5, 1.5)
        att.group_norm.bias.uniform_(-0.5, 0.5)
        att.feature_map.log_d.normal_(0, 0.3)
    x = torch.randn(2, 50, 32, dtype=F64)
    B, T, C = x.shape
    q = att.q(x).view(B, T, 4, 8).transpose(1, 2)
    k = att.k(x).view(B, T, 4, 8).transpose(1, 2)
    v = att.v(x).view(B, T, 4, 8).transpose(1, 2)
    q, k = att.rotary(q, k)
    fq, fk = att.feature_map(q).exp(), att.feature_map(k).exp()  # no stabiliser at all
    o = dla.parallel(fq, fk, v, att.log_gamma())[0].transpose(1, 2).reshape(B * T, C)
    ref = att.o(F.silu(att.gate(x)) * F.group_norm(o, 4, att.group_norm.weight, att.group_norm.bias, 0.0)
                .view(B, T, C))
    torch.testing.assert_close(att(x), ref)


@pytest.mark.parametrize("feature_map", ["paper", "official"])
def test_layer_is_causal(feature_map):
    torch.manual_seed(2)
    att = DiJiangAttention(_cfg(feature_map, mode="chunk", chunk_size=8), 0).double()
    x = torch.randn(1, 40, 32, dtype=F64)
    y = x.clone()
    y[:, 25:] = torch.randn(1, 15, 32, dtype=F64) * 50  # a future with huge keys
    torch.testing.assert_close(att(x)[:, :25], att(y)[:, :25])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_map", ["paper", "official"])
def test_no_nan_or_inf_at_16k_tokens(dtype, feature_map):
    torch.manual_seed(3)
    cfg = TransformerConfig(d_model=16, n_heads=2, dijiang=DiJiangConfig(feature_map=feature_map)).validate()
    att = DiJiangAttention(cfg, 0).to(dtype)
    x = (torch.randn(1, 16384, 16) * 8).to(dtype).requires_grad_()
    out = att(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in att.parameters() if p.grad is not None)


def test_learnable_decay_stays_in_unit_interval_and_gets_gradients():
    att = DiJiangAttention(_cfg(learnable_decay=True), 0)
    g = att.log_gamma().exp()
    expect = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), 4))
    torch.testing.assert_close(g, expect)
    att(torch.randn(1, 10, 32)).sum().backward()
    assert att.decay_logit.grad is not None and torch.isfinite(att.decay_logit.grad).all()


# ---------------------------------------------------------------------------- model + conversion
def test_model_decoding_logits_equal_full_forward():
    from leanformer.model import TransformerLM

    torch.manual_seed(4)
    model = TransformerLM(_cfg()).double().eval()
    assert type(model.blocks[0].attn) is DiJiangAttention
    idx = torch.randint(0, 300, (2, 24))
    full, _ = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    held = cache.memory_bytes()
    model(idx[:, :10], cache=cache)  # 10 more tokens of context: the state does not grow
    assert cache.memory_bytes() == held
    out = model.generate(idx[:, :4], max_new_tokens=5, temperature=0)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("feature_map", ["paper", "official"])
def test_conversion_inherits_every_weight_bit_for_bit(feature_map):
    from leanformer.convert import convert_to_dijiang
    from leanformer.model import TransformerLM

    torch.manual_seed(5)
    parent = TransformerLM(TransformerConfig(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2,
                                             n_layers=2, bias=True).validate())
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = convert_to_dijiang(parent, feature_map=feature_map, learnable_decay=True)
    assert child.cfg.attention == "dijiang" and child.cfg.dijiang.feature_map == feature_map
    assert parent.cfg.attention == "softmax"
    p_sd, c_sd = parent.state_dict(), child.state_dict()
    for key, value in p_sd.items():
        assert torch.equal(c_sd[key], value), key
        assert torch.equal(value, before[key]), key
    new = {k.split("attn.", 1)[1] for k in set(c_sd) - set(p_sd)}
    expect = {"gate.weight", "group_norm.weight", "group_norm.bias", "feature_map.proj", "decay_logit"}
    assert new == expect | ({"feature_map.log_d"} if feature_map == "paper" else set())
    logits, _ = child(torch.randint(0, 300, (1, 12)))
    assert torch.isfinite(logits).all()


def test_conversion_errors():
    from leanformer.convert import convert_to_dijiang
    from leanformer.model import TransformerLM

    parent = TransformerLM(TransformerConfig(vocab_size=300, d_model=32, n_heads=4, n_layers=1).validate())
    with pytest.raises(ConfigError, match="unknown dijiang option"):
        convert_to_dijiang(parent, chunksize=4)
    with pytest.raises(ConfigError, match="feature_map"):
        convert_to_dijiang(parent, feature_map="nope")
    child = convert_to_dijiang(parent)
    with pytest.raises(ConfigError, match="softmax-attention"):
        convert_to_dijiang(child)


def test_feature_gain_is_never_weight_decayed_after_copies_and_loading():
    """log D is a 2-d gain: decay would pull D towards 1. Its no-decay setting is declared by the module,
    so deepcopy and assign-loading (which drop tensor attributes) keep it."""
    import copy

    from leanformer.model import TransformerLM
    from leanformer.train.optim import param_tags

    model = TransformerLM(TransformerConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, attention="dijiang"))
    other = TransformerLM(model.cfg)
    other.load_state_dict(copy.deepcopy(model).state_dict(), assign=True)
    for m in (model, copy.deepcopy(model), other):
        tags = param_tags(m)
        gains = [n for n in tags if n.endswith("feature_map.log_d")]
        assert len(gains) == model.cfg.n_layers
        assert all(tags[n] == (1.0, False) for n in gains)
        assert tags["blocks.0.attn.q.weight"] == (1.0, True)


def test_recurrent_first_token_with_a_very_negative_norm_gives_no_nan():
    """No initial state and n_0 < −88 (float32): the first carry exp(logγ − n_0) would be inf and inf·0 NaN;
    recurrent takes n_0 itself as the previous norm there, and matches the parallel form (review finding)."""
    from leanformer.ops import decayed_linear_attention as dla
    from leanformer.layers.dijiang import running_log_norm

    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(1, 2, 6, 16, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 6, 16, generator=g)
    lg = torch.log1p(-torch.tensor([1 / 32, 1 / 512]))
    n = running_log_norm(torch.randn(1, 2, 6, generator=g) - 200.0, lg)
    o, S = dla.recurrent(q, k, v, lg, log_norm=n)
    o_ref = dla.parallel(q.double(), k.double(), v.double(), lg.double(), log_norm=n.double())[0]
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [100, 512, 700])
def test_keys_times_values_split_k_equals_one_product(T):
    """The final state's kᵀ v in partial products of SPLIT_K_ROWS positions (whole, ragged, one piece) against
    float64."""
    g = torch.Generator().manual_seed(T)
    k, v = torch.randn(2, 3, T, 16, generator=g), torch.randn(2, 3, T, 8, generator=g)
    ref = k.double().transpose(-1, -2) @ v.double()
    out = dla.keys_times_values(k, v)
    assert out.shape == (2, 3, 16, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_state_through_split_k_equals_the_recurrence(monkeypatch):
    """A prompt continuing a state: the parallel form's final state (its kᵀ v split into pieces of 8 positions,
    a ragged last one) equals the recurrent form's."""
    monkeypatch.setattr(dla, "SPLIT_K_ROWS", 8)
    q, k, v, lg, n = _inputs(T=50, log_norm=True)
    _, S1 = dla.recurrent(q[:, :, :13], k[:, :, :13], v[:, :, :13], lg, log_norm=n[..., :13])
    rest = slice(13, None)
    o_par, S_par = dla.parallel(q[:, :, rest], k[:, :, rest], v[:, :, rest], lg, S1, n[..., rest], n[..., 12])
    o_rec, S_rec = dla.recurrent(q[:, :, rest], k[:, :, rest], v[:, :, rest], lg, S1, n[..., rest], n[..., 12])
    torch.testing.assert_close(S_par, S_rec)
    torch.testing.assert_close(o_par, o_rec)


def test_keys_times_values_broadcasts_batch_dimensions_as_one_product():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 3, 700, 16, generator=g), torch.randn(2, 3, 700, 8, generator=g)
    torch.testing.assert_close(dla.keys_times_values(k, v), k.transpose(-1, -2) @ v)


@pytest.mark.parametrize("state", [False, True])
def test_boundary_terms_and_normaliser_compile_as_one_graph(state, monkeypatch):
    """The functions compiled on CUDA for a prefill's host time (``dla._boundary``, ``running_log_norm``) trace
    without a graph break and give the eager values, for two chunk lengths (the second through dynamic
    shapes), with and without an initial state, through the split-K final state."""
    monkeypatch.setattr(dla, "SPLIT_K_ROWS", 8)
    torch._dynamo.reset()
    boundary = torch.compile(dla._boundary, backend="aot_eager", fullgraph=True)
    norm = torch.compile(running_log_norm, backend="aot_eager", fullgraph=True)
    for T in (40, 27):
        q, k, v, lg, n = _inputs(T=T, log_norm=True)
        S0 = torch.randn(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=q.dtype) if state else None
        n0 = torch.randn(q.shape[0], q.shape[1], dtype=q.dtype) if state else None
        args = (q, k, v, lg.to(q.dtype), n.to(q.dtype), S0, n0, True)
        for got, want in zip(boundary(*args), dla._boundary(*args)):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want)
        mk = torch.randn(2, 3, T, dtype=q.dtype)
        torch.testing.assert_close(norm(mk, lg, n0), running_log_norm(mk, lg, n0))
