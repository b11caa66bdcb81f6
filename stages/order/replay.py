"""Power-law replay over curriculum phases (the order stage's ``replay``).

After Gandhi et al., "Catastrophic Interference is Mitigated in Naturalistic Power-Law Learning
Environments" (2024): the curriculum is cut into phases of equal size; each later phase holds its
own rows plus a share ``replay_fraction`` of replayed rows from earlier phases, weighted by the
power law (a + 1)^(−d) of an age a in phases. The paper's clock (``replay_clock: last_seen``, the
default) counts a row's age from the phase in which it was last shown, introduced or replayed,
so a row replayed recently is likelier to return than one unseen for long; ``introduced`` counts
from the phase that introduced the row, whatever was replayed since. Each row's replay count is
⌊m⌋ or ⌊m⌋+1 by a seeded hash of (seed, id, phase), so counts are exact in expectation; each
copy takes a seeded random place in its phase. The formula and the manifest's expected and
realised matrices: docs/methods.md §6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core.hashing import hash64
from stages.order.repeats import expand

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
CLOCKS = ("last_seen", "introduced")


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
    clock: str = "last_seen"

    def starts(self) -> np.ndarray:
        """The first rank of each phase, plus N at the end."""
        return (np.arange(self.phases + 1, dtype=np.int64) * self.n) // self.phases

    def sizes(self) -> np.ndarray:
        return np.diff(self.starts())

    def budget(self) -> np.ndarray:
        """R_j = n_j · ρ / (1 − ρ): the replayed rows of phase j (0 for phase 0 and empty phases)."""
        sizes = self.sizes().astype(np.float64)
        out = np.zeros(self.phases)
        for j in range(1, self.phases):
            if sizes[j] and sizes[:j].any() and self.fraction:
                out[j] = sizes[j] * self.fraction / (1.0 - self.fraction)
        return out

    def weight(self, j: int, last: np.ndarray) -> np.ndarray:
        """The power-law weight in phase j of material last shown (or introduced) in phase ``last``."""
        return (j - np.asarray(last, dtype=np.float64) + 1.0) ** (-self.exponent)

    def multiplicity(self) -> np.ndarray:
        """M[j, h, s]: the expected copies in phase j of one row introduced in phase h (h < j) whose
        clock reads s (its last showing for ``last_seen``, always h for ``introduced``)."""
        return self._chain()[0]

    def expected(self) -> np.ndarray:
        """R[j, i]: the expected replayed rows from phase i in phase j (zero unless i < j)."""
        return self._chain()[1]

    def _chain(self) -> tuple[np.ndarray, np.ndarray]:
        """Propagate the expected number of rows per (phase introduced h, clock s) through the
        phases: every row's draws are independent seeded hashes, so expectations are exact."""
        p, sizes, budget = self.phases, self.sizes().astype(np.float64), self.budget()
        m = np.zeros((p, p, p))
        expected = np.zeros((p, p))
        state = np.zeros((p, p))  # state[h, s]: rows introduced in h whose clock reads s
        for j in range(p):
            if j and budget[j]:
                earlier = np.arange(j)
                if self.clock == "introduced":
                    # R_{j,i} = R_j · w(i) / Σ_{i' nonempty} w(i'): a share per phase, split evenly over its rows.
                    nonempty = earlier[sizes[earlier] > 0]
                    w = self.weight(j, nonempty)
                    share = budget[j] * w / w.sum()
                    m[j, nonempty, nonempty] = share / sizes[nonempty]
                else:
                    # Each row weighs w(j − s + 1); the budget is spread in proportion over all earlier rows.
                    w = self.weight(j, earlier)
                    total = float((state[:j, :j] * w[None, :]).sum())
                    if total > 0:
                        m[j, :j, :j] = budget[j] * w[None, :] / total
                expected[j, :j] = (state[:j, :j] * m[j, :j, :j]).sum(axis=1)
                if self.clock == "last_seen":
                    shown = np.minimum(1.0, m[j, :j, :j])  # P(at least one copy) = min(1, m)
                    moved = state[:j, :j] * shown
                    state[:j, :j] -= moved
                    state[:j, j] += moved.sum(axis=1)
            state[j, j] = sizes[j]
        return m, expected

    def phase_of(self, ranks: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts(), ranks, side="right") - 1


def expand_block(table: pa.Table, plan: ReplayPlan, rank_column: str) -> pa.Table:
    """One block's rows in their own phase plus their replayed copies, with ``phase``, ``_v``
    (the place inside the phase) and ``_from_phase``; the caller sorts by (phase, _v).

    Each row carries its own clock from phase to phase, so the block needs nothing but its rows."""
    ranks = table[rank_column].to_numpy()
    phase = plan.phase_of(ranks)
    starts, sizes = plan.starts(), plan.sizes()
    base = hash64(table["id"].to_pylist(), plan.seed, "order.replay").astype(np.uint64)
    m = plan.multiplicity()
    clock = phase.copy()  # the phase each row was last shown in (introduced, for now)

    sources = [np.arange(table.num_rows, dtype=np.int64)]
    phases = [phase]
    places = [(ranks - starts[phase] + 0.5) / sizes[phase]]
    for j in range(1, plan.phases):
        rows = np.flatnonzero(phase < j)
        expected = m[j, phase[rows], clock[rows]]
        whole = np.floor(expected)
        copies = (whole + (unit(mix64(base[rows], 2 * j)) < expected - whole)).astype(np.int64)
        if plan.clock == "last_seen":
            clock[rows[copies > 0]] = j
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
