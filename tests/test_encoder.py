"""Encoders (``model.causal: false``): bidirectional softmax and shaped attention against float64 references
written out here, key-padding masks and ``features()``, the errors (DiJiang, decoding, objectives), and the
config round trip. The masked-LM objective itself is in tests/test_mlm.py."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from leanformer.cli import CONFIG_DIR, load_run_config
from leanformer.config import ConfigError, RunConfig, TransformerConfig, from_dict, to_dict
from leanformer.decoding import StaticCache
from leanformer.layers.attention import SoftmaxAttention
from leanformer.layers.shaped import ShapedAttention, shaped_attention, shaped_attention_reference
from leanformer.model import TransformerLM

DT = torch.float64


def _cfg(**kw) -> TransformerConfig:
    base = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, ffn_act="relu",
                norm="rmsnorm", pos="rope", causal=False)
    base.update(kw)
    return TransformerConfig(**base).validate()


@torch.no_grad()
def _perturb(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Move every parameter off its init (W_Q = 0 would make shaped attention trivial)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _model(seed: int = 0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    m = TransformerLM(_cfg(**kw)).to(DT).eval()
    _perturb(m, seed=seed)
    return m


# ---------------------------------------------------------------- references, written out element by element
def _allowed(i: int, j: int, keep: list[bool], causal: bool) -> bool:
    """May query i attend to key j: a token key (or itself), and not a later one when causal."""
    return (keep[j] or j == i) and (j <= i or not causal)


def _reference_softmax(q, k, v, keep, causal):
    """out[b, h, i] = Σ_j w_ij v_j with w_ij = exp(s_ij) / Σ_allowed exp(s_ij'), loops over every entry."""
    B, H, T, D = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=DT)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(T) if _allowed(i, j, keep[b], causal)]
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in js])
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[b, h, i] = sum(w[n] * v[b, h, j] for n, j in enumerate(js))
    return out


def _reference_shaped(q, k, v, alpha, beta, gamma, keep, causal):
    """A = αI + β softmax − γC row by row, C uniform over the tokens a query sees (0 on padding)."""
    soft = _reference_softmax(q, k, v, keep, causal)
    B, H, T, _ = q.shape
    out = torch.zeros_like(soft)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                seen = [j for j in range(T) if keep[b][j] and (j <= i or not causal)]
                mean = sum(v[b, h, j] for j in seen) / len(seen) if seen else torch.zeros_like(v[b, h, i])
                out[b, h, i] = alpha[h] * v[b, h, i] + beta[h] * soft[b, h, i] - gamma[h] * mean
    return out


def _qkv(B=2, H=2, T=6, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    gains = [torch.rand(H, generator=g, dtype=DT) + 0.5 for _ in range(3)]
    return q, k, v, gains


KEEPS = {"none": [[True] * 6, [True] * 6], "right": [[True] * 6, [True] * 4 + [False] * 2],
         "holes": [[False, True, True, False, True, False], [True] * 3 + [False] * 3]}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keep", list(KEEPS))
def test_shaped_attention_matches_the_written_out_reference(causal, keep):
    """The fast form (no T×T matrix) and the materialised Eq. 5, bidirectional and causal, with and without
    a key mask, against the element-by-element float64 reference; gradients too."""
    q, k, v, (a, b, g) = _qkv()
    mask = None if keep == "none" else torch.tensor(KEEPS[keep])
    expected = _reference_shaped(q, k, v, a, b, g, KEEPS[keep], causal)
    torch.testing.assert_close(shaped_attention(q, k, v, a, b, g, causal=causal, key_mask=mask), expected)
    torch.testing.assert_close(shaped_attention_reference(q, k, v, a, b, g, causal, key_mask=mask), expected)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a, b, g)]
    w = torch.randn(expected.shape, dtype=DT)
    grad_fast = torch.autograd.grad((shaped_attention(*leaves, causal=causal, key_mask=mask) * w).sum(), leaves)
    grad_ref = torch.autograd.grad((_reference_shaped(*leaves, KEEPS[keep], causal) * w).sum(), leaves)
    for gf, gr in zip(grad_fast, grad_ref):
        torch.testing.assert_close(gf, gr)


