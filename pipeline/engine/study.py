"""``curriculum study``: order x LR schedule x checkpoint averaging, over seeds (Luo et al., ICLR 2026).

The same curated data, token budget and model under every arm. The config is a pipeline config
(input, stages, ``train:``) with a ``study:`` section. Each order re-runs only the order stage of
the pipeline (the scores come from the stage cache), once per seed; each (order, schedule, seed)
is one ``run_training`` in a Ray task, and the averaged weights (SMA, EMA, …) are taken from the
checkpoints of that same run, so averaging costs no training. An arm's ``result.json`` is written
atomically and then its ``_DONE`` marker, so a rerun skips finished arms and redoes only the rest;
a failed arm is reported and the others finish. The tables, the curriculum effect per schedule
and the plots are written to the study folder (docs/training.md, "Studying ordering effects").
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import ConfigError, CurriculumError, FieldError
from pipeline.core.faults import kill_when_written
from pipeline.core.files import read_json_or_none, write_json_atomic, write_text_atomic
from pipeline.core.hashing import sha256_json
from pipeline.core.ray_session import connect_ray
from pipeline.core.settings import RayConfig, RunConfig, StrictModel
from pipeline.engine.config import Config, format_validation_error, read_config_mapping, validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.io.runfolder import read_manifest, shard_files
from pipeline.train.config import ScheduleConfig, TrainConfig
from stages.registry import get_stage_class

Log = Callable[[str], None]
STUDY_FILE = "study.json"  # marks a study folder (``curriculum inspect`` dispatches on it)
DONE = "_DONE"
AVERAGING = ("none", "sma", "ema", "wma")
# A schedule whose last LR is below this share of the peak "decays toward zero" in the verdict.
TO_ZERO_BELOW = 0.05


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- config


class StudyEval(StrictModel):
    high_quality: str = Field("clean", description="The train.eval.sets entry of high-quality held-out text.")
    mixed: str = Field("mixed", description="The train.eval.sets entry of held-out text of every quality.")


class StudyConfig(StrictModel):
    """The ``study:`` section: the grid and how it runs."""

    orders: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"uniform": {"method": "random"},
                                 "ascending": {"method": "quality_ascending", "key": "quality",
                                               "higher_is_better": True}},
        description="name -> the order stage's params (method, key, …); the study sets its seed.")
    schedules: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"cosine_300": {"kind": "cosine", "final_lr_ratio": 1 / 300},
                                 "wsd_300": {"kind": "wsd", "decay_shape": "1-sqrt", "final_lr_ratio": 1 / 300},
                                 "wsd_3": {"kind": "wsd", "decay_shape": "1-sqrt", "final_lr_ratio": 1 / 3},
                                 "constant": {"kind": "constant"}},
        description="name -> train.schedule keys, over the config's own train.schedule.")
    averaging: list[Literal["none", "sma", "ema", "wma"]] = Field(
        default_factory=lambda: ["none", "sma", "ema"],
        description="Weights evaluated per run: none (the final weights), sma, ema, wma of the last "
        "train.averaging.last_k checkpoints; all from the same run.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Each seed sets the order stage's "
                             "seed (the data order of random orders) and train.seed (initialization).")
    baseline: str = Field("uniform", description="The order the curriculum is compared with (an orders key).")
    curriculum: str = Field("ascending", description="The order whose effect is reported (an orders key).")
    eval: StudyEval = StudyEval()
    epochs: float | None = Field(1.0, gt=0, description="Token budget in passes over the curated data "
                                 "(train.max_tokens is set from it); null keeps train.max_tokens.")
    curve_points: int = Field(8, ge=1, description="Eval points per run for the loss curves (sets train.eval.every).")
    parallel: bool = Field(True, description="Run arms as parallel Ray tasks; false runs them one by one here.")
    cpus_per_arm: float = Field(1.0, gt=0, description="Ray CPUs per arm (set train.threads to match).")
    gpus_per_arm: float = Field(0.0, ge=0, description="Ray GPUs per arm, e.g. 0.25 to share one GPU by four arms.")
    keep_checkpoints: bool = Field(False, description="Keep each run's checkpoints after its result is written "
                                   "(final and averaged weights are always kept).")

    @field_validator("orders", "schedules")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("give at least one entry")
        for name in value:
            if not name or not all(c.isalnum() or c in "_-." for c in name) or "__" in name:
                raise ValueError(f"name {name!r}: use letters, digits, '_', '-' or '.' (no '__'); it names folders")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(seeds) < 2:
            raise ValueError("give at least 2 seeds (3 or more for a mean ± sd worth reading)")
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be distinct and >= 0 (got {seeds})")
        return seeds

    @field_validator("averaging")
    @classmethod
    def _averaging(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"list each of {', '.join(AVERAGING)} at most once, at least one (got {value})")
        return value

    @model_validator(mode="after")
    def _compared_orders(self) -> "StudyConfig":
        for key in ("baseline", "curriculum"):
            if getattr(self, key) not in self.orders:
                raise FieldError(key, f"{getattr(self, key)!r} is not one of the orders ({', '.join(self.orders)})")
        if self.baseline == self.curriculum:
            raise FieldError("curriculum", "must differ from baseline")
        return self


@dataclass
class Arm:
    """One training run: an order, a schedule and a seed."""

    order: str
    schedule: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.order}__{self.schedule}__s{self.seed}"


@dataclass
class Study:
    config: Config
    study: StudyConfig
    source: str = "config"

    def arms(self) -> list[Arm]:
        """Seed-major, so an interrupted study has whole seeds done first."""
        return [Arm(o, s, seed) for seed in self.study.seeds for o in self.study.orders for s in self.study.schedules]

    def order_params(self, order: str, seed: int) -> dict[str, Any]:
        return {"name": "order", **self.study.orders[order], "seed": seed}

    def pipeline_config(self, order: str, seed: int) -> Config:
        raw = self.config.resolved()
        raw["stages"] = raw["stages"][:-1] + [self.order_params(order, seed)]  # validation puts order last
        return validate_config(raw, source=self.source)

    def train_dict(self, arm: Arm, tokenizer: str | None, max_tokens: int | None) -> dict[str, Any]:
        """The ``train:`` section of one arm: the config's, with the arm's schedule, seed and budget."""
        train = dict(self.config.train or {})
        train["schedule"] = {**train.get("schedule", {}), **self.study.schedules[arm.schedule]}
        train["seed"] = arm.seed
        if max_tokens is not None:
            train["max_tokens"] = max_tokens
        if tokenizer is not None:
            train["tokenizer"] = tokenizer
        methods = [m for m in self.study.averaging if m != "none"]
        train["averaging"] = {**train.get("averaging", {}), "method": methods[0] if methods else "none"}
        try:
            cfg = TrainConfig.model_validate(train)
            every = max(1, math.ceil(cfg.total_steps / self.study.curve_points))
            train["eval"] = {**train.get("eval", {}), "every": every}
            return TrainConfig.model_validate(train).model_dump(mode="json")
        except ValidationError as exc:  # e.g. an averaging window that the budget from study.epochs cannot hold
            problems = format_validation_error(exc, "train", TrainConfig)
            raise ConfigError(f"{self.source}: run {arm.name} (max_tokens {max_tokens or 'from train'}):\n  "
                              + "\n  ".join(problems)) from None


def load_study_config(path: str | Path, sets: list[str] | None = None) -> Study:
    """A pipeline config with a ``study:`` section; ``--set study.seeds=[0,1,2,3]`` reaches it too."""
    return validate_study(read_config_mapping(path, sets), source=str(path))


def validate_study(raw: dict[str, Any], source: str = "config") -> Study:
    """Validate the ``study:`` section and the pipeline config around it; ConfigError naming each key."""
    raw = dict(raw)
    section = raw.pop("study", None)
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: study: the config has no study: section (orders, schedules, averaging, seeds); "
                          "see configs/study.yaml")
    if raw.get("train") is None:
        raise ConfigError(f"{source}: train: a study needs a train: section (model, budget, eval sets)")
    config = validate_config(raw, source=source)
    try:
        study = StudyConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config:\n  "
                          + "\n  ".join(format_validation_error(exc, "study", StudyConfig))) from None
    problems = _check_grid(config, study)
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    return Study(config, study, source)


def _check_grid(config: Config, study: StudyConfig) -> list[str]:
    problems: list[str] = []
    order_cls = get_stage_class("order")
    for name, params in study.orders.items():
        if "seed" in params or "name" in params:
            problems.append(f"study.orders.{name}: leave out seed and name (the study sets them per seed)")
            continue
        try:
            order_cls.Params.model_validate({"name": "order", **params})
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, f"study.orders.{name}", order_cls.Params))
    base = (config.train or {}).get("schedule", {})
    for name, params in study.schedules.items():
        try:
            ScheduleConfig.model_validate({**base, **params})
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, f"study.schedules.{name}", ScheduleConfig))
    sets = (config.train or {}).get("eval", {}).get("sets", {})
    for key in ("high_quality", "mixed"):
        name = getattr(study.eval, key)
        if name not in sets:
            problems.append(f"study.eval.{key}: {name!r} is not one of train.eval.sets ({', '.join(sets) or 'none'})")
    if (config.train or {}).get("workers", 1) > 1 and study.parallel:
        problems.append("study.parallel: arms run as Ray tasks, which cannot start Ray Train themselves; "
                        "set study.parallel: false to run train.workers > 1 arms one by one")
    return problems


# --------------------------------------------------------------------------- running


@dataclass
class _Job:
    """What ``run_training`` reads of a config (``JobConfig``), as plain picklable data."""

    run: RunConfig
    ray: RayConfig
    train: dict[str, Any]


def default_out(study: Study) -> Path:
    return Path("runs") / f"{study.config.run.name}-study"


def _prepare_data(study: Study, out: Path, address: str | None, log: Log) -> dict[tuple[str, int], Path | str]:
    """``data/<order>-s<seed>``: a run folder per order and seed; the scores come from one stage cache.

    An order that does not read its seed (its manifest's ``order`` has no ``seed``: quality
    sorts, for one) is made once and shared by every seed. Returns the folder, or the error text
    when that order's pipeline failed."""
    found: dict[tuple[str, int], Path | str] = {}
    for order in study.study.orders:
        for seed in study.study.seeds:
            first = out / "data" / f"{order}-s{study.study.seeds[0]}"
            if seed != study.study.seeds[0] and isinstance(found.get((order, study.study.seeds[0])), Path) \
                    and "seed" not in (read_manifest(first).get("order") or {}):
                found[(order, seed)] = first
                continue
            found[(order, seed)] = _order_data(study, order, seed, out, address, log)
    return found


