"""Scoring with a Hugging Face sequence-classification model (FineWeb-Edu style), batch-independent.

Documents are sorted by length and packed by ``max_tokens``; each row is padded to a width
that depends on its own length only (the next multiple of 16, which also keeps every GEMM at
16 rows or more), a batch holds one width, and on CUDA every batch of a width has the same
number of rows, so a score never depends on which documents share its batch. With two or more
labels the score is the softmax probability of ``label``; with one (a regression head) it is
the raw output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import ModelLoadError
from pipeline.models.lm import compute_dtype, load_sequence_classifier, resolve_device
from pipeline.models.windows import padded_length

_PAD_MULTIPLE = 16  # rows are padded to a multiple of this (determinism)
_MAX_ROWS = 256  # rows per forward batch at most (and the fixed batch shape's cap on CUDA)


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
                 trust_remote_code: bool, threads: int | None = None, column: str = "score") -> None:
        import torch

        self.threads = threads
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
        self.column = column

    def score(self, texts: list[str]) -> np.ndarray:
        """One score per text, in input order; a text's score does not depend on its batch.

        As in the perplexity stage: each row is padded to a width that depends on its own length
        only (the next multiple of 16, which also keeps every GEMM at 16 rows or more), a forward
        batch holds one width, and on CUDA every batch of a width has the same number of rows
        (dummy rows fill it), since GPU kernels may be chosen by batch shape.
        """
        import torch

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
        if self.threads:  # per calling thread (see PerplexityScorer.__call__)
            import torch

            torch.set_num_threads(self.threads)
        scores = self.score(table["text"].to_pylist()) if table.num_rows else np.zeros(0)
        if self.column in table.column_names:
            table = table.drop_columns([self.column])
        return table.append_column(self.column, pa.array(scores, pa.float64()))
