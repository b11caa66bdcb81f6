"""`curriculum train` end to end on a real run folder: outputs, exact resume after SIGKILL,
two Ray Train workers in curriculum order, config errors, presets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.train.schedules import lr_at, make_schedule
from tests.conftest import run_in_process
from tests.kill_harness import checkpoint_kill
from tests.test_train_loader import RUN_CONFIG, build_run_folder

ROOT = Path(__file__).resolve().parents[1]

TRAIN = {
    "model": {"config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}},
    "tokenizer_vocab_size": 400,
    "tokenizer_sample_docs": 120,
    "seq_len": 32,
    "batch_size": 8,
    "grad_accum": 2,
    "max_tokens": 40 * 8 * 32,  # 40 steps
    "optimizer": {"lr": 0.003},
    "schedule": {"kind": "wsd", "warmup": 4, "decay_fraction": 0.3, "decay_shape": "1-sqrt", "final_lr_ratio": 0.333},
    "averaging": {"method": "ema", "last_k": 3, "alpha": 0.2, "window": 0.25},  # the last 10 steps: every 3
    "eval": {"every": 10, "max_tokens": 512, "sets": {"clean": {"synthetic": {"docs": 20, "min_quality": 0.7}}}},
    "log_every": 1,
    "threads": 1,
    "trace": True,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    return build_run_folder(tmp_path_factory, ray_address)


def _config_file(folder: Path, train: dict, name: str = "train.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**RUN_CONFIG, "train": train}, sort_keys=False))
    return path


def _train_cmd(config: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", str(config), "--data", str(data), "--out", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def reference(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted `curriculum train`, in this process: (config, OUT). The killed run below is a
    process of its own, so the comparison also spans the two."""
    folder = tmp_path_factory.mktemp("reference")
    config = _config_file(folder, TRAIN)
    out = folder / "out"
    done = run_in_process("train", str(config), "--data", str(run_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return config, out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_outputs_follow_the_contract(reference: tuple[Path, Path]):
    from transformers import AutoModelForCausalLM

    _, out = reference
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all({"step", "tokens", "lr", "train_loss"} <= set(r) for r in rows)
    assert [r["tokens"] for r in rows] == [256 * s for s in range(1, 41)]
    schedule = make_schedule("wsd", 0.003, total=40, warmup=4, decay_fraction=0.3, decay_shape="1-sqrt",
                             final_lr_ratio=0.333)
    assert [r["lr"] for r in rows] == [lr_at(s - 1, schedule) for s in range(1, 41)]
    assert [r["step"] for r in rows if "eval_clean" in r] == [10, 20, 30, 40]
    assert np.mean([r["train_loss"] for r in rows[-5:]]) < rows[0]["train_loss"] - 0.3  # it learns
    assert all(rows[i]["position"] >= rows[i - 1]["position"] for i in range(1, 40))  # marches through the curriculum

    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-0000034", "step-0000037", "step-0000040"]  # last_k=3 on the grid 40, 37, 34, … 1
    state = json.loads((out / "checkpoints" / "step-0000040" / "state.json").read_text())
    assert state["step"] == 40 and set(state["loader"]) == {"epoch", "row", "offset", "batch"}
    assert state["loader"]["batch"] == 40 * 2  # 40 steps x grad_accum 2 micro-batches

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["eval_clean"] == pytest.approx(rows[-1]["eval_clean"], rel=1e-6)
    averaging = json.loads((out / "averaged" / "averaging.json").read_text())
    # window 0.25 of 40 steps = 10 steps, every = 10 // 3 = 3: every averaged checkpoint is in the last 10 steps
    assert averaging["steps"] == [34, 37, 40] and averaging["method"] == "ema"
    assert (averaging["every"], averaging["last_k"], averaging["window_steps"]) == (3, 3, 10)
    assert averaging["weights"] == pytest.approx([0.64, 0.16, 0.2])  # avg <- 0.2 theta + 0.8 avg, oldest first
    assert set(summary["averaged"]) == {"eval_clean"} and np.isfinite(summary["averaged"]["eval_clean"])

    for name in ("final", "averaged"):
        model = AutoModelForCausalLM.from_pretrained(str(out / name))
        assert model.config.n_embd == 32
    final = load_file(str(out / "final" / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-0000040" / "model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    averaged = load_file(str(out / "averaged" / "model.safetensors"))
    ckpts = [load_file(str(out / "checkpoints" / f"step-{s:07d}" / "model.safetensors")) for s in (34, 37, 40)]
    key = "transformer.h.0.mlp.c_fc.weight"
    expected = sum(w * c[key].double() for w, c in zip(averaging["weights"], ckpts))
    assert torch.allclose(averaged[key].double(), expected, atol=1e-6)


def test_exact_resume_after_sigkill_mid_checkpoint_write(reference: tuple[Path, Path], run_dir: Path, cli,
                                                         tmp_path: Path):
    """SIGKILL inside a seeded checkpoint write (weights on disk, optimizer state and rename not yet)."""
    config, ref_out = reference
    out = tmp_path / "killed"
    seed = int(os.environ.get("TRAIN_KILL_SEED", 1500))
    # 14 checkpoint writes (steps 1, 4, …, 40); from the 2nd on, so the rerun has one to resume from.
    kill = checkpoint_kill(seed, 14)
    env = {**_env(), "CURRICULUM_KILL_AT": kill.point}
    proc = subprocess.run(_train_cmd(config, run_dir, out), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"[{kill}] the run was not killed: {proc.stderr[-2000:]}"
    assert not (out / "summary.json").exists()
    assert list((out / "checkpoints").glob(".step-*.tmp-*")), f"[{kill}] no half-written checkpoint was left"

    resumed = cli("train", str(config), "--data", str(run_dir), "--out", str(out))  # in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-" in resumed.stderr, f"[{kill}]"
    assert not list((out / "checkpoints").glob(".step-*.tmp-*"))
    # Every metrics line, the ones rewritten after the resume point included, is identical.
    assert (out / "metrics.jsonl").read_text() == (ref_out / "metrics.jsonl").read_text(), f"[{kill}]"
    assert (out / "trace" / "rank-0.jsonl").read_text() == (ref_out / "trace" / "rank-0.jsonl").read_text()
    for name in ("final", "averaged"):
        a = load_file(str(out / name / "model.safetensors"))
        b = load_file(str(ref_out / name / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ [{kill}]"
    s1 = json.loads((out / "summary.json").read_text())
    s2 = json.loads((ref_out / "summary.json").read_text())
    assert s1["final"] == s2["final"] and s1["averaged"] == s2["averaged"]


def test_changed_config_does_not_resume_old_checkpoints(reference: tuple[Path, Path], run_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    config, out = reference
    before = (out / "metrics.jsonl").read_text()
    code = main(["train", str(config), "--data", str(run_dir), "--out", str(out), "--set", "train.optimizer.lr=0.01"])
    assert code == 2
    assert "use a new --out" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(("key", "value"), [("threads", 2), ("deterministic", "false")])
def test_resume_refuses_other_numerics(reference: tuple[Path, Path], run_dir: Path, key: str, value: object,
                                       capsys: pytest.CaptureFixture[str]):
    config, out = reference
    before = (out / "metrics.jsonl").read_text()
    code = main(["train", str(config), "--data", str(run_dir), "--out", str(out), "--set", f"train.{key}={value}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"written with train.{key}:" in err and "bit for bit" in err and "use a new --out" in err
    assert (out / "metrics.jsonl").read_text() == before


def test_config_errors_exit_2_and_write_nothing(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = _config_file(tmp_path, TRAIN)
    out = tmp_path / "out"
    cases = [
        (["--set", "train.schedule.decay_shap=linear"], "train.schedule.decay_shap: unknown key"),
        (["--set", "train.optimiser.lr=1"], "train.optimiser: unknown key"),
        (["--set", "train.batch_size=7"], "must be a multiple of workers * grad_accum"),
        (["--set", "train.schedule.decay_shape=exp"], "train.schedule.decay_shape"),
        (["--set", "train.eval.sets.x=/nowhere.jsonl"], "train.eval.sets.x"),
        (["--set", "train.model.config.n_layers=6"], "'n_layers' is not a key of the gpt2 config (did you mean 'n_layer'?)"),
        (["--set", "train.averaging.every=5"], "train.averaging.every: give every (the checkpoint spacing) or window"),
        (["--set", "train.averaging.window=100"], "train.averaging.window: 100 steps is longer than the run (40 steps"),
        (["--set", "train.averaging.window=0.05"], "train.averaging.window: 0.05 of a 40-step run is 2 step(s)"),
        (["--set", "train.averaging.window=12.5"], "train.averaging.window: above 1 the window is a step count"),
        (["--set", "train.averaging.window=0"], "train.averaging.window: Input should be greater than 0"),
        (["--set", "train.schedule.decay_fraction=0"], "train.schedule.decay_fraction: wsd with decay_fraction 0"),
    ]
    for extra, message in cases:
        assert main(["train", str(config), "--data", str(run_dir), "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", str(config), "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert not out.exists()


def test_two_ray_train_workers_read_the_curriculum_in_order_once_per_epoch(run_dir: Path, tmp_path: Path,
                                                                           ray_address: str):
    from transformers import AutoTokenizer

    from pipeline.engine.config import validate_config
    from pipeline.train.trainer import run_training

    steps, batch = 26, 64  # a little over one epoch of the 240 documents (~85k tokens)
    train = {**TRAIN, "workers": 2, "grad_accum": 1, "seq_len": 64, "batch_size": batch,
             "max_tokens": steps * batch * 64, "tokenizer_vocab_size": 1000,
             "averaging": {"method": "sma", "last_k": 2, "every": 13}, "eval": {"every": 100, "sets": {}}}
    config = validate_config({**RUN_CONFIG, "train": train})
    out = tmp_path / "ray"
    summary = run_training(config, run_dir, out, ray_address=ray_address, log=lambda m: None)
    assert summary["workers"] == 2 and summary["steps"] == steps

    traces = {r: [json.loads(x) for x in (out / "trace" / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert len(traces[0]) == len(traces[1]) == steps
    batches = sorted((t for r in (0, 1) for t in traces[r]), key=lambda t: t["batch"])
    assert [t["batch"] for t in batches] == list(range(2 * steps))  # every global batch once
    assert all(t["batch"] % 2 == r for r in (0, 1) for t in traces[r])  # rank r: every other batch
    assert all(t["step"] == t["batch"] // 2 + 1 for t in batches)

    # The global stream of (position, tokens) runs, merged across ranks, is the curriculum.
    stream: list[list[int]] = []
    for t in batches:
        for position, count in t["runs"]:
            if stream and stream[-1][0] == position:
                stream[-1][1] += count
            else:
                stream.append([position, count])
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    table = pads.dataset(str(run_dir / "shards")).to_table(columns=["text", "position"]).sort_by("position")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in table["text"].to_pylist()]
    n = len(lengths)
    assert len(stream) > n, "the run should go past one epoch"
    assert [p for p, _ in stream[:n]] == list(range(n))  # order: positions 0 … N−1
    assert [c for _, c in stream[:n]] == lengths  # each document's tokens exactly once
    assert stream[n][0] == 0  # the next epoch starts over at position 0
    state = json.loads((out / "checkpoints" / f"step-{steps:07d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["loader"]["batch"] == 2 * steps
    rows = _metrics(out)
    assert rows[-1]["step"] == steps and rows[-1]["tokens"] == steps * batch * 64


@pytest.mark.parametrize("preset", ["baseline", "cma", "cdma"])
def test_presets_match_the_paper_settings(preset: str):
    from pipeline.engine.config import load_config
    from pipeline.train.config import TrainConfig

    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    train = TrainConfig.model_validate(config.train)
    order = config.stages[-1]
    if preset == "baseline":
        assert order.method == "random"
        assert (train.schedule.kind, train.schedule.final_lr_ratio) == ("wsd", pytest.approx(1 / 300))
        assert train.averaging.method == "none"
    else:  # worst first, best last, by the composite quality score
        assert (order.method, order.key, order.higher_is_better) == ("quality_ascending", "quality", True)
        assert [stage.name for stage in config.stages[:-1]] == ["quality", "perplexity", "quality_classifier",
                                                                "combine"]
    if preset == "cma":
        assert train.schedule.kind == "constant"
        assert (train.averaging.method, train.averaging.last_k) == ("sma", 6)
    if preset == "cdma":
        s = train.schedule
        assert (s.kind, s.decay_shape, s.final_lr_ratio) == ("wsd", "1-sqrt", pytest.approx(1 / 3, abs=1e-3))
        assert (train.averaging.method, train.averaging.alpha, train.averaging.last_k) == ("ema", 0.2, 6)


def test_tokenizer_comes_from_the_runs_reference_lm(run_dir: Path, tmp_path: Path):
    import shutil

    from pipeline.engine.config import validate_config
    from pipeline.models.lm import train_bpe_tokenizer
    from pipeline.train.trainer import plan_training, resolve_tokenizer

    data = tmp_path / "run"
    shutil.copytree(run_dir / "shards", data / "shards")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    reference = train_bpe_tokenizer(["alpha beta gamma delta"] * 20, vocab_size=300)
    reference.save_pretrained(data / "stages" / "ref")  # where the perplexity stage keeps its reference LM
    manifest["artifacts"] = {"reference_lm": "stages/ref"}
    (data / "manifest.json").write_text(json.dumps(manifest))
    plan = plan_training(validate_config({**RUN_CONFIG, "train": TRAIN}), data, tmp_path / "out")
    tokenizer, source = resolve_tokenizer(plan, log=lambda m: None)
    assert source == "reference LM stages/ref"
    assert tokenizer.get_vocab() == reference.get_vocab()


@pytest.mark.parametrize("preset", ["cma", "cdma"])
@pytest.mark.parametrize("scale", [1, 10, 37])
def test_averaging_window_is_the_end_of_the_run_whatever_its_length(preset: str, scale: int):
    from pipeline.engine.config import load_config
    from pipeline.train.checkpoints import on_grid
    from pipeline.train.config import TrainConfig

    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    train = TrainConfig.model_validate({**config.train, "max_tokens": config.train["max_tokens"] * scale})
    a, total, every = train.averaging, train.total_steps, train.checkpoint_every
    assert (a.window, a.every, a.last_k) == (0.1, None, 6)
    window = a.window_steps(total)
    assert window == round(0.1 * total)
    grid = [s for s in range(1, total + 1) if on_grid(s, total, every)]
    averaged = grid[-a.last_k:]
    assert averaged[-1] == total  # the last step is on the grid
    assert all(b - a_ == every for a_, b in zip(averaged, averaged[1:]))  # evenly spaced
    # Each checkpoint stands for the `every` steps up to it: together the last last_k * every steps,
    # at most the window and less than one spacing per checkpoint short of it.
    covered = total - averaged[0] + every
    assert window - a.last_k < covered <= window
    assert averaged[0] > total - window  # nothing from before the last 10% (half the run, with every: 20)


def test_default_window_widens_on_short_runs():
    from pipeline.train.config import TrainConfig

    train = TrainConfig.model_validate({"seq_len": 32, "batch_size": 8, "max_tokens": 40 * 8 * 32})  # 40 steps
    assert train.checkpoint_every == 1  # 10% of 40 steps is 4, fewer than last_k = 6: one step apart


def test_checkpoint_grid_ends_on_the_last_step_and_pruning_keeps_it(tmp_path: Path):
    from pipeline.train.checkpoints import checkpoint_dir, complete_checkpoints, prune_checkpoints

    def write(step: int) -> None:
        folder = checkpoint_dir(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")

    for step in range(1, 39):  # a run of 40 steps with checkpoints every step, killed after step 38
        write(step)
        prune_checkpoints(tmp_path, every=3, keep=3, total=40)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [31, 34, 37, 38]  # the grid 40, 37, 34 … + the newest
    for step in (39, 40):
        write(step)
        prune_checkpoints(tmp_path, every=3, keep=3, total=40)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [34, 37, 40]
