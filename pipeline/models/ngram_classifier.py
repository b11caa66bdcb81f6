"""The DCLM-style quality classifier's model: hashed n-gram features and a cross-fitted logistic regression.

Features are hashed word 1-2-grams (words and runs of symbols) plus character 3-5-grams
(scikit-learn ``HashingVectorizer``: stateless, so a fitted model is just its weights). The
model is an L2 logistic regression with balanced class weights (lbfgs: deterministic),
cross-fitted over two id folds so that no row is scored by a model that trained on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core.hashing import uniform

FOLD_SALT = "quality_classifier.fold"
# Words, or runs of symbols: markup and ascii-art are signal here, so they are tokens too.
_TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]+"


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
