"""The foundation, as a user meets it: readers, quarantine, config errors, manifest, shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.hashing import content_id
from pipeline.engine.config import load_config, validate_config
from pipeline.engine.runner import run_pipeline
from stages.quality import QualityFilter, document_signals

PROSE = "The quick brown fox jumps over the lazy dog while the cat watches from the warm window."


def run(tmp_path: Path, raw_config: dict, name: str = "run") -> tuple[dict, Path]:
    out = tmp_path / name
    manifest = run_pipeline(validate_config(raw_config), out, log=lambda _m: None)
    return manifest, out


def shard_frame(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "shards").glob("part-*.parquet")))


def quarantine_frame(out: Path) -> pl.DataFrame:
    files = sorted((out / "quarantine").glob("*.parquet"))
    return pl.read_parquet(files) if files else pl.DataFrame(schema={"source": pl.Utf8, "raw": pl.Utf8, "reason": pl.Utf8})


def assert_balanced(manifest: dict) -> None:
    c = manifest["counts"]
    dropped = sum(s["dropped"] for s in manifest["stages"])
    added = sum(s["added"] for s in manifest["stages"])
    assert c["input_rows"] == c["quarantined"] + dropped + c["output_rows"] - added


# ----------------------------------------------------------------------------- readers


def test_jsonl_gz_reader_keeps_ids_and_types_extra_fields(ray_address, tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(30):
            record = {"doc": f"d{i}", "body": f"{PROSE} Number {i}.", "score": i, "lang": "en"}
            if i % 2:
                record["score"] = i + 0.5  # int and float mix -> float64
            if i == 7:
                record["meta"] = {"nested": True}  # only one record has it -> JSON string, null elsewhere
            fh.write(json.dumps(record) + "\n")
    manifest, out = run(tmp_path, {"input": {"format": "jsonl", "path": str(path), "text_field": "body",
                                             "id_field": "doc"}})
    df = shard_frame(out)
    assert df.height == 30 and manifest["counts"] == {"input_rows": 30, "quarantined": 0, "output_rows": 30}
    assert set(df["id"]) == {f"d{i}" for i in range(30)}
    assert df.schema["score"] == pl.Float64 and df.schema["lang"] == pl.Utf8
    assert df.filter(pl.col("id") == "d7")["meta"][0] == '{"nested": true}'
    assert df["meta"].null_count() == 29
    assert "doc" not in df.columns and "body" not in df.columns


def test_parquet_reader_content_hash_ids_and_keep_fields(ray_address, tmp_path):
    texts = [f"{PROSE} Parquet row {i}." for i in range(12)]
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"content": texts, "source": ["web"] * 12, "noise": list(range(12))}), folder / "a.parquet")
    manifest, out = run(tmp_path, {"input": {"format": "parquet", "path": str(folder), "text_field": "content",
                                             "keep_fields": ["source"]}})
    df = shard_frame(out)
    assert sorted(df["id"]) == sorted(content_id(t) for t in texts)
    assert "source" in df.columns and "noise" not in df.columns


def test_text_reader_one_document_per_file(ray_address, tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(PROSE + " A.")
    (folder / "sub" / "b.md").write_text(PROSE + " B.")
    (folder / "empty.txt").write_text("   \n")
    manifest, out = run(tmp_path, {"input": {"format": "text", "path": str(folder)}})
    df = shard_frame(out)
    assert sorted(df["path"]) == ["a.txt", "sub/b.md"]
    assert manifest["counts"] == {"input_rows": 3, "quarantined": 1, "output_rows": 2}
    assert quarantine_frame(out)["reason"].to_list() == ["empty or whitespace-only text"]


def test_hf_reader_loads_a_local_dataset_with_datasets(ray_address, tmp_path):
    data = tmp_path / "hfdata"
    data.mkdir()
    with open(data / "train.jsonl", "w") as fh:
        for i in range(25):
            fh.write(json.dumps({"idx": i, "text": f"{PROSE} HF {i}."}) + "\n")
    config = {"input": {"format": "hf", "id_field": "idx",
                        "hf": {"name": "json", "data_files": str(data / "train.jsonl"), "split": "train",
                               "streaming": False}}}
    manifest, out = run(tmp_path, config)
    df = shard_frame(out)
    assert sorted(df["id"].cast(pl.Int64)) == list(range(25))
    assert manifest["counts"]["output_rows"] == 25


def test_synthetic_reader_matches_synth_generator(ray_address, tmp_path):
    from pipeline.io.synth import graded_document

    manifest, out = run(tmp_path, {"input": {"format": "synthetic", "synthetic": {"docs": 40, "seed": 3}}})
    df = shard_frame(out).sort("id")
    assert df["id"].to_list() == [f"syn-{i:07d}" for i in range(40)]
    assert df["text"][5] == graded_document(5, 3)["text"]
    assert df["true_quality"].is_between(0, 1).all()


# ----------------------------------------------------------------------------- quarantine


def test_every_bad_record_kind_is_quarantined_with_its_reason(ray_address, tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [{"id": f"ok{i}", "text": f"{PROSE} {i}"} for i in range(5)]
    lines = [json.dumps(r).encode() for r in good]
    bad = {
        "malformed json": b'{"id": "m1", "text": "unterminated',
        "missing text field": json.dumps({"id": "m2", "body": "x"}).encode(),
        "is not a string": json.dumps({"id": "m3", "text": 42}).encode(),
        "empty or whitespace-only": json.dumps({"id": "m4", "text": "  \n\t "}).encode(),
        "invalid utf-8": b'{"id": "m5", "text": "caf\xe9 au lait"}',
        "NUL bytes": json.dumps({"id": "m6", "text": "a\u0000b"}).encode(),
        "duplicate id": json.dumps({"id": "ok1", "text": "another text with a repeated id"}).encode(),
        "longer than input.max_chars": json.dumps({"id": "m8", "text": "x" * 500}).encode(),
        "not a JSON object": b'["a", "list"]',
        "missing id field": json.dumps({"text": "no id here"}).encode(),
    }
    lines += list(bad.values())
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # a trailing blank line is not a record
    manifest, out = run(tmp_path, {"input": {"format": "jsonl", "path": str(path), "id_field": "id", "max_chars": 200}})

    q = quarantine_frame(out)
    assert manifest["counts"] == {"input_rows": 15, "quarantined": 10, "output_rows": 5}
    assert_balanced(manifest)
    for line_no, fragment in enumerate(bad, start=6):
        row = q.filter(pl.col("source") == f"{path}:{line_no}")
        assert row.height == 1, f"line {line_no} ({fragment}) not quarantined"
        assert fragment in row["reason"][0], (fragment, row["reason"][0])
        assert row["raw"][0]
    dup = q.filter(pl.col("reason").str.contains("duplicate"))["reason"][0]
    assert f"first seen at {path}:2" in dup
    assert sorted(shard_frame(out)["id"]) == [f"ok{i}" for i in range(5)]


def test_content_hash_ids_deduplicate_exact_copies(ray_address, tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in [PROSE, PROSE + " 2", PROSE, PROSE]) + "\n")
    manifest, out = run(tmp_path, {"input": {"format": "jsonl", "path": str(path)}})
    assert manifest["counts"] == {"input_rows": 4, "quarantined": 2, "output_rows": 2}
    sources = sorted(quarantine_frame(out)["source"])
    assert sources == [f"{path}:3", f"{path}:4"]


# ----------------------------------------------------------------------------- config


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_config_errors_name_the_key(tmp_path):
    cases = {
        "run: {name: x, sed: 1}\n": "run.sed: unknown key (allowed: name, seed)",
        "input: {format: csv}\n": "input.format",
        "stages: [{name: quality, fliter: gopher}]\n": "stages[0].fliter: unknown key",
        "stages: [{name: qualty}]\n": "stages[0].name: unknown stage 'qualty'",
        "output: {rows_per_shard: many}\n": "output.rows_per_shard",
        "input: {format: jsonl, path: /nonexistent/*.jsonl}\n": "no input file matches '/nonexistent/*.jsonl'",
        "stages: [{name: order, method: sort}]\n": "needs key",
        "train: {seq_len: 256, bogus: 1}\n": "train.bogus: unknown key",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(write_yaml(tmp_path, text))
        assert expected in str(info.value), (text, str(info.value))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates_and_names_its_stages(path):
    if path.name == "study.yaml":  # a pipeline config plus a study: section, read by `curriculum study`
        from pipeline.engine.study import load_study_config

        config = load_study_config(path).config
    else:
        config = load_config(path)
    names = [stage.name for stage in config.stages]
    assert names and names[-1] == "order", names
    if path.name == "diverse.yaml":
        assert names[-5:] == ["embed", "cluster", "semdedup", "kmq", "order"]


def test_set_overrides_values_and_stage_params_by_name(tmp_path):
    path = write_yaml(tmp_path, "stages: [{name: quality}, {name: order, method: sort, key: n_words}]\n")
    config = load_config(path, ["run.seed=7", "stages.order.direction=descending", "output.rows_per_shard=3"])
    assert config.run.seed == 7 and config.output.rows_per_shard == 3
    assert config.stages[1].direction == "descending"
    with pytest.raises(ConfigError, match="run.colour: unknown key"):
        load_config(path, ["run.colour=blue"])
    with pytest.raises(ConfigError, match="no single stage named 'perplexty'"):
        load_config(path, ["stages.perplexty.max_length=3"])


def test_default_order_is_a_seeded_shuffle(tmp_path):
    config = load_config(write_yaml(tmp_path, "stages: [{name: quality}]\n"))
    assert [s.name for s in config.stages] == ["quality", "order"]
    assert config.stages[-1].method == "random"


# ----------------------------------------------------------------------------- stages and shards


def test_quality_signals_on_hand_checked_text():
    s = document_signals("alpha beta gamma\nalpha beta gamma\n#### $$$$")
    assert s["n_words"] == 6 and s["n_chars"] == 43  # "####" and "$$$$" are not words
    assert s["dup_line_ratio"] == pytest.approx(1 / 3)
    assert s["alpha_ratio"] == pytest.approx(6 / 8)
    assert s["symbol_ratio"] == pytest.approx(8 / 36)
    assert s["top_2gram_ratio"] == pytest.approx(2 * 9 / 36)  # "alpha beta" twice, 9 chars each, of 36 word chars
    repeated = document_signals("one two three four five " * 4)
    assert repeated["dup_5gram_ratio"] == pytest.approx(1.0)
    failing = QualityFilter.gopher().failed_rule(document_signals("too short"))
    assert failing == "quality.gopher.min_words"


def test_quality_filter_drops_and_counts_by_rule(ray_address, tmp_path):
    config = {"input": {"format": "synthetic", "synthetic": {"docs": 200}},
              "stages": [{"name": "quality", "filter": {"min_words": 60, "max_symbol_ratio": 0.1}},
                         {"name": "order", "method": "sort", "key": "n_words", "direction": "descending"}],
              "output": {"rows_per_shard": 64}}
    manifest, out = run(tmp_path, config)
    quality = manifest["stages"][0]
    assert quality["dropped"] > 0 and sum(quality["dropped_by"].values()) == quality["dropped"]
    assert set(quality["dropped_by"]) <= {"quality.min_words", "quality.max_symbol_ratio"}
    assert_balanced(manifest)
    df = shard_frame(out)
    assert df["n_words"].min() >= 60 and df["symbol_ratio"].max() <= 0.1
    assert df["n_words"].to_list() == sorted(df["n_words"].to_list(), reverse=True)
    dropped = pl.read_parquet(next((out / "stages").glob("01-quality-*")) / "dropped")
    assert dropped.height == quality["dropped"] and "n_words" in dropped.columns


def test_run_folder_matches_the_contract(ray_address, tmp_path):
    import datasets
    import pyarrow.dataset as pads
    import ray.data

    config = {"run": {"name": "contract", "seed": 1}, "input": {"format": "synthetic", "synthetic": {"docs": 300}},
              "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "alpha_ratio"}],
              "output": {"rows_per_shard": 128}}
    manifest, out = run(tmp_path, config)
    for key in ("run_id", "config_hash", "config", "seed", "versions", "stages", "counts", "shards", "order"):
        assert key in manifest
    for package in ("python", "ray", "torch", "transformers", "datasets", "polars", "data-curriculum"):
        assert manifest["versions"][package]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert_balanced(manifest)
    assert [s["rows"] for s in manifest["shards"]] == [128, 128, 44]
    assert [s["path"] for s in manifest["shards"]] == [f"shards/part-{i:05d}.parquet" for i in range(3)]

    df = shard_frame(out)
    assert df["position"].to_list() == list(range(300))
    assert df["id"].n_unique() == 300
    assert df["alpha_ratio"].to_list() == sorted(df["alpha_ratio"].to_list())
    for shard in manifest["shards"]:
        part = pl.read_parquet(out / shard["path"])
        assert (part["position"].min(), part["position"].max()) == (shard["first_position"], shard["last_position"])

    files = [str(out / s["path"]) for s in manifest["shards"]]
    hf = datasets.load_dataset("parquet", data_files=files, split="train")
    assert hf["id"] == df["id"].to_list() and hf.num_rows == 300
    assert pl.scan_parquet(files).select(pl.len()).collect().item() == 300
    assert pads.dataset(files).to_table().column("id").to_pylist() == df["id"].to_list()
    ray_rows = ray.data.read_parquet(files).sort("position").take_all()
    assert [r["id"] for r in ray_rows] == df["id"].to_list()


def test_rerun_resumes_from_cache_and_a_changed_param_reruns_only_downstream(ray_address, tmp_path):
    base = {"input": {"format": "synthetic", "synthetic": {"docs": 120}},
            "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "n_chars"}]}
    first, out = run(tmp_path, base)
    again, _ = run(tmp_path, base)
    assert [s["cached"] for s in again["stages"]] == [True, True]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]

    changed = {**base, "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "n_chars",
                                                          "direction": "descending"}]}
    third, _ = run(tmp_path, changed)
    assert [s["cached"] for s in third["stages"]] == [True, False]
    assert shard_frame(out)["n_chars"].to_list() == sorted(shard_frame(out)["n_chars"].to_list(), reverse=True)


def test_random_order_is_seeded_and_a_permutation(ray_address, tmp_path):
    def ids(seed: int, name: str) -> list[str]:
        _, out = run(tmp_path, {"run": {"seed": seed}, "input": {"format": "synthetic", "synthetic": {"docs": 150, "seed": 0}},
                                "stages": [{"name": "order", "method": "random"}]}, name)
        return shard_frame(out)["id"].to_list()

    a, b, c = ids(1, "a"), ids(1, "b"), ids(2, "c")
    assert a == b and a != c
    assert sorted(a) == sorted(c) == [f"syn-{i:07d}" for i in range(150)]


# ----------------------------------------------------------------------------- fidelity fixes


def test_input_fields_named_like_embeddings_reach_the_shards(ray_address, tmp_path):
    """Only columns a stage declares cache-only are kept out of the shards; a user's field is data."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"{PROSE} {i}", "embedding_model": "mine",
                                        "embeddings_note": i}) + "\n" for i in range(20)))
    config = {"input": {"format": "jsonl", "path": str(path)}, "stages": [{"name": "order", "method": "random"}]}
    assert not validate_config(config).output.keep_embeddings
    _, out = run(tmp_path, config)
    df = shard_frame(out)
    assert df["embedding_model"].to_list() == ["mine"] * 20
    assert sorted(df["embeddings_note"].to_list()) == list(range(20))


