"""DiJiang vs softmax attention: training-step time vs sequence length, and decoding cost vs context.

1. Forward+backward time of the token mixer alone, (B, H, T, d): softmax SDPA (causal) vs DiJiang
   ``parallel`` (masked T×T; skipped where its T×T tensors would pass ``--parallel-max-gb``) vs ``chunk``.
   DiJiang's time includes its ``paper`` feature map (DCT projection, exp, stabilisers).
2. Decoding: ms per new token and state memory at a given context, one attention *layer* with its cache:
   :class:`DiJiangAttention` (recurrent state, constant size) vs :class:`SoftmaxAttention` (KV cache).

CUDA events on a GPU, ``time.perf_counter`` on CPU; each figure is a median. Prints markdown tables;
``--out FILE.json`` also writes the raw numbers.

    python benchmarks/dijiang_attention.py                      # CPU-sized defaults, a few minutes
    python benchmarks/dijiang_attention.py --quick              # smoke run
    python benchmarks/dijiang_attention.py --device cuda --dtype bfloat16 --batch 8 --heads 16
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F

from leanformer.bench.machine import machine_string
from leanformer.bench.timing import time_fn
from leanformer.config import DiJiangConfig, TransformerConfig
from leanformer.layers.attention import SoftmaxAttention
from leanformer.layers.dijiang import DiJiangAttention, DiJiangFeatureMap, default_log_gamma, running_log_norm
from leanformer.ops import decayed_linear_attention as dla

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timer(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` (:func:`leanformer.bench.timing.time_fn`)."""
    return time_fn(fn, device, warmup=warmup, repeats=repeats).median_ms


# ------------------------------------------------------------------------------ 1. fwd+bwd vs T
def dijiang_core(q, k, v, fmap, log_gamma, mode: str, chunk_size: int):
    """The DiJiang token mixer on (B, H, T, d) q, k, v: paper feature map + stabilisers + one form."""
    zq, zk = fmap(q), fmap(k)
    fq = (zq - zq.detach().amax(-1, keepdim=True)).exp().to(v.dtype)
    n = running_log_norm(zk.detach().amax(-1), log_gamma)
    fk = (zk - n[..., None]).exp().to(v.dtype)
    if mode == "parallel":
        return dla.parallel(fq, fk, v, log_gamma, log_norm=n)[0]
    if mode == "fla":
        return dla.fla_chunk(fq, fk, v, log_gamma, log_norm=n)[0]
    return dla.chunk(fq, fk, v, log_gamma, log_norm=n, chunk_size=chunk_size)[0]


def _train_step(name, q, k, v, grad, fmap, log_gamma, chunk_size) -> None:
    for t in (q, k, v):
        t.grad = None
    if name == "softmax_sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = dijiang_core(q, k, v, fmap, log_gamma, name.split("_", 1)[1], chunk_size)
    out.backward(grad)


