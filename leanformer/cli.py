"""The ``leanformer`` command line: train, eval, generate, convert, compare, bench, import, export, finetune.

Every command has ``--help``. Bad input (unknown config key, a value of the wrong type, missing data or
checkpoint, a shape that cannot work) prints one ``error:`` line and exits with status 2 before anything is
written; only our own error types (:class:`ConfigError`, :class:`DataError`, :class:`CheckpointError`) are
shown that way, any other exception keeps its traceback. SIGINT / SIGTERM during training save a checkpoint
and exit with status 130 / 143 (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

import yaml

from leanformer.config import ConfigError, RunConfig, from_dict, set_dotted

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package (wheel included)


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of one in ``leanformer/configs/`` (``tiny`` → ``configs/tiny.yaml``)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"config file {name} does not exist")


def load_run_config(path: str | None, overrides: list[str] = (), data: str | None = None) -> RunConfig:
    """YAML file → dotted ``--set`` overrides → ``--data`` → validated :class:`RunConfig`."""
    raw: dict = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file} must hold a mapping of sections (model:, train:, data:), "
                              f"got {type(raw).__name__}")
    for assignment in overrides:
        set_dotted(raw, assignment)
    if data is not None:
        raw.setdefault("data", {})["path"] = data
    cfg = from_dict(RunConfig, raw)
    try:
        return cfg.validate()
    except TypeError as e:  # a value of the wrong type, e.g. a string where a number belongs
        raise ConfigError(f"bad config value: {e}") from None


def _check_data_path(path: str | None) -> None:
    if path is not None and not any(ch in path for ch in "*?[") and not Path(path).expanduser().exists():
        raise ConfigError(f"data path {path} does not exist")


def _absolute(path: str | None) -> str | None:
    """``path`` made absolute (globs kept), so a checkpoint's config works from any folder."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from leanformer.train import train

    if args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc, args.argv)
    cfg = load_run_config(args.config, args.set, args.data)
    if args.print_config:  # every key with its value: the reference for --set and YAML files
        from leanformer.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _check_data_path(cfg.data.path)
    from leanformer.device import resolve_device

    resolve_device(cfg.train.device)  # train.device=cuda without a GPU: an error before anything is written
    cfg.data.path, cfg.data.tokenizer, cfg.data.cache_dir = (
        _absolute(cfg.data.path), _absolute(cfg.data.tokenizer), _absolute(cfg.data.cache_dir))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    data = _training_data(cfg, None if args.no_resume else out / "checkpoint")
    trainer = train(cfg, out_dir=out, data=data, resume=not args.no_resume)
    if trainer.ctx.is_main:
        last = next((r for r in reversed(trainer.history) if "val_loss" in r), {})
        print(json.dumps({"out": str(out), "step": trainer.step, "val_loss": last.get("val_loss"),
                          "params": trainer.model.num_params()}))
    return 0


def _training_data(cfg: RunConfig, checkpoint: Path | None):
    """The data of ``cfg``, tokenised with the tokenizer of the checkpoint a resume will load (if any)."""
    from leanformer.data import load_data
    from leanformer.train import distributed as dist_utils
    from leanformer.train.checkpoint import latest_checkpoint, load_tokenizer

    found = latest_checkpoint(checkpoint) if checkpoint is not None else None
    tokenizer = load_tokenizer(found) if found is not None else None
    return load_data(cfg.data, rank=dist_utils.context().rank, progress=cfg.train.progress, tokenizer=tokenizer)


