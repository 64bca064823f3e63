"""Time one linear layer, forward + backward: nn.Linear vs NobleLinear (plain two products) vs fused.

    python benchmarks/noble_fused.py [--dims 256 768] [--tokens 4096] [--rank 32] [--out results.json]

Variants (all at the same d_in = d_out = d, ``tokens`` rows of input, gradients for the input and
every parameter):
  linear          torch.nn.Linear
  noble_plain     NobleLinear(fused=False): x Wᵀ and x W_downᵀ as two products
  noble_fused     NobleLinear(fused=True): torch.cat([W; W_down]) inside forward, one product, split
  noble_prestack  the same single product with [W; W_down] already stored stacked (no cat): a lower
                  bound for the fused path, showing what the per-call concatenation costs

Median of ``--repeats`` timed runs after ``--warmup`` untimed ones, variants interleaved round-robin;
CUDA events on a GPU, time.perf_counter on CPU. Prints a markdown table (ms, and the ratio to nn.Linear).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.bench.machine import machine_string
from leanformer.bench.timing import time_once
from leanformer.layers.noble import NobleLinear


class PrestackedNoble(nn.Module):
    """NobleLinear's math with ``[W; W_down]`` stored as one parameter (timing reference only)."""

    def __init__(self, layer: NobleLinear) -> None:
        super().__init__()
        self.d_out, self.rank = layer.out_features, layer.rank
        self.w = nn.Parameter(torch.cat([layer.weight, layer.down.weight]).detach().clone())
        self.b = nn.Parameter(torch.cat([layer.bias, layer.down.bias]).detach().clone())
        self.act, self.up = layer.act, layer.up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main, z = F.linear(x, self.w, self.b).split([self.d_out, self.rank], dim=-1)
        return main + self.up(self.act(z))


def _step_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` (grads for x and every parameter)."""
    x = x.detach().requires_grad_(True)
    g = torch.randn_like(module(x))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(g)

    return step


def time_fwd_bwd(modules: dict[str, nn.Module], x: torch.Tensor, warmup: int,
                 repeats: int) -> dict[str, float]:
    """Median milliseconds of forward + backward per module. The variants are timed round-robin (one
    run of each per repeat), so load from other processes falls on all of them alike."""
    steps = {name: _step_fn(m, x) for name, m in modules.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(time_once(step, x.device))
    return {name: statistics.median(t) for name, t in times.items()}


def variants(d: int, rank: int, activation: str, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    kw = {"device": device, "dtype": dtype}
    fused = NobleLinear(d, d, rank=rank, activation=activation, fused=True, **kw)
    return {
        "linear": nn.Linear(d, d, **kw),
        "noble_plain": NobleLinear(d, d, rank=rank, activation=activation, fused=False, **kw),
        "noble_fused": fused,
        "noble_prestack": PrestackedNoble(fused),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--tokens", type=int, default=4096, help="batch x sequence rows")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--activation", default="cosnet")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each variant (fuses CosNet's ops)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for d in args.dims:
        x = torch.randn(args.tokens, d, device=args.device, dtype=dtype)
        mods = variants(d, args.rank, args.activation, args.device, dtype)
        if args.compile:
            mods = {k: torch.compile(m) for k, m in mods.items()}
        ms = time_fwd_bwd(mods, x, args.warmup, args.repeats)
        rows.append({"d": d, **{f"{k}_ms": v for k, v in ms.items()},
                     **{f"{k}_vs_linear": v / ms["linear"] for k, v in ms.items() if k != "linear"},
                     "fused_vs_plain": ms["noble_fused"] / ms["noble_plain"]})
    device_name = machine_string(torch.device(args.device))
    print(f"NobleLinear fwd+bwd, {args.tokens} tokens, rank {args.rank}, {args.activation}, {args.dtype}, "
          f"{args.device} ({device_name}), torch {torch.__version__}, "
          f"{'torch.compile, ' if args.compile else ''}"
          f"median of {args.repeats}")
    print()
    print("| d | nn.Linear ms | plain ms | fused ms | prestacked ms | plain/linear | fused/linear "
          "| fused/plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['linear_ms']:.2f} | {r['noble_plain_ms']:.2f} | {r['noble_fused_ms']:.2f} | "
              f"{r['noble_prestack_ms']:.2f} | {r['noble_plain_vs_linear']:.3f} | "
              f"{r['noble_fused_vs_linear']:.3f} | {r['fused_vs_plain']:.3f} |")
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "device_name": device_name,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
