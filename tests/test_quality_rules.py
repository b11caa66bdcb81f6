"""The quality stage's rule sets (Gopher quality and repetition, C4, FineWeb): every column on a
hand-computed example, each preset's drops with their per-rule reasons, and a long repetitive
document."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.core.errors import ConfigError
from pipeline.engine.config import validate_config
from pipeline.engine.runner import run_pipeline
from stages.base import StageContext
from stages.quality import (
    PRESETS,
    SIGNALS,
    QualityFilter,
    QualityParams,
    QualityStage,
    _score_batch,
    document_signals,
)

# ----------------------------------------------------------------------------- columns, by hand


def test_gopher_quality_columns():
    text = "The cat and the dog.\n# Heading ...\n• one two…\n--- ---"
    s = document_signals(text)
    # 13 whitespace tokens; 8 words (with a letter or digit): The cat and the dog. Heading one two…
    assert s["n_chars"] == 20 + 1 + 13 + 1 + 10 + 1 + 7
    assert s["n_words"] == 8
    assert s["mean_word_len"] == 28 / 8  # 3+3+3+3+3 ("dog." without ".") + 7 + 3 + 3 ("two…" without "…")
    assert s["alpha_ratio"] == 8 / 13  # "#", "...", "•", "---", "---" have no letter
    assert s["n_stop_words"] == 3  # The, and, the
    assert s["hash_word_ratio"] == 1 / 8
    assert s["ellipsis_word_ratio"] == 2 / 8  # "..." and "…"
    assert s["bullet_line_ratio"] == 2 / 4  # "• one two…" and "--- ---"
    assert s["ellipsis_line_ratio"] == 2 / 4  # "# Heading ..." and "• one two…"
    assert s["symbol_ratio"] == 3 / 41  # "#", "•", "…" of 41 non-space characters
    assert s["newline_word_ratio"] == 3 / 13
    for column in ("dup_line_ratio", "dup_para_ratio", "top_2gram_ratio", "dup_5gram_ratio"):
        assert s[column] == 0.0
    assert QualityFilter.gopher().failed_rule(s) == "quality.gopher.min_words"


def test_gopher_repetition_columns():
    # Lines: "a b c", "x y", "a b c", "x y", "z"; paragraphs: "a b c\nx y" (twice), "z".
    text = "a b c\nx y\n\na b c\nx y\n\nz"
    s = document_signals(text)
    assert s["n_chars"] == 23
    assert s["dup_line_ratio"] == 2 / 5
    assert s["dup_line_char_ratio"] == (5 + 3) / 23
    assert s["dup_para_ratio"] == 1 / 3
    assert s["dup_para_char_ratio"] == 9 / 23
    # Tokens a b c x y a b c x y z: 11 characters. Most frequent n-grams (first to occur on ties):
    assert s["top_2gram_ratio"] == 2 * 2 / 11  # "a b" twice
    assert s["top_3gram_ratio"] == 2 * 3 / 11  # "a b c" twice
    assert s["top_4gram_ratio"] == 2 * 4 / 11  # "a b c x" twice
    assert s["dup_5gram_ratio"] == 10 / 11  # "a b c x y" at tokens 0-4 and 5-9
    for n in range(6, 11):
        assert s[f"dup_{n}gram_ratio"] == 0.0
    # Overlapping occurrences count each character once; the top n-gram fraction is capped at 1.
    period = document_signals("one two three four five " * 4)
    assert period["dup_5gram_ratio"] == period["dup_10gram_ratio"] == 1.0
    assert period["top_2gram_ratio"] == 4 * 6 / 76  # "one two" 4 times, of 4 x 19 characters
    assert document_signals("a a a a")["top_2gram_ratio"] == 1.0  # 3 x 2 of 4 characters, capped
    assert document_signals("every token here is unique")["top_2gram_ratio"] == 0.0  # nothing repeats


def test_c4_columns():
    text = ("Please enable JavaScript to view this page.\n"  # terminal punctuation, but a javascript line
            "Read our privacy policy and terms of use.\n"  # a policy line
            "Lorem ipsum dolor sit amet.\n"  # kept: 1 sentence
            "function f() { return 1; }\n"  # no terminal punctuation
            "This is fine. It has two sentences!\n"  # kept: 2 sentences
            "short.")  # fewer than 3 words
    s = document_signals(text)
    assert s["c4_line_punct_ratio"] == 5 / 6
    assert s["c4_sentences"] == 3
    assert s["javascript_line_ratio"] == 1 / 6
    assert s["policy_line_ratio"] == 1 / 6
    assert s["lorem_ipsum"] == 1
    assert s["curly_brackets"] == 1
    assert QualityFilter.named("c4").failed_rule(s) == "quality.c4.max_lorem_ipsum"
    # Citations are removed before the check; an ellipsis is not a terminal mark for C4, but is for FineWeb.
    s = document_signals("It was founded in 1900.[3]\nSee the notes [edit]\nWait for it...")
    assert s["c4_line_punct_ratio"] == 1 / 3
    assert s["fineweb_line_punct_ratio"] == 1 / 3


def test_fineweb_columns():
    text = ("A line that is clearly longer than thirty characters.\n"
            "Short one!\n"
            "\n"
            "no punctuation at the end of this long line here\n"
            "A line that is clearly longer than thirty characters.")
    s = document_signals(text)
    assert s["fineweb_line_punct_ratio"] == 3 / 4  # blank lines do not count
    assert s["short_line_ratio"] == 1 / 4  # "Short one!" (10 characters <= 30)
    assert s["n_chars"] == 53 + 1 + 10 + 2 + 48 + 1 + 53
    assert s["dup_line_char_ratio"] == 53 / 168
    assert s["newline_word_ratio"] == 4 / 30
    assert QualityFilter.named("fineweb").failed_rule(s) == "quality.fineweb.below_dup_line_char_ratio"


def test_every_column_has_a_description_and_an_empty_document_scores_zero():
    empty = document_signals("")
    assert set(empty) == set(SIGNALS)
    assert all(value == 0 for value in empty.values())
    for arrow_type, description in SIGNALS.values():
        assert description.split(":")[0] in ("int", "float")
        assert (arrow_type == pa.int64()) == description.startswith("int")


# ----------------------------------------------------------------------------- presets and drops

SENTENCES = [
    "The committee met on a rainy Tuesday to discuss the new library budget.",
    "Several members argued that the reading room needed better lighting and chairs.",
    "Others wanted to spend the money on digital archives for the local newspaper.",
    "After a long debate, they agreed to split the funds between both projects.",
    "The librarian thanked everyone and promised a report before the spring meeting.",
    "Volunteers will help move the old shelves to the basement next month.",
]
GOOD = "\n".join(SENTENCES)
SHORT = ["Doors open at nine.", "Bring a pencil.", "Coffee is free.", "Parking is behind.", "Ask at the desk.",
         "Tickets sold out.", "Rain is likely.", "Lunch starts at noon.", "Wear warm shoes.", "Maps are online.",
         "Dogs must wait outside.", "Phones on silent.", "Seats are limited.", "Exit via the hall."]
DOCS = {
    "good": GOOD,
    "short": "Too short to keep.",
    "dup_lines": "\n".join(s for s in SENTENCES for _ in range(2)),
    "curly": GOOD + "\nThe budget file is stored as {budget: 1200} in the archive.",
    "lorem": GOOD + "\nLorem ipsum dolor sit amet, as the template said.",
    "no_punct": "\n".join(s.rstrip(".") for s in SENTENCES),
    "short_lines": "\n".join([GOOD, *SHORT]),
    "dup_chars": "\n".join([*SENTENCES, SENTENCES[0]]),
}


def reasons(spec: object) -> dict[str, str | None]:
    params = QualityParams.model_validate({"filter": spec})
    table = pa.table({"id": list(DOCS), "text": list(DOCS.values())})
    out = _score_batch(table, params.filter)
    return dict(zip(out["id"].to_pylist(), out["_drop_reason"].to_pylist()))


def test_each_preset_drops_what_it_should_with_the_rule_as_reason():
    assert reasons("gopher") == {
        "good": None, "short": "quality.gopher.min_words", "dup_lines": "quality.gopher.max_dup_line_ratio",
        "curly": None, "lorem": None, "no_punct": None, "short_lines": None,
        "dup_chars": "quality.gopher.max_dup_5gram_ratio",  # both copies of a 13-word line: 0.27 of the characters
    }
    assert reasons("c4") == {
        "good": None, "short": "quality.c4.min_c4_sentences", "dup_lines": None,
        "curly": "quality.c4.max_curly_brackets", "lorem": "quality.c4.max_lorem_ipsum",
        "no_punct": "quality.c4.min_c4_sentences", "short_lines": None, "dup_chars": None,
    }
    assert reasons("fineweb") == {
        "good": None, "short": "quality.fineweb.below_short_line_ratio",
        "dup_lines": "quality.fineweb.below_dup_line_char_ratio", "curly": None, "lorem": None,
        "no_punct": "quality.fineweb.above_fineweb_line_punct_ratio",
        "short_lines": "quality.fineweb.below_short_line_ratio",  # 14 of 20 lines
        "dup_chars": "quality.fineweb.below_dup_line_char_ratio",  # its second copy: 0.135 of the characters
    }
    # A list applies the rule sets in turn; the first failed rule is the reason.
    both = reasons(["c4", "gopher"])
    assert both["short"] == "quality.c4.min_c4_sentences" and both["dup_lines"] == "quality.gopher.max_dup_line_ratio"
    assert [d for d, r in both.items() if r is None] == ["good", "short_lines"]
    # Explicit thresholds, alone or with a preset, as before.
    assert reasons({"min_words": 60, "max_curly_brackets": 0})["curly"] == "quality.max_curly_brackets"
    assert reasons({"min_words": 80})["good"] == "quality.min_words"  # 75 words
    assert reasons(["c4", {"below_dup_line_char_ratio": 0.1}])["dup_chars"] == "quality.below_dup_line_char_ratio"


def test_bounds_at_the_threshold():
    signals = {column: 0 for column in SIGNALS} | {"fineweb_line_punct_ratio": 0.12, "short_line_ratio": 0.67}
    assert QualityFilter({"min_fineweb_line_punct_ratio": 0.12}).failed_rule(signals) is None
    assert QualityFilter({"above_fineweb_line_punct_ratio": 0.12}).failed_rule(signals) \
        == "quality.above_fineweb_line_punct_ratio"
    assert QualityFilter({"max_short_line_ratio": 0.67}).failed_rule(signals) is None
    assert QualityFilter({"below_short_line_ratio": 0.67}).failed_rule(signals) == "quality.below_short_line_ratio"
    assert set(PRESETS) == {"gopher", "gopher_quality", "gopher_repetition", "c4", "fineweb"}
    assert PRESETS["gopher"] == {**PRESETS["gopher_quality"], **PRESETS["gopher_repetition"]}


@pytest.mark.parametrize("spec, message", [
    ("gopherr", "unknown filter preset 'gopherr'"),
    ({"max_dup_line": 0.3}, "no column 'dup_line'"),
    ({"most_words": 3}, "must start with min_, max_, above_ or below_"),
    ([], "empty list"),
    ({"min_words": "many"}, "must be a number"),
])
def test_bad_filters_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"stages": [{"name": "quality", "filter": spec}]})


def test_a_run_drops_and_counts_by_preset_rule(ray_address, tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in DOCS.items()))
    config = validate_config({"input": {"format": "jsonl", "path": str(path), "id_field": "id"},
                              "stages": [{"name": "quality", "filter": ["gopher", "c4"]}]})
    manifest = run_pipeline(config, tmp_path / "run", log=lambda _m: None)
    quality = manifest["stages"][0]
    assert quality["dropped_by"] == {
        "quality.gopher.min_words": 1, "quality.gopher.max_dup_line_ratio": 1,
        "quality.gopher.max_dup_5gram_ratio": 1, "quality.c4.max_curly_brackets": 1,
        "quality.c4.max_lorem_ipsum": 1, "quality.c4.min_c4_sentences": 1,
    }
    assert manifest["counts"]["output_rows"] == 2


# ----------------------------------------------------------------------------- a long repetitive document


def test_a_thousand_repeated_lines(ray_address, tmp_path: Path):
    import ray.data

    line = "the same line of text repeated here."
    text = "\n".join([line] * 1000)
    stage = QualityStage(QualityParams.model_validate({"filter": "gopher"}))
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "a", seed=0, input_columns=["id", "text"])
    ds = ray.data.from_items([{"id": "rep", "text": text}, {"id": "ok", "text": GOOD}])
    rows = {r["id"]: r for r in stage.apply(ds, ctx).take_all()}
    rep = rows["rep"]
    assert rep["dup_line_ratio"] == 999 / 1000 and rep["dup_line_char_ratio"] == 999 * 36 / len(text)
    assert rep["dup_10gram_ratio"] == 1.0 and rep["c4_sentences"] == 1000
    assert rep["_drop_reason"] == "quality.gopher.max_dup_line_ratio"
    assert rows["ok"]["_drop_reason"] is None
