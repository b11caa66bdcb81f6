"""Deterministic kill points for crash tests: ``CURRICULUM_KILL_AT=SITE:N`` SIGKILLs this process.

The resume guarantees (stage cache, shard writer, checkpoints, study arms) are only worth what a
test of them at an awkward moment shows, and a kill by wall-clock time is neither awkward on
purpose nor reproducible. A kill point names *where* instead:

``stage:NAME:N``  once the stage ``NAME`` has written ``N`` output files into its cache folder,
                  i.e. inside the stage, with the rest of its blocks still running;
``write:N``       once the shard writer has written ``N`` shards of the staging folder;
``checkpoint:N``  inside the ``N``-th checkpoint write of this process: weights written,
                  optimizer state and rename not yet;
``arm:N``         during a study, once ``N`` checkpoints exist across its arms (an arm mid-training).

With the variable unset every hook is a no-op (one dictionary lookup). Nothing else in the
project reads it; it is for the kill-anywhere harness and for a user who wants to see a resume.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError

ENV = "CURRICULUM_KILL_AT"
POLL_SECONDS = 0.02
_calls: Counter[str] = Counter()


@dataclass(frozen=True)
class KillPoint:
    site: str  # "stage:perplexity", "write", "checkpoint", "arm"
    count: int

    def __str__(self) -> str:
        return f"{self.site}:{self.count}"


def parse_kill_point(value: str) -> KillPoint:
    """``"stage:perplexity:3"`` -> ``KillPoint("stage:perplexity", 3)``; a ConfigError naming the variable otherwise."""
    site, _, count = value.rpartition(":")
    if not site or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{ENV}={value!r}: expected SITE:N with N >= 1, e.g. stage:perplexity:2, write:1, "
                         "checkpoint:3 or arm:2")
    return KillPoint(site, int(count))


def planned_kill() -> KillPoint | None:
    value = os.environ.get(ENV)
    return parse_kill_point(value) if value else None


def _kill(point: KillPoint, what: str) -> None:
    print(f"[kill] {ENV}={point}: SIGKILL {what}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_point(site: str) -> None:
    """Count one pass through ``site`` in this process; SIGKILL it on the planned pass."""
    point = planned_kill()
    if point is None or point.site != site:
        return
    _calls[site] += 1
    if _calls[site] == point.count:
        _kill(point, f"at pass {point.count} of {site}")


@contextmanager
def kill_when_written(site: str, root: Path | str, pattern: str) -> Iterator[None]:
    """While the block runs, SIGKILL this process once ``root.glob(pattern)`` matches the planned
    number of files; the files are written by Ray tasks, so the kill lands mid-stage."""
    point = planned_kill()
    if point is None or point.site != site or not isinstance(root, Path):
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                found = sum(1 for _ in root.glob(pattern))
            except OSError:  # a folder renamed under the glob: look again
                continue
            if found >= point.count:
                _kill(point, f"with {found} file(s) matching {pattern} under {root}")

    watcher = threading.Thread(target=watch, name="curriculum-kill-point", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
