"""``leanformer bench train | attention | decode``: each writes JSON, markdown and a PNG into ``--out``.

Bad input (an unknown arm, method or size, a non-positive length) raises :class:`ConfigError`, which
``leanformer.cli.main`` prints as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from leanformer.arms import ARMS
from leanformer.bench.machine import command_line
from leanformer.bench.report import Report, logging_rows_into, partial_path
from leanformer.config import ConfigError
from leanformer.device import resolve_device


_BENCH_ARMS = [a.name for a in ARMS.values() if a.parent is None]  # a converted arm needs a trained parent


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help=f"output folder for JSON, markdown and PNG (default: {out})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is steadier on a busy machine")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; what has not started when it is spent is 'skipped (time budget)'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)

    t = sub.add_parser("train", help="training-step tokens/s, MFU and peak memory of each arm")
    _common(t, "runs/bench")
    t.add_argument("--size", default="cpu",
                   help="model size: tiny (tests), cpu (d256, 4 layers), gpt2 (d768, 12 layers, 12 heads)")
    t.add_argument("--arms", default=None,
                   help="comma-separated arms (default: preln, parallel, noble_plain, noble_fused, sas, sas_p, "
                        f"sas_p_nonorm, dijiang, dijiang_fla); any of: {', '.join(_BENCH_ARMS)}")
    t.add_argument("--seq-len", type=int, default=None,
                   help="default: the size's (tiny 32, cpu 256, gpt2 1024)")
    t.add_argument("--batch", type=int, default=None, help="default: the size's (tiny 2, cpu 8, gpt2 16)")
    t.add_argument("--repeats", type=int, default=10, help="timed steps (median reported)")
    t.add_argument("--compile", action="store_true", default=None,
                   help="run each arm under torch.compile (default: on CUDA; with --compile the eager arms run too)")
    t.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compiled arms (e.g. reduce-overhead: CUDA graphs)")
    t.add_argument("--eager", action="store_true", default=None,
                   help="also time the eager arms (default: on CPU, or when --compile is given)")
    t.add_argument("--compile-arms", default=None, help="arms to compile with --compile (default: the arms run)")
    t.add_argument("--pos", default="rope", choices=("rope", "learned", "none"),
                   help="every arm's positions: rope (default), learned (GPT-2's own, as llm.c's model), none")
    t.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: the table of known GPUs; none on CPU)")
    t.set_defaults(func=run_train)

    a = sub.add_parser("attention", help="token-mixer forward+backward time and memory against length")
    _common(a, "runs/bench")
    a.add_argument("--lengths", default=None,
                   help="comma-separated sequence lengths (default CPU 512..16384, GPU 512..32768)")
    a.add_argument("--methods", default=None,
                   help="comma-separated (default: all): softmax, shaped, dijiang_parallel, dijiang_chunk, "
                        "dijiang_fla")
    a.add_argument("--batch", type=int, default=None, help="B (default: 1 on CPU, 4 on GPU)")
    a.add_argument("--heads", type=int, default=None, help="H (default: 2 on CPU, 12 on GPU)")
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop repeating a cell once its timed calls took this long (at least 2 calls)")
    a.add_argument("--max-memory-gb", type=float, default=None,
                   help="skip DiJiang's parallel form above this estimate (default: 70%% of free memory)")
    a.add_argument("--graphs", action="store_true",
                   help="CUDA: time each call replayed from a CUDA graph (the GPU's time without the host's "
                        "launches, as a training step compiled with CUDA graphs pays it)")
    a.set_defaults(func=run_attention)

    d = sub.add_parser("decode", help="ms/token and memory against context length at several batch sizes")
    _common(d, "runs/bench")
    d.add_argument("--size", default="cpu", help="model size: tiny, cpu, gpt2")
    d.add_argument("--arms", default=None,
                   help="comma-separated arms (default: preln, dijiang, sas_p, noble_fused); any of: "
                        f"{', '.join(_BENCH_ARMS)}")
    d.add_argument("--contexts", default=None,
                   help="comma-separated (default CPU 512,2048,8192; GPU 512,2048,8192,32768)")
    d.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    d.add_argument("--steps", type=int, default=None,
                   help="timed decoding steps (default: 8 on CPU, 32 on GPU)")
    d.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill call (default 1024 on CPU, 4096 on GPU)")
    d.add_argument("--max-memory-gb", type=float, default=None,
                   help="skip a (context, batch) whose cache would pass this (default: 80%% of free memory)")
    d.add_argument("--path", default=None,
                   help="graph (static cache + CUDA graph; default on CUDA), static (the same fixed-shape step "
                        "without a graph) or eager (growing caches; default on CPU)")
    d.add_argument("--weights", default="bf16",
                   help="on CUDA: bf16 (a bf16 decoding copy of the model, default) or autocast (float32 "
                        "weights under bf16 autocast)")
    d.add_argument("--compile", action="store_true",
                   help="pass the static step through torch.compile before its CUDA graph is captured")
    d.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the step with --compile: default or max-autotune-no-cudagraphs "
                        "(Inductor times Triton matrix products against cuBLAS and fuses epilogues into them)")
    d.add_argument("--kernels", default=None,
                   help="the step's kernels for this run, name=choice comma-separated (default first): "
                        "products=triton|cublas, tiles=wide|narrow, noble=triton|eager, noble-k=split|whole, "
                        "norms=apart|in-products, "
                        "step=two-pass|single, argmax=two-pass|one-pass|in-head, pdl=off|on "
                        "(leanformer/bench/kernel_switches.py)")
    d.set_defaults(func=run_decode)


def _run(args: argparse.Namespace, bench: Callable[[torch.device], Report]) -> int:
    """Pick the device, set ``--threads`` for the run (restored after), run, write and print the report."""
    device = resolve_device(args.device, "--device")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        with logging_rows_into(args.out):  # rows kept as measured, should the run not reach its end
            report = bench(device)
    except KeyboardInterrupt:
        print(f"interrupted: the rows measured so far are in {args.out}/<benchmark>.partial.jsonl (one JSON "
              "object per line); no report was written", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    paths = report.write(Path(args.out))
    partial_path(args.out, report.name).unlink(missing_ok=True)  # the full report supersedes the row log
    print(report.markdown())
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from leanformer.bench.train import run_train_bench

    return _run(args, lambda device: run_train_bench(
        size=args.size, arms=args.arms, seq_len=args.seq_len, batch=args.batch,
        compile=args.compile, eager=args.eager, compile_arms=args.compile_arms, compile_mode=args.compile_mode,
        pos=args.pos, device=device,
        warmup=3 if args.warmup is None else args.warmup,
        repeats=args.repeats, peak_flops=args.peak_flops, time_budget=args.time_budget,
        command=command_line("leanformer bench train", args)))


def run_attention(args: argparse.Namespace) -> int:
    from leanformer.bench.attention import run_attention_bench

    return _run(args, lambda device: run_attention_bench(
        lengths=args.lengths, methods=args.methods, batch=args.batch, heads=args.heads,
        head_dim=args.head_dim, dtype=args.dtype, device=device,
        warmup=2 if args.warmup is None else args.warmup, repeats=args.repeats, max_seconds=args.max_seconds,
        max_memory_gb=args.max_memory_gb, graphs=args.graphs,
        time_budget=args.time_budget, command=command_line("leanformer bench attention", args)))


def run_decode(args: argparse.Namespace) -> int:
    from leanformer.bench.decode import run_decode_bench
    from leanformer.bench.kernel_switches import kernel_switches

    with kernel_switches(args.kernels):
        return _run(args, lambda device: run_decode_bench(
            size=args.size, arms=args.arms, contexts=args.contexts, batches=args.batches, steps=args.steps,
            warmup=2 if args.warmup is None else args.warmup, prefill_chunk=args.prefill_chunk, device=device,
            time_budget=args.time_budget, max_memory_gb=args.max_memory_gb, path=args.path, weights=args.weights,
            compile=args.compile, compile_mode=args.compile_mode,
            command=command_line("leanformer bench decode", args)))
