"""NOBLE's training route on the GPU (issue #13): the two-segment product against cuBLAS, shape by shape, and one
NOBLE linear's fwd+bwd by the route against the stacked form and a plain ``nn.Linear``.

NOBLE's GPT-2 step is +38–42% over Pre-LN's (H100, 2026-12-07), for +3.8% of FLOPs: the stacked form writes the
branch's (tokens × d_out) output and reads it back, concatenates [dy, dz] and sums the stacked bias gradient
(docs/benchmarks.md). :mod:`leanformer.ops.noble_train` puts the branch's up product into the main product's inner
axis and dz W_down into dx's, through :func:`leanformer.ops.two_segment_matmul.two_segment_matmul`, a Triton
product of our own. It pays off only if that product runs the main part at cuBLAS's speed, so this measures, at
16,384 tokens (GPT-2 small, seq 1024 × 16), bf16:

1. ``products``: for each NOBLE layer shape of GPT-2 small (768→768, 768→3072, 3072→768) and each direction
   (forward ``x Wᵀ + s W_upᵀ + b``; backward ``dy W + dz W_down``): cuBLAS's main product alone (``F.linear`` /
   ``dy @ W``), cuBLAS's main product plus the rank-32 one as an ``addmm`` (what the work costs by cuBLAS alone),
   and the two-segment kernel with each tile shape of ``CANDIDATES`` in both loop forms (``ONE_LOOP``), and the
   fastest again with K2 = 0 (the Triton main product alone). Times per call inside a CUDA graph of 20 calls.
   Each kernel result is checked against float64 (max error / max |ref|). The fastest tile shape and loop form
   per shape go to ``two_segment_configs.json`` (``train_profile.py --two-segment-configs`` reads it).
2. ``branch``: the rank-r launches with CosNet (``noble_branch``) alone, in GB/s of x or dy read, for a few
   (BLOCK_K, warps, stages, rows per program), beside cuBLAS's rank-32 product of the same input.
3. ``layer``: one NOBLE linear (CosNet, rank 32) fwd+bwd under ``torch.compile``: the stacked form (CosNet
   kernels), the route (its rank-r products fused with CosNet: ``noble_train.BRANCH`` "fused"; and "separate"),
   and ``nn.Linear``; the route with the fastest tiles.

Expected (floors): a 16,384 × 768 × 768 product is 19.3 GFLOP, 25 µs at 775 TFLOP/s (the best bf16 rate measured
here, an 8192³ product), while reading x and writing y (50 MB) takes 17 µs at 3 TB/s; the rank-32 segment adds
4.2% of the FLOPs at d_in 768, 1.0% at 3072. The route helps if the two-segment kernel is within ≈ 5% of cuBLAS's
main product: then the forward saves the addmm's (tokens × d_out) read and write, the backward the concatenation.

    PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/noble_train_gpu.py --out $OUT [--budget S]
    PYTHONPATH=$PWD:$PWD/benchmarks TRITON_INTERPRET=1 python benchmarks/noble_train_gpu.py --cpu-smoke --out DIR

Writes ``noble_train.json``, ``noble_train.md`` and ``two_segment_configs.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

T0 = time.monotonic()
SHAPES = ((768, 768), (768, 3072), (3072, 768))
RANK = 32


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


TIMING: dict[str, int] = {"graph": 0, "burst": 0}  # how many figures each method gave (written with the results)


def timed(fn, device: torch.device, calls: int = 20, replays: int = 10) -> float:
    """Median ms per ``fn()`` with ``calls`` of them back to back in one captured CUDA graph (no host launch time
    in the figure: a lone call between two events would count the wrapper's and Triton's launch, ≈ 15-20 µs, against
    kernels of 25-130 µs; review of 2026-12-07); if capture fails, bursts of ``calls`` between two events (counted
    in :data:`TIMING`). One call, wall time, on the CPU."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from skinny_linear_gpu import graph_time_per_call

    try:
        ms = graph_time_per_call(fn, calls, replays) / 1e3
        TIMING["graph"] += 1
        return ms
    except RuntimeError as e:  # a step the graph cannot capture: time bursts instead
        log(f"graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing bursts of {calls}")
        torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    TIMING["burst"] += 1
    return sorted(times)[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


# --forms: (ONE_LOOP, TMA, PERSISTENT) of two_segment_matmul; the persistent form takes the TMA form's tile table
FORMS = {"two": (False, False, False), "one": (True, False, False), "tma": (False, True, False),
         "tmap": (False, True, True)}


def section_products(device, n, shapes, candidates, budget, result, forms=tuple(FORMS)) -> dict:
    """Time cuBLAS and the two-segment kernel per shape and direction; the best tiles per (M, N, K1, K2)."""
    from leanformer.ops import two_segment_matmul as ts

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, best = [], {}
    for d_in, d_out in shapes:
        g = torch.Generator(device="cpu").manual_seed(d_in + d_out)

        def rand(*shape, scale=1.0, g=g):
            return (torch.randn(*shape, generator=g) * scale).to(device, dt)

        x, w, b = rand(n, d_in), rand(d_out, d_in, scale=d_in ** -0.5), rand(d_out)
        s, wu = rand(n, RANK), rand(d_out, RANK, scale=RANK ** -0.5)
        dy, dz, wd = rand(n, d_out), rand(n, RANK), rand(RANK, d_in, scale=d_in ** -0.5)
        cases = {  # direction: (A1, B1, A2, B2, bias, cuBLAS main alone, cuBLAS main + rank-r addmm)
            "forward": (x, w.t(), s, wu.t(), b, lambda x=x, w=w, b=b: F.linear(x, w, b),
                        lambda x=x, w=w, b=b, s=s, wu=wu: torch.addmm(F.linear(x, w, b), s, wu.t())),
            "backward dx": (dy, w, dz, wd, None, lambda dy=dy, w=w: dy @ w,
                            lambda dy=dy, w=w, dz=dz, wd=wd: torch.addmm(dy @ w, dz, wd)),
        }
        for direction, (a1, b1, a2, b2, bias, main, main_addmm) in cases.items():
            if time.monotonic() - T0 > budget:
                log("budget spent: products cut short")
                return best
            ref = a1.double() @ b1.double() + a2.double() @ b2.double() + (bias.double() if bias is not None else 0)
            ref = ref.to(device)
            M, K1 = a1.shape
            K2, N = b2.shape
            layout = ts.b1_layout(b1)
            row = {"shape": f"{d_in}→{d_out}", "direction": direction, "M": M, "N": N, "K1": K1, "K2": K2,
                   "cublas_main_ms": timed(main, device), "cublas_main_addmm_ms": timed(main_addmm, device)}
            row["main_flops"] = 2 * M * N * K1
            tiles = {}
            tma_ok = ts.tma_reason(a1, b1, a2, b2) is None
            for cand in candidates:
                for one_loop, tma, persistent in (FORMS[f] for f in forms if tma_ok or not FORMS[f][1]):
                    config = (*cand[:6], one_loop)
                    ts.CONFIGS[(M, N, K1, K2, layout + ("+tma" if tma else ""))] = config
                    ts.TMA, ts.PERSISTENT = tma, persistent
                    key = ("x".join(map(str, cand[:6])) + (" one loop" if one_loop else "") + (" tma" if tma else "")
                           + (" persistent" if persistent else ""))
                    form = {"config": config, "tma": tma, "persistent": persistent}
                    try:
                        out = ts.two_segment_matmul(a1, b1, a2, b2, bias)
                        operands = (a1, b1, a2, b2, bias)
                        tiles[key] = {**form, "rel_err": rel_err(out, ref),
                                      "ms": timed(lambda ops=operands: ts.two_segment_matmul(*ops), device)}
                    except Exception as e:  # noqa: BLE001 - a tile shape that does not compile or fit
                        tiles[key] = {**form, "error": f"{type(e).__name__}: {e}"[:200]}
                    finally:
                        ts.TMA, ts.PERSISTENT = False, False
            ts.CONFIGS.pop((M, N, K1, K2, layout), None)
            ts.CONFIGS.pop((M, N, K1, K2, layout + "+tma"), None)
            row["tiles"] = tiles
            tmap_tiles = {k: v for k, v in tiles.items() if "ms" in v and v["persistent"]}
            if tmap_tiles:  # the persistent form's best (it reads the TMA form's tile table entries)
                key = min(tmap_tiles, key=lambda k: tmap_tiles[k]["ms"])
                row["best_tmap_tiles"], row["best_tmap_ms"] = key, tmap_tiles[key]["ms"]
            tma_tiles = {k: v for k, v in tiles.items() if "ms" in v and v["tma"] and not v["persistent"]}
            if tma_tiles:  # the TMA form's best, kept under its own key (two_segment_matmul.CONFIGS)
                key = min(tma_tiles, key=lambda k: tma_tiles[k]["ms"])
                row["best_tma_tiles"], row["best_tma_ms"] = key, tma_tiles[key]["ms"]
                best[(M, N, K1, K2, layout + "+tma")] = tma_tiles[key]["config"]
            timed_tiles = {k: v for k, v in tiles.items() if "ms" in v and not v["tma"]}
            if timed_tiles:
                key = min(timed_tiles, key=lambda k: timed_tiles[k]["ms"])
                row["best_tiles"], row["best_ms"] = key, timed_tiles[key]["ms"]
                row["best_rel_err"] = timed_tiles[key]["rel_err"]
                best[(M, N, K1, K2, layout)] = timed_tiles[key]["config"]
                ts.CONFIGS[(M, N, K1, 0, layout)] = timed_tiles[key]["config"]  # the same tiles, no second segment
                no_k2 = (a1, b1, a2[:, :0], b2[:0], bias)
                row["best_k2_0_ms"] = timed(lambda ops=no_k2: ts.two_segment_matmul(*ops), device)
                ts.CONFIGS.pop((M, N, K1, 0, layout), None)
            rows.append(row)
            log(f"{row['shape']} {direction}: cuBLAS main {row['cublas_main_ms']:.4f}, main+addmm "
                f"{row['cublas_main_addmm_ms']:.4f}, TMA persistent best {row.get('best_tmap_ms', float('nan')):.4f}, "
                f"TMA best {row.get('best_tma_ms', float('nan')):.4f} "
                f"({row.get('best_tma_tiles')}), two-segment best {row.get('best_ms', float('nan')):.4f} "
                f"({row.get('best_tiles')}, K2=0 {row.get('best_k2_0_ms', float('nan')):.4f}, "
                f"err {row.get('best_rel_err', float('nan')):.1e})")
    result["products"] = rows
    return best


BRANCH_VARIANTS = ((64, 4, 3, None), (64, 4, 5, None), (128, 4, 3, None), (64, 8, 3, None), (128, 8, 4, None),
                   (64, 4, 4, 16), (128, 4, 4, 64))  # (BLOCK_K, warps, stages, rows: None = block_rows(r), 32 at r 32)


def section_branch(device, n, shapes, budget, result) -> None:
    """The rank-r launches alone (leanformer.ops.noble_branch), in GB/s of x or dy read (the bytes that matter:
    they are meant to be bandwidth-bound), for each (BLOCK_K, num_warps, num_stages) of BRANCH_VARIANTS; against
    cuBLAS's rank-32 product of the same input. Four copies of the input are cycled, so that the 20 calls of a
    graph do not find it in the 50 MB L2 (a second review's caution)."""
    from leanformer.layers.noble import CosNet
    from leanformer.ops import noble_branch as nb

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for d in sorted({d for shape in shapes for d in shape}):
        if time.monotonic() - T0 > budget:
            log("budget spent: branch section cut short")
            break
        torch.manual_seed(0)
        xs = [torch.randn(n, d, device=device, dtype=dt) for _ in range(4)]
        w = (torch.randn(RANK, d, device=device) * d ** -0.5).to(dt)
        b = torch.zeros(RANK, device=device, dtype=dt)
        act = CosNet(RANK).to(device)
        params = [t.detach().contiguous() for t in (act.omega1, act.phi1, act.M.weight, act.M.bias, act.omega2,
                                                    act.phi2)]
        z = torch.randn(n, RANK, device=device, dtype=dt)
        bytes_read = n * d * xs[0].element_size()
        cycle = {"i": 0}

        def nxt(xs=xs, cycle=cycle):
            cycle["i"] = (cycle["i"] + 1) % 4
            return xs[cycle["i"]]

        row = {"width": d, "tokens": n, "GB read per call": bytes_read / 1e9,
               "cublas x@Wdᵀ ms": timed(lambda nxt=nxt, w=w: nxt() @ w.t(), device)}
        saved = (nb.BLOCK_K, nb.NUM_WARPS, nb.NUM_STAGES, nb.ROWS)
        for bk, warps, stages, rows_per in BRANCH_VARIANTS if device.type == "cuda" else (saved,):
            nb.BLOCK_K, nb.NUM_WARPS, nb.NUM_STAGES, nb.ROWS = bk, warps, stages, rows_per
            key = f"BK {bk}, {warps} warps, {stages} stages" + (f", {rows_per} rows" if rows_per else "")
            try:
                row[f"down_cosnet {key} ms"] = timed(
                    lambda nxt=nxt, w=w, b=b, params=params: nb.down_cosnet(nxt(), w, b, *params), device)
                wu = w.t().contiguous()  # W_up (d_out, r) as the layer stores it
                row[f"up_grad_cosnet_bwd {key} ms"] = timed(
                    lambda nxt=nxt, wu=wu, z=z, params=params: nb.up_grad_cosnet_bwd(nxt(), wu, z, *params), device)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit
                row[f"{key} error"] = f"{type(e).__name__}: {e}"[:200]
        nb.BLOCK_K, nb.NUM_WARPS, nb.NUM_STAGES, nb.ROWS = saved
        for k in [k for k in row if k.endswith(" ms")]:
            row[k.replace(" ms", " GB/s")] = bytes_read / (row[k] * 1e-3) / 1e9
        rows.append(row)
        log(f"branch width {d}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("GB/s")))
    result["branch"] = rows


def section_layer(device, n, shapes, best, budget, result, out=None) -> None:
    """One NOBLE linear fwd+bwd, compiled: stacked (CosNet kernels) vs the route vs nn.Linear."""
    from leanformer.layers import noble
    from leanformer.layers.noble import NobleLinear
    from leanformer.ops import noble_train
    from leanformer.ops import two_segment_matmul as ts

    ts.CONFIGS.update(best)
    rows = result.setdefault("layer", [])
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        x = torch.randn(n, d_in, device=device, requires_grad=True)
        gy = torch.randn(n, d_out, device=device)
        row = {"shape": f"{d_in}→{d_out}", "tokens": n}
        stacked = NobleLinear(d_in, d_out, rank=RANK)
        with torch.no_grad():  # a branch that matters, so the two forms' agreement means something
            stacked.up.weight.normal_(0.0, RANK ** -0.5)
        variants = {"linear": (torch.nn.Linear(d_in, d_out), "never", "never"),
                    "noble stacked, CosNet kernels": (stacked, "cuda", "never"),
                    "noble route": (copy.deepcopy(stacked), "cuda", "cuda"),
                    "noble route, separate branch": (copy.deepcopy(stacked), "cuda", "cuda")}
        ref_out = None
        rows.append(row)
        for name, (layer, cosk, route) in variants.items():
            if time.monotonic() - T0 > budget:
                row[f"{name} skipped"] = "time budget"
                continue
            noble.COSNET_KERNEL, noble.TRAIN_KERNEL = cosk, route
            noble_train.BRANCH = "separate" if name.endswith("separate branch") else "fused"
            if device.type != "cuda":
                noble.COSNET_KERNEL, noble.TRAIN_KERNEL = ("always" if v == "cuda" else v for v in (cosk, route))
            layer.to(device)
            torch._dynamo.reset()
            fn = torch.compile(layer)
            leaves = (x, *layer.parameters())

            def step(fn=fn, leaves=leaves, x=x, gy=gy):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    y = fn(x)
                return y, torch.autograd.grad(y, leaves, gy.to(y.dtype))
            try:
                y, _ = step()
                if name != "linear":  # the route against the stacked form (same weights: same seed)
                    ref_out = y.detach() if ref_out is None else ref_out
                    row[f"{name} rel diff to stacked"] = rel_err(y.detach().float(), ref_out.double())
                row[f"{name} ms"] = timed(lambda step=step: step(), device)
            except Exception as e:  # noqa: BLE001
                row[f"{name} error"] = f"{type(e).__name__}: {e}"[:300]
            if out is not None:  # each variant's figure kept, should the call's time limit end the script
                write(out, result, best)
        noble.COSNET_KERNEL, noble.TRAIN_KERNEL, noble_train.BRANCH = "never", "never", "fused"
        log(f"layer {row['shape']}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in row.items() if k not in ("shape", "tokens")))


def write(out: Path, result: dict, best: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["timing_methods"] = dict(TIMING)
    (out / "noble_train.json").write_text(json.dumps(result, indent=1))
    from leanformer.ops.two_segment_matmul import configs_json

    (out / "two_segment_configs.json").write_text(configs_json(best))
    lines = [f"# NOBLE's training route on {result['device']}", "", f"{result['when']}, {result['versions']}; "
             f"figures by CUDA graph / by bursts: {TIMING['graph']} / {TIMING['burst']}", "",
             "## Products, ms per call (median of 10 replays of a CUDA graph of 20 calls; bf16)", "",
             "| shape | direction | cuBLAS main | cuBLAS main + addmm | two-segment best | tiles | K2 = 0 | "
             "× cuBLAS main | × main + addmm | err | TMA best | TMA tiles | TMA × cuBLAS main |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in result.get("products", []):
        if "best_ms" not in r:
            lines.append(f"| {r['shape']} | {r['direction']} | {r['cublas_main_ms']:.4f} | "
                         f"{r['cublas_main_addmm_ms']:.4f} | failed | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['direction']} | {r['cublas_main_ms']:.4f} | {r['cublas_main_addmm_ms']:.4f} "
                     f"| {r['best_ms']:.4f} | {r['best_tiles']} | {r['best_k2_0_ms']:.4f} | "
                     f"{r['best_ms'] / r['cublas_main_ms']:.3f} | {r['best_ms'] / r['cublas_main_addmm_ms']:.3f} | "
                     f"{r['best_rel_err']:.1e} | " + (f"{r['best_tma_ms']:.4f} | {r['best_tma_tiles']} | "
                                                       f"{r['best_tma_ms'] / r['cublas_main_ms']:.3f} |"
                                                       if "best_tma_ms" in r else "| | |"))
    lines += ["", "## The rank-r launches alone (GB/s of x or dy read; cuBLAS's x W_downᵀ beside them)", ""]
    for r in result.get("branch", []):
        lines.append(f"- width {r['width']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items() if k.endswith("GB/s")))
    lines += ["", "## One layer fwd+bwd, compiled, ms", ""]
    for r in result.get("layer", []):
        lines.append(f"- {r['shape']}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                                      for k, v in r.items() if k not in ("shape", "tokens")))
    (out / "noble_train.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; sections not started by then are skipped")
    ap.add_argument("--sections", default="products,branch,layer", help="comma-separated: products, branch, layer")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--configs", default="", help="two_segment_configs.json of an earlier run, for the layer section")
    ap.add_argument("--candidates", type=int, default=0, help="time only the first N tile shapes (0: all)")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"product forms to time, of {','.join(FORMS)}")
    args = ap.parse_args(argv)
    from leanformer.ops import two_segment_matmul as ts

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device (use --cpu-smoke on the CPU)", file=sys.stderr)
        return 2
    n, shapes = (96, ((64, 32),)) if smoke else (16384, SHAPES)
    candidates = (ts.INTERPRETER_CONFIG[:6],) if smoke else ts.CANDIDATES
    import triton

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "versions": f"torch {torch.__version__}, triton {triton.__version__}", "tokens": n, "rank": RANK}
    best = {}
    sections = args.sections.split(",")
    if "products" in sections:
        forms = tuple(args.forms.split(","))
        if not set(forms) <= set(FORMS):
            ap.error(f"--forms {args.forms!r}: each must be one of {', '.join(FORMS)}")
        best = section_products(device, n, shapes, candidates[:args.candidates or None], args.budget, result, forms)
        write(args.out, result, best)
    if "branch" in sections:
        section_branch(device, n, shapes, args.budget, result)
        write(args.out, result, best)
    if "layer" in sections:
        if not best and args.configs:  # the tiles of an earlier products run
            best = ts.load_configs(args.configs)
        section_layer(device, n, shapes, best, args.budget, result, args.out)
    write(args.out, result, best)
    print((args.out / "noble_train.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
