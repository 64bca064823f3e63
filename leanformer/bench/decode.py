"""``leanformer bench decode``: time to first token, ms per decoding step and decode-state size against
context length and batch.

``--path graph`` (the default on CUDA) decodes as ``TransformerLM.generate`` does there
(:mod:`leanformer.decoding`): per arm and context L, a random prompt of L tokens is prefilled at batch 1
into a static cache of capacity L + warm-up + steps + 2, by chunks of ``prefill_chunk`` tokens (its time,
first sampled token included, is the time to first token); the cache is replicated to each batch b; the
fixed-shape step (model + greedy sampling, inside the graph) is captured as a CUDA graph; ``warmup``
untimed and ``steps`` timed replays follow, each timed with CUDA events; the median is reported. Weights
are bf16 (``--weights bf16``, :func:`leanformer.decoding.decoding_copy`) or float32 under bf16 autocast
(``--weights autocast``). ``--path static`` runs the same fixed-shape step without a graph (the CPU).
``--compile`` passes the step through ``torch.compile`` before capture (one compilation per arm, context and
batch: seconds each; ``capture_s`` in the JSON includes it).

``--path eager`` (the default on CPU) is the reference path below (growing caches, Python positions).
Per model arm and context length L: a random prompt of L tokens is prefilled at batch 1 by chunks of
``prefill_chunk`` tokens (``model(chunk, cache)``, not timed per token; its total time is reported), the
cache is replicated to each batch size b (``index_select`` of every cached tensor: the same bytes and
shapes a real batch of b prompts would leave), then ``warmup`` untimed and ``steps`` timed single-token
steps ``model(next (b, 1), cache)`` + argmax run; the median step is reported.

* ms/token: the median step time (each step yields one token per sequence, b in all).
* tokens/s = b / step time; the ratio to ``preln`` (softmax with a KV cache) at the same (L, b).
* memory: the decoding cache's bytes (``DecodeCache.memory_bytes``: K/V grow with L, DiJiang's state does
  not) and, on CUDA, the allocator's peak over the timed steps (weights included); on CPU the accounted
  bytes, parameters + cache.

Arms (:mod:`leanformer.arms`): ``preln`` (softmax + KV cache), ``dijiang`` (recurrent state:
chunkwise prefill, one recurrent step per token), ``sas_p`` (shaped attention: K/V cache + running sum of
V), ``noble_fused``; ``dijiang_fla`` uses fla's kernels for both (CUDA + fla).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from leanformer.arms import arm_config
from leanformer.bench.machine import run_metadata
from leanformer.bench.memory import failure_status, free_device_memory, release, tensor_bytes
from leanformer.bench.report import Column, Report, fmt_float, fmt_mib, partial_rows, series
from leanformer.bench.timing import summarize, synchronize, time_once
from leanformer.bench.train import autocast, base_config, get_size, parse_arms, unavailable_reason
from leanformer.config import ConfigError
from leanformer.device import resolve_device

DEFAULT_ARMS = ("preln", "dijiang", "sas_p", "noble_fused")
CPU_CONTEXTS = (512, 2048, 8192)
GPU_CONTEXTS = (512, 2048, 8192, 32768)
BATCHES = (1, 8, 32)


def parse_ints(spec: str | list[int] | None, default: tuple[int, ...], flag: str) -> list[int]:
    if spec is None:
        return list(default)
    try:
        values = [int(s) for s in spec.split(",")] if isinstance(spec, str) else [int(s) for s in spec]
    except ValueError:
        raise ConfigError(f"{flag} {spec!r} must be comma-separated integers, e.g. 512,2048") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {spec!r} must be positive integers")
    return values


def expand_cache(cache, batch: int):
    """A new cache whose every batched tensor is row 0 of ``cache`` repeated ``batch`` times."""
    from leanformer.model import DecodeCache

    out = DecodeCache(len(cache.layers))
    out.pos = cache.pos
    index = None
    for src, dst in zip(cache.layers, out.layers):
        for key, t in src.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                if index is None or index.device != t.device:
                    index = torch.zeros(batch, dtype=torch.long, device=t.device)
                dst[key] = t.index_select(0, index)
            else:
                dst[key] = t
    return out


@torch.no_grad()
def prefill(model, context: int, chunk: int, device: torch.device, vocab: int, seed: int = 0):
    """Fill a batch-1 cache with ``context`` random tokens, ``chunk`` at a time; returns (cache, seconds)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(device)
    cache = model.new_cache()
    synchronize(device)
    t0 = time.perf_counter()
    with autocast(device):
        for s in range(0, context, chunk):
            model(prompt[:, s:s + chunk], cache=cache)
    synchronize(device)
    return cache, time.perf_counter() - t0


