"""NOBLE at small scale, side by side in one run: which of the paper's choices help or hurt here.

Arms (all on the `leanformer compare --preset cpu` baseline: same data, seed, steps, model size):
baseline (Pre-LN); NOBLE as the paper (CosNet, official lr multipliers, main W ~ N(0, 0.5/sqrt(d_in)));
NOBLE with the main weight left at the model's init; without the lr multipliers; with SiLU instead of CosNet;
and the fused vs plain path's step time. Prints a markdown table (val loss every eval, tokens/s ratio).

    python benchmarks/noble_ablation.py --steps 250 --out runs/noble_ablation
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
from leanformer.compare.presets import get_preset
from leanformer.config import RunConfig, from_dict
from leanformer.data import load_data
from leanformer.train import Trainer

ARMS = {
    "baseline (Pre-LN)": None,
    "NOBLE, paper (CosNet, lr mults, paper init)": {},
    "NOBLE, model init": {"main_init": "model"},
    "NOBLE, model init, no lr mults": {"main_init": "model", "lr_mults": False},
    "NOBLE, model init, SiLU": {"main_init": "model", "activation": "silu"},
    "NOBLE, model init, SiLU, no lr mults": {"main_init": "model", "activation": "silu", "lr_mults": False},
    "NOBLE, paper, plain (unfused) path": {"fused": False},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arms", default=",".join(str(i) for i in range(len(ARMS))), help="indices of ARMS to run")
    p.add_argument("--out", default="runs/noble_ablation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    raw = get_preset("cpu").run_dict()
    raw["train"].update({"steps": args.steps, "progress": False, "save_every": 0})
    base = from_dict(RunConfig, raw).validate()
    data = load_data(base.data)
    base.model.vocab_size = data.vocab_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(ARMS)
    for i in map(int, args.arms.split(",")):
        name, noble = names[i], ARMS[names[i]]
        cfg = copy.deepcopy(base)
        if noble is not None:
            cfg.model.noble.enabled = True
            for key, value in noble.items():
                setattr(cfg.model.noble, key, value)
        t0 = time.time()
        tr = Trainer(cfg, data)
        history = tr.fit()
        vals = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
        rows.append({"arm": name, "noble": noble, "params": tr.model.num_params(), "val": vals,
                     "tok_per_s": tr.tokens / tr.train_seconds, "wall_s": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)
    base_row = rows[0]
    steps_shown = [s for s, _ in base_row["val"]][2::2]
    lines = [f"Command: `python {' '.join(sys.argv)}`  ",
             f"Machine: {cpu_model()}, "
             f"{args.threads} thread(s), torch {torch.__version__}, {date.today()}; noble rank "
             f"{base.model.noble.rank}, d_model {base.model.d_model}, {base.model.n_layers} layers, lr {base.train.lr}",
             "", "| arm | params | " + " | ".join(f"val @ {s}" for s in steps_shown)
             + " | tokens/s × baseline |", "|---|---:|" + "---:|" * len(steps_shown) + "---:|"]
    for r in rows:
        by_step = dict(r["val"])
        lines.append(f"| {r['arm']} | {r['params']:,} | " + " | ".join(f"{by_step.get(s, float('nan')):.3f}"
                                                                    for s in steps_shown)
                     + f" | {r['tok_per_s'] / base_row['tok_per_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
