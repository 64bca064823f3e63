"""The one timer of every benchmark (``leanformer bench``, ``leanformer compare``'s decoding latency).

:func:`time_fn`: ``warmup`` untimed calls, then ``repeats`` timed ones; the median and the inter-quartile
range are reported. On CUDA each call is bracketed by CUDA events after a ``torch.cuda.synchronize()`` (so
the queue is empty when the start event is recorded); on CPU by ``time.perf_counter`` (monotonic).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    """Median and quartiles of the timed repeats, milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
                "iqr_ms": self.iqr_ms, "repeats": self.repeats}


def summarize(times_ms: list[float]) -> Timing:
    """Median and quartiles (``statistics.quantiles``, inclusive method) of a list of milliseconds."""
    if not times_ms:
        raise ValueError("summarize: no timings (repeats must be >= 1)")
    if len(times_ms) == 1:
        t = times_ms[0]
        return Timing(t, t, t, 1)
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return Timing(statistics.median(times_ms), q1, q3, len(times_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on a GPU, ``perf_counter`` on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 10,
            max_seconds: float | None = None, min_repeats: int = 2) -> Timing:
    """Median (and IQR) milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    ``max_seconds`` caps the wall time of the timed calls: once it is spent, timing stops after at
    least ``min_repeats`` calls (long sequences on a slow CPU).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_fn: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        times.append(time_once(fn, device))
        spent = time.perf_counter() - t_start
        if max_seconds is not None and spent > max_seconds and len(times) >= min_repeats:
            break
    return summarize(times)
