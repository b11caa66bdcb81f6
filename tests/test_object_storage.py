"""Object storage against a real S3-compatible server (moto's, started here on 127.0.0.1): input
paths on a bucket, a run folder on a bucket that resumes after SIGKILL with the bytes of a local
run, and `curriculum train` reading the bucket's shards."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.core import storage
from pipeline.core.errors import ConfigError
from pipeline.core.paths import expand_input_paths, ignored_input_files
from pipeline.engine.cache import SUCCESS, StageCache
from pipeline.engine.config import validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.io.synth import write_synthetic
from tests.conftest import ROOT

BUCKET = "curriculum"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server in a subprocess, the AWS variables pointing at it, and a bucket; yields a
    fresh ``s3://`` prefix root for the module."""
    pytest.importorskip("moto.server", reason="moto[server] (a dev extra) runs the S3-compatible server")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    folder = tmp_path_factory.mktemp("s3")
    with open(folder / "moto.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert server.poll() is None, (folder / "moto.log").read_text()[-2000:]
                assert time.time() < deadline, "moto did not start in 120 s"
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", "curriculum-test")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "curriculum-test-secret")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("CURRICULUM_LOCAL_CACHE", str(folder / "mirror"))
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                              allow_bucket_creation=True).create_dir(BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _prefix(root: str) -> str:
    return f"{root}/{uuid.uuid4().hex[:8]}"


def _put_parquet(uri: str, rows: int) -> None:
    fs, path = storage.filesystem(uri)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(rows)]}), path, filesystem=fs)


def test_input_paths_and_the_stage_cache_on_a_bucket(s3, ray_address):
    root = _prefix(s3)
    for name, data in [("in/a.jsonl", b'{"text": "x"}\n'), ("in/sub/b.jsonl.gz", gzip.compress(b'{"text": "y"}\n')),
                       ("in/notes.txt", b"not jsonl"), ("in/.hidden.jsonl", b"{}\n")]:
        storage.write_bytes(f"{root}/{name}", data)

    assert expand_input_paths(f"{root}/in", "jsonl") == [f"{root}/in/a.jsonl", f"{root}/in/sub/b.jsonl.gz"]
    assert ignored_input_files(f"{root}/in", "jsonl") == [f"{root}/in/notes.txt"]
    assert expand_input_paths(f"{root}/in/*.jsonl", "jsonl") == [f"{root}/in/a.jsonl"]
    assert expand_input_paths(f"{root}/in/**/*.gz", "jsonl") == [f"{root}/in/sub/b.jsonl.gz"]
    assert expand_input_paths(f"{root}/in/a.jsonl", "jsonl") == [f"{root}/in/a.jsonl"]
    assert expand_input_paths(f"{root}/nothing", "jsonl") == []
    with pytest.raises(ConfigError, match=r"input\.path.*no input file matches"):
        validate_config({"input": {"format": "jsonl", "path": f"{root}/nothing"}})

    # A stage folder on the bucket: complete only while its objects are the ones the marker lists.
    cache = StageCache(f"{root}/run")
    folder = cache.folder(1, "quality", "ab" * 32)
    assert folder == f"{root}/run/stages/01-quality-abababababababab"
    for k in range(2):
        _put_parquet(f"{folder}/data/part-{k}.parquet", 10 + k)
    assert cache.record(folder) is None  # no marker yet
    record = cache.complete(folder, {"rows_out": 21})
    assert sorted(record["files"]) == ["data/part-0.parquet", "data/part-1.parquet"]
    assert cache.record(folder) == json.loads(storage.read_bytes(f"{folder}/{SUCCESS}")) == record
    assert cache.read(folder).count() == 21

    heard: list[str] = []
    _put_parquet(f"{folder}/data/stray.parquet", 1)  # left by a run killed mid-write
    assert cache.record(folder, heard.append) is None and "stray.parquet: not listed" in heard[-1]
    storage.delete_file(f"{folder}/data/stray.parquet")
    assert cache.record(folder) == record
    _put_parquet(f"{folder}/data/part-1.parquet", 3)
    assert cache.record(folder, heard.append) is None and "part-1.parquet" in heard[-1] and "expected" in heard[-1]
    storage.delete_tree(f"{folder}/data")
    assert cache.record(folder, heard.append) is None and "missing" in heard[-1]


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    write_synthetic(folder / "graded.jsonl.gz", 800, seed=4)
    bad = [json.dumps({"id": "bad-1", "text": ""}), "{not json", json.dumps({"id": "ok-1", "text": "A fine line of text."})]
    (folder / "extra.jsonl").write_text("\n".join(bad) + "\n")
    return folder


