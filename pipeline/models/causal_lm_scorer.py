"""The causal-LM scoring kernel: mean token NLL per document, batch-independent and padding-free.

``nll`` is the mean negative log-likelihood of every token of a text, each predicted from the
tokens before it, with BOS (or EOS) prepended so the first token counts too; ``ppl = exp(nll)``.
Long texts are scored over windows (``pipeline.models.windows``). Windows are sorted by length
and packed into batches of at most ``token_budget`` padded tokens (sort-by-length, as NeMo
Curator does), and results go back in input order. The model body runs once per batch; the LM
head and the loss run on the scored positions only, ``head_chunk`` rows at a time, so padding
never reaches the head and full-vocabulary logits are never built for a whole batch (a model
whose head is not a plain linear layer is detected and scored through its own forward).

Determinism: a row's float result depends on its padded length but not on the batch size or
thread count on CPU, so each window is padded by its own length only, a batch holds one padded
length, and the head's row count is padded to a multiple of 16 (CPU GEMMs round a row
differently in matrices of fewer than ~12 rows). On CUDA batches also get a fixed shape.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from pipeline.models.lm import compute_dtype, load_causal_lm, resolve_device
from pipeline.models.reference_lm import in_training_half
from pipeline.models.windows import context_size, padded_length, plan_windows

SCORE_COLUMNS = ("ppl", "nll", "n_tokens")
NULL_REASON = "_ppl_null_reason"  # why a row has no score; counted by the stage, never in the shards
_HEAD_ROWS = 16


class PerplexityScorer:
    """Scores texts with a causal LM. Used as the Ray actor (``__call__``) and directly in tests/benchmarks."""

    def __init__(self, model: str, max_length: int = 512, stride: int | None = None, token_budget: int = 4096,
                 pad_multiple: int = 8, head_chunk: int = 2048, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None, trust_remote_code: bool = False, half_seed: int | None = None,
                 chunked_head: bool | None = None) -> None:
        import torch

        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the fast tokenizer's pool, too
        self.device = resolve_device(device)
        self.dtype = compute_dtype(self.device) if dtype == "auto" else getattr(torch, dtype)
        loaded, self.tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code, dtype=self.dtype)
        self.model = loaded.to(self.device).eval()
        self.max_length = min(max_length, context_size(self.model.config) or max_length)
        self.stride = min(stride, self.max_length - 1) if stride else None
        self.token_budget = max(token_budget, self.max_length)
        self.pad_multiple = pad_multiple
        self.head_chunk = -(-head_chunk // _HEAD_ROWS) * _HEAD_ROWS
        self.half_seed = half_seed
        self.fixed_shapes = self.device.startswith("cuda")
        bos = self.tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None else ([self.tokenizer.eos_token_id]
                                                     if self.tokenizer.eos_token_id is not None else [])
        self.body = getattr(self.model, "base_model", None)
        self.head = self.model.get_output_embeddings()
        self.chunked = self._chunked_head_matches() if chunked_head is None else chunked_head
        self.torch = torch

    # ---- the model

    def _chunked_head_matches(self) -> bool:
        """True when body + output embeddings reproduce the model's own logits (a plain linear head)."""
        import torch

        if self.body is None or self.body is self.model or not isinstance(self.head, torch.nn.Linear):
            return False
        vocab = self.head.weight.shape[0]
        ids = torch.arange(3, 3 + 12, device=self.device)[None] % vocab
        with torch.inference_mode():
            full = self.model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            mine = torch.nn.functional.linear(hidden, self.head.weight, self.head.bias).float()
        tolerance = 1e-4 if self.dtype == torch.float32 else 5e-2
        return bool(torch.allclose(full, mine, atol=tolerance, rtol=tolerance))

    def _losses(self, ids, select, targets):
        """Token NLL (float32, on CPU) at the selected positions of a right-padded batch."""
        import torch
        import torch.nn.functional as F

        if self.chunked:
            hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state[select]
            n = hidden.shape[0]
            # CPU GEMM rounds a row differently when the matrix has fewer than ~12 rows (other
            # kernels), so the row count is padded to a multiple of 16: a row's loss must not
            # depend on how many positions share its chunk.
            padded = -(-n // _HEAD_ROWS) * _HEAD_ROWS
            if padded != n:
                hidden = torch.cat([hidden, hidden.new_zeros((padded - n, hidden.shape[1]))])
                targets = torch.cat([targets, targets.new_zeros(padded - n)])
            weight, bias = self.head.weight, self.head.bias
            parts = [F.cross_entropy(F.linear(hidden[i:i + self.head_chunk], weight, bias).float(),
                                     targets[i:i + self.head_chunk], reduction="none")
                     for i in range(0, padded, self.head_chunk)]
        else:
            logits = self.model(input_ids=ids, use_cache=False).logits[select]
            n = logits.shape[0]
            parts = [F.cross_entropy(logits[i:i + self.head_chunk].float(), targets[i:i + self.head_chunk],
                                     reduction="none") for i in range(0, n, self.head_chunk)]
        return torch.cat(parts)[:n].cpu().numpy() if parts else np.zeros(0, np.float32)

    # ---- scoring

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text with the BOS prefix (no other special tokens)."""
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [self.prefix + list(ids) for ids in encoded]

    def score_ids(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(nll, n_tokens, null reason) per sequence; nll is NaN where nothing could be scored."""
        torch = self.torch
        n_docs = len(sequences)
        windows: list[tuple[int, int, int, int]] = []  # (padded length, doc, window index, ...) sort key
        spans: list[tuple[int, int, int]] = []
        for doc, seq in enumerate(sequences):
            for k, (start, first, end) in enumerate(plan_windows(len(seq), self.max_length, self.stride)):
                windows.append((padded_length(end - start, self.pad_multiple, self.max_length), doc, k, len(spans)))
                spans.append((start, first, end))
        windows.sort()
        losses: list[np.ndarray | None] = [None] * len(spans)
        i = 0
        with torch.inference_mode():
            while i < len(windows):
                width = windows[i][0]
                rows = max(1, self.token_budget // width)
                group = [w for w in windows[i:i + rows] if w[0] == width]
                i += len(group)
                self._forward(group, width, rows, sequences, spans, losses)
        nll = np.full(n_docs, np.nan)
        counts = np.zeros(n_docs, np.int64)
        per_doc: list[list[np.ndarray]] = [[] for _ in range(n_docs)]
        for _, doc, _, span in sorted(windows, key=lambda w: (w[1], w[2])):
            per_doc[doc].append(losses[span])
        reasons: list[str | None] = [None] * n_docs
        for doc, parts in enumerate(per_doc):
            if not parts:
                reasons[doc] = "empty_text" if len(sequences[doc]) <= len(self.prefix) else "too_short"
                continue
            flat = np.concatenate(parts).astype(np.float64)
            counts[doc] = flat.size
            nll[doc] = float(np.sum(flat)) / flat.size
        return nll, counts, reasons

    def _forward(self, group, width, rows, sequences, spans, losses) -> None:
        torch = self.torch
        batch_rows = rows if self.fixed_shapes else len(group)
        ids = torch.zeros((batch_rows, width), dtype=torch.long)
        select = torch.zeros((batch_rows, width), dtype=torch.bool)
        targets = torch.zeros((batch_rows, width), dtype=torch.long)
        sizes = []
        for r, (_, doc, _, span) in enumerate(group):
            start, first, end = spans[span]
            window = torch.as_tensor(sequences[doc][start:end], dtype=torch.long)
            ids[r, : end - start] = window
            # position p predicts token p + 1: the scored targets are [first, end) in sequence coordinates
            select[r, first - start - 1 : end - start - 1] = True
            targets[r, : end - start - 1] = window[1:]
            sizes.append(end - first)
        flat = self._losses(ids.to(self.device), select.to(self.device), targets.to(self.device)[select.to(self.device)])
        offset = 0
        for (_, _, _, span), size in zip(group, sizes):
            losses[span] = flat[offset : offset + size]
            offset += size

    def score_texts(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        return self.score_ids(self.tokenize([t or "" for t in texts]))

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.threads:
            # Ray Data calls an actor from a worker thread, and OpenMP's thread count is per calling
            # thread (Ray starts workers with OMP_NUM_THREADS=1): set it where the work runs.
            self.torch.set_num_threads(self.threads)
        texts = table["text"].to_pylist()
        n = len(texts)
        nll = np.full(n, np.nan)
        counts = np.zeros(n, np.int64)
        reasons: list[str | None] = [None] * n
        todo = list(range(n))
        if self.half_seed is not None:  # held_out: the training half is not scored
            train_half = in_training_half(table["id"].to_pylist(), self.half_seed)
            todo = [i for i in range(n) if not train_half[i]]
            for i in np.flatnonzero(train_half):
                reasons[i] = "reference_train_half"
        if todo:
            sub_nll, sub_counts, sub_reasons = self.score_texts([texts[i] for i in todo])
            for j, i in enumerate(todo):
                nll[i], counts[i], reasons[i] = sub_nll[j], sub_counts[j], sub_reasons[j]
        scored = ~np.isnan(nll)
        with np.errstate(over="ignore"):
            ppl = np.exp(nll)
        keep = [c for c in table.column_names if c not in (*SCORE_COLUMNS, NULL_REASON)]
        out = table.select(keep)
        out = out.append_column("ppl", pa.array(ppl, pa.float64(), mask=~scored))
        out = out.append_column("nll", pa.array(nll, pa.float64(), mask=~scored))
        out = out.append_column("n_tokens", pa.array(counts, pa.int64()))
        return out.append_column(NULL_REASON, pa.array(reasons, pa.string()))
