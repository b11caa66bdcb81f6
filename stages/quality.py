"""Heuristic quality signals per document, after the Gopher rules (Rae et al., 2021, App. A).

Adds one column per signal and, optionally, drops documents outside thresholds. Perplexity
misses exactly what these catch (symbol blocks, repeated lines), which is why the composite
score uses both (METHODS.md §1b).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar, Literal

import pyarrow as pa
import ray.data
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stages.base import Stage, StageContext, StageParams

_WORD = re.compile(r"\S+")
_PLAIN_PUNCTUATION = set(".,;:!?'\"()-")

SIGNALS: dict[str, tuple[pa.DataType, str]] = {
    "n_chars": (pa.int64(), "characters"),
    "n_words": (pa.int64(), "whitespace-separated words"),
    "mean_word_len": (pa.float64(), "mean characters per word"),
    "alpha_ratio": (pa.float64(), "share of words with at least one letter (Gopher: >= 0.8)"),
    "symbol_ratio": (pa.float64(), "share of non-space characters that are neither letters, digits nor plain punctuation"),
    "dup_line_ratio": (pa.float64(), "share of lines that repeat an earlier line (Gopher: <= 0.3)"),
    "top_2gram_ratio": (pa.float64(), "share of word characters in the most frequent word 2-gram (Gopher: <= 0.2)"),
    "dup_5gram_ratio": (pa.float64(), "share of word characters inside repeated word 5-grams (Gopher: <= 0.15)"),
}


class QualityFilter(BaseModel):
    """Thresholds; a document failing any set threshold is dropped (and counted by rule)."""

    model_config = ConfigDict(extra="forbid")
    min_words: int | None = None
    max_words: int | None = None
    min_mean_word_len: float | None = None
    max_mean_word_len: float | None = None
    min_alpha_ratio: float | None = None
    max_symbol_ratio: float | None = None
    max_dup_line_ratio: float | None = None
    max_top_2gram_ratio: float | None = None
    max_dup_5gram_ratio: float | None = None

    @classmethod
    def gopher(cls) -> "QualityFilter":
        """The thresholds Gopher published (where it has one for our signals)."""
        return cls(min_words=50, max_words=100_000, min_mean_word_len=3, max_mean_word_len=10,
                   min_alpha_ratio=0.8, max_dup_line_ratio=0.3, max_top_2gram_ratio=0.2, max_dup_5gram_ratio=0.15)

    def failed_rule(self, signals: dict[str, Any]) -> str | None:
        for rule, limit in self.model_dump(exclude_none=True).items():
            bound, _, column = rule.partition("_")
            value = signals["n_words" if column == "words" else column]
            if (bound == "min" and value < limit) or (bound == "max" and value > limit):
                return f"quality.{rule}"
        return None


class QualityParams(StageParams):
    name: Literal["quality"] = "quality"
    filter: QualityFilter | None = Field(
        None, description="Thresholds to drop documents by; 'gopher' for Gopher's; null keeps every document."
    )

    @field_validator("filter", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if value == "gopher":
            return QualityFilter.gopher()
        if isinstance(value, str):
            raise ValueError(f"unknown filter preset {value!r} (allowed: 'gopher', or a mapping of thresholds)")
        return value


def document_signals(text: str) -> dict[str, Any]:
    """The heuristic signals of one document."""
    words = _WORD.findall(text)
    n_words = len(words)
    word_chars = sum(len(w) for w in words)
    non_space = sum(1 for ch in text if not ch.isspace())
    symbols = sum(1 for ch in text if not (ch.isspace() or ch.isalnum() or ch in _PLAIN_PUNCTUATION))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    repeated_lines = 0
    for line in lines:
        repeated_lines += line in seen
        seen.add(line)
    lowered = [w.lower() for w in words]
    return {
        "n_chars": len(text),
        "n_words": n_words,
        "mean_word_len": word_chars / n_words if n_words else 0.0,
        "alpha_ratio": sum(1 for w in words if any(c.isalpha() for c in w)) / n_words if n_words else 0.0,
        "symbol_ratio": symbols / non_space if non_space else 0.0,
        "dup_line_ratio": repeated_lines / len(lines) if lines else 0.0,
        "top_2gram_ratio": _top_ngram_ratio(lowered, 2, word_chars),
        "dup_5gram_ratio": _duplicate_ngram_ratio(lowered, 5, word_chars),
    }


def _top_ngram_ratio(words: list[str], n: int, word_chars: int) -> float:
    if len(words) < n or not word_chars:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    return min(1.0, count * sum(len(w) for w in gram) / word_chars)


def _duplicate_ngram_ratio(words: list[str], n: int, word_chars: int) -> float:
    if len(words) < n or not word_chars:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(words, covered) if c) / word_chars


class QualityStage(Stage):
    name: ClassVar[str] = "quality"
    Params = QualityParams
    columns: ClassVar[tuple[str, ...]] = tuple(SIGNALS)

    def may_drop(self) -> bool:
        return self.params.filter is not None

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        return ds.map_batches(_score_batch, batch_format="pyarrow", fn_kwargs={"rules": self.params.filter})


def _score_batch(table: pa.Table, rules: QualityFilter | None) -> pa.Table:
    rows = [document_signals(text) for text in table["text"].to_pylist()]
    for column, (arrow_type, _) in SIGNALS.items():
        values = pa.array([r[column] for r in rows], arrow_type)
        if column in table.column_names:
            table = table.drop_columns([column])
        table = table.append_column(column, values)
    if rules is not None:
        table = table.append_column("_drop_reason", pa.array([rules.failed_rule(r) for r in rows], pa.string()))
    return table
