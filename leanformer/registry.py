"""The one place an attention type or a block type is added: a spec, registered under a name.

A spec names the layer class (a ``"module:Class"`` string imported on first use, so a method's module and
its optional dependencies load only when a config asks for it, or the class itself) and says what the rest
of the library needs to know about it without importing it: config validation, FLOP accounting
(:meth:`TransformerLM.flops_per_token`), the size of the decoding state
(:meth:`TransformerLM.decode_state_bytes`) and which parameters a conversion from softmax attention
inherits (:func:`leanformer.convert.convert_to_dijiang`). A new attention type is one file holding the
layer plus one :func:`register_attention` call (tests/test_registry.py does it for a toy attention).

Contracts (shapes: B batch, T new tokens, C = d_model):

* attention ``Class(cfg: TransformerConfig, layer_idx: int)``;
  ``forward(x: (B, T, C), state: dict | None) -> (B, T, C)``. ``state`` is this layer's decoding
  cache, mutated in place; ``state.get("pos", 0)`` tokens were seen before ``x``. ``None`` = no cache.
  A layer that takes padding also accepts ``attention_mask`` ((B, T), 1 = token, 0 = padding: padded keys
  get no weight); it is passed only when a caller gives one (:func:`mask_kwargs`). ``cfg.causal`` is
  false for an encoder, which only a spec with ``bidirectional=True`` can be.
  Optimizer settings other than the defaults are declared by the layer's modules (``optim_settings()``,
  see :mod:`leanformer.train.optim`); initialisation after the model's generic one by ``post_init()``.
* block ``Class(cfg: TransformerConfig, layer_idx: int)``; ``forward(x: (B, T, C), state) -> (B, T, C)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where bytes are counted: config validation does not need it
    import torch
    import torch.nn as nn


def _bytes(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _accumulator_bytes(dtype: torch.dtype) -> int:
    """Element size of a running sum or state kept in at least float32."""
    import torch

    return _bytes(torch.promote_types(dtype, torch.float32))


@dataclass(frozen=True)
class AttentionSpec:
    """What the model needs from an attention type.

    layer: ``"module:Class"`` or the class.
    flops_per_token: ``(cfg, seq_len) -> float``, training FLOPs (forward + backward) per token and per
        layer of the token mixing itself, beyond the 6·N of its parameters' matrix products.
    state_bytes_per_token: ``(cfg, dtype) -> int``, decoding-state bytes per layer, per sequence, that grow
        with each token of context (a KV cache); 0 for a recurrent state.
    state_bytes_per_sequence: ``(cfg, dtype) -> int``, decoding-state bytes per layer and sequence that do
        not grow with the context (a recurrent state, a running sum).
    from_softmax: names of the layer's sub-modules that have the names and shapes of softmax attention's, so
        that a conversion from softmax inherits them (every other parameter of the layer is new); ``()``
        if the type cannot be converted to.
    bidirectional: whether the layer has a bidirectional (encoder, ``model.causal: false``) form.
    """

    layer: str | type
    flops_per_token: Callable[[Any, int], float]
    state_bytes_per_token: Callable[[Any, torch.dtype], int]
    state_bytes_per_sequence: Callable[[Any, torch.dtype], int] = lambda cfg, dtype: 0
    from_softmax: tuple[str, ...] = ()
    bidirectional: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """A block wiring: ``layer`` (``"module:Class"`` or the class) and the attention types it can hold
    (``None``: any)."""

    layer: str | type
    attentions: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------- the built-in attentions
def _quadratic_flops(cfg, seq_len: int) -> float:
    """QKᵀ and (A)V: 2·2·C·T multiply-adds forward per token, ×3 with the backward pass (PaLM, app. B)."""
    return 12 * cfg.d_model * seq_len


def _dijiang_flops(cfg, seq_len: int) -> float:
    """State update φ(k)ᵀv and read-out φ(q)S: 2·2·H·m·d forward per token, ×3 with the backward pass."""
    m = cfg.dijiang.feature_dim or cfg.head_dim
    return 12 * cfg.n_heads * m * cfg.head_dim


def _kv_bytes(cfg, dtype: torch.dtype) -> int:
    """K and V of the kv heads."""
    return 2 * cfg.kv_heads * cfg.head_dim * _bytes(dtype)


def _shaped_bytes(cfg, dtype: torch.dtype) -> int:
    """K of the kv heads, V of all heads (values are the input, not a grouped projection)."""
    return (cfg.kv_heads + cfg.n_heads) * cfg.head_dim * _bytes(dtype)


def _shaped_running_sum(cfg, dtype: torch.dtype) -> int:
    """The centring's running sum of V, (H, d) in at least float32."""
    return cfg.n_heads * cfg.head_dim * _accumulator_bytes(dtype)


