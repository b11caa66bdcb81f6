"""The driver's memory in a distributed sort: Ray Data's ``ds.sort`` on the blocks as they come
against ``pipeline.core.sorting.distributed_sort`` (blocks combined first), same data, same keys.

The data: ``--rows`` rows of an id, a random float key and a ``--dim``-float embedding (what an
order stage sorts after ``embed``), in ``--blocks`` blocks. Each method runs in a fresh driver
process (a process's peak RSS never falls), which reports its peak RSS before and after the sort,
the sort's wall time and a digest of the sorted ids (the two must agree).

``python benchmarks/bench_sort_memory.py [--rows 100000] [--dim 384] [--blocks 200] [--cpus 2]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)


def _peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def measure(method: str, rows: int, dim: int, blocks: int, cpus: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.context import DataContext, ShuffleStrategy

    from pipeline.core.sorting import distributed_sort

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    def make(batch: dict) -> pa.Table:
        ids = batch["id"]
        rng = np.random.default_rng(int(ids[0]))
        vectors = rng.standard_normal((len(ids), dim), dtype=np.float32)
        return pa.table({"id": [f"{i:09d}" for i in ids], "key": rng.random(len(ids)),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})

    data = ray.data.range(rows, override_num_blocks=blocks).map_batches(make, batch_format="numpy",
                                                                          batch_size=None).materialize()
    before = _peak_mib()
    started = time.perf_counter()
    if method == "ray":
        ordered = data.sort(["key", "id"]).materialize()
    else:
        ordered = distributed_sort(data, ["key", "id"]).materialize()
    seconds = time.perf_counter() - started
    after = _peak_mib()
    ids = [i for t in ray.get(ordered.select_columns(["id"]).to_arrow_refs()) for i in t["id"].to_pylist()]
    ray.shutdown()
    return {"method": method, "rows": rows, "blocks_in": blocks, "blocks_sorted": ordered.num_blocks(),
            "peak_before_mib": before, "peak_after_mib": after, "peak_increase_mib": round(after - before, 1),
            "seconds": round(seconds, 2), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--child", choices=["ray", "combined"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.dim, args.blocks, args.cpus)))
        return 0
    results = []
    for method in ("ray", "combined"):
        argv = [sys.executable, __file__, "--child", method, "--rows", str(args.rows), "--dim", str(args.dim),
                "--blocks", str(args.blocks), "--cpus", str(args.cpus)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    assert results[0]["ids_sha256"] == results[1]["ids_sha256"], "the two sorts disagree"
    (OUT_DIR / "sort_memory.json").write_text(json.dumps(results, indent=2))
    print("| method | blocks in → sorted | driver peak before MiB | after MiB | increase MiB | sort s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        name = "`ds.sort` (Ray Data)" if r["method"] == "ray" else "`distributed_sort` (blocks combined)"
        print(f"| {name} | {r['blocks_in']} → {r['blocks_sorted']} | {r['peak_before_mib']:,.0f} | "
              f"{r['peak_after_mib']:,.0f} | {r['peak_increase_mib']:,.0f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
