"""`curriculum inspect TRAIN_DIR`: the training report (loss and LR curves, final vs averaged eval table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.core.settings import RayConfig, RunConfig
from pipeline.engine.ablate import Job, write_data_folder
from pipeline.engine.report_training import eval_table, is_training_folder
from pipeline.io.synth import graded_document
from pipeline.train.trainer import run_training

TRAIN = {
    "model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
    "tokenizer_vocab_size": 300,
    "tokenizer_sample_docs": 60,
    "seq_len": 32,
    "batch_size": 4,
    "max_tokens": 12 * 4 * 32,  # 12 steps
    "schedule": {"kind": "wsd", "warmup": 2, "decay_fraction": 0.5},
    "averaging": {"method": "sma", "last_k": 3, "every": 2},
    "eval": {"every": 4, "max_tokens": 128, "sets": {"clean": {"synthetic": {"docs": 10, "min_quality": 0.7}},
                                                      "mixed": {"synthetic": {"docs": 10}}}},
    "log_every": 2,
    "threads": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report-training")
    rows = [{"id": d["id"], "text": d["text"]} for d in (graded_document(i, 0) for i in range(60))]
    data = write_data_folder(folder / "data", rows, "text", {})
    run_training(Job(RunConfig(name="t"), RayConfig(), TRAIN), data, folder / "train", log=lambda m: None)
    return folder / "train"


def test_inspect_writes_the_training_report(train_dir: Path, capsys: pytest.CaptureFixture[str]):
    assert is_training_folder(train_dir) and not is_training_folder(train_dir.parent / "data")
    assert main(["inspect", str(train_dir)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((train_dir / "summary.json").read_text())
    table = eval_table(summary)
    assert [name for name, _, _ in table] == ["clean", "mixed"]
    assert all(final is not None and averaged is not None for _, final, averaged in table)
    page = (train_dir / "report" / "index.html").read_text()
    for name, final, averaged in table:
        assert f"<tr><td>{name}</td><td>{final:.4f}</td><td>{averaged:.4f}</td></tr>" in page
        assert re.search(rf"{name}\s+{final:.4f}\s+{averaged:.4f}\s+{averaged - final:.4f}", printed)
    assert "finished: 12 steps, 1536 tokens" in printed
    assert "logged 6 lines up to step 12" in printed  # log_every 2
    for png in ("loss.png", "lr.png"):
        assert (train_dir / "report" / png).stat().st_size > 1000 and f"src='{png}'" in page


def test_unfinished_training_and_other_folders(train_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train_config.json", "metrics.jsonl"):
        (partial / name).write_text((train_dir / name).read_text())
    assert main(["inspect", str(partial)]) == 0
    assert "not finished: no summary.json yet" in capsys.readouterr().out
    assert (partial / "report" / "loss.png").is_file()
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 2
    expected = "not a run folder (no manifest.json), a training folder (no train_config.json) or a study folder"
    assert expected in capsys.readouterr().err
