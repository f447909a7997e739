"""Categorical vocabularies, built on the train split only.

Ids follow the contract in :mod:`cetnet.data.schema`: ``0`` padding, ``1`` out-of-vocabulary (unseen
in train, rarer than ``min_count``, or missing), real tokens from ``2`` in order of decreasing train
count (ties by token), so the same train data always gives the same ids.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from cetnet.data.schema import FIRST_ID, OOV_ID, PAD_ID

__all__ = ["MISSING", "Vocabulary", "TokenCounter", "factorize", "encode_with_train_vocab"]

MISSING = ""  # the token of an empty cell: always OOV, never in a vocabulary


class Vocabulary:
    """A token -> id map with the padding and OOV ids reserved.

    Attributes:
        tokens: the real tokens, ``tokens[k]`` has id ``k + FIRST_ID``.
        min_count: the train count a token needed to get its own id.
    """

    def __init__(self, tokens: Sequence[str], min_count: int = 1) -> None:
        self.tokens = list(tokens)
        self.min_count = min_count
        self._ids = {t: i for i, t in enumerate(self.tokens, FIRST_ID)}
        if len(self._ids) != len(self.tokens):
            raise ValueError("Vocabulary: tokens must be unique")

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> "Vocabulary":
        """Keeps the tokens seen at least ``min_count`` times (the missing token never)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        kept = [(-c, t) for t, c in counts.items() if c >= min_count and t != MISSING]
        kept.sort()
        return cls([t for _, t in kept], min_count)

    @property
    def size(self) -> int:
        """``vocab_size`` of the feature: ids lie in ``[0, size)``."""
        return len(self.tokens) + FIRST_ID

    def __len__(self) -> int:
        return self.size

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        return self._ids.get(token, OOV_ID)

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """The ids of ``tokens`` (int64), OOV for anything not in the vocabulary."""
        get = self._ids.get
        return np.fromiter((get(t, OOV_ID) for t in tokens), dtype=np.int64)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Vocabulary":
        return cls(d["tokens"], d.get("min_count", 1))


class TokenCounter:
    """One pass over the train split: gives each token a provisional code and counts it.

    Chunks are stored as provisional codes; once train is read, :meth:`finalize` gives the
    vocabulary and the table that turns provisional codes into final ids (``table[code]``).
    Code 0 is reserved for padding so padded sequence cells stay 0.
    """

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}
        self._tokens: list[str] = []
        self._counts: list[int] = []

    def add(self, tokens: Iterable[str]) -> list[int]:
        """Counts ``tokens`` and returns their provisional codes (``>= 1``)."""
        codes, tok, cnt = self._codes, self._tokens, self._counts
        out = []
        for t in tokens:
            c = codes.get(t)
            if c is None:
                c = codes[t] = len(tok)
                tok.append(t)
                cnt.append(0)
            cnt[c] += 1
            out.append(c + 1)
        return out

    def counts(self) -> dict[str, int]:
        return dict(zip(self._tokens, self._counts))

    def finalize(self, min_count: int = 1) -> tuple[Vocabulary, np.ndarray]:
        """The vocabulary and the provisional-code -> id table (``table[0] == 0``)."""
        vocab = Vocabulary.from_counts(self.counts(), min_count)
        table = np.zeros(len(self._tokens) + 1, dtype=np.int64)
        table[1:] = vocab.encode(self._tokens)
        return vocab, table


def factorize(tokens: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """The distinct tokens (in order of first appearance) and each token's index among them."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(t, len(index)) for t in tokens), dtype=np.int64)
    return list(index), codes


def encode_with_train_vocab(categories: Sequence[str], codes: np.ndarray,
                            train_rows: np.ndarray | slice,
                            min_count: int = 1) -> tuple[Vocabulary, np.ndarray]:
    """Builds a vocabulary from the train rows and encodes every row.

    ``codes`` (any shape, rows first) index ``categories``; ``-1`` marks padding (id 0). The
    vocabulary counts ``codes[train_rows]`` only, so a value that first appears after train is
    OOV. Vectorized through the categories: cheap however many rows there are.
    """
    codes = np.asarray(codes, dtype=np.int64)
    train = codes[train_rows].ravel()
    counts = np.bincount(train[train >= 0], minlength=len(categories))
    vocab = Vocabulary.from_counts({t: int(c) for t, c in zip(categories, counts) if c},
                                   min_count)
    table = vocab.encode(categories)
    return vocab, np.where(codes >= 0, table[np.maximum(codes, 0)], PAD_ID)
