"""The curriculum loader on a real run folder written by the pipeline: order, packing, ranks,
resume at the exact next token, and DataLoader workers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.errors import CurriculumError
from pipeline.train.loader import CurriculumLoader

RUN_CONFIG = {
    "run": {"name": "train-tests", "seed": 0},
    "input": {"format": "synthetic", "synthetic": {"docs": 240, "kind": "graded"}},
    "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "alpha_ratio", "direction": "ascending"}],
    "output": {"rows_per_shard": 100},
}


def build_run_folder(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    """One run folder per test session, written by the real pipeline (shared by the train tests)."""
    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline

    folder = tmp_path_factory.getbasetemp() / "train-run"
    if not (folder / "manifest.json").is_file():
        run_pipeline(validate_config(RUN_CONFIG), folder, address=ray_address, log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    return build_run_folder(tmp_path_factory, ray_address)


@pytest.fixture(scope="module")
def tokenizer(run_dir: Path):
    from pipeline.models.lm import train_bpe_tokenizer

    texts = pq.read_table(run_dir / "shards" / "part-00000.parquet", columns=["text"])["text"].to_pylist()
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def expected(run_dir: Path, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The single-process reference: documents in position order, each + EOS; and token positions."""
    table = pads.dataset(str(run_dir / "shards")).to_table(columns=["text", "position"]).sort_by("position")
    tokens, positions = [], []
    for text, position in zip(table["text"].to_pylist(), table["position"].to_pylist()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tokens.extend(ids)
        positions.extend([position] * len(ids))
    return np.asarray(tokens), np.asarray(positions)


def _interleave(per_rank: list[list[dict]]) -> list[dict]:
    """Global order: batch k of rank 0, of rank 1, … (rank r holds global batches b % world == r)."""
    out = []
    for k in range(max(len(p) for p in per_rank)):
        out.extend(p[k] for p in per_rank if k < len(p))
    return out


def _real_tokens(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([b["input_ids"][b["attention_mask"].bool()].numpy() for b in batches])
    pos = np.concatenate([b["positions"][b["attention_mask"].bool()].numpy() for b in batches])
    return ids, pos


@pytest.mark.parametrize("packing", ["pack", "pad"])
@pytest.mark.parametrize("world", [1, 3])
def test_one_epoch_is_the_curriculum_in_order_exactly_once(run_dir, tokenizer, expected, packing, world):
    per_rank = [list(CurriculumLoader(run_dir, tokenizer, seq_len=48, batch_size=4, packing=packing,
                                      world_size=world, rank=r, max_epochs=1, chunk_rows=37))
                for r in range(world)]
    merged = _interleave(per_rank)
    assert [b["index"] for b in merged] == list(range(len(merged)))
    assert all(b["index"] % world == r for r, p in enumerate(per_rank) for b in p)
    ids, pos = _real_tokens(merged)
    np.testing.assert_array_equal(ids, expected[0])  # every token once, in curriculum order
    np.testing.assert_array_equal(pos, expected[1])
    for b in merged[:-1]:
        assert b["input_ids"].shape == (4, 48)
    if packing == "pack":
        assert all(bool(b["attention_mask"].all()) for b in merged[:-1])  # no padding when packing
    else:  # padding: every sequence belongs to one document and starts at a piece boundary
        for b in merged:
            for row, mask in zip(b["positions"], b["attention_mask"].bool()):
                assert len(set(row[mask].tolist())) == 1
            assert bool((b["labels"][b["attention_mask"] == 0] == -100).all())


def test_batches_are_deterministic_and_loop_over_epochs(run_dir, tokenizer, expected):
    a = CurriculumLoader(run_dir, tokenizer, seq_len=64, batch_size=8)
    n_tokens = len(expected[0])
    steps = n_tokens // (64 * 8) + 3  # into the second epoch
    first = [b for _, b in zip(range(steps), a)]
    second = [b for _, b in zip(range(steps), CurriculumLoader(run_dir, tokenizer, seq_len=64, batch_size=8))]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))
    ids = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in first])
    np.testing.assert_array_equal(ids[:n_tokens], expected[0])
    np.testing.assert_array_equal(ids[n_tokens:], expected[0][: len(ids) - n_tokens])  # epoch 1 restarts at 0
    assert first[-1]["state"]["epoch"] == 1


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_resume_continues_at_the_exact_next_token(run_dir, tokenizer, packing):
    kw = dict(seq_len=40, batch_size=3, packing=packing, chunk_rows=29, max_epochs=2)
    full = list(CurriculumLoader(run_dir, tokenizer, **kw))
    rng = np.random.default_rng(7)
    for cut in sorted(rng.choice(np.arange(1, len(full) - 1), size=4, replace=False)):
        loader = CurriculumLoader(run_dir, tokenizer, **kw)
        it = iter(loader)
        head = [next(it) for _ in range(cut)]
        state = loader.state_dict()
        assert state == head[-1]["state"]
        resumed = CurriculumLoader(run_dir, tokenizer, **kw)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        for x, y in zip(head + tail, full):
            assert x["index"] == y["index"]
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["positions"], y["positions"])


