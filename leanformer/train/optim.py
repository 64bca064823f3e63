"""AdamW with parameter groups, and the learning-rate schedule.

Groups are keyed by (learning-rate multiplier, weight decay). By default every parameter has multiplier 1
and only matrices (``dim >= 2``) are decayed; a module changes that for its own parameters by declaring
them (NOBLE's branch multipliers, DiJiang's feature gains):

    def optim_settings(self) -> dict[str, dict]:
        return {"up.weight": {"lr_mult": 2.5}, "log_d": {"weight_decay": False}}

Names are relative to the declaring module. The settings live in code, not on tensors, so they survive
``deepcopy``, pickling, ``.to()``, ``load_state_dict(assign=True)`` and FSDP2's parameter swap.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from leanformer.config import TrainConfig


def param_tags(model: nn.Module) -> dict[str, tuple[float, bool]]:
    """``name -> (lr_mult, decays)`` for every trainable parameter: the defaults (1, ``dim >= 2``) overridden
    by what each module's ``optim_settings()`` declares (see the module docstring). A tied tensor is named
    once, as ``named_parameters()`` names it."""
    tags = {name: (1.0, p.dim() >= 2) for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        declare = getattr(module, "optim_settings", None)
        if declare is None:
            continue
        for rel, setting in declare().items():
            name = f"{prefix}.{rel}" if prefix else rel
            if name in tags:
                mult, wd = tags[name]
                tags[name] = (float(setting.get("lr_mult", mult)), bool(setting.get("weight_decay", wd)))
    return tags


def param_groups(model: nn.Module, weight_decay: float,
                 tags: dict[str, tuple[float, bool]] | None = None) -> list[dict]:
    """One group per distinct (lr_mult, decays) pair; each group records its ``lr_mult``."""
    tags = param_tags(model) if tags is None else tags
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        if p.requires_grad:
            groups.setdefault(tags[name], []).append(p)
    return [
        {"params": ps, "lr_mult": mult, "weight_decay": weight_decay if wd else 0.0}
        for (mult, wd), ps in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    tags: dict[str, tuple[float, bool]] | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused on CUDA."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, tags), lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup_frac`` of the steps, then cosine
    or linear decay to ``min_lr_ratio · lr``, or constant."""
    warmup = int(cfg.warmup_frac * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
