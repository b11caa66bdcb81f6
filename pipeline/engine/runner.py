"""The runner: read -> stages -> shards -> manifest, on a local Ray or a cluster.

Each step's output is materialized into the stage cache (``pipeline.engine.cache``) before the next
one starts, so a rerun after a crash, or with a changed parameter, resumes at the first stage
whose key is not complete. Only counts and small metadata ever come back to the driver.

The run folder may be an ``s3://`` URI (``pipeline.core.storage``): the Ray tasks read and write
the objects themselves, and the driver only lists, copies inside the store and writes markers.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.context import ShuffleStrategy

import pipeline
from pipeline.core import storage
from pipeline.core.errors import ConfigError, CurriculumError, StageError, UnreadableInputError, find_cause
from pipeline.core.faults import kill_when_written
from pipeline.core.hashing import sha256_json
from pipeline.core.paths import expand_input_paths, ignored_input_files
from pipeline.core.ray_session import connect_ray, unused_in_open_session
from pipeline.engine.cache import StageCache, stage_key, stage_spec
from pipeline.engine.config import Config
from pipeline.engine.manifest import build_manifest, driver_peak_rss_mib, rows_per_second, step_timing, write_manifest
from pipeline.engine.node_loss import (
    NodeLostError,
    alive_nodes,
    interrupt_on_stall_after_node_loss,
    node_loss_cause,
    wait_until_marked_dead,
)
from pipeline.engine.progress import RowsWritten, progress_interval, progress_lines
from pipeline.engine.select import SelectStep
from pipeline.io.ingest import ingest
from pipeline.io.readers import read_input
from pipeline.io.writer import write_shards
from pipeline.models.pool import cluster_size, place, start_row_tally
from stages.base import Stage, StageContext
from stages.registry import build_stage

Log = Callable[[str], None]
# Ray declares a node dead after its health checks fail for a while (about 30 s by default).
NODE_DEATH_WAIT_SECONDS = 90.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def pipeline_data_context():
    """Ray Data settings for the length of one run, restored afterwards (notebooks share Ray).

    The pull-based sort shuffle replaces Ray 2.60's default (``shuffle_v2``), which starts actor
    pools for every sort and groupby: measured here it took ~10 s to sort 300 rows against
    0.2 s, and was also slower at 1M rows (11.4 s against 9.5 s).

    Stage caches are read with Ray's first parquet reader (``use_datasource_v2 = False``): the
    second one starts a pool of 32 footer-reading actors, each a new worker process, for every
    ``read_parquet``, from a task that holds a CPU (a 1-CPU cluster cannot place them). On 2 CPUs
    a 12-file read took 2.96 s against 0.31 s (benchmarks/bench_cache_read.py), at every stage.
    """
    context = ray.data.DataContext.get_current()
    previous = context.shuffle_strategy, context.use_datasource_v2
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.shuffle_strategy, context.use_datasource_v2 = previous


def _input_fingerprint(config: Config) -> list[Any]:
    """What identifies the input: the files with size and mtime, or the dataset/synthetic spec."""
    cfg = config.input
    if cfg.format in ("jsonl", "parquet", "text") and cfg.path and storage.is_uri(cfg.path):
        return [(f, i.size, i.mtime_ns) for f in expand_input_paths(cfg.path, cfg.format) for i in [storage.info(f)]]
    if cfg.format in ("jsonl", "parquet", "text") and cfg.path:
        return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in expand_input_paths(cfg.path, cfg.format)]
    return []


def _split_dropped(out: ray.data.Dataset) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    full = out.materialize()
    kept = full.map_batches(
        lambda t: t.filter(pc.is_null(t["_drop_reason"])).drop_columns(["_drop_reason"]), batch_format="pyarrow"
    )
    dropped = full.map_batches(lambda t: t.filter(pc.is_valid(t["_drop_reason"])), batch_format="pyarrow")
    return kept, dropped


def _merge_counts(counts: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    merged = dict(counts)
    for reason, rows in more.items():
        if rows:
            merged[reason] = merged.get(reason, 0) + int(rows)
    return dict(sorted(merged.items()))


def check_declared_counts(what: str, rows_in: int, rows_out: int, dropped_by: dict[str, int],
                          added_by: dict[str, int]) -> None:
    """Rows out must be rows in minus what the stage declared dropped plus what it declared added."""
    expected = rows_in - sum(dropped_by.values()) + sum(added_by.values())
    if rows_out != expected:
        raise StageError(f"{what}: {rows_in} rows in and {rows_out} out, but it declared dropped {dropped_by or '{}'} "
                         f"and added {added_by or '{}'} ({expected} expected): {rows_out - expected:+d} rows unaccounted for")


def _stop_tally(tally: Any) -> None:
    """End a stage's RowTally; after a lost node or a dropped connection there may be nothing to end."""
    try:
        ray.kill(tally)
    except Exception:  # noqa: BLE001 - the stage's own outcome is what matters here
        pass


