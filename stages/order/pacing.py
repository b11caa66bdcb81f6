"""Difficulty pacing, materialized as an explicit training sequence (the order stage's ``pacing``).

DeepSpeed Data Efficiency's ``fixed_linear``, ``fixed_root`` and ``fixed_discrete`` and the
competence functions ``sqrt`` and ``p`` of Platanios et al. (NAACL 2019). A row's difficulty is
its percentile along the curriculum order; the batch of step s is drawn uniformly, without
replacement within the batch, from the rows with percentile ≤ d(s). Draws are generated in
fixed windows of steps from seeded generators, so any worker can regenerate the draws that land
on its ranks. Formulas and conventions: docs/methods.md §6.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.base import variant_params
from stages.order.repeats import DROP_REASON, TIMES, expand

FUNCTIONS = ("fixed_linear", "fixed_root", "fixed_discrete", "sqrt", "p")
_FUNCTION_KEYS: dict[str, tuple[str, ...]] = {
    "fixed_linear": ("min_difficulty", "max_difficulty", "difficulty_step", "total_curriculum_step"),
    "fixed_root": ("min_difficulty", "max_difficulty", "difficulty_step", "total_curriculum_step", "root_degree"),
    "fixed_discrete": ("difficulty", "max_step"),
    "sqrt": ("initial_competence", "total_curriculum_step"),
    "p": ("initial_competence", "p", "total_curriculum_step"),
}
_FUNCTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "fixed_linear": {"min_difficulty": 0.01, "max_difficulty": 1.0},
    "fixed_root": {"min_difficulty": 0.01, "max_difficulty": 1.0, "root_degree": 2.0},
    "fixed_discrete": {},
    "sqrt": {"initial_competence": 0.01},
    "p": {"initial_competence": 0.01, "p": 2.0},
}
_WINDOW_DRAWS = 1 << 16  # draws per generator window: bounds a worker's memory, fixes the streams
_SALT = 0x7061636B  # "pack": separates the pacing streams from any other use of the seed


class PacingSchedule(BaseModel):
    """The pacing function and its parameters (fractions of the curriculum, not percent)."""

    model_config = ConfigDict(extra="forbid")
    function: Literal["fixed_linear", "fixed_root", "fixed_discrete", "sqrt", "p"] = "fixed_linear"
    min_difficulty: float | None = Field(None, gt=0, le=1, description="fixed_*: d(0), a fraction in (0, 1].")
    max_difficulty: float | None = Field(None, gt=0, le=1, description="fixed_*: the final difficulty.")
    root_degree: float | None = Field(None, gt=0, description="fixed_root: the root of s/T.")
    difficulty_step: float | None = Field(None, gt=0, le=1, description="fixed_*: round d(s) down to a multiple.")
    total_curriculum_step: int | None = Field(
        None, ge=1, description="Step at which d reaches its maximum; default: the last step."
    )
    difficulty: list[float] | None = Field(None, min_length=1, description="fixed_discrete: the difficulties.")
    max_step: list[int] | None = Field(None, description="fixed_discrete: the last step of each difficulty but the final.")
    initial_competence: float | None = Field(None, gt=0, le=1, description="sqrt / p: c0.")
    p: float | None = Field(None, gt=0, description="p: the power of the competence function.")

    @model_validator(mode="before")
    @classmethod
    def _keys_for_function(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        function = data.get("function", "fixed_linear")
        if function not in _FUNCTION_KEYS:
            return data  # the Literal reports the allowed functions
        allowed = _FUNCTION_KEYS[function]
        wrong, filled = variant_params(data, cls.model_fields, allowed, _FUNCTION_DEFAULTS[function],
                                       always=("function",))
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: not a parameter of pacing function {function!r} "
                f"(its parameters: {', '.join(allowed)}; functions: {', '.join(FUNCTIONS)})"
            )
        return filled

    @model_validator(mode="after")
    def _consistent(self) -> "PacingSchedule":
        if self.function in ("fixed_linear", "fixed_root"):
            assert self.min_difficulty is not None and self.max_difficulty is not None
            if self.min_difficulty > self.max_difficulty:
                raise ValueError(f"min_difficulty ({self.min_difficulty}) must not exceed max_difficulty ({self.max_difficulty})")
        if self.function == "fixed_discrete":
            if not self.difficulty:
                raise ValueError("difficulty: pacing function 'fixed_discrete' needs difficulty, a list of fractions "
                                 "in (0, 1], and max_step, the last step of each but the final one")
            bad = [d for d in self.difficulty if not 0 < d <= 1]
            if bad:
                raise ValueError(f"difficulty: values must be fractions in (0, 1] (got {bad}; percent? divide by 100)")
            steps = self.max_step or []
            if len(steps) != len(self.difficulty) - 1:
                raise ValueError(f"max_step: needs len(difficulty) - 1 = {len(self.difficulty) - 1} entries "
                                 f"(got {len(steps)})")
            if any(b <= a for a, b in zip(steps, steps[1:])) or any(s < 0 for s in steps):
                raise ValueError(f"max_step: must be non-negative and strictly increasing (got {steps})")
        return self


def window_steps(batch_size: int) -> int:
    """Steps per generator window: a function of the params only, never of the data layout."""
    return max(1, _WINDOW_DRAWS // batch_size)


def difficulty(schedule: PacingSchedule, steps: np.ndarray, curriculum_steps: int) -> np.ndarray:
    """d(s) in (0, 1] for each step in ``steps`` (counted from 0)."""
    s = np.asarray(steps, dtype=np.float64)
    total = float(schedule.total_curriculum_step or curriculum_steps)
    progress = np.minimum(1.0, s / max(1.0, total))
    f = schedule.function
    if f in ("fixed_linear", "fixed_root"):
        lo, hi = float(schedule.min_difficulty), float(schedule.max_difficulty)  # type: ignore[arg-type]
        degree = 1.0 if f == "fixed_linear" else float(schedule.root_degree)  # type: ignore[arg-type]
        d = lo + (hi - lo) * progress ** (1.0 / degree)
        if schedule.difficulty_step:
            # DeepSpeed: next_difficulty -= next_difficulty % difficulty_step (the epsilon absorbs
            # float error), but never below min_difficulty, so rounding cannot empty the pool.
            step = float(schedule.difficulty_step)
            d = np.maximum(lo, np.floor(d / step + 1e-9) * step)
        return np.minimum(d, hi)
    if f == "fixed_discrete":
        values = np.asarray(schedule.difficulty, dtype=np.float64)
        bounds = np.asarray(schedule.max_step or [], dtype=np.float64)
        return values[np.searchsorted(bounds, s, side="left")]
    c0 = float(schedule.initial_competence)  # type: ignore[arg-type]
    power = 2.0 if f == "sqrt" else float(schedule.p)  # type: ignore[arg-type]
    return np.minimum(1.0, (progress * (1.0 - c0**power) + c0**power) ** (1.0 / power))


def pool_sizes(d: np.ndarray, n: int) -> np.ndarray:
    """K(s): how many ranks r have percentile (r + 1) / n ≤ d(s), computed exactly in float64."""
    d = np.asarray(d, dtype=np.float64)
    k = np.floor(d * n).astype(np.int64)
    k = np.where((k + 1) / n <= d, k + 1, k)  # float error below the boundary
    k = np.where((k > 0) & (k / n > d), k - 1, k)  # float error above it
    return np.clip(k, 0, n)


@dataclass(frozen=True)
class PacingPlan:
    """Everything the draws depend on; small enough to ship to every worker."""

    n: int
    total_samples: int
    batch_size: int
    schedule: PacingSchedule
    seed: int

    @property
    def steps(self) -> int:
        return -(-self.total_samples // self.batch_size)

    @property
    def curriculum_steps(self) -> int:
        return max(1, self.steps - 1)

    @property
    def window(self) -> int:
        return window_steps(self.batch_size)

    @property
    def windows(self) -> int:
        return -(-self.steps // self.window)

    def difficulty(self, steps: np.ndarray) -> np.ndarray:
        return difficulty(self.schedule, steps, self.curriculum_steps)

    def pool(self, steps: np.ndarray) -> np.ndarray:
        return pool_sizes(self.difficulty(steps), self.n)

    def smallest_pool(self) -> int:
        """The smallest K(s) over the run (the schedules are monotone except fixed_discrete)."""
        if self.schedule.function == "fixed_discrete":
            used = np.unique(np.asarray(self.schedule.max_step or [], dtype=np.int64).clip(0, self.steps - 1))
            candidates = np.concatenate([[0, self.steps - 1], used, np.minimum(used + 1, self.steps - 1)])
            return int(self.pool(candidates).min())
        return int(self.pool(np.array([0, self.steps - 1])).min())

    def window_pool(self, w: int) -> np.ndarray:
        return self.pool(np.arange(w * self.window, min(self.steps, (w + 1) * self.window)))

    def draws(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, slot, rank) of every draw in window ``w``, from that window's own generator."""
        first = w * self.window
        steps = np.arange(first, min(self.steps, first + self.window), dtype=np.int64)
        pools = self.pool(steps)
        b = self.batch_size
        rng = np.random.default_rng([self.seed, _SALT, w])
        ranks = np.empty((len(steps), b), dtype=np.int64)
        small = pools < 2 * b
        for i in np.flatnonzero(small):  # rare: tiny pools early on; exact draws one step at a time
            k = int(pools[i])
            if k >= b:
                ranks[i] = rng.choice(k, b, replace=False)
            else:
                whole, rest = divmod(b, k)
                ranks[i] = rng.permutation(np.concatenate([np.tile(np.arange(k), whole), rng.choice(k, rest, replace=False)]))
        big = np.flatnonzero(~small)
        if len(big):
            ranks[big] = _distinct_rows(rng, pools[big], b)
        sizes = np.full(len(steps), b, dtype=np.int64)
        if len(steps) and steps[-1] == self.steps - 1:
            sizes[-1] = self.total_samples - (self.steps - 1) * b
        keep = np.arange(b)[None, :] < sizes[:, None]  # a prefix of a uniform draw is a uniform draw
        slot = np.broadcast_to(np.arange(b, dtype=np.int64), ranks.shape)
        return np.broadcast_to(steps[:, None], ranks.shape)[keep], slot[keep], ranks[keep]

    def draws_from(self, lowest_rank: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The windows' draws, skipping windows whose pools never reach ``lowest_rank``."""
        for w in range(self.windows):
            if int(self.window_pool(w).max(initial=0)) > lowest_rank:
                yield self.draws(w)

    def curve(self, points: int = 101) -> list[dict[str, float]]:
        """d(s) and the pool size at evenly spaced steps, plus every step where the pool changes
        for ``fixed_discrete``; for the manifest and the report."""
        steps = np.unique(np.linspace(0, self.steps - 1, min(points, self.steps)).round().astype(np.int64))
        if self.schedule.function == "fixed_discrete":
            bounds = np.asarray(self.schedule.max_step or [], dtype=np.int64)
            steps = np.unique(np.concatenate([steps, bounds[bounds < self.steps], (bounds + 1)[bounds + 1 < self.steps]]))
        d = self.difficulty(steps)
        return [{"step": int(s), "difficulty": round(float(x), 6), "pool_rows": int(k)}
                for s, x, k in zip(steps, d, pool_sizes(d, self.n))]


def _distinct_rows(rng: np.random.Generator, pools: np.ndarray, b: int) -> np.ndarray:
    """One row of ``b`` distinct uniform draws from ``range(pools[i])`` per i (every pool ≥ 2b).

    Draw with replacement, then redraw the later copy of every repeated value until none is
    left. The procedure treats all values alike, so each ordered sample of distinct values is
    equally likely: exactly uniform sampling without replacement, vectorized across steps.
    """
    draws = rng.integers(0, pools[:, None], size=(len(pools), b))
    while True:
        order = np.argsort(draws, axis=1, kind="stable")
        ordered = np.take_along_axis(draws, order, axis=1)
        repeated_sorted = np.zeros(ordered.shape, dtype=bool)
        repeated_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        if not repeated_sorted.any():
            return draws
        repeated = np.zeros_like(repeated_sorted)
        np.put_along_axis(repeated, order, repeated_sorted, axis=1)
        rows = np.nonzero(repeated)[0]
        draws[repeated] = rng.integers(0, pools[rows])


def expand_block(table: pa.Table, plan: PacingPlan, rank_column: str, unshown: str | None = None) -> pa.Table:
    """Every draw that lands on one of this block's ranks, as a row with ``step`` and ``_slot``.

    The block regenerates the windows whose pools reach its lowest rank and keeps the draws on
    its own ranks, so no draw list ever passes through the driver or a shuffle. With ``unshown``
    (a drop reason), the block's rows that no step draws follow once each, with that reason in
    ``_drop_reason`` (null for the drawn rows), null ``step`` and ``repeat``, and ``_times`` 0.
    """
    ranks = table[rank_column].to_numpy()
    order = np.argsort(ranks, kind="stable")
    held = ranks[order]
    rows, steps, slots = [], [], []
    if len(held):
        lo, hi = int(held[0]), int(held[-1])
        for step, slot, rank in plan.draws_from(lo):
            hit = (rank >= lo) & (rank <= hi)
            if not hit.any():
                continue
            wanted = rank[hit]
            at = np.searchsorted(held, wanted)
            mine = held[np.minimum(at, len(held) - 1)] == wanted
            rows.append(order[at[mine]])
            steps.append(step[hit][mine])
            slots.append(slot[hit][mine])
    source = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    step_all = np.concatenate(steps) if steps else np.zeros(0, np.int64)
    slot_all = np.concatenate(slots) if slots else np.zeros(0, np.int64)
    drawn = expand(table, source, occurrence=[step_all, slot_all],
                   extra={"step": pa.array(step_all, pa.int64()), "_slot": pa.array(slot_all, pa.int64())})
    if unshown is None:
        return drawn
    idle = np.flatnonzero(np.bincount(source, minlength=table.num_rows) == 0)
    none = pa.nulls(len(idle), pa.int64())
    never = expand(table, idle, occurrence=[np.zeros(len(idle))], extra={"step": none, "_slot": none})
    never = never.set_column(never.column_names.index("repeat"), "repeat", none)
    never = never.set_column(never.column_names.index(TIMES), TIMES, pa.array(np.zeros(len(idle), np.int64)))
    drawn = drawn.append_column(DROP_REASON, pa.nulls(drawn.num_rows, pa.string()))
    never = never.append_column(DROP_REASON, pa.array([unshown] * len(idle), pa.string()))
    return pa.concat_tables([drawn, never])
