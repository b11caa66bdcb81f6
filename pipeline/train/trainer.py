"""``curriculum train``: a causal LM trained on a run folder's shards, in shard order.

The loop reads top to bottom, in the manner of nanoGPT's ``train.py``: ``setup_worker`` (model,
loader, optimizer), ``resume`` (the newest complete checkpoint, or a seeded start), then per step
the LR from the schedule, ``train_step`` over ``grad_accum`` micro-batches, ``log_metrics`` and
``checkpoint``. The schedule and averaging are designed with the order (Luo et al., ICLR 2026).
``train.workers > 1`` runs the same loop on Ray Train (DDP). The decisions (folders, tokenizer,
loss, precision, resume, workers) are written up in docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.errors import ConfigError, CurriculumError, ModelLoadError
from pipeline.core.files import write_json_atomic
from pipeline.core.hashing import sha256_json, uniform
from pipeline.core.ray_session import connect_ray
from pipeline.core.settings import RayConfig, RunConfig
from pipeline.core.storage import is_uri
from pipeline.core.storage import name as storage_name
from pipeline.io.runfolder import has_manifest, local_artifact, open_shard, read_manifest, run_dir_label, shard_files
from pipeline.models.lm import build_causal_lm, compute_dtype, load_causal_lm, resolve_device, train_bpe_tokenizer
from pipeline.train.augment import add_mask_token, mask_token_id
from pipeline.train.averaging import average_checkpoints
from pipeline.train.checkpoints import (
    STATE_FILE,
    TRAINER_STATE,
    clean_temporaries,
    complete_checkpoints,
    load_model_weights,
    load_optimizer,
    on_grid,
    prune_checkpoints,
    save_checkpoint,
    truncate_jsonl,
)
from pipeline.train.config import AugmentConfig, DataConfig, RecordConfig, TrainConfig
from pipeline.train.evaluation import check_eval_sets, evaluate, load_eval_sets
from pipeline.train.fut import STEPS as FUT_STEPS
from pipeline.train.fut import FutRecorder, record_summary
from pipeline.train.loader import CurriculumLoader
from pipeline.train.schedules import schedule_from_config

Log = Callable[[str], None]
ATTEMPT_FILE = ".attempt.json"  # rank 0's throughput figures, for the driver (Ray workers)
# Keys of the train config that do not change the trajectory: they may differ on resume.
_FREE_KEYS = ("eval", "log_every", "loader_workers", "trace", "averaging")
# Keys that keep the trajectory but change the floating-point results: a resume that changes one
# would not be bitwise equal to an uninterrupted run, so it is refused with a reason of its own.
_NUMERICS_KEYS = ("threads", "deterministic")
_NUMERICS_WHY = {
    "threads": "the number of torch threads changes how sums are split and so how they round",
    "deterministic": "deterministic algorithms on or off changes which kernels run and so how sums round",
}


class JobConfig(Protocol):
    """What training reads of a pipeline config: the run, the Ray settings and the ``train:`` section."""

    run: RunConfig
    ray: RayConfig
    train: dict[str, Any] | None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- planning


@dataclass
class TrainPlan:
    """Everything a training worker needs; plain data, so it pickles to Ray workers."""

    train: TrainConfig
    data_dir: str
    out_dir: str
    seed: int
    total_steps: int
    device: str
    precision: str
    fingerprint: str = ""


def default_paths(config: JobConfig, data: str | Path | None, out: str | Path | None) -> tuple[Path | str, Path]:
    """(run folder, training folder); the run folder may be an object-storage URI (``s3://...``)."""
    if data and is_uri(data):
        data_dir: Path | str = str(data).rstrip("/")
    else:
        data_dir = Path(data) if data else Path("runs") / config.run.name
    out_dir = Path(out) if out else Path("runs") / f"{config.run.name}-train"
    return data_dir, out_dir


def plan_training(config: JobConfig, data: str | Path | None = None, out: str | Path | None = None) -> TrainPlan:
    """Validate what can be checked before anything is written; ConfigError otherwise."""
    train = TrainConfig.model_validate(config.train or {})
    data_dir, out_dir = default_paths(config, data, out)
    if not has_manifest(data_dir):
        raise ConfigError(f"{data_dir}: not a run folder (no manifest.json); run `curriculum run CONFIG` "
                          "first, or pass --data RUN_DIR")
    check_data_columns(train, data_dir)
    if isinstance(data_dir, Path) and out_dir.resolve() == data_dir.resolve():
        raise ConfigError("--out must differ from the run folder (--data)")
    check_eval_sets(train.eval.sets)
    for label, path in (("train.tokenizer", train.tokenizer), ("train.model.pretrained", train.model.pretrained)):
        # "org/name" or "name" may be a hub model; anything else that is not there is a typo.
        local = path is not None and (path.startswith((".", "/", "~")) or path.count("/") > 1)
        if local and not Path(path).expanduser().exists():
            raise ConfigError(f"{label}: {path!r} does not exist (resolved from {Path.cwd()})")
    device = resolve_device(train.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is visible")
    if train.precision == "bf16":
        precision = "bf16"
    elif train.precision == "fp32":
        precision = "fp32"
    else:
        import torch

        precision = "bf16" if compute_dtype(device) == torch.bfloat16 else "fp32"
    seed = train.seed if train.seed is not None else config.run.seed
    return TrainPlan(train, str(data_dir), str(out_dir), seed, train.total_steps, device, precision)


def data_columns(train: TrainConfig) -> dict[str, str]:
    """The shard columns a document is made of, by the ``train.data`` key that names each."""
    data = train.data
    if data.format == "text":
        return {"text_field": data.text_field}
    return {"prompt_field": data.prompt_field, "response_field": data.response_field}


def check_data_columns(train: TrainConfig, data_dir: Path | str) -> None:
    """Every shard has the columns ``train.data`` names; ConfigError naming the key otherwise."""
    for f in shard_files(data_dir):
        names = open_shard(f).schema_arrow.names
        for key, column in data_columns(train).items():
            if column not in names:
                extra = [n for n in names if n not in ("id", "position")]
                raise ConfigError(f"train.data.{key}: the shards have no column {column!r} ({storage_name(f)} has {extra}); "
                                  "the run keeps an input record's extra fields as columns of the same name")


def _fingerprint(plan: TrainPlan, tokenizer: Any) -> str:
    """What fixes the trajectory: a changed value here makes old checkpoints unusable."""
    manifest = read_manifest(plan.data_dir)
    shards = [s.get("sha256") for s in manifest.get("shards", [])]
    train = plan.train.model_dump(mode="json", exclude={*_FREE_KEYS, *_NUMERICS_KEYS})
    # Sections added later are left out at their defaults, so older training folders still resume.
    for key, default in (("data", DataConfig()), ("augment", AugmentConfig()), ("record", RecordConfig())):
        if train[key] == default.model_dump(mode="json"):
            del train[key]
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_json({"train": train, "seed": plan.seed, "shards": shards, "vocab": sha256_json(vocab),
                        "eos": tokenizer.eos_token_id, "total_steps": plan.total_steps})


# --------------------------------------------------------------------------- tokenizer and model


def resolve_tokenizer(plan: TrainPlan, log: Log = _stderr) -> tuple[Any, str]:
    """(tokenizer, where it came from); see the module docstring for the order."""
    train = plan.train
    data_dir, out_dir = plan.data_dir, Path(plan.out_dir)
    if train.tokenizer:
        return _load_tokenizer(train.tokenizer, train.model.trust_remote_code), f"train.tokenizer {train.tokenizer}"
    if train.model.pretrained:
        return (_load_tokenizer(train.model.pretrained, train.model.trust_remote_code),
                f"model.pretrained {train.model.pretrained}")
    manifest = read_manifest(data_dir)
    reference = (manifest.get("artifacts") or {}).get("reference_lm")
    if reference:
        return _load_tokenizer(str(local_artifact(data_dir, reference)), False), f"reference LM {reference}"
    saved = out_dir / "tokenizer"
    marker = saved / "curriculum_tokenizer.json"
    if marker.is_file():
        return _load_tokenizer(str(saved), False), json.loads(marker.read_text())["source"]
    texts = _tokenizer_sample(data_dir, train.tokenizer_sample_docs, plan.seed, list(data_columns(train).values()))
    log(f"[train] training a {train.tokenizer_vocab_size}-token BPE tokenizer on {len(texts)} sampled documents")
    return train_bpe_tokenizer(texts, vocab_size=train.tokenizer_vocab_size), (
        f"BPE trained on {len(texts)} hash-sampled documents (vocab {train.tokenizer_vocab_size}, seed {plan.seed})")


def save_resolved_tokenizer(config: JobConfig, data: Path, folder: Path, work: Path, log: Log, note: str) -> str:
    """The tokenizer the trainer would resolve for ``data``, saved once to ``folder`` for several runs to
    share (so their losses are in the same units); its path. Built under a temporary name and swapped
    in whole; ``curriculum_tokenizer.json``, written last, marks it complete."""
    if (folder / "curriculum_tokenizer.json").is_file():
        return str(folder.resolve())
    tokenizer, source = resolve_tokenizer(plan_training(config, data, work), log)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "curriculum_tokenizer.json", {"source": f"{note}: {source}"})
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return str(folder.resolve())

def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {type(exc).__name__}: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {path!r} has no EOS token; the loader separates documents with it")
    return tokenizer


def _tokenizer_sample(data_dir: Path | str, docs: int, seed: int, columns: list[str]) -> list[str]:
    """About ``docs`` documents (``columns`` joined) drawn by a seeded hash of their id; sorted by id."""
    files = shard_files(data_dir)
    rows = sum(open_shard(f).metadata.num_rows for f in files)
    share = min(1.0, docs / max(rows, 1))
    picked: list[tuple[str, str]] = []
    for f in files:
        for batch in open_shard(f).iter_batches(batch_size=2048, columns=["id", *columns]):
            ids = batch.column(0).to_pylist()
            parts = [batch.column(i + 1).to_pylist() for i in range(len(columns))]
            texts = ["".join(p or "" for p in row) for row in zip(*parts)]
            draws = uniform(ids, seed, "train.tokenizer")
            picked.extend((i, t) for i, t, u in zip(ids, texts, draws) if u < share and t)
    picked.sort()
    return [t for _, t in picked[:docs]]


def build_model(plan: TrainPlan, tokenizer: Any):
    """The model to train, in fp32: built from ``model.config`` or loaded from ``model.pretrained``."""
    spec = plan.train.model
    if spec.pretrained:
        import torch

        model, _ = load_causal_lm(spec.pretrained, spec.trust_remote_code, dtype=torch.float32)
        if plan.train.augment.masked_thought is not None:
            fit_embeddings(model, len(tokenizer))
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ConfigError(f"train.model.pretrained {spec.pretrained!r} has {model.get_input_embeddings().num_embeddings} "
                              f"embeddings but the tokenizer has {len(tokenizer)} tokens")
    else:
        model = build_causal_lm(spec.config, tokenizer, seed=plan.seed)
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and plan.train.seq_len > limit:
        raise ConfigError(f"train.seq_len {plan.train.seq_len} exceeds the model's {limit} positions")
    return model


def fit_embeddings(model: Any, vocab: int) -> None:
    """Grow the embeddings to ``vocab`` rows (the added mask token), each new row the mean of the old
    ones: a deterministic start (transformers' default samples the new rows at random)."""
    import torch

    old = model.get_input_embeddings().num_embeddings
    if old >= vocab:
        return
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and layer.weight.shape[0] == vocab:
                layer.weight[old:] = layer.weight[:old].mean(dim=0)


# --------------------------------------------------------------------------- the loop


def _runs(positions: Any) -> list[list[int]]:
    """Run-length encoding of a batch's token positions (padding dropped): [[position, tokens], ...]."""
    import torch

    flat = positions.reshape(-1)
    flat = flat[flat >= 0]
    if flat.numel() == 0:
        return []
    values, counts = torch.unique_consecutive(flat, return_counts=True)
    return [[int(v), int(c)] for v, c in zip(values, counts)]


@dataclass
class Worker:
    """What one rank holds while it trains: the model (and its DDP wrapper), optimizer and loader."""

    plan: TrainPlan
    rank: int
    world: int
    device: str
    autocast_dtype: Any
    tokenizer: Any
    model: Any
    train_model: Any
    optimizer: Any
    loader: CurriculumLoader
    grad_norm: float | None = None  # the last step's global gradient norm (before clipping)

    def all_sum(self, value: float) -> float:
        """``value`` summed over the ranks (float64)."""
        if self.world == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.item()


@dataclass
class Progress:
    """The loop's counters; saved in every checkpoint, so a resumed run continues them exactly."""

    step: int = 0
    tokens: int = 0
    window: list[float] = field(default_factory=lambda: [0.0, 0])  # (loss sum, steps) since the last log line


def setup_worker(plan: TrainPlan, rank: int, world: int) -> tuple[Worker, Any]:
    """Torch settings, model, loader and optimizer of one rank; with the newest checkpoint's
    trainer state (tensors) when there is one to resume from, else None."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = plan.train
    out_dir = Path(plan.out_dir)
    if plan.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=plan.device == "cuda")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _quiet_transformers()
    device = plan.device
    if world > 1 and device == "cuda":
        import ray.train.torch

        device = str(ray.train.torch.get_device())

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir / "tokenizer"))
    model = build_model(plan, tokenizer)
    model.train()
    loader = CurriculumLoader(plan.data_dir, tokenizer, cfg.seq_len, cfg.micro_batch, cfg.packing,
                              world_size=world, rank=rank, num_workers=cfg.loader_workers, positions=cfg.trace,
                              **loader_data_options(cfg, tokenizer, plan.seed))
    trainer_state = None
    found = complete_checkpoints(out_dir)
    if found:
        load_model_weights(model, found[-1][1])
        trainer_state = load_file(str(found[-1][1] / TRAINER_STATE))
    model.to(device)
    # Weight decay on matrices only, not on biases and norm gains (the GPT-2/nanoGPT convention).
    opt = cfg.optimizer
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=opt.lr, betas=opt.betas, eps=opt.eps)
    train_model = model
    if world > 1:
        import ray.train.torch

        train_model = ray.train.torch.prepare_model(model, move_to_device=False)
    autocast_dtype = torch.bfloat16 if plan.precision == "bf16" else None
    worker = Worker(plan, rank, world, device, autocast_dtype, tokenizer, model, train_model, optimizer, loader)
    return worker, trainer_state


def loader_data_options(cfg: TrainConfig, tokenizer: Any, seed: int) -> dict[str, Any]:
    """The loader's column and masking arguments for ``train.data`` and ``train.augment``."""
    options: dict[str, Any] = {"text_column": cfg.data.text_field}
    if cfg.data.format == "prompt_response":
        options.update(prompt_column=cfg.data.prompt_field, response_column=cfg.data.response_field)
    masked = cfg.augment.masked_thought
    if masked is not None and masked.ratio > 0:
        options.update(mask_ratio=masked.ratio, mask_token_id=mask_token_id(tokenizer, masked.token), mask_seed=seed)
    return options


def resume(worker: Worker, trainer_state: Any, log: Log) -> tuple[Progress, int | None]:
    """Restore optimizer, loader cursor, counters and RNG from the newest checkpoint, or seed a fresh
    run; cut the metrics (and trace) back to the step resumed from. Returns (progress, resumed step)."""
    import torch

    plan, rank = worker.plan, worker.rank
    out_dir = Path(plan.out_dir)
    progress, resumed_from = Progress(), None
    if trainer_state is not None:
        resumed_from, folder = complete_checkpoints(out_dir)[-1]
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("fingerprint") != plan.fingerprint:
            raise ConfigError(f"{out_dir}: its checkpoints come from another training config or data; "
                              "use a new --out (or delete the old one)")
        load_optimizer(worker.optimizer, trainer_state, state["optimizer_param_groups"])
        worker.loader.load_state_dict(state["loader"])
        progress = Progress(state["step"], state["tokens"], list(state["window"]))
        torch.set_rng_state(trainer_state[f"rng.rank{rank}.cpu"])
        if worker.device.startswith("cuda") and f"rng.rank{rank}.cuda" in trainer_state:
            torch.cuda.set_rng_state(trainer_state[f"rng.rank{rank}.cuda"])
        if rank == 0:
            log(f"[train] resuming from {folder.name} (step {progress.step} of {plan.total_steps})")
    else:
        torch.manual_seed(plan.seed * 1_000_003 + rank + 1)  # dropout: different on each rank
    if rank == 0:
        truncate_jsonl(out_dir / "metrics.jsonl", progress.step)
    if plan.train.trace:
        (out_dir / "trace").mkdir(parents=True, exist_ok=True)
        truncate_jsonl(out_dir / "trace" / f"rank-{rank}.jsonl", progress.step)
    return progress, resumed_from


def train_step(worker: Worker, micro: list[dict[str, Any]], lr: float, trace: Any, step: int) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (global mean loss, global tokens).

    The loss is the token-weighted mean over the whole global batch: each micro-batch's summed
    NLL is divided by the token count across micro-batches and ranks, so one rank and N ranks
    (and any ``grad_accum``) optimize the same objective.
    """
    import torch
    import torch.nn.functional as F

    device, world = worker.device, worker.world
    for group in worker.optimizer.param_groups:
        group["lr"] = lr
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    n_global = max(1.0, worker.all_sum(float(sum(counts))))
    loss_sum = 0.0
    for a, batch in enumerate(micro):
        last_micro = a == len(micro) - 1
        sync = contextlib.nullcontext() if world == 1 or last_micro else worker.train_model.no_sync()
        ids = batch["input_ids"].to(device)
        with sync:
            with torch.autocast(device_type=device.split(":")[0], dtype=worker.autocast_dtype,
                                enabled=worker.autocast_dtype is not None):
                logits = worker.train_model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                  ignore_index=-100, reduction="sum")
            # DDP averages gradients over ranks, hence * world: the global token mean.
            (nll * (world / n_global)).backward()
        loss_sum += float(nll.detach())
        if trace is not None:
            trace.write(json.dumps({"step": step + 1, "micro": a, "batch": batch["index"],
                                    "runs": _runs(batch["positions"])}) + "\n")
    grad_clip = worker.plan.train.optimizer.grad_clip
    if grad_clip is not None:
        worker.grad_norm = float(torch.nn.utils.clip_grad_norm_(worker.train_model.parameters(), grad_clip))
    worker.optimizer.step()
    worker.optimizer.zero_grad(set_to_none=True)
    tokens = int(worker.all_sum(float(sum(int(b["attention_mask"].sum()) for b in micro))))
    return worker.all_sum(loss_sum) / n_global, tokens


def log_metrics(worker: Worker, progress: Progress, lr: float, cursor: dict[str, int], evaluate_now: bool,
                eval_data: dict[str, Any], metrics: Any, log: Log) -> None:
    """Rank 0 writes one metrics line (train loss over the window, eval losses when due)."""
    cfg = worker.plan.train
    line = {"step": progress.step, "tokens": progress.tokens, "lr": lr,
            "train_loss": progress.window[0] / progress.window[1], "epoch": cursor["epoch"], "position": cursor["row"]}
    if evaluate_now:
        losses = evaluate(worker.model, eval_data, cfg.eval.batch_size, worker.device, worker.autocast_dtype)
        line.update({f"eval_{k}": v for k, v in losses.items()})
    metrics.write(json.dumps(line) + "\n")
    metrics.flush()
    if progress.step % (cfg.log_every * 10) == 0 or evaluate_now or progress.step == worker.plan.total_steps:
        log(f"[train] step {progress.step}/{worker.plan.total_steps} lr {lr:.3g} loss {line['train_loss']:.4f}"
            + "".join(f" {k} {v:.4f}" for k, v in line.items() if k.startswith("eval_")))


def checkpoint(worker: Worker, progress: Progress, cursor: dict[str, int], lr: float, schedule: Any) -> None:
    """Every rank hands in its RNG state; rank 0 writes the checkpoint and prunes old ones."""
    import torch

    rank, world, cfg = worker.rank, worker.world, worker.plan.train
    rng = {"cpu": torch.get_rng_state()}
    if worker.device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (rng, cursor))
        cursors = {json.dumps(c, sort_keys=True) for _, c in gathered}
        if len(cursors) != 1:
            raise CurriculumError(f"ranks disagree on the loader position: {sorted(cursors)}")
        all_rng = {f"rng.rank{r}.{k}": v for r, (g, _) in enumerate(gathered) for k, v in g.items()}
    else:
        all_rng = {f"rng.rank0.{k}": v for k, v in rng.items()}
    if rank == 0:
        plan = worker.plan
        state = {"step": progress.step, "tokens": progress.tokens, "loader": cursor, "window": progress.window,
                 "schedule": schedule.describe(), "lr": lr, "world_size": world,
                 "fingerprint": plan.fingerprint, "precision": plan.precision,
                 "numerics": {k: getattr(cfg, k) for k in _NUMERICS_KEYS}}
        save_checkpoint(Path(plan.out_dir), progress.step, worker.model, worker.tokenizer, worker.optimizer, all_rng, state)
        prune_checkpoints(Path(plan.out_dir), cfg.checkpoint_every, cfg.averaging.last_k, plan.total_steps)
    if world > 1:
        torch.distributed.barrier()


def train_loop(plan: TrainPlan, rank: int = 0, world: int = 1, log: Log = _stderr) -> dict[str, Any]:
    """The training loop of one worker (rank ``rank`` of ``world``). Returns throughput figures."""
    cfg = plan.train
    out_dir = Path(plan.out_dir)
    worker, trainer_state = setup_worker(plan, rank, world)
    progress, resumed_from = resume(worker, trainer_state, log)
    schedule = schedule_from_config(cfg.schedule, cfg.optimizer.lr, plan.total_steps)
    eval_data = load_eval_sets(cfg.eval.sets, worker.tokenizer, cfg.seq_len, cfg.eval.max_tokens) if rank == 0 else {}
    metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    trace = open(out_dir / "trace" / f"rank-{rank}.jsonl", "a", encoding="utf-8") if cfg.trace else None
    recorder = None
    if cfg.record.fut is not None and rank == 0:
        truncate_jsonl(out_dir / "fut" / FUT_STEPS, progress.step)
        recorder = FutRecorder(worker, eval_data, out_dir)
    batches = iter(worker.loader)
    started, start_step, start_tokens = time.time(), progress.step, progress.tokens
    every = cfg.checkpoint_every
    try:
        while progress.step < plan.total_steps:
            lr = schedule(progress.step)
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            if recorder is not None:
                recorder.before_step(progress.step)
            loss, tokens = train_step(worker, micro, lr, trace, progress.step)
            progress.step += 1
            if recorder is not None:
                recorder.after_step(progress.step, lr, worker.grad_norm)
            progress.tokens += tokens
            progress.window[0] += loss
            progress.window[1] += 1
            cursor = micro[-1]["state"]
            last = progress.step == plan.total_steps
            evaluate_now = bool(eval_data) and (progress.step % cfg.eval.every == 0 or last)
            if progress.step % cfg.log_every == 0 or evaluate_now or last:
                if rank == 0:
                    log_metrics(worker, progress, lr, cursor, evaluate_now, eval_data, metrics, log)
                progress.window = [0.0, 0]
            if trace is not None:
                trace.flush()
            if on_grid(progress.step, plan.total_steps, every):  # the grid ends on the last step
                checkpoint(worker, progress, cursor, lr, schedule)
    finally:
        if metrics is not None:
            metrics.close()
        if trace is not None:
            trace.close()
    seconds = time.time() - started
    done = progress.tokens - start_tokens
    return {"seconds": round(seconds, 3), "tokens": done, "steps": progress.step - start_step,
            "tokens_per_second": round(done / seconds, 1) if seconds > 0 else None,
            "resumed_from": resumed_from, "device": worker.device, "precision": plan.precision, "world_size": world}


def _quiet_transformers() -> None:
    """No per-checkpoint progress bars from save_pretrained / from_pretrained."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    plan = loop_config["plan"]
    stats = train_loop(plan, rank, world)
    if rank == 0:  # not ray.train.report: that is a barrier every rank would have to join
        (Path(plan.out_dir) / ATTEMPT_FILE).write_text(json.dumps(stats) + "\n")


def _train_with_ray(plan: TrainPlan, config: JobConfig, address: str | None, log: Log) -> dict[str, Any]:
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    connect_ray(config.ray, address)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=plan.train.workers, use_gpu=plan.device == "cuda"),
        run_config=RayRunConfig(name=f"train-{uuid.uuid4().hex[:8]}", storage_path=str(Path(plan.out_dir).resolve() / "ray")),
    )
    (Path(plan.out_dir) / ATTEMPT_FILE).unlink(missing_ok=True)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; say what failed
        failures = getattr(exc, "worker_failures", None) or {}
        detail = "; ".join(f"rank {r}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
                           for r, e in sorted(failures.items())) or str(exc).splitlines()[0]
        raise CurriculumError(f"Ray Train training failed: {detail}") from None
    attempt = Path(plan.out_dir) / ATTEMPT_FILE
    return json.loads(attempt.read_text()) if attempt.is_file() else {}


