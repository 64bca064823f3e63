"""The arms: every model variant that ``leanformer compare`` trains and ``leanformer bench`` times, by name.

An arm is a transform of the baseline model config (``preln``: Pre-LN block, softmax attention); every
other field (width, depth, heads, sequence length, data, seed, tokens) stays the baseline's, so the arms
differ only in block wiring, attention or linear layers (docs/methods.md). A new arm is one entry of
:data:`ARMS`; compare and bench (and ``benchmarks/gpu_check.py``) take it from here.

One arm is not trained from scratch: ``dijiang_convert`` is the finished ``preln`` model converted to
DiJiang attention (:func:`leanformer.convert.convert_to_dijiang`) and fine-tuned on a fraction of its
tokens with the DiJiang recipe (Chen et al. 2024, section 4; official code: AdamW, betas (0.9, 0.95),
weight decay 0.1, cosine schedule), which :attr:`Arm.recipe` holds; :func:`leanformer.compare.runs.finetune_config`
adds the parts a comparison preset sets (tokens, learning rate, warm-up, distillation).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from leanformer.config import ConfigError, RunConfig, TransformerConfig
from leanformer.registry import attention_spec, block_spec, layer_path

if TYPE_CHECKING:
    import torch

BASELINE = "preln"


def _block(block: str, attention: str) -> Callable[[TransformerConfig], None]:
    def transform(c: TransformerConfig) -> None:
        c.block, c.attention = block, attention
    return transform


def _noble(block: str = "preln", attention: str = "softmax", **options: Any) -> Callable[[TransformerConfig], None]:
    """NOBLE branches on the six linears of ``block``; ``options`` set other :class:`NobleConfig` fields."""
    def transform(c: TransformerConfig) -> None:
        c.block, c.attention = block, attention
        c.noble.enabled = True
        for key, value in options.items():
            setattr(c.noble, key, value)
    return transform


def _sas_p_nonorm(c: TransformerConfig) -> None:
    c.block, c.attention = "sas_p", "shaped"
    c.norm = "none"  # block norms become identity except layer 0's; the final norm stays


def _sas_p_nonorm_untied(c: TransformerConfig) -> None:
    _sas_p_nonorm(c)
    c.tie_embeddings = False  # tied, SAS-P predicts its input token at init (benchmarks/sas_p_init_loss.py)


def _dijiang(mode: str | None = None) -> Callable[[TransformerConfig], None]:
    """Pre-LN with DiJiang attention; ``mode`` pins the decayed-linear-attention form (None: the config's)."""
    def transform(c: TransformerConfig) -> None:
        c.block, c.attention = "preln", "dijiang"
        if mode is not None:
            c.dijiang.mode = mode
    return transform


@dataclass(frozen=True)
class Arm:
    """One arm: its name, what it is, and the transform of the baseline model config that makes it.

    ``parent``: the arm is not trained from scratch but converted from this arm's finished model, then
    fine-tuned with ``recipe`` (train-config overrides) on top of the comparison's fine-tune settings.
    """

    name: str
    description: str
    model: Callable[[TransformerConfig], None]
    parent: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("preln", "baseline: Pre-LN block, softmax attention", _block("preln", "softmax")),
    Arm("noble", "Pre-LN + NOBLE branches on q, k, v, o, ffn_in, ffn_out", _noble()),
    Arm("noble_silu", "Pre-LN + NOBLE with SiLU branches and the LM's own init (the ablation's recipe)",
        _noble(activation="silu", main_init="model")),
    Arm("sas", "SAS block (shaped attention, no V/P, no attention skip)", _block("sas", "shaped")),
    Arm("sas_p", "SAS-P block (parallel, no skip at all)", _block("sas_p", "shaped")),
    Arm("sas_p_nonorm", "SAS-P without block norms (layer 0's and the final norm kept)", _sas_p_nonorm),
    Arm("sas_p_nonorm_untied", "SAS-P without block norms, untied embeddings (not the paper's: a test of why "
        "the tied one diverges at GPT-2 scale)", _sas_p_nonorm_untied),
    Arm("sas_p+noble", "SAS-P + NOBLE branches", _noble("sas_p", "shaped")),
    Arm("dijiang_convert", "DiJiang converted from the finished preln model, fine-tuned", _dijiang(),
        parent=BASELINE, recipe={"betas": (0.9, 0.95), "weight_decay": 0.1, "schedule": "cosine"}),
    Arm("dijiang_scratch", "DiJiang attention (Pre-LN block) trained from scratch", _dijiang()),
    Arm("parallel", "parallel block (GPT-J: one norm, attention and MLP side by side, skips kept)",
        _block("parallel", "softmax")),
    Arm("noble_plain", "Pre-LN + NOBLE, two matrix products (W x and the branch's W_down x)",
        _noble(fused=False)),
    Arm("noble_fused", "Pre-LN + NOBLE, one stacked [W; W_down] product", _noble(fused=True)),
    Arm("dijiang", "Pre-LN + DiJiang attention, chunkwise form (pure PyTorch)", _dijiang("chunk")),
    Arm("dijiang_fla", "Pre-LN + DiJiang attention through fla's Triton chunk kernel", _dijiang("fla")),
)}


def parse_arms(spec: str | list[str] | None, default: tuple[str, ...] | list[str]) -> list[str]:
    """``"a,b,c"`` → arm names in run order: the baseline first (every ratio, and each converted arm,
    needs it), then the others in the order given. ``None`` or ``"all"`` → ``default``."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        names = list(default)
    else:
        names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
        if not names:
            raise ConfigError(f"--arms {spec!r} names no arm; valid arms: {', '.join(ARMS)}")
    bad = [n for n in names if n not in ARMS]
    if bad:
        raise ConfigError(f"unknown arm(s) {', '.join(map(repr, bad))}; valid arms: {', '.join(ARMS)}")
    return [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]


Config = TypeVar("Config", TransformerConfig, RunConfig)


def arm_config(base: Config, name: str) -> Config:
    """The exact (validated) config of arm ``name``: a deep copy of ``base`` (a model config, or a run
    config whose model is transformed) with the arm's transform applied."""
    cfg = copy.deepcopy(base)
    ARMS[name].model(cfg.model if isinstance(cfg, RunConfig) else cfg)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"arm {name}: {e}") from None


def unavailable_reason(cfg: TransformerConfig, device: torch.device | None = None) -> str | None:
    """Why a model of ``cfg`` cannot be built (its attention's or block's module, or NOBLE's, does not
    import) or run on ``device`` (fla's kernels without CUDA or fla; the fused Triton kernel where it cannot
    run); None when it can."""
    modules = [layer_path(attention_spec(cfg.attention)), layer_path(block_spec(cfg.block))]
    if cfg.noble.enabled:
        modules.append(("leanformer.layers.noble", "NobleLinear"))
    for module, attr in modules:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            return f"needs module {module}, which cannot be imported ({e})"
        if not hasattr(mod, attr):
            return f"needs {module}.{attr}, which does not exist yet"
    if cfg.attention == "dijiang" and cfg.dijiang.mode in ("fla", "gated") and device is not None:
        from leanformer.ops.decayed_linear_attention import fla_unavailable_reason

        return fla_unavailable_reason(device)
    if cfg.attention == "dijiang" and cfg.dijiang.mode == "fused" and device is not None:
        import torch

        from leanformer.ops.fused_decay_attention import fused_reason

        # bf16 stands for the kernel's dtypes (float32, bf16, fp16): none of its other conditions depends on it
        return fused_reason(device, torch.bfloat16, cfg.dijiang.feature_dim or cfg.head_dim, cfg.head_dim)
    return None
