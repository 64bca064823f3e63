"""Where one decoding step's time goes (issue #15): the kernels inside the captured CUDA graph.

For each variant (arm, context, batch, compiled or not and in which mode, module switches such as
``leanformer.ops.fused_decay_step.GATE_IN_KERNEL``), the GPU-resident static
decoder of ``leanformer bench decode`` (graph path, bf16 weights) is prefilled, captured, and timed (median
of CUDA-event-timed replays); then ``torch.profiler`` records a few replays: kernels per step, the sum of
their device time, and the gap between that sum and the step (what the graph's launches cost beyond the
kernels). The top kernels and the time by class (benchmarks/train_profile.py's classes) are printed.

    PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/decode_profile.py --out $OUT
    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/decode_profile.py --cpu-smoke   # tiny, eager, CPU

Writes ``decode_profile.json`` and ``decode_profile.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from train_profile import kernel_class, kernel_totals, top_kernels

from leanformer.bench.kernel_switches import switches_set
from leanformer.bench.variants import chosen_variants

AUTOTUNE = "max-autotune-no-cudagraphs"
GATE_OUT = {"leanformer.ops.fused_decay_step.GATE_IN_KERNEL": False}
COSNET_ON = {"leanformer.layers.noble.COSNET_KERNEL": "cuda"}
MIX_ON = {"leanformer.layers.shaped.COMPILE_STEP_MIX": True}
SKINNY_ON = {"leanformer.ops.skinny_linear.ROUTE": "cuda"}  # the default since 2026-12-06
SKINNY_OFF = {"leanformer.ops.skinny_linear.ROUTE": "never"}
NOBLE_ON = {"leanformer.ops.noble_decode.ROUTE": "cuda",  # the default since 2026-12-06 23:50, one launch per
            "leanformer.ops.noble_decode.SPLIT_K": False}  # layer as labelled (split K: the default since 17:00)
NOBLE_OFF = {"leanformer.ops.noble_decode.ROUTE": "never"}  # the layer's own ops (labels without "NOBLE kernel")
NOBLE_UNGROUPED = {"leanformer.ops.noble_decode.GROUPED": False}  # q, k, v NOBLE layers one launch each
NOBLE_PREFETCH = {"leanformer.ops.noble_decode.PREFETCH": True}  # the kernel's epilogue loads before its K loop
NOBLE_ACT = {"leanformer.ops.noble_decode.ACTIVATION_IN_KERNEL": True}  # the MLP's GELU in the NOBLE kernel
NORMS_IN = {"leanformer.ops.norm_linear.ROUTE": "cuda"}
SINGLE_ON = {"leanformer.ops.fused_decay_step.SINGLE_PASS": True}
ARGMAX_TWO = {"leanformer.decoding.TWO_PASS_ARGMAX": True}
ARGMAX_IN_HEAD = {"leanformer.decoding.ARGMAX_IN_HEAD": True}  # the head's product and the argmax in one kernel
WIDE_TILES = {"leanformer.ops.skinny_linear.TILES": "wide"}  # the default again since 2026-12-06 23:50
NARROW_TILES = {"leanformer.ops.skinny_linear.TILES": "narrow"}
FMA_8, FMA_4 = ({"leanformer.ops.skinny_linear.FMA_COLUMNS": c} for c in (8, 4))  # 768-wide outputs: 96, 192 programs
PDL_ON = {"leanformer.ops.skinny_linear.PDL": True, "leanformer.ops.fused_decay_step.PDL": True}
SPLIT_K = {"leanformer.ops.skinny_linear.SPLIT_K": "auto"}  # long-K products in parts (the default since 2026-12-07)
NO_SPLIT_K = {"leanformer.ops.skinny_linear.SPLIT_K": None}
ALL_ON = dict(SKINNY_ON, **SINGLE_ON, **PDL_ON)


def skinny_config(n: int, k: int, stages: int, warps: int) -> dict:
    """SKINNY_ON with every product's blocks fixed (instead of the heuristic's)."""
    pre = "leanformer.ops.skinny_linear."
    return dict(SKINNY_ON, **{pre + "BLOCK_N": n, pre + "BLOCK_K": k, pre + "NUM_STAGES": stages,
                              pre + "NUM_WARPS": warps})


VARIANTS = [  # (label, arm, context, batch, compile: False, True or a torch.compile mode, module switches)
    ("dijiang 8K x8 compiled", "dijiang_scratch", 8192, 8, True, {}),
    ("dijiang 8K x8 compiled, wide tiles", "dijiang_scratch", 8192, 8, True, WIDE_TILES),
    ("dijiang 8K x8 compiled, narrow tiles", "dijiang_scratch", 8192, 8, True, NARROW_TILES),
    ("dijiang 8K x8 compiled, FMA 8 columns", "dijiang_scratch", 8192, 8, True, FMA_8),
    ("dijiang 8K x8 compiled, FMA 4 columns", "dijiang_scratch", 8192, 8, True, FMA_4),
    ("preln 512 x1 compiled, FMA 8 columns", "preln", 512, 1, True, FMA_8),
    ("dijiang 8K x8 compiled, cuBLAS products", "dijiang_scratch", 8192, 8, True, SKINNY_OFF),
    ("dijiang 8K x8 compiled, skinny, single pass", "dijiang_scratch", 8192, 8, True, dict(SKINNY_ON, **SINGLE_ON)),
    ("dijiang 8K x8 compiled, norms in products", "dijiang_scratch", 8192, 8, True, NORMS_IN),
    ("dijiang 8K x8 compiled, norms in products, single pass", "dijiang_scratch", 8192, 8, True,
     dict(NORMS_IN, **SINGLE_ON)),
    ("dijiang 8K x8 compiled, norms in products, single pass, two-pass argmax", "dijiang_scratch", 8192, 8, True,
     dict(NORMS_IN, **SINGLE_ON, **ARGMAX_TWO)),
    ("dijiang 8K x8 compiled, two-pass argmax", "dijiang_scratch", 8192, 8, True, ARGMAX_TWO),
    ("dijiang 8K x8 compiled, split K", "dijiang_scratch", 8192, 8, True, SPLIT_K),
    ("preln 512 x1 compiled, split K", "preln", 512, 1, True, SPLIT_K),
    ("dijiang 8K x8 compiled, no split K", "dijiang_scratch", 8192, 8, True, NO_SPLIT_K),
    ("preln 512 x1 compiled, no split K", "preln", 512, 1, True, NO_SPLIT_K),
    ("dijiang 8K x8 compiled, argmax in head", "dijiang_scratch", 8192, 8, True, ARGMAX_IN_HEAD),
    ("dijiang 8K x8 compiled, argmax in head, FMA 8 columns", "dijiang_scratch", 8192, 8, True,
     dict(ARGMAX_IN_HEAD, **FMA_8)),
    ("preln 8K x8 compiled", "preln", 8192, 8, True, {}),
    ("preln 8K x8 compiled, norms in products", "preln", 8192, 8, True, NORMS_IN),
    ("noble 512 x1 graph, NOBLE kernel", "noble_fused", 512, 1, False, NOBLE_ON),
    ("noble 512 x1 graph", "noble_fused", 512, 1, False, NOBLE_OFF),
    ("preln 512 x1 graph", "preln", 512, 1, False, {}),
    ("preln 512 x1 graph, cuBLAS products", "preln", 512, 1, False, SKINNY_OFF),
    ("dijiang 8K x8 compiled, skinny, single pass, PDL", "dijiang_scratch", 8192, 8, True, ALL_ON),
    ("dijiang 8K x8 graph, skinny, single pass, PDL", "dijiang_scratch", 8192, 8, False, ALL_ON),
    ("dijiang 8K x8 graph, skinny, single pass", "dijiang_scratch", 8192, 8, False, dict(SKINNY_ON, **SINGLE_ON)),
    ("dijiang 8K x8 compiled, skinny n16 k256 s4 w2", "dijiang_scratch", 8192, 8, True, skinny_config(16, 256, 4, 2)),
    ("dijiang 8K x8 compiled, skinny n16 k512 s3 w4", "dijiang_scratch", 8192, 8, True, skinny_config(16, 512, 3, 4)),
    ("dijiang 8K x8 compiled, skinny n32 k256 s4 w4", "dijiang_scratch", 8192, 8, True, skinny_config(32, 256, 4, 4)),
    ("noble 512 x1 compiled", "noble_fused", 512, 1, True, NOBLE_OFF),
    ("noble 512 x1 compiled, NOBLE kernel", "noble_fused", 512, 1, True, NOBLE_ON),
    ("noble 512 x1 compiled, NOBLE kernel, q k v apart", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **NOBLE_UNGROUPED)),
    ("noble 512 x1 compiled, NOBLE kernel, prefetch", "noble_fused", 512, 1, True, dict(NOBLE_ON, **NOBLE_PREFETCH)),
    ("noble 512 x1 compiled, NOBLE kernel, prefetch, GELU in kernel", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **NOBLE_PREFETCH, **NOBLE_ACT)),
    ("noble 512 x1 compiled, NOBLE kernel, q k v apart, prefetch", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **NOBLE_UNGROUPED, **NOBLE_PREFETCH)),
    ("preln 8K x8 compiled, cuBLAS products", "preln", 8192, 8, True, SKINNY_OFF),
    ("preln 512 x1 compiled", "preln", 512, 1, True, {}),
    ("sas_p 512 x1 compiled", "sas_p", 512, 1, True, {}),
    ("dijiang 8K x32 compiled", "dijiang_scratch", 8192, 32, True, {}),
    ("dijiang 8K x32 compiled, cuBLAS products", "dijiang_scratch", 8192, 32, True, SKINNY_OFF),
    ("dijiang 8K x8 compiled, gate outside", "dijiang_scratch", 8192, 8, True, GATE_OUT),
    ("dijiang 8K x8 graph", "dijiang_scratch", 8192, 8, False, {}),
    ("dijiang 8K x8 graph, cuBLAS products", "dijiang_scratch", 8192, 8, False, SKINNY_OFF),
    ("dijiang 8K x8 autotuned", "dijiang_scratch", 8192, 8, AUTOTUNE, {}),
    ("sas_p 512 x1 graph", "sas_p", 512, 1, False, {}),
    ("sas_p 512 x1 graph, cuBLAS products", "sas_p", 512, 1, False, SKINNY_OFF),
    ("sas_p 512 x1 graph, compiled mix", "sas_p", 512, 1, False, MIX_ON),
    ("dijiang 8K x8 graph, gate outside", "dijiang_scratch", 8192, 8, False, GATE_OUT),
    ("noble 512 x1 graph, CosNet kernel", "noble_fused", 512, 1, False, dict(COSNET_ON, **NOBLE_OFF)),
    # NOBLE at batch 32 (0.66× Pre-LN's tokens/s, H100 2026-12-07 08:22; never profiled at this batch): where the
    # step's extra 0.37 ms goes, and the NOBLE kernel with 8 warps or 32-column blocks (each program then
    # recomputes z = x W_downᵀ for half as many columns: the redundancy that grows with the batch); those two
    # switches reach the step's plain few-row products too
    ("preln 512 x32 compiled", "preln", 512, 32, True, {}),
    ("noble 512 x32 compiled, NOBLE kernel", "noble_fused", 512, 32, True, NOBLE_ON),
    ("noble 512 x32 compiled, NOBLE kernel, 8 warps", "noble_fused", 512, 32, True,
     dict(NOBLE_ON, **{"leanformer.ops.skinny_linear.NUM_WARPS": 8})),
    ("noble 512 x32 compiled, NOBLE kernel, 32-column blocks", "noble_fused", 512, 32, True,
     dict(NOBLE_ON, **{"leanformer.ops.skinny_linear.BLOCK_N": 32})),
    # NOBLE's layers with a long K (the MLP's down product, 3072 -> 768) split along K as Pre-LN's plain product is:
    # partial products of [W; W_down], then one kernel for the sums and the branch (noble_decode.SPLIT_K); at batch
    # 32 each NOBLE launch took 11.73 µs against Pre-LN's 4.99 (H100 2026-12-07 14:13, callN2)
    ("noble 512 x32 compiled, NOBLE kernel, split K", "noble_fused", 512, 32, True,
     dict(NOBLE_ON, **{"leanformer.ops.noble_decode.SPLIT_K": True})),
    ("noble 512 x1 compiled, NOBLE kernel, split K", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **{"leanformer.ops.noble_decode.SPLIT_K": True})),
    # every single-layer NOBLE launch (o, MLP up with its GELU, MLP down) as z once in its own column blocks, then
    # the epilogue (noble_decode.Z_APART): one NOBLE launch's time over [W; W_down]'s plain product grew with the
    # rank at 32 rows (2.6, 5.3, 9.7 µs at r 16, 32, 64; H100 2026-12-07 19:02, callY)
    ("noble 512 x32 compiled, NOBLE kernel, split K, z apart", "noble_fused", 512, 32, True,
     dict(NOBLE_ON, **{"leanformer.ops.noble_decode.SPLIT_K": True, "leanformer.ops.noble_decode.Z_APART": True})),
    ("noble 512 x1 compiled, NOBLE kernel, split K, z apart", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **{"leanformer.ops.noble_decode.SPLIT_K": True, "leanformer.ops.noble_decode.Z_APART": True})),
    # CosNet's r x r product in the NOBLE epilogue on tensor cores (noble_decode.COSNET_PRECISION "tf32")
    ("noble 512 x32 compiled, NOBLE kernel, split K, tf32 CosNet", "noble_fused", 512, 32, True,
     dict(NOBLE_ON, **{"leanformer.ops.noble_decode.SPLIT_K": True,
                       "leanformer.ops.noble_decode.COSNET_PRECISION": "tf32"})),
    ("noble 512 x1 compiled, NOBLE kernel, split K, tf32 CosNet", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **{"leanformer.ops.noble_decode.SPLIT_K": True,
                       "leanformer.ops.noble_decode.COSNET_PRECISION": "tf32"})),
    # last: its programs wait for each other (a hang would stop the variants after it)
    ("noble 512 x1 compiled, NOBLE kernel, shared z, GELU in kernel", "noble_fused", 512, 1, True,
     dict(NOBLE_ON, **NOBLE_ACT, **{"leanformer.ops.noble_decode.SHARED_Z": True})),
]


def run_variant(label, arm, context, batch, compiled, switches, device, smoke) -> dict:
    from leanformer.bench.decode import _model, static_prefill, time_static_steps
    from leanformer.bench.train import base_config, get_size

    size = get_size("tiny" if smoke else "gpt2")
    if smoke:
        context, batch, compiled = 16, 2, False
    steps, warmup = (4, 1) if smoke else (64, 5)
    extra = warmup + steps + 40
    mode = compiled if isinstance(compiled, str) else None
    torch._dynamo.reset()  # each variant compiles afresh: past the recompile limit Dynamo silently runs eager
    with switches_set(switches):
        model, reason = _model(arm, base_config(size, max_seq_len=context + extra), device, bf16=not smoke)
        if model is None:
            return {"label": label, "status": reason}
        graph = "none" if device.type != "cuda" else "cuda"
        dec1, prefill_s = static_prefill(model, context, context + extra, 4096, device, size.vocab_size, graph,
                                         nullcontext, compile=bool(compiled), compile_mode=mode)
        row = {"label": label, "arm": arm, "context": context, "batch": batch, "compiled": compiled,
               "switches": switches, "prefill_s": prefill_s}
        row.update(time_static_steps(dec1, batch, steps, warmup, device, nullcontext))
        dec = dec1.expanded(batch)
        dec.capture()
        for _ in range(2):
            dec.step()
        # what the step computed (the same seeded model and prompt in every variant of an arm and context):
        # the tokens it chose and its last logits, to compare a variant with the default in the same call
        row["check"] = {"tokens": dec.tokens[:, context:context + 2].tolist()[:2],
                        "logits_sum": float(dec.logits.float().sum()), "logits_head": dec.logits[0, :3].tolist()}
        replays = 2 if smoke else 10
        kernels = top_kernels(dec.step, device, steps=replays, limit=10**6)
        kernels = [k for k in kernels if kernel_class(k["kernel"]) != "annotation"]
        totals = kernel_totals(kernels)
        row.update(kernels_per_step=sum(k["calls_per_step"] for k in kernels), kernel_ms=totals["total"],
                   by_class=totals, top=kernels[:25], status="ok")
        row["gap_ms"] = row["ms_per_step"] - row["kernel_ms"]
        return row


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Decoding step profile ({m['device']}, torch {m['torch']}, {m['date']})", "",
             f"`{m['command']}`", "",
             "| variant | step ms | kernels/step | kernel ms | gap ms | µs per kernel (step / kernels) | status | "
             "tokens, Σ logits |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | | | | | | {r.get('status')} | |")
            continue
        lines.append(f"| {r['label']} | {r['ms_per_step']:.3f} | {r['kernels_per_step']:.0f} | {r['kernel_ms']:.3f} | "
                     f"{r['gap_ms']:.3f} | {1e3 * r['ms_per_step'] / max(r['kernels_per_step'], 1):.2f} | ok | "
                     f"{r['check']['tokens'][0]}, {r['check']['logits_sum']:.6g} |")
    for r in result["rows"]:
        if r.get("status") != "ok":
            continue
        cls = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["by_class"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"## {r['label']}", "", f"ms by class: {cls}", "", "| kernel | ms | calls | µs each |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{k['kernel'][:90]}` | {k['ms_per_step']:.4f} | {k['calls_per_step']:.0f} | "
                  f"{1e3 * k['ms_per_step'] / max(k['calls_per_step'], 1):.2f} |" for k in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="decode_profile_out")
    p.add_argument("--variants", default="", help="semicolon-separated labels (default: all; labels hold commas)")
    p.add_argument("--budget", type=float, default=500.0, help="seconds; variants not started by then are skipped")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    t0 = time.monotonic()
    wanted = chosen_variants(p, args.variants, VARIANTS)
    result = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "command": "python3 " + " ".join(sys.argv)}, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:  # the first variant and the first with module switches
        wanted = wanted[:1] + [v for v in wanted if v[5]][:1]
    for v in wanted:
        if time.monotonic() - t0 > args.budget:
            result["rows"].append({"label": v[0], "status": "skipped (time budget)"})
            continue
        try:
            row = run_variant(*v, device=device, smoke=args.cpu_smoke)
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            row = {"label": v[0], "status": f"failed: {type(e).__name__}: {e}"[:300]}
        result["rows"].append(row)
        done = row.get("status") == "ok"
        print(f"[{time.monotonic() - t0:6.1f}s] {v[0]}: {row.get('status')}"
              + (f", {row['ms_per_step']:.3f} ms/step, {row['kernels_per_step']:.0f} kernels" if done else ""),
              flush=True)
        (out / "decode_profile.json").write_text(json.dumps(result, indent=1))
        (out / "decode_profile.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
