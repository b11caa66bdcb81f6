"""``curriculum study``: a tiny grid end to end on the session's Ray, resume, a failed run, config errors."""

from __future__ import annotations

import copy
import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.core.errors import ConfigError
from pipeline.engine.study import DONE, run_study, validate_study
from tests.kill_harness import draw_kill, killed

# 2 orders x 2 schedules x 2 seeds, ~11 steps of 4 x 32 tokens on a 1-layer GPT-2 of width 32.
TINY = {
    "run": {"name": "tiny-study", "seed": 0},
    "input": {"format": "synthetic", "synthetic": {"docs": 60, "kind": "graded"}},
    "stages": [],
    "output": {"rows_per_shard": 60},
    "train": {
        "model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
        "tokenizer_vocab_size": 300, "seq_len": 32, "batch_size": 4,
        "schedule": {"warmup": 0.1},
        "averaging": {"last_k": 3, "window": 0.5},
        "eval": {"max_tokens": 256, "sets": {"clean": {"synthetic": {"docs": 8, "seed": 1000, "min_quality": 0.7}},
                                             "mixed": {"synthetic": {"docs": 8, "seed": 1000}}}},
        "log_every": 2, "threads": 1,
    },
    "study": {
        "orders": {"uniform": {"method": "random"},
                   "ascending": {"method": "quality_ascending", "key": "true_quality"}},
        "schedules": {"cosine_300": {"kind": "cosine", "final_lr_ratio": 1 / 300}, "constant": {"kind": "constant"}},
        "seeds": [0, 1],
        "epochs": 0.1,
        "curve_points": 3,
    },
}
AVERAGING = ["none", "sma", "ema"]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


