"""Device placement: every tensor a model owns lives where the model was built or moved to.

CI has no GPU, so a buffer left on the CPU by a model built under ``with torch.device("cuda")`` is caught
here with the meta device instead: a model built (or moved) there must run forward, backward and a
decoding step with every parameter and buffer on meta. A CPU tensor mixed in fails the same way a CUDA
run would ("Expected all tensors to be on the same device").
"""

from __future__ import annotations

import itertools

import pytest
import torch

from leanformer import TransformerConfig, TransformerLM

ATTENTION_BLOCKS = [
    ("softmax", "preln"), ("softmax", "parallel"), ("softmax", "neox_parallel"),
    ("shaped", "sas"), ("shaped", "sas_p"), ("shaped", "vskipinit"),
    ("dijiang", "preln"),
]
DIJIANG = [dict(feature_map="paper"), dict(feature_map="official"), dict(feature_map="paper", learnable_decay=True)]


def _configs() -> list:
    return list(_generate_configs())


def _generate_configs():
    for (attention, block), noble in itertools.product(ATTENTION_BLOCKS, (False, True)):
        variants = DIJIANG if attention == "dijiang" else [{}]
        for dj in variants:
            yield pytest.param(dict(attention=attention, block=block, noble=noble, dijiang=dj),
                               id=f"{attention}-{block}{'-noble' if noble else ''}"
                                  f"{'-' + '-'.join(f'{k}={v}' for k, v in dj.items()) if dj else ''}")


def _config(attention: str, block: str, noble: bool, dijiang: dict) -> TransformerConfig:
    cfg = TransformerConfig(vocab_size=67, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                            attention=attention, block=block)
    cfg.noble.enabled = noble
    for key, value in dijiang.items():
        setattr(cfg.dijiang, key, value)
    return cfg


def _run_on_meta(model: TransformerLM) -> None:
    owned = list(model.named_parameters()) + list(model.named_buffers())
    off = [name for name, t in owned if t.device.type != "meta"]
    assert not off, f"left off the meta device: {off}"
    idx = torch.zeros(2, 9, dtype=torch.long, device="meta")
    logits, loss = model(idx, targets=idx)
    assert logits.device.type == "meta" and logits.shape == (2, 9, 67)
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        cache = model.new_cache()
        model(idx[:, :5], cache=cache)
        step, _ = model(idx[:, :1], cache=cache)
        assert step.device.type == "meta" and step.shape == (2, 1, 67) and cache.pos == 6


@pytest.mark.parametrize("spec", _configs())
def test_model_built_under_a_device_keeps_everything_there(spec):
    with torch.device("meta"):
        model = TransformerLM(_config(**spec))
    _run_on_meta(model)


@pytest.mark.parametrize("spec", _configs())
def test_model_moved_to_a_device_keeps_everything_there(spec):
    model = TransformerLM(_config(**spec)).to("meta")
    _run_on_meta(model)
