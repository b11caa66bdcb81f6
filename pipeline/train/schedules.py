"""Learning-rate schedules as pure functions of the step (Luo et al., ICLR 2026).

``constant``, ``cosine``, ``linear`` and ``wsd`` (warmup-stable-decay with a ``linear``,
``cosine`` or ``1-sqrt`` decay), each after a linear warmup, ending at ``peak * final_lr_ratio``.
Progress is counted so that the last step trains at exactly the final LR (with an ascending
curriculum the last steps see the best data), and it is clamped, so the LR never climbs back
after the last step. The formulas are in docs/methods.md §7.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("constant", "cosine", "wsd", "linear")
SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: everything ``lr(step)`` depends on, in steps and absolute LRs."""

    kind: str
    peak: float
    total: int
    warmup_steps: int
    final: float
    decay_start: int
    decay_shape: str = "1-sqrt"

    def __call__(self, step: int) -> float:
        return lr_at(step, self)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def warmup_steps(warmup: float, total: int) -> int:
    """``warmup`` below 1 is a fraction of ``total``; from 1 up it is a step count."""
    steps = round(warmup * total) if warmup < 1 else int(warmup)
    return max(0, min(steps, total))


def make_schedule(
    kind: str,
    peak: float,
    total: int,
    warmup: float = 0.0,
    final_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
    decay_shape: str = "1-sqrt",
) -> Schedule:
    """Resolve a schedule config into a :class:`Schedule` for ``total`` optimizer steps."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r} (allowed: {', '.join(KINDS)})")
    if decay_shape not in SHAPES:
        raise ValueError(f"unknown decay_shape {decay_shape!r} (allowed: {', '.join(SHAPES)})")
    if total < 1:
        raise ValueError(f"a schedule needs at least one step (got total={total})")
    w = warmup_steps(warmup, total)
    final = peak if kind == "constant" else peak * final_lr_ratio
    if kind == "wsd":
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"wsd needs a decay_fraction in (0, 1] (got {decay_fraction}); with 0 it never decays")
        decay_steps = max(1, round(decay_fraction * total))  # at least the last step decays, to the final LR
        decay_start = max(w, total - decay_steps)
    elif kind == "constant":
        decay_start = total
    else:
        decay_start = w
    return Schedule(kind, peak, total, w, final, decay_start, decay_shape)


def schedule_from_config(cfg: Any, peak: float, total: int) -> Schedule:
    """A :class:`Schedule` from ``train.schedule`` (a ``ScheduleConfig``) and the optimizer's peak LR."""
    return make_schedule(cfg.kind, peak, total, cfg.warmup, cfg.final_lr_ratio, cfg.decay_fraction, cfg.decay_shape)


def _decay(shape: str, r: float, peak: float, final: float) -> float:
    if shape == "linear":
        return peak + (final - peak) * r
    if shape == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * r))
    sq = math.sqrt(r)  # 1-sqrt (Hägele et al. 2024; Luo et al. 2026)
    return peak * (1.0 - sq) + final * sq


def lr_at(step: int, s: Schedule) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under schedule ``s``."""
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    if step < s.warmup_steps:
        return s.peak * (step + 1) / s.warmup_steps
    if s.kind == "constant" or step < s.decay_start:
        return s.peak
    span = s.total - s.decay_start
    progress = 1.0 if span <= 0 else min(1.0, (step - s.decay_start + 1) / span)
    if s.kind == "cosine":
        return _decay("cosine", progress, s.peak, s.final)
    if s.kind == "linear":
        return _decay("linear", progress, s.peak, s.final)
    return _decay(s.decay_shape, progress, s.peak, s.final)
