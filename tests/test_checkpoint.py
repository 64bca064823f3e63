"""Checkpoints: safetensors round trip, atomic save under a failure mid-save, clear errors."""

import json

import pytest
import torch

from leanformer import TransformerConfig, TransformerLM
from leanformer.train import checkpoint as ckpt
from leanformer.train.checkpoint import CheckpointError, load_model, save_checkpoint


def tiny_model(**kw):
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, **kw))


def test_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "c", model)
    again = load_model(tmp_path / "c")
    idx = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(idx)[0], again(idx)[0])
    assert again.lm_head.weight is again.wte.weight  # tying survives the round trip


def test_failure_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    save_checkpoint(tmp_path / "c", model)
    before = (tmp_path / "c" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.wte.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "c", model, trainer_state={"step": 1})
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    load_model(tmp_path / "c")  # still loads


def test_missing_checkpoint():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("/no/such/checkpoint")


def test_corrupt_weights(tmp_path):
    save_checkpoint(tmp_path / "c", tiny_model())
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is (corrupt|damaged)"):
        load_model(tmp_path / "c")


def test_corrupt_config(tmp_path):
    save_checkpoint(tmp_path / "c", tiny_model())
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is (corrupt|damaged)"):
        load_model(tmp_path / "c")


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "c", tiny_model())
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["model"]["vocab_size"] = 60
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "c" / "manifest.json").unlink()  # edited on purpose: the checksums no longer apply
    expected = r"'(wte|lm_head).weight' has shape \(50, 32\), the model expects \(60, 32\)"
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path / "c")
