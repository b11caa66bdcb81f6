"""The composite score: percentile ranks, weights, null policy, sampled ranks and the recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, StageError
from pipeline.engine.config import validate_config
from stages.base import StageContext
from stages.combine import RECIPE, CombineParams, CombineStage, percentile_ranks, recipe_terms

TERMS = [{"column": "x"}, {"column": "y", "higher_is_better": False, "weight": 3}]
ROWS = [  # x higher is better, y lower is better (weight 3)
    {"id": "a", "x": 10.0, "y": 4.0},
    {"id": "b", "x": 20.0, "y": 3.0},
    {"id": "c", "x": 20.0, "y": 2.0},
    {"id": "d", "x": 30.0, "y": 1.0},
]


def run_combine(params: dict, rows: list[dict], tmp_path: Path, blocks: int = 2, seed: int = 0):
    import ray.data

    stage = CombineStage(CombineParams.model_validate({"name": "combine", **params}))
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "artifacts", seed=seed,
                       input_columns=list(rows[0]))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    out = stage.apply(ds, ctx).to_pandas().sort_values("id").reset_index(drop=True)
    return out, ctx


def test_percentile_ranks_hand_checked():
    ref = np.array([10.0, 20.0, 20.0, 30.0])
    # (#below + half #equal) / n: 10 -> 0.5/4, 20 -> (1 + 1)/4, 30 -> 3.5/4
    assert percentile_ranks(ref, ref).tolist() == [0.125, 0.5, 0.5, 0.875]
    assert percentile_ranks(ref, ref, higher_is_better=False).tolist() == [0.875, 0.5, 0.5, 0.125]
    # Against a reference (sampled ranks): values outside it stay inside [0.5/m, 1 - 0.5/m].
    got = percentile_ranks(np.array([5.0, np.nan, 25.0, 40.0]), ref)
    assert got[0] == 0.125 and np.isnan(got[1]) and got[2] == 0.75 and got[3] == 0.875
    assert percentile_ranks(np.array([7.0]), np.array([7.0])).tolist() == [0.5]


# x ranks: a .125, b .5, c .5, d .875; y (lower better): a .125, b .375, c .625, d .875
X_RANKS, Y_RANKS = [0.125, 0.5, 0.5, 0.875], [0.125, 0.375, 0.625, 0.875]


def test_weighted_means_of_ranks_hand_checked(ray_address, tmp_path):
    out, ctx = run_combine({"terms": TERMS, "mean": "arithmetic"}, ROWS, tmp_path)
    expected = [(x + 3 * y) / 4 for x, y in zip(X_RANKS, Y_RANKS)]
    assert out["quality"].tolist() == pytest.approx(expected, abs=1e-12)
    assert ctx.info["exact_ranks"] is True and ctx.info["null_counts"] == {"x": 0, "y": 0}
    assert ctx.info["recipe"] is False and ctx.info["mean"] == "arithmetic"

    geometric, ctx = run_combine({"terms": TERMS, "into": "score"}, ROWS, tmp_path)
    assert ctx.info["mean"] == "geometric" and "quality" not in geometric
    expected = [(x * y**3) ** 0.25 for x, y in zip(X_RANKS, Y_RANKS)]
    assert geometric["score"].tolist() == pytest.approx(expected, abs=1e-12)

    # One group: its terms are averaged arithmetically, whatever the mean across groups.
    grouped = [{**t, "group": "g"} for t in TERMS]
    same, _ = run_combine({"terms": grouped}, ROWS, tmp_path)
    assert same["quality"].tolist() == pytest.approx([(x + 3 * y) / 4 for x, y in zip(X_RANKS, Y_RANKS)], abs=1e-12)
    # Two groups: (x, y) averaged, then a geometric mean with z at the group weights 4 and 1.
    rows = [{**r, "z": float(i)} for i, r in enumerate(ROWS)]  # z ranks .125 .375 .625 .875
    mixed, ctx = run_combine({"terms": [*grouped, {"column": "z"}]}, rows, tmp_path)
    expected = [(((x + 3 * y) / 4) ** 4 * z) ** 0.2 for x, y, z in zip(X_RANKS, Y_RANKS, Y_RANKS)]
    assert mixed["quality"].tolist() == pytest.approx(expected, abs=1e-12)
    assert [t["group"] for t in ctx.info["terms"]] == ["g", "g", "z"]


def test_null_policy_worst_and_skip_term(ray_address, tmp_path):
    rows = [dict(r) for r in ROWS] + [{"id": "e", "x": None, "y": None}]
    rows[1]["x"] = None
    rows[2]["x"] = float("nan")  # NaN counts as missing too
    worst, ctx = run_combine({"terms": TERMS, "nulls": "worst", "mean": "arithmetic"}, rows, tmp_path)
    # x among its non-null values [10, 30]: a .25, d .75; y among [4, 3, 2, 1]: a .125, b .375, c .625, d .875
    expected_worst = [(0.25 + 3 * 0.125) / 4, (0 + 3 * 0.375) / 4, (0 + 3 * 0.625) / 4, (0.75 + 3 * 0.875) / 4, 0.0]
    assert worst["quality"].tolist() == pytest.approx(expected_worst, abs=1e-12)
    assert ctx.info["null_counts"] == {"x": 3, "y": 1}

    skip, _ = run_combine({"terms": TERMS, "nulls": "skip-term", "mean": "arithmetic"}, rows, tmp_path)
    assert skip["quality"].tolist()[:4] == pytest.approx(
        [(0.25 + 3 * 0.125) / 4, 0.375, 0.625, (0.75 + 3 * 0.875) / 4], abs=1e-12)
    assert skip["quality"].isna().tolist() == [False, False, False, False, True]  # no term at all: null

    # Geometric: a missing term under 'worst' makes the row the worst (0); 'skip-term' drops it.
    worst_geo, _ = run_combine({"terms": TERMS}, rows, tmp_path)
    assert worst_geo["quality"].tolist() == pytest.approx(
        [(0.25 * 0.125**3) ** 0.25, 0.0, 0.0, (0.75 * 0.875**3) ** 0.25, 0.0], abs=1e-12)
    skip_geo, _ = run_combine({"terms": TERMS, "nulls": "skip-term"}, rows, tmp_path)
    assert skip_geo["quality"].tolist()[:4] == pytest.approx(
        [(0.25 * 0.125**3) ** 0.25, 0.375, 0.625, (0.75 * 0.875**3) ** 0.25], abs=1e-12)
    assert skip_geo["quality"].isna().tolist() == [False, False, False, False, True]


def test_sampled_ranks_are_bounded_deterministic_and_close_to_exact(ray_address, tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"id": f"r{i:05d}", "x": float(v), "y": float(w)}
            for i, (v, w) in enumerate(zip(rng.normal(size=2000), rng.exponential(size=2000)))]
    params = {"terms": TERMS, "mean": "arithmetic"}  # the ranks' own error, not amplified by a geometric mean
    exact, _ = run_combine(params, rows, tmp_path)
    sampled, ctx = run_combine({**params, "sample_size": 300}, rows, tmp_path, blocks=1)
    again, _ = run_combine({**params, "sample_size": 300}, rows, tmp_path, blocks=5)
    assert ctx.info["exact_ranks"] is False and ctx.info["rank_sample"] == 300
    assert sampled["quality"].tolist() == again["quality"].tolist()
    error = np.abs(sampled["quality"].to_numpy() - exact["quality"].to_numpy())
    assert error.max() < 0.1 and error.mean() < 0.02  # ~1/sqrt(300) sampling error


def test_default_recipe_uses_the_signals_present(ray_address, tmp_path):
    assert [t.column for t in recipe_terms(["id", "ppl", "symbol_ratio", "n_words"])] == ["ppl", "symbol_ratio"]
    rows = [{"id": f"d{i}", "ppl": float(p), "quality_clf": c, "n_words": 5}
            for i, (p, c) in enumerate([(10, 0.9), (30, 0.2), (20, 0.5), (40, 0.1)])]
    out, ctx = run_combine({}, rows, tmp_path)
    assert ctx.info["recipe"] is True
    assert [t["column"] for t in ctx.info["terms"]] == ["ppl", "quality_clf"]
    assert {t["column"]: t["higher_is_better"] for t in ctx.info["terms"]} == {"ppl": False, "quality_clf": True}
    assert ctx.info["mean"] == "geometric"
    # Both signals agree: d0 best, then d2, d1, d3.
    assert out.sort_values("quality", ascending=False)["id"].tolist() == ["d0", "d2", "d1", "d3"]
    assert out["quality"].tolist() == pytest.approx([0.875, 0.375, 0.625, 0.125])
    with pytest.raises(StageError, match="none of the recipe's signals"):
        run_combine({}, [{"id": "a", "n_words": 3}], tmp_path)


def test_recipe_directions_match_the_documented_ones():
    assert RECIPE["ppl"][0] is False and RECIPE["quality_clf"][0] is True and RECIPE["alpha_ratio"][0] is True
    assert RECIPE["c4_line_punct_ratio"][0] is True and RECIPE["fineweb_line_punct_ratio"][0] is True
    assert all(not RECIPE[c][0] for c in ("symbol_ratio", "dup_line_char_ratio", "dup_5gram_ratio", "top_2gram_ratio"))
    # Three families, ppl, the classifier and the heuristics (together), each with an equal say.
    weights: dict[str, float] = {}
    for _, w, group in RECIPE.values():
        weights[group] = weights.get(group, 0.0) + w
    assert weights == pytest.approx({"perplexity": 1.0, "classifier": 1.0, "heuristics": 1.0})


def test_bad_columns_and_params_are_named(ray_address, tmp_path):
    with pytest.raises(StageError, match=r"term column\(s\) \['nope'\] do not exist"):
        run_combine({"terms": [{"column": "nope"}]}, ROWS, tmp_path)
    with pytest.raises(StageError, match="'label' is string, not numeric"):
        run_combine({"terms": [{"column": "label"}]}, [{"id": "a", "label": "x"}], tmp_path)
    for bad, message in [({"terms": []}, "terms is empty"),
                         ({"terms": [{"column": "x"}, {"column": "x"}]}, r"\['x'\] appear in more than one term"),
                         ({"terms": [{"column": "x", "weight": 0}]}, "weight"),
                         ({"into": "position"}, "reserved"),
                         ({"nulls": "zero"}, "nulls"),
                         ({"mean": "harmonic"}, "mean")]:
        with pytest.raises(ConfigError, match=message):
            validate_config({"stages": [{"name": "combine", **bad}]})


def test_a_run_scores_combines_and_orders_by_quality(ray_address, tmp_path):
    """The user's session: quality -> quality_classifier -> combine -> quality-ascending order."""
    import json

    import polars as pl
    from scipy.stats import spearmanr

    from pipeline.engine.runner import run_pipeline

    config = validate_config({
        "run": {"name": "combine", "seed": 0},
        "input": {"format": "synthetic", "synthetic": {"docs": 300}},
        "stages": [{"name": "quality"},
                   {"name": "quality_classifier", "positives": {"synthetic": {"docs": 150}}},
                   {"name": "combine"},
                   {"name": "order", "method": "quality_ascending", "key": "quality", "higher_is_better": True}],
    })
    manifest = run_pipeline(config, tmp_path / "run", log=lambda _: None)
    df = pl.read_parquet(str(tmp_path / "run" / "shards" / "*.parquet")).sort("position")
    assert df["quality"].null_count() == 0 and df["quality"].is_sorted()  # worst first, best last
    assert spearmanr(df["quality"], df["true_quality"])[0] > 0.7
    combine = next(s for s in manifest["stages"] if s["name"] == "combine")
    assert [t["column"] for t in combine["info"]["terms"]] == [c for c in RECIPE if c != "ppl"]  # no ppl stage
    assert combine["info"]["null_counts"] == {c: 0 for c in RECIPE if c != "ppl"}
    artifacts = tmp_path / "run" / manifest["artifacts"]["quality_classifier"]
    assert json.loads((artifacts / "classifier.json").read_text())["n_negatives"] == 300


def test_inspect_correlations_are_oriented_and_warn_on_a_domain_detector():
    """`curriculum inspect`'s signal correlations: each signal oriented higher = better, and a
    warning when quality_clf runs against the other signals (docs/methods.md §4)."""
    import polars as pl

    from pipeline.engine.report import rank_correlations

    good = np.linspace(0, 1, 50)
    signals = {"ppl": 100 - 90 * good, "alpha_ratio": 0.5 + 0.5 * good, "symbol_ratio": 0.3 - 0.3 * good}
    columns, matrix, warnings = rank_correlations(pl.DataFrame({**signals, "quality_clf": good}))
    assert columns == ["ppl", "quality_clf", "alpha_ratio", "symbol_ratio"]
    np.testing.assert_allclose(matrix, np.ones((4, 4)))  # lower ppl / symbol_ratio = better: all agree
    assert warnings == []
    _, matrix, warnings = rank_correlations(pl.DataFrame({**signals, "quality_clf": 1 - good}))
    np.testing.assert_allclose(matrix[1, [0, 2, 3]], -1.0)
    assert len(warnings) == 1 and "quality_clf correlates negatively" in warnings[0] and "-1.00" in warnings[0]
