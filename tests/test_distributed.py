"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 equal one process with the same global batch;
checkpoints saved by two processes resume in one and in two; a killed rank ends the run, no hang."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from dist_helpers import TINY, launch, losses, write_shards
from leanformer.cli import main

MODELS = {
    "noble_sas_p": ["--set", "model.block=sas_p", "--set", "model.attention=shaped",
                    "--set", "model.noble.enabled=true", "--set", "model.noble.rank=4"],
    "dijiang": ["--set", "model.attention=dijiang"],
}

pytestmark = pytest.mark.slow  # several torchrun launches: skip locally with -m "not slow"; CI runs them


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


def single_process(shards: Path, out: Path, model: list[str], steps: int, batch: int) -> list[float]:
    args = ["train", "--data", str(shards), "--out", str(out), *TINY, *model,
            "--set", f"train.steps={steps}", "--set", f"train.batch_size={batch}"]
    assert main(args) == 0
    return losses(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("model", list(MODELS))
def test_two_processes_equal_one_with_the_same_global_batch(shards, tmp_path, mode, model):
    reference = single_process(shards, tmp_path / "one", MODELS[model], steps=3, batch=4)
    r = launch(["train", "--data", str(shards), "--out", str(tmp_path / "two"), *TINY, *MODELS[model],
                "--set", "train.steps=3", "--set", "train.batch_size=2", "--set", f"train.distributed={mode}"], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(reference, rel=1e-5)


def test_checkpoint_from_two_processes_resumes_in_one_and_in_two(shards, tmp_path):
    model = MODELS["noble_sas_p"] + ["--set", "train.schedule=constant"]  # so 2 steps then 2 = 4 steps
    reference = single_process(shards, tmp_path / "ref", model, steps=4, batch=4)
    base = ["--data", str(shards), *TINY, *model, "--set", "train.distributed=fsdp"]
    r = launch(["train", "--out", str(tmp_path / "a"), *base, "--set", "train.steps=2",
                "--set", "train.batch_size=2"], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "a" / "checkpoint"
    # resume in one process: global batch 4 as one process of 4
    subprocess.run(["cp", "-r", str(tmp_path / "a"), str(tmp_path / "b")], check=True)
    assert main(["train", "--out", str(tmp_path / "b"), *base, "--set", "train.steps=4",
                 "--set", "train.batch_size=4"]) == 0
    assert losses(tmp_path / "b") == pytest.approx(reference, rel=1e-5)
    # resume in two processes
    r = launch(["train", "--out", str(tmp_path / "a"), *base, "--set", "train.steps=4",
                "--set", "train.batch_size=2"], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "a") == pytest.approx(reference, rel=1e-5)
    assert (ckpt / "model.safetensors").exists()


def test_killing_one_rank_ends_the_run_with_an_error(shards, tmp_path):
    cmd_out = tmp_path / "k"
    import os
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "leanformer",
         "train", "--data", str(shards), "--out", str(cmd_out), *TINY, "--set", "train.steps=100000",
         "--set", "train.batch_size=2", "--set", "train.eval_every=1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (cmd_out / "metrics.jsonl").exists() or len(losses(cmd_out)) < 2:
            assert time.time() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # the other rank must not hang
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "FAILED" in err or "exitcode" in err
