"""A run that loses a Ray node mid-stage resumes on the nodes that are left, instead of hanging.

Ray's own recovery (restart the lost actors, rebuild the lost blocks from lineage) needs free
resources, and a model stage's actor pool holds every CPU or GPU of the cluster: the restarted
actor, or the task that rebuilds a lost input block, then waits forever for a slot that the
surviving actors keep (seen on a three-node cluster that lost a worker while its scorer loaded).
So the pools' actors are not restarted (``max_restarts=0``: losing one is an error at once), and
a stage that fails with a node-loss error, or stalls after a node it started with has gone
(:func:`interrupt_on_stall_after_node_loss`), raises :class:`NodeLostError`. The runner then ends
its Ray job, which makes Ray kill the job's stuck actors, joins the cluster again and resumes from
the stage cache, at most ``ray.node_loss_retries`` times. The output does not depend on which node
ran what, so the resumed run writes the same bytes.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray
import ray.exceptions

from pipeline.core.errors import StageError, find_cause

Log = Callable[[str], None]

class NodeLost(Exception):
    """The watchdog interrupted a stage that stalled after a node died."""


class NodeLostError(StageError):
    """A stage lost a node it started with (``nodes``: the live nodes at its start)."""

    def __init__(self, message: str, nodes: set[str]):
        super().__init__(message)
        self.nodes = nodes


# What Ray raises when the node under a task, an actor or an object went away, and the watchdog's own.
NODE_LOSS_ERRORS: tuple[type[BaseException], ...] = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
    ray.exceptions.WorkerCrashedError,
    NodeLost,
)


def alive_nodes() -> set[str]:
    """IDs of the cluster's live nodes."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def node_loss_cause(exc: BaseException) -> BaseException | None:
    """The node-loss error in ``exc``'s chain (Ray wraps it in task errors), or None."""
    return find_cause(exc, NODE_LOSS_ERRORS)


@contextmanager
def interrupt_on_stall_after_node_loss(started_with: set[str], progress: Callable[[], int],
                                       stall_seconds: float, poll_seconds: float = 1.0) -> Iterator[None]:
    """Raise :class:`NodeLost` in the body when a node of ``started_with`` has died and
    ``progress()`` (rows written so far) has not moved for ``stall_seconds`` since.

    The body runs in the main thread and is interrupted like a Ctrl-C (Ray Data shuts its
    executor down on one), with Python's own SIGINT handler in place meanwhile: a handler another
    library left behind (Ray Train installs one that only aborts its trainer) would swallow the
    interrupt. Off the main thread (a notebook's worker thread) there is nothing to interrupt, and
    only the node-loss errors themselves lead to a retry.
    """
    if stall_seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop, fired = threading.Event(), threading.Event()
    lost: list[str] = []

    def watch() -> None:
        last_rows, last_change = -1, 0.0
        while not stop.wait(poll_seconds):
            try:
                gone = started_with - alive_nodes()
            except Exception:  # noqa: BLE001 - the GCS is briefly unreachable: look again next time
                continue
            if not gone:
                continue
            rows = progress()
            if rows != last_rows:
                last_rows, last_change = rows, time.monotonic()
            elif time.monotonic() - last_change >= stall_seconds:
                lost.extend(sorted(gone))
                fired.set()
                _thread.interrupt_main()
                return

    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=watch, name="node-loss watchdog", daemon=True)
    thread.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired.is_set():
            raise NodeLost(f"node(s) {', '.join(n[:12] for n in lost)} died and the stage made no progress "
                           f"for {stall_seconds:g} s") from None
        raise
    finally:
        stop.set()
        thread.join()
        signal.signal(signal.SIGINT, previous_handler)


def wait_until_marked_dead(started_with: set[str], timeout: float, log: Log) -> None:
    """Wait (at most ``timeout`` s) until Ray reports a node of ``started_with`` dead, so the retry's
    placement counts only the nodes that are left; a worker that crashed on a healthy node never
    gets there, and the retry then starts when the wait ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = started_with - alive_nodes()
        if gone:
            log(f"[ray] node(s) {', '.join(n[:12] for n in sorted(gone))} marked dead")
            return
        time.sleep(1.0)
