"""kMQ selection: a budget split over clusters by size, drawn inside each cluster by quality.

Method: k-means-quality (kMQ) of Yu et al., *Diversify and Conquer: Diversity-Centric Data
Selection with Iterative Refinement* (2024). Each cluster ``j`` (the ``cluster`` column, e.g. from
the ``cluster`` stage) gets a budget ``b_j`` proportional to ``size_j · w_j`` (``w_j`` = 1, or the
per-cluster ``weights`` of iterative refinement), rounded by the largest-remainder rule so that
the budgets add up to the budget exactly; a cluster smaller than its share gives all its rows
and the rest goes to the others by the same rule. Inside a cluster, ``b_j`` rows are drawn
without replacement with probability ∝ softmax(key / temperature).

The draw is the Gumbel-top-k trick (Kool, van Hoof and Welling, *Stochastic Beams and Where to
Find Them*, ICML 2019; the exponential-key form of Efraimidis and Spirakis, *Weighted random
sampling with a reservoir*, IPL 2006): every row gets ``z = key / T + G`` with ``G = −log(−log u)``
and ``u`` a seeded hash of its id, and the ``b_j`` largest ``z`` of the cluster are the sample.
Taking the top k of Gumbel-perturbed log-weights draws exactly as k successive softmax draws
without replacement, and since ``z`` depends only on (seed, id, key), the selection is the same
whatever the block layout or the number of CPUs. Ranking uses Ray's distributed sort on narrow
columns (id, cluster index, z); only a per-cluster count table and one cut row per cluster reach
the driver, and a per-row pass then marks every row against its cluster's cut.

A null or NaN key is the lowest quality: such rows come after every row with a value in their
cluster (drawn among themselves uniformly). Rows not selected get ``_drop_reason =
"kmq.unselected"``: the runner keeps them under the stage's ``dropped/`` folder, so a new
selection needs no re-embedding or rescoring. docs/methods.md §9 gives the method in full.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field, field_validator

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.hashing import hash64
from pipeline.core.positions import assign_positions
from pipeline.core.sorting import distributed_sort
from stages.base import Stage, StageContext, StageParams

UNSELECTED = "kmq.unselected"  # the drop reason of a row that kMQ did not select
SALT = "kmq.gumbel"
MAX_CLUSTER_DETAIL = 5000  # per-cluster rows in the manifest up to this many clusters
_G, _NULL, _Z, _Q = "_kmq_g", "_kmq_null", "_kmq_z", "_kmq_q"


# --------------------------------------------------------------------------- params


def check_budget(value: Any) -> int | float:
    """A row count (int ≥ 1) or a fraction of the rows (0 < f ≤ 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a row count (whole number >= 1) or a fraction of the rows in (0, 1] (got {value!r})")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a row count must be at least 1 (got {value})")
        return value
    if not np.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"a fraction of the rows must be in (0, 1]; a row count must be a whole number (got {value})")
    return float(value)


def check_weights(value: dict[Any, Any] | None) -> dict[str, float] | None:
    """Cluster label (as text) -> weight >= 0, at least one above 0."""
    if value is None:
        return None
    out: dict[str, float] = {}
    for label, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of cluster {label!r} must be a finite number >= 0 (got {weight!r})")
        out[label_text(label)] = float(weight)
    if out and not any(w > 0 for w in out.values()):
        raise ValueError("at least one cluster weight must be above 0")
    return out


class KMQParams(StageParams):
    name: Literal["kmq"] = "kmq"
    budget: int | float = Field(..., description="Rows to select: a count (>= 1) or a fraction of the rows (0 < f <= 1).")
    key: str = Field("quality", min_length=1, description="The quality column to draw by (any numeric column).")
    higher_is_better: bool = Field(True, description="Whether a higher key is better.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T: P ∝ exp(key / T) inside a cluster; "
                               "small T = top-k by key, large T = uniform.")
    cluster: str = Field("cluster", min_length=1, description="The cluster column (integers or strings).")
    min_per_cluster: int = Field(1, ge=0, description="Rows every cluster gets at least (or all it has) when the "
                                 "budget allows it (budget >= the sum of these minimums); 0 = proportional only.")
    weights: dict[str, float] | None = Field(None, description="Per-cluster weights: budgets ∝ size × weight "
                                             "(missing clusters weigh 1). Iterative refinement sets these.")
    seed: int | None = Field(None, ge=0, description="Seed of the Gumbel keys; defaults to run.seed.")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> int | float:
        return check_budget(value)

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> dict[str, float] | None:
        if value is not None and not isinstance(value, dict):
            raise ValueError("a mapping of cluster label -> weight")
        return check_weights(value)


