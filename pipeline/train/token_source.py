"""The curriculum loader's token-shard source: chunks sliced from ``RUN_DIR/tokens`` instead of tokenized.

``curriculum tokenize`` wrote every document's ids followed by EOS, in ``position`` order, so a
chunk of documents is one slice of a memory-mapped array; the loader packs, deals ranks and
resumes exactly as with text. The token shards are used only when they match: the same text
shards (sha256), the same text column, the same vocabulary and EOS as the loader's tokenizer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.errors import CurriculumError
from pipeline.core.storage import is_uri
from pipeline.io.runfolder import read_manifest
from pipeline.io.token_shards import FOLDER, TokenShard, TokenShards, vocab_sha256

# The packed stream keeps shards open (token map and document ends) up to this many bytes, oldest
# dropped first: a run of a few shards is opened once for all its epochs, a run of thousands
# holds a bounded window of them.
OPEN_SHARD_BYTES = 256 << 20

# What each token of a chunk is, for the loader's labels and masking: only TARGET and EOS tokens
# are labels; only TARGET ones may be masked.
PROMPT, TARGET, EOS = 0, 1, 2


@dataclass
class TokenChunk:
    tokens: np.ndarray  # int32, each document followed by EOS
    grow: np.ndarray  # int64, global row (epoch * rows + position) of each token
    tpos: np.ndarray  # int32, index of each token inside its document (EOS included)
    kind: np.ndarray  # int8, TARGET or EOS (token shards hold plain text: no PROMPT tokens)


# The vocabulary hash of each tokenizer object, with the vocabulary size it was taken at: a loader
# is built per epoch or per resume, and hashing a 50k-token vocabulary costs ~15 ms each time.
# Weak keys: an entry goes with its tokenizer; a size change (added tokens) recomputes it.
_vocab_hashes: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def tokenizer_vocab_sha256(tokenizer: Any) -> str:
    """``vocab_sha256`` of ``tokenizer``'s vocabulary, computed once per tokenizer object and size."""
    size = len(tokenizer)
    try:
        known = _vocab_hashes.get(tokenizer)
    except TypeError:  # not weak-referenceable: no memo
        return vocab_sha256(tokenizer.get_vocab())
    if known is None or known[0] != size:
        known = (size, vocab_sha256(tokenizer.get_vocab()))
        _vocab_hashes[tokenizer] = known
    return known[1]


def open_token_shards(run_dir: str | Path, tokenizer: Any, text_column: str,
                      rows: int | None = None) -> tuple[TokenShards | None, str]:
    """(the token shards, "") when they fit this run and tokenizer, else (None, why not).

    The text shards' sha256 (the run manifest against the token manifest) proves the token shards
    were made from these rows; ``rows``, when given, is checked too.
    """
    if is_uri(run_dir):
        return None, "token shards are read from local run folders only (this one is on object storage)"
    run_dir = Path(run_dir)
    if not (run_dir / FOLDER / "manifest.json").is_file():
        return None, "no token shards"
    shards = TokenShards(run_dir)
    m = shards.manifest
    vocab_sha = tokenizer_vocab_sha256(tokenizer)
    text_sha = [s["sha256"] for s in read_manifest(run_dir).get("shards", [])]
    checks = {
        "the text shards changed since `curriculum tokenize`": [e.get("source_sha256") for e in shards.entries] == text_sha,
        "another text column": m.get("text_column", "text") == text_column,
        "another vocabulary": m["tokenizer"]["vocab_sha256"] == vocab_sha,
        "another separator than the tokenizer's EOS": shards.sep == tokenizer.eos_token_id,
        "another row count": rows is None or shards.rows == rows,
    }
    failed = [why for why, ok in checks.items() if not ok]
    return (None, "; ".join(failed)) if failed else (shards, "")


