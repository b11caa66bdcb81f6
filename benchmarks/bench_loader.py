"""Curriculum loader throughput against a raw pyarrow read of the same shards (issue 5).

Baseline ("raw"): read each shard in name order with ``pyarrow.parquet.read_table`` (text column
only) and tokenize the texts with the same fast tokenizer, in the same chunk size, counting the
tokens. That is the least work that turns the shards into tokens. The loader does all of that
plus what training needs: position checks, EOS separators, packing into ``seq_len`` sequences,
batches as tensors, labels, and the resume cursor. Both run in this process, one after the
other, and who goes first alternates; the best and the median of ``--repeats`` are reported.
Target: loader >= 0.8 x raw (tokens/s, CPU).

The run folder is made once by the real pipeline (synthetic graded corpus, quality-ascending
order) under benchmarks/out/loader-run, or given with ``--data RUN_DIR``. Writes
benchmarks/out/loader.json. ``python benchmarks/bench_loader.py [--docs 4000] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
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


def raw_read(files: list[Path], encoder: Encoder, chunk_rows: int) -> int:
    tokens = 0
    for f in files:
        texts = pq.read_table(f, columns=["text"])["text"].to_pylist()
        for start in range(0, len(texts), chunk_rows):
            tokens += sum(len(ids) + 1 for ids in encoder.encode(texts[start : start + chunk_rows]))  # + EOS
    return tokens


def loader_read(run_dir: Path, tokenizer, seq_len: int, batch_size: int, chunk_rows: int, workers: int) -> int:
    loader = CurriculumLoader(run_dir, tokenizer, seq_len, batch_size, max_epochs=1, chunk_rows=chunk_rows,
                              num_workers=workers)
    return sum(int(b["attention_mask"].sum()) for b in loader)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an existing run folder (default: build one)")
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="also time the loader with this many tokenizer workers")
    parser.add_argument("--quick", action="store_true", help="1000 documents, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.repeats = 1000, 2
    OUT.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.data) if args.data else make_run(args.docs)
    files = shard_files(run_dir)

    from pipeline.models.lm import train_bpe_tokenizer

    sample = pq.read_table(files[0], columns=["text"])["text"].to_pylist()[:1000]
    tokenizer = train_bpe_tokenizer(sample, vocab_size=4096)
    encoder = Encoder(tokenizer)

    timings: dict[str, list[float]] = {"raw": [], "loader": []}
    if args.workers:
        timings[f"loader_{args.workers}_workers"] = []
    counts: dict[str, int] = {}
    for repeat in range(args.repeats):
        names = list(timings) if repeat % 2 == 0 else list(reversed(timings))  # alternate who goes first
        for name in names:
            t0 = time.perf_counter()
            if name == "raw":
                counts[name] = raw_read(files, encoder, args.chunk_rows)
            else:
                workers = args.workers if name != "loader" else 0
                counts[name] = loader_read(run_dir, tokenizer, args.seq_len, args.batch_size, args.chunk_rows, workers)
            timings[name].append(time.perf_counter() - t0)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"token counts differ between raw and loader: {counts}")
    best = {k: min(v) for k, v in timings.items()}
    rates = {k: counts["raw"] / t for k, t in best.items()}
    median_rates = {k: counts["raw"] / float(np.median(v)) for k, v in timings.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU, python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "run_dir": str(run_dir),
        "rows": sum(pq.read_metadata(f).num_rows for f in files),
        "shards": len(files),
        "tokens": counts["raw"],
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "chunk_rows": args.chunk_rows,
        "seconds": timings,
        "tokens_per_second": {k: round(v) for k, v in rates.items()},
        "tokens_per_second_median": {k: round(v) for k, v in median_rates.items()},
        "ratio_loader_vs_raw": round(rates["loader"] / rates["raw"], 3),
        "ratio_loader_vs_raw_median": round(median_rates["loader"] / median_rates["raw"], 3),
    }
    if args.workers:
        result[f"ratio_loader_{args.workers}_workers_vs_raw"] = round(rates[f"loader_{args.workers}_workers"] / rates["raw"], 3)
    (OUT / "loader.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| reader | tokens/s (best) | ratio to raw (best) | ratio to raw (median) |")
    print("|---|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {v:,.0f} | {v / rates['raw']:.2f} | {median_rates[k] / median_rates['raw']:.2f} |")
    print(f"{counts['raw']} tokens from {result['rows']} documents in {len(files)} shards; "
          f"load average {result['load_average'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
