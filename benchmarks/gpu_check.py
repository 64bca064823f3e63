"""One GPU run that checks and measures everything (issue 8): run it through ``benchmarks/gpu.sh``.

1. Correctness on the device: ``tests/test_device_equivalence.py`` under pytest (the fast paths in float32
   and bfloat16 against float64 references: DiJiang's forms and cached decoding, NOBLE fused vs plain,
   shaped attention; the same tests run on the CPU in CI), tabulated with each check's error; then compiled
   against eager training losses (20 steps, the same weights and batches). fla's kernels come last (Triton
   compiles and autotunes them for minutes on first use).
2. The three benchmarks at GPT-2-small scale (d768 × 12 layers × 12 heads, vocab 50304, seq 1024, bf16):
   ``bench train`` (compiled: Pre-LN, NOBLE, SAS-P, SAS-P without norms; then the crammed-BERT shape,
   16 × 768, seq 128, batch 128, vocab 32,768: Pre-LN, SAS-P, no-norm; then Pre-LN at batch 32 under CUDA
   graphs with GPT-2's learned positions), ``bench attention`` (512..32K),
   ``bench decode`` (512..32K context, batch 1/8/32). Each section has a time budget; whatever has not
   started when it is spent is reported as "skipped (time budget)", so the whole run ends in ~8 minutes.
3. A summary against the issue's targets, printed last.

Outputs (at most 8 files come back from the GPU machine): ``gpu_check.json`` (everything),
``gpu_check.md`` (all tables), ``train.png``, ``attention.png``, ``decode.png`` (and ``log.txt`` from
gpu.sh). ``--cpu-smoke`` runs the same code tiny on CPU (a test of this script, not a measurement).

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out $OUT
    CUDA_VISIBLE_DEVICES= bash benchmarks/gpu.sh --cpu-smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

T0 = time.monotonic()
EQUIVALENCE_TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_device_equivalence.py"


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ 1. correctness


class Checks:
    """Collects PASS/FAIL/SKIP lines."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, name: str, status: str, err: float | None, tol: float | None, note: str = "") -> None:
        self.rows.append({"check": name, "status": status, "max_rel_err": err, "tol": tol, "note": note})
        e = "—" if err is None else f"{err:.2e}"
        t = "—" if tol is None else tol
        print(f"  {status:4s} {name:58s} err {e:>9s}  tol {t}  {note}", flush=True)

    def add(self, name: str, err: float | None, tol: float | None, note: str = "") -> None:
        status = "SKIP" if err is None else ("PASS" if err == err and err <= tol else "FAIL")  # NaN fails
        self.record(name, status, err, tol, note)

    def fail(self, name: str, exc: BaseException) -> None:
        self.record(name, "FAIL", None, None, f"{type(exc).__name__}: {exc}"[:300])
        traceback.print_exc(limit=3)


def check_equivalence_tests(checks: Checks, select: str, deadline: float) -> None:
    """Run the pytest checks whose names match ``-k select`` on every device present (they take the
    ``device`` fixture) and record one row per test, with the error and tolerance it recorded."""
    if importlib.util.find_spec("pytest") is None:
        checks.add(f"{EQUIVALENCE_TESTS.name} -k '{select}'", None, None, "pytest is not installed here")
        return
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={xml}", "-k", select, str(EQUIVALENCE_TESTS)]
        try:
            subprocess.run(cmd, timeout=max(30.0, deadline - elapsed()), check=False)
        except subprocess.TimeoutExpired:
            checks.add(f"{EQUIVALENCE_TESTS.name} -k '{select}'", None, None, "skipped (time budget)")
            return
        if not xml.is_file():
            checks.fail(f"{EQUIVALENCE_TESTS.name} -k '{select}'", RuntimeError("pytest wrote no report"))
            return
        for case in ET.parse(xml).getroot().iter("testcase"):
            props = {p.get("name"): float(p.get("value")) for p in case.iter("property")}
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            status = "FAIL" if failed is not None else "SKIP" if skipped is not None else "PASS"
            note = next((e.get("message", "") for e in (failed, skipped) if e is not None), "")
            checks.record(case.get("name"), status, props.get("max_rel_err"), props.get("tol"), note[:300])


