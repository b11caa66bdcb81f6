"""Curriculum loader throughput against the same work done by the cheapest route, and by
Hugging Face ``datasets`` streaming (issues 5 and 10).

Every reader does the same work and yields the same batches (checked: token count and a CRC of
every batch's ``input_ids``): read the shards' ``text`` column in file-name order, in record
batches of ``--chunk-rows`` documents; tokenize each record batch with one call of the same
fast tokenizer (``Encoder.encode``: ``encode_batch_fast``, no special tokens); put EOS after
every document; pack the stream into ``--seq-len`` sequences; yield batches of ``--batch-size``
sequences as int64 tensors (``input_ids``, ``attention_mask``, ``labels``), the last one padded.

- ``raw``: ``pyarrow.parquet.ParquetFile(f).iter_batches(batch_size=chunk_rows, columns=["text"])``
  per shard, then the packing below: the least code and work that gives these batches.
- ``datasets``: what a user would pick instead, ``datasets.load_dataset("parquet",
  data_files=shards, split="train", streaming=True).select_columns(["text"])`` read with
  ``.iter(batch_size=chunk_rows)``, then the same tokenizer calls and packing.
- ``loader``: ``CurriculumLoader(max_epochs=1)``, which also reads ``position``, checks that
  every document has the position it expects, and builds the ``positions`` tensor and the
  resume cursor of every batch.

Token shards (issue 16), in the same run: the tokenizer is saved and ``curriculum tokenize``'s
``tokenize_run`` writes ``RUN_DIR/tokens`` with it (reused while the vocabulary is the same), and
``export_megatron`` writes the Megatron ``.bin``/``.idx`` pair from them, outside the timing.

- ``loader_tokens``: ``CurriculumLoader(token_shards=True, positions=False)``, as the trainer
  reads it: the same batches, sliced from the memory-mapped token shards instead of tokenized
  (``loader`` is ``token_shards=False``); ``loader_tokens_positions`` also builds the
  ``positions`` tensor (which the trainer asks for only with ``trace``).
- ``raw_bin_slices_of_N``: ``np.memmap`` of the ``.bin`` file, copied out ``N`` batches at a time
  (N in ``RAW_SLICES``) and cut into the same batches: the limit of any reader of pre-tokenized
  data. The fastest N of each comparison is the baseline.

The token readers are compared three times: over one epoch at the text readers' batch shape;
over ``--token-epochs`` epochs (the same stream repeated, packed across the epoch boundaries),
because one pass takes a few milliseconds and the loader's fixed cost (opening and checking the
token shards against the run and the tokenizer) would otherwise be most of what is measured; and
over those epochs in batches of ``--token-batch-size`` x ``--token-seq-len`` (16 x 1024, a
pretraining-sized batch per rank).

Every reader's batches are checked in one untimed pass (token count and a CRC of every batch's
``input_ids`` must agree within a comparison); the timed passes only take the batches, since a
consumer's cost is the same for every reader and would pull the ratios towards 1.
Each reader is timed from opening the data to its last batch, in this process, one after the
other; the order rotates between repeats. The best and the median of ``--repeats`` are reported.
Targets: loader >= 0.8 x raw; loader_tokens >= 0.8 x raw_bin and >= 3 x loader (tokens/s, CPU).

The run folder is ``--data RUN_DIR``, or else ``benchmarks/out/loader-run-<docs>/``, built once
by the real pipeline and reused: the synthetic graded corpus (``--docs`` documents), the
``quality`` stage, ordered by ``alpha_ratio`` (``order: sort``), 8 shards. Writes
``benchmarks/out/loader.json``. ``python benchmarks/bench_loader.py [--docs 4000] [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from common import OUT_DIR  # noqa: E402  (first: puts the checkout on sys.path)

from pipeline.io.runfolder import shard_files  # noqa: E402
from pipeline.train.loader import CurriculumLoader, Encoder  # noqa: E402

OUT = OUT_DIR


def make_run(docs: int) -> Path:
    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline

    folder = OUT / f"loader-run-{docs}"
    if not (folder / "manifest.json").is_file():
        config = validate_config({
            "run": {"name": "bench-loader", "seed": 0},
            "input": {"format": "synthetic", "synthetic": {"docs": docs}},
            "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "alpha_ratio"}],
            "output": {"rows_per_shard": max(1, docs // 8)},
        })
        run_pipeline(config, folder, log=lambda m: print(m, file=sys.stderr))
    return folder


def encoded(texts: Iterable[list[str]], encoder: Encoder) -> Iterator[np.ndarray]:
    """Tokenize each list of texts with one call, EOS after every document."""
    for chunk in texts:
        ids = encoder.encode(chunk)
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=int(lengths.sum()))
        yield np.insert(flat, np.cumsum(lengths), encoder.eos)


def prepare_tokens(run_dir: Path, tokenizer) -> tuple[Path, str]:
    """Token shards with ``tokenizer`` (kept while they match) and the Megatron pair; (.bin path, dtype)."""
    from pipeline.engine.tokenize import tokenize_run
    from pipeline.io.megatron import export_megatron
    from pipeline.train.token_source import open_token_shards

    shards, _ = open_token_shards(run_dir, tokenizer, "text", sum(pq.read_metadata(f).num_rows for f in shard_files(run_dir)))
    if shards is None:
        folder = OUT / f"{run_dir.name}-tokenizer"
        tokenizer.save_pretrained(folder)
        tokenize_run(run_dir, tokenizer=str(folder))
    record = export_megatron(run_dir)
    return Path(record["bin"]), record["dtype"]


def pack(texts: Iterable[list[str]], encoder: Encoder, seq_len: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenize each list of texts with one call, EOS after every document, cut into batches."""
    return pack_tokens(encoded(texts, encoder), encoder.pad, seq_len, batch_size)


