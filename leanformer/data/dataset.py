"""Tokenised data: ``load_data(data_cfg) -> TokenData`` with memory-mapped train/val token arrays.

Text sources are tokenised once and cached under ``cache_dir`` (``data.cache_dir``, else the environment
variable ``LEANFORMER_CACHE``, else ``~/.cache/leanformer``) in a folder named by a hash of the source's
identity (relative paths, sizes and the SHA-256 of the files' contents; the Python version for the built-in
corpus), the vocabulary size, the split settings and the tokenizer's hash. The folder holds
``tokenizer.json``, ``train.bin`` and ``val.bin`` (llm.c shard format, so other tools can read them) and
``meta.json``. It is built in a temporary folder (``.tmp-NAME-HOST-PID``) and renamed into place, so an
interrupted build never leaves a half cache; the temporary folders of builds killed on this host are deleted
by the next build.

Each document is preceded by ``<|endoftext|>`` (as in llm.c / modded-nanogpt shards), so the token stream
reads ``EOT doc EOT doc ...``. ``.bin`` shards are used in place: no copy, no tokenizer (unless
``data.tokenizer`` names one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanformer.config import DataConfig
from leanformer.data.corpus import (
    HEADER_BYTES,
    HEADER_INTS,
    DataError,
    ShardSource,
    TextSource,
    read_shard,
    resolve_source,
    shard_format,
)
from leanformer.data.tokenizer import Tokenizer

CACHE_FORMAT = 1  # bump when the tokenised layout changes (EOT placement, chunking, file format)
_CHUNK_CHARS = 1 << 20  # longer documents are encoded in pieces cut after a newline (parallelism)
_BATCH_CHARS = 8 << 20  # characters per encode_batch call


class ShardedTokens:
    """Several token shards seen as one 1-D array, without copying.

    Supports what the sampler needs: ``len``, ``t[i]``, ``t[a:b]`` (may span shards), ``dtype``, ``shape``.
    """

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = [s for s in shards if len(s)]
        if not self.shards:
            raise DataError("no tokens in these shards")
        self.dtype = self.shards[0].dtype
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.shape = (int(self.starts[-1]),)
        self.ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: int | slice) -> Any:
        n = len(self)
        if isinstance(idx, slice):
            a, b, step = idx.indices(n)
            if step != 1:
                return np.asarray(self)[idx]
            if b <= a:
                return np.zeros(0, dtype=self.dtype)
            i = int(np.searchsorted(self.starts, a, side="right")) - 1
            j = int(np.searchsorted(self.starts, b, side="left")) - 1
            pieces = [self.shards[k][max(a - self.starts[k], 0):min(b, self.starts[k + 1]) - self.starts[k]]
                      for k in range(i, j + 1)]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        idx = int(idx) + (n if idx < 0 else 0)
        if not 0 <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} tokens")
        k = int(np.searchsorted(self.starts, idx, side="right")) - 1
        return self.shards[k][idx - self.starts[k]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.shards)
        return out.astype(dtype) if dtype is not None else out

    def max(self) -> int:
        return max(int(s.max()) for s in self.shards)


Tokens = np.ndarray | ShardedTokens


@dataclass
class TokenData:
    """Train/val token arrays. ``tokenizer`` is None for ``.bin`` shards given without a tokenizer."""

    train: Tokens  # (N_train,) uint16 or uint32
    val: Tokens  # (N_val,)
    tokenizer: Tokenizer | None
    vocab_size: int
    source: str
    cache_path: Path | None = None

    def __repr__(self) -> str:
        return (f"TokenData({self.source}: {len(self.train):,} train + {len(self.val):,} val tokens, "
                f"vocab {self.vocab_size})")


def cache_root(data_cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$LEANFORMER_CACHE``, else ``~/.cache/leanformer``."""
    root = data_cfg.cache_dir or os.environ.get("LEANFORMER_CACHE") or "~/.cache/leanformer"
    return Path(root).expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def load_data(data_cfg: DataConfig, *, rank: int = 0, progress: bool = True,
              wait_timeout: float = 3600.0, tokenizer: Tokenizer | None = None) -> TokenData:
    """Resolve, tokenise (once, cached) and memory-map the data that ``data_cfg`` names.

    ``tokenizer`` (a checkpoint's) overrides ``data.tokenizer`` and the trained one: the tokens then mean
    what they meant to that model. A cache built by a trained tokenizer equal to it is reused.

    Under data parallelism every rank calls this: rank 0 builds a missing cache, the other ranks wait
    (up to ``wait_timeout`` seconds) for it to appear.
    """
    data_cfg.validate()
    src = resolve_source(data_cfg.path, text_field=data_cfg.text_field, val_fraction=data_cfg.val_fraction,
                         max_files=data_cfg.max_files, builtin=data_cfg.builtin, max_chars=data_cfg.max_chars)
    user_tok = tokenizer or (Tokenizer.load(data_cfg.tokenizer) if data_cfg.tokenizer else None)
    if isinstance(src, ShardSource):
        return _load_shards(src, user_tok)
    folder = cache_root(data_cfg) / f"{src.kind}-{cache_key(src, data_cfg)[:16]}"
    if tokenizer is not None and not _cache_has_tokenizer(folder, tokenizer):
        folder = cache_root(data_cfg) / f"{src.kind}-{cache_key(src, data_cfg, tokenizer)[:16]}"
    if not (folder / "meta.json").is_file():
        if rank == 0:
            _build(src, data_cfg, folder, user_tok, progress)
        else:
            _wait_for(folder, wait_timeout)
    return _open_cache(folder)


