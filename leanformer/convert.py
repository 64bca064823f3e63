"""Turn a trained softmax :class:`TransformerLM` into a DiJiang one (Chen et al. 2024, section 4).

The paper's recipe: keep every weight of the parent (embeddings, Q/K/V/O, MLPs, norms), add the new
DiJiang parameters (gate W_G, per-head GroupNorm, feature weights D, optionally the decay), then
fine-tune with the LM loss on a small fraction of the parent's tokens.
"""

from __future__ import annotations

import copy
import dataclasses

from leanformer import registry
from leanformer.config import ConfigError, DiJiangConfig
from leanformer.model import TransformerLM


def _new_attention_keys(model: TransformerLM) -> set[str]:
    """State-dict keys the model's attention type adds to softmax attention's: everything in its attention
    layers outside the sub-modules its spec lists as ``from_softmax`` (q, k, v, o for DiJiang)."""
    spec = registry.attention_spec(model.cfg.attention)
    layer_cls = registry.load_layer(spec)
    keys = set()
    for name, module in model.named_modules():
        if type(module) is not layer_cls:
            continue
        for key in module.state_dict():
            if key.split(".", 1)[0] not in spec.from_softmax:
                keys.add(f"{name}.{key}")
    return keys


def convert_to_dijiang(model: TransformerLM, feature_map: str = "paper", **dijiang_overrides) -> TransformerLM:
    """A new ``attention="dijiang"`` model that inherits every weight of ``model`` bit-for-bit.

    ``feature_map``: ``paper`` or ``official``; ``dijiang_overrides``: any other :class:`DiJiangConfig`
    field (``feature_dim``, ``learnable_decay``, ``mode``, ``chunk_size``, ``parallel_max_len``, ``fused_max_len``).
    New parameters keep their initialisation. The parent is not modified.
    """
    cfg = copy.deepcopy(model.cfg)
    if cfg.attention != "softmax":
        raise ConfigError(f"convert_to_dijiang needs a softmax-attention model, got attention={cfg.attention!r}")
    fields = {f.name for f in dataclasses.fields(DiJiangConfig)}
    bad = sorted(set(dijiang_overrides) - fields)
    if bad:
        raise ConfigError(f"unknown dijiang option(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
    cfg.attention = "dijiang"
    cfg.dijiang = dataclasses.replace(cfg.dijiang, feature_map=feature_map, **dijiang_overrides)
    cfg.validate()

    param = next(model.parameters())
    new = TransformerLM(cfg).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    allowed = _new_attention_keys(new)
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"conversion does not fit: unexpected {sorted(unexpected)[:5]}, "
                           f"missing inherited {sorted(set(missing) - allowed)[:5]}")
    new.train(model.training)
    return new