def test_bidirectional_shaped_is_the_identity_at_init_on_the_tokens():
    """W_Q = 0: the softmax over the tokens equals C over the tokens, so A = I there, padding or not."""
    q, k, v, _ = _qkv()
    ones = torch.ones(q.shape[1], dtype=DT)
    mask = torch.tensor(KEEPS["right"])
    out = shaped_attention(torch.zeros_like(q), k, v, ones, ones, ones, causal=False, key_mask=mask)
    torch.testing.assert_close(out[mask[:, None, :, None].expand_as(out)], v[mask[:, None, :, None].expand_as(v)])


@pytest.mark.parametrize("keep", list(KEEPS))
def test_bidirectional_softmax_layer_matches_the_written_out_reference(keep):
    """SoftmaxAttention(causal=False) = o(Σ_j softmax_j v_j) over the allowed keys (no positions)."""
    torch.manual_seed(0)
    layer = SoftmaxAttention(_cfg(pos="none", n_kv_heads=1, n_heads=2), 0).to(DT).eval()
    x = torch.randn(2, 6, 16, dtype=DT)
    mask = None if keep == "none" else torch.tensor(KEEPS[keep])
    y = layer(x, attention_mask=mask)
    q = layer.q(x).view(2, 6, 2, 8).transpose(1, 2)
    k = layer.k(x).view(2, 6, 1, 8).transpose(1, 2).expand(2, 2, 6, 8)  # one key/value head shared (GQA)
    v = layer.v(x).view(2, 6, 1, 8).transpose(1, 2).expand(2, 2, 6, 8)
    ref = _reference_softmax(q, k, v, KEEPS[keep], causal=False)
    torch.testing.assert_close(y, layer.o(ref.transpose(1, 2).reshape(2, 6, 16)))


def test_shaped_layer_takes_the_config_direction():
    assert ShapedAttention(_cfg(block="sas_p", attention="shaped"), 0).causal is False
    assert ShapedAttention(_cfg(block="sas_p", attention="shaped", causal=True), 0).causal is True


# ---------------------------------------------------------------- the model: direction, features, padding
ARCHS = {
    "preln": dict(block="preln", attention="softmax"),
    "sas": dict(block="sas", attention="shaped"),
    "sas_p": dict(block="sas_p", attention="shaped"),
    "sas_p_nonorm": dict(block="sas_p", attention="shaped", norm="none"),
    "vskipinit": dict(block="vskipinit", attention="shaped"),
    "parallel_learned": dict(block="parallel", attention="softmax", pos="learned"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_an_encoder_sees_the_future_and_a_decoder_does_not(arch):
    idx = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    later = idx.clone()
    later[0, -1] = (later[0, -1] + 1) % 50
    for causal in (False, True):
        m = _model(causal=causal, **ARCHS[arch])
        first = (m.features(idx)[0, :4] - m.features(later)[0, :4]).abs().max()
        assert (first > 1e-6) if not causal else (first == 0), (arch, causal, float(first))


@pytest.mark.parametrize("causal", [False, True])
def test_features_are_what_the_lm_head_reads(causal):
    m = _model(causal=causal)
    idx = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    feats = m.features(idx)
    assert feats.shape == (2, 7, 16)
    torch.testing.assert_close(feats, m.hidden_states(idx))
    torch.testing.assert_close(m.lm_head(feats), m(idx)[0])
    torch.testing.assert_close(m.features(idx, torch.ones(2, 7, dtype=torch.long)), feats)  # no padding


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS) + ["dijiang"])
def test_padding_at_the_end_leaves_the_tokens_features_unchanged(arch, causal):
    """Rows of 8, 5 and 3 tokens padded to 10 with random ids: each row's token features equal those of the
    row run alone, unpadded (float64), for every block and attention type."""
    if arch == "dijiang" and not causal:
        pytest.skip("DiJiang has no encoder form")
    kw = ARCHS.get(arch, dict(block="preln", attention="dijiang"))
    m = _model(causal=causal, **kw)
    g = torch.Generator().manual_seed(3)
    lengths = [8, 5, 3]
    idx = torch.randint(0, 50, (3, 10), generator=g)
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    feats = m.features(idx, mask)
    assert torch.isfinite(feats).all()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(feats[b, :n], m.features(idx[b:b + 1, :n])[0])
    other = idx.clone()
    other[mask == 0] = torch.randint(0, 50, (int((mask == 0).sum()),), generator=g)  # other padding ids
    torch.testing.assert_close(m.features(other, mask)[mask.bool()], feats[mask.bool()])


