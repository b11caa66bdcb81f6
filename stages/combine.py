"""A composite quality score: each signal -> percentile rank with its direction -> weighted means.

Perplexity (Ankner et al., ICLR 2025) ranks repetitive junk as fluent, a DCLM-style classifier
(Li et al., 2024) knows only "looks like the positives", and the rule columns of the quality
stage miss word salad: each family is blind where another sees. Each term becomes a mid-rank
percentile (exact up to ``sample_size`` rows, else against a seeded hashed sample); terms are
averaged inside their group, and groups are combined by a weighted geometric mean (``mean``), so a
document must be acceptable to every family. Writes ``into`` (default ``quality``, higher is
better) for the quality-ascending curricula of Luo et al. (ICLR 2026). ``RECIPE`` is the default
set of terms; the method, the recipe and how it was chosen: docs/methods.md §5.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core.errors import StageError
from pipeline.core.sampling import hashed_sample
from stages.base import Stage, StageContext, StageParams


class Term(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str = Field(..., min_length=1)
    higher_is_better: bool = True
    weight: float = Field(1.0, gt=0)
    group: str | None = Field(None, description="Terms of one group are averaged first; default: the term alone.")

    @property
    def group_name(self) -> str:
        return self.group if self.group is not None else self.column


# column -> (higher_is_better, weight, group): the project's recommended recipe (see the module docstring).
_LINES = {"c4_line_punct_ratio": True, "fineweb_line_punct_ratio": True, "short_line_ratio": False}
_CHARACTERS = {"alpha_ratio": True, "symbol_ratio": False}
_REPETITION = dict.fromkeys(("dup_line_char_ratio", "dup_para_char_ratio", "top_2gram_ratio", "top_3gram_ratio",
                             "top_4gram_ratio", "dup_5gram_ratio", "dup_10gram_ratio"), False)
_MARKERS = dict.fromkeys(("curly_brackets", "hash_word_ratio", "bullet_line_ratio", "newline_word_ratio"), False)
RECIPE: dict[str, tuple[bool, float, str]] = {
    "ppl": (False, 1.0, "perplexity"),
    "quality_clf": (True, 1.0, "classifier"),
    **{column: (higher, share / len(part), "heuristics")
       for part, share in ((_CHARACTERS, 0.2), (_REPETITION, 0.2), (_LINES, 0.4), (_MARKERS, 0.2))
       for column, higher in part.items()},
}


class CombineParams(StageParams):
    name: Literal["combine"] = "combine"
    into: str = Field("quality", min_length=1, description="The column to write; higher is better.")
    terms: list[Term] | None = Field(
        None, description="[{column, higher_is_better, weight, group}]; null = the recommended recipe over the "
        "signals present."
    )
    mean: Literal["geometric", "arithmetic"] = Field(
        "geometric", description="How group scores are combined: weighted geometric (every family must agree) "
        "or arithmetic mean. Terms inside a group are always averaged arithmetically."
    )
    nulls: Literal["worst", "skip-term"] = Field(
        "worst", description="A missing term value: the worst percentile (0), or left out of that row's mean."
    )
    sample_size: int = Field(
        200_000, ge=10,
        description="Exact ranks up to this many rows; above, ranks against a hashed sample of this size."
    )
    seed: int | None = Field(None, ge=0, description="Seeds the rank sample; defaults to run.seed.")

    @field_validator("terms")
    @classmethod
    def _terms(cls, terms: list[Term] | None) -> list[Term] | None:
        if terms is not None:
            if not terms:
                raise ValueError("terms is empty: list at least one {column: ...}, or leave terms out for the recipe")
            columns = [t.column for t in terms]
            repeated = sorted({c for c in columns if columns.count(c) > 1})
            if repeated:
                raise ValueError(f"column(s) {repeated} appear in more than one term")
        return terms

    @field_validator("into")
    @classmethod
    def _into(cls, into: str) -> str:
        if into.startswith("_") or into in ("id", "text", "position"):
            raise ValueError(f"into {into!r} is reserved (internal '_' columns and id/text/position)")
        return into


def recipe_terms(columns: list[str]) -> list[Term]:
    """The recommended recipe restricted to the ``columns`` that exist."""
    return [Term(column=c, higher_is_better=h, weight=w, group=g) for c, (h, w, g) in RECIPE.items() if c in columns]


def _values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """float64 values with NaN for null (and NaN) entries."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(pc.fill_null(column.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False),
                      dtype=np.float64)


