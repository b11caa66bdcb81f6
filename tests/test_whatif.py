"""``record: fut`` and ``curriculum whatif``: one tiny recorded GPT-2 run on the synthetic graded
corpus, estimates of other orders from it, and a real retrain to check them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.core.errors import ConfigError
from pipeline.core.settings import RayConfig, RunConfig
from pipeline.engine.ablate import Job
from pipeline.engine.whatif import method_order, read_table, run_whatif, write_graded_run
from pipeline.train.config import TrainConfig
from pipeline.train.fut import (
    ESTIMATORS,
    SECOND_ORDER,
    anchor_steps,
    check_permutation,
    checkpoint_steps,
    estimate,
    load_record,
    make_sketch,
    replay,
    step_shares,
    storage_bytes,
)
from pipeline.train.trainer import run_training

DIM = 64


def _train_dict(record: bool) -> dict:
    train = {"model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
             "seq_len": 32, "batch_size": 4, "max_tokens": 32 * 4 * 12, "tokenizer_vocab_size": 300,
             "tokenizer_sample_docs": 200, "optimizer": {"lr": 0.003}, "schedule": {"warmup": 0.1},
             "averaging": {"method": "none"}, "threads": 1, "log_every": 4,
             "eval": {"every": 4, "max_tokens": 1024, "sets": {
                 "clean": {"synthetic": {"docs": 30, "seed": 1000, "min_quality": 0.7}},
                 "mixed": {"synthetic": {"docs": 30, "seed": 1000}}}}}
    if record:
        train["record"] = {"fut": {"dim": DIM, "anchors": 3, "seed": 5}}
    return train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fut")
    data = write_graded_run(work / "data", 60, seed=0, max_chars=120)
    summary = run_training(Job(RunConfig(), RayConfig(), _train_dict(True)), data, work / "train", log=lambda m: None)
    return {"work": work, "data": data, "train": work / "train", "summary": summary}


# --------------------------------------------------------------------------- pure parts


def test_projection_is_seeded_and_keeps_dot_products():
    import torch

    a, b = make_sketch(5000, 128, seed=3), make_sketch(5000, 128, seed=3)
    assert torch.equal(a.bucket, b.bucket) and torch.equal(a.sign, b.sign)
    c = make_sketch(5000, 128, seed=4)
    assert not torch.equal(a.bucket, c.bucket)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen)
    y = 0.6 * x + 0.8 * torch.randn(5000, generator=gen)
    # Unbiased with a spread of about |x||y|/sqrt(k): over 40 seeds the mean is within 3 standard errors.
    dots = [float(make_sketch(5000, 128, s)(x) @ make_sketch(5000, 128, s)(y)) for s in range(40)]
    spread = float(x.norm() * y.norm()) / 128**0.5
    assert abs(np.mean(dots) - float(x @ y)) < 3 * spread / 40**0.5
    assert make_sketch(5000, 128, 0)(x).shape == (128,)


def test_dimension_bounds_the_storage():
    small, large = storage_bytes(1000, 4, 2, 4, 64), storage_bytes(1000, 4, 2, 4, 128)
    fixed = 8 * 1000 * 4 * 2  # one float64 inner product per row, anchor and eval set
    assert large - fixed == 2 * (small - fixed)
    assert small - fixed == 4 * 64 * (1000 * 4 + 3 * 4 + 1)


def test_anchor_and_checkpoint_steps():
    assert anchor_steps(80, 4) == [0, 20, 40, 60]
    assert checkpoint_steps(80, 4) == [20, 40, 60, 80]
    assert anchor_steps(3, 8) == [0, 1, 2]


def test_step_shares_cover_every_token_once():
    lengths = np.array([5, 17, 3, 40, 9, 11])
    rows = np.array([3, 0, 5, 1, 2, 4])
    r, s, w = step_shares(rows, lengths, tokens_per_step=16, total_steps=7)  # 112 tokens: more than an epoch (85)
    tokens = w * lengths[r]
    assert np.allclose(np.bincount(s, weights=tokens, minlength=7), 16)
    assert s.max() == 6
    first_epoch = np.bincount(r, weights=w, minlength=6)
    assert np.all(first_epoch >= 1 - 1e-9)  # each row once in the first epoch, the start of it again after


def test_fut_needs_one_packed_text_process():
    with pytest.raises(ValidationError, match="needs workers: 1"):
        TrainConfig.model_validate({"record": {"fut": {}}, "workers": 2, "batch_size": 16})
    with pytest.raises(ValidationError, match="dim"):
        TrainConfig.model_validate({"record": {"fut": {"dim": 2}}})


# --------------------------------------------------------------------------- the recorded run


def test_record_is_in_the_summary_and_its_size_is_bounded_by_dim(run):
    rec = run["summary"]["record"]["fut"]
    assert rec["dim"] == DIM and rec["rows"] == 60 and rec["anchors"] == [0, 4, 8, 12]  # and the last step
    assert rec["array_bytes"] == storage_bytes(60, 4, 2, 3, DIM)
    files = sum(f.stat().st_size for f in (run["train"] / "fut").glob("*.safetensors"))
    assert rec["storage_bytes"] == files
    assert rec["array_bytes"] <= files < rec["array_bytes"] + 2048 * 10  # headers only beyond the arrays


def test_reference_order_reproduces_the_recorded_losses(run):
    record = load_record(run["train"])
    est = estimate(record, record.ids)
    final = run["summary"]["final"]
    for name in ("clean", "mixed"):
        for estimator in ("anchored", "projected"):
            for flag in (True, False):
                value = estimate(record, record.ids, estimator=estimator, interpolate=flag)["final"][name]
                assert value == pytest.approx(final[f"eval_{name}"], abs=1e-5)
                assert value == record.eval_losses[12][name]  # exactly: the change is zero, not small
    assert est["rows_moved"] == 0
    assert all(d["delta_norm"] == 0.0 for d in est["diagnostics"])
    # The recorder's losses at the checkpoints are the trainer's own evaluations there.
    metrics = {json.loads(x)["step"]: json.loads(x) for x in (run["train"] / "metrics.jsonl").read_text().splitlines()}
    for step, value in est["curves"]["clean"].items():
        assert value == pytest.approx(metrics[int(step)]["eval_clean"], abs=1e-5)
    # The replay of the reference order points where the run went.
    assert all(d["replay_cosine"] > 0.5 for d in est["diagnostics"])


def test_another_order_moves_the_estimate(run):
    record = load_record(run["train"])
    reverse = estimate(record, record.ids[::-1])
    assert reverse["rows_moved"] == 60
    for estimator in ("anchored", "projected"):
        assert reverse["by_estimator"][estimator]["final"]["clean"] != reverse["reference_final"]["clean"]
    with pytest.raises(ConfigError, match="estimator"):
        estimate(record, record.ids, estimator="second_order")
    assert all(d["delta_norm"] > 0 for d in reverse["diagnostics"])


def test_whatif_refuses_rows_the_run_did_not_train_on(run, tmp_path, capsys):
    from pipeline.cli import main

    record = load_record(run["train"])
    with pytest.raises(ConfigError, match="did not train on"):
        estimate(record, [*record.ids[:-1], "not-a-row"])
    with pytest.raises(ConfigError, match="leaves out 1"):
        estimate(record, record.ids[:-1])
    with pytest.raises(ConfigError, match="repeats"):
        estimate(record, [*record.ids[:-1], record.ids[0]])
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join([*record.ids[1:], "syn-9999999"]) + "\n")
    assert main(["whatif", str(run["train"]), "--order", str(bad), "--out", str(tmp_path / "w")]) == 2
    assert "the run did not train on" in capsys.readouterr().err


def test_whatif_ranks_and_a_retrain_of_the_reference_is_exact(run, tmp_path):
    record = load_record(run["train"])
    reverse = tmp_path / "reverse.json"
    reverse.write_text(json.dumps(record.ids[::-1]))
    summary = run_whatif(run["train"], ["reference", f"reversed={reverse}"], tmp_path / "w", verify=1,
                         log=lambda m: None)
    assert sorted(summary["ranking"]) == ["reference", "reversed"]
    assert summary["verified"] == 2  # the best and the worst
    by_name = {r["name"]: r for r in summary["orders"]}
    ref = by_name["reference"]
    final = run["summary"]["final"]
    for name in ("clean", "mixed"):
        # Recording does not disturb the run: retraining the same order without it gives the same weights.
        assert ref["real"]["final"][name] == pytest.approx(final[f"eval_{name}"], abs=1e-6)
        assert ref["abs_error"][name] < 1e-5
    rev = by_name["reversed"]
    assert set(rev["real"]["curves"]["clean"]) >= set(rev["estimate"]["curves"]["clean"])
    saved = json.loads((tmp_path / "w" / "whatif.json").read_text())
    assert saved["ranking"] == summary["ranking"] and "results.md" in {p.name for p in (tmp_path / "w").iterdir()}


def test_order_stage_methods_build_candidates(run, ray_address):
    table = read_table(run["data"])
    ids = method_order(table, {"method": "quality_descending", "key": "quality", "higher_is_better": True}, 0,
                       ray_address)
    quality = dict(zip(table.column("id").to_pylist(), table.column("quality").to_pylist()))
    values = [quality[i] for i in ids]
    assert sorted(ids) == sorted(quality) and values == sorted(values, reverse=True)
    record = load_record(run["train"])
    assert estimate(record, ids)["rows_moved"] > 0


# --------------------------------------------------------------------------- the second-order option


def test_second_order_gives_back_the_reference_exactly(run):
    record = load_record(run["train"])
    for model in SECOND_ORDER:
        for estimator in ESTIMATORS:
            est = estimate(record, record.ids, estimator=estimator, second_order=model)
            assert est["second_order"] == model
            for name in ("clean", "mixed"):
                assert est["final"][name] == record.eval_losses[12][name]  # Δθ = 0: no term at all
                assert est["first_order_final"][name] == est["final"][name]
            assert all(d[f"second_order_{n}"]["term"] == 0.0 for d in est["diagnostics"] for n in ("clean", "mixed"))


def test_second_order_term_is_the_secant_curvature_of_the_stored_arrays(run):
    record = load_record(run["train"])
    order = record.ids[::-1]
    new = replay(record, check_permutation(record, order), record.rows)
    ref = replay(record, np.arange(len(record.ids)), record.rows)
    # By hand: checkpoints 4, 8, 12; the pair ending at each one (4 borrows 4 -> 8).
    pairs = {4: (4, 8), 8: (4, 8), 12: (8, 12)}
    trajectory = estimate(record, order, second_order="trajectory")
    bfgs = estimate(record, order, second_order="bfgs")
    assert trajectory["first_order_final"] == bfgs["first_order_final"] == estimate(record, order)["final"]
    checked = 0
    for row_t, row_b in zip(trajectory["diagnostics"], bfgs["diagnostics"]):
        c = row_t["step"]
        a, b = pairs[c]
        s = record.theta[b] - record.theta[a]
        delta = new[c] - ref[c]
        for name in ("clean", "mixed"):
            y = record.eval_grads[b][name] - record.eval_grads[a][name]
            ys = float(y @ s)
            ok = ys > 2 * np.linalg.norm(y) * np.linalg.norm(s) / np.sqrt(DIM)
            assert row_t[f"second_order_{name}"]["status"] == row_b[f"second_order_{name}"]["status"]
            assert (row_t[f"second_order_{name}"]["status"] == "ok") == ok
            expected_t = 0.5 * ys * float(delta @ s) ** 2 / float(s @ s) ** 2 if ok else 0.0
            expected_b = 0.5 * float(y @ delta) ** 2 / ys if ok else 0.0
            for est, row, expected in ((trajectory, row_t, expected_t), (bfgs, row_b, expected_b)):
                assert row[f"second_order_{name}"]["term"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
                for e in ESTIMATORS:
                    by = est["by_estimator"][e]
                    first, second = by["curves"][name][str(c)], by["second_order"]["curves"][name][str(c)]
                    assert second - first == pytest.approx(expected, rel=1e-6, abs=1e-12)
            checked += ok
    assert checked >= 2  # the run's curvature is resolved somewhere, so the terms above are not all zero
    assert any(trajectory["final"][n] > trajectory["first_order_final"][n] for n in ("clean", "mixed"))


def test_second_order_flag_is_validated(run, tmp_path, capsys):
    from dataclasses import replace

    from pipeline.cli import main

    record = load_record(run["train"])
    for bad in ("hessian", True, 2):
        with pytest.raises(ConfigError, match="second_order"):
            estimate(record, record.ids, second_order=bad)
    one = replace(record, meta={**record.meta, "checkpoints": [12]})
    with pytest.raises(ConfigError, match="two checkpoints"):
        estimate(one, record.ids, second_order="trajectory")
    assert estimate(one, record.ids)["final"] == estimate(record, record.ids)["final"]  # first order still works
    with pytest.raises(SystemExit):
        main(["whatif", str(run["train"]), "--order", "reference", "--second-order", "hessian"])
    reverse = tmp_path / "reverse.json"
    reverse.write_text(json.dumps(record.ids[::-1]))
    assert main(["whatif", str(run["train"]), "--order", "reference", "--order", f"rev={reverse}",
                 "--second-order", "--out", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert "second order, trajectory curvature [first order]" in printed and "|2nd|/|1st|" in printed
    saved = json.loads((tmp_path / "w" / "whatif.json").read_text())
    assert saved["second_order"] == "trajectory" and set(saved["by_estimator"]) == {
        "projected", "anchored", "projected_second_order", "anchored_second_order"}
    rev = next(o for o in saved["orders"] if o["name"] == "rev")["estimate"]
    assert rev["final"] == rev["by_estimator"]["projected"]["second_order"]["final"]
    assert "1st clean" in (tmp_path / "w" / "results.md").read_text()
