"""Order the corpus into the training order and write it as ``position`` (0 … N−1).

Ten strategies: ``random`` (the seeded baseline), ``sort``, ``quality_ascending`` /
``quality_descending`` (Luo et al., ICLR 2026), ``buckets``, ``folded`` (Luo et al.'s data
folding), ``domain_interleave``, ``cluster_interleave``, ``pacing`` (DeepSpeed difficulty pacing,
Platanios et al.'s competence curricula) and ``replay`` (power-law replay). Every one is total
(ties broken by id) and a function of (seed, id), so positions never depend on Ray's block
layout; only Ray's distributed sort, per-block tasks and a bounded hashed sample touch the data.

A null or NaN key follows ``nulls``: ``worst`` (default) reads it as the lowest quality, so the
row goes wherever the strategy puts the worst rows; ``last`` puts such rows after every row with
a value; ``drop`` hands them to the runner with ``_drop_reason = "order.null_key"``. Rows that a
paced sequence never draws go to the runner too (``order.never_shown``), so they stay findable
under the stage's ``dropped/`` folder. The manifest's ``order`` section describes what was done;
docs/methods.md §6 gives each strategy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field, model_validator

from pipeline.core.errors import StageError
from pipeline.core.hashing import hash64
from pipeline.core.positions import assign_positions
from pipeline.core.sorting import distributed_sort
from stages.base import Stage, StageContext, StageParams, variant_params
from stages.order import pacing as pacing_lib
from stages.order import replay as replay_lib
from stages.order.pacing import PacingSchedule
from stages.order.repeats import DROP_REASON, TIMES, expand

NULL_KEY, NEVER_SHOWN = "order.null_key", "order.never_shown"  # the stage's drop reasons
_SORT_KEY, _NULL_FLAG = "_order_key", "_order_null"
_RANK, _GROUP, _GROUP_NULL = "_rank", "_group", "_group_null"

METHODS = ("random", "sort", "quality_ascending", "quality_descending", "buckets", "folded",
           "domain_interleave", "cluster_interleave", "pacing", "replay")
Method = Literal["random", "sort", "quality_ascending", "quality_descending", "buckets", "folded",
                 "domain_interleave", "cluster_interleave", "pacing", "replay"]
_QUALITY = ("key", "higher_is_better", "quality_order")
# The parameters each method takes (besides name, method and seed) and their defaults.
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "random": (),
    "sort": ("key", "direction"),
    "quality_ascending": ("key", "higher_is_better"),
    "quality_descending": ("key", "higher_is_better"),
    "buckets": (*_QUALITY, "buckets", "sample_size"),
    "folded": (*_QUALITY, "folds"),
    "domain_interleave": (*_QUALITY, "group"),
    "cluster_interleave": (*_QUALITY, "group"),
    "pacing": (*_QUALITY, "total_samples", "batch_size", "pacing"),
    "replay": (*_QUALITY, "phases", "replay_fraction", "replay_exponent", "replay_clock"),
}
_QUALITY_DEFAULTS = {"key": "quality", "higher_is_better": True, "quality_order": "ascending"}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "random": {},
    "sort": {"direction": "ascending"},
    "quality_ascending": {"key": "quality", "higher_is_better": True},
    "quality_descending": {"key": "quality", "higher_is_better": True},
    "buckets": {**_QUALITY_DEFAULTS, "buckets": 10, "sample_size": 100_000},
    "folded": {**_QUALITY_DEFAULTS, "folds": 3},
    "domain_interleave": {**_QUALITY_DEFAULTS, "group": "source"},
    "cluster_interleave": {**_QUALITY_DEFAULTS, "group": "cluster"},
    "pacing": {**_QUALITY_DEFAULTS, "batch_size": 16, "pacing": {"function": "fixed_linear"}},
    "replay": {**_QUALITY_DEFAULTS, "phases": 4, "replay_fraction": 0.2, "replay_exponent": 1.0,
               "replay_clock": "last_seen"},
}


class OrderParams(StageParams):
    name: Literal["order"] = "order"
    method: Method = "random"
    key: str | None = Field(None, description="Column to order by; quality methods default to 'quality'.")
    direction: Literal["ascending", "descending"] | None = Field(None, description="sort: the key's direction.")
    higher_is_better: bool | None = Field(None, description="Quality methods: whether a higher key is better.")
    quality_order: Literal["ascending", "descending"] | None = Field(
        None, description="ascending = worst first, best last (default); descending = best first."
    )
    seed: int | None = Field(None, ge=0, description="Defaults to run.seed.")
    nulls: Literal["worst", "last", "drop"] = Field(
        "worst", description="Rows whose key is null or NaN: worst = read as the lowest quality (sort: the lowest "
                             "value); last = after every row with a value; drop = removed (reason order.null_key)."
    )
    buckets: int | None = Field(None, ge=1, le=1000, description="buckets: how many quantile buckets.")
    sample_size: int | None = Field(None, ge=100, le=5_000_000, description="buckets: rows sampled for the quantiles.")
    folds: int | None = Field(None, ge=1, description="folded: how many stages.")
    group: str | None = Field(None, description="Interleave methods: the domain or cluster column.")
    total_samples: int | None = Field(None, ge=1, description="pacing: rows in the materialized sequence.")
    batch_size: int | None = Field(None, ge=1, description="pacing: rows per step.")
    pacing: PacingSchedule | None = Field(None, description="pacing: the difficulty schedule.")
    phases: int | None = Field(None, ge=1, description="replay: how many phases.")
    replay_fraction: float | None = Field(None, ge=0, lt=1, description="replay: share of each phase j ≥ 1 that is replay.")
    replay_exponent: float | None = Field(None, ge=0, description="replay: d in (age + 1)^(−d).")
    replay_clock: Literal["last_seen", "introduced"] | None = Field(
        None, description="replay: a row's age counts from its last showing (last_seen) or its introduction."
    )

    @model_validator(mode="before")
    @classmethod
    def _method_params(cls, data: Any) -> Any:
        """Reject parameters of other methods, then fill this method's defaults."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", "random")
        if method not in METHOD_KEYS:
            return data  # the Literal names the allowed methods
        allowed = METHOD_KEYS[method]
        if method == "random" and data.get("nulls") == "drop":
            allowed = ("key",)  # the column whose null rows are dropped; random reads nothing else
        wrong, filled = variant_params(data, cls.model_fields, allowed, METHOD_DEFAULTS[method],
                                       always=("name", "method", "seed", "nulls"))
        if wrong:
            takes = ", ".join(allowed) or "no parameters besides seed and nulls"
            hint = (" (quality methods read the key with higher_is_better and quality_order, not direction)"
                    if "direction" in wrong else
                    " (random reads a key only with nulls: drop, to drop the rows where it is null)"
                    if method == "random" and "key" in wrong else "")
            raise ValueError(f"{', '.join(wrong)}: not a parameter of method {method!r}{hint}; "
                             f"method {method!r} takes: {takes}")
        return filled

    @model_validator(mode="after")
    def _method_needs(self) -> "OrderParams":
        if self.method == "sort" and not self.key:
            raise ValueError("key: method 'sort' needs key: the column to sort by")
        if self.method == "random" and self.nulls == "drop" and not self.key:
            raise ValueError("key: method 'random' with nulls: drop needs key: the column whose null rows are dropped")
        if self.method == "pacing" and self.total_samples is None:
            raise ValueError("total_samples: method 'pacing' needs total_samples: how many rows the "
                             "materialized sequence holds (e.g. the row count of the corpus for one pass)")
        return self


