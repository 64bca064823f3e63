"""DiJiang's fused Triton form on one GPU (issue #14): correctness against float64, then timings.

1. ``tests/test_fused_decay_attention.py`` and ``test_fused_decay_step.py`` run on the GPU (the real kernels,
   not the interpreter; ``featuretests``: ``tests/test_feature_map_kernel.py`` alone).
2. The layer with ``dijiang.mode: fused`` (bf16 autocast, both feature maps, large q/k, learnable decay)
   against the same layer in float64 through the parallel form: output and every gradient.
3. No NaN/inf at 32K tokens in bf16 for both maps.
4. ``bench attention`` (B 4, H 12, d 64, bf16, fwd+bwd, feature map and stabilisers included): SDPA,
   the fused form and fla's chunk kernel (when its wheels were carried), both maps, 1K to 32K: where the
   fused form stops paying (it is O(T²) like FlashAttention) is where ``auto`` should hand over to fla.
5. torch.profiler: the top kernels of one fused fwd+bwd at 4K; ``breakdown``: wall vs GPU-kernel time per
   call and the top kernels, for SDPA and every DiJiang route at 4K and 16K (is the call host- or GPU-bound?),
   each DiJiang route also with the compiled PyTorch feature map in place of the feature-map kernels.
6. ``bench train --size gpt2`` compiled: Pre-LN against ``dijiang_scratch`` (``auto``) at seq 1024 × 16 and
   4096 × 4 (issue #14's targets: ≥ 0.9× and ≥ 1.3× Pre-LN's tokens/s).
7. ``variants``: the bare op under several kernel settings (``fused_decay_attention``'s switches), with its
   float64 error at 1K. 8. ``decode``: ``bench decode`` for Pre-LN, SAS-P and DiJiang.

    python benchmarks/dijiang_fused_gpu.py --out OUT [--budget SECONDS] [--sections a,b,...]
    PYTHONPATH=$PWD .venv/bin/python benchmarks/dijiang_fused_gpu.py --out /tmp/o --cpu-smoke   # tests the script

Writes OUT/fused_gpu.json (every check, timing and note) and the reports OUT/attention/, OUT/train1024/,
OUT/train4096/ and OUT/decode_graph/, OUT/decode_graph_unfused_step/, OUT/decode_compiled_graph/ (each a .json
and a .md); prints a short table last.

The commit recorded is ``--commit`` (or $GIT_COMMIT), else ``git rev-parse`` of the tree. On the lent device
machine the copy's ``.git`` was not the tree that ran (2026-12-04: every call recorded the session's first
commit), so pass the hash there: ``--commit $(git rev-parse --short HEAD)`` written out by the caller.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

SMOKE = "--cpu-smoke" in sys.argv  # the sections' code on the CPU, tiny, Triton's interpreter: a test of this script
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when leanformer's fused op is imported, below

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dijiang_gpu as dg  # noqa: E402  (its checks, sections and timers, reused)

DEV = torch.device("cpu" if SMOKE else "cuda")

FUSED = ("dijiang_fused", "dijiang_official_fused")
LENGTHS = [1024, 4096, 8192, 16384, 32768]  # the attention section's (--lengths)
FLA = ("dijiang_fla", "dijiang_official_fla")
TEST_FILES = ("tests/test_fused_decay_attention.py", "tests/test_fused_decay_step.py")  # the real kernels
FEATURE_TESTS = ("tests/test_feature_map_kernel.py",)  # section featuretests: the feature-map kernels alone


def breakdown(methods: list[str], lengths: list[int], calls: int = 5) -> None:
    """Where one fwd+bwd goes (``bench attention``'s call, B 4, H 12, d 64, bf16): wall ms per call (CUDA
    events around ``calls`` calls), the sum of its GPU kernels' time per call (torch.profiler, kernels only),
    and the top kernels. Wall ≫ GPU means the call is bound by the host (launches, Python, guards).
    A method named ``name@compiled_features`` is ``name`` with the feature map as the compiled PyTorch
    ``feature_pair`` (``dijiang.FEATURE_KERNEL = "never"``) instead of the Triton kernels."""
    from torch.profiler import ProfilerActivity, profile

    from leanformer.bench.attention import build_method
    from leanformer.layers import dijiang

    B, H, D = (1, 2, 16) if SMOKE else (4, 12, 64)
    dtype = torch.float32 if SMOKE else torch.bfloat16
    sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)
    for T in lengths:
        for label in methods:
            method, _, variant = label.partition("@")
            dijiang.FEATURE_KERNEL = "never" if variant == "compiled_features" else "cuda"
            fn, _ = build_method(method, DEV, dtype, H, D)
            q, k, v = (torch.randn(B, T, H, D, device=DEV, dtype=dtype).transpose(1, 2).requires_grad_()
                       for _ in range(3))
            go = torch.randn(B, H, T, D, device=DEV, dtype=dtype)
            for _ in range(3):
                fn(q, k, v).backward(go)
            sync()
            t = time.perf_counter()
            for _ in range(calls):
                fn(q, k, v).backward(go)
            sync()
            wall = (time.perf_counter() - t) * 1e3 / calls
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(calls):
                    fn(q, k, v).backward(go)
                sync()
            kernels = [e for e in p.key_averages() if e.self_cpu_time_total == 0
                       and getattr(e, "self_device_time_total", 0) > 0]
            gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
            row = {"breakdown": label, "T": T, "wall_ms": round(wall, 3), "gpu_ms": round(gpu, 3),
                   "top": [(e.key[:90], round(e.self_device_time_total / 1e3 / calls, 3), e.count // calls)
                           for e in top]}
            dg.RESULTS.setdefault("breakdown", []).append(row)
            print(f"[breakdown] T={T} {label}: wall {wall:.3f} ms, GPU kernels {gpu:.3f} ms", flush=True)
            for name, ms, n in row["top"]:
                print(f"    {ms:8.3f} ms  x{n:<3d} {name}", flush=True)
            del q, k, v, go
    dijiang.FEATURE_KERNEL = "cuda"


def run_tests(files=TEST_FILES) -> None:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3 if proc.returncode == 0 else -60:]
    ok = proc.returncode == 0
    dg.RESULTS["checks"].append({"name": f"pytest {' '.join(files)} on CUDA", "pass": ok,
                                 "tail": tail, "seconds": round(time.monotonic() - t, 1)})
    print(f"[check] {'PASS' if ok else 'FAIL'} pytest on CUDA: {' | '.join(tail)}", flush=True)


def attention_report(out: str, methods: list[str]) -> None:
    from leanformer.bench.attention import run_attention_bench

    lengths = [64] if SMOKE else LENGTHS
    rep = run_attention_bench(lengths=lengths, methods=methods, batch=1 if SMOKE else 4, heads=2 if SMOKE else 12,
                              head_dim=16 if SMOKE else 64, dtype="float32" if SMOKE else "bfloat16",
                              device=DEV, warmup=1 if SMOKE else 3, repeats=2 if SMOKE else 10, max_seconds=5.0,
                              command=f"leanformer bench attention --lengths {','.join(map(str, lengths))} "
                                      f"--methods {','.join(methods)} --repeats 10")
    rep.write(os.path.join(out, "attention"), formats=("json", "md"))
    print(rep.markdown(), flush=True)
    for r in rep.rows:
        dg.RESULTS["timings"].append({"method": r["method"], "T": r["seq_len"], "ms": r.get("ms"),
                                      "status": r.get("status")})


def train(out: str, budget_end: float) -> None:
    """Pre-LN against ``dijiang_scratch`` (auto) at seq 4096 × 4, DiJiang again there with fla's kernel in place
    of the fused one (``dijiang.FUSED_MAX_LEN = 2048``; report dir train4096_fla), then both at 1024 × 16."""
    from leanformer.bench.train import run_train_bench
    from leanformer.layers import dijiang

    runs = ((32, 2, "", 4096),) if SMOKE else ((4096, 4, "", 4096), (4096, 4, "_fla", 2048), (1024, 16, "", 4096))
    gated_from, dijiang.GATED_FLA_TRAINING_FROM = dijiang.GATED_FLA_TRAINING_FROM, None  # the fused kernel and
    for seq, batch, tag, fused_max in runs:  # fla's chunk kernel as labelled (the gated route: train_profile.py)
        dijiang.FUSED_MAX_LEN = fused_max
        left = budget_end - (time.monotonic() - dg.T0)
        if left < 60:
            dg.RESULTS["notes"].append(f"train seq {seq}{tag}: skipped (time budget)")
            continue
        arms = "preln,dijiang_scratch" if not tag else "dijiang_scratch"
        rep = run_train_bench(size="tiny" if SMOKE else "gpt2", arms=arms, seq_len=seq, batch=batch,
                              compile=not SMOKE, eager=SMOKE, device=DEV, warmup=1 if SMOKE else 3,
                              repeats=2 if SMOKE else 10, time_budget=left,
                              compile_reserve_s=50.0,
                              command=f"leanformer bench train --size gpt2 --arms {arms} --seq-len {seq} "
                                      f"--batch {batch} --repeats 10"
                                      + (f"  (dijiang.FUSED_MAX_LEN = {fused_max})" if tag else ""))
        rep.write(os.path.join(out, f"train{seq}{tag}"), formats=("json", "md"))
        print(rep.markdown(), flush=True)
        for r in rep.rows:
            dg.RESULTS["timings"].append({"train": f"{r.get('arm')}{tag}", "T": seq, "tok_s": r.get("tokens_per_s"),
                                          "mem": round((r.get("peak_mem_bytes") or 0) / 2**20),
                                          "status": r.get("status")})
    dijiang.FUSED_MAX_LEN, dijiang.GATED_FLA_TRAINING_FROM = 4096, gated_from


def step_profile(out: str, deadline: float) -> None:
    """The top CUDA kernels of one compiled ``dijiang_scratch`` training step (GPT-2 small, seq 1024, batch
    16), with benchmarks/train_profile.py's step section."""
    import train_profile as tp

    tp.STEP_PLAN = [tp.StepRun("gpt2 dijiang_scratch b16", "gpt2", "dijiang_scratch", 16, True)]
    torch.backends.cuda.matmul.allow_tf32 = True  # as in training (leanformer.train.loop.enable_fast_matmul)
    torch.backends.cudnn.allow_tf32 = True
    result: dict = {}
    tp.section_steps(DEV, SMOKE, result, deadline)
    dg.RESULTS["steps"] = result.get("steps")
    for row in result.get("steps") or []:
        for k in row.get("kernels") or []:
            print(f"[kernel] {k}", flush=True)


