"""Where the data comes from: resolve ``data.path`` into a text source or a set of token shards.

Kinds of input (``resolve_source``):

* ``None`` — a built-in corpus (``data.builtin``, :mod:`leanformer.data.builtin`): by default every
  ``.py`` file under the running interpreter's standard library folder (``sysconfig.get_paths()["stdlib"]``),
  ``site-packages`` and ``__pycache__`` excluded, sorted by relative path. The stdlib's own ``test/``
  package is **kept**: it is real Python code (CodeParrot, the benchmark this mirrors, keeps test files
  too) and about half of the bytes. ``site`` and ``all`` add the installed packages' source.
* a text file — one document; the last ``val_fraction`` of it (cut at a line break) is validation.
* a folder (searched recursively, sorted) — if it holds ``.bin`` files they are token shards; otherwise
  every ``.jsonl`` file (one document per record) and every text file with a suffix in
  :data:`TEXT_SUFFIXES` is a document.
* a ``.jsonl`` file — one JSON object per line, the document in field ``text_field``.
* a ``.bin`` file, or a glob of them — pre-tokenised shards in the llm.c / modded-nanogpt format
  (:func:`read_shard`). Shards named ``*_val_*`` are validation and the rest training (the
  modded-nanogpt naming); without such names the last shard is validation, and a single shard is split
  by its last ``val_fraction`` of tokens.

Text is split into train and validation **by document**: a document is validation when the hash of its
key (relative path, or ``path:line`` for a JSONL record) falls below ``val_fraction``, so the split does
not depend on the order or number of the other files. With few documents both splits are kept non-empty.
Every problem is a one-line :class:`DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Data that cannot be used: a missing path, no text, a corrupt shard, a bad JSONL line."""


TEXT_SUFFIXES = (
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".java",
    ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".html", ".css", ".xml", ".json", ".toml", ".yaml", ".yml",
    ".csv", ".tsv",
)
JSONL_SUFFIXES = (".jsonl",)
SHARD_SUFFIX = ".bin"
HEADER_INTS = 256  # llm.c header: 256 int32 = 1024 bytes
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype, as in llm.c's dev/data/data_common.py
SHARD_FORMATS = {(20240520, 1): np.dtype("<u2"), (20240801, 7): np.dtype("<u4")}


# ---------------------------------------------------------------------------- sources


@dataclass
class TextSource:
    """Text documents still on disk. ``identity`` (paths, sizes, content hashes) is what the cache key hashes."""

    kind: str  # stdlib | text | jsonl | folder | glob
    root: Path
    files: list[Path]
    text_field: str
    val_fraction: float
    description: str
    identity: dict[str, Any] = field(default_factory=dict)
    # one key per file deciding its split (files sharing a key land on the same side); None: the file's
    # relative path (JSONL records: path:line)
    split_keys: list[str] | None = None

    def read(self) -> tuple[list[str], list[str]]:
        """All documents, split: ``(train_docs, val_docs)``; empty documents are dropped."""
        keys: list[str] = []
        docs: list[str] = []
        not_utf8: list[str] = []
        for i, path in enumerate(self.files):
            rel = _relname(path, self.root)
            group = self.split_keys[i] if self.split_keys is not None else None
            if path.suffix.lower() in JSONL_SUFFIXES:
                for line_no, text in read_jsonl(path, self.text_field, not_utf8):
                    keys.append(group or f"{rel}:{line_no}")
                    docs.append(text)
            else:
                keys.append(group or rel)
                docs.append(read_text(path, not_utf8))
        if not_utf8:
            print(f"note: {self.description}: {len(not_utf8)} of {len(self.files)} files are not valid UTF-8 "
                  f"(first: {not_utf8[0]}); their undecodable bytes became U+FFFD (re-encode them as UTF-8 "
                  "to keep them)", file=sys.stderr)
        kept = [(k, d) for k, d in zip(keys, docs) if d.strip()]
        if not kept:
            raise DataError(f"{self.description}: no text ({len(docs)} documents, all empty)")
        if len(kept) == 1:
            train, val = split_text(kept[0][1], self.val_fraction, kept[0][0])
            return [train], [val]
        is_val = split_by_key([k for k, _ in kept], self.val_fraction)
        return [d for (_, d), v in zip(kept, is_val) if not v], [d for (_, d), v in zip(kept, is_val) if v]

    def n_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


@dataclass
class ShardSource:
    """Pre-tokenised ``.bin`` shards (:func:`read_shard`); ``split_within`` cuts one shard's tail off as val."""

    train: list[Path]
    val: list[Path]
    val_fraction: float
    description: str
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def split_within(self) -> bool:
        return not self.val


