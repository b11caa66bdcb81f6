"""The ``train:`` section of the config (docs/run-folder.md), validated like every other section.

Every model forbids unknown keys, so ``train.schedule.decay_shap`` is an error that names the
key, never ignored. The contract keys are those of docs/run-folder.md; the rest are documented here and in
README.md ("Training").

Batch arithmetic: ``batch_size`` is the **global** batch, in sequences of ``seq_len`` tokens per
optimizer step, whatever ``workers`` and ``grad_accum`` are; each worker's micro-batch is
``batch_size / (workers * grad_accum)``. So changing the worker count does not change the
optimization, and ``max_tokens / (batch_size * seq_len)`` is the number of optimizer steps.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.core.errors import FieldError
from pipeline.core.settings import StrictModel
from pipeline.models.lm import check_model_config


class ModelSpec(StrictModel):
    config: dict[str, Any] | None = Field(None, description="A transformers config, e.g. {model_type: gpt2, n_layer: 2}.")
    pretrained: str | None = Field(None, description="A local path (HF layout) or hub name.")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("give exactly one of model.config (a transformers config) or model.pretrained (a path)")
        if self.config is not None:
            try:
                check_model_config(self.config)
            except ValueError as exc:
                raise ValueError(f"config: {exc}") from None
        return self


class OptimizerConfig(StrictModel):
    lr: float = Field(3e-3, gt=0, description="The peak learning rate.")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null disables clipping.")


class ScheduleConfig(StrictModel):
    kind: Literal["constant", "cosine", "wsd", "linear"] = "wsd"
    warmup: float = Field(0.01, ge=0, description="Warmup: a fraction of the steps (< 1) or a step count.")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd: the share of the steps spent decaying (> 0).")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    final_lr_ratio: float = Field(0.333, ge=0, le=1, description="The last step's LR as a share of the peak.")

    @field_validator("decay_fraction")
    @classmethod
    def _wsd_decays(cls, value: float, info: ValidationInfo) -> float:
        if value == 0 and info.data.get("kind") == "wsd":
            raise ValueError("wsd with decay_fraction 0 never decays: its last step would train at the peak LR, "
                             "not at final_lr_ratio of it; use kind: constant for no decay, or a decay_fraction > 0")
        return value


DEFAULT_WINDOW = 0.1  # the last 10% of the steps: see docs/methods.md §8


class AveragingConfig(StrictModel):
    """Which checkpoints are written and averaged.

    Checkpoints lie on a grid that ends on the last step: steps ``total - j * every``. The average
    takes the last ``last_k`` of them. ``every`` is given, or derived from ``window`` (the stretch
    at the end of the run the checkpoints come from) as ``window_steps // last_k``, so that the
    averaged checkpoints all lie in the last ``window_steps`` steps whatever the run's length.
    """

    method: Literal["none", "sma", "ema", "wma"] = "ema"
    last_k: int = Field(6, ge=1, description="Average the last k checkpoints (the final step is always one).")
    alpha: float = Field(0.2, gt=0, le=1, description="ema: avg <- alpha * checkpoint + (1 - alpha) * avg, from the "
                         "oldest of the k checkpoints to the newest; the newest gets weight alpha.")
    window: float | None = Field(
        None, gt=0, description=f"The end of the run the last_k checkpoints come from: a fraction of the steps (<= 1) "
        f"or a step count (> 1, whole). Sets every = window_steps // last_k. Default {DEFAULT_WINDOW} when every is unset."
    )
    every: int | None = Field(None, ge=1, description="Checkpoint spacing in optimizer steps, instead of window.")
    dtype: Literal["float32", "same"] = Field(
        "float32", description="Averaged weights in float32 (default; see docs/methods.md §8) or the model's dtype."
    )

    @field_validator("window")
    @classmethod
    def _whole_step_count(cls, value: float | None) -> float | None:
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"above 1 the window is a step count and must be whole (got {value}); "
                             "a fraction of the run is at most 1")
        return value

    @field_validator("every")
    @classmethod
    def _every_or_window(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("window") is not None:
            raise ValueError("give every (the checkpoint spacing) or window (the end of the run to average, "
                             "which sets every = window_steps // last_k), not both")
        return value

    def window_steps(self, total: int) -> int:
        """How many final steps of a ``total``-step run the averaged checkpoints come from."""
        if self.every is not None:
            return min(total, self.every * self.last_k)
        window = DEFAULT_WINDOW if self.window is None else self.window
        return max(1, min(total, round(window * total))) if window <= 1 else int(window)

    def spacing(self, total: int) -> int:
        """Checkpoint spacing in steps: ``every``, or ``window_steps // last_k`` (at least 1)."""
        if self.every is not None:
            return self.every
        return max(1, self.window_steps(total) // self.last_k)


class SyntheticEval(StrictModel):
    """A held-out slice of the synthetic graded corpus (``pipeline.io.synth``), by true quality."""

    docs: int = Field(200, ge=1)
    seed: int = Field(1000, ge=0, description="Use a seed other than run.seed so no training document repeats.")
    min_quality: float = Field(0.0, ge=0, le=1)
    max_quality: float = Field(1.0, ge=0, le=1)


class EvalSet(StrictModel):
    path: str | None = Field(None, description="jsonl(.gz), parquet, text file, or a run folder (its shards).")
    synthetic: SyntheticEval | None = None
    text_field: str = "text"

    @model_validator(mode="after")
    def _one_source(self) -> "EvalSet":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("an eval set needs exactly one of path or synthetic")
        return self


class EvalConfig(StrictModel):
    every: int = Field(100, ge=1, description="Evaluate every N optimizer steps (and at the last step).")
    sets: dict[str, str | EvalSet] = Field(
        default_factory=dict, description="name -> path, or name -> {path | synthetic, text_field}; logged as eval_<name>."
    )
    max_tokens: int = Field(32_768, ge=1, description="Tokens per set (the first ones, packed into seq_len sequences).")
    batch_size: int = Field(8, ge=1)

    @field_validator("sets")
    @classmethod
    def _names(cls, sets: dict[str, Any]) -> dict[str, Any]:
        for name in sets:
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"eval set name {name!r}: use letters, digits, '_' or '-' (it becomes eval_<name>)")
        return sets