def _order_data(study: Study, order: str, seed: int, out: Path, address: str | None, log: Log) -> Path | str:
    target = out / "data" / f"{order}-s{seed}"
    if (target / "manifest.json").is_file():
        return target
    work = out / "pipeline"
    try:
        run_pipeline(study.pipeline_config(order, seed), work, address=address,
                     log=lambda m: log(f"[study] data {order}-s{seed}: {m}"))
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        (tmp / "shards").mkdir(parents=True)
        for shard in shard_files(work):
            shutil.copyfile(shard, tmp / "shards" / shard.name)
        shutil.copyfile(work / "manifest.json", tmp / "manifest.json")  # last: it marks the copy complete
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except CurriculumError as exc:
        error = f"data for order {order!r}, seed {seed}: {exc}"
        log(f"[study] FAILED {error}")
        return error
    log(f"[study] data {order}-s{seed}: {read_manifest(target)['counts']['output_rows']} rows")
    return target


def _prepare_tokenizer(study: Study, data_dir: Path, out: Path, log: Log) -> str | None:
    """One tokenizer for every arm (so losses are in the same units), unless the config names one."""
    from pipeline.train.trainer import save_resolved_tokenizer

    train = study.config.train or {}
    if train.get("tokenizer") or (train.get("model") or {}).get("pretrained"):
        return None
    job = _Job(study.config.run, study.config.ray, train)
    return save_resolved_tokenizer(job, data_dir, out / "tokenizer", out / "tokenizer-work", log, "study")


