"""``curriculum verify RUN_DIR``: recheck a run folder's files against what was recorded when they
were written: every shard (sha256 and rows) against ``manifest.json``, the quarantine's row count,
the current stage-cache entries (row files and artifacts) against their ``_SUCCESS.json``, and the
token shards against ``tokens/manifest.json``. Reads files only; needs no Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.files import read_json_or_none
from pipeline.core.hashing import sha256_file
from pipeline.engine.cache import ROW_PARTS, SUCCESS, check_files


@dataclass
class VerifyReport:
    run_dir: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _parquet_rows(path: Path) -> int | str:
    """Rows in a parquet file's footer, or why it cannot be read."""
    try:
        return pq.read_metadata(path).num_rows
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken footer
        return f"not a readable parquet file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _check_file(report: VerifyReport, path: Path, sha256: str, rows: int | None = None) -> None:
    report.checked += 1
    if not path.is_file():
        report.problems.append(f"{path}: missing")
        return
    if sha256_file(path) != sha256:
        found = _parquet_rows(path) if rows is not None else None
        detail = f"; {found}" if isinstance(found, str) else ""
        report.problems.append(f"{path}: sha256 differs from the manifest (truncated, bit-flipped or changed){detail}")
        return
    if rows is not None:
        found = _parquet_rows(path)
        if found != rows:
            report.problems.append(f"{path}: {found} rows, the manifest says {rows}")


def _check_shards(report: VerifyReport, manifest: dict[str, Any]) -> None:
    listed = set()
    for entry in manifest.get("shards", []):
        path = report.run_dir / entry["path"]
        listed.add(path.resolve())
        _check_file(report, path, entry["sha256"], entry["rows"])
    for path in sorted((report.run_dir / "shards").glob("*.parquet")):
        if path.resolve() not in listed:
            report.problems.append(f"{path}: a shard the manifest does not list")
    total = sum(e["rows"] for e in manifest.get("shards", []))
    if total != manifest.get("counts", {}).get("output_rows"):
        report.problems.append(f"{report.run_dir / 'manifest.json'}: shards hold {total} rows, "
                               f"counts.output_rows is {manifest.get('counts', {}).get('output_rows')}")


def _check_quarantine(report: VerifyReport, manifest: dict[str, Any]) -> None:
    expected = manifest.get("counts", {}).get("quarantined")
    rows = 0
    for path in sorted((report.run_dir / "quarantine").glob("*.parquet")):
        report.checked += 1
        found = _parquet_rows(path)
        if isinstance(found, str):
            report.problems.append(f"{path}: {found}")
        else:
            rows += found
    if expected is not None and rows != expected:
        report.problems.append(f"{report.run_dir / 'quarantine'}: {rows} rows, counts.quarantined is {expected}")


def _stage_folders(report: VerifyReport, manifest: dict[str, Any]) -> list[Path]:
    stages = report.run_dir / "stages"
    read_key = manifest.get("timing", {}).get("read", {}).get("key")
    if read_key:
        folders = [stages / f"00-read-{read_key[:16]}"]
    else:  # a manifest from before timing.read.key: the newest read marker is this run's
        markers = sorted(stages.glob(f"00-read-*/{SUCCESS}"), key=lambda p: p.stat().st_mtime)
        folders = [markers[-1].parent] if markers else []
    for k, stage in enumerate(manifest.get("stages", []), start=1):
        folders.append(stages / f"{k:02d}-{stage['name']}-{str(stage.get('key', ''))[:16]}")
    return folders


def _check_stage_cache(report: VerifyReport, manifest: dict[str, Any]) -> None:
    if not (report.run_dir / "stages").is_dir():
        report.notes.append("no stages/ folder (the stage cache was deleted): shards and manifest checked only")
        return
    for folder in _stage_folders(report, manifest):
        marker = read_json_or_none(folder / SUCCESS)
        if not folder.is_dir():
            report.notes.append(f"{folder}: not present (deleted from the cache)")
            continue
        if not isinstance(marker, dict):
            report.problems.append(f"{folder / SUCCESS}: missing or unreadable (the stage will be recomputed)")
            continue
        if not isinstance(marker.get("files"), dict):
            report.notes.append(f"{folder}: written before cache checksums; not checked")
            continue
        report.checked += len(marker["files"]) + len(marker.get("artifact_files") or {})
        report.problems += check_files(folder, marker["files"], ROW_PARTS)
        report.problems += check_files(folder, marker.get("artifact_files") or {}, ("artifacts",), "*")


def _check_tokens(report: VerifyReport, manifest: dict[str, Any]) -> None:
    folder = report.run_dir / "tokens"
    if not folder.is_dir():
        return
    tokens = read_json_or_none(folder / "manifest.json")
    if not isinstance(tokens, dict):
        report.problems.append(f"{folder / 'manifest.json'}: missing or unreadable")
        return
    shard_rows = {e["path"]: e["rows"] for e in manifest.get("shards", [])}
    for entry in tokens.get("shards", []):
        for key in ("tokens", "index"):
            _check_file(report, report.run_dir / entry[f"{key}_path"], entry[f"{key}_sha256"])
        source = entry.get("source")
        if source is not None and shard_rows.get(source) != entry.get("rows"):
            report.problems.append(f"{report.run_dir / entry['tokens_path']}: {entry.get('rows')} documents, "
                                   f"but {source} has {shard_rows.get(source)} rows (tokens of another run?)")


def verify_run(run_dir: str | Path) -> VerifyReport:
    """Every problem found in ``run_dir``, one line each naming the file."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no manifest.json)")
    report = VerifyReport(run_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        report.problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
        return report
    _check_shards(report, manifest)
    _check_quarantine(report, manifest)
    _check_stage_cache(report, manifest)
    _check_tokens(report, manifest)
    return report
