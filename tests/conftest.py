"""Session set-up of the whole suite: the live compiled kernels are compiled (or loaded from
numba's cache) once before any test runs (host_iommu/kernels/warm.py), so tests that run the
CLI in a subprocess and signal it after its first epochs (tests/cluster/test_cli_robust.py)
do not spend their budget compiling on a fresh clone."""

from __future__ import annotations

import pytest

from host_iommu.kernels.warm import warm_up


def pytest_sessionstart(session: pytest.Session) -> None:
    warm_up()
