"""`curriculum select`: iterative kMQ end to end (3 rounds, a proxy trained by the project's trainer),
interrupted in the second round's training and resumed; the weight update; config errors.

The input is the synthetic graded corpus with ``cluster`` = the topic's index and a ``ppl``
column from the project's perplexity kernel under a tiny reference LM trained here (the
perplexity stage's parts, run in-process to keep the test short); the proxy shares its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.core.hashing import hash64
from pipeline.engine.config import validate_config
from pipeline.engine.report import inspect_run
from pipeline.engine.runner import run_pipeline
from pipeline.engine.select import update_weights
from pipeline.io.synth import TOPICS, graded_document
from pipeline.models.causal_lm_scorer import PerplexityScorer
from pipeline.models.reference_lm import ReferenceLMSpec, train_reference_lm
from stages.kmq import UNSELECTED, allocate, gumbel, minimums

N, ROUNDS, BUDGET = 360, 3, 108  # budget 0.3 of 360
TOPIC_NAMES = sorted(TOPICS)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input parquet, reference LM folder)."""
    root = tmp_path_factory.mktemp("select")
    rows = [graded_document(i, seed=0) for i in range(N)]
    texts = [r["text"] for r in rows]
    spec = ReferenceLMSpec(max_docs=200, vocab_size=400, seq_len=64, steps=30, batch_size=8, threads=1,
                           model={"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2})
    train_reference_lm(texts[:200], root / "reference", spec, max_length=64, seed=0, key="test")
    nll, _, _ = PerplexityScorer(str(root / "reference"), max_length=64, threads=1).score_texts(texts)
    truth = np.array([r["true_quality"] for r in rows])
    path = root / "input.parquet"
    pq.write_table(pa.table({
        "id": [r["id"] for r in rows], "text": texts,
        "cluster": pa.array([TOPIC_NAMES.index(r["topic"]) for r in rows], pa.int32()),
        "true_quality": truth, "quality": truth + np.random.default_rng(0).normal(0, 0.1, N), "ppl": np.exp(nll),
    }), path)
    return path, root / "reference"


def config(inputs: tuple[Path, Path], **select: Any) -> dict[str, Any]:
    path, reference = inputs
    return {
        "run": {"name": "select", "seed": 0},
        "input": {"format": "parquet", "path": str(path), "id_field": "id"},
        "stages": [{"name": "order", "method": "quality_descending", "key": "quality"}],
        "select": {
            "rounds": ROUNDS, "budget": 0.3, "temperature": 0.2,
            "scorer": {"kind": "ppl_ratio", "reference_column": "ppl", "max_length": 64, "concurrency": 1},
            "proxy": {"model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                           "n_positions": 64}},
                      "tokenizer": str(reference), "seq_len": 64, "batch_size": 8, "max_tokens": 30 * 8 * 64,
                      "threads": 1},
            **select,
        },
        "output": {"rows_per_shard": 40},
    }


class Interrupted(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way out catches it."""


def test_three_rounds_end_to_end_interrupted_and_resumed(inputs, tmp_path: Path, ray_address: str):
    out = tmp_path / "run"
    cfg = validate_config(config(inputs))
    first: list[str] = []

    def kill_in_round_2_training(message: str) -> None:
        first.append(message)
        if message.startswith("[train] step") and any("round 1/3 saved" in m for m in first):
            raise Interrupted  # round 2's proxy is at its last step; its last checkpoint is not written yet

    with pytest.raises(Interrupted):
        run_pipeline(cfg, out, address=ray_address, log=kill_in_round_2_training, select=True)
    step_dir = next(out.glob("stages/01-select-*"))
    round_1 = (step_dir / "artifacts" / "round-1" / "state.json").read_bytes()
    assert not (step_dir / "artifacts" / "round-2" / "state.json").exists()
    assert not (out / "manifest.json").exists()

    second: list[str] = []
    manifest = run_pipeline(cfg, out, address=ray_address, log=second.append, select=True)
    assert "[select] round 1/3: done earlier (36 rows selected)" in second
    assert any(m.startswith("[train] resuming from step-") for m in second)  # round 2's proxy continued
    assert (step_dir / "artifacts" / "round-1" / "state.json").read_bytes() == round_1

    select = manifest["select"]
    rounds = select["round_detail"]
    assert select["rounds"] == ROUNDS and select["selected"] == BUDGET == select["budget_rows"]
    assert [r["rows"] for r in rounds] == [36, 36, 36] and [r["selected"] for r in rounds] == [36, 72, 108]
    assert rounds[0]["weights"] == [1.0] * 10  # round 1: static kMQ proportions
    for before, after in zip(rounds, rounds[1:]):
        assert after["weights"] == before["weights_after"]
        expected, _ = update_weights(np.array(before["weights"]), np.array(before["scores"], dtype=float),
                                     "proportional")
        assert np.allclose(after["weights"], expected, atol=2e-6)
    assert "scores" not in rounds[-1] and "weights_after" not in rounds[-1]  # no proxy after the last round
    assert all(r["proxy"]["steps"] == 30 and r["proxy"]["tokenizer"].startswith("train.tokenizer")
               for r in rounds[:-1])

    # the budgets: the round's part split ∝ size × weight among the rows left, at least one per cluster in round 1
    sizes = np.array([c["size"] for c in select["per_cluster"]])
    taken = np.zeros(10, dtype=np.int64)
    for r in rounds:
        lower = minimums(sizes, r["rows"], 1, taken)
        assert r["budgets"] == allocate(r["rows"], sizes, np.array(r["weights"]), lower=lower,
                                        upper=sizes - taken).tolist()
        taken += np.array(r["budgets"])
    assert [c["selected"] for c in select["per_cluster"]] == taken.tolist()

    # the shards hold exactly the rows each round's Gumbel-top-k prefix gives, in the order stage's order
    table = pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])
    assert table.num_rows == BUDGET and table["position"].to_pylist() == list(range(BUDGET))
    quality = table["quality"].to_numpy()
    assert np.all(np.diff(quality) <= 0)  # quality_descending
    source = pq.read_table(inputs[0])
    z = source["quality"].to_numpy() / 0.2 + gumbel(source["id"].to_pylist(), 0)
    expected_round = {}
    cumulative = np.cumsum([r["budgets"] for r in rounds], axis=0)
    for j in range(10):
        members = np.flatnonzero(source["cluster"].to_numpy() == j)
        ranked = members[np.lexsort((np.array(source["id"].to_pylist())[members], -z[members]))]
        for rank, row in enumerate(ranked):
            done = np.flatnonzero(rank < cumulative[:, j])
            if done.size:
                expected_round[source["id"][int(row)].as_py()] = int(done[0]) + 1
    assert dict(zip(table["id"].to_pylist(), table["kmq_round"].to_pylist())) == expected_round
    for r in rounds:  # the manifest's id hashes are those of the rows each round selected
        ids = [i for i, k in expected_round.items() if k == r["round"]]
        assert r["ids"] == {"rows": len(ids), "hash": f"{int(sum(int(h) for h in hash64(ids, 0, 'select.ids'))) % 2**64:016x}"}

    # round 1's recorded cluster scores: S = log(ppl_reference) - log(ppl_proxy), re-scored here
    chosen = source.filter(pa.array([expected_round.get(i) == 1 for i in source["id"].to_pylist()]))
    proxy = PerplexityScorer(str(step_dir / "artifacts" / "round-1" / "proxy" / "final"), max_length=64, threads=1)
    nll, _, _ = proxy.score_texts(chosen["text"].to_pylist())
    s = np.log(chosen["ppl"].to_numpy()) - nll
    clusters = chosen["cluster"].to_numpy()
    assert np.allclose(rounds[0]["scores"], [s[clusters == j].mean() for j in range(10)], atol=1e-4)

    # nothing lost: the unselected rows are kept with their reason, and the counts balance
    entry = next(e for e in manifest["stages"] if e["name"] == "select")
    assert entry["dropped_by"] == {UNSELECTED: N - BUDGET} and entry["info"] == {"see": "the manifest's select section"}
    dropped = pq.read_table(step_dir / "dropped")
    assert dropped.num_rows == N - BUDGET and dropped["kmq_round"].null_count == N - BUDGET

    summary, report = inspect_run(out)
    assert "iterative kMQ (curriculum select): 108 of 360 rows selected" in summary
    assert "     r1     r2     r3  cluster" in summary  # the weights of every round, per cluster
    assert "weight r2" in report.read_text() and (report.parent / "kmq_weights_0.png").is_file()

    # a budget over the rows is a config error naming it (exit 2); the finished run is left as it was
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config(inputs, budget=N + 1)))
    assert main(["select", str(bad), "--out", str(out), "--ray-address", ray_address]) == 2
    assert json.loads((out / "manifest.json").read_text())["run_id"] == manifest["run_id"]


def test_weight_update_rules():
    w = np.array([1.0, 2.0, 1.0])
    new, note = update_weights(w, np.array([1.0, 2.0, 3.0]), "proportional")  # the paper's rule: w_j s_j / Σ s
    assert np.allclose(new, w * [1, 2, 3] / (w * [1, 2, 3]).sum() * 3) and "shift" not in note
    new, note = update_weights(w, np.array([-2.0, 0.0, 2.0]), "proportional")  # shifted: lowest -> mean |s| = 4/3
    assert note["shift"] == pytest.approx(2 + 4 / 3)
    assert np.allclose(new, w * [4 / 3, 10 / 3, 16 / 3] / (w * [4 / 3, 10 / 3, 16 / 3]).sum() * 3)
    new, note = update_weights(w, np.array([-1.0, np.nan, 1.0]), "proportional")  # no score: the others' mean, 0
    assert note["filled"] == 1 and np.allclose(new, w * [2, 5, 8] / (w * [2, 5, 8]).sum() * 3)  # shift 1 + 2/3
    new, note = update_weights(w, np.zeros(3), "proportional")
    assert np.array_equal(new, w) and note["unchanged"] == "every score is 0"
    new, _ = update_weights(w, np.array([0.0, np.log(2), 0.0]), "softmax")  # w_j exp(s_j) / Z
    assert np.allclose(new, [0.5, 2.0, 0.5])
    new, _ = update_weights(w, np.array([0.0, 2 * np.log(2), 0.0]), "softmax", temperature=2.0)
    assert np.allclose(new, [0.5, 2.0, 0.5])
    assert update_weights(w, np.full(3, np.nan), "softmax")[1]["unchanged"] == "no cluster has a score"


@pytest.mark.parametrize("change, message", [
    ({"rounds": 0}, "select.rounds: Input should be greater than or equal to 1"),
    ({"budget": 1.5}, "select.budget: a fraction of the rows must be in (0, 1]"),
    ({"scorer": {"colum": "quality"}}, "select.scorer.colum: unknown key (allowed: column, concurrency"),
    ({"scorer": {"kind": "column"}}, "select.scorer.column: kind 'column' needs column"),
    ({"update": "softmax2"}, "select.update: Input should be 'proportional' or 'softmax'"),
    ({"update_temperature": 2.0}, "select.update_temperature: only update: softmax has a temperature"),
    ({"proxy": {"seq_len": 4}}, "select.proxy.seq_len: Input should be greater than or equal to 8"),
])
def test_select_config_errors_exit_2_naming_the_key(inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    change: dict[str, Any], message: str):
    raw = config(inputs)
    raw["select"] = {**raw["select"], **change}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["select", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_select_needs_its_section_and_no_kmq_stage(inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    raw = config(inputs)
    del raw["select"]
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["select", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "select: the config has no select: section" in capsys.readouterr().err
    raw = config(inputs)
    raw["stages"].insert(0, {"name": "kmq", "budget": 0.3})
    path.write_text(yaml.safe_dump(raw))
    assert main(["select", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "stages[0]: a kmq stage selects once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