def _sample_chars(docs: list[str], limit: int | None) -> list[str]:
    """About ``limit`` characters of the documents, every k-th one (k = total // limit, so the sample spans
    the whole list), the last one cut at the limit; all of them when ``limit`` is None."""
    if limit is None:
        return docs
    step = max(1, sum(map(len, docs)) // limit)
    out, total = [], 0
    for doc in docs[::step]:
        if total >= limit:
            break
        out.append(doc[:limit - total])
        total += len(out[-1])
    return out


def _cache_has_tokenizer(folder: Path, tokenizer: Tokenizer) -> bool:
    """Whether the finished cache ``folder`` was tokenised by a tokenizer identical to ``tokenizer``, or to it
    without the ``[MASK]`` that masked language modelling appended (:meth:`Tokenizer.with_mask_token`): the
    cache an encoder trained on, which its checkpoint's tokenizer must find again to resume or evaluate."""
    if not (folder / "meta.json").is_file():
        return False
    try:
        cached = Tokenizer.load(folder / "tokenizer.json")
    except DataError:
        return False
    return cached.tok.to_str() == tokenizer.tok.to_str() or cached.identity() == tokenizer.identity()


def with_mask_token(data: TokenData) -> tuple[TokenData, int]:
    """``data`` with a mask token for masked language modelling, and its id.

    The tokenizer gets one if it lacks it (:meth:`Tokenizer.with_mask_token`: ``[MASK]`` after every other
    id) and ``vocab_size`` covers it; the token arrays are unchanged (the text never holds the mask token).
    Shards without a tokenizer take the first id past the data's (``vocab_size``). ``data`` itself is not
    changed.
    """
    if data.tokenizer is not None:
        tok = data.tokenizer.with_mask_token()
        return dataclasses.replace(data, tokenizer=tok, vocab_size=max(data.vocab_size, tok.vocab_size)), tok.mask_id
    return dataclasses.replace(data, vocab_size=data.vocab_size + 1), data.vocab_size


def cache_key(src: TextSource, data_cfg: DataConfig, tokenizer: Tokenizer | None = None) -> str:
    """SHA-256 over everything that changes the tokens: source identity, split, vocabulary, format."""
    parts: dict[str, Any] = {
        "format": CACHE_FORMAT, "source": src.identity, "val_fraction": data_cfg.val_fraction,
        "max_files": data_cfg.max_files,
    }
    if data_cfg.tokenizer_chars is not None:  # keys of uncapped runs stay as they were
        parts["tokenizer_chars"] = data_cfg.tokenizer_chars
    if tokenizer is not None:
        parts["tokenizer_sha256"] = hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest()
    elif data_cfg.tokenizer:
        parts["tokenizer_sha256"] = _file_sha256(Path(data_cfg.tokenizer).expanduser())
    else:
        parts["vocab_size"] = data_cfg.vocab_size
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- building the cache


def _build(src: TextSource, data_cfg: DataConfig, folder: Path, user_tok: Tokenizer | None,
           progress: bool) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder.parent)
    tmp = folder.parent / f".tmp-{folder.name}-{_host()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        train_docs, val_docs = src.read()
        if user_tok is None:
            bpe_docs = _sample_chars(train_docs, data_cfg.tokenizer_chars)
            if progress:
                mb = sum(map(len, bpe_docs)) / 1e6
                print(f"training a byte-level BPE tokenizer (vocab {data_cfg.vocab_size}) on {mb:.1f}M "
                      f"characters of {src.description}", file=sys.stderr)
            tok = Tokenizer.train(bpe_docs, data_cfg.vocab_size)
        else:
            tok = user_tok
        t_tok = time.perf_counter() - t0
        tok.save(tmp / "tokenizer.json")
        dtype = token_dtype(tok.vocab_size)
        total = sum(map(len, train_docs)) + sum(map(len, val_docs))
        bar = _progress_bar(total, progress, f"tokenising {src.kind}")
        try:
            n_train = write_tokens(tmp / "train.bin", tok, train_docs, dtype, bar)
            n_val = write_tokens(tmp / "val.bin", tok, val_docs, dtype, bar)
        finally:
            if bar is not None:
                bar.close()
        meta = {
            "source": src.description, "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "train_tokens": n_train, "val_tokens": n_val, "train_docs": len(train_docs),
            "val_docs": len(val_docs), "characters": total, "tokenizer": data_cfg.tokenizer or "trained",
            "seconds_tokenizer": round(t_tok, 2), "seconds_total": round(time.perf_counter() - t0, 2),
            "identity": src.identity,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists() and not (folder / "meta.json").is_file():
            shutil.rmtree(folder)  # a stray folder without the completion marker
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"cached {n_train:,} train + {n_val:,} val tokens in {folder} ({meta['seconds_total']:.1f} s)",
              file=sys.stderr)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def remove_stale_builds(root: Path) -> list[Path]:
    """Delete ``root/.tmp-NAME-HOST-PID`` folders of builds killed on this host (their PID is gone)."""
    removed = []
    for tmp in root.glob(".tmp-*"):
        parts = tmp.name.rsplit("-", 2)
        if len(parts) != 3 or parts[1] != _host() or not parts[2].isdigit():
            continue  # another host's build, or a name we did not make
        if not _pid_alive(int(parts[2])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_tokens(path: Path, tok: Tokenizer, docs: list[str], dtype: np.dtype, bar=None) -> int:
    """Encode ``docs`` (each preceded by EOT) into an llm.c shard at ``path``; returns the token count."""
    magic, version = shard_format(dtype)
    n = 0
    with open(path, "wb") as f:
        f.write(np.zeros(HEADER_INTS, dtype="<i4").tobytes())
        for batch in _batches(docs):
            for first, ids in zip((b[0] for b in batch), tok.encode_batch([b[1] for b in batch])):
                arr = np.asarray(([tok.eot_id] if first else []) + ids, dtype=dtype.newbyteorder("<"))
                f.write(arr.tobytes())
                n += len(arr)
            if bar is not None:
                bar.update(sum(len(b[1]) for b in batch))
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (magic, version, n)
        f.seek(0)
        f.write(header.tobytes())
        f.flush()
        os.fsync(f.fileno())
    assert path.stat().st_size == HEADER_BYTES + n * dtype.itemsize
    return n


def _batches(docs: list[str]) -> Iterator[list[tuple[bool, str]]]:
    """Groups of ``(starts_document, piece)``; long documents are cut into pieces after newlines."""
    batch: list[tuple[bool, str]] = []
    size = 0
    for doc in docs:
        for i, piece in enumerate(_pieces(doc)):
            batch.append((i == 0, piece))
            size += len(piece)
            if size >= _BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _pieces(doc: str) -> Iterator[str]:
    start = 0
    while len(doc) - start > _CHUNK_CHARS:
        cut = doc.find("\n", start + _CHUNK_CHARS)
        if cut == -1:
            break
        yield doc[start:cut + 1]
        start = cut + 1
    yield doc[start:]


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="char", unit_scale=True, desc=desc, file=sys.stderr)


