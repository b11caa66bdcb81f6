"""Stable hashes: content ids, and seeded per-id random numbers.

Everything random in the pipeline that must not depend on Ray's block layout (samples for
fitting, the random order, the shuffle inside buckets) is a function of (seed, id) through
these helpers, so the same rows give the same result whatever the parallelism.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_TWO_64 = float(2**64)


def content_id(text: str) -> str:
    """The id of a document without one: 32 hex chars of blake2b over its UTF-8 text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def hash64(ids: Iterable[str], seed: int, salt: str = "") -> np.ndarray:
    """A seeded 64-bit hash of each id, as int64 (non-negative: the top bit is cleared)."""
    key = f"{seed}:{salt}".encode()[:64]
    out = [
        int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=8, key=key).digest(), "little") >> 1
        for i in ids
    ]
    return np.asarray(out, dtype=np.int64)


def uniform(ids: Iterable[str], seed: int, salt: str = "") -> np.ndarray:
    """A seeded number in [0, 1) per id, the same wherever and in whatever batch it is computed."""
    return hash64(ids, seed, salt).astype(np.float64) / (_TWO_64 / 2)
