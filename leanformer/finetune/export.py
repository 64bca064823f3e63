"""Save a fine-tuned model into ``--out`` and load it back (:func:`load_finetuned`).

What ``--out`` holds (``finetune.json`` says which and how to load each; ``labels.json`` the label map):

=================  =========================================================================================
model, method      files
=================  =========================================================================================
Hugging Face,      ``model/``: ``save_pretrained`` + tokenizer; ``AutoModelForSequenceClassification`` loads it
full
Hugging Face,      ``adapter/``: PEFT's ``save_pretrained`` (``adapter_config.json``, ``adapter_model.safetensors``
lora               with the head as ``modules_to_save``) + tokenizer; ``AutoPeftModelForSequenceClassification``
                   or ``PeftModel.from_pretrained(base, "adapter")`` loads it. With ``--merge`` also ``model/``:
                   the adapters merged into the weights (``merge_and_unload``), a plain Hugging Face folder
Hugging Face,      ``model/``: ``config.json`` + tokenizer + ``noble.safetensors`` (every weight, branches included).
noble(_all)        Plain ``transformers`` has no NOBLE layer, so no Auto class can load it (the weights file is
                   deliberately not ``model.safetensors``, which would load without the branches, silently
                   wrong): :func:`load_finetuned` rebuilds it (``from_config`` + ``apply_noble`` + the weights)
ours, any method   ``model/``: a leanformer checkpoint of the encoder (NOBLE branches as ``model.noble`` in its
                   config, so :func:`leanformer.train.checkpoint.load_model` and ``leanformer export`` take it;
                   LoRA merged), ``head.safetensors`` (the classifier); LoRA also ``adapter/`` (PEFT). With
                   ``--export-hf`` also ``hf/``: ``LeanformerForSequenceClassification``, which
                   ``AutoModelForSequenceClassification`` loads (NOBLE included) after
                   ``import leanformer.finetune.hf_classifier`` or with ``trust_remote_code=True``
=================  =========================================================================================
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leanformer.finetune.data import LabelMap
from leanformer.finetune.methods import MethodSpec
from leanformer.finetune.models import (
    Classifier,
    HFSequenceTokenizer,
    LeanformerClassifier,
    LeanformerSequenceTokenizer,
    load_classifier,
)
from leanformer.train.checkpoint import CheckpointError

MANIFEST = "finetune.json"
FORMAT = 1


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.state_dict()`` as its own contiguous CPU tensor (tied ones stored once each)."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.device.type != "meta" else None
        out[k] = v.detach().cpu().clone().contiguous() if key not in seen else out[seen[key]]
        if key is not None:
            seen.setdefault(key, k)
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """safetensors refuses tensors sharing memory: each gets its own copy."""
    save_file({k: v.clone() for k, v in tensors.items()}, str(file))


def _noble_record(model: nn.Module) -> dict[str, Any]:
    record = getattr(model, "noble_injection", None)
    if record is None:
        raise CheckpointError("the model has no NOBLE injection record (apply_noble was not used)")
    return {"replaced": list(record["replaced"]), "settings": dict(record.get("settings", {}))}


def _noble_config(encoder: nn.Module, record: dict[str, Any]):
    """The encoder's config with ``noble`` enabled as injected, or None when the injection is not one that a
    config can express (every block, the same roles and settings, roles among the NOBLE targets)."""
    from leanformer.config import NOBLE_TARGETS, NobleConfig
    from leanformer.inject import layer_index

    cfg = encoder.cfg
    if cfg.noble.enabled:
        return None
    roles = {n.split(".")[-1] for n in record["replaced"]}
    names = {n.removeprefix("encoder.") for n in record["replaced"]}
    expected = {f"blocks.{i}.{'mlp' if r.startswith('ffn') else 'attn'}.{r}"
                for i in range(cfg.n_layers) for r in roles}
    settings = record["settings"]
    if (not roles <= set(NOBLE_TARGETS) or names != expected or any(layer_index(n) is None for n in names)
            or set(settings) - {"rank", "activation", "lr_mults", "fused", "compiled_form"}):
        return None
    noble = NobleConfig(enabled=True, targets=sorted(roles, key=NOBLE_TARGETS.index), rank=settings["rank"],
                        activation=settings["activation"], main_init="model",
                        lr_mults=settings.get("lr_mults", True), fused=settings.get("fused", True),
                        compiled_form=settings.get("compiled_form", "stacked"))
    return dataclasses.replace(cfg, noble=noble).validate()


def save_finetuned(out: str | Path, clf: Classifier, model: nn.Module, spec: MethodSpec, merge: bool = False,
                   export_hf: bool = False, extra: dict[str, Any] | None = None,
                   log=print) -> dict[str, Any]:
    """Write the fine-tuned ``model`` (what :func:`apply_method` returned and training changed) into ``out``
    as the module docstring lays out; returns the manifest. ``merge``: LoRA also merged. ``export_hf``: ask
    for a folder that ``AutoModelForSequenceClassification`` loads; where that cannot be (NOBLE in a Hugging
    Face model) a note says so and the NOBLE files are written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": FORMAT, "kind": clf.kind, "model_type": clf.model_type,
                                "base_model": str(Path(clf.source).resolve()), "method": spec.to_dict(),
                                "labels": clf.labels.to_dict(), "max_len": clf.max_len, "files": {},
                                "hf_loadable": None, **(extra or {})}
    (out / "labels.json").write_text(json.dumps(clf.labels.to_dict(), indent=1))
    files = manifest["files"]
    if spec.method == "lora":
        model.save_pretrained(str(out / "adapter"))
        if clf.kind == "hf":
            clf.tokenizer.save(out / "adapter")
        files["adapter"] = "adapter"
        if merge or clf.kind == "leanformer":  # ours: the encoder checkpoint holds merged weights
            plain = copy.deepcopy(model).merge_and_unload()
            files.update(_save_plain(out, clf, plain))
            files["merged"] = True
    elif spec.method in ("noble", "noble_all"):
        files.update(_save_noble(out, clf, model, log, export_hf))
    else:
        files.update(_save_plain(out, clf, model))
    manifest["hf_loadable"] = clf.kind == "hf" and "model" in files and "noble" not in files
    if export_hf and clf.kind == "leanformer":
        if "head" in files:
            files["hf"] = _export_ours_hf(out, clf, files)
            manifest["hf_loadable"] = True
        else:
            log("note: --export-hf: these NOBLE branches are not ones a leanformer config can express (not the "
                "same roles in every block), so no Hugging Face folder; load with "
                "leanformer.finetune.load_finetuned")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _save_plain(out: Path, clf: Classifier, model: nn.Module) -> dict[str, Any]:
    """A model without NOBLE: a Hugging Face folder, or our encoder checkpoint + head."""
    folder = out / "model"
    if clf.kind == "hf":
        model.save_pretrained(str(folder))
        clf.tokenizer.save(folder)
        return {"model": "model"}
    return _save_ours(out, clf, model, model.encoder.cfg)


