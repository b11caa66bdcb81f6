"""The curriculum loader: a run folder's shards -> token batches, in ``position`` order.

Shards are read in name order and every document's position is checked, so a broken run cannot
silently reorder training. ``pack`` cuts the EOS-separated stream into ``seq_len`` sequences;
``pad`` gives each document its own. A document is one text column, or a prompt and a response
whose tokens are concatenated, with the loss on the response (and its EOS) only; the response's
input tokens may be masked (Masked Thought, ``pipeline.train.augment``). With ``world_size`` ranks the global batches are dealt
round-robin, so reading every rank's batch b in turn gives the single-process stream. The
state is a cursor ``{epoch, row, offset, batch}`` that resumes every rank, with any world size,
at the exact next token. No randomness, no dependence on timing. The contract in full
(packing, batches, ranks, workers, memory) is in docs/training.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.errors import ConfigError, CurriculumError
from pipeline.io.runfolder import open_shard, shard_files, shard_metadata
from pipeline.train.augment import masked_positions
from pipeline.train.token_source import (
    EOS,
    PROMPT,
    TARGET,
    PackedTokenStream,
    TokenChunkStream,
    open_token_shards,
)

# Packed token-shard batches are read this many tokens (2 MiB of int64) at a time by a single
# process, so that the copy, the cursor search and the Python per read are shared by many batches.
# Chosen on the loader benchmark's 4,000-document run among 64k, 128k and 256k tokens.
BLOCK_TOKENS = 262144
END = {"epoch": -1, "row": 0, "offset": 0}  # the cursor after the last batch of a finite stream


class Encoder:
    """Text -> token ids, through the fast (Rust) tokenizer when there is one. Picklable.

    The fast tokenizer's copy is made on the first ``encode``: a loader that reads token shards
    never tokenizes and does not pay for it.
    """

    def __init__(self, tokenizer: Any):
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("the tokenizer has no EOS token; the loader separates documents with it")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.tokenizer = tokenizer
        self.backend: Any = None

    def _fast_backend(self) -> Any:
        if self.backend is None and getattr(self.tokenizer, "backend_tokenizer", None) is not None:
            from tokenizers import Tokenizer

            # A copy without truncation/padding: a saved tokenizer may carry either, and the
            # loader must see every token of every document.
            backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            backend.no_truncation()
            backend.no_padding()
            self.backend = backend
        return self.backend

    def encode(self, texts: list[str]) -> list[list[int]]:
        backend = self._fast_backend()
        if backend is not None:
            # encode_batch_fast skips the character offsets, which the loader never uses.
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class _Chunk:
    tokens: np.ndarray  # int32, each document followed by EOS
    grow: np.ndarray  # int64, global row (epoch * rows + position) of each token
    tpos: np.ndarray  # int32, index of each token inside its document (EOS included)
    kind: np.ndarray  # int8, PROMPT, TARGET or EOS


@dataclass
class _Packed:
    """One packed batch from token shards: global tokens ``begin``…``end`` − 1, or those tokens already read."""

    stream: PackedTokenStream | None
    begin: int
    end: int
    tokens: np.ndarray | None = None  # int64
    positions: np.ndarray | None = None  # int64; None when the loader was not asked for positions

    def read(self, with_positions: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self.tokens is None:
            return self.stream.read(self.begin, self.end, with_positions)
        return self.tokens, self.positions


def _tokenize_chunk(encoder: Encoder, fields: list[list[str]], epoch: int, row0: int, rows: int, skip: int) -> _Chunk:
    """``fields`` is [texts] or [prompts, responses]: a document is their tokens, concatenated, then EOS."""
    if len(fields) == 1:
        ids = encoder.encode(fields[0])
        prompt_lengths = np.zeros(len(ids), dtype=np.int64)
    else:
        # Tokenized apart, so the boundary is exact and a prompt tokenizes as it will at inference.
        prompts, responses = encoder.encode(fields[0]), encoder.encode(fields[1])
        ids = [p + r for p, r in zip(prompts, responses)]
        prompt_lengths = np.fromiter((len(x) for x in prompts), dtype=np.int64, count=len(prompts))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    tokens = np.insert(flat, np.cumsum(lengths), encoder.eos)  # EOS after every document
    ends = np.repeat(lengths, lengths + 1)
    prompt_ends = np.repeat(prompt_lengths, lengths + 1)
    lengths = lengths + 1
    starts = np.cumsum(lengths) - lengths
    grow = np.repeat(np.arange(row0, row0 + len(ids), dtype=np.int64) + epoch * rows, lengths)
    tpos64 = np.arange(len(tokens), dtype=np.int64) - np.repeat(starts, lengths)
    kind = np.where(tpos64 == ends, EOS, np.where(tpos64 < prompt_ends, PROMPT, TARGET)).astype(np.int8)
    tpos = tpos64.astype(np.int32)
    if skip:  # resuming inside the first document
        tokens, grow, tpos, kind = tokens[skip:], grow[skip:], tpos[skip:], kind[skip:]
    return _Chunk(tokens, grow, tpos, kind)


class _Source:
    """Row counts of the shards and a reader of (epoch, row, fields) chunks from any cursor."""

    def __init__(self, run_dir: str | Path, columns: list[str]):
        self.files = shard_files(run_dir)
        self.columns = columns
        self.file_rows: list[int] = []
        for f in self.files:
            meta = shard_metadata(f)
            names = meta.schema.to_arrow_schema().names
            for column in (*columns, "position"):
                if column not in names:
                    raise ConfigError(f"{f}: no {column!r} column (columns: {names})")
            self.file_rows.append(meta.num_rows)
        self.file_starts = np.cumsum([0, *self.file_rows])
        self.rows = int(self.file_starts[-1])
        if self.rows == 0:
            raise CurriculumError(f"{run_dir}: the shards hold no rows; there is nothing to train on")

    def chunks(self, epoch: int, row: int, chunk_rows: int,
               max_epochs: int | None) -> Iterator[tuple[int, int, list[list[str]]]]:
        """(epoch, first row, one list of strings per column) from the cursor on, in order, looping over epochs."""
        if not 0 <= row < self.rows:
            raise CurriculumError(f"loader state: row {row} is outside the run's {self.rows} rows")
        while max_epochs is None or epoch < max_epochs:
            first = int(np.searchsorted(self.file_starts, row, side="right") - 1)
            for index in range(first, len(self.files)):
                if self.file_rows[index] == 0:
                    continue
                start_in_file = row - int(self.file_starts[index]) if index == first else 0
                yield from self._file_chunks(index, epoch, start_in_file, chunk_rows)
            epoch, row = epoch + 1, 0

    def _file_chunks(self, index: int, epoch: int, start: int,
                     chunk_rows: int) -> Iterator[tuple[int, int, list[list[str]]]]:
        pf = open_shard(self.files[index])
        rg_rows = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        rg_starts = np.cumsum([0, *rg_rows])
        first_rg = int(np.searchsorted(rg_starts, start, side="right") - 1)
        expected = int(self.file_starts[index]) + start
        skip = start - int(rg_starts[first_rg])
        batches = pf.iter_batches(batch_size=chunk_rows, row_groups=list(range(first_rg, pf.num_row_groups)),
                                  columns=[*self.columns, "position"], use_threads=False)
        for batch in batches:
            if skip:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
            positions = batch.column(len(self.columns))
            n = batch.num_rows
            if n == 0:
                continue
            if positions[0].as_py() != expected or positions[n - 1].as_py() != expected + n - 1:
                raise CurriculumError(
                    f"{self.files[index]}: positions {positions[0].as_py()}…{positions[n - 1].as_py()} where "
                    f"{expected}…{expected + n - 1} were expected; shards must hold positions 0…N−1 in file order")
            fields = [[t if t is not None else "" for t in batch.column(i).to_pylist()]
                      for i in range(len(self.columns))]
            yield epoch, expected, fields
            expected += n


class _ChunkStream(IterableDataset):
    """Tokenized chunks from a cursor; in DataLoader worker w of W, only chunks c % W == w."""

    def __init__(self, source: _Source, encoder: Encoder, cursor: dict[str, int], chunk_rows: int,
                 max_epochs: int | None, split: bool):
        self.source, self.encoder, self.cursor = source, encoder, cursor
        self.chunk_rows, self.max_epochs, self.split = chunk_rows, max_epochs, split

    def __iter__(self) -> Iterator[_Chunk]:
        info = get_worker_info() if self.split else None
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        c = self.cursor
        stream = self.source.chunks(c["epoch"], c["row"], self.chunk_rows, self.max_epochs)
        for index, (epoch, row0, fields) in enumerate(stream):
            if index % workers != worker:
                continue
            skip = c["offset"] if index == 0 else 0
            yield _tokenize_chunk(self.encoder, fields, epoch, row0, self.source.rows, skip)


def _collate_chunk(chunk: _Chunk) -> _Chunk:
    return chunk  # keep numpy arrays as they are (the default would make tensors)


class CurriculumLoader(IterableDataset):
    """Token batches from a run folder's shards in curriculum order. See the module docstring."""

    def __init__(
        self,
        run_dir: str | Path,
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        packing: str = "pack",
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        max_epochs: int | None = None,
        chunk_rows: int = 256,
        text_column: str = "text",
        prompt_column: str | None = None,
        response_column: str | None = None,
        mask_ratio: float = 0.0,
        mask_token_id: int | None = None,
        mask_seed: int = 0,
        token_shards: bool | None = None,
        positions: bool = True,
    ):
        if packing not in ("pack", "pad"):
            raise ConfigError(f"packing must be 'pack' or 'pad' (got {packing!r})")
        if seq_len < 2 or batch_size < 1 or chunk_rows < 1:
            raise ConfigError("seq_len must be >= 2, batch_size and chunk_rows >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0…{world_size - 1}")
        if (prompt_column is None) != (response_column is None):
            raise ConfigError("give both prompt_column and response_column (prompt/response data), or neither")
        if not 0 <= mask_ratio < 1:
            raise ConfigError(f"mask_ratio must be in [0, 1) (got {mask_ratio})")
        if mask_ratio > 0 and (mask_token_id is None or prompt_column is None):
            raise ConfigError("masking needs a mask_token_id and prompt/response data (it masks responses only)")
        self.columns = [text_column] if prompt_column is None else [prompt_column, response_column]
        self.run_dir = run_dir
        self.mask_ratio, self.mask_token_id, self.mask_seed = mask_ratio, mask_token_id, mask_seed
        self.encoder = Encoder(tokenizer)
        # RUN_DIR/tokens (`curriculum tokenize`) when it matches: None = when present, False = never.
        # Token shards hold one text column; prompt/response data is tokenized field by field.
        # With matching token shards the text shards are never opened.
        if token_shards is False or prompt_column is not None:
            self.tokens, self.tokens_reason = None, ("off" if token_shards is False else "prompt/response data")
        else:
            self.tokens, self.tokens_reason = open_token_shards(run_dir, tokenizer, text_column)
        if token_shards and self.tokens is None:
            raise ConfigError(f"{run_dir}: cannot read the token shards: {self.tokens_reason}")
        self.source = _Source(run_dir, self.columns) if self.tokens is None else None
        self._rows = self.tokens.rows if self.tokens is not None else self.source.rows
        if self._rows == 0:
            raise CurriculumError(f"{run_dir}: the shards hold no rows; there is nothing to train on")
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, packing
        self.world_size, self.rank, self.num_workers = world_size, rank, num_workers
        self.max_epochs, self.chunk_rows = max_epochs, chunk_rows
        # The trainer reads positions only for its trace; on the token-shard route they would
        # cost about as much as copying the tokens.
        self.positions = positions
        self._state: dict[str, int] = {"epoch": 0, "row": 0, "offset": 0, "batch": 0}

    @property
    def rows(self) -> int:
        """Documents per epoch."""
        return self._rows

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("epoch", "row", "offset", "batch") if k not in state]
        if missing:
            raise CurriculumError(f"loader state lacks {missing}: {state}")
        if state["epoch"] < 0:
            raise CurriculumError("loader state: the stream had ended (finite max_epochs); nothing to resume")
        self._state = {k: int(state[k]) for k in ("epoch", "row", "offset", "batch")}

    # ------------------------------------------------------------------ iteration

    def _chunks(self, cursor: dict[str, int], in_worker: bool) -> Iterator[_Chunk]:
        split = self.num_workers > 0 and not in_worker
        stream = (TokenChunkStream(self.tokens, cursor, self.chunk_rows, self.max_epochs, split) if self.tokens is not None
                  else _ChunkStream(self.source, self.encoder, cursor, self.chunk_rows, self.max_epochs, split))
        if split:
            from torch.utils.data import DataLoader

            yield from DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                  collate_fn=_collate_chunk, prefetch_factor=4, persistent_workers=False)
        else:
            yield from stream

    def _cursor(self, grow: int, tpos: int) -> dict[str, int]:
        return {"epoch": int(grow // self._rows), "row": int(grow % self._rows), "offset": int(tpos)}

    def _global_batches(self, start: dict[str, int], in_worker: bool) -> Iterator[tuple[int, _Chunk, dict[str, int]]]:
        """(b, its tokens, cursor after) for every global batch from ``start`` on."""
        L, B = self.seq_len, self.batch_size
        tok = np.empty(0, np.int32)
        grow = np.empty(0, np.int64)
        tpos = np.empty(0, np.int32)
        kind = np.empty(0, np.int8)
        b = start["batch"]
        for chunk in self._chunks(start, in_worker):
            tok = np.concatenate([tok, chunk.tokens])
            grow = np.concatenate([grow, chunk.grow])
            tpos = np.concatenate([tpos, chunk.tpos])
            kind = np.concatenate([kind, chunk.kind])
            pos = 0
            piece_starts = np.flatnonzero(tpos % L == 0) if self.packing == "pad" else None
            while True:
                if self.packing == "pack":
                    end = pos + B * L
                else:
                    k = int(np.searchsorted(piece_starts, pos, side="right")) + B - 1
                    end = int(piece_starts[k]) if k < len(piece_starts) else len(tok)
                if end >= len(tok):  # the token after the batch gives the cursor; wait for it
                    break
                yield b, _Chunk(tok[pos:end], grow[pos:end], tpos[pos:end], kind[pos:end]), self._cursor(grow[end], tpos[end])
                b += 1
                pos = end
            tok, grow, tpos, kind = tok[pos:], grow[pos:], tpos[pos:], kind[pos:]
        while len(tok):  # a finite stream's tail: the last, shorter batch(es)
            if self.packing == "pack":
                end = min(len(tok), B * L)
            else:
                piece_starts = np.flatnonzero(tpos % L == 0)
                end = int(piece_starts[B]) if B < len(piece_starts) else len(tok)
            yield b, _Chunk(tok[:end], grow[:end], tpos[:end], kind[:end]), dict(END)
            b += 1
            tok, grow, tpos, kind = tok[end:], grow[end:], tpos[end:], kind[end:]

    def _packed_batches(self, start: dict[str, int]) -> Iterator[tuple[int, _Packed, dict[str, int]]]:
        """What ``_global_batches`` gives, for packed token shards: (b, its tokens, cursor after).

        No tokenizing, so no DataLoader workers either: a batch is a slice of a memory map, read
        only by the rank that keeps it.
        """
        stream = PackedTokenStream(self.tokens)
        size = self.seq_len * self.batch_size
        last = None if self.max_epochs is None else self.max_epochs * stream.tokens_per_epoch
        b, begin = start["batch"], stream.token_index(start)
        while last is None or begin < last:
            # The batch that reaches the end of a finite stream gets END, as in _global_batches.
            end = begin + size if last is None else min(begin + size, last)
            yield b, _Packed(stream, begin, end), dict(END) if end == last else stream.cursor(end)
            b, begin = b + 1, end

    def _packed_single(self, start: dict[str, int], in_worker: bool) -> Iterator[dict[str, Any]]:
        """The batches of a single reader (one rank, at most one DataLoader worker), packed from
        token shards: the hot path of the token-shard route.

        A block of ``BLOCK_TOKENS`` is one copy out of the memory maps and one vectorized search
        for the cursors; each batch is then a view of the block. The batches and states are those
        of ``_packed_batches`` (the tests compare them).
        """
        stream = PackedTokenStream(self.tokens)
        L, B = self.seq_len, self.batch_size
        size = L * B
        per_block = max(1, BLOCK_TOKENS // size)
        last = None if self.max_epochs is None else self.max_epochs * stream.tokens_per_epoch
        b, begin = start["batch"], stream.token_index(start)
        while last is None or begin < last:
            full = per_block if last is None else min(per_block, (last - begin) // size)
            if full == 0:  # a finite stream's last, shorter batch
                batch = self._materialize_packed(_Packed(stream, begin, last))
                batch["index"], batch["state"] = b, {**END, "batch": b + 1}
                if not in_worker:
                    self._state = dict(batch["state"])
                yield batch
                return
            end = begin + full * size
            ids, positions = stream.read(begin, end, self.positions)
            ends = begin + size * np.arange(1, full + 1, dtype=np.int64)
            afters = stream.cursors(ends[:-1] if end == last else ends)
            if end == last:
                afters.append(dict(END))
            inputs = torch.from_numpy(ids).view(full, B, L).unbind(0)
            where = torch.from_numpy(positions).view(full, B, L).unbind(0) if positions is not None else None
            for i, (x, after) in enumerate(zip(inputs, afters)):
                after["batch"] = b + 1
                if not in_worker:
                    self._state = dict(after)
                batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(), "index": b,
                         "state": after}
                if where is not None:
                    batch["positions"] = where[i]
                b += 1
                yield batch
            begin = end

    def _materialize_packed(self, packed: _Packed) -> dict[str, torch.Tensor]:
        L = self.seq_len
        tokens, positions = packed.read(self.positions)
        rows = -(-len(tokens) // L)
        if len(tokens) < rows * L:  # the tail: pad the last row
            ids = np.full(rows * L, self.encoder.pad, np.int64)
            ids[:len(tokens)] = tokens
            real = np.arange(rows * L) < len(tokens)
            batch = {"input_ids": torch.from_numpy(ids.reshape(rows, L)),
                     "attention_mask": torch.from_numpy(real.astype(np.int64).reshape(rows, L)),
                     "labels": torch.from_numpy(np.where(real, ids, -100).reshape(rows, L))}
            if positions is not None:
                pos = np.full(rows * L, -1, np.int64)
                pos[:len(tokens)] = positions
                batch["positions"] = torch.from_numpy(pos.reshape(rows, L))
            return batch
        ids = torch.from_numpy(tokens.reshape(rows, L))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if positions is not None:
            batch["positions"] = torch.from_numpy(positions.reshape(rows, L))
        return batch

    def _materialize(self, chunk: _Chunk | _Packed) -> dict[str, torch.Tensor]:
        if isinstance(chunk, _Packed):
            return self._materialize_packed(chunk)
        L = self.seq_len
        tok, grow, tpos = chunk.tokens, chunk.grow, chunk.tpos
        positions_flat = grow % self._rows
        inputs = tok
        if self.mask_ratio > 0:  # labels keep the original tokens; only the inputs change
            hidden = masked_positions(chunk.kind == TARGET, grow, tpos, self.mask_seed, self.mask_ratio)
            inputs = np.where(hidden, self.mask_token_id, tok)
        if self.packing == "pack":
            slots = np.arange(len(tok))
            rows = -(-len(tok) // L)
        else:
            starts = np.flatnonzero(tpos % L == 0)
            rows = len(starts)
            # Token i goes to row (its piece) and column (its index inside the piece).
            piece = np.searchsorted(starts, np.arange(len(tok)), side="right") - 1
            slots = piece * L + (tpos % L)
        ids = np.full(rows * L, self.encoder.pad, np.int64)
        labels = np.full(rows * L, -100, np.int64)
        pos = np.full(rows * L, -1, np.int64)
        ids[slots] = inputs
        labels[slots] = np.where(chunk.kind == PROMPT, -100, tok)
        pos[slots] = positions_flat
        ids, labels, pos = ids.reshape(rows, L), labels.reshape(rows, L), pos.reshape(rows, L)
        mask = pos >= 0
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }
        if self.positions:
            batch["positions"] = torch.from_numpy(pos)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        in_worker = info is not None
        dl_worker, dl_workers = (info.id, info.num_workers) if in_worker else (0, 1)
        start = dict(self._state)
        if self.packing == "pad" and start["offset"] % self.seq_len:
            raise CurriculumError(f"loader state offset {start['offset']} is not a multiple of seq_len "
                                  f"{self.seq_len}: it was saved with other packing settings")
        world, rank = self.world_size, self.rank
        pending = None  # this rank's batch of the current round, if this worker yields it
        local = 0  # this rank's batches so far
        if self.tokens is not None and self.packing == "pack":
            if world * dl_workers == 1:  # every batch read is this process's to yield
                yield from self._packed_single(start, in_worker)
                return
            batches = self._packed_batches(start)
        else:
            batches = self._global_batches(start, in_worker)
        for b, chunk, after in batches:
            if b % world == rank:
                pending = (b, chunk) if local % dl_workers == dl_worker else None
                local += 1
            if b % world != world - 1:
                continue  # the state after our batch is the start of the next round
            state = {**after, "batch": b + 1}
            if not in_worker:
                self._state = dict(state)
            if pending is not None:
                batch = self._materialize(pending[1])
                batch["index"] = pending[0]
                batch["state"] = state
                pending = None
                yield batch
        if pending is not None:  # a finite stream that ended in the middle of a round
            batch = self._materialize(pending[1])
            batch["index"] = pending[0]
            batch["state"] = {**END, "batch": -1}
            yield batch
