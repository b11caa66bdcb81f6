"""`curriculum verify` and the stage cache's checksums: damaged files are named, never read as whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.engine.config import validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.engine.verify import verify_run
from pipeline.io.token_shards import FORMAT, VERSION, publish, staging_folder, write_token_shard

CONFIG = {"run": {"name": "verify", "seed": 0},
          "input": {"format": "synthetic", "synthetic": {"docs": 70}},
          "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "n_chars"}],
          "output": {"rows_per_shard": 25}}


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def stage_data(run_dir: Path, prefix: str) -> Path:
    return sorted(next((run_dir / "stages").glob(f"{prefix}-*")).glob("data/*.parquet"))[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("verify") / "run"
    manifest = run_pipeline(validate_config(CONFIG), out, address=ray_address, log=lambda _m: None)
    staging = staging_folder(out)  # token shards in the real layout, for the tokens/ checks
    entry = write_token_shard(staging, "part-00000", [[5, 6, 7]] * 25, np.arange(25), 0, np.dtype(np.uint16))
    publish(out, staging, {"format": FORMAT, "version": VERSION, "shards": [entry | {"source": "shards/part-00000.parquet"}]})
    return out, manifest


@pytest.fixture
def run_copy(pristine: tuple[Path, dict], tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine[0], tmp_path / "run"))


def test_a_whole_run_folder_verifies_with_exit_0(pristine, capsys):
    run_dir, manifest = pristine
    report = verify_run(run_dir)
    assert report.ok, report.problems
    # 3 shards + 2 token files + the cache's row files (read, quality, order) at least
    assert report.checked >= 3 + 2 + 3
    assert main(["verify", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith("whole")


def test_every_damaged_file_is_named_and_exit_is_1(run_copy, capsys):
    truncate(run_copy / "shards" / "part-00000.parquet")
    flip_byte(run_copy / "shards" / "part-00001.parquet")
    (run_copy / "shards" / "part-00002.parquet").unlink()
    shutil.copyfile(run_copy / "shards" / "part-00001.parquet", run_copy / "shards" / "part-00009.parquet")
    quality = stage_data(run_copy, "01-quality")
    flip_byte(quality)
    tokens = run_copy / "tokens" / "part-00000.tokens.npy"
    flip_byte(tokens, tokens.stat().st_size - 1)

    assert main(["verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED ")]
    expected = {
        run_copy / "shards" / "part-00000.parquet": "sha256 differs",
        run_copy / "shards" / "part-00001.parquet": "sha256 differs",
        run_copy / "shards" / "part-00002.parquet": "missing",
        run_copy / "shards" / "part-00009.parquet": "does not list",
        quality: "sha256 differs",
        tokens: "sha256 differs",
    }
    for path, what in expected.items():
        assert any(f"DAMAGED {path}: " in line and what in line for line in damaged), (path, out)
    assert "not a readable parquet file" in next(line for line in damaged if "part-00000" in line)
    assert len(damaged) == len(expected), out
    assert out.strip().endswith(f"{len(expected)} problem(s)")


def test_not_a_run_folder_is_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_a_damaged_cache_entry_is_recomputed_not_read(pristine, run_copy, ray_address):
    """A bit flip in one stage's rows and a truncated file in the next: both stages run again and the
    shards come out byte-identical to the uninterrupted run's."""
    _, first = pristine
    flip_byte(stage_data(run_copy, "01-quality"))
    truncate(stage_data(run_copy, "02-order"))
    assert not verify_run(run_copy).ok
    logged: list[str] = []
    again = run_pipeline(validate_config(CONFIG), run_copy, address=ray_address, log=logged.append)
    assert [s["cached"] for s in again["stages"]] == [False, False]
    assert again["timing"]["read"]["cached"] is True
    assert sum("is damaged, recomputing" in line for line in logged) == 2, logged
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    assert verify_run(run_copy).ok


def test_a_marker_without_checksums_is_not_trusted(pristine, run_copy, ray_address):
    marker = next((run_copy / "stages").glob("02-order-*")) / "_SUCCESS.json"
    record = json.loads(marker.read_text())
    del record["files"]
    marker.write_text(json.dumps(record))
    again = run_pipeline(validate_config(CONFIG), run_copy, address=ray_address, log=lambda _m: None)
    assert [s["cached"] for s in again["stages"]] == [True, False]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in pristine[1]["shards"]]


def test_the_manifest_records_each_steps_time_and_throughput(pristine):
    _, manifest = pristine
    for stage in manifest["stages"]:
        assert stage["seconds"] > 0
        assert stage["rows_per_second"] == pytest.approx(stage["rows_in"] / stage["seconds"], rel=0.01, abs=0.06)
    peaks = [stage["driver_peak_rss_mib"] for stage in manifest["stages"]]  # this process's peak: never falls
    assert peaks[0] > 50 and peaks == sorted(peaks)
    read, write = manifest["timing"]["read"], manifest["timing"]["write"]
    assert read["rows"] == 70 and write["rows"] == manifest["counts"]["output_rows"] == 70
    for step in (read, write):
        assert step["seconds"] > 0
        assert step["rows_per_second"] == pytest.approx(step["rows"] / step["seconds"], rel=0.01, abs=0.06)
    assert read["cached"] is False and len(read["key"]) == 64