def _wait_for(folder: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while not (folder / "meta.json").is_file():
        if time.monotonic() - t0 > timeout:
            raise DataError(f"waited {timeout:.0f} s for rank 0 to build the token cache {folder}; "
                            "did rank 0 fail?")
        time.sleep(1.0)


# ---------------------------------------------------------------------------- opening


def _open_cache(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    tok = Tokenizer.load(folder / "tokenizer.json")
    train, val = read_shard(folder / "train.bin"), read_shard(folder / "val.bin")
    if len(val) == 0:
        raise DataError(f"{meta['source']}: the validation split is empty; raise data.val_fraction or add data")
    if len(train) == 0:
        raise DataError(f"{meta['source']}: the training split is empty")
    return TokenData(train, val, tok, tok.vocab_size, meta["source"], folder)


def _load_shards(src: ShardSource, tok: Tokenizer | None) -> TokenData:
    train_parts = [read_shard(p) for p in src.train]
    if src.split_within:
        whole = train_parts[0]  # one shard: its tail is validation
        cut = int(len(whole) * (1 - src.val_fraction))
        train, val = whole[:cut], whole[cut:]
    else:
        train = _join(train_parts, src.train)
        val = _join([read_shard(p) for p in src.val], src.val)
    if len(train) == 0 or len(val) == 0:
        which = "validation" if len(train) else "training"
        raise DataError(f"{src.description}: the {which} split has no tokens")
    top = max(_max_token(train), _max_token(val))
    if tok is not None:
        if top >= tok.vocab_size:
            raise DataError(f"{src.description}: token id {top} >= the tokenizer's vocab_size {tok.vocab_size}")
        vocab = tok.vocab_size
    else:
        vocab = top + 1
    return TokenData(train, val, tok, vocab, src.description)


def _join(parts: list[np.ndarray], paths: list[Path]) -> Tokens:
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError(f"{paths[0]}: these shards hold no tokens")
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)


def _max_token(tokens: Tokens, chunk: int = 1 << 24) -> int:
    if isinstance(tokens, ShardedTokens):
        return max(_max_token(s, chunk) for s in tokens.shards)
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
