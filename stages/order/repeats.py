"""Rows that appear more than once in a sequence (``pacing`` and ``replay``), with unique ids.

The shard contract says ``id`` is unique within the run, so when a curriculum shows a document
again, the k-th repeat (k ≥ 1, counted in training order) gets the id ``<id>#r<k>``; the first
appearance keeps the plain id. Every output row carries:

- ``source_id``: the document it shows. An upstream ``source_id`` (the permute stage's pointer
  to the original document) is kept as it is; otherwise it is the row's input ``id``.
- ``repeat``: k, 0 for the first appearance.
- ``_times`` (internal): how many times the input row appears in the sequence, for the
  manifest's repeats histogram.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPEAT_SEPARATOR = "#r"
TIMES = "_times"
DROP_REASON = "_drop_reason"  # the runner's column: rows with a reason go to the stage's dropped/ folder


def expand(table: pa.Table, source: np.ndarray, occurrence: list[np.ndarray], extra: dict[str, pa.Array]) -> pa.Table:
    """``table`` rows ``source`` (with repeats), numbered per input row in ``occurrence`` order.

    ``occurrence`` are sort keys, most significant first, giving each output row's place in
    training order (e.g. step then slot); they number the copies of one input row 0, 1, ….
    ``extra`` columns are appended as they are.
    """
    source = np.asarray(source, dtype=np.int64)
    # np.lexsort sorts by its last key first: input row, then the occurrence keys in order.
    order = np.lexsort([*(np.asarray(k) for k in reversed(occurrence)), source])
    ordered = source[order]
    new_group = np.ones(len(ordered), dtype=bool)
    new_group[1:] = ordered[1:] != ordered[:-1]
    starts = np.maximum.accumulate(np.where(new_group, np.arange(len(ordered)), 0))
    repeat = np.empty(len(ordered), dtype=np.int64)
    repeat[order] = np.arange(len(ordered)) - starts
    times = np.bincount(source, minlength=table.num_rows)[source] if len(source) else np.zeros(0, np.int64)

    out = table.take(pa.array(source, pa.int64()))
    ids = out["id"].combine_chunks() if isinstance(out["id"], pa.ChunkedArray) else out["id"]
    if "source_id" not in out.column_names:
        out = out.append_column("source_id", ids.cast(pa.string()))
    repeat_arr = pa.array(repeat, pa.int64())
    renamed = pc.binary_join_element_wise(ids.cast(pa.string()), pc.cast(repeat_arr, pa.string()), REPEAT_SEPARATOR)
    new_ids = pc.if_else(pc.greater(repeat_arr, 0), renamed, ids.cast(pa.string()))
    out = out.set_column(out.column_names.index("id"), "id", new_ids)
    for name in ("repeat", *extra):
        if name in out.column_names:
            out = out.drop_columns([name])
    out = out.append_column("repeat", repeat_arr).append_column(TIMES, pa.array(times, pa.int64()))
    for name, values in extra.items():
        out = out.append_column(name, values)
    return out
