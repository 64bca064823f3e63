"""Where a new attention type or block type is added: one line each.

Entries are ``"module:Class"`` strings imported on first use, so a method's module (and its optional
dependencies) is only loaded when a config asks for it.

Contracts (shapes: B batch, T new tokens, C = d_model):

* attention ``Class(cfg: TransformerConfig, layer_idx: int)``;
  ``forward(x: (B, T, C), state: dict | None) -> (B, T, C)``. ``state`` is this layer's decoding
  cache, mutated in place; ``state.get("pos", 0)`` tokens were seen before ``x``. ``None`` = no cache.
* block ``Class(cfg: TransformerConfig, layer_idx: int)``; ``forward(x: (B, T, C), state) -> (B, T, C)``.
"""

from __future__ import annotations

import importlib

import torch.nn as nn

ATTENTIONS = {
    "softmax": "leanformer.layers.attention:SoftmaxAttention",
    "shaped": "leanformer.layers.shaped:ShapedAttention",
    "dijiang": "leanformer.layers.dijiang:DiJiangAttention",
}

BLOCKS = {
    "preln": "leanformer.blocks.standard:PreLNBlock",
    "parallel": "leanformer.blocks.standard:ParallelBlock",
    "neox_parallel": "leanformer.blocks.standard:NeoXParallelBlock",
    "sas": "leanformer.blocks.simplified:SASBlock",
    "sas_p": "leanformer.blocks.simplified:SASPBlock",
    "vskipinit": "leanformer.blocks.simplified:VSkipInitBlock",
}


def _load(table: dict[str, str], name: str, kind: str) -> type:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(table)}")
    module, cls = table[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_attention(cfg, layer_idx: int) -> nn.Module:
    return _load(ATTENTIONS, cfg.attention, "attention")(cfg, layer_idx)


def build_block(cfg, layer_idx: int) -> nn.Module:
    return _load(BLOCKS, cfg.block, "block")(cfg, layer_idx)
