"""Validated dataclass configs for the model and the trainer.

Every config is a plain ``@dataclass``. ``from_dict`` rejects unknown keys with the closest valid
name suggested, and ``validate`` checks the values that cannot work together (width not divisible by
heads, an unknown block type, ...). Errors are :class:`ConfigError`, one line each.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names it and what would be valid."""


def _choice(name: str, value: Any, valid: tuple | list) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


NOBLE_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@dataclass
class NobleConfig:
    """NOBLE branch settings (methods.md section 1): ``y = W x + b + W_up σ(W_down x + b_down)``."""

    enabled: bool = False
    targets: list[str] = field(default_factory=lambda: list(NOBLE_TARGETS))
    rank: int = 32
    rank_ratio: float | None = None  # the user document's rank = d_out * ratio (e.g. 0.25); overrides rank
    activation: str = "cosnet"  # cosnet | silu | gelu | tanh
    fusion: str = "add"  # add (paper) | gate (user document)
    dropout: float = 0.0  # on the branch (gate variant)
    alpha: float = 1.0  # output scale (gate variant)
    fused: bool = True  # one stacked matmul for [W; W_down]
    main_init: str = "paper"  # paper: W ~ N(0, 0.5/sqrt(d_in)) | model: W keeps the LM's GPT-2 init
    lr_mults: bool = True  # the official per-parameter learning-rate multipliers (False: all 1)

    def validate(self) -> None:
        for t in self.targets:
            _choice("noble.targets entry", t, NOBLE_TARGETS)
        _choice("noble.activation", self.activation, ("cosnet", "silu", "gelu", "tanh"))
        _choice("noble.fusion", self.fusion, ("add", "gate"))
        _choice("noble.main_init", self.main_init, ("paper", "model"))
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
    """Shaped attention / simplified blocks (methods.md section 2)."""

    alpha_init: float = 1.0  # identity weight α_h
    beta_init: float = 1.0  # softmax weight β_h
    gamma_init: float = 1.0  # centring weight γ_h
    beta_ff_init: float | None = None  # None: 0.1 * sqrt(18 / n_layers), the paper's O(1/sqrt(L))
    beta_sa_init: float = 1.0
    alpha_ff_init: float = 1.0


@dataclass
class DiJiangConfig:
    """DiJiang frequency-domain linear attention (methods.md section 3)."""

    feature_map: str = "paper"  # paper: D ⊙ exp(T C x) | official: softmax(x C T)
    feature_dim: int | None = None  # m; None = head dim
    learnable_decay: bool = False
    mode: str = "auto"  # auto | parallel | chunk | recurrent | fla
    chunk_size: int = 64
    # auto: parallel up to this length, chunk beyond; None: 256 on CPU, 1024 on CUDA (where the two forms
    # cross: CPU 128-256 tokens, H100 1-2K tokens; docs/benchmarks.md)
    parallel_max_len: int | None = None

    def validate(self) -> None:
        _choice("dijiang.feature_map", self.feature_map, ("paper", "official"))
        _choice("dijiang.mode", self.mode, ("auto", "parallel", "chunk", "recurrent", "fla"))
        if self.chunk_size < 1:
            raise ConfigError(f"dijiang.chunk_size={self.chunk_size} must be >= 1")
        if self.parallel_max_len is not None and self.parallel_max_len < 1:
            raise ConfigError(f"dijiang.parallel_max_len={self.parallel_max_len} must be >= 1 (or null: by device)")


BLOCKS = ("preln", "parallel", "neox_parallel", "sas", "sas_p", "vskipinit")
ATTENTIONS = ("softmax", "shaped", "dijiang")


@dataclass
class TransformerConfig:
    """A decoder-only language model.

    ``block`` picks the block wiring, ``attention`` the token mixer, ``noble`` the linear layers.
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
        _choice("model.block", self.block, BLOCKS)
        _choice("model.attention", self.attention, ATTENTIONS)
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
        if self.block in ("sas", "sas_p") and self.attention != "shaped":
            raise ConfigError(f"model.block={self.block} needs attention='shaped' (no value/output projection)")
        self.noble.validate()
        self.dijiang.validate()
        return self


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
    save_every: int = 0  # 0: only at the end
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA) | float32 | bfloat16
    compile: bool | str = "auto"  # auto: torch.compile on CUDA, eager on CPU | true | false
    peak_flops: float | None = None  # FLOP/s; None: looked up for known GPUs
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    distill_weight: float = 0.0  # KL to a teacher's logits (DiJiang conversion)
    distill_temperature: float = 1.0
    progress: bool = True

    def validate(self) -> TrainConfig:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("train.distributed", self.distributed, ("ddp", "fsdp"))
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"train.compile={self.compile!r} is not valid; choose auto, true or false")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        return self


@dataclass
class DataConfig:
    """Where tokens come from; ``path=None`` is the built-in corpus (the Python standard library)."""

    path: str | None = None
    text_field: str = "text"  # for JSONL
    tokenizer: str | None = None  # a tokenizer.json; None: train a byte-level BPE
    vocab_size: int = 4096
    val_fraction: float = 0.05
    max_files: int | None = None  # cap the built-in corpus (tests)
    cache_dir: str | None = None  # None: ~/.cache/leanformer

    def validate(self) -> DataConfig:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
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
        return self


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        sub = _dataclass_type(cls, key)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, prefix=f"{prefix}{key}.")
        elif key == "betas" and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


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
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value
