"""The stage cache: each stage's output, materialized to parquet under a key.

A stage's key is the sha256 of its params, its code version, the run seed and the upstream
stage's key, so a changed parameter reruns that stage and every stage after it, and nothing
before it. Like Dolma's attributes, scores are kept as columns: reorder without rescoring.

Layout, under ``RUN_DIR/stages/``::

    NN-<stage>-<key16>/data/*.parquet      the stage's output rows
    NN-<stage>-<key16>/artifacts/          models, tokenizers, fitted params (kept across crashes)
    NN-<stage>-<key16>/_SUCCESS.json        written last; its presence marks the stage complete

Output is written to a temporary folder and renamed into place, so a crash never leaves a
half-written ``data/`` that looks complete.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

import pipeline
from pipeline.core.files import read_json_or_none, write_json_atomic
from pipeline.core.hashing import sha256_json

SUCCESS = "_SUCCESS.json"


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
    def record(folder: Path) -> dict[str, Any] | None:
        """The completion record of a finished stage, or None (also when the marker is unreadable)."""
        record = read_json_or_none(folder / SUCCESS)
        return record if isinstance(record, dict) else None

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
    def complete(folder: Path, record: dict[str, Any]) -> None:
        write_json_atomic(folder / SUCCESS, record, indent=2, sort_keys=True, default=str)

    def artifacts(self, folder: Path) -> Path:
        path = folder / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path
