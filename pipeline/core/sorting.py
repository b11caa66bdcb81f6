"""Ray's distributed sort, with blocks large enough that its shuffle stays out of the driver.

Ray Data's sort cuts each of its N input blocks into N pieces (one per output block), and Ray
returns a task result under ``max_direct_call_object_size`` (100 KB) inline, into the memory of
the process that owns it: the driver. A corpus read from many small blocks (a model stage writes
one per batch) therefore passes through the driver's heap piece by piece: sorting 100k rows with
384-float embeddings in 200 blocks raised the driver's peak by 582 MiB and took 22.9 s; combined
into 12 blocks first, by 4 MiB in 1.8 s (benchmarks/bench_sort_memory.py). So the input is first
combined into at most sqrt(bytes / 1 MiB) blocks, which makes every piece about 1 MiB or more.
"""

from __future__ import annotations

import math

import ray.data
from ray.data.context import DataContext, ShuffleStrategy

MIN_PIECE_BYTES = 1 << 20  # ten times Ray's inline limit


def sort_blocks(size_bytes: int, blocks: int) -> int:
    """How many blocks to sort ``size_bytes`` in, at most ``blocks`` (the input's): each of the
    blocks² shuffle pieces holds about ``MIN_PIECE_BYTES`` or more."""
    return max(1, min(blocks, math.isqrt(max(0, size_bytes) // MIN_PIECE_BYTES)))


def distributed_sort(ds: ray.data.Dataset, keys: list[str], descending: bool | list[bool] = False) -> ray.data.Dataset:
    """``ds.sort(keys)`` with the pull-based sort shuffle (``pipeline.engine.runner.pipeline_data_context``
    sets it for a run; set here too, on this dataset's own context, so a notebook calling a stage
    outside a run sorts as fast) on blocks combined as the module says. The input is materialized:
    the sort needs all of it before it writes a row anyway."""
    ds = ds.materialize()
    wanted = sort_blocks(ds.size_bytes(), ds.num_blocks())
    if wanted < ds.num_blocks():
        ds = ds.repartition(wanted)  # combines neighbouring blocks; the sort then orders the rows
    if ds.context is not DataContext.get_current():
        ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds.sort(keys, descending=descending)
