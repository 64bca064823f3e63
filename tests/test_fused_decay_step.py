"""The fused one-kernel DiJiang decoding step (:mod:`leanformer.ops.fused_decay_step`, the layer's
``fused_step`` route) against the unfused path (feature map + ``recurrent`` form + GroupNorm) in float64:
both feature maps, learnable decay, grouped-query heads, a first token and a step after a prefill, several
batch sizes, chunked feature walks, bf16; whole generations (eager and static) against the full forward;
routing; refusals.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
leanformer is imported). The kernel refuses float64, so it gets the float64 inputs rounded to float32 and the
tolerance is float32's (asserted 2e-5 on max |error| / max |reference|).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from leanformer import TransformerConfig, TransformerLM  # noqa: E402
from leanformer.config import DiJiangConfig  # noqa: E402
from leanformer.decoding import StaticDecoder  # noqa: E402
from leanformer.layers import dijiang as dj  # noqa: E402
from leanformer.layers.attention import merge_heads  # noqa: E402
from leanformer.ops import decayed_linear_attention as dla  # noqa: E402
from leanformer.ops import fused_decay_attention as fda  # noqa: E402
from leanformer.ops import fused_decay_step as fds  # noqa: E402

F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 2e-5
BF16_TOL = 2e-2  # bf16 q, k, v (8-bit mantissa) and a bf16 output; everything else float32

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().to(out.device)  # references may be computed on the CPU in float64
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _case(B=2, H=4, H_kv=4, d=16, m=32, paper=True, learnable=False, first=False, seed=0):
    """float64 inputs of one step: q (B, H, 1, d), k, v (B, H_kv, 1, d), the tables, a prior state (or
    none), the decay (log γ, or its logit), GroupNorm weight and bias."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, 1, d, dtype=F64, generator=g) for h in (H, H_kv, H_kv))
    kind = "paper" if paper else "official"
    proj = dj.feature_projection(d, m, kind, seed)
    log_d = (0.3 * torch.randn(H, m, dtype=F64, generator=g) - 0.5 * torch.tensor(m, dtype=F64).log()) if paper \
        else None
    log_gamma = dj.default_log_gamma(H)
    decay = log_gamma - torch.log(-torch.expm1(log_gamma)) if learnable else log_gamma  # logit θ: σ(θ) = γ
    S = None if first else torch.rand(B, H, m, d, dtype=F64, generator=g)
    n = None if first or not paper else 3 * torch.randn(B, H, dtype=F64, generator=g)
    w, b = 1 + 0.1 * torch.randn(H * d, dtype=F64, generator=g), 0.1 * torch.randn(H * d, dtype=F64, generator=g)
    return dict(q=q, k=k, v=v, proj=proj, log_d=log_d, decay=decay, learnable=learnable, S=S, n=n, w=w, b=b,
                in_scale=d ** -0.25 if paper else 1.0, eps=1e-5)


def _reference(c):
    """The unfused path in float64: feature_pair, dla.recurrent, then rescaled_group_norm (paper) or the
    plain GroupNorm (official) → (out (B, 1, H·d), S, n or None)."""
    H = c["q"].shape[1]
    rep = H // c["k"].shape[1]
    k, v = c["k"].repeat_interleave(rep, dim=1), c["v"].repeat_interleave(rep, dim=1)
    lg = F.logsigmoid(c["decay"]) if c["learnable"] else c["decay"]
    fq, fk, n, log_scale = dj.feature_pair(c["q"], k, c["proj"], c["log_d"], c["in_scale"], lg, c["n"], F64)
    o, S = dla.recurrent(fq, fk, v, lg, c["S"], n, c["n"])
    if log_scale is not None:
        out = dj.rescaled_group_norm(o, log_scale, c["w"], c["b"], c["eps"])
        return out, S, n[..., -1]
    B, _, T, d = o.shape
    out = F.group_norm(merge_heads(o).reshape(B * T, H * d), H, c["w"], c["b"], c["eps"]).view(B, T, H * d)
    return out, S, None


