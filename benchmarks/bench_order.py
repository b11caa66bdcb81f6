"""Time and driver memory of every order strategy at scale (issue 4).

1. **Base.** The runner on ``--rows`` synthetic graded documents with the quality stage only
   (no model), cached under ``benchmarks/out/order_base_<rows>/`` and reused by later runs.
2. **One subprocess per strategy.** A fresh driver joins the local Ray cluster started here,
   reads the quality stage's cached parquet, applies the order stage and writes its output to
   parquet exactly as the runner does (``StageCache.write``). It reports the wall seconds, the
   rows out, and its peak RSS (``getrusage`` of the driver process alone: Ray's workers are
   other processes), then checks that the written positions are exactly 0 … rows−1. The time
   of ``random``, the baseline order, measured in the same run (after a discarded warm-up run),
   gives each strategy's ratio; ``copy`` (read and write, no order) is the I/O floor.

The quality methods order by the corpus's ``true_quality`` (the combine stage's ``quality`` is
another stage's); both interleaves group by ``topic`` (10 values), as the synthetic corpus has
no cluster column. Writes ``benchmarks/out/order.json`` and prints a markdown table.

``python benchmarks/bench_order.py [--rows 1000000] [--only buckets,pacing] [--repeat 3] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

OUT = OUT_DIR
KEY = "true_quality"


def strategies(rows: int) -> dict[str, dict]:
    return {
        "copy": {},  # no order: read and write only, the I/O floor every strategy pays
        "random": {"method": "random"},
        "sort": {"method": "sort", "key": "n_words", "direction": "descending"},
        "quality_ascending": {"method": "quality_ascending", "key": KEY},
        "quality_descending": {"method": "quality_descending", "key": KEY},
        "buckets": {"method": "buckets", "key": KEY, "buckets": 10},
        "folded": {"method": "folded", "key": KEY, "folds": 3},
        "domain_interleave": {"method": "domain_interleave", "key": KEY, "group": "topic"},
        "cluster_interleave": {"method": "cluster_interleave", "key": KEY, "group": "topic"},
        "pacing": {"method": "pacing", "key": KEY, "total_samples": rows, "batch_size": 32,
                   "pacing": {"function": "fixed_root", "root_degree": 2}},
        "replay": {"method": "replay", "key": KEY, "phases": 4, "replay_fraction": 0.2},
    }


def build_base(rows: int) -> Path:
    """The quality stage's cached output folder for ``rows`` synthetic documents."""
    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline

    run_dir = OUT / f"order_base_{rows}"
    found = sorted(run_dir.glob("stages/01-quality-*/data"))
    if found and (found[0].parent / "_SUCCESS.json").is_file():
        return found[0]
    config = validate_config({
        "run": {"name": "bench-order-base", "seed": 0},
        "input": {"format": "synthetic", "synthetic": {"docs": rows, "kind": "graded"}},
        "stages": [{"name": "quality"}, {"name": "order", "method": "random"}],
        "output": {"rows_per_shard": 250_000},
    })
    t0 = time.time()
    run_pipeline(config, run_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"[base] {rows} rows in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return sorted(run_dir.glob("stages/01-quality-*/data"))[0]


def one(strategy: str, params: dict, data: Path, address: str) -> dict:
    """Run in the child: apply one strategy and write it like the runner; report time and RSS."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray
    import ray.data

    from pipeline.engine.cache import StageCache
    from stages.base import StageContext
    from stages.order import OrderParams, OrderStage

    ray.init(address=address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t0 = time.time()
        ds = StageCache.read(data.parent)
        ctx = StageContext(run_dir=Path(tmp), artifact_dir=Path(tmp), seed=0, input_columns=list(ds.schema().names))
        out = OrderStage(OrderParams(name="order", **params)).apply(ds, ctx) if params else ds
        rows_out = StageCache.write(out, Path(tmp), "data")
        seconds = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        check = None
        if params:  # after the RSS reading: the positions must be exactly 0 … rows_out − 1
            positions = pads.dataset(str(Path(tmp) / "data"), format="parquet").to_table(columns=["position"])["position"]
            positions = positions.filter(pc.is_valid(positions))  # rows handed to the runner to drop have none
            shown = len(positions)
            check = (pc.min(positions).as_py() == 0 and pc.max(positions).as_py() == shown - 1
                     and pc.count_distinct(positions).as_py() == shown)
    order = {k: v for k, v in (ctx.order or {}).items() if k not in ("curve", "expected", "realised", "boundaries")}
    return {"strategy": strategy, "seconds": round(seconds, 1), "rows_out": rows_out, "positions_ok": check,
            "driver_peak_rss_mb": round(peak, 1), "load_avg_1m": round(os.getloadavg()[0], 1), "order": order}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20k rows, for a smoke run")
    parser.add_argument("--only", help="comma-separated strategies (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per strategy; the fastest is reported")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = 20_000 if args.quick else args.rows
    if args.one:
        print(json.dumps(one(args.one, strategies(rows)[args.one], Path(args.data), args.address)))
        return 0

    import ray

    OUT.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    data = build_base(rows)
    address = ray.get_runtime_context().gcs_address
    chosen = args.only.split(",") if args.only else list(strategies(rows))
    if "random" not in chosen:
        chosen.insert(0, "random")  # the baseline of the ratios
    # A discarded first run warms the cluster (worker start-up, page cache) for the baseline;
    # repeats go round all strategies in turn, so a change in the machine's load hits them alike.
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for name in ["warm-up"] + [n for _ in range(args.repeat) for n in chosen]:
        child = subprocess.run([sys.executable, __file__, "--one", "random" if name == "warm-up" else name,
                                "--rows", str(rows), "--data", str(data), "--address", address],
                               capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if name == "warm-up":
            continue
        if child.returncode or not lines:
            print(f"[{name}] failed:\n{child.stderr[-3000:]}", file=sys.stderr)
            runs[name].append({"strategy": name, "error": child.stderr[-500:]})
            continue
        runs[name].append(json.loads(lines[-1]))
        r = runs[name][-1]
        print(f"[{name}] {r['seconds']}s, {r['rows_out']} rows, driver peak RSS {r['driver_peak_rss_mb']} MB, "
              f"positions ok: {r['positions_ok']}, load {r['load_avg_1m']}", file=sys.stderr, flush=True)
    results = []
    for name in chosen:
        failed = [r for r in runs[name] if "error" in r]
        if failed:
            results.append(failed[0])
            continue
        best = dict(min(runs[name], key=lambda r: r["seconds"]))
        best["all_seconds"] = [r["seconds"] for r in runs[name]]
        best["driver_peak_rss_mb"] = max(r["driver_peak_rss_mb"] for r in runs[name])
        best["positions_ok"] = None if best["positions_ok"] is None else all(r["positions_ok"] for r in runs[name])
        results.append(best)
    ray.shutdown()

    base = next((r["seconds"] for r in results if r["strategy"] == "random" and "seconds" in r), None)
    for r in results:
        if base and "seconds" in r:
            r["ratio_to_random"] = round(r["seconds"] / base, 2)
    report = {"rows": rows, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "platform": platform.platform()},
              "ray": __import__("ray").__version__, "results": results}
    path = OUT / ("order_quick.json" if args.quick else "order.json")
    path.write_text(json.dumps(report, indent=2))
    print("| strategy | seconds | × random | rows out | driver peak RSS (MB) |\n|---|---:|---:|---:|---:|")
    for r in results:
        if "seconds" in r:
            print(f"| {r['strategy']} | {r['seconds']} | {r.get('ratio_to_random', '')} | {r['rows_out']:,} | "
                  f"{r['driver_peak_rss_mb']:.0f} |")
        else:
            print(f"| {r['strategy']} | failed | | | |")
    print(f"\nwrote {path}")
    failed = [r for r in results if "error" in r or r.get("driver_peak_rss_mb", 0) >= 2048 or r.get("positions_ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
