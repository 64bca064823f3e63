"""Lose no work (issue 18): checkpoints that survive a kill at any moment, Ctrl-C / SIGTERM that save,
the checkpoint's tokenizer everywhere, one run per output folder, metrics that match the checkpoint,
checksums, one-line errors for every bad input, honest data handling, tests that stay in temporary folders.
The kill-at-random-moments test is tests/test_reliability_crash.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_helpers import TINY, write_shards
from leanformer.cli import main
from leanformer.config import ConfigError, DataConfig, RunConfig, TrainConfig, TransformerConfig
from leanformer.data import DataError, TokenData, load_data
from leanformer.model import TransformerLM
from leanformer.train import Trainer
from leanformer.train import checkpoint as ckpt
from leanformer.train.checkpoint import CheckpointError, latest_checkpoint, load_model, save_checkpoint
from leanformer.train.lock import OutputLock
from leanformer.train.signals import SaveTimer, TrainingInterrupted

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models train fastest on one thread (and do not slow down on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_data(vocab: int = 64, n: int = 3000) -> TokenData:
    rng = np.random.default_rng(0)
    toks = rng.integers(0, vocab, n).astype(np.uint16)
    return TokenData(train=toks[:2500], val=toks[2500:], tokenizer=None, vocab_size=vocab, source="random")


def run_cfg(steps: int = 6, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.model = TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, dropout=0.1)
    cfg.train = TrainConfig(steps=steps, batch_size=2, seq_len=8, eval_every=3, eval_batches=1, log_every=1,
                            progress=False, **train)
    return cfg


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def ckpt_step(path: Path) -> int:
    return json.loads((path / "manifest.json").read_text())["step"]


class Killed(BaseException):
    """Stands for SIGKILL at a chosen point of a save (nothing after it runs)."""


def kill_at_rename(monkeypatch, which: int) -> None:
    """Make the ``which``-th rename of the next save (1: checkpoint -> .old, 2: .tmp -> checkpoint) 'kill'."""
    calls = {"n": 0}
    real = ckpt._rename

    def rename(src, dst):
        calls["n"] += 1
        if calls["n"] == which:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(ckpt, "_rename", rename)


# ---------------------------------------------------------------------------- 1. kills during a save
def test_kill_between_the_two_renames_resumes_from_the_newest_copy(tmp_path, monkeypatch):
    data, out = token_data(), tmp_path / "run"
    Trainer(run_cfg(), data, out_dir=out).fit(stop_after=2)
    t = Trainer(run_cfg(), data, out_dir=out)
    kill_at_rename(monkeypatch, 2)  # checkpoint (step 2) is now checkpoint.old; checkpoint.tmp holds step 4
    with pytest.raises(Killed):
        t.fit(stop_after=2)
    t.lock.release()  # the process is 'dead'
    monkeypatch.undo()
    assert not (out / "checkpoint").exists()
    assert latest_checkpoint(out / "checkpoint") == out / "checkpoint.tmp"
    resumed = Trainer(run_cfg(), data, out_dir=out)
    assert resumed.step == 4  # not 0, as before: the newest complete copy
    resumed.fit()
    assert ckpt_step(out / "checkpoint") == 6
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_save_never_deletes_the_only_good_copy(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TransformerLM(run_cfg().model)
    c = tmp_path / "c"
    save_checkpoint(c, model, trainer_state={"step": 1})
    kill_at_rename(monkeypatch, 2)
    with pytest.raises(Killed):
        save_checkpoint(c, model, trainer_state={"step": 2})
    monkeypatch.undo()
    (c.with_name("c.tmp") / "manifest.json").unlink()  # say the kill came before the new copy was complete
    assert latest_checkpoint(c) == c.with_name("c.old")  # the only good copy

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # the next save fails half-way
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(c, model, trainer_state={"step": 3})
    monkeypatch.undo()
    assert latest_checkpoint(c) == c and ckpt_step(c) == 1
    load_model(c)


def test_half_deleted_folders_are_never_resumed_from(tmp_path):
    import shutil

    c = tmp_path / "c"
    save_checkpoint(c, TransformerLM(run_cfg().model), trainer_state={"step": 1})
    half = tmp_path / "c.old.deleting"  # a kill while deleting a newer-looking copy: files partly gone
    shutil.copytree(c, half)
    (half / "manifest.json").unlink()
    assert latest_checkpoint(c) == c
    ckpt.recover_checkpoint(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    os.replace(c, tmp_path / "c.tmp")  # killed between the renames: the error says how to repair it
    with pytest.raises(CheckpointError, match="a save was interrupted: re-run the training command"):
        load_model(c)


def test_a_save_fsyncs_every_file_and_the_folders(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(tmp_path / "c", TransformerLM(run_cfg().model), trainer_state={"step": 1})
    names = {Path(p).name for p in synced}
    assert {"model.safetensors", "config.json", "trainer.pt", "manifest.json", "c.tmp"} <= names
    assert str(tmp_path) in synced  # the parent folder, after the renames


# ---------------------------------------------------------------------------- 2. Ctrl-C, SIGTERM, saving by time
def test_sigint_finishes_the_step_saves_and_says_where(tmp_path):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job

    def on_log(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    t = Trainer(run_cfg(steps=50), token_data(), out_dir=out, on_log=on_log)
    with pytest.raises(TrainingInterrupted) as e:
        t.fit()
    assert e.value.step == 2 and e.value.exit_status == 130
    assert str(out / "checkpoint") in str(e.value)
    assert ckpt_step(out / "checkpoint") == 2
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored


def test_ctrl_c_in_the_cli_saves_says_where_and_exits_130(tmp_path, monkeypatch, capsys):
    from leanformer.train import loop

    real = loop.Trainer._log

    def log(self, record):
        real(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.Trainer, "_log", log)
    shards, out = write_shards(tmp_path / "shards"), tmp_path / "run"
    assert main(["train", "--data", str(shards), "--out", str(out), *TINY, "--set", "train.steps=1000",
                 "--set", "train.batch_size=2"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted by SIGINT after step 2: saved the checkpoint {out / 'checkpoint'}" in err
    assert ckpt_step(out / "checkpoint") == 2


def test_checkpoints_by_time_by_default(tmp_path):
    assert TrainConfig().save_every_minutes > 0
    out, seen = tmp_path / "run", []
    cfg = run_cfg(steps=5, save_every_minutes=1e-9)  # due after every step
    Trainer(cfg, token_data(), out_dir=out,
            on_log=lambda r: seen.append(latest_checkpoint(out / "checkpoint") is not None)).fit()
    assert seen[3]  # a checkpoint existed during the run, before the final save
    clock = iter([0.0, 599.0, 601.0])
    timer = SaveTimer(10, clock=lambda: next(clock))
    assert not timer.due() and timer.due()


@pytest.mark.parametrize("name", ["tiny", "sas_p", "sas_p_preln", "small10m", "gpt2_small"])
def test_shipped_configs_save_periodically(name):
    from leanformer.cli import load_run_config

    tc = load_run_config(name).train
    assert tc.save_every_minutes > 0 or tc.save_every > 0


# ---------------------------------------------------------------------------- 3. the checkpoint's tokenizer
def texts(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(300)))
    b.write_text("\n".join(f"Die Katze {i} schläft auf dem warmen Sofa, während es regnet.\n" for i in range(300)))
    return a, b


def train_on(text: Path, out: Path, *extra: str) -> int:
    return main(["train", "--config", "tiny", "--data", str(text), "--out", str(out), "--set", "train.steps=2",
                 "--set", "train.batch_size=2", "--set", "train.seq_len=16", "--set", "train.progress=false",
                 "--set", "train.eval_batches=1", "--set", "data.vocab_size=300", "--set", "model.d_model=32",
                 "--set", "model.n_layers=1", *extra])


def test_eval_on_other_data_uses_the_checkpoints_tokenizer(tmp_path, capsys):
    from leanformer.data import eval_batches

    a, b = texts(tmp_path)
    assert train_on(a, tmp_path / "run") == 0
    c = tmp_path / "run" / "checkpoint"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(c), "--data", str(b), "--batches", "2"]) == 0
    reported = json.loads(capsys.readouterr().out)["val_loss"]
    data = load_data(DataConfig(path=str(b), tokenizer=str(c / "tokenizer.json"), vocab_size=300), progress=False)
    model = load_model(c).eval()
    with torch.no_grad():
        batches = eval_batches(data.val, 2, 16, 2)
        expected = sum(model(x, y)[1].item() for x, y in batches) / 2
    assert reported == pytest.approx(expected, rel=1e-6)


def test_resume_on_other_data_keeps_the_checkpoints_tokenizer(tmp_path):
    a, b = texts(tmp_path)
    out = tmp_path / "run"
    assert train_on(a, out) == 0
    before = (out / "checkpoint" / "tokenizer.json").read_text()
    assert train_on(b, out, "--set", "train.steps=3") == 0
    assert (out / "checkpoint" / "tokenizer.json").read_text() == before


# ---------------------------------------------------------------------------- 4. one run per output folder
def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    shards, out = write_shards(tmp_path / "shards"), tmp_path / "run"
    args = ["train", "--data", str(shards), "--out", str(out), *TINY, "--set", "train.steps=2",
            "--set", "train.batch_size=2"]
    with OutputLock(out):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert f"in use by PID {os.getpid()} on host {socket.gethostname()}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert main(args) == 0  # free again


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (f"import fcntl, os; fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": 1}'); os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    with OutputLock(out):
        pass


# ---------------------------------------------------------------------------- 5. metrics.jsonl
def test_resume_truncates_metrics_to_the_checkpoint_and_tolerates_a_torn_line(tmp_path):
    data, out = token_data(), tmp_path / "run"
    Trainer(run_cfg(), data, out_dir=out).fit(stop_after=3)
    with open(out / "metrics.jsonl", "a") as f:  # a killed run trained on past its checkpoint
        f.write(json.dumps({"step": 4, "train_seconds": 99.0, "loss": 1.0}) + "\n")
        f.write('{"step": 5, "train_sec')  # and was killed while writing
    Trainer(run_cfg(), data, out_dir=out).fit()
    recs = records(out)
    steps = [r["step"] for r in recs]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    seconds = [r["train_seconds"] for r in recs]
    assert seconds == sorted(seconds)


def test_no_resume_starts_a_fresh_metrics_file(tmp_path):
    data, out = token_data(), tmp_path / "run"
    Trainer(run_cfg(), data, out_dir=out).fit()
    Trainer(run_cfg(), data, out_dir=out, resume=False).fit()
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- 6. checksums
def flip_byte(file: Path, offset_from_end: int = 20) -> None:
    raw = bytearray(file.read_bytes())
    raw[-offset_from_end] ^= 0x01
    file.write_bytes(bytes(raw))


def test_a_flipped_bit_in_the_weights_is_named(tmp_path, capsys):
    c = tmp_path / "c"
    save_checkpoint(c, TransformerLM(run_cfg().model))
    flip_byte(c / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged: its SHA-256 differs"):
        load_model(c)
    assert main(["eval", "--checkpoint", str(c)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.safetensors is damaged" in err and "\n" not in err


def test_a_damaged_trainer_state_is_named_not_a_nan(tmp_path):
    data, out = token_data(), tmp_path / "run"
    Trainer(run_cfg(), data, out_dir=out).fit(stop_after=2)
    flip_byte(out / "checkpoint" / "trainer.pt", 2000)
    with pytest.raises(CheckpointError, match=r"trainer.pt is damaged"):
        Trainer(run_cfg(), data, out_dir=out)


# ---------------------------------------------------------------------------- 7. one-line errors
@pytest.mark.parametrize("sets,message", [
    (["train.steps=2.5"], "train.steps=2.5 must be an integer"),
    (["model.d_model=128.0"], "model.d_model=128.0 must be an integer"),
    (["model.noble.enabled=maybe"], "model.noble.enabled='maybe' must be true or false"),
    (["train.eval_every=0"], "train.eval_every=0 must be >= 1"),
    (["train.log_every=0"], "train.log_every=0 must be >= 1"),
    (["train.grad_clip=abc"], "train.grad_clip='abc' must be a number"),
    (["train.lr=nan"], "train.lr=nan must be a finite number"),
    (["train.steps=[1"], "the value is not valid YAML"),
    (["train=5"], "'train' is a section: it must be a mapping"),
    (["model.noble=true"], "'model.noble' is a section"),
    (["train.steps.max=3"], "'train.steps' is a value, not a section"),
    (["train.betas=[0.9]"], "train.betas=[0.9] must be a list of 2 values"),
    (["data.vocab_size=abc"], "data.vocab_size='abc' must be an integer"),
])
def test_bad_config_values_are_one_line_before_anything_is_written(sets, message, tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "o"), "--set", "train.progress=false"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_lr_in_e_notation_is_a_number():
    from leanformer.cli import load_run_config

    assert load_run_config("tiny", ["train.lr=1e-3"]).train.lr == 0.001


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error_before_anything_is_written(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    assert main(["train", "--data", str(shards), "--out", str(tmp_path / "o"), *TINY,
                 "--set", "train.device=cuda"]) == 2
    assert "train.device=cuda but no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def learned_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint with learned positions (context 16) and a tokenizer."""
    from leanformer.data import Tokenizer

    folder = tmp_path_factory.mktemp("ckpt") / "c"
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 50], 300)
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                            max_seq_len=16, pos="learned"))
    save_checkpoint(folder, model, RunConfig(), tokenizer=tok)
    return folder


