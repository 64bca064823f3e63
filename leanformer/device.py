"""The one device resolver: ``auto`` (CUDA when available), ``cpu`` or ``cuda``, for training and benchmarks."""

from __future__ import annotations

import torch

from leanformer.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """The :class:`torch.device` that ``name`` (auto, cpu, cuda or cuda:N) means here; ``option`` is how
    the caller's user spelt the setting (``train.device``, ``--device``), for the :class:`ConfigError` of
    an impossible choice."""
    index = name.partition(":")[2]
    if name not in DEVICES and not (name.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"{option} {name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but no CUDA device is available; use {option}=cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{option}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)
