"""Joining a Ray cluster, or starting a local one: the one place every command connects through."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import ray
import ray.data

from pipeline.core.settings import RayConfig

# The project's top-level packages, shipped to workers with ``ray.ship_code``. Located by spec,
# not imported, so this module stays below the packages it ships.
_PACKAGES = ("pipeline", "stages")


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return str(Path(spec.origin).parent)


def connect_ray(settings: RayConfig, address: str | None = None) -> None:
    """Join the cluster at ``address`` / ``ray.address`` / ``RAY_ADDRESS``, or start a local one."""
    if ray.is_initialized():
        return
    address = address or settings.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if settings.ship_code:
        kwargs["runtime_env"] = {"py_modules": [_package_dir(name) for name in _PACKAGES]}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=settings.num_cpus, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = True
