"""Where a decoder's prefill goes (issue #15's target: an 8K prompt, DiJiang's time ≤ softmax's).

For each variant (arm, prompt length, prefill chunk, DiJiang's ``FUSED_MAX_LEN``): a fresh
:class:`~leanformer.decoding.StaticDecoder` (GPT-2 small, bf16 decoding copy) prefills a random prompt three
times (the first pays one-off costs and is dropped; a compiled prefill runs four times, two dropped), then
once under ``torch.profiler``: wall seconds (median), GPU kernel time and launches, host-side aten ops, and
the top kernels. A variant replayed from a CUDA graph (``prefill_graph``) keeps one decoder, restarted
before each prompt: its first two prefills (an ordinary one, then the capture) are dropped. Wall ≫ kernel
time means the prefill is bound by the host (Python and launches), not by the GPU.

    PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/prefill_profile.py --out $OUT
    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/prefill_profile.py --cpu-smoke   # tests the script

Writes ``prefill_profile.json`` and ``prefill_profile.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from train_profile import kernel_class, kernel_totals, top_kernels

from leanformer.bench.variants import chosen_variants

BEFORE_2026_12_07 = {"leanformer.ops.eager_op.EAGER_FAST_PATH": False,  # every op through the dispatcher,
                     "leanformer.ops.decayed_linear_attention.COMPILE_BOUNDARY_ON_CUDA": False,  # eager boundary
                     "leanformer.layers.dijiang.COMPILE_NORMALISER_ON_CUDA": False}  # and eager normaliser
GATED = {"leanformer.layers.dijiang.GATED_FLA_PROMPTS": "always"}  # a variant without it runs the ungated route
# (run_variant switches it to "never"), so each label keeps the meaning it was timed with
VARIANTS = [  # (label, arm, prompt tokens, prefill chunk, dijiang FUSED_MAX_LEN or None, module switches,
    #            the prefill's form, a key of PREFILL_FORMS)
    ("preln 8K chunk 4096", "preln", 8192, 4096, None, {}, False),
    ("dijiang 8K chunk 4096", "dijiang_scratch", 8192, 4096, None, {}, False),
    ("dijiang 8K chunk 4096, compiled prefill", "dijiang_scratch", 8192, 4096, None, {}, "blocks"),
    ("preln 8K chunk 4096, compiled prefill", "preln", 8192, 4096, None, {}, "blocks"),
    ("dijiang 8K chunk 4096, as before 2026-12-07", "dijiang_scratch", 8192, 4096, None, BEFORE_2026_12_07, False),
    ("dijiang 8K chunk 8192, fused ≤ 8192", "dijiang_scratch", 8192, 8192, 8192, {}, False),
    ("preln 8K chunk 8192", "preln", 8192, 8192, None, {}, False),
    ("dijiang 8K chunk 2048", "dijiang_scratch", 8192, 2048, None, {}, False),
    # replayed from a CUDA graph of the whole prefill (StaticDecoder(prefill_graph=True), one decoder restarted
    # before each prompt): the host's work goes (DiJiang's compiled prefill: 17.9 ms wall, 8.3 of kernels)
    ("preln 8K chunk 8192, graph", "preln", 8192, 8192, None, {}, "graph"),
    ("dijiang 8K chunk 8192, fused ≤ 8192, graph", "dijiang_scratch", 8192, 8192, 8192, {}, "graph"),
    ("preln 8K chunk 4096, graph", "preln", 8192, 4096, None, {}, "graph"),
    ("dijiang 8K chunk 4096, graph", "dijiang_scratch", 8192, 4096, None, {}, "graph"),
    # the whole model compiled: ≈ 120 s of compiling each on an H100 (2026-12-07 08:23); DiJiang's 17.9 ms wall
    ("dijiang 8K chunk 4096, compiled prefill, whole model", "dijiang_scratch", 8192, 4096, None, {}, "model"),
    ("preln 8K chunk 8192, compiled prefill, whole model", "preln", 8192, 8192, None, {}, "model"),
    ("dijiang 8K chunk 8192, fused ≤ 8192, compiled prefill, whole model", "dijiang_scratch", 8192, 8192, 8192, {},
     "model"),
    ("preln 8K chunk 4096, compiled prefill, whole model", "preln", 8192, 4096, None, {}, "model"),
    ("dijiang 8K chunk 4096, compiled whole model, graph", "dijiang_scratch", 8192, 4096, None, {}, "model+graph"),
    ("preln 8K chunk 8192, compiled whole model, graph", "preln", 8192, 8192, None, {}, "model+graph"),
    ("dijiang 8K chunk 8192, fused ≤ 8192, compiled whole model, graph", "dijiang_scratch", 8192, 8192, 8192, {},
     "model+graph"),
    # the prompt through fla's chunk kernel with one gate per token (dijiang.GATED_FLA_PROMPTS, dla.fla_gated):
    # linear in T where the fused kernel is quadratic (its 12 calls: 3.35 ms of DiJiang's 8.8 at one chunk of 8192,
    # H100 2026-12-07 11:21), and no fp32 state product (0.36 ms)
    ("dijiang 8K chunk 8192, gated fla", "dijiang_scratch", 8192, 8192, None, GATED, False),
    ("dijiang 8K chunk 8192, gated fla, graph", "dijiang_scratch", 8192, 8192, None, GATED, "graph"),
    ("dijiang 8K chunk 8192, gated fla, compiled whole model, graph", "dijiang_scratch", 8192, 8192, None, GATED,
     "model+graph"),
]
PREFILL_FORMS = {  # a variant's form -> StaticDecoder's (compile_prefill, prefill_unit, prefill_graph)
    False: (False, "model", False),            # eager
    "blocks": (True, "blocks", False),         # each block compiled (shared graphs)
    "model": (True, "model", False),           # the whole forward compiled
    "graph": (False, "model", True),           # eager, replayed from a CUDA graph
    "model+graph": (True, "model", True),      # compiled whole, replayed from a CUDA graph
}


def run_variant(label, arm, tokens, chunk, fused_max_len, extra, compile_prefill, device, smoke) -> dict:
    from leanformer.bench.decode import _model
    from leanformer.bench.kernel_switches import switches_set
    from leanformer.bench.timing import synchronize
    from leanformer.bench.train import base_config, get_size
    from leanformer.decoding import StaticDecoder

    size = get_size("tiny" if smoke else "gpt2")
    if smoke:
        tokens, chunk = 64, min(chunk, 32)
    switches = {"leanformer.layers.dijiang.GATED_FLA_PROMPTS": "never", **extra}
    if fused_max_len:
        switches["leanformer.layers.dijiang.FUSED_MAX_LEN"] = fused_max_len
    torch._dynamo.reset()  # each variant compiles afresh (a compiled prefill's graphs stay under the recompile limit)
    with switches_set(switches):
        model, reason = _model(arm, base_config(size, max_seq_len=tokens + 8), device, bf16=not smoke)
        if model is None:
            return {"label": label, "status": reason}
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, size.vocab_size, (1, tokens), generator=g).to(device)

        compiled, unit, graphed = PREFILL_FORMS[compile_prefill]
        graphed = graphed and device.type == "cuda"  # the CPU smoke runs a graph variant as eager
        kw = dict(graph="none", prefill_chunk=chunk, prefill_unit=unit, prefill_graph=graphed,
                  compile_prefill=("eager" if smoke else True) if compiled else False)
        reused = StaticDecoder(model, 1, tokens + 8, **kw) if graphed else None

        def prefill():
            if reused is not None:  # one decoder: its graph (captured at the second prompt) replays after
                reused.restart()
                reused.prefill(prompt)
                return reused
            dec = StaticDecoder(model, 1, tokens + 8, **kw)
            dec.prefill(prompt)
            return dec

        walls = []  # a compiled prefill compiles again in its second run (a model's first call builds its
        # rotary tables, which the graphs then guard on), and a graph is captured at the second: two runs
        # dropped for them, one otherwise
        warm = 2 if compiled or graphed else 1
        for _ in range(warm + 2):
            synchronize(device)
            t0 = time.perf_counter()
            prefill()
            synchronize(device)
            walls.append(time.perf_counter() - t0)
        logits = prefill().logits.float()[0].clone()  # the last position's: compared across an arm's variants
        kernels = top_kernels(prefill, device, steps=1, limit=10**6)
        kernels = [k for k in kernels if kernel_class(k["kernel"]) != "annotation"]
        totals = kernel_totals(kernels)
        return {"label": label, "arm": arm, "tokens": tokens, "chunk": chunk, "fused_max_len": fused_max_len,
                "switches": switches, "compile_prefill": compile_prefill,
                "graph_captured": isinstance(reused._prefill_graphs.get(tokens), tuple) if reused else None,
                "wall_s": walls, "wall_median_s": statistics.median(walls[warm:]), "kernel_ms": totals["total"],
                "launches": sum(k["calls_per_step"] for k in kernels), "host_aten_ops": _host_ops(prefill),
                "by_class": totals, "top": kernels[:20], "status": "ok", "next_token": int(logits.argmax()),
                "logits": logits}


def _host_ops(fn) -> int:
    """aten operators the host dispatches in one ``fn()`` (CPU-side profile only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Prefill profile ({m['device']}, torch {m['torch']}, {m['date']})", "", f"`{m['command']}`", "",
             "| variant | wall ms (median of 2, warm) | GPU kernel ms | launches | host aten ops | next token | "
             "last logits: max abs. diff ÷ max abs. of … | … this variant's (its arm's first here) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | | | | | | | | {r.get('status')} |")
            continue
        lines.append(f"| {r['label']} | {1e3 * r['wall_median_s']:.1f} | {r['kernel_ms']:.1f} | {r['launches']:.0f} | "
                     f"{r['host_aten_ops']} | {r.get('next_token', '')} | "
                     f"{r.get('logits_rel_err', float('nan')):.1e} | {r.get('logits_vs', '')} | ok |")
    for r in result["rows"]:
        if r.get("status") != "ok":
            continue
        cls = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["by_class"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"## {r['label']}", "", f"ms by class: {cls}", "", "| kernel | ms | calls |", "|---|---:|---:|"]
        lines += [f"| `{k['kernel'][:90]}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} |" for k in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="prefill_profile_out")
    p.add_argument("--budget", type=float, default=200.0, help="seconds; variants not started by then are skipped")
    p.add_argument("--variants", default="", help="semicolon-separated labels (default: all; labels hold commas)")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    wanted = chosen_variants(p, args.variants, VARIANTS)
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    result = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "command": "python3 " + " ".join(sys.argv)}, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    references: dict[str, tuple[str, torch.Tensor]] = {}  # arm -> (label, last logits) of its first variant
    for v in wanted[:3] if args.cpu_smoke else wanted:  # smoke: the eager pair and a compiled prefill
        if time.monotonic() - t0 > args.budget:
            result["rows"].append({"label": v[0], "status": "skipped (time budget)"})
            continue
        try:
            with torch.no_grad():
                row = run_variant(*v, device=device, smoke=args.cpu_smoke)
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            row = {"label": v[0], "status": f"failed: {type(e).__name__}: {e}"[:300]}
        if "logits" in row:  # the first variant of each arm that runs is its reference (bf16 runs: ≈ 1e-2)
            ref = references.setdefault(row["arm"], (v[0], row["logits"]))
            row["logits_vs"] = ref[0]
            row["logits_rel_err"] = float((row.pop("logits") - ref[1]).abs().max() / ref[1].abs().max())
        result["rows"].append(row)
        print(f"[{time.monotonic() - t0:6.1f}s] {v[0]}: {row.get('status')}"
              + (f", {1e3 * row['wall_median_s']:.1f} ms wall, {row['kernel_ms']:.1f} ms kernels"
                 + f", next token {row['next_token']}, logits rel. err. {row['logits_rel_err']:.1e}"
                 if row.get("status") == "ok" else ""), flush=True)
        (out / "prefill_profile.json").write_text(json.dumps(result, indent=1))
        (out / "prefill_profile.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
