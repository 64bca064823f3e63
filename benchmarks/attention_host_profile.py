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
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from leanformer.bench.attention import build_call
from leanformer.ops import eager_op


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


def python_profile(call, calls: int) -> list[dict]:
    """The Python functions with the most internal time per call (cProfile, ``calls`` calls, GPU synchronised
    after them): where the host's time goes inside our ops, torch.library and Triton's launcher."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive calls, tottime, cumtime, callers)}
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:25]
    return [{"function": f"{Path(f).name}:{line} {name}", "us": tt / calls * 1e6, "calls": n / calls}
            for (f, line, name), (n, _, tt, _, _) in top]


def cpu_host_time(methods: list[str], T: int, repeats: int) -> list[dict]:
    """Host time per call on the CPU with every Triton launch of our ops replaced by a no-op (run under
    ``TRITON_INTERPRET=1``, where the ops accept CPU tensors; the feature-map kernels switched on): what our
    Python, the dispatcher and autograd cost without the kernels, direct (eager_op) against through the op.
    B 1, H 2, d_head 64, float32; the outputs are garbage (nothing is computed), only the time counts. The stubs
    stay for the rest of the process (run it as a script), and cover DiJiang's ops only: ``shaped`` runs as usual."""
    from leanformer.layers import dijiang
    from leanformer.ops import feature_map, fused_decay_attention

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    for module in (fused_decay_attention, feature_map):
        module._wrap = lambda kernel: _NoLaunch()
    dijiang.FEATURE_KERNEL = "always"
    rows = []
    for method in methods:
        _, call, _ = build_call(method, torch.device("cpu"), torch.float32, 1, 2, T, 64)
        for fast in (True, False):
            eager_op.EAGER_FAST_PATH = fast
            for _ in range(30):
                call()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            rows.append({"method": method, "T": T, "path": "direct" if fast else "op",
                         "host_us": statistics.median(times) * 1e6})
            print(f"[{method} T={T} {rows[-1]['path']}] {rows[-1]['host_us']:.0f} µs per call", flush=True)
        eager_op.EAGER_FAST_PATH = True
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="softmax,dijiang_fused,shaped")
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profiled", type=int, default=5)
    p.add_argument("--op-path-too", action="store_true",
                   help="also time each cell with eager_op.EAGER_FAST_PATH off (every call through the registered op)")
    p.add_argument("--cpu-no-launch", action="store_true",
                   help="CPU only: host time with our kernels' launches stubbed out, direct against the op path "
                        "(needs TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.cpu_no_launch:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--cpu-no-launch needs TRITON_INTERPRET=1 in the environment")
        torch.set_num_threads(1)
        rows = cpu_host_time([m.strip() for m in args.methods.split(",")], int(args.lengths.split(",")[0]),
                             args.repeats)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from leanformer.bench.machine import machine_string

        command = "TRITON_INTERPRET=1 python3 benchmarks/attention_host_profile.py " + " ".join(argv or sys.argv[1:])
        meta = {"device": machine_string(torch.device("cpu")), "torch": torch.__version__, "command": command,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_average": os.getloadavg()}
        (out / "attention_host_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return 0
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    paths = (True, False) if args.op_path_too else (True,)
    for T in (int(x) for x in args.lengths.split(",")):
        for method, fast in ((m.strip(), f) for m in args.methods.split(",") for f in paths):
            row = {"method": method if fast else f"{method} (op path)", "T": T}
            eager_op.EAGER_FAST_PATH = fast
            try:
                _, call, _ = build_call(method, dev, dt, 4, 12, T, 64)
                for _ in range(5):
                    call()
                row["wall_ms"] = wall_ms(call, args.repeats)
                row.update(profile_call(call, args.profiled))
                row["python_us_by_function"] = python_profile(call, args.profiled)
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failing cell is reported, not fatal
                row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
            finally:
                eager_op.EAGER_FAST_PATH = True
            rows.append(row)
            summary = (f"wall {row['wall_ms']:.3f} ms, GPU {row['gpu_kernel_ms']:.3f} ms, host self "
                       f"{row['host_self_ms_total']:.3f} ms, {row['kernels_per_call']:.0f} kernels"
                       if row["status"] == "ok" else row["status"])
            print(f"[{row['method']} T={T}] {summary}", flush=True)
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
            lines += ["", f"### {r['method']} T={r['T']}: Python internal time by function (cProfile, µs per call)",
                      "", "| function | µs | calls |", "|---|---:|---:|"]
            lines += [f"| `{o['function'][:90]}` | {o['us']:.1f} | {o['calls']:.0f} |"
                      for o in r["python_us_by_function"]]
    (out / "attention_host_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4 + len(rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
