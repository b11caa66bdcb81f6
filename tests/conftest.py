"""Shared fixtures: one local Ray cluster for the whole session, and a CLI runner.

The ``cli`` fixture runs ``curriculum`` commands in the test process, on that cluster; a test that
needs a process of its own (a kill, its own environment) gets one that joins the cluster through
``--ray-address`` instead of starting its own Ray (Ray's start-up dominates small runs).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "real_mix.jsonl.gz"

# Nothing in the tests may reach a hub: fail fast instead of retrying a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray the tests start (the session's, a CLI run's own, `ray start` nodes) keeps an idle worker
# for 5 minutes instead of 1 s. Above one worker per CPU Ray kills idle workers after a second, so
# while actors hold the CPUs each task started a fresh worker and imported Ray, pyarrow and the
# pipeline again (`pytest tests/test_perplexity.py` alone: 177 s -> 155 s; benchmarks/README.md).
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Start the session's local Ray cluster (2 CPUs) and return its address."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


CliResult = subprocess.CompletedProcess


@pytest.fixture
def cli(ray_address: str) -> Callable[..., CliResult]:
    """Run ``curriculum ARGS`` and return its exit code and output, as a finished process would.

    In this test process by default, joined to the session cluster: a ``curriculum`` subprocess is a
    new Ray job, and Ray starts fresh workers for every job (each imports Ray, Ray Data and pandas
    again), which made a small run cost 14.4 CPU-seconds against 4.6 in-process (measured by
    benchmarks/bench_cli_process.py). ``process=True`` runs ``python -m pipeline.cli`` in a
    subprocess instead, for what only a process shows: its environment reaching the workers, its
    own Ray, a kill."""

    def run(*args: str, process: bool = False, join_cluster: bool = True, timeout: float = 600,
            cwd: Path | None = None) -> CliResult:
        if not process and join_cluster and cwd is None:
            return run_in_process(*args)
        argv = [sys.executable, "-m", "pipeline.cli", *args]
        if args and args[0] == "run" and join_cluster and "--ray-address" not in args:
            argv += ["--ray-address", ray_address]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env)

    return run


def run_in_process(*args: str) -> CliResult:
    """``curriculum ARGS`` in this process (on its Ray session, if it has one), with its exit code
    and captured output as a finished process would give them."""
    from pipeline.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["curriculum", *args], code, stdout.getvalue(), stderr.getvalue())


def real_mix_path() -> Path:
    """The real text under ../shared/data, or skip: users of the project will not have it."""
    if not SHARED_DATA.is_file():
        pytest.skip(f"real text not present at {SHARED_DATA} (it ships with the project's workspace, not the package)")
    return SHARED_DATA


# `make test` runs `-n 2 --dist loadfile`: each file goes to one of two workers. xdist hands the files
# out by number of tests by default, so a file of a few long tests (the notebooks) can start last
# and leave one worker idle for minutes. Hand them out longest first instead (measured seconds per
# file on 2 cores, roughly; files not listed follow, in collection order).
LONGEST_FIRST = [
    "test_kill_anywhere.py", "test_notebooks.py", "test_perplexity.py", "test_train_trainer.py", "test_multinode.py",
    "test_embed.py", "test_order_properties.py", "test_order.py", "test_foundation.py", "test_ray_auth.py",
    "test_study.py", "test_quality_classifier.py", "test_object_storage.py", "test_select.py", "test_cli.py",
    "test_cluster.py", "test_kmq.py", "test_segmenters.py", "test_combine.py", "test_whatif.py",
]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # keep the file order set below


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file
