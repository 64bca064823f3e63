"""Decoding cost of a trained model: greedy ms/token with the cache, memory, and a greedy sample.

Latency (batch 1): a random prompt of ``L`` tokens fills the cache (not timed), then each decoding
step ``model(next_token, cache)`` + argmax is timed (:func:`leanformer.bench.timing.time_once`) after
``warmup`` untimed steps; the median is reported. On CUDA the step is the static decoder's CUDA graph
(:mod:`leanformer.decoding`, as ``generate`` decodes there). On CPU decoding runs on one thread (batch-1
decoding of a small model gains little from more, and a busy machine makes multi-threaded timings erratic).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed decode at that context; everywhere
the bytes of the decoding cache (``DecodeCache.memory_bytes``: K/V grow with ``L``, DiJiang's recurrent
state does not).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from leanformer.bench.timing import summarize, time_once
from leanformer.model import TransformerLM


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
        latency = _graph_latency if device.type == "cuda" else _eager_latency
        out[str(L)] = latency(model, prompt, n_tokens, warmup)
    return out


def _eager_latency(model: TransformerLM, prompt: torch.Tensor, n_tokens: int, warmup: int) -> dict[str, float]:
    """Batch-1 ms/token of ``model(next_token, cache)`` + argmax after the prompt, and the cache's bytes."""
    cache = model.new_cache()
    nxt = model(prompt, cache=cache)[0][:, -1].argmax(-1, keepdim=True)

    def step() -> None:
        nonlocal nxt
        nxt = model(nxt, cache=cache)[0][:, -1].argmax(-1, keepdim=True)

    for _ in range(warmup):
        step()
    times = [time_once(step, prompt.device) for _ in range(n_tokens)]
    return {"ms_per_token": summarize(times).median_ms, "cache_bytes": cache.memory_bytes()}


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
    times = [time_once(dec.step, device) for _ in range(n_tokens)]
    return {"ms_per_token": summarize(times).median_ms, "cache_bytes": dec.cache.memory_bytes(),
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
