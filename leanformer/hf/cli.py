"""``leanformer import PATH --out DIR`` and ``leanformer export --checkpoint DIR --out DIR [--family F]``.

The lead's :mod:`leanformer.cli` finds ``add_import_arguments`` / ``add_export_arguments`` here; each sets
``func``. Errors are :class:`~leanformer.hf.UnsupportedModelError` / ``ConfigError`` (ValueErrors, one
line), printed by the main CLI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanformer.config import ConfigError


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty (pass --force to overwrite)")


def cmd_import(args: argparse.Namespace) -> int:
    """A Hugging Face folder → one of our checkpoint folders (+ its tokenizer.json)."""
    from leanformer.hf.importer import from_hf
    from leanformer.train.checkpoint import save_checkpoint

    out = Path(args.out)
    _check_out(out, args.force)
    model = from_hf(args.path, dtype=None)
    model = model.float() if args.float32 else model
    tokenizer = None
    tok_file = Path(args.path) / "tokenizer.json"
    if tok_file.exists():
        from leanformer.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tok_file)
    save_checkpoint(out, model, tokenizer=tokenizer)
    print(json.dumps({"out": str(out), "params": model.num_params(), "block": model.cfg.block,
                      "tokenizer": tokenizer is not None}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One of our checkpoints → a Hugging Face model folder (leanformer format or the original family's)."""
    from leanformer.hf.exporter import to_hf
    from leanformer.train.checkpoint import load_model

    out = Path(args.out)
    _check_out(out, args.force)
    model = load_model(args.checkpoint).eval()
    tok_file = Path(args.checkpoint) / "tokenizer.json"
    family = None if args.family == "leanformer" else args.family
    to_hf(model, out, tokenizer=tok_file if tok_file.exists() else None, family=family)
    print(json.dumps({"out": str(out), "family": args.family, "params": model.num_params(),
                      "tokenizer": tok_file.exists()}))
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a local Hugging Face model folder (config.json + weights) of "
                                     "gpt2, gpt_neox (Pythia) or llama")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--float32", action="store_true", help="store the weights in float32")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.set_defaults(func=cmd_import)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="one of our checkpoint folders")
    parser.add_argument("--out", required=True, help="Hugging Face model folder to write")
    parser.add_argument("--family", choices=["leanformer", "gpt2", "gpt_neox", "llama"], default="leanformer",
                        help="leanformer (any model; load after leanformer.hf.register()) or a plain model's "
                             "original format")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.set_defaults(func=cmd_export)
