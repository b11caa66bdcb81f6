"""What a `curriculum run` costs as a new process against the same run inside a process that holds a
Ray session (a notebook, the test suite's ``cli`` fixture).

Both join one local 2-CPU Ray cluster and run the same small pipeline (400 synthetic documents,
quality, a global sort, shards). A subprocess is a new Ray job: Ray starts fresh workers for it,
each importing Ray, Ray Data and pandas, on top of the process's own imports. Measured: wall time
and the machine's busy CPU-seconds (/proc/stat, every process) for each run, after one warm-up run
in-process; the median of ``--repeats`` of each, interleaved. Linux only (/proc/stat).

    python benchmarks/bench_cli_process.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = {"run": {"name": "cli-cost", "seed": 0}, "input": {"format": "synthetic", "synthetic": {"docs": 400}},
          "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "symbol_ratio",
                                            "direction": "descending"}],
          "output": {"rows_per_shard": 150}}
SETTLE_SECONDS = 4.0  # after a run, so the CPU its workers spend finishing counts for it


def busy_cpu_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cli_process.json")
    args = parser.parse_args()

    # As in the test suite (tests/conftest.py), where these figures matter: idle workers kept for
    # 5 minutes, and no token authentication on this local cluster.
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import yaml

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    from pipeline.cli import main as curriculum

    work = Path(tempfile.mkdtemp(prefix="cli-cost-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))

    def in_process(out: Path) -> int:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return curriculum(["run", str(config), "--out", str(out), "--ray-address", address])

    def as_process(out: Path) -> int:
        argv = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(out), "--ray-address", address]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(argv, capture_output=True, env=env, cwd=ROOT).returncode

    assert in_process(work / "warm-up") == 0
    runs: dict[str, list[tuple[float, float]]] = {"subprocess": [], "in-process": []}
    for i in range(args.repeats):
        for name, fn in (("subprocess", as_process), ("in-process", in_process)):
            time.sleep(SETTLE_SECONDS)
            cpu, start = busy_cpu_seconds(), time.perf_counter()
            assert fn(work / f"{name}-{i}") == 0, name
            wall = time.perf_counter() - start
            time.sleep(SETTLE_SECONDS)
            runs[name].append((wall, busy_cpu_seconds() - cpu))
    ray.shutdown()

    result = {name: {"wall_s": round(statistics.median(w for w, _ in r), 1),
                     "busy_cpu_s": round(statistics.median(c for _, c in r), 1), "repeats": len(r)}
              for name, r in runs.items()}
    result["cpu_ratio_subprocess_to_in_process"] = round(result["subprocess"]["busy_cpu_s"]
                                                         / result["in-process"]["busy_cpu_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