# Kernel settings timed side by side by ``variants`` (attributes of leanformer.ops.fused_decay_attention,
# read at each launch); the first is today's default.
VARIANTS = [
    ("default", {}),
    ("first kernel: per-element, Triton's stages", {"FACTORED": False, "NUM_STAGES": None, "REVERSE_ROWS": False}),
    ("factored, Triton's stages", {"NUM_STAGES": None}),
    ("stages 4", {"NUM_STAGES": 4}),
    ("stages 2", {"NUM_STAGES": 2}),
    ("w(4,8,4)", {"NUM_WARPS": (4, 8, 4)}),
    ("128x64 w8", {"BLOCK_M": 128, "BLOCK_N": 64, "NUM_WARPS": 8}),
    ("scores", {"FACTORED_SCALE": "scores"}),
]


def variants(lengths=(4096, 16384)) -> None:
    """The bare op (no feature map: feature-like q, k ≥ 0 and DiJiang's running n) fwd+bwd under each kernel
    setting, its error against the float64 parallel form at 1K (skipped beyond 4K), and ms per call."""
    from leanformer.layers.dijiang import default_log_gamma, running_log_norm
    from leanformer.ops import decayed_linear_attention as dla
    from leanformer.ops import fused_decay_attention as fda

    dev = DEV
    B, H, D = (1, 2, 16) if SMOKE else (4, 12, 64)
    dt = torch.float32 if SMOKE else torch.bfloat16
    saved = {k: getattr(fda, k) for _, kv in VARIANTS for k in kv if hasattr(fda, k)}
    lg = default_log_gamma(H).to(dev).float()
    for T in (70,) if SMOKE else (1024, *lengths):
        g = torch.Generator(device="cpu").manual_seed(T)
        q, k = (torch.rand(B, T, H, D, generator=g).to(dev, dt).transpose(1, 2) for _ in range(2))
        v = torch.randn(B, T, H, D, generator=g).to(dev, dt).transpose(1, 2)
        n = running_log_norm(3 * torch.randn(B, H, T, generator=g).to(dev), lg)
        go = torch.randn(B, T, H, D, generator=g).to(dev, dt).transpose(1, 2)
        ref = None
        if T <= 1024:
            leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
            o64 = dla.parallel(*leaves64, lg.double(), log_norm=n.double())[0]
            o64.backward(go.double())
            ref = (o64, [t.grad for t in leaves64])
        for name, kv in VARIANTS:
            if any(not hasattr(fda, key) for key in kv):
                print(f"[variant] {name}: not available in this tree", flush=True)
                continue
            for key, val in saved.items():
                setattr(fda, key, val)
            for key, val in kv.items():
                setattr(fda, key, val)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

            def step(leaves=leaves, n=n, go=go):
                o = dla.fused(*leaves, lg, log_norm=n, output_final_state=False)[0]
                o.backward(go)
                return o
            try:
                o = step()
                row = {"variant": name, "T": T, "status": "ok"}
                if ref is not None:
                    row["rel_err_o"] = dg.rel(o, ref[0])
                    row["rel_err_grads"] = max(dg.rel(a.grad, b) for a, b in zip(leaves, ref[1]))
                row["ms"] = _smoke_ms(step) if SMOKE else do_bench(step, warmup=10, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001
                row = {"variant": name, "T": T, "status": f"{type(e).__name__}: {str(e)[:200]}"}
            dg.RESULTS.setdefault("variants", []).append(row)
            print(f"[variant] {row}", flush=True)
    for key, val in saved.items():
        setattr(fda, key, val)


FEATURE_VARIANTS = [(bt, w) for bt in (32, 64, 128) for w in (4, 8)]  # (BLOCK_T, NUM_WARPS) of feature_map


def feature_variants(T: int = 16384) -> None:
    """The paper map's features of q and k (what the layer runs: q at its row max; k's row maxima, the running
    n, k at n) fwd+bwd, bf16, B 4, H 12, d = m = 64, under each (BLOCK_T, NUM_WARPS) of
    :mod:`leanformer.ops.feature_map`; error against float64 at each setting. The bytes' floor (q, k read
    three times in all, features written once, the backward's reads and writes) is printed beside."""
    from leanformer.layers import dijiang
    from leanformer.ops import feature_map as fmk

    B, H, D = (1, 2, 16) if SMOKE else (4, 12, 64)
    T = 70 if SMOKE else T
    dt = torch.float32 if SMOKE else torch.bfloat16
    proj = dijiang.feature_projection(D, D, "paper").float().to(DEV)
    lg = dijiang.default_log_gamma(H).float().to(DEV)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(B, T, H, D, generator=g).to(DEV, dt).transpose(1, 2) for _ in range(2))
    go = [torch.randn(B, T, H, D, generator=g).to(DEV, dt).transpose(1, 2) for _ in range(2)]
    log_d = torch.full((H, D), -0.5 * math.log(D), device=DEV)
    ref = dijiang.feature_pair(q.double(), k.double(), proj.double(), log_d.double(), D ** -0.25, lg.double(),
                               None, torch.float64)
    elem = torch.empty((), dtype=dt).element_size()
    floor_gb = B * H * T * D * elem * (3 + 2 + 4 + 2) / 1e9  # fwd: q, k, k read, fq, fk written; bwd: 4 read, 2 written
    saved = (fmk.BLOCK_T, fmk.NUM_WARPS)
    for block_t, warps in FEATURE_VARIANTS[:2] if SMOKE else FEATURE_VARIANTS:
        fmk.BLOCK_T, fmk.NUM_WARPS = block_t, warps
        leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_(),
                  log_d.clone().requires_grad_()]

        def step(leaves=leaves):
            fq, fk, _, _ = dijiang.kernel_feature_pair(leaves[0], leaves[1], proj, leaves[2], D ** -0.25, lg, None, dt)
            torch.autograd.backward([fq, fk], go)
            return fq, fk
        try:
            fq, fk = step()
            row = {"feature_variant": f"BLOCK_T {block_t}, warps {warps}", "T": T, "status": "ok",
                   "rel_err": max(dg.rel(fq, ref[0]), dg.rel(fk, ref[1])),
                   "ms": _smoke_ms(step) if SMOKE else do_bench(step, warmup=10, rep=200, return_mode="median"),
                   "floor_ms_at_3TBps": round(floor_gb / 3e3 * 1e3, 3)}
        except Exception as e:  # noqa: BLE001
            row = {"feature_variant": f"BLOCK_T {block_t}, warps {warps}", "T": T,
                   "status": f"{type(e).__name__}: {str(e)[:200]}"}
        dg.RESULTS.setdefault("feature_variants", []).append(row)
        print(f"[feature variant] {row}", flush=True)
    fmk.BLOCK_T, fmk.NUM_WARPS = saved


