"""``leanformer compare --report-only --from DIR...``: one report from parts trained on different machines.

A comparison too long for one machine (GPUs lent for 10-minute runs that keep nothing) is trained in
parts: each part is an ordinary ``leanformer compare --without-baseline --arms ... --out PART`` (the
baseline is one part of its own, with ``dijiang_convert`` beside it, since that arm is converted from the
baseline's final weights). A part leaves ``compare.json`` (preset, arms, seeds, base config) and, per
run, ``done.json``, ``metrics.jsonl`` and ``config.yaml``: a few small files, no checkpoint needed.

:func:`assemble` checks that the parts belong together (same preset, seeds and base config, up to the
vocabulary), copies their runs' small files into ``OUT/arms/``, and writes the usual report, which names
each arm's machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from leanformer.arms import ARMS, BASELINE
from leanformer.compare.presets import get_preset
from leanformer.compare.report import write_report
from leanformer.compare.runs import PLAN_FILE, Plan, Run, comparable
from leanformer.config import ConfigError, RunConfig, from_dict, to_dict
from leanformer.train.metrics import read_steps

RUN_FILES = ("done.json", "metrics.jsonl", "config.yaml")


def _read_part(folder: Path) -> dict[str, Any]:
    file = folder / PLAN_FILE
    if not file.is_file():
        raise ConfigError(f"{folder} is not the output of a leanformer compare run (no {PLAN_FILE})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e})") from None


def _run_folders(part: Path, arm: str, seeds: list[int]) -> dict[int, Path]:
    base = part / "arms" / arm
    return {s: base for s in seeds} if len(seeds) == 1 else {s: base / f"seed{s}" for s in seeds}


def assemble(parts: list[str | Path], out: str | Path, command: str = "") -> Path:
    """Check ``parts`` (compare output folders), gather their finished runs into ``out`` and write
    ``out/report.md``; returns its path. Raises :class:`ConfigError` naming the part that does not fit."""
    if not parts:
        raise ConfigError("--report-only needs --from with at least one compare output folder")
    folders = [Path(p) for p in parts]
    infos = [_read_part(f) for f in folders]
    first = infos[0]
    for folder, info in zip(folders, infos):
        for key in ("preset", "seeds"):
            if info[key] != first[key]:
                raise ConfigError(f"{folder}: {key} {info[key]!r} differs from {folders[0]}'s {first[key]!r}")
        if _same_tokens_key(info["base"]) != _same_tokens_key(first["base"]):
            raise ConfigError(f"{folder} was trained with another base config than {folders[0]}; "
                              "parts of one comparison must share preset, --set and --data")
    preset = get_preset(first["preset"])
    base = from_dict(RunConfig, first["base"])
    seeds = [base.train.seed + k for k in range(first["seeds"])]
    owner: dict[str, Path] = {}
    started: dict[str, str] = {}
    for folder, info in zip(folders, infos):
        for arm in info["arms"]:
            if arm not in ARMS:
                raise ConfigError(f"{folder}: unknown arm {arm!r}")
            if not all((d / "done.json").is_file() for d in _run_folders(folder, arm, seeds).values()):
                note = _unfinished(folder, arm, seeds)  # trained elsewhere, or not finished here
                if note:
                    started[arm] = note
                continue
            if arm in owner:
                raise ConfigError(f"arm {arm} is finished in both {owner[arm]} and {folder}; pass one of them")
            owner[arm] = folder
    if BASELINE not in owner:
        raise ConfigError(f"no part holds the finished baseline {BASELINE!r}; every ratio needs it")
    arms = [BASELINE] + [a for a in ARMS if a in owner and a != BASELINE]
    unfinished = {a: note for a, note in started.items() if a not in owner}
    out = Path(out)
    p = Plan(preset, arms, len(seeds), out, base, command=command or first.get("command", ""))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for arm in arms:
        sources = _run_folders(owner[arm], arm, seeds)
        for k, seed in enumerate(seeds):
            target = _run_folders(out, arm, seeds)[seed]
            target.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if (sources[seed] / name).is_file() and sources[seed].resolve() != target.resolve():
                    shutil.copyfile(sources[seed] / name, target / name)
            record = json.loads((target / "done.json").read_text())
            record.setdefault("part", str(owner[arm]))
            _check_same_data(record, results, target)
            results[(arm, seed)] = record
            p.runs.append(Run(arm, seed, k, from_dict(RunConfig, _yaml(target / "config.yaml")), target))
    return write_report(p, results, elapsed=None, unfinished=unfinished)


def _unfinished(folder: Path, arm: str, seeds: list[int]) -> str:
    """What the metrics of an arm that ``folder`` started and did not finish say ('' when it has none)."""
    notes = []
    for seed, run in _run_folders(folder, arm, seeds).items():
        steps = read_steps(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if not steps:
            continue
        last = next((r for r in reversed(steps) if "loss" in r), steps[-1])
        facts = ", ".join(f"{k.replace('_', ' ')} {last[k]:.4g}" for k in ("loss", "grad_norm") if k in last)
        notes.append(f"seed {seed} in {folder}: last logged step {last['step']}" + (f" ({facts})" if facts else "")
                     + "; no done.json: the run stopped early (diverged, interrupted or out of time)")
    return "; ".join(notes)


def _same_tokens_key(base: dict) -> dict:
    """The part's base config without where its token cache lay and which path held its tokenizer: parts
    run on different machines carry the first part's tokenizer.json (benchmarks/compare_gpu.sh). That they
    tokenised the same corpus the same way is checked on their data records (:func:`_check_same_data`).
    The config is read back through :class:`RunConfig` first, so a part written before a field existed
    compares with its default value."""
    d = comparable(to_dict(from_dict(RunConfig, base)))
    for key in ("cache_dir", "tokenizer"):
        d.get("data", {}).pop(key, None)
    return d


_DATA_FACTS = ("source", "train_tokens", "val_tokens", "vocab_size", "characters")


def _check_same_data(record: dict, results: dict, where: Path) -> None:
    """Raise when this run's data record (``done.json`` "data") disagrees with an earlier run's."""
    mine = record.get("data") or {}
    for other in results.values():
        theirs = other.get("data") or {}
        for fact in _DATA_FACTS:
            if fact in mine and fact in theirs and mine[fact] != theirs[fact]:
                raise ConfigError(f"{where}: data {fact} {mine[fact]!r} differs from {other['arm']}'s "
                                  f"{theirs[fact]!r}; the parts did not train on the same tokens")


def _yaml(file: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(file.read_text()) or {}
