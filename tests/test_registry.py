"""The registry is the one place a method is added: a toy attention type registered here (and nowhere
else) validates, trains, checkpoints and decodes; the built-in specs' accounting matches what the layers
really keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from leanformer import registry
from leanformer.config import ConfigError, RunConfig, TrainConfig, TransformerConfig
from leanformer.data import TokenData
from leanformer.layers.linear import make_linear
from leanformer.model import TransformerLM
from leanformer.registry import AttentionSpec, BlockSpec


class ToyMeanAttention(nn.Module):
    """``y_t = W_o · mean_{j≤t} W_v x_j``: a causal running mean of values; (B, T, C) → (B, T, C).

    Decoding state: ``v_sum`` (B, C), the running sum in at least float32, and ``pos``."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.v = make_linear(cfg, "v", cfg.d_model, cfg.d_model)
        self.o = make_linear(cfg, "o", cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        start = state.get("pos", 0) if state is not None else 0
        v = self.v(x)
        acc = torch.promote_types(v.dtype, torch.float32)
        sums = v.to(acc).cumsum(1)
        if state is not None:
            if "v_sum" in state:
                sums = sums + state["v_sum"][:, None]
            state["v_sum"], state["pos"] = sums[:, -1], start + x.shape[1]
        counts = torch.arange(start + 1, start + x.shape[1] + 1, device=x.device, dtype=acc)
        return self.o((sums / counts[:, None]).to(x.dtype))


TOY = AttentionSpec(
    layer=ToyMeanAttention,
    flops_per_token=lambda cfg, seq_len: 3 * cfg.d_model,  # one add forward, two backward
    state_bytes_per_token=lambda cfg, dtype: 0,
    state_bytes_per_sequence=lambda cfg, dtype: cfg.d_model * torch.empty((), dtype=torch.promote_types(
        dtype, torch.float32)).element_size(),
)


@pytest.fixture
def toy():
    registry.register_attention("toy_mean", TOY)
    yield "toy_mean"
    del registry.ATTENTIONS["toy_mean"]


def _cfg(attention: str, **kw) -> TransformerConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention=attention)
    return TransformerConfig(**{**base, **kw}).validate()


def _data(vocab: int = 64, n: int = 3000) -> TokenData:
    toks = (np.arange(n) * 3 + 1).astype(np.uint16) % vocab  # learnable: next = previous + 3
    return TokenData(train=toks[:2600], val=toks[2600:], tokenizer=None, vocab_size=vocab, source="toy")


# ---------------------------------------------------------------------------- a new attention type
def test_a_registered_attention_is_a_valid_config_value(toy):
    _cfg(toy)
    from leanformer.cli import load_run_config

    assert load_run_config(None, [f"model.attention={toy}"]).model.attention == toy
    del registry.ATTENTIONS[toy]
    with pytest.raises(ConfigError, match="model.attention='toy_mean' is not valid; choose one of softmax, shaped"):
        _cfg(toy)
    registry.register_attention(toy, TOY)


def test_a_registered_attention_trains_checkpoints_and_decodes(toy, tmp_path):
    from leanformer.train import Trainer
    from leanformer.train.checkpoint import load_model

    run = RunConfig(model=_cfg(toy),
                    train=TrainConfig(steps=20, batch_size=4, seq_len=16, eval_every=10, eval_batches=2,
                                      log_every=5, progress=False, lr=3e-3))
    trainer = Trainer(run, _data(), out_dir=tmp_path)
    history = trainer.fit()
    vals = [r["val_loss"] for r in history if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5
    assert trainer.flops_per_token == 6 * (trainer.model.num_params(non_embedding=True) + 64 * 32) + 2 * 3 * 32

    model = load_model(tmp_path / "checkpoint").eval()
    assert type(model.blocks[0].attn) is ToyMeanAttention
    idx = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(model(idx)[0], trainer.model.eval()(idx)[0])
    out = model.generate(idx[:, :5], 7, temperature=0)  # with the decoding state
    again = idx[:, :5]
    for _ in range(7):  # without: the full forward pass over everything so far
        again = torch.cat([again, model(again)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, again)


def test_a_registered_attention_decodes_exactly_in_float64(toy):
    torch.manual_seed(0)
    model = TransformerLM(_cfg(toy, block="parallel")).double().eval()
    idx = torch.randint(0, 64, (3, 10))
    full, _ = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)
    assert cache.memory_bytes() == model.decode_state_bytes(10, batch=3)


def test_registration_errors(toy):
    with pytest.raises(ValueError, match="attention 'toy_mean' is already registered"):
        registry.register_attention(toy, TOY)
    registry.register_attention(toy, TOY, replace=True)
    with pytest.raises(TypeError, match="needs a AttentionSpec, got str"):
        registry.register_attention("other", "leanformer.layers.attention:SoftmaxAttention")
    registry.register_block("toy_only", BlockSpec("leanformer.blocks.standard:PreLNBlock", attentions=(toy,)))
    try:
        _cfg(toy, block="toy_only")
        with pytest.raises(ConfigError, match="model.block=toy_only needs attention='toy_mean', got 'softmax'"):
            _cfg("softmax", block="toy_only")
    finally:
        del registry.BLOCKS["toy_only"]


# ---------------------------------------------------------------------------- the built-in specs
BUILT_IN = [
    ("softmax", {}),
    ("softmax", {"n_kv_heads": 2}),
    ("shaped", {"block": "sas_p"}),
    ("shaped", {"block": "vskipinit", "n_kv_heads": 2}),
    ("dijiang", {}),
    ("dijiang", {"dijiang": {"feature_map": "official", "feature_dim": 12}}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("attention,kw", BUILT_IN)
def test_declared_decoding_state_is_what_the_layers_keep(attention, kw, dtype):
    from leanformer.config import from_dict

    torch.manual_seed(0)
    cfg = from_dict(TransformerConfig, {**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                max_seq_len=64, attention=attention), **kw}).validate()
    model = TransformerLM(cfg).to(dtype).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)), cache=cache)
        model(torch.randint(0, 64, (2, 1)), cache=cache)
    assert cache.memory_bytes() == model.decode_state_bytes(10, batch=2)


@pytest.mark.parametrize("attention,kw", BUILT_IN)
def test_flops_per_token_is_6n_plus_the_declared_attention_term(attention, kw):
    from leanformer.config import from_dict

    cfg = from_dict(TransformerConfig, {**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                max_seq_len=64, attention=attention), **kw}).validate()
    model = TransformerLM(cfg)
    six_n = 6 * (model.num_params(non_embedding=True) + 64 * 32)
    m = (cfg.dijiang.feature_dim or cfg.head_dim) if attention == "dijiang" else None
    attn = 12 * 2 * 4 * m * 8 if m else 12 * 2 * 32 * 128
    assert model.flops_per_token(128) == six_n + attn
