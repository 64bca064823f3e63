"""A byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained on the training split or loaded.

Byte-level means every string maps to bytes before merging (the GPT-2 scheme: ``ByteLevel``
pre-tokenizer and decoder, no normaliser), so ``decode(encode(s)) == s`` for every ``str`` — unicode,
tabs, runs of spaces, ``\\r\\n`` included. Documents are separated by the special token
``<|endoftext|>`` (:attr:`Tokenizer.eot_id`).

Masked language modelling needs a mask token (:attr:`Tokenizer.mask_id`). A trained tokenizer has none, so
that causal runs keep their vocabulary and cached tokens; :meth:`Tokenizer.with_mask_token` returns a copy
with ``[MASK]`` added as a special token after every other id (``vocab_size`` grows by one, no other id
moves). A tokenizer that already has one (``[MASK]``, ``<mask>``: BERT's, RoBERTa's) keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from leanformer.data.corpus import DataError

EOT = "<|endoftext|>"
# end-of-text names of common tokenizer.json files, tried in order when a user's tokenizer has no EOT
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
MASK = "[MASK]"
# mask-token names of common tokenizer.json files (BERT, RoBERTa), tried in order
_MASK_CANDIDATES = (MASK, "<mask>", "<|mask|>")


class Tokenizer:
    """``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size``, ``eot_id``."""

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        for name in _EOT_CANDIDATES:
            if name in vocab:
                self.eot_token, self.eot_id = name, vocab[name]
                break
        else:
            raise DataError(f"tokenizer has no end-of-text token (looked for {', '.join(_EOT_CANDIDATES)})")
        self.mask_token, self.mask_id = next(((n, vocab[n]) for n in _MASK_CANDIDATES if n in vocab), (None, None))

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE with ``vocab_size`` entries (256 bytes + ``<|endoftext|>`` + merges).

        The result can be smaller than ``vocab_size`` when the text has too few distinct pairs to merge.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise DataError(f"vocab_size={vocab_size} must be >= 257 (256 bytes + {EOT})")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` (ours, or any Hugging Face fast-tokenizer file)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.tok.save(str(tmp))
        os.replace(tmp, path)

    def with_mask_token(self) -> Tokenizer:
        """This tokenizer if it has a mask token, else a copy with ``[MASK]`` added as a special token at id
        ``vocab_size`` (every other id unchanged)."""
        if self.mask_id is not None:
            return self
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self.tok.to_str())
        tok.add_special_tokens([AddedToken(MASK, special=True, normalized=False)])
        out = Tokenizer(tok)
        if out.mask_id != self.vocab_size:
            raise DataError(f"adding {MASK} gave id {out.mask_id}, expected {self.vocab_size} (after every other id)")
        return out

    def identity(self) -> dict:
        """The tokenizer's JSON as a dict, without a ``[MASK]`` appended after every other id: two tokenizers
        with the same identity give the same ids to any text that does not spell ``[MASK]`` itself."""
        import json

        data = json.loads(self.tok.to_str())
        last = self.vocab_size - 1
        data["added_tokens"] = [t for t in data.get("added_tokens") or []
                                if not (t.get("content") == MASK and t.get("id") == last)]
        return data

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents in parallel (Rust threads)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot={self.eot_token!r}={self.eot_id})"
