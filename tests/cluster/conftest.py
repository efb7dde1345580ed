"""Shared fixtures for the cluster tests: one small local Ray instance per test session.

Ray start-up costs seconds, so every test that needs Ray shares ``ray_local`` (2 CPUs, no
dashboard), started on first use and always shut down at the end of the session. Tests that
start their own Ray cluster (test_multinode.py) do not use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def kill_and_wait(ray_local):
    """A function that kills an actor and blocks until calls on it fail: ``ray.kill`` is
    asynchronous, and a test that kills at epoch k expects the run's next call to see the
    actor dead."""
    return lambda actor: _kill_and_wait(ray_local, actor)


def _kill_and_wait(ray, actor, timeout_s: float = 60.0) -> None:
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.node_id.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.02)
    raise AssertionError("the killed actor still answers")
