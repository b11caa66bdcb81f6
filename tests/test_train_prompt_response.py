"""Prompt/response training and Masked Thought on a real run folder of synthetic word problems:
the loss mask, the masks (deterministic, resumable, at the configured rate, labels untouched), an
interrupted training that resumes to the same weights, config errors that name the key, and the
`synth --kind reasoning` files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.io.synth import write_synthetic
from pipeline.io.synth_reasoning import held_out_path, reasoning_problems
from pipeline.train.augment import add_mask_token, masked_positions, token_uniform
from pipeline.train.loader import CurriculumLoader

DOCS = 160


def _run_config(path: Path) -> dict:
    return {"run": {"name": "mt-tests", "seed": 0},
            "input": {"format": "jsonl", "path": str(path), "id_field": "id"},
            "stages": [{"name": "order", "method": "random"}],
            "output": {"rows_per_shard": 70}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    """`curriculum synth --kind reasoning` -> `curriculum run` (the real pipeline, 3 shards)."""
    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline

    folder = tmp_path_factory.mktemp("mt")
    write_synthetic(folder / "problems.jsonl", DOCS, seed=3, kind="reasoning")
    run_pipeline(validate_config(_run_config(folder / "problems.jsonl")), folder / "run", address=ray_address,
                 log=lambda m: None)
    return folder / "run"


@pytest.fixture(scope="module")
def table(run_dir: Path):
    return pads.dataset(str(run_dir / "shards")).to_table().sort_by("position")


@pytest.fixture(scope="module")
def tokenizer(table):
    from pipeline.models.lm import train_bpe_tokenizer

    tok = train_bpe_tokenizer(table["text"].to_pylist(), vocab_size=400)
    add_mask_token(tok, None)
    return tok


def _loader(run_dir: Path, tokenizer, **kw) -> CurriculumLoader:
    kw = {"seq_len": 128, "batch_size": 4, "packing": "pad", "max_epochs": 1, "chunk_rows": 23, **kw}
    return CurriculumLoader(run_dir, tokenizer, prompt_column="prompt", response_column="response", **kw)


def _masked(run_dir: Path, tokenizer, ratio: float = 0.3, seed: int = 5, **kw) -> CurriculumLoader:
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    return _loader(run_dir, tokenizer, mask_ratio=ratio, mask_token_id=mask_id, mask_seed=seed, **kw)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_run_keeps_prompt_and_response_and_the_split_is_held_out(run_dir: Path, table, tmp_path: Path):
    assert table.num_rows == DOCS
    assert {"prompt", "response", "text", "answer", "steps"} <= set(table.column_names)
    for prompt, response, text in zip(*(table[c].to_pylist() for c in ("prompt", "response", "text"))):
        assert text == prompt + response and prompt.endswith("Answer:") and " = " in response

    assert main(["synth", "--kind", "reasoning", "--docs", "200", "--out", str(tmp_path / "p.jsonl.gz"), "--seed", "1"]) == 0
    assert held_out_path(tmp_path / "p.jsonl.gz") == tmp_path / "p-test.jsonl.gz"
    read = [[json.loads(x) for x in gzip.open(tmp_path / name, "rt")] for name in ("p.jsonl.gz", "p-test.jsonl.gz")]
    train, test = read
    assert (len(train), len(test)) == (200, 20)
    assert (train, test) == reasoning_problems(200, 20, seed=1)  # the files are the function's records

    def arithmetic(r: dict) -> str:
        return r["response"].rsplit(" The answer", 1)[0]

    assert not {arithmetic(r) for r in test} & {arithmetic(r) for r in train}  # no test calculation is trained on
    for r in train + test:  # the chain of steps is right and ends on the answer
        value = None
        for step in arithmetic(r).strip().split(". "):
            lhs, rhs = step.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert value is None or int(a) == value
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert int(rhs) == value >= 0
        assert value == r["answer"] and r["response"].endswith(f"The answer is {value}.")
        assert 2 <= r["steps"] <= 3


def test_labels_are_the_response_and_its_eos_only(run_dir: Path, table, tokenizer):
    """pad: one document per row, so each row's labels can be written out: -100 on the prompt and the padding."""
    batches = list(_loader(run_dir, tokenizer))
    rows = [(ids, labels, mask, pos) for b in batches
            for ids, labels, mask, pos in zip(b["input_ids"], b["labels"], b["attention_mask"], b["positions"])]
    assert len(rows) == DOCS  # every problem fits one 128-token row
    eos = tokenizer.eos_token_id
    for (ids, labels, mask, pos), prompt, response in zip(rows, table["prompt"].to_pylist(),
                                                          table["response"].to_pylist()):
        p, r = _encode(tokenizer, prompt), _encode(tokenizer, response)
        n = len(p) + len(r) + 1
        assert ids[:n].tolist() == p + r + [eos]
        assert labels.tolist() == [-100] * len(p) + r + [eos] + [-100] * (128 - n)
        assert int(mask.sum()) == n and bool((pos[n:] == -1).all())

    # pack: the same labels, documents back to back
    packed = list(_loader(run_dir, tokenizer, packing="pack"))
    real = torch.cat([b["labels"][b["attention_mask"].bool()] for b in packed])
    expected = torch.cat([lab[m.bool()] for _, lab, m, _ in rows])
    assert torch.equal(real, expected)