@pytest.fixture(scope="module")
def study_dir(ray_address: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    run_study(validate_study(copy.deepcopy(TINY)), out, address=ray_address, log=lambda message: None)
    return out


def test_tables_are_the_mean_and_sd_of_the_seeds(study_dir: Path):
    runs = _csv(study_dir / "runs.csv")
    assert len(runs) == 2 * 2 * 2 * len(AVERAGING)
    arms = _csv(study_dir / "results.csv")
    assert len(arms) == 2 * 2 * len(AVERAGING)
    for arm in arms:
        assert arm["seeds"] == "2"
        mine = [r for r in runs if (r["order"], r["schedule"], r["averaging"]) == (arm["order"], arm["schedule"],
                                                                                   arm["averaging"])]
        for metric in ("high_quality", "mixed"):
            values = [float(r[metric]) for r in mine]
            assert float(arm[f"{metric}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-9)
            assert float(arm[f"{metric}_sd"]) == pytest.approx(statistics.stdev(values), abs=1e-9)

    # The effect is the curriculum's loss minus the baseline's, paired by seed.
    effects = _csv(study_dir / "effects.csv")
    assert {(e["schedule"], e["averaging"]) for e in effects} == {(s, a) for s in ("cosine_300", "constant")
                                                                   for a in AVERAGING}
    index = {(r["order"], r["schedule"], r["averaging"], r["seed"]): float(r["high_quality"]) for r in runs}
    for e in effects:
        diffs = [index[("ascending", e["schedule"], e["averaging"], s)] - index[("uniform", e["schedule"],
                                                                                  e["averaging"], s)] for s in "01"]
        assert float(e["high_quality_effect_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-9)
        assert float(e["high_quality_effect_sd"]) == pytest.approx(statistics.stdev(diffs), abs=1e-9)
        assert e["class"] == ("to_zero" if e["schedule"] == "cosine_300" else "moderate")

    # Final weights are the trainer's own; the averages are other weights of the same run.
    result = json.loads((study_dir / "arms" / "uniform__constant__s0" / "result.json").read_text())
    summary = json.loads((study_dir / "arms" / "uniform__constant__s0" / "train" / "summary.json").read_text())
    assert result["losses"]["none"]["high_quality"] == summary["final"]["eval_clean"]
    assert result["losses"]["sma"]["high_quality"] == summary["averaged"]["eval_clean"]
    assert len({result["losses"][m]["high_quality"] for m in AVERAGING}) == 3
    assert result["epochs"] == pytest.approx(0.1, abs=0.02)  # study.epochs set the budget
    assert not (study_dir / "arms" / "uniform__constant__s0" / "train" / "checkpoints").exists()

    # The random order differs between seeds; the quality sort reads no seed, so its data is made once.
    study = json.loads((study_dir / "study.json").read_text())
    assert study["max_tokens"] == result["tokens"]
    assert sorted(p.name for p in (study_dir / "data").iterdir()) == ["ascending-s0", "uniform-s0", "uniform-s1"]
    md = (study_dir / "results.md").read_text()
    assert "The paper's direction" in md and "ascending − uniform" in md
    assert sorted(p.name for p in (study_dir / "plots").glob("*.png")) == [
        "bars.png", "effects.png", "loss_curves.png", "lr_curves.png"]
    curves = _csv(study_dir / "curves.csv")
    assert {c["order"] for c in curves} == {"uniform", "ascending"}
    constant_lrs = {float(c["lr"]) for c in curves if c["schedule"] == "constant" and int(c["step"]) > 2}
    assert constant_lrs == {0.003}


def test_inspect_writes_the_study_report(study_dir: Path, capsys):
    assert main(["inspect", str(study_dir)]) == 0
    assert "report/index.html" in capsys.readouterr().out
    page = (study_dir / "report" / "index.html").read_text()
    assert "The paper&#x27;s direction" in page and "effects.png" in page
    assert (study_dir / "report" / "effects.png").is_file()


def test_rerun_redoes_only_unfinished_runs_and_reports_a_failure(study_dir: Path, ray_address: str):
    arms = study_dir / "arms"
    before = {p.parent.name: p.stat().st_mtime_ns for p in arms.glob("*/result.json")}
    assert len(before) == 8
    (arms / "uniform__constant__s1" / DONE).unlink()  # as if killed before its marker
    broken = arms / "ascending__cosine_300__s0"
    (broken / DONE).unlink()
    torn = broken / "train" / "checkpoints" / "step-0000005"
    torn.mkdir(parents=True)
    (torn / "state.json").write_text("{ torn")  # a checkpoint cut short on disk

    report = run_study(validate_study(copy.deepcopy(TINY)), study_dir, address=ray_address, log=lambda m: None)
    assert (report["trained"], report["skipped"]) == (2, 6)
    after = {p.parent.name: p.stat().st_mtime_ns for p in arms.glob("*/result.json")}
    changed = sorted(name for name in before if after[name] != before[name])
    assert changed == ["uniform__constant__s1"]
    assert (arms / "uniform__constant__s1" / DONE).is_file()
    assert [(f["order"], f["schedule"], f["seed"]) for f in report["failed"]] == [("ascending", "cosine_300", 0)]
    assert "JSONDecodeError" in report["failed"][0]["error"]
    assert not (broken / DONE).exists() and (broken / "error.txt").is_file()
    # The failed run is left out of the means and of the paired effect; the other arms are whole.
    rows = {(r["order"], r["schedule"], r["averaging"]): r for r in _csv(study_dir / "results.csv")}
    assert rows[("ascending", "cosine_300", "none")]["seeds"] == "1"
    assert _num(rows[("ascending", "cosine_300", "none")]["high_quality_sd"]) is None
    assert rows[("uniform", "constant", "none")]["seeds"] == "2"
    effects = {(e["schedule"], e["averaging"]): e for e in _csv(study_dir / "effects.csv")}
    assert effects[("cosine_300", "none")]["pairs"] == "1" and effects[("constant", "none")]["pairs"] == "2"
    assert "Failed runs" in (study_dir / "results.md").read_text()


def test_killed_mid_arm_resumes_to_the_same_results(study_dir: Path, ray_address: str, cli, tmp_path: Path):
    """SIGKILL `curriculum study` while an arm trains (seeded kill point, tests/kill_harness.py): the
    rerun resumes that arm from its checkpoints, and every arm's losses are the uninterrupted study's."""
    raw = copy.deepcopy(TINY)
    raw["study"]["schedules"] = {"constant": {"kind": "constant"}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "killed"
    args = ["study", str(config), "--out", str(out), "--ray-address", ray_address]
    kill = draw_kill(1700, "arm", 3)  # at most three checkpoints are kept per arm at a time
    killed(args, kill)
    assert not (out / "results.json").exists()

    resumed = cli(*args)  # not killed: in this process
    assert resumed.returncode == 0, f"[{kill}] {resumed.stderr[-2000:]}"
    logs = [p.read_text() for p in (out / "arms").glob("*/train.log")]
    assert any("resuming from step-" in log for log in logs), f"[{kill}] no arm resumed from a checkpoint"
    for arm in ("uniform__constant__s0", "uniform__constant__s1", "ascending__constant__s0", "ascending__constant__s1"):
        mine = json.loads((out / "arms" / arm / "result.json").read_text())
        theirs = json.loads((study_dir / "arms" / arm / "result.json").read_text())
        assert mine["losses"] == theirs["losses"] and mine["curve"] == theirs["curve"], f"[{kill}] {arm} differs"


@pytest.mark.parametrize("override, key", [
    ({"schedulez": {}}, "study.schedulez: unknown key"),
    ({"orders": {"uniform": {"method": "random"}, "ascending": {"method": "bogus"}}}, "study.orders.ascending.method"),
    ({"schedules": {"wsd": {"kind": "wsd", "decay_shap": "linear"}}}, "study.schedules.wsd.decay_shap: unknown key"),
    ({"seeds": [0]}, "study.seeds"),
    ({"eval": {"high_quality": "nope"}}, "study.eval.high_quality: 'nope' is not one of train.eval.sets"),
    ({"curriculum": "descending"}, "study.curriculum"),
])
def test_config_errors_name_the_key(override: dict, key: str):
    raw = copy.deepcopy(TINY)
    raw["study"].update(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        validate_study(raw)


def test_cli_exits_2_on_a_bad_study_key(tmp_path: Path, capsys):
    import yaml

    raw = copy.deepcopy(TINY)
    raw["study"]["averaging"] = ["none", "median"]
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["study", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "study.averaging.1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    del raw["study"]
    config.write_text(yaml.safe_dump(raw))
    assert main(["study", str(config)]) == 2
    assert "study: the config has no study: section" in capsys.readouterr().err


def test_a_budget_too_short_for_the_averaging_window_names_the_run_and_key():
    from pipeline.engine.study import Arm

    raw = copy.deepcopy(TINY)
    raw["train"]["averaging"] = {"last_k": 6, "window": 8}
    study = validate_study(raw)  # fine for train.max_tokens; the budget from study.epochs is shorter
    with pytest.raises(ConfigError, match=r"run uniform__constant__s0 .*\n  train\.averaging\.window: 8 steps"):
        study.train_dict(Arm("uniform", "constant", 0), None, 640)
