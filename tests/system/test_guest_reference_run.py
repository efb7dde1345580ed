"""Whole runs with the guest's reference IOVA allocator and flush queues give the same tables.

Each world runs twice in process: once as shipped, once with vm_agent/dma.py building
vm_agent/reference_iova.py's IovaDomain / IovaRcache and vm_agent/reference_flushq.py's
FlushQueue in place of the live ones (monkeypatched where the DMA layer constructs them).
The summary, metrics and faults tables must be equal value for value: the references are
drop-in twins of the live models over a whole run, not only call by call.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.system.conftest import experiment, nic, nvme
from tests.system.golden import tables
from vm_agent import dma
from vm_agent import reference_flushq as ref_fq
from vm_agent import reference_iova as ref_iova

# name -> (VM groups, flush-queue timeout in ns for both runs or None for Linux's, at least
# this many lazy flushes). A short timer makes the timer path fire within a short run.
WORLDS = {
    "nested-strict-nic": ({"a": nic("nested", rogue=0.05, gbps=4.0)}, None, 0),
    "nested-lazy-nic": ({"a": nic("nested", "lazy", rogue=0.05, gbps=8.0)}, None, 1),
    "nested-lazy-nvme-timer": ({"a": nvme("nested", "lazy", rogue=0.05, depth=8, hz=1000)},
                               300_000, 1),
    "shadow-strict-nic": ({"a": nic("shadow", rogue=0.05, gbps=4.0)}, None, 0),
    "shadow-strict-nvme": ({"a": nvme("shadow", rogue=0.05)}, None, 0),
    "nested-lazy-single-fq": ({"a": {**nic("nested", "lazy", rogue=0.02, gbps=8.0),
                                     "flush_queue": "single", "count": 2, "hz": 1000,
                                     "ats": True}},
                              400_000, 1),
}


def _counting(cls: type, made: Counter, key: str, **fixed):
    def make(*args, **kw):
        made[key] += 1
        return cls(*args, **kw, **fixed)
    return make


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_reference_guest_models_give_the_same_tables(name, tmp_path):
    vms, timeout_ns, min_flushes = WORLDS[name]
    cfg = experiment(vms, duration_us=4000, name=f"ref-{name}")
    fixed = {} if timeout_ns is None else {"timeout_ns": timeout_ns}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dma, "FlushQueue", _counting(dma.FlushQueue, Counter(), "fq", **fixed))
        want = tables(cfg, tmp_path / "live")
    made: Counter = Counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dma, "IovaDomain", _counting(ref_iova.IovaDomain, made, "iovad"))
        mp.setattr(dma, "IovaRcache", _counting(ref_iova.IovaRcache, made, "rcache"))
        mp.setattr(dma, "FlushQueue", _counting(ref_fq.FlushQueue, made, "fq", **fixed))
        got = tables(cfg, tmp_path / "ref")
    assert made["iovad"] > 0 and made["rcache"] > 0, "the DMA layer no longer built them"
    assert made["fq"] > 0 or "strict" in name
    assert sum(r["unmaps"] for r in want["summary"]) > 100
    assert sum(r["lazy_flushes"] for r in want["summary"]) >= min_flushes
    for table in ("summary", "metrics", "faults"):
        assert got[table] == want[table], table
