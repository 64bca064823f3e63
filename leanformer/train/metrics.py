"""``metrics.jsonl``: one JSON record per logged step, kept consistent with the checkpoint.

A resumed run first cuts the file back to the checkpoint's step (the steps after it are trained again),
a run started over (``--no-resume``, or no checkpoint) starts a fresh file, and an unreadable line (the torn
last line of a killed run) is dropped with a note instead of blocking the resume.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def read_records(path: str | Path, *, warn: bool = False) -> list[dict[str, Any]]:
    """Every readable record of a ``metrics.jsonl`` (lines that are not a JSON object with a step are skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad += 1
    if bad and warn:
        print(f"note: {path}: dropped {bad} unreadable line(s) (a run killed while writing?)", file=sys.stderr)
    return records


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """One record per step, in step order (the last one written wins where a step appears twice: the
    files of runs resumed before :func:`restart_at` cut them back)."""
    by_step = {r["step"]: r for r in read_records(path)}
    return [by_step[s] for s in sorted(by_step)]


def rewrite(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` by ``records`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restart_at(path: str | Path, step: int) -> list[dict[str, Any]]:
    """Cut ``metrics.jsonl`` back to the records of steps ``<= step`` (none when ``step`` is 0: a fresh
    start) and return them; the file is left absent when nothing is kept."""
    path = Path(path)
    kept = [r for r in read_records(path, warn=True) if r["step"] <= step] if step > 0 else []
    if kept:
        rewrite(path, kept)
    elif path.exists():
        path.unlink()
    return kept


def append(path: str | Path, record: dict[str, Any]) -> None:
    """Add one record as one line (a single write, so a kill tears at most this line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def sync(path: str | Path) -> None:
    """Fsync ``path`` (before a checkpoint is written, so that no record up to its step can be lost)."""
    path = Path(path)
    if path.exists():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