@torch.no_grad()
def time_steps(model, cache, batch: int, steps: int, warmup: int, device: torch.device, vocab: int) -> dict:
    """Median (IQR) ms of ``steps`` single-token steps after ``warmup`` untimed ones; peak memory on CUDA."""
    nxt = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def step() -> None:
        nonlocal nxt
        with autocast(device):
            logits, _ = model(nxt, cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True) % vocab

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = [time_once(step, device) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    t = summarize(times)
    return {"ms_per_step": t.median_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "iqr_ms": t.iqr_ms,
            "steps": t.repeats, "peak_mem_bytes": peak}


@torch.no_grad()
def static_prefill(model, context: int, capacity: int, chunk: int, device: torch.device, vocab: int,
                   graph: str, ctx, seed: int = 0, compile: bool = False, compile_mode: str | None = None):
    """A batch-1 :class:`StaticDecoder` with ``context`` random tokens prefilled; returns (decoder, seconds).

    The timed prefill is the second one of a prompt of this length: the first (on a decoder then dropped)
    pays one-off costs a server pays once, such as ``torch.compile`` of DiJiang's feature map for a new
    length and kernel selection."""
    from leanformer.decoding import StaticDecoder

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(device)
    for timed in (False, True):
        with ctx():
            dec = StaticDecoder(model, 1, capacity, graph=graph, prefill_chunk=chunk, compile=compile,
                                compile_mode=compile_mode)
        synchronize(device)
        t0 = time.perf_counter()
        dec.prefill(prompt)
        synchronize(device)
        if not timed:
            del dec
            release(device)
    return dec, time.perf_counter() - t0


@torch.no_grad()
def time_static_steps(dec1, batch: int, steps: int, warmup: int, device: torch.device, ctx) -> dict:
    """Expand the prefilled decoder to ``batch`` rows, capture, and time ``steps`` single-token steps
    (CUDA events around each replay; ``perf_counter`` on CPU) after ``warmup`` untimed ones."""
    with ctx():
        dec = dec1.expanded(batch)  # a copy even at batch 1: dec1 stays at the context for the next batch
        row = {"cache_bytes": dec.cache.memory_bytes(), "cache_alloc_bytes": dec.cache.memory_bytes(filled=False)}
        t0 = time.perf_counter()
        dec.capture()
        synchronize(device)
        row["capture_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        dec.step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            dec.step()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            dec.step()
            times.append(1e3 * (time.perf_counter() - t0))
        row["peak_mem_bytes"] = None
    t = summarize(times)
    row.update({"ms_per_step": t.median_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "iqr_ms": t.iqr_ms,
                "steps": t.repeats})
    del dec
    return row


def _model(name: str, base, device: torch.device, bf16: bool = False):
    """(arm ``name``'s model at ``base`` on ``device``: seeded, eval, frozen, a bf16 decoding copy when
    ``bf16``; None) or (None, why it cannot run here)."""
    from leanformer.decoding import decoding_copy
    from leanformer.model import TransformerLM

    cfg = arm_config(base, name)
    reason = unavailable_reason(cfg, device)
    if reason is not None:
        return None, reason
    try:
        torch.manual_seed(0)
        with torch.device(device):  # initialised on the device: seconds faster at GPT-2 size
            model = TransformerLM(cfg).eval()
        if bf16:
            model = decoding_copy(model, torch.bfloat16)
        return model.requires_grad_(False), None
    except Exception as e:  # noqa: BLE001 - one failing arm must not stop the others
        return None, f"failed: {type(e).__name__}: {e}"[:300]


def run_decode_bench(*, size: str = "cpu", arms: str | list[str] | None = None,
                     contexts: str | list[int] | None = None, batches: str | list[int] | None = None,
                     steps: int | None = None, warmup: int = 2, prefill_chunk: int | None = None,
                     device: torch.device | None = None, time_budget: float | None = None,
                     max_memory_gb: float | None = None, path: str | None = None, weights: str = "bf16",
                     compile: bool = False, compile_mode: str | None = None,
                     command: str = "leanformer bench decode") -> Report:
    """Every arm × context × batch; returns the :class:`Report`."""
    device = device or resolve_device()
    gpu = device.type == "cuda"
    path = path or ("graph" if gpu else "eager")
    if path not in ("graph", "static", "eager"):
        raise ConfigError(f"--path {path!r} is not valid; choose graph, static or eager")
    if path == "graph" and not gpu:
        raise ConfigError("--path graph needs CUDA; use --path static or eager on the CPU")
    if weights not in ("bf16", "autocast"):
        raise ConfigError(f"--weights {weights!r} is not valid; choose bf16 or autocast")
    if compile and path == "eager":
        raise ConfigError("--compile applies to the static step (--path graph or static), not --path eager")
    if compile_mode is not None and not compile:
        raise ConfigError(f"--compile-mode {compile_mode} needs --compile")
    from leanformer.decoding import COMPILE_MODES

    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile-mode {compile_mode!r} is not valid; choose "
                          f"{', '.join(m for m in COMPILE_MODES if m)} (the step's CUDA graph is captured here)")
    if compile:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # one compilation per arm, context and batch
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 512))
    steps = steps or (32 if gpu else 8)
    chunk = prefill_chunk or (4096 if gpu else 1024)
    run = dict(size=size, sz=get_size(size), names=parse_arms(arms, default=DEFAULT_ARMS),
               ctxs=parse_ints(contexts, GPU_CONTEXTS if gpu else CPU_CONTEXTS, "--contexts"),
               bs=parse_ints(batches, BATCHES, "--batches"), steps=steps, warmup=warmup, chunk=chunk, device=device,
               max_memory_gb=max_memory_gb)
    if steps < 1 or warmup < 0 or chunk < 1:
        raise ConfigError(f"--steps={steps} and --prefill-chunk={chunk} must be >= 1, --warmup={warmup} >= 0")
    run.update(meta=run_metadata(device, command), deadline=time.monotonic() + time_budget if time_budget else None)
    if path == "eager":
        return _run_eager(**run)
    return _run_static(**run, path=path, weights=weights, compile=compile, compile_mode=compile_mode)


