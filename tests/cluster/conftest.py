"""Shared fixtures for the cluster tests: one small local Ray instance per test session.

Ray start-up costs seconds, so every test that needs Ray shares ``ray_local`` (2 CPUs, no
dashboard), started on first use and always shut down at the end of the session. Tests that
start their own Ray cluster (test_multinode.py) do not use it.
"""

from __future__ import annotations

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