def _config(path: str) -> dict:
    return {"run": {"name": "s3", "seed": 0}, "input": {"format": "jsonl", "path": path, "id_field": "id"},
            "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "symbol_ratio",
                                              "direction": "descending"}],
            "output": {"rows_per_shard": 300}}


TRAIN = {"model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}},
         "tokenizer_vocab_size": 300, "tokenizer_sample_docs": 100, "seq_len": 32, "batch_size": 4,
         "max_tokens": 6 * 4 * 32, "log_every": 1, "eval": {"sets": {}}}


@pytest.mark.slow
def test_run_from_and_to_a_bucket_resumes_after_sigkill_and_trains(s3, cli, ray_address, tmp_path):
    corpus = _corpus(tmp_path / "in")
    root = _prefix(s3)
    for f in sorted(corpus.iterdir()):
        storage.write_bytes(f"{root}/in/{f.name}", f.read_bytes())

    reference = tmp_path / "reference"
    expected = run_pipeline(validate_config(_config(str(corpus))), reference, log=lambda _m: None)

    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({**_config(f"{root}/in"), "train": TRAIN}))
    out = f"{root}/runs/a"
    argv = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", out, "--ray-address", ray_address,
            "--set", "ray.ship_credentials=true"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    deadline = time.time() + 300
    while not [f for f in storage.list_files(f"{out}/stages") if "/01-quality-" in f.uri and f.uri.endswith(SUCCESS)]:
        assert proc.poll() is None, f"the run ended before the first stage completed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not storage.is_file(f"{out}/manifest.json"), "the kill came too late to test a resume"
    markers = {f.uri: storage.read_bytes(f.uri) for f in storage.list_files(f"{out}/stages") if f.uri.endswith(SUCCESS)}
    assert len(markers) >= 2  # read and quality

    resumed = cli("run", str(config), "--out", out, "--set", "ray.ship_credentials=true", process=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[read] cached" in resumed.stderr and "quality] cached" in resumed.stderr
    assert all(storage.read_bytes(uri) == data for uri, data in markers.items())  # not recomputed

    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert manifest["counts"] == expected["counts"] and manifest["counts"]["quarantined"] == 2
    assert [(s["path"], s["rows"], s["sha256"]) for s in manifest["shards"]] == \
        [(s["path"], s["rows"], s["sha256"]) for s in expected["shards"]]
    objects = [f for f in storage.list_files(f"{out}/shards")]
    assert [f.uri for f in objects] == [f"{out}/{s['path']}" for s in expected["shards"]]
    for f, shard in zip(objects, expected["shards"]):
        assert storage.sha256_uri(f.uri) == hashlib.sha256((reference / shard["path"]).read_bytes()).hexdigest()
    fs, path = storage.filesystem(f"{out}/quarantine")
    reasons = sorted(pq.read_table(path, filesystem=fs)["reason"].to_pylist())
    assert reasons == sorted(pq.read_table(reference / "quarantine")["reason"].to_pylist())

    # Training from the bucket sees the same rows in the same order as from the local run folder.
    trained = {}
    for name, data in (("s3", out), ("local", str(reference))):
        assert main(["train", str(config), "--data", data, "--out", str(tmp_path / f"train-{name}")]) == 0
        trained[name] = (tmp_path / f"train-{name}" / "metrics.jsonl").read_text()
    losses = [json.loads(line)["train_loss"] for line in trained["s3"].splitlines() if "train_loss" in line]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert trained["s3"] == trained["local"]


def test_workers_of_a_joined_cluster_get_the_endpoint_and_credentials_only_when_asked(monkeypatch):
    for name in storage.STORE_ENV + storage.CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-runtime-env")
    assert storage.worker_env(credentials=False) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                                     "AWS_DEFAULT_REGION": "eu-west-1"}
    assert storage.worker_env(credentials=True)["AWS_SECRET_ACCESS_KEY"] == "not-for-the-runtime-env"
    assert storage.is_uri("s3://b/k") and not storage.is_uri("/tmp/x") and not storage.is_uri(Path("s3:/b"))
    assert storage.join("s3://b/runs", "stages", "x") == "s3://b/runs/stages/x"
    assert storage.join("/tmp/runs", "stages") == Path("/tmp/runs/stages")
