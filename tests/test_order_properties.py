"""Property tests of the curricula (hypothesis): the pure parts on many small cases, and every
strategy end to end on Ray on a few generated tables laid out in different blocks.

Properties: every strategy is a deterministic function of (data, params, seed) whatever the
block layout; strategies without repetition are permutations of the input ids; pacing never
draws a row above d(s) at any step; folded stages each span the full range; cluster_interleave
windows contain every cluster while every cluster still has rows; in every strategy a null key
is the worst value (``nulls: worst``), a tail after every valued row (``last``) or a dropped row
(``drop``); replay's clock counts from a row's last showing.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest
import ray
import ray.data
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stages.base import StageContext
from stages.order import OrderParams, OrderStage, _bucket_of, _folded_phase, _sample_keys, bucket_boundaries
from stages.order import pacing as pacing_lib
from stages.order import replay as replay_lib
from stages.order.pacing import PacingPlan, PacingSchedule
from stages.order.repeats import expand

FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- schedules

schedules = st.one_of(
    st.builds(lambda lo, hi, step: {"function": "fixed_linear", "min_difficulty": min(lo, hi), "max_difficulty": max(lo, hi),
                                    "difficulty_step": step},
              st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.sampled_from([None, 0.01, 0.1])),
    st.builds(lambda lo, degree, total: {"function": "fixed_root", "min_difficulty": lo, "root_degree": degree,
                                         "total_curriculum_step": total},
              st.floats(0.05, 1.0), st.floats(0.5, 4.0), st.sampled_from([None, 1, 3, 10])),
    st.builds(lambda values, gaps: {"function": "fixed_discrete", "difficulty": values,
                                    "max_step": np.cumsum(gaps[: len(values) - 1]).tolist()},
              st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4), st.lists(st.integers(1, 6), min_size=3, max_size=3)),
    st.builds(lambda c0: {"function": "sqrt", "initial_competence": c0}, st.floats(0.05, 1.0)),
    st.builds(lambda c0, p: {"function": "p", "initial_competence": c0, "p": p}, st.floats(0.05, 1.0), st.floats(0.5, 5.0)),
)


@FAST
@given(schedule=schedules, steps=st.integers(1, 60))
def test_schedules_are_fractions_that_grow_to_their_maximum(schedule, steps):
    sched = PacingSchedule(**schedule)
    s = np.arange(steps)
    d = pacing_lib.difficulty(sched, s, max(1, steps - 1))
    assert ((d > 0) & (d <= 1)).all()
    if sched.function != "fixed_discrete":
        assert (np.diff(d) >= -1e-12).all()
        start = sched.min_difficulty if sched.function.startswith("fixed") else sched.initial_competence
        assert d[0] <= start + 1e-12
    if sched.function in ("sqrt", "p") and steps > 1 and sched.total_curriculum_step is None:
        assert d[-1] == pytest.approx(1.0)


@FAST
@given(schedule=schedules, n=st.integers(1, 300), batch=st.integers(1, 24), total=st.integers(1, 400),
       seed=st.integers(0, 2**31), window=st.sampled_from([None, 48]))
def test_pacing_never_draws_above_d_of_s(schedule, n, batch, total, seed, window):
    plan = PacingPlan(n=n, total_samples=total, batch_size=batch, schedule=PacingSchedule(**schedule), seed=seed)
    assume(plan.smallest_pool() >= 1)
    with mock.patch.object(pacing_lib, "_WINDOW_DRAWS", window or pacing_lib._WINDOW_DRAWS):
        parts = [plan.draws(w) for w in range(plan.windows)]
        again = [plan.draws(w) for w in range(plan.windows)]
    step, slot, rank = (np.concatenate(p) for p in zip(*parts))
    for a, b in zip(parts, again):  # deterministic
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(rank) == total and (np.bincount(step) == [batch] * (plan.steps - 1) + [total - (plan.steps - 1) * batch]).all()
    percentile = (rank + 1) / n
    assert (percentile <= plan.difficulty(step)).all()  # never above d(s)
    assert (rank >= 0).all()
    pools = plan.pool(step)
    for s in np.unique(step):  # without replacement inside a batch whenever the pool allows it
        in_step = rank[step == s]
        if len(in_step) < batch:
            continue  # the last, shorter batch: checked by the bound above
        if pools[step == s][0] >= batch:
            assert len(np.unique(in_step)) == len(in_step)
        else:
            counts = np.bincount(in_step)
            assert counts.max() - counts[counts > 0].min() <= 1


@FAST
@given(n=st.integers(1, 120), total=st.integers(1, 200), batch=st.integers(1, 9), cuts=st.lists(st.integers(0, 120), max_size=4),
       seed=st.integers(0, 1000))
def test_pacing_blocks_give_the_same_rows_whatever_the_split(n, total, batch, cuts, seed):
    plan = PacingPlan(n=n, total_samples=total, batch_size=batch,
                      schedule=PacingSchedule(function="fixed_linear", min_difficulty=0.5), seed=seed)
    assume(plan.smallest_pool() >= 1)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "_rank": np.arange(n)})
    whole = pacing_lib.expand_block(table, plan, "_rank")
    edges = sorted({0, n, *[c for c in cuts if c < n]})
    rng = np.random.default_rng(seed)
    parts = []
    for a, b in zip(edges, edges[1:]):
        piece = table.slice(a, b - a).take(rng.permutation(b - a))  # shuffled inside the block too
        parts.append(pacing_lib.expand_block(piece, plan, "_rank"))
    split = pa.concat_tables(parts)
    def key(t):
        return sorted(zip(t["step"].to_pylist(), t["_slot"].to_pylist(), t["id"].to_pylist(), t["repeat"].to_pylist()))
    assert key(whole) == key(split) and whole.num_rows == total


# ----------------------------------------------------------------------------- repeats, replay, buckets, folds


@FAST
@given(sources=st.lists(st.integers(0, 5), min_size=0, max_size=40), seed=st.integers(0, 100))
def test_repeats_are_numbered_in_training_order_with_unique_ids(sources, seed):
    table = pa.table({"id": [f"d{i}" for i in range(6)], "x": list(range(6))})
    src = np.array(sources, dtype=np.int64)
    when = np.random.default_rng(seed).permutation(len(src))
    out = expand(table, src, [when], {})
    assert out.num_rows == len(src) and len(set(out["id"].to_pylist())) == len(src)
    for i in set(sources):
        mine = sorted((w, r, name) for w, r, name, s in zip(when, out["repeat"].to_pylist(), out["id"].to_pylist(),
                                                            out["source_id"].to_pylist()) if s == f"d{i}")
        assert [r for _, r, _ in mine] == list(range(len(mine)))
        assert [name for _, _, name in mine] == [f"d{i}"] + [f"d{i}#r{k}" for k in range(1, len(mine))]
    assert out["_times"].to_pylist() == [sources.count(s) for s in sources]


@FAST
@given(n=st.integers(0, 500), phases=st.integers(1, 6), fraction=st.one_of(st.just(0.0), st.floats(0.01, 0.9)),
       exponent=st.floats(0, 3))
def test_replay_shares_follow_the_power_law(n, phases, fraction, exponent):
    plan = replay_lib.ReplayPlan(n=n, phases=phases, fraction=fraction, exponent=exponent, seed=0, clock="introduced")
    r = plan.expected()
    sizes = plan.sizes()
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
    assert np.triu(r).sum() == 0
    for j in range(1, phases):
        if sizes[j] and sizes[:j].all():
            assert r[j].sum() == pytest.approx(sizes[j] * fraction / (1 - fraction))
            for i in range(j - 1):
                if r[j, i] > 0:
                    assert r[j, i + 1] / r[j, i] == pytest.approx(((j - i) / (j - i + 1)) ** -exponent)


@FAST
@given(n=st.integers(0, 500), phases=st.integers(1, 6), fraction=st.one_of(st.just(0.0), st.floats(0.01, 0.9)),
       exponent=st.floats(0, 3))
def test_replay_last_seen_keeps_each_phase_budget(n, phases, fraction, exponent):
    plan = replay_lib.ReplayPlan(n=n, phases=phases, fraction=fraction, exponent=exponent, seed=0)
    r, m, sizes = plan.expected(), plan.multiplicity(), plan.sizes()
    assert plan.clock == "last_seen" and np.triu(r).sum() == 0 and (m >= 0).all()
    for j in range(1, phases):
        if sizes[j] and sizes[:j].any():
            assert r[j].sum() == pytest.approx(sizes[j] * fraction / (1 - fraction))
        # the multiplicity depends on the clock alone: the same for every phase of introduction,
        # and it falls with the time since the last showing (s = j - 1 is the most recent)
        assert np.allclose(m[j, :j, :j], m[j, :1, :j])
        assert (np.diff(m[j, 0, :j]) >= -1e-12).all()


def test_replay_last_seen_clock_counts_from_the_last_showing():
    """The paper's clock: a phase-0 row replayed in phase 2 is, in phase 3, as likely to return as a
    phase-2 row, and (d = 2) four times likelier than a phase-0 row unseen since phase 0.
    With the ``introduced`` clock every phase-0 row has the same chance, whatever its history."""
    n, phases = 30_000, 4
    table = pa.table({"id": [f"r{i}" for i in range(n)], "_rank": np.arange(n)})
    for clock in replay_lib.CLOCKS:
        plan = replay_lib.ReplayPlan(n=n, phases=phases, fraction=0.3, exponent=2.0, seed=7, clock=clock)
        out = replay_lib.expand_block(table, plan, "_rank")
        shown = {}  # source id -> phases it appears in
        for source, phase in zip(out["source_id"].to_pylist(), out["phase"].to_pylist()):
            shown.setdefault(source, set()).add(phase)
        home = plan.phase_of(np.arange(n))
        m = plan.multiplicity()
        rates = {}
        for last in range(3):  # phase-0 rows by the phase they were last shown in before phase 3
            rows = [f"r{i}" for i in np.flatnonzero(home == 0) if max(p for p in shown[f"r{i}"] if p < 3) == last]
            back = np.mean([3 in shown[r] for r in rows])
            expected = min(1.0, m[3, 0, last if clock == "last_seen" else 0])
            assert abs(back - expected) <= 5 * math.sqrt(expected * (1 - expected) / len(rows)) + 1e-9, (clock, last)
            rates[last] = expected
        if clock == "last_seen":
            assert rates[2] == pytest.approx(4 * rates[0]) and m[3, 0, 2] == pytest.approx(m[3, 2, 2])
        else:
            assert rates[0] == rates[1] == rates[2]
        realised = np.zeros((phases, phases))
        for phase, origin in zip(out["phase"].to_pylist(), out["_from_phase"].to_pylist()):
            if phase != origin:  # a replayed copy
                realised[phase, origin] += 1
        expected = plan.expected()
        assert (np.abs(realised - expected) <= 5 * np.sqrt(expected) + 1).all(), (clock, realised, expected)


@FAST
@given(n=st.integers(1, 150), phases=st.integers(1, 5), fraction=st.floats(0, 0.8), cut=st.integers(0, 150),
       seed=st.integers(0, 99), clock=st.sampled_from(replay_lib.CLOCKS))
def test_replay_blocks_give_the_same_rows_whatever_the_split(n, phases, fraction, cut, seed, clock):
    plan = replay_lib.ReplayPlan(n=n, phases=phases, fraction=fraction, exponent=1.0, seed=seed, clock=clock)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "_rank": np.arange(n)})
    cut = min(cut, n)
    whole = replay_lib.expand_block(table, plan, "_rank")
    split = pa.concat_tables([replay_lib.expand_block(table.slice(0, cut), plan, "_rank"),
                              replay_lib.expand_block(table.slice(cut), plan, "_rank")])
    def key(t):
        return sorted(zip(t["id"].to_pylist(), t["phase"].to_pylist(), t["_v"].to_pylist()))
    assert key(whole) == key(split)
    own = whole.filter(pa.compute.equal(whole["repeat"], 0))
    assert sorted(own["id"].to_pylist()) == sorted(table["id"].to_pylist())
    assert all(f < p for f, p, k in zip(whole["_from_phase"].to_pylist(), whole["phase"].to_pylist(),
                                        whole["repeat"].to_pylist()) if k > 0)


@FAST
@given(values=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.5, 0.9, 1.0]), min_size=1, max_size=200),
       n_buckets=st.integers(1, 12), seed=st.integers(0, 50))
def test_buckets_from_the_full_sample_are_balanced_even_on_ties(values, n_buckets, seed):
    table = pa.table({"id": [f"v{i}" for i in range(len(values))], "_order_key": values,
                      "_order_null": pa.array([0] * len(values), pa.int8())})
    sample = _sample_keys(table, seed, 1.0)
    bx, bu = bucket_boundaries(sample["x"].to_numpy(), sample["u"].to_numpy(), n_buckets)
    out = _bucket_of(table, seed, bx, bu, n_buckets)
    sizes = np.bincount(out["bucket"].to_numpy(), minlength=n_buckets)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(values)
    by_bucket = {}
    for b, x in zip(out["bucket"].to_pylist(), values):
        by_bucket.setdefault(b, []).append(x)
    keys = sorted(by_bucket)
    assert all(max(by_bucket[a]) <= min(by_bucket[b]) for a, b in zip(keys, keys[1:]))


@FAST
@given(n=st.integers(1, 300), folds=st.integers(1, 7), seed=st.integers(0, 99))
def test_folded_phases_take_one_row_of_every_run_of_k_ranks(n, folds, seed):
    table = pa.table({"_rank": np.arange(n, dtype=np.int64)})
    phase = _folded_phase(table, folds, seed)["phase"].to_numpy()
    full = (n // folds) * folds
    for p in range(folds):
        ranks = np.flatnonzero(phase == p)
        assert sorted((ranks[ranks < full] // folds).tolist()) == list(range(n // folds))
        if n >= folds:
            assert ranks.min() < folds and ranks[ranks < full].max() >= full - folds  # spans the full range
    assert np.bincount(phase, minlength=folds).max() - np.bincount(phase, minlength=folds).min() <= 1


# ----------------------------------------------------------------------------- end to end on Ray

NON_REPEATING = [
    {"method": "random"},
    {"method": "sort", "key": "k", "direction": "descending"},
    {"method": "quality_ascending", "key": "k"},
    {"method": "quality_descending", "key": "k", "higher_is_better": False},
    {"method": "buckets", "key": "k", "buckets": 3},
    {"method": "folded", "key": "k", "folds": 3},
    {"method": "domain_interleave", "key": "k", "group": "g"},
    {"method": "cluster_interleave", "key": "k", "group": "c"},
]
REPEATING = [
    {"method": "pacing", "key": "k", "total_samples": 70, "batch_size": 4,
     "pacing": {"function": "fixed_root", "min_difficulty": 0.3}},
    {"method": "replay", "key": "k", "phases": 3, "replay_fraction": 0.4},
]


@st.composite
def tables(draw) -> pa.Table:
    n = draw(st.integers(12, 60))
    keys = draw(st.lists(st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5]), st.floats(-1, 1)), min_size=n, max_size=n))
    groups = draw(st.lists(st.sampled_from(["web", "books", "code"]), min_size=n, max_size=n))
    clusters = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return pa.table({"id": [f"doc-{i:03d}" for i in range(n)], "text": ["t"] * n, "k": pa.array(keys, pa.float64()),
                     "g": groups, "c": pa.array(clusters, pa.int64())})


def run_split(table: pa.Table, params: dict, blocks: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(the ordered rows by position, the rows the stage hands the runner to drop)."""
    if blocks > 1:  # another layout: rows reversed and cut into uneven blocks
        table = table.take(np.arange(table.num_rows)[::-1].copy())
        cuts = sorted({0, table.num_rows, 1, table.num_rows // 3, table.num_rows // 2})
        parts = [table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    else:
        parts = [table]
    ctx = StageContext(run_dir=Path("."), artifact_dir=Path("."), seed=seed, input_columns=table.column_names)
    out = OrderStage(OrderParams(name="order", **params)).apply(ray.data.from_arrow(parts), ctx)
    full = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows])
    if "_drop_reason" not in full.column_names:
        return full.sort_by("position"), full.slice(0, 0)
    kept = full.filter(pa.compute.is_null(full["_drop_reason"])).drop_columns(["_drop_reason"])
    return kept.sort_by("position"), full.filter(pa.compute.is_valid(full["_drop_reason"])).sort_by("id")


def run(table: pa.Table, params: dict, blocks: int, seed: int) -> pa.Table:
    kept, dropped = run_split(table, params, blocks, seed)
    assert not dropped.num_rows or params["method"] == "pacing"
    return kept


def concurrently(fn, calls: list[tuple]) -> list:
    """``[fn(*call) for call in calls]``, four at a time: on tables this small each stage run is
    mostly Ray Data's scheduling latency, so independent runs overlap (each its own dataset)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda call: fn(*call), calls))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(table=tables(), seed=st.integers(0, 1000))
def test_every_strategy_is_deterministic_whatever_the_layout(ray_address, table, seed):
    n = table.num_rows
    ranks = {i: r for r, i in enumerate(sorted(table["id"].to_pylist(), key=lambda i: _curriculum(table, i)))}
    results = iter(concurrently(run, [(table, params, blocks, seed) for params in NON_REPEATING + REPEATING
                                      for blocks in (1, 3)]))
    for params in NON_REPEATING + REPEATING:
        one, other = next(results), next(results)
        assert one.equals(other), params["method"]
        assert one["position"].to_pylist() == list(range(one.num_rows))
        if params in NON_REPEATING:
            assert sorted(one["id"].to_pylist()) == sorted(table["id"].to_pylist()), params["method"]
        method = params["method"]
        if method == "pacing":
            plan = PacingPlan(n=n, total_samples=70, batch_size=4, schedule=PacingSchedule(**params["pacing"]), seed=seed)
            percentile = np.array([(ranks[s] + 1) / n for s in one["source_id"].to_pylist()])
            assert (percentile <= plan.difficulty(one["step"].to_numpy())).all()
        if method == "folded":
            for p in range(3):
                mine = [ranks[i] for i, ph in zip(one["id"].to_pylist(), one["phase"].to_pylist()) if ph == p]
                assert min(mine) < 3 and max(mine) >= (n // 3) * 3 - 3
        if method == "cluster_interleave":
            clusters = one["c"].to_pylist()
            sizes = Counter(clusters)
            k = len(sizes)
            for start in range(min(sizes.values()) * k - k + 1):
                assert len(set(clusters[start:start + k])) == k


def _curriculum(table: pa.Table, doc_id: str) -> tuple:
    """The order of 'quality_ascending' on key k, recomputed in Python: a null or NaN key is the
    worst value (nulls: worst), so it comes first; then the key; ties by id."""
    value = table["k"][table["id"].to_pylist().index(doc_id)].as_py()
    missing = value is None or math.isnan(value)
    return (not missing, 0.0 if missing else value, doc_id)


# ----------------------------------------------------------------------------- null keys

WITH_KEY_FOR_DROP = {"random": {"key": "k"}}  # random reads a key only to drop its null rows


@st.composite
def tables_with_null_keys(draw) -> pa.Table:
    n = draw(st.integers(12, 40))
    values = draw(st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5]), st.floats(-1, 1)), min_size=n, max_size=n))
    missing = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n // 3))
    nan = draw(st.sets(st.sampled_from(sorted(missing))))  # some missing keys are NaN, not null
    keys = [float("nan") if i in nan else None if i in missing else v for i, v in enumerate(values)]
    groups = draw(st.lists(st.sampled_from(["web", "books", "code"]), min_size=n, max_size=n))
    clusters = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return pa.table({"id": [f"doc-{i:03d}" for i in range(n)], "text": ["t"] * n, "k": pa.array(keys, pa.float64()),
                     "g": groups, "c": pa.array(clusters, pa.int64())})


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(table=tables_with_null_keys(), seed=st.integers(0, 1000))
def test_null_keys_follow_the_nulls_setting_in_every_strategy(ray_address, table, seed):
    """worst: the same order as with the null keys replaced by a value worse than every other
    (sort: lower); last: the order of the rows with a value, then the null rows in id order
    (buckets: shuffled), with the strategy's tail columns; drop: the order of the rows with a
    value, the null rows handed to the runner with reason order.null_key. Each is compared on
    another block layout than its reference, so it is layout-independent too."""
    missing = pa.compute.is_null(table["k"], nan_is_null=True)
    null_ids = sorted(i for i, m in zip(table["id"].to_pylist(), missing.to_pylist()) if m)
    valued_table = table.filter(pa.compute.invert(missing))
    strategies = NON_REPEATING + REPEATING
    calls = []
    for params in strategies:
        sentinel = 10.0 if params.get("higher_is_better") is False else -10.0
        replaced = table.set_column(2, "k", pa.compute.if_else(missing, sentinel, table["k"]))
        calls += [(table, {**params, "nulls": "worst"}, 3, seed),  # worst
                  (replaced, params, 1, seed),  # its reference
                  (table, {**params, "nulls": "last"}, 3, seed),  # last
                  (valued_table, params, 1, seed),  # the reference of last and drop
                  (table, {**params, "nulls": "drop", **WITH_KEY_FOR_DROP.get(params["method"], {})}, 3, seed)]  # drop
    results = iter(concurrently(run_split, calls))
    for params in strategies:
        method = params["method"]
        (worst, _), (reference, _), (last, _), (base, base_dropped), (kept, dropped) = (next(results) for _ in range(5))
        # worst
        assert _rows(worst.drop_columns(["k"])) == _rows(reference.drop_columns(["k"])), method
        # last
        if method == "random":  # reads no key: nulls change nothing
            assert _rows(last.drop_columns(["k"])) == _rows(worst.drop_columns(["k"]))
        else:
            head, tail = last.slice(0, base.num_rows), last.slice(base.num_rows)
            assert _rows(head) == _rows(base), method
            tail_sources = tail["source_id" if method in ("pacing", "replay") else "id"].to_pylist()
            assert (sorted(tail_sources) if method == "buckets" else tail_sources) == null_ids, method
            column = {"buckets": "bucket", "folded": "phase", "replay": "phase", "pacing": "step"}.get(method)
            if column == "step":
                first = math.ceil(params["total_samples"] / params["batch_size"])
                assert tail["step"].to_pylist() == [first + i // params["batch_size"] for i in range(tail.num_rows)]
            elif column:
                assert set(tail[column].to_pylist()) == {params.get("buckets", params.get("folds", params.get("phases")))}
        # drop
        assert _rows(kept) == _rows(base), method
        reasons = dict(zip(dropped["id"].to_pylist(), dropped["_drop_reason"].to_pylist()))
        assert sorted(i for i, r in reasons.items() if r == "order.null_key") == null_ids, method
        assert sorted(i for i, r in reasons.items() if r != "order.null_key") == base_dropped["id"].to_pylist()
