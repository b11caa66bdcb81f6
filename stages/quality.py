"""Heuristic quality signals per document: the published rule sets of Gopher, C4 and FineWeb.

Gopher's quality and repetition filters (Rae et al., 2021, App. A), C4's rules (Raffel et al.,
2020, §2.2) and FineWeb's quality filter (Penedo et al., 2024) become one column per signal
(``SIGNALS``), computed from one tokenization of each document in linear time. ``filter:``
takes a preset (``gopher``, ``gopher_quality``, ``gopher_repetition``, ``c4``, ``fineweb``), a
mapping of thresholds or a list of them; a dropped row's reason names the rule set and the rule
(``quality.gopher.max_dup_line_ratio``). The text is never rewritten. Definitions, thresholds
and deviations from DataTrove: docs/methods.md §3.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, ClassVar, Literal

import pyarrow as pa
import ray.data
from pydantic import Field, field_validator

from stages.base import Stage, StageContext, StageParams

_PLAIN_PUNCTUATION = frozenset(".,;:!?'\"()-")
# Stripped from a token's ends to measure its length and match stop words.
_STRIP = string.punctuation + "“”‘’«»—–…·•"
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
_BULLETS = ("•", "‣", "◦", "●", "▪", "-", "*")
_ELLIPSES = ("...", "…")
_C4_END = (".", "?", "!", '"', "'")  # C4's terminal punctuation (a line ending in "..." does not count)
_FINEWEB_END = (".", "'", '"', "!", "?")  # FineWeb's (an ellipsis ends in "." and counts)
_C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_TOP_NGRAMS = (2, 3, 4)
_DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
_SHORT_LINE = 30

_F, _I = pa.float64(), pa.int64()
SIGNALS: dict[str, tuple[pa.DataType, str]] = {
    # Gopher quality filter
    "n_chars": (_I, "int: characters"),
    "n_words": (_I, "int: words, i.e. whitespace tokens with a letter or digit (Gopher: 50 to 100,000)"),
    "mean_word_len": (_F, "float: mean characters per word, punctuation around it excluded (Gopher: 3 to 10)"),
    "alpha_ratio": (_F, "float: share of whitespace tokens with at least one letter (Gopher: >= 0.8)"),
    "symbol_ratio": (_F, ("float: share of non-space characters that are neither letters, digits nor plain "
                          "punctuation (this project's; no paper threshold)")),
    "hash_word_ratio": (_F, "float: '#' characters per word (Gopher: <= 0.1)"),
    "ellipsis_word_ratio": (_F, "float: ellipses ('...' or '…') per word (Gopher: <= 0.1)"),
    "bullet_line_ratio": (_F, "float: share of lines starting with a bullet (• ‣ ◦ ● ▪ - *) (Gopher: <= 0.9)"),
    "ellipsis_line_ratio": (_F, "float: share of lines ending in '...' or '…' (Gopher: <= 0.3)"),
    "n_stop_words": (_I, "int: tokens that are the/be/to/of/and/that/have/with, any case (Gopher: >= 2)"),
    # Gopher repetition filter
    "dup_line_ratio": (_F, "float: share of lines that repeat an earlier line (Gopher: <= 0.3)"),
    "dup_para_ratio": (_F, ("float: share of paragraphs (blank-line separated) that repeat an earlier one "
                            "(Gopher: <= 0.3)")),
    "dup_line_char_ratio": (_F, ("float: characters in lines repeating an earlier line / n_chars (Gopher: <= 0.2; "
                                 "FineWeb: < 0.1)")),
    "dup_para_char_ratio": (_F, ("float: characters in paragraphs repeating an earlier one / n_chars "
                                 "(Gopher: <= 0.2)")),
    **{f"top_{n}gram_ratio": (_F, (f"float: share of token characters in the most frequent {n}-gram, 0 when none "
                                   f"repeats (Gopher: <= {t})"))
       for n, t in zip(_TOP_NGRAMS, (0.2, 0.18, 0.16))},
    **{f"dup_{n}gram_ratio": (_F, (f"float: share of token characters inside {n}-grams that occur more than once, "
                                   f"each character counted once (Gopher: <= {t})"))
       for n, t in zip(_DUP_NGRAMS, (0.15, 0.14, 0.13, 0.12, 0.11, 0.10))},
    # C4 rules
    "c4_line_punct_ratio": (_F, ("float: share of lines ending in . ? ! \" or ' and not in '...', wiki citations "
                                 "removed (C4 keeps only such lines)")),
    "c4_sentences": (_I, ("int: sentences in the lines C4 keeps (terminal punctuation, >= 3 words, no word over "
                          "1,000 characters, no 'javascript', no policy phrase) (C4: >= 5)")),
    "javascript_line_ratio": (_F, "float: share of lines mentioning 'javascript', any case (C4 removes them)"),
    "policy_line_ratio": (_F, ("float: share of lines with a phrase such as 'terms of use', 'privacy policy', "
                               "'uses cookies', any case (C4 removes them)")),
    "lorem_ipsum": (_I, "int: occurrences of 'lorem ipsum', any case (C4: 0)"),
    "curly_brackets": (_I, "int: '{' characters (C4: 0)"),
    # FineWeb quality filter
    "fineweb_line_punct_ratio": (_F, "float: share of lines ending in . ' \" ! or ? (FineWeb: > 0.12)"),
    "short_line_ratio": (_F, f"float: share of lines of at most {_SHORT_LINE} characters (FineWeb: < 0.67)"),
    "newline_word_ratio": (_F, ("float: line breaks per whitespace token (DataTrove's FineWeb filter: <= 0.3; "
                                "not in the paper or the fineweb preset)")),
}

_GOPHER_QUALITY = {
    "min_words": 50, "max_words": 100_000, "min_mean_word_len": 3, "max_mean_word_len": 10,
    "max_hash_word_ratio": 0.1, "max_ellipsis_word_ratio": 0.1, "max_bullet_line_ratio": 0.9,
    "max_ellipsis_line_ratio": 0.3, "min_alpha_ratio": 0.8, "min_stop_words": 2,
}
_GOPHER_REPETITION = {
    "max_dup_line_ratio": 0.3, "max_dup_para_ratio": 0.3, "max_dup_line_char_ratio": 0.2,
    "max_dup_para_char_ratio": 0.2, "max_top_2gram_ratio": 0.2, "max_top_3gram_ratio": 0.18,
    "max_top_4gram_ratio": 0.16, "max_dup_5gram_ratio": 0.15, "max_dup_6gram_ratio": 0.14,
    "max_dup_7gram_ratio": 0.13, "max_dup_8gram_ratio": 0.12, "max_dup_9gram_ratio": 0.11,
    "max_dup_10gram_ratio": 0.10,
}
# Each paper's thresholds, in the order the rules are checked.
PRESETS: dict[str, dict[str, float]] = {
    "gopher": {**_GOPHER_QUALITY, **_GOPHER_REPETITION},
    "gopher_quality": _GOPHER_QUALITY,
    "gopher_repetition": _GOPHER_REPETITION,
    "c4": {"max_lorem_ipsum": 0, "max_curly_brackets": 0, "min_c4_sentences": 5},
    "fineweb": {"above_fineweb_line_punct_ratio": 0.12, "below_short_line_ratio": 0.67,
                "below_dup_line_char_ratio": 0.1},
}
# bound -> drops the row when (value, limit) is true
_BOUNDS = {
    "min": lambda v, t: v < t, "max": lambda v, t: v > t,
    "above": lambda v, t: v <= t, "below": lambda v, t: v >= t,
}


def _rule_column(rule: str) -> tuple[str, str]:
    """(bound, column) of a threshold key such as ``max_dup_line_ratio`` or ``min_words``."""
    bound, _, column = rule.partition("_")
    if bound not in _BOUNDS:
        raise ValueError(f"threshold {rule!r} must start with min_, max_, above_ or below_")
    if column not in SIGNALS and f"n_{column}" in SIGNALS:
        column = f"n_{column}"
    if column not in SIGNALS:
        raise ValueError(f"threshold {rule!r}: no column {column!r} (columns: {', '.join(SIGNALS)})")
    return bound, column


class QualityFilter:
    """One named rule set: thresholds checked in order; ``failed_rule`` names the first one failed."""

    def __init__(self, rules: dict[str, float], preset: str | None = None) -> None:
        self.preset = preset
        self.rules = [(rule, *_rule_column(rule), float(limit)) for rule, limit in rules.items()]
        self.prefix = f"quality.{preset}." if preset else "quality."

    @classmethod
    def named(cls, preset: str) -> QualityFilter:
        return cls(PRESETS[preset], preset)

    @classmethod
    def gopher(cls) -> QualityFilter:
        """Gopher's published thresholds (quality and repetition filters)."""
        return cls.named("gopher")

    def failed_rule(self, signals: dict[str, Any]) -> str | None:
        for rule, bound, column, limit in self.rules:
            if _BOUNDS[bound](signals[column], limit):
                return self.prefix + rule
        return None


