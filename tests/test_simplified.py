"""Shaped attention and the simplified blocks (He & Hofmann 2024): identity at init, the fast form against
the materialised ``A = αI + β softmax − γC`` (float64, values and gradients), cache decoding against the
full forward pass (layer and model), and the paper's parameter saving."""

from __future__ import annotations

import pytest
import torch

from leanformer.config import ShapedConfig, TransformerConfig
from leanformer.layers.shaped import (
    ShapedAttention,
    centring_matrix,
    shaped_attention,
    shaped_attention_reference,
)

DT = torch.float64


def _cfg(**kw) -> TransformerConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, ffn_act="relu",
                norm="rmsnorm", block="sas_p", attention="shaped", pos="rope")
    base.update(kw)
    return TransformerConfig(**base).validate()


def _qkv(B=2, H=3, Tq=7, Tk=7, D=5, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=DT)
    k = torch.randn(B, H, Tk, D, generator=g, dtype=DT)
    v = torch.randn(B, H, Tk, Dv, generator=g, dtype=DT)
    gains = [torch.rand(H, generator=g, dtype=DT) + 0.5 for _ in range(3)]
    return q, k, v, gains


@torch.no_grad()
def _perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its init (W_Q = 0 would make attention trivial)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------- the attention matrix
def test_centring_matrix_rows():
    C = centring_matrix(4, 4, causal=True, dtype=DT)
    expected = torch.tensor([[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [1 / 3] * 3 + [0], [1 / 4] * 4], dtype=DT)
    torch.testing.assert_close(C, expected)
    torch.testing.assert_close(centring_matrix(2, 4, causal=True, dtype=DT), expected[2:])
    torch.testing.assert_close(centring_matrix(3, 3, causal=False, dtype=DT), torch.full((3, 3), 1 / 3, dtype=DT))


def test_reference_is_identity_when_softmax_is_uniform():
    """Zero logits: softmax = C, so with α = β = γ = 1 the matrix is I and A V = V."""
    q, k, v, _ = _qkv()
    ones = torch.ones(q.shape[1], dtype=DT)
    for causal in (True, False):
        out = shaped_attention_reference(torch.zeros_like(q), k, v, ones, ones, ones, causal)
        torch.testing.assert_close(out, v)


@pytest.mark.parametrize("causal", [True, False])
def test_fast_equals_reference_with_grads(causal):
    q, k, v, (a, b, c) = _qkv()
    inputs = [t.clone().requires_grad_() for t in (q, k, v, a, b, c)]
    inputs_ref = [t.clone().requires_grad_() for t in (q, k, v, a, b, c)]
    out = shaped_attention(*inputs, causal=causal)
    ref = shaped_attention_reference(*inputs_ref, causal=causal)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for name, x, y in zip("q k v alpha beta gamma".split(), inputs, inputs_ref):
        torch.testing.assert_close(x.grad, y.grad, msg=f"grad of {name}")


def test_fast_gradcheck():
    q, k, v, gains = _qkv(B=1, H=2, Tq=4, Tk=4, D=3, Dv=3)
    args = tuple(t.requires_grad_() for t in (q, k, v, *gains))
    assert torch.autograd.gradcheck(lambda *a: shaped_attention(*a, causal=True), args)


def test_fast_with_past_matches_reference_rows():
    """Queries at the last Tq of Tk positions: identity and running mean pick the queries' own rows
    (the official code slices the identity [:Tk, :Tk], which picks the first rows)."""
    q, k, v, (a, b, c) = _qkv(Tq=9, Tk=9)
    full = shaped_attention_reference(q, k, v, a, b, c, causal=True)
    for t_new in (1, 3):
        ref = shaped_attention_reference(q[:, :, -t_new:], k, v, a, b, c, causal=True)
        torch.testing.assert_close(ref, full[:, :, -t_new:])
        prefix = v[:, :, : 9 - t_new].sum(2)
        fast = shaped_attention(q[:, :, -t_new:], k, v, a, b, c, causal=True, v_prefix_sum=prefix)
        torch.testing.assert_close(fast, full[:, :, -t_new:])


def test_shape_errors_name_the_problem():
    q, k, v, (a, b, c) = _qkv(Tq=5, Tk=3)
    with pytest.raises(ValueError, match="5 queries but only 3 keys"):
        shaped_attention(q, k, v, a, b, c)
    q, k, v, (a, b, c) = _qkv(Tq=2, Tk=5)
    with pytest.raises(ValueError, match="bidirectional"):
        shaped_attention(q, k, v, a, b, c, causal=False)


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("layer_idx", [0, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_is_identity_at_init(layer_idx, causal):
    cfg = _cfg()
    attn = ShapedAttention(cfg, layer_idx, causal=causal).to(DT)
    x = torch.randn(2, 9, cfg.d_model, dtype=DT)
    torch.testing.assert_close(attn(x), x)
    assert (attn.v is not None) == (layer_idx == 0)  # layer 0 keeps W_V = α_V I + β_V ΔW, ΔW = 0
    assert attn.o is None


def test_vskipinit_attention_is_value_projection_at_init():
    cfg = _cfg(block="vskipinit", attention="softmax")
    attn = ShapedAttention(cfg, 1, projections=True, centring=False, beta_init=0.0).to(DT)
    x = torch.randn(2, 5, cfg.d_model, dtype=DT)
    torch.testing.assert_close(attn(x), attn.o(attn.v(x)))  # A = I: no token mixing
    W = attn.v.weight
    torch.testing.assert_close(W @ W.T, torch.eye(cfg.d_model, dtype=DT), atol=1e-5, rtol=0)  # orthogonal


def test_gains_are_trainable_and_not_decayed():
    cfg = _cfg(shaped=ShapedConfig(alpha_init=0.5, gamma_init=0.25))
    attn = ShapedAttention(cfg, 0)
    assert attn.alpha.shape == (cfg.n_heads,) and float(attn.alpha.detach()[0]) == 0.5
    assert float(attn.gamma.detach()[0]) == 0.25
    from leanformer.train.optim import param_tags

    tags = param_tags(attn)
    for name in ("alpha", "beta", "gamma", "v.alpha_v", "v.beta_v"):
        assert tags[name] == (1.0, False), name
    assert torch.count_nonzero(attn.q.weight) == 0


def _decode_equals_full(module, d_model, splits, T=10):
    x = torch.randn(2, T, d_model, dtype=DT)
    full = module(x)
    state, outs, t = {}, [], 0
    for n in splits:
        outs.append(module(x[:, t:t + n], state))
        t += n
    assert t == T and state["pos"] == T
    torch.testing.assert_close(torch.cat(outs, 1), full)


@pytest.mark.parametrize("pos", ["rope", "none"])
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_layer_cache_decoding_equals_full(pos, layer_idx):
    cfg = _cfg(pos=pos, n_kv_heads=2)
    attn = ShapedAttention(cfg, layer_idx).to(DT)
    _perturb(attn)
    _decode_equals_full(attn, cfg.d_model, [1] * 10)  # token by token
    _decode_equals_full(attn, cfg.d_model, [6, 1, 1, 2])  # a prompt, then tokens


def test_bidirectional_refuses_a_cache():
    attn = ShapedAttention(_cfg(), 1, causal=False)
    with pytest.raises(ValueError, match="bidirectional"):
        attn(torch.randn(1, 3, 32), {})


# ---------------------------------------------------------------- blocks and the model
def test_block_wiring_at_init():
    from leanformer.blocks.simplified import SASBlock, SASPBlock, beta_ff_init

    cfg = _cfg(n_layers=18)
    assert beta_ff_init(cfg) == pytest.approx(0.1)
    x = torch.randn(2, 6, cfg.d_model, dtype=DT)
    sas = SASBlock(cfg, 1).to(DT)
    h = sas.norm1(x)  # the attention sub-block is the identity: h = β_SA · N₁x
    torch.testing.assert_close(sas(x), h + 0.1 * sas.mlp(sas.norm2(h)))
    sasp = SASPBlock(cfg, 1).to(DT)
    h = sasp.norm1(x)
    torch.testing.assert_close(sasp(x), h + 0.1 * sasp.mlp(h))


def test_norm_none_keeps_only_layer0_first_norm():
    from leanformer.blocks.simplified import SASBlock, SASPBlock

    cfg = _cfg(norm="none")
    assert isinstance(SASPBlock(cfg, 0).norm1, torch.nn.LayerNorm)
    assert isinstance(SASPBlock(cfg, 1).norm1, torch.nn.Identity)
    b0 = SASBlock(cfg, 0)
    assert isinstance(b0.norm1, torch.nn.LayerNorm) and isinstance(b0.norm2, torch.nn.Identity)


BLOCK_CASES = [
    dict(block="preln", attention="softmax"),
    dict(block="parallel", attention="softmax"),
    dict(block="sas"),
    dict(block="sas_p"),
    dict(block="sas_p", norm="none"),
    dict(block="vskipinit", attention="softmax"),
    dict(block="vskipinit", attention="shaped", pos="learned"),
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_model_cache_decoding_equals_full(case):
    from leanformer.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(_cfg(**case)).to(DT).eval()
    _perturb(model, scale=0.05)
    idx = torch.randint(0, 64, (2, 9))
    full, _ = model(idx)
    cache = model.new_cache()
    outs = [model(idx[:, :5], cache=cache)[0]]
    outs += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full)


def _paper_count(block: str, pos: str) -> int:
    """Parameters of the paper's CodeParrot model (18 × 768, 12 heads, ReLU 4d MLP, RMSNorm, no biases,
    GPT-2 vocabulary, tied head), counted on the meta device."""
    from leanformer.model import TransformerLM

    cfg = TransformerConfig(vocab_size=50257, d_model=768, n_layers=18, n_heads=12, ffn_act="relu",
                            norm="rmsnorm", bias=False, pos=pos, max_seq_len=1024, block=block,
                            attention="softmax" if block in ("preln", "parallel") else "shaped")
    with torch.device("meta"):
        model = TransformerLM(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_paper_parameter_saving(pos):
    preln = _paper_count("preln", pos)
    sas, sas_p = _paper_count("sas", pos), _paper_count("sas_p", pos)
    d, L = 768, 18
    # W_V and W_P removed everywhere (2d² per layer) but layer 0 keeps ΔW (d²); gains and norms aside.
    assert preln - sas == pytest.approx(2 * d * d * L - d * d, abs=2 * d * L + 64 * L)
    assert 1 - sas / preln == pytest.approx(0.13, abs=0.01)  # paper: 146M vs 167M (12.6%)
    assert sas_p < sas  # one norm per block instead of two
    if pos == "learned":  # GPT-2 positions (1024 × 768), as the paper's HF GPT-2 model
        assert preln == pytest.approx(167e6, rel=0.01) and sas == pytest.approx(146e6, rel=0.01)


@pytest.mark.parametrize("fusion", ["add", "gate"])
def test_identity_at_init_survives_noble(fusion):
    """NOBLE on q and ΔW: W_Q and the branch's W_up are zeroed, so A = I still holds at init.
    Needs ``TransformerLM.reset_parameters`` to run ``post_init`` children first (parents win)."""
    from leanformer.config import NobleConfig
    from leanformer.model import TransformerLM

    cfg = _cfg(noble=NobleConfig(enabled=True, rank=4, fusion=fusion))
    model = TransformerLM(cfg).to(DT)
    x = torch.randn(2, 5, cfg.d_model, dtype=DT)
    for block in model.blocks:
        torch.testing.assert_close(block.attn(x), x)


def test_model_init_follows_official_code():
    """W_Q = 0, W_K ~ N(0, 0.02), MLP output N(0, 0.02) without GPT-2's 1/√(2L) (β_FF downweights it)."""
    from leanformer.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(_cfg(d_model=128, n_layers=8, block="sas"))
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.q.weight) == 0
        assert block.attn.k.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.ffn_out.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.beta_ff.item() == pytest.approx(0.15)  # 0.1·√(18/8)


# ---------------------------------------------------------------------------------------------- running mean


@pytest.mark.parametrize("T", [2, 63, 64, 65, 200])
def test_chunked_running_mean_matches_cumsum_float64_with_gradients(T):
    from leanformer.layers.shaped import running_mean_chunked, running_mean_cumsum

    torch.manual_seed(T)
    v = torch.randn(2, T, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()  # split_heads layout
    g = torch.randn(2, 3, T, 8, dtype=torch.float64)
    fast, ref = running_mean_chunked(v, chunk=16), running_mean_cumsum(v, 0)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    (gf,), (gr,) = torch.autograd.grad(fast, v, g), torch.autograd.grad(ref, v, g)
    torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-12)
    explicit = v.cumsum(2) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    torch.testing.assert_close(fast, explicit)


def test_running_mean_with_past_and_prefix_sum_agree():
    from leanformer.layers.shaped import running_mean

    torch.manual_seed(0)
    v = torch.randn(1, 2, 30, 4, dtype=torch.float64)
    full = running_mean(v, 0)
    torch.testing.assert_close(running_mean(v, 10), full[:, :, 10:])
    torch.testing.assert_close(running_mean(v, 10, v[:, :, :10].sum(2)), full[:, :, 10:])


def test_shaped_attention_keeps_bf16_activations_bf16():
    from leanformer.layers.shaped import shaped_attention, shaped_attention_reference

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    gains = [torch.rand(2) + 0.5 for _ in range(3)]  # float32 parameters
    out = shaped_attention(*(t.bfloat16() for t in (q, k, v)), *gains)
    assert out.dtype == torch.bfloat16
    ref = shaped_attention_reference(*(t.double() for t in (q, k, v, *gains)))
    assert (out.double() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("T", [1, 3])
def test_static_mix_compiled_equals_eager_and_advances_the_running_sum(T):
    """The static step's mix (Eq. 5 with the running mean from a cached sum) through torch.compile (aot_eager:
    the functionalised in-place update of v_sum that Inductor compiles on CUDA) equals the eager function and
    the float64 formula; v_sum ends at the sum over all tokens; without centring v_sum is not read."""
    from leanformer.layers.shaped import static_mix

    g = torch.Generator().manual_seed(0)
    B, H, D, past = 2, 3, 8, 5
    v, soft = (torch.randn(B, H, T, D, dtype=torch.float64, generator=g) for _ in range(2))
    alpha, beta, gamma = (torch.rand(H, dtype=torch.float64, generator=g) + 0.5 for _ in range(3))
    earlier = torch.randn(B, H, past, D, dtype=torch.float64, generator=g)
    inv_count = 1.0 / torch.arange(past + 1, past + T + 1, dtype=torch.float64)
    ref_mean = torch.cat((earlier, v), 2).cumsum(2)[:, :, past:] * inv_count[:, None]
    ref = alpha.view(1, -1, 1, 1) * v + beta.view(1, -1, 1, 1) * soft - gamma.view(1, -1, 1, 1) * ref_mean
    for fn in (static_mix, torch.compile(static_mix, backend="aot_eager", fullgraph=True)):
        v_sum = earlier.sum(2)
        out = fn(v, soft, alpha, beta, gamma, v_sum, inv_count)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v_sum, torch.cat((earlier, v), 2).sum(2), rtol=1e-12, atol=1e-12)
        plain = fn(v, soft, alpha, beta, None, None, None)
        torch.testing.assert_close(plain, ref + gamma.view(1, -1, 1, 1) * ref_mean, rtol=1e-12, atol=1e-12)


def test_on_cuda_compiled_runs_eager_off_cuda_and_falls_back_with_a_warning(monkeypatch):
    """CPU tensors run the function as written (no compile); on CUDA a compiler failure warns once, names the
    function and the error, and runs eager from then on."""
    from leanformer.ops import on_cuda

    calls = []

    def double(x):
        calls.append(x)
        return 2 * x
    wrapped = on_cuda.on_cuda_compiled(double)
    assert wrapped(torch.ones(2)).tolist() == [2.0, 2.0] and double not in on_cuda.COMPILED

    class FakeCuda:
        is_cuda = True

        def __rmul__(self, other):
            return "eager"

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(on_cuda, "COMPILED", {})
    with pytest.warns(UserWarning, match=r"torch.compile of double failed \(RuntimeError: no compiler here\)"):
        assert wrapped(FakeCuda()) == "eager"
    assert on_cuda.COMPILED[double] is False
    assert wrapped(FakeCuda()) == "eager"  # no second attempt, no second warning
    assert on_cuda.on_cuda_compiled(double, enabled=lambda: False)(FakeCuda()) == "eager"


def test_one_token_static_calls_take_the_compiled_mix_route(monkeypatch):
    """A static step (one token) calls the on-CUDA-compiled mix, a longer prefill chunk the plain one."""
    from leanformer.decoding import StaticDecoder
    from leanformer.layers import shaped
    from leanformer.model import TransformerLM

    calls = []
    monkeypatch.setattr(shaped, "_static_mix_on_cuda", lambda *a: calls.append(a[0].shape[2]) or shaped.static_mix(*a))
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=1, max_seq_len=32,
                                            block="sas_p", attention="shaped")).eval()
    dec = StaticDecoder(model, 2, 16, graph="none", prefill_chunk=4)
    dec.prefill(torch.randint(0, 50, (2, 6)))
    assert calls == []
    dec.step()
    assert calls == [1]


def test_on_cuda_compiled_inside_an_outer_compile_is_inlined_not_cached(monkeypatch):
    """Traced by an outer torch.compile, the wrapper runs the function as written and caches nothing (caching
    what torch.compile returns there, the function itself, would leave later eager CUDA calls uncompiled)."""
    from leanformer.ops import on_cuda

    monkeypatch.setattr(on_cuda, "COMPILED", {})

    class FakeCuda:
        is_cuda = True

        def __rmul__(self, other):
            return "as written"

    def double(x):
        return 2 * x
    wrapped = on_cuda.on_cuda_compiled(double)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert wrapped(FakeCuda()) == "as written" and on_cuda.COMPILED == {}
