"""Joining a `ray start` cluster that asks for token authentication, as a new user would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.core import ray_session
from tests.conftest import ROOT

RAY = str(Path(sys.executable).with_name("ray"))
TOKEN = "f" * 32 + "0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """The user's shell: no RAY_AUTH_MODE, no token variables, a HOME without ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[tuple[str, Path, Path]]:
    """`ray start --head` with token authentication, in its own temp dir and HOME, stopped by
    terminating its own `--block` process (never `ray stop`, which would stop every cluster here)."""
    root = Path(tempfile.mkdtemp(prefix="rauth", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token_file = root / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    env = client_env(root, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    argv = [RAY, "start", "--head", f"--port={port}", f"--temp-dir={root / 'ray'}", "--num-cpus=1",
            "--include-dashboard=false", "--disable-usage-stats", "--block"]
    log = open(root / "head.log", "w")
    head = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        deadline = time.time() + 90
        while "Ray runtime started" not in (root / "head.log").read_text():
            assert head.poll() is None, (root / "head.log").read_text()[-2000:]
            assert time.time() < deadline, "the head did not start in 90 s"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", token_file, root
    finally:
        # The head's own process group only (it was started in a new session): `ray start --block`,
        # the GCS, the raylet and the workers get SIGTERM together; what is still there after a few
        # seconds gets SIGKILL (the `--block` process itself can take 30 s to notice).
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


CONNECT = """
import sys
import ray
from pipeline.core.errors import CurriculumError
from pipeline.core.ray_session import connect_ray
from pipeline.core.settings import RayConfig
try:
    connect_ray(RayConfig(), sys.argv[1])
except CurriculumError as exc:
    print(f"error: {exc}")
else:
    print("cpus", int(ray.cluster_resources()["CPU"]))
"""


def connect(address: str, env: dict[str, str]) -> str:
    """What ``connect_ray`` does in a fresh process (the test's own process has the session cluster)."""
    result = subprocess.run([sys.executable, "-c", CONNECT, address], capture_output=True, text=True, timeout=120,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def run_cli(config: Path, out: Path, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(out), "--ray-address", address]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "auth"}, "input": {"format": "synthetic", "synthetic": {"docs": 40}},
                                    "stages": [{"name": "quality"}]}))
    return path


def test_token_source_follows_rays_precedence(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_session.token_source() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN)
    assert ray_session.token_source() == str(tmp_path / ".ray" / "auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert ray_session.token_source() is None  # a path that names nothing: Ray would find no token either
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert ray_session.token_source() == "RAY_AUTH_TOKEN"


def test_explicit_auth_mode_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert ray_session.enable_token_auth_if_available() is False
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


@pytest.mark.slow
def test_a_token_cluster_is_joined_out_of_the_box(token_cluster, config, tmp_path):
    address, token_file, _ = token_cluster
    out = tmp_path / "out"
    result = run_cli(config, out, address, client_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token_file)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "manifest.json").is_file() and "40 input rows" in result.stdout

    home = tmp_path / "home"  # the token where Ray keeps it by default: ~/.ray/auth_token
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(TOKEN)
    assert connect(address, client_env(home)) == "cpus 1"
    assert connect(address, client_env(tmp_path, RAY_AUTH_TOKEN=TOKEN)) == "cpus 1"


@pytest.mark.slow
def test_a_missing_or_wrong_token_exits_1_naming_the_address_and_the_variables(token_cluster, config, tmp_path):
    address, _, _ = token_cluster
    result = run_cli(config, tmp_path / "never", address, client_env(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"curriculum: error: cannot join the Ray cluster at {address}: "), last
    assert "refused this client's authentication token" in last and "token: none found" in last
    for name in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        assert name in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()

    wrong = connect(address, client_env(tmp_path, RAY_AUTH_TOKEN="0" * 64))
    assert wrong.startswith(f"error: cannot join the Ray cluster at {address}: the cluster refused"), wrong
    assert "RAY_AUTH_MODE=token, token: RAY_AUTH_TOKEN)" in wrong  # token mode was switched on, the token is wrong


def test_an_address_where_nothing_listens_fails_at_once(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    message = connect(address, client_env(tmp_path))
    assert message.startswith(f"error: cannot join the Ray cluster at {address}: nothing answers there"), message
    assert "ray start --head" in message
