"""Progress lines for non-terminal logs: rows done / total, rate and ETA while a stage runs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.config import validate_config
from pipeline.engine.progress import RowsWritten, progress_interval, progress_line, progress_lines, tallied_rows
from pipeline.engine.runner import run_pipeline


def _write_rows(folder: Path, name: str, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(rows)]}), folder / name)


def test_rows_written_counts_finished_files_only(tmp_path: Path) -> None:
    counter = RowsWritten(tmp_path)
    assert counter() == 0
    _write_rows(tmp_path / ".data.tmp-1234", "a.parquet", 30)
    _write_rows(tmp_path / ".dropped.tmp-99", "b.parquet", 5)
    (tmp_path / ".data.tmp-1234" / "c.parquet").write_bytes(b"PAR1 half-written")  # no footer yet
    _write_rows(tmp_path / "data", "done.parquet", 1000)  # a finished part is not this run's progress
    assert counter() == 35


def test_the_line_gives_done_total_rate_and_eta() -> None:
    assert progress_line("[2/5 perplexity]", 1200, 4800, 3.0) == \
        "[2/5 perplexity] 1,200 / 4,800 rows (25%), 400 rows/s, ETA 9s (running for 3s)"
    assert progress_line("[1/2 quality]", 0, 100, 75.0) == "[1/2 quality] running for 1m15s, no rows written yet"
    # A stage that adds rows passes its input count: no ETA, 100% at most.
    assert progress_line("[3/3 permute]", 150, 100, 7200.0) == \
        "[3/3 permute] 150 / 100 rows (100%), 0 rows/s (running for 2h00m)"


def test_interval_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CURRICULUM_PROGRESS_SECONDS", "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv("CURRICULUM_PROGRESS_SECONDS", "0")
    assert progress_interval() == 0.0


def test_lines_follow_the_files_as_they_are_written(tmp_path: Path) -> None:
    lines: list[str] = []
    with progress_lines(tmp_path, 40, "[1/1 quality]", lines.append, interval=0.02):
        deadline = time.monotonic() + 10
        while not any("no rows written yet" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        _write_rows(tmp_path / ".data.tmp-1", "a.parquet", 10)
        while not any("10 / 40 rows (25%)" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
    count = len(lines)
    time.sleep(0.1)
    assert len(lines) == count, "lines after the body ended"
    assert any("no rows written yet" in line for line in lines)
    assert any(re.match(r"\[1/1 quality\] 10 / 40 rows \(25%\), [\d,]+ rows/s, ETA \d+", line) for line in lines)


def test_the_runner_logs_progress_while_a_stage_runs(ray_address, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CURRICULUM_PROGRESS_SECONDS", "0.05")
    lines: list[str] = []
    config = validate_config({"run": {"name": "progress"}, "input": {"format": "synthetic", "synthetic": {"docs": 400}},
                              "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "alpha_ratio"}]})
    run_pipeline(config, tmp_path / "run", log=lines.append)
    assert any(line.startswith("[1/2 quality] ") and ("rows/s" in line or "no rows written yet" in line)
               for line in lines), lines


class _SlowEcho:
    """A stand-in model actor: every batch takes a while, as a model's would."""

    def __init__(self, device: str, threads: int) -> None:
        self.device = device

    def __call__(self, table: pa.Table) -> pa.Table:
        time.sleep(0.2)
        return table


def test_a_model_stage_shows_its_rows_before_it_writes_any(ray_address, tmp_path: Path) -> None:
    import ray.data

    from pipeline.models.pool import Placement, map_with_actor_pool, start_row_tally

    tally = start_row_tally()
    lines: list[str] = []
    ds = ray.data.from_items([{"id": str(i)} for i in range(120)], override_num_blocks=6)
    # Nothing is written to the folder: the rows in the lines can only come from the actors' tally.
    with progress_lines(tmp_path, 120, "[1/1 embed]", lines.append, interval=0.05, tally=tally):
        out = map_with_actor_pool(ds, _SlowEcho, Placement("cpu", 1, 0.0, 1), 10, {}, tally=tally).materialize()
    assert out.count() == 120 and sorted(out.to_pandas()["id"], key=int) == [str(i) for i in range(120)]
    done = [int(m.group(1).replace(",", "")) for line in lines if (m := re.match(r"\[1/1 embed\] ([\d,]+) / 120 rows", line))]
    assert done and done == sorted(done), lines  # counted as the batches finish, never backwards
    assert any(0 < n < 120 for n in done), lines  # seen mid-stage
    deadline = time.monotonic() + 10  # the last batches' adds are fire-and-forget
    while tallied_rows(tally) < 120 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tallied_rows(tally) == 120

