"""HostServer (host_iommu/server.py): VM set-up per mode, one epoch of merged operations
applied in order, per-VM counters and reports, the oracle's checks on every DMA, and
operations split at the time a queued invalidation takes effect."""

from __future__ import annotations

import pytest

from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SIZE
from host_iommu.protocol import (
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_UNMAP_RET,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
    VmSetup,
)
from host_iommu.server import HOST_COUNTERS, HostServer
from tests.system.conftest import Bench

SID1, SID2 = 0x100, 0x200
IOVA, GPA = 0x5000, 0x20000
REFUSALS = ("vfio_errors", "foreign_sid_refused", "ops_refused")


def test_setup_per_mode():
    b = Bench()
    b.shadow_vm(1, SID1)
    fl = b.nested_vm(2, SID2)
    b.passthrough_vm(3, 0x300)
    s = b.server
    assert sorted(s.counters) == [1, 2, 3]
    assert all(set(HOST_COUNTERS) <= set(c) for c in s.counters.values())
    assert s.shadow[1].sids == [SID1]
    assert s.nested[(SID2, 0)].flptr_gpa == fl.root and s.nested[(SID2, 0)].vm == 2
    assert {b.h.owner_of_sid[x] for x in (SID1, SID2, 0x300)} == {1, 2, 3}


def test_unknown_mode_is_refused_by_name():
    s = HostServer()
    with pytest.raises(ValueError, match="mode"):
        s.setup_vm(VmSetup(1, 8 << 20, "emulated", (SID1,)))


def test_reports_every_vm_with_its_own_counters():
    """Every VM gets a report each epoch (sorted by id), with a copy of its counters."""
    b = Bench()
    b.shadow_vm(2, SID2)
    b.shadow_vm(1, SID1)
    b.op(1, 10, OP_VFIO_MAP, sid=SID1, a0=IOVA, a1=GPA, a2=PAGE_SIZE, a3=1)
    b.dma(1, 100, SID1, IOVA)
    b.dma(1, 200, SID1, IOVA + 8)
    reports = b.apply()
    assert list(reports) == [1, 2]
    r1 = reports[1].counters
    assert (r1["translations"], r1["iotlb_misses"], r1["iotlb_hits"], r1["pinned_pages"]) == (
        2, 1, 1, 1)
    assert r1 == b.counters(1) and r1 is not b.counters(1)
    assert reports[2].counters["translations"] == 0


def test_translate_time_is_hits_and_memory_references():
    b = Bench()
    b.shadow_vm(1, SID1)
    b.op(1, 10, OP_VFIO_MAP, sid=SID1, a0=IOVA, a1=GPA, a2=PAGE_SIZE, a3=1)
    b.dma(1, 100, SID1, IOVA)
    b.dma(1, 200, SID1, IOVA)
    b.apply()
    c, cost = b.counters(1), CostModel()
    assert c["translate_ns"] == (cost.iotlb_hit_ns * c["iotlb_hits"]
                                 + cost.mem_ref_ns * (c["walk_refs"] + c["ctx_refs"]))
    assert c["walk_refs"] == 4 and c["ctx_refs"] > 0


def test_cross_vm_dma_is_counted_for_the_dma_s_vm():
    """Positive control at the server: VM 1's shadow entry pointing into VM 2's memory."""
    b = Bench()
    b.shadow_vm(1, SID1)
    b.shadow_vm(2, SID2)
    b.apply()
    b.server.shadow[1].table.map(IOVA, b.h.gpa_to_hpa(2, GPA), PAGE_SIZE)
    b.dma(1, 100, SID1, IOVA)
    b.apply()
    assert (b.counters(1)["cross_vm_dma"], b.counters(2)["cross_vm_dma"]) == (1, 0)


def test_dma_batch_is_cut_where_an_invalidation_takes_effect():
    """In one epoch: VFIO unmap at 1 us, then DMAs just after it and long after. The first
    still uses the cached translation (the flush has not taken effect; the unmap has not
    returned, so it is not stale); the second faults."""
    b = Bench()
    b.shadow_vm(1, SID1)
    b.op(1, 10, OP_VFIO_MAP, sid=SID1, a0=IOVA, a1=GPA, a2=PAGE_SIZE, a3=1)
    b.dma(1, 100, SID1, IOVA)
    b.op(1, 1000, OP_VFIO_UNMAP, sid=SID1, a0=IOVA, a1=PAGE_SIZE, a3=0)
    b.op(1, 1001, OP_UNMAP_RET, a0=0, a1=1001)
    b.dma(1, 1002, SID1, IOVA, tag=0)
    b.dma(1, 50_000, SID1, IOVA, tag=0)
    b.apply()
    c = b.counters(1)
    assert (c["translations"], c["faults"], c["stale_dma"]) == (3, 1, 0)
    assert c["host_inv_descriptors"] == 2


def test_nested_guest_writes_build_the_table_the_iommu_walks():
    """The guest's first-level stores (OP_GUEST_WRITE) land in host memory: the device then
    translates through them to the VM's frame."""
    b = Bench()
    fl = b.nested_vm(1, SID1)
    fl.map(0x4000_0000, GPA, PAGE_SIZE)
    b.dma(1, 5000, SID1, 0x4000_0000, write=True)
    b.apply()
    c = b.counters(1)
    assert (c["translations"], c["faults"], c["cross_vm_dma"]) == (1, 0, 0)
    assert c["walk_refs"] == 24


def test_guest_write_to_unbacked_gpa_is_dropped_and_counted():
    b = Bench()
    b.nested_vm(1, SID1)
    b.op(1, 10, OP_GUEST_WRITE, a0=64 << 20, a1=0x27)      # beyond its 8 MiB
    b.apply()
    assert b.counters(1)["guest_writes_dropped"] == 1


def test_hwpt_invalidate_of_another_vms_device_is_refused():
    """VM 2 naming VM 1's device: refused and counted for VM 2; VM 1's cached translation is
    untouched (it still hits)."""
    b = Bench()
    fl = b.nested_vm(1, SID1)
    b.nested_vm(2, SID2)
    fl.map(0x4000_0000, GPA, PAGE_SIZE)
    b.dma(1, 5000, SID1, 0x4000_0000)
    b.apply()
    b.op(2, 10_000, OP_HWPT_INV, sid=SID1, pasid=0, a0=0, a1=(1 << 64) - 1)
    b.dma(1, 20_000, SID1, 0x4000_0000)
    b.apply()
    assert sum(b.counters(2).get(k, 0) for k in REFUSALS) == 1
    assert b.counters(1)["iotlb_hits"] == 1 and b.counters(1)["faults"] == 0
    assert b.counters(2)["host_inv_descriptors"] == 0
