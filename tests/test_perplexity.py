"""Perplexity scoring (the perplexity stage and its kernel), the reference LM and
perplexity selection (stages/select_perplexity.py), with real tiny transformers models, a real
local Ray cluster and the real CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.core.errors import ConfigError, ModelLoadError
from pipeline.core.hashing import uniform
from pipeline.engine.config import validate_config
from pipeline.io.synth import graded_document
from pipeline.models.causal_lm_scorer import PerplexityScorer
from pipeline.models.lm import build_causal_lm, train_bpe_tokenizer
from pipeline.models.pool import Placement, place
from pipeline.models.reference_lm import HALF_SALT
from pipeline.models.windows import plan_windows
from stages.base import StageContext
from stages.perplexity import PerplexityParams, PerplexityStage
from stages.select_perplexity import SelectPerplexityParams, SelectPerplexityStage, _mark, cut_points

TINY = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}
TINY_REFERENCE = {"steps": 20, "vocab_size": 320, "batch_size": 8, "seq_len": 64, "max_docs": 60, "model": TINY}
MISSING_MODEL = "no-such-org/no-such-model-for-tests"


def _docs(n: int, start: int = 0) -> list[dict]:
    return [graded_document(i) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A real (untrained) GPT-2 with a BPE tokenizer, saved in HF layout; context 64 tokens."""
    texts = [d["text"] for d in _docs(80)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    model = build_causal_lm({**TINY, "n_positions": 64}, tokenizer, seed=0).eval()
    folder = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(tiny_lm: Path) -> PerplexityScorer:
    return PerplexityScorer(str(tiny_lm), max_length=64, token_budget=256, threads=1)


def _direct_nll(model, tokenizer, text: str, max_length: int, stride: int | None) -> tuple[float, int]:
    """Mean token NLL straight from transformers' own loss (labels, -100 for context tokens)."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start, first, end in plan_windows(len(ids), max_length, stride):
        window = torch.tensor(ids[start:end])[None]
        labels = window.clone()
        labels[0, : first - start] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss.item()
        total += loss * (end - first)
        count += end - first
    return total / count, count


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(("n", "max_length", "stride"), [(1, 8, None), (2, 8, None), (8, 8, None), (9, 8, None),
                                                          (50, 8, None), (50, 8, 3), (51, 16, 1), (300, 64, 32)])
def test_windows_score_every_token_once_with_enough_context(n: int, max_length: int, stride: int | None) -> None:
    windows = plan_windows(n, max_length, stride)
    targets = [t for _, first, end in windows for t in range(first, end)]
    assert targets == list(range(1, n))
    for k, (start, first, end) in enumerate(windows):
        assert 0 <= start < first <= end and end - start <= max_length
        if k and n >= max_length:  # later windows are filled back to a full context
            assert end - start == max_length
            assert first - start >= max_length - (stride or max_length - 1)


# --------------------------------------------------------------------------- exact scores


@pytest.mark.parametrize("case", ["short", "long", "long_strided", "mixed"])
def test_scores_equal_a_direct_transformers_computation(tiny_lm: Path, case: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    docs = [d["text"] for d in _docs(12)]
    short = [text[: 30 + 5 * i] for i, text in enumerate(docs[:6])]
    stride = 24 if case == "long_strided" else None
    texts = {"short": short, "long": docs[:4], "long_strided": docs[4:8], "mixed": short[:3] + docs[8:12] + short[3:]}[case]
    scorer = PerplexityScorer(str(tiny_lm), max_length=64, stride=stride, token_budget=256, threads=1)
    nll, counts, reasons = scorer.score_texts(texts)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if case == "short":
        assert max(lengths) < 64
    else:
        assert max(lengths) > 3 * 64  # several windows
    for i, text in enumerate(texts):
        expected, n = _direct_nll(model, tokenizer, text, 64, stride)
        assert counts[i] == n == lengths[i]  # every token of the text is scored (BOS prefix)
        assert abs(nll[i] - expected) < 1e-4
        assert reasons[i] is None
    assert scorer.chunked  # a GPT-2 head is a plain linear layer: the chunked-head path ran


def test_chunked_head_and_plain_forward_agree(tiny_lm: Path) -> None:
    texts = [d["text"] for d in _docs(6)]
    chunked = PerplexityScorer(str(tiny_lm), max_length=64, token_budget=128, head_chunk=16, threads=1)
    plain = PerplexityScorer(str(tiny_lm), max_length=64, token_budget=128, threads=1, chunked_head=False)
    np.testing.assert_allclose(chunked.score_texts(texts)[0], plain.score_texts(texts)[0], rtol=0, atol=1e-5)


def test_a_score_does_not_depend_on_the_batch_it_is_in(tiny_lm: Path) -> None:
    """Bitwise: alone, in a mixed padded batch, in another order, another budget, 1 or 2 threads."""
    texts = [d["text"] for d in _docs(10)] + ["The bright star orbits the moon.", "x", "ab", "Oh."]
    alone = [PerplexityScorer(str(tiny_lm), max_length=64, threads=1).score_texts([t])[0][0] for t in texts]
    order = np.random.default_rng(0).permutation(len(texts))
    threads = torch.get_num_threads()
    try:
        for budget, n_threads, head_chunk in [(64, 1, 16), (256, 2, 48), (4096, 2, 2048)]:
            scorer = PerplexityScorer(str(tiny_lm), max_length=64, token_budget=budget, head_chunk=head_chunk,
                                      threads=n_threads)
            together = scorer.score_texts([texts[i] for i in order])[0]
            assert np.array_equal(together, np.asarray(alone)[order]), (budget, n_threads)
    finally:
        torch.set_num_threads(threads)


def test_fixed_batch_shapes_of_the_cuda_path_give_the_same_scores(tiny_lm: Path) -> None:
    """On CUDA every batch is filled to token_budget // width rows with dummy rows; the scores
    of the real rows must not change (checked here on CPU, where CI runs)."""
    texts = [d["text"] for d in _docs(7)] + ["x", ""]
    plain = PerplexityScorer(str(tiny_lm), max_length=64, token_budget=512, threads=1)
    fixed = PerplexityScorer(str(tiny_lm), max_length=64, token_budget=512, threads=1)
    fixed.fixed_shapes = True
    expected, got = plain.score_texts(texts), fixed.score_texts(texts)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-6)
    assert list(got[1]) == list(expected[1]) and got[2] == expected[2]


def test_bf16_scores_follow_fp32(tiny_lm: Path) -> None:
    """The dtype CUDA gets by default, run on CPU: the chunked head still applies and the NLL moves little."""
    texts = [d["text"] for d in _docs(6)]
    fp32 = PerplexityScorer(str(tiny_lm), max_length=64, threads=1).score_texts(texts)[0]
    bf16 = PerplexityScorer(str(tiny_lm), max_length=64, threads=1, dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16 and bf16.chunked
    np.testing.assert_allclose(bf16.score_texts(texts)[0], fp32, rtol=0.02)


@pytest.mark.parametrize(("params", "expected"), [
    ({}, ("cuda", 4, 1.0, 1)),                                   # one actor per GPU
    ({"num_gpus": 0.5}, ("cuda", 8, 0.5, 1)),                    # two small models per GPU
    ({"device": "cpu", "threads": 4}, ("cpu", 16, 0.0, 4)),      # CPUs // threads
    ({"concurrency": 2}, ("cuda", 2, 1.0, 1)),
])
def test_actor_placement_on_a_gpu_cluster(params: dict, expected: tuple) -> None:
    stage = PerplexityStage(PerplexityParams(model="some/model", **params))
    assert place(stage.resources(), cpus=64, gpus=4) == Placement(*expected)


def test_a_hand_built_context_places_actors_on_the_cluster_not_one(ray_address: str, tmp_path: Path) -> None:
    """A notebook or benchmark that calls apply() with its own StageContext gets the same actor pool as
    the runner (one per CPU of the session's 2-CPU cluster), and the params still steer it."""
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path, seed=0, input_columns=["id", "text"])
    assert ctx.placement is None
    assert PerplexityStage(PerplexityParams(model="m")).placement(ctx) == Placement("cpu", 2, 0.0, 1)
    assert PerplexityStage(PerplexityParams(model="m", threads=2)).placement(ctx) == Placement("cpu", 1, 0.0, 2)
    runner_set = StageContext(run_dir=tmp_path, artifact_dir=tmp_path, seed=0, input_columns=["id", "text"],
                              placement=Placement("cpu", 3, 0.0, 1))
    assert PerplexityStage(PerplexityParams(model="m")).placement(runner_set).concurrency == 3


def test_output_rows_keep_the_input_order(scorer: PerplexityScorer) -> None:
    docs = _docs(9)
    texts = [d["text"][: 40 * (i + 1)] for i, d in enumerate(docs)][::-1]  # long first: sorting must be undone
    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts, "ppl": [1.0] * len(texts)})
    out = scorer(table)
    assert out["id"].to_pylist() == table["id"].to_pylist()
    expected = [scorer.score_texts([t])[0][0] for t in texts]
    assert out["nll"].to_pylist() == expected  # a stale ppl column is replaced, not duplicated
    assert out.column_names.count("ppl") == 1
    np.testing.assert_allclose(out["ppl"].to_numpy(), np.exp(expected))


