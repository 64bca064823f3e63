"""A small classification task made on this machine, no download: which standard-library package a Python
function comes from (default: asyncio, email, tkinter, xml; chance = 1/4).

Each example is the start of one function's source (``def`` line included, at most ``max_chars``
characters); the label is the package. Functions are taken from the running interpreter's standard library
(:func:`leanformer.data.builtin.stdlib_files`, its ``test`` folders left out), sampled with a seed, the same
number per package; train and validation never share a file.
"""

from __future__ import annotations

import ast
import csv
import json
import random
from pathlib import Path

from leanformer.data.builtin import stdlib_files
from leanformer.data.corpus import DataError
from leanformer.finetune.data import Example

PACKAGES = ("asyncio", "email", "tkinter", "xml")


def _functions(package: str, max_chars: int) -> list[tuple[str, str]]:
    """``(file key, source start)`` of every function and method of ``package``, in file order."""
    root, files = stdlib_files()
    out = []
    for f in files:
        rel = f.relative_to(root).parts
        if rel[0] != package or "test" in rel or "tests" in rel:
            continue
        try:
            source = f.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                text = "\n".join(line.strip() for line in lines[node.lineno - 1:node.end_lineno])
                out.append((f"{'/'.join(rel)}:{node.lineno}", text[:max_chars]))
    return sorted(out)


def stdlib_task(packages: tuple[str, ...] = PACKAGES, per_class: int = 100, val_per_class: int = 25,
                seed: int = 0, max_chars: int = 300) -> tuple[list[Example], list[Example]]:
    """``(train, validation)`` examples: ``per_class`` / ``val_per_class`` functions of each package, drawn
    from disjoint files (a seeded shuffle of each package's files, validation files taken first)."""
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for package in packages:
        funcs = _functions(package, max_chars)
        by_file: dict[str, list[str]] = {}
        for key, text in funcs:
            by_file.setdefault(key.rsplit(":", 1)[0], []).append(text)
        files = sorted(by_file)
        rng.shuffle(files)
        pool_val: list[str] = []
        pool_train: list[str] = []
        for name in files:
            (pool_val if len(pool_val) < val_per_class else pool_train).extend(by_file[name])
        if len(pool_val) < val_per_class or len(pool_train) < per_class:
            raise DataError(f"the standard library's {package} has {len(funcs)} functions: too few for "
                            f"{per_class} + {val_per_class}")
        val += [Example(t, None, package) for t in rng.sample(pool_val, val_per_class)]
        train += [Example(t, None, package) for t in rng.sample(pool_train, per_class)]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def write_examples(examples: list[Example], path: str | Path) -> Path:
    """Write examples as ``.csv`` (columns text, label) or ``.jsonl`` (objects with text, label)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([e.text, e.label] for e in examples)
    return path
