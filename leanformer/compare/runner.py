"""Train every run of a comparison, one after the other, into ``OUT/arms/<arm>/`` and resume on re-run.

Order: the baseline first (its final validation loss is every other arm's target, and
``dijiang_convert`` is converted from its final weights), then the others. Each run folder holds
``config.yaml`` (the exact config), ``metrics.jsonl`` and ``checkpoint/`` (written by the
:class:`~leanformer.train.Trainer`) and ``done.json`` once trained, timed for decoding and sampled.
A re-run with the same ``--out`` skips runs with ``done.json``; an interrupted one resumes from its
checkpoint. What runs, and that it can, is decided by :func:`leanformer.compare.runs.plan` first.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from leanformer.arms import ARMS, BASELINE
from leanformer.compare.report import write_report
from leanformer.compare.runs import PLAN_FILE, Plan, Run, write_plan
from leanformer.config import ConfigError, to_dict


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


def train_run(run: Run, p: Plan, data, results: dict, bar=None) -> dict[str, Any]:
    """Train one run (resuming from its checkpoint if there is one), time its decoding, sample it and
    write ``done.json``; returns that record."""
    import torch

    from leanformer.bench.machine import machine_string
    from leanformer.bench.memory import peak_memory_bytes, peak_memory_start
    from leanformer.compare.decode import decode_latency, greedy_sample
    from leanformer.device import resolve_device
    from leanformer.train.loop import Trainer, seed_everything

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
    model = convert_to_dijiang(parent, feature_map=run.cfg.model.dijiang.feature_map)
    info = {"parent": parent_name, "parent_steps": parent_rec["steps"], "parent_tokens": parent_rec["tokens"],
            "parent_train_seconds": parent_rec["train_seconds"]}
    return model, teacher, info
