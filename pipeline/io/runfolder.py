"""Reading a run folder: its manifest and its shards in training order (the trainer and inspect)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, CurriculumError


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise CurriculumError(f"{run_dir}: no manifest.json; is this a run folder written by `curriculum run`?")
    return json.loads(path.read_text())


def shard_files(run_dir: str | Path) -> list[Path]:
    """The run folder's shards in name order (the training order), or a clear error."""
    run_dir = Path(run_dir)
    folder = run_dir / "shards"
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{run_dir}: no shards/*.parquet (not a run folder? run `curriculum run CONFIG` first)")
    return files
