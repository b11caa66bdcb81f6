"""YAML config -> pydantic models -> one resolved config.

The top-level shape is the contract in DESIGN.md: ``run``, ``ray``, ``input``, ``stages``,
``output`` and ``train``. Every model forbids unknown keys, so a typo is an error, never
ignored. Each stage entry is validated by that stage's own params model (see
``stages.registry``). ``load_config`` raises :class:`ConfigError` with one line per problem,
each naming the key at fault, before anything is written.

Relative paths in the config are resolved against the current working directory, the way
a shell command would see them.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(StrictModel):
    name: str = Field("run", min_length=1, description="Names the default run folder runs/<name>.")
    seed: int = Field(0, ge=0, description="Seeds every random choice in the run.")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Cluster address; null = RAY_ADDRESS or a local cluster.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (ignored with an address).")
    ship_code: bool = Field(
        False,
        description="Ship the pipeline/ and stages/ packages to the cluster's workers through "
        "runtime_env py_modules (for clusters that do not have the project installed).",
    )


class HFInput(StrictModel):
    name: str = Field(..., min_length=1, description="A datasets name on the hub, or a local folder.")
    config: str | None = None
    split: str = "train"
    streaming: bool = True
    data_files: str | list[str] | None = None
    trust_remote_code: bool = False


class SyntheticInput(StrictModel):
    docs: int = Field(2000, ge=1)
    kind: Literal["graded"] = "graded"
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


class OutputConfig(StrictModel):
    rows_per_shard: int = Field(10_000, ge=1)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    keep_embeddings: bool = Field(False, description="Copy embedding columns into the shards.")


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")


def expand_input_paths(path: str, fmt: str) -> list[str]:
    """The files a ``path`` names: a file, every matching file in a folder, or a glob. Sorted."""
    suffixes = {
        "jsonl": JSONL_SUFFIXES,
        "parquet": (".parquet",),
        "text": None,
    }[fmt]
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        candidates = [str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
    else:
        candidates = [f for f in glob.glob(path, recursive=True) if Path(f).is_file()]
    if suffixes is not None and p.is_dir():
        candidates = [f for f in candidates if f.endswith(suffixes)]
    return sorted(candidates)


class Config(StrictModel):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    input: InputConfig = InputConfig()
    stages: list[Any] = Field(default_factory=list)
    output: OutputConfig = OutputConfig()
    train: dict[str, Any] | None = None

    def resolved(self) -> dict[str, Any]:
        """The whole config with every default filled in, as plain JSON data."""
        data = self.model_dump(mode="json")
        data["stages"] = [s.model_dump(mode="json") for s in self.stages]
        return data

    def config_hash(self) -> str:
        return sha256_json(self.resolved())


def sha256_json(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, sets: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set KEY=VALUE`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of run/ray/input/stages/output/train")
    for item in sets or []:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=c`` override in place. ``stages.<index|name>.key`` reaches a stage."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example run.seed=3")
    dotted, _, text = item.partition("=")
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, key, here)]
        elif isinstance(node, dict):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"--set {dotted}: {here} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(keys[:-1])} is a value, not a section")


def _list_index(items: list[Any], key: str, where: str) -> int:
    """A list position given as an index, or as a stage name for the stages list."""
    if key.lstrip("-").isdigit():
        index = int(key)
        if -len(items) <= index < len(items):
            return index
        raise ConfigError(f"--set: {where}: index {index} is out of range (the list has {len(items)} items)")
    named = [i for i, entry in enumerate(items) if isinstance(entry, dict) and entry.get("name") == key]
    if len(named) == 1:
        return named[0]
    names = [e.get("name") for e in items if isinstance(e, dict)]
    raise ConfigError(f"--set: {where}: no single stage named {key!r} (stages: {names})")


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw config mapping; every problem becomes one line of a ConfigError."""
    from stages.registry import get_stage_class, stage_names

    problems: list[str] = []
    stage_entries = raw.get("stages") or []
    parsed_stages: list[Any] = []
    if not isinstance(stage_entries, list):
        problems.append("stages: must be a list of {name: ..., <params>} entries")
        stage_entries = []
    for index, entry in enumerate(stage_entries):
        where = f"stages[{index}]"
        if not isinstance(entry, dict) or "name" not in entry:
            problems.append(f"{where}: each stage needs a 'name' (one of {stage_names()})")
            continue
        name = entry["name"]
        stage_cls = get_stage_class(name)
        if stage_cls is None:
            problems.append(f"{where}.name: unknown stage {name!r} (allowed: {stage_names()})")
            continue
        try:
            parsed_stages.append(stage_cls.Params.model_validate(entry))
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, f"{where}", stage_cls.Params))
    order_positions = [i for i, s in enumerate(parsed_stages) if s.name == "order"]
    if order_positions and order_positions != [len(parsed_stages) - 1]:
        problems.append("stages: 'order' must appear once, as the last stage (it writes the final position)")

    top = {k: v for k, v in raw.items() if k != "stages"}
    config: Config | None = None
    try:
        config = Config.model_validate(top)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, "", Config))
    if config is not None and config.train is not None:
        from pipeline.train.config import TrainConfig

        try:
            config.train = TrainConfig.model_validate(config.train).model_dump(mode="json")
        except ValidationError as exc:
            problems.extend(format_validation_error(exc, "train", TrainConfig))
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    assert config is not None
    if not order_positions:
        order_cls = get_stage_class("order")
        parsed_stages.append(order_cls.Params.model_validate({"name": "order"}))
    config.stages = parsed_stages
    return config


def format_validation_error(exc: ValidationError, prefix: str, model: type[BaseModel]) -> list[str]:
    """One readable line per pydantic error: the dotted key, then what is wrong with it."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc) or prefix or "config"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            message = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            message = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            message = f"{message} (got {err['input']!r})"
        lines.append(f"{key}: {message}")
    return lines


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model that ``loc`` points into, when it can be found."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in_annotation(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}).keys())


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found is not None:
            return found
    return None
