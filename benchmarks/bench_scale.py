"""Scale: the same pipeline at 10k, 100k and 1M documents; docs/s and the driver's peak memory.

Each size runs ``curriculum run`` in a fresh driver process that joins one Ray cluster started
by this script, so Ray's start-up is outside every measurement. The light pipeline is the
synthetic graded corpus through ``quality`` -> ``order`` (a global sort on ``alpha_ratio``) ->
shards; the heavy one (at ``--heavy-docs``) adds ``perplexity`` under the reference LM trained
here and ``embed`` -> ``cluster``, and orders by quality inside clusters.

- **Time per document**: the run's own wall time (``manifest.json`` ``seconds``: read, stages,
  shards and manifest; not the connection) over its documents. Bound: at the largest size it is
  at most 1.3x that at the smallest.
- **Driver peak RSS**: the ``curriculum run`` process's maximum resident set (``wait4``), so the
  workers' memory is not counted and anything collected to the driver is. Bound: <= 2 GiB.

``python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--heavy-docs 100000]
[--no-heavy | --only-heavy] [--heavy-small-models]``; ``--only-heavy`` reruns the heavy pipeline and
keeps the light figures already in the JSON. ``--heavy-small-models`` scores with a 1-layer,
32-wide reference LM (a 512-token vocabulary, 64-token windows) and embeds 32 tokens per document
(the same stages, data path and actor pools, a fraction of the model compute), for machines where
the default models would take hours at 100k documents. Writes ``benchmarks/out/scale.json``; the run folders go to
``benchmarks/out/scale/`` and are deleted after each size unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import yaml
from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

LIGHT = [{"name": "quality"}, {"name": "order", "method": "sort", "key": "alpha_ratio"}]
HEAVY = [{"name": "quality"}, {"name": "perplexity", "model": "reference"}, {"name": "combine"}, {"name": "embed"},
         {"name": "cluster", "k": 10}, {"name": "order", "method": "cluster_interleave", "key": "quality",
                                        "higher_is_better": True}]
SMALL_MODELS = {
    "perplexity": {"max_length": 64, "reference": {"vocab_size": 512, "seq_len": 64, "steps": 100,
                                                   "model": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32,
                                                             "n_head": 2}}},
    "embed": {"max_length": 32},
}


def heavy_stages(small_models: bool) -> list[dict]:
    return [{**stage, **SMALL_MODELS.get(stage["name"], {})} if small_models else stage for stage in HEAVY]


def run_size(address: str, docs: int, stages: list[dict], label: str, keep: bool) -> dict:
    folder = OUT_DIR / "scale" / f"{label}-{docs}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {"run": {"name": f"scale-{label}-{docs}", "seed": 0},
              "input": {"format": "synthetic", "synthetic": {"docs": docs, "kind": "graded"}},
              "stages": stages, "output": {"rows_per_shard": 100_000}}
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "pipeline.cli", "run", str(config_path), "--out", str(folder / "run"),
            "--ray-address", address]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CURRICULUM_PROGRESS_SECONDS": "60"}
    started = time.perf_counter()
    with open(folder / "stderr.log", "wb") as err:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} at {docs} docs failed; see {folder / 'stderr.log'}")
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    run_seconds = manifest["seconds"]
    result = {
        "pipeline": label, "docs": docs, "output_rows": manifest["counts"]["output_rows"],
        "run_seconds": run_seconds, "process_seconds": round(wall, 1),
        "docs_per_second": round(docs / run_seconds, 1), "us_per_doc": round(1e6 * run_seconds / docs, 2),
        "driver_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "stages": {s["name"]: s["seconds"] for s in manifest["stages"]},
        # The driver's peak RSS when each stage ended (monotone): where it jumps, a stage held data in the driver.
        "driver_peak_rss_mib_after": {s["name"]: s.get("driver_peak_rss_mib") for s in manifest["stages"]},
        "timing": manifest.get("timing"),
    }
    if not keep:
        shutil.rmtree(folder / "run", ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--heavy-docs", type=int, default=100_000)
    parser.add_argument("--no-heavy", action="store_true")
    parser.add_argument("--only-heavy", action="store_true", help="rerun the heavy pipeline only; keep the light "
                        "results already in scale.json")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--heavy-small-models", action="store_true",
                        help="the heavy pipeline with a tiny reference LM and 32-token embeddings")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    load_start = os.getloadavg()
    if args.only_heavy:
        previous = json.loads((OUT_DIR / "scale.json").read_text())
        results = [r for r in previous["results"] if r["pipeline"] == "light"]
    else:
        results = [run_size(address, docs, LIGHT, "light", args.keep) for docs in sizes]
    if not args.no_heavy:
        label = "heavy-small-models" if args.heavy_small_models else "heavy"
        results.append(run_size(address, args.heavy_docs, heavy_stages(args.heavy_small_models), label, args.keep))
    ray.shutdown()
    light = [r for r in results if r["pipeline"] == "light"]
    smallest, largest = light[0], light[-1]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU, python {platform.python_version()}",
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "results": results,
        "time_per_doc_ratio_largest_vs_smallest": round(largest["us_per_doc"] / smallest["us_per_doc"], 3),
        "max_driver_peak_rss_mib": max(r["driver_peak_rss_mib"] for r in results),
        "bounds": {"time_per_doc_ratio": 1.3, "driver_peak_rss_mib": 2048},
    }
    summary["bounds_met"] = (summary["time_per_doc_ratio_largest_vs_smallest"] <= 1.3
                             and summary["max_driver_peak_rss_mib"] <= 2048)
    (OUT_DIR / "scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| pipeline | docs | run s | docs/s | µs/doc | driver peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['pipeline']} | {r['docs']:,} | {r['run_seconds']:.1f} | {r['docs_per_second']:,.0f} | "
              f"{r['us_per_doc']:.1f} | {r['driver_peak_rss_mib']:,.0f} |")
    print(f"time per doc, {largest['docs']:,} vs {smallest['docs']:,}: "
          f"{summary['time_per_doc_ratio_largest_vs_smallest']:.2f} (bound 1.3); max driver RSS "
          f"{summary['max_driver_peak_rss_mib']:.0f} MiB (bound 2048); load {load_start[0]:.1f} -> "
          f"{summary['load_average_end'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
