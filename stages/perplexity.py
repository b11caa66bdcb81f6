"""Perplexity under a causal LM: ``ppl``, ``nll`` (mean token NLL) and ``n_tokens`` per document.

Method: perplexity scoring with a reference LM (Ankner et al., ICLR 2025, "Perplexed by
Perplexity"; POINTS 2024; METHODS.md §1). ``model: reference`` trains a small BPE tokenizer +
GPT-2 style LM on a bounded, hashed reference sample (``pipeline.reference_lm``); any other value
is a hub name or a local folder in Hugging Face layout, loaded with ``AutoModelForCausalLM``.

How a document is scored
  ``nll`` = mean negative log-likelihood of every token of the text, each predicted from the
  tokens before it, with the tokenizer's BOS (or EOS) prepended so that the first token is
  scored too; ``ppl`` = exp(nll); ``n_tokens`` = tokens scored. Documents longer than
  ``max_length`` are scored over windows: the first holds ``max_length`` tokens, each next one
  scores ``stride`` new tokens (default ``max_length - 1``: no overlap) with the tokens before
  them as context (the last window is filled back to ``max_length`` tokens of context).
  A document with nothing to score (an empty text) gets null scores and a counted reason in
  the manifest (``info.null_reasons``); it never fails the batch.

Which rows are scored (model: reference)
  ``split: sample`` (default) trains on the ``reference.max_docs`` rows with the smallest seeded
  id hash and scores every row, because a curriculum needs a score for each document; those
  sampled rows are in-sample. ``split: held_out`` is Ankner et al.'s strict split: train on one
  hashed half, score only the other; the training half gets null scores (reason
  ``reference_train_half``). ``reference_data`` trains on trusted text instead (CCNet-style;
  ``pipeline.trusted.TrustedText``, shared with the quality classifier's ``positives``).

Speed (benchmarks/bench_perplexity.py)
  A Ray actor pool (``map_batches`` with a callable class): ``concurrency`` actors, each with
  ``threads`` torch threads (CPU; default one actor per core with one thread, which beat one
  actor with every thread here) or ``num_gpus`` (CUDA, bf16). Inside each call of
  ``docs_per_call`` rows, windows are sorted by length and packed into forward batches of at
  most ``token_budget`` padded tokens (NeMo Curator's sort-by-length), and results go back in
  input order. The forward runs the model body only; the LM head and the loss are computed on
  the scored positions alone, ``head_chunk`` rows at a time, so padding never reaches the head
  and full-vocabulary logits are never materialised for the whole batch. A model whose head is
  not a plain linear layer (logit soft-capping, scaling) is detected at load time and scored
  through its ordinary forward instead. Everything runs under ``torch.inference_mode`` with no
  KV cache. The stage's input is materialized before the actors start: an actor pool holding
  every CPU would otherwise starve the upstream read tasks (Ray Data then waits forever; seen
  on 2 cores), and the reference sample reads it too.

Determinism (shard bytes must not depend on Ray's block layout)
  A document's score must not depend on which documents share its forward batch. On CPU the
  float result of a row depends on the padded sequence length (kernels vectorise and block by
  length), but not on the batch size or on the number of torch threads (checked bitwise in
  tests/test_perplexity.py). So every window is padded to a length that depends on its own
  length only: the next multiple of ``pad_multiple`` (8), and batches only hold windows of the
  same padded length; the LM head's row count is padded to a multiple of 16, because a CPU GEMM
  rounds a row differently in a matrix of fewer than ~12 rows. Padding is on the right, and
  attention is causal, so real tokens never see padding. Token losses are summed per document in float64 in window order. On CUDA the
  batch shape is also fixed (every batch of a padded length has ``token_budget // length`` rows,
  filled with dummy rows), because GPU kernels may be chosen by batch size; this is not verified
  on a GPU here.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from pydantic import Field, field_validator, model_validator

from pipeline.reference_lm import ReferenceLMSpec, in_training_half
from pipeline.trusted import TrustedText
from stages.base import Resources, Stage, StageContext, StageParams, actor_placement

COLUMNS = ("ppl", "nll", "n_tokens")
_REASON = "_ppl_null_reason"
_HEAD_ROWS = 16


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
                                      "together; default 512 on CPU (the actors finish together), 4096 on CUDA.")
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


# --------------------------------------------------------------------------- windows and batches


def plan_windows(n: int, max_length: int, stride: int | None) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n`` tokens (BOS included) as (start, first_target, end).

    Targets are positions 1..n-1, each scored exactly once, by the window whose
    [first_target, end) holds it, with the tokens from ``start`` as context.
    """
    step = stride or (max_length - 1)
    windows: list[tuple[int, int, int]] = []
    target = 1
    while target < n:
        end = min(n, target + (max_length - 1 if not windows else step))
        windows.append((max(0, end - max_length), target, end))
        target = end
    return windows


