"""Train every arm of a comparison, one after the other, into ``OUT/arms/<arm>/`` and resume on re-run.

Order: the baseline first (its final validation loss is every other arm's target, and
``dijiang_convert`` is converted from its final weights), then the others. Each run folder holds
``config.yaml`` (the exact config), ``metrics.jsonl`` and ``checkpoint/`` (written by the
:class:`~leanformer.train.Trainer`) and ``done.json`` once trained, timed for decoding and sampled.
A re-run with the same ``--out`` skips runs with ``done.json``; an interrupted one resumes from its
checkpoint. Everything (preset, arms, data path, modules, the output folder's earlier configs) is
checked by :func:`plan` before any data is loaded or any step is trained.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanformer.compare.arms import ARMS, BASELINE, arm_config, check_available, finetune_config, parse_arms
from leanformer.compare.presets import Preset, get_preset
from leanformer.config import ConfigError, RunConfig, from_dict, set_dotted, to_dict


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


def _comparable(cfg_dict: dict) -> dict:
    """A config dict without the keys that may differ between compatible runs (vocabulary, progress)."""
    d = json.loads(json.dumps(cfg_dict))
    d.get("model", {}).pop("vocab_size", None)
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
    p = get_preset(preset)
    names = parse_arms(arms)
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
        check_available(name, cfg)
        for k in range(seeds):
            seed = base.train.seed + k
            run_cfg = _with_seed(cfg, seed)
            if ARMS[name].parent is not None:
                run_cfg = finetune_config(run_cfg, p.convert_fraction, p.convert_lr_ratio,
                                          p.convert_warmup_frac, p.convert_distill_weight)
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


def _with_seed(cfg: RunConfig, seed: int) -> RunConfig:
    import copy

    c = copy.deepcopy(cfg)
    c.train.seed = seed
    return c


def _check_existing(run: Run) -> None:
    """A run folder left by an earlier comparison must hold the same config, or we would mix results."""
    file = run.dir / "config.yaml"
    if not file.exists():
        return
    try:
        old = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{file} is not valid YAML ({e}); delete {run.dir} to retrain the arm") from None
    if _comparable(old or {}) != _comparable(to_dict(run.cfg)):
        raise ConfigError(f"{run.dir} holds arm {run.arm} trained with a different config; use another --out "
                          f"or delete that folder")


# ---------------------------------------------------------------------------- running
def execute(p: Plan) -> Path:
    """Train (or skip) every run of ``p``, then write the report; returns the path of ``report.md``."""
    import torch

    p.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if p.threads is not None:
        torch.set_num_threads(p.threads)
    try:
        return _execute(p)
    finally:
        torch.set_num_threads(threads)


def _execute(p: Plan) -> Path:
    from tqdm.auto import tqdm

    from leanformer.compare.report import write_report
    from leanformer.data import load_data

    start = time.perf_counter()
    write_plan(p)
    todo = [r for r in p.runs if not r.done_file.exists()]
    data = None
    if todo:
        data = load_data(p.base.data, progress=p.progress)
    bar = tqdm(total=len(p.runs), desc="compare", unit="arm", dynamic_ncols=True, disable=not p.progress,
               position=0)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for run in p.runs:
        bar.set_postfix_str(run.label)
        if run.done_file.exists():
            results[(run.arm, run.seed)] = json.loads(run.done_file.read_text())
        else:
            results[(run.arm, run.seed)] = train_run(run, p, data, results, bar)
        bar.update(1)
    bar.close()
    if BASELINE not in p.arms:  # one part of a comparison: `compare --report-only --from` assembles it
        print(f"trained {', '.join(p.arms)} into {p.out}; assemble the report with leanformer compare "
              f"--report-only --from {p.out} OTHER_PARTS... --out REPORT_DIR")
        return p.out / PLAN_FILE
    return write_report(p, results, elapsed=time.perf_counter() - start)


PLAN_FILE = "compare.json"


def write_plan(p: Plan) -> None:
    """``OUT/compare.json``: what this invocation trains (preset, arms, seeds, base config, command), so
    that parts of a comparison trained on different machines can be checked and assembled."""
    record = {"preset": p.preset.name, "arms": p.arms, "seeds": p.seeds, "command": p.command,
              "base": to_dict(p.base)}
    (p.out / PLAN_FILE).write_text(json.dumps(record, indent=1))


def train_run(run: Run, p: Plan, data, results: dict, bar=None) -> dict[str, Any]:
    """Train one run (resuming from its checkpoint if there is one), time its decoding, sample it and
    write ``done.json``; returns that record."""
    import torch

    from leanformer.bench.timing import machine_string
    from leanformer.compare.decode import decode_latency, greedy_sample, peak_memory_bytes, peak_memory_start
    from leanformer.train.loop import Trainer, resolve_device, seed_everything

    run.dir.mkdir(parents=True, exist_ok=True)
    cfg = run.cfg
    if data.tokenizer is not None or data.vocab_size > cfg.model.vocab_size:
        cfg.model.vocab_size = data.vocab_size
    (run.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    device = resolve_device(cfg.train.device)
    model, teacher, parent_info = None, None, {}
    arm = ARMS[run.arm]
    if arm.parent is not None:
        model, teacher, parent_info = _converted_parent(run, p, results, device)

    def on_log(record: dict) -> None:
        if bar is not None and "loss" in record:
            bar.set_postfix_str(f"{run.label} step {record['step']} loss {record['loss']:.3f}")

    mem_kind = peak_memory_start(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    wall0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, data, model=model, teacher=teacher if cfg.train.distill_weight > 0 else None,
                      out_dir=run.dir, on_log=on_log, resume=True)
    history = trainer.fit()
    wall = time.perf_counter() - wall0
    peak = peak_memory_bytes(device)
    if bar is not None:
        bar.set_postfix_str(f"{run.label}: decoding")
    model = trainer.model
    causal = model.cfg.causal  # an encoder (model.causal=false) does not decode: no latency, no sample
    decode = decode_latency(model, p.preset.decode_contexts, p.preset.decode_tokens,
                            p.preset.decode_warmup) if causal else {}
    sample = greedy_sample(model, data.tokenizer, p.preset.sample_prompt, p.preset.sample_tokens) if causal else None
    evals = [r for r in history if "val_loss" in r]
    summary = model.summary()
    record = {
        "arm": run.arm, "seed": run.seed, "description": arm.description,
        "params": summary["params"], "non_embedding_params": summary["non_embedding_params"],
        "noble_branch_params": summary["noble_branch_params"],
        "steps": trainer.step, "tokens": trainer.tokens, "train_seconds": trainer.train_seconds,
        "wall_seconds": wall, "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_val_mlm_acc": evals[-1].get("val_mlm_acc") if evals else None,
        "peak_memory_bytes": peak, "peak_memory_kind": mem_kind, "device": str(device),
        "machine": machine_string(device), "torch": torch.__version__, "data": data_summary(data),
        "load_average": load, "threads": torch.get_num_threads(),
        "decode": decode, "sample": sample, **parent_info,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    run.done_file.write_text(json.dumps(record, indent=2))
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def data_summary(data) -> dict[str, Any]:
    """What the arm trained on: the source, and (for a tokenised text corpus) the cache's statistics:
    characters, documents, tokens per split, the tokenizer."""
    out: dict[str, Any] = {"source": data.source, "train_tokens": len(data.train), "val_tokens": len(data.val),
                           "vocab_size": data.vocab_size}
    meta_file = data.cache_path / "meta.json" if data.cache_path is not None else None
    if meta_file is not None and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        out.update({k: meta[k] for k in ("characters", "train_docs", "val_docs", "tokenizer") if k in meta})
    return out


def _converted_parent(run: Run, p: Plan, results: dict, device) -> tuple[Any, Any, dict[str, Any]]:
    """``convert_to_dijiang`` of the finished parent run with the same seed (new weights seeded), and the
    parent itself (the distillation teacher)."""
    from leanformer.convert import convert_to_dijiang
    from leanformer.train.checkpoint import load_model
    from leanformer.train.loop import seed_everything

    parent_name = ARMS[run.arm].parent
    parent_run = next(r for r in p.runs if r.arm == parent_name and r.seed == run.seed)
    parent_rec = results.get((parent_name, run.seed))
    if parent_rec is None:
        raise ConfigError(f"arm {run.arm} needs the finished {parent_name} run in {parent_run.dir}")
    parent = load_model(parent_run.dir / "checkpoint", device=device)
    seed_everything(run.seed)
    teacher = (load_model(parent_run.dir / "checkpoint", device=device).eval()
               if run.cfg.train.distill_weight > 0 else None)
    model = convert_to_dijiang(parent, feature_map="paper")
    info = {"parent": parent_name, "parent_steps": parent_rec["steps"], "parent_tokens": parent_rec["tokens"],
            "parent_train_seconds": parent_rec["train_seconds"]}
    return model, teacher, info


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``, one record per step (the last written wins after a resume)."""
    file = folder / "metrics.jsonl"
    if not file.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
