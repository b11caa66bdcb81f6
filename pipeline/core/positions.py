"""Number the rows of an ordered dataset 0 … N−1 without pulling it into the driver.

After a distributed sort, Ray's materialized blocks are in order. Only their row counts come
to the driver; one Ray task per block then adds its slice of positions. That keeps the
numbering exact and contiguous at any scale, with one pass over the data.
"""

from __future__ import annotations

import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockAccessor


@ray.remote
def _number_block(block, start: int) -> pa.Table:
    table = BlockAccessor.for_block(block).to_arrow()
    positions = pa.array(range(start, start + table.num_rows), pa.int64())
    if "position" in table.column_names:
        table = table.drop_columns(["position"])
    return table.append_column("position", positions)


def assign_positions(ordered: ray.data.Dataset) -> ray.data.Dataset:
    """``ordered`` with a ``position`` column counting rows in dataset order from 0."""
    materialized = ordered.materialize()
    refs, start = [], 0
    for bundle in materialized.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            # Ray >= 2.5x yields BlockEntry(ref, metadata); older releases a (ref, metadata) tuple.
            block_ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            rows = meta.num_rows
            if rows is None:
                rows = ray.get(_count_rows.remote(block_ref))
            if rows:
                refs.append(_number_block.remote(block_ref, start))
                start += rows
    if not refs:
        return ordered
    return ray.data.from_arrow_refs(refs)


@ray.remote
def _count_rows(block) -> int:
    return BlockAccessor.for_block(block).num_rows()
