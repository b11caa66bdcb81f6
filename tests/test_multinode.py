"""A real three-node Ray cluster on this machine: a head with no CPUs and two 1-CPU workers, each
a `ray start` process with its own raylet and object store. The tiny pipeline runs through
``--ray-address``; one worker node is SIGKILLed while it builds its perplexity actor, and the run
must finish inside that one run (Ray's own recovery, or else the runner's retry of the stage from
its cached input, ``pipeline.engine.node_loss``; no rerun by hand) with every input id exactly
once in the shards. (That the bytes do not depend on the CPU count or on kills and resumes is
tests/test_kill_anywhere.py's.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_ray_auth import free_port

RAY = str(Path(sys.executable).with_name("ray"))
CONFIG = {
    "run": {"name": "multinode", "seed": 0},
    "input": {"format": "synthetic", "synthetic": {"docs": 500, "kind": "graded"}},
    "stages": [
        {"name": "quality"},
        # 64 documents per call: a pool gets 4 batches per actor at least, so 500 rows still start
        # one scorer on each worker node.
        {"name": "perplexity", "model": "reference", "max_length": 128, "docs_per_call": 64,
         "reference": {"max_docs": 300, "vocab_size": 512, "steps": 20, "seq_len": 64, "batch_size": 8,
                       "model": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}}},
        {"name": "combine"},
        {"name": "order", "method": "quality_ascending"},
    ],
    "output": {"rows_per_shard": 300},
    "ray": {"node_loss_stall_seconds": 5},
}


def _env() -> dict[str, str]:
    # The GCS declares a node dead after this many missed health checks, one a second: about 3 s
    # instead of Ray's default of about 15 s (3 s x 5); the nodes here share one machine.
    health = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    return {**os.environ, **health, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
            "CURRICULUM_PROGRESS_SECONDS": "0"}


class Node:
    """One `ray start --block` process in its own process group: SIGKILL of the group is a node lost."""

    def __init__(self, root: Path, name: str, argv: list[str]):
        self.log_path = root / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([RAY, "start", *argv, "--block"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=_env(), cwd=root, start_new_session=True)

    def started(self, timeout: float = 180) -> bool:
        """Whether the node came up; False when `ray start` gave up (its own start-up deadline is
        short, and a loaded CI machine can miss it)."""
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log_path.read_text():
            if self.proc.poll() is not None:
                return False
            assert time.time() < deadline, f"{self.log_path.name}: not started in {timeout} s"
            time.sleep(0.2)
        return True

    def builds_actor(self, actor: str) -> bool:
        """Whether this node is building an actor of class ``actor`` (loading its model): Ray
        titles that worker process ``ray::MapWorker(MapBatches(ACTOR)).__init__``."""
        title = f"ray::MapWorker(MapBatches({actor})).__init__".encode()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.getsid(int(proc.name)) == self.proc.pid \
                        and (proc / "cmdline").read_bytes().startswith(title):
                    return True
            except (OSError, ProcessLookupError):
                continue
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.log.close()


def start_node(root: Path, name: str, argv: list[str], attempts: int = 2) -> Node:
    for _ in range(attempts):
        node = Node(root, name, argv)
        if node.started():
            return node
        node.stop()
    raise AssertionError(f"{name} did not start in {attempts} attempts: {node.log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, list[Node]]]:
    root = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    common = ["--object-store-memory=300000000", "--disable-usage-stats"]
    nodes: list[Node] = []
    try:
        nodes.append(start_node(root, "head", ["--head", f"--port={port}", f"--temp-dir={root / 'ray'}",
                                               "--num-cpus=0", "--include-dashboard=false", *common]))
        for i in (1, 2):  # one after the other: two raylets registering at once is slower on 2 cores
            nodes.append(start_node(root, f"worker{i}", [f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                                         f"--resources={{\"worker{i}\": 1}}", *common]))
        yield f"127.0.0.1:{port}", nodes
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_cpus(address: str, expected: list[float], timeout: float) -> list[float]:
    """The CPUs of the cluster's live nodes, sorted, once they are ``expected`` or ``timeout`` has
    passed: one driver polls (each new driver costs seconds of CPU to start and join)."""
    probe = ("import json, ray, sys, time; ray.init(address=sys.argv[1], log_to_driver=False)\n"
             "expected, deadline = json.loads(sys.argv[2]), time.time() + float(sys.argv[3])\n"
             "while (cpus := sorted(n['Resources'].get('CPU', 0.0) for n in ray.nodes() if n['Alive'])) != expected \\\n"
             "        and time.time() < deadline:\n"
             "    time.sleep(1)\n"
             "print(json.dumps(cpus))")
    done = subprocess.run([sys.executable, "-c", probe, address, json.dumps(expected), str(timeout)],
                          capture_output=True, text=True, env=_env(), timeout=timeout + 120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_three_nodes_survive_losing_a_worker_mid_stage(cluster, tmp_path):
    address, nodes = cluster
    cpus = _wait_for_cpus(address, [0.0, 1.0, 1.0], timeout=60)
    assert cpus == [0.0, 1.0, 1.0], f"expected a 0-CPU head and two 1-CPU workers, found {cpus}"

    config = tmp_path / "multinode.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(out), "--ray-address", address]
    stderr = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=_env(), cwd=ROOT)
    try:
        deadline = time.time() + 400
        while not nodes[2].builds_actor("PerplexityScorer"):
            assert run.poll() is None, f"the run ended before worker2 built its scorer: {stderr.name}"
            assert time.time() < deadline, "worker2 did not start building its scorer in 400 s"
            time.sleep(0.02)
        nodes[2].kill()  # a worker node lost mid-stage: raylet, object store and its workers at once
        code = run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    stderr.seek(0)
    log = stderr.read()
    assert "[2/4 perplexity] cached" not in log
    assert code == 0, f"the run did not survive the lost node (exit {code}): {log[-3000:]}"
    print("the perplexity stage was run again" if "a Ray node was lost" in log else "Ray recovered inside the stage")
    cpus = _wait_for_cpus(address, [0.0, 1.0], timeout=90)
    assert cpus == [0.0, 1.0], f"the killed worker node is still alive: {cpus}"

    read_ids = pads.dataset(next(out.glob("stages/00-read-*")) / "data").to_table(columns=["id"])["id"].to_pylist()
    shard_ids = pads.dataset(out / "shards").to_table(columns=["id"])["id"].to_pylist()
    assert len(shard_ids) == len(set(shard_ids)) == 500, "a row was lost or written twice"
    assert sorted(shard_ids) == sorted(read_ids)