def check_compiled_losses(checks: Checks, device: torch.device, smoke: bool) -> None:
    """Compiled vs eager training losses over 20 steps (same weights and batches), d 256 × 4 layers."""
    from leanformer.bench.train import compiled_vs_eager_losses

    for arm in ("preln", "noble_fused", "sas_p"):
        name = f"{arm}: compiled vs eager losses, 20 steps (max relative difference)"
        try:
            eager, compiled = compiled_vs_eager_losses(arm, "tiny" if smoke else "cpu", device)
            diff = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
            checks.add(name, diff, 2e-2 if device.type == "cuda" else 1e-4,
                       f"final {eager[-1]:.4f} eager, {compiled[-1]:.4f} compiled")
        except Exception as e:  # noqa: BLE001
            checks.fail(name, e)


OUR_CHECKS = ("equivalence tests", "compiled losses")
FLA_CHECKS = ("fla equivalence tests",)


def run_correctness(device: torch.device, smoke: bool, groups: tuple[str, ...],
                    deadline: float) -> list[dict]:
    """The check groups named in ``groups``; one not started by ``deadline`` (elapsed seconds) is a SKIP.
    Our kernels take seconds; fla's take minutes on first use (Triton compiles and autotunes them)."""
    checks = Checks()
    table = {"equivalence tests": lambda: check_equivalence_tests(checks, "not fla", deadline),
             "compiled losses": lambda: check_compiled_losses(checks, device, smoke),
             "fla equivalence tests": lambda: check_equivalence_tests(checks, "fla", deadline)}
    for name in groups:
        fn = table[name]
        if elapsed() > deadline:
            checks.add(name, None, None, "skipped (time budget)")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a section that cannot even start
            checks.fail(name, e)
    return checks.rows


# ------------------------------------------------------------------------------------------ 3. summary


def _get(rows: list[dict], **where) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()) and r.get("status") == "ok":
            return r
    return None


def targets(train: list[dict], attention: list[dict], decode: list[dict],
            bert: list[dict] | None = None, batch32: list[dict] | None = None) -> list[dict]:
    """The issue's targets with what was measured (ratios; ``None`` where not measured)."""
    out = []

    def add(target: str, value: float | None, goal: float, higher: bool, fmt: str, where: str) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": target, "measured": value, "goal": goal, "met": met, "fmt": fmt,
                    "where": where})

    # issue 13: compiled training step (bench train compiles on CUDA by default)
    pre = _get(train, arm="preln", compile=True)
    add("Pre-LN GPT-2 small tokens/s (compiled, batch 16)", pre and pre.get("tokens_per_s"), 500_000, True,
        "int", "bench train")
    add("Pre-LN MFU (compiled)", pre and pre.get("mfu"), 0.43, True, "pct", "bench train")
    best = max((r["tokens_per_s"] for r in (pre, _get(batch32 or [], arm="preln", compile=True)) if r), default=None)
    add("Pre-LN GPT-2 small tokens/s (compiled, best of batch 16 and of batch 32 with CUDA graphs and GPT-2's "
        "learned positions)", best, 500_000, True, "int",
        "bench train --batch 32 --compile-mode reduce-overhead --pos learned")
    nf = _get(train, arm="noble_fused", compile=True)
    add("NOBLE step-time overhead (compiled)", nf and nf.get("step_overhead"), 0.10, False, "pct", "bench train")
    add("NOBLE peak memory × Pre-LN (compiled)", nf and nf.get("mem_vs_preln"), 1.05, False, "x", "bench train")
    for arm in ("sas_p", "sas_p_nonorm"):
        r = _get(train, arm=arm, compile=True)
        add(f"{arm} share of its FLOP-limit speed-up, GPT-2 small", r and r.get("realised"), 0.95, True, "pct",
            "bench train")
    for arm, goal in (("sas_p", 1.10), ("sas_p_nonorm", 1.14)):
        r = _get(bert or [], arm=arm, compile=True)
        add(f"{arm} tokens/s ÷ Pre-LN, crammed-BERT shape", r and r.get("speed_vs_preln"), goal, True, "x",
            "bench train --size bert")
    for method in ("dijiang_chunk", "dijiang_fla"):
        for T, goal in ((4096, 1.0), (16384, 3.0)):
            r = _get(attention, method=method, seq_len=T)
            add(f"{method} fwd+bwd speed-up vs softmax at {T // 1024}K", r and r.get("speedup_vs_softmax"),
                goal, True, "x", "bench attention")
    for arm in ("dijiang", "dijiang_fla"):
        r = _get(decode, arm=arm, context=8192, batch=32)
        add(f"{arm} decode tokens/s ÷ softmax at 8K, batch 32", r and r.get("speed_vs_softmax"), 5.0, True,
            "x", "bench decode")
    return out


