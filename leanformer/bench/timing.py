"""The one timer, memory meter and results writer that every ``leanformer bench`` command uses.

Timing (:func:`time_fn`): ``warmup`` untimed calls, then ``repeats`` timed ones; the median and the
inter-quartile range are reported. On CUDA each call is bracketed by CUDA events after a
``torch.cuda.synchronize()`` (so the queue is empty when the start event is recorded); on CPU by
``time.perf_counter`` (monotonic).

Memory (:class:`MemoryMeter`): on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``, its
peak statistic reset on entry). On CPU there is no allocator statistic, so the meter returns the bytes
it can *account for*: tensors the caller names (parameters, gradients, optimiser state, caches) plus, when
asked, every tensor autograd saves for the backward pass (unique storages, counted through
``torch.autograd.graph.saved_tensors_hooks``). That is the training peak (it occurs at the end of the
forward pass) less transient temporaries and allocator slack: a lower bound, comparable between arms.

Results (:class:`Report`): one JSON file (rows + metadata), one markdown table (the machine, torch
version, date, load average and the exact command under the table) and one PNG (matplotlib, Agg).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------- timing


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


# ---------------------------------------------------------------------------------------------- memory


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
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
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
    """A row's status for an exception: ``skipped (memory)`` for out-of-memory, else ``failed: ...``."""
    return "skipped (memory)" if is_oom(err) else f"failed: {type(err).__name__}: {err}"[:300]


def release(device: torch.device) -> None:
    """Return cached blocks after an arm so the next one starts from the same state."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- metadata


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; raise ConfigError for an impossible choice."""
    from leanformer.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not valid; choose auto, cpu or cuda")
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_string(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` or ``Intel(R) Xeon(R) ... (2 cores, 2 torch threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_metadata(device: torch.device, command: str) -> dict[str, Any]:
    """Machine, versions, date, load average and the command line of a benchmark run."""
    return {
        "machine": machine_string(device),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "argv": list(sys.argv),
        "load_average_start": load_average(),
    }


def command_line(prog: str, args: Any, skip: tuple[str, ...] = ("func", "command", "bench", "argv")) -> str:
    """The exact effective command: ``prog`` plus every option of the parsed ``args`` (defaults included)."""
    import shlex

    parts = prog.split()
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Column:
    """One markdown column: ``key`` of a row, its header, and how to format it (``None`` → ``—``)."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str


def fmt_float(digits: int = 2) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}"


def fmt_mib(v: float) -> str:
    return f"{v / 2**20:.1f}"


def fmt_pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def fmt_si(v: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.3g}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c.key)
            cells.append("—" if v is None else c.fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Report:
    """A benchmark's results: rows (one dict each), how to tabulate and plot them, and metadata."""

    name: str
    title: str
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    columns: list[Column]
    plot: Callable[[Any, list[dict[str, Any]]], None] | None = None  # draws on a matplotlib Figure
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> None:
        self.meta["load_average_end"] = load_average()

    def to_json(self) -> dict[str, Any]:
        return _finite_or_none({"benchmark": self.name, "title": self.title, "meta": self.meta,
                                "settings": self.settings, "notes": self.notes, "results": self.rows})

    def markdown(self, level: int = 2) -> str:
        m = self.meta
        h = "#" * level
        out = [f"{h} {self.title}", "", markdown_table(self.rows, self.columns), ""]
        out += [f"- {n}" for n in self.notes]
        out += [
            f"- machine: {m.get('machine')}; torch {m.get('torch')}; python {m.get('python')}",
            f"- date: {m.get('date')}; load average (1, 5, 15 min) at start {m.get('load_average_start')}, "
            f"at end {m.get('load_average_end')}",
            f"- command: `{m.get('command')}`",
            "",
        ]
        return "\n".join(out)

    def draw(self, path: Path) -> Path | None:
        if self.plot is None:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(11, 4.5))
        try:
            self.plot(fig, self.rows)
            fig.suptitle(f"{self.title} — {self.meta.get('machine')}", fontsize=9)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        return path

    def write(self, out_dir: str | Path, formats: tuple[str, ...] = ("json", "md", "png")) -> list[Path]:
        """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if "json" in formats:
            p = out / f"{self.name}.json"
            p.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
            written.append(p)
        if "md" in formats:
            p = out / f"{self.name}.md"
            p.write_text(self.markdown(level=1))
            written.append(p)
        if "png" in formats:
            p = self.draw(out / f"{self.name}.png")
            if p is not None:
                written.append(p)
        return written


def series(rows: list[dict], where: dict[str, Any], x: str, y: str) -> tuple[list, list]:
    """Points ``(x, y)``, sorted by x, of the rows matching every ``where`` item and whose y is a number."""
    pts = [(r[x], r[y]) for r in rows
           if all(r.get(k) == v for k, v in where.items()) and isinstance(r.get(y), (int, float))]
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]