def padded_length(length: int, multiple: int, cap: int) -> int:
    """The padded length of a window: a function of its own length only (see the determinism note)."""
    return min(cap, -(-length // multiple) * multiple)


class PerplexityScorer:
    """Scores texts with a causal LM. Used as the Ray actor (``__call__``) and directly in tests/benchmarks."""

    def __init__(self, model: str, max_length: int = 512, stride: int | None = None, token_budget: int = 4096,
                 pad_multiple: int = 8, head_chunk: int = 2048, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None, trust_remote_code: bool = False, half_seed: int | None = None,
                 chunked_head: bool | None = None) -> None:
        import torch

        from pipeline.lm import compute_dtype, load_causal_lm, resolve_device

        if threads:
            torch.set_num_threads(threads)
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the fast tokenizer's pool, too
        self.device = resolve_device(device)
        self.dtype = compute_dtype(self.device) if dtype == "auto" else getattr(torch, dtype)
        loaded, self.tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code, dtype=self.dtype)
        self.model = loaded.to(self.device).eval()
        self.max_length = min(max_length, _context_size(self.model.config) or max_length)
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
        keep = [c for c in table.column_names if c not in (*COLUMNS, _REASON)]
        out = table.select(keep)
        out = out.append_column("ppl", pa.array(ppl, pa.float64(), mask=~scored))
        out = out.append_column("nll", pa.array(nll, pa.float64(), mask=~scored))
        out = out.append_column("n_tokens", pa.array(counts, pa.int64()))
        return out.append_column(_REASON, pa.array(reasons, pa.string()))


def _context_size(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- the stage


class PerplexityStage(Stage):
    name: ClassVar[str] = "perplexity"
    Params = PerplexityParams
    columns: ClassVar[tuple[str, ...]] = COLUMNS

    def cache_inputs(self) -> object:
        """The trusted files' (path, size, mtime): editing reference_data retrains and rescores."""
        p = self.params
        if p.model != "reference" or p.reference_data is None:
            return None
        return p.reference_data.fingerprint()

    def placement(self, ctx: StageContext) -> tuple[str, int, float, int]:
        """(device, concurrency, gpus per actor, threads per actor) for this cluster."""
        p = self.params
        return actor_placement(ctx, p.device, p.num_gpus, p.concurrency, p.threads)

    def resources(self) -> Resources:
        """One actor's request; with device auto, the GPU share is decided in apply() from the cluster."""
        p = self.params
        gpus = p.num_gpus if p.num_gpus is not None else (1.0 if p.device.startswith("cuda") else 0.0)
        return Resources(num_cpus=float(p.threads or 1), num_gpus=gpus)

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        t0 = time.time()
        max_length = p.max_length
        if p.model != "reference":
            from pipeline.lm import load_lm_config

            # Fails here, naming the model, before any work or actor starts (ModelLoadError).
            config = load_lm_config(p.model, trust_remote_code=p.trust_remote_code)
            max_length = min(max_length, _context_size(config) or max_length)  # as the scorer clamps it
        stride = min(p.stride, max_length - 1) if p.stride else max_length - 1
        info: dict[str, Any] = {"model": p.model, "max_length": max_length, "stride": stride}
        # Materialized once: the reference sample and the scoring read it from the object store,
        # and an actor pool that holds every CPU would otherwise starve the upstream read tasks
        # (Ray Data then waits forever; seen on 2 cores).
        ds = ds.materialize()
        timings = {"input": time.time() - t0}
        if p.model == "reference":
            from pipeline.reference_lm import prepare_reference_lm

            folder, record = prepare_reference_lm(ds, p, ctx)
            model = str(folder)
            ctx.artifacts["reference_lm"] = os.path.relpath(folder, ctx.run_dir)
            info["reference_lm"] = {k: record[k] for k in ("parameters", "sample", "seconds", "reused")
                                    if k in record}
            info["reference_lm"]["train_loss_last"] = record["train"]["loss_last"]
        else:
            model = p.model
        device, concurrency, gpus, threads = self.placement(ctx)
        info.update(device=device, concurrency=concurrency, threads_per_actor=threads, num_gpus_per_actor=gpus,
                    split=p.split if p.model == "reference" and p.reference_data is None else None)
        half_seed = ctx.seed if (p.model == "reference" and p.reference_data is None and p.split == "held_out") else None
        timings["reference_lm"] = time.time() - t0 - timings["input"]
        cuda = device.startswith("cuda")
        budget = max(p.max_length, p.token_budget or (32768 if cuda else 4096))
        per_call = p.docs_per_call or (4096 if cuda else 512)
        info.update(token_budget=budget, docs_per_call=per_call)
        # Ray hands each actor whole blocks; a small input read from a few files is one or two
        # blocks, which would keep every actor but one idle. Split it so each actor gets several.
        wanted = max(2 * concurrency, min(-(-ds.count() // per_call), 16 * concurrency))
        if ds.num_blocks() < wanted:  # materialized here too: its split tasks need a free CPU
            ds = ds.repartition(wanted).materialize()
        t1 = time.time()
        scored = ds.map_batches(
            PerplexityScorer,
            fn_constructor_kwargs={
                "model": model, "max_length": p.max_length, "stride": p.stride, "token_budget": budget,
                "pad_multiple": p.pad_multiple, "head_chunk": p.head_chunk, "device": device, "dtype": p.dtype,
                "threads": threads, "trust_remote_code": p.trust_remote_code, "half_seed": half_seed,
            },
            batch_format="pyarrow",
            batch_size=per_call,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=threads,
            num_gpus=gpus or None,
        ).materialize()
        timings["scoring"] = time.time() - t1
        # One pass for the statistics; only a few rows per block come back to the driver.
        counts: dict[str, int] = {}
        tokens = 0
        for row in scored.select_columns([_REASON, "n_tokens"]).map_batches(_summarize, batch_format="pyarrow").take_all():
            if row["reason"] == "":
                tokens += int(row["tokens"])
            else:
                counts[row["reason"]] = counts.get(row["reason"], 0) + int(row["rows"])
        info["null_scores"] = sum(counts.values())
        info["null_reasons"] = dict(sorted(counts.items()))
        info["tokens_scored"] = tokens
        timings["statistics"] = time.time() - t1 - timings["scoring"]
        info["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        info["tokens_per_second"] = round(tokens / max(1e-9, timings["scoring"]), 1)  # actor start-up included
        ctx.info.update(info)
        return scored.drop_columns([_REASON])


def _summarize(table: pa.Table) -> pa.Table:
    """Per batch: the tokens scored (reason "") and the row count of each null reason."""
    reasons = pc.fill_null(table[_REASON], "")
    grouped = pa.table({"reason": reasons, "n_tokens": table["n_tokens"]}).group_by("reason").aggregate(
        [("n_tokens", "sum"), ("n_tokens", "count")])
    return pa.table({"reason": grouped["reason"], "tokens": grouped["n_tokens_sum"], "rows": grouped["n_tokens_count"]})