class DataConfig(StrictModel):
    """What a shard row is to the trainer: one text, or a prompt and a response (docs/training.md)."""

    format: Literal["text", "prompt_response"] = Field(
        "text", description="text: loss on every token; prompt_response: loss on the response (and its EOS) only.")
    text_field: str = Field("text", min_length=1, description="format text: the column to train on.")
    prompt_field: str = Field("prompt", min_length=1, description="format prompt_response: the prompt column.")
    response_field: str = Field("response", min_length=1, description="format prompt_response: the response column.")


class MaskedThoughtConfig(StrictModel):
    """Masked Thought (Chen et al., 2024): some response tokens replaced by a mask token in the input only."""

    ratio: float = Field(..., ge=0, lt=1, description="The chance that each response token's input is the mask "
                         "token (labels are unchanged); 0 disables it. Must be in [0, 1).")
    token: str | None = Field(None, min_length=1, description="The mask token; added to the tokenizer if it is not "
                              "in the vocabulary. Default: the tokenizer's own mask token, else '<|mask|>'.")


class AugmentConfig(StrictModel):
    masked_thought: MaskedThoughtConfig | None = Field(
        None, description="{ratio: 0.2}: mask a seeded random share of each response's input tokens.")


class FutRecordConfig(StrictModel):
    """What ``record: {fut: ...}`` keeps for ``curriculum whatif`` (docs/training.md, docs/methods.md)."""

    dim: int = Field(256, ge=8, le=65536, description="Dimension of the seeded random projection: each stored "
                     "gradient is this many float32 values, so it bounds the storage.")
    seed: int = Field(0, ge=0, description="Seed of the random projection.")
    anchors: int = Field(4, ge=1, le=1000, description="Anchor checkpoints along the run (every total_steps // "
                         "anchors steps) at which every training row's Adam-preconditioned gradient is stored.")


