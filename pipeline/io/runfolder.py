"""Reading a run folder: its manifest and its shards in training order (the trainer and inspect).

A run folder may be an object-storage URI (``s3://bucket/runs/x``, ``pipeline.core.storage``).
There the manifest, written last, is what makes the folder a finished run, so the shards are the
ones it lists; each reader opens its shard objects itself, nothing is copied to local disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.errors import ConfigError, CurriculumError

ShardFile = Path | str  # a local file, or an object's URI


def has_manifest(run_dir: str | Path) -> bool:
    if storage.is_uri(run_dir):
        return storage.is_file(f"{run_dir}/manifest.json")
    return (Path(run_dir) / "manifest.json").is_file()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    if storage.is_uri(run_dir):
        raw = storage.read_bytes_or_none(f"{run_dir}/manifest.json")
        if raw is None:
            raise CurriculumError(f"{run_dir}: no manifest.json; is this a run folder written by `curriculum run` "
                                  "(and did the run finish)?")
        return json.loads(raw)
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise CurriculumError(f"{run_dir}: no manifest.json; is this a run folder written by `curriculum run`?")
    return json.loads(path.read_text())


def shard_files(run_dir: str | Path) -> list[ShardFile]:
    """The run folder's shards in name order (the training order), or a clear error."""
    if storage.is_uri(run_dir):
        if not has_manifest(run_dir):
            raise ConfigError(f"{run_dir}: no manifest.json (not a run folder, or its run has not finished)")
        files: list[ShardFile] = sorted(f"{run_dir}/{s['path']}" for s in read_manifest(run_dir).get("shards", []))
    else:
        run_dir = Path(run_dir)
        folder = run_dir / "shards"
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{run_dir}: no shards/*.parquet (not a run folder? run `curriculum run CONFIG` first)")
    return files


def open_shard(path: ShardFile) -> pq.ParquetFile:
    """A shard for reading, local or on object storage."""
    return pq.ParquetFile(storage.open_input(path) if storage.is_uri(path) else path)


def shard_metadata(path: ShardFile) -> pq.FileMetaData:
    """A shard's parquet footer (row counts, schema) without opening it for reading rows."""
    if storage.is_uri(path):
        fs, inner = storage.filesystem(path)
        return pq.read_metadata(inner, filesystem=fs)
    return pq.read_metadata(path)


def run_dir_label(run_dir: str | Path) -> str:
    """The run folder as recorded in a training folder: a URI as it is, a local path made absolute."""
    return str(run_dir) if storage.is_uri(run_dir) else str(Path(run_dir).resolve())


def local_artifact(run_dir: str | Path, relative: str) -> Path:
    """An artifact of the run folder (a model, a tokenizer) as a local path; from object storage it is
    downloaded once into ``storage.local_mirror``."""
    if not storage.is_uri(run_dir):
        return Path(run_dir) / relative
    target = storage.local_mirror(str(run_dir)) / relative
    if not target.exists():
        staging = target.parent / f".{target.name}.download"
        storage.download_tree(f"{run_dir}/{relative}", staging)
        staging.rename(target)
    return target