# --------------------------------------------------------------------------- the command


def prepare_output(plan: TrainPlan, log: Log = _stderr) -> tuple[Any, str]:
    """Resolve the tokenizer, check old checkpoints fit, then create OUT and save the tokenizer."""
    tokenizer, source = resolve_tokenizer(plan, log)
    masked = plan.train.augment.masked_thought
    if masked is not None:
        add_mask_token(tokenizer, masked.token)
    plan.fingerprint = _fingerprint(plan, tokenizer)
    out_dir = Path(plan.out_dir)
    found = complete_checkpoints(out_dir)
    if found:
        state = json.loads((found[-1][1] / STATE_FILE).read_text())
        if state.get("fingerprint") != plan.fingerprint:
            raise ConfigError(f"{out_dir}: holds checkpoints of another training (model, data, tokenizer, batch, "
                              "schedule, optimizer, seed or workers differ); use a new --out")
        _check_numerics(out_dir, state.get("numerics") or {}, plan.train)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out_dir)
    saved = out_dir / "tokenizer"
    tmp = out_dir / f".tokenizer.tmp-{uuid.uuid4().hex[:8]}"
    tokenizer.save_pretrained(tmp)
    (tmp / "curriculum_tokenizer.json").write_text(json.dumps({"source": source}) + "\n")
    if saved.exists():
        shutil.rmtree(saved)
    tmp.rename(saved)
    (out_dir / "train_config.json").write_text(json.dumps(
        {"train": plan.train.model_dump(mode="json"), "data": run_dir_label(plan.data_dir), "seed": plan.seed,
         "total_steps": plan.total_steps, "tokenizer": source, "fingerprint": plan.fingerprint}, indent=2) + "\n")
    return tokenizer, source


