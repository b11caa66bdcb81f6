"""The reference LM: a BPE tokenizer and a small causal LM trained on a bounded reference sample.

Perplexity under a small model trained on (part of) the corpus is Ankner et al.'s scoring
model (ICLR 2025); CCNet trains on a trusted set instead. The perplexity stage picks the sample
(``sample_input``, ``sample_reference_data``); this module trains and saves. Training is
deterministic: a fixed number of steps, seeded, on CPU, deterministic algorithms and a fixed
thread count; the perplexity stage runs it as a Ray task, so the driver holds only the sample.
Tokenizer and model are saved in Hugging Face layout (safetensors) with a ``reference.json``
(spec, sample, loss curve) written last, which marks a complete artifact that a rerun with the
same spec reuses. The choices are in docs/methods.md §1.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core.hashing import bottom_k, sha256_json, uniform
from pipeline.core.sampling import hashed_sample
from pipeline.models.lm import build_causal_lm, check_model_config, train_bpe_tokenizer
from pipeline.models.pool import largest_node_cpus

DONE = "reference.json"


class ReferenceLMSpec(BaseModel):
    """How to train the reference LM (the ``reference:`` section of the perplexity stage)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    max_docs: int = Field(20_000, ge=1, description="Most documents in the training sample (drawn by id hash).")
    max_chars: int = Field(4_000, ge=16, description="Each sampled document is cut to this many characters.")
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary size (including 256 byte symbols).")
    min_frequency: int = Field(2, ge=1)
    model: dict[str, Any] = Field(
        default_factory=lambda: {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4},
        description="A transformers config; n_positions / max_position_embeddings is set to the trained length "
        "(min(seq_len, the stage's max_length)), so the model never scores a position it did not train.",
    )
    seq_len: int = Field(128, ge=8, description="Training chunk length in tokens; also the longest window the "
                         "reference LM scores (raise it for more context per window, at more training cost).")
    batch_size: int = Field(16, ge=1)
    steps: int = Field(300, ge=1, description="Optimizer steps (fixed, so training is reproducible).")
    lr: float = Field(3e-3, gt=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="Fraction of the steps with a linear warmup.")
    weight_decay: float = Field(0.1, ge=0)
    threads: int = Field(2, ge=1, description="Torch threads while training; fixed so the weights are reproducible.")

    @field_validator("model")
    @classmethod
    def _known_config_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_model_config(value)


def existing_reference(folder: Path, key: str) -> dict[str, Any] | None:
    """The record of a complete reference LM in ``folder`` trained with ``key``, or None."""
    marker = folder / DONE
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    return record if record.get("key") == key else None


def _position_key(model_type: str) -> str:
    from transformers import AutoConfig

    probe = AutoConfig.for_model(model_type)
    return "n_positions" if hasattr(probe, "n_positions") else "max_position_embeddings"


def _lr_at(step: int, spec: ReferenceLMSpec) -> float:
    warmup = max(1, int(spec.warmup * spec.steps))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_reference_lm(texts: list[str], folder: Path, spec: ReferenceLMSpec, max_length: int, seed: int,
                       key: str, sample_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train tokenizer + LM on ``texts`` (already in a canonical order) and save them in ``folder``.

    Returns the record written to ``folder/reference.json``. Deterministic for the same inputs.
    """
    import numpy as np
    import torch

    started = time.time()
    texts = [t[: spec.max_chars] for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("the reference sample has no text to train on")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency)
    # The model's context is the length it trains on: GPT-2's position embeddings past the training
    # length would get no gradient, yet score every longer document. The scorer then clamps its
    # windows to this context (``context_size``).
    spec = spec.model_copy(update={"seq_len": min(spec.seq_len, max_length)})
    model_config = {**spec.model, _position_key(str(spec.model.get("model_type", "gpt2"))): spec.seq_len}
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model = build_causal_lm(model_config, tokenizer, seed=seed)
        ids = _pack(tokenizer, texts)
        curve = _train(model, ids, spec, seed)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "key": key,
        "spec": spec.model_dump(mode="json"),
        "model_config": model_config,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "sample": {"docs": len(texts), "chars": int(sum(len(t) for t in texts)), "tokens": int(len(ids)),
                   **(sample_info or {})},
        "train": {"tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
                  "epochs": round(spec.steps * spec.batch_size * spec.seq_len / max(1, len(ids)), 3),
                  "loss_first": curve[0], "loss_last": float(np.mean(curve[-20:])),
                  "curve": curve[:: max(1, len(curve) // 40)]},
        "seconds": round(time.time() - started, 2),
    }
    (tmp / DONE).write_text(json.dumps(record, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return record


def _pack(tokenizer, texts: list[str], chunk: int = 512):
    """All sample texts as one token stream, each document followed by EOS.

    Encoded ``chunk`` documents at a time straight into int32 arrays: as one list of Python ints,
    a token costs about 36 bytes (an int object and a pointer) instead of 4."""
    import numpy as np

    eos = tokenizer.eos_token_id
    parts = []
    for start in range(0, len(texts), chunk):
        for doc in tokenizer(texts[start:start + chunk], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray([*doc, eos], dtype=np.int32))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _train(model, stream, spec: ReferenceLMSpec, seed: int) -> list[float]:
    """Plain AdamW on random seq_len windows of the packed stream; returns the loss per step."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    n = len(stream) - spec.seq_len - 1
    if n < 1:  # a tiny sample: repeat it until one chunk fits
        reps = (spec.seq_len + 2) // max(1, len(stream)) + 1
        stream = np.tile(stream, reps)
        n = len(stream) - spec.seq_len - 1
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "ln" in name or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )
    data = torch.from_numpy(stream)
    offsets = torch.arange(spec.seq_len + 1)
    model.train()
    curve: list[float] = []
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        starts = torch.from_numpy(rng.integers(0, n, size=spec.batch_size))
        chunk = data[starts[:, None] + offsets]
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append(round(float(loss.detach()), 4))
    model.eval()
    return curve


