"""What a comparison trains: the runs (arm × seed) with their exact configs, checked before any work.

Every arm (:mod:`leanformer.arms`) keeps the preset's baseline data, seed, width, depth, heads, sequence
length, batch and number of steps; only the block wiring, the attention or the linear layers change. An arm
converted from another (``dijiang_convert``) is fine-tuned instead, on a fraction of its parent's tokens
(:func:`finetune_config`). :func:`plan` checks everything (preset, arms, data path, modules, the output
folder's earlier configs) before any data is loaded or any step is trained.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leanformer.arms import ARMS, BASELINE, arm_config, parse_arms, unavailable_reason
from leanformer.compare.presets import Preset, get_preset
from leanformer.config import ConfigError, RunConfig, from_dict, set_dotted, to_dict

# ``--arms all``: every arm of the registry except the NOBLE ablation's recipe, the parallel block and
# bench's variants of NOBLE and DiJiang (the same models, other kernels)
DEFAULT_ARMS = ("preln", "noble", "sas", "sas_p", "sas_p_nonorm", "sas_p+noble", "dijiang_convert",
                "dijiang_scratch")
PLAN_FILE = "compare.json"


@dataclass
class Run:
    """One (arm, seed) training run."""

    arm: str
    seed: int
    seed_index: int
    cfg: RunConfig
    dir: Path

    @property
    def done_file(self) -> Path:
        return self.dir / "done.json"

    @property
    def label(self) -> str:
        return self.arm if self.dir.name == self.arm else f"{self.arm}/seed{self.seed}"


@dataclass
class Plan:
    """Everything a comparison will do, validated."""

    preset: Preset
    arms: list[str]
    seeds: int
    out: Path
    base: RunConfig
    runs: list[Run] = field(default_factory=list)
    progress: bool = True
    command: str = ""
    threads: int | None = None


def base_config(preset: Preset, data: str | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """The preset's baseline config with ``--set`` overrides and ``--data`` applied, validated."""
    raw = preset.run_dict()
    for assignment in overrides:
        set_dotted(raw, assignment)
    if data is not None:
        raw.setdefault("data", {})["path"] = data
    try:
        cfg = from_dict(RunConfig, raw)
        cfg.model.vocab_size = cfg.data.vocab_size  # the real size is set once the tokenizer exists
        return cfg.validate()
    except TypeError as e:
        raise ConfigError(f"bad config value: {e}") from None


