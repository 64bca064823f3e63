"""Our model as a Hugging Face causal LM: ``LeanformerConfig`` + ``LeanformerForCausalLM``, Auto-registered.

``LeanformerForCausalLM`` wraps a :class:`TransformerLM` (any block, attention and NOBLE setting) as
``self.model``; its state-dict keys are ours with a ``model.`` prefix. On CUDA, a plain ``generate()``
(greedy or sampling with temperature / top-k / top-p, one sequence per prompt, EOS and padding as Hugging
Face does them) runs our static decoder (:mod:`leanformer.decoding`: pre-allocated caches, the step a CUDA
graph); anything else (beams, logits processors, streamers, returned scores...) and the CPU go through
Hugging Face's loop, with our own per-layer state (KV cache for softmax/shaped attention, the recurrent
state ``S, n`` for DiJiang) carried between steps in ``past_key_values`` as a :class:`LeanformerCache`.

Importing this module registers ``model_type="leanformer"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(folder)`` works after
``leanformer.hf.register()`` or the first use of any name of :mod:`leanformer.hf`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from leanformer.config import TransformerConfig, from_dict, to_dict
from leanformer.model import DecodeCache, TransformerLM


class LeanformerConfig(PreTrainedConfig):
    """A Hugging Face config holding our :class:`TransformerConfig` as the dict ``leanformer``.

    The usual Hugging Face names (``hidden_size``, ``max_position_embeddings``...) are filled from it,
    read-only in spirit: tools such as lm-evaluation-harness look at them.
    """

    model_type = "leanformer"

    leanformer: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        cfg = self.transformer_config()
        self.leanformer = to_dict(cfg)
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.d_model
        self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
        self.max_position_embeddings = cfg.max_seq_len
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    def transformer_config(self) -> TransformerConfig:
        """The validated :class:`TransformerConfig` this config holds."""
        if self.leanformer is None:
            return TransformerConfig().validate()
        return from_dict(TransformerConfig, dict(self.leanformer), prefix="leanformer.").validate()

    @classmethod
    def from_transformer_config(cls, cfg: TransformerConfig, **kwargs) -> LeanformerConfig:
        return cls(leanformer=to_dict(cfg), **kwargs)


class LeanformerCache(Cache):
    """Our :class:`DecodeCache` (per-layer dicts + position) behind Hugging Face's ``Cache`` interface.

    Holds whatever each attention type keeps: ``k, v`` (B, H_kv, T, D) for softmax and shaped attention,
    ``S`` (B, H, m, d) and ``n`` (B, H) for DiJiang. It cannot be cropped (a recurrent state has no
    undo), so assisted / speculative decoding is refused.
    """

    def __init__(self, decode: DecodeCache):
        super().__init__(layers=[])
        self.decode = decode

    def __len__(self) -> int:
        return len(self.decode.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decode.pos

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.decode.pos + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.decode.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.decode.reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for state in self.decode.layers:
            for key, t in state.items():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    state[key] = t.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LeanformerCache cannot be cropped (recurrent state); "
                                  "assisted / speculative decoding is not supported")

    def reset(self) -> None:
        self.decode = DecodeCache(len(self.decode.layers))

    def activate_past_recording(self) -> None:
        pass

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.decode.pos > 0

    @property
    def batch_size(self) -> int:
        for state in self.decode.layers:
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    return t.shape[0]
        return 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)


class LeanformerPreTrainedModel(PreTrainedModel):
    config_class = LeanformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True  # the cache cannot be rolled back: no assisted generation
    _no_split_modules: list[str] = []

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only reached for tensors a checkpoint did not provide (``from_pretrained`` builds on the meta
        device): plain layers get the generic init; the weights of a fresh model come from
        ``TransformerLM.reset_parameters`` and are never touched here (the rotary table is no tensor of the
        model's: it is computed on the CPU at construction, also under the meta device)."""
        super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our forward makes its own LeanformerCache


