"""Churn: balloon/unplug schedules and parameter validation; the workload registry."""

from __future__ import annotations

import pytest

import workloads
from workloads.churn import Churn, ChurnParams


def test_balloon_alternates(make_ctx):
    """Balloon inflates, then deflates, every interval from start_us."""
    ctx = make_ctx()
    c = Churn(ChurnParams(kind="balloon", interval_us=100.0, pages=64, start_us=50.0))
    c.start(ctx)
    ctx.run_until(400_000)
    assert ctx.churn == [("inflate", 50_000, 64), ("deflate", 150_000, 64),
                         ("inflate", 250_000, 64), ("deflate", 350_000, 64)]
    assert (c.inflated_pages, c.deflated_pages, c.changes) == (128, 128, 4)
    assert ctx.errors == []


def test_unplug_every_interval(make_ctx):
    """Unplug removes pages at every interval, starting at time 0 by default."""
    ctx = make_ctx()
    c = Churn(ChurnParams(kind="unplug", interval_us=1000.0, pages=8))
    c.start(ctx)
    ctx.run_until(3_000_000)
    assert ctx.churn == [("unplug", t, 8) for t in (0, 1_000_000, 2_000_000, 3_000_000)]
    assert c.unplugged_pages == 32


@pytest.mark.parametrize(("change", "key"), [
    ({"kind": "migrate"}, "kind"),
    ({"interval_us": 0.0}, "interval_us"),
    ({"pages": 0}, "pages"),
    ({"pages": 1.5}, "pages"),
    ({"start_us": -1.0}, "start_us"),
])
def test_validate_rejects(change, key):
    """validate() names the bad key; the defaults are valid."""
    assert key in [k for k, _ in ChurnParams(**change).validate()]
    assert ChurnParams().validate() == []


def test_registry():
    """WORKLOADS maps each kind to its class; every Params has defaults that validate."""
    assert sorted(workloads.WORKLOADS) == ["multi", "nic", "nvme", "trace"]
    needs = {"trace": [("path", "a trace file is required")],
             "multi": [("parts", "a list of workloads needs at least one")]}
    for kind, cls in workloads.WORKLOADS.items():
        assert cls.kind == kind
        assert cls.Params().validate() == needs.get(kind, [])
    assert workloads.CHURN_PARAMS is ChurnParams
