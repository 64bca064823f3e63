"""Hugging Face interop: import (GPT-2, GPT-NeoX, Llama), export (Auto classes, original families), generate.

Every Hugging Face model is built from a small config with random weights; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

import leanformer  # noqa: E402
from leanformer import TransformerConfig, TransformerLM  # noqa: E402
from leanformer.hf import LeanformerCache, LeanformerForCausalLM, UnsupportedModelError, from_hf, to_hf  # noqa: E402
from leanformer.hf.exporter import to_hf_model  # noqa: E402

V = 61


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (biases and norm gains included) so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _hf_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
    elif family == "gpt_neox":  # Pythia: 25% rotary, parallel residual with two norms, untied head
        cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=64,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.25},
                                         use_parallel_residual=True, bos_token_id=0, eos_token_id=0)
    elif family == "gpt_neox_seq":  # sequential residual, tied head
        cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, use_parallel_residual=False,
                                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    elif family == "llama":  # grouped-query attention: 4 query heads share 2 KV heads
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                       rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                       bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    return _randomise(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"))


def _assert_logits_close(ref: torch.Tensor, got: torch.Tensor, rel: float = 1e-5) -> None:
    err = (ref - got).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err:.3g} vs scale {ref.abs().max().item():.3g}"


IDS = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- import
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gpt_neox_seq", "llama"])
def test_import_logits_equal(family):
    hf = _hf_model(family)
    ours = from_hf(hf)
    with torch.no_grad():
        _assert_logits_close(hf(IDS).logits, ours(IDS)[0])
    expected = {"gpt2": ("preln", "learned", 1.0), "gpt_neox": ("neox_parallel", "rope", 0.25),
                "gpt_neox_seq": ("preln", "rope", 0.25), "llama": ("preln", "rope", 1.0)}[family]
    assert (ours.cfg.block, ours.cfg.pos, ours.cfg.rotary_pct) == expected
    if family == "llama":
        assert ours.cfg.kv_heads == 2 and ours.cfg.ffn_act == "swiglu" and ours.cfg.norm == "rmsnorm"


def test_import_decoding_matches_hf_with_cache():
    """Our KV-cached greedy decode of an imported Pythia equals Hugging Face's own generate."""
    hf = _hf_model("gpt_neox")
    ours = from_hf(hf)
    theirs = hf.generate(IDS, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(IDS, 8, temperature=0), theirs)


def test_import_from_folder_and_dtype(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    with torch.no_grad():
        _assert_logits_close(hf(IDS).logits, ours(IDS)[0])
    assert next(from_hf(tmp_path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_unsupported_folders_and_options(tmp_path):
    with pytest.raises(UnsupportedModelError, match="has no config.json.*gpt2, gpt_neox, llama"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="model_type='bert' is not supported; supported: gpt2"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match="not supported"):  # a ValueError subclass
        from_hf(torch.nn.Linear(2, 2))
    scaled = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=48, bos_token_id=0, eos_token_id=0,
                                      rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                                       "original_max_position_embeddings": 32})
    with pytest.raises(UnsupportedModelError, match="rope_type='yarn'"):
        from_hf(AutoModelForCausalLM.from_config(scaled))


# ---------------------------------------------------------------------------- export (leanformer format)
def _our_model(**kw) -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **kw)
    return _randomise(TransformerLM(cfg), seed=2)


VARIANTS = {
    "softmax": {},
    "softmax_untied_parallel": {"tie_embeddings": False, "block": "parallel", "n_kv_heads": 2},
    "sas_p": {"attention": "shaped", "block": "sas_p"},
    "dijiang": {"attention": "dijiang"},
    "noble": {"noble": {"enabled": True, "rank": 4}},
}


def _variant(name: str) -> TransformerLM:
    kw = dict(VARIANTS[name])
    if "noble" in kw:
        from leanformer.config import NobleConfig

        kw["noble"] = NobleConfig(**kw["noble"])
    return _our_model(**kw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_from_pretrained_same_logits_and_greedy_generate(tmp_path, name):
    model = _variant(name)
    to_hf(model, tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, LeanformerForCausalLM)
    with torch.no_grad():
        _assert_logits_close(model(IDS)[0], hf(IDS).logits, rel=1e-6)
    out = hf.generate(IDS, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(IDS, 10, temperature=0))
    # decoding went through our own cache, advanced one token per step
    assert isinstance(out.past_key_values, LeanformerCache)
    assert out.past_key_values.get_seq_length() == IDS.shape[1] + 9


def test_exported_loss_is_shifted_like_hf():
    model = _our_model()
    hf = LeanformerForCausalLM(leanformer.hf.LeanformerConfig.from_transformer_config(model.cfg), model=model)
    loss = hf(IDS, labels=IDS).loss
    _, ref = model(IDS[:, :-1], IDS[:, 1:])
    torch.testing.assert_close(loss, ref)


def test_attention_mask_right_padding_only():
    model = _our_model()
    hf = LeanformerForCausalLM(leanformer.hf.LeanformerConfig.from_transformer_config(model.cfg), model=model)
    mask = torch.ones_like(IDS)
    mask[0, -3:] = 0  # right padding: earlier logits unchanged
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS, attention_mask=mask).logits, model(IDS)[0])
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="left padding"):
        hf(IDS, attention_mask=mask)


