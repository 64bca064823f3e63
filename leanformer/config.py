"""Validated dataclass configs for the model and the trainer.

Every config is a plain ``@dataclass``. ``from_dict`` rejects unknown keys with the closest valid
name suggested, and ``validate`` checks the values that cannot work together (width not divisible by
heads, an unknown block type, ...). Errors are :class:`ConfigError`, one line each.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names it and what would be valid."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # train.compile_mode
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs on CUDA


def _choice(name: str, value: Any, valid: tuple | list) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


NOBLE_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@dataclass
class NobleConfig:
    """NOBLE branch settings (docs/methods.md, section 1): ``y = W x + b + W_up σ(W_down x + b_down)``."""

    enabled: bool = False
    targets: list[str] = field(default_factory=lambda: list(NOBLE_TARGETS))
    rank: int = 32
    rank_ratio: float | None = None  # rank = d_out * ratio (a write-up's 0.25); overrides rank
    activation: str = "cosnet"  # cosnet | silu | gelu | tanh
    fusion: str = "add"  # add (paper) | gate (docs/methods.md, section 1)
    dropout: float = 0.0  # on the branch (gate variant)
    alpha: float = 1.0  # output scale (gate variant)
    fused: bool = True  # one stacked matmul for [W; W_down]
    main_init: str = "paper"  # paper: W ~ N(0, 0.5/sqrt(d_in)) | model: W keeps the LM's GPT-2 init
    lr_mults: bool = True  # the official per-parameter learning-rate multipliers (False: all 1)
    # under torch.compile: stacked | kcat ([x, σ(z)] [W, W_up]ᵀ; faster under CUDA graphs, slower without:
    # leanformer/layers/noble.py, docs/benchmarks.md 2026-12-05)
    compiled_form: str = "stacked"

    def validate(self) -> None:
        for t in self.targets:
            _choice("noble.targets entry", t, NOBLE_TARGETS)
        _choice("noble.activation", self.activation, ("cosnet", "silu", "gelu", "tanh"))
        _choice("noble.fusion", self.fusion, ("add", "gate"))
        _choice("noble.main_init", self.main_init, ("paper", "model"))
        _choice("noble.compiled_form", self.compiled_form, ("stacked", "kcat"))
        if self.compiled_form == "kcat" and (not self.fused or self.fusion != "add" or self.dropout > 0):
            raise ConfigError("noble.compiled_form=kcat computes the fused plain sum: it needs noble.fused=true, "
                              "noble.fusion=add and noble.dropout=0")
        if self.rank < 1:
            raise ConfigError(f"noble.rank={self.rank} must be >= 1")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise ConfigError(f"noble.rank_ratio={self.rank_ratio} must be in (0, 1]")
        if self.fusion == "add" and self.alpha != 1.0:
            raise ConfigError(f"noble.alpha={self.alpha} only applies to noble.fusion='gate'; leave it 1.0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"noble.dropout={self.dropout} must be in [0, 1)")


@dataclass
class ShapedConfig:
    """Shaped attention / simplified blocks (docs/methods.md, section 2)."""

    alpha_init: float = 1.0  # identity weight α_h
    beta_init: float = 1.0  # softmax weight β_h
    gamma_init: float = 1.0  # centring weight γ_h
    beta_ff_init: float | None = None  # None: 0.1 * sqrt(18 / n_layers), the paper's O(1/sqrt(L))
    beta_sa_init: float = 1.0
    alpha_ff_init: float = 1.0


@dataclass
class DiJiangConfig:
    """DiJiang frequency-domain linear attention (docs/methods.md, section 3)."""

    feature_map: str = "paper"  # paper: D ⊙ exp(T C x) | official: softmax(x C T)
    feature_dim: int | None = None  # m; None = head dim
    learnable_decay: bool = False
    mode: str = "auto"  # auto | parallel | chunk | recurrent | fla | fused (Triton kernel, CUDA) | gated (fla's
    # forward kernel with one gate per token, CUDA; its backward three more forward passes: ops/gated_attention.py)
    chunk_size: int = 64
    # auto, a full pass: parallel up to this length, chunk (CUDA: fla's kernel, or the fused one without fla)
    # beyond; None: 256 on CPU, 1024 on CUDA (where the two forms cross: CPU 128-256 tokens, H100 1-2K tokens)
    parallel_max_len: int | None = None
    # auto on CUDA with Triton and bf16/fp16 features: the fused kernel up to this length (full passes and
    # prompts continuing a state), then as above; None: leanformer.layers.dijiang.FUSED_MAX_LEN, 4096 (a lone
    # 4K call's wall time was lower than fla's and lost from 8K, on an H200 and an H100, though fla's GPU time
    # was already lower at 4K; the feature-map kernels widen that GPU gap: docs/benchmarks.md)
    fused_max_len: int | None = None

    def validate(self) -> None:
        _choice("dijiang.feature_map", self.feature_map, ("paper", "official"))
        _choice("dijiang.mode", self.mode, ("auto", "parallel", "chunk", "recurrent", "fla", "fused", "gated"))
        if self.chunk_size < 1:
            raise ConfigError(f"dijiang.chunk_size={self.chunk_size} must be >= 1")
        for name in ("parallel_max_len", "fused_max_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"dijiang.{name}={value} must be >= 1 (or null: the default)")


@dataclass
class TransformerConfig:
    """A decoder-only language model, or (``causal: false``) a bidirectional encoder.

    ``block`` picks the block wiring, ``attention`` the token mixer, ``noble`` the linear layers.
    ``causal`` picks the attention pattern: true, each position sees itself and the positions before it
    (a language model that decodes); false, every position sees the whole sequence (an encoder, trained
    with masked language modelling and read through :meth:`TransformerLM.features`; it cannot decode).
    Family options (``bias``, ``rotary_pct``, ``n_kv_heads``, ``pos="learned"``...) let Hugging Face
    GPT-2 / GPT-NeoX / Llama models be expressed exactly.
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    d_ff: int | None = None  # None: 4 * d_model (8/3 * d_model rounded to 64 for swiglu)
    ffn_act: str = "gelu"  # relu | gelu | gelu_tanh | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm | none
    norm_eps: float = 1e-5
    pos: str = "rope"  # rope | learned | none
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of each head rotated (Pythia: 0.25)
    rope_scaling: dict | None = None  # {"type": "linear"|"llama3", "factor": ..., ...}: see layers/rope.py
    max_seq_len: int = 256
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False  # biases on attention and FFN linears and on LayerNorm
    attn_bias: bool | None = None  # q, k, v, o biases; None: follow `bias`
    mlp_bias: bool | None = None  # ffn_in, ffn_out biases; None: follow `bias`
    norm_bias: bool | None = None  # LayerNorm biases; None: follow `bias`
    lm_head_bias: bool = False
    init_std: float = 0.02
    block: str = "preln"
    attention: str = "softmax"
    causal: bool = True  # false: a bidirectional encoder (softmax or shaped attention; no decoding)
    noble: NobleConfig = field(default_factory=NobleConfig)
    shaped: ShapedConfig = field(default_factory=ShapedConfig)
    dijiang: DiJiangConfig = field(default_factory=DiJiangConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def linear_bias(self, role: str) -> bool:
        """Whether the projection of ``role`` (q, k, v, o, ffn_in, ffn_out, ...) has a bias."""
        specific = {"q": self.attn_bias, "k": self.attn_bias, "v": self.attn_bias, "o": self.attn_bias,
                    "ffn_in": self.mlp_bias, "ffn_out": self.mlp_bias}.get(role)
        return self.bias if specific is None else specific

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn_act == "swiglu":
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model

    def _check_registered(self) -> None:
        """``block`` and ``attention`` name registered types (:mod:`leanformer.registry`) that fit together."""
        from leanformer import registry

        _choice("model.block", self.block, list(registry.BLOCKS))
        _choice("model.attention", self.attention, list(registry.ATTENTIONS))
        allowed = registry.BLOCKS[self.block].attentions
        if allowed is not None and self.attention not in allowed:
            raise ConfigError(f"model.block={self.block} needs attention={' or '.join(map(repr, allowed))}, "
                              f"got {self.attention!r}")
        if not self.causal and not registry.ATTENTIONS[self.attention].bidirectional:
            both = [name for name, spec in registry.ATTENTIONS.items() if spec.bidirectional]
            raise ConfigError(f"model.causal=false (an encoder) needs a bidirectional attention; "
                              f"model.attention={self.attention!r} is causal only; choose one of "
                              f"{', '.join(both)} (or model.causal=true)")

    def require_causal(self, what: str) -> None:
        """Raise :class:`ConfigError` when this is an encoder (``causal: false``): ``what`` needs a decoder."""
        if not self.causal:
            raise ConfigError(f"{what} needs a causal language model; this one is an encoder "
                              "(model.causal=false), which sees the whole sequence and cannot decode")

    def validate(self) -> TransformerConfig:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        _choice("model.ffn_act", self.ffn_act, ("relu", "gelu", "gelu_tanh", "swiglu"))
        _choice("model.norm", self.norm, ("layernorm", "rmsnorm", "none"))
        _choice("model.pos", self.pos, ("rope", "learned", "none"))
        self._check_registered()
        if not 0 < self.rotary_pct <= 1:
            raise ConfigError(f"model.rotary_pct={self.rotary_pct} must be in (0, 1]")
        if self.pos == "rope" and int(self.head_dim * self.rotary_pct) % 2:
            raise ConfigError(f"rotary dims {int(self.head_dim * self.rotary_pct)} must be even")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type")
            _choice("model.rope_scaling.type", kind, ("linear", "llama3"))
            needed = {"factor"} | ({"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
                                   if kind == "llama3" else set())
            missing = sorted(needed - set(self.rope_scaling))
            if missing:
                raise ConfigError(f"model.rope_scaling of type {kind} needs {', '.join(missing)}")
        self.noble.validate()
        self.dijiang.validate()
        return self


OBJECTIVES = ("auto", "clm", "mlm")


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpointing."""

    steps: int = 200
    batch_size: int = 16  # sequences per micro-batch per process
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # also save every N steps (0: by time and at the end only)
    save_every_minutes: float = 10.0  # save when this much wall time has passed since the last save (0: off)
    seed: int = 1337
    sampling: str = "random"  # random: windows at random offsets | epoch: disjoint windows, shuffled per pass
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA) | float32 | bfloat16
    compile: bool | str = "auto"  # auto: torch.compile on CUDA, eager on CPU | true | false
    # torch.compile's mode: default | reduce-overhead (CUDA graphs; one process, grad_accum 1: bench's GPT-2 small
    # step b16 on an H100, 2026-12-05, Pre-LN 39.42 -> 39.25 ms, NOBLE kcat 90.44 -> 54.75, docs/benchmarks.md)
    # | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    peak_flops: float | None = None  # FLOP/s; None: looked up for known GPUs
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    distill_weight: float = 0.0  # KL to a teacher's logits (DiJiang conversion)
    distill_temperature: float = 1.0
    # auto: clm (next-token prediction) for a causal model, mlm (masked language modelling) for an encoder
    objective: str = "auto"  # auto | clm | mlm
    mask_rate: float = 0.15  # mlm: fraction of positions predicted (BERT 0.15; crammed BERT 0.25)
    progress: bool = True

    def validate(self) -> TrainConfig:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("save_every", "save_every_minutes", "grad_clip", "weight_decay", "distill_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0 (0: off)")
        for name in ("warmup_frac", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1]")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={list(self.betas)} must both be in [0, 1)")
        if self.distill_temperature <= 0:
            raise ConfigError(f"train.distill_temperature={self.distill_temperature} must be > 0")
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train.sampling", self.sampling, ("random", "epoch"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("train.distributed", self.distributed, ("ddp", "fsdp"))
        _choice("train.objective", self.objective, OBJECTIVES)
        if not 0 < self.mask_rate < 1:
            raise ConfigError(f"train.mask_rate={self.mask_rate} must be in (0, 1)")
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"train.compile={self.compile!r} is not valid; choose auto, true or false")
        _choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        return self


@dataclass
class DataConfig:
    """Where tokens come from; ``path=None`` is the built-in corpus (the Python standard library)."""

    path: str | None = None
    builtin: str = "stdlib"  # the corpus when path is null: stdlib | site (installed packages) | all
    text_field: str = "text"  # for JSONL
    tokenizer: str | None = None  # a tokenizer.json; None: train a byte-level BPE
    vocab_size: int = 4096
    val_fraction: float = 0.05
    max_files: int | None = None  # cap the built-in corpus (tests)
    max_chars: int | None = None  # cap the built-in corpus: whole files, drawn by a hash of their path
    tokenizer_chars: int | None = None  # train the BPE on this many characters of the train split (None: all)
    cache_dir: str | None = None  # None: ~/.cache/leanformer

    def validate(self) -> DataConfig:
        _choice("data.builtin", self.builtin, ("stdlib", "site", "all"))
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("max_chars", "tokenizer_chars"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1 (or null: no cap)")
        if self.vocab_size < 260:
            raise ConfigError(f"data.vocab_size={self.vocab_size} must be >= 260 (256 bytes + specials)")
        return self


@dataclass
class RunConfig:
    """Everything a ``leanformer train`` run reads from its YAML file."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        if self.train.seq_len > self.model.max_seq_len and self.model.pos == "learned":
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        objective = self.train.objective
        if objective == "mlm" and self.model.causal:
            raise ConfigError("train.objective=mlm needs an encoder (model.causal=false): a causal model "
                              "cannot see the masked tokens' right context; use train.objective=clm or auto")
        if objective == "clm" and not self.model.causal:
            raise ConfigError("train.objective=clm needs model.causal=true: an encoder sees the next token "
                              "it would predict; use train.objective=mlm or auto")
        if self.objective == "mlm" and self.train.distill_weight > 0:
            raise ConfigError(f"train.distill_weight={self.train.distill_weight} (distillation) needs "
                              "train.objective=clm; set it to 0 for masked language modelling")
        return self

    @property
    def objective(self) -> str:
        """The training objective ``train.objective`` resolves to: ``clm`` or ``mlm`` (auto: by ``model.causal``)."""
        if self.train.objective != "auto":
            return self.train.objective
        return "clm" if self.model.causal else "mlm"


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion and values of
    the wrong type (one :class:`ConfigError` naming the key, the value and the type it needs).

    Numbers are checked as a YAML user means them: an integer field takes only integers (``2.5`` and
    ``128.0`` are errors), a float field takes integers and numeric strings (PyYAML reads ``1e-3`` as a
    string), and must be finite; a bool field takes only true/false.
    """
    if not isinstance(data, dict):
        what = f"section '{prefix[:-1]}'" if prefix else "a config"
        raise ConfigError(f"{what} must be a mapping of keys to values, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        sub = _dataclass_type(cls, key)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{key}' is a section: it must be a mapping of keys to values, "
                                  f"got {_shown(value)}")
            value = from_dict(sub, value, prefix=f"{prefix}{key}.")
        else:
            value = _coerce(value, hints[key], f"{prefix}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked (and, for numbers, converted) against the field type ``hint``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) > 1:  # e.g. bool | str: the first member that takes the value
            errors = []
            for member in members:
                try:
                    return _coerce(value, member, name)
                except ConfigError as e:
                    errors.append(str(e).split(" must be ", 1)[-1])
            raise ConfigError(f"{name}={value!r} must be {' or '.join(errors)}")
        (hint,) = members
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{name}={value!r} must be {what}")

    if origin is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if origin is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(v, args[0], f"{name} entry") for v in value] if args else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{name} entry") for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    return value


_NESTED = {
    (TransformerConfig, "noble"): NobleConfig,
    (TransformerConfig, "shaped"): ShapedConfig,
    (TransformerConfig, "dijiang"): DiJiangConfig,
    (RunConfig, "model"): TransformerConfig,
    (RunConfig, "train"): TrainConfig,
    (RunConfig, "data"): DataConfig,
}


def _dataclass_type(cls: type, key: str) -> type | None:
    return _NESTED.get((cls, key))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (YAML/JSON serialisable) of a config dataclass."""
    out = dataclasses.asdict(cfg)
    return _listify(out)


def _listify(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_listify(v) for v in obj]
    return obj


def set_dotted(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` override to a nested dict; the value is parsed as YAML."""
    import yaml

    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: the key {key!r} must be dotted names such as train.steps")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({first}); quote it, "
                          f"e.g. {key}='\"{raw}\"'") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
    node[parts[-1]] = value
