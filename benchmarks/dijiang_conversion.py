"""DiJiang conversion experiment (issue 5, measurement 1), side by side in one run.

1. Pretrain a softmax Pre-LN parent on the built-in corpus for ``--steps`` steps.
2. For each feature map (paper, official), each fine-tune fraction (1/10, 1/20 of the parent's tokens)
   and with / without distillation from the parent's logits: ``convert_to_dijiang`` then fine-tune with
   the official recipe (AdamW lr 3e-4, betas (0.9, 0.95), wd 0.1, cosine, 5% warm-up).
3. DiJiang from scratch on the same number of tokens as each fine-tune (and on the parent's full budget).
Every model is evaluated on the same fixed validation batches. Prints a markdown table and writes JSON.

    python benchmarks/dijiang_conversion.py --steps 600 --out runs/dijiang_conversion
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

from leanformer.bench.machine import cpu_model
from leanformer.compare import runs
from leanformer.config import DataConfig, RunConfig, TrainConfig, TransformerConfig
from leanformer.convert import convert_to_dijiang
from leanformer.data import load_data
from leanformer.train import Trainer


def base_config(args: argparse.Namespace, vocab: int) -> RunConfig:
    return RunConfig(
        model=TransformerConfig(vocab_size=vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                                max_seq_len=args.seq_len),
        train=TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                          eval_every=max(1, args.steps // 4), eval_batches=args.eval_batches, progress=False,
                          seed=args.seed),
        data=DataConfig(vocab_size=args.vocab, max_files=args.max_files),
    )


def finetune_config(parent: RunConfig, frac: int, distill: float) -> RunConfig:
    """The DiJiang fine-tune recipe of ``leanformer compare`` (:func:`leanformer.compare.runs.finetune_config`)
    on 1/``frac`` of the parent's tokens, with 5% warm-up, fresh batches and optional distillation."""
    cfg = runs.finetune_config(parent, fraction=1 / frac, lr_ratio=0.3, warmup_frac=0.05)
    cfg.train.eval_every = cfg.train.steps
    cfg.train.distill_weight = distill
    cfg.train.seed = parent.train.seed + 1  # fresh batches, not a replay of the parent's first ones
    return cfg


def final_val(history: list[dict]) -> float:
    return [r["val_loss"] for r in history if "val_loss" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--fractions", default="10,20", help="fine-tune on 1/N of the parent's tokens")
    p.add_argument("--feature-maps", default="paper,official")
    p.add_argument("--out", default="runs/dijiang_conversion")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_data(DataConfig(vocab_size=args.vocab, max_files=args.max_files))
    parent_cfg = base_config(args, data.vocab_size)
    rows = []

    def record(name: str, kind: str, tokens: int, history: list[dict], seconds: float, params: int) -> None:
        rows.append({"run": name, "kind": kind, "tokens": tokens, "val_loss": final_val(history),
                     "seconds": round(seconds, 1), "params": params})
        print(json.dumps(rows[-1]), flush=True)

    t0 = time.time()
    parent_trainer = Trainer(parent_cfg, data, out_dir=None)
    parent_trainer.fit()
    parent = parent_trainer.model.eval()
    parent_tokens = parent_trainer.tokens
    record("softmax parent", "parent", parent_tokens, parent_trainer.history, time.time() - t0, parent.num_params())

    for frac in [int(f) for f in args.fractions.split(",")]:
        steps = max(1, args.steps // frac)
        for fmap in args.feature_maps.split(","):
            for distill in (0.0, 1.0):
                t0 = time.time()
                model = convert_to_dijiang(parent, feature_map=fmap)
                cfg = finetune_config(parent_cfg, frac, distill)
                cfg.model = model.cfg
                tr = Trainer(cfg, data, model=model, teacher=parent if distill else None, out_dir=None)
                tr.fit()
                name = f"convert {fmap}, 1/{frac} tokens" + (", distill" if distill else "")
                record(name, "convert", tr.tokens, tr.history, time.time() - t0, model.num_params())
            t0 = time.time()
            cfg = copy.deepcopy(parent_cfg)
            cfg.model.attention, cfg.model.dijiang.feature_map = "dijiang", fmap
            cfg.train.steps, cfg.train.eval_every = steps, steps
            tr = Trainer(cfg, data, out_dir=None)
            tr.fit()
            record(f"scratch {fmap}, same tokens as 1/{frac}", "scratch", tr.tokens, tr.history, time.time() - t0,
                   tr.model.num_params())
    for fmap in args.feature_maps.split(","):
        t0 = time.time()
        cfg = copy.deepcopy(parent_cfg)
        cfg.model.attention, cfg.model.dijiang.feature_map = "dijiang", fmap
        tr = Trainer(cfg, data, out_dir=None)
        tr.fit()
        record(f"scratch {fmap}, parent's full tokens", "scratch", tr.tokens, tr.history, time.time() - t0,
               tr.model.num_params())

    parent_loss = rows[0]["val_loss"]
    lines = [f"Command: `python {' '.join(sys.argv)}`  ",
             f"Machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}  ",
             f"Model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, seq {args.seq_len}, "
             f"batch {args.batch}, vocab {data.vocab_size}; parent trained {args.steps} steps "
             f"({parent_tokens:,} tokens).", "",
             "| run | tokens | val loss | Δ vs parent | wall-clock s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['tokens']:,} | {r['val_loss']:.3f} | {r['val_loss'] - parent_loss:+.3f} "
                     f"| {r['seconds']} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