# --------------------------------------------------------------------------- budgets


def label_text(label: Any) -> str:
    """How a cluster label is written in configs and the manifest."""
    return "null" if label is None else str(label)


def budget_rows(budget: int | float, rows: int, key: str = "budget") -> int:
    """The row count that ``budget`` means for ``rows`` rows; ConfigError when it asks for more."""
    if isinstance(budget, float):
        return min(rows, max(1, int(budget * rows + 0.5))) if rows else 0
    if budget > rows:
        raise ConfigError(f"{key}: {budget} rows asked, but only {rows} rows reach the selection "
                          f"(give a smaller count or a fraction in (0, 1])")
    return int(budget)


def _clamp(value: Fraction, low: int, high: int) -> Fraction:
    return min(max(value, Fraction(low)), Fraction(high))


def _shares(total: int, mass: list[Fraction], lower: list[int], upper: list[int]) -> list[Fraction]:
    """Exact shares ``clamp(λ · mass_i, lower_i, upper_i)`` with λ set so they add up to ``total``.

    Σ clamp(λ m_i, l_i, u_i) is piecewise linear and non-decreasing in λ, with breakpoints at
    l_i / m_i and u_i / m_i: find the piece that reaches ``total`` and solve on it."""
    def level(lam: Fraction) -> Fraction:
        return sum((_clamp(lam * m, lo, hi) for m, lo, hi in zip(mass, lower, upper)), Fraction(0))

    points = sorted({Fraction(0)} | {Fraction(b) / m for m, lo, hi in zip(mass, lower, upper) if m > 0 for b in (lo, hi)})
    lo_i, hi_i = 0, len(points) - 1
    if level(points[hi_i]) <= total:
        lam = points[hi_i]
    else:
        while hi_i - lo_i > 1:  # level(points[lo_i]) <= total < level(points[hi_i])
            mid = (lo_i + hi_i) // 2
            if level(points[mid]) <= total:
                lo_i = mid
            else:
                hi_i = mid
        a, b = points[lo_i], points[hi_i]
        fa, fb = level(a), level(b)
        lam = a if fa == total else a + (total - fa) * (b - a) / (fb - fa)
    return [_clamp(lam * m, lo, hi) for m, lo, hi in zip(mass, lower, upper)]


