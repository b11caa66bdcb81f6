"""Semantic-aware permutation: copies of documents whose sentences list their semantic units in another order.

Method: SPT, Guo et al., *Mitigating Reversal Curse in Large Language Models via Semantic-aware
Permutation Training* (Findings of ACL 2024). Each sentence is cut into units by a segmenter
(``rules`` offline, ``lm`` or ``openai``; ``pipeline.models.segmenters``) and re-emitted with its
units in ``original``, ``reversed`` or ``shuffled`` order; a unit (a name) is never split.

Which documents get a copy (``fraction``), each copy's order (``probs``) and a shuffle depend on
(seed, id) only, so the output does not depend on block layout. Copies get the id
``<id>#spt-<k>``; ``source_id`` names the document a row comes from and ``variant`` its order. With
``keep_original`` the copies are added (declared per variant as ``permute.<variant>``); without
it they replace their document. docs/methods.md §12 gives the method in full.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from pydantic import Field, field_validator, model_validator

from pipeline.core.errors import ConfigError, FieldError
from pipeline.core.hashing import hash64, uniform
from pipeline.core.settings import StrictModel
from pipeline.models.chat_client import Secret, openai_segmenter
from pipeline.models.pool import Resources, map_with_actor_pool
from pipeline.models.segmenters import RuleSegmenter, Segmented, Segmenter, split_sentences
from stages.base import Stage, StageContext, StageParams

VARIANTS = ("original", "reversed", "shuffled")
_FALLBACKS = "_permute_fallbacks"  # per row "reason=n;..." of sentences kept whole; summed, never in the shards
_SEGMENTED = "_permute_segmented"  # per row: sentences sent to the segmenter


class LMSpec(StrictModel):
    model: str = Field(..., min_length=1, description="Hub name or local folder of a causal or instruct LM.")
    max_new_tokens: int = Field(128, ge=1, description="Greedy decoding length (128 in the paper).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (prompts of equal length only).")
    prompt: Literal["auto", "plain", "chat"] = Field("auto", description="chat: the tokenizer's chat template; "
                                                     "plain: the few-shot text prompt; auto: chat when there is a template.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(None, ge=1, description="Torch threads per CPU actor; default 1.")
    concurrency: int | None = Field(None, ge=1, description="Actors; default one per GPU, or CPUs // threads.")
    num_gpus: float | None = Field(None, ge=0)
    trust_remote_code: bool = False


class OpenAISpec(StrictModel):
    base_url: str = Field(..., min_length=1, description="The server's OpenAI-compatible root, e.g. http://host:8000/v1.")
    model: str = Field(..., min_length=1, description="The model name the server serves.")
    api_key_env: str | None = Field(None, min_length=1, description="Name of the environment variable that holds "
                                    "the API key (never the key itself); null sends no key.")
    timeout_s: float = Field(60.0, gt=0, description="Socket timeout of one request.")
    retries: int = Field(3, ge=0, description="Retries after a timeout, a connection error, 429 or 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before retry k+1: backoff_s * 2**k.")
    max_in_flight: int = Field(8, ge=1, description="Requests in flight at once, per actor.")
    actors: int = Field(1, ge=1, description="Ray actors sending requests (total in flight = actors * max_in_flight).")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)


class PermuteParams(StageParams):
    name: Literal["permute"] = "permute"
    probs: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(VARIANTS, 1 / 3), description=(
        "Probability of each order of a copy: original, reversed, shuffled (missing = 0); they sum to 1."))
    fraction: float = Field(1.0, ge=0, le=1, description="Share of documents that get copies (drawn by id).")
    copies: int = Field(1, ge=1, description="Copies per chosen document, each with its own order.")
    keep_original: bool = Field(True, description="Add the copies beside the document (true) or replace it (false).")
    segmenter: Literal["rules", "lm", "openai"] = Field("rules", description="rules (offline), lm or openai.")
    lm: LMSpec | None = None
    openai: OpenAISpec | None = None
    batch_size: int = Field(256, ge=1, description="Documents per actor call.")
    seed: int | None = Field(None, ge=0, description="Defaults to run.seed.")

    @field_validator("probs")
    @classmethod
    def _probs(cls, value: dict[str, float]) -> dict[str, float]:
        for key, p in value.items():
            if key not in VARIANTS:
                raise ValueError(f"unknown order {key!r} (allowed: {', '.join(VARIANTS)})")
            if not math.isfinite(p) or p < 0:
                raise ValueError(f"{key}: must be a probability >= 0 (got {p})")
        total = sum(value.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the probabilities must sum to 1 (got {total:g})")
        return {k: float(value.get(k, 0.0)) for k in VARIANTS}

    @model_validator(mode="after")
    def _segmenter_section(self) -> "PermuteParams":
        for section in ("lm", "openai"):
            given = getattr(self, section) is not None
            if self.segmenter == section and not given:
                raise FieldError(section, f"segmenter {section!r} needs its {section}: section")
            if self.segmenter != section and given:
                raise FieldError(section, f"only segmenter {section!r} reads this section (segmenter is {self.segmenter!r})")
        return self


# --------------------------------------------------------------------------- per-document draws


def draw_variants(ids: list[str], probs: dict[str, float], seed: int, copy: int = 0) -> list[str]:
    """The order of copy ``copy`` of each document: a function of (seed, id, copy) only."""
    edges = np.cumsum([probs[v] for v in VARIANTS])
    picks = np.searchsorted(edges, uniform(ids, seed, f"permute.variant.{copy}"), side="right")
    last = max(i for i, v in enumerate(VARIANTS) if probs[v] > 0)  # a draw above a rounded sum
    return [VARIANTS[min(int(k), last)] for k in picks]


def chosen(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which documents get copies: a seeded hash of the id below ``fraction``."""
    return uniform(ids, seed, "permute.pick") < fraction


