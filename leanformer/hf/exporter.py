"""Export a :class:`TransformerLM` as a Hugging Face model folder.

``to_hf(model, out)`` writes ``config.json`` + ``model.safetensors`` of :class:`LeanformerForCausalLM`
(any block, attention, NOBLE setting), loadable with ``AutoModelForCausalLM.from_pretrained`` once
:mod:`leanformer.hf` is used (see :func:`leanformer.hf.register`). ``family="gpt2" | "gpt_neox" | "llama"``
instead writes the original family's format (no leanformer needed to load it) when the model is
expressible there; each family function below is the exact inverse of its importer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from leanformer.config import TransformerConfig
from leanformer.hf.importer import UnsupportedModelError
from leanformer.model import TransformerLM

FAMILIES = ("leanformer", "gpt2", "gpt_neox", "llama")

_HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh"}


def _rope_parameters(cfg: TransformerConfig) -> dict:
    """Our rotary settings as a transformers ``rope_parameters`` dict (the inverse of the importer's)."""
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        params.update(rope_type=scaling.pop("type"), **scaling)
    return params


def _require(family: str, cfg: TransformerConfig, **expected: Any) -> None:
    """Raise unless every ``cfg.<name>`` is one of ``expected[name]`` (a value or a tuple of values)."""
    if cfg.noble.enabled:
        raise UnsupportedModelError(f"family={family!r} cannot hold NOBLE branches; export with family=None")
    for name, valid in expected.items():
        valid = valid if isinstance(valid, tuple) else (valid,)
        value = getattr(cfg, name)
        if value not in valid:
            raise UnsupportedModelError(f"family={family!r} needs {name} in {valid}, the model has {value!r}; "
                                        "export with family=None (leanformer format) instead")


def _act(family: str, cfg: TransformerConfig, names: dict[str, str]) -> str:
    if cfg.ffn_act not in names:
        raise UnsupportedModelError(f"family={family!r} cannot express ffn_act={cfg.ffn_act!r}; "
                                    f"valid: {', '.join(names)}")
    return names[cfg.ffn_act]


# ---------------------------------------------------------------------------- GPT-2
def gpt2_export(cfg: TransformerConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import GPT2Config

    _require("gpt2", cfg, block="preln", attention="softmax", norm="layernorm", pos="learned", bias=True,
             attn_bias=(None, True), mlp_bias=(None, True), norm_bias=(None, True),
             lm_head_bias=False, n_kv_heads=(None, cfg.n_heads))
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim,
                        activation_function=_act("gpt2", cfg, {**_HF_ACTIVATIONS, "gelu_tanh": "gelu_new"}),
                        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    p = "transformer"
    out = {f"{p}.wte.weight": sd["wte.weight"], f"{p}.wpe.weight": sd["wpe.weight"],
           f"{p}.ln_f.weight": sd["norm_f.weight"], f"{p}.ln_f.bias": sd["norm_f.bias"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}.h.{i}", f"blocks.{i}"
        out[f"{h}.attn.c_attn.weight"] = torch.cat([sd[f"{b}.attn.{n}.weight"] for n in "qkv"]).t().contiguous()
        out[f"{h}.attn.c_attn.bias"] = torch.cat([sd[f"{b}.attn.{n}.bias"] for n in "qkv"])
        for theirs, ours in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.ffn_in"), ("mlp.c_proj", "mlp.ffn_out")):
            out[f"{h}.{theirs}.weight"] = sd[f"{b}.{ours}.weight"].t().contiguous()
            out[f"{h}.{theirs}.bias"] = sd[f"{b}.{ours}.bias"]
        for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{h}.{theirs}.weight"] = sd[f"{b}.{ours}.weight"]
            out[f"{h}.{theirs}.bias"] = sd[f"{b}.{ours}.bias"]
    return hf_cfg, out


# ---------------------------------------------------------------------------- GPT-NeoX
def gpt_neox_export(cfg: TransformerConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import GPTNeoXConfig

    _require("gpt_neox", cfg, block=("preln", "neox_parallel"), attention="softmax", norm="layernorm",
             pos="rope", bias=True, attn_bias=(None, True), mlp_bias=(None, True), norm_bias=(None, True),
             lm_head_bias=False, n_kv_heads=(None, cfg.n_heads))
    hf_cfg = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim,
        hidden_act=_act("gpt_neox", cfg, _HF_ACTIVATIONS), max_position_embeddings=cfg.max_seq_len,
        layer_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        use_parallel_residual=cfg.block == "neox_parallel", attention_bias=True,
        rope_parameters={**_rope_parameters(cfg), "partial_rotary_factor": cfg.rotary_pct},
        bos_token_id=None, eos_token_id=None,
    )
    p, C, H, D = "gpt_neox", cfg.d_model, cfg.n_heads, cfg.head_dim
    out = {f"{p}.embed_in.weight": sd["wte.weight"], f"{p}.final_layer_norm.weight": sd["norm_f.weight"],
           f"{p}.final_layer_norm.bias": sd["norm_f.bias"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}.layers.{i}", f"blocks.{i}"
        out[f"{h}.attention.query_key_value.weight"] = torch.stack(
            [sd[f"{b}.attn.{n}.weight"].view(H, D, C) for n in "qkv"], dim=1).reshape(3 * C, C)
        out[f"{h}.attention.query_key_value.bias"] = torch.stack(
            [sd[f"{b}.attn.{n}.bias"].view(H, D) for n in "qkv"], dim=1).reshape(3 * C)
        for ours, theirs in (("attn.o", "attention.dense"), ("mlp.ffn_in", "mlp.dense_h_to_4h"),
                             ("mlp.ffn_out", "mlp.dense_4h_to_h"), ("norm1", "input_layernorm"),
                             ("norm2", "post_attention_layernorm")):
            out[f"{h}.{theirs}.weight"] = sd[f"{b}.{ours}.weight"]
            out[f"{h}.{theirs}.bias"] = sd[f"{b}.{ours}.bias"]
    return hf_cfg, out


# ---------------------------------------------------------------------------- Llama
def llama_export(cfg: TransformerConfig, sd: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig

    _require("llama", cfg, block="preln", attention="softmax", norm="rmsnorm", pos="rope", ffn_act="swiglu",
             rotary_pct=1.0, lm_head_bias=False)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.linear_bias("q"),
        mlp_bias=cfg.linear_bias("ffn_in"),
        rope_parameters=_rope_parameters(cfg),
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    p = "model"
    out = {f"{p}.embed_tokens.weight": sd["wte.weight"], f"{p}.norm.weight": sd["norm_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}.layers.{i}", f"blocks.{i}"
        for s in ("weight", "bias") if cfg.linear_bias("q") else ("weight",):
            for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
                out[f"{h}.self_attn.{theirs}.{s}"] = sd[f"{b}.attn.{ours}.{s}"]
        for s in ("weight", "bias") if cfg.linear_bias("ffn_in") else ("weight",):
            gate, up = sd[f"{b}.mlp.ffn_in.{s}"].chunk(2)
            out[f"{h}.mlp.gate_proj.{s}"], out[f"{h}.mlp.up_proj.{s}"] = gate, up
            out[f"{h}.mlp.down_proj.{s}"] = sd[f"{b}.mlp.ffn_out.{s}"]
        out[f"{h}.input_layernorm.weight"] = sd[f"{b}.norm1.weight"]
        out[f"{h}.post_attention_layernorm.weight"] = sd[f"{b}.norm2.weight"]
    return hf_cfg, out


EXPORTERS = {"gpt2": gpt2_export, "gpt_neox": gpt_neox_export, "llama": llama_export}


# ---------------------------------------------------------------------------- entry points
def to_hf_model(model: TransformerLM, family: str | None = None) -> torch.nn.Module:
    """The Hugging Face model (in memory) equivalent to ``model``: ``LeanformerForCausalLM`` sharing
    ``model``'s parameters, or a new GPT-2 / GPT-NeoX / Llama model holding copies of them."""
    family = family or "leanformer"
    if family not in FAMILIES:
        raise UnsupportedModelError(f"family={family!r} is not valid; choose one of {', '.join(FAMILIES)}")
    if not model.cfg.causal:
        raise UnsupportedModelError(
            "this model is an encoder (model.causal=false); every exported class is a causal language model "
            "whose mask it was not trained with. Fine-tune it with `leanformer finetune --model CHECKPOINT "
            "--export-hf ...` for an AutoModelForSequenceClassification folder")
    if family == "leanformer":
        from leanformer.hf.modeling import LeanformerConfig, LeanformerForCausalLM

        config = LeanformerConfig.from_transformer_config(model.cfg, architectures=["LeanformerForCausalLM"])
        return LeanformerForCausalLM(config, model=model)
    from transformers import AutoModelForCausalLM

    hf_cfg, state = EXPORTERS[family](model.cfg, model.state_dict())
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=next(model.parameters()).dtype)
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def to_hf(model: TransformerLM, out_dir: str | Path, tokenizer: Any = None, family: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face model folder ``out_dir`` (``config.json``, ``model.safetensors``,
    ``generation_config.json``; ``tokenizer.json`` + ``tokenizer_config.json`` if ``tokenizer`` is given).

    ``tokenizer``: a path to a ``tokenizer.json``, a :class:`leanformer.data.Tokenizer`, or a Hugging Face
    tokenizer (saved with ``save_pretrained``). ``family``: None (leanformer format) or gpt2 | gpt_neox | llama.
    """
    out = Path(out_dir)
    hf = to_hf_model(model, family)
    eot_token = _save_tokenizer(tokenizer, out)
    if eot_token is not None:
        eot_id = _token_id(out / "tokenizer.json", eot_token)
        hf.config.eos_token_id = eot_id
        if hf.generation_config is not None:
            hf.generation_config.eos_token_id = eot_id
    hf.save_pretrained(str(out))
    if getattr(hf.config, "model_type", None) == "leanformer":
        _write_remote_code(out)
    return out


_REMOTE_CODE = '''"""Lets `trust_remote_code=True` loaders (lm-evaluation-harness) find leanformer's classes."""
from leanformer.hf.modeling import LeanformerConfig, LeanformerForCausalLM  # noqa: F401
'''


def _write_remote_code(out: Path) -> None:
    """Add ``modeling_leanformer.py`` and an ``auto_map`` so that tools which never ``import leanformer``
    load the folder with ``trust_remote_code=True`` (leanformer must be installed)."""
    (out / "modeling_leanformer.py").write_text(_REMOTE_CODE)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoConfig": "modeling_leanformer.LeanformerConfig",
                          "AutoModelForCausalLM": "modeling_leanformer.LeanformerForCausalLM"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(tokenizer: Any, out: Path) -> str | None:
    """Save ``tokenizer`` into ``out``; return its end-of-text token when we wrote the config ourselves."""
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer
        tokenizer.save_pretrained(str(out))
        return None
    if isinstance(tokenizer, (str, Path)):
        from leanformer.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    if not hasattr(tokenizer, "save"):
        raise TypeError(f"tokenizer must be a tokenizer.json path, a leanformer Tokenizer or a transformers "
                        f"tokenizer, got {type(tokenizer).__name__}")
    target = out / "tokenizer.json"
    tokenizer.save(target)
    eot = getattr(tokenizer, "eot_token", None)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if eot is not None:
        tok_cfg.update(eos_token=eot, bos_token=eot, unk_token=eot)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return eot


def _token_id(tokenizer_json: Path, token: str) -> int | None:
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(tokenizer_json)).token_to_id(token)
