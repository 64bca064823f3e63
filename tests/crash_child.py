"""The training process that tests/test_reliability_crash.py kills: ``python crash_child.py OUT MODE``.

MODE ``run`` trains to the end (or until a signal); ``kill-at-rename-N`` and ``kill-in-manifest-N``
SIGKILL this process at the N-th rename of a checkpoint folder, or on entering the N-th manifest write
(the files written, not yet fsynced, no manifest), so the kill lands inside a save for certain.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

STEPS = 120


def config():
    from leanformer.config import RunConfig, TrainConfig, TransformerConfig

    cfg = RunConfig()
    cfg.model = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, dropout=0.1)
    cfg.train = TrainConfig(steps=STEPS, batch_size=2, seq_len=8, eval_every=10, eval_batches=1, log_every=1,
                            save_every=3, progress=False, lr=3e-3)
    return cfg


def data():
    from leanformer.data import TokenData

    toks = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    return TokenData(train=toks[:2500], val=toks[2500:], tokenizer=None, vocab_size=64, source="random")


def kill_on_call(module, name: str, n: int) -> None:
    """SIGKILL this process when ``module.name`` is called for the ``n``-th time (before it runs)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def main(out: str, mode: str) -> int:
    import torch

    from leanformer.train import checkpoint as ckpt
    from leanformer.train.loop import Trainer
    from leanformer.train.signals import TrainingInterrupted

    torch.set_num_threads(1)
    if mode.startswith("kill-at-rename-"):
        kill_on_call(ckpt, "_rename", int(mode.rsplit("-", 1)[1]))
    elif mode.startswith("kill-in-manifest-"):
        kill_on_call(ckpt, "_write_manifest", int(mode.rsplit("-", 1)[1]))
    try:
        Trainer(config(), data(), out_dir=Path(out)).fit()
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.modules["transformers"] = None  # type: ignore[assignment]  # not needed here: a faster start
    sys.exit(main(sys.argv[1], sys.argv[2]))