def _fused(c, dtype=torch.float32):
    """The fused op on float32 copies (q, k, v in ``dtype``) → (out, S, n) after the step."""
    B, H, _, d = c["q"].shape
    m = c["proj"].shape[-1]
    paper = c["log_d"] is not None

    def f32(t):
        return t.float().to(DEV) if t is not None else None
    S = f32(c["S"]) if c["S"] is not None else torch.zeros(B, H, m, d, device=DEV)
    n = (f32(c["n"]) if c["n"] is not None else torch.full((B, H), float("-inf"), device=DEV)) if paper else None
    q, k, v = (c[x].to(DEV, dtype) for x in "qkv")
    out = fds.decay_step(q, k, v, f32(c["proj"]), f32(c["log_d"]), f32(c["decay"]), S, n, f32(c["w"]),
                         f32(c["b"]), in_scale=c["in_scale"], eps=c["eps"], decay_logit=c["learnable"],
                         out_dtype=torch.float32)
    return out, S, n


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "after"])
@pytest.mark.parametrize("B", [1, 3])
def test_step_equals_recurrent_and_normalise_float64(paper, first, B):
    c = _case(B=B, paper=paper, first=first)
    ref, S_ref, n_ref = _reference(c)
    out, S, n = _fused(c)
    assert out.shape == (B, 1, 4 * 16) and out.dtype == torch.float32
    errs = {"out": rel(out, ref), "S": rel(S, S_ref)}
    if paper:
        errs["n"] = rel(n, n_ref)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "after"])
@pytest.mark.parametrize("m", [16, 32])
def test_single_pass_equals_two_passes_and_float64(paper, first, m, monkeypatch):
    """SINGLE_PASS (one chunk: S read first, features computed once) gives the two-pass kernel's output, state
    and normaliser (bit for bit under the interpreter), both within float32 rounding of float64. m = 32 with
    BLOCK_F = 16 walks two chunks: the switch then leaves the two-pass kernel in place."""
    c = _case(B=3, m=m, paper=paper, first=first, seed=11)
    ref, S_ref, n_ref = _reference(c)
    runs = {}
    for single in (False, True):  # the single pass also as a programmatic dependent launch (on a Hopper GPU)
        monkeypatch.setattr(fds, "SINGLE_PASS", single)
        monkeypatch.setattr(fds, "PDL", single)
        monkeypatch.setattr(fds, "BLOCK_F", 16)
        runs[single] = _fused(c)
    for a, b, r in zip(runs[True], runs[False], (ref, S_ref, n_ref)):
        if a is None:
            continue
        assert rel(a, r) <= FP32_TOL
        if DEV.type == "cpu":
            assert torch.equal(a, b)
        else:
            assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
@pytest.mark.parametrize("scale", [1e-3, 1e-6])
def test_groupnorm_epsilon_where_it_matters(paper, scale):
    """v and S scaled down until the GroupNorm's ε is a large part of the variance (review: at scale 1 the
    ε term moves the output by ~4e-6 only, below the tolerance): the fused step still matches the float64
    reference, and differs from its ε = 0 result, so the ε term (HAS_EPS) is really exercised; ε = 0 too."""
    outs = {}
    for eps in (1e-5, 0.0):
        c = _case(B=2, paper=paper)
        c["v"], c["S"], c["eps"] = c["v"] * scale, c["S"] * scale, eps
        ref, S_ref, _ = _reference(c)
        out, S, _ = _fused(c)
        assert max(rel(out, ref), rel(S, S_ref)) <= FP32_TOL, eps
        outs[eps] = out
    assert rel(outs[1e-5], outs[0.0]) > 100 * FP32_TOL


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
def test_learnable_decay_and_grouped_query_heads(paper):
    """The decay's logit turned into log σ(θ) in the kernel; H = 4 query heads over 2 key/value heads, read
    in repeat_interleave's order without a repeated copy."""
    c = _case(B=2, H=4, H_kv=2, paper=paper, learnable=True)
    ref, S_ref, _ = _reference(c)
    out, S, _ = _fused(c)
    assert max(rel(out, ref), rel(S, S_ref)) <= FP32_TOL


