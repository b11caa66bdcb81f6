"""Input paths: what a file, folder or glob names, for every reader and trusted-text source."""

from __future__ import annotations

import glob
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")


def expand_input_paths(path: str, fmt: str) -> list[str]:
    """The files a ``path`` names: a file, every matching file in a folder, or a glob. Sorted."""
    suffixes = {
        "jsonl": JSONL_SUFFIXES,
        "parquet": (".parquet",),
        "text": None,
    }[fmt]
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


def ignored_input_files(path: str, fmt: str) -> list[str]:
    """Files in a folder ``path`` that ``expand_input_paths`` skips because their names do not end in
    the format's suffixes (a folder of mixed formats). Hidden files are skipped silently."""
    p = Path(path)
    if fmt == "text" or not p.is_dir():
        return []
    read = set(expand_input_paths(path, fmt))
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and str(f) not in read)
