"""``curriculum train``: a causal LM trained on a run folder's shards, in shard order.

The loop reads top to bottom (nanoGPT style): LR from the schedule, ``grad_accum`` micro-batches
from the curriculum loader, AdamW with gradient clipping, then logging, eval and checkpoints.
The schedule and averaging are designed with the order (Luo et al., ICLR 2026; METHODS.md §4).

Decisions (see also README.md, "Training"):

- **Folders.** ``--data`` defaults to ``runs/<run.name>``; ``--out`` to ``runs/<run.name>-train``
  (beside the run folder, not inside it: the run folder is an input that ``curriculum run``
  rewrites, and one data folder often feeds several trainings).
- **Tokenizer.** ``train.tokenizer``, else ``model.pretrained``'s own, else the run's reference LM
  (``manifest.json`` ``artifacts.reference_lm``), else a byte-level BPE trained on a seeded hash
  sample of ``tokenizer_sample_docs`` documents (sampled by id, not by position, so it does not
  see only the start of the curriculum). The tokenizer used is saved to ``OUT/tokenizer``.
- **Loss.** The token-weighted mean next-token NLL of the whole global batch: each micro-batch's
  summed loss is divided by the batch's token count across micro-batches and workers, so one
  worker and N workers (and any ``grad_accum``) optimize the same objective.
- **Precision.** fp32 weights and optimizer; bf16 autocast on CUDA (``precision: auto``), fp32 on CPU.
- **Checkpoints.** Every ``averaging.every`` steps and at the last step, in
  ``OUT/checkpoints/step-NNNNNNN/``: the model in Hugging Face layout (loadable as is), the
  tokenizer, ``trainer_state.safetensors`` (AdamW tensors and every rank's RNG state; no pickle)
  and ``state.json`` (step, tokens, loader cursor, schedule, logging window, fingerprint). A
  checkpoint is written to a temporary folder and renamed, so a folder with ``state.json`` is
  complete. The last ``averaging.last_k`` checkpoints on the grid plus the newest are kept.
- **Resume.** Running again with the same ``--out`` resumes from the newest complete checkpoint;
  ``metrics.jsonl`` (and the trace) are cut back to that step first. With deterministic
  algorithms on (the default) a resumed CPU run ends with the same weights and the same
  metrics as an uninterrupted one. A changed config that would change the trajectory (model,
  data, tokenizer, batch, schedule, optimizer, seed, workers…) is refused: use a new ``--out``.
  Eval, logging, averaging method and checkpoint spacing may change between attempts.
- **Outputs.** ``OUT/final/`` and ``OUT/averaged/`` (Hugging Face layout; ``averaging.json``),
  ``OUT/metrics.jsonl`` and ``OUT/summary.json`` (final and averaged eval losses). The averaging
  window is the last ``last_k`` checkpoints on the ``every`` grid, where the last step always
  counts as one.
- **Workers.** ``train.workers > 1`` runs the same loop on Ray Train's ``TorchTrainer`` (DDP,
  gloo on CPU). Rank r reads its slice of the loader (every world-th micro-batch), so the global
  order is the curriculum order; the loader cursor, which Ray's iterators do not save, is
  stored in the checkpoint. ``OUT`` must be on storage every worker sees (one machine, or NFS);
  Ray Train keeps its own run records in ``OUT/ray/``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, sha256_json
from pipeline.errors import ConfigError, CurriculumError
from pipeline.manifest import read_manifest
from pipeline.train.config import TrainConfig

Log = Callable[[str], None]
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TRAINER_STATE = "trainer_state.safetensors"
ATTEMPT_FILE = ".attempt.json"  # rank 0's throughput figures, for the driver (Ray workers)
# Keys of the train config that do not change the trajectory: they may differ on resume.
_FREE_KEYS = ("eval", "log_every", "loader_workers", "trace", "averaging", "deterministic", "threads")


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


def default_paths(config: Config, data: str | Path | None, out: str | Path | None) -> tuple[Path, Path]:
    data_dir = Path(data) if data else Path("runs") / config.run.name
    out_dir = Path(out) if out else Path("runs") / f"{config.run.name}-train"
    return data_dir, out_dir


def plan_training(config: Config, data: str | Path | None = None, out: str | Path | None = None) -> TrainPlan:
    """Validate what can be checked before anything is written; ConfigError otherwise."""
    from pipeline.lm import resolve_device
    from pipeline.train.evaluation import check_eval_sets
    from pipeline.train.loader import shard_files

    train = TrainConfig.model_validate(config.train or {})
    data_dir, out_dir = default_paths(config, data, out)
    if not (data_dir / "manifest.json").is_file():
        raise ConfigError(f"{data_dir}: not a run folder (no manifest.json); run `curriculum run CONFIG` "
                          "first, or pass --data RUN_DIR")
    shard_files(data_dir)
    if out_dir.resolve() == data_dir.resolve():
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
        from pipeline.lm import compute_dtype

        import torch

        precision = "bf16" if compute_dtype(device) == torch.bfloat16 else "fp32"
    seed = train.seed if train.seed is not None else config.run.seed
    return TrainPlan(train, str(data_dir), str(out_dir), seed, train.total_steps, device, precision)


def _fingerprint(plan: TrainPlan, tokenizer: Any) -> str:
    """What fixes the trajectory: a changed value here makes old checkpoints unusable."""
    manifest = read_manifest(Path(plan.data_dir))
    shards = [s.get("sha256") for s in manifest.get("shards", [])]
    train = plan.train.model_dump(mode="json", exclude=set(_FREE_KEYS))
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_json({"train": train, "seed": plan.seed, "shards": shards, "vocab": sha256_json(vocab),
                        "eos": tokenizer.eos_token_id, "total_steps": plan.total_steps})


# --------------------------------------------------------------------------- tokenizer and model


def resolve_tokenizer(plan: TrainPlan, log: Log = _stderr) -> tuple[Any, str]:
    """(tokenizer, where it came from); see the module docstring for the order."""
    from pipeline.lm import train_bpe_tokenizer

    train = plan.train
    data_dir, out_dir = Path(plan.data_dir), Path(plan.out_dir)
    if train.tokenizer:
        return _load_tokenizer(train.tokenizer, train.model.trust_remote_code), f"train.tokenizer {train.tokenizer}"
    if train.model.pretrained:
        return (_load_tokenizer(train.model.pretrained, train.model.trust_remote_code),
                f"model.pretrained {train.model.pretrained}")
    manifest = read_manifest(data_dir)
    reference = (manifest.get("artifacts") or {}).get("reference_lm")
    if reference:
        return _load_tokenizer(str(data_dir / reference), False), f"reference LM {reference}"
    saved = out_dir / "tokenizer"
    marker = saved / "curriculum_tokenizer.json"
    if marker.is_file():
        return _load_tokenizer(str(saved), False), json.loads(marker.read_text())["source"]
    texts = _tokenizer_sample(data_dir, train.tokenizer_sample_docs, plan.seed)
    log(f"[train] training a {train.tokenizer_vocab_size}-token BPE tokenizer on {len(texts)} sampled documents")
    return train_bpe_tokenizer(texts, vocab_size=train.tokenizer_vocab_size), (
        f"BPE trained on {len(texts)} hash-sampled documents (vocab {train.tokenizer_vocab_size}, seed {plan.seed})")


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from pipeline.errors import ModelLoadError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {type(exc).__name__}: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {path!r} has no EOS token; the loader separates documents with it")
    return tokenizer


def _tokenizer_sample(data_dir: Path, docs: int, seed: int) -> list[str]:
    """About ``docs`` documents drawn by a seeded hash of their id; sorted by id (deterministic)."""
    import pyarrow.parquet as pq

    from pipeline.hashing import uniform
    from pipeline.train.loader import shard_files

    files = shard_files(data_dir)
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    share = min(1.0, docs / max(rows, 1))
    picked: list[tuple[str, str]] = []
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=2048, columns=["id", "text"]):
            ids = batch.column(0).to_pylist()
            texts = batch.column(1).to_pylist()
            draws = uniform(ids, seed, "train.tokenizer")
            picked.extend((i, t) for i, t, u in zip(ids, texts, draws) if u < share and t)
    picked.sort()
    return [t for _, t in picked[:docs]]


def build_model(plan: TrainPlan, tokenizer: Any):
    """The model to train, in fp32: built from ``model.config`` or loaded from ``model.pretrained``."""
    from pipeline.lm import build_causal_lm, load_causal_lm

    spec = plan.train.model
    if spec.pretrained:
        import torch

        model, _ = load_causal_lm(spec.pretrained, spec.trust_remote_code, dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ConfigError(f"train.model.pretrained {spec.pretrained!r} has {model.get_input_embeddings().num_embeddings} "
                              f"embeddings but the tokenizer has {len(tokenizer)} tokens")
    else:
        model = build_causal_lm(spec.config, tokenizer, seed=plan.seed)
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and plan.train.seq_len > limit:
        raise ConfigError(f"train.seq_len {plan.train.seq_len} exceeds the model's {limit} positions")
    return model


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith("step-") and folder.name[5:].isdigit() and (folder / STATE_FILE).is_file():
                found.append((int(folder.name[5:]), folder))
    return sorted(found)


def _optimizer_tensors(optimizer: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: Any, tensors: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: Any,
                    rng: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write one checkpoint atomically (temporary folder, then rename)."""
    from safetensors.torch import save_file

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out_dir, step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tensors, groups = _optimizer_tensors(optimizer)
    tensors.update({k: v.contiguous() for k, v in rng.items()})
    save_file(tensors, str(tmp / TRAINER_STATE), metadata={"format": "pt"})
    (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer_param_groups": groups}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def prune_checkpoints(out_dir: Path, every: int, keep: int) -> None:
    """Keep the last ``keep`` checkpoints on the ``every`` grid plus the newest; drop stale temporaries."""
    found = complete_checkpoints(out_dir)
    if not found:
        return
    grid = [s for s, _ in found if s % every == 0][-keep:]
    keep_steps = set(grid) | {found[-1][0]}
    for step, folder in found:
        if step not in keep_steps:
            shutil.rmtree(folder, ignore_errors=True)


def _clean_temporaries(out_dir: Path) -> None:
    root = out_dir / CHECKPOINTS
    if root.is_dir():
        for folder in root.glob(".step-*.tmp-*"):
            shutil.rmtree(folder, ignore_errors=True)


def load_model_weights(model: Any, folder: Path) -> None:
    """Load a checkpoint's model.safetensors into ``model``; only tied weights may be absent."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = model.state_dict(keep_vars=True)
    loaded_ptrs = {params[k].data_ptr() for k in weights if k in params}
    untied = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
    if untied or unexpected:
        raise CurriculumError(f"checkpoint {folder} does not fit the model: missing {untied[:5]}, unexpected {unexpected[:5]}")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (a resumed run rewrites the rest identically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


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


def train_loop(plan: TrainPlan, rank: int = 0, world: int = 1, log: Log = _stderr) -> dict[str, Any]:
    """The training loop of one worker (rank ``rank`` of ``world``). Returns throughput figures."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from pipeline.train.evaluation import evaluate, load_eval_sets
    from pipeline.train.loader import CurriculumLoader
    from pipeline.train.schedules import schedule_from_config

    cfg = plan.train
    out_dir = Path(plan.out_dir)
    distributed = world > 1
    if plan.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=plan.device == "cuda")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _quiet_transformers()
    device = plan.device
    if distributed and device == "cuda":
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    autocast_dtype = torch.bfloat16 if plan.precision == "bf16" else None

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir / "tokenizer"))
    model = build_model(plan, tokenizer)
    model.train()
    # Weight decay on matrices only, not on biases and norm gains (the GPT-2/nanoGPT convention).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt_cfg = cfg.optimizer
    optimizer_args = dict(lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps)
    loader = CurriculumLoader(plan.data_dir, tokenizer, cfg.seq_len, cfg.micro_batch, cfg.packing,
                              world_size=world, rank=rank, num_workers=cfg.loader_workers)

    step, tokens, window = 0, 0, [0.0, 0]
    found = complete_checkpoints(out_dir)
    resumed_from, state, extra = None, None, None
    if found:
        from safetensors.torch import load_file

        resumed_from, folder = found[-1]
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("fingerprint") != plan.fingerprint:
            raise ConfigError(f"{out_dir}: its checkpoints come from another training config or data; "
                              "use a new --out (or delete the old one)")
        load_model_weights(model, folder)
        extra = load_file(str(folder / TRAINER_STATE))
    model.to(device)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], **optimizer_args)
    if state is not None:
        _load_optimizer(optimizer, extra, state["optimizer_param_groups"])
        loader.load_state_dict(state["loader"])
        step, tokens, window = state["step"], state["tokens"], list(state["window"])
        torch.set_rng_state(extra[f"rng.rank{rank}.cpu"])
        if device.startswith("cuda") and f"rng.rank{rank}.cuda" in extra:
            torch.cuda.set_rng_state(extra[f"rng.rank{rank}.cuda"])
        if rank == 0:
            log(f"[train] resuming from {found[-1][1].name} (step {step} of {plan.total_steps})")
    else:
        torch.manual_seed(plan.seed * 1_000_003 + rank + 1)  # dropout: different on each rank
    if rank == 0:
        _truncate_jsonl(out_dir / "metrics.jsonl", step)
    if cfg.trace:
        (out_dir / "trace").mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(out_dir / "trace" / f"rank-{rank}.jsonl", step)
    if distributed:
        import ray.train.torch

        train_model = ray.train.torch.prepare_model(model, move_to_device=False)
    else:
        train_model = model

    schedule = schedule_from_config(cfg.schedule, opt_cfg.lr, plan.total_steps)
    eval_data = load_eval_sets(cfg.eval.sets, tokenizer, cfg.seq_len, cfg.eval.max_tokens) if rank == 0 else {}
    metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    trace = open(out_dir / "trace" / f"rank-{rank}.jsonl", "a", encoding="utf-8") if cfg.trace else None

    def all_sum(value: float, dtype: Any = torch.float64) -> float:
        if not distributed:
            return value
        t = torch.tensor([value], dtype=dtype)
        torch.distributed.all_reduce(t)
        return t.item()

    batches = iter(loader)
    started, start_step, start_tokens = time.time(), step, tokens
    accum = cfg.grad_accum
    try:
        while step < plan.total_steps:
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(batches) for _ in range(accum)]
            counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
            n_global = max(1.0, all_sum(float(sum(counts))))
            loss_sum = 0.0
            for a, batch in enumerate(micro):
                sync = contextlib.nullcontext() if not distributed or a == accum - 1 else train_model.no_sync()
                ids = batch["input_ids"].to(device)
                with sync:
                    with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        logits = train_model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
                    labels = batch["labels"][:, 1:].to(device)
                    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                          ignore_index=-100, reduction="sum")
                    # DDP averages gradients over ranks, hence * world: the global token mean.
                    (nll * (world / n_global)).backward()
                loss_sum += float(nll.detach())
                if trace is not None:
                    trace.write(json.dumps({"step": step + 1, "micro": a, "batch": batch["index"],
                                            "runs": _runs(batch["positions"])}) + "\n")
            if opt_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(train_model.parameters(), opt_cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = all_sum(loss_sum) / n_global
            tokens += int(all_sum(float(sum(int(b["attention_mask"].sum()) for b in micro))))
            window[0] += step_loss
            window[1] += 1
            cursor = micro[-1]["state"]
            last = step == plan.total_steps
            do_eval = bool(eval_data) and (step % cfg.eval.every == 0 or last)
            do_ckpt = step % cfg.averaging.every == 0 or last
            if rank == 0 and (step % cfg.log_every == 0 or do_eval or last):
                line = {"step": step, "tokens": tokens, "lr": lr, "train_loss": window[0] / window[1],
                        "epoch": cursor["epoch"], "position": cursor["row"]}
                if do_eval:
                    losses = evaluate(model, eval_data, cfg.eval.batch_size, device, autocast_dtype)
                    line.update({f"eval_{k}": v for k, v in losses.items()})
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                window = [0.0, 0]
                if step % (cfg.log_every * 10) == 0 or do_eval or last:
                    log(f"[train] step {step}/{plan.total_steps} lr {lr:.3g} loss {line['train_loss']:.4f}"
                        + "".join(f" {k} {v:.4f}" for k, v in line.items() if k.startswith("eval_")))
            elif rank != 0 and (step % cfg.log_every == 0 or do_eval or last):
                window = [0.0, 0]
            if trace is not None:
                trace.flush()
            if do_ckpt:
                rng = {"cpu": torch.get_rng_state()}
                if device.startswith("cuda"):
                    rng["cuda"] = torch.cuda.get_rng_state()
                if distributed:
                    gathered: list[Any] = [None] * world
                    torch.distributed.all_gather_object(gathered, (rng, cursor))
                    cursors = {json.dumps(c, sort_keys=True) for _, c in gathered}
                    if len(cursors) != 1:
                        raise CurriculumError(f"ranks disagree on the loader position: {sorted(cursors)}")
                    all_rng = {f"rng.rank{r}.{k}": v for r, (g, _) in enumerate(gathered) for k, v in g.items()}
                else:
                    all_rng = {f"rng.rank0.{k}": v for k, v in rng.items()}
                if rank == 0:
                    state = {"step": step, "tokens": tokens, "loader": cursor, "window": window,
                             "schedule": schedule.describe(), "lr": lr, "world_size": world,
                             "fingerprint": plan.fingerprint, "precision": plan.precision}
                    save_checkpoint(out_dir, step, model, tokenizer, optimizer, all_rng, state)
                    prune_checkpoints(out_dir, cfg.averaging.every, cfg.averaging.last_k)
                if distributed:
                    torch.distributed.barrier()
    finally:
        if metrics is not None:
            metrics.close()
        if trace is not None:
            trace.close()
    seconds = time.time() - started
    return {"seconds": round(seconds, 3), "tokens": tokens - start_tokens, "steps": step - start_step,
            "tokens_per_second": round((tokens - start_tokens) / seconds, 1) if seconds > 0 else None,
            "resumed_from": resumed_from, "device": device, "precision": plan.precision, "world_size": world}


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


def _train_with_ray(plan: TrainPlan, config: Config, address: str | None, log: Log) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.runner import connect_ray

    connect_ray(config, address)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=plan.train.workers, use_gpu=plan.device == "cuda"),
        run_config=RunConfig(name=f"train-{uuid.uuid4().hex[:8]}", storage_path=str(Path(plan.out_dir).resolve() / "ray")),
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
    plan.fingerprint = _fingerprint(plan, tokenizer)
    out_dir = Path(plan.out_dir)
    found = complete_checkpoints(out_dir)
    if found:
        state = json.loads((found[-1][1] / STATE_FILE).read_text())
        if state.get("fingerprint") != plan.fingerprint:
            raise ConfigError(f"{out_dir}: holds checkpoints of another training (model, data, tokenizer, batch, "
                              "schedule, optimizer, seed or workers differ); use a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out_dir)
    saved = out_dir / "tokenizer"
    tmp = out_dir / f".tokenizer.tmp-{uuid.uuid4().hex[:8]}"
    tokenizer.save_pretrained(tmp)
    (tmp / "curriculum_tokenizer.json").write_text(json.dumps({"source": source}) + "\n")
    if saved.exists():
        shutil.rmtree(saved)
    tmp.rename(saved)
    (out_dir / "train_config.json").write_text(json.dumps(
        {"train": plan.train.model_dump(mode="json"), "data": str(Path(plan.data_dir).resolve()), "seed": plan.seed,
         "total_steps": plan.total_steps, "tokenizer": source, "fingerprint": plan.fingerprint}, indent=2) + "\n")
    return tokenizer, source


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

    from pipeline.train.averaging import average_checkpoints
    from pipeline.train.evaluation import evaluate, load_eval_sets

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
        window = [(s, f) for s, f in found if s % cfg.averaging.every == 0 or s == plan.total_steps][-cfg.averaging.last_k:]
        averaging = average_checkpoints([f for _, f in window], out_dir / "averaged", cfg.averaging.method,
                                        cfg.averaging.alpha, cfg.averaging.dtype,
                                        extra={"steps": [s for s, _ in window], "every": cfg.averaging.every,
                                               "last_k": cfg.averaging.last_k})
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
        results[name] = {f"eval_{k}": v for k, v in evaluate(model, eval_data, cfg.eval.batch_size, device, autocast_dtype).items()}
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
        "data": str(Path(plan.data_dir).resolve()),
        "tokenizer": json.loads((out_dir / "tokenizer" / "curriculum_tokenizer.json").read_text())["source"],
        "workers": cfg.workers,
        "device": device,
        "precision": plan.precision,
        "last_attempt": stats,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _rows(plan: TrainPlan) -> int:
    import pyarrow.parquet as pq

    from pipeline.train.loader import shard_files

    return max(1, sum(pq.read_metadata(f).num_rows for f in shard_files(plan.data_dir)))


def run_training(config: Config, data: str | Path | None = None, out: str | Path | None = None,
                 ray_address: str | None = None, log: Log = _stderr) -> dict[str, Any]:
    """Train (or resume) as the config's ``train:`` section says; return the summary."""
    plan = plan_training(config, data, out)
    tokenizer, source = prepare_output(plan, log)
    log(f"[train] {plan.total_steps} steps of {plan.train.batch_size} x {plan.train.seq_len} tokens on {plan.device} "
        f"({plan.precision}), {plan.train.workers} worker(s); tokenizer: {source}")
    if plan.train.workers > 1:
        stats = _train_with_ray(plan, config, ray_address, log)
    else:
        stats = train_loop(plan, 0, 1, log)
    return finalize(plan, tokenizer, stats, log)