Source = TextSource | ShardSource


def resolve_source(path: str | os.PathLike | None, *, text_field: str = "text", val_fraction: float = 0.05,
                   max_files: int | None = None, builtin: str = "stdlib", max_chars: int | None = None) -> Source:
    """Turn ``data.path`` into a :class:`TextSource` or :class:`ShardSource` without reading the data.

    ``max_files`` keeps the first N files in sorted order (named validation shards are always kept);
    ``builtin`` picks the built-in corpus used when ``path`` is None (:mod:`leanformer.data.builtin`), and
    ``max_chars`` caps it (a user's own data is used whole).
    """
    if max_files is not None and max_files < 1:
        raise DataError(f"data.max_files={max_files} must be >= 1 (or null for all files)")
    if path is not None and max_chars is not None:
        raise DataError(f"data.max_chars={max_chars} caps the built-in corpus only; with data.path={str(path)!r} "
                        "set it to null (cut your own data instead)")
    if path is None:
        from leanformer.data.builtin import builtin_source

        return builtin_source(builtin, val_fraction, max_files, max_chars)
    spec = str(path)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() == SHARD_SUFFIX:
            return _shard_source([p], p.parent, val_fraction, max_files, spec)
        kind = "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text"
        return _text_source(kind, p.parent, [p], text_field, val_fraction, spec)
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and not _hidden(f, p)),
                       key=lambda f: _relname(f, p))
        return _from_files(files, p, spec, "folder", text_field, val_fraction, max_files)
    if any(ch in spec for ch in "*?["):
        root = Path(_glob_root(spec)).expanduser()
        files = sorted((Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True)
                        if Path(f).is_file()), key=lambda f: _relname(f, root))
        if not files:
            raise DataError(f"data path {spec}: no files match this glob")
        return _from_files(files, root, spec, "glob", text_field, val_fraction, max_files)
    raise DataError(f"data path {spec} does not exist")


def _from_files(files: list[Path], root: Path, spec: str, kind: str, text_field: str, val_fraction: float,
                max_files: int | None) -> Source:
    shards = [f for f in files if f.suffix.lower() == SHARD_SUFFIX]
    if shards:
        return _shard_source(shards, root, val_fraction, max_files, spec)
    texts = [f for f in files if f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES]
    if not texts:
        raise DataError(
            f"data path {spec}: no data files (looked for .bin shards, .jsonl, or text files: "
            f"{' '.join(TEXT_SUFFIXES)})"
        )
    if max_files is not None:
        texts = texts[:max_files]
    return _text_source(kind, root, texts, text_field, val_fraction, spec)


def _text_source(kind: str, root: Path, files: list[Path], text_field: str, val_fraction: float,
                 description: str) -> TextSource:
    identity = {"kind": kind, "root": str(root.resolve()), "files": _contents(files, root)}
    if kind in ("jsonl", "folder", "glob"):
        identity["text_field"] = text_field
    return TextSource(kind, root, files, text_field, val_fraction, description, identity)


def _shard_source(shards: list[Path], root: Path, val_fraction: float, max_files: int | None,
                  spec: str) -> ShardSource:
    named_val = [s for s in shards if _is_val_name(s)]
    if named_val:
        train = [s for s in shards if s not in named_val]
        val = named_val
        if not train:
            raise DataError(f"data path {spec}: only validation shards ({named_val[0].name}, ...), "
                            "no training shard")
    elif len(shards) >= 2:
        train, val = shards[:-1], shards[-1:]
    else:
        train, val = shards, []
    if max_files is not None:
        train = train[:max_files]
    for s in train + val:
        shard_header(s)  # fail early on a corrupt file
    desc = f"{spec} ({len(train)} train + {len(val)} val token shards)" if val else f"{spec} (1 token shard)"
    identity = {"kind": "shards", "train": _stats(train, root), "val": _stats(val, root),
                "root": str(root.resolve())}
    return ShardSource(train, val, val_fraction, desc, identity)


# ---------------------------------------------------------------------------- splitting


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a document key (first 8 bytes of its SHA-1)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_by_key(keys: list[str], val_fraction: float) -> list[bool]:
    """``is_val`` per key: hash below ``val_fraction``; with >= 2 keys, both splits are made non-empty."""
    h = [unit_hash(k) for k in keys]
    is_val = [x < val_fraction for x in h]
    if len(keys) >= 2 and not any(is_val):
        is_val[int(np.argmin(h))] = True
    if len(keys) >= 2 and all(is_val):
        is_val[int(np.argmax(h))] = False
    return is_val