@pytest.mark.parametrize("m,d,block", [(128, 128, None), (64, 16, 16), (16, 64, None)])
def test_feature_chunks_and_shapes(m, d, block, monkeypatch):
    """m = d = 128 walks the features in chunks of 32 (BLOCK_F None: ≤ 4096 elements per tile); an explicit
    BLOCK_F = 16 walks m = 64 in four; m < d takes one chunk. Both maps, strided q (a view)."""
    monkeypatch.setattr(fds, "BLOCK_F", block)
    for paper in (True, False):
        c = _case(B=1, H=2, H_kv=2, d=d, m=m, paper=paper, seed=3)
        c["q"] = torch.randn(1, 1, 2, d, dtype=F64).transpose(1, 2)  # (B, H, 1, d) view of (B, 1, H, d)
        ref, S_ref, _ = _reference(c)
        out, S, _ = _fused(c)
        assert max(rel(out, ref), rel(S, S_ref)) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_within_tolerance(dtype):
    c = _case(B=2, paper=True)
    for x in "qkv":  # the reference sees the same rounded inputs
        c[x] = c[x].to(dtype).double()
    ref, S_ref, _ = _reference(c)
    out, S, _ = _fused(c, dtype)
    assert rel(out, ref) <= BF16_TOL and rel(S, S_ref) <= FP32_TOL


def test_state_updated_in_place_and_repeated_steps_stay_exact():
    """Four steps write the same S and n tensors; after them, S, n and the last output are the unfused path's."""
    c = _case(B=2, paper=True, first=True)
    B, H, _, d = c["q"].shape
    S = torch.zeros(B, H, 32, d, device=DEV)
    n = torch.full((B, H), float("-inf"), device=DEV)
    S_ptr, n_ptr = S.data_ptr(), n.data_ptr()
    ref_c = dict(c)
    g = torch.Generator().manual_seed(9)
    for _ in range(4):
        for x in "qkv":
            c[x] = ref_c[x] = torch.randn(B, H, 1, d, dtype=F64, generator=g)
        ref, ref_c["S"], ref_c["n"] = _reference(ref_c)
        f32 = {x: c[x].float().to(DEV) for x in ("proj", "log_d", "decay", "w", "b")}
        out = fds.decay_step(*(c[x].float().to(DEV) for x in "qkv"), f32["proj"], f32["log_d"], f32["decay"], S, n,
                             f32["w"], f32["b"], in_scale=c["in_scale"], eps=c["eps"])
    assert S.data_ptr() == S_ptr and n.data_ptr() == n_ptr
    assert max(rel(out, ref), rel(S, ref_c["S"]), rel(n, ref_c["n"])) <= FP32_TOL


# ------------------------------------------------------------------------------------------- the layer
def _model(feature_map="paper", learnable=False, n_kv_heads=None, mode="fused", seed=0, dtype=torch.float32):
    cfg = TransformerConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=2, n_kv_heads=n_kv_heads,
                            max_seq_len=64, attention="dijiang",
                            dijiang=DiJiangConfig(feature_map=feature_map, learnable_decay=learnable, mode=mode))
    torch.manual_seed(seed)
    model = TransformerLM(cfg).to(DEV, dtype).eval()
    with torch.no_grad():  # off the init (zero W_Q, identity gains)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def count_steps(monkeypatch):
    """The number of fused-step calls so far (a list holding one int)."""
    calls = [0]
    real = fds.decay_step

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(fds, "decay_step", counted)
    return calls


@pytest.mark.parametrize("feature_map,learnable,n_kv", [("paper", True, 1), ("official", False, None)])
def test_generate_through_the_fused_step_equals_eager_and_full_forward(feature_map, learnable, n_kv, count_steps,
                                                                       monkeypatch):
    """Eager generate() (also from a 1-token prompt: the first step has no state) and the static decoder
    (prefill, then fixed-shape steps), both through the fused step, give the unfused path's tokens and the
    full forward's logits (float32 against the float64 model's)."""
    model = _model(feature_map, learnable, n_kv)
    ref_model = copy.deepcopy(model).double()
    for block in ref_model.blocks:  # the float64 reference: the masked form (the kernels refuse float64)
        block.attn.cfg = DiJiangConfig(feature_map=feature_map, learnable_decay=learnable, mode="parallel")
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEV)
    N = 4
    for p in (prompt[:, :1], prompt):
        monkeypatch.setattr(dj, "FUSED_STEP", False)
        unfused = model.generate(p, N, temperature=0, static=False)
        assert count_steps[0] == 0
        monkeypatch.setattr(dj, "FUSED_STEP", True)
        fused = model.generate(p, N, temperature=0, static=False)
        assert count_steps[0] == N - 1 + (p.shape[1] == 1)  # one layer, every step
        count_steps[0] = 0
        assert torch.equal(fused, unfused)
    full = ref_model(fused)[0]
    dec = StaticDecoder(model, 2, capacity=12, graph="none", prefill_chunk=3)
    errs = [rel(dec.prefill(prompt), full[:, 4])]
    held = dict(dec.cache.layers[0])
    for i in range(N - 1):
        dec.step()
        errs.append(rel(dec.logits, full[:, 5 + i]))
    assert count_steps[0] == N - 1
    assert all(dec.cache.layers[0][key] is held[key] for key in ("S", "n") if key in held)  # static: in place
    assert torch.equal(dec.tokens[:, :5 + N], fused)
    assert max(errs) <= 1e-4, errs  # logits: the float32 model against the float64 one