class RecordConfig(StrictModel):
    fut: FutRecordConfig | None = Field(None, description="{dim: 256, anchors: 4}: store what `curriculum whatif` "
                                        "needs to estimate other training orders without retraining.")


class TrainConfig(StrictModel):
    # A factory: validating a ModelSpec imports transformers (and torch), which importing this
    # module, or validating a config without a train: section, should not.
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(config={"model_type": "gpt2", "n_layer": 2,
                                                                        "n_embd": 128, "n_head": 2}))
    tokenizer: str | None = Field(
        None, description="HF tokenizer folder; default: model.pretrained's, else the run's reference LM's, "
        "else a BPE trained on the shards."
    )
    tokenizer_vocab_size: int = Field(4096, ge=300, description="Vocabulary of the BPE trained when no tokenizer is given.")
    tokenizer_sample_docs: int = Field(5000, ge=1, description="Documents (hash-sampled) to train that BPE on.")
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(16, ge=1, description="Global batch: sequences per optimizer step.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step on each worker.")
    max_tokens: int = Field(2_000_000, ge=1, description="Training length: steps = max_tokens // (batch_size * seq_len).")
    packing: Literal["pack", "pad"] = Field("pack", description="pack documents with EOS separators, or pad each one.")
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    averaging: AveragingConfig = AveragingConfig()
    eval: EvalConfig = EvalConfig()
    workers: int = Field(1, ge=1, description="> 1 trains data-parallel with Ray Train's TorchTrainer.")
    loader_workers: int = Field(0, ge=0, description="Tokenizer processes per worker (DataLoader workers).")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads per worker; null keeps torch's default. Tiny models run faster on 1."
    )
    seed: int | None = Field(None, ge=0, description="Model init and dropout; defaults to run.seed.")
    log_every: int = Field(10, ge=1, description="A metrics.jsonl line every N steps (and at every eval step).")
    deterministic: bool = Field(True, description="torch deterministic algorithms (exact resume).")
    trace: bool = Field(False, description="Write OUT/trace/rank-R.jsonl: the positions of every micro-batch.")
    record: RecordConfig = RecordConfig()

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        per_step = self.workers * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of workers * grad_accum = {per_step} "
                "(batch_size is the global batch per optimizer step)"
            )
        return self

    @model_validator(mode="after")
    def _masking_needs_responses(self) -> "TrainConfig":
        if self.augment.masked_thought is not None and self.data.format != "prompt_response":
            raise FieldError("augment.masked_thought", "masks response tokens, so it needs data.format: "
                             "prompt_response (with data.prompt_field and data.response_field)")
        return self

    @model_validator(mode="after")
    def _fut_fits(self) -> "TrainConfig":
        if self.record.fut is None:
            return self
        for key, value, wanted in (("workers", self.workers, 1), ("grad_accum", self.grad_accum, 1),
                                   ("packing", self.packing, "pack"), ("data.format", self.data.format, "text")):
            if value != wanted:
                raise FieldError("record.fut", f"records one process's packed text training: it needs "
                                 f"{key}: {wanted!r} (got {value!r})")
        return self

    @model_validator(mode="after")
    def _window_fits_the_run(self) -> "TrainConfig":
        averaging, total = self.averaging, self.total_steps
        if averaging.window is None:
            return self  # the default window widens to last_k steps on a short run
        steps = averaging.window_steps(total)
        if steps > total:
            raise FieldError("averaging.window", f"{steps} steps is longer than the run ({total} steps = max_tokens "
                             "// (batch_size * seq_len)); give fewer steps or a fraction (<= 1)")
        if steps < averaging.last_k:
            raise FieldError("averaging.window", f"{averaging.window:g} of a {total}-step run is {steps} step(s): too few "
                             f"for last_k={averaging.last_k} checkpoints one step apart or more; widen the window "
                             "or lower last_k")
        return self

    @property
    def checkpoint_every(self) -> int:
        """The checkpoint spacing in steps (``averaging.every`` or derived from ``averaging.window``)."""
        return self.averaging.spacing(self.total_steps)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.workers * self.grad_accum)

    @property
    def total_steps(self) -> int:
        return max(1, self.max_tokens // (self.batch_size * self.seq_len))