def test_masked_thought_masks_response_inputs_only_at_the_ratio(run_dir: Path, tokenizer):
    plain = list(_loader(run_dir, tokenizer, max_epochs=2))
    masked = list(_masked(run_dir, tokenizer, ratio=0.3, max_epochs=2))
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    assert len(plain) == len(masked)
    hidden = eligible = 0
    per_epoch = []
    for a, b in zip(plain, masked):
        assert torch.equal(a["labels"], b["labels"])  # labels unchanged by masking
        changed = a["input_ids"] != b["input_ids"]
        assert bool((b["input_ids"][changed] == mask_id).all())
        # Only response tokens: positions whose label is a real token other than EOS
        response = (a["labels"] != -100) & (a["labels"] != tokenizer.eos_token_id)
        assert not bool((changed & ~response).any())
        hidden += int(changed.sum())
        eligible += int(response.sum())
        per_epoch.append(changed)
    share = hidden / eligible
    sd = (0.3 * 0.7 / eligible) ** 0.5
    assert abs(share - 0.3) < 5 * sd, (share, eligible)  # binomial: 5 standard deviations
    # The second epoch masks other tokens of the same documents.
    half = len(per_epoch) // 2
    assert any(not torch.equal(x, y) for x, y in zip(per_epoch[:half], per_epoch[half:]))

    assert not any(bool((b["input_ids"] == mask_id).any()) for b in _masked(run_dir, tokenizer, ratio=0.0))
    heavy = list(_masked(run_dir, tokenizer, ratio=0.9))
    assert sum(int((b["input_ids"] == mask_id).sum()) for b in heavy) > 0.85 * eligible / 2


def test_masks_are_a_function_of_seed_epoch_row_and_resume_exactly(run_dir: Path, tokenizer):
    full = list(_masked(run_dir, tokenizer, max_epochs=2, packing="pack", seq_len=48, batch_size=3))
    again = list(_masked(run_dir, tokenizer, max_epochs=2, packing="pack", seq_len=48, batch_size=3))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(full, again))
    other_seed = list(_masked(run_dir, tokenizer, seed=6, max_epochs=2, packing="pack", seq_len=48, batch_size=3))
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(full, other_seed))

    # Resumed mid-stream (mid-document: packing), on two ranks, with another batch shape: the same tokens.
    loader = _masked(run_dir, tokenizer, max_epochs=2, packing="pack", seq_len=48, batch_size=3)
    it = iter(loader)
    head = [next(it) for _ in range(len(full) // 3)]
    assert head[-1]["state"]["offset"] > 0 or head[-1]["state"]["row"] > 0
    tails = []
    for rank in range(2):
        resumed = _masked(run_dir, tokenizer, max_epochs=2, packing="pack", seq_len=48, batch_size=3,
                          world_size=2, rank=rank)
        resumed.load_state_dict(loader.state_dict())
        tails.append(list(resumed))
    tail = sorted((b for t in tails for b in t), key=lambda b: b["index"])
    flat = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in head + tail])
    expected = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in full])
    assert torch.equal(flat, expected)

    # The draw itself: the same (seed, row, index) gives the same number wherever it is computed.
    grow = np.arange(5000, dtype=np.int64) // 40
    tpos = np.arange(5000, dtype=np.int32) % 40
    u = token_uniform(11, grow, tpos)
    perm = np.random.default_rng(0).permutation(5000)
    np.testing.assert_array_equal(token_uniform(11, grow[perm], tpos[perm]), u[perm])
    np.testing.assert_array_equal(np.concatenate([token_uniform(11, grow[:77], tpos[:77]),
                                                  token_uniform(11, grow[77:], tpos[77:])]), u)
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.02
    assert not np.array_equal(masked_positions(np.ones(5000, bool), grow, tpos, 11, 0.5),
                              masked_positions(np.ones(5000, bool), grow + 5000, tpos, 11, 0.5))