def test_layer_step_after_a_prefill_equals_recurrent_float64(count_steps):
    """One layer: a 9-token prompt (mode fused's kernel) then three steps through the fused route, against
    the float64 layer in mode recurrent; the state's S and n too."""
    torch.manual_seed(2)
    cfg = TransformerConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, attention="dijiang",
                            dijiang=DiJiangConfig(learnable_decay=True, mode="fused")).validate()
    att = dj.DiJiangAttention(cfg, 0).to(DEV)
    with torch.no_grad():
        att.decay_logit.add_(torch.randn_like(att.decay_logit))
        att.group_norm.weight.add_(0.1 * torch.randn_like(att.group_norm.weight))
    ref = dj.DiJiangAttention(cfg, 0).to(DEV, F64)
    ref.load_state_dict(att.state_dict())
    ref.cfg = DiJiangConfig(learnable_decay=True, mode="recurrent")
    x = torch.randn(3, 12, 64, device=DEV, dtype=F64)
    state, ref_state = {}, {}
    with torch.no_grad():
        outs = [att(x[:, :9].float(), state)] + [att(x[:, t:t + 1].float(), state) for t in range(9, 12)]
        want = [ref(x[:, :9], ref_state)] + [ref(x[:, t:t + 1], ref_state) for t in range(9, 12)]
    assert count_steps[0] == 3
    assert rel(torch.cat(outs, 1), torch.cat(want, 1)) <= 1e-4
    assert rel(state["S"], ref_state["S"]) <= 1e-4 and rel(state["n"], ref_state["n"]) <= 1e-5
    assert state["pos"] == ref_state["pos"] == 12
    S_held, n_held = state["S"], state["n"]  # an eager state gets new tensors, as the unfused path gives it
    S_before = S_held.clone()
    with torch.no_grad():
        att(x[:, 11:].float(), state)
    assert torch.equal(S_held, S_before) and state["S"] is not S_held and state["n"] is not n_held


def test_compiled_static_step_through_the_fused_op(count_steps):
    """torch.compile of the static step (aot_eager on the CPU: the op is opaque, its in-place writes of S
    and n must survive functionalisation) gives the eager tokens."""
    model = _model(n_kv_heads=1)
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3)).to(DEV)
    eager = model.generate(prompt, 4, temperature=0, static=False)
    count_steps[0] = 0
    backend = "inductor" if DEV.type == "cuda" else "aot_eager"
    assert torch.equal(model.generate(prompt, 4, temperature=0, static=True, graph="none", compile=backend),
                       eager)
    assert count_steps[0] >= 1  # traced (at least once) through the fused route


