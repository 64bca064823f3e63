"""``leanformer finetune``: sequence classification on labelled text with full fine-tuning, LoRA or NOBLE.

One job per module: :mod:`~leanformer.finetune.data` (files, GLUE, labels), :mod:`~leanformer.finetune.models`
(Hugging Face folders, our encoders, tokenizers), :mod:`~leanformer.finetune.methods` (what trains, parameter
budgets), :mod:`~leanformer.finetune.trainer` (the loop), :mod:`~leanformer.finetune.metrics`,
:mod:`~leanformer.finetune.export` (save / load), :mod:`~leanformer.finetune.hf_classifier` (our encoders as
``AutoModelForSequenceClassification``), :mod:`~leanformer.finetune.localtask` (a task made locally),
:mod:`~leanformer.finetune.cli`. docs/finetune.md describes them.
"""

_NAMES = {
    "load_files": "data", "load_glue": "data", "LabelMap": "data", "ClassificationData": "data",
    "load_classifier": "models", "LeanformerClassifier": "models",
    "MethodSpec": "methods", "apply_method": "methods", "planned_trainable": "methods",
    "TrainSettings": "trainer", "finetune": "trainer",
    "save_finetuned": "export", "load_finetuned": "export",
}


def __getattr__(name: str):
    """The main entry points, imported on first use (transformers and peft only when a model needs them)."""
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"leanformer.finetune.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'leanformer.finetune' has no attribute {name!r}")


__all__ = list(_NAMES)
