"""What a training step keeps for its backward pass, per arm, measured without a GPU.

Builds each arm at GPT-2 small's width (d 768, 12 heads) with fewer layers and a small vocabulary (the
blocks are what differs between arms), runs one forward pass under bf16 autocast, compiled by inductor on
the CPU (or eager), and records every storage autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, each storage counted once). Saved
activations are most of a training step's memory beyond parameters and optimizer state, and which tensors
inductor keeps does not depend on the device, so the ratios between arms carry over to a GPU step; the
absolute bytes do not (no allocator, no temporaries).

    PYTHONPATH=$PWD TRITON_INTERPRET=1 python benchmarks/saved_memory.py --out docs/bench_cpu/saved_memory

Writes ``saved_memory.json`` and ``saved_memory.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ARMS = [("preln", None), ("noble_fused", "stacked"), ("noble_fused", "kcat"), ("noble_fused", "route"), ("sas_p", None)]
# "route": NOBLE's training route (noble.TRAIN_KERNEL "always": its Triton kernels under TRITON_INTERPRET=1 on the CPU)


def saved_storages(model: torch.nn.Module, forward, ids: torch.Tensor, autocast: bool) -> dict[int, tuple]:
    """data_ptr → (bytes, shape, dtype) of each storage saved for backward by ``forward(ids)``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes() > 0:
            saved[s.data_ptr()] = (s.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        forward(ids, ids)[1].backward()  # the loss, as in training (targets: the ids themselves)
    return saved


def measure(arm: str, form: str | None, args) -> dict:
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.model import TransformerLM

    size = dataclasses.replace(SIZES["gpt2"], n_layers=args.layers, vocab_size=args.vocab)
    cfg = arm_config(base_config(size, args.seq), arm)
    if form in ("stacked", "kcat"):
        cfg = dataclasses.replace(cfg, noble=dataclasses.replace(cfg.noble, compiled_form=form))
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    forward = torch.compile(model) if args.compile else model
    ids = torch.randint(0, args.vocab, (1, args.seq))
    from leanformer.layers import noble

    before, noble.TRAIN_KERNEL = noble.TRAIN_KERNEL, "always" if form == "route" else "never"
    try:
        saved = saved_storages(model, forward, ids, autocast=not args.float32)
    finally:
        noble.TRAIN_KERNEL = before
    tokens = {k: v for k, v in saved.items() if args.seq in v[1]}  # activations: a tokens axis
    by_shape = collections.Counter()
    for nbytes, shape, dtype in saved.values():
        by_shape[f"{shape} {dtype}"] += nbytes
    torch._dynamo.reset()
    return {"arm": arm + (f" ({form})" if form else ""), "saved_MiB": sum(v[0] for v in saved.values()) / 2**20,
            "activations_MiB": sum(v[0] for v in tokens.values()) / 2**20, "storages": len(saved),
            "largest": [[k, b / 2**20] for k, b in by_shape.most_common(12)]}


def markdown(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    base = rows[0]
    lines = [f"# Saved for backward ({m['date']}, {m['machine']}, torch {m['torch']})", "", f"`{m['command']}`", "",
             m["setting"], "", "| arm | saved MiB | × Pre-LN | with a tokens axis MiB | × Pre-LN | storages |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['saved_MiB']:.1f} | {r['saved_MiB'] / base['saved_MiB']:.3f} | "
                     f"{r['activations_MiB']:.1f} | {r['activations_MiB'] / base['activations_MiB']:.3f} | "
                     f"{r['storages']} |")
    for r in rows:
        lines += ["", f"## {r['arm']}: largest shapes (MiB)", ""]
        lines += [f"- `{k}` {v:.1f}" for k, v in r["largest"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="saved_memory_out")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--eager", dest="compile", action="store_false", help="no torch.compile")
    p.add_argument("--float32", action="store_true", help="no bf16 autocast")
    args = p.parse_args(argv)
    import platform

    setting = (f"d 768, 12 heads, {args.layers} layers, vocab {args.vocab}, batch 1, seq {args.seq}, "
               f"{'inductor (CPU)' if args.compile else 'eager'}, {'float32' if args.float32 else 'bf16 autocast'}")
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                       "machine": f"{platform.processor() or platform.machine()} CPU",
                       "command": "python " + " ".join(sys.argv), "setting": setting}, "rows": []}
    for arm, form in ARMS:
        if form == "route" and os.environ.get("TRITON_INTERPRET") != "1":
            print("noble_fused (route): skipped (its kernels run on the CPU only under TRITON_INTERPRET=1)")
            continue
        row = measure(arm, form, args)
        print(f"{row['arm']}: saved {row['saved_MiB']:.1f} MiB, tokens-axis {row['activations_MiB']:.1f}", flush=True)
        result["rows"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "saved_memory.json").write_text(json.dumps(result, indent=1))
    (out / "saved_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
