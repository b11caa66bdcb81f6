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

- ``loader_tokens``: ``CurriculumLoader(token_shards=True)``: the same batches, sliced from the
  memory-mapped token shards instead of tokenized (``loader`` is ``token_shards=False``).
- ``raw_bin``: ``np.memmap`` of the ``.bin`` file cut into the same batches: the limit of any
  reader of pre-tokenized data.

The token pair is timed three times: over one epoch, beside the text readers; over
``--token-epochs`` epochs (the same stream repeated, packed across the epoch boundaries), because
one pass of either takes a few milliseconds and the loader's fixed cost (opening and checking the
token shards against the run and the tokenizer) would otherwise be most of what is measured; and
over those epochs in batches of ``--token-batch-size`` x ``--token-seq-len`` (16 x 1024, a
pretraining-sized batch per rank), because with 4,096-token batches the loader's fixed cost per
batch (the resume cursor, the ``positions`` tensor, a few Python calls) is compared with a read
that costs about as little per batch.

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


def raw_bin(path: Path, dtype: str, seq_len: int, batch_size: int, epochs: int = 1) -> Iterator[np.ndarray]:
    """The Megatron .bin file, memory-mapped, in slices of whole batches, ``epochs`` times over."""
    data = np.memmap(path, dtype=dtype, mode="r")
    size = seq_len * batch_size * 64
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