# --------------------------------------------------------------------------- the reference sample

HALF_SALT = "perplexity.reference_half"  # held_out split: rows with uniform(id) < 0.5 train, the rest are scored
_SAMPLE_SALT = "perplexity.reference_sample"


def sample_input(ds, k: int, seed: int, max_chars: int, half: bool = False) -> list[tuple[str, str]]:
    """At most ``k`` (id, text) rows of ``ds`` with the smallest seeded id hash, texts cut to
    ``max_chars``, sorted by id (``pipeline.core.sampling.hashed_sample``: the driver holds about
    1.2 k rows, never the corpus). ``half`` restricts the draw to the training half of the
    held_out split."""
    eligible = (lambda table: in_training_half(table["id"].to_pylist(), seed)) if half else None
    sample = hashed_sample(ds, k, seed, _SAMPLE_SALT, ["text"], eligible=eligible, eligible_share=0.5 if half else 1.0)
    rows = zip(sample["id"].to_pylist(), sample["text"].to_pylist())
    return sorted((doc_id, (text or "")[:max_chars]) for doc_id, text in rows)


def in_training_half(ids: list[str], seed: int):
    """The rows the reference LM trains on under ``split: held_out`` (the others are scored)."""
    return uniform(ids, seed, HALF_SALT) < 0.5


def sample_reference_data(trusted, k: int, seed: int, max_chars: int) -> tuple[list[tuple[str, str]], int]:
    """A bounded sample of trusted text (a ``pipeline.io.trusted.TrustedText``): the ``k`` documents with
    the smallest seeded content hash (streaming, independent of file order), as (id, text) sorted
    by id, and how many were read."""
    sample, read = bottom_k(trusted.texts(), k, seed, _SAMPLE_SALT, max_chars)
    return sorted(sample), read


def prepare_reference_lm(ds, params, ctx) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the reference LM for a perplexity stage; returns (folder, record).

    ``params`` is the stage's PerplexityParams; ``ctx`` its StageContext. The folder is
    ``ctx.artifact_dir/reference_lm``, which is keyed like the stage output.
    """
    spec: ReferenceLMSpec = params.reference
    folder = Path(ctx.artifact_dir) / "reference_lm"
    trusted = params.reference_data
    key = sha256_json({"spec": spec.model_dump(mode="json"), "max_length": params.max_length, "seed": ctx.seed,
                       "split": params.split,
                       "reference_data": trusted.model_dump(mode="json") if trusted is not None else None,
                       "files": trusted.fingerprint() if trusted is not None else []})
    record = existing_reference(folder, key)
    if record is not None:
        return folder, {**record, "reused": True}
    if trusted is not None:
        rows, read = sample_reference_data(trusted, spec.max_docs, ctx.seed, spec.max_chars)
        source = {"source": "reference_data", "trusted": trusted.model_dump(mode="json", exclude_none=True),
                  "read": read}
    else:
        rows = sample_input(ds, spec.max_docs, ctx.seed, spec.max_chars, half=params.split == "held_out")
        source = {"source": "input", "split": params.split}
    if not rows:
        raise ValueError("the reference sample is empty: no document with text to train the reference LM on")
    source["ids_sha256"] = sha256_json([doc_id for doc_id, _ in rows])
    # Trained in a Ray task, not in the driver: the tokenizer's training and the token stream grow
    # with the sample (up to max_docs documents), and on a cluster the CPUs are on the workers. The
    # weights are the same wherever it runs (fixed threads, seeded; see train_reference_lm).
    cpus = max(1, min(spec.threads, largest_node_cpus()))  # a task runs on one node
    train = ray.remote(train_reference_lm).options(num_cpus=cpus, max_retries=1)
    record = ray.get(train.remote([text for _, text in rows], folder, spec, params.max_length, ctx.seed, key, source))
    return folder, {**record, "reused": False}
