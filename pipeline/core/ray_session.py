"""Joining a Ray cluster, or starting a local one: the one place every command connects through."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.exceptions

from pipeline.core.errors import CurriculumError
from pipeline.core.settings import RayConfig
from pipeline.core.storage import worker_env

# The project's top-level packages, shipped to workers with ``ray.ship_code``. Located by spec,
# not imported, so this module stays below the packages it ships.
_PACKAGES = ("pipeline", "stages")
AUTH_HINT = ("A cluster started with `ray start` (Ray 2.59+) asks for token authentication when a token exists on "
             "the head: set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN or in a file named by "
             "RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token; `ray get-auth-token` on the head prints it), or start "
             "the cluster with RAY_AUTH_MODE=disabled")
_PROBE_SECONDS = 5.0


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return str(Path(spec.origin).parent)


def token_source() -> str | None:
    """Where Ray's client would find an auth token, in Ray's own precedence: the ``RAY_AUTH_TOKEN``
    variable, the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``; None when none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        return f"RAY_AUTH_TOKEN_PATH={named}" if Path(named).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def enable_token_auth_if_available() -> bool:
    """Turn on token authentication for this process when ``RAY_AUTH_MODE`` is unset and a token exists.

    Ray does this itself only for a cluster it finds on its own (``address="auto"``), never for an
    explicit address, so ``curriculum run --ray-address HOST:PORT`` against ``ray start --head``
    would otherwise be refused. An explicit ``RAY_AUTH_MODE`` (``disabled`` too) is respected.
    A token sent to a cluster without authentication is ignored, so this is safe either way."""
    if "RAY_AUTH_MODE" in os.environ or token_source() is None:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray reads its config once per process; re-read it, as `ray start` does after the same change
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass
    return True


def _host_port(address: str) -> tuple[str, int] | None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def _connect_error(address: str, what: str, auth: bool) -> CurriculumError:
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    token = token_source() or "none found"
    extra = f" {AUTH_HINT}." if auth else (" Start one with `ray start --head`, or fix --ray-address / ray.address "
                                          "/ RAY_ADDRESS.")
    return CurriculumError(f"cannot join the Ray cluster at {address}: {what} (RAY_AUTH_MODE={mode}, token: {token})."
                           f"{extra}")


def check_cluster(address: str) -> None:
    """Fail in seconds, naming the address and what to set, where ``ray.init`` would retry for 20 s
    (a refused token) or hang (nothing listening) and then raise a bare ``ConnectionError``."""
    target = _host_port(address)
    if target is None:
        return  # "auto" and other forms that Ray resolves itself
    try:
        socket.create_connection(target, timeout=_PROBE_SECONDS).close()
    except OSError as exc:
        raise _connect_error(address, f"nothing answers there ({exc.strerror or type(exc).__name__})", False) from None
    if address.startswith("ray://"):
        return  # the Ray Client server is not the GCS; ray.init reports its own errors
    try:
        from ray._raylet import GcsClient
    except ImportError:  # an older or newer Ray without these: let ray.init decide
        return
    try:
        GcsClient(address=address).cluster_id  # noqa: B018 - the first RPC; raises on a refused token
    except ray.exceptions.AuthenticationError:
        raise _connect_error(address, "the cluster refused this client's authentication token", True) from None
    except Exception:  # noqa: BLE001 - anything else (not a GCS?) is for ray.init to report
        return


# What connect_ray uses only when it starts the session, not when it joins one already open here.
_SESSION_START_SETTINGS = ("num_cpus", "ship_code", "ship_credentials")


def unused_in_open_session(settings: RayConfig) -> list[str]:
    """The ``ray.*`` settings a run cannot apply because this process already has a Ray session
    (a notebook's): connect_ray joins it as it is. Empty when there is no session yet."""
    if not ray.is_initialized():
        return []
    return [f"ray.{key}" for key in _SESSION_START_SETTINGS if getattr(settings, key)]


def connect_ray(settings: RayConfig, address: str | None = None) -> None:
    """Join the cluster at ``address`` / ``ray.address`` / ``RAY_ADDRESS``, or start a local one."""
    if ray.is_initialized():
        return
    address = address or settings.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if settings.ship_code:
        kwargs["runtime_env"] = {"py_modules": [_package_dir(name) for name in _PACKAGES]}
    env = worker_env(settings.ship_credentials)
    if address and env:
        # Workers of a running cluster do not inherit this process's environment; a local cluster
        # started below does. The values travel in the job's runtime_env (see docs/cluster.md).
        kwargs["runtime_env"] = {**kwargs.get("runtime_env", {}), "env_vars": env}
    if address:
        enable_token_auth_if_available()
        check_cluster(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _connect_error(address, f"{type(exc).__name__}: {first}", True) from None
    else:
        ray.init(num_cpus=settings.num_cpus, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = True
