"""YAML config -> pydantic models -> one resolved config.

The top-level shape is the documented contract (docs/run-folder.md): ``run``, ``ray``, ``input``, ``stages``,
``output`` and ``train``, and ``select`` for ``curriculum select`` (``pipeline.engine.select``). Every
model forbids unknown keys, so a typo is an error, never ignored. Each stage entry is validated by
that stage's own params model (see ``stages.registry``). ``load_config`` raises :class:`ConfigError` with one line per problem,
each naming the key at fault, before anything is written.

Relative paths in the config are resolved against the current working directory, the way
a shell command would see them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from pipeline.core.errors import ConfigError, FieldError
from pipeline.core.hashing import sha256_json
from pipeline.core.settings import RayConfig, RunConfig, StrictModel
from pipeline.engine.ablate import AblateConfig
from pipeline.engine.select import SelectConfig
from pipeline.io.input_config import InputConfig
from pipeline.train.config import TrainConfig
from stages.registry import get_stage_class, stage_names


class OutputConfig(StrictModel):
    rows_per_shard: int = Field(10_000, ge=1)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    keep_embeddings: bool = Field(False, description="Copy the embedding stage's vector columns into the shards "
                                  "(they always stay in the stage cache).")


class Config(StrictModel):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    input: InputConfig = InputConfig()
    stages: list[Any] = Field(default_factory=list)
    output: OutputConfig = OutputConfig()
    train: dict[str, Any] | None = None
    select: SelectConfig | None = None
    ablate: AblateConfig | None = None

    def resolved(self) -> dict[str, Any]:
        """The whole config with every default filled in, as plain JSON data."""
        data = self.model_dump(mode="json")
        data["stages"] = [s.model_dump(mode="json") for s in self.stages]
        if data.get("select") is None:  # configs without the section keep their hash
            data.pop("select", None)
        if data.get("ablate") is None:
            data.pop("ablate", None)
        return data

    def config_hash(self) -> str:
        return sha256_json(self.resolved())


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, sets: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set KEY=VALUE`` overrides and validate it."""
    return validate_config(read_config_mapping(path, sets), source=str(path))


def read_config_mapping(path: str | Path, sets: list[str] | None = None) -> dict[str, Any]:
    """The YAML mapping at ``path`` with the ``--set KEY=VALUE`` overrides applied, not validated yet."""
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
        raise ConfigError(f"{path}: the top level must be a mapping of run/ray/input/stages/output/train/select")
    for item in sets or []:
        apply_override(raw, item)
    return raw


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
        at_fault = (err.get("ctx") or {}).get("error")
        if isinstance(at_fault, FieldError):  # a check across fields names the one at fault
            loc += at_fault.key.split(".")
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
