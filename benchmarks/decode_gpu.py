"""GPU check and benchmark of static decoding (issue #15), in one call on one GPU.

1. Correctness: for every attention × block × NOBLE arm (small float32 models, TF32 off), greedy tokens of
   the CUDA-graph path equal the eager path's; the graph step's logits against a float64 CPU forward
   (‖out−ref‖/‖ref‖, bf16 GPT-2-small models too); seeded sampling inside the graph is repeatable.
2. Variants at GPT-2 small, softmax (+ NOBLE, DiJiang): eager path (today), graph with bf16 weights,
   graph under bf16 autocast (float32 weights), masked step attention math vs SDPA, CUDA graph vs
   torch.compile(mode="reduce-overhead").
3. Profile of one step (top kernels by CUDA time) for softmax, NOBLE, SAS-P and DiJiang.
4. The table: ``leanformer bench decode --size gpt2`` (graph path, bf16 weights).

Usage: python benchmarks/decode_gpu.py --out DIR [--skip-table] [--only-table] [--compile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from leanformer import NobleConfig, TransformerConfig, TransformerLM
from leanformer.config import DiJiangConfig
from leanformer.decoding import StaticDecoder, decoding_copy

T0 = time.monotonic()
RESULTS: dict = {"checks": [], "variants": [], "profiles": {}}


def log(*a):
    print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


ARMS = {
    "preln": dict(),
    "parallel": dict(block="parallel"),
    "gqa": dict(n_kv_heads=2, norm="rmsnorm", ffn_act="swiglu"),
    "learned_pos": dict(pos="learned", bias=True),
    "sas": dict(block="sas", attention="shaped"),
    "sas_p": dict(block="sas_p", attention="shaped"),
    "dijiang": dict(attention="dijiang"),
    "dijiang_parallel": dict(attention="dijiang", block="parallel"),
    "noble": dict(noble=NobleConfig(enabled=True)),
    "noble_sas_p": dict(block="sas_p", attention="shaped", noble=NobleConfig(enabled=True)),
    "noble_dijiang": dict(attention="dijiang", noble=NobleConfig(enabled=True)),
}


def small(arm: str, **kw) -> TransformerLM:
    base = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=512)
    base.update(ARMS[arm])
    base.update(kw)
    if "dijiang" in arm:
        base["dijiang"] = DiJiangConfig(mode="chunk")
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**base)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def check_correctness(arms=tuple(ARMS)) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for arm in arms:
        try:
            cpu = small(arm)
            gpu = small(arm).cuda()
            prompt = torch.randint(0, 4096, (3, 50), generator=torch.Generator().manual_seed(1))
            eager = gpu.generate(prompt.cuda(), 40, temperature=0, static=False)
            graph = gpu.generate(prompt.cuda(), 40, temperature=0, static=True, graph="cuda")
            agree = float((eager == graph).float().mean())
            ref, _ = cpu.double()(eager.cpu())  # float64 full forward on the eager tokens
            dec = StaticDecoder(gpu, 3, 128, graph="cuda")
            dec.prefill(prompt.cuda())
            dec.capture()
            dec.ids.copy_(eager[:, 50:51])
            errs = []
            for t in range(50, 60):  # feed the eager tokens, compare each step's logits
                dec.ids.copy_(eager[:, t:t + 1])
                dec.step()
                errs.append(rel(dec.logits, ref[:, t]))
            rec = {"check": "graph vs eager (float32)", "arm": arm, "tokens_equal": bool(torch.equal(eager, graph)),
                   "token_agreement": agree, "max_rel_err_vs_float64": max(errs),
                   "nan": bool(torch.isnan(dec.logits).any())}
        except Exception as e:  # noqa: BLE001
            rec = {"check": "graph vs eager (float32)", "arm": arm, "error": f"{type(e).__name__}: {e}"[:400]}
        RESULTS["checks"].append(rec)
        log(rec)
    torch.backends.cuda.matmul.allow_tf32 = True
    # sampling inside the graph: seeded, repeatable, within top-k
    model = small("preln").cuda()
    prompt = torch.randint(0, 4096, (4, 20), device="cuda")
    outs = [model.generate(prompt, 30, temperature=0.8, top_k=50, top_p=0.9, static=True,
                           generator=torch.Generator(device="cuda").manual_seed(7)) for _ in range(2)]
    rec = {"check": "seeded sampling in the graph", "repeatable": bool(torch.equal(*outs)),
           "distinct_tokens": int(outs[0][:, 20:].unique().numel())}
    RESULTS["checks"].append(rec)
    log(rec)


@torch.no_grad()
def check_gpt2_bf16() -> None:
    """GPT-2 small, bf16 weights, graph step logits vs float64 CPU forward at context 256."""
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config

    for arm in ("preln", "sas_p", "noble_fused", "dijiang"):
        cfg = arm_config(base_config(SIZES["gpt2"], 1024), arm)
        torch.manual_seed(0)
        ref_model = TransformerLM(cfg).eval()
        model = decoding_copy(ref_model.cuda(), torch.bfloat16)
        idx = torch.randint(0, cfg.vocab_size, (2, 257))
        dec = StaticDecoder(model, 2, 300, graph="cuda")
        dec.prefill(idx[:, :256].cuda())
        pre = dec.logits.clone()
        dec.capture()
        dec.ids.copy_(idx[:, 256:].cuda())
        dec.step()
        ref, _ = ref_model.double().cpu()(idx)
        rec = {"check": "gpt2 bf16 graph vs float64", "arm": arm, "prefill_rel_err": rel(pre, ref[:, 255]),
               "step_rel_err": rel(dec.logits, ref[:, 256]), "nan": bool(torch.isnan(dec.logits).any())}
        RESULTS["checks"].append(rec)
        log(rec)
        del ref_model, model, dec


def gpt2(arm: str, weights: str = "bf16", max_len: int = 40000) -> TransformerLM:
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config

    cfg = arm_config(base_config(SIZES["gpt2"], max_len), arm)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TransformerLM(cfg).eval()
    model.requires_grad_(False)
    return decoding_copy(model, torch.bfloat16) if weights == "bf16" else model


@torch.no_grad()
def time_decoder(model, L: int, b: int, graph="cuda", attention="sdpa", autocast=False, steps=50,
                 compile=False) -> dict:
    def ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    prompt = torch.randint(0, model.cfg.vocab_size, (1, L), device="cuda")
    with ctx():
        dec1 = StaticDecoder(model, 1, L + steps + 20, graph=graph, attention=attention, prefill_chunk=4096,
                             compile=compile)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec1.prefill(prompt)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    with ctx():
        dec = dec1.expanded(b)
        t0 = time.perf_counter()
        dec.capture()
        torch.cuda.synchronize()
        cap = time.perf_counter() - t0
    for _ in range(5):
        dec.step()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for s, e in ev:
        s.record()
        dec.step()
        e.record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in ev)
    return {"ms_per_step": ts[len(ts) // 2], "p10": ts[len(ts) // 10], "p90": ts[9 * len(ts) // 10],
            "prefill_s": ttft, "capture_s": cap}


def variant(name: str, fn) -> None:
    try:
        rec = {"variant": name, **fn()}
    except Exception as e:  # noqa: BLE001
        rec = {"variant": name, "error": f"{type(e).__name__}: {e}"[:400]}
    torch.cuda.empty_cache()
    RESULTS["variants"].append(rec)
    log(rec)


@torch.no_grad()
def eager_step_ms(model, L: int, b: int, steps: int = 10) -> dict:
    prompt = torch.randint(0, model.cfg.vocab_size, (1, L), device="cuda")
    cache = model.new_cache()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for s in range(0, L, 4096):
            logits, _ = model(prompt[:, s:s + 4096], cache=cache)
    from leanformer.bench.decode import expand_cache

    cache = expand_cache(cache, b)
    nxt = torch.zeros(b, 1, dtype=torch.long, device="cuda")
    ts = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(steps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits, _ = model(nxt, cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if i >= 3:
                ts.append(1e3 * (time.perf_counter() - t0))
    ts.sort()
    return {"ms_per_step": ts[len(ts) // 2]}


def run_variants(do_compile: bool) -> None:
    soft_bf16 = gpt2("preln")
    variant("softmax eager path (autocast, today) L=2048 b=1",
            lambda: eager_step_ms(gpt2("preln", "autocast"), 2048, 1))
    variant("softmax graph bf16 math L=2048 b=1", lambda: time_decoder(soft_bf16, 2048, 1))
    variant("softmax graph bf16 sdpa L=2048 b=1", lambda: time_decoder(soft_bf16, 2048, 1, attention="sdpa"))
    variant("softmax graph autocast-fp32-weights L=2048 b=1",
            lambda: time_decoder(gpt2("preln", "autocast"), 2048, 1, autocast=True))
    variant("softmax static no-graph bf16 L=2048 b=1", lambda: time_decoder(soft_bf16, 2048, 1, graph="none", steps=10))
    variant("softmax graph bf16 math L=32768 b=8", lambda: time_decoder(soft_bf16, 32768, 8, steps=20))
    variant("softmax graph bf16 sdpa L=32768 b=8", lambda: time_decoder(soft_bf16, 32768, 8, attention="sdpa",
                                                                       steps=20))
    variant("softmax graph bf16 math L=8192 b=32", lambda: time_decoder(soft_bf16, 8192, 32, steps=20))
    variant("softmax graph bf16 sdpa L=8192 b=32", lambda: time_decoder(soft_bf16, 8192, 32, attention="sdpa",
                                                                       steps=20))
    dj = gpt2("dijiang")
    variant("dijiang graph bf16 L=512 b=1", lambda: time_decoder(dj, 512, 1))
    variant("dijiang graph bf16 L=8192 b=32", lambda: time_decoder(dj, 8192, 32))
    nb = gpt2("noble_fused")
    variant("noble graph bf16 (unfused products) L=2048 b=1", lambda: time_decoder(nb, 2048, 1))
    profile("preln", soft_bf16, 2048, 1)
    profile("noble_fused", gpt2("noble_fused"), 2048, 1)
    profile("sas_p", gpt2("sas_p"), 2048, 1)
    profile("dijiang", gpt2("dijiang"), 8192, 32)
    if do_compile:
        variant("softmax torch.compile reduce-overhead bf16 L=2048 b=1",
                lambda: time_decoder(soft_bf16, 2048, 1, graph="compile"))


@torch.no_grad()
def profile(arm: str, model, L: int, b: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    try:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, L), device="cuda")
        dec1 = StaticDecoder(model, 1, L + 64, graph="cuda")
        dec1.prefill(prompt)
        dec = dec1.expanded(b)
        eager = dec1.expanded(b)
        eager.graph_kind = "none"
        dec.capture()
        for _ in range(3):
            dec.step()
            eager.step()
        torch.cuda.synchronize()
        out = {}
        for name, d in (("graph", dec), ("eager_fixed_shape", eager)):
            with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
                for _ in range(10):
                    d.step()
                torch.cuda.synchronize()
            ka = p.key_averages()
            rows = sorted((k for k in ka if str(k.device_type).endswith("CUDA")),
                          key=lambda k: -getattr(k, "self_device_time_total", 0))
            total = sum(getattr(k, "self_device_time_total", 0) for k in rows)
            out[name] = {
                "kernel_us_per_step": total / 10,
                "kernels_per_step": sum(k.count for k in rows) / 10,
                "top": [{"name": k.key[:90], "us_per_step": getattr(k, "self_device_time_total", 0) / 10,
                         "count_per_step": k.count / 10} for k in rows[:12]],
            }
        RESULTS["profiles"][f"{arm} L={L} b={b}"] = out
        summary = {k: {kk: v[kk] for kk in ("kernel_us_per_step", "kernels_per_step")} for k, v in out.items()}
        log(f"profile {arm} L={L} b={b}:", json.dumps(summary))
        for r in out["graph"]["top"][:8]:
            log("   ", f"{r['us_per_step']:8.1f} us  x{r['count_per_step']:5.1f}  {r['name']}")
    except Exception as e:  # noqa: BLE001
        RESULTS["profiles"][f"{arm} L={L} b={b}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        log("profile failed", arm, e)
    torch.cuda.empty_cache()


def run_final(budget: float) -> None:
    """Call 2: correctness again (graph vs eager tokens, every arm; compiled step too), today's eager path at
    the issue's cells, then (after the table) the compiled step at the target cells, while time lasts."""
    check_correctness(arms=("preln", "gqa", "sas", "sas_p", "dijiang", "noble", "noble_sas_p"))
    try:
        model = small("dijiang").cuda()
        prompt = torch.randint(0, 4096, (3, 50), device="cuda")
        eager = model.generate(prompt, 30, temperature=0, static=False)
        comp = model.generate(prompt, 30, temperature=0, static=True, compile=True)
        rec = {"check": "compiled graph vs eager (float32)", "arm": "dijiang",
               "tokens_equal": bool(torch.equal(eager, comp))}
    except Exception as e:  # noqa: BLE001
        rec = {"check": "compiled graph vs eager (float32)", "error": f"{type(e).__name__}: {e}"[:400]}
    RESULTS["checks"].append(rec)
    log(rec)
    try:
        from leanformer.compare.decode import decode_latency

        lat = decode_latency(small("sas_p").cuda(), [64, 256], 8, 2)
        rec = {"check": "compare decode_latency on CUDA (graph)", **lat}
    except Exception as e:  # noqa: BLE001
        rec = {"check": "compare decode_latency on CUDA (graph)", "error": f"{type(e).__name__}: {e}"[:400]}
    RESULTS["checks"].append(rec)
    log(rec)
    soft = gpt2("preln", "autocast")
    for L, b in ((512, 1), (8192, 1), (8192, 32), (32768, 8)):
        variant(f"softmax eager path (autocast, today) L={L} b={b}",
                lambda m=soft, L=L, b=b: eager_step_ms(m, L, b))
    soft = None
    torch.cuda.empty_cache()
    variant("softmax graph autocast-fp32-weights L=2048 b=1",
            lambda: time_decoder(gpt2("preln", "autocast"), 2048, 1, autocast=True))


