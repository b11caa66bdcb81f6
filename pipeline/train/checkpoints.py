"""Training checkpoints: written atomically, found, pruned and loaded back.

A checkpoint folder ``OUT/checkpoints/step-NNNNNNN/`` holds the model in Hugging Face layout
(safetensors), the tokenizer, ``trainer_state.safetensors`` (AdamW tensors and every rank's RNG
state; no pickle) and ``state.json`` (step, tokens, loader cursor, schedule, logging window,
fingerprint). It is written to a temporary folder and renamed, so a folder with ``state.json``
is complete, whatever moment a crash hits.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.core.errors import CurriculumError
from pipeline.core.faults import kill_point

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TRAINER_STATE = "trainer_state.safetensors"


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


def load_optimizer(optimizer: Any, tensors: dict[str, Any], groups: list[dict[str, Any]]) -> None:
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
    kill_point("checkpoint")  # crash tests: a checkpoint with weights but no optimizer state or rename
    tokenizer.save_pretrained(tmp)
    tensors, groups = _optimizer_tensors(optimizer)
    tensors.update({k: v.contiguous() for k, v in rng.items()})
    save_file(tensors, str(tmp / TRAINER_STATE), metadata={"format": "pt"})
    (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer_param_groups": groups}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def on_grid(step: int, total: int, every: int) -> bool:
    """Whether ``step`` is on the checkpoint grid of a ``total``-step run: ``total - j * every``.

    The grid ends on the last step, so the last ``k`` checkpoints on it are ``every`` apart and
    reach back ``(k - 1) * every`` steps from the end, whether or not ``every`` divides ``total``.
    """
    return (total - step) % every == 0


def prune_checkpoints(out_dir: Path, every: int, keep: int, total: int) -> None:
    """Keep the last ``keep`` checkpoints on the grid (:func:`on_grid`) plus the newest."""
    found = complete_checkpoints(out_dir)
    if not found:
        return
    grid = [s for s, _ in found if on_grid(s, total, every)][-keep:]
    keep_steps = set(grid) | {found[-1][0]}
    for step, folder in found:
        if step not in keep_steps:
            shutil.rmtree(folder, ignore_errors=True)


def clean_temporaries(out_dir: Path) -> None:
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


def truncate_jsonl(path: Path, step: int) -> None:
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
