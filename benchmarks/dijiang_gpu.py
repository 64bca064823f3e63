"""DiJiang on one GPU: correctness of the fla training path against float64, then timings against SDPA.

1. Correctness (fresh random inputs; ‖out − ref‖/‖ref‖, NaN never passes): the layer (feature map,
   stabilisers, mix, rescaled GroupNorm) through fla against the same layer in float64 through the
   parallel form, outputs and gradients (input and every parameter), for both feature maps, float32 and
   bf16 autocast, normal and large q/k, learnable decay; the range guard (keys jumping by 200 nats) at the
   op level; compiled feature map against eager.
2. Timing (``leanformer bench attention`` internals; CUDA events, medians): SDPA (FlashAttention) vs
   DiJiang through fla for both maps, plus variants: the bare fla kernel, eager (uncompiled) feature map,
   no range check (the host read's cost).
3. torch.profiler: top kernels of one DiJiang fwd+bwd at 16K.
4. No NaN/inf at 32K tokens, bf16, both maps, outputs and gradients.

    python benchmarks/dijiang_gpu.py --out OUT [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import traceback
from datetime import datetime, timezone

import torch

from leanformer.config import DiJiangConfig, TransformerConfig
from leanformer.layers import dijiang as dj
from leanformer.layers.dijiang import DiJiangAttention
from leanformer.ops import constant_decay as cdm
from leanformer.ops import decayed_linear_attention as dla
from leanformer.ops.on_cuda import COMPILED

RESULTS: dict = {"checks": [], "timings": [], "notes": []}
DEV = torch.device("cuda")
T0 = time.monotonic()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def add_check(name: str, err: float, tol: float) -> None:
    ok = err == err and err <= tol
    RESULTS["checks"].append({"name": name, "rel_err": err, "tol": tol, "pass": ok})
    print(f"[check] {'PASS' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)


# ------------------------------------------------------------------------------------------ 1. checks
def layer_check(feature_map: str, dtype: torch.dtype, scale: float, learnable: bool, T: int = 1000,
                mode: str = "fla") -> None:
    T = 100 if DEV.type == "cpu" else T
    dev = DEV
    torch.manual_seed(int(scale * 10) + T + learnable)
    cfg = TransformerConfig(d_model=256, n_heads=4, attention="dijiang",
                            dijiang=DiJiangConfig(feature_map=feature_map, mode=mode,
                                                  learnable_decay=learnable)).validate()
    att = DiJiangAttention(cfg, 0).to(dev)
    with torch.no_grad():
        for lin in (att.q, att.k):
            lin.weight.mul_(scale)
        if att.feature_map.log_d is not None:
            att.feature_map.log_d.add_(torch.randn_like(att.feature_map.log_d) * 0.3)
        att.group_norm.weight.uniform_(0.5, 1.5)
        att.group_norm.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(att).double()
    ref.cfg = copy.deepcopy(att.cfg)
    ref.cfg.mode = "parallel"
    x = torch.randn(2, T, 256, device=dev)
    gy = torch.randn(2, T, 256, device=dev)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.backward(gy.double())
    xx = x.clone().requires_grad_()
    with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = att(xx)
    y.float().backward(gy)
    label = (f"layer {mode} {feature_map} {str(dtype)[6:]} q/k×{scale} {'learnable' if learnable else 'fixed'} "
             f"decay T={T}")
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # fla computes fp32 products in TF32
    add_check(f"{label}: output", rel(y, y64), tol)
    add_check(f"{label}: grad x", rel(xx.grad, x64.grad), tol)
    for (name, p), (_, p64) in zip(att.named_parameters(), ref.named_parameters()):
        if p64.grad is not None:
            add_check(f"{label}: grad {name}", rel(p.grad, p64.grad), 3 * tol)


def guard_check() -> None:
    """Keys whose log-features jump by 200 nats: the guard splits; fwd + grads vs float64."""
    dev = DEV
    g = torch.Generator().manual_seed(7)
    B, H, T, m, d = 2, 4, (128 if DEV.type == "cpu" else 1024), 64, 64
    zq, zk = torch.randn(B, H, T, m, generator=g) * 2, torch.randn(B, H, T, m, generator=g) * 2
    zk[:, :, T // 2 + 88:] += 200.0
    v = torch.randn(B, H, T, d, generator=g)
    lg = dj.default_log_gamma(H).cpu()
    fq = (zq - zq.amax(-1, keepdim=True)).exp()
    n = dj.running_log_norm(zk.double().amax(-1), lg)
    fk = (zk.double() - n[..., None]).exp()
    leaves64 = [t.detach().double().clone().requires_grad_() for t in (fq, fk, v)]
    ref, _ = dla.parallel(*leaves64, lg, log_norm=n)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(gout)
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().to(dev, dtype).clone().requires_grad_() for t in (fq, fk, v)]
        o, _ = dla.fla_chunk(*leaves, lg.to(dev).float(), log_norm=n.to(dev).float())
        o.backward(gout.to(dev, dtype))
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        add_check(f"guard (200-nat jump) fla_chunk {str(dtype)[6:]}: output", rel(o, ref), tol)
        for name, a, b in zip("qkv", leaves, leaves64):
            add_check(f"guard fla_chunk {str(dtype)[6:]}: grad {name}", rel(a.grad, b.grad), 3 * tol)


def compile_check() -> None:
    dev = DEV
    cfg = TransformerConfig(d_model=768, n_heads=12, attention="dijiang").validate()
    att = DiJiangAttention(cfg, 0).to(dev)
    T = 256 if DEV.type == "cpu" else 2048
    q, k = (torch.randn(2, 12, T, 64, device=dev, dtype=torch.bfloat16) * 2 for _ in range(2))
    lg = att.log_gamma()
    fm = att.feature_map
    eager = dj.feature_pair(q, k, fm.proj, fm.log_d, fm.in_scale, lg, None, torch.bfloat16)
    comp = dj._feature_pair(q, k, fm.proj, fm.log_d, fm.in_scale, lg, None, torch.bfloat16)
    for name, a, b in zip(("fq", "fk", "n", "log_scale"), comp, eager):
        add_check(f"compiled feature map vs eager: {name}", rel(a, b), 1e-2)
    RESULTS["notes"].append(f"feature_pair compiled: {COMPILED.get(dj.feature_pair) is not False}")


# ------------------------------------------------------------------------------------------ 2. timing
def time_attention(lengths, methods, repeats: int, label: str = "") -> list[dict]:
    from leanformer.bench.attention import measure

    rows = []
    for T in lengths:
        for m in methods:
            if m.endswith("parallel") and T > 4096:
                continue
            try:
                r = measure(m, DEV, torch.bfloat16, 4, 12, T, 64, warmup=3, repeats=repeats,
                            max_seconds=10.0)
                r.update(method=m + label, T=T, status="ok")
            except Exception as e:  # noqa: BLE001
                r = {"method": m + label, "T": T, "status": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(r)
            print(f"[time] T={T} {m}{label}: {r.get('ms', float('nan')):.3f} ms {r['status']}", flush=True)
            torch.cuda.empty_cache()
    RESULTS["timings"] += rows
    return rows


def time_bare_fla(lengths, repeats: int) -> None:
    """fla's chunk_simple_gla alone on (B, T, H, D) bf16 inputs (features ≤ 1), fwd+bwd."""
    from fla.ops.simple_gla import chunk_simple_gla
    from triton.testing import do_bench

    dev = DEV
    lg = dj.default_log_gamma(12).to(dev).float()
    for T in lengths:
        q, k = (torch.rand(4, T, 12, 64, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
        v = torch.randn(4, T, 12, 64, device=dev, dtype=torch.bfloat16).requires_grad_()
        go = torch.randn_like(v)

        def step(q=q, k=k, v=v, go=go):
            o, _ = chunk_simple_gla(q, k, v, g_gamma=lg, scale=1.0)
            o.backward(go)
        ms = do_bench(step, warmup=50, rep=300, return_mode="median")
        RESULTS["timings"].append({"method": "bare fla chunk_simple_gla", "T": T, "ms": ms, "status": "ok"})
        print(f"[time] T={T} bare fla: {ms:.3f} ms", flush=True)


def profile(T: int, method: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from leanformer.bench.attention import build_method

    dev = DEV
    fn, _ = build_method(method, dev, torch.bfloat16, 12, 64)
    q, k, v = (torch.randn(4, T, 12, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    go = torch.randn(4, 12, T, 64, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        fn(q, k, v).backward(go)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            fn(q, k, v).backward(go)
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = p.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70)
    RESULTS["notes"].append(f"profile {method} T={T} (3 calls):\n{table}")
    print(table, flush=True)


def nan_check_32k(methods=("dijiang_fla", "dijiang_official_fla")) -> None:
    from leanformer.bench.attention import build_method

    dev = DEV
    T = 32768
    for method in methods:
        for scale in (1.0, 4.0):
            fn, params = build_method(method, dev, torch.bfloat16, 12, 64)
            q, k, v = ((torch.randn(4, T, 12, 64, device=dev) * (scale if i < 2 else 1.0)).to(torch.bfloat16)
                       .transpose(1, 2).requires_grad_() for i in range(3))
            o = fn(q, k, v)
            o.float().square().mean().backward()
            finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
            RESULTS["checks"].append({"name": f"no NaN/inf at 32K, {method}, q/k std {scale}", "pass": finite})
            print(f"[check] {'PASS' if finite else 'FAIL'} no NaN/inf at 32K {method} q/k std {scale}", flush=True)
            del q, k, v, o
            torch.cuda.empty_cache()


def section(name, fn, *args, budget: float | None = None, **kwargs):
    if budget is not None and time.monotonic() - T0 > budget:
        RESULTS["notes"].append(f"skipped {name}: time budget")
        print(f"[skip] {name}", flush=True)
        return
    t = time.monotonic()
    try:
        fn(*args, **kwargs)
    except Exception:  # noqa: BLE001
        tb = traceback.format_exc()
        RESULTS["notes"].append(f"{name} failed:\n{tb}")
        print(f"[error] {name}:\n{tb}", flush=True)
    print(f"[section] {name}: {time.monotonic() - t:.1f} s", flush=True)


def prune_autotune() -> None:
    """Fewer fla autotune candidates (num_warps 4, num_stages 2 where offered): a fresh machine otherwise
    spends minutes compiling ~48 configs per kernel and dtype. Conservative: the figures can only be slower
    than with fla's full search."""
    import triton

    full = triton.autotune

    def few(configs, key, **kw):
        keep = [c for c in configs if c.num_warps == 4 and c.num_stages in (2, None)]
        keep = keep or [c for c in configs if c.num_warps == 4] or list(configs)[:2]
        return full(keep, key, **kw)
    triton.autotune = few


def time_train(out: str, budget_end: float) -> None:
    from leanformer.bench.train import run_train_bench

    dev = torch.device("cuda")
    for seq, batch, compile_ in ((1024, 16, False), (4096, 4, True)):
        left = budget_end - (time.monotonic() - T0)
        if left < 30:
            RESULTS["notes"].append(f"train seq {seq}: skipped (time budget)")
            continue
        rep = run_train_bench(size="gpt2", arms="preln,dijiang_fla", seq_len=seq, batch=batch, compile=compile_,
                              device=dev, warmup=3, repeats=5, time_budget=left, compile_reserve_s=60.0,
                              command=f"leanformer bench train --size gpt2 --arms preln,dijiang_fla --seq-len {seq} "
                                      f"--batch {batch} --repeats 5{' --compile' if compile_ else ''}")
        rep.write(os.path.join(out, f"train{seq}"), formats=("json", "md"))
        print(rep.markdown(), flush=True)


def time_attention_report(out: str) -> None:
    from leanformer.bench.attention import run_attention_bench

    rep = run_attention_bench(lengths=[1024, 2048, 4096, 16384, 32768],
                              methods=["softmax", "dijiang_parallel", "dijiang_fla", "dijiang_official_fla"],
                              batch=4, heads=12, head_dim=64, dtype="bfloat16", device=torch.device("cuda"),
                              warmup=3, repeats=10, max_seconds=10.0,
                              command="leanformer bench attention --lengths 1024,2048,4096,16384,32768 --methods "
                                      "softmax,dijiang_parallel,dijiang_fla,dijiang_official_fla --repeats 10")
    rep.write(os.path.join(out, "attention"), formats=("json", "md"))
    print(rep.markdown(), flush=True)
    for r in rep.rows:
        RESULTS["timings"].append({"method": r["method"], "T": r["seq_len"], "ms": r.get("ms"),
                                   "status": r.get("status")})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=320.0, help="seconds: later sections are skipped after")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    p.add_argument("--prune-autotune", action="store_true", help="see prune_autotune()")
    p.add_argument("--cpu-smoke", action="store_true", help="run the script's code paths on the CPU: fla is "
                   "replaced by the chunk form, tiny sizes (a test of this script, not of the GPU)")
    args = p.parse_args()
    global DEV
    if args.prune_autotune:
        prune_autotune()
    if args.cpu_smoke:
        DEV = torch.device("cpu")
        dla._fla_kernel = lambda recurrent: lambda q, k, v, lg, s0: dla.chunk(q, k, v, lg, s0)
        import leanformer.bench.attention as ba
        ba.unavailable_reason = lambda method, device: None
        torch.cuda.get_device_name = lambda *a: "cpu (smoke)"
    RESULTS["meta"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": args.commit,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "python": platform.python_version(), "pruned_autotune": args.prune_autotune}
    try:
        import fla
        import triton
        RESULTS["meta"].update(fla=fla.__version__, triton=triton.__version__)
    except Exception as e:  # noqa: BLE001
        RESULTS["meta"]["fla"] = f"import failed: {e}"
    print(RESULTS["meta"], flush=True)
    B = args.budget
    bf16 = torch.bfloat16
    section("compile check", compile_check)
    section("layer paper bf16 large q/k", layer_check, "paper", bf16, 4.0, False)
    section("layer paper bf16 learnable", layer_check, "paper", bf16, 1.0, True)
    section("layer official bf16", layer_check, "official", bf16, 1.0, False)
    section("guard", guard_check)
    smoke = args.cpu_smoke
    if smoke:
        section("attention", time_attention, [256], ["softmax", "dijiang_fla", "dijiang_official_fla"], 2)
    else:
        section("attention", time_attention_report, args.out, budget=B * 0.3)
        section("nan 32k", nan_check_32k, budget=B * 0.45)
    long = [256] if smoke else [16384, 32768]
    if not smoke:
        section("bare fla", time_bare_fla, long, 10, budget=B * 0.5)
    dj.COMPILE_ON_CUDA = False
    section("eager feature map", time_attention, long, ["dijiang_fla"], 10, " (eager features)", budget=B * 0.5)
    dj.COMPILE_ON_CUDA = True
    cdm.RANGE_CHECK = False
    section("no range check", time_attention, [256] if smoke else [4096, 16384], ["dijiang_fla"], 10,
            " (no range check)", budget=B * 0.55)
    cdm.RANGE_CHECK = True
    section("profile", profile, 256 if smoke else 16384, "dijiang_fla", budget=B * 0.6)
    with open(os.path.join(args.out, "dijiang_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    if not smoke:
        section("train", time_train, args.out, B, budget=B * 0.62)
    with open(os.path.join(args.out, "dijiang_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    # short table last
    print("\n| T | method | ms | × SDPA |\n|---|---|---|---|")
    sdpa = {r["T"]: r["ms"] for r in RESULTS["timings"] if r["method"] == "softmax" and r.get("ms")}
    for r in RESULTS["timings"]:
        if r.get("ms"):
            x = sdpa.get(r["T"], float("nan")) / r["ms"]
            print(f"| {r['T']} | {r['method']} | {r['ms']:.3f} | {x:.2f} |")
    fails = [c["name"] for c in RESULTS["checks"] if not c["pass"]]
    print(f"\nchecks: {len(RESULTS['checks']) - len(fails)} pass, {len(fails)} fail: {fails}")
    print(f"total {time.monotonic() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
