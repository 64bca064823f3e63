"""The one machine description of every measurement: the device's name, versions, date, load average and
the exact command (``leanformer bench`` reports, ``leanformer compare``'s ``done.json``, the GPU scripts)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


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
