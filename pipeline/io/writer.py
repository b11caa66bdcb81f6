"""The shard writer: rows with a contiguous ``position`` -> ``RUN_DIR/shards/part-NNNNN.parquet``.

Shard ``k`` holds positions ``[k * rows_per_shard, (k + 1) * rows_per_shard)``. Rows are grouped
by shard with Ray's distributed ``groupby``, and each group is written by one Ray task, sorted
by position and cast to one schema, so no process ever holds more than one shard. Each file is
written under a temporary name and renamed; the whole shard set is built in a staging folder
and swapped in at the end, so a crash never leaves a mixture of two runs.

On object storage (``run_dir`` an ``s3://`` URI) there is no rename: the run's ``manifest.json``
and the old shards are deleted first, each Ray task PUTs its shard whole, and the runner writes
the manifest last, so a folder without a manifest is never read as a finished run.

The bytes of a shard depend only on its rows: the column order is fixed (``id``, ``text``,
``position``, then the rest in upstream order), and the parquet writer settings are fixed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from pipeline.core import storage
from pipeline.core.errors import CurriculumError
from pipeline.core.hashing import sha256_file

CONTRACT_COLUMNS = ("id", "text", "position")


def shard_schema(schema: pa.Schema, drop: set[str] | None = None) -> pa.Schema:
    """The shard schema: contract columns first, internal ``_`` columns and ``drop`` removed."""
    drop = drop or set()
    fields = {f.name: f for f in schema}
    missing = [c for c in CONTRACT_COLUMNS if c not in fields]
    if missing:
        raise CurriculumError(f"shard writer: the final dataset lacks the contract columns {missing}")
    ordered = [pa.field("id", pa.string()), pa.field("text", pa.string()), pa.field("position", pa.int64())]
    for f in schema:
        if f.name in CONTRACT_COLUMNS or f.name.startswith("_") or f.name in drop:
            continue
        field_type = pa.string() if pa.types.is_large_string(f.type) else f.type
        ordered.append(pa.field(f.name, field_type))
    return pa.schema(ordered)


def _write_one_shard(group: pa.Table, folder: str, schema: pa.Schema, compression: str) -> pa.Table:
    group = group.sort_by("position")
    index = int(group["_shard"][0].as_py())
    table = pa.table({f.name: group[f.name].cast(f.type) for f in schema}, schema=schema)
    name = f"part-{index:05d}.parquet"
    settings = {"compression": None if compression == "none" else compression,
                "row_group_size": min(table.num_rows, 100_000) or None, "write_statistics": True}
    if storage.is_uri(folder):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **settings)
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(f"{folder}/{name}", data)
        digest = hashlib.sha256(data).hexdigest()
    else:
        final = Path(folder) / name
        tmp = Path(folder) / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp, **settings)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.rename(final)
        digest = sha256_file(final)
    return pa.table(
        {
            "index": [index],
            "path": [f"shards/{name}"],
            "rows": [table.num_rows],
            "sha256": [digest],
            "first_position": [int(table["position"][0].as_py())],
            "last_position": [int(table["position"][-1].as_py())],
        }
    )


def write_shards(
    ds: ray.data.Dataset,
    run_dir: Path | str,
    rows_per_shard: int,
    compression: str = "zstd",
    drop_columns: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Write ``ds`` (with a contiguous ``position``) as shards; return their manifest entries."""
    schema = ds.schema()
    arrow_schema = schema.base_schema if schema is not None else pa.schema([])
    target = shard_schema(arrow_schema, drop_columns)
    if storage.is_uri(run_dir):
        storage.delete_file(f"{run_dir}/manifest.json")
        staging: Path | str = f"{run_dir}/shards"
        storage.delete_tree(staging)
    else:
        run_dir = Path(run_dir)
        for stale in [*run_dir.glob(".shards.tmp-*"), *run_dir.glob(".shards.old-*")]:  # a killed writer's
            shutil.rmtree(stale, ignore_errors=True)
        staging = run_dir / f".shards.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)

    def tag(table: pa.Table) -> pa.Table:
        return table.append_column("_shard", pc.divide(table["position"], rows_per_shard))

    entries_ds = ds.map_batches(tag, batch_format="pyarrow").groupby("_shard").map_groups(
        _write_one_shard,
        batch_format="pyarrow",
        fn_kwargs={"folder": str(staging), "schema": target, "compression": compression},
    )
    entries = sorted(entries_ds.take_all(), key=lambda e: e["index"])
    _check_contiguous(entries, rows_per_shard)

    if isinstance(staging, Path):
        final = run_dir / "shards"
        old = run_dir / f".shards.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    return [{k: e[k] for k in ("path", "rows", "sha256", "first_position", "last_position")} for e in entries]


def _check_contiguous(entries: list[dict[str, Any]], rows_per_shard: int) -> None:
    expected = 0
    for k, entry in enumerate(entries):
        if entry["index"] != k or entry["first_position"] != expected:
            raise CurriculumError(
                f"shard writer: positions are not contiguous at shard {k} "
                f"(expected first position {expected}, got {entry['first_position']})"
            )
        if entry["last_position"] - entry["first_position"] + 1 != entry["rows"]:
            raise CurriculumError(f"shard writer: shard {k} has repeated or missing positions")
        if k < len(entries) - 1 and entry["rows"] != rows_per_shard:
            raise CurriculumError(f"shard writer: shard {k} has {entry['rows']} rows, not {rows_per_shard}")
        expected = entry["last_position"] + 1
