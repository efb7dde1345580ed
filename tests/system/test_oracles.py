"""Positive controls: each safety oracle fires on a deliberately broken set-up.

An oracle that never fires proves nothing. Every test here breaks isolation on purpose at the
host boundary (an entry written straight into a shadow table, a VMM that forgets its
invalidation, a DMA to nothing) and checks that the counter the experiments rely on moves,
and that the healthy twin of the same set-up leaves it at zero.
"""

from __future__ import annotations

from host_iommu.defs import PAGE_SIZE
from host_iommu.protocol import OP_HWPT_INV, OP_UNMAP_RET, OP_VFIO_MAP, OP_VFIO_UNMAP
from tests.system.conftest import Bench

SID1, SID2 = 0x100, 0x200
IOVA, GPA = 0x5000, 0x20000


def shadow_pair() -> Bench:
    """Two shadow VMs; VM 1 maps IOVA -> GPA through VFIO, as its VMM would."""
    b = Bench()
    b.shadow_vm(1, SID1)
    b.shadow_vm(2, SID2)
    b.op(1, 100, OP_VFIO_MAP, sid=SID1, a0=IOVA, a1=GPA, a2=PAGE_SIZE, a3=1)
    return b


def test_cross_vm_oracle_fires_on_a_shadow_entry_into_another_vm():
    """A shadow-table entry of VM 1 that points at VM 2's frame (written directly, bypassing
    VFIO's pinning of VM 1's own pages) lets VM 1's DMA land in VM 2: cross_vm_dma counts it,
    and only that DMA."""
    b = shadow_pair()
    b.apply()
    victim = b.h.gpa_to_hpa(2, GPA)
    b.server.shadow[1].table.map(0x9000, victim, PAGE_SIZE)      # the broken set-up
    b.dma(1, 1000, SID1, IOVA)          # its own page
    b.dma(1, 1100, SID1, 0x9000, write=True)
    b.dma(2, 1200, SID2, 0x9000)        # VM 2 has nothing mapped: faults, not cross
    b.apply()
    c1, c2 = b.counters(1), b.counters(2)
    assert (c1["translations"], c1["faults"], c1["cross_vm_dma"]) == (2, 0, 1)
    assert (c2["translations"], c2["faults"], c2["cross_vm_dma"]) == (1, 1, 0)


def test_cross_vm_oracle_quiet_when_isolated():
    """The healthy twin: VM 1's DMA through its VFIO mapping reaches its own frame."""
    b = shadow_pair()
    b.dma(1, 1000, SID1, IOVA, write=True)
    b.apply()
    assert (b.counters(1)["translations"], b.counters(1)["cross_vm_dma"]) == (1, 0)


def test_stale_oracle_fires_when_the_vmm_forgets_the_unmap():
    """A guest whose unmap (id 7) returned at 2 us while its VMM never sent the VFIO unmap:
    the device's DMA at 3 us still translates, and the oracle calls it stale by 1 us."""
    b = shadow_pair()
    b.dma(1, 1000, SID1, IOVA)                        # fills the IOTLB
    b.op(1, 2000, OP_UNMAP_RET, a0=7, a1=2000)        # broken: no OP_VFIO_UNMAP
    b.dma(1, 3000, SID1, IOVA, tag=7)
    b.apply()
    c = b.counters(1)
    assert (c["translations"], c["faults"], c["stale_dma"]) == (2, 0, 1)
    assert c["stale_window_max_ns"] == 1000


def test_stale_oracle_quiet_after_a_real_unmap_and_faults_fire():
    """The healthy twin: with the VFIO unmap the late DMA faults (no stale), the fault is
    counted and reported to VM 1 only, naming its source id and address."""
    b = shadow_pair()
    b.dma(1, 1000, SID1, IOVA)
    b.op(1, 1500, OP_VFIO_UNMAP, sid=SID1, a0=IOVA, a1=PAGE_SIZE, a3=7)
    b.op(1, 2000, OP_UNMAP_RET, a0=7, a1=2000)
    b.dma(1, 30_000, SID1, IOVA + 0x40, tag=7)
    reports = b.apply()
    c = b.counters(1)
    assert (c["translations"], c["faults"], c["stale_dma"], c["cross_vm_dma"]) == (2, 1, 0, 0)
    assert [(f[1], f[3]) for f in reports[1].faults] == [(SID1, IOVA + 0x40)]
    assert reports[2].faults == [] and b.counters(2)["faults"] == 0


def test_stale_dma_in_flight_before_the_unmap_returned_is_not_stale():
    """Window edge: a DMA after the VFIO unmap was issued but before the host's flush
    completed and the guest returned is in flight, not stale, even if it translated."""
    b = shadow_pair()
    b.dma(1, 1000, SID1, IOVA)
    b.op(1, 1500, OP_UNMAP_RET, a0=7, a1=5000)        # the guest returns at 5 us
    b.dma(1, 4000, SID1, IOVA, tag=7)                 # before that: in flight
    b.dma(1, 6000, SID1, IOVA, tag=7)                 # after: stale (no VFIO unmap sent)
    b.apply()
    c = b.counters(1)
    assert (c["stale_dma"], c["stale_window_max_ns"]) == (1, 1000)


def test_stale_oracle_fires_in_nested_mode_when_the_vmm_drops_the_invalidation():
    """Nested twin of the forgotten unmap: the guest clears its first-level PTE and returns
    (unmap id 3) but no HWPT invalidation reaches the host; the IOTLB still translates, and
    the oracle calls the late DMA stale. With the invalidation the same DMA faults."""
    for forward in (False, True):
        b = Bench()
        fl = b.nested_vm(1, SID1)
        fl.map(0x4000_0000, GPA, PAGE_SIZE)
        b.dma(1, 1000, SID1, 0x4000_0000)                      # fills the IOTLB
        fl.store.now = 2000
        fl.unmap(0x4000_0000, PAGE_SIZE)
        if forward:
            b.op(1, 2100, OP_HWPT_INV, sid=SID1, pasid=0, a0=0x4000_0000, a1=1, a3=3)
        b.op(1, 2500, OP_UNMAP_RET, a0=3, a1=2500)
        b.dma(1, 40_000, SID1, 0x4000_0000, tag=3)
        b.apply()
        c = b.counters(1)
        assert (c["stale_dma"], c["faults"]) == ((0, 1) if forward else (1, 0)), forward
