"""DCLM-style quality classifier (Li et al., 2024, DataComp-LM §4.1.3): trusted text vs a random
sample of the corpus, a hashed n-gram linear model -> ``quality_clf``; or any Hugging Face
sequence-classification model by name (FineWeb-Edu style). METHODS.md §1b.

**Trained classifier** (``positives:``). Positives are a trusted set (a jsonl / parquet / text
file, folder or glob; a ``datasets`` dataset; or clean synthetic documents); negatives are a
seeded, hashed random sample of the input itself, as DCLM does with RefinedWeb. Both are bounded
by ``sample_size`` per class (a streaming bottom-k by a seeded hash, so memory never grows with
the corpus), truncated to ``max_chars``; positives are de-duplicated by content, and a text in
both sets is dropped from the negatives. Features are hashed word 1-2-grams (words and runs of
symbols) plus character 3-5-grams (scikit-learn ``HashingVectorizer``: stateless, so the fitted
model is just its weights), and the model is an L2 logistic regression with balanced class
weights (lbfgs: deterministic). It is cross-fitted: rows fall in two folds by a seeded id hash,
the fold-f model trains on every positive and on the negatives of the other fold, and scores the
rows of fold f, so no row is scored by a model that trained on it (an in-sample negative scores
lower than the same row unseen: by 0.02 on average on 2,000 synthetic documents). In each model,
10% of the training sample, chosen by hash, is held out to report an AUC.
``quality_clf`` = P(looks like the trusted set) in [0, 1], computed per row with ``map_batches``.

The weights are stored as ``classifier.npz`` (plain arrays, loaded with ``allow_pickle=False``)
plus ``classifier.json`` (features, counts, AUC) in the stage's artifact folder; a rerun with the
same params and the same positives reuses them. The positives' files (size, mtime) are part of
the stage's cache key, so editing the trusted set retrains.

**The pitfall.** Such a classifier learns "looks like the positives", not "is good". With
positives from another domain it becomes a domain detector: measured here, a model trained on
Python docs and fortunes against Debian prose ranked Debian prose *below* ascii-art and word
salad (AUC 0.30). Positives must be the good part of the corpus's *own* domain; a holdout AUC
near 1.0 is a warning sign, not a success. ``curriculum inspect`` warns when ``quality_clf``
correlates negatively with the other signals.

**Hub classifier** (``model:``). Any ``AutoModelForSequenceClassification`` (hub name or local
path in HF layout) runs in a Ray actor pool (``concurrency`` actors, ``num_gpus`` each, bf16 on
CUDA), documents sorted by length inside each batch and packed by ``max_tokens`` to cut padding.
With two or more labels the score is the softmax probability of ``label`` (default: the last
label); with one label (a regression head such as FineWeb-Edu's 0-5 scale) it is the raw output.
A score does not depend on which documents share its batch (so not on Ray's block layout): each
row is padded to a width that depends on its own length only, a batch holds one width, and on
CUDA batches have a fixed shape (``SequenceClassifierScorer.score``); tested bitwise on CPU.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.data
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ModelLoadError, StageError
from pipeline.hashing import bottom_k, uniform
from pipeline.trusted import TrustedText
from stages.base import Resources, Stage, StageContext, StageParams, actor_placement

POSITIVES_SALT = "quality_classifier.positives"
FOLD_SALT = "quality_classifier.fold"
_PAD_MULTIPLE = 16  # hub classifier rows are padded to a multiple of this (determinism)
_MAX_ROWS = 256  # rows per forward batch at most (and the fixed batch shape's cap on CUDA)

COLUMN = "quality_clf"
_MODEL_FILE, _META_FILE = "classifier.npz", "classifier.json"
# Words, or runs of symbols: markup and ascii-art are signal here, so they are tokens too.
_TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]+"


# --------------------------------------------------------------------------- features + model


class Features(BaseModel):
    """The hashed n-gram feature space: stateless, so a model is fully described by these + weights."""

    model_config = ConfigDict(extra="forbid")

    word_ngrams: tuple[int, int] = Field((1, 2), description="Word n-gram range (words and runs of symbols).")
    char_ngrams: tuple[int, int] | None = Field((3, 5), description="Character n-gram range; null disables them.")
    n_features: int = Field(2**18, ge=2**10, le=2**24, description="Hash buckets per feature family.")
    max_chars: int = Field(4000, ge=100, description="Only a document's first max_chars characters are featurized.")

    @field_validator("word_ngrams", "char_ngrams")
    @classmethod
    def _range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not (1 <= value[0] <= value[1] <= 8):
            raise ValueError(f"an n-gram range is [low, high] with 1 <= low <= high <= 8 (got {list(value)})")
        return value

    @property
    def dim(self) -> int:
        return self.n_features * (2 if self.char_ngrams else 1)

    def transform(self, texts: list[str]):
        """A CSR matrix, one l2-normalised row per text per feature family (rows are independent)."""
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import HashingVectorizer

        texts = [t[: self.max_chars] for t in texts]
        word = HashingVectorizer(n_features=self.n_features, ngram_range=tuple(self.word_ngrams),
                                 token_pattern=_TOKEN_PATTERN, alternate_sign=False, dtype=np.float64)
        blocks = [word.transform(texts)]
        if self.char_ngrams:
            char = HashingVectorizer(n_features=self.n_features, analyzer="char_wb",
                                     ngram_range=tuple(self.char_ngrams), alternate_sign=False, dtype=np.float64)
            blocks.append(char.transform(texts))
        return sp.hstack(blocks, format="csr")


def fit_classifier(positives: list[str], negatives: list[str], features: Features, c: float, seed: int,
                   holdout: float = 0.1) -> tuple[np.ndarray, float, dict[str, Any]]:
    """(coef, intercept, stats): logistic regression on hashed features, with a hashed holdout AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    texts = positives + negatives
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    held = uniform(texts, seed, "quality_classifier.holdout") < holdout
    fit_rows = ~held
    stats: dict[str, Any] = {"n_fit": int(fit_rows.sum()), "n_holdout": int(held.sum()), "holdout_auc": None}
    if len(set(labels[fit_rows])) < 2:  # a tiny set: the holdout took one class entirely; fit on all of it
        fit_rows = np.ones_like(held)
        stats.update(n_fit=len(texts), n_holdout=0)
    x = features.transform(texts)
    model = LogisticRegression(C=c, class_weight="balanced", solver="lbfgs", max_iter=2000)
    model.fit(x[fit_rows], labels[fit_rows])
    coef = model.coef_.ravel().astype(np.float64)
    intercept = float(model.intercept_[0])
    if held.any() and fit_rows.sum() < len(texts) and len(set(labels[held])) == 2:
        stats["holdout_auc"] = round(float(roc_auc_score(labels[held], x[held] @ coef + intercept)), 4)
    return coef, intercept, stats


