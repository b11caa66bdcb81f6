"""The quality classifier: DCLM-style training on a trusted set, and hub sequence classifiers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.errors import ConfigError, ModelLoadError
from pipeline.core.hashing import bottom_k
from pipeline.engine.cache import stage_key, stage_spec
from pipeline.engine.config import validate_config
from pipeline.io.synth import graded_document
from pipeline.io.trusted import SyntheticSource, _synthetic_texts
from pipeline.models.ngram_classifier import Features, fit_cross_fitted, fold_of, predict_proba
from pipeline.models.sequence_classifier import SequenceClassifierScorer
from stages.base import StageContext
from stages.quality_classifier import (
    POSITIVES_SALT,
    QualityClassifierParams,
    QualityClassifierStage,
    sample_negatives,
)

SYNTH_POSITIVES = {"synthetic": {"docs": 150, "min_quality": 0.8}}


def corpus(n: int) -> list[dict]:
    return [{"id": d["id"], "text": d["text"], "true_quality": d["true_quality"]}
            for d in (graded_document(i, 0) for i in range(n))]


def dataset(rows: list[dict], blocks: int):
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=blocks)


def run_stage(params: dict, rows: list[dict], tmp_path: Path, blocks: int = 2, seed: int = 0):
    stage = QualityClassifierStage(QualityClassifierParams.model_validate({"name": "quality_classifier", **params}))
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "artifacts", seed=seed,
                       input_columns=list(rows[0]))
    out = stage.apply(dataset(rows, blocks), ctx).to_pandas().sort_values("id").reset_index(drop=True)
    return out, ctx


def test_trained_classifier_is_deterministic_whatever_the_block_layout(ray_address, tmp_path):
    from scipy.stats import spearmanr

    rows = corpus(300)
    first, ctx = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path / "a", blocks=1)
    again, _ = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path / "b", blocks=7)
    assert first["quality_clf"].tolist() == again["quality_clf"].tolist()  # bit for bit
    assert first["quality_clf"].between(0, 1).all() and first["quality_clf"].notna().all()
    # It learned something real: clean text scores higher than degraded text.
    assert spearmanr(first["quality_clf"], first["true_quality"])[0] > 0.6
    a = np.load(tmp_path / "a" / "artifacts" / "classifier.npz", allow_pickle=False)
    b = np.load(tmp_path / "b" / "artifacts" / "classifier.npz", allow_pickle=False)
    assert np.array_equal(a["coef"], b["coef"]) and a["coef"].shape == (2, Features().dim)  # one model per fold
    assert ctx.info["reused_model"] is False and ctx.info["holdout_auc"] > 0.6
    assert ctx.artifacts["quality_classifier"] == "artifacts"

    other_seed, _ = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path / "c", seed=1)
    assert other_seed["quality_clf"].tolist() != first["quality_clf"].tolist()  # the seed picks the sample


def test_rerun_reuses_the_saved_model_and_scores_match(ray_address, tmp_path):
    rows = corpus(200)
    first, ctx1 = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path)
    meta = json.loads((tmp_path / "artifacts" / "classifier.json").read_text())
    assert meta["n_positives"] == 150 and meta["n_negatives"] == 200
    second, ctx2 = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path)
    assert ctx1.info["reused_model"] is False and ctx2.info["reused_model"] is True
    assert second["quality_clf"].tolist() == first["quality_clf"].tolist()
    changed, ctx3 = run_stage({"positives": SYNTH_POSITIVES, "C": 0.1}, rows, tmp_path)
    assert ctx3.info["reused_model"] is False and changed["quality_clf"].tolist() != first["quality_clf"].tolist()


def test_a_classifier_meta_cut_by_a_crash_is_retrained_not_a_failure(ray_address, tmp_path):
    rows = corpus(120)
    first, _ = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path)
    meta = tmp_path / "artifacts" / "classifier.json"
    meta.write_text(meta.read_text()[:25])  # a plain write killed half-way
    again, ctx = run_stage({"positives": SYNTH_POSITIVES}, rows, tmp_path)
    assert ctx.info["reused_model"] is False
    assert again["quality_clf"].tolist() == first["quality_clf"].tolist()
    assert json.loads(meta.read_text())["n_negatives"] == 120
    assert not [f.name for f in meta.parent.iterdir() if ".tmp" in f.name]  # atomic writes leave no temporaries


def test_training_sample_size_is_honoured(ray_address, tmp_path):
    rows = corpus(400)
    _, ctx = run_stage({"positives": {"synthetic": {"docs": 200}}, "sample_size": 40,
                        "features": {"max_chars": 300}}, rows, tmp_path)
    assert ctx.info["n_positives"] == 40 and ctx.info["n_negatives"] == 40
    assert ctx.info["positives_read"] == 200
    # two cross-fitted models: each sees every positive and the negatives of the other fold
    assert ctx.info["n_fit"] + ctx.info["n_holdout"] == 2 * 40 + 40

    # The negative sample: at most k, truncated, the same for any block layout, and sorted by id.
    one = sample_negatives(dataset(rows, 1), 25, seed=3, max_chars=50)
    many = sample_negatives(dataset(rows, 9), 25, seed=3, max_chars=50)
    assert one == many and len(one) == 25 and max(len(t) for _, t in one) <= 50
    by_id = {r["id"]: r["text"][:50] for r in rows}
    assert [i for i, _ in one] == sorted(i for i, _ in one) and all(by_id[i] == t for i, t in one)
    assert len(sample_negatives(dataset(rows, 2), 1000, seed=3, max_chars=50)) == 400


def test_every_row_is_scored_by_a_model_that_did_not_train_on_it():
    """Cross-fitting: the fold-f model never saw a fold-f negative, so a row's score does not change
    when the row is dropped from the training sample (it would, for an in-sample model)."""
    rows = corpus(300)
    positives = list(_synthetic_texts(SyntheticSource(docs=150, min_quality=0.8)))
    negatives = sorted((r["id"], r["text"]) for r in rows)
    features = Features(n_features=2**14)
    coef, intercept, _ = fit_cross_fitted(positives, negatives, features, 1.0, seed=0)
    texts, ids = [t for _, t in negatives], [i for i, _ in negatives]
    scores = predict_proba(texts, coef, intercept, features, fold_of(ids, 0))
    folds = fold_of(ids, 0)
    for fold in (0, 1):  # drop the fold's own rows from the sample: its model is unchanged
        kept = [n for n, f in zip(negatives, folds) if f != fold]
        again, again_intercept, _ = fit_cross_fitted(positives, kept, features, 1.0, seed=0)
        assert np.array_equal(again[fold], coef[fold]) and again_intercept[fold] == intercept[fold]
    # What it avoids: the other fold's model trained on these rows as negatives and scores them lower.
    seen = predict_proba(texts, coef, intercept, features, 1 - folds)
    assert seen.mean() < scores.mean() - 0.01, (seen.mean(), scores.mean())


def test_trusted_text_reads_files_leniently_and_at_most_max_read(tmp_path):
    from pipeline.io.trusted import TrustedText

    path = tmp_path / "trusted.jsonl"
    lines = [json.dumps({"body": f"trusted document {i}"}) for i in range(100)]
    path.write_text("\n".join(lines[:50] + ["{not json", json.dumps({"body": "  "}), json.dumps({"other": 1})]
                              + lines[50:]) + "\n")
    every = list(TrustedText.model_validate({"path": str(path), "text_field": "body"}).texts())
    assert every == [f"trusted document {i}" for i in range(100)]  # bad, blank and field-less lines skipped
    bounded = TrustedText.model_validate({"path": str(path), "text_field": "body", "max_read": 10})
    assert list(bounded.texts()) == every[:10]


def test_bottom_k_is_the_k_smallest_hashes_whatever_the_stream_order():
    from pipeline.core.hashing import content_id, hash64

    texts = [f"document number {i} " * (1 + i % 5) for i in range(3000)] + ["dup"] * 50
    kept, seen = bottom_k(texts, 20, seed=7, salt=POSITIVES_SALT, max_chars=10_000)
    shuffled = texts[:]
    random.Random(1).shuffle(shuffled)
    assert bottom_k(shuffled, 20, seed=7, salt=POSITIVES_SALT, max_chars=10_000) == (kept, seen)
    distinct = sorted(set(texts))
    ids = [content_id(t) for t in distinct]
    brute = [(i, t) for _, i, t in sorted(zip(hash64(ids, 7, POSITIVES_SALT), ids, distinct))][:20]
    assert kept == brute and seen == len(texts) and len({t for _, t in kept}) == 20


def write_config(tmp_path: Path, positives) -> Path:
    config = {"run": {"name": "qc"}, "input": {"format": "synthetic", "synthetic": {"docs": 50}},
              "stages": [{"name": "quality_classifier", "positives": positives}, {"name": "combine"}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_missing_or_empty_positives_exit_2_naming_the_file(cli, tmp_path):
    out = tmp_path / "never"
    missing = tmp_path / "no_such_trusted.jsonl"
    result = cli("run", str(write_config(tmp_path, str(missing))), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "stages[0].positives" in result.stderr and str(missing) in result.stderr and "not found" in result.stderr
    assert not out.exists()

    empty = tmp_path / "empty_trusted.jsonl"
    empty.write_text("")
    result = cli("run", str(write_config(tmp_path, str(empty))), "--out", str(out))
    assert result.returncode == 2 and str(empty) in result.stderr and "empty" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("content, name", [
    ("\n\n", "blank.jsonl"),
    ('{"text": ""}\n{"text": "   "}\n{"other": "x"}\nnot json\n', "no_text.jsonl"),
    ("", "empty.txt"),
])
def test_positives_without_usable_text_are_a_config_error(tmp_path, content, name):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"stages\[0\]\.positives: file '{path}' is empty"):
        validate_config({"stages": [{"name": "quality_classifier", "positives": str(path)}]})


def test_positives_formats_and_params_validation(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first trusted doc", "", "second"]}), tmp_path / "t.parquet")
    spec = QualityClassifierParams.model_validate({"positives": {"path": str(tmp_path / "t.parquet"),
                                                                 "text_field": "body"}}).positives
    assert list(spec.texts()) == ["first trusted doc", "second"]
    (tmp_path / "t.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert list(QualityClassifierParams.model_validate({"positives": str(tmp_path / "t.txt")}).positives.texts()) == [
        "para one\nstill one", "para two"]
    with pytest.raises(ConfigError, match="either positives .* or model"):
        validate_config({"stages": [{"name": "quality_classifier"}]})
    with pytest.raises(ConfigError, match="n-gram range"):
        validate_config({"stages": [{"name": "quality_classifier", "positives": SYNTH_POSITIVES,
                                     "features": {"char_ngrams": [5, 3]}}]})


def test_editing_the_trusted_file_changes_the_stage_key(tmp_path):
    import os

    path = tmp_path / "trusted.jsonl"
    path.write_text('{"text": "a trusted document"}\n')
    params = QualityClassifierParams.model_validate({"positives": str(path)})
    before = stage_key("upstream", stage_spec(QualityClassifierStage(params), seed=0))
    assert stage_key("upstream", stage_spec(QualityClassifierStage(params), seed=0)) == before
    path.write_text('{"text": "a trusted document"}\n{"text": "and another"}\n')
    os.utime(path, ns=(1, 1))
    assert stage_key("upstream", stage_spec(QualityClassifierStage(params), seed=0)) != before


# --------------------------------------------------------------------------- hub classifiers


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A real GPT-2 sequence classifier with 3 labels, built from a config and saved locally."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from pipeline.models.lm import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny-cls")
    tokenizer = train_bpe_tokenizer([r["text"] for r in corpus(200)], vocab_size=400)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer), num_labels=3,
                        id2label={0: "low", 1: "mid", 2: "high"}, label2id={"low": 0, "mid": 1, "high": 2},
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hub_classifier_matches_a_direct_transformers_computation(ray_address, tmp_path, tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = corpus(40)
    rows[3]["text"] = "short"
    out, ctx = run_stage({"model": str(tiny_classifier), "label": "mid", "max_length": 48, "max_tokens": 200,
                          "batch_size": 16}, rows, tmp_path, blocks=3)
    assert ctx.info["label_index"] == 1 and ctx.info["num_labels"] == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    expected = {}
    with torch.inference_mode():
        for r in rows:  # one document per forward pass: no padding at all
            ids = tokenizer(r["text"], truncation=True, max_length=48, return_tensors="pt")
            expected[r["id"]] = torch.softmax(model(**ids).logits, -1)[0, 1].item()
    got = dict(zip(out["id"], out["quality_clf"]))
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in got) < 2e-6
    assert len({round(v, 4) for v in got.values()}) > 5  # scores vary by document


def test_hub_classifier_score_does_not_depend_on_its_batch(ray_address, tiny_classifier):
    """Alone or among 200 documents in another order, with another token budget, with the CUDA
    path's fixed batch shapes: the same bytes. (Plain length-sorted packing changed 8 of 200.)"""
    texts = [r["text"] for r in corpus(200)] + ["x", "short one"]

    def scorer(max_tokens: int, fixed: bool = False) -> SequenceClassifierScorer:
        made = SequenceClassifierScorer(str(tiny_classifier), "mid", max_length=64, max_tokens=max_tokens,
                                        device="cpu", trust_remote_code=False)
        made.fixed_shapes = fixed
        return made

    one = scorer(64)
    alone = np.array([one.score([t])[0] for t in texts])
    order = np.random.default_rng(0).permutation(len(texts))
    for max_tokens, fixed in [(200, False), (4096, False), (1024, True)]:
        together = scorer(max_tokens, fixed).score([texts[i] for i in order])
        assert np.array_equal(together, alone[order]), (max_tokens, fixed)
    assert len(set(alone.round(4))) > 20


def test_hub_classifier_errors_name_the_model(ray_address, tmp_path, tiny_classifier):
    with pytest.raises(ModelLoadError, match="no_such_model_dir"):
        run_stage({"model": str(tmp_path / "no_such_model_dir")}, corpus(5), tmp_path)
    with pytest.raises(ModelLoadError, match=r"label 'great' is not one of the model's labels \['high', 'low', 'mid'"):
        run_stage({"model": str(tiny_classifier), "label": "great"}, corpus(5), tmp_path)