def _check_numerics(out_dir: Path, saved: dict[str, Any], train: TrainConfig) -> None:
    """Refuse to resume with other ``threads`` or ``deterministic`` than the checkpoints were written with."""
    for key in _NUMERICS_KEYS:
        if key in saved and saved[key] != getattr(train, key):
            was, now = json.dumps(saved[key]), json.dumps(getattr(train, key))
            raise ConfigError(
                f"{out_dir}: its checkpoints were written with train.{key}: {was}, and this config says {now}. "
                f"Resuming would not give the weights an uninterrupted run gives, bit for bit: {_NUMERICS_WHY[key]}. "
                f"Set train.{key} back to {was}, or use a new --out.")


def _copy_hf(folder: Path, target: Path) -> None:
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name not in (STATE_FILE, TRAINER_STATE):
            shutil.copyfile(f, tmp / f.name)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def finalize(plan: TrainPlan, tokenizer: Any, stats: dict[str, Any], log: Log = _stderr) -> dict[str, Any]:
    """Write OUT/final, OUT/averaged and OUT/summary.json from the checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = plan.train
    out_dir = Path(plan.out_dir)
    _quiet_transformers()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    found = complete_checkpoints(out_dir)
    if not found or found[-1][0] != plan.total_steps:
        raise CurriculumError(f"{out_dir}: training stopped before step {plan.total_steps}; rerun to resume")
    last_state = json.loads((found[-1][1] / STATE_FILE).read_text())
    _copy_hf(found[-1][1], out_dir / "final")
    averaging = None
    if cfg.averaging.method != "none":
        every = cfg.checkpoint_every
        window = [(s, f) for s, f in found if on_grid(s, plan.total_steps, every)][-cfg.averaging.last_k:]
        averaging = average_checkpoints([f for _, f in window], out_dir / "averaged", cfg.averaging.method,
                                        cfg.averaging.alpha, cfg.averaging.dtype,
                                        extra={"steps": [s for s, _ in window], "every": every,
                                               "last_k": cfg.averaging.last_k,
                                               "window_steps": cfg.averaging.window_steps(plan.total_steps)})
        if len(window) < cfg.averaging.last_k:
            log(f"[train] averaged {len(window)} checkpoints (fewer than last_k={cfg.averaging.last_k}: the run is short)")
    elif (out_dir / "averaged").exists():
        shutil.rmtree(out_dir / "averaged")
    device = plan.device
    autocast_dtype = torch.bfloat16 if plan.precision == "bf16" else None
    eval_data = load_eval_sets(cfg.eval.sets, tokenizer, cfg.seq_len, cfg.eval.max_tokens)
    results: dict[str, Any] = {}
    for name in ("final", "averaged"):
        folder = out_dir / name
        if not folder.is_dir() or not eval_data:
            results[name] = {} if folder.is_dir() else None
            continue
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
        losses = evaluate(model, eval_data, cfg.eval.batch_size, device, autocast_dtype)
        results[name] = {f"eval_{k}": v for k, v in losses.items()}
        del model
    metrics = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = {
        "steps": plan.total_steps,
        "tokens": last_state["tokens"],
        "epochs": round(last_state["loader"]["epoch"] + last_state["loader"]["row"] / _rows(plan), 4),
        "train_loss": metrics[-1]["train_loss"] if metrics else None,
        "final": results["final"],
        "averaged": results["averaged"],
        "averaging": averaging,
        "schedule": last_state["schedule"],
        "data": run_dir_label(plan.data_dir),
        "tokenizer": json.loads((out_dir / "tokenizer" / "curriculum_tokenizer.json").read_text())["source"],
        "workers": cfg.workers,
        "device": device,
        "precision": plan.precision,
        "last_attempt": stats,
    }
    if cfg.record.fut is not None:
        summary["record"] = {"fut": record_summary(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _rows(plan: TrainPlan) -> int:

    return max(1, sum(open_shard(f).metadata.num_rows for f in shard_files(plan.data_dir)))


def run_training(config: JobConfig, data: str | Path | None = None, out: str | Path | None = None,
                 ray_address: str | None = None, log: Log = _stderr) -> dict[str, Any]:
    """Train (or resume) as the config's ``train:`` section says; return the summary."""
    plan = plan_training(config, data, out)
    tokenizer, source = prepare_output(plan, log)
    log(f"[train] {plan.total_steps} steps of {plan.train.batch_size} x {plan.train.seq_len} tokens on {plan.device} "
        f"({plan.precision}), {plan.train.workers} worker(s); tokenizer: {source}")
    averaging = plan.train.averaging
    if averaging.method != "none":
        every = plan.train.checkpoint_every
        first = plan.total_steps - (averaging.last_k - 1) * every
        log(f"[train] a checkpoint every {every} steps, ending on step {plan.total_steps}; {averaging.method} of the "
            f"last {averaging.last_k} (from step {max(first, plan.total_steps % every or every)})")
    if plan.train.workers > 1:
        stats = _train_with_ray(plan, config, ray_address, log)
    else:
        stats = train_loop(plan, 0, 1, log)
    return finalize(plan, tokenizer, stats, log)