def _dijiang_state(cfg, dtype: torch.dtype) -> int:
    """S (H, m, d) and, with the paper's feature map, the keys' log-normaliser n (H,), in at least float32."""
    m = cfg.dijiang.feature_dim or cfg.head_dim
    n = cfg.n_heads if cfg.dijiang.feature_map == "paper" else 0
    return (cfg.n_heads * m * cfg.head_dim + n) * _accumulator_bytes(dtype)


_QKVO = ("q", "k", "v", "o")

ATTENTIONS: dict[str, AttentionSpec] = {
    "softmax": AttentionSpec("leanformer.layers.attention:SoftmaxAttention", _quadratic_flops, _kv_bytes,
                             from_softmax=_QKVO, bidirectional=True),
    "shaped": AttentionSpec("leanformer.layers.shaped:ShapedAttention", _quadratic_flops, _shaped_bytes,
                            _shaped_running_sum, bidirectional=True),
    # causal only: the decay γ^(i−j) and the keys' running log-normaliser are defined for j ≤ i
    "dijiang": AttentionSpec("leanformer.layers.dijiang:DiJiangAttention", _dijiang_flops,
                             lambda cfg, dtype: 0, _dijiang_state, from_softmax=_QKVO),
}

BLOCKS: dict[str, BlockSpec] = {
    "preln": BlockSpec("leanformer.blocks.standard:PreLNBlock"),
    "parallel": BlockSpec("leanformer.blocks.standard:ParallelBlock"),
    "neox_parallel": BlockSpec("leanformer.blocks.standard:NeoXParallelBlock"),
    # no value/output projection: the values are the input itself, which only shaped attention provides
    "sas": BlockSpec("leanformer.blocks.simplified:SASBlock", attentions=("shaped",)),
    "sas_p": BlockSpec("leanformer.blocks.simplified:SASPBlock", attentions=("shaped",)),
    "vskipinit": BlockSpec("leanformer.blocks.simplified:VSkipInitBlock", attentions=("softmax", "shaped")),
}


# ---------------------------------------------------------------------------- registration and lookup
def register_attention(name: str, spec: AttentionSpec, replace: bool = False) -> None:
    """Make ``model.attention: name`` valid and buildable."""
    _register(ATTENTIONS, name, spec, AttentionSpec, "attention", replace)


def register_block(name: str, spec: BlockSpec, replace: bool = False) -> None:
    """Make ``model.block: name`` valid and buildable."""
    _register(BLOCKS, name, spec, BlockSpec, "block", replace)


def _register(table: dict, name: str, spec: Any, kind: type, what: str, replace: bool) -> None:
    if not isinstance(spec, kind):
        raise TypeError(f"register_{what}({name!r}, ...) needs a {kind.__name__}, got {type(spec).__name__}")
    if name in table and not replace:
        raise ValueError(f"{what} {name!r} is already registered (pass replace=True to replace it)")
    table[name] = spec


def attention_spec(name: str) -> AttentionSpec:
    return _spec(ATTENTIONS, name, "attention")


def block_spec(name: str) -> BlockSpec:
    return _spec(BLOCKS, name, "block")


def _spec(table: dict, name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def layer_path(spec: AttentionSpec | BlockSpec) -> tuple[str, str]:
    """(module, class name) of a spec's layer."""
    if isinstance(spec.layer, str):
        module, cls = spec.layer.split(":")
        return module, cls
    return spec.layer.__module__, spec.layer.__qualname__


def load_layer(spec: AttentionSpec | BlockSpec) -> type:
    """The layer class of a spec (imported on first use)."""
    if not isinstance(spec.layer, str):
        return spec.layer
    module, cls = layer_path(spec)
    return getattr(importlib.import_module(module), cls)


def mask_kwargs(attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments that hand ``attention_mask`` to an attention layer: none when it is ``None``,
    so layers without padding support (registered ones among them) keep their two-argument forward."""
    return {} if attention_mask is None else {"attention_mask": attention_mask}


def build_attention(cfg, layer_idx: int) -> nn.Module:
    return load_layer(attention_spec(cfg.attention))(cfg, layer_idx)


def build_block(cfg, layer_idx: int) -> nn.Module:
    return load_layer(block_spec(cfg.block))(cfg, layer_idx)
