"""Disjoint-window sampling (train.sampling: epoch) and the caps on the built-in corpus and the BPE sample."""

import numpy as np
import pytest

from leanformer.config import ConfigError, DataConfig, TrainConfig
from leanformer.data.builtin import builtin_source
from leanformer.data.corpus import DataError
from leanformer.data.dataset import _sample_chars
from leanformer.data.sampler import BatchSampler

T, B = 8, 4


def _tokens(n: int = 8 * 50 + 1) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def test_epoch_order_uses_every_window_once_per_pass():
    tokens = _tokens()
    s = BatchSampler(tokens, B, T, seed=3, order="epoch")
    assert s.n_windows == 50
    starts = np.concatenate([s.offsets(step) for step in range(50 // B)])  # 12 steps: 48 of 50 windows
    assert len(set(starts.tolist())) == len(starts)  # no window twice in a pass
    assert all(o % T == 0 and o + T + 1 <= len(tokens) for o in starts.tolist())
    x, y = s.next_batch()
    assert x.shape == (B, T) and bool((y == x + 1).all())  # next-token targets inside one window


def test_epoch_order_passes_reshuffle_and_depend_only_on_seed_and_step():
    s = BatchSampler(_tokens(8 * 40 + 1), B, T, seed=1, order="epoch")
    first = np.concatenate([s.offsets(i) for i in range(10)])
    second = np.concatenate([s.offsets(i) for i in range(10, 20)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(0, 320, 8))
    assert first.tolist() != second.tolist()  # a fresh order each pass
    again = BatchSampler(_tokens(8 * 40 + 1), B, T, seed=1, order="epoch")
    assert again.offsets(13).tolist() == s.offsets(13).tolist()


def test_epoch_order_ranks_split_the_single_process_stream():
    one = BatchSampler(_tokens(), B, T, seed=5, order="epoch")
    ranks = [BatchSampler(_tokens(), B, T, seed=5, rank=r, world_size=2, order="epoch") for r in range(2)]
    union = np.concatenate([r.offsets(3) for r in ranks])
    assert union.tolist() == np.concatenate([one.offsets(6), one.offsets(7)]).tolist()


def test_epoch_order_resumes_from_state_dict():
    a = BatchSampler(_tokens(), B, T, seed=9, order="epoch")
    for _ in range(5):
        a.next_batch()
    b = BatchSampler(_tokens(), B, T, seed=0, order="epoch")
    b.load_state_dict(a.state_dict())
    assert bool((a.next_batch()[0] == b.next_batch()[0]).all())


def test_bad_sampling_order_is_named():
    with pytest.raises(DataError, match="'shuffle'.*random or epoch"):
        BatchSampler(_tokens(), B, T, seed=0, order="shuffle")
    with pytest.raises(ConfigError, match="train.sampling"):
        TrainConfig(sampling="shuffle").validate()


def test_max_chars_samples_whole_files_by_path_hash():
    full = builtin_source("stdlib", 0.05)
    cap = 3_000_000
    capped = builtin_source("stdlib", 0.05, max_chars=cap)
    sizes = [f.stat().st_size for f in capped.files]
    assert set(capped.files) < set(full.files)
    assert cap <= sum(sizes) < cap + max(sizes)  # stops at the first file that reaches the cap
    assert capped.files == [f for f in full.files if f in set(capped.files)]  # original order kept
    assert builtin_source("stdlib", 0.05, max_chars=cap).files == capped.files  # deterministic
    assert "sampled by path hash" in capped.description


def test_tokenizer_sample_spans_the_documents_and_respects_the_limit():
    docs = [f"doc{i:04d} " * 10 for i in range(100)]  # 80 characters each
    sample = _sample_chars(docs, 800)
    assert sum(map(len, sample)) == 800
    assert sample[0] == docs[0] and sample[-1] == docs[90]  # every 10th document
    assert _sample_chars(docs, None) is docs
    with pytest.raises(ConfigError, match="data.tokenizer_chars=0"):
        DataConfig(tokenizer_chars=0).validate()


def test_epoch_order_resumes_on_another_layout_without_repeating_a_window():
    tokens = _tokens(8 * 48 + 1)
    single = BatchSampler(tokens, B, T, seed=2, order="epoch")
    drawn = [single.next_batch()[0][:, 0] for _ in range(3)]  # 12 windows
    state = single.state_dict()
    ranks = [BatchSampler(tokens, 2, T, seed=0, rank=r, world_size=3, order="epoch") for r in range(3)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(6):  # 36 more windows: the rest of the pass
        drawn += [r.next_batch()[0][:, 0] for r in ranks]
    starts = sorted(int(x) for batch in drawn for x in batch)
    assert starts == list(range(0, 8 * 48, 8))  # every window of the pass exactly once


def test_max_chars_with_a_user_path_is_refused_not_ignored(tmp_path):
    from leanformer.data.corpus import resolve_source

    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(DataError, match="data.max_chars=10 caps the built-in corpus only"):
        resolve_source(tmp_path / "a.txt", max_chars=10)
