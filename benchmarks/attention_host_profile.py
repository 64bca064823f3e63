"""Where a lone attention call's wall time goes on the host (issues #13, #14): `bench attention`'s cell, profiled.

A lone DiJiang call at 4K (paper map, fused kernel) took 2.17 ms of wall time for 1.32 ms of GPU kernels on an
H100 (docs/benchmarks.md, 2026-12-06); shaped attention below 8K is host-bound the same way. This script runs
`leanformer.bench.attention.build_call`'s call (forward + backward, B 4, H 12, d_head 64, bf16) for each
method and length and reports, per call: wall time (CUDA-synchronised median), the GPU's kernel time, and the
host's time by op (``torch.profiler`` CPU self time, the top ops by total), so the launch path that costs has a
name (our custom-op dispatch, Triton's launcher, autograd, aten).

    python3 benchmarks/attention_host_profile.py --out OUT [--methods softmax,dijiang_fused] [--lengths 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from leanformer.bench.attention import build_call


def wall_ms(call, repeats: int) -> float:
    """Median wall time of ``call`` in ms, each timed from a synchronised GPU to a synchronised GPU."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_call(call, calls: int) -> dict:
    """Host self time by op and GPU kernel time per call, from ``calls`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    host = sorted(((e.key, e.self_cpu_time_total / calls / 1e3, e.count / calls) for e in events
                   if e.self_cpu_time_total > 0), key=lambda r: -r[1])
    kernels = [e for e in events if getattr(e, "self_device_time_total", 0) > 0 and e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / calls / 1e3
    return {"host_self_ms_by_op": [{"op": k, "ms": ms, "calls": n} for k, ms, n in host[:30]],
            "host_self_ms_total": sum(ms for _, ms, _ in host), "gpu_kernel_ms": gpu_ms,
            "kernels_per_call": sum(e.count for e in kernels) / calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="softmax,dijiang_fused,shaped")
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profiled", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        for method in (m.strip() for m in args.methods.split(",")):
            row = {"method": method, "T": T}
            try:
                _, call, _ = build_call(method, dev, dt, 4, 12, T, 64)
                for _ in range(5):
                    call()
                row["wall_ms"] = wall_ms(call, args.repeats)
                row.update(profile_call(call, args.profiled))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failing cell is reported, not fatal
                row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(f"[{method} T={T}] " + (f"wall {row['wall_ms']:.3f} ms, GPU {row['gpu_kernel_ms']:.3f} ms, host "
                                          f"self {row['host_self_ms_total']:.3f} ms, "
                                          f"{row['kernels_per_call']:.0f} kernels" if row["status"] == "ok"
                                          else row["status"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (out / "attention_host_profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Host time of lone attention calls ({meta['device']}, torch {meta['torch']}, {meta['date']})", "",
             "| method | T | wall ms | GPU kernels ms | host self ms | kernels |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['method']} | {r['T']} | {r['wall_ms']:.3f} | {r['gpu_kernel_ms']:.3f} | "
                         f"{r['host_self_ms_total']:.3f} | {r['kernels_per_call']:.0f} |")
        else:
            lines.append(f"| {r['method']} | {r['T']} | | | | {r['status']} |")
    for r in rows:
        if r["status"] == "ok":
            lines += ["", f"## {r['method']} T={r['T']}: host self time by op (ms per call)", "",
                      "| op | ms | calls |", "|---|---:|---:|"]
            lines += [f"| `{o['op'][:90]}` | {o['ms']:.4f} | {o['calls']:.0f} |" for o in r["host_self_ms_by_op"]]
    (out / "attention_host_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4 + len(rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