@pytest.mark.parametrize("extra,message", [
    (["--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0 must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan must be a finite number >= 0"),
    (["--prompt", "def \udcff"], "--prompt is not valid UTF-8 (byte 0xff at character 4)"),
    (["--max-new-tokens", "200"], "exceeds the model's context of 16 tokens (learned positions)"),
])
def test_bad_generate_arguments_are_one_line(learned_checkpoint, extra, message, capsys):
    assert main(["generate", "--checkpoint", str(learned_checkpoint), *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and captured.out == ""


def test_checkpoint_config_with_wrong_types_is_named(learned_checkpoint, tmp_path, capsys):
    import shutil

    c = tmp_path / "c"
    shutil.copytree(learned_checkpoint, c)
    cfg = json.loads((c / "config.json").read_text())
    cfg["model"]["d_model"] = "sixteen"
    (c / "config.json").write_text(json.dumps(cfg))
    (c / "manifest.json").unlink()
    assert main(["generate", "--checkpoint", str(c)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{c / 'config.json'}: model.d_model='sixteen' must be an integer" in err and "\n" not in err


def test_hf_folders_in_the_wrong_place_are_one_line(learned_checkpoint, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", str(learned_checkpoint), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "hf")]) == 2  # an export is not a checkpoint
    err = capsys.readouterr().err.strip()
    assert "is a Hugging Face model folder; `leanformer import` it first" in err and "\n" not in err
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.safetensors" in err and "\n" not in err
    assert not (tmp_path / "imported").exists()


def test_only_our_error_types_become_error_lines(monkeypatch):
    import leanformer.cli as cli

    def bug(args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli, "cmd_eval", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["eval", "--checkpoint", "x"])


# ---------------------------------------------------------------------------- 8. data
def data_cfg(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "cache"), **kw)


def test_a_binary_file_is_refused(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_bytes(b"some text\n" * 20 + b"\x00\x01\x02" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"weights.txt looks binary \(a NUL byte at offset 200\)"):
        load_data(data_cfg(tmp_path, f), progress=False)


def test_a_latin1_file_is_used_with_a_note(tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Größe und Maß, café au lait\n".encode("latin-1") * 50)
    load_data(data_cfg(tmp_path, f), progress=False)
    err = capsys.readouterr().err
    assert "1 of 1 files are not valid UTF-8" in err and "latin1.txt (byte 0xf6 at offset 2)" in err


def test_the_token_cache_is_keyed_on_content_not_mtime(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("alpha beta gamma\n" * 200)
    first = load_data(data_cfg(tmp_path, f), progress=False)
    st = f.stat()
    f.write_text("gamma alpha beta\n" * 200)
    assert f.stat().st_size == st.st_size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content changed
    second = load_data(data_cfg(tmp_path, f), progress=False)
    assert first.cache_path != second.cache_path
    assert second.tokenizer.decode(np.asarray(second.train[:50]).tolist()).startswith("<|endoftext|>gamma alpha")


def test_a_killed_cache_build_leaves_no_tmp_folder(tmp_path):
    from leanformer.data.dataset import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    stale = cache / f".tmp-text-0123456789abcdef-{_host()}-{dead.pid}"
    alive = cache / f".tmp-text-0123456789abcdef-{_host()}-{os.getpid()}"
    other_host = cache / f".tmp-text-0123456789abcdef-elsewhere-{dead.pid}"
    for d in (stale, alive, other_host):
        d.mkdir(parents=True)
    f = tmp_path / "corpus.txt"
    f.write_text("alpha beta gamma\n" * 200)
    load_data(data_cfg(tmp_path, f), progress=False)
    assert not stale.exists() and alive.exists() and other_host.exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-") and str(os.getpid()) not in p.name
                and "elsewhere" not in p.name]


def test_eval_works_from_another_folder(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    texts(work)
    monkeypatch.chdir(work)
    assert train_on(Path("a.txt"), Path("run")) == 0  # a relative --data
    monkeypatch.chdir(tmp_path)  # where no a.txt is
    assert not Path("a.txt").exists()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", "work/run/checkpoint", "--batches", "1"]) == 0
    assert "val_loss" in capsys.readouterr().out


# ---------------------------------------------------------------------------- 9. temporary folders only
def test_tests_run_in_a_temporary_folder():
    cwd = Path.cwd().resolve()
    assert cwd != REPO and Path(tempfile.gettempdir()).resolve() in cwd.parents
    assert Path(os.environ["LEANFORMER_CACHE"]).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError):
        from leanformer.config import from_dict

        from_dict(RunConfig, {"train": {"steps": "many"}})