def order_units(units: list[str], variant: str, rng: random.Random) -> list[str]:
    if variant == "reversed":
        return units[::-1]
    if variant == "shuffled":
        shuffled = list(units)
        rng.shuffle(shuffled)
        return shuffled
    return list(units)


def permute_text(text: str, spans: list[tuple[int, int]], segmented: list[Segmented], variant: str,
                 rng: random.Random) -> str:
    """``text`` with each sentence span re-emitted in ``variant`` unit order; whitespace between
    sentences is kept, and a sentence of one unit is left exactly as it was."""
    if variant == "original":
        return text
    pieces: list[str] = []
    last = 0
    for (start, end), seg in zip(spans, segmented):
        pieces.append(text[last:start])
        if len(seg.units) > 1:
            pieces.append(" ".join(order_units(seg.units, variant, rng)) + seg.terminal)
        else:
            pieces.append(text[start:end])
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


# --------------------------------------------------------------------------- the batch worker


def build_segmenter(kind: str, spec: dict[str, Any] | None, device: str, threads: int,
                    api_key: Secret | None = None) -> Segmenter:
    if kind == "rules":
        return RuleSegmenter()
    if kind == "lm":
        from pipeline.models.lm_segmenter import LMSegmenter  # torch and transformers, only when asked for

        assert spec is not None
        return LMSegmenter(spec["model"], spec["max_new_tokens"], spec["batch_size"], spec["prompt"], device,
                           spec["dtype"], threads, spec["trust_remote_code"])
    assert spec is not None
    return openai_segmenter(spec, api_key)


class PermuteBatch:
    """The Ray actor: one batch of documents in, the kept documents and their copies out."""

    def __init__(self, segmenter: str, spec: dict[str, Any] | None, probs: dict[str, float], fraction: float,
                 copies: int, keep_original: bool, seed: int, api_key: Secret | None = None, device: str = "cpu",
                 threads: int = 1) -> None:
        self.segmenter = build_segmenter(segmenter, spec, device, threads, api_key)
        self.probs, self.fraction, self.copies = probs, fraction, copies
        self.keep_original, self.seed = keep_original, seed

    def __call__(self, table: pa.Table) -> pa.Table:
        ids = [str(x) for x in table["id"].to_pylist()]
        texts = table["text"].to_pylist()
        sources = table["source_id"].to_pylist() if "source_id" in table.column_names else [None] * len(ids)
        picked = chosen(ids, self.fraction, self.seed)
        variants = [draw_variants(ids, self.probs, self.seed, k) for k in range(self.copies)]

        # Every sentence a copy will reorder, segmented in one call (a model batches them).
        spans: dict[int, list[tuple[int, int]]] = {}
        wanted: list[str] = []
        for i in np.flatnonzero(picked):
            if texts[i] and any(variants[k][i] != "original" for k in range(self.copies)):
                spans[i] = split_sentences(texts[i])
                wanted.extend(texts[i][a:b] for a, b in spans[i])
        unique = list(dict.fromkeys(wanted))
        answers = dict(zip(unique, self.segmenter.segment(unique)))

        take: list[int] = []
        out_ids: list[str] = []
        out_texts: list[str | None] = []
        out_variants: list[str] = []
        out_sources: list[str] = []
        fallbacks: list[str] = []
        segmented: list[int] = []
        for i, doc_id in enumerate(ids):
            root = sources[i] or doc_id
            if self.keep_original or not picked[i]:
                take.append(i)
                out_ids.append(doc_id)
                out_texts.append(texts[i])
                out_variants.append("original")
                out_sources.append(root)
                fallbacks.append("")
                segmented.append(0)
            if not picked[i]:
                continue
            doc_spans = spans.get(i, [])
            segs = [answers[texts[i][a:b]] for a, b in doc_spans]
            reasons = Counter(s.fallback for s in segs if s.fallback)
            for k in range(self.copies):
                variant = variants[k][i]
                rng = random.Random(int(hash64([doc_id], self.seed, f"permute.shuffle.{k}")[0]))
                text = texts[i] if variant == "original" or texts[i] is None else permute_text(
                    texts[i], doc_spans, segs, variant, rng)
                take.append(i)
                out_ids.append(f"{doc_id}#spt-{k}")
                out_texts.append(text)
                out_variants.append(variant)
                out_sources.append(root)
                # Counted once per document, on its first copy: the sentences were segmented once.
                fallbacks.append(";".join(f"{r}={n}" for r, n in sorted(reasons.items())) if k == 0 else "")
                segmented.append(len(segs) if k == 0 else 0)

        out = table.take(pa.array(take, type=pa.int64()))
        columns = {"id": pa.array(out_ids, pa.string()), "text": pa.array(out_texts, pa.string()),
                   "variant": pa.array(out_variants, pa.string()), "source_id": pa.array(out_sources, pa.string()),
                   _FALLBACKS: pa.array(fallbacks, pa.string()), _SEGMENTED: pa.array(segmented, pa.int64())}
        for name, values in columns.items():
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, values)
            else:
                out = out.append_column(name, values)
        return out


