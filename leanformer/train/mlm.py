"""Masked language modelling (BERT, Devlin et al. 2019, section 3.1): the masking rule and its evaluation.

Each position of a training window that is not a special token (the end-of-text separators) is selected
with probability ``rate`` (``train.mask_rate``: BERT 0.15, crammed BERT 0.25, Geiping & Goldstein 2022).
A selected position is replaced by the mask token with probability 0.8, by a token drawn uniformly from
the vocabulary with probability 0.1, and left unchanged with probability 0.1 (the 80/10/10 rule); the loss
is the cross-entropy at the selected positions only (the targets are ``-100`` everywhere else, which
``F.cross_entropy`` ignores). The windows are the causal LM's (packed, no padding), so the two objectives
see the same tokens.

Randomness: a training batch is masked with a generator seeded by ``(train.seed, step, micro-batch, rank)``,
so a resumed run masks exactly as an uninterrupted one; the evaluation batches with a fixed seed
(:data:`EVAL_MASK_SEED`, batch index), the same at every evaluation, for every arm and every seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # targets that F.cross_entropy skips (the model's forward uses it)
EVAL_MASK_SEED = 0
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the selected positions; the remaining 0.1 keep their token


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative integers (NumPy's SeedSequence mixes them)."""
    state = np.random.SeedSequence([int(k) & (2**63 - 1) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class MaskingRule:
    """BERT's masking: ``rate`` of the non-special positions selected, 80/10/10 (module docstring).

    mask_id: the mask token; vocab_size: random replacements are drawn from ``[0, vocab_size)``;
    special_ids: token ids never selected (and never predicted).
    """

    mask_id: int
    vocab_size: int
    rate: float
    special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise ValueError(f"mask rate {self.rate} must be in (0, 1)")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 1")

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (B, T) int64 on the CPU → (inputs, targets), both (B, T) int64.

        ``targets`` holds the original token at the selected positions and ``-100`` elsewhere. When the draw
        selects nothing (tiny batches), one eligible position is selected, so the loss is always defined.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        eligible = torch.ones_like(tokens, dtype=torch.bool)
        if self.special_ids:
            eligible = ~torch.isin(tokens, torch.tensor(self.special_ids, dtype=tokens.dtype))
        selected = (torch.rand(tokens.shape, generator=generator) < self.rate) & eligible
        if not bool(selected.any()) and bool(eligible.any()):
            candidates = eligible.flatten().nonzero()[:, 0]
            pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
            selected.view(-1)[pick] = True
        action = torch.rand(tokens.shape, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, tokens.shape, generator=generator, dtype=tokens.dtype)
        inputs = torch.where(selected & (action < MASK_FRACTION), torch.full_like(tokens, self.mask_id), tokens)
        replace = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
        inputs = torch.where(replace, random_tokens, inputs)
        targets = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        return inputs, targets


def masked_eval_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rule: MaskingRule,
                        seed: int = EVAL_MASK_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation windows ``(x, _)`` masked once, batch ``i`` with the generator of ``(seed, i)``:
    ``(inputs, targets)`` pairs, the same whenever they are made."""
    return [rule(x, seeded_generator(seed, i)) for i, (x, _) in enumerate(batches)]


@torch.no_grad()
def mlm_metrics(model: Callable, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                device: torch.device | str = "cpu", autocast: Callable = nullcontext) -> dict[str, float]:
    """``{"loss", "accuracy", "predictions"}`` over masked batches: the mean cross-entropy and the top-1
    accuracy over every selected position of every batch (each position weighs the same), and how many
    there were. ``model(inputs, targets) -> (logits, mean loss)``, as :class:`TransformerLM` is called."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    count = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            logits, loss = model(inputs, targets)
        selected = targets != IGNORE_INDEX
        n = int(selected.sum())
        loss_sum += loss.double().cpu() * n
        correct += int((logits.argmax(-1)[selected] == targets[selected]).sum())
        count += n
    if count == 0:
        raise ValueError("no masked position in the evaluation batches")
    return {"loss": float(loss_sum) / count, "accuracy": correct / count, "predictions": count}


def masking_rule(data, rate: float):
    """``(data with a mask token, its MaskingRule)`` for a :class:`~leanformer.data.TokenData`: the mask token
    that :func:`~leanformer.data.with_mask_token` gives, random replacements drawn from the data's own
    vocabulary (without an added mask token), the end-of-text token never selected."""
    from leanformer.data import with_mask_token

    plain = data.vocab_size
    data, mask_id = with_mask_token(data)
    special = (data.tokenizer.eot_id,) if data.tokenizer is not None else ()
    return data, MaskingRule(mask_id, plain, rate, special)


def evaluate_encoder(model, data, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     rate: float) -> dict[str, float]:
    """``{"val_loss", "val_mlm_acc", "predictions"}`` of encoder ``model`` on the evaluation windows
    ``batches`` of ``data``, masked as the trainer masks them (:func:`masking_rule`, :data:`EVAL_MASK_SEED`)."""
    from leanformer.config import ConfigError

    data, rule = masking_rule(data, rate)
    if rule.mask_id >= model.cfg.vocab_size:
        raise ConfigError(f"the mask token id {rule.mask_id} is outside the model's vocabulary of "
                          f"{model.cfg.vocab_size} (evaluating on other data than the model was trained on?)")
    device = next(model.parameters()).device
    m = mlm_metrics(model, masked_eval_batches(batches, rule), device)
    return {"val_loss": m["loss"], "val_mlm_acc": m["accuracy"], "predictions": m["predictions"]}
