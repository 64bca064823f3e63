"""The trainer: optimizer groups, schedule, resume equals an uninterrupted run, CLI end to end and errors."""

import json

import numpy as np
import pytest
import torch

from leanformer.cli import main
from leanformer.config import RunConfig, TrainConfig, TransformerConfig
from leanformer.data import TokenData
from leanformer.model import TransformerLM
from leanformer.train import Trainer, build_optimizer, lr_at
from leanformer.train.optim import param_groups


def random_data(vocab: int = 64, n: int = 4000) -> TokenData:
    rng = np.random.default_rng(0)
    # a learnable pattern: token t+1 = (token t * 3 + 1) mod vocab, with noise
    toks = np.empty(n, dtype=np.uint16)
    toks[0] = 1
    for i in range(1, n):
        toks[i] = (toks[i - 1] * 3 + 1) % vocab if rng.random() > 0.1 else rng.integers(vocab)
    return TokenData(train=toks[:3500], val=toks[3500:], tokenizer=None, vocab_size=vocab, source="random")


def run_cfg(steps: int = 6, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.model = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dropout=0.1)
    cfg.train = TrainConfig(steps=steps, batch_size=4, seq_len=16, eval_every=3, eval_batches=2, log_every=1,
                            progress=False, lr=3e-3, **train)
    return cfg


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def test_resume_equals_uninterrupted_run(tmp_path):
    data = random_data()
    full = Trainer(run_cfg(), data, out_dir=tmp_path / "a").fit()
    first = Trainer(run_cfg(), data, out_dir=tmp_path / "b")
    first.fit(stop_after=3)  # writes a checkpoint after 3 steps, as a kill after a save would leave
    resumed = Trainer(run_cfg(), data, out_dir=tmp_path / "b")
    assert resumed.step == 3
    rest = resumed.fit()
    assert losses(full) == losses(rest)  # bit-for-bit on CPU (dropout RNG and data position restored)
    recorded = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in recorded if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_training_lowers_the_loss(tmp_path):
    history = Trainer(run_cfg(steps=30), random_data(), out_dir=None).fit()
    vals = [r["val_loss"] for r in history if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5


def test_grad_accumulation_matches_a_bigger_batch():
    torch.manual_seed(0)
    model = TransformerLM(run_cfg().model).eval()  # no dropout: the two must compute the same thing
    x = torch.randint(0, 64, (4, 16))
    model.zero_grad()
    model(x, x)[1].backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in (x[:2], x[2:]):
        (model(half, half)[1] / 2).backward()
    for a, p in zip(big, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_param_groups_honour_lr_mult_and_weight_decay():
    model = TransformerLM(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4))
    model.blocks[0].mlp.optim_settings = lambda: {"ffn_in.weight": {"lr_mult": 4.0}}  # a module declares
    groups = param_groups(model, 0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.blocks[0].mlp.ffn_in.weight)]["lr_mult"] == 4.0
    assert by_param[id(model.blocks[0].norm1.weight)]["weight_decay"] == 0.0
    assert by_param[id(model.blocks[0].attn.q.weight)]["weight_decay"] == 0.1
    opt = build_optimizer(model, TrainConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_schedule_warmup_then_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_frac=0.1, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    lin = TrainConfig(steps=100, lr=1.0, warmup_frac=0.0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(50, lin) == pytest.approx(0.5)


def test_cli_train_generate_eval_on_a_text_file(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(400)))
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(text), "--out", str(out),
            "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.batch_size=2",
            "--set", "train.seq_len=32", "--set", "train.progress=false", "--set", "data.vocab_size=300",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "def", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert main(["eval", "--checkpoint", str(out / "checkpoint"), "--batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "val_loss" in printed and "def" in printed


@pytest.mark.parametrize("args,message", [
    (["train", "--set", "model.n_layer=2"], "unknown config key 'model.n_layer'; did you mean 'model.n_layers'"),
    (["train", "--data", "/no/such/data"], "data path /no/such/data does not exist"),
    (["train", "--set", "model.d_model=100", "--set", "model.n_heads=3"], "not divisible"),
    (["generate", "--checkpoint", "/no/such/ckpt"], "does not exist"),
])
def test_cli_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(args + (["--out", str(tmp_path / "o")] if args[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_cli_convert_to_dijiang_then_fine_tune(tmp_path, capsys):
    """`leanformer convert` writes a DiJiang checkpoint that inherits the parent's weights and trains on."""
    from leanformer.train.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    parent = TransformerLM(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    save_checkpoint(tmp_path / "parent", parent, run_cfg())
    assert main(["convert", "--checkpoint", str(tmp_path / "parent"), "--out",
                 str(tmp_path / "dj")]) == 0
    child = load_model(tmp_path / "dj")
    assert child.cfg.attention == "dijiang"
    assert torch.equal(child.blocks[1].attn.q.weight, parent.blocks[1].attn.q.weight)
    assert torch.equal(child.blocks[0].mlp.ffn_in.weight, parent.blocks[0].mlp.ffn_in.weight)
    # converting again into the same folder refuses to overwrite
    assert main(["convert", "--checkpoint", str(tmp_path / "parent"), "--out", str(tmp_path / "dj")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # and the converted model fine-tunes with the trainer
    cfg = run_cfg(steps=2)
    cfg.model = child.cfg
    history = Trainer(cfg, random_data(), model=child).fit()
    assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)


def test_kv_cache_buffers_grow_and_views_match_concatenation():
    from leanformer.layers.attention import append_to_cache

    state, pieces = {}, []
    for t in (3, 1, 70, 1):  # crosses the initial capacity of 64 and the 1.5x growth
        piece = torch.randn(2, 4, t, 8)
        pieces.append(piece)
        out = append_to_cache(state, k=piece)
        assert torch.equal(out["k"], torch.cat(pieces, dim=2))
    assert state["k_len"] == 75 and state["k_buf"].shape[2] >= 75


def test_cli_rejects_data_with_more_token_ids_than_the_vocabulary(tmp_path, capsys):
    from dist_helpers import write_shards

    shards = write_shards(tmp_path / "shards", vocab=64)
    args = ["train", "--data", str(shards), "--out", str(tmp_path / "o"), "--set", "model.vocab_size=32",
            "--set", "train.progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the data has 64 token ids but model.vocab_size is 32" in err and "\n" not in err.strip()


def test_compile_mode_reaches_torch_compile_and_refuses_what_cuda_graphs_cannot_run(monkeypatch):
    """train.compile_mode: torch.compile's mode (None for "default"); compiled on CUDA, a CUDA-graph mode refuses
    gradient accumulation (a replay overwrites the last one's outputs) and several processes, before the trainer
    writes anything; a bad mode names the choices."""
    from leanformer.config import ConfigError
    from leanformer.train import loop

    assert TrainConfig().compile_mode == "default"
    seen = []
    monkeypatch.setattr(loop.torch, "compile", lambda fn, mode=None: seen.append(mode) or fn)
    for mode, expected in (("default", None), ("reduce-overhead", "reduce-overhead"),
                           ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")):
        cfg = run_cfg(steps=1, compile=True, compile_mode=mode)
        Trainer(cfg, random_data(), out_dir=None).fit()
        assert seen[-1] == expected
    with pytest.raises(ConfigError, match="train.compile_mode='fast' is not valid"):
        TrainConfig(compile_mode="fast").validate()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphs = TrainConfig(compile_mode="reduce-overhead", grad_accum=2)
    assert loop.cuda_graph_refusal(graphs, cuda, 1).startswith(
        "train.compile_mode=reduce-overhead replays CUDA graphs, whose outputs the next replay overwrites, so "
        "train.grad_accum=2 cannot")
    assert loop.cuda_graph_refusal(graphs, cpu, 1) is None  # no CUDA graphs on the CPU
    assert loop.cuda_graph_refusal(TrainConfig(compile_mode="max-autotune", compile=False), cuda, 2) is None
    assert "runs in one process here, not 2" in loop.cuda_graph_refusal(TrainConfig(compile_mode="max-autotune"),
                                                                          cuda, 2)
    assert loop.cuda_graph_refusal(TrainConfig(compile_mode="max-autotune-no-cudagraphs", grad_accum=2), cuda, 2) \
        is None
    monkeypatch.setattr(loop, "resolve_device", lambda _: cuda)  # the refusal comes first, before the model moves
    with pytest.raises(ConfigError, match="train.grad_accum=2 cannot"):
        Trainer(run_cfg(steps=1, compile_mode="reduce-overhead", grad_accum=2), random_data(), out_dir=None)