def _run_static(*, size, sz, names, ctxs, bs, steps, warmup, chunk, device, max_memory_gb, meta, deadline, path,
                weights, compile, compile_mode) -> Report:
    gpu = device.type == "cuda"
    extra = warmup + steps + 2
    base = base_config(sz, max_seq_len=max(ctxs) + extra)
    use_autocast = gpu and weights == "autocast"
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_autocast else nullcontext
    graph = "cuda" if path == "graph" else "none"
    rows = partial_rows("decode")
    for name in names:
        model, reason = _model(name, base, device, bf16=gpu and weights == "bf16")
        param_bytes = tensor_bytes(model.parameters()) if model is not None else None
        for L in ctxs:
            dec1, prefill_s, status = None, None, reason
            if status is None and deadline is not None and time.monotonic() > deadline:
                status = "skipped (time budget)"
            if status is None:
                try:
                    dec1, prefill_s = static_prefill(model, L, L + extra, chunk, device, sz.vocab_size, graph, ctx,
                                                     compile=compile, compile_mode=compile_mode)
                except Exception as e:  # noqa: BLE001
                    status = failure_status(e)
                    release(device)
            for b in bs:
                row = {"arm": name, "context": L, "batch": b, "prefill_s": prefill_s}
                if status is not None:
                    row["status"] = status
                    rows.append(row)
                    continue
                alloc = dec1.cache.memory_bytes(filled=False)
                free = free_device_memory(device)
                budget = max_memory_gb * 2**30 if max_memory_gb else (0.85 * free if free else None)
                if budget is not None and 1.05 * alloc * b > budget:
                    row["status"] = "skipped (memory)"
                elif deadline is not None and time.monotonic() > deadline:
                    row["status"] = "skipped (time budget)"
                else:
                    try:
                        row.update(time_static_steps(dec1, b, steps, warmup, device, ctx))
                        if row["peak_mem_bytes"] is None:
                            row["peak_mem_bytes"] = param_bytes + row["cache_alloc_bytes"]
                        row["tokens_per_s"] = b / (row["ms_per_step"] / 1e3)
                        row["status"] = "ok"
                    except Exception as e:  # noqa: BLE001
                        row["status"] = failure_status(e)
                    release(device)
                rows.append(row)
                print(f"[bench decode] {name} L={L} b={b}: {row['status']}"
                      + (f", {row['ms_per_step']:.3f} ms/step" if row["status"] == "ok" else ""), flush=True)
            del dec1
            release(device)
        del model
        release(device)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (r["context"], r["batch"], order[r["arm"]]))
    add_ratios(rows)
    dtype = ("bf16 weights" if weights == "bf16" else "bf16 autocast") if gpu else "float32"
    report = Report(
        name="decode", title=(f"Decoding ({path} path{', compiled step' if compile else ''}"
               f"{f' ({compile_mode})' if compile_mode else ''}): size {size}, {dtype}"),
        meta=meta, rows=rows, columns=DECODE_COLUMNS, plot=plot_decode,
        settings={"size": size, "model": vars(sz), "contexts": ctxs, "batches": bs, "steps": steps,
                  "warmup": warmup, "prefill_chunk": chunk, "path": path, "weights": weights if gpu else "float32",
                  "compile": compile, "compile_mode": compile_mode},
        notes=[
            "static cache of capacity context + warm-up + steps + 2; prompt prefilled at batch 1 by chunks "
            "(time to first token = that prefill + the first sample; the second prefill of that length, the "
            "first pays one-off compilation), the cache replicated to the batch; then "
            f"single-token steps (model + greedy sampling{', one CUDA graph replay each' if path == 'graph' else ''}), "
            "median over the timed steps",
            "ms/token = one decoding step (it yields one token for each of the b sequences); tokens/s = b / step",
            "× softmax: tokens/s ratio to preln (softmax + KV cache) at the same context and batch",
            "state = decode-state bytes at the context (K/V filled up to it, DiJiang's S and n, shaped "
            "attention's running sum); peak = " + ("CUDA allocator peak during the steps (weights and the "
                                                  "whole pre-allocated cache included)" if gpu
                                                  else "parameters + allocated cache (accounted)"),
        ],
    )
    report.finish()
    return report


