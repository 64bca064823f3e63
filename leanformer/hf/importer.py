"""Import Hugging Face GPT-2, GPT-NeoX (Pythia) and Llama models as a :class:`TransformerLM`.

Each family is a pair of functions: ``<family>_config(hf_config) -> TransformerConfig`` and
``<family>_weights(hf_state, cfg) -> our state dict``. The config maps every architectural option onto
a :class:`TransformerConfig` field; an option we cannot express exactly (rope scaling other than linear or
llama3, an explicit head_dim, GPT-2 without attention scaling, ...) is an :class:`UnsupportedModelError`, never a silent
approximation. Weight layouts that differ:

* GPT-2 ``Conv1D`` stores ``(in, out)``: transposed; ``c_attn`` holds ``[Q | K | V]`` along ``out``.
* GPT-NeoX ``query_key_value`` is interleaved per head: rows ``(H, 3, D)``, de-interleaved into q, k, v.
* Llama ``gate_proj`` and ``up_proj`` are stacked ``[gate; up]`` into our SwiGLU ``ffn_in``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from leanformer.config import ConfigError, TransformerConfig
from leanformer.model import TransformerLM

SUPPORTED = ("gpt2", "gpt_neox", "llama")

# Hugging Face activation names whose function we have exactly.
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedModelError(ConfigError):
    """A model, folder or option that cannot be imported or exported (a ``ValueError``); the message says
    what was found and what works. A ``ConfigError``, so the CLI prints it as one ``error:`` line."""


def _unsupported(model_type: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{model_type}: {what} cannot be expressed by TransformerConfig exactly")


def _activation(model_type: str, name: str) -> str:
    if name not in _ACTIVATIONS:
        raise _unsupported(model_type, f"activation {name!r} (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _rope(model_type: str, hf_config: Any) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, rope_scaling) of the model's rotary embedding; rope scaling of
    type ``linear`` or ``llama3`` maps onto ``model.rope_scaling``, other types are refused."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    scaling = None
    if kind in ("linear", "llama3"):
        keys = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                              if kind == "llama3" else ())
        scaling = {"type": kind, **{k: rope[k] for k in keys}}
    elif kind != "default":
        raise _unsupported(model_type, f"rope_type={kind!r} (supported: default, linear, llama3)")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return float(theta), float(rope.get("partial_rotary_factor", 1.0)), scaling


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


# ---------------------------------------------------------------------------- GPT-2
def gpt2_config(c: Any) -> TransformerConfig:
    if not getattr(c, "scale_attn_weights", True):
        raise _unsupported("gpt2", "scale_attn_weights=False")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        raise _unsupported("gpt2", "scale_attn_by_inverse_layer_idx=True")
    if getattr(c, "add_cross_attention", False):
        raise _unsupported("gpt2", "add_cross_attention=True")
    return TransformerConfig(
        vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
        d_ff=c.n_inner or 4 * c.n_embd, ffn_act=_activation("gpt2", c.activation_function),
        norm="layernorm", norm_eps=c.layer_norm_epsilon, pos="learned", max_seq_len=c.n_positions,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)), bias=True, lm_head_bias=False,
        block="preln", attention="softmax", dropout=0.0,
    )


def gpt2_weights(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    p, C = "transformer", cfg.d_model
    out = {"wte.weight": sd[f"{p}.wte.weight"], "wpe.weight": sd[f"{p}.wpe.weight"],
           "norm_f.weight": sd[f"{p}.ln_f.weight"], "norm_f.bias": sd[f"{p}.ln_f.bias"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}.h.{i}", f"blocks.{i}"
        qkv_w, qkv_b = _t(sd[f"{h}.attn.c_attn.weight"]), sd[f"{h}.attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            out[f"{b}.attn.{name}.weight"] = qkv_w[j * C:(j + 1) * C]
            out[f"{b}.attn.{name}.bias"] = qkv_b[j * C:(j + 1) * C]
        out[f"{b}.attn.o.weight"] = _t(sd[f"{h}.attn.c_proj.weight"])
        out[f"{b}.attn.o.bias"] = sd[f"{h}.attn.c_proj.bias"]
        out[f"{b}.mlp.ffn_in.weight"] = _t(sd[f"{h}.mlp.c_fc.weight"])
        out[f"{b}.mlp.ffn_in.bias"] = sd[f"{h}.mlp.c_fc.bias"]
        out[f"{b}.mlp.ffn_out.weight"] = _t(sd[f"{h}.mlp.c_proj.weight"])
        out[f"{b}.mlp.ffn_out.bias"] = sd[f"{h}.mlp.c_proj.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{b}.{ours}.weight"] = sd[f"{h}.{theirs}.weight"]
            out[f"{b}.{ours}.bias"] = sd[f"{h}.{theirs}.bias"]
    out["lm_head.weight"] = sd.get("lm_head.weight", out["wte.weight"])
    return out


# ---------------------------------------------------------------------------- GPT-NeoX
def gpt_neox_config(c: Any) -> TransformerConfig:
    # LayerNorms and MLP linears always carry biases in GPT-NeoX; the attention's follow `attention_bias`.
    theta, pct, scaling = _rope("gpt_neox", c)
    return TransformerConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, d_ff=c.intermediate_size, ffn_act=_activation("gpt_neox", c.hidden_act),
        norm="layernorm", norm_eps=c.layer_norm_eps, pos="rope", rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
        max_seq_len=c.max_position_embeddings, tie_embeddings=bool(c.tie_word_embeddings), bias=True,
        attn_bias=bool(getattr(c, "attention_bias", True)),
        lm_head_bias=False, block="neox_parallel" if c.use_parallel_residual else "preln",
        attention="softmax", dropout=0.0,
    )


def gpt_neox_weights(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    p, C, H, D = "gpt_neox", cfg.d_model, cfg.n_heads, cfg.head_dim
    out = {"wte.weight": sd[f"{p}.embed_in.weight"],
           "norm_f.weight": sd[f"{p}.final_layer_norm.weight"], "norm_f.bias": sd[f"{p}.final_layer_norm.bias"]}
    for i in range(cfg.n_layers):
        h, b = f"{p}.layers.{i}", f"blocks.{i}"
        # rows of query_key_value are (H, 3, D): per head [q_h; k_h; v_h]
        attn_bias = cfg.linear_bias("q")
        qkv_w = sd[f"{h}.attention.query_key_value.weight"].view(H, 3, D, C)
        for j, name in enumerate("qkv"):
            out[f"{b}.attn.{name}.weight"] = qkv_w[:, j].reshape(C, C)
            if attn_bias:
                out[f"{b}.attn.{name}.bias"] = sd[f"{h}.attention.query_key_value.bias"].view(H, 3, D)[:, j].reshape(C)
        for ours, theirs in (("attn.o", "attention.dense"), ("mlp.ffn_in", "mlp.dense_h_to_4h"),
                             ("mlp.ffn_out", "mlp.dense_4h_to_h"), ("norm1", "input_layernorm"),
                             ("norm2", "post_attention_layernorm")):
            out[f"{b}.{ours}.weight"] = sd[f"{h}.{theirs}.weight"]
            if ours != "attn.o" or attn_bias:
                out[f"{b}.{ours}.bias"] = sd[f"{h}.{theirs}.bias"]
    out["lm_head.weight"] = sd.get("lm_head.weight", sd.get("embed_out.weight"))
    return out


# ---------------------------------------------------------------------------- Llama
def llama_config(c: Any) -> TransformerConfig:
    heads = c.num_attention_heads
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // heads):
        raise _unsupported("llama", f"head_dim={c.head_dim} != hidden_size / num_attention_heads")
    attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    if c.hidden_act != "silu":
        raise _unsupported("llama", f"hidden_act={c.hidden_act!r} (only silu → SwiGLU)")
    theta, pct, scaling = _rope("llama", c)
    return TransformerConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=heads,
        n_kv_heads=c.num_key_value_heads or heads, d_ff=c.intermediate_size, ffn_act="swiglu",
        norm="rmsnorm", norm_eps=c.rms_norm_eps, pos="rope", rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
        max_seq_len=c.max_position_embeddings, tie_embeddings=bool(c.tie_word_embeddings), bias=False,
        attn_bias=attn_bias, mlp_bias=mlp_bias, lm_head_bias=False, block="preln", attention="softmax", dropout=0.0,
    )


def llama_weights(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    p = "model"
    out = {"wte.weight": sd[f"{p}.embed_tokens.weight"], "norm_f.weight": sd[f"{p}.norm.weight"]}
    attn_suffixes = ("weight", "bias") if cfg.linear_bias("q") else ("weight",)
    mlp_suffixes = ("weight", "bias") if cfg.linear_bias("ffn_in") else ("weight",)
    for i in range(cfg.n_layers):
        h, b = f"{p}.layers.{i}", f"blocks.{i}"
        for s in attn_suffixes:
            for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
                out[f"{b}.attn.{ours}.{s}"] = sd[f"{h}.self_attn.{theirs}.{s}"]
        for s in mlp_suffixes:
            out[f"{b}.mlp.ffn_in.{s}"] = torch.cat((sd[f"{h}.mlp.gate_proj.{s}"], sd[f"{h}.mlp.up_proj.{s}"]))
            out[f"{b}.mlp.ffn_out.{s}"] = sd[f"{h}.mlp.down_proj.{s}"]
        out[f"{b}.norm1.weight"] = sd[f"{h}.input_layernorm.weight"]
        out[f"{b}.norm2.weight"] = sd[f"{h}.post_attention_layernorm.weight"]
    out["lm_head.weight"] = sd.get("lm_head.weight", out["wte.weight"])
    return out


CONVERTERS = {
    "gpt2": (gpt2_config, gpt2_weights),
    "gpt_neox": (gpt_neox_config, gpt_neox_weights),
    "llama": (llama_config, llama_weights),
}


# ---------------------------------------------------------------------------- entry point
def _check_folder(path: Path) -> str:
    """The ``model_type`` of a Hugging Face model folder, or an :class:`UnsupportedModelError`."""
    if not path.is_dir():
        raise UnsupportedModelError(f"{path} is not a folder; expected a Hugging Face model folder "
                                    f"(config.json + weights) of {', '.join(SUPPORTED)}")
    file = path / "config.json"
    if not file.exists():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
        raise UnsupportedModelError(f"{path} has no config.json (found: {found}); expected a Hugging Face "
                                    f"model folder of {', '.join(SUPPORTED)}")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UnsupportedModelError(f"{file} is not a valid config.json: {e}") from None
    if model_type not in (*SUPPORTED, "leanformer"):
        raise UnsupportedModelError(f"{path}: model_type={model_type!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED)} (and leanformer exports)")
    return model_type


def load_hf_model(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A supported Hugging Face causal LM loaded from a local folder (nothing is downloaded)."""
    path = Path(path)
    _check_folder(path)
    from transformers import AutoModelForCausalLM

    import leanformer.hf.modeling  # noqa: F401  (registers model_type "leanformer")

    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", local_files_only=True)
    except (OSError, SafetensorError) as e:  # SafetensorError: a truncated or damaged .safetensors file
        raise UnsupportedModelError(f"{path}: could not load the weights (model.safetensors or the other weight "
                                    f"files): {e}") from None


def from_hf(model_or_path: Any, dtype: torch.dtype | None = None) -> TransformerLM:
    """A :class:`TransformerLM` whose logits equal those of a Hugging Face GPT-2, GPT-NeoX or Llama model.

    ``model_or_path``: a ``transformers`` model instance or a local folder (``config.json`` + weights).
    ``dtype``: the result's dtype (default: the source model's). A leanformer export comes back as is.
    """
    hf = load_hf_model(model_or_path, dtype) if isinstance(model_or_path, (str, Path)) else model_or_path
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "leanformer":
        model = hf.model
    else:
        if model_type not in CONVERTERS:
            raise UnsupportedModelError(f"{type(hf).__name__} (model_type={model_type!r}) is not supported; "
                                        f"supported: {', '.join(SUPPORTED)}")
        make_config, make_weights = CONVERTERS[model_type]
        cfg = make_config(config)
        state = make_weights(hf.state_dict(), cfg)
        src_dtype = next(hf.parameters()).dtype
        model = TransformerLM(cfg).to(src_dtype)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or result.unexpected_keys:
            raise UnsupportedModelError(f"{model_type}: weights do not fit: missing {missing[:3]}, "
                                        f"unexpected {result.unexpected_keys[:3]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