def targets_markdown(rows: list[dict]) -> str:
    def f(v, kind):
        if v is None:
            return "not measured"
        if kind == "int":
            return f"{v:,.0f}"
        return f"{100 * v:.1f}%" if kind == "pct" else f"{v:.2f}×"

    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for r in rows:
        higher = r["target"].find("overhead") < 0 and r["target"].find("memory") < 0
        goal = ("≥ " if higher else "≤ ") + f(r["goal"], r["fmt"])
        met = {True: "yes", False: "no", None: "—"}[r["met"]]
        lines.append(f"| {r['target']} | {f(r['measured'], r['fmt'])} | {goal} | {met} |")
    return "\n".join(lines)


def correctness_markdown(rows: list[dict]) -> str:
    lines = ["| check | status | max rel. error | tolerance | note |", "|---|---|---|---|---|"]
    for r in rows:
        e = "—" if r["max_rel_err"] is None else f"{r['max_rel_err']:.2e}"
        lines.append(f"| {r['check']} | {r['status']} | {e} | {r['tol'] if r['tol'] is not None else '—'} "
                     f"| {r['note']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code, tiny, on CPU (tests this script)")
    p.add_argument("--budget", type=float, default=560.0,
                   help="seconds for the whole run (default 560; the compiled training arms take ~35 s each to "
                        "compile, NOBLE ~75 s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arms")
    p.add_argument("--smoke-compile", action="store_true",
                   help="with --cpu-smoke: also run the compile section")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if smoke:
        torch.set_num_threads(1)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    from leanformer.bench.machine import run_metadata

    meta = run_metadata(device, command)
    log(f"device {meta['machine']}, torch {torch.__version__}, out {out}")
    try:
        from leanformer.ops.decayed_linear_attention import fla_available

        meta["fla"] = fla_available()
    except Exception as e:  # noqa: BLE001
        meta["fla"] = f"{type(e).__name__}: {e}"
    log(f"fla importable: {meta['fla']}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks in true float32

    result: dict = {"meta": meta, "correctness": [], "reports": {}, "targets": []}
    reports = {}

    # elapsed seconds by which each section must have started its last item (a share of --budget)
    budget = args.budget
    ends = {"train": 0.40 * budget, "train_bert": 0.62 * budget, "train_b32": 0.67 * budget,
            "attention": 0.77 * budget,
            "decode": 0.88 * budget, "fla checks": 0.93 * budget}

    log("== 1. correctness (our kernels; fla's come after the benchmarks: Triton autotunes them for minutes)")
    try:
        result["correctness"] = run_correctness(device, smoke, groups=OUR_CHECKS, deadline=ends["train"])
    except Exception as e:  # noqa: BLE001
        log(f"correctness section failed: {type(e).__name__}: {e}")
        traceback.print_exc()

    save(out, result, reports, command)
    from leanformer.bench.attention import run_attention_bench
    from leanformer.bench.decode import run_decode_bench
    from leanformer.bench.train import run_train_bench

    # training: compiled on CUDA (bench train's default), eager on CPU; --no-compile: eager everywhere
    compile_flag = False if args.no_compile else (True if smoke and args.smoke_compile else None)
    if smoke:
        train_kw = dict(size="tiny", repeats=2, warmup=1, compile=compile_flag, eager=False if compile_flag else None)
        bert_kw = dict(train_kw, arms="preln,sas_p,sas_p_nonorm")
        attn_kw = dict(lengths=[64, 128], batch=1, heads=2, head_dim=16, repeats=2, warmup=1)
        dec_kw = dict(size="tiny", contexts=[32, 64], batches=[1, 2], steps=2, warmup=1, prefill_chunk=32)
    else:
        train_kw = dict(size="gpt2", seq_len=1024, batch=16, repeats=8, warmup=3, compile=compile_flag,
                        arms="preln,noble_fused,sas_p,sas_p_nonorm", compile_reserve_s=40.0)
        bert_kw = dict(train_kw, size="bert", seq_len=128, batch=128, arms="preln,sas_p,sas_p_nonorm")
        attn_kw = dict(lengths=[512, 1024, 2048, 4096, 8192, 16384, 32768], batch=4, heads=12, head_dim=64,
                       dtype="bfloat16", repeats=5, warmup=2, max_seconds=2.0)
        dec_kw = dict(size="gpt2", arms="preln,dijiang,sas_p,noble_fused,dijiang_fla",
                      contexts=[512, 2048, 8192, 32768], batches=[1, 8, 32], steps=16, warmup=2,
                      prefill_chunk=4096)
    # Pre-LN's best batch (issue 13), as its best figure was measured: CUDA graphs and GPT-2's learned positions
    # (llm.c's model; 504,775 tokens/s on an H100, 2026-12-07, docs/gpu/misc_2026-12-07/callAB)
    b32_kw = dict(train_kw, arms="preln", batch=4 if smoke else 32, compile_mode="reduce-overhead", pos="learned")
    sections = [("train", run_train_bench, train_kw), ("train_bert", run_train_bench, bert_kw),
                ("train_b32", run_train_bench, b32_kw),
                ("attention", run_attention_bench, attn_kw), ("decode", run_decode_bench, dec_kw),
                ("fla checks", None, {})]
    for i, (name, fn, kw) in enumerate(sections, start=2):
        left = ends[name] - elapsed()
        log(f"== {i}. {name} (must start its last item within {left:.0f}s)")
        try:
            if fn is None:  # fla's kernels against ours and float64
                result["correctness"] += run_correctness(device, smoke, FLA_CHECKS, deadline=ends[name])
                save(out, result, reports, command)
                continue
            rep = fn(device=device, time_budget=max(1.0, left), command=f"{command}  # section {name}: {kw}",
                     **kw)
            reports[name] = rep
            result["reports"][name] = rep.to_json()
            if name not in ("train_bert", "train_b32"):  # at most 8 files come back from the GPU machine
                rep.write(out, formats=("png",))
            print(rep.markdown(level=3), flush=True)
        except Exception as e:  # noqa: BLE001
            log(f"{name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            result["reports"][name] = {"error": f"{type(e).__name__}: {e}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(out, result, reports, command)  # after every section: a run cut short still leaves its results

    save(out, result, reports, command)

    n_fail = sum(r["status"] == "FAIL" for r in result["correctness"])
    n_pass = sum(r["status"] == "PASS" for r in result["correctness"])
    print("\n==================== SUMMARY ====================")
    print(f"machine: {meta['machine']}   elapsed: {meta['elapsed_s']} s   fla: {meta['fla']}")
    print(f"correctness: {n_pass} PASS, {n_fail} FAIL, "
          f"{sum(r['status'] == 'SKIP' for r in result['correctness'])} SKIP")
    for r in result["correctness"]:
        if r["status"] == "FAIL":
            print(f"  FAIL {r['check']}: err {r['max_rel_err']} {r['note']}")
    print(targets_markdown(result["targets"]))
    print(f"outputs: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 1 if n_fail else 0


def save(out: Path, result: dict, reports: dict, command: str) -> None:
    """Write gpu_check.json (everything) and gpu_check.md (all tables) from what has run so far."""
    from leanformer.bench.report import finite_or_none

    meta = result["meta"]
    names = ("train", "train_bert", "train_b32", "attention", "decode")
    rows = {k: (reports[k].rows if k in reports else []) for k in names}
    result["targets"] = targets(rows["train"], rows["attention"], rows["decode"], rows["train_bert"],
                                rows["train_b32"])
    meta["elapsed_s"] = round(elapsed(), 1)
    (out / "gpu_check.json").write_text(json.dumps(finite_or_none(result), indent=1, allow_nan=False) + "\n")
    md = [f"# GPU check: {meta['machine']}", "",
          f"- date {meta['date']}; torch {meta['torch']}; fla {meta['fla']}; elapsed {meta['elapsed_s']} s",
          f"- command: `{command}`", "", "## Targets", "", targets_markdown(result["targets"]), "",
          "## Correctness", "", correctness_markdown(result["correctness"]), ""]
    md += [reports[k].markdown(level=2) for k in names if k in reports]
    (out / "gpu_check.md").write_text("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
