"""What trains: full fine-tuning, LoRA (through PEFT), NOBLE branches on a frozen base, or NOBLE with all.

* ``full``: every parameter.
* ``lora``: PEFT's LoRA (Hu et al. 2021) on the target linears, ``W x + (α/r) B A x`` with B = 0 at the
  start; the base frozen, the classification head trained as PEFT's ``modules_to_save``.
* ``noble``: :func:`leanformer.inject.apply_noble` on the target linears, ``W x + b + W_up σ(W_down x +
  b_down)`` with W_up = 0 at the start (the model computes what it did before); the base frozen, the
  branches and the head trained.
* ``noble_all``: the same branches, and everything trains.

Targets (``targets``): ``all`` = every linear layer of the encoder's blocks (Q, K, V, output projection,
both FFN layers: the NOBLE paper's choice), ``attention`` = W_q and W_v chosen by model type (the LoRA
paper's; :data:`leanformer.finetune.models.ATTENTION_TARGETS`, else PEFT's table). The pooler and the head
are never targets. :func:`planned_trainable` counts a method's trainable parameters before applying it,
:func:`rank_for_budget` picks the rank that comes closest to a budget (equal-budget comparisons).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from leanformer.config import ConfigError
from leanformer.finetune.models import ATTENTION_TARGETS, HEAD_NAMES, Classifier

METHODS = ("full", "lora", "noble", "noble_all")
TARGETS = ("all", "attention")


@dataclass
class MethodSpec:
    """A method and its settings. ``lora_alpha`` None = 2 × rank (LoRA's scale α/r = 2); ``noble_lr_mults``
    False trains every NOBLE branch parameter at the base learning rate."""

    method: str = "full"
    rank: int = 8
    targets: str = "all"
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    noble_activation: str = "cosnet"
    noble_lr_mults: bool = True  # NOBLE's per-parameter learning-rate multipliers (docs/methods.md, section 1)

    def validate(self) -> MethodSpec:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not valid; choose one of {', '.join(METHODS)}")
        if self.targets not in TARGETS:
            raise ConfigError(f"--targets {self.targets!r} is not valid; choose one of {', '.join(TARGETS)}")
        if self.rank < 1:
            raise ConfigError(f"--rank {self.rank} must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_alpha"] = self.alpha
        return d

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.rank


# ---------------------------------------------------------------------------- which layers
def _is_linear(module: nn.Module) -> bool:
    from leanformer.layers.noble import _is_conv1d

    return isinstance(module, nn.Linear) or _is_conv1d(module)


def head_names(model: nn.Module) -> list[str]:
    """The model's classification head modules (trained by every method): top-level ``classifier`` etc."""
    names = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no classification head module named "
                          f"{' / '.join(HEAD_NAMES)}")
    return names


def target_linears(clf: Classifier, targets: str = "all") -> dict[str, nn.Module]:
    """Name → module of the linear layers a method adapts: inside the encoder's numbered blocks, never a head
    or the pooler; ``attention`` keeps W_q and W_v (by model type)."""
    from leanformer.inject import layer_index

    found = {n: m for n, m in clf.model.named_modules()
             if _is_linear(m) and layer_index(n) is not None and n.split(".")[0] not in HEAD_NAMES}
    if targets == "attention":
        wanted = ATTENTION_TARGETS.get(clf.model_type)
        if wanted is None:
            try:
                from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
            except ImportError:
                table = {}
            wanted = table.get(clf.model_type)
        if not wanted:
            raise ConfigError(f"--targets attention: no W_q/W_v names known for model type {clf.model_type!r}; "
                              "use --targets all")
        found = {n: m for n, m in found.items() if n.split(".")[-1] in wanted}
    if not found:
        raise ConfigError(f"no linear layer of {clf.source} to adapt (targets={targets})")
    return found


def _shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


