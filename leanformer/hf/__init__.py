"""Hugging Face interop: import GPT-2 / GPT-NeoX / Llama models, export ours as an Auto-registered model.

``from_hf(model_or_folder)`` → :class:`~leanformer.model.TransformerLM`; ``to_hf(model, out_dir)`` →
a folder that ``AutoModelForCausalLM.from_pretrained`` loads.

``import leanformer.hf`` is cheap: transformers is imported on first use of a name from here. Using any
of them (or ``import leanformer.hf.modeling``) registers ``model_type="leanformer"`` with
``AutoConfig`` / ``AutoModelForCausalLM``; :func:`register` does only that.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "to_hf": "leanformer.hf.exporter",
    "SUPPORTED": "leanformer.hf.importer",
    "UnsupportedModelError": "leanformer.hf.importer",
    "from_hf": "leanformer.hf.importer",
    "LeanformerCache": "leanformer.hf.modeling",
    "LeanformerConfig": "leanformer.hf.modeling",
    "LeanformerForCausalLM": "leanformer.hf.modeling",
}


def register() -> None:
    """Register ``model_type="leanformer"`` with transformers' Auto classes (idempotent)."""
    importlib.import_module("leanformer.hf.modeling")


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'leanformer.hf' has no attribute {name!r}")
    register()  # whatever is used first, AutoModelForCausalLM knows our model type from then on
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


__all__ = ["SUPPORTED", "LeanformerCache", "LeanformerConfig", "LeanformerForCausalLM", "UnsupportedModelError",
           "from_hf", "register", "to_hf"]