# The raw read copies this many batches at a time out of the map; the fastest of them is the
# baseline (small slices pay Python per slice, large ones the allocator's fresh pages).
RAW_SLICES = (4, 16, 64)


def raw_bin(path: Path, dtype: str, seq_len: int, batch_size: int, epochs: int = 1,
            slice_batches: int = 16) -> Iterator[np.ndarray]:
    """The Megatron .bin file, memory-mapped, in slices of whole batches, ``epochs`` times over."""
    data = np.memmap(path, dtype=dtype, mode="r")
    size = seq_len * batch_size * slice_batches
    for _ in range(epochs):
        for start in range(0, len(data), size):
            yield data[start:start + size].astype(np.int64)


def pack_tokens(arrays: Iterable[np.ndarray], pad: int, seq_len: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Token arrays (each document already followed by EOS) cut into batches, the last one padded."""
    size = seq_len * batch_size
    buf = np.empty(0, np.int64)
    for array in arrays:
        buf = np.concatenate([buf, array]) if len(buf) else array
        full = len(buf) // size * size
        for start in range(0, full, size):
            input_ids = torch.from_numpy(buf[start:start + size].reshape(batch_size, seq_len))
            yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
        buf = buf[full:]
    if len(buf):  # the tail: a shorter batch, its last row padded
        rows = -(-len(buf) // seq_len)
        input_ids = np.full(rows * seq_len, pad, np.int64)
        mask = np.zeros(rows * seq_len, np.int64)
        input_ids[:len(buf)], mask[:len(buf)] = buf, 1
        input_ids, mask = input_ids.reshape(rows, seq_len), mask.reshape(rows, seq_len)
        yield {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
               "labels": torch.from_numpy(np.where(mask == 1, input_ids, -100))}


def raw_texts(files: list[Path], chunk_rows: int) -> Iterator[list[str]]:
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows, columns=["text"]):
            yield batch.column(0).to_pylist()


def datasets_texts(files: list[Path], chunk_rows: int) -> Iterator[list[str]]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    for batch in ds.select_columns(["text"]).iter(batch_size=chunk_rows):
        yield batch["text"]


def consume(batches: Iterable[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(tokens, CRC of every batch's input_ids in order): what the readers must agree on."""
    tokens, crc = 0, 0
    for b in batches:
        tokens += int(b["attention_mask"].sum())
        crc = zlib.crc32(b["input_ids"].numpy().tobytes(), crc)
    return tokens, crc


def drain(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """The timed pass: take every batch and nothing more (a consumer's cost is the same for all
    readers and would only pull the ratios towards 1)."""
    return sum(1 for _ in batches)


def time_readers(readers: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    """Seconds of every pass of every reader (the order rotates between repeats) and what each read
    (one untimed pass per reader, checked by the caller)."""
    results = {name: consume(make()) for name, make in readers.items()}
    timings: dict[str, list[float]] = {name: [] for name in readers}
    names = list(readers)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            drain(readers[name]())
            timings[name].append(time.perf_counter() - t0)
    return timings, results


def token_readers(run_dir: Path, tokenizer: object, bin_path: Path, bin_dtype: str, pad: int, seq_len: int,
                  batch_size: int, epochs: int, chunk_rows: int) -> dict:
    """One token comparison: the token-shard loader as the trainer reads it (no ``positions``)
    and with ``positions``, against the raw ``.bin`` read in slices of each of ``RAW_SLICES`` batches."""
    group = {
        "loader_tokens": lambda: CurriculumLoader(run_dir, tokenizer, seq_len, batch_size, max_epochs=epochs,
                                                  chunk_rows=chunk_rows, token_shards=True, positions=False),
        "loader_tokens_positions": lambda: CurriculumLoader(run_dir, tokenizer, seq_len, batch_size, max_epochs=epochs,
                                                            chunk_rows=chunk_rows, token_shards=True, positions=True),
    }
    for n in RAW_SLICES:
        group[f"raw_bin_slices_of_{n}"] = lambda n=n: pack_tokens(
            raw_bin(bin_path, bin_dtype, seq_len, batch_size, epochs, n), pad, seq_len, batch_size)
    return group


def compare_tokens(timings: dict[str, list[float]], tokens: int) -> dict:
    """Tokens/s of each reader (best and median pass) and the loader's ratios to the fastest raw read."""
    best = {k: tokens / min(v) for k, v in timings.items()}
    median = {k: tokens / float(np.median(v)) for k, v in timings.items()}
    raw_best = max(v for k, v in best.items() if k.startswith("raw_bin"))
    raw_median = max(v for k, v in median.items() if k.startswith("raw_bin"))
    return {
        "tokens": tokens, "seconds": timings,
        "tokens_per_second": {k: round(v) for k, v in best.items()},
        "tokens_per_second_median": {k: round(v) for k, v in median.items()},
        "loader_tokens": round(best["loader_tokens"]), "loader_tokens_median": round(median["loader_tokens"]),
        "loader_tokens_positions": round(best["loader_tokens_positions"]),
        "loader_tokens_positions_median": round(median["loader_tokens_positions"]),
        "raw_bin": round(raw_best), "raw_bin_median": round(raw_median),
        "ratio": round(best["loader_tokens"] / raw_best, 3),
        "ratio_median": round(median["loader_tokens"] / raw_median, 3),
        "ratio_positions": round(best["loader_tokens_positions"] / raw_best, 3),
        "ratio_positions_median": round(median["loader_tokens_positions"] / raw_median, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an existing run folder (default: build one)")
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="also time the loader with this many tokenizer workers")
    parser.add_argument("--token-epochs", type=int, default=40, help="epochs of the second token-shard comparison")
    parser.add_argument("--token-seq-len", type=int, default=1024, help="the third comparison's sequence length")
    parser.add_argument("--token-batch-size", type=int, default=16, help="the third comparison's batch size")
    parser.add_argument("--quick", action="store_true", help="1000 documents, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.repeats = 1000, 2
    OUT.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.data) if args.data else make_run(args.docs)
    files = shard_files(run_dir)

    import datasets  # noqa: F401  (imported before timing: an import is not reading)

    from pipeline.models.lm import train_bpe_tokenizer

    sample = pq.read_table(files[0], columns=["text"])["text"].to_pylist()[:1000]
    tokenizer = train_bpe_tokenizer(sample, vocab_size=4096)
    encoder = Encoder(tokenizer)
    L, B, rows = args.seq_len, args.batch_size, args.chunk_rows

    tokens_started = time.perf_counter()
    bin_path, bin_dtype = prepare_tokens(run_dir, tokenizer)
    tokens_seconds = time.perf_counter() - tokens_started
    readers = {
        "raw": lambda: pack(raw_texts(files, rows), encoder, L, B),
        "datasets": lambda: pack(datasets_texts(files, rows), encoder, L, B),
        "loader": lambda: CurriculumLoader(run_dir, tokenizer, L, B, max_epochs=1, chunk_rows=rows, token_shards=False,
                                           positions=False),
        "loader_tokens": lambda: CurriculumLoader(run_dir, tokenizer, L, B, max_epochs=1, chunk_rows=rows,
                                                  token_shards=True, positions=False),
    }
    if args.workers:
        readers[f"loader_{args.workers}_workers"] = lambda: CurriculumLoader(
            run_dir, tokenizer, L, B, max_epochs=1, chunk_rows=rows, num_workers=args.workers, token_shards=False,
            positions=False)
    epochs, big_l, big_b = args.token_epochs, args.token_seq_len, args.token_batch_size
    shapes = {f"1 epoch, {B} x {L}": (1, L, B), f"{epochs} epochs, {B} x {L}": (epochs, L, B),
              f"{epochs} epochs, {big_b} x {big_l}": (epochs, big_l, big_b)}
    load_start = os.getloadavg()
    started = time.perf_counter()
    timings, results = time_readers(readers, args.repeats)
    if len(set(results.values())) != 1:
        raise SystemExit(f"the readers' batches differ (tokens, CRC of input_ids): {results}")
    comparisons = {}
    for label, (n_epochs, sl, bs) in shapes.items():
        group = token_readers(run_dir, tokenizer, bin_path, bin_dtype, encoder.pad, sl, bs, n_epochs, rows)
        group_timings, group_results = time_readers(group, args.repeats)
        if len(set(group_results.values())) != 1:
            raise SystemExit(f"{label}: the readers' batches differ (tokens, CRC of input_ids): {group_results}")
        comparisons[label] = compare_tokens(group_timings, next(iter(group_results.values()))[0])
    tokens = results["raw"][0]
    rates = {k: tokens / min(v) for k, v in timings.items()}
    median_rates = {k: tokens / float(np.median(v)) for k, v in timings.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU, python {platform.python_version()}",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "seconds_total": round(time.perf_counter() - started, 1),
        "run_dir": str(run_dir),
        "rows": sum(pq.read_metadata(f).num_rows for f in files),
        "shards": len(files),
        "tokens": tokens,
        "seq_len": L,
        "batch_size": B,
        "chunk_rows": rows,
        "seconds": timings,
        "tokens_per_second": {k: round(v) for k, v in rates.items()},
        "tokens_per_second_median": {k: round(v) for k, v in median_rates.items()},
        "ratio_to_raw": {k: round(v / rates["raw"], 3) for k, v in rates.items()},
        "ratio_to_raw_median": {k: round(v / median_rates["raw"], 3) for k, v in median_rates.items()},
        "ratio_loader_vs_datasets": round(rates["loader"] / rates["datasets"], 3),
        "ratio_loader_vs_datasets_median": round(median_rates["loader"] / median_rates["datasets"], 3),
        "tokenize_and_export_seconds": round(tokens_seconds, 1),
        "ratio_tokens_loader_vs_text_loader": round(rates["loader_tokens"] / rates["loader"], 3),
        "ratio_tokens_loader_vs_text_loader_median": round(median_rates["loader_tokens"] / median_rates["loader"], 3),
        "raw_bin_slices": list(RAW_SLICES),
        "token_comparisons": comparisons,
    }
    (OUT / "loader.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| reader | tokens/s (best) | tokens/s (median) | × raw (best) | × raw (median) |")
    print("|---|---:|---:|---:|---:|")
    for k in readers:
        print(f"| {k} | {rates[k]:,.0f} | {median_rates[k]:,.0f} | {rates[k] / rates['raw']:.2f} | "
              f"{median_rates[k] / median_rates['raw']:.2f} |")
    print(f"loader / datasets: {result['ratio_loader_vs_datasets']:.2f} (best), "
          f"{result['ratio_loader_vs_datasets_median']:.2f} (median); token-shard loader / text loader: "
          f"{result['ratio_tokens_loader_vs_text_loader']:.2f} (best), "
          f"{result['ratio_tokens_loader_vs_text_loader_median']:.2f} (median)")
    print("| token comparison | tokens | loader tok/s (best / median) | with positions | fastest raw .bin "
          "(best / median) | ratio (best / median) | with positions |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c in comparisons.items():
        print(f"| {label} | {c['tokens']:,} | {c['loader_tokens']:,} / {c['loader_tokens_median']:,} | "
              f"{c['loader_tokens_positions']:,} / {c['loader_tokens_positions_median']:,} | "
              f"{c['raw_bin']:,} / {c['raw_bin_median']:,} | {c['ratio']:.2f} / {c['ratio_median']:.2f} | "
              f"{c['ratio_positions']:.2f} / {c['ratio_positions_median']:.2f} |")
    print(f"{tokens} tokens from {result['rows']} documents in {len(files)} shards; load average "
          f"{load_start[0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end; "
          f"{result['seconds_total']} s of timed reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
