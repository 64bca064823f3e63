"""The one device resolver: ``auto`` (CUDA when available), ``cpu`` or ``cuda``, for training and benchmarks."""

from __future__ import annotations

import torch

from leanformer.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """The :class:`torch.device` that ``name`` means here; ``option`` is how the caller's user spelt the
    setting (``train.device``, ``--device``), for the :class:`ConfigError` of an impossible choice."""
    if name not in DEVICES:
        raise ConfigError(f"{option} {name!r} is not valid; choose auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but no CUDA device is available; use {option}=cpu or auto")
    return torch.device(name)
