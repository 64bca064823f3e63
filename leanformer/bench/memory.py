"""Memory of benchmarks and training runs, and what to do when it runs out.

:class:`MemoryMeter` (benchmarks): on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``, its
peak statistic reset on entry). On CPU there is no allocator statistic, so the meter returns the bytes it
can *account for*: tensors the caller names (parameters, gradients, optimiser state, caches) plus, when
asked, every tensor autograd saves for the backward pass (unique storages, counted through
``torch.autograd.graph.saved_tensors_hooks``). That is the training peak (it occurs at the end of the
forward pass) less transient temporaries and allocator slack: a lower bound, comparable between arms.

:func:`peak_memory_start` / :func:`peak_memory_bytes` (a whole training run, ``leanformer compare``): on
CUDA the allocator's peak, on CPU the process's peak resident set (``VmHWM``, reset per run through
``/proc/self/clear_refs`` where Linux allows it, else ``getrusage``'s lifetime peak).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages among ``tensors`` (non-tensors and ``None`` are skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class MemoryMeter:
    """Peak memory of the code inside ``with``: CUDA allocator peak, or accounted tensor bytes on CPU.

    CUDA: ``peak_bytes`` = ``max_memory_allocated`` during the block, ``base_bytes`` = allocated on
    entry. CPU: ``peak_bytes`` = bytes of the tensors given to :meth:`account` (distinct storages) plus
    those autograd saved inside the block when ``saved_tensors=True`` (excluding storages already
    accounted, e.g. parameters saved for backward). ``kind`` says which: ``"cuda_max_allocated"`` or
    ``"accounted"``.
    """

    def __init__(self, device: torch.device, saved_tensors: bool = False):
        self.device = device
        self.saved_tensors = saved_tensors
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "accounted"
        self.base_bytes = 0
        self.peak_bytes = 0
        self._accounted: dict[int, int] = {}
        self._saved: dict[int, int] = {}
        self._hooks = None

    def account(self, tensors: Iterable[Any]) -> None:
        """Add named tensors (CPU accounting; ignored on CUDA, where the allocator sees everything)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self._accounted[s.data_ptr()] = s.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            self._saved[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses, fakes)
            pass
        return t

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        elif self.saved_tensors:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        self.base_bytes = sum(self._accounted.values())
        saved = sum(b for p, b in self._saved.items() if p not in self._accounted)
        self.peak_bytes = self.base_bytes + saved

    @property
    def extra_bytes(self) -> int:
        """Peak above what was allocated (CUDA) or accounted (CPU) on entry."""
        return self.peak_bytes - self.base_bytes


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device (``mem_get_info``), or ``MemAvailable`` on Linux; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def _proc_bytes(file: str, key: str) -> int | None:
    """The ``key: N kB`` line of a Linux ``/proc`` file, in bytes; None where there is none."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error (CUDA OOM, or a CPU allocation failure)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and ("out of memory" in text
                                                              or "can't allocate memory" in text
                                                              or isinstance(err, MemoryError))


def failure_status(err: BaseException) -> str:
    """A row's status for an exception: ``skipped (memory)`` for out-of-memory, else ``failed: ...`` on one
    line, with no '|' (CUDA's messages run over several lines; either would break a markdown table row)."""
    if is_oom(err):
        return "skipped (memory)"
    return " ".join(f"failed: {type(err).__name__}: {err}".replace("|", "/").split())[:300]


def release(device: torch.device) -> None:
    """Return cached blocks after an arm so the next one starts from the same state."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- a whole run
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
    peak = _proc_bytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
