"""Kill a training process at random moments and inside saves; the resumed run must equal an uninterrupted one.

One output folder goes through: a SIGKILL between the two renames of a save, a SIGKILL inside a save before
its manifest, three SIGKILLs at random moments (seeded), a SIGTERM (which must save, say where, and exit 143),
then a run to the end. After every kill the newest complete checkpoint must be found and never be older than
the last one known complete; at the end ``metrics.jsonl`` holds every step once, with the losses of an
uninterrupted run bit for bit, and the final weights are identical.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crash_child
from leanformer.train.checkpoint import latest_checkpoint, read_manifest
from leanformer.train.loop import Trainer
from leanformer.train.metrics import read_records

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def start(out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    return subprocess.Popen([sys.executable, str(TESTS / "crash_child.py"), str(out), mode],
                            stderr=subprocess.PIPE, text=True, env=env)


def newest_step(out: Path) -> int:
    found = latest_checkpoint(out / "checkpoint")
    return -1 if found is None else read_manifest(found)["step"]


def last_step(out: Path) -> int:
    records = read_records(out / "metrics.jsonl")
    return records[-1]["step"] if records else -1


def wait_for_progress(proc: subprocess.Popen, out: Path, past: int, timeout: float = 120) -> None:
    """Until the child has logged a step after ``past``, the last step logged before it started (so it has
    loaded, resumed, cut the metrics back to its checkpoint and trained on; its signal handlers are set)."""
    deadline = time.monotonic() + timeout
    while last_step(out) <= past:
        assert proc.poll() is None, f"the child ended early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the child never trained"
        time.sleep(0.01)


def test_kills_at_random_moments_and_inside_saves_resume_exactly(tmp_path):
    out, rng = tmp_path / "run", random.Random(18)
    known = -1  # the step of the newest checkpoint known to be complete

    def after_kill(proc: subprocess.Popen, expect_rc: int) -> None:
        nonlocal known
        proc.wait(timeout=60)
        assert proc.returncode == expect_rc, proc.stderr.read()[-2000:]
        step = newest_step(out)
        assert step >= known, f"resume would go back from step {known} to {step}"
        known = step

    for mode in ("kill-at-rename-5", "kill-in-manifest-2"):  # deterministic kills inside a save
        proc = start(out, mode)
        after_kill(proc, -signal.SIGKILL)
    assert known > 0
    for _ in range(3):  # random moments: in a step, an evaluation, a save, or writing metrics
        before = last_step(out)
        proc = start(out, "run")
        wait_for_progress(proc, out, before)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        after_kill(proc, -signal.SIGKILL)
    before = last_step(out)
    proc = start(out, "run")  # SIGTERM: finish the step, save, say where, exit 143
    wait_for_progress(proc, out, before)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    step = newest_step(out)
    assert f"interrupted by SIGTERM after step {step}: saved the checkpoint {out / 'checkpoint'}" in err
    known = step
    proc = start(out, "run")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child
    try:
        reference = Trainer(crash_child.config(), crash_child.data(), out_dir=tmp_path / "ref").fit()
    finally:
        torch.set_num_threads(threads)
    got = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in reference] == list(range(crash_child.STEPS + 1))
    assert [r.get("loss") for r in got] == [r.get("loss") for r in reference]
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in reference]
    a, b = load_file(str(out / "checkpoint" / "model.safetensors")), load_file(str(tmp_path / "ref" / "checkpoint" /
                                                                                    "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "metrics.jsonl"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
