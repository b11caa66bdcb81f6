"""The stage cache: each stage's output, materialized to parquet under a key.

A stage's key is the sha256 of its params, its code version, the run seed and the upstream
stage's key, so a changed parameter reruns that stage and every stage after it, and nothing
before it. Like Dolma's attributes, scores are kept as columns: reorder without rescoring.

Layout, under ``RUN_DIR/stages/``::

    NN-<stage>-<key16>/data/*.parquet      the stage's output rows
    NN-<stage>-<key16>/artifacts/          models, tokenizers, fitted params (kept across crashes)
    NN-<stage>-<key16>/_SUCCESS.json        written last; its presence marks the stage complete

Output is written to a temporary folder and renamed into place, so a crash never leaves a
half-written ``data/`` that looks complete. ``_SUCCESS.json`` also lists every row file
(``data/``, ``dropped/``, ``quarantine/``) with its size and sha256, and a cache entry is
reused only when those files are exactly the listed ones with the listed bytes: a truncated,
bit-flipped, missing or extra file makes the stage run again instead of being read as whole.
Artifact files are listed too (``artifact_files``), for ``curriculum verify``; they are not
rechecked on every lookup, because stages reuse and re-check their own artifacts.

On object storage (``RUN_DIR`` an ``s3://`` URI, ``pipeline.core.storage``) there is no rename:
the old marker is deleted, the row objects are written in place by the Ray tasks, and the marker
is written last. The marker lists names and sizes; a lookup checks those, not sha256, because
hashing would read every object back through this process (an object is whole or absent, never
cut). Stage artifacts (models, tokenizers) are files the stages write locally, in
``storage.local_mirror(RUN_DIR)``; they are uploaded beside the rows when the stage completes and
downloaded again when a cached stage's artifacts are not in the mirror.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

import pipeline
from pipeline.core import storage
from pipeline.core.files import read_json_or_none, write_json_atomic
from pipeline.core.hashing import sha256_file, sha256_json

SUCCESS = "_SUCCESS.json"
ROW_PARTS = ("data", "dropped", "quarantine")
Folder = Path | str  # a local folder, or a URI on object storage


def file_entries(folder: Path, parts: tuple[str, ...], pattern: str = "*.parquet") -> dict[str, dict[str, Any]]:
    """``{part/relative path: {bytes, sha256}}`` of the files under ``folder/part`` (hidden names skipped)."""
    entries: dict[str, dict[str, Any]] = {}
    for part in parts:
        root = folder / part
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(pattern)):
            relative = path.relative_to(folder)
            if path.is_file() and not any(p.startswith(".") for p in relative.parts):
                entries[relative.as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def check_files(folder: Path, expected: dict[str, dict[str, Any]], parts: tuple[str, ...],
                pattern: str = "*.parquet") -> list[str]:
    """What differs between the files under ``folder/parts`` and ``expected``: one line per file."""
    problems = []
    present = {p.relative_to(folder).as_posix() for part in parts if (folder / part).is_dir()
               for p in (folder / part).rglob(pattern)
               if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)}
    for name, entry in sorted(expected.items()):
        path = folder / name
        if name not in present:
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {entry['bytes']} expected (truncated or changed)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs (bit-flipped or changed)")
    problems += [f"{folder / name}: not listed in {SUCCESS} (left by another run?)" for name in sorted(present - set(expected))]
    return problems


def _object_entries(folder: str, parts: tuple[str, ...], pattern: str = "*.parquet") -> dict[str, dict[str, Any]]:
    """``file_entries`` for a folder on object storage: names and sizes (see the module docstring)."""
    entries: dict[str, dict[str, Any]] = {}
    for part in parts:
        for f in storage.list_files(f"{folder}/{part}"):
            relative = f.uri[len(folder) + 1:]
            if fnmatch.fnmatchcase(storage.name(relative), pattern) and not any(p.startswith(".") for p in relative.split("/")):
                entries[relative] = {"bytes": f.size}
    return entries


def _check_objects(folder: str, expected: dict[str, dict[str, Any]], parts: tuple[str, ...]) -> list[str]:
    present = _object_entries(folder, parts)
    problems = []
    for name, entry in sorted(expected.items()):
        if name not in present:
            problems.append(f"{folder}/{name}: missing")
        elif present[name]["bytes"] != entry["bytes"]:
            problems.append(f"{folder}/{name}: {present[name]['bytes']} bytes, {entry['bytes']} expected (changed)")
    problems += [f"{folder}/{name}: not listed in {SUCCESS} (left by another run?)"
                 for name in sorted(set(present) - set(expected))]
    return problems


def stage_spec(stage: Any, seed: int) -> dict[str, Any]:
    """What a stage's output depends on besides its input rows: its params, the seed, the code
    versions and ``stage.cache_inputs()`` (e.g. the files its params name)."""
    return {"stage": stage.name, "params": stage.params.model_dump(mode="json"), "seed": seed,
            "stage_version": stage.version, "inputs": stage.cache_inputs(), "version": pipeline.__version__}


def stage_key(upstream: str, spec: dict[str, Any]) -> str:
    return sha256_json({"upstream": upstream, **spec})


class StageCache:
    """The stage folders of one run folder: ``run_dir`` is a local ``Path`` or an object-storage URI."""

    def __init__(self, run_dir: Folder):
        self.run_dir = run_dir
        self.root = storage.join(run_dir, "stages")
        # Where stages keep their artifacts as local files: the run folder itself, or its local mirror.
        self.work_dir = storage.local_mirror(run_dir) if storage.is_uri(run_dir) else Path(run_dir)

    def folder(self, index: int, name: str, key: str) -> Folder:
        return storage.join(self.root, f"{index:02d}-{name}-{key[:16]}")

    @staticmethod
    def record(folder: Folder, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The completion record of a finished stage, or None: no marker, an unreadable one, or row
        files that are not the ones it lists (``log`` hears which, before the stage is recomputed)."""
        if storage.is_uri(folder):
            raw = storage.read_bytes_or_none(f"{folder}/{SUCCESS}")
            try:
                record = json.loads(raw) if raw is not None else None
            except ValueError:
                record = None
        else:
            record = read_json_or_none(Path(folder) / SUCCESS)
        if not isinstance(record, dict):
            return None
        files = record.get("files")
        if not isinstance(files, dict):
            return None  # a marker from before checksums: recompute rather than trust it
        problems = _check_objects(folder, files, ROW_PARTS) if storage.is_uri(folder) else check_files(folder, files, ROW_PARTS)
        if problems:
            if log is not None:
                log(f"[cache] {storage.name(folder)} is damaged, recomputing: {'; '.join(problems[:3])}"
                    + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
            return None
        return record

    @staticmethod
    def read(folder: Folder, part: str = "data") -> ray.data.Dataset:
        if storage.is_uri(folder):
            fs, path = storage.filesystem(f"{folder}/{part}")
            return ray.data.read_parquet(path, filesystem=fs)
        return ray.data.read_parquet(str(Path(folder) / part))

    @staticmethod
    def write(ds: ray.data.Dataset, folder: Folder, part: str = "data") -> int:
        """Execute ``ds`` into ``folder/part`` atomically and return its row count."""
        if storage.is_uri(folder):
            return _write_objects(ds, folder, part)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".{part}.tmp-*"):  # left by a run killed mid-stage
            shutil.rmtree(stale, ignore_errors=True)
        final = folder / part
        tmp = folder / f".{part}.tmp-{uuid.uuid4().hex[:8]}"
        ds.write_parquet(str(tmp))
        if not tmp.exists() or not any(tmp.glob("*.parquet")):
            # Ray writes no file for an empty dataset; keep the schema so the next stage can read it.
            tmp.mkdir(parents=True, exist_ok=True)
            schema = ds.schema()
            arrow_schema = getattr(schema, "base_schema", None) if schema is not None else None
            if not isinstance(arrow_schema, pa.Schema):
                arrow_schema = pa.schema([])
            pq.write_table(arrow_schema.empty_table(), tmp / "empty.parquet")
        rows = pads.dataset(str(tmp), format="parquet").count_rows()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return rows

    def complete(self, folder: Folder, record: dict[str, Any]) -> dict[str, Any]:
        """Write the marker: ``record`` plus the checksums of the row files and artifacts; return it."""
        if storage.is_uri(folder):
            local = self._mirror(folder)
            storage.delete_tree(f"{folder}/artifacts")
            if (local / "artifacts").is_dir():
                storage.upload_tree(local / "artifacts", f"{folder}/artifacts")
            record = {**record, "files": _object_entries(folder, ROW_PARTS),
                      "artifact_files": file_entries(local, ("artifacts",), "*")}
            storage.write_bytes(f"{folder}/{SUCCESS}", json.dumps(record, indent=2, sort_keys=True, default=str).encode())
            return record
        record = {**record, "files": file_entries(folder, ROW_PARTS),
                  "artifact_files": file_entries(folder, ("artifacts",), "*")}
        write_json_atomic(folder / SUCCESS, record, indent=2, sort_keys=True, default=str)
        return record

    def artifacts(self, folder: Folder) -> Path:
        """The stage's artifact folder as a local path (in the mirror when the run folder is a URI)."""
        path = self._mirror(folder) / "artifacts" if storage.is_uri(folder) else Path(folder) / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fetch_artifacts(self, folder: Folder, record: dict[str, Any]) -> None:
        """Bring a cached stage's artifacts into the local mirror when they are not there (a URI run
        folder resumed on another machine); nothing to do for a local run folder."""
        if not storage.is_uri(folder) or not record.get("artifact_files"):
            return
        local = self._mirror(folder)
        if file_entries(local, ("artifacts",), "*") != record["artifact_files"]:
            shutil.rmtree(local / "artifacts", ignore_errors=True)
            storage.download_tree(f"{folder}/artifacts", local / "artifacts")

    def _mirror(self, folder: Folder) -> Path:
        return self.work_dir / str(folder)[len(str(self.run_dir).rstrip("/")) + 1:]


def _write_objects(ds: ray.data.Dataset, folder: str, part: str) -> int:
    """``StageCache.write`` on object storage: marker gone first, rows written in place by the Ray tasks."""
    storage.delete_file(f"{folder}/{SUCCESS}")
    target = f"{folder}/{part}"
    storage.delete_tree(target)
    fs, path = storage.filesystem(target)
    ds.write_parquet(path, filesystem=fs)
    if not storage.list_files(target):
        schema = ds.schema()
        arrow_schema = getattr(schema, "base_schema", None) if schema is not None else None
        if not isinstance(arrow_schema, pa.Schema):
            arrow_schema = pa.schema([])
        pq.write_table(arrow_schema.empty_table(), f"{path}/empty.parquet", filesystem=fs)
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows()
