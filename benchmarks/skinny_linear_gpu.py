"""The few-row product of a decoding step (issue #15): cuBLAS (``F.linear``) against
:mod:`leanformer.ops.skinny_linear`'s kernel, at GPT-2 small's decoding shapes, inside CUDA graphs.

For each (rows M, in K, out N): the kernel's result against float64 (max error relative to max |y|, and the
share of elements equal to the float64 product rounded to bf16), then the time per product of ``--calls``
back-to-back products captured in one CUDA graph (median of replays ÷ calls: the cost inside a decoding
graph, launch gaps included), for ``F.linear`` and for each kernel configuration (BLOCK_N × BLOCK_K ×
stages × warps, and the module's heuristic). The bytes of the weight over the time give the bandwidth;
the H100's HBM3 peak is 3.35 TB/s.

    PYTHONPATH=$PWD python3 benchmarks/skinny_linear_gpu.py --out $OUT
    PYTHONPATH=$PWD TRITON_INTERPRET=1 python benchmarks/skinny_linear_gpu.py --cpu-smoke   # tests the script

Writes ``skinny_linear.json`` and ``skinny_linear.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (label, K, N): GPT-2 small (d 768, vocab 50,304)
    ("q,k,v 768→2304", 768, 2304),
    ("q,k,v,gate 768→3072 / MLP up", 768, 3072),
    ("o 768→768", 768, 768),
    ("MLP down 3072→768", 3072, 768),
    ("lm_head 768→50304", 768, 50304),
]
ROWS = (1, 8, 32)
CONFIGS = list(itertools.product((16, 32, 64), (128, 256, 512), (3, 5), (4,))) + [(16, 256, 4, 2), (32, 256, 4, 8)]
WIDE_CONFIGS = [(128, 64, 4, 4), (128, 128, 4, 4), (128, 128, 4, 8), (128, 256, 3, 8), (256, 64, 4, 8),
                (256, 128, 3, 8), (64, 768, 2, 4), (64, 128, 6, 4)]  # --wide: for the head (768 → 50,304, 77 MB)


def graph_time_per_call(fn, calls: int, replays: int) -> float:
    """Microseconds per ``fn()`` when ``calls`` of them run back to back in one captured CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/skinny_linear")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--budget", type=float, default=240.0)
    p.add_argument("--shapes", default="", help="only the shapes whose label holds one of these comma-separated "
                                                 "words (e.g. lm_head)")
    p.add_argument("--rows", default="", help="comma-separated row counts (default 1,8,32)")
    p.add_argument("--wide", action="store_true", help="also wider column blocks (128, 256) and more stages")
    p.add_argument("--splits", default="", help="comma-separated split-K part counts: also time the partial "
                                                 "products alone (skinny_linear.split_linear's kernel; its sum "
                                                 "fuses into the next kernel under torch.compile)")
    args = p.parse_args(argv)
    from leanformer.ops import skinny_linear as sl

    t0 = time.monotonic()
    smoke = args.cpu_smoke
    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.bfloat16
    words = [w for w in args.shapes.split(",") if w]
    shapes = [("smoke 64→48", 64, 48)] if smoke else [s for s in SHAPES if not words or any(w in s[0] for w in words)]
    rows_list = (1, 3) if smoke else tuple(int(r) for r in args.rows.split(",")) if args.rows else ROWS
    configs = CONFIGS[:2] if smoke else CONFIGS + (WIDE_CONFIGS if args.wide else [])
    result = {"meta": {"device": "cpu" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "command": "python3 " + " ".join(sys.argv), "calls_per_graph": args.calls},
              "rows": []}
    g = torch.Generator(device=dev).manual_seed(0)
    for (label, K, N), M in itertools.product(shapes, rows_list):
        if time.monotonic() - t0 > args.budget:
            result["rows"].append({"shape": label, "M": M, "status": "skipped (time budget)"})
            continue
        x = torch.randn(M, K, device=dev, generator=g).to(dt)
        w = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).to(dt)
        b = (0.1 * torch.randn(N, device=dev, generator=g)).to(dt)
        ref = F.linear(x.double(), w.double(), b.double())
        row = {"shape": label, "M": M, "K": K, "N": N, "weight_MB": N * K * 2 / 1e6}
        y = sl.skinny_linear(x, w, b)
        row["kernel_rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max())
        row["kernel_equal_rounded"] = float((y == ref.to(dt)).float().mean())
        yc = F.linear(x, w, b)
        row["cublas_rel_err"] = float((yc.double() - ref).abs().max() / ref.abs().max())
        row["cublas_equal_rounded"] = float((yc == ref.to(dt)).float().mean())
        if smoke:
            row["times_us"] = {}
            result["rows"].append(row)
            continue
        def cublas(x=x, w=w, b=b):
            return F.linear(x, w, b)

        def kernel(x=x, w=w, b=b):
            return sl.skinny_linear(x, w, b)
        times = {"F.linear": graph_time_per_call(cublas, args.calls, args.replays)}
        times["kernel (heuristic)"] = graph_time_per_call(kernel, args.calls, args.replays)
        for bn, bk, st, nw in configs:
            if bk > K:
                continue
            sl.BLOCK_N, sl.BLOCK_K, sl.NUM_STAGES, sl.NUM_WARPS = bn, bk, st, nw
            try:
                times[f"n{bn} k{bk} s{st} w{nw}"] = graph_time_per_call(kernel, args.calls, args.replays)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                times[f"n{bn} k{bk} s{st} w{nw}"] = f"failed: {type(e).__name__}: {e}"[:120]
            finally:
                sl.BLOCK_N = sl.BLOCK_K = sl.NUM_STAGES = sl.NUM_WARPS = None
        for parts in (int(v) for v in args.splits.split(",") if v):
            n_parts = sl._parts(M, N, K, dt, parts)

            def partials(x=x, w=w, n=n_parts):
                return sl._partials_op(x, w, n)
            yp = sl.split_linear(x, w, b, parts)
            row[f"split {parts} rel_err"] = float((yp.double() - ref).abs().max() / ref.abs().max())
            times[f"split {parts} (partials)"] = graph_time_per_call(partials, args.calls, args.replays)
        row["times_us"] = times
        row["heuristic"] = sl.launch_config(M, N, K, dt)
        best = min((v, k) for k, v in times.items() if isinstance(v, float) and k != "F.linear")
        row["best"] = {"config": best[1], "us": best[0], "TB_s": row["weight_MB"] / best[0]}
        row["status"] = "ok"
        print(f"{label} M={M}: F.linear {times['F.linear']:.2f} us, heuristic {times['kernel (heuristic)']:.2f}, "
              f"best {best[1]} {best[0]:.2f} us ({row['weight_MB'] / best[0]:.2f} TB/s); err "
              f"{row['kernel_rel_err']:.2e}, {row['kernel_equal_rounded']:.3f} equal", flush=True)
        result["rows"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skinny_linear.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Few-row products in CUDA graphs ({result['meta']['device']}, torch {torch.__version__}, "
             f"{result['meta']['date']})", "", f"`{result['meta']['command']}`", "",
             "| shape | M | weight MB | F.linear µs | kernel (heuristic) µs | best config | best µs | best TB/s | "
             "× F.linear (heuristic) | kernel max err / max | equal to rounded f64 (kernel, cuBLAS) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['shape']} | {r['M']} | {r.get('status', 'smoke')} |")
            continue
        t = r["times_us"]
        lines.append(f"| {r['shape']} | {r['M']} | {r['weight_MB']:.2f} | {t['F.linear']:.2f} | "
                     f"{t['kernel (heuristic)']:.2f} | {r['best']['config']} | {r['best']['us']:.2f} | "
                     f"{r['best']['TB_s']:.2f} | {t['F.linear'] / t['kernel (heuristic)']:.2f} | "
                     f"{r['kernel_rel_err']:.2e} | {r['kernel_equal_rounded']:.3f}, {r['cublas_equal_rounded']:.3f} |")
    (out / "skinny_linear.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