def _check_filter_item(item: Any) -> Any:
    if isinstance(item, str):
        if item not in PRESETS:
            raise ValueError(f"unknown filter preset {item!r} (allowed: {', '.join(PRESETS)}, "
                             f"or a mapping of thresholds)")
        return item
    if isinstance(item, dict):
        if not item:
            raise ValueError("an empty mapping of thresholds")
        for rule, limit in item.items():
            _rule_column(str(rule))
            if isinstance(limit, bool) or not isinstance(limit, (int, float)):
                raise ValueError(f"threshold {rule!r} must be a number, got {limit!r}")  # noqa: TRY004 - pydantic
        return item
    raise ValueError(f"a filter is a preset name or a mapping of thresholds, got {item!r}")


class QualityParams(StageParams):
    name: Literal["quality"] = "quality"
    filter: list[str | dict[str, float]] | None = Field(
        None, description="Rules to drop documents by: a preset (gopher, gopher_quality, gopher_repetition, c4, "
        "fineweb), a mapping of thresholds (min_/max_/above_/below_ + column), or a list of them; null keeps "
        "every document."
    )

    @field_validator("filter", mode="before")
    @classmethod
    def _filters(cls, value: Any) -> Any:
        if value is None:
            return None
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ValueError("an empty list of filters: leave filter out to keep every document")
        return [_check_filter_item(item) for item in items]