def test_hf_trust_remote_code_is_rejected_with_the_reason(tmp_path):
    """datasets 5 ignores trust_remote_code (no dataset scripts run): accepting it would mislead."""
    raw = {"input": {"format": "hf", "hf": {"name": "some/dataset", "trust_remote_code": True}}}
    with pytest.raises(ConfigError, match=r"input\.hf.*trust_remote_code: datasets 5 no longer runs"):
        validate_config(raw)
    trusted = {"stages": [{"name": "quality_classifier", "positives": {"hf": {"name": "x/y", "trust_remote_code": False}}}]}
    with pytest.raises(ConfigError, match="trust_remote_code: datasets 5 no longer runs"):
        validate_config(trusted)


def test_a_stage_marker_cut_by_a_crash_is_recomputed_not_read(ray_address, tmp_path):
    config = {"input": {"format": "synthetic", "synthetic": {"docs": 60}},
              "stages": [{"name": "quality"}, {"name": "order", "method": "sort", "key": "n_chars"}]}
    first, out = run(tmp_path, config)
    marker = next((out / "stages").glob("01-quality-*")) / "_SUCCESS.json"
    marker.write_text(marker.read_text()[:40])  # what a kill in the middle of a plain write leaves
    again, _ = run(tmp_path, config)
    assert [s["cached"] for s in again["stages"]] == [False, True]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    assert json.loads(marker.read_text())["rows_out"] == 60


def test_a_run_sets_its_ray_data_context_and_restores_the_callers():
    """A run reads its stage cache with Ray's first parquet reader (the second starts 32 actors per
    read, which a 1-CPU cluster cannot place) and sorts with the pull-based shuffle; a notebook's
    own settings come back afterwards."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    from pipeline.engine.runner import pipeline_data_context

    context = ray.data.DataContext.get_current()
    saved = context.use_datasource_v2, context.shuffle_strategy
    context.use_datasource_v2, context.shuffle_strategy = True, ShuffleStrategy.SHUFFLE_V2
    try:
        with pipeline_data_context():
            assert context.use_datasource_v2 is False
            assert context.shuffle_strategy == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        assert (context.use_datasource_v2, context.shuffle_strategy) == (True, ShuffleStrategy.SHUFFLE_V2)
    finally:
        context.use_datasource_v2, context.shuffle_strategy = saved
