"""Stable hashes: content ids, and seeded per-id random numbers.

Everything random in the pipeline that must not depend on Ray's block layout (samples for
fitting, the random order, the shuffle inside buckets) is a function of (seed, id) through
these helpers, so the same rows give the same result whatever the parallelism.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def bottom_k(texts: Iterable[str], k: int, seed: int, salt: str, max_chars: int) -> tuple[list[tuple[str, str]], int]:
    """The ``k`` distinct texts with the smallest seeded hash of their content id, and how many were read.

    Returns (content id, text cut to ``max_chars``) in hash order. A streaming bottom-k: memory is
    O(k) whatever the length of the stream, and the result does not depend on the stream's order,
    so a trusted set can be sampled without reading it into memory.
    """
    heap: list[tuple[int, str, str]] = []  # a max-heap of the k smallest hashes, through negated keys
    members: set[str] = set()
    read = 0
    chunk: list[str] = []

    def push(batch: list[str]) -> None:
        ids = [content_id(text) for text in batch]
        for key, doc_id, text in zip(hash64(ids, seed, salt), ids, batch):
            if doc_id in members:
                continue
            item = (-int(key), doc_id, text[:max_chars])
            if len(heap) < k:
                heapq.heappush(heap, item)
                members.add(doc_id)
            elif item > heap[0]:
                members.discard(heapq.heapreplace(heap, item)[1])
                members.add(doc_id)

    for text in texts:
        read += 1
        chunk.append(text)
        if len(chunk) >= 4096:
            push(chunk)
            chunk = []
    push(chunk)
    return [(doc_id, text) for _, doc_id, text in sorted(heap, reverse=True)], read


def sha256_json(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB pieces (shards, token arrays, exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