class TokenChunkStream(IterableDataset):
    """Chunks of ``chunk_rows`` documents from a cursor; in DataLoader worker w of W, chunks c % W == w."""

    def __init__(self, shards: TokenShards, cursor: dict[str, int], chunk_rows: int, max_epochs: int | None,
                 split: bool):
        self.shards, self.cursor, self.chunk_rows = shards, cursor, chunk_rows
        self.max_epochs, self.split = max_epochs, split
        self.starts = np.cumsum([0, *(e["rows"] for e in shards.entries)])

    def __iter__(self) -> Iterator[TokenChunk]:
        info = get_worker_info() if self.split else None
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rows = int(self.starts[-1])
        epoch, row, offset = self.cursor["epoch"], self.cursor["row"], self.cursor["offset"]
        if not 0 <= row < rows:
            raise CurriculumError(f"loader state: row {row} is outside the run's {rows} rows")
        index = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            first = int(np.searchsorted(self.starts, row, side="right") - 1)
            for k in range(first, len(self.shards)):
                shard = self.shards.shard(k)
                ends = np.asarray(shard.ends)
                base = int(self.starts[k])
                for i in range(row - base if k == first else 0, shard.rows, self.chunk_rows):
                    j = min(i + self.chunk_rows, shard.rows)
                    if index % workers == worker:
                        yield self._chunk(shard, ends, i, j, base, epoch, rows, offset if index == 0 else 0)
                    index += 1
            epoch, row = epoch + 1, 0

    @staticmethod
    def _chunk(shard: Any, ends: np.ndarray, i: int, j: int, base: int, epoch: int, rows: int, skip: int) -> TokenChunk:
        if int(shard.positions[i]) != base + i or int(shard.positions[j - 1]) != base + j - 1:
            raise CurriculumError(f"token shards: positions {int(shard.positions[i])}…{int(shard.positions[j - 1])} "
                                  f"where {base + i}…{base + j - 1} were expected")
        a = int(ends[i - 1]) if i else 0
        lengths = np.diff(ends[i:j], prepend=a)
        tokens = shard.tokens[a:int(ends[j - 1])].astype(np.int32)
        grow = np.repeat(np.arange(base + i, base + j, dtype=np.int64) + epoch * rows, lengths)
        starts = np.cumsum(lengths) - lengths
        tpos = (np.arange(len(tokens), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
        kind = np.full(len(tokens), TARGET, dtype=np.int8)
        kind[np.cumsum(lengths) - 1] = EOS
        if skip:
            tokens, grow, tpos, kind = tokens[skip:], grow[skip:], tpos[skip:], kind[skip:]
        return TokenChunk(tokens, grow, tpos, kind)


class PackedTokenStream:
    """Pack-mode batches straight from the token shards: global token ranges, no per-token bookkeeping.

    Epoch ``e`` of the stream is token ``e * tokens_per_epoch`` onwards; a batch is a range of it.
    The cursor ``{epoch, row, offset}`` and a token index convert both ways through the shards'
    document ends, so batches, cursors and positions are those of the chunked route (the tests
    compare them), at the cost of two binary searches per batch instead of arrays per token.
    """

    def __init__(self, shards: TokenShards):
        self.shards = shards
        self.token_starts = np.cumsum([0, *(e["tokens"] for e in shards.entries)])
        self.row_starts = np.cumsum([0, *(e["rows"] for e in shards.entries)])
        self.tokens_per_epoch = int(self.token_starts[-1])
        self.rows = int(self.row_starts[-1])
        self._open: dict[int, TokenShard] = {}
        self._open_bytes = 0
        self._checked: set[int] = set()

    def _shard(self, k: int) -> TokenShard:
        shard = self._open.get(k)
        if shard is None:
            mapped = self.shards.shard(k)
            base = int(self.row_starts[k])
            if k not in self._checked:
                positions = mapped.positions
                if mapped.rows and (positions[0] != base or np.any(np.diff(positions) != 1)):
                    raise CurriculumError(f"token shards: {self.shards.entries[k]['tokens_path']} does not hold "
                                          f"positions {base}…{base + mapped.rows - 1} in order")
                self._checked.add(k)
            # A contiguous copy of the document ends (one int64 per document): binary searches on
            # the strided index would copy it at every call. Positions are not needed past the check.
            shard = TokenShard(mapped.tokens, mapped.positions, np.ascontiguousarray(mapped.ends))
            size = _held_bytes(shard)
            while self._open and self._open_bytes + size > OPEN_SHARD_BYTES:
                self._open_bytes -= _held_bytes(self._open.pop(next(iter(self._open))))
            self._open[k] = shard
            self._open_bytes += size
        return shard

    def _locate(self, within: int) -> tuple[int, int]:
        """(shard, token inside it) of a token index inside an epoch; empty shards are skipped."""
        k = int(np.searchsorted(self.token_starts, within, side="right") - 1)
        return k, within - int(self.token_starts[k])

    def token_index(self, cursor: dict[str, int]) -> int:
        row = cursor["row"]
        if not 0 <= row < self.rows:
            raise CurriculumError(f"loader state: row {row} is outside the run's {self.rows} rows")
        k = int(np.searchsorted(self.row_starts, row, side="right") - 1)
        i = row - int(self.row_starts[k])
        doc_start = int(self._shard(k).ends[i - 1]) if i else 0
        return cursor["epoch"] * self.tokens_per_epoch + int(self.token_starts[k]) + doc_start + cursor["offset"]

    def cursor(self, t: int) -> dict[str, int]:
        """The cursor of global token ``t``: its epoch, document (row) and index inside it."""
        epoch, within = divmod(t, self.tokens_per_epoch)
        k, local = self._locate(within)
        ends = self._shard(k).ends
        i = int(ends.searchsorted(local, side="right"))
        return {"epoch": epoch, "row": int(self.row_starts[k]) + i, "offset": local - (int(ends[i - 1]) if i else 0)}

    def cursors(self, ts: np.ndarray) -> list[dict[str, int]]:
        """``cursor`` of each global token in ``ts``, vectorized for a block of batches."""
        epochs, within = np.divmod(np.asarray(ts, dtype=np.int64), self.tokens_per_epoch)
        shards = np.searchsorted(self.token_starts, within, side="right") - 1
        local = within - self.token_starts[shards]
        rows, offsets = np.empty_like(local), np.empty_like(local)
        for k in dict.fromkeys(shards.tolist()):  # a block of batches spans one or two shards
            here = shards == k
            ends = self._shard(k).ends
            docs = np.searchsorted(ends, local[here], side="right")
            doc_starts = np.where(docs > 0, ends[np.maximum(docs - 1, 0)], 0)
            rows[here] = docs + self.row_starts[k]
            offsets[here] = local[here] - doc_starts
        return [{"epoch": e, "row": r, "offset": o} for e, r, o in zip(epochs.tolist(), rows.tolist(), offsets.tolist())]

    def read(self, start: int, end: int, with_positions: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(token ids as int64, each token's position or None) of global tokens ``start``…``end`` − 1."""
        tokens, positions = [], []
        while start < end:
            epoch_start = start - start % self.tokens_per_epoch
            k, a = self._locate(start - epoch_start)
            shard = self._shard(k)
            b = min(a + end - start, len(shard.tokens))
            tokens.append(shard.tokens[a:b])
            if with_positions:
                positions.append(self._positions(k, shard, a, b))
            start += b - a
        ids = tokens[0].astype(np.int64) if len(tokens) == 1 else np.concatenate(tokens).astype(np.int64)
        if not with_positions:
            return ids, None
        return ids, positions[0] if len(positions) == 1 else np.concatenate(positions)

    def _positions(self, k: int, shard: TokenShard, a: int, b: int) -> np.ndarray:
        """The position of each of shard ``k``'s tokens ``a``…``b`` − 1: its document's row."""
        first = int(np.searchsorted(shard.ends, a, side="right"))
        last = int(np.searchsorted(shard.ends, b - 1, side="right"))
        doc_ends = np.minimum(shard.ends[first:last + 1], b)
        counts = doc_ends.copy()
        counts[1:] -= doc_ends[:-1]
        counts[0] -= a
        return np.repeat(np.arange(first, last + 1, dtype=np.int64) + int(self.row_starts[k]), counts)

def _held_bytes(shard: TokenShard) -> int:
    """What keeping a shard open holds: its token map (resident once read) and its ends copy."""
    return shard.tokens.nbytes + shard.ends.nbytes