def test_documents_with_nothing_to_score_get_null_scores(scorer: PerplexityScorer) -> None:
    table = pa.table({"id": ["a", "b", "c", "d"], "text": ["", "A fine sentence.", "   ", None]})
    out = scorer(table)
    assert out["ppl"].to_pylist()[0] is None and out["nll"].to_pylist()[0] is None
    assert out["n_tokens"].to_pylist()[0] == 0 and out["n_tokens"].to_pylist()[1] > 0
    assert out["ppl"].to_pylist()[1] > 1 and out["ppl"].to_pylist()[2] is not None  # spaces are tokens too
    assert out["_ppl_null_reason"].to_pylist() == ["empty_text", None, None, "empty_text"]
    no_bos = PerplexityScorer(scorer_path(scorer), max_length=64, threads=1)
    no_bos.prefix = []  # a tokenizer without BOS/EOS: a one-token text has no target
    nll, counts, reasons = no_bos.score_texts(["a", "ab cd"])
    assert math.isnan(nll[0]) and counts[0] == 0 and reasons == ["too_short", None]


def scorer_path(scorer: PerplexityScorer) -> str:
    return scorer.model.name_or_path


def test_reference_lm_perplexity_tracks_true_quality(tmp_path: Path) -> None:
    """A small, honest version of the benchmark's check (there: 4,000 docs, the default LM, >= 0.8)."""
    from scipy.stats import spearmanr

    from pipeline.models.reference_lm import ReferenceLMSpec, train_reference_lm

    docs = _docs(300)
    spec = ReferenceLMSpec(steps=150, lr=0.01, vocab_size=2048, batch_size=16, seq_len=64, threads=1,
                           model={**TINY, "n_embd": 64})
    record = train_reference_lm([d["text"] for d in docs], tmp_path / "lm", spec, 128, seed=0, key="test")
    assert record["train"]["loss_last"] < record["train"]["loss_first"] - 1
    nll = PerplexityScorer(str(tmp_path / "lm"), max_length=128, threads=1).score_texts([d["text"] for d in docs])[0]
    rho = spearmanr(-nll, [d["true_quality"] for d in docs]).statistic
    assert rho >= 0.7, rho  # measured 0.84


