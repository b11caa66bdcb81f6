"""The ``train:`` section of the config (DESIGN.md), validated like every other section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config import StrictModel


class ModelSpec(StrictModel):
    config: dict[str, Any] | None = Field(None, description="A transformers config, e.g. {model_type: gpt2, n_layer: 2}.")
    pretrained: str | None = Field(None, description="A local path (HF layout) or hub name.")
    trust_remote_code: bool = False


class OptimizerConfig(StrictModel):
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)


class ScheduleConfig(StrictModel):
    kind: Literal["constant", "cosine", "wsd", "linear"] = "wsd"
    warmup: float = Field(0.01, ge=0, description="Warmup: a fraction of the steps (< 1) or a step count.")
    decay_fraction: float = Field(0.2, ge=0, le=1)
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    final_lr_ratio: float = Field(0.333, ge=0, le=1)


class AveragingConfig(StrictModel):
    method: Literal["none", "sma", "ema", "wma"] = "ema"
    last_k: int = Field(6, ge=1)
    alpha: float = Field(0.2, gt=0, le=1)
    every: int = Field(100, ge=1)


class EvalConfig(StrictModel):
    every: int = Field(100, ge=1)
    sets: dict[str, str] = Field(default_factory=dict)


class TrainConfig(StrictModel):
    model: ModelSpec = ModelSpec(config={"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 2})
    tokenizer: str | None = None
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(2_000_000, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    averaging: AveragingConfig = AveragingConfig()
    eval: EvalConfig = EvalConfig()
