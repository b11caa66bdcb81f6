"""Power-law replay over curriculum phases (the order stage's ``replay``).

After "Catastrophic Interference is Mitigated in Naturalistic Power-Law Learning Environments"
(2024): the curriculum is cut into phases of equal size; each later phase holds its own rows
plus a share ``replay_fraction`` of replayed rows from earlier phases, phase i contributing in
proportion to (j − i + 1)^(−d). Each row's replay count is ⌊m⌋ or ⌊m⌋+1 by a seeded hash, so
counts are exact in expectation; each copy takes a seeded random place in its phase. The
formula and the manifest's expected and realised matrices: docs/methods.md §6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core.hashing import hash64
from stages.order.repeats import expand

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """SplitMix64 of ``values + (salt + 1) · golden``: independent 64-bit streams from one hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(values, dtype=np.uint64) + np.uint64(salt + 1) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit(values: np.ndarray) -> np.ndarray:
    """The top 53 bits of a uint64 hash as a float in [0, 1)."""
    return (values >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class ReplayPlan:
    n: int
    phases: int
    fraction: float
    exponent: float
    seed: int

    def starts(self) -> np.ndarray:
        """The first rank of each phase, plus N at the end."""
        return (np.arange(self.phases + 1, dtype=np.int64) * self.n) // self.phases

    def sizes(self) -> np.ndarray:
        return np.diff(self.starts())

    def expected(self) -> np.ndarray:
        """R[j, i]: the expected replayed rows from phase i in phase j (zero unless i < j)."""
        sizes = self.sizes().astype(np.float64)
        out = np.zeros((self.phases, self.phases))
        for j in range(1, self.phases):
            earlier = np.flatnonzero(sizes[:j] > 0)
            if sizes[j] == 0 or len(earlier) == 0 or self.fraction == 0:
                continue
            weights = (j - earlier + 1.0) ** (-self.exponent)
            out[j, earlier] = sizes[j] * self.fraction / (1.0 - self.fraction) * weights / weights.sum()
        return out

    def multiplicity(self) -> np.ndarray:
        """m[j, i] = R[j, i] / n_i: the expected copies of one phase-i row in phase j."""
        sizes = self.sizes().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sizes[None, :] > 0, self.expected() / np.where(sizes > 0, sizes, 1.0)[None, :], 0.0)

    def phase_of(self, ranks: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts(), ranks, side="right") - 1


def expand_block(table: pa.Table, plan: ReplayPlan, rank_column: str) -> pa.Table:
    """One block's rows in their own phase plus their replayed copies, with ``phase``, ``_v``
    (the place inside the phase) and ``_from_phase``; the caller sorts by (phase, _v)."""
    ranks = table[rank_column].to_numpy()
    phase = plan.phase_of(ranks)
    starts, sizes = plan.starts(), plan.sizes()
    base = hash64(table["id"].to_pylist(), plan.seed, "order.replay").astype(np.uint64)
    m = plan.multiplicity()

    sources = [np.arange(table.num_rows, dtype=np.int64)]
    phases = [phase]
    places = [(ranks - starts[phase] + 0.5) / sizes[phase]]
    for j in range(1, plan.phases):
        rows = np.flatnonzero(phase < j)
        expected = m[j, phase[rows]]
        whole = np.floor(expected)
        copies = (whole + (unit(mix64(base[rows], 2 * j)) < expected - whole)).astype(np.int64)
        src = np.repeat(rows, copies)
        if not len(src):
            continue
        first = np.repeat(np.cumsum(copies) - copies, copies)
        copy_index = np.arange(len(src)) - first
        place_hash = mix64(mix64(base[src], 2 * j + 1), 0) ^ mix64(copy_index.astype(np.uint64), 7)
        sources.append(src)
        phases.append(np.full(len(src), j, dtype=np.int64))
        places.append(unit(mix64(place_hash, 11)))
    src_all = np.concatenate(sources)
    phase_all = np.concatenate(phases)
    place_all = np.concatenate(places)
    return expand(
        table,
        src_all,
        occurrence=[phase_all, place_all],
        extra={
            "phase": pa.array(phase_all, pa.int64()),
            "_v": pa.array(place_all, pa.float64()),
            "_from_phase": pa.array(phase[src_all], pa.int64()),
        },
    )