def run_compiled(budget: float) -> None:
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 256)
    cells = [("dijiang", 8192, 32), ("preln", 8192, 32), ("dijiang", 32768, 8), ("preln", 32768, 8),
             ("preln", 2048, 1), ("sas_p", 2048, 1), ("noble_fused", 2048, 1), ("dijiang", 2048, 1)]
    models = {}
    for arm, L, b in cells:
        if time.monotonic() - T0 > budget - 45:
            RESULTS["variants"].append({"variant": f"{arm} compiled graph L={L} b={b}", "error": "skipped (time)"})
            continue
        if arm not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[arm] = gpt2(arm)
        variant(f"{arm} compiled graph bf16 L={L} b={b}",
                lambda m=models[arm], L=L, b=b: time_decoder(m, L, b, compile=True, steps=30))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--only-table", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--final", action="store_true", help="call 2: checks, eager baseline, table, compiled cells")
    ap.add_argument("--table-args", default="")
    ap.add_argument("--budget", type=float, default=320, help="seconds for the whole script (the table stops)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = Path("COMMIT")  # written when the tree is staged without its .git (the device copy)
    commit = (stamp.read_text().strip() if stamp.exists() else
              subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    RESULTS["meta"] = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit or None,
                       "argv": sys.argv}
    if args.final:
        run_final(args.budget)
        (out / "decode_check.json").write_text(json.dumps(RESULTS, indent=1))
    elif not args.only_table:
        check_correctness()
        check_gpt2_bf16()
        run_variants(args.compile)
        (out / "decode_check.json").write_text(json.dumps(RESULTS, indent=1))
    if not args.skip_table:
        from leanformer.cli import main as cli

        budget = max(30, args.budget - (time.monotonic() - T0) - (150 if args.final else 0))
        cli(["bench", "decode", "--size", "gpt2", "--out", str(out), "--steps", "32", "--warmup", "3",
             "--time-budget", str(int(budget)), *args.table_args.split()])
    if args.final:
        (out / "decode_check.json").write_text(json.dumps(RESULTS, indent=1))
        run_compiled(args.budget)
    (out / "decode_check.json").write_text(json.dumps(RESULTS, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
