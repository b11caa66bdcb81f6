"""Readers: every ``input.format`` becomes a ``ray.data.Dataset`` of parsed records.

Each format is a Ray ``Datasource`` whose read tasks open their own files (or dataset shard, or
synthetic index range) on a worker and yield blocks of at most ``input.lines_per_block``
records, so the corpus never passes through the driver. A read task checks every record and
emits the *parsed* schema below; ``pipeline.io.ingest`` then splits it into good rows and
quarantine.

Parsed schema (internal; the ``_`` columns never reach the shards):

- ``id``, ``text``: null for a bad record
- ``_source``: ``file:line`` (1-based), ``file:row N`` (0-based) for parquet, the file for
  ``text``, ``dataset[:shard]:index`` for hf
- ``_seq``: the record's global input order, ``file_index << 40 | record_number``
- ``_fields``: the record's other fields as a JSON object (null when it has none)
- ``_sig``: the names and JSON types of those fields, used to build one column schema
- ``_reason``: why the record is bad, or null
- ``_raw``: the raw record, for quarantine only

A blank line in a JSON-lines file is not a record; blank lines are counted, not quarantined. A
UTF-8 byte-order mark at the start of a file is skipped. The ``raw`` kept for quarantine is cut
to ``RAW_LIMIT`` characters, so a 50 MB rejected document does not become a 50 MB quarantine row.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.core import storage
from pipeline.core.errors import ConfigError, CurriculumError, UnreadableInputError
from pipeline.core.hashing import content_id
from pipeline.core.paths import expand_input_paths
from pipeline.io.input_config import InputConfig, SyntheticInput
from pipeline.io.synth import SYNTHETIC_KINDS

PARSED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("_source", pa.string()),
        ("_seq", pa.int64()),
        ("_fields", pa.string()),
        ("_sig", pa.string()),
        ("_reason", pa.string()),
        ("_raw", pa.string()),
    ]
)
RESERVED_COLUMNS = frozenset({"id", "text", "position"})
_SEQ_SHIFT = 40
RAW_LIMIT = 65_536
MAX_ID_CHARS = 1024
_BOM = b"\xef\xbb\xbf"


def cut_raw(raw: str) -> str:
    """The raw record for quarantine, cut to ``RAW_LIMIT`` characters with a note of its length."""
    return raw if len(raw) <= RAW_LIMIT else f"{raw[:RAW_LIMIT]}... [cut: {len(raw)} characters in all]"


class RecordChecker:
    """Turns one raw record into a parsed row, or a quarantine row with its reason."""

    def __init__(self, text_field: str, id_field: str | None, max_chars: int, keep_fields: list[str] | None):
        self.text_field = text_field
        self.id_field = id_field
        self.max_chars = max_chars
        self.keep_fields = set(keep_fields) if keep_fields is not None else None

    def check(self, record: Any, source: str, seq: int, raw: str) -> dict[str, Any]:
        row = {"id": None, "text": None, "_source": source, "_seq": seq, "_fields": None, "_sig": None,
               "_reason": None, "_raw": None}
        reason = self._problem(record)
        if reason is None:
            text = record[self.text_field]
            doc_id = content_id(text) if self.id_field is None else str(record[self.id_field])
            extras = {
                k: v
                for k, v in record.items()
                if k not in (self.text_field, self.id_field)
                and (self.keep_fields is None or k in self.keep_fields)
                and v is not None
            }
            row.update(id=doc_id, text=text)
            if extras:
                row["_fields"] = json.dumps(extras, ensure_ascii=True, sort_keys=True)
                row["_sig"] = ",".join(f"{k}:{_json_type(v)}" for k, v in sorted(extras.items()))
            return row
        row.update(_reason=reason, _raw=cut_raw(raw))
        return row

    def _problem(self, record: Any) -> str | None:
        if not isinstance(record, dict):
            return f"record is not a JSON object (got {type(record).__name__})"
        if self.text_field not in record:
            return f"missing text field {self.text_field!r}"
        text = record[self.text_field]
        if not isinstance(text, str):
            return f"text field {self.text_field!r} is not a string (got {type(text).__name__})"
        if not text.strip():
            return "empty or whitespace-only text"
        if "\x00" in text:
            return "text contains NUL bytes"
        if len(text) > self.max_chars:
            return f"text longer than input.max_chars ({len(text)} > {self.max_chars})"
        if self.id_field is not None:
            if record.get(self.id_field) is None:
                return f"missing id field {self.id_field!r}"
            value = record[self.id_field]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                return f"id field {self.id_field!r} is not a string or integer (got {type(value).__name__})"
            if isinstance(value, str) and not value.strip():
                return f"empty id in field {self.id_field!r}"
            # Ids are data, never paths; these two would still break tools downstream (C strings, indexes).
            if isinstance(value, str) and "\x00" in value:
                return f"id in field {self.id_field!r} contains NUL bytes"
            if len(str(value)) > MAX_ID_CHARS:
                return f"id in field {self.id_field!r} longer than {MAX_ID_CHARS} characters ({len(str(value))})"
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return "invalid utf-8 (a lone surrogate escape in the record)"
        except (TypeError, ValueError) as exc:
            return f"record cannot be serialised: {exc}"
        return None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


def _seq(file_index: int, record_number: int) -> int:
    return (file_index << _SEQ_SHIFT) | record_number


# ----------------------------------------------------------------------------- datasources


class _ChunkedDatasource(Datasource):
    """Splits a list of units (files, index ranges, shards) into at most ``parallelism`` read tasks.

    Subclasses implement ``read_unit`` as a generator of parsed rows; rows are gathered into
    blocks of ``block_rows``, so a read task's memory is bounded whatever the file sizes.
    """

    def __init__(self, units: list[Any], checker: RecordChecker, block_rows: int):
        self.units = units
        self.checker = checker
        self.block_rows = block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def read_unit(self, unit: Any) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        n_tasks = max(1, min(parallelism, len(self.units)))
        tasks = []
        for k in range(n_tasks):
            group = self.units[k::n_tasks]
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(lambda g=group: self._read_group(g), meta, schema=PARSED_SCHEMA))
        return tasks

    def _read_group(self, group: list[Any]) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        for unit in group:
            try:
                for row in self.read_unit(unit):
                    rows.append(row)
                    if len(rows) >= self.block_rows:
                        yield pa.Table.from_pylist(rows, schema=PARSED_SCHEMA)
                        rows = []
            except (OSError, EOFError, ValueError, pa.ArrowException) as exc:
                # A file that cannot be read at all (corrupt gzip, broken parquet footer) is not a bad
                # record to quarantine: the run stops, naming the file (exit 1).
                raise UnreadableInputError(f"cannot read input file {_unit_name(unit)}: {type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if rows:
            yield pa.Table.from_pylist(rows, schema=PARSED_SCHEMA)


def _unit_name(unit: Any) -> str:
    """The file of a (file_index, path) unit; other units (index ranges, shards) as they are."""
    return str(unit[1]) if isinstance(unit, tuple) and len(unit) == 2 and isinstance(unit[1], str) else repr(unit)


def _bad_row(source: str, seq: int, raw: str, reason: str) -> dict[str, Any]:
    return {"id": None, "text": None, "_source": source, "_seq": seq, "_fields": None, "_sig": None,
            "_reason": reason, "_raw": cut_raw(raw)}


def _open_binary(path: str) -> IO[bytes]:
    """A local file or an object (``s3://``), un-gzipped when its name ends in ``.gz``."""
    if not storage.is_uri(path):
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    stream = io.BufferedReader(storage.open_input(path), buffer_size=1 << 20)  # arrow files have no readline
    return gzip.GzipFile(fileobj=stream, mode="rb") if path.endswith(".gz") else stream


def _decode(data: bytes) -> tuple[str, str | None]:
    """Text and None, or a lossless-for-reading rendering of the bytes and why they are invalid."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return data.decode("utf-8", errors="backslashreplace"), f"invalid utf-8: {exc.reason} at byte {exc.start}"


class JsonlDatasource(_ChunkedDatasource):
    """JSON lines, plain or gzip; one unit per file, streamed line by line."""

    def read_unit(self, unit: tuple[int, str]) -> Iterator[dict[str, Any]]:
        file_index, path = unit
        with _open_binary(path) as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                source, seq = f"{path}:{line_no}", _seq(file_index, line_no)
                if line_no == 1 and line.startswith(_BOM):
                    line = line[len(_BOM):]  # written by some Windows tools; not part of the record
                decoded, bad_utf8 = _decode(line.rstrip(b"\r\n"))
                if bad_utf8:
                    yield _bad_row(source, seq, decoded, bad_utf8)
                    continue
                try:
                    record = json.loads(decoded)
                except json.JSONDecodeError as exc:
                    yield _bad_row(source, seq, decoded, f"malformed json: {exc.msg} at column {exc.colno}")
                    continue
                except RecursionError:
                    yield _bad_row(source, seq, decoded, "malformed json: nested too deeply to parse")
                    continue
                yield self.checker.check(record, source, seq, decoded)


class ParquetDatasource(_ChunkedDatasource):
    """Parquet files; one unit per file, read in record batches. Strings are checked as UTF-8."""

    def read_unit(self, unit: tuple[int, str]) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        file_index, path = unit
        row_number = 0
        parquet = pq.ParquetFile(storage.open_input(path) if storage.is_uri(path) else path)
        self._check_schema(parquet.schema_arrow, path)
        for batch in parquet.iter_batches(batch_size=self.block_rows):
            columns = {}
            for name in batch.schema.names:
                column = batch.column(name)
                # Read strings as bytes so that invalid UTF-8 is quarantined instead of raising.
                if pa.types.is_string(column.type):
                    column = column.cast(pa.binary())
                elif pa.types.is_large_string(column.type):
                    column = column.cast(pa.large_binary())
                columns[name] = column.to_pylist()
            for i in range(batch.num_rows):
                record, problem = {}, None
                for name, values in columns.items():
                    value = values[i]
                    if isinstance(value, bytes):
                        value, bad = _decode(value)
                        problem = problem or (bad and f"{bad} (column {name!r})")
                    record[name] = value
                source, seq = f"{path}:row {row_number}", _seq(file_index, row_number)
                raw = json.dumps(record, ensure_ascii=False, default=str)
                yield _bad_row(source, seq, raw, problem) if problem else self.checker.check(record, source, seq, raw)
                row_number += 1


    def _check_schema(self, schema: pa.Schema, path: str) -> None:
        """A file without a string text column (or id column, when set) is the wrong file or the wrong
        ``text_field``, not a file of bad records: stop and name it instead of quarantining every row."""
        wanted = [self.checker.text_field] + ([self.checker.id_field] if self.checker.id_field else [])
        for name in wanted:
            if name not in schema.names:
                raise UnreadableInputError(f"cannot read input file {path}: no column {name!r} "
                                           f"(columns: {', '.join(schema.names) or 'none'}); check input.text_field "
                                           "and input.id_field")
        text_type = schema.field(self.checker.text_field).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)
                or pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type)):
            raise UnreadableInputError(f"cannot read input file {path}: column {self.checker.text_field!r} is "
                                       f"{text_type}, not a string")


class TextDatasource(_ChunkedDatasource):
    """One document per file; the id is a content hash and ``path`` (relative) is kept as a field."""

    def __init__(self, units: list[Any], checker: RecordChecker, block_rows: int, root: str):
        super().__init__(units, checker, block_rows)
        self.root = root

    def read_unit(self, unit: tuple[int, str]) -> Iterator[dict[str, Any]]:
        file_index, path = unit
        text, bad_utf8 = _decode(storage.read_bytes(path) if storage.is_uri(path) else Path(path).read_bytes())
        if bad_utf8:
            yield _bad_row(path, _seq(file_index, 0), text, bad_utf8)
        else:
            yield self.checker.check({"text": text, "path": _relative(path, self.root)}, path, _seq(file_index, 0), text)


class SyntheticDatasource(_ChunkedDatasource):
    """A synthetic corpus (``input.synthetic.kind``); one unit per index range."""

    def __init__(self, units: list[Any], checker: RecordChecker, block_rows: int, seed: int, kind: str = "graded"):
        super().__init__(units, checker, block_rows)
        self.seed = seed
        self.kind = kind

    def read_unit(self, unit: tuple[int, int]) -> Iterator[dict[str, Any]]:
        document = SYNTHETIC_KINDS[self.kind]
        for index in range(*unit):
            yield self.checker.check(document(index, self.seed), f"synthetic:{index}", _seq(0, index), "")


class HFDatasource(_ChunkedDatasource):
    """A ``datasets`` dataset; each read task loads it and reads its own shard of it."""

    def __init__(self, units: list[Any], checker: RecordChecker, block_rows: int, hf_kwargs: dict[str, Any], label: str):
        super().__init__(units, checker, block_rows)
        self.hf_kwargs = hf_kwargs
        self.label = label

    def read_unit(self, unit: tuple[int, int]) -> Iterator[dict[str, Any]]:
        shard, n_shards = unit
        dataset = load_hf_dataset(self.hf_kwargs)
        streaming = bool(self.hf_kwargs.get("streaming"))
        offset = 0
        if n_shards > 1 and streaming:
            dataset = dataset.shard(num_shards=n_shards, index=shard)
        elif n_shards > 1:
            total = len(dataset)
            offset = (total // n_shards) * shard + min(shard, total % n_shards)
            dataset = dataset.shard(num_shards=n_shards, index=shard, contiguous=True)
        for i, record in enumerate(dataset):
            if streaming and n_shards > 1:
                source = f"{self.label}[shard {shard}]:{i}"
            else:
                source = f"{self.label}:{offset + i}"
            raw = json.dumps(record, ensure_ascii=False, default=str)
            yield self.checker.check(dict(record), source, _seq(shard, offset + i), raw)


def load_hf_dataset(hf_kwargs: dict[str, Any]):
    """``datasets.load_dataset`` with the config's arguments; a clear error when it cannot load."""
    import datasets

    kwargs = {k: v for k, v in hf_kwargs.items() if k != "name" and v is not None}
    config_name = kwargs.pop("config", None)
    try:
        return datasets.load_dataset(hf_kwargs["name"], config_name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; name the dataset instead
        raise CurriculumError(
            f"input.hf: cannot load dataset {hf_kwargs['name']!r} (split {hf_kwargs.get('split')!r}): "
            f"{type(exc).__name__}: {exc}. Offline? Point input.hf.name at a local folder or use input.format jsonl/parquet."
        ) from None


def _relative(path: str, root: str) -> str:
    if storage.is_uri(path):
        return path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else storage.name(path)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


def read_input(cfg: InputConfig, seed: int, parallelism: int) -> ray.data.Dataset:
    """The parsed dataset for ``cfg``: one read task per file, shard or index range, up to ``parallelism``."""
    if cfg.format == "synthetic":
        synthetic = cfg.synthetic or SyntheticInput()
        checker = RecordChecker("text", "id", cfg.max_chars, cfg.keep_fields)
        step = cfg.lines_per_block
        units = [(a, min(a + step, synthetic.docs)) for a in range(0, synthetic.docs, step)]
        source = SyntheticDatasource(units, checker, step, synthetic.seed if synthetic.seed is not None else seed,
                                     synthetic.kind)
        return ray.data.read_datasource(source, override_num_blocks=max(1, min(parallelism, len(units))))

    checker = RecordChecker(cfg.text_field, cfg.id_field, cfg.max_chars, cfg.keep_fields)
    if cfg.format == "hf":
        assert cfg.hf is not None
        hf_kwargs = cfg.hf.model_dump()
        label = cfg.hf.name if not cfg.hf.config else f"{cfg.hf.name}/{cfg.hf.config}"
        probe = load_hf_dataset(hf_kwargs)
        n_shards = getattr(probe, "num_shards", None) or (1 if cfg.hf.streaming else max(1, parallelism))
        n_shards = max(1, min(n_shards, parallelism))
        del probe
        units = [(k, n_shards) for k in range(n_shards)]
        hf_source = HFDatasource(units, checker, cfg.lines_per_block, hf_kwargs, label)
        return ray.data.read_datasource(hf_source, override_num_blocks=n_shards)

    assert cfg.path is not None
    files = expand_input_paths(cfg.path, cfg.format)
    if not files:
        raise ConfigError(f"input.path: no input file matches {cfg.path!r}")
    units = list(enumerate(files))
    if cfg.format == "jsonl":
        datasource: Datasource = JsonlDatasource(units, checker, cfg.lines_per_block)
    elif cfg.format == "parquet":
        datasource = ParquetDatasource(units, checker, cfg.lines_per_block)
    else:
        if storage.is_uri(cfg.path):
            root = cfg.path if storage.is_dir(cfg.path) else files[0].rpartition("/")[0]
        else:
            root = cfg.path if Path(cfg.path).is_dir() else str(Path(files[0]).parent)
        datasource = TextDatasource(units, checker, cfg.lines_per_block, root)
    return ray.data.read_datasource(datasource, override_num_blocks=max(1, min(parallelism, len(units))))