def do_bench(fn, **kwargs) -> float:
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, **kwargs)


def _smoke_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def decode(out: str) -> None:
    """``bench decode`` (graph path, bf16 weights) at issue #15's points: Pre-LN, SAS-P and DiJiang (its step
    through the one-kernel fused step) at 512/8K/32K × batch 1/8/32; DiJiang again with the fused step off
    (``leanformer.layers.dijiang.FUSED_STEP = False``: feature map + recurrent form + GroupNorm) and with RoPE
    outside the kernel (``fused_decay_step.ROPE_IN_KERNEL = False``); then Pre-LN
    and DiJiang with the step compiled before capture at 8K/32K × 8/32. $DECODE_RUNS (e.g. "graph,compiled_graph")
    picks a subset of these runs by name."""
    from leanformer.bench.decode import run_decode_bench
    from leanformer.layers import dijiang
    from leanformer.ops import fused_decay_step as fds

    contexts, batches = ([16], [1]) if SMOKE else ([512, 8192, 32768], [1, 8, 32])
    runs = [("graph", "preln,sas_p,dijiang_scratch", True, False, contexts, batches),
            ("graph_rope_outside", "dijiang_scratch", "rope outside", False, contexts, batches),
            ("graph_unfused_step", "dijiang_scratch", False, False, contexts, batches),
            ("compiled_graph", "preln,dijiang_scratch", True, True,
             contexts if SMOKE else [8192, 32768], batches if SMOKE else [8, 32])]
    wanted = os.environ.get("DECODE_RUNS")  # a comma-separated subset of the runs' names (default: all)
    runs = [r for r in runs if not wanted or r[0] in wanted.split(",")]
    for name, arms, fused_step, compiled, ctx, bat in runs:
        compiled = compiled and not SMOKE  # the CPU's eager path has no step to compile
        dijiang.FUSED_STEP = bool(fused_step)
        fds.ROPE_IN_KERNEL = fused_step != "rope outside"
        flags = (" --compile" if compiled else "") + ("" if fused_step else "  (FUSED_STEP = False)") + (
            "  (ROPE_IN_KERNEL = False)" if fused_step == "rope outside" else "")
        rep = run_decode_bench(size="tiny" if SMOKE else "gpt2", arms=arms, contexts=ctx, batches=bat,
                               device=DEV, steps=2 if SMOKE else None, compile=compiled,
                               command=f"leanformer bench decode --size gpt2 --arms {arms} --contexts "
                                       f"{','.join(map(str, ctx))} --batches {','.join(map(str, bat))}{flags}")
        rep.write(os.path.join(out, f"decode_{name}"), formats=("json", "md"))
        print(rep.markdown(), flush=True)
    dijiang.FUSED_STEP, fds.ROPE_IN_KERNEL = True, True


