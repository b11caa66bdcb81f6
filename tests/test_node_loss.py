"""The node-loss watchdog and error classification on the session's Ray (the three-node cluster
that really loses a worker is tests/test_multinode.py)."""

from __future__ import annotations

import signal
import time

import pytest
import ray
import ray.exceptions

from pipeline.core.errors import CurriculumError
from pipeline.engine.node_loss import NodeLost, alive_nodes, interrupt_on_stall_after_node_loss, node_loss_cause


def test_a_stage_that_stalls_after_losing_a_node_is_interrupted(ray_address):
    """Also with a SIGINT handler of another library in place (Ray Train leaves one that swallows
    Ctrl-C): the watchdog uses Python's own for the stage, and puts the other one back after."""
    assert alive_nodes(), "the session cluster has a live node"
    swallowed: list[int] = []
    other_handler = lambda signum, frame: swallowed.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGINT, other_handler)
    started_with = alive_nodes() | {"a-node-that-died"}
    rows = iter(range(1, 1000))
    progress = {"rows": 0}
    began = time.monotonic()
    with pytest.raises(NodeLost, match="a-node-that-"):
        with interrupt_on_stall_after_node_loss(started_with, lambda: progress["rows"], stall_seconds=1.0,
                                                poll_seconds=0.1):
            while time.monotonic() - began < 30:
                if time.monotonic() - began < 2.0:  # rows still arrive for 2 s: no interrupt yet
                    progress["rows"] = next(rows)
                time.sleep(0.01)
    waited = time.monotonic() - began
    assert signal.getsignal(signal.SIGINT) is other_handler and not swallowed
    signal.signal(signal.SIGINT, previous)
    assert 2.5 <= waited < 15, f"interrupted after {waited:.1f} s: expected the 1 s stall after the last row"


def test_nothing_is_interrupted_while_every_node_lives(ray_address):
    with interrupt_on_stall_after_node_loss(alive_nodes(), lambda: 0, stall_seconds=0.2, poll_seconds=0.05):
        time.sleep(1.0)


def test_a_real_ctrl_c_is_not_mistaken_for_a_lost_node(ray_address):
    with pytest.raises(KeyboardInterrupt):
        with interrupt_on_stall_after_node_loss(alive_nodes(), lambda: 0, stall_seconds=5):
            raise KeyboardInterrupt


def test_node_loss_errors_are_found_inside_ray_task_errors(ray_address):
    @ray.remote(max_restarts=0, num_cpus=0)
    class Doomed:
        def die(self) -> None:
            import os

            os._exit(1)

    actor = Doomed.remote()
    with pytest.raises(ray.exceptions.RayError) as caught:
        ray.get(actor.die.remote())
    assert node_loss_cause(caught.value) is not None, type(caught.value)
    try:
        try:
            raise caught.value
        except ray.exceptions.RayError as exc:
            raise RuntimeError("Ray Data wrapped it") from exc
    except RuntimeError as wrapped:
        assert node_loss_cause(wrapped) is caught.value
    assert node_loss_cause(ValueError("a bug in a stage")) is None
    assert node_loss_cause(CurriculumError("bad input")) is None
