"""Data: the built-in corpus and user data → a byte-level BPE tokenizer → cached token arrays → batches.

``load_data(cfg.data)`` returns :class:`TokenData` (memory-mapped ``train`` / ``val`` token arrays, the
tokenizer, the vocabulary size); :class:`BatchSampler` and :func:`eval_batches` cut them into ``(x, y)``.
"""

from leanformer.data.corpus import DataError, resolve_source
from leanformer.data.dataset import ShardedTokens, TokenData, cache_root, load_data, with_mask_token
from leanformer.data.sampler import BatchSampler, eval_batches
from leanformer.data.tokenizer import Tokenizer

__all__ = [
    "BatchSampler",
    "DataError",
    "ShardedTokens",
    "TokenData",
    "Tokenizer",
    "cache_root",
    "eval_batches",
    "load_data",
    "resolve_source",
    "with_mask_token",
]