def time_readers(readers: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    """Seconds of every pass of every reader (the order rotates between repeats) and what each read."""
    timings: dict[str, list[float]] = {name: [] for name in readers}
    results: dict[str, tuple[int, int]] = {}
    names = list(readers)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            results[name] = consume(readers[name]())
            timings[name].append(time.perf_counter() - t0)
    return timings, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an existing run folder (default: build one)")
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="also time the loader with this many tokenizer workers")
    parser.add_argument("--token-epochs", type=int, default=10, help="epochs of the second token-shard comparison")
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
        "loader": lambda: CurriculumLoader(run_dir, tokenizer, L, B, max_epochs=1, chunk_rows=rows, token_shards=False),
        "loader_tokens": lambda: CurriculumLoader(run_dir, tokenizer, L, B, max_epochs=1, chunk_rows=rows,
                                                  token_shards=True),
        "raw_bin": lambda: pack_tokens(raw_bin(bin_path, bin_dtype, L, B), encoder.pad, L, B),
    }
    epochs, big_l, big_b = args.token_epochs, args.token_seq_len, args.token_batch_size
    token_readers = {
        f"loader_tokens_{epochs}_epochs": lambda: CurriculumLoader(run_dir, tokenizer, L, B, max_epochs=epochs,
                                                                   chunk_rows=rows, token_shards=True),
        f"raw_bin_{epochs}_epochs": lambda: pack_tokens(raw_bin(bin_path, bin_dtype, L, B, epochs), encoder.pad, L, B),
    }
    big_readers = {
        f"loader_tokens_{epochs}_epochs_{big_b}x{big_l}": lambda: CurriculumLoader(
            run_dir, tokenizer, big_l, big_b, max_epochs=epochs, chunk_rows=rows, token_shards=True),
        f"raw_bin_{epochs}_epochs_{big_b}x{big_l}": lambda: pack_tokens(
            raw_bin(bin_path, bin_dtype, big_l, big_b, epochs), encoder.pad, big_l, big_b),
    }
    if args.workers:
        readers[f"loader_{args.workers}_workers"] = lambda: CurriculumLoader(
            run_dir, tokenizer, L, B, max_epochs=1, chunk_rows=rows, num_workers=args.workers, token_shards=False)
    load_start = os.getloadavg()
    started = time.perf_counter()
    timings, results = time_readers(readers, args.repeats)
    token_timings, token_results = time_readers(token_readers, args.repeats)
    big_timings, big_results = time_readers(big_readers, args.repeats)
    for group in (results, token_results, big_results):
        if len(set(group.values())) != 1:
            raise SystemExit(f"the readers' batches differ (tokens, CRC of input_ids): {group}")
    tokens, epoch_tokens = results["raw"][0], token_results[f"raw_bin_{epochs}_epochs"][0]
    rates = {k: tokens / min(v) for k, v in timings.items()}
    median_rates = {k: tokens / float(np.median(v)) for k, v in timings.items()}
    token_rates = {k: epoch_tokens / min(v) for k, v in token_timings.items()}
    token_median_rates = {k: epoch_tokens / float(np.median(v)) for k, v in token_timings.items()}
    many, bin_many = f"loader_tokens_{epochs}_epochs", f"raw_bin_{epochs}_epochs"
    big, bin_big = list(big_readers)
    big_rates = {k: epoch_tokens / min(v) for k, v in big_timings.items()}
    big_median_rates = {k: epoch_tokens / float(np.median(v)) for k, v in big_timings.items()}
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
        "ratio_tokens_loader_vs_raw_bin": round(rates["loader_tokens"] / rates["raw_bin"], 3),
        "ratio_tokens_loader_vs_raw_bin_median": round(median_rates["loader_tokens"] / median_rates["raw_bin"], 3),
        "ratio_tokens_loader_vs_text_loader": round(rates["loader_tokens"] / rates["loader"], 3),
        "ratio_tokens_loader_vs_text_loader_median": round(median_rates["loader_tokens"] / median_rates["loader"], 3),
        "token_epochs": epochs,
        "token_epochs_tokens": epoch_tokens,
        "token_epochs_seconds": token_timings,
        "token_epochs_tokens_per_second": {k: round(v) for k, v in token_rates.items()},
        "token_epochs_tokens_per_second_median": {k: round(v) for k, v in token_median_rates.items()},
        "ratio_tokens_loader_vs_raw_bin_epochs": round(token_rates[many] / token_rates[bin_many], 3),
        "ratio_tokens_loader_vs_raw_bin_epochs_median": round(token_median_rates[many] / token_median_rates[bin_many], 3),
        "big_batch": {"seq_len": big_l, "batch_size": big_b},
        "big_batch_seconds": big_timings,
        "big_batch_tokens_per_second": {k: round(v) for k, v in big_rates.items()},
        "big_batch_tokens_per_second_median": {k: round(v) for k, v in big_median_rates.items()},
        "ratio_tokens_loader_vs_raw_bin_big_batch": round(big_rates[big] / big_rates[bin_big], 3),
        "ratio_tokens_loader_vs_raw_bin_big_batch_median": round(big_median_rates[big] / big_median_rates[bin_big], 3),
    }
    (OUT / "loader.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| reader | tokens/s (best) | tokens/s (median) | × raw (best) | × raw (median) |")
    print("|---|---:|---:|---:|---:|")
    for k in readers:
        print(f"| {k} | {rates[k]:,.0f} | {median_rates[k]:,.0f} | {rates[k] / rates['raw']:.2f} | "
              f"{median_rates[k] / median_rates['raw']:.2f} |")
    print(f"loader / datasets: {result['ratio_loader_vs_datasets']:.2f} (best), "
          f"{result['ratio_loader_vs_datasets_median']:.2f} (median)")
    print(f"token-shard loader / raw .bin: {result['ratio_tokens_loader_vs_raw_bin']:.2f} (best), "
          f"{result['ratio_tokens_loader_vs_raw_bin_median']:.2f} (median); token-shard loader / text loader: "
          f"{result['ratio_tokens_loader_vs_text_loader']:.2f} (best), "
          f"{result['ratio_tokens_loader_vs_text_loader_median']:.2f} (median)")
    print(f"over {epochs} epochs ({epoch_tokens} tokens): " + ", ".join(
        f"{k} {token_rates[k]:,.0f} tok/s (best), {token_median_rates[k]:,.0f} (median)" for k in token_readers))
    print(f"token-shard loader / raw .bin over {epochs} epochs: {result['ratio_tokens_loader_vs_raw_bin_epochs']:.2f} "
          f"(best), {result['ratio_tokens_loader_vs_raw_bin_epochs_median']:.2f} (median)")
    print(f"token-shard loader / raw .bin over {epochs} epochs in batches of {big_b}x{big_l}: "
          f"{result['ratio_tokens_loader_vs_raw_bin_big_batch']:.2f} (best), "
          f"{result['ratio_tokens_loader_vs_raw_bin_big_batch_median']:.2f} (median)")
    print(f"{tokens} tokens from {result['rows']} documents in {len(files)} shards; load average "
          f"{load_start[0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end; "
          f"{result['seconds_total']} s of timed reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
