"""Input paths: what a file, folder or glob names, for every reader and trusted-text source.

A path may also be an object-storage URI (``s3://bucket/prefix``, see ``pipeline.core.storage``):
an object, every object under a prefix, or a glob over object names."""

from __future__ import annotations

import glob
from pathlib import Path

from pipeline.core import storage

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")


def expand_input_paths(path: str, fmt: str) -> list[str]:
    """The files a ``path`` names: a file, every matching file in a folder, or a glob. Sorted."""
    suffixes = {
        "jsonl": JSONL_SUFFIXES,
        "parquet": (".parquet",),
        "text": None,
    }[fmt]
    if storage.is_uri(path):
        return _expand_uri(path, suffixes)
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        candidates = [str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
    else:
        candidates = [f for f in glob.glob(path, recursive=True) if Path(f).is_file()]
    if suffixes is not None and p.is_dir():
        candidates = [f for f in candidates if f.endswith(suffixes)]
    return sorted(candidates)


def _expand_uri(uri: str, suffixes: tuple[str, ...] | None) -> list[str]:
    if any(ch in uri for ch in "*?["):
        return [f.uri for f in storage.glob_files(uri)]
    if storage.is_file(uri):
        return [uri]
    files = [f.uri for f in storage.list_files(uri) if not _hidden(f.uri[len(uri.rstrip("/")):])]
    return [f for f in files if suffixes is None or f.endswith(suffixes)]


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def ignored_input_files(path: str, fmt: str) -> list[str]:
    """Files in a folder ``path`` that ``expand_input_paths`` skips because their names do not end in
    the format's suffixes (a folder of mixed formats). Hidden files are skipped silently."""
    if storage.is_uri(path):
        if fmt == "text" or any(ch in path for ch in "*?[") or not storage.is_dir(path):
            return []
        read = set(expand_input_paths(path, fmt))
        return [f.uri for f in storage.list_files(path)
                if f.uri not in read and not _hidden(f.uri[len(path.rstrip("/")):])]
    p = Path(path)
    if fmt == "text" or not p.is_dir():
        return []
    read = set(expand_input_paths(path, fmt))
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and str(f) not in read)