# ---------------------------------------------------------------------------- counting
def count_trainable(model: nn.Module) -> int:
    """Parameters with ``requires_grad`` (a tensor shared by two modules counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def noble_branch_params(d_in: int, d_out: int, rank: int, activation: str = "cosnet") -> int:
    """Parameters of one NOBLE branch: W_down (r, d_in) + b_down (r) + W_up (d_out, r), plus CosNet's
    M (r, r) + c (r) + ω₁, φ₁, ω₂, φ₂ (r each)."""
    extra = rank * rank + 5 * rank if activation == "cosnet" else 0
    return rank * d_in + rank + d_out * rank + extra


def planned_trainable(clf: Classifier, spec: MethodSpec) -> int:
    """The number of parameters ``spec`` will train on ``clf`` (what :func:`apply_method` then reports)."""
    model = clf.model
    heads = sum(count_trainable(getattr(model, n)) for n in head_names(model))
    if spec.method == "full":
        return count_trainable(model)
    shapes = [_shape(m) for m in target_linears(clf, spec.targets).values()]
    if spec.method == "lora":
        return heads + sum(spec.rank * (d_in + d_out) for d_in, d_out in shapes)
    branches = sum(noble_branch_params(d_in, d_out, spec.rank, spec.noble_activation) for d_in, d_out in shapes)
    if spec.method == "noble":
        return heads + branches
    return count_trainable(model) + branches  # noble_all


def rank_for_budget(clf: Classifier, spec: MethodSpec, budget: int) -> int:
    """The rank whose :func:`planned_trainable` is closest to ``budget`` (ties: the smaller rank)."""
    if spec.method not in ("lora", "noble"):
        raise ConfigError(f"--match-params picks the rank of lora or noble, not of --method {spec.method}")
    limit = min(min(_shape(m)) for m in target_linears(clf, spec.targets).values())
    best, best_gap = 1, None
    for r in range(1, limit + 1):
        gap = abs(planned_trainable(clf, MethodSpec(**{**asdict(spec), "rank": r})) - budget)
        if best_gap is None or gap < best_gap:
            best, best_gap = r, gap
        elif gap > best_gap:
            break  # the count grows with the rank
    return best


def parse_budget(clf: Classifier, spec: MethodSpec, value: str) -> int:
    """``--match-params``: a number of parameters (``331776``), or ``METHOD:RANK`` (``lora:8``) = what that
    method trains at that rank on the same targets."""
    if ":" in value:
        method, _, rank = value.partition(":")
        if method not in ("lora", "noble") or not rank.isdigit() or int(rank) < 1:
            raise ConfigError(f"--match-params {value!r}: expected lora:RANK, noble:RANK or a number of parameters")
        other = MethodSpec(**{**asdict(spec), "method": method, "rank": int(rank)})
        return planned_trainable(clf, other)
    try:
        budget = int(value.replace(",", "").replace("_", ""))
    except ValueError:
        raise ConfigError(f"--match-params {value!r}: expected lora:RANK, noble:RANK or a number of "
                          "parameters") from None
    if budget < 1:
        raise ConfigError(f"--match-params {value}: the budget must be >= 1 parameter")
    return budget


# ---------------------------------------------------------------------------- applying
def apply_method(clf: Classifier, spec: MethodSpec) -> nn.Module:
    """Make ``clf.model`` train as ``spec`` says; returns the model to train (a ``PeftModel`` for LoRA,
    else ``clf.model`` itself, changed in place)."""
    spec.validate()
    model = clf.model
    heads = head_names(model)
    if spec.method == "full":
        return model
    names = list(target_linears(clf, spec.targets))
    if spec.method == "lora":
        return _apply_lora(clf, spec, names, heads)
    from leanformer.inject import apply_noble
    from leanformer.layers.noble import NobleLinear

    # fused=False with a frozen base: the fused path's one product x [W; W_down]ᵀ would also compute the
    # gradient of the frozen W (the stacked matrix needs one for W_down's rows); same outputs either way
    apply_noble(model, target_modules=names, rank=spec.rank, activation=spec.noble_activation,
                preserve_output=True, lr_mults=spec.noble_lr_mults, fused=spec.method != "noble")
    if spec.method == "noble":
        model.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, NobleLinear):
                for name, p in module.named_parameters():
                    if name not in ("weight", "bias"):
                        p.requires_grad_(True)
        for name in heads:
            getattr(model, name).requires_grad_(True)
    return model


def _apply_lora(clf: Classifier, spec: MethodSpec, names: list[str], heads: list[str]) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--method lora needs PEFT: pip install peft (or 'leanformer[finetune]')") from None
    kwargs = {"task_type": "SEQ_CLS"} if clf.kind == "hf" else {}
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                        target_modules=names, modules_to_save=heads, **kwargs)
    try:
        return get_peft_model(clf.model, config)
    except (ValueError, TypeError) as e:  # e.g. a layer type LoRA does not support (a NobleLinear)
        raise ConfigError(f"PEFT cannot put LoRA on {clf.source}: {str(e).splitlines()[0]}") from None


def trainable_summary(model: nn.Module) -> dict[str, int | float]:
    """``trainable`` and ``total`` parameters and their ratio (PEFT's copies of the head counted once)."""
    trainable, total = count_trainable(model), count_params(model)
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}
