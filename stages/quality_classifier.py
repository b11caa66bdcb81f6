"""DCLM-style quality classifier (Li et al., 2024, DataComp-LM): trusted text against a random
sample of the corpus -> ``quality_clf``; or any Hugging Face sequence classifier by name.

``positives:`` trains the hashed n-gram model of ``pipeline.models.ngram_classifier`` on a
bounded trusted sample against a seeded hashed sample of the input (as DCLM does with
RefinedWeb), cross-fitted over two id folds, and stores it in the stage's artifacts
(``classifier.npz`` + ``classifier.json``; a rerun with the same params and positives reuses
it). ``model:`` scores with a hub or local sequence classifier (FineWeb-Edu style) in the
shared actor pool. The pitfall, a classifier that learns the positives' domain rather than
quality, is described in docs/methods.md; ``curriculum inspect`` warns when it shows.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.data
from pydantic import Field, model_validator

from pipeline.core.errors import StageError
from pipeline.core.files import read_json_or_none, write_json_atomic
from pipeline.core.hashing import bottom_k
from pipeline.io.trusted import TrustedText
from pipeline.models.lm import load_lm_config
from pipeline.models.ngram_classifier import Features, fit_cross_fitted, fold_of, predict_proba
from pipeline.models.pool import Resources, map_with_actor_pool
from pipeline.models.reference_lm import sample_input
from pipeline.models.sequence_classifier import SequenceClassifierScorer, resolve_label
from stages.base import Stage, StageContext, StageParams

POSITIVES_SALT = "quality_classifier.positives"
COLUMN = "quality_clf"
_MODEL_FILE, _META_FILE = "classifier.npz", "classifier.json"


def _predict_batch(table: pa.Table, weights: Any, features: dict[str, Any], seed: int) -> pa.Table:
    if isinstance(weights, ray.ObjectRef):
        weights = ray.get(weights)
    coef, intercept = weights
    folds = fold_of(table["id"].to_pylist(), seed)
    probs = predict_proba(table["text"].to_pylist(), coef, intercept, Features(**features), folds)
    if COLUMN in table.column_names:
        table = table.drop_columns([COLUMN])
    return table.append_column(COLUMN, pa.array(probs, pa.float64()))


# --------------------------------------------------------------------------- the stage


class QualityClassifierParams(StageParams):
    name: Literal["quality_classifier"] = "quality_classifier"
    positives: TrustedText | None = Field(
        None, description="The trusted set (a path, or {path|hf|synthetic, text_field}); trains the DCLM-style model."
    )
    model: str | None = Field(
        None, description="Instead of training: a HF sequence-classification model (hub name or path).")
    sample_size: int = Field(20_000, ge=2, description="At most this many training documents per class.")
    features: Features = Features()
    C: float = Field(1.0, gt=0, description="Inverse L2 regularisation strength of the logistic regression.")
    seed: int | None = Field(None, ge=0, description="Seeds the negative sample and the holdout; defaults to run.seed.")
    batch_size: int = Field(1024, ge=1, description="Documents per map_batches call.")
    # hub classifiers
    label: int | str | None = Field(
        None, description="model: the label whose probability is the score (default: the last).")
    max_length: int = Field(512, ge=8, description="model: tokens per document (longer ones are truncated).")
    max_tokens: int = Field(16_384, ge=8, description="model: padded tokens per forward pass.")
    concurrency: int | None = Field(None, ge=1, description="model: actors; default one per GPU, or CPUs // threads.")
    num_gpus: float | None = Field(None, ge=0, description="model: GPUs per actor; default 1 on CUDA.")
    threads: int | None = Field(None, ge=1, description="model: torch threads per CPU actor; default 1.")
    device: str = Field("auto", description="model: auto (CUDA when the cluster has GPUs) | cpu | cuda[:N].")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "QualityClassifierParams":
        if (self.positives is None) == (self.model is None):
            raise ValueError("give either positives (a trusted set to train on) or model (a HF sequence classifier), "
                             "not both or neither")
        return self


class QualityClassifierStage(Stage):
    name: ClassVar[str] = "quality_classifier"
    tallies_rows: ClassVar[bool] = True
    Params = QualityClassifierParams
    columns: ClassVar[tuple[str, ...]] = (COLUMN,)

    def cache_inputs(self) -> object:
        # The trusted set's files are part of the cache key: editing them must retrain.
        return self.params.positives.fingerprint() if self.params.positives is not None else None

    def resources(self) -> Resources:
        p = self.params
        if p.model is None:
            return Resources()
        return Resources(device=p.device, threads=p.threads, num_gpus=p.num_gpus, concurrency=p.concurrency)

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        if self.params.model is not None:
            return self._apply_hub(ds, ctx)
        return self._apply_trained(ds, ctx)

    # ---- DCLM-style
    def _apply_trained(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        assert p.positives is not None
        seed = ctx.seed if p.seed is None else p.seed
        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
        meta_path, model_path = ctx.artifact_dir / _META_FILE, ctx.artifact_dir / _MODEL_FILE
        identity = {"params": p.model_dump(mode="json"), "seed": seed, "positives": p.positives.fingerprint(),
                    "method": "cross-fit-2"}
        # A meta file cut by a crash reads as None: the model is then retrained, never half-trusted.
        meta = read_json_or_none(meta_path) if model_path.is_file() else None
        if isinstance(meta, dict) and meta.get("identity") == identity:
            with np.load(model_path, allow_pickle=False) as saved:
                coef, intercept = saved["coef"], saved["intercept"]
            reused = True
        else:
            t0 = time.time()
            sampled, scanned = bottom_k(p.positives.texts(), p.sample_size, seed, POSITIVES_SALT, p.features.max_chars)
            positives = [text for _, text in sampled]
            if not positives:
                raise StageError("quality_classifier: the trusted set yielded no document with text")
            negatives = sample_negatives(ds, p.sample_size, seed, p.features.max_chars, exclude=set(positives))
            if not negatives:
                raise StageError("quality_classifier: the input has no document to use as a negative")
            coef, intercept, stats = fit_cross_fitted(positives, negatives, p.features, p.C, seed)
            meta = {"identity": identity, "n_positives": len(positives), "n_negatives": len(negatives),
                    "positives_read": scanned, **stats, "fit_seconds": round(time.time() - t0, 3),
                    "dim": p.features.dim, "format": "coef float64[2, dim], intercept float64[2]; a row of "
                    "fold f (seeded id hash) scores sigmoid(features @ coef[f] + intercept[f])"}
            tmp = ctx.artifact_dir / f".{_MODEL_FILE}.tmp.npz"
            np.savez_compressed(tmp, coef=coef, intercept=intercept)
            tmp.replace(model_path)
            write_json_atomic(meta_path, meta, indent=2, sort_keys=True)
            reused = False
        ctx.info.update({k: meta[k] for k in ("n_positives", "n_negatives", "positives_read", "n_fit", "n_holdout",
                                              "holdout_auc", "holdout_auc_by_fold")},
                        reused_model=reused, method="hashed-ngram logistic, cross-fitted over 2 id folds")
        ctx.artifacts["quality_classifier"] = str(ctx.artifact_dir.relative_to(ctx.run_dir))
        weights = ray.put((coef, intercept))
        return ds.map_batches(_predict_batch, batch_format="pyarrow", batch_size=p.batch_size,
                              fn_kwargs={"weights": weights, "features": p.features.model_dump(), "seed": seed})

    # ---- hub classifier
    def _apply_hub(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        assert p.model is not None
        # Fail fast in the driver, naming the model, before any actor starts.
        config = load_lm_config(p.model, trust_remote_code=p.trust_remote_code)
        index = resolve_label(config, p.label)
        placement = self.placement(ctx)
        ctx.info.update(method="hub sequence classifier", model=p.model, num_labels=int(config.num_labels),
                        label_index=index, score="raw regression output" if index is None else "softmax probability",
                        **placement.info())
        return map_with_actor_pool(
            ds, SequenceClassifierScorer, placement, p.batch_size,
            {"model": p.model, "label": p.label, "max_length": p.max_length, "max_tokens": p.max_tokens,
             "trust_remote_code": p.trust_remote_code, "column": COLUMN},
            tally=ctx.row_tally, info=ctx.info,
        )


def sample_negatives(ds: ray.data.Dataset, k: int, seed: int, max_chars: int,
                     exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """A seeded random sample of at most ``k`` input rows (id, text) by hashed id, sorted by id; texts
    also in ``exclude`` (the positives) are left out. The driver holds about 1.2 k truncated texts,
    never the corpus (``pipeline.models.reference_lm.sample_input``, shared with the perplexity stage)."""
    exclude = exclude or set()
    return [(doc_id, text) for doc_id, text in sample_input(ds, k, seed, max_chars) if text not in exclude]
