"""The run manifest: what ran, on what, with which counts, and where every shard is."""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core import storage
from pipeline.core.errors import CurriculumError
from pipeline.core.files import write_json_atomic
from pipeline.engine.config import Config

_VERSIONED = ("ray", "torch", "transformers", "datasets", "polars", "pyarrow", "data-curriculum")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    config: Config,
    read_record: dict[str, Any],
    stage_records: list[dict[str, Any]],
    shards: list[dict[str, Any]],
    order: dict[str, Any],
    seconds: float,
    select: dict[str, Any] | None = None,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest; ``select`` (the info of ``curriculum select``'s step) becomes its ``select``
    section, and that step's entry under ``stages`` points there instead of repeating it."""
    config_hash = config.config_hash()
    stages = []
    for r in stage_records:
        info = {"see": "the manifest's select section"} if select is not None and r["name"] == "select" else r.get("info")
        stages.append(
            {k: r.get(k) for k in ("name", "rows_in", "rows_out", "dropped", "added", "seconds", "driver_peak_rss_mib")}
            | {"rows_per_second": rows_per_second(r.get("rows_in"), r.get("seconds"))}
            | {k: r.get(k) for k in ("cached", "key")}
            | ({"dropped_by": r["dropped_by"]} if r.get("dropped_by") else {})
            | ({"added_by": r["added_by"]} if r.get("added_by") else {})
            | ({"info": info} if info else {}))
    counts = {
        "input_rows": read_record["input_rows"],
        "quarantined": read_record["quarantined"],
        "output_rows": sum(s["rows"] for s in shards),
    }
    check_balance(counts, stages)
    return {
        "run_id": f"{config.run.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{config_hash[:8]}",
        "config_hash": config_hash,
        "config": config.resolved(),
        "seed": config.run.seed,
        "versions": package_versions(),
        "stages": stages,
        "counts": counts,
        "columns": {"extra": read_record.get("extra_columns", {})},
        "shards": shards,
        "order": order,
        "artifacts": {k: v for r in stage_records for k, v in (r.get("artifacts") or {}).items()},
        "seconds": round(seconds, 3),
    } | ({"timing": timing} if timing is not None else {}) | ({"select": select} if select is not None else {})


def rows_per_second(rows: int | None, seconds: float | None) -> float | None:
    """Throughput of a step: rows in over its wall time (None when it took no measurable time)."""
    return round(rows / seconds, 1) if rows is not None and seconds else None


def driver_peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the OS does not say).

    Recorded after each stage: the stage after which it jumps is the one holding data in the driver.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def step_timing(rows: int, seconds: float, cached: bool) -> dict[str, Any]:
    """A ``timing`` entry: the step's rows, wall time and throughput, and whether the cache served it."""
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows_per_second(rows, seconds), "cached": cached}


def check_balance(counts: dict[str, int], stages: list[dict[str, Any]]) -> None:
    """input_rows = quarantined + Σ dropped + output_rows − Σ added, or the run is wrong."""
    dropped = sum(s["dropped"] for s in stages)
    added = sum(s["added"] for s in stages)
    if counts["input_rows"] != counts["quarantined"] + dropped + counts["output_rows"] - added:
        raise CurriculumError(
            f"counts do not balance: input_rows {counts['input_rows']} != quarantined {counts['quarantined']} "
            f"+ dropped {dropped} + output_rows {counts['output_rows']} - added {added}"
        )


def write_manifest(run_dir: Path | str, manifest: dict[str, Any]) -> Path | str:
    """Write ``manifest.json``, the run folder's completion marker (on object storage: one PUT, last)."""
    if storage.is_uri(run_dir):
        uri = f"{run_dir}/manifest.json"
        storage.write_bytes(uri, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
        return uri
    return write_json_atomic(run_dir / "manifest.json", manifest, indent=2, ensure_ascii=False)