SECTIONS = "tests,featuretests,featurevariants,layers,nan,attention,profile,breakdown,train,steps,variants,decode"


def _tree_commit() -> str:
    """The checked-out commit: ``git rev-parse``, else .git/HEAD followed to its ref (the device machine's
    copy of the tree may have no git), else "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        head = open(".git/HEAD").read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if os.path.exists(os.path.join(".git", ref)):
            return open(os.path.join(".git", ref)).read().strip()[:12]
        for line in open(".git/packed-refs"):
            if line.strip().endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=480.0, help="seconds: later sections are skipped after")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT") or _tree_commit())
    p.add_argument("--sections", default=SECTIONS, help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--cpu-smoke", action="store_true", help="run the sections' code tiny on the CPU under Triton's "
                   "interpreter (a test of this script, not of a GPU); nan and attention's fla rows are skipped")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="the attention section's lengths")
    args = p.parse_args()
    LENGTHS[:] = [int(x) for x in args.lengths.split(",")]
    want = set(args.sections.split(","))
    os.makedirs(args.out, exist_ok=True)
    if SMOKE:
        dg.DEV = DEV
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": args.commit,
            "device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import triton
        meta["triton"] = triton.__version__
        import fla
        meta["fla"] = fla.__version__
        dg.prune_autotune()  # fla's first-use autotuning would eat the call (docs/gpu/dijiang_notes.md)
    except Exception as e:  # noqa: BLE001
        meta["fla"] = f"import failed: {e}"
    dg.RESULTS["meta"] = meta
    print(meta, flush=True)
    have_fla = "." in str(meta.get("fla", ""))
    bf16, B = torch.bfloat16, args.budget
    if "tests" in want:
        dg.section("pytest on CUDA", run_tests)
    if "featuretests" in want:
        dg.section("pytest feature map on CUDA", run_tests, FEATURE_TESTS)
    if "featurevariants" in want:
        dg.section("feature variants", feature_variants, budget=B * 0.5)
    if "layers" in want:
        dg.section("layer fused paper bf16 q/k×4", dg.layer_check, "paper", bf16, 4.0, False, mode="fused")
        dg.section("layer fused paper bf16 learnable", dg.layer_check, "paper", bf16, 1.0, True, mode="fused")
        dg.section("layer fused official bf16", dg.layer_check, "official", bf16, 1.0, False, mode="fused")
        dg.section("layer fused paper float32", dg.layer_check, "paper", torch.float32, 1.0, False, mode="fused")
    if "nan" in want and not SMOKE:
        dg.section("nan 32k", dg.nan_check_32k, (*FUSED, *(FLA if have_fla else ())), budget=B * 0.4)
    if "attention" in want:
        methods = ["softmax", *FUSED, *(FLA if have_fla and not SMOKE else ())]
        dg.section("attention", attention_report, args.out, methods, budget=B * 0.5)
    if "profile" in want:
        dg.section("profile", dg.profile, 64 if SMOKE else 4096, "dijiang_fused", budget=B * 0.6)
    if "breakdown" in want:
        fla = [*FLA, *(f"{m}@compiled_features" for m in FLA)] if have_fla and not SMOKE else []
        dg.section("breakdown", breakdown, ["softmax", FUSED[0], f"{FUSED[0]}@compiled_features", *fla],
                   [64] if SMOKE else [L for L in LENGTHS if L in (4096, 16384)] or LENGTHS[:1], budget=B * 0.6)
    with open(os.path.join(args.out, "fused_gpu.json"), "w") as f:
        json.dump(dg.RESULTS, f, indent=1, default=str)
    if "train" in want:
        dg.section("train", train, args.out, B, budget=B * 0.55)
    if "variants" in want:
        dg.section("variants", variants, budget=B * 0.7)
    if "decode" in want:
        dg.section("decode", decode, args.out, budget=B * 0.8)
    if "steps" in want:
        dg.section("step profile", step_profile, args.out, dg.T0 + B, budget=B * 0.8)
    with open(os.path.join(args.out, "fused_gpu.json"), "w") as f:
        json.dump(dg.RESULTS, f, indent=1, default=str)
    fails = [c["name"] for c in dg.RESULTS["checks"] if not c["pass"]]
    print(f"\nchecks: {len(dg.RESULTS['checks']) - len(fails)} passed, {len(fails)} failed {fails}")
    soft = {r["T"]: r["ms"] for r in dg.RESULTS["timings"] if r.get("method") == "softmax" and r.get("ms")}
    print("| T | method | ms | × SDPA (>1: faster) |\n|---|---|---|---|")
    for r in dg.RESULTS["timings"]:
        if r.get("method") and r.get("ms") and r["T"] in soft:
            print(f"| {r['T']} | {r['method']} | {r['ms']:.3f} | {soft[r['T']] / r['ms']:.2f} |")
    print("| seq | train arm | tokens/s | peak MiB | status |\n|---|---|---|---|---|")
    for r in dg.RESULTS["timings"]:
        if r.get("train"):
            print(f"| {r['T']} | {r['train']} | {r['tok_s']} | {r['mem']} | {r['status']} |")
    print("| T | method | wall ms | GPU kernels ms |\n|---|---|---|---|")
    for r in dg.RESULTS.get("breakdown", []):
        print(f"| {r['T']} | {r['breakdown']} | {r['wall_ms']:.3f} | {r['gpu_ms']:.3f} |")
    print("| T | feature-map variant | ms | floor ms | rel err | status |\n|---|---|---|---|---|---|")
    for r in dg.RESULTS.get("feature_variants", []):
        print(f"| {r['T']} | {r['feature_variant']} | {r.get('ms', float('nan')):.3f} | "
              f"{r.get('floor_ms_at_3TBps', float('nan'))} | {r.get('rel_err', float('nan')):.1e} | {r['status']} |")
    print("| T | kernel variant | ms | rel err o / grads @1K | status |\n|---|---|---|---|---|")
    for r in dg.RESULTS.get("variants", []):
        err = f"{r['rel_err_o']:.1e} / {r['rel_err_grads']:.1e}" if "rel_err_o" in r else ""
        print(f"| {r['T']} | {r['variant']} | {r.get('ms', float('nan')):.3f} | {err} | {r['status']} |")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
