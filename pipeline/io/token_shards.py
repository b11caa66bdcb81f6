"""Token shards: the ordered text shards, pre-tokenized, as flat memory-mappable arrays.

``RUN_DIR/tokens/`` holds, per text shard ``part-NNNNN``:

- ``part-NNNNN.tokens.npy``: every document's token ids followed by the separator (EOS), in
  ``position`` order, as one flat ``uint16`` array (``uint32`` when the vocabulary does not fit);
- ``part-NNNNN.index.npy``: ``int64`` of shape ``(rows, 2)``: each document's ``position`` and the
  offset one past its separator in the tokens array (document ``i`` is ``tokens[end[i-1]:end[i]]``);

plus ``tokenizer/`` (the tokenizer used, Hugging Face layout) and ``manifest.json`` (the dtype,
the separator, the tokenizer's source and vocabulary hash, and every file's sha256). Both arrays
are ``.npy`` so ``np.load(mmap_mode="r")`` (or ``map_npy``) maps them without a copy. The folder is built under a
temporary name and swapped in whole; ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError, CurriculumError
from pipeline.core.files import read_json_or_none, write_json_atomic
from pipeline.core.hashing import sha256_file

FORMAT = "curriculum-token-shards"
VERSION = 1
FOLDER = "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def vocab_sha256(vocab: dict[str, int]) -> str:
    """A tokenizer's identity for the manifest: sha256 of its tokens in id order and of the ids."""
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    order = np.argsort(ids, kind="stable")  # the loader checks this at every start: numpy, not sorted()
    tokens = list(vocab)
    digest = hashlib.sha256(json.dumps([tokens[i] for i in order.tolist()], separators=(",", ":")).encode())
    digest.update(ids[order].tobytes())
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_token_shard(folder: str | Path, name: str, ids: list[list[int]], positions: np.ndarray, sep: int,
                      dtype: np.dtype) -> dict[str, Any]:
    """Write one shard's documents (each followed by ``sep``); return its manifest entry (no tokens)."""
    folder = Path(folder)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    limit = np.iinfo(dtype).max
    for doc, end, length in zip(ids, ends, lengths):
        if doc and max(doc) > limit:
            raise CurriculumError(f"token id {max(doc)} does not fit {dtype.name}; the vocabulary size is wrong")
        tokens[end - length:end - 1] = doc
        tokens[end - 1] = sep
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) and np.any(np.diff(positions) != 1):
        raise CurriculumError(f"{name}: positions are not contiguous and ascending")
    index = np.stack([positions, ends], axis=1) if len(ids) else np.empty((0, 2), np.int64)
    tok_path, idx_path = folder / f"{name}.tokens.npy", folder / f"{name}.index.npy"
    _save_npy(tok_path, tokens)
    _save_npy(idx_path, index)
    return {
        "tokens_path": f"{FOLDER}/{tok_path.name}", "index_path": f"{FOLDER}/{idx_path.name}",
        "rows": len(ids), "tokens": int(len(tokens)),
        "first_position": int(positions[0]) if len(positions) else None,
        "last_position": int(positions[-1]) if len(positions) else None,
        "tokens_sha256": sha256_file(tok_path), "index_sha256": sha256_file(idx_path),
    }


def staging_folder(run_dir: str | Path) -> Path:
    path = Path(run_dir) / f".{FOLDER}.tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(run_dir: str | Path, staging: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest into ``staging`` last, then swap it in for ``RUN_DIR/tokens`` whole."""
    write_json_atomic(staging / "manifest.json", manifest, indent=2)
    final = Path(run_dir) / FOLDER
    old = Path(run_dir) / f".{FOLDER}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# The header ``np.save`` writes; anything else goes through ``np.load``.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \}")


def map_npy(path: str | Path) -> np.ndarray:
    """A read-only view of a ``.npy`` file's array over a memory map: ``np.load(mmap_mode="r")``
    without its per-call cost (a loader maps every shard once per pass; this is 5x faster)."""
    with open(path, "rb") as fh:
        prefix = fh.read(12)
        size_bytes = {1: 2, 2: 4}.get(prefix[6] if len(prefix) > 6 else 0)
        if prefix[:6] != b"\x93NUMPY" or size_bytes is None:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        header_length = int.from_bytes(prefix[8:8 + size_bytes], "little")
        offset = 8 + size_bytes + header_length
        fh.seek(8 + size_bytes)
        match = _NPY_HEADER.match(fh.read(header_length).decode("latin1"))
        if match is None:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        dtype = np.dtype(match[1])
        shape = tuple(int(x) for x in match[2].split(",") if x.strip())
        count = int(np.prod(shape))
        if count == 0:  # mmap cannot map nothing
            empty = np.empty(shape, dtype)
            empty.flags.writeable = False
            return empty
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file closes
    if len(buffer) < offset + count * dtype.itemsize:
        raise CurriculumError(f"{path}: cut short ({len(buffer)} bytes for {shape} of {dtype})")
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


@dataclass
class TokenShard:
    """One shard, memory-mapped: ``tokens`` (flat), ``positions`` and ``ends`` (per document)."""

    tokens: np.ndarray
    positions: np.ndarray
    ends: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.ends)

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s ids, its separator included (a view, no copy)."""
        start = int(self.ends[i - 1]) if i else 0
        return self.tokens[start:int(self.ends[i])]


class TokenShards:
    """Reader of ``RUN_DIR/tokens``: the manifest, and each shard mapped without a copy."""

    def __init__(self, run_dir: str | Path, verify: bool = False):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        manifest = read_json_or_none(self.folder / "manifest.json")
        if manifest is None:
            raise ConfigError(f"{self.run_dir}: no {FOLDER}/manifest.json; run `curriculum tokenize {self.run_dir}` first")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CurriculumError(f"{self.folder}: not a version-{VERSION} {FORMAT} folder")
        self.manifest: dict[str, Any] = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.sep: int = int(manifest["separator"]["id"])
        self.entries: list[dict[str, Any]] = manifest["shards"]
        self.rows = sum(e["rows"] for e in self.entries)
        self.total_tokens = sum(e["tokens"] for e in self.entries)
        if verify:
            self.verify()

    def verify(self) -> None:
        """Recompute every file's sha256 against the manifest."""
        for e in self.entries:
            for key in ("tokens", "index"):
                path = self.run_dir / e[f"{key}_path"]
                if sha256_file(path) != e[f"{key}_sha256"]:
                    raise CurriculumError(f"{path}: sha256 differs from {FOLDER}/manifest.json (changed or cut short)")

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def shard(self, k: int) -> TokenShard:
        e = self.entries[k]
        tokens, index = map_npy(self.run_dir / e["tokens_path"]), map_npy(self.run_dir / e["index_path"])
        if tokens.dtype != self.dtype or len(tokens) != e["tokens"] or index.shape != (e["rows"], 2):
            raise CurriculumError(f"{e['tokens_path']}: shape or dtype differ from {FOLDER}/manifest.json")
        return TokenShard(tokens, index[:, 0], index[:, 1])

    def __len__(self) -> int:
        return len(self.entries)

    def documents(self) -> Iterator[tuple[int, np.ndarray]]:
        """(position, ids with separator) for every document in curriculum order."""
        expected = 0
        for k in range(len(self.entries)):
            shard = self.shard(k)
            for i in range(shard.rows):
                position = int(shard.positions[i])
                if position != expected:
                    raise CurriculumError(f"{self.entries[k]['tokens_path']}: position {position} where {expected} "
                                          "was expected")
                expected += 1
                yield position, shard.document(i)