# --------------------------------------------------------------------------- the stage through Ray


def _ctx(tmp_path: Path, name: str = "stage", seed: int = 0) -> StageContext:
    return StageContext(run_dir=tmp_path, artifact_dir=tmp_path / name / "artifacts", seed=seed,
                        input_columns=["id", "text", "true_quality"])


def _dataset(rows: list[dict], blocks: int):
    import ray.data

    return ray.data.from_items([{"id": r["id"], "text": r["text"], "true_quality": r.get("true_quality", 0.0)}
                                for r in rows], override_num_blocks=blocks)


def test_stage_trains_reuses_and_scores_whatever_the_block_layout(ray_address: str, tmp_path: Path) -> None:
    """The stage with a reference LM, run in two folders on two block layouts (1 block of rows, 64 per
    call; the rows reversed in 5 blocks, 7 per call): each trains its LM, with the same bytes, and
    every score is bitwise the same; a third run in the first folder reuses its LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _docs(120) + [{"id": "empty-1", "text": ""}, {"id": "empty-2", "text": ""}]  # more than max_docs (60)
    params = {"reference": TINY_REFERENCE, "max_length": 64, "token_budget": 256}
    contexts, results = [], []
    for name, layout, blocks, per_call in [("a", rows, 1, 64), ("b", rows[::-1], 5, 7)]:
        ctx = _ctx(tmp_path, name)
        out = PerplexityStage(PerplexityParams(**params, docs_per_call=per_call)).apply(_dataset(layout, blocks),
                                                                                       ctx).take_all()
        assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
        assert ctx.info["null_scores"] == 2 and ctx.info["null_reasons"] == {"empty_text": 2}
        assert ctx.info["tokens_scored"] == sum(r["n_tokens"] for r in out)
        assert all("_ppl_null_reason" not in r for r in out)
        assert ctx.info["reference_lm"]["reused"] is False
        contexts.append(ctx)
        results.append({r["id"]: (r["ppl"], r["nll"], r["n_tokens"]) for r in out})
    assert results[0] == results[1]  # bitwise, whatever the blocks and batches

    folder = tmp_path / contexts[0].artifacts["reference_lm"]
    assert folder == contexts[0].artifact_dir / "reference_lm"
    assert {"config.json", "model.safetensors", "tokenizer.json", "reference.json"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / "reference.json").read_text())
    assert record["sample"]["docs"] == 60  # bounded by max_docs
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain HF layout, for the trainer too
    assert model.config.n_positions == 64 and len(AutoTokenizer.from_pretrained(folder)) == model.config.vocab_size
    # another folder, another block layout: the same bytes
    digest = [hashlib.sha256((tmp_path / c.artifacts["reference_lm"] / "model.safetensors").read_bytes()).hexdigest()
              for c in contexts]
    assert digest[0] == digest[1]
    direct = PerplexityScorer(str(folder), max_length=64, token_budget=256, threads=1).score_texts(
        [r["text"] for r in rows[:5]])[0]
    assert [results[0][r["id"]][1] for r in rows[:5]] == list(direct)

    again = _ctx(tmp_path, "a")  # same artifact folder, same params: reused, not retrained
    out = PerplexityStage(PerplexityParams(**params)).apply(_dataset(rows, 2), again).take_all()
    assert again.info["reference_lm"]["reused"] is True
    assert {r["id"]: (r["ppl"], r["nll"], r["n_tokens"]) for r in out} == results[0]


def test_held_out_split_scores_the_other_half_at_no_position_the_lm_did_not_train(ray_address: str,
                                                                                 tmp_path: Path) -> None:
    """split: held_out trains the reference LM on one half of the rows and scores only the other.
    Training uses full seq_len chunks, so positions 0..seq_len-1 all get gradient; the model's context
    (and so every scored window) must stop there, even when the stage's max_length is longer."""
    rows = _docs(80)
    long_text = " ".join(r["text"] for r in rows[:6])  # several windows of 32 tokens
    long_id = next(i for i in (f"long-{k}" for k in range(100)) if uniform([i], 3, HALF_SALT)[0] >= 0.5)  # scored
    rows.append({"id": long_id, "text": long_text, "true_quality": 0.5})
    reference = {**TINY_REFERENCE, "seq_len": 32, "model": {**TINY, "n_positions": 1024}}
    # One actor (here and below): starting a second costs seconds of imports, and scoring
    # across actors and block layouts is test_stage_trains_reuses_and_scores_whatever_the_block_layout's.
    params = PerplexityParams(reference=reference, max_length=64, token_budget=256, split="held_out", concurrency=1)
    ctx = _ctx(tmp_path, seed=3)
    out = {r["id"]: r for r in PerplexityStage(params).apply(_dataset(rows, 2), ctx).take_all()}
    train_half = {r["id"] for r, u in zip(rows, uniform([r["id"] for r in rows], 3, HALF_SALT)) if u < 0.5}
    assert 20 < len(train_half) < 60 and long_id not in train_half
    assert {i for i, r in out.items() if r["ppl"] is None} == train_half
    assert ctx.info["null_reasons"] == {"reference_train_half": len(train_half)}
    folder = ctx.artifact_dir / "reference_lm"
    record = json.loads((folder / "reference.json").read_text())
    assert record["sample"]["docs"] == min(60, len(train_half)) and record["sample"]["split"] == "held_out"

    scorer = PerplexityScorer(str(folder), max_length=64, threads=1)
    trained = record["spec"]["seq_len"]
    assert trained == 32 and scorer.model.config.n_positions == trained  # not the stage's 64, nor the dict's 1024
    assert scorer.max_length == trained and ctx.info["max_length"] == trained and ctx.info["stride"] == trained - 1
    sequence = scorer.tokenize([long_text])[0]
    assert len(sequence) > 3 * trained
    assert max(end - start for start, _, end in plan_windows(len(sequence), scorer.max_length, None)) <= trained
    assert out[long_id]["nll"] == scorer.score_texts([long_text])[0][0]


