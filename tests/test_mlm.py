"""Masked language modelling: the 80/10/10 rule's statistics, its determinism, the [MASK] token, training and
resuming an encoder, the CLI (train, eval, generate) and ``compare`` with ``model.causal=false``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leanformer.cli import main
from leanformer.config import RunConfig, TrainConfig, TransformerConfig
from leanformer.data import TokenData, Tokenizer, load_data, with_mask_token
from leanformer.config import DataConfig
from leanformer.train import Trainer
from leanformer.train.checkpoint import load_model, load_tokenizer
from leanformer.train.mlm import IGNORE_INDEX, MaskingRule, masked_eval_batches, seeded_generator


# ---------------------------------------------------------------- the masking rule
def test_masking_follows_the_80_10_10_rule_on_a_large_batch():
    vocab, mask_id, eot = 1000, 1000, 0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (256, 512), generator=g)
    tokens[:, ::16] = eot  # document separators: never selected
    rule = MaskingRule(mask_id, vocab, 0.25, special_ids=(eot,))
    inputs, targets = rule(tokens, seeded_generator(1, 2))
    selected = targets != IGNORE_INDEX
    eligible = tokens != eot
    assert not (selected & ~eligible).any()
    assert abs(selected.sum() / eligible.sum() - 0.25) < 0.005
    assert torch.equal(targets[selected], tokens[selected])  # the original token is the target
    assert torch.equal(inputs[~selected], tokens[~selected])  # nothing else changes
    n = selected.sum()
    masked = (inputs == mask_id) & selected
    kept = (inputs == tokens) & selected
    replaced = selected & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(replaced.sum() / n - 0.1 * (1 - 1 / vocab)) < 0.01  # a random draw may hit the token itself
    assert abs(kept.sum() / n - (0.1 + 0.1 / vocab)) < 0.01
    assert inputs[replaced].max() < vocab and inputs[replaced].min() >= 0
    assert (inputs == mask_id).sum() == masked.sum()  # the mask token appears only where it was put


def test_masking_is_deterministic_per_seed():
    rule = MaskingRule(mask_id=50, vocab_size=50, rate=0.15)
    tokens = torch.randint(0, 50, (8, 64), generator=torch.Generator().manual_seed(0))
    a, b, c = (rule(tokens, seeded_generator(*key)) for key in ((7, 3), (7, 3), (7, 4)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    batches = [(tokens, tokens), (tokens, tokens)]
    first, again = masked_eval_batches(batches, rule), masked_eval_batches(batches, rule)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(first, again))
    assert not torch.equal(first[0][1], first[1][1])  # each evaluation batch has its own draw


def test_a_tiny_batch_always_has_a_prediction():
    rule = MaskingRule(mask_id=9, vocab_size=9, rate=0.01, special_ids=(0,))
    for seed in range(20):
        _, targets = rule(torch.tensor([[0, 3, 4, 0]]), seeded_generator(seed))
        assert (targets != IGNORE_INDEX).sum() >= 1 and targets[0, 0] == targets[0, 3] == IGNORE_INDEX


# ---------------------------------------------------------------- the [MASK] token
@pytest.fixture(scope="module")
def tokenizer():
    texts = ["def add(a, b):\n    return a + b\n" * 20, "class Point:\n    x: int = 0\n" * 20]
    return Tokenizer.train(texts, 300)


def test_mask_token_is_added_after_every_other_id(tokenizer, tmp_path):
    assert tokenizer.mask_id is None  # a causal run's tokenizer is unchanged
    masked = tokenizer.with_mask_token()
    assert (masked.mask_token, masked.mask_id, masked.vocab_size) == ("[MASK]", tokenizer.vocab_size,
                                                                      tokenizer.vocab_size + 1)
    text = "def f(x):\n    return x * 2  # [not a mask]\n"
    assert masked.encode(text) == tokenizer.encode(text)
    assert masked.with_mask_token() is masked
    assert masked.identity() == tokenizer.identity()
    masked.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").mask_id == tokenizer.vocab_size
    data = TokenData(np.zeros(10, np.uint16), np.zeros(10, np.uint16), tokenizer, tokenizer.vocab_size, "x")
    with_mask, mask_id = with_mask_token(data)
    assert (mask_id, with_mask.vocab_size, data.tokenizer.mask_id) == (tokenizer.vocab_size, tokenizer.vocab_size + 1,
                                                                       None)
    shards = TokenData(np.zeros(10, np.uint16), np.zeros(10, np.uint16), None, 40, "shards")
    assert with_mask_token(shards)[1] == 40 and with_mask_token(shards)[0].vocab_size == 41


def test_a_tokenizers_own_mask_token_is_kept(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({"[PAD]": 0, "[MASK]": 1, "[SEP]": 2, "a": 3}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = Tokenizer(tok)
    assert t.mask_id == 1 and t.with_mask_token() is t


def test_the_checkpoint_tokenizer_finds_the_encoders_token_cache(tmp_path):
    (tmp_path / "code.py").write_text("def f(x):\n    return x + 1\n" * 200)
    cfg = DataConfig(path=str(tmp_path / "code.py"), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    data = load_data(cfg, progress=False)
    again = load_data(cfg, progress=False, tokenizer=data.tokenizer.with_mask_token())
    assert again.cache_path == data.cache_path  # no second tokenisation of the corpus
    assert len(list((tmp_path / "cache").iterdir())) == 1


# ---------------------------------------------------------------- training
def periodic_data(vocab: int = 64, n: int = 4000) -> TokenData:
    """Tokens 1..8 repeating with 10% noise: a masked token is predictable from its neighbours."""
    rng = np.random.default_rng(0)
    toks = (np.arange(n) % 8 + 1).astype(np.uint16)
    noise = rng.random(n) < 0.1
    toks[noise] = rng.integers(0, vocab, noise.sum())
    return TokenData(train=toks[:3500], val=toks[3500:], tokenizer=None, vocab_size=vocab, source="periodic")


def encoder_cfg(steps: int = 20, block: str = "preln", **model) -> RunConfig:
    cfg = RunConfig()
    attention = "softmax" if block in ("preln", "parallel") else "shaped"
    cfg.model = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, causal=False,
                                  block=block, attention=attention, **model)
    cfg.train = TrainConfig(steps=steps, batch_size=8, seq_len=32, eval_every=10, eval_batches=2, log_every=1,
                            progress=False, lr=1e-2, mask_rate=0.25, warmup_frac=0.1)
    return cfg


@pytest.mark.parametrize("block, norm", [("preln", "layernorm"), ("sas_p", "rmsnorm"), ("sas_p", "none")])
def test_twenty_steps_lower_the_mlm_loss(block, norm):
    trainer = Trainer(encoder_cfg(block=block, norm=norm), periodic_data())
    history = trainer.fit()
    evals = [r for r in history if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # from ~ln 65 towards the 8 tokens' entropy
    assert all(0 <= r["val_mlm_acc"] <= 1 and "val_ppl" not in r for r in evals)
    assert trainer.model.cfg.vocab_size == 65 and trainer.masking.mask_id == 64  # one row for the mask token


def test_an_interrupted_encoder_resumes_exactly(tmp_path):
    data = periodic_data()
    full = Trainer(encoder_cfg(steps=6, dropout=0.1), data, out_dir=tmp_path / "a").fit()
    Trainer(encoder_cfg(steps=6, dropout=0.1), data, out_dir=tmp_path / "b").fit(stop_after=3)
    rest = Trainer(encoder_cfg(steps=6, dropout=0.1), data, out_dir=tmp_path / "b").fit()
    assert [r["loss"] for r in full if "loss" in r] == [r["loss"] for r in rest if "loss" in r]  # same masks


def test_mlm_on_a_causal_model_is_refused():
    from leanformer.config import ConfigError
    from leanformer.model import TransformerLM

    cfg = encoder_cfg()
    causal = TransformerLM(TransformerConfig(vocab_size=65, d_model=32, n_layers=1, n_heads=4))
    with pytest.raises(ConfigError, match="needs an encoder, but the model given is causal"):
        Trainer(cfg, periodic_data(), model=causal)


def test_cli_trains_evaluates_and_refuses_to_generate_with_an_encoder(tmp_path, capsys):
    text = tmp_path / "code.py"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)))
    out = tmp_path / "run"
    common = ["--data", str(text), "--out", str(out), "--set", "model.causal=false", "--set", "model.d_model=32",
              "--set", "model.n_layers=1", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
              "--set", "train.eval_batches=2", "--set", "train.eval_every=5", "--set", "data.vocab_size=300",
              "--set", "train.progress=false"]
    assert main(["train", *common, "--set", "train.steps=5"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--set", "train.steps=10"]) == 0  # resumes from step 5
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10]
    assert "val_mlm_acc" in records[-1] and last["val_loss"] == records[-1]["val_loss"]
    tok = load_tokenizer(out / "checkpoint")
    model = load_model(out / "checkpoint")
    assert tok.mask_id == tok.vocab_size - 1 == model.cfg.vocab_size - 1 and not model.cfg.causal
    assert main(["eval", "--checkpoint", str(out / "checkpoint"), "--batches", "2"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)  # the trainer's masks
    assert evaluated["val_mlm_acc"] == pytest.approx(records[-1]["val_mlm_acc"])
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "def"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: generate() needs a causal language model") and "\n" not in err


def test_compare_trains_encoder_arms(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "smoke", "--arms", "preln,sas,sas_p,sas_p_nonorm", "--out", str(out),
            "--set", "model.causal=false", "--set", "train.steps=4", "--set", "train.eval_every=2",
            "--no-progress"]
    assert main(argv) == 0
    for arm in ("preln", "sas", "sas_p", "sas_p_nonorm"):
        done = json.loads((out / "arms" / arm / "done.json").read_text())
        assert done["decode"] == {} and done["sample"] is None
        assert 0 <= done["final_val_mlm_acc"] <= 1 and done["final_val_loss"] > 0
    report = (out / "report.md").read_text()
    assert "| sas_p_nonorm |" in report
    assert "| final val MLM loss | MLM accuracy |" in report and "| ppl |" not in report  # no perplexity