def test_padding_mask_errors():
    m = _model()
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="shape of idx"):
        m.features(idx, torch.ones(2, 4))
    with pytest.raises(ValueError, match="only 1 .token. and 0"):
        m.features(idx, torch.full((2, 5), 2))
    dj = _model(causal=True, block="preln", attention="dijiang")
    with pytest.raises(ValueError, match="only at the end"):
        dj.features(idx, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_gradients_reach_every_parameter_of_an_encoder():
    for arch in ("preln", "sas_p_nonorm"):
        m = _model(**ARCHS[arch]).train()
        idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
        targets = torch.full_like(idx, -100)
        targets[:, 2] = idx[:, 2]
        _, loss = m(idx, targets, attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
        loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (arch, name)
            assert p.grad.abs().sum() > 0, (arch, name)


# ---------------------------------------------------------------- errors
def test_dijiang_encoder_is_a_config_error_naming_the_valid_choices():
    with pytest.raises(ConfigError, match="model.causal=false .*'dijiang' is causal only.*softmax, shaped"):
        _cfg(attention="dijiang")


def test_an_encoder_refuses_to_decode():
    m = _model()
    idx = torch.zeros(1, 3, dtype=torch.long)
    for call in (lambda: m.generate(idx, 2), lambda: m.new_cache(), lambda: StaticCache(m, 1, 8),
                 lambda: m(idx, cache=_model(causal=True).new_cache())):
        with pytest.raises(ConfigError, match="encoder .model.causal=false"):
            call()


@pytest.mark.parametrize("causal, objective, message", [
    (True, "mlm", "train.objective=mlm needs an encoder"),
    (False, "clm", "train.objective=clm needs model.causal=true"),
])
def test_objective_must_fit_the_direction(causal, objective, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"model": {"causal": causal}, "train": {"objective": objective}}).validate()


@pytest.mark.parametrize("raw, message", [
    ({"train": {"objective": "bert"}}, "train.objective='bert' is not valid; choose one of auto, clm, mlm"),
    ({"train": {"mask_rate": 1.0}}, r"train.mask_rate=1.0 must be in \(0, 1\)"),
    ({"model": {"causal": "no"}}, "model.causal='no' must be true or false"),
    ({"model": {"causal": False}, "train": {"distill_weight": 1.0}}, "needs train.objective=clm"),
])
def test_bad_encoder_settings(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, raw).validate()


def test_objective_auto_follows_the_direction():
    assert from_dict(RunConfig, {}).validate().objective == "clm"
    assert from_dict(RunConfig, {"model": {"causal": False}}).validate().objective == "mlm"


# ---------------------------------------------------------------- configs
def test_encoder_config_round_trips():
    cfg = from_dict(RunConfig, {"model": {"causal": False, "block": "sas_p", "attention": "shaped"},
                                "train": {"objective": "mlm", "mask_rate": 0.25}}).validate()
    again = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg and again.model.causal is False and again.train.mask_rate == 0.25


def test_crammed_bert_config_is_the_papers_shape():
    cfg = load_run_config("crammed_bert")
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.n_layers, m.d_model, m.n_heads, m.causal, m.block) == (16, 768, 12, False, "preln")
    assert (t.seq_len, t.mask_rate, cfg.objective, d.vocab_size) == (128, 0.25, "mlm", 32768)
    assert "Geiping" in (CONFIG_DIR / "crammed_bert.yaml").read_text()
    small = load_run_config("crammed_bert_cpu")
    assert (small.objective, small.train.mask_rate, small.model.causal) == ("mlm", 0.25, False)
    m.vocab_size = d.vocab_size
    with torch.device("meta"):
        n = TransformerLM(m).num_params(non_embedding=True)
    # per layer q, k, v, o (4·768²), the gated MLP (768 → 2·1536, 1536 → 768) and two LayerNorm weights
    assert n == 16 * (4 * 768**2 + 3 * 768 * 1536 + 2 * 768) + 768