def percentile_ranks(values: np.ndarray, reference: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Mid-rank percentile of each value against the sorted, NaN-free ``reference``; NaN stays NaN.

    (#reference below + ½ #reference equal) / m, kept in [0.5/m, 1 − 0.5/m]; 1 − that when lower
    is better. Against the column itself (exact ranks) the clip changes nothing.
    """
    out = np.full(values.shape, np.nan)
    valid = ~np.isnan(values)
    if reference.size == 0 or not valid.any():
        return out
    v = values[valid]
    m = reference.size
    p = (np.searchsorted(reference, v, "left") + np.searchsorted(reference, v, "right")) / (2.0 * m)
    p = np.clip(p, 0.5 / m, 1.0 - 0.5 / m)
    out[valid] = p if higher_is_better else 1.0 - p
    return out


def _weighted_mean(scores: np.ndarray, weights: np.ndarray, nulls: str, geometric: bool) -> np.ndarray:
    """Row-wise weighted mean of ``scores`` (terms x rows; NaN = missing) under the null policy."""
    missing = np.isnan(scores)
    filled = np.where(missing, 0.0, scores)
    w = np.broadcast_to(weights[:, None], scores.shape)
    if nulls == "skip-term":
        w = np.where(missing, 0.0, w)
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if geometric:  # a zero score (a missing term under 'worst') makes the row 0: the worst
            logs = np.where(w > 0, np.log(filled), 0.0)
            mean = np.exp((logs * w).sum(axis=0) / total)
        else:
            mean = (filled * w).sum(axis=0) / total
    return np.where(total > 0, mean, np.nan)


def combine_scores(ranks: list[np.ndarray], weights: list[float], nulls: str, groups: list[str] | None = None,
                   mean: str = "arithmetic") -> np.ndarray:
    """The composite from per-term percentiles (NaN = missing): arithmetic means inside groups, then
    the ``mean`` across groups, each group weighted by the sum of its terms' weights."""
    groups = groups or [str(i) for i in range(len(ranks))]
    w = np.asarray(weights, dtype=np.float64)
    names = list(dict.fromkeys(groups))
    group_scores, group_weights = [], []
    for name in names:
        members = [i for i, g in enumerate(groups) if g == name]
        group_scores.append(_weighted_mean(np.vstack([ranks[i] for i in members]), w[members], nulls, False))
        group_weights.append(w[members].sum())
    return _weighted_mean(np.vstack(group_scores), np.asarray(group_weights), nulls, mean == "geometric")


def _combine_batch(table: pa.Table, terms: list[dict[str, Any]], references: Any, nulls: str, into: str,
                   mean: str) -> pa.Table:
    if isinstance(references, ray.ObjectRef):
        references = ray.get(references)
    ranks = [percentile_ranks(_values(table[t["column"]]), ref, t["higher_is_better"])
             for t, ref in zip(terms, references)]
    score = (combine_scores(ranks, [t["weight"] for t in terms], nulls, [t["group"] for t in terms], mean)
             if table.num_rows else np.zeros(0))
    if into in table.column_names:
        table = table.drop_columns([into])
    return table.append_column(into, pa.array(score, pa.float64(), mask=np.isnan(score)))


def _null_counts(table: pa.Table, columns: list[str]) -> pa.Table:
    return pa.table({f"_null_{i}": [int(np.isnan(_values(table[c])).sum())] for i, c in enumerate(columns)})


def _collect(ds: ray.data.Dataset) -> pa.Table | None:
    """A small dataset's rows as one table in the driver (callers bound its size)."""
    refs = ds.to_arrow_refs()
    return pa.concat_tables(ray.get(refs)) if refs else None


class CombineStage(Stage):
    name: ClassVar[str] = "combine"
    Params = CombineParams
    version: ClassVar[int] = 2  # 2: the recipe over the Gopher, C4 and FineWeb rule columns

    def __init__(self, params: CombineParams) -> None:
        super().__init__(params)
        self.columns = (params.into,)  # type: ignore[misc] - the added column is a parameter

    def requires(self) -> list[str]:
        return [t.column for t in self.params.terms] if self.params.terms else []

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        terms = p.terms or recipe_terms(ctx.input_columns)
        if not terms:
            raise StageError(f"combine: no terms given and none of the recipe's signals {sorted(RECIPE)} exist; "
                             f"add a quality / perplexity / quality_classifier stage before it, or list terms "
                             f"(columns: {ctx.input_columns})")
        columns = [t.column for t in terms]
        missing = [c for c in columns if c not in ctx.input_columns]
        if missing:
            raise StageError(f"combine: term column(s) {missing} do not exist (columns: {ctx.input_columns})")
        schema = ds.schema()
        types = dict(zip(schema.names, schema.types)) if schema is not None else {}
        for c in columns:
            t = types.get(c)
            if isinstance(t, pa.DataType) and not (pa.types.is_integer(t) or pa.types.is_floating(t)
                                                   or pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise StageError(f"combine: term column {c!r} is {t}, not numeric")

        n_rows = ds.count()  # parquet metadata: no pass over the data
        exact = n_rows <= p.sample_size
        if exact:  # small: every value comes to the driver (bounded by sample_size), nulls counted there
            table = _collect(ds.select_columns(["id", *columns]))
            nulls = {c: int(np.isnan(_values(table[c])).sum()) if table is not None else 0 for c in columns}
        else:
            table = hashed_sample(ds, p.sample_size, seed, "combine.ranks", columns)
            sums = ds.select_columns(columns).map_batches(
                _null_counts, batch_format="pyarrow", fn_kwargs={"columns": columns}
            ).sum([f"_null_{i}" for i in range(len(columns))])
            sums = sums if isinstance(sums, dict) else {"sum(_null_0)": sums}
            nulls = {c: int(sums.get(f"sum(_null_{i})") or 0) for i, c in enumerate(columns)}
        references = []
        for c in columns:
            v = _values(table[c]) if table is not None and table.num_rows else np.zeros(0)
            references.append(np.sort(v[~np.isnan(v)]))

        ctx.info.update(
            into=p.into, mean=p.mean, nulls=p.nulls, exact_ranks=exact,
            rank_sample=int(table.num_rows if table is not None else 0),
            recipe=p.terms is None, null_counts=nulls,
            terms=[{"column": t.column, "higher_is_better": t.higher_is_better, "weight": t.weight,
                    "group": t.group_name} for t in terms],
        )
        return ds.map_batches(
            _combine_batch, batch_format="pyarrow",
            fn_kwargs={"terms": [{**t.model_dump(), "group": t.group_name} for t in terms],
                       "references": ray.put(references), "nulls": p.nulls, "into": p.into, "mean": p.mean},
        )