# ------------------------------------------------------------------------------------------- routing
def test_form_routes_a_stateful_step(monkeypatch):
    """auto/parallel: fused_step on CUDA only; fused: wherever the kernel runs (here, the interpreter too);
    never without the state, for T > 1, under a gradient, with the switch off, or in modes recurrent/chunk/fla."""
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, attention="dijiang").validate()
    att = dj.DiJiangAttention(cfg, 0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    q = torch.zeros(1, 2, 1, 16)
    monkeypatch.setattr(fds, "step_supported", lambda *a: None)
    with torch.no_grad():
        assert att.form(1, cuda, True, q, q, {}) == "fused_step"
        assert att.form(1, cpu, True, q, q, {}) == "recurrent"
        assert att.form(1, cuda, True, q, q) == "recurrent"  # no state given: mix's own call
        assert att.form(2, cuda, True, q, q, {}) == "chunk"
        att.cfg.mode = "parallel"
        assert att.form(1, cuda, True, q, q, {}) == "fused_step"
        att.cfg.mode = "fused"
        assert att.form(1, cpu, True, q, q, {}) == "fused_step"
        for mode in ("recurrent", "chunk"):
            att.cfg.mode = mode
            assert att.form(1, cuda, True, q, q, {}) == mode
        att.cfg.mode = "fla"
        assert att.form(1, cuda, True, q, q, {}) == "fla_recurrent"
        att.cfg.mode = "auto"
        monkeypatch.setattr(dj, "FUSED_STEP", False)
        assert att.form(1, cuda, True, q, q, {}) == "recurrent"
        assert "FUSED_STEP" in att.fused_step_reason(q, q, {})
    monkeypatch.setattr(dj, "FUSED_STEP", True)
    assert att.form(1, cuda, True, q, q, {}) == "recurrent"  # grad mode on, parameters require grad
    assert "gradient" in att.fused_step_reason(q, q, {})


def test_layer_reasons_name_the_state():
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, attention="dijiang").validate()
    att = dj.DiJiangAttention(cfg, 0).to(DEV)
    q = torch.zeros(3, 2, 1, 16, device=DEV)
    with torch.no_grad():
        assert att.fused_step_reason(q, q, {}) is None
        S, n = torch.zeros(3, 2, 16, 16, device=DEV), torch.zeros(3, 2, device=DEV)
        assert att.fused_step_reason(q, q, {"S": S, "n": n}) is None
        assert "S has shape" in att.fused_step_reason(q, q, {"S": S[:2], "n": n})
        assert "n has shape" in att.fused_step_reason(q, q, {"S": S, "n": n[:, :1]})
        assert "only one of S and n" in att.fused_step_reason(q, q, {"S": S})
        assert "must be float32" in att.fused_step_reason(q, q, {"S": S.double(), "n": n})
        assert "dtype torch.float64" in att.fused_step_reason(q.double(), q.double(), {})


def test_refused_inputs_have_clear_errors():
    c = _case(B=1, H=2, H_kv=2, d=16, m=16)
    names = ("q", "k", "v", "proj", "log_d", "decay", "w", "b")
    c = {x: (c[x].to(DEV) if c[x] is not None else None) for x in names}
    t = {x: (c[x].float() if c[x] is not None else None) for x in names}
    S, n = torch.zeros(1, 2, 16, 16, device=DEV), torch.zeros(1, 2, device=DEV)
    kw = dict(in_scale=0.5, eps=1e-5)

    def call(**over):
        a = {**t, "S": S, "n": n, **over}
        return fds.decay_step(a["q"], a["k"], a["v"], a["proj"], a["log_d"], a["decay"], a["S"], a["n"], a["w"],
                              a["b"], **kw)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        call(q=c["q"], k=c["k"], v=c["v"])
    with pytest.raises(ValueError, match="one dtype"):
        call(q=t["q"].half())
    with pytest.raises(ValueError, match=r"feature dim m=24 must be a power of two in \[16, 128\]"):
        call(proj=torch.zeros(16, 24, device=DEV))
    with pytest.raises(ValueError, match=r"head dim d=8"):
        call(q=t["q"][..., :8], k=t["k"][..., :8], v=t["v"][..., :8], proj=torch.zeros(8, 16, device=DEV))
    with pytest.raises(ValueError, match="weight must be on"):
        call(w=t["w"].to("meta"))
    with pytest.raises(ValueError, match="state S must be float32"):
        call(S=S.double())
    with pytest.raises(ValueError, match=r"expected q \(B, H, 1, d\)"):
        call(q=t["q"].expand(1, 2, 2, 16))
    with pytest.raises(ValueError, match=r"S must have shape \(1, 2, 16, 16\)"):
        call(S=torch.zeros(1, 2, 16, 8, device=DEV))
    with pytest.raises(ValueError, match="no log-normaliser"):
        call(log_d=None)
    with pytest.raises(ValueError, match="is for inference"):
        call(q=t["q"].clone().requires_grad_())
    with torch.no_grad():  # no grad mode: a parameter that requires grad is fine
        call(w=t["w"].clone().requires_grad_())
    assert "needs CUDA tensors" in fds.step_reason(torch.device("meta"), torch.float32, 16, 16)


def test_gpus_that_cannot_run_the_step_are_named(monkeypatch):
    monkeypatch.setattr(fda, "_device_limits", lambda index: (7, 5, 64 * 1024))
    assert "compute capability ≥ 8.0; this one is 7.5" in fds.step_reason(torch.device("cuda"), torch.bfloat16, 64, 64)
    monkeypatch.setattr(fda, "_device_limits", lambda index: (9, 0, 227 * 1024))
    assert fds.step_reason(torch.device("cuda"), torch.bfloat16, 64, 64) is None


