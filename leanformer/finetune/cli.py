"""``leanformer finetune``: fine-tune a classifier on labelled text and write the model and results.json.

:mod:`leanformer.cli` finds :func:`add_arguments` here; it sets ``func``. Bad input raises
``ConfigError`` / ``DataError`` / ``CheckpointError`` (one ``error:`` line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from pathlib import Path

from leanformer.config import ConfigError
from leanformer.finetune.methods import METHODS, TARGETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fine-tune a sequence classifier (single texts or pairs) with full fine-tuning, LoRA (PEFT) or NOBLE; "
        "report accuracy (F1, Matthews correlation), trainable parameters and step time; save the model, "
        "adapters and results.json into --out. docs/finetune.md has the details.")
    data = parser.add_argument_group("data")
    data.add_argument("--train", help="training file: .csv, .tsv or .jsonl with text, [text_pair,] label")
    data.add_argument("--validation", help="validation file (default: hold out --val-fraction of --train)")
    data.add_argument("--task", help="a GLUE task through Hugging Face datasets instead of files, e.g. glue/sst2")
    data.add_argument("--text-column", default="text")
    data.add_argument("--pair-column", default="text_pair")
    data.add_argument("--label-column", default="label")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--max-train", type=int, help="use at most this many training examples (seeded sample)")
    model = parser.add_argument_group("model and method")
    model.add_argument("--model", required=True,
                       help="a Hugging Face model folder (AutoModelForSequenceClassification), a leanformer "
                            "checkpoint folder, or 'minilm' (the packaged all-MiniLM-L6-v2)")
    model.add_argument("--method", choices=METHODS, default="full",
                       help="full: everything trains; lora: PEFT LoRA, base frozen; noble: NOBLE branches, base "
                            "frozen; noble_all: NOBLE branches and everything else (default: full)")
    model.add_argument("--rank", type=int, default=8, help="LoRA / NOBLE rank (default 8)")
    model.add_argument("--targets", choices=TARGETS, default="all",
                       help="all: every linear layer of the blocks (default); attention: W_q and W_v")
    model.add_argument("--match-params", metavar="BUDGET",
                       help="pick --rank so the trainable parameters come closest to BUDGET: a number, or "
                            "lora:R / noble:R (what that method trains at rank R on the same targets)")
    model.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    model.add_argument("--lora-dropout", type=float, default=0.0)
    model.add_argument("--noble-activation", choices=["cosnet", "silu", "gelu", "tanh"], default="cosnet")
    model.add_argument("--no-noble-lr-mults", action="store_true",
                       help="train NOBLE's branches without its per-parameter learning-rate multipliers")
    model.add_argument("--dropout", type=float, default=0.1, help="head dropout of leanformer encoders")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--eval-batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5 for full and noble_all, "
                                                "5e-4 for lora and noble)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup", type=float, default=0.06, help="warm-up share of the steps (default 0.06)")
    train.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: none)")
    train.add_argument("--max-len", type=int, default=128, help="tokens per example (pairs: both together)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:N")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    save = parser.add_argument_group("output")
    save.add_argument("--out", required=True, help="output folder (model, adapter, results.json)")
    save.add_argument("--merge", action="store_true", help="LoRA: also save the merged weights (model/)")
    save.add_argument("--export-hf", action="store_true",
                      help="make model/ a folder AutoModelForSequenceClassification loads, where the "
                           "architecture allows (not NOBLE in a Hugging Face model: a note says so)")
    save.add_argument("--no-save", action="store_true", help="write results.json only")
    save.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(func=run)


def _load_data(args: argparse.Namespace):
    from leanformer.finetune.data import Columns, load_files, load_glue

    if args.task and (args.train or args.validation):
        raise ConfigError("give either --task or --train/--validation files, not both")
    if args.task:
        return load_glue(args.task, max_train=args.max_train, seed=args.seed)
    if not args.train:
        raise ConfigError("give --train FILE (CSV/TSV/JSONL with text, label) or --task glue/NAME")
    columns = Columns(args.text_column, args.pair_column, args.label_column)
    data = load_files(args.train, args.validation, columns, args.val_fraction, args.seed)
    if args.max_train is not None and args.max_train < len(data.train):
        import random

        data.train = random.Random(args.seed).sample(data.train, args.max_train)
        data.label_ids.pop("train", None)
    return data


def run(args: argparse.Namespace) -> int:
    import torch

    from leanformer.finetune.export import save_finetuned
    from leanformer.finetune.methods import (
        MethodSpec,
        apply_method,
        parse_budget,
        planned_trainable,
        rank_for_budget,
        trainable_summary,
    )
    from leanformer.finetune.models import load_classifier
    from leanformer.device import resolve_device
    from leanformer.finetune.trainer import DEFAULT_LR, TrainSettings, finetune

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out} exists and is not empty (pass --force to write into it)")
    if args.max_train is not None and args.max_train < 1:
        raise ConfigError(f"--max-train {args.max_train} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    spec = MethodSpec(args.method, args.rank, args.targets, args.lora_alpha, args.lora_dropout,
                      args.noble_activation, not args.no_noble_lr_mults).validate()
    settings = TrainSettings(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             eval_batch_size=args.eval_batch_size, lr=args.lr or DEFAULT_LR[args.method],
                             weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip, seed=args.seed,
                             max_len=args.max_len, device=args.device, progress=not args.no_progress).validate()
    device = resolve_device(settings.device, "--device")
    if args.no_progress:  # transformers' own bars too (loading, and the shards an --export-hf writes)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    data = _load_data(args)
    print(f"data: {data.source}: {len(data.train)} training, {len(data.val)} validation examples, "
          f"{data.labels.num_labels} labels{' (pairs)' if data.pairs else ''}")
    torch.manual_seed(args.seed)  # the new head, the LoRA / NOBLE initialisation
    clf = load_classifier(args.model, data.labels, args.dropout, progress=not args.no_progress)
    if args.match_params is not None:
        budget = parse_budget(clf, spec, args.match_params)
        spec.rank = rank_for_budget(clf, spec, budget)
        print(f"--match-params {args.match_params}: budget {budget:,} trainable parameters -> {spec.method} rank "
              f"{spec.rank} ({planned_trainable(clf, spec):,})")
    settings.max_len = min(settings.max_len, clf.max_len)
    model = apply_method(clf, spec)
    counts = trainable_summary(model)
    print(f"model: {clf.source} ({clf.kind}, {clf.model_type}); method {spec.method}"
          f"{'' if spec.method == 'full' else f', rank {spec.rank}, targets {spec.targets}'}: "
          f"{counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
          f"({100 * counts['trainable_share']:.3f}%)")
    start = time.time()
    result = finetune(model, clf.tokenizer, data, settings)
    seconds = time.time() - start
    results = {
        "command": shlex.join(["leanformer", *args.argv]) if hasattr(args, "argv") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "torch": torch.__version__},
        "data": {"source": data.source, "task": data.task, "train": len(data.train), "val": len(data.val),
                 "labels": data.labels.names, "pairs": data.pairs, "glue_metrics": list(data.metrics)},
        "model": {"source": clf.source, "kind": clf.kind, "model_type": clf.model_type},
        "method": spec.to_dict(), **counts,
        "train": {**settings.__dict__, "steps": result.steps, "seconds": seconds},
        **result.step_time(),
        "final": result.final, "history": result.history,
    }
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_save:
        manifest = save_finetuned(out, clf, model, spec, merge=args.merge, export_hf=args.export_hf,
                                  extra={"trainable_params": counts["trainable_params"]})
        results["saved"] = manifest["files"]
        results["hf_loadable"] = manifest["hf_loadable"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    final = result.final
    print(json.dumps({"out": str(out), "val_accuracy": final.get("val_accuracy"), "val_f1": final.get("val_f1"),
                      "val_mcc": final.get("val_mcc"), "trainable_params": counts["trainable_params"],
                      "step_time_s": results.get("step_time_s_median")}))
    return 0
