"""`curriculum ablate` on a real run folder: three topic partitions, every mixture of up to three
scored by the merged model, two trained for real; the merge is the exact mean; Spearman; config errors."""

from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.engine.ablate import choose_real, interleave, spearman
from tests.test_train_loader import RUN_CONFIG, build_run_folder

PARTITIONS = ["astronomy", "cooking", "law"]
TRAIN = {
    "model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
    "tokenizer_vocab_size": 400,
    "tokenizer_sample_docs": 120,
    "seq_len": 32,
    "batch_size": 4,
    "max_tokens": 6 * 4 * 32,  # 6 steps per model
    "optimizer": {"lr": 0.003},
    "schedule": {"kind": "constant", "warmup": 0},
    "eval": {"max_tokens": 256},
    "log_every": 3,
    "threads": 1,
    "device": "cpu",
}
ABLATE = {"partition_by": "topic", "partitions": PARTITIONS, "max_size": 3, "real_mixtures": 2,
          "base_tokens": 4 * 4 * 32, "heldout": 0.2, "keep_merged": True}


def _config(folder: Path, ablate: dict, name: str = "ablate.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**RUN_CONFIG, "train": TRAIN, "ablate": ablate}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    run_dir = build_run_folder(tmp_path_factory, ray_address)
    folder = tmp_path_factory.mktemp("ablate")
    out = folder / "out"
    assert main(["ablate", str(_config(folder, ABLATE)), "--data", str(run_dir), "--out", str(out)]) == 0
    return out


def test_every_mixture_is_scored_and_two_are_trained(ablation: Path):
    summary = json.loads((ablation / "summary.json").read_text())
    with open(ablation / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 + 3 + 1 == summary["mixtures"]  # C(3,1) + C(3,2) + C(3,3)
    assert [r["combination"] for r in rows[:3]] == PARTITIONS
    assert all(float(r["proxy_loss"]) > 0 for r in rows)
    trained = [r for r in rows if r["real_kind"] == "trained"]
    assert len(trained) == 2 and all(int(r["size"]) >= 2 for r in trained)
    assert sorted(summary["real_trained"]) == sorted(r["combination"] for r in trained)
    for row, kept in zip(trained, summary["trained_rows"]):
        assert row["combination"] == kept["combination"]
        assert float(row["real_loss"]) == pytest.approx(kept["real_loss"], abs=1e-4)
    # A one-partition mixture's proxy is its own model: the merge of one model is that model.
    for r in rows[:3]:
        assert r["real_kind"] == "partition model"
        assert float(r["proxy_loss"]) == pytest.approx(float(r["real_loss"]), abs=1e-5)
        assert float(r["baseline_loss"]) == pytest.approx(float(r["real_loss"]), abs=1e-9)
    # The mean held-out loss is the mean of the per-partition held-out losses.
    for r in rows:
        parts = [float(r[f"proxy_heldout_{p}"]) for p in PARTITIONS]
        assert float(r["proxy_loss"]) == pytest.approx(sum(parts) / 3, abs=1e-4)
    rho = summary["spearman"]
    assert rho["n"] == 2 and rho["n_with_singletons"] == 5
    expected = spearman([float(r["proxy_loss"]) for r in trained], [float(r["real_loss"]) for r in trained])
    assert rho["proxy_vs_real"] == pytest.approx(expected)
    compute = summary["compute"]
    assert compute["partition_models"]["models"] == 3
    assert compute["partition_models"]["tokens"] == 3 * TRAIN["max_tokens"]
    assert compute["real_mixtures"]["tokens"] == 2 * TRAIN["max_tokens"]  # the same budget, split
    assert compute["base"]["tokens"] == ABLATE["base_tokens"]
    assert all(compute[k]["seconds"] > 0 for k in ("base", "partition_models", "real_mixtures", "proxy_eval"))
    assert (ablation / "results.md").read_text().count("\n") == 2 + 7


def test_rerun_picks_the_trainings_up(ablation: Path):
    """The same command again trains nothing: every training folder resumes at its last step."""
    before = json.loads((ablation / "summary.json").read_text())
    paths = [ablation / "base" / "metrics.jsonl", *ablation.glob("*/*/metrics.jsonl")]
    metrics = {p: p.read_text() for p in paths}
    assert len(metrics) == 1 + 3 + 2
    config, run_dir = ablation.parent / "ablate.yaml", ablation.parent.parent / "train-run"  # as the fixture made them
    assert main(["ablate", str(config), "--data", str(run_dir), "--out", str(ablation)]) == 0
    after = json.loads((ablation / "summary.json").read_text())
    assert all(p.read_text() == text for p, text in metrics.items())  # no step was trained again
    assert after["spearman"] == before["spearman"] and after["trained_rows"] == before["trained_rows"]
    for key in ("base", "partition_models", "real_mixtures"):
        assert after["compute"][key] == before["compute"][key]  # the recorded cost of the trainings, not of the rerun


def test_proxy_weights_are_the_mean_of_the_partition_models(ablation: Path):
    models = {p: load_file(str(ablation / "models" / p / "final" / "model.safetensors")) for p in PARTITIONS}
    base = load_file(str(ablation / "base" / "final" / "model.safetensors"))
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(models["astronomy"][key], models["cooking"][key])  # they did train apart
    assert not torch.equal(models["astronomy"][key], base[key])
    for size in (2, 3):
        for combo in combinations(PARTITIONS, size):
            merged = load_file(str(ablation / "merged" / "+".join(combo) / "model.safetensors"))
            assert set(merged) == set(models["law"])
            for name, tensor in merged.items():
                mean = torch.stack([models[p][name].double() for p in combo]).mean(0)
                # float32 accumulation of w * theta: equal to the float64 mean up to float32 rounding
                assert torch.allclose(tensor.double(), mean, rtol=0, atol=4e-7 * (1 + mean.abs().max().item())), name


def test_spearman_matches_scipy_and_a_hand_computation():
    from scipy.stats import spearmanr

    x = [0.3, 1.2, 0.7, 0.7, 2.5, -1.0]
    y = [1.0, 3.0, 2.0, 5.0, 4.0, 0.0]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    # No ties: 1 - 6 Σd² / (n (n² − 1)); ranks of x 2,4,3,1 and y 1,4,2,3: Σd² = 1+0+1+4 = 6 -> 1 - 36/60 = 0.4
    assert spearman([2.0, 4.0, 3.0, 1.0], [10.0, 40.0, 20.0, 30.0]) == pytest.approx(0.4)
    assert spearman([1.0, 2.0], [3.0, 3.0]) is None and spearman([1.0], [2.0]) is None


def test_real_mixtures_are_a_seeded_choice_and_data_interleaves():
    combos = [c for k in (1, 2, 3) for c in combinations("abcde", k)]
    first = choose_real(combos, 4, 2, seed=0)
    assert first == choose_real(combos, 4, 2, seed=0) and len(first) == 4 and all(len(c) >= 2 for c in first)
    assert first != choose_real(combos, 4, 2, seed=1)
    assert interleave([[1, 2, 3], ["a"], [10, 20]]) == [1, "a", 10, 2, 20, 3]


def test_bad_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = _config(tmp_path, {**ABLATE, "max_sise": 2})
    assert main(["ablate", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "ablate.max_sise: unknown key" in capsys.readouterr().err
    config = _config(tmp_path, {**ABLATE, "partition_by": "colour"}, "b.yaml")
    (tmp_path / "run" / "shards").mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "position": [0]}), tmp_path / "run" / "shards" / "part-00000.parquet")
    (tmp_path / "run" / "manifest.json").write_text("{}")
    assert main(["ablate", str(config), "--data", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert "ablate.partition_by: the shards have no column 'colour'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
