"""Presets of ``leanformer compare``: the shared baseline config plus decoding and fine-tune settings.

One optimizer recipe for every arm trained from scratch (the fairer choice: no arm gets a recipe tuned
for it). It is the simplified-blocks paper's (He & Hofmann 2024, official code), which used one recipe
for Pre-LN and SAS alike: AdamW, betas (0.9, 0.999), weight decay 0.1 (not on gains, norms, biases),
gradient clip 1.0, 5% linear warm-up then linear decay to zero. The learning rate is scaled to the
preset's width. ``dijiang_convert`` has its own (the DiJiang fine-tune recipe, see
:func:`leanformer.compare.arms.finetune_config`).

The model family is the simplified-blocks paper's too: RMSNorm, ReLU MLP of width 4d, no biases, RoPE.
NOBLE's rank keeps the paper's parameter overhead (r = 32 at d = 768, about 6%): r = d_model / 24.

The CPU presets train on one thread (``--threads`` changes it): on a busy 2-core machine two threads
were 5–10× slower per step than one (2026-11-23, load average 6.7: the cpu preset's preln step took
343 ms on one thread, 3447 ms on two), and one thread keeps the arms' timings comparable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from leanformer.config import ConfigError

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s (SXM)

_RECIPE = {
    "betas": [0.9, 0.999], "weight_decay": 0.1, "grad_clip": 1.0, "warmup_frac": 0.05,
    "schedule": "linear", "min_lr_ratio": 0.0,
}
_FAMILY = {"norm": "rmsnorm", "ffn_act": "relu", "bias": False, "pos": "rope", "tie_embeddings": True}


@dataclass(frozen=True)
class Preset:
    """A comparison preset: ``run`` is the baseline :class:`RunConfig` as a dict (arms transform it)."""

    name: str
    description: str
    run: dict[str, Any]
    decode_contexts: tuple[int, ...]  # context lengths for the decoding latency (batch 1, greedy, cached)
    decode_tokens: int = 16  # timed decoding steps per context (median reported)
    decode_warmup: int = 3
    sample_tokens: int = 48  # greedy sample shown in the report
    sample_prompt: str = "def "
    convert_fraction: float = 0.1  # dijiang_convert fine-tunes on this fraction of the baseline's tokens
    convert_lr_ratio: float = 0.3  # fine-tune lr = ratio × baseline lr (official 3e-4 over Pythia-70M's 1e-3)
    convert_warmup_frac: float = 0.1
    convert_distill_weight: float = 0.0  # KL to the parent's logits during the fine-tune (0: LM loss only)
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)

    def run_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.run)


def _run(model: dict, train: dict, data: dict) -> dict[str, Any]:
    d = model["d_model"]
    model = {**_FAMILY, "noble": {"rank": max(4, d // 24)}, **model}
    return {"model": model, "train": {**_RECIPE, **train}, "data": data}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "smoke",
        "every arm in under a minute on 2 CPU cores (tests): tiny model, 20 steps, 40 files, vocab 512",
        _run(model={"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
             train={"steps": 20, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "eval_every": 10,
                    "eval_batches": 2, "log_every": 5, "device": "cpu", "dtype": "float32"},
             data={"vocab_size": 512, "max_files": 40}),
        decode_contexts=(32, 64, 128), decode_tokens=4, decode_warmup=1, sample_tokens=16, threads=1,
    ),
    Preset(
        "cpu",
        "the default: all 8 arms in about 13 minutes on a 2-core CPU (tokenising the built-in corpus "
        "once included): d 128, 4 layers, 250 steps of 16 x 128 tokens, vocab 2048, one thread",
        _run(model={"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 128},
             train={"steps": 250, "batch_size": 16, "seq_len": 128, "lr": 2e-3, "eval_every": 25,
                    "eval_batches": 8, "log_every": 10, "save_every": 100, "device": "cpu",
                    "dtype": "float32"},
             data={"vocab_size": 2048}),
        decode_contexts=(128, 512, 2048), decode_tokens=32, decode_warmup=3, threads=1,
    ),
    Preset(
        "gpu",
        "GPT-2 small (124M with a 32K vocabulary), seq 1024, bf16, compiled, 101.6M tokens per arm on the "
        "standard library + installed packages; one arm per 10-minute H100 run (benchmarks/compare_gpu.sh)",
        # 3,100 steps x 32 x 1,024 = 101.6M tokens per arm (issue: >= 100M). At the compiled H100
        # throughput of Pre-LN GPT-2 small (427K tokens/s, 2026-11-24) that is ~4 minutes of training,
        # one arm per machine with tokenising, compiling, evaluation and decoding inside 10 minutes.
        _run(model={"d_model": 768, "n_layers": 12, "n_heads": 12, "max_seq_len": 1024},
             train={"steps": 3100, "batch_size": 32, "seq_len": 1024, "lr": 1e-3, "eval_every": 250,
                    "eval_batches": 16, "log_every": 50, "save_every": 0, "device": "auto",
                    "dtype": "auto", "sampling": "epoch"},
             # disjoint windows from ~480 MB of source (~125M train tokens at ~3.7 characters a token): no
             # token is a target twice; the BPE learns from 100M characters of it (tokenising is per machine)
             data={"vocab_size": 32768, "builtin": "all", "max_chars": 480_000_000,
                   "tokenizer_chars": 100_000_000}),
        decode_contexts=(2048, 8192), decode_tokens=32, decode_warmup=5, sample_tokens=64,
        convert_distill_weight=1.0,
    ),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def training_flops(preset: Preset, n_arms_from_scratch: int = 7) -> float:
    """Training FLOPs of a whole comparison: the from-scratch arms plus the converted arm's fine-tune,
    from :meth:`TransformerLM.flops_per_token` of the baseline (6N + attention; Kaplan et al. 2020)."""
    from leanformer.config import RunConfig, from_dict
    from leanformer.model import TransformerLM

    cfg = from_dict(RunConfig, preset.run_dict()).validate()
    cfg.model.vocab_size = cfg.data.vocab_size
    import torch

    with torch.device("meta"):
        model = TransformerLM(cfg.model)
    t = cfg.train
    tokens = t.steps * t.batch_size * t.seq_len * t.grad_accum
    per_arm = model.flops_per_token(t.seq_len) * tokens
    return per_arm * (n_arms_from_scratch + preset.convert_fraction)


def estimated_seconds(preset: Preset, peak_flops: float = H100_BF16_PEAK, mfu: float = 0.4) -> float:
    """Training time of all arms at ``mfu`` of ``peak_flops`` (evaluation and decoding not counted)."""
    return training_flops(preset) / (peak_flops * mfu)