def finetune_config(parent: RunConfig, fraction: float, lr_ratio: float, warmup_frac: float,
                    distill_weight: float = 0.0, arm: str = "dijiang_convert") -> RunConfig:
    """The fine-tune of converted arm ``arm`` from a run of ``parent``'s config: the arm's model and
    recipe (:attr:`leanformer.arms.Arm.recipe`; DiJiang's: AdamW, betas (0.9, 0.95), weight decay 0.1,
    cosine schedule with warm-up, LM loss), plus ``distill_weight`` · KL to the parent's logits (0: the
    official LM loss alone).

    Tokens: ``fraction`` of the parent's (same batch and sequence length, ``fraction`` of its steps).
    Learning rate: the official 3e-4 was used on Pythia models pre-trained at 1e-3 (70M) to 3e-4 (410M);
    we scale it to our pre-training rate as ``lr_ratio · parent lr`` (0.3 = 3e-4 / 1e-3).
    """
    cfg = copy.deepcopy(parent)
    ARMS[arm].model(cfg.model)
    t = cfg.train
    t.steps = max(1, round(fraction * parent.train.steps))
    t.lr = lr_ratio * parent.train.lr
    for key, value in ARMS[arm].recipe.items():
        setattr(t, key, value)
    t.warmup_frac = warmup_frac
    t.distill_weight = distill_weight
    t.eval_every = max(1, min(t.eval_every, t.steps // 4 or 1))
    t.save_every = 0
    return cfg.validate()


def comparable(cfg_dict: dict) -> dict:
    """A config dict without the keys that may differ between compatible runs (vocabulary, progress, NOBLE's
    compiled form: the same function computed another way)."""
    d = json.loads(json.dumps(cfg_dict))
    d.get("model", {}).pop("vocab_size", None)
    d.get("model", {}).get("noble", {}).pop("compiled_form", None)
    d.get("train", {}).pop("progress", None)
    return d


def plan(preset: str = "cpu", arms: str | None = None, seeds: int = 1, out: str | Path = "runs/compare",
         data: str | None = None, overrides: list[str] | tuple = (), progress: bool = True,
         command: str = "", threads: int | None = None, with_baseline: bool = True) -> Plan:
    """Check everything and list the runs; raises :class:`ConfigError` before anything is trained.

    ``with_baseline=False`` trains only the named arms (one part of a comparison spread over machines,
    assembled later by :func:`leanformer.compare.assemble.assemble`); a converted arm still needs its
    parent in the same invocation.
    """
    from leanformer.device import resolve_device

    p = get_preset(preset)
    names = parse_arms(arms, DEFAULT_ARMS)
    if not with_baseline:
        names = without_baseline(names, arms)
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1")
    if data is not None and not Path(data).exists():
        raise ConfigError(f"data path {data} does not exist")
    base = base_config(p, data, overrides)
    base.train.progress = progress
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    result = Plan(p, names, seeds, out, base, progress=progress, command=command,
                  threads=threads if threads is not None else p.threads)
    for name in names:
        cfg = arm_config(base, name)
        reason = unavailable_reason(cfg.model, resolve_device(cfg.train.device))
        if reason is not None:
            raise ConfigError(f"arm {name} {reason}; leave the arm out with --arms")
        for k in range(seeds):
            seed = base.train.seed + k
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.seed = seed
            if ARMS[name].parent is not None:
                run_cfg = finetune_config(run_cfg, p.convert_fraction, p.convert_lr_ratio,
                                          p.convert_warmup_frac, p.convert_distill_weight, arm=name)
            folder = out / "arms" / name if seeds == 1 else out / "arms" / name / f"seed{seed}"
            run = Run(name, seed, k, run_cfg, folder)
            _check_existing(run)
            result.runs.append(run)
    return result


def without_baseline(names: list[str], spec: str | None) -> list[str]:
    """``names`` without the baseline unless ``spec`` names it; every converted arm keeps its parent."""
    asked = {s.strip() for s in (spec or "").split(",")}
    kept = [n for n in names if n != BASELINE or BASELINE in asked]
    for n in kept:
        parent = ARMS[n].parent
        if parent is not None and parent not in kept:
            raise ConfigError(f"arm {n} is converted from {parent}: train them in the same invocation "
                              f"(--arms {parent},{n})")
    if not kept:
        raise ConfigError("--without-baseline leaves no arm to train; name the arms with --arms")
    return kept


def _check_existing(run: Run) -> None:
    """A run folder left by an earlier comparison must hold the same config, or we would mix results."""
    file = run.dir / "config.yaml"
    if not file.exists():
        return
    try:
        old = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{file} is not valid YAML ({e}); delete {run.dir} to retrain the arm") from None
    try:  # read back through RunConfig, so a folder written before a field existed has its default
        old = to_dict(from_dict(RunConfig, old or {}))
    except (ConfigError, TypeError, ValueError):
        pass  # not a config this version can read: compared as written, so it differs
    if comparable(old or {}) != comparable(to_dict(run.cfg)):
        raise ConfigError(f"{run.dir} holds arm {run.arm} trained with a different config; use another --out "
                          f"or delete that folder")


def write_plan(p: Plan) -> None:
    """``OUT/compare.json``: what this invocation trains (preset, arms, seeds, base config, command), so
    that parts of a comparison trained on different machines can be checked and assembled."""
    record = {"preset": p.preset.name, "arms": p.arms, "seeds": p.seeds, "command": p.command,
              "base": to_dict(p.base)}
    (p.out / PLAN_FILE).write_text(json.dumps(record, indent=1))
