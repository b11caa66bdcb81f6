"""Embedding vectors in Arrow: a fixed-size list of float32 (or float16) per row, null for "no vector".

Shared by the ``embed`` stage (which writes them), ``cluster`` and ``semdedup`` (which read them);
kept here so that no stage imports another.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def vector_type(dim: int, storage: str = "float32") -> pa.DataType:
    """The Arrow type of a ``dim``-sized vector column stored as ``float32`` or ``float16``. The child
    is named ``element``, as parquet names it, so a block read back from the cache has the same type."""
    return pa.list_(pa.field("element", pa.float16() if storage == "float16" else pa.float32()), dim)


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray, storage: str = "float32") -> pa.FixedSizeListArray:
    """``(n, dim)`` floats -> a fixed-size-list array, null where ``valid`` is False."""
    n, dim = vectors.shape
    dtype = np.float16 if storage == "float16" else np.float32
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, type=vector_type(dim, storage),
                                             mask=pa.array(~np.asarray(valid, dtype=bool)))


def is_vector_type(data_type: pa.DataType) -> bool:
    """A fixed-size list of floats (what ``embed`` writes; a plain list column is not accepted)."""
    return pa.types.is_fixed_size_list(data_type) and pa.types.is_floating(data_type.value_type)


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A vector column -> (float32 ``(n, dim)``, zero rows where null; validity mask)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not is_vector_type(array.type):
        raise TypeError(f"expected a fixed-size list of floats, got {array.type}")
    dim = array.type.list_size
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    # The child values of every slot, null ones included (their storage is whatever the writer put
    # there), from the array's own offset: a sliced block starts inside its parent's values.
    values = array.values.slice(array.offset * dim, len(array) * dim)
    flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(array), dim)
    if not valid.all():
        flat = flat.copy()
        flat[~valid] = 0.0
    return flat, valid


def has_vector(table: pa.Table, column: str) -> np.ndarray:
    """Per row: True where ``column`` holds a vector (a row filter for ``pipeline.core.sampling``)."""
    return np.asarray(table[column].is_valid().to_numpy(zero_copy_only=False), dtype=bool)
