"""Put NOBLE branches into any ``torch.nn.Module`` (ours or a Hugging Face model), PEFT style.

* :func:`apply_noble` replaces matching ``nn.Linear`` / Hugging Face ``Conv1D`` layers in place by
  :class:`NobleLinear`, keeping their weights; with ``preserve_output=True`` (W_up = 0) the converted
  model computes exactly what it did before.
* :func:`remove_noble` puts the plain layers back (same module types, same outputs while W_up = 0).
* :func:`importance_scores` / :func:`select_by_importance`: layer selection by importance (docs/methods.md)
  (NOBLE only where a layer's importance is at or above a percentile, default the 70th).

LM heads are never converted: modules named ``lm_head``, ``head``, ``embed_out`` (or the model's
``get_output_embeddings()``), and any linear whose weight is shared with an embedding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from leanformer.layers.noble import NobleLinear, _is_conv1d

HEAD_NAMES = ("lm_head", "head", "embed_out")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ---------------------------------------------------------------------------------------- matching
def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches ``name`` exactly, as a dotted suffix (``q_proj`` ~ ``model.layers.0.q_proj``),
    or as a regular expression matching the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module name (``blocks.3.attn.q`` → 3), or None."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _head_modules(model: nn.Module) -> tuple[set[int], set[tuple[str, int]]]:
    """ids of output-embedding modules; ids and data pointers of every embedding weight (ties)."""
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            heads.add(id(out))
    tied: set[tuple[str, int]] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            tied.add(("id", id(m.weight)))
            if m.weight.device.type != "meta":  # meta tensors all have data_ptr 0
                tied.add(("ptr", m.weight.data_ptr()))
    return heads, tied


def _shares_embedding(weight: torch.Tensor, tied: set[tuple[str, int]]) -> bool:
    return ("id", id(weight)) in tied or (weight.device.type != "meta" and ("ptr", weight.data_ptr()) in tied)


def candidate_linears(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """All linears NOBLE may replace, by name, and the names skipped as LM heads.

    Skipped: heads (see the module docstring), modules inside a NobleLinear, and the projections of
    ``nn.MultiheadAttention``, which reads their weights directly instead of calling them.
    """
    head_ids, tied = _head_modules(model)
    found: dict[str, nn.Module] = {}
    heads: list[str] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (NobleLinear, nn.MultiheadAttention)):
            skip_prefixes.append(name + ".")
            continue
        if not _is_plain_linear(module):
            continue
        if (name.split(".")[-1] in HEAD_NAMES or id(module) in head_ids
                or _shares_embedding(module.weight, tied)):
            heads.append(name)
            continue
        found[name] = module
    return found, heads


def _select(model: nn.Module, target_modules: str | Iterable[str],
            exclude_modules: str | Iterable[str] | None,
            layers: int | Iterable[int] | None) -> tuple[dict[str, nn.Module], list[str]]:
    found, heads = candidate_linears(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        targets = dict(found)
    else:
        patterns = _as_patterns(target_modules)
        if not patterns:
            raise ValueError("target_modules is empty; give 'all-linear' or name patterns such as "
                             "['q_proj', 'v_proj']")
        targets = {n: m for n, m in found.items() if any(_matches(n, p) for p in patterns)}
        if not targets:
            explicit_heads = [n for n in heads if any(_matches(n, p) for p in patterns)]
            why = f" (only LM heads matched, never converted: {explicit_heads})" if explicit_heads else ""
            raise ValueError(f"no linear module matched target_modules={patterns}{why}; "
                             f"linear modules are e.g. {list(found)[:8]}")
    for p in _as_patterns(exclude_modules):
        targets = {n: m for n, m in targets.items() if not _matches(n, p)}
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        targets = {n: m for n, m in targets.items() if layer_index(n) in wanted}
    return targets, heads


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---------------------------------------------------------------------------------------- apply / remove
def apply_noble(model: nn.Module, target_modules: str | Iterable[str] = "all-linear",
                exclude_modules: str | Iterable[str] | None = None, rank: int = 32,
                activation: str = "cosnet", preserve_output: bool = True,
                layers: int | Iterable[int] | None = None, importance: dict[str, float] | None = None,
                percentile: float = 70.0, **noble_kwargs: Any) -> nn.Module:
    """Replace matching linears of ``model`` in place by :class:`NobleLinear`; returns ``model``.

    Args:
        target_modules: ``"all-linear"`` (every linear but the LM head) or name patterns, each an exact
            name, a dotted suffix (``"q_proj"``) or a regex matching the whole name.
        exclude_modules: patterns (same rules) removed from the targets.
        rank, activation, noble_kwargs: the branch (see :class:`NobleLinear`: rank_ratio, fusion,
            dropout, alpha, fused).
        preserve_output: W_up = 0, so the converted model's outputs equal the original's at first.
        layers: only modules whose first integer name component (the block index) is in ``layers``.
        importance, percentile: only modules whose score in ``importance`` (see
            :func:`importance_scores`) is at or above the ``percentile``-th percentile of all scores.

    The replaced names are recorded in ``model.noble_injection["replaced"]`` (LM heads skipped in
    ``["skipped_heads"]``). Raises ``ValueError`` when nothing matches.
    """
    targets, heads = _select(model, target_modules, exclude_modules, layers)
    if importance is not None:
        chosen = set(select_by_importance(importance, percentile))
        targets = {n: m for n, m in targets.items() if n in chosen}
    if not targets:
        raise ValueError(f"no linear module left to convert (target_modules={target_modules!r}, "
                         f"exclude_modules={exclude_modules!r}, layers={layers!r}, "
                         f"importance given: {importance is not None})")
    for name, module in targets.items():
        noble = NobleLinear.from_linear(module, rank=rank, activation=activation,
                                        preserve_output=preserve_output, **noble_kwargs)
        noble.train(module.training)
        _set_submodule(model, name, noble)
    record = getattr(model, "noble_injection", None) or {"replaced": [], "skipped_heads": []}
    record["replaced"] = sorted(set(record["replaced"]) | set(targets))
    record["skipped_heads"] = heads
    record["settings"] = {"rank": rank, "activation": activation, **noble_kwargs}
    model.noble_injection = record
    return model



def remove_noble(model: nn.Module) -> nn.Module:
    """Put every :class:`NobleLinear` of ``model`` back as the plain layer it came from; returns ``model``.

    The branches are dropped: the outputs equal the converted model's only while W_up = 0, and equal
    the original model's since the main weights were never changed by the conversion.
    """
    nobles = [(n, m) for n, m in model.named_modules() if isinstance(m, NobleLinear)]
    for name, module in nobles:
        plain = module.to_linear()
        plain.train(module.training)
        if name == "":
            raise ValueError("remove_noble got a NobleLinear itself; call its to_linear() instead")
        _set_submodule(model, name, plain)
    if hasattr(model, "noble_injection"):
        del model.noble_injection
    return model


# ---------------------------------------------------------------------------------------- selection
def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, torch.Tensor) and out.ndim == 0:
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)):
        loss = next((o for o in out if isinstance(o, torch.Tensor) and o.ndim == 0), None)
    if loss is None:
        raise ValueError(f"importance_scores could not find a scalar loss in the model's output "
                         f"({type(out).__name__}); pass loss_fn(model, batch) -> scalar tensor")
    return loss


def importance_scores(model: nn.Module, batches: Iterable[Any],
                      loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                      target_modules: str | Iterable[str] = "all-linear") -> dict[str, float]:
    """First-order Taylor saliency of each candidate linear layer (LM heads excluded):

        score(layer) = Σ_batches Σ_ij | W_ij · ∂L/∂W_ij |

    the estimated change of the loss L if the layer's weights were removed (Molchanov et al. 2019),
    summed over calibration batches (absolute value per batch). ``batches`` yields what ``loss_fn``
    takes; the default ``loss_fn`` calls ``model(**batch)`` / ``model(*batch)`` / ``model(batch)`` and
    takes its scalar loss (a 0-d tensor, ``.loss``, ``["loss"]``, or the first 0-d tensor of a tuple).
    Runs in eval mode (no dropout); leaves ``.grad`` and ``requires_grad`` as they were.
    Returns ``{module name: score}``.
    """
    targets, _ = _select(model, target_modules, None, None)
    names = list(targets)
    weights = [targets[n].weight for n in names]
    loss_fn = loss_fn or _default_loss
    scores = torch.zeros(len(names), dtype=torch.float64)
    flags = [w.requires_grad for w in weights]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, (w, g) in enumerate(zip(weights, grads)):
                if g is not None:
                    scores[i] += (w.detach() * g).abs().sum().double().cpu()
            n_batches += 1
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("importance_scores got no calibration batches")
    return {n: float(s) for n, s in zip(names, scores)}


def select_by_importance(scores: dict[str, float], percentile: float = 70.0) -> list[str]:
    """Names whose score is at or above the ``percentile``-th percentile (linear interpolation) of all
    scores (a NOBLE write-up's rule, default the 70th; docs/methods.md). Ordered by decreasing score."""
    if not scores:
        raise ValueError("select_by_importance got no scores")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile={percentile} must be in [0, 100]")
    values = torch.tensor(list(scores.values()), dtype=torch.float64)
    threshold = float(torch.quantile(values, percentile / 100.0))
    threshold -= 1e-12 * abs(threshold)  # a score equal to the percentile counts as "at"
    return sorted((n for n, s in scores.items() if s >= threshold), key=lambda n: -scores[n])
