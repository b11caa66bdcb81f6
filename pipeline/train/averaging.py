"""Checkpoint averaging (CMA/CDMA, Luo et al., ICLR 2026) and model soups (POINTS, 2024).

Averaging the last checkpoints of a constant or moderately decayed LR run recovers what a decay
to zero would give without wasting the best (last) data of an ascending curriculum. Methods:
``sma``, ``ema``, ``wma``, ``uniform`` and the greedy soup; their weights are in docs/methods.md §8.
Floating tensors are accumulated in float32 whatever their stored dtype (bf16 averages do not
freeze); integer and bool tensors are copied from the newest checkpoint. Tensors are read one by
one through safetensors. When the newest input is a Hugging Face folder its config and tokenizer
are copied beside the result, so ``from_pretrained`` loads it; ``averaging.json`` records the
method, checkpoints and weights.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, CurriculumError

METHODS = ("sma", "ema", "wma", "uniform")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files of a Hugging Face model folder that describe the model but are not weights.
_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def averaging_weights(method: str, k: int, alpha: float = 0.2) -> list[float]:
    """The weights of ``k`` checkpoints, oldest first; they sum to 1."""
    if k < 1:
        raise ValueError("averaging needs at least one checkpoint")
    if method in ("sma", "uniform"):
        raw = [1.0] * k
    elif method == "ema":
        if not 0 < alpha <= 1:
            raise ValueError(f"ema alpha must be in (0, 1] (got {alpha})")
        # avg <- alpha * theta_j + (1 - alpha) * avg for j = 1 … k-1, starting from avg = theta_0 (the
        # oldest): the newest gets alpha, the j-th before it alpha (1 - alpha)^j, the oldest the rest.
        raw = [1.0]
        for _ in range(1, k):
            raw = [w * (1 - alpha) for w in raw] + [alpha]
    elif method == "wma":
        raw = [float(j + 1) for j in range(k)]
    else:
        raise ValueError(f"unknown averaging method {method!r} (allowed: {', '.join(METHODS)})")
    total = sum(raw)
    return [w / total for w in raw]


# --------------------------------------------------------------------------- reading


class WeightsFile:
    """Tensor-by-tensor access to one checkpoint's safetensors weights (single file or sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            if (self.path / WEIGHTS_NAME).is_file():
                self.files = {None: self.path / WEIGHTS_NAME}
                self._where: dict[str, Path] | None = None
            elif (self.path / INDEX_NAME).is_file():
                index = json.loads((self.path / INDEX_NAME).read_text())
                self._where = {k: self.path / v for k, v in index["weight_map"].items()}
                self.files = {p: p for p in sorted(set(self._where.values()))}
            else:
                raise CurriculumError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME} (not a safetensors checkpoint)")
        elif self.path.is_file() and self.path.suffix == ".safetensors":
            self.files = {None: self.path}
            self._where = None
        else:
            raise CurriculumError(f"{self.path}: not a checkpoint folder or .safetensors file")
        self._handles: dict[Path, Any] = {}

    def _open(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        if self._where is not None:
            return sorted(self._where)
        return sorted(self._open(next(iter(self.files.values()))).keys())

    def get(self, key: str):
        file = self._where[key] if self._where is not None else next(iter(self.files.values()))
        return self._open(file).get_tensor(key)

    @property
    def hf_folder(self) -> Path | None:
        return self.path if self.path.is_dir() and (self.path / "config.json").is_file() else None


def _is_float(tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def average_state(
    checkpoints: Sequence[str | Path], weights: Sequence[float], dtype: str = "float32"
) -> dict[str, Any]:
    """Weighted average of the checkpoints' tensors (oldest first). See the module docstring."""
    import torch

    if len(checkpoints) != len(weights):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(weights)} weights")
    if not checkpoints:
        raise CurriculumError("nothing to average: no checkpoints given")
    if dtype not in ("float32", "same"):
        raise ValueError(f"dtype must be 'float32' or 'same' (got {dtype!r})")
    files = [WeightsFile(c) for c in checkpoints]
    newest = files[-1]
    keys = newest.keys()
    for f in files[:-1]:
        if f.keys() != keys:
            missing = sorted(set(keys) ^ set(f.keys()))[:5]
            raise CurriculumError(f"{f.path} and {newest.path} hold different tensors (e.g. {missing}); "
                                  "only checkpoints of the same architecture can be averaged")
    out: dict[str, Any] = {}
    for key in keys:
        last = newest.get(key)
        if not _is_float(last):
            out[key] = last.clone()  # integer/bool buffers: copied from the newest, never averaged
            continue
        acc_dtype = torch.float64 if last.dtype == torch.float64 else torch.float32
        acc = torch.zeros(last.shape, dtype=acc_dtype)
        for f, w in zip(files, weights):
            t = last if f is newest else f.get(key)
            if t.shape != last.shape:
                raise CurriculumError(f"tensor {key!r}: shape {tuple(t.shape)} in {f.path} but "
                                      f"{tuple(last.shape)} in {newest.path}")
            acc.add_(t.to(acc_dtype), alpha=float(w))
        out[key] = acc.to(last.dtype) if dtype == "same" else acc
    return out


def write_averaged(
    state: dict[str, Any], out_dir: str | Path, record: dict[str, Any], hf_source: Path | None = None
) -> Path:
    """Write averaged weights (+ the HF side files of ``hf_source``) and averaging.json, atomically."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if hf_source is not None:
            for name in _HF_SIDE_FILES:
                if (hf_source / name).is_file():
                    shutil.copyfile(hf_source / name, tmp / name)
            floats = {str(t.dtype) for t in state.values() if _is_float(t)}
            if (tmp / "config.json").is_file() and floats == {str(torch.float32)}:
                # The weights are float32 now: say so, or from_pretrained would cast them back down.
                config = json.loads((tmp / "config.json").read_text())
                for key in ("torch_dtype", "dtype"):
                    if key in config:
                        config[key] = "float32"
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        contiguous = {k: v.contiguous() for k, v in state.items()}
        save_file(contiguous, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "averaging.json").write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def average_checkpoints(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "ema",
    alpha: float = 0.2,
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Average ``checkpoints`` (oldest first) with ``method`` into ``out_dir``; return the record."""
    if method not in METHODS:
        raise ConfigError(f"unknown averaging method {method!r} (allowed: {', '.join(METHODS)}, greedy)")
    weights = averaging_weights(method, len(checkpoints), alpha)
    state = average_state(checkpoints, weights, dtype)
    record = {"method": method, "checkpoints": [str(c) for c in checkpoints], "weights": weights,
              "dtype": dtype, **({"alpha": alpha} if method == "ema" else {}), **(extra or {})}
    write_averaged(state, out_dir, record, _hf_source(checkpoints))
    return record


def _hf_source(checkpoints: Sequence[str | Path]) -> Path | None:
    for c in reversed(checkpoints):
        folder = WeightsFile(c).hf_folder
        if folder is not None:
            return folder
    return None


# --------------------------------------------------------------------------- soups


def greedy_soup(
    models: Sequence[str | Path],
    evaluate: Callable[[dict[str, Any]], float],
    out_dir: str | Path,
    dtype: str = "float32",
) -> dict[str, Any]:
    """POINTS' greedy soup: add models best-first while the soup's eval loss does not rise.

    ``evaluate(state_dict) -> loss`` scores a set of weights (lower is better).
    """
    if not models:
        raise CurriculumError("nothing to average: no models given")
    scores = [float(evaluate(average_state([m], [1.0], dtype))) for m in models]
    ranked = sorted(range(len(models)), key=lambda i: (scores[i], i))
    kept = [ranked[0]]
    best = scores[ranked[0]]
    trials = []
    for i in ranked[1:]:
        candidate = kept + [i]
        loss = float(evaluate(average_state([models[j] for j in candidate], [1 / len(candidate)] * len(candidate), dtype)))
        trials.append({"added": str(models[i]), "loss": loss, "kept": loss <= best})
        if loss <= best:
            kept, best = candidate, loss
    chosen = [models[j] for j in kept]
    state = average_state(chosen, [1 / len(chosen)] * len(chosen), dtype)
    record = {"method": "greedy", "checkpoints": [str(m) for m in chosen], "weights": [1 / len(chosen)] * len(chosen),
              "dtype": dtype, "candidates": [str(m) for m in models], "scores": scores, "trials": trials,
              "soup_loss": best}
    write_averaged(state, out_dir, record, _hf_source(chosen))
    return record
