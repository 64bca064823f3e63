"""The fine-tuning loop: AdamW, linear warm-up then linear decay to 0, gradient clipping, one evaluation per
epoch (accuracy, F1, Matthews correlation) and the time of every optimizer step.

The examples are tokenised once; each step draws a batch from a seeded permutation of the training set
(one permutation per epoch) and pads it to its longest sequence. Parameter groups come from
:func:`leanformer.train.optim.param_groups`: matrices decay, vectors do not, and NOBLE's branches carry
their learning-rate multipliers (docs/methods.md, section 1).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.config import ConfigError
from leanformer.device import resolve_device
from leanformer.finetune.data import ClassificationData
from leanformer.finetune.metrics import classification_metrics
from leanformer.finetune.models import SequenceTokenizer, logits_of

# the learning rate by method when --lr is not given: small for updating pretrained weights, larger for
# freshly initialised adapters on a frozen base (the usual LoRA setting)
DEFAULT_LR = {"full": 5e-5, "noble_all": 5e-5, "lora": 5e-4, "noble": 5e-4}


@dataclass
class TrainSettings:
    """The loop's settings; ``max_steps`` (if set) stops before ``epochs`` are done."""

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the steps
    clip: float = 1.0  # max gradient norm; 0 = no clipping
    seed: int = 0
    max_len: int = 128
    device: str = "auto"
    progress: bool = True

    def validate(self) -> TrainSettings:
        checks = [(self.epochs > 0, f"--epochs {self.epochs} must be > 0"),
                  (self.max_steps is None or self.max_steps >= 1, f"--max-steps {self.max_steps} must be >= 1"),
                  (self.batch_size >= 1, f"--batch-size {self.batch_size} must be >= 1"),
                  (self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size} must be >= 1"),
                  (self.lr > 0 and math.isfinite(self.lr), f"--lr {self.lr} must be a positive number"),
                  (self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0"),
                  (0 <= self.warmup < 1, f"--warmup {self.warmup} must be in [0, 1) (a share of the steps)"),
                  (self.clip >= 0, f"--clip {self.clip} must be >= 0 (0: no clipping)"),
                  (self.max_len >= 2, f"--max-len {self.max_len} must be >= 2")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def lr_at(step: int, total: int, warmup_steps: int, lr: float) -> float:
    """Linear warm-up over ``warmup_steps`` to ``lr``, then linear decay to 0 at ``total`` (step 0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total - step) / max(1, total - warmup_steps))


@dataclass
class FinetuneResult:
    """Per-epoch evaluations, the last one, and the optimizer-step times (seconds)."""

    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    steps: int = 0

    def step_time(self) -> dict[str, float]:
        """Median and mean seconds per step, the first step (warm-up of kernels and caches) left out."""
        times = self.step_times[1:] or self.step_times
        if not times:
            return {}
        return {"step_time_s_median": statistics.median(times), "step_time_s_mean": statistics.fmean(times)}


def _encode(tokenizer: SequenceTokenizer, examples: list, max_len: int) -> list[dict[str, list[int]]]:
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if any(e.text_pair is not None for e in examples) else None
    return tokenizer.encode(texts, pairs, max_len)


def _batches(items: list[dict], labels: list[int], order: list[int], size: int, tokenizer: SequenceTokenizer):
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        batch = tokenizer.collate([items[j] for j in idx])
        yield batch, torch.tensor([labels[j] for j in idx], dtype=torch.long)


@torch.no_grad()
def predict(model: nn.Module, tokenizer: SequenceTokenizer, items: list[dict], batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Logits ``(N, num_labels)`` of tokenised ``items``, in eval mode (mode restored after)."""
    was = model.training
    model.eval()
    out = []
    try:
        for batch, _ in _batches(items, [0] * len(items), list(range(len(items))), batch_size, tokenizer):
            out.append(logits_of(model(**{k: v.to(device) for k, v in batch.items()})).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def evaluate(model: nn.Module, tokenizer: SequenceTokenizer, items: list[dict], labels: list[int],
             num_labels: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Accuracy, MCC (and F1 for two labels) and the mean cross-entropy on tokenised ``items``."""
    logits = predict(model, tokenizer, items, batch_size, device)
    target = torch.tensor(labels)
    metrics = classification_metrics(logits.argmax(-1).tolist(), labels, num_labels)
    metrics["loss"] = F.cross_entropy(logits, target).item()
    return metrics


def finetune(model: nn.Module, tokenizer: SequenceTokenizer, data: ClassificationData, settings: TrainSettings,
             log: Callable[[str], None] = print) -> FinetuneResult:
    """Train ``model`` (its trainable parameters) on ``data.train``; evaluate on ``data.val`` after each
    epoch and at the last step. Returns the evaluations and step times."""
    from leanformer.train.optim import param_groups

    settings.validate()
    device = resolve_device(settings.device, "--device")
    model.to(device).train()
    train_items = _encode(tokenizer, data.train, settings.max_len)
    val_items = _encode(tokenizer, data.val, settings.max_len)
    train_y, val_y = data.ids("train"), data.ids("val")
    per_epoch = math.ceil(len(train_items) / settings.batch_size)
    total = math.ceil(settings.epochs * per_epoch)
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    warmup_steps = int(settings.warmup * total)
    groups = param_groups(model, settings.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameter")
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
    trainable = [p for g in groups for p in g["params"]]
    generator = torch.Generator().manual_seed(settings.seed)
    result = FinetuneResult()
    bar = _progress(total, settings.progress)
    step, epoch = 0, 0
    num_labels = data.labels.num_labels
    while step < total:
        epoch += 1
        order = torch.randperm(len(train_items), generator=generator).tolist()
        losses = []
        for batch, y in _batches(train_items, train_y, order, settings.batch_size, tokenizer):
            if step >= total:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, total, warmup_steps, settings.lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            logits = logits_of(model(**{k: v.to(device) for k, v in batch.items()}))
            loss = F.cross_entropy(logits.float(), y.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings.clip)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
        metrics = evaluate(model, tokenizer, val_items, val_y, num_labels, settings.eval_batch_size, device)
        record = {"epoch": epoch, "step": step, "train_loss": statistics.fmean(losses) if losses else None,
                  **{f"val_{k}": v for k, v in metrics.items()}}
        result.history.append(record)
        log(_format(record))
    if bar is not None:
        bar.close()
    result.final = result.history[-1] if result.history else {}
    result.steps = step
    return result


def _format(record: dict) -> str:
    parts = [f"epoch {record['epoch']}", f"step {record['step']}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "step") and v is not None]
    return " | ".join(parts)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="finetune", unit="step", dynamic_ncols=True)


def settings_dict(settings: TrainSettings) -> dict:
    return asdict(settings)