def epoch_tokens(data_dir: Path, tokenizer_path: str, text_field: str = "text") -> int:
    """Tokens in one pass over the run folder as the packing loader streams it (each document + EOS)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipeline.train.loader import Encoder

    encoder = Encoder(AutoTokenizer.from_pretrained(tokenizer_path))
    total = 0
    for f in shard_files(data_dir):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=[text_field]):
            texts = [t or "" for t in batch.column(0).to_pylist()]
            total += sum(len(ids) + 1 for ids in encoder.encode(texts))
    return total


def _budget(study: Study, data_dir: Path, tokenizer: str | None) -> tuple[int | None, int | None]:
    """(train.max_tokens for ``study.epochs`` passes, tokens per pass); (None, None) without epochs."""
    if study.study.epochs is None:
        return None, None
    train = TrainConfig.model_validate(study.config.train or {})
    path = tokenizer or train.tokenizer or train.model.pretrained
    per_pass = epoch_tokens(data_dir, str(path), train.data.text_field)
    step = train.batch_size * train.seq_len
    steps = int(study.study.epochs * per_pass // step)
    if steps < 1:
        raise ConfigError(f"study.epochs: {study.study.epochs} pass(es) over {per_pass} tokens is less than one "
                          f"step of {step} tokens (train.batch_size * train.seq_len)")
    return steps * step, per_pass


def _arm_fingerprint(train: dict[str, Any], data_dir: Path) -> str:
    shards = [s.get("sha256") for s in read_manifest(data_dir).get("shards", [])]
    return sha256_json({"train": {k: v for k, v in train.items() if k != "tokenizer"}, "shards": shards})


def run_arm(job: _Job, arm: dict[str, Any], data_dir: str, arm_dir: str, methods: list[str],
            eval_names: dict[str, str], keep_checkpoints: bool) -> dict[str, Any]:
    """Train one arm and evaluate its final and averaged weights; writes result.json, then _DONE.

    Never raises: a failure comes back as ``{"status": "failed", "error": …}`` (and error.txt)."""
    folder = Path(arm_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log_file = open(folder / "train.log", "a", encoding="utf-8")
    started = time.time()

    def log(message: str) -> None:
        log_file.write(message + "\n")
        log_file.flush()

    try:
        result = _train_and_evaluate(job, arm, Path(data_dir), folder, methods, eval_names, log)
        result["seconds"] = round(time.time() - started, 2)
        write_json_atomic(folder / "result.json", result, indent=2)
        write_text_atomic(folder / DONE, result["fingerprint"] + "\n")
        (folder / "error.txt").unlink(missing_ok=True)
        if not keep_checkpoints:
            shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)
        return result
    except Exception as exc:  # noqa: BLE001 - one arm's failure must not stop the others
        detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CurriculumError) else str(exc)
        log(traceback.format_exc())
        write_text_atomic(folder / "error.txt", detail + "\n")
        return {**arm, "status": "failed", "error": detail.splitlines()[0] if detail else type(exc).__name__}
    finally:
        log_file.close()


def _train_and_evaluate(job: _Job, arm: dict[str, Any], data_dir: Path, folder: Path, methods: list[str],
                        eval_names: dict[str, str], log: Log) -> dict[str, Any]:
    import json

    from pipeline.train.trainer import run_training

    out = folder / "train"
    summary = run_training(job, data_dir, out, log=log)
    cfg = TrainConfig.model_validate(job.train)
    losses: dict[str, dict[str, float] | None] = {"none": summary["final"]}
    extra = [m for m in methods if m not in ("none", cfg.averaging.method)]
    if cfg.averaging.method in methods:
        losses[cfg.averaging.method] = summary["averaged"]
    if extra:
        losses.update(_evaluate_averages(cfg, out, extra))
    result_losses = {m: {key: (losses[m] or {}).get(f"eval_{name}") for key, name in eval_names.items()}
                     for m in methods}
    curve = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            curve.append({"step": m["step"], "tokens": m["tokens"], "lr": m["lr"], "train_loss": m["train_loss"],
                          **{key: m.get(f"eval_{name}") for key, name in eval_names.items()}})
    return {**arm, "status": "ok", "fingerprint": _arm_fingerprint(job.train, data_dir), "steps": summary["steps"],
            "tokens": summary["tokens"], "epochs": summary["epochs"], "losses": result_losses,
            "lr_schedule": summary["schedule"], "curve": curve, "device": summary["device"]}


def _evaluate_averages(cfg: TrainConfig, out: Path, methods: list[str]) -> dict[str, dict[str, float]]:
    """Average the same last_k grid checkpoints the trainer averaged, with other methods, and evaluate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.lm import resolve_device
    from pipeline.train.averaging import average_checkpoints
    from pipeline.train.checkpoints import complete_checkpoints, on_grid
    from pipeline.train.evaluation import evaluate, load_eval_sets

    total, every = cfg.total_steps, cfg.checkpoint_every
    window = [f for s, f in complete_checkpoints(out) if on_grid(s, total, every)][-cfg.averaging.last_k:]
    if not window:
        raise CurriculumError(f"{out}: no checkpoints left to average (train.averaging)")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    data = load_eval_sets(cfg.eval.sets, tokenizer, cfg.seq_len, cfg.eval.max_tokens)
    device = resolve_device(cfg.device)
    found: dict[str, dict[str, float]] = {}
    for method in methods:
        target = out / f"averaged-{method}"
        average_checkpoints(window, target, method, cfg.averaging.alpha, cfg.averaging.dtype)
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).to(device)
        found[method] = {f"eval_{k}": v for k, v in evaluate(model, data, cfg.eval.batch_size, device).items()}
        del model
    return found


