"""Reading a stage-cache folder with Ray Data: the first parquet reader, which a run uses, against
Ray 2.60's default (``DataContext.use_datasource_v2``), in the same process (issue 14).

The folder is what the runner's cache holds: ``--files`` parquet files of ``--rows`` rows each. Both
readers run the same read → ``map_batches`` (identity) → ``to_arrow_refs`` and must give the same
table, in the same order. ``--repeats`` reads each, alternating; the first read of each is reported
apart (cold: Ray starts the workers it needs), the rest as the median. (The default reader also
starts a pool of footer-reading actors, one process each, inside every read.) The floor, in the same
run: ``pyarrow.dataset`` reading the folder into one table in this process, no Ray at all.

``python benchmarks/bench_cache_read.py [--files 12] [--rows 100] [--repeats 5] [--cpus 2]``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from common import OUT_DIR  # noqa: E402  (first: puts the checkout on sys.path)


def _read_in_process(folder: Path) -> tuple[float, pa.Table]:
    started = time.perf_counter()
    table = pads.dataset(str(folder), format="parquet").to_table()
    return time.perf_counter() - started, table


def _read(folder: Path, first_reader: bool) -> tuple[float, pa.Table]:
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = not first_reader
    started = time.perf_counter()
    refs = ray.data.read_parquet(str(folder)).map_batches(lambda b: b, batch_format="pyarrow").to_arrow_refs()
    table = pa.concat_tables(ray.get(refs))
    return time.perf_counter() - started, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="cache-read-"))
    for i in range(args.files):
        ids = [f"{i:04d}-{j:06d}" for j in range(args.rows)]
        pq.write_table(pa.table({"id": ids, "text": [f"document {x}" for x in ids], "x": list(range(args.rows))}),
                       folder / f"part-{i:05d}.parquet")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    readers = {"first_reader": lambda: _read(folder, True), "default_reader": lambda: _read(folder, False),
               "pyarrow_in_process": lambda: _read_in_process(folder)}
    times: dict[str, list[float]] = {name: [] for name in readers}
    tables: dict[str, pa.Table] = {}
    for _ in range(args.repeats):
        for name, read in readers.items():
            seconds, tables[name] = read()
            times[name].append(seconds)
    for name in ("default_reader", "pyarrow_in_process"):
        assert tables["first_reader"].equals(tables[name]), f"{name} gave another table"
    assert tables["first_reader"].num_rows == args.files * args.rows

    result = {"files": args.files, "rows_per_file": args.rows, "cpus": args.cpus, "repeats": args.repeats}
    for name, values in times.items():
        result[name] = {"cold_s": round(values[0], 3), "warm_median_s": round(statistics.median(values[1:]), 3)}
    warm = {name: result[name]["warm_median_s"] for name in readers}
    result["warm_ratio_default_over_first"] = round(warm["default_reader"] / warm["first_reader"], 2)
    result["warm_ratio_first_over_pyarrow"] = round(warm["first_reader"] / warm["pyarrow_in_process"], 2)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "cache_read.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
