"""Batches of token windows: seeded random offsets for training, fixed offsets for evaluation.

A batch is ``(x, y)``, two int64 tensors of shape ``(B, T)`` with ``y[:, t] = x[:, t + 1]`` in the token
stream (next-token targets). Training step ``s`` draws ``world_size * B`` offsets from a NumPy generator
seeded with ``(seed, s)`` and rank ``r`` takes rows ``r*B : (r+1)*B``: ranks see different windows, the
union over ranks at a step is the same whatever the rank, and the stream depends only on ``(seed, step)``,
so resuming from ``state_dict()`` draws exactly the batches an uninterrupted run would.

``order="epoch"`` draws disjoint windows instead: the split is cut into ``(N − 1) // T`` windows at
offsets ``k·T``, shuffled once per pass by a generator seeded with ``(seed, pass)``, and consumed in that
order across steps and ranks, so no token is a target twice before every window has been used once
(random offsets repeat some tokens and skip others long before a pass's worth of tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from leanformer.data.corpus import DataError


def _check(tokens: Any, batch_size: int, seq_len: int, what: str) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    if len(tokens) < seq_len + 1:
        raise DataError(f"the {what} split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}; "
                        "use a shorter seq_len or more data")


def _windows(tokens: Any, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``tokens[o : o + seq_len + 1]`` → ``(x, y)``, each ``(len(offsets), seq_len)`` int64."""
    if isinstance(tokens, np.ndarray):
        rows = np.asarray(tokens[offsets[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    else:  # e.g. ShardedTokens: slice by slice
        rows = np.stack([np.asarray(tokens[o:o + seq_len + 1], dtype=np.int64) for o in offsets.tolist()])
    buf = torch.from_numpy(rows)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class BatchSampler:
    """Random training windows of ``seq_len + 1`` tokens; see the module docstring for the seeding."""

    def __init__(self, tokens: Any, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, order: str = "random") -> None:
        _check(tokens, batch_size, seq_len, "training")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if order not in ("random", "epoch"):
            raise DataError(f"sampling order {order!r} is not valid; choose random or epoch")
        self.order = order
        self.n_windows = (len(tokens) - 1) // seq_len  # disjoint windows (order="epoch")
        self._perm: tuple[int, np.ndarray] | None = None  # (pass, its shuffled window indices)
        self._resumed_at = (0, 0)  # (step, windows the whole job had drawn by then): resumes on a new layout
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def offsets(self, step: int) -> np.ndarray:
        """This rank's ``(B,)`` window starts at ``step``."""
        if self.order == "epoch":
            return self._epoch_offsets(step)
        rng = np.random.default_rng([self.seed & (2**63 - 1), step])
        high = len(self.tokens) - self.seq_len  # offsets in [0, N - T - 1]
        everyone = rng.integers(0, high, size=self.world_size * self.batch_size, dtype=np.int64)
        return everyone[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def _epoch_offsets(self, step: int) -> np.ndarray:
        step0, drawn0 = self._resumed_at
        first = drawn0 + ((step - step0) * self.world_size + self.rank) * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, i in enumerate(range(first, first + self.batch_size)):
            epoch, pos = divmod(i, self.n_windows)
            if self._perm is None or self._perm[0] != epoch:
                rng = np.random.default_rng([self.seed & (2**63 - 1), epoch, 1])
                self._perm = (epoch, rng.permutation(self.n_windows))
            out[j] = self._perm[1][pos] * self.seq_len
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of shape ``(B, T)``, int64; advances the step."""
        out = _windows(self.tokens, self.offsets(self.step), self.seq_len)
        self.step += 1
        return out

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved stream: its seed and step (batch shape and ranks come from the constructor).
        ``order="epoch"`` continues from the windows the saved job had drawn (its step × world size × batch
        size), so a resume on another number of processes or batch size neither repeats nor skips one."""
        missing = {"seed", "step"} - set(state)
        if missing:
            raise DataError(f"sampler state lacks {', '.join(sorted(missing))}; got keys {sorted(state)}")
        self.seed, self.step = int(state["seed"]), int(state["step"])
        per_step = int(state.get("world_size", self.world_size)) * int(state.get("batch_size", self.batch_size))
        self._resumed_at = (self.step, self.step * per_step)


def eval_batches(tokens: Any, batch_size: int, seq_len: int, n: int, rank: int = 0,
                 world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed evaluation batches ``(x, y)``, each ``(B, T)`` int64, for comparable val losses.

    The ``n * B`` window starts are evenly spread over the split (they overlap when it is short), and
    do not depend on any seed. With ``world_size > 1`` rank ``r`` gets batches ``r, r + W, ...``.
    """
    if n < 1:
        raise DataError(f"number of evaluation batches n={n} must be >= 1")
    _check(tokens, batch_size, seq_len, "validation")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n * batch_size).round().astype(np.int64)
    return [_windows(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len)
            for i in range(rank, n, world_size)]