# ---------------------------------------------------------------------------- export (original families)
@pytest.mark.parametrize("family,kw", [
    ("gpt2", {"bias": True, "pos": "learned", "ffn_act": "gelu_tanh"}),
    ("gpt_neox", {"bias": True, "block": "neox_parallel", "rotary_pct": 0.25, "tie_embeddings": False}),
    ("llama", {"norm": "rmsnorm", "ffn_act": "swiglu", "n_kv_heads": 2, "d_ff": 48, "tie_embeddings": False}),
])
def test_export_to_original_family_round_trip(tmp_path, family, kw):
    model = _our_model(**kw)
    to_hf(model, tmp_path, family=family)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.model_type == family
    with torch.no_grad():
        _assert_logits_close(model(IDS)[0], hf(IDS).logits)
    back = from_hf(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_export_family_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(UnsupportedModelError, match="family='gpt2' needs attention"):
        to_hf(_our_model(attention="dijiang", bias=True, pos="learned"), tmp_path, family="gpt2")
    with pytest.raises(UnsupportedModelError, match="family='opt' is not valid"):
        to_hf(_our_model(), tmp_path, family="opt")
    for family in (None, "llama"):  # an encoder fits Llama's shapes, but not its causal mask
        with pytest.raises(UnsupportedModelError, match="is an encoder .*leanformer finetune"):
            to_hf(_our_model(causal=False, norm="rmsnorm", pos="rope", ffn_act="swiglu"), tmp_path, family=family)


# ---------------------------------------------------------------------------- tokenizer + CLI
def _tokenizer():
    from leanformer.data.tokenizer import Tokenizer

    return Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)


def test_export_with_tokenizer_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = _tokenizer()
    model = _our_model()
    to_hf(model, tmp_path, tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "def g(y):\n    return y"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.eos_token_id == tok.eot_id


def test_cli_import_then_export(tmp_path):
    from leanformer.cli import main
    from leanformer.train.checkpoint import load_model

    hf = _hf_model("gpt_neox")
    hf.save_pretrained(tmp_path / "hf")
    _tokenizer().save(tmp_path / "hf" / "tokenizer.json")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    ours = load_model(tmp_path / "ckpt").eval()
    with torch.no_grad():
        _assert_logits_close(hf(IDS).logits, ours(IDS)[0])
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--family", "gpt_neox"]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        _assert_logits_close(hf(IDS).logits, again(IDS).logits)
    assert main(["import", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x")]) == 2  # our folder: not HF


def test_beam_search_reorders_our_cache_like_hf():
    """Beam search through LeanformerCache.reorder_cache equals Hugging Face's on the same Pythia."""
    hf = _hf_model("gpt_neox")
    ours = to_hf_model(from_hf(hf))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(IDS, **kw), hf.generate(IDS, **kw))


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_imported_models_convert_to_dijiang(family):
    """A Hugging Face model imported with from_hf converts like our own: every inherited weight kept, and the
    converted model decodes token by token exactly as its full forward pass."""
    from leanformer.convert import convert_to_dijiang

    ours = from_hf(_hf_model(family)).double().eval()
    dj = convert_to_dijiang(ours).eval()
    parent = ours.state_dict()
    for key, value in dj.state_dict().items():
        if key in parent:
            assert torch.equal(value, parent[key]), key
    idx = torch.randint(0, dj.cfg.vocab_size, (2, 9))
    full, _ = dj(idx)
    cache = dj.new_cache()
    steps = [dj(idx[:, :4], cache=cache)[0]] + [dj(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
])
def test_llama_rope_scaling_imports_and_exports_exactly(tmp_path, rope):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                                   rope_parameters=rope, bos_token_id=0, eos_token_id=0)
    hf = _randomise(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")).eval()
    ours = from_hf(hf).eval()
    assert ours.cfg.rope_scaling["type"] == rope["rope_type"]
    idx = torch.randint(0, V, (2, 40))  # past the llama3 rule's original context of 16
    with torch.no_grad():
        _assert_logits_close(hf(idx).logits, ours(idx)[0])
    to_hf(ours, tmp_path / "back", family="llama")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        _assert_logits_close(hf(idx).logits, again(idx).logits)


def test_rope_scaling_config_errors():
    with pytest.raises(leanformer.ConfigError, match="rope_scaling.type='yarn' is not valid"):
        TransformerConfig(rope_scaling={"type": "yarn", "factor": 2.0}).validate()
    with pytest.raises(leanformer.ConfigError, match="needs high_freq_factor"):
        TransformerConfig(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "original_max_position_embeddings": 16}).validate()


@pytest.mark.parametrize("family,kw", [
    ("gpt_neox", {"attention_bias": False}),  # LayerNorm and MLP biases stay on
    ("llama", {"attention_bias": True, "mlp_bias": False}),
    ("llama", {"attention_bias": False, "mlp_bias": True}),
])
def test_separate_bias_flags_import_exactly(tmp_path, family, kw):
    if family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, bos_token_id=0, eos_token_id=0, **kw)
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, bos_token_id=0, eos_token_id=0,
                                       **kw)
    hf = _randomise(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")).eval()
    ours = from_hf(hf).eval()
    has_attn_bias = ours.blocks[0].attn.q.bias is not None
    has_mlp_bias = ours.blocks[0].mlp.ffn_in.bias is not None
    assert has_attn_bias == kw["attention_bias"] and has_mlp_bias == kw.get("mlp_bias", True)
    idx = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        _assert_logits_close(hf(idx).logits, ours(idx)[0])
    if family == "llama":  # and back to the family's own format
        to_hf(ours, tmp_path / "back", family="llama")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        with torch.no_grad():
            _assert_logits_close(hf(idx).logits, again(idx).logits)