def _count_by(ds: ray.data.Dataset, column: str) -> dict[str, int]:
    return {str(r[column]): int(r["count()"]) for r in ds.groupby(column).count().take_all()}


def run_pipeline(config: Config, out_dir: Path | str, address: str | None = None, log: Log = _stderr,
                 select: bool = False) -> dict[str, Any]:
    """Run every stage of ``config`` into ``out_dir`` and return the manifest.

    With ``select`` (``curriculum select``), the config's ``select:`` section runs as one more step
    just before the order stage: iterative kMQ (``pipeline.engine.select``)."""
    stage_objects = _stage_objects(config, select, log)
    joined_here = not ray.is_initialized()  # a notebook's own Ray session is not ours to end
    if unused := unused_in_open_session(config.ray):
        log(f"[ray] joined the Ray session this process already has; {', '.join(unused)}: used only when "
            "curriculum starts the session (give them to your own ray.init)")
    # Absolute, because Ray tasks on other nodes write into it from their own working directory.
    run_dir = out_dir if storage.is_uri(out_dir) else Path(out_dir).resolve()
    retries, attempt = config.ray.node_loss_retries, 0
    while True:
        connect_ray(config.ray, address)
        try:
            with pipeline_data_context():
                return _run(config, run_dir, log, stage_objects)
        except NodeLostError as exc:
            attempt += 1
            if attempt > retries:
                raise
            log(f"{exc}; resuming from the stage cache on the nodes that are left (retry {attempt} of {retries})")
            wait_until_marked_dead(exc.nodes, NODE_DEATH_WAIT_SECONDS, log)
            if joined_here:  # ending this job makes Ray kill its actors: none of them holds a survivor's CPU
                ray.shutdown()


def _stage_objects(config: Config, select: bool, log: Log) -> list[Stage]:
    stages = [build_stage(params) for params in config.stages]
    if not select:
        if config.select is not None:
            log("[select] the config has a select: section; `curriculum select CONFIG` runs it (`run` does not)")
        return stages
    if config.select is None:
        raise ConfigError("select: the config has no select: section (rounds, budget, scorer, proxy); "
                          "`curriculum select` runs iterative kMQ from it")
    static = [i for i, s in enumerate(stages) if s.name == "kmq"]
    if static:
        raise ConfigError(f"stages[{static[0]}]: a kmq stage selects once, and the select: section selects in rounds; "
                          "keep one of them")
    step = SelectStep(config.select, config.run, config.ray, log)
    return [*stages[:-1], step, stages[-1]]  # the order stage is always last