def test_reference_data_trains_on_the_trusted_text(ray_address: str, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted.jsonl"
    good = [d for d in _docs(200, start=5000) if d["true_quality"] > 0.8]
    trusted.write_text("".join(json.dumps({"body": d["text"]}) + "\n" for d in good) + "not json\n")
    params = PerplexityParams(reference=TINY_REFERENCE, max_length=64, concurrency=1,
                              reference_data={"path": str(trusted), "text_field": "body"})
    ctx = _ctx(tmp_path)
    out = PerplexityStage(params).apply(_dataset(_docs(20), 1), ctx).take_all()
    assert all(r["ppl"] is not None for r in out)
    sample = ctx.info["reference_lm"]["sample"]
    assert sample["source"] == "reference_data" and sample["read"] == len(good)
    assert sample["docs"] == min(60, len(good))
    # Checked with the config (exit 2, naming the key and the file): a missing file, a wrong field.
    with pytest.raises(ConfigError, match=r"stages\[0\]\.reference_data: .*file not found: .*missing\.jsonl"):
        validate_config({"input": {"format": "synthetic"},
                         "stages": [{"name": "perplexity", "reference_data": str(tmp_path / "missing.jsonl")}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.reference_data: .*is empty: no record with a non-empty 'text'"):
        validate_config({"input": {"format": "synthetic"},
                         "stages": [{"name": "perplexity", "reference_data": str(trusted)}]})


def test_an_unreachable_hub_model_names_the_model(ray_address: str, tmp_path: Path) -> None:
    params = PerplexityParams(model=MISSING_MODEL)
    with pytest.raises(ModelLoadError, match=MISSING_MODEL):
        PerplexityStage(params).apply(_dataset(_docs(2), 1), _ctx(tmp_path))


def test_params_are_checked_with_helpful_messages() -> None:
    base = {"input": {"format": "synthetic"}}
    with pytest.raises(ConfigError, match=r"stages\[0\].*stride"):
        validate_config({**base, "stages": [{"name": "perplexity", "max_length": 32, "stride": 40}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.modle: unknown key"):
        validate_config({**base, "stages": [{"name": "perplexity", "modle": "gpt2"}]})
    # transformers accepts any config key; a typo must not silently train a default-sized (124M) GPT-2
    with pytest.raises(ConfigError, match=r"stages\[0\]\.reference\.model: 'n_layers' is not a key of the gpt2 config"):
        validate_config({**base, "stages": [{"name": "perplexity", "reference": {"model": {**TINY, "n_layers": 6}}}]})
    with pytest.raises(ConfigError, match=r"unknown model_type 'gtp2'"):
        validate_config({**base, "stages": [{"name": "perplexity", "reference": {"model": {"model_type": "gtp2"}}}]})
    with pytest.raises(ConfigError, match="preset 'points' sets"):
        validate_config({**base, "stages": [{"name": "select_perplexity", "preset": "points", "keep": 0.5}]})
    assert SelectPerplexityParams(preset="points").rule == "low" and SelectPerplexityParams(preset="points").keep == 0.2


# --------------------------------------------------------------------------- selection


def _scores(n: int = 50) -> pa.Table:
    rng = np.random.default_rng(1)
    ppl = np.round(rng.uniform(2, 9, n), 1)  # rounded: ties, broken by id
    values = [None if i % 10 == 3 else float(v) for i, v in enumerate(ppl)]
    return pa.table({"id": [f"doc-{i:03d}" for i in range(n)], "ppl": pa.array(values, pa.float64())})


@pytest.mark.parametrize(("rule", "keep"), [("low", 0.2), ("high", 0.3), ("medium", 0.5), ("low", 1.0), ("high", 0.01)])
def test_selection_rules_keep_the_right_rows(rule: str, keep: float) -> None:
    table = _scores()
    ranked = sorted((v, i) for v, i in zip(table["ppl"].to_pylist(), table["id"].to_pylist()) if v is not None)
    low, high, kept = cut_points(ranked, rule, keep)
    k = max(1, int(keep * len(ranked) + 0.5))
    start = {"low": 0, "high": len(ranked) - k, "medium": (len(ranked) - k) // 2}[rule]
    expected = {i for _, i in ranked[start : start + k]}
    marked = _mark(table, "ppl", low, high, "drop")
    reasons = dict(zip(marked["id"].to_pylist(), marked["_drop_reason"].to_pylist()))
    assert kept == k == len(expected)
    assert {i for i, r in reasons.items() if r is None} == expected
    assert sum(r == "select_perplexity.no_score" for r in reasons.values()) == 5
    position = {i: n for n, (_, i) in enumerate(ranked)}
    for doc, reason in reasons.items():
        if reason == "select_perplexity.ppl_too_high":
            assert position[doc] >= start + k
        elif reason == "select_perplexity.ppl_too_low":
            assert position[doc] < start
    kept_nulls = _mark(table, "ppl", low, high, "keep")["_drop_reason"].to_pylist()
    assert kept_nulls.count(None) == k + 5


def test_select_stage_counts_through_ray(ray_address: str, tmp_path: Path) -> None:
    import ray.data

    table = _scores(200)
    ds = ray.data.from_arrow(table).repartition(4)
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "a", seed=0, input_columns=["id", "ppl"])
    out = SelectPerplexityStage(SelectPerplexityParams(preset="points")).apply(ds, ctx).take_all()
    reasons = [r["_drop_reason"] for r in out]
    assert reasons.count(None) == ctx.info["expected_kept"] == round(0.2 * 180) and ctx.info["exact"]
    kept = [r["ppl"] for r in out if r["_drop_reason"] is None]
    dropped = [r["ppl"] for r in out if r["_drop_reason"] == "select_perplexity.ppl_too_high"]
    assert max(kept) <= min(dropped) and len(dropped) == 180 - 36

    sampled = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "b", seed=0, input_columns=["id", "ppl"])
    params = SelectPerplexityParams(rule="high", keep=0.5, sample_size=100)
    out = SelectPerplexityStage(params).apply(ds, sampled).take_all()
    assert not sampled.info["exact"] and sampled.info["sample_rows"] == 100
    assert abs(sum(r["_drop_reason"] is None for r in out) - 90) <= 25  # a hashed-sample quantile


# --------------------------------------------------------------------------- the command line


def _config(tmp_path: Path, stages: list[dict], docs: int = 160) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "ppl", "seed": 0},
                                    "input": {"format": "synthetic", "synthetic": {"docs": docs}},
                                    "stages": stages, "output": {"rows_per_shard": 50}}))
    return path


@pytest.mark.slow
def test_cli_scores_selects_and_orders_by_perplexity(ray_address: str, tmp_path: Path, capsys) -> None:
    """`curriculum run`'s entry point in this process, on the session's cluster (a subprocess would only
    add its start-up: test_cli_exits_1_naming_an_unreachable_model runs the command itself)."""
    import polars as pl

    from pipeline.cli import main

    stages = [{"name": "perplexity", "model": "reference", "max_length": 64, "reference": TINY_REFERENCE,
               "concurrency": 1},
              {"name": "select_perplexity", "preset": "points"},
              {"name": "order", "method": "sort", "key": "ppl", "direction": "ascending"}]
    run = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, stages)), "--out", str(run), "--ray-address", ray_address]) == 0
    assert "160 input rows, 0 quarantined, 32 rows in" in capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    entries = {s["name"]: s for s in manifest["stages"]}
    assert entries["perplexity"]["info"]["null_scores"] == 0
    assert entries["select_perplexity"]["dropped"] == 160 - 32
    assert entries["select_perplexity"]["dropped_by"] == {"select_perplexity.ppl_too_high": 128}
    assert (run / manifest["artifacts"]["reference_lm"] / "model.safetensors").is_file()
    shards = pl.read_parquet(sorted((run / "shards").glob("*.parquet")))
    assert shards.height == 32 and shards["ppl"].is_sorted() and shards["n_tokens"].min() > 0
    dropped = pl.read_parquet(next((run / "stages").glob("*select_perplexity*")) / "dropped" / "*.parquet")
    assert shards["ppl"].max() <= dropped["ppl"].min()


@pytest.mark.slow
def test_cli_exits_1_naming_an_unreachable_model(cli, tmp_path: Path) -> None:
    result = cli("run", str(_config(tmp_path, [{"name": "perplexity", "model": MISSING_MODEL}], docs=5)),
                 "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert MISSING_MODEL in result.stderr and "Traceback" not in result.stderr


def test_a_small_input_gets_a_small_actor_pool() -> None:
    from pipeline.models.pool import MIN_BATCHES_PER_ACTOR, actors_for

    assert MIN_BATCHES_PER_ACTOR == 4
    assert actors_for(450, 256, 2) == 1  # under 4 batches of work for a second actor
    assert actors_for(1025, 256, 2) == 2
    assert actors_for(1_000_000, 4096, 8) == 8  # never more than the placement allows
    assert actors_for(0, 256, 8) == 1