def _run_eager(*, size, sz, names, ctxs, bs, steps, warmup, chunk, device, max_memory_gb, meta,
               deadline) -> Report:
    gpu = device.type == "cuda"
    base = base_config(sz, max_seq_len=max(ctxs) + warmup + steps + 1)
    rows = partial_rows("decode")
    for name in names:
        model, reason = _model(name, base, device)
        param_bytes = tensor_bytes(model.parameters()) if model is not None else None
        for L in ctxs:
            cache, prefill_s, status = None, None, reason
            if status is None and deadline is not None and time.monotonic() > deadline:
                status = "skipped (time budget)"
            if status is None:
                try:
                    cache, prefill_s = prefill(model, L, chunk, device, sz.vocab_size)
                except Exception as e:  # noqa: BLE001
                    status = failure_status(e)
                    release(device)
            for b in bs:
                row = {"arm": name, "context": L, "batch": b, "prefill_s": prefill_s}
                if status is not None:
                    row["status"] = status
                    rows.append(row)
                    continue
                one = cache.memory_bytes()
                free = free_device_memory(device)
                budget = max_memory_gb * 2**30 if max_memory_gb else (0.8 * free if free else None)
                # the expanded cache, plus one more copy while torch.cat grows a K/V cache
                if budget is not None and 2.2 * one * b > budget:
                    row["status"] = "skipped (memory)"
                elif deadline is not None and time.monotonic() > deadline:
                    row["status"] = "skipped (time budget)"
                else:
                    try:
                        cb = expand_cache(cache, b)
                        row["cache_bytes"] = cb.memory_bytes()
                        row.update(time_steps(model, cb, b, steps, warmup, device, sz.vocab_size))
                        row["cache_bytes_end"] = cb.memory_bytes()
                        if row["peak_mem_bytes"] is None:
                            row["peak_mem_bytes"] = param_bytes + row["cache_bytes_end"]
                        row["tokens_per_s"] = b / (row["ms_per_step"] / 1e3)
                        row["status"] = "ok"
                        del cb
                    except Exception as e:  # noqa: BLE001
                        row["status"] = failure_status(e)
                    release(device)
                rows.append(row)
                print(f"[bench decode] {name} L={L} b={b}: {row['status']}"
                      + (f", {row['ms_per_step']:.2f} ms/step" if row["status"] == "ok" else ""), flush=True)
            del cache
            release(device)
        del model
        release(device)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (r["context"], r["batch"], order[r["arm"]]))
    add_ratios(rows)
    report = Report(
        name="decode", title=f"Decoding: size {size}, {'bf16 autocast' if gpu else 'float32'}",
        meta=meta, rows=rows, columns=DECODE_COLUMNS, plot=plot_decode,
        settings={"size": size, "model": vars(sz), "contexts": ctxs, "batches": bs, "steps": steps,
                  "warmup": warmup, "prefill_chunk": chunk, "path": "eager"},
        notes=[
            "prompt prefilled at batch 1 by chunks, cache replicated to the batch; then single-token steps "
            "(model + argmax), median over the timed steps",
            "ms/token = one decoding step (it yields one token for each of the b sequences); "
            "tokens/s = b / step",
            "× softmax: tokens/s ratio to preln (softmax + KV cache) at the same context and batch",
            "memory: cache = decoding-state bytes; peak = " + ("CUDA allocator peak during the steps" if gpu
                                                             else "parameters + cache (accounted)"),
        ],
    )
    report.finish()
    return report


