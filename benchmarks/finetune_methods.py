"""NOBLE vs LoRA vs full fine-tuning on all-MiniLM-L6-v2 and the local task (which standard-library package
a function comes from, 4 classes), LoRA and NOBLE at equal trainable-parameter budgets, several seeds.

Phase 1 (``--sweep``): each arm's peak learning rate chosen from a small grid on seed 0 (best validation
accuracy). Phase 2: the chosen rates on ``--seeds`` other seeds; mean ± std of the last evaluation's
accuracy, trainable parameters, median step time. Writes ``runs.jsonl`` (one line per run, appended as runs
finish, so a re-run skips what is done) and ``report.md`` into ``--out``.

    python benchmarks/finetune_methods.py --out runs/finetune_methods --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from leanformer.finetune.data import ClassificationData, LabelMap
from leanformer.finetune.localtask import stdlib_task
from leanformer.finetune.methods import (
    MethodSpec,
    apply_method,
    parse_budget,
    planned_trainable,
    rank_for_budget,
    trainable_summary,
)
from leanformer.finetune.models import load_classifier
from leanformer.finetune.trainer import TrainSettings, finetune

# arm -> (method, extra MethodSpec fields, learning-rate grid; a grid is widened when its best rate is at its edge)
ARMS = {
    "full": ("full", {}, (5e-5, 1e-4, 2e-4)),
    "lora r8": ("lora", {}, (1e-3, 2e-3, 4e-3, 8e-3)),
    "noble (matched to lora r8)": ("noble", {}, (2e-4, 5e-4, 1e-3, 2e-3)),
    "noble, no lr mults (matched)": ("noble", {"noble_lr_mults": False}, (1e-3, 2e-3, 4e-3, 8e-3)),
    "noble_all (same rank)": ("noble_all", {}, (5e-5, 1e-4, 2e-4)),
}


def run_one(base, data, arm: str, lr: float, seed: int, args, max_steps: int | None = None) -> dict:
    method, extra, _ = ARMS[arm]
    clf = copy.deepcopy(base)
    spec = MethodSpec(method, args.lora_rank, "all", **extra)
    if method in ("noble", "noble_all"):
        budget = parse_budget(clf, MethodSpec("lora", args.lora_rank, "all"), f"lora:{args.lora_rank}")
        spec.rank = rank_for_budget(clf, MethodSpec("noble", 1, "all", **extra), budget)
    torch.manual_seed(seed)
    torch.nn.init.normal_(clf.model.classifier.weight, 0.0, 0.02)  # a new head per seed (BERT's init)
    torch.nn.init.zeros_(clf.model.classifier.bias)
    planned = planned_trainable(clf, spec)
    model = apply_method(clf, spec)
    counts = trainable_summary(model)
    assert counts["trainable_params"] == planned, (counts, planned)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=lr, max_len=args.max_len,
                             seed=seed, progress=False, max_steps=max_steps)
    t0 = time.time()
    res = finetune(model, clf.tokenizer, data, settings, log=lambda s: None)
    return {"arm": arm, "method": method, "rank": spec.rank, "lr": lr, "seed": seed, **counts,
            "val_accuracy": res.final["val_accuracy"], "val_mcc": res.final["val_mcc"],
            "val_loss": res.final["val_loss"], "history": res.history, **res.step_time(),
            "seconds": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/finetune_methods")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--threads", type=int)
    p.add_argument("--timing", type=int, metavar="STEPS",
                   help="only time STEPS optimizer steps of each arm (seed 0) and write timing.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    train, val = stdlib_task(per_class=args.per_class, val_per_class=args.val_per_class, seed=0)
    labels = LabelMap.from_labels([e.label for e in train])
    data = ClassificationData(train, val, labels, "stdlib functions: asyncio/email/tkinter/xml")
    torch.manual_seed(0)
    base = load_classifier("minilm", labels)

    def get(arm: str, lr: float, seed: int, phase: str) -> dict:
        for r in done:
            if (r["arm"], r["lr"], r["seed"], r["phase"]) == (arm, lr, seed, phase):
                return r
        r = {"phase": phase, **run_one(base, data, arm, lr, seed, args)}
        print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(r) + "\n")
        done.append(r)
        return r

    if args.timing:
        write_timing(out, args, [run_one(base, data, arm, ARMS[arm][2][0], 0, args, max_steps=args.timing)
                                 for arm in args.arms])
        return
    chosen = {}
    for arm in args.arms:
        sweep = [get(arm, lr, 0, "sweep") for lr in ARMS[arm][2]]
        chosen[arm] = max(sweep, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["lr"]
    rows = {arm: [get(arm, chosen[arm], s, "final") for s in args.seeds] for arm in args.arms}
    for arm in args.arms:  # final runs at a rate an earlier (narrower) grid chose, kept as extra rows
        for lr in sorted({r["lr"] for r in done if r["phase"] == "final" and r["arm"] == arm} - {chosen[arm]}):
            extra = [r for r in done if (r["phase"], r["arm"], r["lr"]) == ("final", arm, lr)]
            if {r["seed"] for r in extra} >= set(args.seeds):
                rows[f"{arm} @ {lr:g}"] = [r for r in extra if r["seed"] in args.seeds]
    write_report(out, args, rows, chosen, [r for r in done if r["phase"] == "sweep"])


def write_timing(out: Path, args, runs: list[dict]) -> None:
    lines = [f"Step time, {args.timing} steps per arm, batch {args.batch_size}, max {args.max_len} tokens, "
             f"torch threads {torch.get_num_threads()} ({time.strftime('%Y-%m-%d')}; the first step left out):", "",
             "| arm | trainable params | median s/step | mean s/step |", "|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['trainable_params']:,} | {r['step_time_s_median']:.3f} | "
              f"{r['step_time_s_mean']:.3f} |" for r in runs]
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def write_report(out: Path, args, rows: dict, chosen: dict, sweep: list[dict]) -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    lines = [f"# Fine-tuning all-MiniLM-L6-v2: NOBLE vs LoRA vs full ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python benchmarks/finetune_methods.py --out {out} "
             f"--threads {torch.get_num_threads()}`  ", f"Machine: {model_name}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, {platform.python_version()}; torch threads {torch.get_num_threads()}.",
             "", f"Task: {args.per_class}/{args.val_per_class} functions per package (train/validation), "
             f"max {args.max_len} tokens, batch {args.batch_size}, {args.epochs:g} epochs, AdamW + linear "
             f"warm-up/decay. Seeds {args.seeds}; learning rate per arm chosen on seed 0.", "",
             "| arm | rank | lr | trainable params | val accuracy (mean ± std) | val MCC | step time (s) |",
             "|---|---|---|---|---|---|---|"]
    for arm, rs in rows.items():
        lines.append(f"| {arm} | {rs[0]['rank'] if rs[0]['method'] != 'full' else '—'} | {rs[0]['lr']:g} | "
                     f"{rs[0]['trainable_params']:,} | {_ms([r['val_accuracy'] for r in rs])} | "
                     f"{_ms([r['val_mcc'] for r in rs])} | {_ms([r['step_time_s_median'] for r in rs])} |")
    cells = {arm: [f"{r['lr']:g}: {r['val_accuracy']:.3f}"
                   for r in sorted((r for r in sweep if r["arm"] == arm), key=lambda r: r["lr"])] for arm in rows}
    width = max(len(c) for c in cells.values())
    lines += ["", "Learning-rate sweep (seed 0, validation accuracy):", "",
              "| arm |" + " lr: acc |" * width, "|---|" + "---|" * width]
    for arm, row in cells.items():
        if not row:
            continue
        lines.append(f"| {arm} | " + " | ".join(row + [""] * (width - len(row))) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
