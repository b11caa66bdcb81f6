"""The bad-input matrix: every kind of broken input is quarantined with a reason naming where it came
from, or stops the run naming the file (exit 1) or the config key (exit 2); counts always balance.

Most kinds are checked in-process on the read layer (what a Ray read task runs); one Ray run covers
a folder of mixed files with ids colliding across files, and in-process CLI calls the exit codes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.core.errors import ConfigError, UnreadableInputError
from pipeline.engine.config import validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.io.readers import RAW_LIMIT, JsonlDatasource, ParquetDatasource, RecordChecker

PROSE = "The quick brown fox jumps over the lazy dog while the cat watches from the warm window."


def read(datasource_type: type, path: Path, id_field: str | None = None, max_chars: int = 1_000_000) -> list[dict]:
    """What one Ray read task yields for ``path``: parsed rows, bad ones with ``_reason``."""
    source = datasource_type([(0, str(path))], RecordChecker("text", id_field, max_chars, None), 1000)
    return [row for table in source._read_group([(0, str(path))]) for row in table.to_pylist()]


def line(record: object) -> bytes:
    return json.dumps(record).encode()


JSONL_KINDS = {
    # kind: (the bytes of one line, a fragment of the quarantine reason; None = accepted)
    "malformed json": (b'{"text": "unterminated', "malformed json"),
    "latin-1 byte in a utf-8 file": (b'{"text": "caf\xe9 au lait"}', "invalid utf-8"),
    "utf-16 encoded line": ('{"text": "hello there"}'.encode("utf-16"), "invalid utf-8"),
    "lone surrogate escape": (b'{"text": "a \\ud800 b"}', "lone surrogate"),
    "a list, not an object": (b'["a", "list"]', "not a JSON object (got list)"),
    "a number, not an object": (b"42", "not a JSON object (got int)"),
    "a string, not an object": (b'"just text"', "not a JSON object (got str)"),
    "null line": (b"null", "not a JSON object (got NoneType)"),
    "nested too deeply to parse": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "missing text field": (line({"body": PROSE}), "missing text field 'text'"),
    "text is a number": (line({"text": 3.5}), "text field 'text' is not a string (got float)"),
    "text is a list": (line({"text": ["a", "b"]}), "text field 'text' is not a string (got list)"),
    "text is null": (line({"text": None}), "is not a string (got NoneType)"),
    "empty text": (line({"text": ""}), "empty or whitespace-only"),
    "whitespace-only text": (line({"text": " \n\t"}), "empty or whitespace-only"),
    "NUL byte in text": (line({"text": "a\u0000b"}), "text contains NUL bytes"),
    "CRLF line ending": (line({"text": PROSE}) + b"\r", None),
    "extra fields of every JSON type": (line({"text": PROSE, "n": 1, "x": [1, {"y": None}], "ok": True}), None),
}


@pytest.mark.parametrize("kind", sorted(JSONL_KINDS))
def test_jsonl_bad_record_kinds(kind, tmp_path):
    data, reason = JSONL_KINDS[kind]
    path = tmp_path / "in.jsonl"
    path.write_bytes(line({"text": PROSE + " first"}) + b"\n" + data + b"\n" + line({"text": PROSE + " last"}) + b"\n")
    rows = read(JsonlDatasource, path)
    assert len(rows) == 3, rows  # every line is one record, good or bad: nothing vanishes
    assert [r["_reason"] is None for r in (rows[0], rows[2])] == [True, True]
    row = rows[1]
    assert row["_source"] == f"{path}:2"
    if reason is None:
        assert row["_reason"] is None and row["text"] == PROSE
    else:
        assert reason in row["_reason"], row["_reason"]
        assert row["_raw"] and row["id"] is None and len(row["_raw"]) <= RAW_LIMIT + 64


def test_a_utf8_byte_order_mark_starts_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line({"text": PROSE}) + b"\n")
    assert [r["text"] for r in read(JsonlDatasource, path)] == [PROSE]


def test_a_50_mb_document_is_quarantined_and_its_raw_is_cut(tmp_path):
    path = tmp_path / "huge.jsonl"
    text = "word " * 10_000_000  # 50 MB on one line
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": PROSE}) + "\n")
    rows = read(JsonlDatasource, path)
    assert rows[0]["_reason"] == f"text longer than input.max_chars ({len(text)} > 1000000)"
    assert len(rows[0]["_raw"]) < RAW_LIMIT + 100 and rows[0]["_raw"].endswith(f"[cut: {len(text) + 12} characters in all]")
    assert rows[1]["_reason"] is None


def test_id_field_of_the_wrong_type(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_bytes(b"\n".join(line({"id": v, "text": PROSE}) for v in (1.5, True, [1], " ", None, 7, "a/../b")) + b"\n")
    reasons = [r["_reason"] for r in read(JsonlDatasource, path, id_field="id")]
    assert reasons[:5] == ["id field 'id' is not a string or integer (got float)",
                           "id field 'id' is not a string or integer (got bool)",
                           "id field 'id' is not a string or integer (got list)",
                           "empty id in field 'id'", "missing id field 'id'"]
    assert reasons[5:] == [None, None]


@pytest.mark.parametrize("gz", [False, True])
def test_an_empty_file_has_no_records(tmp_path, gz):
    path = tmp_path / ("empty.jsonl.gz" if gz else "empty.jsonl")
    path.write_bytes(gzip.compress(b"") if gz else b"")
    assert read(JsonlDatasource, path) == []


def test_a_truncated_gzip_is_unreadable_naming_the_file(tmp_path):
    data = gzip.compress(b"".join(line({"text": f"{PROSE} {i}"}) + b"\n" for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableInputError, match=f"cannot read input file {path}: EOFError"):
        read(JsonlDatasource, path)


# ----------------------------------------------------------------------------- parquet


def write_parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def invalid_utf8(values: list[bytes]) -> pa.Array:
    return pa.array(values, pa.binary()).view(pa.string())  # a view does not validate: what a broken writer leaves


def test_parquet_invalid_utf8_in_text_and_in_another_column(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", pa.table({
        "text": invalid_utf8([PROSE.encode(), b"caf\xe9", PROSE.encode() + b" 2"]),
        "note": invalid_utf8([b"fine", b"fine", b"\xff\xfe"]),
    }))
    reasons = [r["_reason"] for r in read(ParquetDatasource, path)]
    assert reasons[0] is None
    assert "invalid utf-8" in reasons[1] and "(column 'text')" in reasons[1]
    assert "invalid utf-8" in reasons[2] and "(column 'note')" in reasons[2]


def test_parquet_extra_unexpected_columns_become_fields(tmp_path):
    path = write_parquet(tmp_path / "extra.parquet", pa.table({
        "text": [PROSE, PROSE + " 2"], "score": [1, 2], "tags": [["a"], ["b", "c"]],
        "meta": [{"k": 1}, {"k": 2}], "body_bytes": pa.array([b"x", b"y"], pa.binary()),
    }))
    rows = read(ParquetDatasource, path)
    assert [r["_reason"] for r in rows] == [None, None]
    assert rows[1]["_sig"] == "body_bytes:str,meta:json,score:int,tags:json"
    assert json.loads(rows[1]["_fields"]) == {"body_bytes": "y", "meta": {"k": 2}, "score": 2, "tags": ["b", "c"]}


def test_parquet_text_stored_as_binary_is_read(tmp_path):
    path = write_parquet(tmp_path / "binary.parquet", pa.table({"text": pa.array([PROSE.encode()], pa.binary())}))
    assert [r["text"] for r in read(ParquetDatasource, path)] == [PROSE]


@pytest.mark.parametrize("kind, table, message", [
    ("no text column", pa.table({"body": [PROSE]}), "no column 'text' (columns: body)"),
    ("text column of numbers", pa.table({"text": [1, 2]}), "column 'text' is int64, not a string"),
    ("text column of lists", pa.table({"text": [["a"], ["b"]]}), "column 'text' is list<element: string>, not a string"),
])
def test_parquet_with_the_wrong_schema_is_unreadable_naming_the_file(tmp_path, kind, table, message):
    path = write_parquet(tmp_path / "wrong.parquet", table)
    with pytest.raises(UnreadableInputError, match=f"cannot read input file {path}: ") as info:
        read(ParquetDatasource, path)
    assert message in str(info.value)


@pytest.mark.parametrize("cut", ["footer", "empty"])
def test_parquet_with_a_corrupt_footer_or_no_bytes_is_unreadable(tmp_path, cut):
    good = write_parquet(tmp_path / "good.parquet", pa.table({"text": [PROSE] * 50}))
    path = tmp_path / "broken.parquet"
    path.write_bytes(good.read_bytes()[:-20] if cut == "footer" else b"")
    with pytest.raises(UnreadableInputError, match=f"cannot read input file {path}: Arrow"):
        read(ParquetDatasource, path)


# ----------------------------------------------------------------------------- whole runs


def test_a_folder_of_mixed_files_with_colliding_ids_balances(ray_address, tmp_path):
    """A folder with two JSON-lines files whose ids collide, an empty file, bad records, and files of
    other formats: only the .jsonl files are read, the later copy of an id is quarantined naming
    the first, and input_rows = output_rows + quarantined."""
    folder = tmp_path / "in"
    folder.mkdir()
    hostile = ["../../escape-up", f"{tmp_path}/escape-abs", "a/b/escape-nested", "z" * 1024]
    (folder / "a.jsonl").write_bytes(b"\n".join([
        line({"id": "x1", "text": PROSE + " a1"}), line({"id": "x2", "text": PROSE + " a2"}),
        b'{"id": "x3", "text": "caf\xe9"}', line({"id": "x4", "text": 5}),
        line({"id": "nul\u0000id", "text": PROSE + " nul"}), line({"id": "y" * 5000, "text": PROSE + " long"}),
        *[line({"id": doc_id, "text": f"{PROSE} hostile {k}"}) for k, doc_id in enumerate(hostile)]]) + b"\n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as fh:
        fh.write(b"\n".join([line({"id": "x2", "text": PROSE + " b2 collides"}), line({"id": "x5", "text": PROSE + " b5"}),
                             b"[1, 2]"]) + b"\n")
    (folder / "c.jsonl").write_bytes(b"")
    write_parquet(folder / "other.parquet", pa.table({"text": ["never read"]}))
    (folder / "notes.txt").write_text("never read either")
    logged: list[str] = []
    config = validate_config({"input": {"format": "jsonl", "path": str(folder), "id_field": "id"}})
    manifest = run_pipeline(config, tmp_path / "run", address=ray_address, log=logged.append)
    counts = manifest["counts"]
    assert counts == {"input_rows": 13, "quarantined": 6, "output_rows": 7}
    dropped = sum(s["dropped"] for s in manifest["stages"])
    added = sum(s["added"] for s in manifest["stages"])
    assert counts["input_rows"] == counts["quarantined"] + dropped + counts["output_rows"] - added
    quarantine = pl.read_parquet(sorted((tmp_path / "run" / "quarantine").glob("*.parquet"))).sort("source")
    assert quarantine["source"].to_list() == [f"{folder}/a.jsonl:{n}" for n in (3, 4, 5, 6)] + [
        f"{folder}/b.jsonl.gz:1", f"{folder}/b.jsonl.gz:3"]
    assert quarantine["reason"][2] == "id in field 'id' contains NUL bytes"
    assert quarantine["reason"][3] == "id in field 'id' longer than 1024 characters (5000)"
    assert quarantine["reason"][4] == f"duplicate id 'x2' (first seen at {folder}/a.jsonl:2)"
    shards = pl.read_parquet(sorted((tmp_path / "run" / "shards").glob("*.parquet")))
    assert sorted(shards["id"]) == sorted(["x1", "x2", "x5", *hostile])
    # Ids are data, never paths: nothing named after one exists anywhere under tmp_path.
    names = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in names if "escape" in n or "zzzz" in n], names
    assert shards.filter(pl.col("id") == "x2")["text"][0] == PROSE + " a2"
    assert any("2 file(s)" in m and "other.parquet" in m and "notes.txt" in m for m in logged), logged


def write_config(tmp_path: Path, input_section: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "bad"}, "input": input_section, "stages": [{"name": "quality"}]}))
    return path


def test_exit_codes_at_the_command_line(ray_address, tmp_path, capsys):
    """In-process CLI (the session's Ray is joined): unreadable data exits 1 naming the file,
    a glob that matches nothing is a config error (exit 2) naming input.path, and nothing is written."""
    wrong = write_parquet(tmp_path / "wrong.parquet", pa.table({"body": [PROSE]}))
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, {"format": "parquet", "path": str(wrong)})), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"curriculum: error: cannot read input file {wrong}: no column 'text'"), err
    assert not (out / "manifest.json").exists()

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    assert main(["run", str(write_config(tmp_path, {"format": "jsonl", "path": str(empty)})), "--out", str(out)]) == 1
    assert f"no records in '{empty}'" in capsys.readouterr().err

    nothing = str(tmp_path / "nowhere" / "*.jsonl")
    assert main(["run", str(write_config(tmp_path, {"format": "jsonl", "path": nothing})),
                 "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "input.path" in err and f"no input file matches {nothing!r}" in err
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="input.path"):
        validate_config({"input": {"format": "parquet", "path": nothing}})
