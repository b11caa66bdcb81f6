"""The ``input:`` section of the config: which corpus the readers read, and how."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.paths import expand_input_paths
from pipeline.core.settings import StrictModel


class HFInput(StrictModel):
    name: str = Field(..., min_length=1, description="A datasets name on the hub, or a local folder.")
    config: str | None = None
    split: str = "train"
    streaming: bool = True
    data_files: str | list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_dataset_scripts(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError("trust_remote_code: datasets 5 no longer runs dataset loading scripts, so this key "
                             "would have no effect; remove it (load a script-free dataset or a local folder)")
        return data


class SyntheticInput(StrictModel):
    docs: int = Field(2000, ge=1)
    kind: Literal["graded", "reversal"] = Field("graded", description="graded: topics with a hidden quality; "
                                                "reversal: one-way facts about invented people (docs = facts).")
    seed: int | None = Field(None, ge=0, description="Defaults to run.seed.")


InputFormat = Literal["jsonl", "parquet", "text", "hf", "synthetic"]


class InputConfig(StrictModel):
    format: InputFormat = "synthetic"
    path: str | None = Field(None, description="File, folder or glob for jsonl / parquet / text.")
    text_field: str = "text"
    id_field: str | None = Field(None, description="Without it, ids are content hashes of the text.")
    keep_fields: list[str] | None = Field(
        None, description="Extra input fields to keep as columns; null keeps all of them."
    )
    max_chars: int = Field(1_000_000, ge=1, description="Longer documents are quarantined.")
    hf: HFInput | None = None
    synthetic: SyntheticInput | None = None
    lines_per_block: int = Field(
        20_000, ge=100, description="Records per block in the readers; bounds a read task's memory."
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: str | None, info: Any) -> str | None:
        fmt = info.data.get("format")
        if fmt in ("jsonl", "parquet", "text"):
            if not path:
                raise ValueError(f"input.format {fmt!r} needs input.path (a file, folder or glob)")
            if not expand_input_paths(path, fmt):
                raise ValueError(f"no input file matches {path!r} (resolved from {Path.cwd()})")
        return path

    @model_validator(mode="after")
    def _hf_needs_its_section(self) -> "InputConfig":
        if self.format == "hf" and self.hf is None:
            raise ValueError("input.format 'hf' needs input.hf: {name: ..., split: ...}")
        return self