def allocate(total: int, sizes: np.ndarray, weights: np.ndarray | None = None, lower: np.ndarray | None = None,
             upper: np.ndarray | None = None) -> np.ndarray:
    """Integer budgets that add up to ``total`` exactly: ∝ sizes × weights, within [lower, upper].

    Largest-remainder (Hamilton) apportionment with bounds: each cluster's share is
    ``λ · size × weight`` clamped to [lower, upper] (upper defaults to its size), with λ set so the
    shares add up to ``total``, so a cluster smaller than its proportional share gives all its
    rows and what it cannot hold goes to the others in proportion. Each cluster then gets the
    floor of its share, and the rows left over go one each to the largest remainders (ties: the
    lower index). Exact rational arithmetic: the result does not depend on float rounding.
    Clusters with weight 0 get their lower bound, and share (by size) only what the others
    cannot hold.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(sizes)
    weights = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    upper = sizes.copy() if upper is None else np.minimum(np.asarray(upper, dtype=np.int64), sizes)
    upper = np.maximum(upper, 0)
    lower = np.zeros(k, dtype=np.int64) if lower is None else np.clip(np.asarray(lower, dtype=np.int64), 0, upper)
    if not int(lower.sum()) <= total <= int(upper.sum()):
        raise ValueError(f"cannot allocate {total} rows within bounds adding up to {int(lower.sum())} … {int(upper.sum())}")
    lo, hi = [int(v) for v in lower], [int(v) for v in upper]
    mass = [Fraction(int(s)) * Fraction(float(w)) for s, w in zip(sizes, weights)]
    held = sum(h if m > 0 else lo_ for m, lo_, h in zip(mass, lo, hi))  # what the weighted clusters can hold
    if total <= held:
        shares = _shares(total, mass, lo, hi)
    else:  # every weighted cluster is full: the clusters of weight 0 share the rest by size
        zero = [i for i in range(k) if mass[i] == 0]
        rest = total - sum(hi[i] for i in range(k) if mass[i] > 0)
        inner = _shares(rest, [Fraction(int(sizes[i])) for i in zero], [lo[i] for i in zero], [hi[i] for i in zero])
        shares = [Fraction(hi[i]) for i in range(k)]
        for i, share in zip(zero, inner):
            shares[i] = share
    floors = [s.numerator // s.denominator for s in shares]
    extra = total - sum(floors)
    by_remainder = sorted(range(k), key=lambda i: (-(shares[i] - floors[i]), i))
    alloc = np.array(floors, dtype=np.int64)
    for i in by_remainder[:extra]:
        alloc[i] += 1
    if int(alloc.sum()) != total or (alloc > upper).any() or (alloc < lower).any():
        raise AssertionError(f"allocation of {total} rows failed: {alloc.tolist()} (bounds {lo} … {hi})")
    return alloc


def minimums(sizes: np.ndarray, total: int, min_per_cluster: int, taken: np.ndarray | None = None) -> np.ndarray:
    """Lower bounds: every cluster reaches ``min_per_cluster`` rows (or all it has) counting the
    rows it already has (``taken``), when ``total`` covers them all; else no lower bound."""
    taken = np.zeros(len(sizes), dtype=np.int64) if taken is None else taken
    want = np.maximum(0, np.minimum(min_per_cluster, sizes) - taken)
    return want if int(want.sum()) <= total else np.zeros(len(sizes), dtype=np.int64)


# --------------------------------------------------------------------------- per-row keys


def gumbel(ids: list[str], seed: int) -> np.ndarray:
    """A seeded standard Gumbel draw per id: −log(−log u), u from the top 53 bits of the id hash."""
    h = hash64(ids, seed, SALT).astype(np.uint64) >> np.uint64(10)
    u = (h.astype(np.float64) + 0.5) / float(2**53)  # strictly inside (0, 1)
    return -np.log(-np.log(u))


def row_keys(table: pa.Table, key: str, sign: float, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                             np.ndarray]:
    """(null flag int8, z float64, key float64 with NaN for null): z = ±key / T + Gumbel."""
    column = table[key]
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
    null = np.isnan(values)
    g = gumbel(table["id"].to_pylist(), seed)
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.where(null, g, sign * np.where(null, 0.0, values) / temperature + g)
    return null.astype(np.int8), z, values


def cluster_index(table: pa.Table, cluster: str, labels: list[Any]) -> np.ndarray:
    """The index of each row's cluster in ``labels`` (null is the last label when present)."""
    column = table[cluster]
    values = [v for v in labels if v is not None]
    value_type = pa.string() if pa.types.is_large_string(column.type) else column.type
    if pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    index = pc.index_in(column, value_set=pa.array(values, value_type))
    null_index = labels.index(None) if None in labels else -1
    out = pc.fill_null(index, null_index).to_numpy(zero_copy_only=False).astype(np.int32)
    if (out < 0).any():
        raise StageError(f"kmq: cluster column {cluster!r} holds a value not seen when counting the clusters")
    return out


def _narrow(table: pa.Table, key: str, cluster: str, labels: list[Any], sign: float, temperature: float,
            seed: int) -> pa.Table:
    null, z, values = row_keys(table, key, sign, temperature, seed)
    return pa.table({"id": table["id"], _G: pa.array(cluster_index(table, cluster, labels), pa.int32()),
                     _NULL: pa.array(null, pa.int8()), _Z: pa.array(z, pa.float64()),
                     _Q: pa.array(values, pa.float64(), mask=null.astype(bool))})


# --------------------------------------------------------------------------- distributed steps


