"""Ingest: parsed records -> good rows with typed columns, and quarantine with reasons.

Three distributed passes over the (materialized) parsed dataset:

1. **Duplicate ids.** Ids seen more than once are found with a distributed aggregation; only
   when there are any does a ``groupby("id").map_groups`` keep the first record in input
   order and quarantine the rest as ``duplicate id``. With content-hash ids this is exact
   deduplication.
2. **One schema for extra fields.** The distinct field signatures (names and JSON types) are
   collected with ``unique`` and merged: int -> int64, int + float -> float64, bool, str;
   anything mixed or nested becomes a JSON string. Field names that clash with the contract
   (``id``, ``text``, ``position``) or start with ``_`` are kept as ``input_<name>``.
3. **Expansion.** ``map_batches`` turns the JSON of extra fields into those typed columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.aggregate import Count, Min

from pipeline.io.readers import RESERVED_COLUMNS

QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("raw", pa.string()), ("reason", pa.string())])
_MERGED_TYPES: dict[frozenset[str], pa.DataType] = {
    frozenset({"int"}): pa.int64(),
    frozenset({"float"}): pa.float64(),
    frozenset({"int", "float"}): pa.float64(),
    frozenset({"bool"}): pa.bool_(),
    frozenset({"str"}): pa.string(),
}


@dataclass
class IngestResult:
    good: ray.data.Dataset
    quarantine: ray.data.Dataset
    input_rows: int
    extra_columns: dict[str, str]


def column_name_for_field(field: str) -> str:
    return f"input_{field}" if field in RESERVED_COLUMNS or field.startswith("_") else field


def merge_signatures(signatures: list[str | None]) -> dict[str, pa.DataType]:
    """Field name -> arrow type, merged over every record's signature."""
    seen: dict[str, set[str]] = {}
    for signature in signatures:
        if not signature:
            continue
        for item in signature.split(","):
            name, _, kind = item.rpartition(":")
            seen.setdefault(name, set()).add(kind)
    return {name: _MERGED_TYPES.get(frozenset(kinds), pa.string()) for name, kinds in sorted(seen.items())}


def _filter_batch(table: pa.Table, bad: bool) -> pa.Table:
    mask = pc.is_valid(table["_reason"]) if bad else pc.is_null(table["_reason"])
    return table.filter(mask)


def _mark_duplicates(group: pa.Table) -> pa.Table:
    """Within one id's rows: keep the first in input order, quarantine the others."""
    if group.num_rows < 2:
        return group
    group = group.sort_by("_seq")
    first_source = group["_source"][0].as_py()
    reasons = [None] + [f"duplicate id {group['id'][0].as_py()!r} (first seen at {first_source})"] * (group.num_rows - 1)
    raws = [None] + [json.dumps({"id": group["id"][i].as_py(), "text": group["text"][i].as_py()}, ensure_ascii=False)
                     for i in range(1, group.num_rows)]
    group = group.set_column(group.schema.get_field_index("_reason"), "_reason", pa.array(reasons, pa.string()))
    return group.set_column(group.schema.get_field_index("_raw"), "_raw", pa.array(raws, pa.string()))


def _expand_fields(table: pa.Table, schema: dict[str, pa.DataType]) -> pa.Table:
    """id, text and one typed column per extra field (null where a record lacks it)."""
    values: dict[str, list[Any]] = {name: [] for name in schema}
    for encoded in table["_fields"].to_pylist():
        record = json.loads(encoded) if encoded else {}
        for name, arrow_type in schema.items():
            value = record.get(name)
            if value is not None and arrow_type == pa.string() and not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False, sort_keys=True)
            values[name].append(value)
    columns = {"id": table["id"], "text": table["text"]}
    for name, arrow_type in schema.items():
        columns[column_name_for_field(name)] = pa.array(values[name], arrow_type)
    return pa.table(columns)


def _to_quarantine(table: pa.Table) -> pa.Table:
    return pa.table({"source": table["_source"], "raw": table["_raw"], "reason": table["_reason"]},
                    schema=QUARANTINE_SCHEMA)


def ingest(parsed: ray.data.Dataset) -> IngestResult:
    """Split a materialized parsed dataset into good rows and quarantine rows."""
    input_rows = parsed.count()
    ok = parsed.map_batches(_filter_batch, batch_format="pyarrow", fn_kwargs={"bad": False})
    bad = parsed.map_batches(_filter_batch, batch_format="pyarrow", fn_kwargs={"bad": True})

    repeated = (
        ok.select_columns(["id", "_seq"]).groupby("id").aggregate(Count(), Min("_seq"))
        .map_batches(lambda t: t.filter(pc.greater(t["count()"], 1)), batch_format="pyarrow")
    )
    if repeated.count() > 0:
        marked = ok.groupby("id").map_groups(_mark_duplicates, batch_format="pyarrow")
        marked = marked.materialize()
        ok = marked.map_batches(_filter_batch, batch_format="pyarrow", fn_kwargs={"bad": False})
        bad = bad.union(marked.map_batches(_filter_batch, batch_format="pyarrow", fn_kwargs={"bad": True}))

    schema = merge_signatures(ok.unique("_sig"))
    good = ok.map_batches(_expand_fields, batch_format="pyarrow", fn_kwargs={"schema": schema})
    quarantine = bad.map_batches(_to_quarantine, batch_format="pyarrow")
    return IngestResult(
        good=good,
        quarantine=quarantine,
        input_rows=input_rows,
        extra_columns={column_name_for_field(k): str(v) for k, v in schema.items()},
    )