def _save_ours(out: Path, clf: Classifier, model: LeanformerClassifier, cfg) -> dict[str, Any]:
    from leanformer.train.checkpoint import save_checkpoint

    encoder = copy.copy(model.encoder)
    encoder.cfg = cfg
    save_checkpoint(out / "model", encoder, tokenizer=clf.tokenizer.tok)
    _save_tensors({f"classifier.{k}": v for k, v in _state(model.classifier).items()}, out / "head.safetensors")
    return {"model": "model", "head": "head.safetensors", "dropout": model.dropout.p}


def _export_ours_hf(out: Path, clf: Classifier, files: dict[str, Any]) -> str:
    """``hf/``: the saved encoder checkpoint + head as ``LeanformerForSequenceClassification``."""
    from leanformer.finetune.hf_classifier import export_hf
    from leanformer.train.checkpoint import load_model

    encoder = load_model(out / files["model"])
    classifier = nn.Linear(encoder.cfg.d_model, clf.labels.num_labels)
    state = load_file(str(out / files["head"]))
    classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()})
    export_hf(encoder, classifier, clf.labels.names, out / "hf", tokenizer=clf.tokenizer.tok,
              dropout=files.get("dropout", 0.1))
    return "hf"


def _save_noble(out: Path, clf: Classifier, model: nn.Module, log, export_hf: bool) -> dict[str, Any]:
    record = _noble_record(model)
    if clf.kind == "leanformer":
        cfg = _noble_config(model.encoder, {**record, "replaced": record["replaced"]})
        if cfg is not None:
            return {**_save_ours(out, clf, model, cfg), "noble_in_config": True}
    folder = out / "model"
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(_state(model), folder / "noble.safetensors")
    (folder / "noble.json").write_text(json.dumps(record, indent=1))
    if clf.kind == "hf":
        model.config.save_pretrained(str(folder))
        clf.tokenizer.save(folder)
        if export_hf:
            log(f"note: --export-hf: a {clf.model_type} model with NOBLE branches cannot be loaded by plain "
                f"transformers (its {type(model).__name__} has no NOBLE layer); wrote config.json + "
                f"noble.safetensors + noble.json to {folder}: load it with "
                "leanformer.finetune.load_finetuned")
    return {"model": "model", "noble": "noble.safetensors"}