def collect_summaries(ds: ray.data.Dataset) -> pa.Table:
    """A dataset of small per-block summaries (a few rows per block), as one table in the driver."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def _block_counts(table: pa.Table, cluster: str) -> pa.Table:
    grouped = table.select([cluster]).group_by([cluster], use_threads=False).aggregate([([], "count_all")])
    return pa.table({"label": grouped[cluster], "rows": grouped["count_all"]})


def count_clusters(ds: ray.data.Dataset, cluster: str) -> tuple[list[Any], np.ndarray]:
    """(labels, sizes): every cluster value, sorted with null last, and its row count. Each block
    counts its own rows; only the per-block tables (clusters × blocks rows) reach the driver."""
    parts = collect_summaries(ds.select_columns([cluster]).map_batches(_block_counts, batch_format="pyarrow",
                                                               batch_size=None, fn_kwargs={"cluster": cluster}))
    if not parts.num_rows:
        return [], np.zeros(0, dtype=np.int64)
    if pa.types.is_large_string(parts["label"].type):
        parts = parts.set_column(0, "label", pc.cast(parts["label"], pa.string()))
    total = parts.group_by(["label"], use_threads=False).aggregate([("rows", "sum")]).to_pylist()
    by_label = {r["label"]: int(r["rows_sum"]) for r in total}
    labels = sorted(v for v in by_label if v is not None) + ([None] if None in by_label else [])
    return labels, np.array([by_label[v] for v in labels], dtype=np.int64)


def narrow_input(ds: ray.data.Dataset, key: str, cluster: str) -> ray.data.Dataset:
    """The id, key and cluster columns, materialized once: the count and the ranking both read them
    (an upstream parquet read costs seconds per pass even on a small corpus)."""
    return ds.select_columns(list(dict.fromkeys(["id", key, cluster]))).materialize()


def rank_in_clusters(ds: ray.data.Dataset, key: str, cluster: str, labels: list[Any], higher_is_better: bool,
                     temperature: float, seed: int) -> ray.data.Dataset:
    """Narrow rows (id, cluster index, null flag, z, key) sorted by cluster, then best first (null
    keys last, z descending, id ascending), numbered by ``position``; materialized."""
    sign = 1.0 if higher_is_better else -1.0
    columns = list(dict.fromkeys(["id", key, cluster]))
    narrow = ds.select_columns(columns).map_batches(_narrow, batch_format="pyarrow", fn_kwargs={
        "key": key, "cluster": cluster, "labels": labels, "sign": sign, "temperature": temperature, "seed": seed})
    ordered = distributed_sort(narrow, [_G, _NULL, _Z, "id"], [False, False, True, False])
    return assign_positions(ordered).materialize()


def _pick_rows(table: pa.Table, wanted: pa.Array) -> pa.Table:
    return table.filter(pc.is_in(table["position"], value_set=wanted))


def cut_rows(ranked: ray.data.Dataset, starts: np.ndarray, cumulative: np.ndarray) -> dict[str, Any]:
    """The last selected row of every (round, cluster): its null flag, z and id.

    ``cumulative[r, j]`` is how many of cluster j's best rows are selected by the end of round r;
    a row of cluster j is selected by then iff it ranks at or before that cut. At most
    rounds × clusters rows reach the driver.
    """
    cumulative = np.atleast_2d(cumulative)
    targets = {int(starts[j] + c - 1) for row in cumulative for j, c in enumerate(row) if c > 0}
    picked = collect_summaries(ranked.map_batches(_pick_rows, batch_format="pyarrow", fn_kwargs={
        "wanted": pa.array(sorted(targets), pa.int64())})) if targets else pa.table({})
    found = {int(p): (int(n), float(z), str(i)) for p, n, z, i in zip(
        *(picked[c].to_pylist() for c in ("position", _NULL, _Z, "id")))} if picked.num_rows else {}
    rounds, k = cumulative.shape
    null = np.zeros((rounds, k), dtype=np.int8)
    z = np.zeros((rounds, k), dtype=np.float64)
    ids = [["" for _ in range(k)] for _ in range(rounds)]
    for r in range(rounds):
        for j in range(k):
            c = int(cumulative[r, j])
            if c > 0:
                null[r, j], z[r, j], ids[r][j] = found[int(starts[j] + c - 1)]
    return {"count": cumulative.astype(np.int64), "null": null, "z": z, "id": ids}


def round_of(table: pa.Table, key: str, cluster: str, labels: list[Any], higher_is_better: bool, temperature: float,
             seed: int, cuts: dict[str, Any]) -> np.ndarray:
    """Per row: the first round (1-based) whose cut it ranks at or before; 0 = never selected."""
    null, z, _ = row_keys(table, key, 1.0 if higher_is_better else -1.0, temperature, seed)
    g = cluster_index(table, cluster, labels)
    ids = table["id"]
    rounds = cuts["count"].shape[0]
    out = np.zeros(table.num_rows, dtype=np.int32)
    for r in range(rounds - 1, -1, -1):  # the earliest round that holds the row wins
        count = cuts["count"][r][g]
        cut_null, cut_z = cuts["null"][r][g], cuts["z"][r][g]
        cut_id = pa.array(np.asarray(cuts["id"][r], dtype=object)[g], pa.string())
        same = (null == cut_null) & (z == cut_z)
        id_le = pc.less_equal(pc.cast(ids, pa.string()), cut_id).to_numpy(zero_copy_only=False)
        before = (null < cut_null) | ((null == cut_null) & (z > cut_z)) | (same & id_le)
        out[(count > 0) & before] = r + 1
    return out


def _mark(table: pa.Table, key: str, cluster: str, labels: list[Any], higher_is_better: bool, temperature: float,
          seed: int, cuts: dict[str, Any]) -> pa.Table:
    selected = round_of(table, key, cluster, labels, higher_is_better, temperature, seed, cuts) > 0
    reason = pa.array(np.where(selected, None, UNSELECTED), pa.string())
    if "_drop_reason" in table.column_names:
        table = table.drop_columns(["_drop_reason"])
    return table.append_column("_drop_reason", reason)


def _block_stats(table: pa.Table, starts: np.ndarray, cumulative: np.ndarray) -> pa.Table:
    g = table[_G].to_numpy()
    inside = table["position"].to_numpy() - starts[g]
    # round index of each row: how many cumulative cuts it lies beyond (= rounds when unselected)
    round_index = (inside[None, :] >= cumulative[:, g]).sum(axis=0)
    q = table[_Q].to_numpy(zero_copy_only=False)
    has = ~np.isnan(q)
    frame = pa.table({"g": pa.array(g, pa.int32()), "round": pa.array(round_index, pa.int32()),
                      "q": pa.array(np.where(has, q, 0.0)), "has": pa.array(has.astype(np.int64))})
    out = frame.group_by(["g", "round"], use_threads=False).aggregate([([], "count_all"), ("q", "sum"), ("has", "sum")])
    return pa.table({"g": out["g"], "round": out["round"], "rows": out["count_all"], "q_sum": out["q_sum"],
                     "q_rows": out["has_sum"]})


def cluster_stats(ranked: ray.data.Dataset, starts: np.ndarray, cumulative: np.ndarray) -> np.ndarray:
    """Per cluster and round index (0 … rounds; the last = not selected): [rows, key sum, rows with a key]."""
    cumulative = np.atleast_2d(cumulative)
    rounds, k = cumulative.shape
    out = np.zeros((k, rounds + 1, 3))
    parts = collect_summaries(ranked.select_columns([_G, _Q, "position"]).map_batches(
        _block_stats, batch_format="pyarrow", batch_size=None, fn_kwargs={"starts": starts, "cumulative": cumulative}))
    for g, r, rows, q_sum, q_rows in zip(*(parts[c].to_pylist() for c in ("g", "round", "rows", "q_sum", "q_rows"))
                                         ) if parts.num_rows else []:
        out[g, r] += (rows, q_sum, q_rows)
    return out


def mean_or_none(total: float, rows: float) -> float | None:
    return round(float(total / rows), 6) if rows else None


def check_columns(ds: ray.data.Dataset, input_columns: list[str], key: str, cluster: str, what: str) -> None:
    """The key must be numeric and the cluster column integers, strings or booleans."""
    for column in (key, cluster):
        if column not in input_columns:
            raise StageError(f"{what}: column {column!r} does not exist (columns: {input_columns})")
    schema = ds.schema()
    if schema is None:
        return
    base = schema.base_schema
    kt, ct = base.field(key).type, base.field(cluster).type
    if not (pa.types.is_integer(kt) or pa.types.is_floating(kt) or pa.types.is_boolean(kt) or pa.types.is_decimal(kt)):
        raise StageError(f"{what}: key {key!r} must be numeric; it has type {kt}")
    if not (pa.types.is_integer(ct) or pa.types.is_string(ct) or pa.types.is_large_string(ct) or pa.types.is_boolean(ct)):
        raise StageError(f"{what}: cluster column {cluster!r} has type {ct}; it must hold integers or strings")


# --------------------------------------------------------------------------- the stage


class KMQStage(Stage):
    name: ClassVar[str] = "kmq"
    Params = KMQParams
    columns: ClassVar[tuple[str, ...]] = ()

    def requires(self) -> list[str]:
        return list(dict.fromkeys([self.params.key, self.params.cluster]))

    def may_drop(self) -> bool:
        return True

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        check_columns(ds, ctx.input_columns, p.key, p.cluster, "kmq")
        narrow = narrow_input(ds, p.key, p.cluster)
        labels, sizes = count_clusters(narrow, p.cluster)
        rows = int(sizes.sum())
        total = budget_rows(p.budget, rows)
        names = [label_text(v) for v in labels]
        unknown = sorted(set(p.weights or {}) - set(names))
        if unknown:
            raise StageError(f"kmq: weights name cluster(s) {unknown[:10]} that the {p.cluster!r} column does not hold")
        weights = np.array([(p.weights or {}).get(n, 1.0) for n in names], dtype=np.float64)
        lower = minimums(sizes, total, p.min_per_cluster)
        budgets = allocate(total, sizes, weights, lower=lower)
        ranked = rank_in_clusters(narrow, p.key, p.cluster, labels, p.higher_is_better, p.temperature, seed)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        cuts = cut_rows(ranked, starts, budgets[None, :])
        stats = cluster_stats(ranked, starts, budgets[None, :])
        ctx.info.update(self._info(p, seed, names, sizes, weights, budgets, stats, lower))
        return ds.map_batches(_mark, batch_format="pyarrow", fn_kwargs={
            "key": p.key, "cluster": p.cluster, "labels": labels, "higher_is_better": p.higher_is_better,
            "temperature": p.temperature, "seed": seed, "cuts": cuts})

    @staticmethod
    def _info(p: KMQParams, seed: int, names: list[str], sizes: np.ndarray, weights: np.ndarray, budgets: np.ndarray,
              stats: np.ndarray, lower: np.ndarray) -> dict[str, Any]:
        rows, total = int(sizes.sum()), int(budgets.sum())
        selected, everything = stats[:, 0, :], stats.sum(axis=1)
        info: dict[str, Any] = {
            "method": "kMQ (Yu et al. 2024): budgets ∝ cluster size × weight (largest remainder), softmax(key / T) "
                      "sampling without replacement inside each cluster by Gumbel-top-k",
            "key": p.key, "higher_is_better": p.higher_is_better, "temperature": p.temperature, "cluster": p.cluster,
            "seed": seed, "budget": p.budget, "rows": rows, "selected": int(selected[:, 0].sum()), "budget_rows": total,
            "clusters": len(names), "min_per_cluster": p.min_per_cluster, "minimum_applied": bool(lower.any()),
            "weighted": p.weights is not None, "null_key_rows": int(everything[:, 0].sum() - everything[:, 2].sum()),
            "mean_key": mean_or_none(everything[:, 1].sum(), everything[:, 2].sum()),
            "mean_key_selected": mean_or_none(selected[:, 1].sum(), selected[:, 2].sum()),
        }
        if len(names) <= MAX_CLUSTER_DETAIL:
            info["per_cluster"] = [
                {"cluster": n, "size": int(s), "weight": round(float(w), 6), "budget": int(b), "selected": int(sel[0]),
                 "mean_key": mean_or_none(a[1], a[2]), "mean_key_selected": mean_or_none(sel[1], sel[2])}
                for n, s, w, b, sel, a in zip(names, sizes, weights, budgets, selected, everything)]
        else:
            info["per_cluster_omitted"] = f"{len(names)} clusters (more than {MAX_CLUSTER_DETAIL})"
        return info
