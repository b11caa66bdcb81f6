"""Trusted text: the ``positives:`` of the quality classifier and the ``reference_data:`` of the
perplexity stage's reference LM (DCLM and CCNet train on such a set).

A trusted set is a jsonl / parquet / plain-text file, folder or glob (``{path, format, text_field}``,
or just the path), a ``datasets`` dataset (``{hf: {name, config, split, streaming}}``), or clean
documents of the synthetic graded corpus (``{synthetic: {docs, min_quality}}``). It is validated
with the config: a path that matches nothing, or holds no record with a non-empty text field, is a
config error naming the key and the file. ``texts()`` streams it, so a stage samples it with
``pipeline.core.hashing.bottom_k`` in bounded memory; it is read leniently (bad lines are skipped: it
is trusted input, not the corpus, so it has no quarantine).
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.core.paths import JSONL_SUFFIXES, expand_input_paths
from pipeline.io.input_config import HFInput
from pipeline.io.readers import load_hf_dataset
from pipeline.io.synth import graded_document


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticSource(_Strict):
    """Clean documents of the graded synthetic corpus: the trusted set for synthetic runs."""

    docs: int = Field(1000, ge=1, description="How many trusted documents to generate.")
    min_quality: float = Field(0.8, ge=0.0, le=1.0, description="Keep generated documents with true_quality >= this.")
    seed: int = Field(0, ge=0)
    start: int = Field(10_000_000, ge=0, description="First generator index; far from the input's, so no overlap.")


def _infer_format(path: str) -> Literal["jsonl", "parquet", "text"]:
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


class TrustedText(_Strict):
    """A trusted set: exactly one of ``path``, ``hf`` or ``synthetic``; a plain string is a path."""

    path: str | None = Field(None, description="File, folder or glob of jsonl / parquet / plain-text files.")
    format: Literal["jsonl", "parquet", "text"] | None = Field(
        None, description="Inferred from the suffix: .jsonl[.gz]/.json -> jsonl, .parquet, anything else text "
        "(documents separated by blank lines)."
    )
    text_field: str = "text"
    max_read: int | None = Field(
        None, ge=1, description="Read at most this many documents (the first ones): a bound for a large hub "
        "dataset, which is otherwise streamed to its end to draw the hashed sample.")
    hf: HFInput | None = None
    synthetic: SyntheticSource | None = None

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one_source_that_has_text(self) -> "TrustedText":
        given = [k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hf or synthetic (got {given or 'none'})")
        if self.path is not None:
            files = self.files()
            if not files:
                raise ValueError(f"file not found: {self.path!r} (resolved from {Path.cwd()})")
            if next(iter(self.texts()), None) is None:
                raise ValueError(f"file {self.path!r} is empty: no record with a non-empty "
                                 f"{self.text_field!r} text ({len(files)} file(s) read)")
        return self

    def files(self) -> list[str]:
        assert self.path is not None
        fmt = self.format or _infer_format(self.path)
        files = expand_input_paths(self.path, fmt)
        if self.format is None and Path(self.path).is_dir():  # a folder: take what is in it, by suffix
            tables = {*expand_input_paths(self.path, "jsonl"), *expand_input_paths(self.path, "parquet")}
            files = sorted(tables) or files
        return files

    def fingerprint(self) -> list[Any]:
        """What identifies the trusted set's content for the stage cache: files with size and mtime."""
        if self.path is None:
            return []
        return [(f, (s := Path(f).stat()).st_size, s.st_mtime_ns) for f in self.files()]

    def texts(self) -> Iterator[str]:
        """Stream the trusted texts (non-empty strings only, at most ``max_read``); never holds more than one batch."""
        return itertools.islice(self._all_texts(), self.max_read)

    def _all_texts(self) -> Iterator[str]:
        if self.synthetic is not None:
            yield from _synthetic_texts(self.synthetic)
        elif self.hf is not None:
            yield from _hf_texts(self.hf, self.text_field)
        else:
            for f in self.files():
                fmt = self.format or _infer_format(f)
                reader = {"jsonl": _jsonl_texts, "parquet": _parquet_texts, "text": _plain_texts}[fmt]
                yield from reader(f, self.text_field)


def _usable(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _jsonl_texts(path: str, field: str) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a trusted set is read leniently: bad lines are skipped, not quarantined
            if isinstance(record, dict) and _usable(record.get(field)):
                yield record[field]


def _parquet_texts(path: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(path)
    if field not in handle.schema_arrow.names:
        return
    for batch in handle.iter_batches(batch_size=4096, columns=[field]):
        yield from (t for t in batch.column(0).to_pylist() if _usable(t))


def _plain_texts(path: str, field: str) -> Iterator[str]:
    del field
    paragraph: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _hf_texts(spec: HFInput, field: str) -> Iterator[str]:

    for record in load_hf_dataset(spec.model_dump()):
        if _usable(record.get(field)):
            yield record[field]


def _synthetic_texts(spec: SyntheticSource) -> Iterator[str]:

    found, index = 0, spec.start
    while found < spec.docs:
        doc = graded_document(index, spec.seed)
        index += 1
        if doc["true_quality"] >= spec.min_quality:
            found += 1
            yield doc["text"]
