"""The results writer of every ``leanformer bench`` command: one JSON file (rows + metadata), one markdown
table (the machine, torch version, date, load average and the exact command under the table) and one PNG
(matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanformer.bench.machine import load_average


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


def finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
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
        return finite_or_none({"benchmark": self.name, "title": self.title, "meta": self.meta,
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


_PARTIAL_DIR: ContextVar[Path | None] = ContextVar("leanformer_bench_partial_dir", default=None)


class RowLog(list):
    """A running benchmark's rows: a list whose ``append`` also writes the row as one JSON line to ``path``
    (when there is one), so that a run stopped before its end (a timeout, Ctrl-C) keeps what it measured."""

    def __init__(self, path: Path | None = None):
        super().__init__()
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(finite_or_none(row), default=str) + "\n")


def partial_path(out_dir: str | Path, name: str) -> Path:
    """Where a running benchmark ``name`` writing into ``out_dir`` logs its rows: ``<name>.partial.jsonl``."""
    return Path(out_dir) / f"{name}.partial.jsonl"


def partial_rows(name: str) -> RowLog:
    """The rows list a benchmark ``name`` fills: logged to :func:`partial_path` while a CLI run writes into an
    output folder (:func:`logging_rows_into`), a plain list otherwise. Starts a fresh log."""
    out = _PARTIAL_DIR.get()
    if out is None:
        return RowLog()
    path = partial_path(out, name)
    path.unlink(missing_ok=True)
    return RowLog(path)


@contextmanager
def logging_rows_into(out_dir: str | Path) -> Iterator[None]:
    """Within this block, :func:`partial_rows` logs each row under ``out_dir`` as it is measured."""
    token = _PARTIAL_DIR.set(Path(out_dir))
    try:
        yield
    finally:
        _PARTIAL_DIR.reset(token)


def series(rows: list[dict], where: dict[str, Any], x: str, y: str) -> tuple[list, list]:
    """Points ``(x, y)``, sorted by x, of the rows matching every ``where`` item and whose y is a number."""
    pts = [(r[x], r[y]) for r in rows
           if all(r.get(k) == v for k, v in where.items()) and isinstance(r.get(y), (int, float))]
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]
