"""Order the corpus into the training order and write it as ``position`` (0 … N−1).

``random`` is a seeded uniform shuffle, the baseline every curriculum is compared with.
``sort`` orders by a column (Luo et al., ICLR 2026, sort by a quality score: METHODS.md §4).
Both use Ray's distributed sort; the random order sorts by a seeded hash of the id, so it
does not depend on how Ray splits the data. Ties are broken by ``id`` and nulls go last, so
the order is a total order and the same rows always get the same positions.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from pydantic import Field, model_validator

from pipeline.errors import StageError
from pipeline.hashing import hash64
from pipeline.positions import assign_positions
from stages.base import Stage, StageContext, StageParams

_SORT_KEY, _NULL_FLAG = "_order_key", "_order_null"


class OrderParams(StageParams):
    name: Literal["order"] = "order"
    method: Literal["random", "sort"] = "random"
    key: str | None = Field(None, description="Column to sort by (method: sort).")
    direction: Literal["ascending", "descending"] = "ascending"
    seed: int | None = Field(None, ge=0, description="Defaults to run.seed.")

    @model_validator(mode="after")
    def _sort_needs_key(self) -> "OrderParams":
        if self.method == "sort" and not self.key:
            raise ValueError("method 'sort' needs key: the column to sort by")
        return self


def _random_key(table: pa.Table, seed: int) -> pa.Table:
    keys = pa.array(hash64(table["id"].to_pylist(), seed, "order.random"), pa.int64())
    return table.append_column(_SORT_KEY, keys).append_column(_NULL_FLAG, pa.array([0] * table.num_rows, pa.int8()))


def _column_key(table: pa.Table, key: str) -> pa.Table:
    column = table[key]
    nulls = pc.is_null(column, nan_is_null=True)
    if pa.types.is_floating(column.type):
        filled = pc.if_else(nulls, pa.scalar(0.0, column.type), column)
    elif pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        filled = pc.fill_null(column, 0)
    else:
        filled = pc.fill_null(column.cast(pa.string()), "")
    return table.append_column(_SORT_KEY, filled).append_column(_NULL_FLAG, pc.cast(nulls, pa.int8()))


def sort_and_number(ds: ray.data.Dataset, descending: bool) -> ray.data.Dataset:
    """Sort by (nulls last, ``_order_key``, id) and number the rows; drops the helper columns."""
    ordered = ds.sort([_NULL_FLAG, _SORT_KEY, "id"], descending=[False, descending, False])
    return assign_positions(ordered).drop_columns([_SORT_KEY, _NULL_FLAG])


class OrderStage(Stage):
    name: ClassVar[str] = "order"
    Params = OrderParams
    columns: ClassVar[tuple[str, ...]] = ("position",)

    def requires(self) -> list[str]:
        return [self.params.key] if self.params.method == "sort" and self.params.key else []

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        info: dict[str, Any] = {"method": p.method, "ties": "id ascending", "nulls": "last"}
        if p.method == "random":
            keyed = ds.map_batches(_random_key, batch_format="pyarrow", fn_kwargs={"seed": seed})
            info.update(key=None, direction=None, seed=seed)
            descending = False
        else:
            if p.key not in ctx.input_columns:
                raise StageError(f"order: key column {p.key!r} does not exist (columns: {ctx.input_columns})")
            keyed = ds.map_batches(_column_key, batch_format="pyarrow", fn_kwargs={"key": p.key})
            info.update(key=p.key, direction=p.direction)
            descending = p.direction == "descending"
        ctx.order = info
        return sort_and_number(keyed, descending)
