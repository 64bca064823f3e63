"""Shared pieces of the multi-process tests: a tiny token shard and a torchrun launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TINY = ["--set", "model.vocab_size=64", "--set", "model.d_model=32", "--set", "model.n_layers=2",
        "--set", "model.n_heads=4", "--set", "train.seq_len=16", "--set", "train.eval_every=2",
        "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--set", "train.progress=false",
        "--set", "train.warmup_frac=0.0"]


def write_shards(folder: Path, vocab: int = 64) -> Path:
    """``folder`` with llm.c-format train and val shards of a learnable token pattern."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("tiny_train_000000.bin", 6000), ("tiny_val_000000.bin", 800)):
        toks = np.empty(n, dtype="<u2")
        toks[0] = 1
        for i in range(1, n):
            toks[i] = (toks[i - 1] * 3 + 1) % vocab if rng.random() > 0.1 else rng.integers(vocab)
        header = np.zeros(256, dtype="<i4")
        header[:3] = (20240520, 1, n)
        with open(folder / name, "wb") as f:
            f.write(header.tobytes())
            f.write(toks.tobytes())
    return folder


def launch(args: list[str], nproc: int, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``leanformer ARGS --nproc N``: torchrun with ``nproc`` CPU processes (gloo), or plainly for one."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    cmd = [sys.executable, "-m", "leanformer", *args]
    if nproc > 1:  # the CLI's shortcut for torchrun --standalone --nproc_per_node N -m leanformer ...
        cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(out_dir / "metrics.jsonl")) if "loss" in r]
