"""Kill-anywhere harness: SIGKILL ``curriculum`` at seeded points inside each stage, resume, compare bytes.

A kill point is ``SITE:N`` (``pipeline.core.faults``), drawn from a seed: ``N`` is uniform over
``1 .. files - 1`` where ``files`` is how many output files that site wrote in the uninterrupted
reference run, so the kill lands with part of the site's output written and part not (``N = 1``
when the site writes a single file). The same seed gives the same kill point, printed with it.

Used by ``tests/test_kill_anywhere.py`` (a bounded set of seeds) and
``benchmarks/kill_anywhere.py`` (every site).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every stage of the full kill config below, then the shard writer.
PIPELINE_SITES = ("stage:read", "stage:quality", "stage:perplexity", "stage:quality_classifier", "stage:combine",
                  "stage:embed", "stage:cluster", "stage:kmq", "stage:order", "write")


def kill_config(docs: int = 800, full: bool = True) -> dict:
    """A pipeline with every kind of stage (``full``), small enough for a minute or two on 2 cores;
    or, not ``full``, the CI variant: configs/tiny.yaml in small (reference LM, classifier, composite
    quality, quality order)."""
    reference = {"max_docs": 300, "vocab_size": 512, "steps": 20, "seq_len": 64, "batch_size": 8,
                 "model": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}}
    scored = [
        {"name": "quality"},
        {"name": "perplexity", "model": "reference", "max_length": 128, "reference": reference},
        {"name": "quality_classifier", "positives": {"synthetic": {"docs": 200 if full else 100, "min_quality": 0.8}}},
        {"name": "combine"},
    ]
    if full:
        stages = [*scored, {"name": "embed", "max_length": 64}, {"name": "cluster", "k": 4},
                  {"name": "kmq", "budget": 0.6, "temperature": 0.1}, {"name": "order", "method": "quality_ascending"}]
    else:
        stages = [*scored, {"name": "order", "method": "quality_ascending"}]
    return {"run": {"name": "kill", "seed": 0},
            # Blocks of 200 documents: every stage writes several files, so a kill point lands mid-stage.
            "input": {"format": "synthetic", "synthetic": {"docs": docs, "kind": "graded"}, "lines_per_block": 200},
            "stages": stages, "output": {"rows_per_shard": 100 if full else 150}}


@dataclass(frozen=True)
class Kill:
    seed: int
    site: str
    count: int

    @property
    def point(self) -> str:
        return f"{self.site}:{self.count}"

    def __str__(self) -> str:
        return f"seed {self.seed}: {self.point}"


def site_files(run_dir: Path, site: str) -> int:
    """How many output files a pipeline ``site`` wrote in a finished run folder (what its kill point counts)."""
    if site == "write":
        return len(list((run_dir / "shards").glob("part-*.parquet")))
    name = site.split(":", 1)[1]
    folder = next((run_dir / "stages").glob(f"[0-9][0-9]-{name}-*"))
    return len(list((folder / "data").glob("*.parquet")))


def draw_kill(seed: int, site: str, files: int, first: int = 1) -> Kill:
    """The kill point of ``seed`` at ``site``, which wrote ``files`` files in the reference run:
    uniform over ``first .. files - 1`` (``first`` when that range is empty)."""
    return Kill(seed, site, random.Random(f"{seed}:{site}").randint(first, max(first, files - 1)))


def checkpoint_kill(seed: int, writes: int) -> Kill:
    """A kill inside one of a training run's ``writes`` checkpoint writes, from the 2nd on (so the
    rerun has a finished checkpoint to resume from)."""
    return Kill(seed, "checkpoint", random.Random(seed).randint(2, writes - 1))


def file_hashes(folder: Path, pattern: str = "shards/*.parquet") -> dict[str, str]:
    """sha256 of every file matching ``pattern``: the bytes themselves, not what a manifest claims."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern))}


def run_cli(args: list[str], kill: Kill | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``curriculum ARGS`` in a subprocess, with ``kill``'s ``CURRICULUM_KILL_AT`` when given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CURRICULUM_PROGRESS_SECONDS": "0"}
    env.pop("CURRICULUM_KILL_AT", None)
    if kill is not None:
        env["CURRICULUM_KILL_AT"] = kill.point
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def killed(args: list[str], kill: Kill) -> subprocess.CompletedProcess:
    """Run ``args`` with ``kill`` planned and check that the process died at that point."""
    result = run_cli(args, kill)
    message = f"[{kill}] expected a SIGKILL at {kill.point}; exit {result.returncode}: {result.stderr[-1500:]}"
    assert result.returncode == -signal.SIGKILL, message
    assert f"CURRICULUM_KILL_AT={kill.point}: SIGKILL" in result.stderr, message
    return result


def completed(args: list[str], context: str) -> subprocess.CompletedProcess:
    result = run_cli(args)
    assert result.returncode == 0, f"[{context}] the resumed run failed: {result.stderr[-2000:]}"
    return result
