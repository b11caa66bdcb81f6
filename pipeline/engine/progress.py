"""Progress a person can follow in a batch job's log: rows done / total, rate and ETA, per interval.

On a terminal Ray Data draws its own progress bars. A log file gets one line every
``CURRICULUM_PROGRESS_SECONDS`` (default 30 s when stderr is not a terminal, off on a terminal;
0 turns it off) while a stage runs, counted from the parquet files the stage has finished writing
into its cache folder (its ``.*.tmp-*`` parts locally; the ``data``/``dropped`` objects, written in
place, on object storage), so the count costs a footer read per new file and nothing on the
workers. A model stage, which materializes its output before the cache write, counts the rows its
actors finished in a ``RowTally`` instead (``pipeline.models.pool``); a stage that writes only at
the end (a global sort) shows its elapsed time until then.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from pipeline.core import storage
from pipeline.io.runfolder import shard_metadata

Log = Callable[[str], None]
ENV = "CURRICULUM_PROGRESS_SECONDS"


def progress_interval() -> float:
    """Seconds between progress lines: ``$CURRICULUM_PROGRESS_SECONDS``, else 30 off a terminal, 0 on one."""
    value = os.environ.get(ENV)
    if value is None:
        return 0.0 if sys.stderr.isatty() else 30.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return 30.0


class RowsWritten:
    """Rows in the finished parquet files a running stage has written into its cache folder."""

    def __init__(self, folder: Path | str):
        self.folder = folder
        self._rows: dict[str, int] = {}  # finished files never change: read each footer once

    def _files(self) -> list[str]:
        if storage.is_uri(self.folder):
            return [f.uri for part in ("data", "dropped") for f in storage.list_files(f"{self.folder}/{part}")
                    if f.uri.endswith(".parquet")]
        return [str(f) for f in Path(self.folder).glob(".*.tmp-*/*.parquet")]

    def __call__(self) -> int:
        try:
            files = self._files()
        except OSError:  # the folder is being created or swapped in: count again next time
            files = []
        for file in files:
            if file not in self._rows:
                try:
                    self._rows[file] = shard_metadata(file).num_rows
                except (OSError, ValueError):  # still being written: no footer yet
                    continue
        return sum(self._rows.values())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(tag: str, done: int, total: int, elapsed: float) -> str:
    """``[2/5 perplexity] 12,000 / 48,000 rows (25%), 400 rows/s, ETA 1m30s`` (elapsed so far)."""
    if done <= 0:
        return f"{tag} running for {_duration(elapsed)}, no rows written yet"
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"{tag} {done:,} / {total:,} rows ({min(100, 100 * done // max(total, 1))}%), {rate:,.0f} rows/s"
    if done < total and rate > 0:
        line += f", ETA {_duration((total - done) / rate)}"
    return line + f" (running for {_duration(elapsed)})"


def tallied_rows(tally: Any) -> int:
    """The rows a ``RowTally`` has counted (0 while it cannot answer)."""
    try:
        return int(ray.get(tally.total.remote(), timeout=10))
    except Exception:  # noqa: BLE001 - a progress line must never fail the stage
        return 0


@contextmanager
def progress_lines(folder: Path | str, total: int, tag: str, log: Log, interval: float | None = None,
                   tally: Any = None) -> Iterator[None]:
    """Log a progress line every ``interval`` seconds while the body runs (none when it is 0): the
    rows written to ``folder``, or those the stage's ``tally`` counted when it is further along."""
    interval = progress_interval() if interval is None else interval
    if interval <= 0:
        yield
        return
    rows_written, stop, started = RowsWritten(folder), threading.Event(), time.monotonic()

    def done() -> int:
        return max(rows_written(), tallied_rows(tally) if tally is not None else 0)

    def report() -> None:
        while not stop.wait(interval):
            log(progress_line(tag, done(), total, time.monotonic() - started))

    thread = threading.Thread(target=report, name=f"progress {tag}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