# ------------------------------------------------------------------------------------------- RoPE in the kernel
def _rope_args(rot, pos, as_tensor, dtype):
    """cos, sin, position for decay_step at ``pos``: the row itself (an int position) or the kept tables and a
    (1,) device tensor (the static decoder's counter)."""
    start = torch.tensor([pos], device=DEV) if as_tensor else pos
    cos, sin, position = rot.step_tables(start, DEV, dtype)
    assert (position is start) if as_tensor else (position is None and cos.shape == (1, rot.rotary_dim))
    return dict(cos=cos, sin=sin, position=position)


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
@pytest.mark.parametrize("pct", [1.0, 0.5])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_rope_in_the_kernel_equals_rotary_before_it_and_float64(paper, pct, as_tensor):
    """q, k un-rotated and the kernel rotating them (full and partial rotary, grouped-query heads, positions
    0, 7 and 300, the last past the tables' first 256 rows) gives the fused step after Rotary's rotation, and
    the float64 unfused path on the float64-rotated inputs; bf16 too (same rounding as Rotary's eager ops)."""
    from leanformer.layers.rope import Rotary

    d = 16
    rot, rot64 = Rotary(d, pct), Rotary(d, pct)
    for pos in (0, 7, 300):
        c = _case(B=2, H=4, H_kv=2, d=d, paper=paper, seed=pos)
        c64 = dict(c, q=rot64.rotate(c["q"], pos), k=rot64.rotate(c["k"], pos))
        ref, S_ref, _ = _reference(c64)
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-3)):
            q, k = c["q"].to(DEV, dtype), c["k"].to(DEV, dtype)
            before, _, _ = _fused(dict(c, q=rot.rotate(q, pos).double(), k=rot.rotate(k, pos).double()), dtype)
            B, H, _, _ = q.shape
            S = c["S"].float().to(DEV)
            n = c["n"].float().to(DEV) if paper else None
            f32 = {x: c[x].float().to(DEV) if c[x] is not None else None for x in ("proj", "log_d", "decay", "w",
                                                                                   "b")}
            inside = fds.decay_step(q, k, c["v"].to(DEV, dtype), f32["proj"], f32["log_d"], f32["decay"], S, n,
                                    f32["w"], f32["b"], in_scale=c["in_scale"], eps=c["eps"],
                                    out_dtype=torch.float32, **_rope_args(rot, pos, as_tensor, dtype))
            assert rel(inside, before) <= tol, (pos, dtype)
            if dtype == torch.float32:
                assert max(rel(inside, ref), rel(S, S_ref)) <= FP32_TOL, pos
            else:
                assert rel(inside, ref) <= BF16_TOL, pos


def _static_steps(model, prompt: torch.Tensor, steps: int, counter: list[int]):
    """A static decoder (no graph) prefilled with ``prompt``, ``counter[0]`` reset to 0 after the prefill,
    then ``steps`` steps → (decoder, each step's logits)."""
    dec = StaticDecoder(model, prompt.shape[0], capacity=12, graph="none", prefill_chunk=3)
    dec.prefill(prompt)
    counter[0], logits = 0, []
    for _ in range(steps):
        dec.step()
        logits.append(dec.logits.clone())
    return dec, logits


@pytest.mark.parametrize("feature_map,pct,n_kv", [("paper", 0.5, 1), ("official", 1.0, None)])
def test_generate_with_rope_in_the_kernel_equals_rope_before_it(feature_map, pct, n_kv, monkeypatch):
    """Whole generations, eager (int positions) and through the static decoder (positions in a device tensor
    read by the kernel), with ROPE_IN_KERNEL on and off, give the unfused path's tokens; the static steps'
    logits agree, and with the switch on Rotary runs in no step (its gathers are gone)."""
    from leanformer.layers.rope import Rotary

    model = _model(feature_map, n_kv_heads=n_kv)
    model.cfg.rotary_pct = pct
    for block in model.blocks:
        block.attn.rotary = Rotary(model.cfg.head_dim, pct).to(DEV)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4)).to(DEV)
    N = 4
    monkeypatch.setattr(dj, "FUSED_STEP", False)
    unfused = model.generate(prompt, N, temperature=0, static=False)
    monkeypatch.setattr(dj, "FUSED_STEP", True)
    rotations = [0]
    real = Rotary.rotate

    def counted(self, x, start=0):
        rotations[0] += 1
        return real(self, x, start)
    monkeypatch.setattr(Rotary, "rotate", counted)
    logits = {}
    for inside in (True, False):
        monkeypatch.setattr(fds, "ROPE_IN_KERNEL", inside)
        assert torch.equal(model.generate(prompt, N, temperature=0, static=False), unfused)
        dec, logits[inside] = _static_steps(model, prompt, N - 1, rotations)
        assert rotations[0] == (0 if inside else 2 * (N - 1)), inside  # q and k, one layer, every step
        assert torch.equal(dec.tokens[:, :5 + N], unfused)
    assert rel(torch.stack(logits[True]), torch.stack(logits[False])) <= 1e-5