def _run(config: Config, out_dir: Path | str, log: Log, stage_objects: list[Stage]) -> dict[str, Any]:
    started = time.time()
    if isinstance(out_dir, Path):
        out_dir.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out_dir)
    parallelism = max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    seed = config.run.seed

    # ---- read + quarantine
    read_key = sha256_json({"stage": "read", "input": config.input.model_dump(mode="json"), "seed": seed,
                            "files": _input_fingerprint(config), "version": pipeline.__version__})
    read_dir = cache.folder(0, "read", read_key)
    read_record = cache.record(read_dir, log)
    read_cached = read_record is not None
    if read_record is None:
        t0 = time.time()
        if config.input.path and config.input.format in ("jsonl", "parquet"):
            skipped = ignored_input_files(config.input.path, config.input.format)
            if skipped:
                log(f"[read] {len(skipped)} file(s) in {config.input.path} are not {config.input.format} by name and "
                    f"are not read: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        try:
            parsed = read_input(config.input, seed, parallelism)
            result = ingest(parsed.materialize())
        except Exception as exc:  # noqa: BLE001 - Ray wraps the read task's error; name the file, not a traceback
            unreadable = find_cause(exc, UnreadableInputError)
            if unreadable is None:
                raise
            raise CurriculumError(str(unreadable).splitlines()[0]) from None
        if result.input_rows == 0:
            raise CurriculumError(f"input: no records in {config.input.path or config.input.format!r} "
                                  "(empty files, or only blank lines)")
        with kill_when_written("stage:read", read_dir, ".data.tmp-*/*.parquet"):
            good_rows = cache.write(result.good, read_dir, "data")
        quarantined = cache.write(result.quarantine, read_dir, "quarantine")
        read_record = {"name": "read", "key": read_key, "input_rows": result.input_rows, "quarantined": quarantined,
                       "rows_out": good_rows, "extra_columns": result.extra_columns,
                       "seconds": round(time.time() - t0, 3)}
        if result.input_rows != quarantined + good_rows:
            raise CurriculumError(f"read: {result.input_rows} records in but {good_rows} good + {quarantined} quarantined")
        cache.complete(read_dir, read_record)
        log(f"[read] {result.input_rows} records -> {good_rows} rows, {quarantined} quarantined "
            f"in {read_record['seconds']:.1f}s")
    else:
        log(f"[read] cached: {read_record['input_rows']} records -> {read_record['rows_out']} rows, "
            f"{read_record['quarantined']} quarantined")

    # ---- check every stage's required columns before running any of them
    available = ["id", "text", *read_record["extra_columns"]]
    for index, stage in enumerate(stage_objects, start=1):
        missing = [c for c in stage.requires() if c not in available]
        if missing:
            # A config error (exit 2): the config asks for a column that nothing upstream makes.
            raise ConfigError(f"stages[{index - 1}] {stage.name}: needs column(s) {missing}, which no earlier "
                             f"stage or input field provides (available: {available})")
        available += [c for c in stage.columns if c not in available]

    # ---- stages
    upstream_key, upstream_dir, rows = read_key, read_dir, read_record["rows_out"]
    records: list[dict[str, Any]] = []
    order_info: dict[str, Any] | None = None
    artifacts: dict[str, str] = {}
    for index, stage in enumerate(stage_objects, start=1):
        spec = stage_spec(stage, seed)
        key = stage_key(upstream_key, spec)
        folder = cache.folder(index, stage.name, key)
        record = cache.record(folder, log)
        was_cached = record is not None
        tag = f"[{index}/{len(stage_objects)} {stage.name}]"
        if record is None:
            t0 = time.time()
            nodes = alive_nodes()
            upstream = cache.read(upstream_dir)
            ctx = StageContext(run_dir=cache.work_dir, artifact_dir=cache.artifacts(folder), seed=seed,
                               input_columns=list(upstream.schema().names),
                               placement=place(stage.resources(), *cluster_size()),
                               upstream_artifacts=dict(artifacts),
                               row_tally=start_row_tally() if stage.tallies_rows and progress_interval() > 0 else None)
            try:
                with progress_lines(folder, rows, tag, log, tally=ctx.row_tally), \
                        kill_when_written(f"stage:{stage.name}", folder, ".data.tmp-*/*.parquet"), \
                        interrupt_on_stall_after_node_loss(nodes, RowsWritten(folder), config.ray.node_loss_stall_seconds):
                    out = stage.apply(upstream, ctx)
                    dropped_by: dict[str, int] = {}
                    if stage.may_drop():
                        out, dropped = _split_dropped(out)
                        if cache.write(dropped, folder, "dropped"):
                            dropped_by = _count_by(cache.read(folder, "dropped"), "_drop_reason")
                    rows_out = cache.write(out, folder, "data")
            except CurriculumError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the stage, keep the cause
                where = f"stage {stage.name!r} (stages[{index - 1}])"
                lost = node_loss_cause(exc)
                if lost is not None:
                    raise NodeLostError(f"{where}: a Ray node was lost ({type(lost).__name__}: "
                                        f"{str(lost).splitlines()[0][:200]})", nodes) from exc
                raise StageError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                if ctx.row_tally is not None:
                    _stop_tally(ctx.row_tally)
            dropped_by = _merge_counts(dropped_by, ctx.dropped)
            added_by = _merge_counts({}, ctx.added)
            check_declared_counts(f"stage {stage.name!r} (stages[{index - 1}])", rows, rows_out, dropped_by, added_by)
            record = {"name": stage.name, "key": key, "rows_in": rows, "rows_out": rows_out,
                      "dropped": sum(dropped_by.values()), "added": sum(added_by.values()),
                      "seconds": round(time.time() - t0, 3), "driver_peak_rss_mib": driver_peak_rss_mib(),
                      "info": ctx.info, "order": ctx.order,
                      "artifacts": ctx.artifacts}
            if dropped_by:
                record["dropped_by"] = dropped_by
            if added_by:
                record["added_by"] = added_by
            cache.complete(folder, record)
            rate = rows_per_second(rows, record["seconds"])
            log(f"{tag} {rows} -> {rows_out} rows (-{record['dropped']} +{record['added']}) in {record['seconds']:.1f}s"
                + (f", {rate:,.1f} rows/s" if rate else ""))
        else:
            cache.fetch_artifacts(folder, record)
            log(f"{tag} cached: {record['rows_in']} -> {record['rows_out']} rows")
        records.append({**record, "cached": was_cached})
        order_info = record.get("order") or order_info
        artifacts.update(record.get("artifacts") or {})
        upstream_key, upstream_dir, rows = key, folder, record["rows_out"]

    # ---- shards, quarantine, manifest
    t0 = time.time()
    final = cache.read(upstream_dir)
    # Only the columns a stage declared cache-only; an input field that happens to be called
    # "embedding..." is the user's data and passes through.
    drop = set() if config.output.keep_embeddings else {c for s in stage_objects for c in s.cache_only_columns}
    with kill_when_written("write", out_dir, ".shards.tmp-*/part-*.parquet"):
        shards = write_shards(final, out_dir, config.output.rows_per_shard, config.output.compression, drop)
    write_seconds = round(time.time() - t0, 3)
    log(f"[write] {rows} rows -> {len(shards)} shard(s) in {write_seconds:.1f}s")
    _publish_quarantine(read_dir, out_dir)

    select_info = next((r["info"] for r in records if r["name"] == SelectStep.name), None)
    timing = {"read": step_timing(read_record["input_rows"], read_record["seconds"], read_cached) | {"key": read_key},
              "write": step_timing(rows, write_seconds, False)}
    manifest = build_manifest(config, read_record, records, shards, order_info or {}, time.time() - started,
                              select=select_info, timing=timing)
    write_manifest(out_dir, manifest)
    return manifest


def _publish_quarantine(read_dir: Path | str, out_dir: Path | str) -> None:
    """Copy the quarantine files out of the stage cache into RUN_DIR/quarantine/."""
    if isinstance(out_dir, str):  # object storage: copies inside the store, nothing through here
        target = f"{out_dir}/quarantine"
        storage.delete_tree(target)
        sources = [f.uri for f in storage.list_files(f"{read_dir}/quarantine") if f.uri.endswith(".parquet")]
        for index, source in enumerate(sources):
            fs, path = storage.filesystem(source)
            if pq.read_metadata(path, filesystem=fs).num_rows:
                storage.copy_file(source, f"{target}/part-{index:05d}.parquet")
        return
    target = out_dir / "quarantine"
    staging = out_dir / ".quarantine.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for index, source in enumerate(sorted((read_dir / "quarantine").glob("*.parquet"))):
        if pq.read_metadata(source).num_rows:
            shutil.copyfile(source, staging / f"part-{index:05d}.parquet")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