class LeanformerForCausalLM(LeanformerPreTrainedModel, GenerationMixin):
    """A :class:`TransformerLM` as ``AutoModelForCausalLM``: logits, loss (labels = input ids, shifted
    here as Hugging Face does) and ``generate()`` with our decoding caches."""

    _tied_weights_keys = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: LeanformerConfig, model: TransformerLM | None = None):
        super().__init__(config)
        self.model = model if model is not None else _build(config.transformer_config())
        if next(self.model.parameters()).device.type != "meta":
            # A fresh model is initialised by TransformerLM.reset_parameters: keep HF's init off it, except
            # for modules with non-persistent buffers (the rotary table), which _init_weights recomputes.
            for m in self.model.modules():
                if not any(n in m._non_persistent_buffers_set for n, _ in m.named_buffers(recurse=False)):
                    m._is_hf_initialized = True
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.wte

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: LeanformerCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids (B, T) → logits (B, T, V) (the last ``logits_to_keep`` positions if > 0).

        ``past_key_values``: a :class:`LeanformerCache`; ``input_ids`` then holds only the new tokens.
        ``attention_mask`` may only mark right padding (which cannot change earlier positions) and never
        together with a cache. ``position_ids`` are ignored: positions follow the cache.
        """
        if input_ids is None:
            raise ValueError("LeanformerForCausalLM needs input_ids (inputs_embeds is not supported)")
        if past_key_values is None:  # transformers >= 5.2x names it ``cache``
            past_key_values = kwargs.pop("cache", None)
        if past_key_values is not None and not isinstance(past_key_values, LeanformerCache):
            raise ValueError(f"past_key_values must be a LeanformerCache, got {type(past_key_values).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = LeanformerCache(self.model.new_cache())
        _check_mask(attention_mask, past_key_values)
        cache = past_key_values.decode if past_key_values is not None else None
        logits, _ = self.model(input_ids, cache=cache)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_OUTPUT_CACHE_FIELD: past_key_values if use_cache else None})


    # Generation settings the static decoder reproduces; any other non-default one means Hugging Face's loop.
    _STATIC_KWARGS = frozenset({"input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample",
                                "temperature", "top_k", "top_p", "pad_token_id", "eos_token_id",
                                "bos_token_id", "use_cache", "generation_config"})

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None,
                 static_decoding: bool | None = None, **kwargs: Any):
        """Hugging Face's ``generate``; a plain greedy / sampling call on CUDA (or any device with
        ``static_decoding=True``) runs :meth:`TransformerLM.generate`'s static, CUDA-graph path instead and
        returns the same ``(B, T + new)`` token tensor (EOS: later tokens become ``pad_token_id`` and the
        output stops once every row has ended, as Hugging Face's loop does). ``static_decoding=False``
        forces Hugging Face's loop."""
        if static_decoding is not False:
            out = self._static_generate(inputs, generation_config, kwargs, force=bool(static_decoding))
            if out is not None:
                return out
        return super().generate(inputs, generation_config, **kwargs)

    def _static_generate(self, inputs, generation_config, kwargs: dict, force: bool) -> torch.Tensor | None:
        import copy

        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
            return None
        if not (force or ids.is_cuda) or set(kwargs) - self._STATIC_KWARGS:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return None
        gc = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        unused = gc.update(**{k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask",
                                                                            "generation_config")})
        if unused:
            return None
        plain = all(getattr(gc, name, default) in allowed for name, default, allowed in _PLAIN_GENERATION)
        if not plain:
            return None
        T = ids.shape[1]
        new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - T
        if new <= 0:
            return None
        if gc.do_sample:
            sampling = dict(temperature=gc.temperature if gc.temperature is not None else 1.0,
                            top_k=gc.top_k or None, top_p=gc.top_p if gc.top_p not in (None, 1.0) else None)
        else:
            sampling = dict(temperature=0.0)
        out = self.model.generate(ids, new, static=True, **sampling)
        eos = gc.eos_token_id
        if eos is None:
            return out
        return _finish_at_eos(out, T, eos, gc.pad_token_id)