def test_resume_state_is_shared_by_all_ranks_and_works_with_another_world_size(run_dir, tokenizer, expected):
    kw = dict(seq_len=32, batch_size=2, max_epochs=1)
    loaders = [CurriculumLoader(run_dir, tokenizer, world_size=2, rank=r, **kw) for r in range(2)]
    heads = []
    for loader in loaders:
        it = iter(loader)
        heads.append([next(it) for _ in range(5)])
    assert loaders[0].state_dict() == loaders[1].state_dict() == {**loaders[0].state_dict(), "batch": 10}
    # Resume the remaining stream on three ranks: the union is still the curriculum, once.
    tails = []
    for r in range(3):
        loader = CurriculumLoader(run_dir, tokenizer, world_size=3, rank=r, **kw)
        loader.load_state_dict(loaders[0].state_dict())
        tails.append(list(loader))
    tail = sorted((b for t in tails for b in t), key=lambda b: b["index"])
    assert [b["index"] for b in tail] == list(range(10, 10 + len(tail)))
    assert all(b["index"] % 3 == r for r, t in enumerate(tails) for b in t)
    merged = _interleave(heads) + tail
    ids, _ = _real_tokens(merged)
    np.testing.assert_array_equal(ids, expected[0])


def test_tokenizer_workers_and_dataloader_workers_keep_the_order(run_dir, tokenizer):
    from torch.utils.data import DataLoader

    kw = dict(seq_len=48, batch_size=4, max_epochs=1, chunk_rows=23)
    reference = list(CurriculumLoader(run_dir, tokenizer, **kw))
    parallel = list(CurriculumLoader(run_dir, tokenizer, num_workers=2, **kw))
    wrapped = list(DataLoader(CurriculumLoader(run_dir, tokenizer, **kw), batch_size=None, num_workers=2))
    for other in (parallel, wrapped):
        assert len(other) == len(reference)
        assert all(torch.equal(x["input_ids"], y["input_ids"]) and x["state"] == y["state"]
                   for x, y in zip(other, reference))


def test_shards_out_of_order_are_refused(run_dir, tokenizer, tmp_path):
    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    files = sorted((run_dir / "shards").glob("*.parquet"))
    shutil.copyfile(files[0], broken / "shards" / "part-00000.parquet")
    shutil.copyfile(files[2], broken / "shards" / "part-00001.parquet")  # a gap in position
    loader = CurriculumLoader(broken, tokenizer, seq_len=32, batch_size=2, max_epochs=1)
    with pytest.raises(CurriculumError, match="positions"):
        list(loader)


def test_streams_without_reading_every_shard(run_dir, tokenizer, monkeypatch):
    opened: list[str] = []
    original = pq.ParquetFile

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", spy)
    first = next(iter(CurriculumLoader(run_dir, tokenizer, seq_len=32, batch_size=2, chunk_rows=16)))
    assert first["input_ids"].shape == (2, 32)
    assert opened == ["part-00000.parquet"]  # the first batch needed only the first shard
