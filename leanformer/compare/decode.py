"""Decoding cost of a trained model: greedy ms/token with the cache, memory, and a greedy sample.

Latency (batch 1): a random prompt of ``L`` tokens fills the cache (not timed), then each decoding
step ``model(next_token, cache)`` + argmax is timed after ``warmup`` untimed steps; the median is
reported. On CUDA the step is the static decoder's CUDA graph (:mod:`leanformer.decoding`, as
``generate`` decodes there), timed with CUDA events. On CPU decoding runs on one thread (batch-1
decoding of a small model gains little from more, and a busy machine makes multi-threaded timings erratic).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed decode at that context; everywhere
the bytes of the decoding cache (``DecodeCache.memory_bytes``: K/V grow with ``L``, DiJiang's recurrent
state does not). Training memory (:func:`peak_memory_start` / :func:`peak_memory_bytes`): on CUDA the
allocator's peak, on CPU the process's peak resident set (``VmHWM``, reset per arm through
``/proc/self/clear_refs`` where Linux allows it, else ``getrusage``'s lifetime peak).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from leanformer.model import TransformerLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def decode_latency(model: TransformerLM, contexts: tuple[int, ...] | list[int], n_tokens: int = 16,
                   warmup: int = 3, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{str(L): {"ms_per_token", "cache_bytes", "peak_bytes"?}}`` for each context length ``L``.

    ``peak_bytes`` (CUDA only) is the allocator's peak during the timed steps at context ``L``.
    On CPU the decoding runs on one thread (restored afterwards).
    """
    model.eval()
    device = next(model.parameters()).device
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # batch-1 decoding gains little from threads, and loses much on a busy CPU
    try:
        return _decode_latency(model, device, contexts, n_tokens, warmup, seed)
    finally:
        torch.set_num_threads(threads)


def _decode_latency(model: TransformerLM, device: torch.device, contexts, n_tokens: int, warmup: int,
                    seed: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for L in contexts:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, L), generator=g).to(device)
        if device.type == "cuda":
            out[str(L)] = _graph_latency(model, prompt, n_tokens, warmup)
            continue
        cache = model.new_cache()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with _autocast(device):
            logits, _ = model(prompt, cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for i in range(warmup + n_tokens):
                _sync(device)
                t0 = time.perf_counter()
                logits, _ = model(nxt, cache=cache)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        rec = {"ms_per_token": 1000 * statistics.median(times), "cache_bytes": cache.memory_bytes()}
        if device.type == "cuda":
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out[str(L)] = rec
        del cache, logits
    return out


def _graph_latency(model: TransformerLM, prompt: torch.Tensor, n_tokens: int, warmup: int) -> dict[str, float]:
    """Batch-1 ms/token of the static decoder's CUDA-graph step (bf16 autocast), its state and peak memory."""
    from leanformer.decoding import StaticDecoder

    device = prompt.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with _autocast(device):
        dec = StaticDecoder(model, 1, prompt.shape[1] + warmup + n_tokens + 1, temperature=0.0)
    dec.prefill(prompt)
    dec.capture()
    for _ in range(warmup):
        dec.step()
    times = []
    for _ in range(n_tokens):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dec.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms_per_token": statistics.median(times), "cache_bytes": dec.cache.memory_bytes(),
            "peak_bytes": torch.cuda.max_memory_allocated(device)}


@torch.no_grad()
def greedy_sample(model: TransformerLM, tokenizer, prompt: str, n_tokens: int) -> str | None:
    """``prompt`` followed by ``n_tokens`` greedy tokens, decoded; None without a tokenizer."""
    if tokenizer is None:
        return None
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    with _autocast(device):
        out = model.generate(torch.tensor([ids], device=device), n_tokens, temperature=0)
    return tokenizer.decode(out[0].tolist())


# ---------------------------------------------------------------------------- training peak memory
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_start(device: torch.device) -> str:
    """Reset the peak-memory counter for ``device``; returns what :func:`peak_memory_bytes` will measure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "CUDA max_memory_allocated"
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return "peak RSS (VmHWM, reset per arm)"
    except OSError:
        return "peak RSS of the process so far (getrusage)"


def peak_memory_bytes(device: torch.device) -> int:
    """The peak since :func:`peak_memory_start` (see the module docstring for what that is)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
