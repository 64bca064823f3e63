"""Data pipeline: every input kind, the errors, the tokenizer round trip, the cache and the samplers."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from leanformer.config import DataConfig
from leanformer.data import BatchSampler, DataError, ShardedTokens, Tokenizer, eval_batches, load_data
from leanformer.data import dataset as dataset_mod
from leanformer.data.corpus import resolve_source
from leanformer.data.tokenizer import EOT

CODE = '''def f(x):\n\tif x > 0:\n        return "héllo wörld ✓"\n    return [i ** 2 for i in range(10)]\n'''
DOCS = [
    "The quick brown fox jumps over the lazy dog.\n" * 20,
    "import os\nimport sys\n\n\nclass A:\n    pass\n" * 10,
    CODE * 8,
    "日本語のテキストと emoji 🎉🎉 and  double  spaces\r\nwindows lines\r\n" * 6,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 15,
    "trailing whitespace   \n\n\n   leading\n" * 12,
]


def cfg(tmp_path: Path, path=None, **kw) -> DataConfig:
    return DataConfig(path=None if path is None else str(path), vocab_size=kw.pop("vocab_size", 300),
                      cache_dir=str(tmp_path / "cache"), **kw).validate()


def docs_of(data, split: str) -> list[str]:
    """Decode a split and cut it into documents at the EOT that precedes each one."""
    text = data.tokenizer.decode(np.asarray(getattr(data, split)).tolist())
    assert text.startswith(EOT)
    return text.split(EOT)[1:]


def write_shard(path: Path, tokens, magic=20240520, version=1, n=None, dtype=np.uint16) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if n is None else n)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=dtype).tobytes())
    return path


# ---------------------------------------------------------------------------- input kinds


def test_text_file_split_at_a_line_and_round_trips(tmp_path):
    text = "".join(DOCS)
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    data = load_data(cfg(tmp_path, f, val_fraction=0.1), progress=False)
    (train,), (val,) = docs_of(data, "train"), docs_of(data, "val")
    assert train + val == text  # nothing lost, nothing reordered
    assert train.endswith("\n") and 0.05 < len(val) / len(text) < 0.15
    assert data.train.dtype == np.uint16 and data.train.ndim == 1
    assert data.vocab_size == data.tokenizer.vocab_size <= 300
    assert int(max(data.train.max(), data.val.max())) < data.vocab_size


def test_folder_recursive_known_suffixes_only(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    names = ["a.txt", "b.md", "sub/c.py", "sub/d.txt", "e.rst", "f.txt"]
    for name, doc in zip(names, DOCS):
        (root / name).write_text(doc, encoding="utf-8")
    (root / "image.xyz").write_text("IGNORED SUFFIX")
    (root / ".hidden.txt").write_text("IGNORED HIDDEN")
    (root / "empty.txt").write_text("")
    data = load_data(cfg(tmp_path, root, val_fraction=0.2), progress=False)
    train, val = docs_of(data, "train"), docs_of(data, "val")
    assert train and val  # split by file, both sides non-empty
    assert sorted(train + val) == sorted(DOCS)


def test_jsonl_records_are_documents(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)) + "\n")
    data = load_data(cfg(tmp_path, f, text_field="body", val_fraction=0.3), progress=False)
    train, val = docs_of(data, "train"), docs_of(data, "val")
    assert train and val and sorted(train + val) == sorted(DOCS)


@pytest.mark.parametrize(("line", "expect"), [
    ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', r"data.jsonl:3: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x", "id": 1}\n', r"data.jsonl:2: no field 'text' \(fields: body, id\)"),
    ('{"text": 5}\n', r"data.jsonl:1: field 'text' is int, expected a string"),
    ('["text"]\n', r"data.jsonl:1: expected a JSON object, got list"),
])
def test_jsonl_bad_line_names_the_line(tmp_path, line, expect):
    f = tmp_path / "data.jsonl"
    f.write_text(line)
    with pytest.raises(DataError, match=expect):
        load_data(cfg(tmp_path, f), progress=False)


def test_single_bin_shard_is_split_by_its_tail(tmp_path):
    tokens = np.arange(1000) % 777
    f = write_shard(tmp_path / "tokens.bin", tokens)
    data = load_data(cfg(tmp_path, f, val_fraction=0.1), progress=False)
    assert isinstance(data.train, np.memmap) and data.tokenizer is None
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tokens)
    assert len(data.val) == 100 and data.vocab_size == 777


def test_bin_folder_uses_modded_nanogpt_names(tmp_path):
    root = tmp_path / "fineweb10B"
    root.mkdir()
    t1, t2, v = np.arange(0, 300), np.arange(300, 700), np.arange(700, 800)
    write_shard(root / "fineweb_train_000001.bin", t1)
    write_shard(root / "fineweb_train_000002.bin", t2)
    write_shard(root / "fineweb_val_000000.bin", v)
    (root / "README.md").write_text("ignored next to shards")
    data = load_data(cfg(tmp_path, root), progress=False)
    assert isinstance(data.train, ShardedTokens) and len(data.train) == 700
    np.testing.assert_array_equal(data.train[250:350], np.arange(250, 350))  # spans two shards
    assert data.train[299] == 299 and data.train[-1] == 699
    np.testing.assert_array_equal(data.val, v)
    assert data.vocab_size == 800
    x, y = BatchSampler(data.train, 4, 64, seed=0).next_batch()
    torch.testing.assert_close(y - x, torch.ones_like(x))  # consecutive ids, also across the boundary


def test_bin_glob_without_names_takes_last_shard_as_val(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"part{i}.bin", np.full(50, i))
    data = load_data(cfg(tmp_path, tmp_path / "part*.bin"), progress=False)
    assert len(data.train) == 100 and set(np.asarray(data.val).tolist()) == {2}


def test_uint32_llama3_shard_is_read(tmp_path):
    tokens = np.array([5, 100_000, 128_000, 7] * 50)
    f = write_shard(tmp_path / "llama.bin", tokens, magic=20240801, version=7, dtype=np.uint32)
    data = load_data(cfg(tmp_path, f), progress=False)
    assert data.train.dtype == np.uint32 and data.vocab_size == 128_001


@pytest.mark.parametrize(("kind", "expect"), [
    ("magic", r"bad\.bin: bad magic number 1234 \(expected 20240520"),
    ("truncated", r"bad\.bin: header says 100 tokens \(1224 bytes\) but the file has 1124 bytes"),
    ("short", r"bad\.bin: 10 bytes is too short for the 1024-byte token-shard header"),
    ("version", r"bad\.bin: unsupported version 3 for magic 20240520"),
])
def test_corrupt_bin_is_named(tmp_path, kind, expect):
    f = tmp_path / "bad.bin"
    if kind == "magic":
        write_shard(f, np.arange(10), magic=1234)
    elif kind == "truncated":
        write_shard(f, np.arange(50), n=100)
    elif kind == "short":
        f.write_bytes(b"0123456789")
    else:
        write_shard(f, np.arange(10), version=3)
    with pytest.raises(DataError, match=expect):
        load_data(cfg(tmp_path, f), progress=False)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match=r"data path .*nope does not exist"):
        load_data(cfg(tmp_path, tmp_path / "nope"), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: no data files \(looked for \.bin shards"):
        load_data(cfg(tmp_path, empty), progress=False)
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"no text \(2 documents, all empty\)"):
        load_data(cfg(tmp_path, empty), progress=False)
    with pytest.raises(DataError, match=r"no files match this glob"):
        load_data(cfg(tmp_path, tmp_path / "*.nothing"), progress=False)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")
    with pytest.raises(DataError, match=r"too little text \(1 characters\)"):
        load_data(cfg(tmp_path, tiny), progress=False)


# ---------------------------------------------------------------------------- tokenizer


ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing  \t\n",
    "tabs\tand\r\nwindows\rmac\n\n\n\nnewlines",
    "ünïcödé — “quotes” ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧‍👦 e\u0301 中文 العربية \u200b zero-width",
    CODE,
    "literal " + EOT + " inside text",
    "\x00\x01 control \x7f bytes",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(DOCS * 3, vocab_size=320)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_merges_save_and_load(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 320 and tokenizer.eot_id == 0
    assert len(tokenizer.encode(DOCS[0])) < len(DOCS[0].encode()) / 2  # BPE actually merges
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(CODE) == tokenizer.encode(CODE) and again.eot_id == tokenizer.eot_id
    assert tokenizer.encode_batch(DOCS) == [tokenizer.encode(d) for d in DOCS]
    with pytest.raises(DataError, match="tokenizer file .* does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_user_tokenizer_is_used(tokenizer, tmp_path):
    tok_file = tmp_path / "tok.json"
    tokenizer.save(tok_file)
    f = tmp_path / "corpus.txt"
    f.write_text("".join(DOCS))
    data = load_data(cfg(tmp_path, f, tokenizer=str(tok_file), vocab_size=4096), progress=False)
    assert data.vocab_size == 320
    np.testing.assert_array_equal(np.asarray(data.val)[1:], tokenizer.encode(docs_of(data, "val")[0]))


# ---------------------------------------------------------------------------- cache


def test_cache_is_built_once_and_atomically(tmp_path, monkeypatch):
    f = tmp_path / "corpus.txt"
    f.write_text("".join(DOCS))
    real_write = dataset_mod.write_tokens
    calls = []

    def interrupted(path, *args, **kw):
        calls.append(path.name)
        if path.name == "val.bin":
            raise KeyboardInterrupt  # killed half way through the build
        return real_write(path, *args, **kw)

    monkeypatch.setattr(dataset_mod, "write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_data(cfg(tmp_path, f), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no half cache, no temporary folder left

    monkeypatch.setattr(dataset_mod, "write_tokens", real_write)
    first = load_data(cfg(tmp_path, f), progress=False)
    assert sorted(p.name for p in first.cache_path.iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                 "val.bin"]

    def must_not_run(*args, **kw):
        raise AssertionError("re-tokenised although the cache exists")

    monkeypatch.setattr(dataset_mod, "write_tokens", must_not_run)
    monkeypatch.setattr(Tokenizer, "train", must_not_run)
    second = load_data(cfg(tmp_path, f), progress=False)
    assert second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.train, first.train)
    # a different vocabulary, or a changed file, is a different cache
    monkeypatch.undo()
    assert load_data(cfg(tmp_path, f, vocab_size=280), progress=False).cache_path != first.cache_path
    f.write_text("".join(DOCS[::-1]))
    assert load_data(cfg(tmp_path, f), progress=False).cache_path != first.cache_path


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    f = tmp_path / "corpus.txt"
    f.write_text("".join(DOCS))
    monkeypatch.setenv("LEANFORMER_CACHE", str(tmp_path / "envcache"))
    data = load_data(DataConfig(path=str(f), vocab_size=300), progress=False)
    assert data.cache_path.parent == tmp_path / "envcache"


# ---------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_is_the_sorted_stdlib():
    src = resolve_source(None)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(stdlib).as_posix() for p in src.files]
    assert rel == sorted(rel) and len(rel) > 500
    assert all(r.endswith(".py") and "site-packages" not in r and "__pycache__" not in r for r in rel)
    assert "os.py" in rel and "json/decoder.py" in rel


def test_builtin_corpus_small_slice(tmp_path):
    data = load_data(cfg(tmp_path, max_files=8, vocab_size=400), progress=False)
    assert "standard library (8 .py files" in data.source
    assert len(data.train) > 1000 and len(data.val) > 10
    src = resolve_source(None, max_files=8)
    texts = {p.read_text(encoding="utf-8", errors="replace") for p in src.files}
    assert set(docs_of(data, "train") + docs_of(data, "val")) <= texts


# ---------------------------------------------------------------------------- samplers


TOKENS = np.arange(5000, dtype=np.uint16)


def test_sampler_shapes_shift_and_determinism():
    a, b = BatchSampler(TOKENS, 4, 16, seed=7), BatchSampler(TOKENS, 4, 16, seed=7)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:]) and torch.equal(ya, xa + 1)  # TOKENS[i] == i
    assert not torch.equal(BatchSampler(TOKENS, 4, 16, seed=8).next_batch()[0], a.next_batch()[0])


def test_sampler_ranks_split_one_global_batch():
    whole = BatchSampler(TOKENS, 6, 8, seed=3)
    ranks = [BatchSampler(TOKENS, 2, 8, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        xs = [s.next_batch()[0] for s in ranks]
        assert not torch.equal(xs[0], xs[1])
        assert torch.equal(torch.cat(xs), whole.next_batch()[0])


def test_sampler_resume_draws_the_same_next_batches():
    run = BatchSampler(TOKENS, 3, 10, seed=11)
    for _ in range(5):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    expected = [run.next_batch() for _ in range(4)]
    resumed = BatchSampler(TOKENS, 3, 10, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(4)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(DataError, match="sampler state lacks step"):
        resumed.load_state_dict({"seed": 1})


def test_sampler_errors():
    with pytest.raises(DataError, match=r"training split has 10 tokens, fewer than seq_len\+1=17"):
        BatchSampler(TOKENS[:10], 2, 16, seed=0)
    with pytest.raises(DataError, match=r"validation split has 16 tokens"):
        eval_batches(TOKENS[:16], 2, 16, 3)
    with pytest.raises(DataError, match=r"rank=2 must be in \[0, world_size=2\)"):
        BatchSampler(TOKENS, 2, 4, seed=0, rank=2, world_size=2)


def test_eval_batches_fixed_and_spread():
    batches = eval_batches(TOKENS, 4, 32, 5)
    assert len(batches) == 5 and all(x.shape == (4, 32) for x, _ in batches)
    again = eval_batches(TOKENS, 4, 32, 5)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(batches, again))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and batches[-1][1][-1, -1] == len(TOKENS) - 1  # first and last token covered
    assert torch.all(starts[1:] > starts[:-1])
    short = eval_batches(TOKENS[:40], 4, 32, 5)  # a split smaller than needed: overlapping windows
    assert len(short) == 5
    per_rank = [eval_batches(TOKENS, 4, 32, 5, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 2] and torch.equal(per_rank[1][0][0], batches[1][0])


def test_other_ranks_wait_for_rank_zero(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("".join(DOCS))
    with pytest.raises(DataError, match=r"waited 0 s for rank 0 to build the token cache"):
        load_data(cfg(tmp_path, f), rank=1, wait_timeout=0.01, progress=False)
    built = load_data(cfg(tmp_path, f), rank=0, progress=False)
    assert load_data(cfg(tmp_path, f), rank=1, wait_timeout=0.01, progress=False).cache_path == built.cache_path
