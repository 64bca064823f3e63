"""Checkpoints: a folder with ``model.safetensors``, ``config.json`` and ``trainer.pt``.

``model.safetensors`` holds the weights (tied tensors saved once), ``config.json`` the full run config,
``trainer.pt`` the optimizer, step, RNG states and data-sampler position. A save writes a temporary
folder and renames it over the old one, so a kill during a save never leaves a broken checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leanformer.config import RunConfig, TransformerConfig, from_dict, to_dict


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt, or does not fit the model."""


def save_checkpoint(path: str | Path, model: nn.Module, run_cfg: RunConfig | None = None,
                    trainer_state: dict[str, Any] | None = None, tokenizer=None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint folder ``path`` atomically (temporary folder, then rename).

    ``weights`` defaults to ``model.state_dict()`` (pass the gathered full state under FSDP2).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = dict(model.state_dict() if weights is None else weights)
    if getattr(model.cfg, "tie_embeddings", False):
        weights.pop("lm_head.weight", None)  # the same tensor as wte.weight
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    cfg = {"model": to_dict(model.cfg)}
    if run_cfg is not None:
        cfg = to_dict(run_cfg)
        cfg["model"] = to_dict(model.cfg)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}/config.json is corrupt: {e}") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` in a checkpoint folder, on the CPU."""
    file = Path(path) / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"checkpoint {path} has no model.safetensors")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model``; any missing, unexpected or mis-shaped tensor is an error."""
    file = Path(path) / "model.safetensors"
    state = read_weights(path)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(f"{file}: '{key}' has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(own[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "wte.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) \
        else set()
    if tied & set(state):  # safetensors stores one name of a shared tensor; either one fills both
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A :class:`TransformerLM` rebuilt from a checkpoint folder's config and weights."""
    from leanformer.model import TransformerLM

    cfg = from_dict(TransformerConfig, read_config(path)["model"], prefix="model.")
    model = TransformerLM(cfg).to(device)
    load_weights(path, model)
    return model


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` and return the trainer state (empty if the folder has none)."""
    load_weights(path, model)
    return read_trainer_state(path)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint folder (optimizer, step, RNG, sampler), or ``{}``."""
    state_file = Path(path) / "trainer.pt"
    if not state_file.exists():
        return {}
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged pickle/zip
        raise CheckpointError(f"{state_file} is corrupt: {e}") from None


def run_config_of(path: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored with a checkpoint."""
    return from_dict(RunConfig, read_config(path))