TRAIN = {
    "model": {"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}},
    "tokenizer_vocab_size": 400,
    "seq_len": 64,
    "batch_size": 4,
    "max_tokens": 24 * 4 * 64,  # 24 steps
    "packing": "pack",
    "data": {"format": "prompt_response"},
    "augment": {"masked_thought": {"ratio": 0.25}},
    "schedule": {"kind": "cosine", "warmup": 2},
    "averaging": {"method": "sma", "last_k": 2, "every": 4},
    "eval": {"sets": {}},
    "log_every": 1,
    "threads": 1,
}


class Interrupt(Exception):
    pass


def _train(run_dir: Path, out: Path, train: dict, log=lambda m: None) -> dict:
    from pipeline.engine.config import validate_config
    from pipeline.train.trainer import run_training

    config = validate_config({"run": {"name": "mt-tests", "seed": 0}, "train": train})
    return run_training(config, run_dir, out, log=log)


def test_interrupted_masked_training_resumes_to_the_same_weights(run_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    reference = tmp_path / "reference"
    _train(run_dir, reference, TRAIN)
    saved = AutoTokenizer.from_pretrained(str(reference / "tokenizer"))
    assert "<|mask|>" in saved.get_vocab()
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 24 and rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0

    def stop_at_step_10(message: str) -> None:
        if "step 10/" in message:  # logged after step 10's update and metrics line; no checkpoint at 10
            raise Interrupt

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        _train(run_dir, interrupted, TRAIN, log=stop_at_step_10)
    assert not (interrupted / "summary.json").exists()
    assert [p.name for p in sorted((interrupted / "checkpoints").iterdir())][-1] == "step-0000008"
    logged: list[str] = []
    _train(run_dir, interrupted, TRAIN, log=logged.append)
    assert any("resuming from step-0000008" in m for m in logged)
    assert (interrupted / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    a = load_file(str(interrupted / "final" / "model.safetensors"))
    b = load_file(str(reference / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The masks reach the model: without them the same run ends elsewhere.
    plain = tmp_path / "plain"
    _train(run_dir, plain, {**TRAIN, "augment": {}})
    c = load_file(str(plain / "final" / "model.safetensors"))
    assert not all(torch.equal(b[k], c[k]) for k in b if k in c)


def test_config_errors_name_the_key(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "mt-tests", "seed": 0}, "train": TRAIN}))
    out = tmp_path / "out"
    cases = [
        ("train.augment.masked_thought.ratio=1.0", "train.augment.masked_thought.ratio: Input should be less than 1"),
        ("train.augment.masked_thought.ratio=-0.1", "train.augment.masked_thought.ratio: Input should be greater"),
        ("train.data.format=text", "train.augment.masked_thought: masks response tokens, so it needs data.format"),
        ("train.data.response_field=reply", "train.data.response_field: the shards have no column 'reply'"),
        ("train.augment.masked_thought.rate=0.2", "train.augment.masked_thought.rate: unknown key"),
    ]
    for override, message in cases:
        assert main(["train", str(config), "--data", str(run_dir), "--out", str(out), "--set", override]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_pretrained_model_gets_a_mean_row_for_the_added_mask_token(tokenizer):
    from pipeline.models.lm import build_causal_lm
    from pipeline.train.trainer import fit_embeddings

    model = build_causal_lm({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32},
                            tokenizer, seed=0)
    model.resize_token_embeddings(len(tokenizer) - 1)  # as if saved before the mask token was added
    before = model.get_input_embeddings().weight.detach().clone()
    fit_embeddings(model, len(tokenizer))
    after = model.get_input_embeddings().weight.detach()
    assert after.shape[0] == len(tokenizer)
    assert torch.equal(after[:-1], before) and torch.allclose(after[-1], before.mean(dim=0))
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