def _relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """``leanformer train --nproc N ...`` = ``torchrun --standalone --nproc_per_node N -m leanformer train ...``."""
    import subprocess

    argv = [a for a in argv if not a.startswith("--nproc=")]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        del argv[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "leanformer", *argv]
    return subprocess.call(cmd)


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from leanformer.data import eval_batches, load_data
    from leanformer.train.checkpoint import load_model, load_tokenizer, run_config_of

    if args.batches < 1:
        raise ConfigError(f"--batches {args.batches} must be >= 1")
    cfg = run_config_of(args.checkpoint)
    if args.data is not None:
        _check_data_path(args.data)
        cfg.data.path = args.data
    model = load_model(args.checkpoint).eval()
    # the checkpoint's own tokenizer, never one trained anew on this data (the token ids would not match)
    data = load_data(cfg.data, tokenizer=load_tokenizer(args.checkpoint))
    if data.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"the data has {data.vocab_size} token ids but the checkpoint's model has "
                          f"{model.cfg.vocab_size}")
    batches = eval_batches(data.val, cfg.train.batch_size, cfg.train.seq_len, args.batches)
    import torch

    if not model.cfg.causal:  # an encoder: masked-LM loss and accuracy (leanformer.train.mlm)
        from leanformer.train.mlm import evaluate_encoder

        print(json.dumps({**evaluate_encoder(model, data, batches, cfg.train.mask_rate), "batches": len(batches)}))
        return 0
    with torch.no_grad():
        loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    print(json.dumps({"val_loss": loss, "val_ppl": math.exp(loss), "batches": len(batches)}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from leanformer.train.checkpoint import CheckpointError, load_model, load_tokenizer

    _check_sampling(args)
    model = load_model(args.checkpoint).eval()
    tok = load_tokenizer(args.checkpoint)
    if tok is None:
        raise CheckpointError(f"checkpoint {args.checkpoint} has no tokenizer.json (trained on .bin shards?)")
    ids = tok.encode(args.prompt) or [tok.eot_id]
    if model.cfg.pos == "learned" and len(ids) + args.max_new_tokens > model.cfg.max_seq_len:
        raise ConfigError(f"the prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                          f"model's context of {model.cfg.max_seq_len} tokens (learned positions); use "
                          f"--max-new-tokens {max(model.cfg.max_seq_len - len(ids), 0)} or a shorter prompt")
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, generator=g)
    print(tok.decode(out[0].tolist()))
    return 0


def _check_sampling(args: argparse.Namespace) -> None:
    """``generate``'s arguments, checked before the model is loaded."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature {args.temperature} must be a finite number >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k} must be >= 1 (the number of likeliest tokens sampled from)")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that were not UTF-8 reach Python as lone surrogates
        byte = ord(args.prompt[e.start]) - 0xDC00 if 0xDC80 <= ord(args.prompt[e.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else repr(args.prompt[e.start])
        raise ConfigError(f"--prompt is not valid UTF-8 ({what} at character {e.start}); pass UTF-8 text") \
            from None


def cmd_convert(args: argparse.Namespace) -> int:
    from leanformer.convert import convert_to_dijiang
    from leanformer.train.checkpoint import load_model, load_tokenizer, read_config, save_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out} exists and is not empty (pass --force to overwrite)")
    parent = load_model(args.checkpoint)
    model = convert_to_dijiang(parent, feature_map=args.feature_map)
    run_cfg = from_dict(RunConfig, read_config(args.checkpoint))
    save_checkpoint(out, model, run_cfg, tokenizer=load_tokenizer(args.checkpoint))
    print(json.dumps({"out": str(out), "params": model.num_params(), "parent_params": parent.num_params()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanformer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", default="tiny", help="YAML file, or a name in leanformer/configs/ (default: tiny)")
    t.add_argument("--data", help="text file, folder, .jsonl or .bin shard(s); default: the built-in corpus")
    t.add_argument("--out", default="runs/train", help="output folder (metrics.jsonl, checkpoint/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set train.steps=100")
    t.add_argument("--nproc", type=int, default=1, help="processes (relaunches under torchrun)")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    t.add_argument("--print-config", action="store_true",
                   help="print the full resolved config (every key, defaults included) as YAML and exit")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", help="evaluate on this data instead of the checkpoint's")
    e.add_argument("--batches", type=int, default=16)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a softmax checkpoint to DiJiang attention (then fine-tune)")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--feature-map", choices=["paper", "official"], default="paper")
    c.add_argument("--out", required=True)
    c.add_argument("--force", action="store_true")
    c.set_defaults(func=cmd_convert)

    for name, module, func, helptext in (
        ("compare", "leanformer.compare.cli", "add_arguments", "train every method side by side and report"),
        ("bench", "leanformer.bench.cli", "add_arguments", "speed and memory benchmarks"),
        ("import", "leanformer.hf.cli", "add_import_arguments", "import a Hugging Face model"),
        ("export", "leanformer.hf.cli", "add_export_arguments", "export a checkpoint as a Hugging Face model"),
        ("finetune", "leanformer.finetune.cli", "add_arguments", "fine-tune a classifier: full, LoRA or NOBLE"),
    ):
        getattr(importlib.import_module(module), func)(sub.add_parser(name, help=helptext))
    return p


def main(argv: list[str] | None = None) -> int:
    from leanformer.data import DataError
    from leanformer.train.checkpoint import CheckpointError
    from leanformer.train.signals import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank sees the same: say it once
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        # Bad input (config, data, checkpoint, an argument a model cannot take): one line, exit 2.
        # Only our own error types: anything else is a bug and keeps its traceback.
        # LEANFORMER_DEBUG=1 shows the traceback here too.
        if os.environ.get("LEANFORMER_DEBUG"):
            raise
        if main_rank:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loss diverged: the last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: the step finished and a checkpoint was saved
        if main_rank:
            print(str(e), file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        if main_rank:
            print("interrupted: stopped at once, without saving; re-run the same command to resume from the "
                  "last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
