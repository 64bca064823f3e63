"""What the device-to-device copies of a compiled training step are: their bytes, time and the host op that made each;
and where the GPU idles inside the step.

Issue #13: the Pre-LN GPT-2 step under CUDA graphs (``reduce-overhead``) spends 1.11 ms of its 38.56 in 16
``Memcpy DtoD`` per step (H100, 2026-12-07 11:24, ``train_profile.py``, docs/gpu/misc_2026-12-07/callJ), about
0.8 GB moved: the size of the model's float32 weights and gradients, not of a batch. This script profiles one
warm step of an arm (GPT-2 small, seq 1024, bf16 autocast, fused AdamW, as ``bench train``), exports the trace and
lists each copy with the innermost host operator around the runtime call that issued it, so the copy can be
named before anything is changed.

The idle gaps: the Pre-LN GPT-2 b16 step under CUDA graphs took 37.09 ms for 34.83 ms of profiled GPU activity,
and timed five steps per synchronisation it took the same (H100, 2026-12-07 16:37, docs/gpu/misc_2026-12-07/callQ),
so the 2.3 ms are gaps inside the step. The script lists the largest, with the GPU activity on each side and the
host op that issued the one after it.

    python3 benchmarks/step_copies.py --arm preln --batch 16 --mode reduce-overhead --out OUT
    python3 benchmarks/step_copies.py --smoke --out OUT        # CPU: tiny model, eager (checks the parsing)
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch


GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")  # the trace categories of work on the device


class _Issuers:
    """The innermost CPU operator (``cpu_op``) of the issuing thread that encloses a GPU event's runtime call (by
    the correlation id), for the events of one chrome trace (torch.profiler's export)."""

    def __init__(self, events: list[dict]) -> None:
        self.runtime = {e["args"]["correlation"]: e for e in events
                        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        self.ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
        self.frames = [e for e in events if e.get("cat") == "python_function" and "dur" in e]

    def _around(self, gpu_event: dict, host: list[dict]) -> list[dict]:
        """The host events of ``host`` on the issuing thread that enclose the GPU event's runtime call, innermost
        first."""
        call = self.runtime.get(gpu_event.get("args", {}).get("correlation"))
        if call is None:
            return []
        tid, ts = call.get("tid"), call["ts"]
        return sorted((o for o in host if o.get("tid") == tid and o["ts"] <= ts <= o["ts"] + o["dur"]),
                      key=lambda o: o["dur"])

    def __call__(self, gpu_event: dict) -> str | None:
        around = self._around(gpu_event, self.ops)
        return around[0]["name"] if around else None

    def python(self, gpu_event: dict, depth: int = 3) -> str | None:
        """The ``depth`` innermost Python frames around the issuing call (a trace recorded ``with_stack``),
        innermost first, joined by " < "; None without them."""
        around = self._around(gpu_event, self.frames)
        return " < ".join(f["name"] for f in around[:depth]) or None


def copies_in_trace(trace: dict) -> list[dict]:
    """Every GPU memcpy/memset of a chrome trace (torch.profiler's export) with its bytes, µs and the host
    operator that issued it (:class:`_Issuers`)."""
    events = trace.get("traceEvents", [])
    issuer = _Issuers(events)
    return [{"name": e.get("name"), "bytes": e.get("args", {}).get("bytes"), "us": e.get("dur"),
             "issued_in": issuer(e), "python": issuer.python(e)}
            for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]


def gaps_in_trace(trace: dict, limit: int = 20) -> dict:
    """Where the device idles between its first and last activity (kernels, copies, fills) of a chrome trace:
    ``span_us``, ``busy_us`` (the union of the activities' intervals, every stream and device of the trace
    together: one GPU here), ``idle_us``, and the ``limit`` longest gaps, each with its µs, its start ``ts`` (the
    trace's clock), the activity that ended last before it (``after``), the one that starts it (``before``) and
    the host op that issued that one (``issued_in``; for a kernel of a replayed CUDA graph, the op around the
    graph's launch)."""
    events = trace.get("traceEvents", [])
    work = sorted((e for e in events if e.get("cat") in GPU_ACTIVITY and "dur" in e), key=lambda e: e["ts"])
    if not work:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
    issuer = _Issuers(events)
    gaps, busy = [], 0.0
    start, end, last = work[0]["ts"], work[0]["ts"] + work[0]["dur"], work[0]
    for e in work[1:]:
        if e["ts"] > end:
            busy += end - start
            gaps.append({"us": e["ts"] - end, "ts": end, "after": last.get("name"), "before": e.get("name"),
                         "event": e})
            start = e["ts"]
        if e["ts"] + e["dur"] >= end:
            end, last = e["ts"] + e["dur"], e
    busy += end - start
    span = end - work[0]["ts"]
    gaps = sorted(gaps, key=lambda g: -g["us"])[:limit]
    for g in gaps:  # the issuing op only for the gaps kept (a scan of the host ops each)
        e = g.pop("event")
        g["issued_in"], g["python"] = issuer(e), issuer.python(e)
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "gaps": gaps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", default="preln")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode; 'eager' for none")
    p.add_argument("--out", default="step_copies_out")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, eager")
    p.add_argument("--logits", action="store_true",
                   help="the model returns its logits too, as every step did before 2026-12-07 14:40 (their unused "
                        "gradient: a fill and a copy the size of the logits)")
    p.add_argument("--python-frames", action="store_true",
                   help="record the Python frames around each copy and gap (with_stack: it adds host time, so the "
                        "gaps then include the tracing's own)")
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from leanformer.arms import arm_config
    from leanformer.bench.train import base_config, get_size, training_step

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    size = get_size("tiny" if args.smoke else "gpt2")
    seq = 64 if args.smoke else 1024
    mode = "eager" if args.smoke else args.mode
    step = training_step(arm_config(base_config(size, max_seq_len=seq), args.arm), device, args.batch, seq,
                         compile=mode != "eager", compile_mode=None if mode in ("eager", "default") else mode)
    step.return_logits = args.logits
    model = step.model

    for _ in range(4):  # compile, record the graphs, warm
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=acts, with_stack=args.python_frames) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace.json"))
    trace = json.loads((out / "trace.json").read_text())
    copies, gaps = copies_in_trace(trace), gaps_in_trace(trace)
    (out / "trace.json").unlink()  # large; the table below is what is kept
    by_owner = Counter()
    for c in copies:
        by_owner[(c["name"], c["issued_in"], c["python"])] += c["us"] or 0
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "arm": args.arm, "batch": args.batch,
              "mode": mode, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "copies": copies, "gaps": gaps,
              "params_bytes_fp32": sum(p.numel() * 4 for p in model.parameters())}
    (out / "step_copies.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Copies in one {args.arm} step ({result['device']}, {mode}, batch {args.batch}, {result['date']})", "",
             f"{len(copies)} copies, {sum(c['us'] or 0 for c in copies):.0f} µs, "
             f"{sum(c['bytes'] or 0 for c in copies) / 1e6:.1f} MB; "
             f"float32 weights {result['params_bytes_fp32'] / 1e6:.1f} MB",
             "", "| copy | issued in | Python frames (innermost first) | µs |", "|---|---|---|---:|"]
    lines += [f"| {name} | `{owner}` | `{frames}` | {us:.0f} |"
              for (name, owner, frames), us in by_owner.most_common(20)]
    lines += ["", "| copy | bytes | µs | issued in |", "|---|---:|---:|---|"]
    lines += [f"| {c['name']} | {c['bytes']} | {c['us']} | `{c['issued_in']}` |" for c in copies[:60]]
    lines += ["", f"## Idle gaps: {gaps['idle_us']:.0f} µs of a {gaps['span_us']:.0f} µs span "
                  f"(device busy {gaps['busy_us']:.0f} µs)", "",
              "| µs | after | before | issued in | Python frames |", "|---:|---|---|---|---|"]
    lines += [f"| {g['us']:.0f} | `{(g['after'] or '')[:60]}` | `{(g['before'] or '')[:60]}` | `{g['issued_in']}` "
              f"| `{g['python']}` |" for g in gaps["gaps"]]
    (out / "step_copies.md").write_text("\n".join(lines) + "\n")
    gap_lines = lines[lines.index(next(x for x in lines if x.startswith("## Idle gaps"))):]
    print("\n".join(lines[:6 + min(20, len(by_owner))] + [""] + gap_lines[:14]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
