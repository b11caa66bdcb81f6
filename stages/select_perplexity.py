"""Select documents by perplexity: keep the lowest, middle or highest ``keep`` fraction.

Ankner et al. (ICLR 2025) select by reference-LM perplexity with a *low*, *medium* or *high*
rule (the best rule depends on the data set); POINTS (2024) keeps the lowest 20%
(``preset: points``). Rows are ranked by (``column``, ``id``), a total order. Up to
``sample_size`` scored rows the cut points are exact; above, they come from a seeded hashed
sample. Rows are not filtered but marked in ``_drop_reason``: the runner stores them under the
stage's ``dropped/`` folder and counts them by reason, so a re-selection needs no rescoring.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from pydantic import Field, model_validator

from pipeline.core.errors import StageError
from pipeline.core.sampling import hashed_sample
from stages.base import Stage, StageContext, StageParams

PRESETS: dict[str, dict[str, Any]] = {"points": {"rule": "low", "keep": 0.2}}
_SALT = "select_perplexity.sample"


class SelectPerplexityParams(StageParams):
    name: Literal["select_perplexity"] = "select_perplexity"
    preset: Literal["points"] | None = Field(None, description="points: rule low, keep 0.2 (POINTS, 2024).")
    rule: Literal["low", "medium", "high"] = Field("low", description="Which part of the ranking to keep.")
    keep: float = Field(0.5, gt=0, le=1, description="Fraction of the scored rows to keep.")
    column: str = Field("ppl", min_length=1, description="The score to rank by (ppl, nll or any numeric column).")
    nulls: Literal["drop", "keep"] = Field("drop", description="Rows without a score: drop (counted) or keep.")
    sample_size: int = Field(200_000, ge=100, description="Exact cut points up to this many scored rows; "
                             "above it, quantiles of a hashed sample of about this size.")
    seed: int | None = Field(None, ge=0, description="Seed of the hashed sample; defaults to run.seed.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = PRESETS.get(data["preset"])
            if preset is not None:
                clash = [k for k in preset if k in data and data[k] != preset[k]]
                if clash:
                    raise ValueError(f"preset {data['preset']!r} sets {preset}; do not also give {clash}")
                data = {**data, **preset}
        return data


def _valid(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.invert(pc.is_null(column, nan_is_null=True))


def _after(values: pa.ChunkedArray, ids: pa.ChunkedArray, cut: tuple[float, str], inclusive: bool) -> pa.Array:
    """(value, id) > cut, or >= cut when ``inclusive``, per row."""
    value, doc_id = cut
    tie = pc.and_(pc.equal(values, value), (pc.greater_equal if inclusive else pc.greater)(ids, doc_id))
    return pc.or_(pc.greater(values, value), tie)


def _mark(table: pa.Table, column: str, low: tuple[float, str] | None, high: tuple[float, str] | None,
          nulls: str) -> pa.Table:
    values, ids = table[column], table["id"]
    valid = _valid(values)
    reason = pa.nulls(table.num_rows, pa.string())
    if high is not None:  # drop rows ranked after the upper cut point
        reason = pc.if_else(pc.and_(valid, _after(values, ids, high, inclusive=False)),
                            f"select_perplexity.{column}_too_high", reason)
    if low is not None:  # drop rows ranked before the lower cut point
        reason = pc.if_else(pc.and_(valid, pc.invert(_after(values, ids, low, inclusive=True))),
                            f"select_perplexity.{column}_too_low", reason)
    if nulls == "drop":
        reason = pc.if_else(valid, reason, "select_perplexity.no_score")
    if "_drop_reason" in table.column_names:
        table = table.drop_columns(["_drop_reason"])
    return table.append_column("_drop_reason", reason)


def cut_points(ranked: list[tuple[float, str]], rule: str, keep: float) -> tuple[tuple[float, str] | None,
                                                                                   tuple[float, str] | None, int]:
    """(lower cut, upper cut, kept) for a list of (value, id) sorted ascending; cuts are inclusive."""
    m = len(ranked)
    k = min(m, max(1, int(keep * m + 0.5))) if m else 0
    if k == 0 or k == m:
        return None, None, m
    if rule == "low":
        return None, ranked[k - 1], k
    if rule == "high":
        return ranked[m - k], None, k
    start = (m - k) // 2
    return ranked[start], ranked[start + k - 1], k


class SelectPerplexityStage(Stage):
    name: ClassVar[str] = "select_perplexity"
    Params = SelectPerplexityParams
    columns: ClassVar[tuple[str, ...]] = ()

    def requires(self) -> list[str]:
        return [self.params.column]

    def may_drop(self) -> bool:
        return True

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        if p.column not in ctx.input_columns:
            raise StageError(f"select_perplexity: column {p.column!r} does not exist (columns: {ctx.input_columns}); "
                             "run the perplexity stage first")
        seed = ctx.seed if p.seed is None else p.seed
        column = p.column
        sample = hashed_sample(ds, p.sample_size + 1, seed, _SALT, [column],
                               eligible=lambda table: _valid(table[column]).to_numpy(zero_copy_only=False))
        exact = sample.num_rows <= p.sample_size  # the draw found no more scored rows than this: all of them
        if exact:
            scored = sample.num_rows
        else:
            sample = sample.slice(0, p.sample_size)
            scored = ds.select_columns([column]).map_batches(
                lambda t: t.filter(_valid(t[column])), batch_format="pyarrow").count()
        ranked = sorted(zip(sample[column].to_pylist(), sample["id"].to_pylist()))
        ranked = [(float(value), str(doc_id)) for value, doc_id in ranked]
        low, high, kept = cut_points(ranked, p.rule, p.keep)
        ctx.info.update({
            "rule": p.rule, "keep": p.keep, "column": p.column, "scored_rows": scored,
            "exact": exact, "sample_rows": len(ranked),
            "expected_kept": kept if exact else int(round(kept / max(1, len(ranked)) * scored)),
            "lower_cut": None if low is None else {"value": low[0], "id": low[1]},
            "upper_cut": None if high is None else {"value": high[0], "id": high[1]},
            "value_range_kept": _kept_range(ranked, low, high),
        })
        return ds.map_batches(_mark, batch_format="pyarrow",
                              fn_kwargs={"column": p.column, "low": low, "high": high, "nulls": p.nulls})


def _kept_range(ranked: list[tuple[float, str]], low, high) -> list[float] | None:
    if not ranked:
        return None
    values = np.array([v for v, _ in ranked])
    return [float(low[0]) if low else float(values.min()), float(high[0]) if high else float(values.max())]
