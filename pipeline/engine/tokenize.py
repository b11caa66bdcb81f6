"""``curriculum tokenize RUN_DIR``: the ordered text shards -> token shards (``pipeline.io.token_shards``).

One Ray task per shard reads its texts, tokenizes them with the fast tokenizer (no special
tokens, no truncation) and writes the flat arrays; it returns only the shard's manifest entry, so
the driver never holds a token. Each document is followed by the tokenizer's EOS (its SEP when it
has no EOS, as a WordPiece vocabulary does). The default tokenizer is the run's reference LM's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from pipeline.core.errors import ConfigError, CurriculumError, ModelLoadError
from pipeline.core.ray_session import connect_ray
from pipeline.core.settings import RayConfig
from pipeline.io.runfolder import read_manifest
from pipeline.io.token_shards import (
    FORMAT,
    VERSION,
    publish,
    staging_folder,
    token_dtype,
    vocab_sha256,
    write_token_shard,
)
from pipeline.models.encoder import resolve_encoder

_BATCH = 1024  # texts per tokenizer call inside a task


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_encoder(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {type(exc).__name__}: {exc}") from None


def separator(tokenizer: Any) -> dict[str, Any]:
    """The token put after every document: EOS, or SEP for a vocabulary without EOS."""
    for kind in ("eos", "sep"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            return {"kind": kind, "token": getattr(tokenizer, f"{kind}_token"), "id": int(token_id)}
    raise ConfigError("the tokenizer has neither an EOS nor a SEP token to separate documents with")


def encoder(tokenizer: Any):
    """A batch encoder of ``texts`` -> ids: every token, no special tokens, no truncation or padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    return _fast_encoder(Tokenizer.from_str(backend.to_str()))


def _fast_encoder(backend: Any):
    backend.no_truncation()
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def default_tokenizer(run_dir: Path, manifest: dict[str, Any]) -> str:
    reference = (manifest.get("artifacts") or {}).get("reference_lm")
    if not reference:
        raise ConfigError(f"{run_dir}: the run has no reference LM (artifacts.reference_lm); pass --tokenizer PATH "
                          "(a Hugging Face tokenizer folder or hub name)")
    return str(run_dir / reference)


@ray.remote(num_cpus=1)
def _tokenize_shard(run_dir: str, source: str, staging: str, sep: int, dtype: str, text_column: str) -> dict[str, Any]:
    folder = Path(staging) / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        # The Rust tokenizer alone: a worker that never imports transformers starts in a fraction of the time.
        from tokenizers import Tokenizer

        encode = _fast_encoder(Tokenizer.from_file(str(folder / "tokenizer.json")))
    else:
        encode = encoder(load_tokenizer(str(folder)))
    table = pq.read_table(Path(run_dir) / source, columns=[text_column, "position"])
    texts = [t if t is not None else "" for t in table.column(text_column).to_pylist()]
    ids: list[list[int]] = []
    for i in range(0, len(texts), _BATCH):
        ids.extend(encode(texts[i:i + _BATCH]))
    name = Path(source).name.removesuffix(".parquet")
    return write_token_shard(staging, name, ids, table.column("position").to_numpy(), sep, np.dtype(dtype))


def tokenize_run(run_dir: str | Path, tokenizer: str | None = None, text_column: str = "text",
                 address: str | None = None) -> dict[str, Any]:
    """Write ``RUN_DIR/tokens`` from ``RUN_DIR/shards``; return its manifest."""
    start = time.time()
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no manifest.json)")
    manifest = read_manifest(run_dir)
    shards = manifest.get("shards") or []
    if not shards:
        raise ConfigError(f"{run_dir}: the manifest lists no shards")
    source = tokenizer or default_tokenizer(run_dir, manifest)
    tok = load_tokenizer(source)
    sep = separator(tok)
    dtype = token_dtype(len(tok))
    staging = staging_folder(run_dir)
    try:
        tok.save_pretrained(staging / "tokenizer")
        connect_ray(RayConfig(), address)
        futures = [_tokenize_shard.remote(str(run_dir), s["path"], str(staging), sep["id"], dtype.name, text_column)
                   for s in shards]
        entries = ray.get(futures)
        expected = 0
        for shard, entry in zip(shards, entries):
            if entry["rows"] != shard["rows"] or (entry["rows"] and entry["first_position"] != expected):
                raise CurriculumError(f"{shard['path']}: {entry['rows']} documents from position "
                                      f"{entry['first_position']}, where the manifest says {shard['rows']} from {expected}")
            expected += entry["rows"]
            entry.update(source=shard["path"], source_sha256=shard["sha256"])
        record = {
            "format": FORMAT, "version": VERSION, "run_id": manifest.get("run_id"),
            "tokenizer": {"source": tokenizer or "reference LM", "path": source, "vocab_size": len(tok),
                          "vocab_sha256": vocab_sha256(tok.get_vocab()), "class": type(tok).__name__},
            "dtype": dtype.name, "separator": sep, "add_special_tokens": False, "text_column": text_column,
            "documents": expected, "tokens": sum(e["tokens"] for e in entries),
            "shards": entries, "seconds": round(time.time() - start, 3),
        }
        publish(run_dir, staging, record)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