def bench_training(args, device, dtype) -> list[dict]:
    B, H, d = args.batch, args.heads, args.head_dim
    fmap = DiJiangFeatureMap(d, d, H, "paper").to(device)
    log_gamma = default_log_gamma(H).float().to(device)
    methods = ["softmax_sdpa", "dijiang_parallel", "dijiang_chunk"] + (["dijiang_fla"] if args.fla else [])
    rows = []
    for T in args.lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(B, H, T, d, device=device, dtype=dtype, generator=g)
        row = {"T": T}
        for name in methods:
            if name == "dijiang_parallel":
                # q kᵀ, decay, their product and grads: ~5 T×T tensors per (batch, head)
                need = 5 * B * H * T * T * max(dtype.itemsize, 4) / 2 ** 30
                if need > args.parallel_max_gb:
                    row[name] = None
                    continue

            step = functools.partial(_train_step, name, q, k, v, grad, fmap, log_gamma, args.chunk_size)
            reps = args.repeats if T <= 4096 else max(1, args.repeats // 2)
            try:
                row[name] = timer(step, device, reps)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. fla refusing this GPU/Triton pair
                print(f"  {name} at T={T} failed: {str(err).splitlines()[0][:200]}", flush=True)
                row[name] = None
        rows.append(row)
        print(f"  T={T}: " + ", ".join(f"{m}={_fmt(row[m])}" for m in methods), flush=True)
    return rows


# ---------------------------------------------------------------------------- 2. decoding
def _decode_layers(args, device, dtype):
    cfg = TransformerConfig(d_model=args.d_model, n_heads=args.decode_heads, attention="dijiang",
                            dijiang=DiJiangConfig(feature_map="paper")).validate()
    soft = SoftmaxAttention(cfg, 0).to(device=device, dtype=dtype).eval()
    dj = DiJiangAttention(cfg, 0).to(device=device, dtype=dtype).eval()
    return cfg, soft, dj


def _state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def bench_decoding(args, device, dtype) -> list[dict]:
    cfg, soft, dj = _decode_layers(args, device, dtype)
    H, d = cfg.n_heads, cfg.head_dim
    m = dj.feature_dim
    rows = []
    for ctx in args.contexts:
        for B in args.batches:
            x = torch.randn(B, 1, cfg.d_model, device=device, dtype=dtype)
            # Caches as they stand after a prompt of ``ctx`` tokens (random contents: timing only).
            kv = {"k": torch.randn(B, H, ctx, d, device=device, dtype=dtype),
                  "v": torch.randn(B, H, ctx, d, device=device, dtype=dtype), "pos": ctx}
            st = {"S": torch.randn(B, H, m, d, device=device, dtype=torch.promote_types(dtype, torch.float32)),
                  "n": torch.zeros(B, H, device=device), "pos": ctx}
            soft_bytes, dj_bytes = _state_bytes(kv), _state_bytes(st)
            with torch.no_grad():
                t_soft = timer(functools.partial(soft, x, kv), device, args.decode_repeats, warmup=2)
                t_dj = timer(functools.partial(dj, x, st), device, args.decode_repeats, warmup=2)
            row = {"context": ctx, "batch": B, "softmax_ms": t_soft, "dijiang_ms": t_dj,
                   "softmax_cache_mb": soft_bytes / 2 ** 20, "dijiang_state_mb": dj_bytes / 2 ** 20}
            rows.append(row)
            print(f"  ctx={ctx} B={B}: softmax {t_soft:.3f} ms, dijiang {t_dj:.3f} ms", flush=True)
            del kv, st
    return rows


# ------------------------------------------------------------------------------------ report
def _fmt(x) -> str:
    return "—" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def markdown(train_rows, dec_rows, meta) -> str:
    lines = [f"Device: {meta['device']}; dtype {meta['dtype']}; torch {meta['torch']}; {meta['threads']} threads.", ""]
    if train_rows:
        methods = [k for k in train_rows[0] if k != "T"]
        lines += [f"Forward+backward of the token mixer, ms (B={meta['batch']}, H={meta['heads']}, "
                  f"d={meta['head_dim']}, chunk {meta['chunk_size']}; — = skipped, T×T too large):", "",
                  "| T | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for r in train_rows:
            lines.append(f"| {r['T']} | " + " | ".join(_fmt(r[m]) for m in methods) + " |")
        lines.append("")
    if dec_rows:
        lines += [f"Decoding one token through one attention layer (d_model={meta['d_model']}, "
                  f"H={meta['decode_heads']}), ms/token and cache size:", "",
                  "| context | batch | softmax+KV ms | DiJiang ms | speed-up | KV cache MB | DiJiang state MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in dec_rows:
            lines.append(f"| {r['context']} | {r['batch']} | {r['softmax_ms']:.3f} | {r['dijiang_ms']:.3f} | "
                         f"{r['softmax_ms'] / r['dijiang_ms']:.1f}× | {r['softmax_cache_mb']:.1f} | "
                         f"{r['dijiang_state_mb']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--parallel-max-gb", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--decode-heads", type=int, default=4)
    p.add_argument("--decode-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--fla", action="store_true", help="also time fla's chunk_simple_gla (CUDA)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-decoding", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--out", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.contexts, args.batches = [256, 1024], [512], [1, 8]
        args.repeats, args.decode_repeats = 2, 5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"device": machine_string(device), "dtype": args.dtype, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "batch": args.batch, "heads": args.heads,
            "head_dim": args.head_dim, "chunk_size": args.chunk_size, "d_model": args.d_model,
            "decode_heads": args.decode_heads}
    train_rows = [] if args.skip_training else bench_training(args, device, dtype)
    dec_rows = [] if args.skip_decoding else bench_decoding(args, device, dtype)
    print()
    print(markdown(train_rows, dec_rows, meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "training": train_rows, "decoding": dec_rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
