"""Where a NOBLE decoding launch's time goes (issue #15): one layer's kernel against plain few-row products of the
same shapes, inside CUDA graphs.

In GPT-2's decoding step at 512 × 32 each NOBLE launch averaged 9.68 µs against 4.97 µs for Pre-LN's few-row
product of the same shape; halving the column blocks and loading the epilogue's operands first changed nothing
(H100, 2026-12-07 14:13 and 16:47, docs/gpu/misc_2026-12-07/callN2, callS). For each (K, N, rows M, rank R) this
times, per launch, in one CUDA graph of ``--calls`` launches (:func:`skinny_linear_gpu.graph_time_per_call`):

* ``plain N``: ``skinny_linear`` of W (the Pre-LN layer);
* ``plain N+R``: ``skinny_linear`` of [W; W_down]: the main product and z's columns once each, no epilogue;
* ``NOBLE``: ``noble_decode.noble_linear`` (every program recomputes z, then CosNet and the up product);
* ``NOBLE, BLOCK_N b``: the same with b-column blocks (fewer programs, so fewer recomputations of z);
* ``two launches``: the split-K route with one part (``noble_decode._noble_split``, S = 1): z once, by column
  blocks of its own beside W's (``partials``: float32 [x Wᵀ, x W_downᵀ]), then the epilogue for each output
  column block (``finish``: the sum of the parts, CosNet, the up product, the sum), each also timed alone;
* ``..., tf32 CosNet``: the one- and two-launch routes with CosNet's r × r product on tensor cores
  (``noble_decode.COSNET_PRECISION`` "tf32"; "ieee", the default, runs it on FMAs in every program).

NOBLE − plain N+R is then z's recomputation plus the epilogue; the rank and the block width tell the two apart.
The H100 call of 2026-12-07 18:59 (docs/gpu/misc_2026-12-07/callY) found it growing with the rank at 32 rows (2.6,
5.3, 9.7 µs at r 16, 32, 64) and wider blocks slower, so the two-launch columns ask whether z once plus an
epilogue of its own beats every program's z and epilogue.
Each NOBLE result is checked against the layer in float64 (max error over max |y|).

    PYTHONPATH=$PWD:$PWD/benchmarks python3 benchmarks/noble_decode_gpu.py --out $OUT
    PYTHONPATH=$PWD:$PWD/benchmarks TRITON_INTERPRET=1 python benchmarks/noble_decode_gpu.py --cpu-smoke --out DIR

Writes ``noble_decode.json`` and ``noble_decode.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = [("o 768→768", 768, 768), ("MLP up 768→3072", 768, 3072)]  # GPT-2 small's one-launch NOBLE layers
ROWS = (1, 32)
RANKS = (16, 32, 64)
BLOCKS = (32, 64)


def noble_layer(K: int, N: int, rank: int, device: torch.device, dtype: torch.dtype):
    """A NobleLinear (CosNet, plain sum) with a branch large enough to matter (non-zero W_up and b_down)."""
    from leanformer.layers.noble import NobleLinear

    torch.manual_seed(0)
    layer = NobleLinear(K, N, bias=True, rank=rank, fused=False).eval()
    with torch.no_grad():
        layer.up.weight.normal_(0.0, 0.3 / rank ** 0.5)
        layer.down.bias.normal_(0.0, 0.5)
    return layer.requires_grad_(False).to(device, dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/noble_decode")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1: checks only")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--budget", type=float, default=200.0)
    args = p.parse_args(argv)
    from leanformer.ops import noble_decode as nd
    from leanformer.ops import skinny_linear as sl

    smoke = args.cpu_smoke
    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.bfloat16
    if smoke:
        nd.ROUTE = "always"
    shapes, rows_list, ranks = ([("smoke 64→48", 64, 48)], (1, 3), (16,)) if smoke else (SHAPES, ROWS, RANKS)
    result = {"meta": {"device": "cpu" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "command": "python3 " + " ".join(sys.argv), "calls_per_graph": args.calls}, "rows": []}
    t0 = time.monotonic()
    for (label, K, N), M, R in itertools.product(shapes, rows_list, ranks):
        row = {"shape": label, "K": K, "N": N, "M": M, "R": R}
        if time.monotonic() - t0 > args.budget:
            result["rows"].append(dict(row, status="skipped (time budget)"))
            continue
        layer = noble_layer(K, N, R, dev, dt)
        x = torch.randn(M, K, device=dev, generator=torch.Generator(dev).manual_seed(1)).to(dt)
        y = nd.noble_linear(layer, x)
        ref = layer.double()(x.double())
        layer = layer.to(dt)
        row["rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max())
        w_wd = torch.cat([layer.weight, layer.down.weight])
        b_bd = torch.cat([layer.bias, layer.down.bias])
        variants = {"plain N": lambda x=x, m=layer: sl.skinny_linear(x, m.weight, m.bias),
                    "plain N+R": lambda x=x, w=w_wd, b=b_bd: sl.skinny_linear(x, w, b),
                    "NOBLE": lambda x=x, m=layer: nd.noble_linear(m, x),
                    "two launches": lambda x=x, m=layer: nd._noble_split(m, x, 0, 1)}
        parts = nd._partials_op(x, layer.weight, layer.down.weight, 1)
        cos = layer.act
        variants["partials"] = lambda x=x, m=layer: nd._partials_op(x, m.weight, m.down.weight, 1)
        variants["finish"] = lambda p=parts, m=layer, c=cos: nd._finish_op(
            p, m.bias, m.down.bias, c.omega1, c.phi1, c.M.weight, c.M.bias, c.omega2, c.phi2, m.up.weight, 0)
        row["two_launch_rel_err"] = float((variants["two launches"]().double() - ref).abs().max() / ref.abs().max())
        times = {}
        if smoke:  # each variant once (no timing without CUDA), so an API drift shows here, not in a device call
            assert all(fn() is not None for fn in variants.values())
        else:
            from skinny_linear_gpu import graph_time_per_call

            for name, fn in variants.items():
                times[name] = graph_time_per_call(fn, args.calls, args.replays)
            for name in ("NOBLE", "two launches"):  # the epilogue's r x r CosNet product on tensor cores
                nd.COSNET_PRECISION = "tf32"
                try:
                    times[f"{name}, tf32 CosNet"] = graph_time_per_call(variants[name], args.calls, args.replays)
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    times[f"{name}, tf32 CosNet"] = f"failed: {type(e).__name__}: {e}"[:120]
                finally:
                    nd.COSNET_PRECISION = "ieee"
            for block in BLOCKS:
                sl.BLOCK_N = block
                try:
                    times[f"NOBLE, BLOCK_N {block}"] = graph_time_per_call(variants["NOBLE"], args.calls, args.replays)
                except Exception as e:  # noqa: BLE001 - a block that does not compile is reported, not fatal
                    times[f"NOBLE, BLOCK_N {block}"] = f"failed: {type(e).__name__}: {e}"[:120]
                finally:
                    sl.BLOCK_N = None
        row.update(times_us=times, config=sl.launch_config(M, N, K, dt, extra_rows=R), status="ok")
        if times:
            print(f"{label} M={M} R={R}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()
                                                        if isinstance(v, float)) + f" µs; err {row['rel_err']:.2e}",
                  flush=True)
        result["rows"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noble_decode.json").write_text(json.dumps(result, indent=1))
    names = (["plain N", "plain N+R", "NOBLE"] + [f"NOBLE, BLOCK_N {b}" for b in BLOCKS]
             + ["two launches", "partials", "finish", "NOBLE, tf32 CosNet", "two launches, tf32 CosNet"])
    lines = [f"# One NOBLE decoding launch against plain few-row products ({result['meta']['device']}, "
             f"{result['meta']['date']})", "", f"`{result['meta']['command']}`; µs per launch in a CUDA graph", "",
             "| shape | M | R | " + " | ".join(names) + " | NOBLE − plain N+R | heuristic BLOCK_N | max err / max |",
             "|---|---:|---:|" + "---:|" * (len(names) + 1) + "---:|---:|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['M']} | {r['R']} | {r['status']} |")
            continue
        t = r["times_us"]
        cells = [f"{t[n]:.2f}" if isinstance(t.get(n), float) else str(t.get(n, "—")) for n in names]
        extra = f"{t['NOBLE'] - t['plain N+R']:.2f}" if t else "—"
        lines.append(f"| {r['shape']} | {r['M']} | {r['R']} | " + " | ".join(cells)
                     + f" | {extra} | {r['config']['BLOCK_N']} | {r['rel_err']:.2e} |")
    (out / "noble_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
