"""``leanformer compare``: train every method side by side on the same data, tokens, size and seed."""

from __future__ import annotations

import argparse
import shlex

from leanformer.arms import ARMS
from leanformer.compare.presets import PRESETS
from leanformer.compare.runs import DEFAULT_ARMS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train several arms (same data, seed, width, depth, heads, tokens) and write report.md, PNG plots, "
        "samples, configs and metrics.jsonl into --out. Re-running with the same --out resumes: finished "
        "arms are not retrained.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "arms (* in --arms all):\n" + "\n".join(
        f"{'*' if a.name in DEFAULT_ARMS else ' '} {a.name:16s} {a.description}" for a in ARMS.values()) + \
        "\npresets:\n" + "\n".join(f"  {p.name:16s} {p.description}" for p in PRESETS.values())
    parser.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (default: cpu)")
    parser.add_argument("--data",
                        help="text file, folder, .jsonl or .bin shard(s); default: the built-in corpus")
    parser.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    parser.add_argument("--arms", default="all",
                        help="comma-separated arms (default: all); the baseline preln is always "
                             "trained first")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per arm; >1 reports mean ± std (default: 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the preset's baseline config for every arm, "
                             "e.g. --set train.steps=100")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the preset's; smoke uses 1, the others all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--without-baseline", action="store_true",
                        help="train only the arms named by --arms (one part of a comparison spread over "
                             "machines; the report comes from --report-only)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: assemble the report in --out from the parts named by --from")
    parser.add_argument("--from", dest="parts", nargs="+", metavar="DIR", default=[],
                        help="with --report-only: compare output folders holding the finished arms")
    parser.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this comparison."""
    parts = ["leanformer", "compare", "--preset", args.preset, "--out", str(args.out), "--arms", args.arms,
             "--seeds", str(args.seeds)]
    if args.data is not None:
        parts += ["--data", args.data]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    for assignment in args.set:
        parts += ["--set", assignment]
    if args.without_baseline:
        parts.append("--without-baseline")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from leanformer.compare.runner import execute
    from leanformer.compare.runs import plan
    from leanformer.config import ConfigError

    if args.report_only:
        from leanformer.compare.assemble import assemble

        command = shlex.join(["leanformer", "compare", "--report-only", "--out", str(args.out), "--from",
                              *args.parts])
        print(f"report: {assemble(args.parts, args.out, command)}")
        return 0
    if args.parts:
        raise ConfigError("--from only goes with --report-only")
    p = plan(preset=args.preset, arms=args.arms, seeds=args.seeds, out=args.out, data=args.data,
             overrides=args.set, progress=not args.no_progress, command=command_line(args),
             threads=args.threads, with_baseline=not args.without_baseline)
    report = execute(p)
    print(f"report: {report}" if report.name == "report.md" else f"part written: {p.out}")
    return 0