def _done(arm_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The arm's result when it finished with this fingerprint; ConfigError when it is of another study."""
    marker = arm_dir / DONE
    result = read_json_or_none(arm_dir / "result.json")
    if not marker.is_file() or not isinstance(result, dict):
        return None
    if result.get("fingerprint") != fingerprint:
        raise ConfigError(f"{arm_dir}: holds a finished arm of another study (train settings or data differ); "
                          "use a new --out")
    return result


def run_study(study: Study, out: str | Path | None = None, address: str | None = None,
              log: Log = _stderr) -> dict[str, Any]:
    """Run (or resume) the grid and write the tables and plots; returns the results (``results.json``)."""
    out = Path(out) if out else default_out(study)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    connect_ray(study.config.ray, address)
    data = _prepare_data(study, out, address, log)
    good = [d for d in data.values() if isinstance(d, Path)]
    if not good:
        raise CurriculumError("no order produced data: " + "; ".join(str(d) for d in data.values()))
    # The pipeline folder, not a copy: its manifest's artifacts (a reference LM's tokenizer) resolve there.
    tokenizer = _prepare_tokenizer(study, out / "pipeline", out, log)
    max_tokens, per_pass = _budget(study, good[0], tokenizer)
    write_json_atomic(out / STUDY_FILE, {
        "study": study.study.model_dump(mode="json"), "config": study.config.resolved(), "source": study.source,
        "tokenizer": tokenizer, "max_tokens": max_tokens, "tokens_per_pass": per_pass}, indent=2)

    methods = list(study.study.averaging)
    eval_names = study.study.eval.model_dump()
    results: dict[str, dict[str, Any]] = {}
    pending: list[tuple[Arm, _Job, Path, Path]] = []
    for arm in study.arms():
        arm_dir = out / "arms" / arm.name
        source = data[(arm.order, arm.seed)]
        if not isinstance(source, Path):
            results[arm.name] = {**arm.__dict__, "status": "failed", "error": source}
            continue
        train = study.train_dict(arm, tokenizer, max_tokens)
        finished = _done(arm_dir, _arm_fingerprint(train, source))
        if finished is not None:
            results[arm.name] = finished
            continue
        pending.append((arm, _Job(study.config.run, study.config.ray, train), source, arm_dir))
    skipped = len(results)
    log(f"[study] {len(study.arms())} runs: {skipped} finished before (or without data), {len(pending)} to train "
        f"({max_tokens or 'train.max_tokens'} tokens each)")
    args = [(job, arm.__dict__, str(source), str(arm_dir), methods, eval_names, study.study.keep_checkpoints)
            for arm, job, source, arm_dir in pending]
    with kill_when_written("arm", out / "arms", "*/train/checkpoints/step-*"):
        _train_arms(study, pending, args, results, skipped, log)

    from pipeline.engine.report_study import write_study_outputs

    ordered = [results[a.name] for a in study.arms()]
    report = write_study_outputs(out, study.study, ordered, study.config.train or {})
    report.update({"trained": len(pending), "skipped": skipped, "seconds": round(time.time() - started, 1)})
    write_json_atomic(out / "results.json", report, indent=2)
    return report


def _log_arm(result: dict[str, Any], done: int, total: int, log: Log) -> None:
    name = f"{result['order']}__{result['schedule']}__s{result['seed']}"
    if result.get("status") == "ok":
        hq = (result["losses"].get("none") or {}).get("high_quality")
        log(f"[study] {done}/{total} {name}: final high-quality loss {hq:.4f} ({result.get('seconds', 0):.0f}s)")
    else:
        log(f"[study] {done}/{total} {name}: FAILED: {result.get('error')}")


def _train_arms(study: Study, pending: list[tuple[Arm, _Job, Path, Path]], args: list[tuple[Any, ...]],
                results: dict[str, dict[str, Any]], skipped: int, log: Log) -> None:
    """Train the pending arms, in parallel Ray tasks or one after another, into ``results``."""
    import ray

    if study.study.parallel:
        task = ray.remote(run_arm).options(num_cpus=study.study.cpus_per_arm, num_gpus=study.study.gpus_per_arm,
                                           max_retries=0)
        refs = {task.remote(*a): arm for a, (arm, *_rest) in zip(args, pending)}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            arm = refs.pop(ready[0])
            try:
                results[arm.name] = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a crashed worker (killed, out of memory)
                results[arm.name] = {**arm.__dict__, "status": "failed", "error": f"{type(exc).__name__}: "
                                     f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"}
            _log_arm(results[arm.name], len(results) - skipped, len(pending), log)
    else:
        for a, (arm, *_rest) in zip(args, pending):
            results[arm.name] = run_arm(*a)
            _log_arm(results[arm.name], len(results) - skipped, len(pending), log)
