"""Semantic deduplication inside each cluster: drop near-duplicates by cosine similarity of their embeddings.

Method: SemDeDup (Abbas et al., *SemDeDup: Data-efficient learning at web-scale through semantic
deduplication*, 2023): cluster the embeddings (the ``cluster`` stage), then within each cluster
drop rows whose cosine similarity to a kept row exceeds ``threshold``. Rows are ranked by the
quality ``key`` (best first; a null key ranks last), ties broken by a seeded hash of the id and
then the id, so the kept row of a duplicate set is the best one and the result does not depend
on the input order. The greedy pass keeps a row unless it is too similar to a row already kept
(a chain a~b~c with a and c apart keeps both a and c). Each cluster is one task of Ray's
``groupby(cluster).map_groups``; nothing comes to the driver but per-cluster counts. Dropped rows
get ``_drop_reason = semdedup_near_duplicate``; the runner keeps them under ``dropped/``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from pydantic import Field

from pipeline.core.errors import StageError
from pipeline.core.hashing import hash64
from pipeline.models.kmeans import normalize_rows
from pipeline.models.vectors import arrow_to_vectors
from stages.base import Stage, StageContext, StageParams

REASON = "semdedup_near_duplicate"
_GROUP = "_semdedup_group"
_SALT = "semdedup.tie"
_BLOCK = 1024  # rows compared at once against the kept rows




class SemDedupParams(StageParams):
    name: Literal["semdedup"] = "semdedup"
    threshold: float = Field(0.95, gt=-1, le=1, description="Drop a row whose cosine similarity to a kept row of "
                             "its cluster is above this (SemDeDup's 1 - epsilon).")
    key: str | None = Field("quality", min_length=1, description="The quality column that decides which row of a "
                            "duplicate set is kept (null: only the seeded id hash decides).")
    higher_is_better: bool = Field(True, description="Keep the row with the higher key (false: the lower).")
    column: str = Field("embedding", min_length=1, description="The vector column.")
    cluster_column: str = Field("cluster", min_length=1, description="Rows are compared only inside a cluster.")
    seed: int | None = Field(None, ge=0, description="Seeds the id hash that breaks ties; defaults to run.seed.")
    top_clusters: int = Field(10, ge=0, description="How many clusters, by rows dropped, the manifest lists.")


class SemDedupStage(Stage):
    name: ClassVar[str] = "semdedup"
    Params = SemDedupParams

    def requires(self) -> list[str]:
        p = self.params
        return [p.column, p.cluster_column, *([p.key] if p.key else [])]

    def may_drop(self) -> bool:
        return True

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        schema = ds.schema()
        missing = [c for c in self.requires() if c not in schema.names]
        if missing:
            raise StageError(f"semdedup: column(s) {missing} do not exist (columns: {list(schema.names)})")
        if p.key is not None:
            key_type = schema.base_schema.field(p.key).type
            if not (pa.types.is_integer(key_type) or pa.types.is_floating(key_type)):
                raise StageError(f"semdedup: key column {p.key!r} is {key_type}, not numeric")
        grouped = ds.map_batches(_with_group, batch_format="pyarrow", fn_kwargs={"cluster_column": p.cluster_column})
        marked = grouped.groupby(_GROUP).map_groups(_dedup_group, batch_format="pyarrow", fn_kwargs={
            "column": p.column, "key": p.key, "higher_is_better": p.higher_is_better, "threshold": p.threshold,
            "seed": seed}).materialize()
        per_cluster: dict[int, list[int]] = {}  # cluster -> [rows, dropped]
        for row in marked.select_columns([_GROUP, "_drop_reason"]).map_batches(
                _counts, batch_format="pyarrow", batch_size=None).take_all():
            entry = per_cluster.setdefault(int(row["group"]), [0, 0])
            entry[0] += int(row["rows"])
            entry[1] += int(row["dropped"])
        dropped = sum(d for _, d in per_cluster.values())
        top = sorted(((c, d) for c, (_, d) in per_cluster.items() if d), key=lambda cd: (-cd[1], cd[0]))
        info: dict[str, Any] = {
            "threshold": p.threshold, "key": p.key, "higher_is_better": p.higher_is_better, "seed": seed,
            "dropped": dropped, "clusters": sum(1 for c in per_cluster if c >= 0),
            "clusters_with_drops": len(top),
            "dropped_by_cluster_top": {str(c): {"dropped": d, "rows": per_cluster[c][0]} for c, d in top[: p.top_clusters]},
            "rows_without_cluster": per_cluster.get(-1, [0, 0])[0],
        }
        ctx.info.update(info)
        return marked.drop_columns([_GROUP])


def _with_group(table: pa.Table, cluster_column: str) -> pa.Table:
    """The group key: the cluster, or -1 for rows without one (never compared)."""
    group = pc.fill_null(pc.cast(table[cluster_column], pa.int64()), -1)
    if _GROUP in table.column_names:
        table = table.drop_columns([_GROUP])
    return table.append_column(_GROUP, group)


def _dedup_group(table: pa.Table, column: str, key: str | None, higher_is_better: bool, threshold: float,
                 seed: int) -> pa.Table:
    """One cluster: ``_drop_reason`` set on the rows too similar to a better row kept before them."""
    n = table.num_rows
    drop = np.zeros(n, dtype=bool)
    if "_drop_reason" in table.column_names:
        table = table.drop_columns(["_drop_reason"])
    if n > 1 and int(table[_GROUP][0].as_py()) >= 0:
        vectors, valid = arrow_to_vectors(table[column])
        ids = np.asarray(table["id"].to_pylist(), dtype=object)
        ties = hash64(ids.tolist(), seed, _SALT)
        if key is not None:
            values = pc.cast(table[key], pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
            missing = np.isnan(values)
            rank_value = np.where(missing, 0.0, -values if higher_is_better else values)
        else:
            missing = np.zeros(n, dtype=bool)
            rank_value = np.zeros(n)
        # best first: a key (nulls last), then the seeded id hash, then the id; np.lexsort's last key is primary
        order = np.lexsort((ids.astype(str), ties, rank_value, missing))
        order = order[valid[order]]
        drop[order] = greedy_near_duplicates(normalize_rows(vectors[order]), threshold)
    reasons = pa.array(np.where(drop, REASON, None).tolist(), pa.string())
    return table.append_column("_drop_reason", reasons)


def greedy_near_duplicates(x: np.ndarray, threshold: float) -> np.ndarray:
    """Rows (unit vectors, best first) to drop: each row whose dot product with an earlier kept row is
    above ``threshold``. Compared ``_BLOCK`` rows at a time against the kept rows, so memory is
    O(block x kept), never the full similarity matrix."""
    n = x.shape[0]
    drop = np.zeros(n, dtype=bool)
    kept = np.zeros((0, x.shape[1]), dtype=np.float32)
    for start in range(0, n, _BLOCK):
        block = x[start:start + _BLOCK]
        gone = np.zeros(block.shape[0], dtype=bool)
        if kept.shape[0]:
            gone |= (block @ kept.T).max(axis=1) > threshold
        sims = block @ block.T
        for i in range(block.shape[0]):
            if not gone[i]:  # i is kept: every later row of the block too close to it goes
                later = sims[i, i + 1:] > threshold
                gone[i + 1:] |= later
        drop[start:start + block.shape[0]] = gone
        kept = np.concatenate([kept, block[~gone]])
    return drop


def _counts(table: pa.Table) -> pa.Table:
    """Per batch and group: rows and rows dropped."""
    dropped = pc.cast(pc.is_valid(table["_drop_reason"]), pa.int64())
    grouped = pa.table({"group": table[_GROUP], "d": dropped}).group_by("group", use_threads=False).aggregate(
        [("d", "sum"), ("d", "count")])
    return pa.table({"group": grouped["group"], "rows": grouped["d_count"], "dropped": grouped["d_sum"]})
