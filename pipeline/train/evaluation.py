"""Held-out evaluation: named text sets -> fixed token sequences -> mean token NLL.

A set is read once, in file order (jsonl/jsonl.gz, parquet, a text file as one document, a
run folder's shards in position order, or a slice of the synthetic graded corpus), tokenized
like the training stream (documents separated by EOS), and cut into ``seq_len`` sequences up to
``max_tokens`` tokens. The loss is the token-weighted mean next-token NLL over all those
sequences, so it does not depend on the eval batch size.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, CurriculumError
from pipeline.core.paths import JSONL_SUFFIXES
from pipeline.io.runfolder import shard_files
from pipeline.io.synth import graded_document
from pipeline.train.config import EvalSet
from pipeline.train.loader import Encoder


def eval_set_spec(value: Any):
    """A ``train.eval.sets`` value (a path string or an ``EvalSet``) as an ``EvalSet``."""
    return EvalSet(path=value) if isinstance(value, str) else value


def check_eval_sets(sets: dict[str, Any]) -> None:
    """Every path-based set exists; raises ConfigError naming the set otherwise."""
    for name, value in sets.items():
        spec = eval_set_spec(value)
        if spec.path is not None and not Path(spec.path).exists():
            raise ConfigError(f"train.eval.sets.{name}: {spec.path!r} does not exist (resolved from {Path.cwd()})")


def _iter_texts(spec: Any) -> Iterator[str]:
    if spec.synthetic is not None:
        s = spec.synthetic
        index = 0
        kept = 0
        while kept < s.docs and index < 1000 * s.docs:
            doc = graded_document(index, s.seed)
            index += 1
            if s.min_quality <= doc["true_quality"] <= s.max_quality:
                kept += 1
                yield doc["text"]
        return
    path = Path(spec.path)
    field = spec.text_field
    if path.is_dir():
        files = shard_files(path)
        yield from _parquet_texts(files, field)
    elif path.suffix == ".parquet":
        yield from _parquet_texts([path], field)
    elif path.name.endswith(JSONL_SUFFIXES):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise CurriculumError(f"eval set {path}:{number}: not valid JSON") from None
                text = record.get(field) if isinstance(record, dict) else None
                if isinstance(text, str):
                    yield text
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _parquet_texts(files: list[Path], field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise ConfigError(f"eval set {f}: no {field!r} column (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(batch_size=512, columns=[field]):
            yield from (t for t in batch.column(0).to_pylist() if t)


def eval_sequences(spec: Any, tokenizer: Any, seq_len: int, max_tokens: int):
    """The set as a LongTensor ``[n, seq_len]`` (the last sequence may be padded) and its mask."""
    import numpy as np
    import torch

    spec = eval_set_spec(spec)
    encoder = Encoder(tokenizer)
    limit = max(seq_len, (max_tokens // seq_len) * seq_len)
    tokens: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in encoder.encode(batch):
            tokens.extend(ids)
            tokens.append(encoder.eos)
        batch.clear()

    for text in _iter_texts(spec):
        batch.append(text)
        if len(batch) >= 64:
            flush()
            if len(tokens) >= limit:
                break
    if batch and len(tokens) < limit:
        flush()
    tokens = tokens[:limit]
    if len(tokens) < 2:
        raise CurriculumError(f"eval set {spec.path or 'synthetic'}: no text to evaluate on")
    rows = -(-len(tokens) // seq_len)
    ids = np.full(rows * seq_len, encoder.pad, dtype=np.int64)
    mask = np.zeros(rows * seq_len, dtype=np.int64)
    ids[: len(tokens)] = tokens
    mask[: len(tokens)] = 1
    return torch.from_numpy(ids.reshape(rows, seq_len)), torch.from_numpy(mask.reshape(rows, seq_len))


def load_eval_sets(sets: dict[str, Any], tokenizer: Any, seq_len: int, max_tokens: int) -> dict[str, Any]:
    return {name: eval_sequences(spec, tokenizer, seq_len, max_tokens) for name, spec in sets.items()}


def evaluate(model: Any, data: dict[str, Any], batch_size: int = 8, device: str = "cpu",
             autocast_dtype: Any = None) -> dict[str, float]:
    """``{name: mean token NLL}`` of ``model`` on each prepared set (see :func:`eval_sequences`)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            for name, (ids, mask) in data.items():
                total = torch.zeros((), dtype=torch.float64)
                count = 0
                for start in range(0, len(ids), batch_size):
                    x = ids[start : start + batch_size].to(device)
                    m = mask[start : start + batch_size].to(device)
                    with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        logits = model(input_ids=x, attention_mask=m).logits
                    targets = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
                    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          ignore_index=-100, reduction="sum")
                    total += nll.double().cpu()
                    count += int((targets != -100).sum())
                out[name] = float(total / max(count, 1))
    finally:
        model.train(was_training)
    return out