def build_filters(spec: list[str | dict[str, float]] | None) -> list[QualityFilter]:
    return [QualityFilter.named(s) if isinstance(s, str) else QualityFilter(s) for s in spec or []]


# --------------------------------------------------------------------------- signals


def _token_props(token: str) -> tuple[bool, bool, int, bool]:
    """(is a word: has a letter or digit, has a letter, length without surrounding punctuation, is a stop word)."""
    core = token.strip(_STRIP)
    has_alpha = False
    has_alnum = False
    for ch in token:
        if ch.isalpha():
            has_alpha = has_alnum = True
            break
        if ch.isdigit():
            has_alnum = True
    return has_alnum, has_alpha, len(core), core.lower() in STOP_WORDS


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _covered_chars(starts: list[int], n: int, prefix: list[int]) -> int:
    """Characters of the tokens covered by the n-grams starting at ``starts`` (ascending), each once."""
    total = 0
    lo = hi = -1
    for i in starts:
        if i > hi:
            if hi > lo:
                total += prefix[hi] - prefix[lo]
            lo = i
        hi = i + n
    if hi > lo:
        total += prefix[hi] - prefix[lo]
    return total


def _ngram_signals(lowered: list[str], lengths: list[int]) -> dict[str, float]:
    out = {f"top_{n}gram_ratio": 0.0 for n in _TOP_NGRAMS} | {f"dup_{n}gram_ratio": 0.0 for n in _DUP_NGRAMS}
    size = len(lowered)
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    total = prefix[-1]
    if size < 2 or not total:
        return out
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(w, len(vocab)) for w in lowered]
    # grams: start position -> id of the n-gram there, for the positions still worth looking at
    starts = list(range(size))
    grams = ids
    for n in range(2, _DUP_NGRAMS[-1] + 1):
        table: dict[tuple[int, int], int] = {}
        kept = [i for i in starts if i + n <= size]
        prev = dict(zip(starts, grams)) if n > 2 else None
        grams = [table.setdefault((prev[i] if prev is not None else ids[i], ids[i + n - 1]), len(table))
                 for i in kept]
        counts = Counter(grams)
        if n in _TOP_NGRAMS and grams:
            gram, count = counts.most_common(1)[0]  # ties: the first to occur
            if count > 1:
                i = kept[grams.index(gram)]
                out[f"top_{n}gram_ratio"] = min(1.0, count * (prefix[i + n] - prefix[i]) / total)
        repeated = [(i, g) for i, g in zip(kept, grams) if counts[g] > 1]
        if n in _DUP_NGRAMS:
            out[f"dup_{n}gram_ratio"] = _covered_chars([i for i, _ in repeated], n, prefix) / total
        if n >= _TOP_NGRAMS[-1]:
            # An n-gram repeats only where its (n-1)-gram does: look only there from now on.
            starts, grams = [i for i, _ in repeated], [g for _, g in repeated]
        else:
            starts = kept
        if not starts:
            break
    return out


