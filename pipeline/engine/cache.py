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
"""

from __future__ import annotations

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
from pipeline.core.files import read_json_or_none, write_json_atomic
from pipeline.core.hashing import sha256_file, sha256_json

SUCCESS = "_SUCCESS.json"
ROW_PARTS = ("data", "dropped", "quarantine")


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


def stage_spec(stage: Any, seed: int) -> dict[str, Any]:
    """What a stage's output depends on besides its input rows: its params, the seed, the code
    versions and ``stage.cache_inputs()`` (e.g. the files its params name)."""
    return {"stage": stage.name, "params": stage.params.model_dump(mode="json"), "seed": seed,
            "stage_version": stage.version, "inputs": stage.cache_inputs(), "version": pipeline.__version__}


def stage_key(upstream: str, spec: dict[str, Any]) -> str:
    return sha256_json({"upstream": upstream, **spec})


class StageCache:
    def __init__(self, run_dir: Path):
        self.root = run_dir / "stages"

    def folder(self, index: int, name: str, key: str) -> Path:
        return self.root / f"{index:02d}-{name}-{key[:16]}"

    @staticmethod
    def record(folder: Path, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The completion record of a finished stage, or None: no marker, an unreadable one, or row
        files that are not the ones it lists (``log`` hears which, before the stage is recomputed)."""
        record = read_json_or_none(folder / SUCCESS)
        if not isinstance(record, dict):
            return None
        files = record.get("files")
        if not isinstance(files, dict):
            return None  # a marker from before checksums: recompute rather than trust it
        problems = check_files(folder, files, ROW_PARTS)
        if problems:
            if log is not None:
                log(f"[cache] {folder.name} is damaged, recomputing: {'; '.join(problems[:3])}"
                    + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
            return None
        return record

    @staticmethod
    def read(folder: Path, part: str = "data") -> ray.data.Dataset:
        return ray.data.read_parquet(str(folder / part))

    @staticmethod
    def write(ds: ray.data.Dataset, folder: Path, part: str = "data") -> int:
        """Execute ``ds`` into ``folder/part`` atomically and return its row count."""
        folder.mkdir(parents=True, exist_ok=True)
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

    @staticmethod
    def complete(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Write the marker: ``record`` plus the checksums of the row files and artifacts; return it."""
        record = {**record, "files": file_entries(folder, ROW_PARTS),
                  "artifact_files": file_entries(folder, ("artifacts",), "*")}
        write_json_atomic(folder / SUCCESS, record, indent=2, sort_keys=True, default=str)
        return record

    def artifacts(self, folder: Path) -> Path:
        path = folder / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path