def _summarize(table: pa.Table) -> pa.Table:
    """One row per (kind, key) of a block: copies by variant, fallbacks by reason, sentences segmented."""
    counts: Counter[tuple[str, str]] = Counter()
    copies = pc.not_equal(table["id"], table["source_id"]).to_pylist()
    for is_copy, variant in zip(copies, table["variant"].to_pylist()):
        if is_copy:
            counts[("copy", variant)] += 1
    for cell in table[_FALLBACKS].to_pylist():
        for item in filter(None, (cell or "").split(";")):
            reason, _, n = item.rpartition("=")
            counts[("fallback", reason)] += int(n)
    counts[("segmented", "")] += int(pc.sum(table[_SEGMENTED]).as_py() or 0)
    return pa.table({"kind": [k for k, _ in counts], "key": [v for _, v in counts], "n": list(counts.values())})


class PermuteStage(Stage):
    name: ClassVar[str] = "permute"
    tallies_rows: ClassVar[bool] = True
    Params = PermuteParams
    columns: ClassVar[tuple[str, ...]] = ("variant", "source_id")

    def resources(self) -> Resources:
        p = self.params
        if p.segmenter == "lm":
            assert p.lm is not None
            return Resources(device=p.lm.device, threads=p.lm.threads, num_gpus=p.lm.num_gpus,
                             concurrency=p.lm.concurrency)
        if p.segmenter == "openai":
            assert p.openai is not None
            return Resources(device="cpu", threads=1, concurrency=p.openai.actors)
        return Resources(device="cpu")

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        seed = p.seed if p.seed is not None else ctx.seed
        api_key = None
        spec: dict[str, Any] | None = None
        if p.segmenter == "lm":
            assert p.lm is not None
            from pipeline.models.lm import load_lm_config

            load_lm_config(p.lm.model, trust_remote_code=p.lm.trust_remote_code)  # fail here, naming the model
            spec = p.lm.model_dump()
        elif p.segmenter == "openai":
            assert p.openai is not None
            spec = p.openai.model_dump()
            if p.openai.api_key_env:
                if not os.environ.get(p.openai.api_key_env):
                    raise ConfigError(f"permute.openai.api_key_env: the environment variable "
                                      f"{p.openai.api_key_env!r} is not set")
                # Read in the driver: Ray workers (on other nodes, too) do not see its environment.
                api_key = Secret(os.environ[p.openai.api_key_env])
        placement = self.placement(ctx)
        out = map_with_actor_pool(ds, PermuteBatch, placement, p.batch_size, {
            "segmenter": p.segmenter, "spec": spec, "probs": p.probs, "fraction": p.fraction, "copies": p.copies,
            "keep_original": p.keep_original, "seed": seed, "api_key": api_key},
            tally=ctx.row_tally, info=ctx.info).materialize()

        copies: dict[str, int] = {}
        fallbacks: dict[str, int] = {}
        segmented = 0
        for row in out.select_columns(["id", "source_id", "variant", _FALLBACKS, _SEGMENTED]).map_batches(
                _summarize, batch_format="pyarrow").take_all():
            if row["kind"] == "copy":
                copies[row["key"]] = copies.get(row["key"], 0) + int(row["n"])
            elif row["kind"] == "fallback":
                fallbacks[row["key"]] = fallbacks.get(row["key"], 0) + int(row["n"])
            else:
                segmented += int(row["n"])
        if p.keep_original:
            for variant, n in copies.items():
                ctx.added[f"permute.{variant}"] = n
        info: dict[str, Any] = {"segmenter": p.segmenter, "probs": p.probs, "fraction": p.fraction, "copies": p.copies,
                                "keep_original": p.keep_original, "seed": seed,
                                "copies_by_variant": dict(sorted(copies.items())),
                                "sentences_segmented": segmented, "fallbacks": sum(fallbacks.values()),
                                "fallbacks_by_reason": dict(sorted(fallbacks.items())), **placement.info()}
        if p.segmenter == "lm":
            info["model"] = spec["model"] if spec else None
        if p.segmenter == "openai" and p.openai is not None:
            info.update(endpoint=p.openai.base_url, model=p.openai.model, api_key_env=p.openai.api_key_env)
        ctx.info.update(info)
        return out.drop_columns([_FALLBACKS, _SEGMENTED])