def fit_cross_fitted(positives: list[str], negatives: list[tuple[str, str]], features: Features, c: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Two models, one per id fold: model f never sees the negatives of fold f, and scores fold f.

    Without this, on a corpus no larger than ``sample_size`` every input row is a training negative
    (pushed towards 0) except the holdout, which then scores higher than rows just like it.
    Cross-fitting scores every row with a model that did not train on it, whatever the corpus size.
    """
    folds = fold_of([doc_id for doc_id, _ in negatives], seed)
    coefs, intercepts, aucs = [], [], []
    stats: dict[str, Any] = {"n_fit": 0, "n_holdout": 0}
    for fold in (0, 1):
        others = [text for (_, text), f in zip(negatives, folds) if f != fold]
        coef, intercept, fold_stats = fit_classifier(positives, others or [t for _, t in negatives], features, c, seed)
        coefs.append(coef)
        intercepts.append(intercept)
        aucs.append(fold_stats["holdout_auc"])
        stats["n_fit"] += fold_stats["n_fit"]
        stats["n_holdout"] += fold_stats["n_holdout"]
    known = [a for a in aucs if a is not None]
    stats.update(holdout_auc=round(float(np.mean(known)), 4) if known else None, holdout_auc_by_fold=aucs)
    return np.stack(coefs), np.array(intercepts, dtype=np.float64), stats


def fold_of(ids: list[str], seed: int) -> np.ndarray:
    """The cross-fitting fold (0 or 1) of each row, by a seeded hash of its id."""
    return (uniform(ids, seed, FOLD_SALT) >= 0.5).astype(np.int64)


def predict_proba(texts: list[str], coef: np.ndarray, intercept: np.ndarray | float, features: Features,
                  folds: np.ndarray | None = None) -> np.ndarray:
    """P(trusted) per text. With one model per fold (``coef`` of shape (2, dim)), row i is scored by
    ``coef[folds[i]]``. Each row's dot product uses only that row, so batching cannot change it."""
    x = features.transform(texts)
    if np.ndim(coef) == 1:
        z = x @ coef + intercept
    else:
        z = np.take_along_axis(np.asarray(x @ coef.T) + intercept, folds[:, None], axis=1)[:, 0]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def _predict_batch(table: pa.Table, weights: Any, features: dict[str, Any], seed: int) -> pa.Table:
    if isinstance(weights, ray.ObjectRef):
        weights = ray.get(weights)
    coef, intercept = weights
    folds = fold_of(table["id"].to_pylist(), seed)
    probs = predict_proba(table["text"].to_pylist(), coef, intercept, Features(**features), folds)
    if COLUMN in table.column_names:
        table = table.drop_columns([COLUMN])
    return table.append_column(COLUMN, pa.array(probs, pa.float64()))


# --------------------------------------------------------------------------- hub classifiers


def resolve_label(config: Any, label: int | str | None) -> int | None:
    """The output index whose probability is the score; None for a one-output regression head."""
    n = int(getattr(config, "num_labels", 1))
    if n == 1:
        return None
    if label is None:
        return n - 1
    if isinstance(label, int):
        if not 0 <= label < n:
            raise ModelLoadError(f"quality_classifier: label {label} is out of range for a model with {n} labels")
        return label
    names = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if label not in names:
        raise ModelLoadError(f"quality_classifier: label {label!r} is not one of the model's labels {sorted(names)}")
    return names[label]


class SequenceClassifierScorer:
    """A Ray actor: loads the model once, then scores batches of documents, length-sorted."""

    def __init__(self, model: str, label: int | str | None, max_length: int, max_tokens: int, device: str,
                 trust_remote_code: bool, threads: int | None = None) -> None:
        import torch

        from pipeline.lm import compute_dtype, load_sequence_classifier, resolve_device

        if threads:  # the actor's CPU share; more threads would oversubscribe the node
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model, self.tokenizer = load_sequence_classifier(model, trust_remote_code, compute_dtype(self.device))
        self.model.to(self.device).eval()
        self.index = resolve_label(self.model.config, label)
        limit = getattr(self.tokenizer, "model_max_length", None)
        # Never past the model's context (transformers uses a huge sentinel when it is unknown).
        self.max_length = min(max_length, limit) if isinstance(limit, int) and limit < 1_000_000 else max_length
        self.max_tokens = max_tokens
        self.fixed_shapes = self.device.startswith("cuda")

    def score(self, texts: list[str]) -> np.ndarray:
        """One score per text, in input order; a text's score does not depend on its batch.

        As in the perplexity stage: each row is padded to a width that depends on its own length
        only (the next multiple of 16, which also keeps every GEMM at 16 rows or more), a forward
        batch holds one width, and on CUDA every batch of a width has the same number of rows
        (dummy rows fill it), since GPU kernels may be chosen by batch shape.
        """
        import torch

        from stages.perplexity import padded_length

        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        widths = [padded_length(max(1, len(ids)), _PAD_MULTIPLE, max(self.max_length, _PAD_MULTIPLE))
                  for ids in encoded]
        order = sorted(range(len(texts)), key=lambda i: (widths[i], i))
        scores = np.zeros(len(texts), dtype=np.float64)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        start = 0
        with torch.inference_mode():
            while start < len(order):
                width = widths[order[start]]
                capacity = max(1, min(_MAX_ROWS, self.max_tokens // width))
                rows = [i for i in order[start:start + capacity] if widths[i] == width]
                start += len(rows)
                n_rows = capacity if self.fixed_shapes else len(rows)
                ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
                mask = torch.zeros((n_rows, width), dtype=torch.long)
                mask[:, -1 if left else 0] = 1  # dummy rows attend to one token (no all-masked softmax)
                for r, i in enumerate(rows):
                    tokens = torch.as_tensor(encoded[i], dtype=torch.long)
                    span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
                    ids[r, span] = tokens
                    mask[r] = 0
                    mask[r, span] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logits = logits[: len(rows)].float()
                values = logits[:, 0] if self.index is None else torch.softmax(logits, dim=-1)[:, self.index]
                scores[rows] = values.cpu().numpy()
        return np.round(scores, 6)

    def __call__(self, table: pa.Table) -> pa.Table:
        scores = self.score(table["text"].to_pylist()) if table.num_rows else np.zeros(0)
        if COLUMN in table.column_names:
            table = table.drop_columns([COLUMN])
        return table.append_column(COLUMN, pa.array(scores, pa.float64()))


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
    Params = QualityClassifierParams
    columns: ClassVar[tuple[str, ...]] = (COLUMN,)

    def cache_inputs(self) -> object:
        # The trusted set's files are part of the cache key: editing them must retrain.
        return self.params.positives.fingerprint() if self.params.positives is not None else None

    def resources(self) -> Resources:
        p = self.params
        if p.model is None:
            return Resources()
        gpus = p.num_gpus if p.num_gpus is not None else (1.0 if p.device.startswith("cuda") else 0.0)
        return Resources(num_cpus=float(p.threads or 1), num_gpus=gpus)

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
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() and model_path.is_file() else None
        if meta is not None and meta.get("identity") == identity:
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
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
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
        from pipeline.lm import load_lm_config

        p = self.params
        assert p.model is not None
        # Fail fast in the driver, naming the model, before any actor starts.
        config = load_lm_config(p.model, trust_remote_code=p.trust_remote_code)
        index = resolve_label(config, p.label)
        device, concurrency, gpus, threads = actor_placement(ctx, p.device, p.num_gpus, p.concurrency, p.threads)
        ctx.info.update(method="hub sequence classifier", model=p.model, num_labels=int(config.num_labels),
                        label_index=index, score="raw regression output" if index is None else "softmax probability",
                        device=device, concurrency=concurrency, num_gpus_per_actor=gpus, threads_per_actor=threads)
        return ds.map_batches(
            SequenceClassifierScorer, batch_format="pyarrow", batch_size=p.batch_size,
            compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=gpus or None, num_cpus=threads,
            fn_constructor_kwargs={"model": p.model, "label": p.label, "max_length": p.max_length,
                                   "max_tokens": p.max_tokens, "device": device, "threads": threads,
                                   "trust_remote_code": p.trust_remote_code},
        )


def sample_negatives(ds: ray.data.Dataset, k: int, seed: int, max_chars: int,
                     exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """A seeded random sample of at most ``k`` input rows (id, text) by hashed id, sorted by id; texts
    also in ``exclude`` (the positives) are left out. The driver holds about 1.2 k truncated texts,
    never the corpus (``pipeline.reference_lm.sample_input``, shared with the perplexity stage)."""
    from pipeline.reference_lm import sample_input

    exclude = exclude or set()
    return [(doc_id, text) for doc_id, text in sample_input(ds, k, seed, max_chars) if text not in exclude]
