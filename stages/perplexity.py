"""Perplexity under a causal LM: ``ppl``, ``nll`` (mean token NLL) and ``n_tokens`` per document.

Method: perplexity scoring with a reference model (Ankner et al., ICLR 2025, "Perplexed by
Perplexity"; POINTS, 2024). ``model: reference`` trains a small BPE tokenizer and GPT-2 style LM
here (``pipeline.models.reference_lm``) on a hashed sample of the input (``split: sample``: every
row is scored), on one hashed half (``split: held_out``: only the other half is scored, as in the
paper), or on trusted text (``reference_data``, CCNet-style). Any other value is a hub name or
a local folder in Hugging Face layout. Scoring runs the batch-independent kernel of
``pipeline.models.causal_lm_scorer`` in the shared actor pool (``pipeline.models.pool``); a row
without a score gets nulls and a counted reason in the manifest (``info.null_reasons``).
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar, Literal

import ray.data
from pydantic import Field, field_validator, model_validator

from pipeline.io.trusted import TrustedText
from pipeline.models.causal_lm_scorer import NULL_REASON, SCORE_COLUMNS, PerplexityScorer
from pipeline.models.lm import load_lm_config
from pipeline.models.pool import Resources, count_tokens_and_null_reasons, map_with_actor_pool
from pipeline.models.reference_lm import ReferenceLMSpec, prepare_reference_lm
from pipeline.models.windows import context_size
from stages.base import Stage, StageContext, StageParams


class PerplexityParams(StageParams):
    name: Literal["perplexity"] = "perplexity"
    model: str = Field("reference", min_length=1,
                       description="'reference' (train a small LM here), a hub name, or a local folder in HF layout.")
    reference: ReferenceLMSpec = Field(default_factory=ReferenceLMSpec,
                                       description="How the reference LM is trained (model: reference).")
    reference_data: TrustedText | None = Field(
        None, description="Trusted text to train the reference LM on, CCNet-style (a path, or "
        "{path|hf|synthetic, text_field}, as the quality classifier's positives); default: a hashed sample of the input.")
    split: Literal["sample", "held_out"] = Field(
        "sample", description="Without reference_data: 'sample' trains on a hashed sample of the input and scores "
        "every row (the sampled rows are in-sample); 'held_out' is Ankner et al.'s strict split: train on the rows "
        "of one hashed half and score only the other half (the training half gets null scores).")
    max_length: int = Field(512, ge=2, description="Tokens per window (model context).")
    stride: int | None = Field(None, ge=1, description="New tokens scored per window after the first; "
                               "default max_length - 1 (no overlap). Smaller = more context, more compute.")
    token_budget: int | None = Field(None, ge=64, description="Padded tokens per forward batch; default 4096 on "
                                     "CPU (small batches stay in cache), 32768 on CUDA, and at least max_length.")
    pad_multiple: int = Field(8, ge=1, description="Windows are padded to a multiple of this (determinism, above).")
    head_chunk: int = Field(2048, ge=16, description="Positions per LM-head + loss chunk.")
    docs_per_call: int | None = Field(None, ge=1, description="Rows per actor call, the set sorted by length "
                                      "together; default 256 on CPU (the actors' last calls end close together; 512 "
                                      "left one actor alone for seconds at the end, for 1-2% better packing), 4096 on CUDA.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on CUDA (where supported), fp32 on CPU.")
    concurrency: int | None = Field(None, ge=1, description="Actors; default: one per GPU, or CPUs // threads.")
    threads: int | None = Field(None, ge=1, description="Torch threads per CPU actor; default 1 "
                                "(one actor per core wins for small models, see benchmarks/README.md).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; default 1 when the device is CUDA.")
    trust_remote_code: bool = False

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "PerplexityParams":
        if self.stride is not None and self.stride > self.max_length - 1:
            raise ValueError(f"stride ({self.stride}) must be at most max_length - 1 ({self.max_length - 1})")
        if self.token_budget is not None and self.token_budget < self.max_length:
            raise ValueError(f"token_budget ({self.token_budget}) must hold one full window (max_length {self.max_length})")
        if self.model != "reference" and self.reference_data is not None:
            raise ValueError("reference_data only applies to model: reference")
        if self.reference_data is not None and self.split != "sample":
            raise ValueError("split: held_out splits the input; it does not apply with reference_data")
        return self


# --------------------------------------------------------------------------- the stage


class PerplexityStage(Stage):
    name: ClassVar[str] = "perplexity"
    tallies_rows: ClassVar[bool] = True
    Params = PerplexityParams
    columns: ClassVar[tuple[str, ...]] = SCORE_COLUMNS
    version: ClassVar[int] = 2  # 2: the reference LM's context is its training length

    def cache_inputs(self) -> object:
        """The trusted files' (path, size, mtime): editing reference_data retrains and rescores."""
        p = self.params
        if p.model != "reference" or p.reference_data is None:
            return None
        return p.reference_data.fingerprint()

    def resources(self) -> Resources:
        p = self.params
        return Resources(device=p.device, threads=p.threads, num_gpus=p.num_gpus, concurrency=p.concurrency)

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        t0 = time.time()
        max_length = p.max_length
        if p.model != "reference":
            # Fails here, naming the model, before any work or actor starts (ModelLoadError).
            config = load_lm_config(p.model, trust_remote_code=p.trust_remote_code)
            max_length = min(max_length, context_size(config) or max_length)  # as the scorer clamps it
        stride = min(p.stride, max_length - 1) if p.stride else max_length - 1
        info: dict[str, Any] = {"model": p.model, "max_length": max_length, "stride": stride}
        # Materialized once: the reference sample and the scoring read it from the object store,
        # and an actor pool that holds every CPU would otherwise starve the upstream read tasks
        # (Ray Data then waits forever; seen on 2 cores).
        ds = ds.materialize()
        timings = {"input": time.time() - t0}
        if p.model == "reference":
            folder, record = prepare_reference_lm(ds, p, ctx)
            model = str(folder)
            ctx.artifacts["reference_lm"] = os.path.relpath(folder, ctx.run_dir)
            info["reference_lm"] = {k: record[k] for k in ("parameters", "sample", "seconds", "reused")
                                    if k in record}
            info["reference_lm"]["train_loss_last"] = record["train"]["loss_last"]
            # The reference LM scores windows no longer than it trained on (its context).
            max_length = min(max_length, record["spec"]["seq_len"])
            stride = min(p.stride, max_length - 1) if p.stride else max_length - 1
            info.update(max_length=max_length, stride=stride)
        else:
            model = p.model
        placement = self.placement(ctx)
        info.update(**placement.info(), split=p.split if p.model == "reference" and p.reference_data is None else None)
        half_seed = ctx.seed if (p.model == "reference" and p.reference_data is None and p.split == "held_out") else None
        timings["reference_lm"] = time.time() - t0 - timings["input"]
        budget = max(p.max_length, p.token_budget or (32768 if placement.cuda else 4096))
        per_call = p.docs_per_call or (4096 if placement.cuda else 256)
        info.update(token_budget=budget, docs_per_call=per_call)
        t1 = time.time()
        scored = map_with_actor_pool(ds, PerplexityScorer, placement, per_call, {
            "model": model, "max_length": p.max_length, "stride": p.stride, "token_budget": budget,
            "pad_multiple": p.pad_multiple, "head_chunk": p.head_chunk, "dtype": p.dtype,
            "trust_remote_code": p.trust_remote_code, "half_seed": half_seed,
        }, tally=ctx.row_tally, info=ctx.info).materialize()
        timings["scoring"] = time.time() - t1
        tokens, counts = count_tokens_and_null_reasons(scored, NULL_REASON, "n_tokens")
        info["null_scores"] = sum(counts.values())
        info["null_reasons"] = counts
        info["tokens_scored"] = tokens
        timings["statistics"] = time.time() - t1 - timings["scoring"]
        info["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        info["tokens_per_second"] = round(tokens / max(1e-9, timings["scoring"]), 1)  # actor start-up included
        ctx.info.update(info)
        return scored.drop_columns([NULL_REASON])