def document_signals(text: str, cache: dict[str, tuple[bool, bool, int, bool]] | None = None) -> dict[str, Any]:
    """The heuristic signals of one document (``cache``: token properties shared across documents)."""
    cache = {} if cache is None else cache
    n_chars = len(text)
    tokens = text.split()
    n_words = alpha_tokens = word_len = stop_words = 0
    for token in tokens:
        props = cache.get(token)
        if props is None:
            props = cache[token] = _token_props(token)
        if props[0]:
            n_words += 1
            word_len += props[2]
        alpha_tokens += props[1]
        stop_words += props[3]
    chars = Counter(text)
    non_space = n_chars - sum(c for ch, c in chars.items() if ch.isspace())
    symbols = sum(c for ch, c in chars.items() if not (ch.isspace() or ch.isalnum() or ch in _PLAIN_PUNCTUATION))

    lines = [line.strip() for line in text.splitlines()]
    paragraphs: list[str] = []
    block: list[str] = []
    for line in lines:
        if line:
            block.append(line)
        elif block:
            paragraphs.append("\n".join(block))
            block = []
    if block:
        paragraphs.append("\n".join(block))
    lines = [line for line in lines if line]
    n_lines = len(lines)
    dup_lines, dup_line_chars = _duplicates(lines)
    dup_paras, dup_para_chars = _duplicates(paragraphs)

    bullets = ellipsis_lines = c4_punct = fineweb_punct = short = js = policy = c4_sentences = 0
    lowered_text = text.lower()
    check_js = "javascript" in lowered_text
    check_policy = any(p in lowered_text for p in POLICY_PHRASES)
    for line in lines:
        bullets += line.startswith(_BULLETS)
        ellipsis_lines += line.endswith(_ELLIPSES)
        fineweb_punct += line.endswith(_FINEWEB_END)
        short += len(line) <= _SHORT_LINE
        clean = _C4_CITATION.sub("", line).rstrip() if "[" in line else line
        ends = clean.endswith(_C4_END) and not clean.endswith("...")
        c4_punct += ends
        low = line.lower() if check_js or check_policy else ""
        has_js = check_js and "javascript" in low
        has_policy = check_policy and any(p in low for p in POLICY_PHRASES)
        js += has_js
        policy += has_policy
        if ends and not has_js and not has_policy:
            words = line.split()
            if len(words) >= 3 and max(map(len, words)) <= 1000:
                c4_sentences += max(1, len(_SENTENCE_END.findall(clean)))

    def per_line(count: int) -> float:
        return count / n_lines if n_lines else 0.0

    def per_char(count: int) -> float:
        return count / n_chars if n_chars else 0.0

    lowered_tokens = [t.lower() for t in tokens]
    signals = {
        "n_chars": n_chars,
        "n_words": n_words,
        "mean_word_len": word_len / n_words if n_words else 0.0,
        "alpha_ratio": alpha_tokens / len(tokens) if tokens else 0.0,
        "symbol_ratio": symbols / non_space if non_space else 0.0,
        "hash_word_ratio": text.count("#") / max(n_words, 1),
        "ellipsis_word_ratio": (text.count("...") + text.count("…")) / max(n_words, 1),
        "bullet_line_ratio": per_line(bullets),
        "ellipsis_line_ratio": per_line(ellipsis_lines),
        "n_stop_words": stop_words,
        "dup_line_ratio": per_line(dup_lines),
        "dup_para_ratio": dup_paras / len(paragraphs) if paragraphs else 0.0,
        "dup_line_char_ratio": per_char(dup_line_chars),
        "dup_para_char_ratio": per_char(dup_para_chars),
        **_ngram_signals(lowered_tokens, [len(t) for t in tokens]),
        "c4_line_punct_ratio": per_line(c4_punct),
        "c4_sentences": c4_sentences,
        "javascript_line_ratio": per_line(js),
        "policy_line_ratio": per_line(policy),
        "lorem_ipsum": lowered_text.count("lorem ipsum"),
        "curly_brackets": text.count("{"),
        "fineweb_line_punct_ratio": per_line(fineweb_punct),
        "short_line_ratio": per_line(short),
        "newline_word_ratio": text.count("\n") / max(len(tokens), 1),
    }
    return signals


class QualityStage(Stage):
    name: ClassVar[str] = "quality"
    Params = QualityParams
    columns: ClassVar[tuple[str, ...]] = tuple(SIGNALS)
    version: ClassVar[int] = 2  # 2: the full Gopher, C4 and FineWeb rule sets

    def may_drop(self) -> bool:
        return self.params.filter is not None

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        return ds.map_batches(_score_batch, batch_format="pyarrow", fn_kwargs={"spec": self.params.filter})


def _score_batch(table: pa.Table, spec: list[str | dict[str, float]] | None) -> pa.Table:
    cache: dict[str, tuple[bool, bool, int, bool]] = {}
    rows = [document_signals(text, cache) for text in table["text"].to_pylist()]
    for column, (arrow_type, _) in SIGNALS.items():
        values = pa.array([r[column] for r in rows], arrow_type)
        if column in table.column_names:
            table = table.drop_columns([column])
        table = table.append_column(column, values)
    if spec is not None:
        filters = build_filters(spec)
        reasons = [next((reason for f in filters if (reason := f.failed_rule(r)) is not None), None) for r in rows]
        if "_drop_reason" in table.column_names:
            table = table.drop_columns(["_drop_reason"])
        table = table.append_column("_drop_reason", pa.array(reasons, pa.string()))
    return table
