"""The curriculum in ``transformers.Trainer``: token-shard examples in ``position`` order on each of
two simulated data-parallel ranks, the project's schedule on the Trainer's scheduler, and the
averaged model written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine.tokenize import tokenize_run
from pipeline.train.averaging import averaging_weights
from pipeline.train.hf import AveragingCallback, CurriculumTokenDataset, ScheduleCallback, collate
from pipeline.train.schedules import make_schedule

RUN_CONFIG = {
    "run": {"name": "hf-tests", "seed": 0},
    "input": {"format": "synthetic", "synthetic": {"docs": 90, "kind": "graded"}},
    "stages": [{"name": "order", "method": "sort", "key": "true_quality", "direction": "ascending"}],
    "output": {"rows_per_shard": 30},
}
SEQ, B = 32, 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    import pyarrow.dataset as pads

    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline
    from pipeline.models.lm import train_bpe_tokenizer

    base = tmp_path_factory.mktemp("hf")
    folder = base / "run"
    run_pipeline(validate_config(RUN_CONFIG), folder, address=ray_address, log=lambda m: None)
    texts = pads.dataset(str(folder / "shards")).to_table(columns=["text"])["text"].to_pylist()
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(base / "bpe")
    tokenize_run(folder, tokenizer=str(base / "bpe"), address=ray_address)
    return folder


def _positions(batches: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([b.reshape(-1) for b in batches]).numpy()


def test_examples_follow_the_token_stream(run_dir: Path) -> None:
    ds = CurriculumTokenDataset(run_dir, SEQ)
    stream = np.concatenate([np.asarray(ids) for _, ids in ds.shards.documents()])
    doc_pos = np.concatenate([np.full(len(ids), p) for p, ids in ds.shards.documents()])
    examples = list(ds)
    assert len(examples) == len(stream) // SEQ == ds.examples
    assert np.array_equal(torch.stack([e["input_ids"] for e in examples]).reshape(-1).numpy(), stream[:ds.examples * SEQ])
    assert np.array_equal(_positions([e["positions"] for e in examples]), doc_pos[:ds.examples * SEQ])
    assert np.all(np.diff(doc_pos) >= 0) and doc_pos[0] == 0


def test_rank_layout_is_accelerates_and_survives_workers(run_dir: Path) -> None:
    from accelerate.data_loader import IterableDatasetShard
    from torch.utils.data import DataLoader

    whole = CurriculumTokenDataset(run_dir, SEQ, batch_size=B)
    for rank in (0, 1):
        ours = CurriculumTokenDataset(run_dir, SEQ, batch_size=B, rank=rank, world_size=2)
        theirs = IterableDatasetShard(whole, batch_size=B, num_processes=2, process_index=rank, drop_last=True)
        a = [e["positions"] for e in ours]
        b = [e["positions"] for e in theirs]
        assert len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
        loaded = DataLoader(ours, batch_size=B, num_workers=2, collate_fn=lambda f: torch.stack([x["positions"] for x in f]))
        assert torch.equal(torch.cat(list(loaded)[:len(b) // B]).reshape(-1), torch.cat(b[:len(b) // B * B]).reshape(-1))


def test_trainer_two_ranks_in_order_with_schedule_and_average(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from pipeline.models.lm import build_causal_lm
    from pipeline.train.averaging import WeightsFile

    steps, lr = 6, 1e-3
    tokenizer_dir = run_dir / "tokens" / "tokenizer"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for rank in (0, 1):
        def recording(features, rank=rank):
            seen[rank].append(torch.stack([f["positions"] for f in features]))
            return collate(features)

        out = tmp_path / f"rank{rank}"
        model = build_causal_lm({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": SEQ},
                                tokenizer, seed=0)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=B, learning_rate=lr,
                                 save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True,
                                 remove_unused_columns=False)
        schedule = ScheduleCallback({"kind": "wsd", "warmup": 2, "decay_fraction": 0.5, "final_lr_ratio": 0.1})
        averaging = AveragingCallback(out, {"method": "ema", "last_k": 3, "every": 2, "alpha": 0.5})
        dataset = CurriculumTokenDataset(run_dir, SEQ, batch_size=B, rank=rank, world_size=2)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=recording,
                callbacks=[schedule, averaging]).train()

        expected = make_schedule("wsd", lr, steps, 2, 0.1, 0.5, "1-sqrt")
        assert schedule.applied == pytest.approx([expected(s) for s in range(steps)])
        assert schedule.applied[-1] == pytest.approx(0.1 * lr) and schedule.applied[0] < lr

        record = json.loads((out / "averaged" / "averaging.json").read_text())
        assert record["steps"] == [2, 4, 6] and record["weights"] == pytest.approx(averaging_weights("ema", 3, 0.5))
        averaged = AutoModelForCausalLM.from_pretrained(out / "averaged")
        key = "transformer.h.0.mlp.c_fc.weight"
        snaps = [WeightsFile(out / "averaging" / f"step-{s:07d}").get(key).float() for s in (2, 4, 6)]
        manual = sum(w * t for w, t in zip(record["weights"], snaps))
        assert torch.allclose(averaged.state_dict()[key], manual, atol=1e-6)
        assert not torch.equal(snaps[0], snaps[2])  # it trained

    # Each rank saw its examples in position order; batch k of rank 0 then of rank 1 is global batch k.
    per_rank = {r: _positions(seen[r][:steps]) for r in (0, 1)}
    for r in (0, 1):
        real = per_rank[r][per_rank[r] >= 0]
        assert np.all(np.diff(real) >= 0)
    interleaved = _positions([seen[r][k] for k in range(steps) for r in (0, 1)])
    whole = CurriculumTokenDataset(run_dir, SEQ)
    assert np.array_equal(interleaved, _positions([whole.example(e)["positions"] for e in range(2 * B * steps)]))
    assert interleaved[0] == 0