def add_ratios(rows: list[dict]) -> None:
    base = {(r["context"], r["batch"]): r for r in rows if r["arm"] == "preln" and r.get("status") == "ok"}
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        if r.get("status") == "ok" and b is not None:
            r["speed_vs_softmax"] = r["tokens_per_s"] / b["tokens_per_s"]


DECODE_COLUMNS = [
    Column("context", "context"),
    Column("batch", "batch"),
    Column("arm", "arm"),
    Column("ms_per_step", "ms/token", fmt_float(2)),
    Column("iqr_ms", "IQR ms", fmt_float(2)),
    Column("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    Column("speed_vs_softmax", "× softmax", fmt_float(2)),
    Column("cache_bytes", "state (MiB)", fmt_mib),
    Column("peak_mem_bytes", "peak mem (MiB)", fmt_mib),
    Column("prefill_s", "first token s (b=1)", fmt_float(3)),
    Column("status", "status", lambda v: "" if v == "ok" else v),
]


def plot_decode(fig, rows: list[dict]) -> None:
    """One panel per batch: ms/token against context (log-log), one line per arm; and cache bytes."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    n = len(batches) + 1
    for i, b in enumerate(batches):
        ax = fig.add_subplot(1, n, i + 1)
        for a in arms:
            xs, ys = series(rows, {"arm": a, "batch": b, "status": "ok"}, "context", "ms_per_step")
            if xs:
                ax.plot(xs, ys, marker="o", label=a)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}", fontsize=9)
        ax.set_xlabel("context")
        ax.set_ylabel("ms / token")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, n, n)
    b0 = batches[0] if batches else 1
    for a in arms:
        xs, ys = series(rows, {"arm": a, "batch": b0, "status": "ok"}, "context", "cache_bytes")
        if xs:
            ax.plot(xs, [y / 2**20 for y in ys], marker="o", label=a)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"cache, batch {b0}", fontsize=9)
    ax.set_xlabel("context")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