# ---------------------------------------------------------------------------- loading
def read_manifest(out: str | Path) -> dict[str, Any]:
    file = Path(out) / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{out} has no {MANIFEST}: not the output of leanformer finetune")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is damaged: {e}") from None


def load_finetuned(out: str | Path, merged: bool | None = None) -> Classifier:
    """The fine-tuned model of a ``leanformer finetune --out`` folder, in eval mode, with its tokenizer and
    labels. LoRA: ``merged=True`` the merged weights (``model/``), ``False`` base + adapter (``adapter/``),
    None the merged weights where they were saved."""
    out = Path(out)
    m = read_manifest(out)
    labels = LabelMap.from_dict(m["labels"])
    files, spec = m["files"], MethodSpec(**m["method"])
    use_adapter = spec.method == "lora" and (merged is False or ("merged" not in files and not merged))
    if merged and "merged" not in files:
        raise CheckpointError(f"{out} holds no merged weights (fine-tune with --merge)")
    if use_adapter:
        from peft import PeftModel

        base = load_classifier(m["base_model"], labels, files.get("dropout", 0.1))
        base.model = PeftModel.from_pretrained(base.model, str(out / "adapter"))
        clf = base
    elif m["kind"] == "hf":
        clf = _load_hf_out(out, m, labels)
    else:
        clf = _load_ours_out(out, m, labels)
    clf.max_len = m.get("max_len", clf.max_len)
    clf.model.eval()
    return clf


def _load_hf_out(out: Path, m: dict[str, Any], labels: LabelMap) -> Classifier:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = out / m["files"]["model"]
    tok = HFSequenceTokenizer(AutoTokenizer.from_pretrained(str(folder)))
    if "noble" in m["files"]:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(folder)))
        _restore_noble(model, folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    return Classifier(model, tok, "hf", m["model_type"], str(folder), labels)


def _restore_noble(model: nn.Module, folder: Path) -> None:
    from leanformer.inject import apply_noble

    record = json.loads((folder / "noble.json").read_text())
    apply_noble(model, target_modules=record["replaced"], preserve_output=True, **record["settings"])
    state = load_file(str(folder / "noble.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / 'noble.safetensors'} does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")


def _load_ours_out(out: Path, m: dict[str, Any], labels: LabelMap) -> Classifier:
    from leanformer.train.checkpoint import load_model, load_tokenizer

    files = m["files"]
    folder = out / files["model"]
    if "noble" in files:  # an injection no config expresses: the base, the same injection, the weights
        clf = load_classifier(m["base_model"], labels, files.get("dropout", 0.1))
        _restore_noble(clf.model, folder)
        return clf
    encoder = load_model(folder)
    model = LeanformerClassifier(encoder, labels.num_labels, files.get("dropout", 0.1))
    state = load_file(str(out / files["head"]))
    model.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()})
    tok = LeanformerSequenceTokenizer(load_tokenizer(folder))
    return Classifier(model, tok, "leanformer", "leanformer", str(folder), labels)