# --------------------------------------------------------------------------- per-batch helpers


def _random_key(table: pa.Table, seed: int) -> pa.Table:
    keys = pa.array(hash64(table["id"].to_pylist(), seed, "order.random"), pa.int64())
    return table.append_column(_SORT_KEY, keys).append_column(_NULL_FLAG, pa.array([0] * table.num_rows, pa.int8()))


def _sortable(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(values with nulls and NaN filled, int8 null flag): a column Ray can sort on, nulls flagged."""
    nulls = pc.is_null(column, nan_is_null=True)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())  # false < true, and a fill value that arrow accepts
    if pa.types.is_decimal(column.type):
        column = pc.cast(column, pa.float64())  # by value: as text "10" sorts before "9.5"
    if pa.types.is_floating(column.type):
        filled = pc.if_else(nulls, pa.scalar(0.0, column.type), column)
    elif pa.types.is_integer(column.type):
        filled = pc.fill_null(column, 0)
    else:
        filled = pc.fill_null(column.cast(pa.string()), "")
    return filled, pc.cast(nulls, pa.int8())


def _column_key(table: pa.Table, key: str, null_flag: int) -> pa.Table:
    """``_order_key`` and ``_order_null``: 0 for a value, ``null_flag`` (−1 = before every value,
    1 = after) for a null or NaN; the sort is ascending by the flag."""
    filled, nulls = _sortable(table[key])
    flag = pc.if_else(pc.cast(nulls, pa.bool_()), pa.scalar(null_flag, pa.int8()), pa.scalar(0, pa.int8()))
    return table.append_column(_SORT_KEY, filled).append_column(_NULL_FLAG, flag)


def _quality_key(table: pa.Table, key: str, key_descending: bool, null_fill: float | None,
                 group: str | None = None) -> pa.Table:
    """``_order_key`` (float64, ascending = curriculum order), ``_order_null``, and the group columns.

    With ``null_fill`` (−inf or +inf: where the worst rows go), a null or NaN key becomes that
    value, so every strategy treats the row as the worst one; without it the row is flagged
    (``_order_null`` = 1) and the stage orders it after every row with a value."""
    column = table[key]
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    values = pc.cast(column, pa.float64())
    nulls = pc.is_null(values, nan_is_null=True)
    filled = pc.if_else(nulls, pa.scalar(0.0), values)
    if key_descending:
        filled = pc.negate(filled)
    if null_fill is not None:
        filled = pc.if_else(nulls, pa.scalar(null_fill), filled)
        flags = pa.array(np.zeros(table.num_rows, dtype=np.int8))
    else:
        flags = pc.cast(nulls, pa.int8())
    out = table.append_column(_SORT_KEY, filled).append_column(_NULL_FLAG, flags)
    if group is not None:
        out = _add_group(out, group)
    return out


def _split_nulls(table: pa.Table, key: str, nulls: bool) -> pa.Table:
    """The rows whose ``key`` is null or NaN, marked with the reason (``nulls``), or the others."""
    missing = pc.is_null(table[key], nan_is_null=True)
    if not nulls:
        return table.filter(pc.invert(missing))
    rows = table.filter(missing)
    return rows.append_column(DROP_REASON, pa.array([NULL_KEY] * rows.num_rows, pa.string()))


def _where_flag(table: pa.Table, flag: int) -> pa.Table:
    return table.filter(pc.equal(table[_NULL_FLAG], flag))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, cast, in its order; a missing column is null."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.table(columns, schema=schema)


def _add_group(table: pa.Table, group: str) -> pa.Table:
    filled, nulls = _sortable(table[group])
    return table.append_column(_GROUP, filled).append_column(_GROUP_NULL, nulls)


def _derived(table: pa.Table, seed: int, salt: str, streams: int) -> list[np.ndarray]:
    """``streams`` independent uint64 hashes per row from one seeded id hash."""
    base = hash64(table["id"].to_pylist(), seed, salt).astype(np.uint64)
    return [replay_lib.mix64(base, k) for k in range(streams)]


# --------------------------------------------------------------------------- distributed helpers


def sort_and_number(ds: ray.data.Dataset, descending: bool) -> ray.data.Dataset:
    """Sort by (``_order_null``, ``_order_key``, id) and number the rows; drops the helper columns."""
    ordered = distributed_sort(ds, [_NULL_FLAG, _SORT_KEY, "id"], descending=[False, descending, False])
    return assign_positions(ordered).drop_columns([_SORT_KEY, _NULL_FLAG])


def number_by(ds: ray.data.Dataset, keys: list[str]) -> ray.data.Dataset:
    """Sort ascending by ``keys`` (which must make the order total) and number the rows."""
    return assign_positions(distributed_sort(ds, keys))


def _ranked(keyed: ray.data.Dataset, grouped: bool = False) -> ray.data.Dataset:
    """``keyed`` sorted by (group, null flag, key, id) with the exact rank as ``_rank``."""
    keys = ([_GROUP_NULL, _GROUP] if grouped else []) + [_NULL_FLAG, _SORT_KEY, "id"]
    return assign_positions(distributed_sort(keyed, keys)).rename_columns({"position": _RANK})


_HELPERS = (_SORT_KEY, _NULL_FLAG, _RANK, _GROUP, _GROUP_NULL, "_shuffle", "_slot_a", "_slot_b", "_slot", "_v",
            "_from_phase", TIMES)


def _drop_helpers(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` without this stage's helper columns (upstream ``_`` columns are not ours to drop)."""
    schema = ds.schema()
    names = set(schema.names) if schema is not None else set()
    helpers = [c for c in _HELPERS if c in names]
    return ds.drop_columns(helpers) if helpers else ds


def _collect(ds: ray.data.Dataset) -> pa.Table:
    """A small dataset (a sample, per-group aggregates) as one arrow table in the driver."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def _partial_counts(table: pa.Table, keys: list[str], where: str | None) -> pa.Table:
    if where is not None:
        table = table.filter(pc.equal(table[where], 0))
    return table.select(keys).group_by(keys, use_threads=False).aggregate([([], "count_all")])


def _count_by(ds: ray.data.Dataset, keys: list[str], where_zero: str | None = None) -> list[dict[str, Any]]:
    """Rows per value of ``keys`` (only rows whose ``where_zero`` column is 0, when given).

    Each block counts its own rows and only those small tables reach the driver; a Ray groupby
    would start a hash shuffle for what is a handful of numbers.
    """
    parts = _collect(ds.map_batches(_partial_counts, batch_format="pyarrow", batch_size=None,
                                    fn_kwargs={"keys": keys, "where": where_zero}))
    if not parts.num_rows:
        return []
    total = parts.group_by(keys, use_threads=False).aggregate([("count_all", "sum")]).to_pylist()
    return sorted(({**{k: r[k] for k in keys}, "rows": int(r["count_all_sum"])} for r in total),
                  key=lambda r: tuple(r[k] for k in keys))


def _partial_starts(table: pa.Table) -> pa.Table:
    return table.group_by([_GROUP_NULL, _GROUP], use_threads=False).aggregate([(_RANK, "min"), (_RANK, "count")])


def _group_starts(ranked: ray.data.Dataset) -> pa.Table:
    """First rank and size of every group. The ranked data is sorted by group, so a block holds
    few groups and the per-block tables that reach the driver total about groups + blocks rows."""
    parts = _collect(ranked.map_batches(_partial_starts, batch_format="pyarrow", batch_size=None))
    return parts.group_by([_GROUP_NULL, _GROUP], use_threads=False).aggregate(
        [(f"{_RANK}_min", "min"), (f"{_RANK}_count", "sum")])


# --------------------------------------------------------------------------- strategies


def _folded_phase(table: pa.Table, folds: int, seed: int) -> pa.Table:
    rank = table[_RANK].to_numpy()
    group = rank // folds
    unique, inverse = np.unique(group, return_inverse=True)
    rotation = hash64([str(g) for g in unique], seed, "order.folded")[inverse] % folds
    phase = (rank % folds + rotation) % folds
    if "phase" in table.column_names:
        table = table.drop_columns(["phase"])
    return table.append_column("phase", pa.array(phase, pa.int64()))


def _group_slots(table: pa.Table, starts: np.ndarray, sizes: np.ndarray, normalised: bool) -> pa.Table:
    rank = table[_RANK].to_numpy()
    index = np.searchsorted(starts, rank, side="right") - 1
    inside = rank - starts[index]
    first = (inside + 0.5) / sizes[index] if normalised else inside
    return table.append_column("_slot_a", pa.array(first)).append_column("_slot_b", pa.array(index, pa.int64()))


def _bucket_of(table: pa.Table, seed: int, bx: np.ndarray, bu: np.ndarray, n_buckets: int) -> pa.Table:
    x = table[_SORT_KEY].to_numpy()
    null = table[_NULL_FLAG].to_numpy().astype(bool)
    tie, shuffle = _derived(table, seed, "order.buckets", 2)
    u = replay_lib.unit(tie)
    bucket = np.zeros(len(x), dtype=np.int64)
    for lo in range(0, len(x), 8192):  # lexicographic (x, u) >= boundary, counted in slices
        xs, us = x[lo:lo + 8192, None], u[lo:lo + 8192, None]
        bucket[lo:lo + 8192] = ((bx[None, :] < xs) | ((bx[None, :] == xs) & (bu[None, :] <= us))).sum(axis=1)
    bucket[null] = n_buckets
    if "bucket" in table.column_names:
        table = table.drop_columns(["bucket"])
    return (table.append_column("bucket", pa.array(bucket, pa.int64()))
            .append_column("_shuffle", pa.array((shuffle >> np.uint64(1)).astype(np.int64), pa.int64())))


def _sample_keys(table: pa.Table, seed: int, rate: float) -> pa.Table:
    tie, _, pick = _derived(table, seed, "order.buckets", 3)
    keep = (replay_lib.unit(pick) < rate) & ~table[_NULL_FLAG].to_numpy().astype(bool)
    return pa.table({"x": table[_SORT_KEY].to_numpy()[keep], "u": replay_lib.unit(tie)[keep]})


def bucket_boundaries(x: np.ndarray, u: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """The n − 1 inner boundaries of a (key, tie-hash) sample, as lexicographic pairs."""
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.lexsort((u, x))
    at = (np.arange(1, n_buckets) * len(x)) // n_buckets
    return x[order][at], u[order][at]


def _tail_columns(table: pa.Table, offset: int, method: str, columns: dict[str, int]) -> pa.Table:
    """The null-key tail of ``nulls: last``: positions after the ``offset`` rows of the ordered
    part, and the strategy's own columns (``columns``: e.g. the extra phase, the first tail step)."""
    local = table["position"].to_numpy()
    table = table.set_column(table.column_names.index("position"), "position", pa.array(local + offset, pa.int64()))
    if method in ("pacing", "replay"):
        table = expand(table, np.arange(table.num_rows), occurrence=[np.zeros(table.num_rows)], extra={})
    if method == "pacing":
        table = table.append_column("step", pa.array(columns["step"] + local // columns["batch_size"], pa.int64()))
    if "phase" in columns:
        table = table.append_column("phase", pa.array(np.full(table.num_rows, columns["phase"]), pa.int64()))
    return table


def _arrow_schema(ds: ray.data.Dataset | None) -> pa.Schema | None:
    schema = ds.schema() if ds is not None else None
    base = getattr(schema, "base_schema", None) if schema is not None else None
    return base if isinstance(base, pa.Schema) else None


class OrderStage(Stage):
    name: ClassVar[str] = "order"
    Params = OrderParams
    columns: ClassVar[tuple[str, ...]] = ("position",)
    version: ClassVar[int] = 3

    def __init__(self, params: OrderParams) -> None:
        super().__init__(params)
        extra = {"buckets": ("bucket",), "folded": ("phase",), "pacing": ("step", "repeat", "source_id"),
                 "replay": ("phase", "repeat", "source_id")}.get(params.method, ())
        self.columns = ("position", *extra)  # type: ignore[misc]  # what this instance adds

    def requires(self) -> list[str]:
        p = self.params
        return ([p.key] if p.key else []) + ([p.group] if p.group else [])

    def may_drop(self) -> bool:
        """Rows with a null key under ``nulls: drop``, and the rows a paced sequence never shows."""
        return self.params.nulls == "drop" or self.params.method == "pacing"

    # ------------------------------------------------------------------ apply

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        for column in self.requires():
            if column not in ctx.input_columns:
                raise StageError(f"order: column {column!r} does not exist (columns: {ctx.input_columns})")
        if p.method not in ("random", "sort"):
            self._check_numeric(ds, p.key)
        if p.group and p.method in ("domain_interleave", "cluster_interleave"):
            self._check_group(ds, p.group)
        dropped: list[ray.data.Dataset] = []
        if p.nulls == "drop":
            dropped.append(ds.map_batches(_split_nulls, batch_format="pyarrow", fn_kwargs={"key": p.key, "nulls": True}))
            ds = ds.map_batches(_split_nulls, batch_format="pyarrow", fn_kwargs={"key": p.key, "nulls": False})
        info: dict[str, Any] = {"method": p.method, "ties": "id ascending", "nulls": p.nulls}
        out = self._order(ds, seed, info, dropped)
        ctx.order = info
        if "repeat_rows" in info:  # pacing and replay: a sequence with repeats, not a permutation
            ctx.added["order.repeat"] = info["repeat_rows"]
        return self._with_dropped(out, dropped) if self.may_drop() else out

    def _order(self, ds: ray.data.Dataset, seed: int, info: dict[str, Any],
               dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        p = self.params
        if p.method == "random":
            keyed = ds.map_batches(_random_key, batch_format="pyarrow", fn_kwargs={"seed": seed})
            info.update(key=p.key, direction=None, seed=seed)
            return sort_and_number(keyed, False)
        if p.method == "sort":
            # worst = the lowest value: first in an ascending sort, last in a descending one
            first = p.nulls == "worst" and p.direction == "ascending"
            keyed = ds.map_batches(_column_key, batch_format="pyarrow", fn_kwargs={"key": p.key, "null_flag": -1 if first else 1})
            info.update(key=p.key, direction=p.direction)
            return sort_and_number(keyed, p.direction == "descending")

        worst_first = p.method == "quality_ascending" or (p.method != "quality_descending" and p.quality_order == "ascending")
        key_descending = worst_first != bool(p.higher_is_better)  # worst first on a higher-is-better key = ascending
        info.update(key=p.key, direction="descending" if key_descending else "ascending",
                    higher_is_better=p.higher_is_better, quality_order="ascending" if worst_first else "descending",
                    reads_as="worst first, best last" if worst_first else "best first, worst last", seed=seed)
        if p.method in ("quality_ascending", "quality_descending"):
            first = p.nulls == "worst" and worst_first
            keyed = ds.map_batches(_column_key, batch_format="pyarrow", fn_kwargs={"key": p.key, "null_flag": -1 if first else 1})
            info.pop("seed")
            return sort_and_number(keyed, key_descending)

        group = p.group if p.method in ("domain_interleave", "cluster_interleave") else None
        null_fill = None if p.nulls == "last" else (-np.inf if worst_first else np.inf)
        keyed = ds.map_batches(_quality_key, batch_format="pyarrow",
                               fn_kwargs={"key": p.key, "key_descending": key_descending, "null_fill": null_fill,
                                          "group": group})
        if p.nulls == "last":
            counts = {r[_NULL_FLAG]: r["rows"] for r in _count_by(keyed, [_NULL_FLAG])}
            n_rows, n_tail = counts.get(0, 0), counts.get(1, 0)
        else:
            n_rows, n_tail = ds.count(), 0
        info["rows_in"] = n_rows + n_tail
        if n_rows + n_tail == 0:
            return _drop_helpers(assign_positions(distributed_sort(keyed, [_NULL_FLAG, _SORT_KEY, "id"])))
        out = None
        if n_rows:
            valued = keyed.map_batches(_where_flag, batch_format="pyarrow", fn_kwargs={"flag": 0}) if n_tail else keyed
            out = getattr(self, f"_{p.method}")(valued, n_rows, seed, info, dropped)
        if n_tail:
            tail = keyed.map_batches(_where_flag, batch_format="pyarrow", fn_kwargs={"flag": 1})
            out = self._null_tail(out, tail, n_rows, n_tail, seed, info)
        assert out is not None
        return out

    def _null_tail(self, out: ray.data.Dataset | None, tail: ray.data.Dataset, n_rows: int, n_tail: int, seed: int,
                   info: dict[str, Any]) -> ray.data.Dataset:
        """``nulls: last``: the rows without a key after the ordered part, in id order (``buckets``:
        an extra bucket, shuffled like every bucket), with the strategy's columns."""
        p = self.params
        method = p.method
        offset = int(info.get("sequence_rows", n_rows))
        columns: dict[str, int] = {}
        described: dict[str, Any] = {"rows": n_tail, "first_position": offset}
        if method == "buckets":
            n = int(p.buckets)  # type: ignore[arg-type]
            tail = tail.map_batches(_bucket_of, batch_format="pyarrow",
                                    fn_kwargs={"seed": seed, "bx": np.zeros(0), "bu": np.zeros(0), "n_buckets": n})
            numbered = number_by(tail, ["bucket", "_shuffle", "id"])
            info.setdefault("bucket_rows", {})[str(n)] = n_tail
            info["null_bucket"] = described["bucket"] = n
        else:
            numbered = number_by(tail, ["id"])
        if method == "folded":
            columns["phase"] = described["phase"] = int(p.folds)  # type: ignore[arg-type]
            info.setdefault("phase_rows", {})[str(columns["phase"])] = n_tail
        if method == "replay":
            columns["phase"] = described["phase"] = int(p.phases)  # type: ignore[arg-type]
        if method == "pacing":
            columns.update(step=int(info.get("steps", 0)), batch_size=int(p.batch_size))  # type: ignore[arg-type]
            described["first_step"] = columns["step"]
        if method in ("pacing", "replay"):
            if "times_shown" not in info:  # no row had a value: the sequence is the tail alone
                info.update(self._shown_counts({}, 0))
            times = info["times_shown"]
            times["1"] = times.get("1", 0) + n_tail
            info["times_shown"] = {k: times[k] for k in sorted(times, key=int)}
            info["rows_shown"] += n_tail
            info["sequence_rows"] += n_tail
        info["null_tail"] = described
        numbered = _drop_helpers(numbered.map_batches(_tail_columns, batch_format="pyarrow", fn_kwargs={
            "offset": offset, "method": method, "columns": columns}))
        if out is None:
            return numbered
        schema = _arrow_schema(out)
        return out.union(numbered.map_batches(_conform, batch_format="pyarrow", fn_kwargs={"schema": schema}))

    @staticmethod
    def _with_dropped(out: ray.data.Dataset, dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        """The ordered rows (``_drop_reason`` null) and the dropped ones (with their reason), in one
        schema, for the runner to split: it stores and counts the dropped rows by reason."""
        schema = _arrow_schema(out)
        if schema is None:  # nothing was ordered: take the columns of the dropped rows
            schema = next((s for s in map(_arrow_schema, dropped) if s is not None), pa.schema([]))
            schema = pa.schema([f for f in schema if f.name != DROP_REASON])
        if "position" not in schema.names:
            schema = schema.append(pa.field("position", pa.int64()))
        schema = schema.append(pa.field(DROP_REASON, pa.string()))
        parts = [d.map_batches(_conform, batch_format="pyarrow", fn_kwargs={"schema": schema}) for d in [out, *dropped]]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    # ------------------------------------------------------------------ strategies

    def _buckets(self, keyed: ray.data.Dataset, n_rows: int, seed: int, info: dict[str, Any],
                 dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        p = self.params
        n, size = int(p.buckets), int(p.sample_size)  # type: ignore[arg-type]
        rate = min(1.0, size / n_rows)
        sample = _collect(keyed.map_batches(_sample_keys, batch_format="pyarrow", fn_kwargs={"seed": seed, "rate": rate}))
        x = sample["x"].to_numpy() if sample.num_rows else np.zeros(0)
        u = sample["u"].to_numpy() if sample.num_rows else np.zeros(0)
        bx, bu = bucket_boundaries(x, u, n)
        tagged = keyed.map_batches(_bucket_of, batch_format="pyarrow",
                                   fn_kwargs={"seed": seed, "bx": bx, "bu": bu, "n_buckets": n})
        out = number_by(tagged, ["bucket", "_shuffle", "id"])
        sign = -1.0 if info["direction"] == "descending" else 1.0
        info.update(buckets=n, sample_size=size, sample_rows=len(x), exact_quantiles=rate >= 1.0,
                    boundaries=[round(float(sign * b), 8) if np.isfinite(b) else None for b in bx],
                    within_bucket="shuffled by a seeded id hash",
                    bucket_rows={str(r["bucket"]): r["rows"] for r in _count_by(out, ["bucket"])})
        return _drop_helpers(out)

    def _folded(self, keyed: ray.data.Dataset, n_rows: int, seed: int, info: dict[str, Any],
                dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        k = int(self.params.folds)  # type: ignore[arg-type]
        ranked = _ranked(keyed)
        phased = ranked.map_batches(_folded_phase, batch_format="pyarrow", fn_kwargs={"folds": k, "seed": seed})
        out = number_by(phased, ["phase", _RANK])
        info.update(folds=k, phase_column="phase",
                    assignment="each run of k consecutive ranks gives one row to every phase (seeded rotation)",
                    phase_rows={str(r["phase"]): r["rows"] for r in _count_by(out, ["phase"])})
        return _drop_helpers(out)

    def _interleave(self, keyed: ray.data.Dataset, info: dict[str, Any], normalised: bool) -> ray.data.Dataset:
        group = self.params.group
        ranked = _ranked(keyed, grouped=True)
        stats = _group_starts(ranked)
        order = np.argsort(stats[f"{_RANK}_min_min"].to_numpy())
        starts = stats[f"{_RANK}_min_min"].to_numpy()[order]
        sizes = stats[f"{_RANK}_count_sum"].to_numpy()[order]
        labels = [None if stats[_GROUP_NULL][int(i)].as_py() else stats[_GROUP][int(i)].as_py() for i in order]
        slotted = ranked.map_batches(_group_slots, batch_format="pyarrow",
                                     fn_kwargs={"starts": starts, "sizes": sizes, "normalised": normalised})
        out = number_by(slotted, ["_slot_a", "_slot_b"])
        info.update(group=group, groups=len(starts))
        if len(starts) <= 1000:
            info["group_rows"] = {str(label): int(n) for label, n in zip(labels, sizes)}
        return _drop_helpers(out)

    def _domain_interleave(self, keyed: ray.data.Dataset, n_rows: int, seed: int, info: dict[str, Any],
                           dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        info.update(interleave="by normalised rank (r + 0.5) / n_group inside each group; ties by group order")
        info.pop("seed")
        return self._interleave(keyed, info, normalised=True)

    def _cluster_interleave(self, keyed: ray.data.Dataset, n_rows: int, seed: int, info: dict[str, Any],
                            dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        info.update(interleave="round-robin: round t holds the t-th row of every group that has one, groups ascending")
        info.pop("seed")
        return self._interleave(keyed, info, normalised=False)

    def _pacing(self, keyed: ray.data.Dataset, n_rows: int, seed: int, info: dict[str, Any],
                dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        p = self.params
        assert p.pacing is not None and p.total_samples is not None and p.batch_size is not None
        plan = pacing_lib.PacingPlan(n=n_rows, total_samples=p.total_samples, batch_size=p.batch_size,
                                     schedule=p.pacing, seed=seed)
        smallest = plan.smallest_pool()
        if smallest < 1:
            raise StageError(
                f"order: pacing admits no row at some step: d(s) × {n_rows} rows < 1 "
                f"(pacing {p.pacing.model_dump(exclude_none=True)}); raise min_difficulty / initial_competence / "
                f"difficulty, or order more rows"
            )
        ranked = _ranked(keyed)
        expanded = ranked.map_batches(pacing_lib.expand_block, batch_format="pyarrow", batch_size=None,
                                      fn_kwargs={"plan": plan, "rank_column": _RANK, "unshown": NEVER_SHOWN}).materialize()
        dropped.append(expanded.map_batches(lambda t: t.filter(pc.is_valid(t[DROP_REASON])), batch_format="pyarrow"))
        drawn = expanded.map_batches(lambda t: t.filter(pc.is_null(t[DROP_REASON])).drop_columns([DROP_REASON]),
                                     batch_format="pyarrow")
        out = number_by(drawn, ["step", "_slot"])
        info.update(
            total_samples=p.total_samples, batch_size=p.batch_size, steps=plan.steps,
            pacing=p.pacing.model_dump(exclude_none=True),
            difficulty="percentile (rank + 1) / N along the quality order; a row joins the pool at step s "
                       "when its difficulty <= d(s)",
            sampling="each step's batch is uniform without replacement within the pool, independent across steps",
            curve=plan.curve(), smallest_pool=smallest, step_column="step", **self._repeats(out, n_rows),
        )
        return _drop_helpers(out)

    def _replay(self, keyed: ray.data.Dataset, n_rows: int, seed: int, info: dict[str, Any],
                dropped: list[ray.data.Dataset]) -> ray.data.Dataset:
        p = self.params
        plan = replay_lib.ReplayPlan(n=n_rows, phases=int(p.phases), fraction=float(p.replay_fraction),  # type: ignore[arg-type]
                                     exponent=float(p.replay_exponent), seed=seed,  # type: ignore[arg-type]
                                     clock=str(p.replay_clock))
        ranked = _ranked(keyed)
        expanded = ranked.map_batches(replay_lib.expand_block, batch_format="pyarrow", batch_size=None,
                                      fn_kwargs={"plan": plan, "rank_column": _RANK})
        out = number_by(expanded, ["phase", "_v", _RANK, "repeat"])
        realised = np.zeros((plan.phases, plan.phases), dtype=np.int64)
        for r in _count_by(out, ["phase", "_from_phase"]):
            realised[r["phase"], r["_from_phase"]] = r["rows"]
        own = "phase j >= 1 holds its n_j own rows plus R_j = n_j * rho / (1 - rho) replayed rows; "
        if plan.clock == "introduced":
            formula = own + ("R_{j,i} = R_j * (j - i + 1)^(-d) / sum_{i'<j} (j - i' + 1)^(-d) for i < j; each phase-i row "
                             "is replayed floor(m) times plus once with probability frac(m), m = R_{j,i} / n_i "
                             "(seeded hash of (seed, id, j))")
        else:
            formula = own + ("a row last shown (introduced or replayed) in phase s < j weighs (j - s + 1)^(-d) and is "
                             "replayed floor(m) times plus once with probability frac(m), m = R_j * (j - s + 1)^(-d) / "
                             "W_j, W_j the expected total weight of the earlier rows (seeded hash of (seed, id, j))")
        info.update(
            phases=plan.phases, replay_fraction=plan.fraction, replay_exponent=plan.exponent,
            replay_clock=plan.clock, phase_column="phase", formula=formula,
            phase_rows=[int(s) for s in plan.sizes()],
            expected=[[round(float(v), 4) for v in row] for row in plan.expected()],
            realised=realised.tolist(), **self._repeats(out, n_rows),
        )
        return _drop_helpers(out)

    # ------------------------------------------------------------------ checks and summaries

    @classmethod
    def _repeats(cls, out: ray.data.Dataset, n_rows: int) -> dict[str, Any]:
        """How often the input rows appear in the sequence ``out``."""
        histogram = {int(r[TIMES]): int(r["rows"]) for r in _count_by(out, [TIMES], where_zero="repeat")}
        return cls._shown_counts(histogram, n_rows)

    @staticmethod
    def _shown_counts(histogram: dict[int, int], n_rows: int) -> dict[str, Any]:
        """rows_shown + rows_never_shown = the rows ordered; sequence_rows = rows_shown + repeat_rows."""
        shown = sum(histogram.values())
        sequence = sum(k * v for k, v in histogram.items())
        if n_rows - shown:
            histogram[0] = n_rows - shown
        return {"rows_shown": shown, "rows_never_shown": n_rows - shown, "repeat_rows": sequence - shown,
                "sequence_rows": sequence, "times_shown": {str(k): histogram[k] for k in sorted(histogram)},
                "never_shown_rows": f"the stage's dropped/ folder, _drop_reason = {NEVER_SHOWN!r}",
                "repeat_ids": "the k-th repeat (k >= 1) of a row has id '<id>#r<k>'; source_id names the document"}

    def _check_numeric(self, ds: ray.data.Dataset, key: str | None) -> None:
        schema = ds.schema()
        field_type = schema.base_schema.field(key).type if schema is not None else None
        if field_type is not None and not (pa.types.is_integer(field_type) or pa.types.is_floating(field_type)
                                           or pa.types.is_boolean(field_type) or pa.types.is_decimal(field_type)):
            raise StageError(f"order: method {self.params.method!r} needs a numeric key; column {key!r} has type "
                             f"{field_type} (use method 'sort' to order by text)")

    def _check_group(self, ds: ray.data.Dataset, group: str) -> None:
        schema = ds.schema()
        field_type = schema.base_schema.field(group).type if schema is not None else None
        if field_type is not None and not (pa.types.is_integer(field_type) or pa.types.is_floating(field_type)
                                           or pa.types.is_boolean(field_type) or pa.types.is_string(field_type)
                                           or pa.types.is_large_string(field_type)):
            raise StageError(f"order: group column {group!r} has type {field_type}; "
                             f"it must hold strings, integers or booleans")
