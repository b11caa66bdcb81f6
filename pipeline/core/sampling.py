"""A bounded, seeded sample of a Ray dataset: the ``k`` rows with the smallest hash of their id.

Every global step that fits on a sample (the reference LM's training text, the classifier's
negatives, the quantiles of selection and combine) draws it here, so that it never depends on
Ray's block layout and the driver never holds the corpus: each block keeps only the rows whose
seeded ``uniform(id)`` falls under a rate a little above k/N, about 1.2 k rows reach the driver,
and the k smallest (by hash, then id) are kept. An unlucky draw below k doubles the rate and
reads again (rare, and deterministic either way).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import ray
import ray.data

from pipeline.core.hashing import uniform

RowFilter = Callable[[pa.Table], np.ndarray]


def _under_rate(table: pa.Table, seed: int, salt: str, rate: float, eligible: RowFilter | None) -> pa.Table:
    u = uniform(table["id"].to_pylist(), seed, salt)
    keep = u < rate
    if eligible is not None:
        keep &= np.asarray(eligible(table), dtype=bool)
    return table.filter(pa.array(keep)).append_column("_u", pa.array(u[keep], pa.float64()))


def hashed_sample(ds: ray.data.Dataset, k: int, seed: int, salt: str, columns: list[str],
                  eligible: RowFilter | None = None, eligible_share: float = 1.0) -> pa.Table:
    """At most ``k`` rows (``id`` + ``columns``) with the smallest ``uniform(id, seed, salt)``, in
    that order. ``eligible`` (table -> boolean mask) restricts the draw, and ``eligible_share`` is
    the share of rows it is expected to accept (it only sets the first rate)."""
    selected = ds.select_columns(["id", *[c for c in columns if c != "id"]])
    n = ds.count()
    empty = pa.table({"id": pa.array([], pa.string())})
    if n == 0 or k <= 0:
        return empty
    rate = min(1.0, (1.2 * k + 32) / max(1.0, n * eligible_share))
    while True:
        refs = selected.map_batches(_under_rate, batch_format="pyarrow", fn_kwargs={
            "seed": seed, "salt": salt, "rate": rate, "eligible": eligible}).to_arrow_refs()
        tables = [t for t in ray.get(refs) if t.num_rows]
        rows = pa.concat_tables(tables) if tables else None
        if (rows is not None and rows.num_rows >= k) or rate >= 1.0:
            break
        rate = min(1.0, rate * 2)
    if rows is None:
        return empty
    return rows.sort_by([("_u", "ascending"), ("id", "ascending")]).slice(0, k).drop_columns(["_u"])