def split_text(text: str, val_fraction: float, name: str = "text") -> tuple[str, str]:
    """One document → ``(train, val)``: val is its last ``val_fraction`` of characters, cut after a newline."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut)
    if nl != -1 and nl + 1 < len(text):
        cut = nl + 1
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise DataError(f"{name}: too little text ({len(text)} characters) to split into train and "
                        f"validation with val_fraction={val_fraction}")
    return train, val


# ---------------------------------------------------------------------------- readers


def read_text(path: Path, not_utf8: list[str] | None = None) -> str:
    """A file's text as UTF-8, line endings kept as they are.

    A binary file (one with a NUL byte) is a :class:`DataError`. Undecodable bytes become U+FFFD and the
    file is named in ``not_utf8`` (the caller says so once).
    """
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul != -1:
        raise DataError(f"{path} looks binary (a NUL byte at offset {nul}), not text; remove it from the data, "
                        "or pass pre-tokenised .bin shards")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not_utf8 is not None:
            not_utf8.append(f"{path} (byte 0x{data[e.start]:02x} at offset {e.start})")
        return data.decode("utf-8", errors="replace")


def read_jsonl(path: Path, text_field: str, not_utf8: list[str] | None = None) -> list[tuple[int, str]]:
    """``(line_number, text)`` for every non-blank line of a JSONL file; errors name the line."""
    out = []
    for line_no, line in enumerate(read_text(path, not_utf8).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            fields = ", ".join(map(str, list(record)[:8])) or "none"
            raise DataError(f"{path}:{line_no}: no field '{text_field}' (fields: {fields}); "
                            "set data.text_field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: field '{text_field}' is {type(text).__name__}, "
                            "expected a string")
        out.append((line_no, text))
    return out


def shard_header(path: Path) -> tuple[int, np.dtype]:
    """Validate an llm.c token shard; returns ``(n_tokens, dtype)``.

    Layout: 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count), then
    the tokens as uint16. The llama-3 variant (magic 20240801, version 7, uint32 tokens) is read too.
    """
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is too short for the 1024-byte token-shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n = (int(v) for v in header[:3])
    dtype = SHARD_FORMATS.get((magic, version))
    if dtype is None:
        if magic not in {m for m, _ in SHARD_FORMATS}:
            raise DataError(f"{path}: bad magic number {magic} (expected 20240520: not an llm.c / "
                            "modded-nanogpt token shard)")
        raise DataError(f"{path}: unsupported version {version} for magic {magic} "
                        f"(known: {', '.join(f'{m}/v{v}' for m, v in SHARD_FORMATS)})")
    expected = HEADER_BYTES + n * dtype.itemsize
    if n < 0 or size != expected:
        raise DataError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes "
                        "(truncated or corrupt)")
    return n, dtype


def read_shard(path: Path) -> np.memmap:
    """A validated token shard as a read-only 1-D memmap (``uint16`` or ``uint32``)."""
    n, dtype = shard_header(path)
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses zero-length maps
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def shard_format(dtype: np.dtype) -> tuple[int, int]:
    """``(magic, version)`` that :func:`read_shard` maps to ``dtype``."""
    for key, dt in SHARD_FORMATS.items():
        if dt == np.dtype(dtype).newbyteorder("<"):
            return key
    raise DataError(f"token dtype {dtype} has no shard format (use uint16 or uint32)")


# ---------------------------------------------------------------------------- helpers


def _contents(files: list[Path], root: Path) -> list[list]:
    """``[relative name, size, SHA-256 of the bytes]`` per file: what a text cache is keyed on (an edit that
    keeps the size and restores the mtime still changes the key)."""
    out = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DataError(f"{f}: cannot be read ({e.strerror})") from None
        out.append([_relname(f, root), len(data), hashlib.sha256(data).hexdigest()])
    return out


def _stats(files: list[Path], root: Path) -> list[list]:
    out = []
    for f in files:
        st = f.stat()
        out.append([_relname(f, root), st.st_size, st.st_mtime_ns])
    return out


def _relname(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _glob_root(spec: str) -> str:
    parts = Path(spec).parts
    keep = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        keep.append(part)
    return str(Path(*keep)) if keep else "."


def _is_val_name(path: Path) -> bool:
    return re.search(r"(^|[_\-.])val([_\-.]|$)", path.stem) is not None
