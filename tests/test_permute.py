"""The permute stage (SPT): config errors, seeded draws, order-insensitivity, the word invariant on whole
documents, and a run through the runner whose added rows are declared and balance."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import yaml

from pipeline.core.errors import ConfigError
from pipeline.engine.config import load_config, validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.io.synth import graded_document, write_synthetic
from pipeline.io.synth_reversal import probe_paths, reversal_document, reversal_fact, reversal_probes
from pipeline.models.segmenters import words
from stages.permute import VARIANTS, PermuteBatch, chosen, draw_variants

ROOT = Path(__file__).resolve().parents[1]


def _config(**permute) -> dict:
    return {"run": {"name": "t", "seed": 0}, "input": {"format": "synthetic", "synthetic": {"docs": 10}},
            "stages": [{"name": "permute", **permute}]}


@pytest.mark.parametrize(("params", "key"), [
    ({"probs": {"original": 0.5, "reversed": 0.2}}, "stages[0].probs: the probabilities must sum to 1"),
    ({"probs": {"backwards": 1.0}}, "stages[0].probs: unknown order 'backwards'"),
    ({"probs": {"reversed": 1.5, "original": -0.5}}, "stages[0].probs: original: must be a probability >= 0"),
    ({"segmenter": "vicuna"}, "stages[0].segmenter"),
    ({"fraction": 1.5}, "stages[0].fraction"),
    ({"fraction": -0.1}, "stages[0].fraction"),
    ({"segmenter": "lm"}, "stages[0].lm: segmenter 'lm' needs its lm: section"),
    ({"openai": {"base_url": "http://x/v1", "model": "m"}}, "stages[0].openai: only segmenter 'openai'"),
    ({"segmenter": "openai", "openai": {"base_url": "http://x/v1", "model": "m", "api_kee": "K"}},
     "stages[0].openai.api_kee: unknown key"),
])
def test_config_errors_name_the_key(params, key):
    with pytest.raises(ConfigError) as info:
        validate_config(_config(**params))
    assert key in str(info.value), str(info.value)


def test_probs_are_honoured_on_ten_thousand_documents():
    probs = {"original": 0.5, "reversed": 0.3, "shuffled": 0.2}
    ids = [f"doc-{i}" for i in range(10_000)]
    counts = Counter(draw_variants(ids, probs, seed=3))
    for variant, p in probs.items():
        sigma = math.sqrt(10_000 * p * (1 - p))
        assert abs(counts[variant] - 10_000 * p) < 4 * sigma, (variant, counts)
    picked = chosen(ids, 0.25, seed=3).sum()
    assert abs(picked - 2500) < 4 * math.sqrt(10_000 * 0.25 * 0.75)
    # A variant with probability 0 is never drawn; each copy has its own draw.
    assert set(draw_variants(ids, {"original": 0, "reversed": 1, "shuffled": 0}, 3)) == {"reversed"}
    assert draw_variants(ids, probs, 3, copy=1) != draw_variants(ids, probs, 3, copy=0)


def _table(n: int) -> pa.Table:
    docs = [graded_document(i) for i in range(n)]
    return pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs],
                     "topic": [d["topic"] for d in docs]})


def _batch(**kwargs) -> PermuteBatch:
    params = {"segmenter": "rules", "spec": None, "probs": dict.fromkeys(VARIANTS, 1 / 3), "fraction": 0.6,
              "copies": 2, "keep_original": True, "seed": 5}
    return PermuteBatch(**{**params, **kwargs})


def test_output_depends_on_the_rows_not_on_the_batches():
    table = _table(60)
    whole = _batch()(table).to_pylist()
    parts = [_batch()(table.slice(a, 20)) for a in (40, 0, 20)]  # other batches, other order
    split = [row for part in parts for row in part.to_pylist()]
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(whole, key=key) == sorted(split, key=key)
    assert _batch(seed=6)(table).column("text").to_pylist() != _batch()(table).column("text").to_pylist()


def test_copies_keep_every_word_and_their_source():
    table = _table(80)
    out = _batch()(table).to_pylist()
    originals = {r["id"]: r for r in table.to_pylist()}
    copies = [r for r in out if r["id"] != r["source_id"]]
    assert {r["id"] for r in out if r["id"] == r["source_id"]} == set(originals)  # keep_original
    assert len(copies) == 2 * int(chosen(list(originals), 0.6, 5).sum())
    changed = 0
    for row in copies:
        source = originals[row["source_id"]]
        assert row["id"].startswith(row["source_id"] + "#spt-") and row["topic"] == source["topic"]
        assert Counter(words(row["text"])) == Counter(words(source["text"]))
        # Breaks between sentences stay; a line break inside a reordered sentence becomes a space.
        assert row["text"].count("\n\n") == source["text"].count("\n\n")
        assert row["text"].count("\n") <= source["text"].count("\n")
        changed += row["text"] != source["text"]
        if row["variant"] == "original":
            assert row["text"] == source["text"]
    assert changed > len(copies) / 2
    replaced = _batch(keep_original=False, fraction=1.0, copies=1)(table)
    assert replaced.num_rows == table.num_rows and set(replaced["source_id"].to_pylist()) == set(originals)


def test_names_stay_whole_in_reversal_facts():
    facts = [reversal_fact(i) for i in range(200)]
    table = pa.table({"id": [f"f{i}" for i in range(200)], "text": [f["text"] for f in facts]})
    out = _batch(fraction=1.0, copies=3, probs={"original": 0, "reversed": 0.5, "shuffled": 0.5})(table)
    for row in out.to_pylist():
        fact = facts[int(row["source_id"][1:])]
        # Every name (a run of capitalised words: "Dorin Achtenbel", "Mount Lirrowind") stays whole.
        for name in [fact["subject"], *re.findall(r"[A-Z]\w+(?: [A-Z]\w+)*", fact["object"])]:
            assert name in row["text"], (name, row["text"])
        if row["variant"] == "reversed":
            assert row["text"].index(fact["subject"]) > 0  # the name moved, whole


def test_reversal_corpus_and_probes(tmp_path):
    out = tmp_path / "rev.jsonl.gz"
    write_synthetic(out, 40, seed=2, kind="reversal")
    paths = probe_paths(out)
    assert paths["forward"].name == "rev-probes-forward.jsonl"
    probes = {d: [json.loads(line) for line in p.read_text().splitlines()] for d, p in paths.items()}
    assert probes == reversal_probes(40, seed=2)
    for rows in probes.values():
        assert len(rows) >= 30
        for probe in rows:
            assert len(probe["candidates"]) == len(set(probe["candidates"])) == 10
            assert probe["answer"] in probe["candidates"]
    train = [reversal_document(i, 2)["text"] for i in range(40)]
    for probe in probes["reverse"]:  # the training text states each fact name first, never the other way
        fact = reversal_fact(int(probe["id"].split("-")[1]), 2)
        assert not any(t.startswith(probe["prompt"]) for t in train)
        assert fact["text"].startswith(fact["subject"])


def test_spt_run_declares_its_added_rows(ray_address, tmp_path, monkeypatch):
    monkeypatch.setenv("CURRICULUM_PROGRESS_SECONDS", "0.05")
    config = load_config(ROOT / "configs" / "spt.yaml", ["input.synthetic.docs=60", "stages.permute.copies=2"])
    out = tmp_path / "run"
    lines: list[str] = []
    manifest = run_pipeline(config, out, address=ray_address, log=lines.append)
    # The actor pool's rows show in the progress lines (the runner's RowTally; test_progress.py has the rest).
    assert any(re.match(r"\[1/2 permute\] [1-9][\d,]* / 60 rows", line) for line in lines), lines
    permute = next(s for s in manifest["stages"] if s["name"] == "permute")
    added = permute["added_by"]
    assert set(added) <= {f"permute.{v}" for v in VARIANTS} and sum(added.values()) == 120
    assert permute["rows_in"] == 60 and permute["rows_out"] == 180
    assert permute["info"]["copies_by_variant"] == {k.split(".")[1]: v for k, v in added.items()}
    shards = pl.read_parquet(out / "shards" / "*.parquet")
    assert shards.height == 180 and {"variant", "source_id"} <= set(shards.columns)
    by_source = shards.group_by("source_id").len()
    assert by_source["len"].to_list() == [3] * 60
    copies = shards.filter(pl.col("id") != pl.col("source_id"))
    assert copies["id"].str.contains("#spt-").all() and copies.height == 120


def test_spt_yaml_is_shipped_with_the_reversal_input():
    config = load_config(ROOT / "configs" / "spt.yaml")
    assert config.input.synthetic.kind == "reversal"
    assert [s.name for s in config.stages] == ["permute", "order"]
    assert yaml.safe_load((ROOT / "configs" / "spt.yaml").read_text())["train"]["model"]["config"]["model_type"]
