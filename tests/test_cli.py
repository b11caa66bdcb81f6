"""The command line end to end: exit codes, messages, determinism, the report.

The ``cli`` fixture runs a command in this process (tests/conftest.py); the first test runs
``python -m pipeline.cli`` as a process, as a user does."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, docs: int = 400, **overrides) -> Path:
    config = {
        "run": {"name": "cli", "seed": 0},
        "input": {"format": "synthetic", "synthetic": {"docs": docs}},
        "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "symbol_ratio",
                                          "direction": "descending"}],
        "output": {"rows_per_shard": 150},
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def shard_hashes(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["path"]: s["sha256"] for s in manifest["shards"]}


def test_config_error_exits_2_names_the_key_and_writes_nothing(cli, tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "never"
    result = cli("run", str(config), "--out", str(out), "--set", "stages.quality.treshold=3", process=True)
    assert result.returncode == 2
    assert "stages[0].treshold: unknown key" in result.stderr
    assert not out.exists()

    missing = cli("run", str(tmp_path / "nope.yaml"), "--out", str(out))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and not out.exists()

    no_run = cli("inspect", str(tmp_path))
    assert no_run.returncode == 2 and "no manifest.json" in no_run.stderr


def test_runtime_failure_exits_1_with_the_stage_named(cli, tmp_path):
    """A key column that exists but cannot be used shows up only at run time (exit 1); a key column
    that nothing provides is a config error (exit 2), found before any stage runs."""
    config = write_config(tmp_path, stages=[{"name": "order", "method": "quality_ascending", "key": "text"}])
    result = cli("run", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "needs a numeric key" in result.stderr and "order" in result.stderr
    assert "Traceback" not in result.stderr

    config = write_config(tmp_path, stages=[{"name": "order", "method": "sort", "key": "no_such_column"}])
    result = cli("run", str(config), "--out", str(tmp_path / "out2"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stages[0] order: needs column(s) ['no_such_column']" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["truncated gzip", "broken parquet footer"])
def test_an_unreadable_input_file_exits_1_naming_the_file(cli, tmp_path, kind):
    import gzip

    import pyarrow as pa

    if kind == "truncated gzip":
        data = gzip.compress("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(300)).encode())
        bad = tmp_path / "part.jsonl.gz"
        bad.write_bytes(data[: len(data) // 2])
        fmt = "jsonl"
    else:
        good = tmp_path / "good.parquet"
        pq.write_table(pa.table({"text": ["some words here"] * 50}), good)
        bad = tmp_path / "part.parquet"
        bad.write_bytes(good.read_bytes()[:-20])
        good.unlink()
        fmt = "parquet"
    config = write_config(tmp_path, input={"format": fmt, "path": str(bad)})
    result = cli("run", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("curriculum: error: cannot read input file ") and str(bad) in last, last
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_synth_then_jsonl_run_then_inspect(cli, tmp_path):
    corpus = tmp_path / "graded.jsonl.gz"
    result = cli("synth", "--out", str(corpus), "--docs", "300", "--seed", "4", "--kind", "graded")
    assert result.returncode == 0, result.stderr
    again = tmp_path / "again.jsonl.gz"
    cli("synth", "--out", str(again), "--docs", "300", "--seed", "4")
    assert corpus.read_bytes() == again.read_bytes()

    import gzip

    records = [json.loads(line) for line in gzip.open(corpus, "rt")]
    assert len(records) == 300 and len({r["topic"] for r in records}) >= 8
    assert all(0 <= r["true_quality"] <= 1 for r in records)

    config = write_config(tmp_path, input={"format": "jsonl", "path": str(corpus), "id_field": "id"})
    out = tmp_path / "run"
    ran = cli("run", str(config), "--out", str(out), "--set", "ray.ship_code=true")
    assert ran.returncode == 0, ran.stderr[-2000:]
    # The fixture runs it in this process, whose Ray session the run joins: what it cannot apply, it says.
    assert "[ray] joined the Ray session this process already has; ray.ship_code: used only when" in ran.stderr
    report = cli("inspect", str(out))
    assert report.returncode == 0, report.stderr
    assert "quality" in report.stdout and "symbol_ratio" in report.stdout
    index = (out / "report" / "index.html").read_text()
    for png in ("rows_per_stage.png", "curriculum_curve.png", "hist_symbol_ratio.png"):
        assert png in index and (out / "report" / png).stat().st_size > 1000
