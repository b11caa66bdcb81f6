"""The curriculum in Hugging Face ``transformers.Trainer``: an ordered dataset and two callbacks.

``CurriculumTokenDataset`` reads ``RUN_DIR/tokens`` (``curriculum tokenize``) without a copy and
cuts the EOS-separated stream into ``seq_len`` examples in ``position`` order; example ``e`` is
tokens ``[e * seq_len, (e + 1) * seq_len)``. Global batch ``k`` is examples
``[k * B * W, (k + 1) * B * W)`` and rank ``r`` takes the ``r``-th run of ``B`` in it, the layout
``accelerate`` gives when it shards an iterable dataset itself; DataLoader workers take whole
local batches in turn, so the order survives them too. ``ScheduleCallback`` puts the project's
schedules (WSD with a 1-sqrt decay to a floor by default, ``pipeline.train.schedules``) on the
Trainer's own scheduler, and ``AveragingCallback`` saves the last ``last_k`` steps of the
checkpoint grid and averages them (``pipeline.train.averaging``) into ``OUT/averaged``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import TrainerCallback

from pipeline.core.errors import ConfigError, CurriculumError
from pipeline.io.token_shards import TokenShards
from pipeline.train.averaging import average_checkpoints
from pipeline.train.checkpoints import on_grid
from pipeline.train.config import AveragingConfig, ScheduleConfig
from pipeline.train.schedules import Schedule, lr_at, schedule_from_config


class CurriculumTokenDataset(IterableDataset):
    """``seq_len``-token examples from a run folder's token shards, in curriculum order (see above).

    Under ``Trainer`` with several processes, leave ``rank``/``world_size`` at 0/1: ``accelerate``
    then deals each global batch out itself, with the same layout. Give them for a loop that
    reads its own rank's share (one ``Trainer`` per rank, torchtitan, nanoGPT-style loops).
    """

    def __init__(self, run_dir: str | Path, seq_len: int, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if seq_len < 2 or batch_size < 1:
            raise ConfigError("seq_len must be >= 2 and batch_size >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0…{world_size - 1}")
        self.shards = TokenShards(run_dir)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.pad = self.shards.sep
        self.token_starts = np.cumsum([0, *(e["tokens"] for e in self.shards.entries)])
        total = int(self.token_starts[-1])
        self.examples = total // seq_len if drop_last else -(-total // seq_len)
        if self.examples == 0:
            raise CurriculumError(f"{run_dir}: fewer than seq_len={seq_len} tokens")
        self._mapped: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mapped": {}}  # a worker maps the files itself; pickling would copy them

    def _shard(self, k: int) -> Any:
        if k not in self._mapped:
            self._mapped[k] = self.shards.shard(k)
        return self._mapped[k]

    def rank_examples(self) -> Iterator[int]:
        """The global example indices this rank reads, in order."""
        B, W = self.batch_size, self.world_size
        for k in range(-(-self.examples // (B * W))):
            first = k * B * W + self.rank * B
            yield from range(first, min(first + B, self.examples))

    def example(self, e: int) -> dict[str, torch.Tensor]:
        """Example ``e``: ids, labels, mask, and the ``position`` of every token's document (-1: padding)."""
        L = self.seq_len
        lo, hi = e * L, min((e + 1) * L, int(self.token_starts[-1]))
        ids = np.full(L, self.pad, np.int64)
        pos = np.full(L, -1, np.int64)
        k = int(np.searchsorted(self.token_starts, lo, side="right") - 1)
        at = 0
        while lo + at < hi:
            shard = self._shard(k)
            a = lo + at - int(self.token_starts[k])
            b = min(len(shard.tokens), hi - int(self.token_starts[k]))
            ids[at:at + b - a] = shard.tokens[a:b]
            docs = np.searchsorted(shard.ends, np.arange(a, b), side="right")
            pos[at:at + b - a] = np.asarray(shard.positions)[docs]
            at += b - a
            k += 1
        mask = pos >= 0
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(np.where(mask, ids, -100)), "positions": torch.from_numpy(pos)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, e in enumerate(self.rank_examples()):
            # DataLoader workers take whole local batches in turn; it reads them back in that turn.
            if (j // self.batch_size) % workers == worker:
                yield self.example(e)


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the model inputs; ``positions`` stays out (the model has no such argument)."""
    return {key: torch.stack([f[key] for f in features]) for key in ("input_ids", "attention_mask", "labels")}


class ScheduleCallback(TrainerCallback):
    """The project's LR schedule on the Trainer's LambdaLR (its linear, cosine and constant ones all are).

    Peak: ``TrainingArguments.learning_rate``; length: ``state.max_steps``. Optimizer step ``s``
    (0-based) trains at ``lr_at(s)``; ``applied`` records the LR each step used.
    """

    def __init__(self, schedule: ScheduleConfig | dict[str, Any] | None = None):
        self.config = schedule if isinstance(schedule, ScheduleConfig) else ScheduleConfig(**(schedule or {}))
        self.schedule: Schedule | None = None
        self.applied: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> None:
        if self.schedule is not None:
            return
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ConfigError(f"ScheduleCallback needs the Trainer's LambdaLR scheduler (lr_scheduler_type linear, "
                              f"constant or cosine); got {type(lr_scheduler).__name__}")
        self.schedule = schedule = schedule_from_config(self.config, args.learning_rate, state.max_steps)

        def factor(step: int) -> float:
            return lr_at(min(step, schedule.total - 1), schedule) / schedule.peak

        lr_scheduler.lr_lambdas = [factor] * len(lr_scheduler.optimizer.param_groups)
        last = []
        for group, base in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
            group["lr"] = base * factor(lr_scheduler.last_epoch)
            last.append(group["lr"])
        lr_scheduler._last_lr = last

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:
            self.applied.append(float(optimizer.param_groups[0]["lr"]))


class AveragingCallback(TrainerCallback):
    """Save the model on the last ``last_k`` steps of the grid ``total - j * every``; average them at the end.

    Snapshots go to ``OUT/averaging/step-NNNNNNN`` (HF layout, safetensors), the average to
    ``OUT/averaged`` with ``averaging.json``, as ``curriculum train`` writes it.
    """

    def __init__(self, out_dir: str | Path, averaging: AveragingConfig | dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.config = averaging if isinstance(averaging, AveragingConfig) else AveragingConfig(**(averaging or {}))
        if self.config.method == "none":
            raise ConfigError("averaging.method: none leaves nothing for AveragingCallback to do; leave it out")
        self.saved: list[tuple[int, Path]] = []

    def _grid(self, total: int) -> tuple[int, list[int]]:
        every = self.config.spacing(total)
        steps = [s for s in range(1, total + 1) if on_grid(s, total, every)][-self.config.last_k:]
        return every, steps

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        _, steps = self._grid(state.max_steps)
        if state.global_step in steps and state.is_world_process_zero and model is not None:
            folder = self.out_dir / "averaging" / f"step-{state.global_step:07d}"
            model.save_pretrained(folder, safe_serialization=True)
            self.saved.append((state.global_step, folder))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.saved:
            return
        total = state.max_steps
        every, _ = self._grid(total)
        window = self.saved[-self.config.last_k:]
        average_checkpoints([f for _, f in window], self.out_dir / "averaged", self.config.method, self.config.alpha,
                            self.config.dtype, extra={"steps": [s for s, _ in window], "every": every,
                                                      "last_k": self.config.last_k,
                                                      "window_steps": self.config.window_steps(total)})


def curriculum_callbacks(out_dir: str | Path, schedule: ScheduleConfig | dict[str, Any] | None = None,
                         averaging: AveragingConfig | dict[str, Any] | None = None) -> list[TrainerCallback]:
    """The schedule and the averaging callbacks, for ``Trainer(callbacks=...)``."""
    return [ScheduleCallback(schedule), AveragingCallback(out_dir, averaging)]