# (setting, its value when absent, the values the static decoder reproduces)
_PLAIN_GENERATION = (
    ("num_beams", 1, (None, 1)), ("num_return_sequences", 1, (None, 1)),
    ("return_dict_in_generate", False, (None, False)), ("output_scores", False, (None, False)),
    ("output_logits", False, (None, False)), ("repetition_penalty", 1.0, (None, 1.0)),
    ("no_repeat_ngram_size", 0, (None, 0)), ("min_length", 0, (None, 0)), ("min_new_tokens", None, (None, 0)),
    ("max_time", None, (None,)), ("stop_strings", None, (None,)), ("bad_words_ids", None, (None,)),
    ("suppress_tokens", None, (None,)), ("begin_suppress_tokens", None, (None,)),
    ("forced_eos_token_id", None, (None,)), ("forced_bos_token_id", None, (None,)), ("min_p", None, (None,)),
    ("typical_p", 1.0, (None, 1.0)), ("epsilon_cutoff", 0.0, (None, 0.0)), ("eta_cutoff", 0.0, (None, 0.0)),
    ("assistant_model", None, (None,)), ("prompt_lookup_num_tokens", None, (None,)),
    ("sequence_bias", None, (None,)), ("guidance_scale", None, (None, 1.0)), ("watermarking_config", None, (None,)),
    ("renormalize_logits", False, (None, False)), ("exponential_decay_length_penalty", None, (None,)),
    ("diversity_penalty", 0.0, (None, 0.0)), ("num_beam_groups", 1, (None, 1)),
    ("encoder_repetition_penalty", 1.0, (None, 1.0)), ("length_penalty", 1.0, (None, 1.0, 1)),
    ("top_h", None, (None,)),
)


def _finish_at_eos(out: torch.Tensor, prompt_len: int, eos: int | list[int] | torch.Tensor,
                   pad: int | None) -> torch.Tensor:
    """Hugging Face's end-of-sequence rule on a fixed-length output: after a row's first generated EOS its
    tokens become ``pad`` (EOS when there is none), and the output ends at the step every row has ended."""
    eos_ids = torch.as_tensor(eos, device=out.device).reshape(-1)
    gen = out[:, prompt_len:]
    is_eos = torch.isin(gen, eos_ids)
    ended = is_eos.cumsum(1) > 0
    after = ended & ~(is_eos & (is_eos.cumsum(1) == 1))  # strictly after the first EOS
    gen = gen.masked_fill(after, int(eos_ids[0]) if pad is None else pad)
    done = ended.all(0)
    if bool(done.any()):
        gen = gen[:, : int(done.nonzero()[0]) + 1]
    return torch.cat((out[:, :prompt_len], gen), dim=1)


# The output field that carries the cache: ``past_key_values`` until transformers 5.2x renamed it ``cache``.
_OUTPUT_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                       else "past_key_values")


def _build(cfg: TransformerConfig) -> TransformerLM:
    """``TransformerLM(cfg)``; on the meta device (``from_pretrained``) if every module can be built
    there, else on the CPU (a module that computes fixed tables at construction may not be meta-safe)."""
    if torch.get_default_device().type != "meta":
        return TransformerLM(cfg)
    try:
        return TransformerLM(cfg)
    except (RuntimeError, NotImplementedError):
        with torch.device("cpu"):
            return TransformerLM(cfg)


def _check_mask(mask: torch.Tensor | None, cache: LeanformerCache | None) -> None:
    """Allow no mask, all ones, or right padding before any decoding step; anything else is an error.

    Right padding cannot change the logits of the real tokens before it (causal attention); left padding
    would, and decoding after padded prompts would place new tokens behind the padding.
    """
    if mask is None or bool(mask.all()):
        return
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T) of ones and zeros, got shape {tuple(mask.shape)}")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("attention_mask has left padding or holes; only right padding is supported")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("padded batches cannot be decoded: generate from prompts of equal length "
                         "(or one prompt at a time)")


AutoConfig.register("leanformer", LeanformerConfig, exist_ok=True)
AutoModelForCausalLM.register(LeanformerConfig, LeanformerForCausalLM, exist_ok=True)
