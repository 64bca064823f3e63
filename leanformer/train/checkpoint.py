"""Checkpoints: a folder with ``model.safetensors``, ``config.json``, ``trainer.pt`` and ``manifest.json``.

``model.safetensors`` holds the weights (tied tensors saved once), ``config.json`` the full run config,
``trainer.pt`` the optimizer, step, RNG states and data-sampler position, ``tokenizer.json`` the tokenizer
the model was trained with, and ``manifest.json`` (written last) the size and SHA-256 of every other file.

Saving ``C`` (every file and folder fsynced, so this holds after a power loss too):

1. write ``C.tmp`` completely, ``manifest.json`` last (a folder without it is incomplete);
2. rename ``C`` → ``C.old``, then ``C.tmp`` → ``C``, then delete ``C.old``.

A kill at any moment leaves at least one complete folder among ``C`` and its ``.tmp``/``.old`` siblings;
:func:`latest_checkpoint` finds the newest, and :func:`recover_checkpoint` (run before every save) moves
it back to ``C`` and deletes the rest, so a save never deletes the only good copy. Every read checks the
file against the manifest's SHA-256: a damaged file is a one-line :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leanformer.config import ConfigError, RunConfig, TransformerConfig, from_dict, to_dict

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt, or does not fit the model."""


# ---------------------------------------------------------------------------- durable file operations
def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in folder ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    fsync_dir(dst.parent)


def _remove(path: Path) -> None:
    """Delete folder ``path``: renamed to ``*.deleting`` first, so a half-deleted folder is never a candidate."""
    if path.exists():
        doomed = path.with_name(path.name + ".deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(path.parent)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- saving
def save_checkpoint(path: str | Path, model: nn.Module, run_cfg: RunConfig | None = None,
                    trainer_state: dict[str, Any] | None = None, tokenizer=None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint folder ``path`` atomically and durably (see the module docstring).

    ``weights`` defaults to ``model.state_dict()`` (pass the gathered full state under FSDP2).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(path)
    tmp, old = _sibling(path, "tmp"), _sibling(path, "old")
    _remove(tmp)
    tmp.mkdir()
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
    step = trainer_state.get("step") if trainer_state else None
    _write_manifest(tmp, step)
    if path.exists():
        _rename(path, old)
    _rename(tmp, path)
    _remove(old)
    return path


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.{kind}")


def _write_manifest(folder: Path, step: int | None) -> None:
    """Fsync every file of ``folder``, then write ``manifest.json`` (sizes and SHA-256s) and fsync it too."""
    files = {}
    for f in sorted(folder.iterdir()):
        if f.name == MANIFEST or not f.is_file():
            continue
        fsync_file(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_of(f)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    with open(folder / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


# ---------------------------------------------------------------------------- finding the newest
def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """``manifest.json`` of a checkpoint folder, or None for a folder written before manifests existed."""
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is damaged ({e}); restore it or delete the checkpoint") from None


def is_complete(path: str | Path) -> bool:
    """Whether a checkpoint folder holds every file its manifest lists, at the listed sizes (no hashing).

    A ``.tmp`` folder needs its manifest; the main and ``.old`` folders of the format before manifests
    (only ever created by a rename of a finished folder) count as complete when they hold weights and config.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False
    if manifest is None:
        return not path.name.endswith(".tmp") and (path / "model.safetensors").is_file() \
            and (path / "config.json").is_file()
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != entry.get("bytes"):
            return False
    return True


def _step_of(path: Path) -> int:
    manifest = read_manifest(path)
    step = manifest.get("step") if manifest else None
    if step is None:  # a legacy folder: the step is in trainer.pt
        try:
            step = read_trainer_state(path).get("step", -1)
        except CheckpointError:
            step = -1
    return int(step)


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete folder among ``path`` and its ``.tmp``, ``.old`` and ``.stale`` siblings (None if none)."""
    path = Path(path)
    names = (path, _sibling(path, "tmp"), _sibling(path, "old"), _sibling(path, "stale"))
    candidates = [p for p in names if is_complete(p)]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_step_of(p), p == path))  # the main folder wins a tie


def recover_checkpoint(path: str | Path) -> Path | None:
    """Leave only the newest complete checkpoint, under the name ``path``; returns it (None if none).

    Repairs what a kill during a save left behind; never deletes the only complete copy.
    """
    path = Path(path)
    best = latest_checkpoint(path)
    if best is not None and best != path:
        if path.exists():  # older than best (or incomplete): move it aside, never delete it before the rename
            aside = _sibling(path, "stale")
            _remove(aside)
            _rename(path, aside)
        _rename(best, path)
    for kind in ("tmp", "old", "stale"):
        _remove(_sibling(path, kind))
    for doomed in path.parent.glob(f"{path.name}.*.deleting"):
        shutil.rmtree(doomed, ignore_errors=True)
    return path if best is not None else None


# ---------------------------------------------------------------------------- reading
def verified(path: str | Path, name: str) -> Path:
    """``path/name`` after checking its SHA-256 against the manifest (files the manifest lacks pass)."""
    folder = Path(path)
    file = folder / name
    manifest = read_manifest(folder)
    entry = manifest["files"].get(name) if manifest else None
    if entry is not None and file.is_file():
        size = file.stat().st_size
        fix = f"restore it or delete the checkpoint (edited on purpose? then delete {MANIFEST})"
        if size != entry.get("bytes"):
            raise CheckpointError(f"{file} is damaged: {size} bytes where {MANIFEST} records "
                                  f"{entry.get('bytes')} (truncated?); {fix}")
        if sha256_of(file) != entry.get("sha256"):
            raise CheckpointError(f"{file} is damaged: its SHA-256 differs from the one in {MANIFEST}; {fix}")
    return file


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as a dict (checked against the manifest)."""
    path = Path(path)
    if not path.is_dir():
        hint = ""
        if is_complete(_sibling(path, "old")) or is_complete(_sibling(path, "tmp")):
            hint = " (a save was interrupted: re-run the training command to resume, which repairs it)"
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder{hint}")
    if not (path / "config.json").exists():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        cfg = json.loads(verified(path, "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}/config.json is corrupt: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        hf = isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg)
        what = ("a Hugging Face model folder; `leanformer import` it first" if hf
                else "not a leanformer checkpoint (its config.json has no 'model' section)")
        raise CheckpointError(f"{path} is {what}")
    return cfg


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` in a checkpoint folder, on the CPU (checked against the manifest)."""
    file = Path(path) / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"checkpoint {path} has no model.safetensors")
    verified(path, "model.safetensors")
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


def model_config_of(path: str | Path) -> TransformerConfig:
    """The validated :class:`TransformerConfig` of a checkpoint (a bad value names the file)."""
    try:
        return from_dict(TransformerConfig, read_config(path)["model"], prefix="model.").validate()
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A :class:`TransformerLM` rebuilt from a checkpoint folder's config and weights."""
    from leanformer.model import TransformerLM

    model = TransformerLM(model_config_of(path)).to(device)
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
    verified(path, "trainer.pt")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged pickle/zip
        raise CheckpointError(f"{state_file} is corrupt: {e}") from None


def load_tokenizer(path: str | Path):
    """The checkpoint's ``tokenizer.json`` as a :class:`~leanformer.data.Tokenizer`, or None if it has none."""
    from leanformer.data import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.exists():
        return None
    return Tokenizer.load(verified(path, "tokenizer.json"))


def run_config_of(path: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored with a checkpoint (a bad value names the file)."""
    try:
        return from_dict(RunConfig, read_config(path))
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None
