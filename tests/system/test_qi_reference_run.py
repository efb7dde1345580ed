"""Whole runs with the host's reference invalidation queue give the same tables.

Each world of tests/system/golden.py named below runs twice in process: once as shipped, once
with host_iommu/iommu.py building host_iommu/reference_qi.py's InvalidationQueue (every
effect time kept, one descriptor at a time) in place of host_iommu/qi.py's. The summary,
metrics and faults tables must be equal value for value. The worlds include a saturated
shared queue whose room queries go back in time (nic-strict-vs-lazy: about half of them),
two hosts, second-level churn (balloon) and several PASIDs per device.
"""

from __future__ import annotations

import pytest

from host_iommu import iommu
from host_iommu import reference_qi as ref_qi
from tests.system.golden import tables, worlds

WORLDS = ("nic-strict-vs-lazy", "nested-strict-nvme-rogue", "churn-rogue", "two-hosts",
          "shadow-strict-nvme-rogue", "multi-pasid")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return worlds(tmp_path_factory.mktemp("qi-worlds"))


@pytest.mark.parametrize("name", WORLDS)
def test_reference_queue_gives_the_same_tables(name, configs, tmp_path):
    want = tables(configs[name], tmp_path / "live")
    made: list[ref_qi.InvalidationQueue] = []

    def make(*args, **kw):
        made.append(ref_qi.InvalidationQueue(*args, **kw))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iommu, "InvalidationQueue", make)
        got = tables(configs[name], tmp_path / "ref")
    assert made, "the host no longer builds its queue as InvalidationQueue"
    assert sum(sum(q.counts.values()) for q in made) > 0
    for table in ("summary", "metrics", "faults"):
        assert got[table] == want[table], table
