"""Our encoder classifier as a Hugging Face ``AutoModelForSequenceClassification``.

``LeanformerForSequenceClassification`` holds a :class:`TransformerLM` as ``self.model`` (NOBLE branches
included when its config has them) and the head of :class:`~leanformer.finetune.models.LeanformerClassifier`:
``logits = W_c · mean_{mask = 1} features(idx) + b_c``. Importing this module registers it for
``model_type="leanformer"``; :func:`export_hf` writes a folder that
``AutoModelForSequenceClassification.from_pretrained`` loads (after ``import leanformer.finetune.hf_classifier``,
or with ``trust_remote_code=True`` where leanformer is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from leanformer.hf.modeling import LeanformerConfig, LeanformerPreTrainedModel, _build
from leanformer.model import TransformerLM


class LeanformerForSequenceClassification(LeanformerPreTrainedModel):
    """``input_ids (B, T)``, ``attention_mask (B, T)`` → ``logits (B, num_labels)`` (and the cross-entropy
    with ``labels``). The encoder must have ``features(idx, attention_mask)``."""

    _tied_weights_keys = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: LeanformerConfig, model: TransformerLM | None = None,
                 classifier: nn.Linear | None = None):
        super().__init__(config)
        self.model = model if model is not None else _build(config.transformer_config())
        d = self.model.cfg.d_model
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.1)
        self.classifier = nn.Linear(d, config.num_labels)
        if next(self.model.parameters()).device.type != "meta":
            for m in self.model.modules():  # TransformerLM initialised itself (see LeanformerForCausalLM)
                if not any(n in m._non_persistent_buffers_set for n, _ in m.named_buffers(recurse=False)):
                    m._is_hf_initialized = True
        self.post_init()
        if classifier is not None:  # after post_init, which initialises the head
            self.classifier.load_state_dict(classifier.state_dict())

    def get_input_embeddings(self) -> nn.Module:
        return self.model.wte

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        from leanformer.finetune.models import mean_pool

        if input_ids is None:
            raise ValueError("LeanformerForSequenceClassification needs input_ids")
        h = self.model.features(input_ids, attention_mask=attention_mask)
        logits = self.classifier(self.dropout(mean_pool(h, attention_mask)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoModelForSequenceClassification.register(LeanformerConfig, LeanformerForSequenceClassification,
                                            exist_ok=True)

_REMOTE_CODE = '''"""Lets `trust_remote_code=True` loaders find leanformer's classes (leanformer must be installed)."""
from leanformer.finetune.hf_classifier import LeanformerForSequenceClassification  # noqa: F401
from leanformer.hf.modeling import LeanformerConfig, LeanformerForCausalLM  # noqa: F401
'''


def export_hf(encoder: TransformerLM, classifier: nn.Linear, names: list[str], out: str | Path,
              tokenizer: Any = None, dropout: float = 0.1) -> Path:
    """Write ``encoder`` + ``classifier`` as a folder that ``AutoModelForSequenceClassification`` loads."""
    from leanformer.hf.exporter import _save_tokenizer

    out = Path(out)
    config = LeanformerConfig.from_transformer_config(encoder.cfg, num_labels=len(names),
                                                      id2label=dict(enumerate(names)),
                                                      label2id={n: i for i, n in enumerate(names)},
                                                      classifier_dropout=dropout)
    model = LeanformerForSequenceClassification(config, model=encoder, classifier=classifier)
    eot = _save_tokenizer(tokenizer, out)
    if eot is not None:
        config.pad_token_id = config.eos_token_id = tokenizer.eot_id
    model.save_pretrained(str(out))
    (out / "modeling_leanformer.py").write_text(_REMOTE_CODE)
    file = out / "config.json"
    cfg = json.loads(file.read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_leanformer.LeanformerConfig",
                       "AutoModelForCausalLM": "modeling_leanformer.LeanformerForCausalLM",
                       "AutoModelForSequenceClassification": "modeling_leanformer.LeanformerForSequenceClassification"}
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
