"""The arms of a comparison: each one a transform of the shared baseline :class:`RunConfig`.

Every arm keeps the baseline's data, seed, width, depth, heads, sequence length, batch and number of
steps; only the block wiring, the attention or the linear layers change. ``dijiang_convert`` is the
exception: it is not trained from scratch but converted from the finished ``preln`` run
(:func:`leanformer.convert.convert_to_dijiang`) and fine-tuned on a fraction of the baseline's tokens
(DiJiang, Chen et al. 2024, section 4; recipe in :func:`finetune_config`).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from leanformer.config import ConfigError, RunConfig
from leanformer.registry import attention_spec, block_spec, layer_path

BASELINE = "preln"


def _preln(cfg: RunConfig) -> None:
    cfg.model.block, cfg.model.attention = "preln", "softmax"


def _parallel(cfg: RunConfig) -> None:
    cfg.model.block, cfg.model.attention = "parallel", "softmax"


def _noble(cfg: RunConfig) -> None:
    _preln(cfg)
    cfg.model.noble.enabled = True


def _noble_silu(cfg: RunConfig) -> None:
    _noble(cfg)
    cfg.model.noble.activation, cfg.model.noble.main_init = "silu", "model"


def _sas(cfg: RunConfig) -> None:
    cfg.model.block, cfg.model.attention = "sas", "shaped"


def _sas_p(cfg: RunConfig) -> None:
    cfg.model.block, cfg.model.attention = "sas_p", "shaped"


def _sas_p_nonorm(cfg: RunConfig) -> None:
    _sas_p(cfg)
    cfg.model.norm = "none"  # block norms become identity except layer 0's; the final norm stays


def _sas_p_noble(cfg: RunConfig) -> None:
    _sas_p(cfg)
    cfg.model.noble.enabled = True


def _dijiang(cfg: RunConfig) -> None:
    cfg.model.block, cfg.model.attention = "preln", "dijiang"


@dataclass(frozen=True)
class Arm:
    """One arm: a name, what it is, and the transform of the baseline config that makes it."""

    name: str
    description: str
    transform: Callable[[RunConfig], None]
    parent: str | None = None  # trained after, and converted from, this arm's finished model
    needs: tuple[str, ...] = ()  # extra modules (beyond the config's block and attention)
    in_all: bool = True  # part of ``--arms all`` (the default comparison)


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("preln", "baseline: Pre-LN block, softmax attention", _preln),
    Arm("noble", "Pre-LN + NOBLE branches on q, k, v, o, ffn_in, ffn_out", _noble,
        needs=("leanformer.layers.noble",)),
    Arm("noble_silu", "Pre-LN + NOBLE with SiLU branches and the LM's own init (the ablation's recipe)",
        _noble_silu, needs=("leanformer.layers.noble",), in_all=False),
    Arm("sas", "SAS block (shaped attention, no V/P, no attention skip)", _sas),
    Arm("sas_p", "SAS-P block (parallel, no skip at all)", _sas_p),
    Arm("sas_p_nonorm", "SAS-P without block norms (layer 0's and the final norm kept)", _sas_p_nonorm),
    Arm("sas_p+noble", "SAS-P + NOBLE branches", _sas_p_noble, needs=("leanformer.layers.noble",)),
    Arm("dijiang_convert", "DiJiang converted from the finished preln model, fine-tuned", _dijiang,
        parent=BASELINE, needs=("leanformer.convert",)),
    Arm("dijiang_scratch", "DiJiang attention (Pre-LN block) trained from scratch", _dijiang),
    Arm("parallel", "parallel block (GPT-J: one norm, attention and MLP side by side, skips kept)", _parallel,
        in_all=False),
)}


def parse_arms(spec: str | None) -> list[str]:
    """``"a,b,c"`` → arm names in run order: the baseline first (every ratio, and ``dijiang_convert``,
    need it), then the others in the order given. ``None`` or ``"all"`` → every arm."""
    if spec is None or spec.strip() == "all":
        names = [n for n, arm in ARMS.items() if arm.in_all]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        if not names:
            raise ConfigError(f"--arms {spec!r} names no arm; valid arms: {', '.join(ARMS)}")
    bad = [n for n in names if n not in ARMS]
    if bad:
        raise ConfigError(f"unknown arm(s) {', '.join(map(repr, bad))}; valid arms: {', '.join(ARMS)}")
    ordered = [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]
    return ordered


def arm_config(base: RunConfig, name: str) -> RunConfig:
    """The exact (validated) config of arm ``name``: a deep copy of ``base`` with the arm's transform."""
    cfg = copy.deepcopy(base)
    ARMS[name].transform(cfg)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"arm {name}: {e}") from None


def check_available(name: str, cfg: RunConfig) -> None:
    """Import every module arm ``name`` needs; a missing one is a :class:`ConfigError` naming it."""
    modules = [layer_path(attention_spec(cfg.model.attention)), layer_path(block_spec(cfg.model.block))]
    modules += [(m, None) for m in ARMS[name].needs]
    for module, attr in modules:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"arm {name} needs module {module}, which cannot be imported ({e}); "
                              f"leave the arm out with --arms") from None
        if attr is not None and not hasattr(mod, attr):
            raise ConfigError(f"arm {name} needs {module}.{attr}, which does not exist yet; "
                              f"leave the arm out with --arms")


def finetune_config(parent: RunConfig, fraction: float, lr_ratio: float, warmup_frac: float,
                    distill_weight: float = 0.0) -> RunConfig:
    """The fine-tune recipe of ``dijiang_convert`` (official DiJiang code: AdamW, betas (0.9, 0.95),
    weight decay 0.1, cosine schedule with warm-up, LM loss), plus ``distill_weight`` · KL to the
    parent's logits (0: the official LM loss alone).

    Tokens: ``fraction`` of the parent's (same batch and sequence length, ``fraction`` of its steps).
    Learning rate: the official 3e-4 was used on Pythia models pre-trained at 1e-3 (70M) to 3e-4 (410M);
    we scale it to our pre-training rate as ``lr_ratio · parent lr`` (0.3 = 3e-4 / 1e-3).
    """
    cfg = copy.deepcopy(parent)
    _dijiang(cfg)
    t = cfg.train
    t.steps = max(1, round(fraction * parent.train.steps))
    t.lr = lr_ratio * parent.train.lr
    t.betas = (0.9, 0.95)
    t.weight_decay = 0.1
    t.schedule = "cosine"
    t.warmup_frac = warmup_frac
    t.distill_weight = distill_weight
    t.eval_every = max(1, min(t.eval_every, t.steps // 4 or 1))
    t.save_every = 0
    return cfg.validate()