def test_rope_inputs_are_checked():
    c = _case(B=1, H=2, H_kv=2, d=16, m=16)
    t = {x: c[x].float().to(DEV) for x in ("q", "k", "v", "proj", "log_d", "decay", "w", "b", "S", "n")}
    table = torch.zeros(8, 16, device=DEV)

    def call(**rope):
        return fds.decay_step(t["q"], t["k"], t["v"], t["proj"], t["log_d"], t["decay"], t["S"], t["n"], t["w"],
                              t["b"], in_scale=0.5, eps=1e-5, **rope)
    with pytest.raises(ValueError, match="needs both cos and sin"):
        call(cos=table)
    with pytest.raises(ValueError, match="one shape"):
        call(cos=table, sin=table[:, :8])
    with pytest.raises(ValueError, match=r"R=3 \(the tables' width\) must be even and in \[2, head dim d=16\]"):
        call(cos=table[:, :3], sin=table[:, :3])
    wide = torch.zeros(8, 32, device=DEV)
    with pytest.raises(ValueError, match="R=32"):
        call(cos=wide, sin=wide)
    with pytest.raises(ValueError, match=r"position must be a \(1,\) int64"):
        call(cos=table, sin=table, position=torch.zeros(1, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="position must be on"):
        call(cos=table, sin=table, position=torch.zeros(1, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
def test_the_gate_in_the_kernel_equals_silu_gate_times_the_step(dtype, paper):
    """``gate`` (a strided view, as the fused input product gives it) makes the kernel return silu(g) ⊙ y: the
    same as the two eager ops on the gate-less step's output, to float32 rounding (float32), or to one
    bf16 result, 98% of elements equal and the rest within an ulp (bf16: the kernel rounds y, silu(g) and the
    product as the eager ops do); the state is updated as without the gate."""
    c = _case(B=3, paper=paper, seed=5)
    B, H, _, d = c["q"].shape
    wide = torch.randn(B, 1, 3 * H * d, generator=torch.Generator().manual_seed(6)).to(DEV, dtype)
    gate = wide[..., H * d: 2 * H * d]  # strided: every row skips 2·H·d channels
    t = {x: c[x].float().to(DEV) if c[x] is not None else None for x in ("proj", "log_d", "decay", "w", "b")}
    outs, states = {}, {}
    for g in (None, gate):
        S, n = c["S"].float().to(DEV), c["n"].float().to(DEV) if paper else None
        outs[g is None] = fds.decay_step(*(c[x].to(DEV, dtype) for x in "qkv"), t["proj"], t["log_d"], t["decay"],
                                         S, n, t["w"], t["b"], in_scale=c["in_scale"], eps=c["eps"],
                                         out_dtype=dtype, gate=g)
        states[g is None] = S
    assert outs[False].dtype == dtype and outs[False].shape == (B, 1, H * d)
    expected = F.silu(gate) * outs[True]
    if dtype == torch.float32:
        err = ((outs[False].double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-3)).max()
        assert float(err) <= 2e-6
    else:  # both roundings emulated: equal but where the kernel's float32 silu and PyTorch's differ by an ulp
        assert float((outs[False] == expected).float().mean()) >= 0.98
        err = ((outs[False].double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-3)).max()
        assert float(err) <= 2 ** -7
    assert torch.equal(states[False], states[True])


def test_the_gate_is_checked():
    c = _case(B=2, H=2, H_kv=2, d=16, m=16)
    t = {x: c[x].float().to(DEV) for x in ("q", "k", "v", "proj", "log_d", "decay", "w", "b", "S", "n")}

    def call(gate):
        return fds.decay_step(t["q"], t["k"], t["v"], t["proj"], t["log_d"], t["decay"], t["S"], t["n"], t["w"],
                              t["b"], in_scale=0.5, eps=1e-5, gate=gate)
    with pytest.raises(ValueError, match=r"gate must be .* of shape \(2, 1, 32\).*got \(2, 32\)"):
        call(torch.zeros(2, 32, device=DEV))
    with pytest.raises(ValueError, match="gate must be a float32, bfloat16 or float16 tensor"):
        call(torch.zeros(2, 1, 32, device=DEV, dtype=torch.float64))


def test_generate_with_the_gate_in_the_kernel_equals_the_gate_after_it(monkeypatch):
    """Eager and static generations give the same tokens with GATE_IN_KERNEL on and off, and the static steps'
    logits agree to float32 rounding; with the switch on, no silu runs in a step."""
    model = _model("paper", True, None)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(7)).to(DEV)
    N = 4
    silus = [0]
    real = F.silu

    def counted(x, *args, **kwargs):
        silus[0] += 1
        return real(x, *args, **kwargs)
    monkeypatch.setattr(F, "silu", counted)
    tokens, logits = {}, {}
    for inside in (True, False):
        monkeypatch.setattr(fds, "GATE_IN_KERNEL", inside)
        tokens[inside] = model.generate(prompt, N, temperature=0, static=False)
        dec, logits[inside] = _static_steps(model, prompt, N - 1, silus)
        assert silus[0] == (0 if inside else N - 1), inside  # one layer
        assert torch.equal(dec.tokens[:, :5 + N], tokens[inside])
    assert torch.equal(tokens[True], tokens[False])
    assert rel(torch.stack(logits[True]), torch.stack(logits[False])) <= 1e-5


def test_a_float32_output_with_a_bf16_gate_promotes_like_the_eager_product():
    """out_dtype float32 and a bf16 gate: the kernel returns float32, silu(g) rounded to bf16 (as
    ``F.silu`` of a bf16 tensor is) times the float32 y, as ``F.silu(gate) * y`` promotes them."""
    c = _case(B=2, seed=7)
    B, H, _, d = c["q"].shape
    gate = torch.randn(B, 1, H * d, generator=torch.Generator().manual_seed(8)).to(DEV, torch.bfloat16)
    t = {x: c[x].float().to(DEV) for x in ("q", "k", "v", "proj", "log_d", "decay", "w", "b")}
    outs = []
    for g in (None, gate):
        S, n = c["S"].float().to(DEV), c["n"].float().to(DEV)
        outs.append(fds.decay_step(t["q"], t["k"], t["v"], t["proj"], t["log_d"], t["decay"], S, n, t["w"], t["b"],
                                   in_scale=c["in_scale"], eps=c["eps"], out_dtype=torch.float32, gate=g))
    expected = F.silu(gate) * outs[0]
    assert outs[1].dtype == expected.dtype == torch.float32
    err = ((outs[1].double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-3)).max()
    assert float(err) <= 2 ** -7  # at most silu's one-ulp bf16 difference; float32's rounding elsewhere


@pytest.mark.parametrize("paper", [True, False], ids=["paper", "official"])
def test_the_step_op_passes_torch_library_opcheck(paper):
    """The registered op's schema (S and n mutated, nothing aliased), fake tensor and AOT-dispatch behaviour
    agree with what it does (``torch.library.opcheck``), with and without the gate and RoPE."""
    c = _case(B=2, H=2, H_kv=2, d=16, m=16, paper=paper, seed=9)
    t = {x: c[x].float().to(DEV) if c[x] is not None else None
         for x in ("q", "k", "v", "proj", "log_d", "decay", "w", "b", "S", "n")}
    gate = torch.randn(2, 1, 32, device=DEV)
    cos, sin = torch.randn(4, 16, device=DEV), torch.randn(4, 16, device=DEV)
    position = torch.tensor([2], device=DEV)
    for extra in ((None, None, None, None), (cos, sin, position, gate)):
        args = (t["q"], t["k"], t["v"], t["proj"], t["log_d"], t["decay"], t["S"].clone(),
                t["n"].clone() if paper else None, t["w"], t["b"], *extra, c["in_scale"], c["eps"], False,
                torch.float32)
        torch.library.opcheck(fds._step_op, args)
