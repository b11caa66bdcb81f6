"""Export token shards as Megatron-LM's memory-mapped indexed dataset (the ``.bin``/``.idx`` pair).

The layout, as Megatron-LM's ``indexed_dataset`` documents it (all little-endian):

``.idx``: the 9-byte magic ``MMIDIDX\\x00\\x00``; version ``<Q`` = 1; dtype code ``<B`` (uint16 = 8,
int32 = 4); sequence count ``<Q``; document-index count ``<Q``; then ``int32`` length of every
sequence, ``int64`` byte offset of every sequence in ``.bin``, and ``int64`` document indices
(``0`` then the sequence index one past the end of each document).

``.bin``: the sequences' tokens back to back, in the dtype above.

Each curriculum document is one sequence and one document, ending with its separator (the
``--append-eod`` convention of Megatron's preprocessing), and sequence ``i`` is ``position`` ``i``.
Megatron reads uint16 below a 65,500-token vocabulary and int32 above, so that is what is written.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.hashing import sha256_file
from pipeline.io.token_shards import TokenShards

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def megatron_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def export_megatron(run_dir: str | Path, prefix: str | Path | None = None) -> dict[str, Any]:
    """Write ``PREFIX.bin`` and ``PREFIX.idx`` from ``RUN_DIR/tokens``, shard by shard; return a record."""
    shards = TokenShards(run_dir, verify=True)
    prefix = Path(prefix) if prefix else Path(run_dir) / "export" / "megatron" / "curriculum_text_document"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = megatron_dtype(int(shards.manifest["tokenizer"]["vocab_size"]))
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    bin_tmp, idx_tmp = _atomic(bin_path), _atomic(idx_path)
    lengths: list[np.ndarray] = []
    try:
        with open(bin_tmp, "wb") as fh:
            for k in range(len(shards)):
                shard = shards.shard(k)
                # Stream in slices so a large shard is never copied whole into memory.
                for start in range(0, len(shard.tokens), 1 << 24):
                    fh.write(np.asarray(shard.tokens[start:start + (1 << 24)], dtype=dtype).tobytes())
                lengths.append(np.diff(np.asarray(shard.ends), prepend=0).astype(np.int64))
            fh.flush()
            os.fsync(fh.fileno())
        sizes = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        if len(sizes) and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2**31 tokens; Megatron's index cannot hold it")
        pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) * dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(idx_tmp, "wb") as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<Q", VERSION))
            fh.write(struct.pack("<B", DTYPE_CODES[dtype]))
            fh.write(struct.pack("<Q", len(sizes)))
            fh.write(struct.pack("<Q", len(doc_idx)))
            fh.write(sizes.astype("<i4").tobytes())
            fh.write(pointers.astype("<i8").tobytes())
            fh.write(doc_idx.astype("<i8").tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
    finally:
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
    return {"format": "megatron", "prefix": str(prefix), "bin": str(bin_path), "idx": str(idx_path),
            "dtype": dtype.name, "sequences": int(len(sizes)), "documents": int(len(sizes)),
            "tokens": int(sizes.sum()), "separator": shards.manifest["separator"],
            "bin_sha256": sha256_file(bin_path), "idx_sha256": sha256_file(idx_path)}
