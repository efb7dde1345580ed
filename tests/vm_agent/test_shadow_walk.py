"""The caching-mode shadow walk (vm_agent/vmm.py ShadowVmm, PageTable.walk_range): one
notifier event, and so one VFIO ioctl, per leaf PTE that changed and per entry that maps
nothing over something shadowed, at that entry's level and size, as QEMU's
hw/i386/intel_iommu.c vtd_page_walk_level / vtd_page_walk_one do with the iova_tree."""

from __future__ import annotations

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SIZE
from host_iommu.invalidate import domain_flush_descs
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OP_VFIO_MAP, OP_VFIO_UNMAP, OpLog
from tests.vm_agent.test_agent import agent
from vm_agent.agent import GUEST_COUNTERS
from vm_agent.memory import GuestMemory, GuestTableStore
from vm_agent.vmm import ShadowVmm
from workloads.base import DMA_FROM_DEVICE

C = CostModel()
SID = 0x100
M2 = 2 << 20
IOVA = 4 * M2       # 2-MiB aligned
GPA = 0x40_0000


def shadow_vmm():
    stats = dict.fromkeys(GUEST_COUNTERS, 0)
    return ShadowVmm(OpLog(1), C, stats), stats


def guest_table() -> PageTable:
    return PageTable(GuestTableStore(GuestMemory(16 << 8)), "sl", 4, max_order=0)


def psi(addr: int, pages: int) -> list[qi.InvCommand]:
    return [qi.decode(d) for d in (*domain_flush_descs(1, addr, pages, ats_sids=[]),
                                   qi.wait_desc())]


def calls(vmm: ShadowVmm) -> list[tuple[int, int, int]]:
    """(op, iova, bytes) of each VFIO call, in order."""
    ops = vmm.log.take()
    return [(int(o["op"]), int(o["a0"]),
             int(o["a2"] if o["op"] == OP_VFIO_MAP else o["a1"])) for o in ops]


def test_a_16_page_buffer_is_16_vfio_maps_and_16_unmaps():
    """Each leaf is its own MAP event; after an unmap that leaves the level-1 table (it does
    not cover its 2 MiB), each cleared entry is its own UNMAP event of 4 KiB."""
    vmm, stats = shadow_vmm()
    table = guest_table()
    table.map(IOVA + PAGE_SIZE, GPA, 16 * PAGE_SIZE)
    t = vmm.handle(psi(IOVA + PAGE_SIZE, 16), 0, SID, table)
    assert calls(vmm) == [(OP_VFIO_MAP, IOVA + (i + 1) * PAGE_SIZE, PAGE_SIZE)
                          for i in range(16)]
    assert stats["vmm_map_calls"] == 16
    # PSI of 16 pages at page 1: am 5 covers pages 0..31, so 32 level-1 reads + 3 above
    assert t == C.vmm_trap_ns + 35 * C.vmm_pte_read_ns + 16 * (C.vfio_map_ns + C.pin_page_ns)
    table.unmap(IOVA + PAGE_SIZE, 16 * PAGE_SIZE)
    assert table.freed_tables == 0
    vmm.handle(psi(IOVA + PAGE_SIZE, 16), 0, SID, table, unmap_id=4)
    assert calls(vmm) == [(OP_VFIO_UNMAP, IOVA + (i + 1) * PAGE_SIZE, PAGE_SIZE)
                          for i in range(16)]
    assert stats["vmm_unmap_calls"] == 16


def test_an_upper_entry_that_became_non_present_is_one_unmap_of_its_size():
    """An unmap covering the whole 2 MiB frees the level-1 table: the walk meets the
    non-present level-2 entry and sends one UNMAP of 2 MiB, which drops every shadowed page
    below it (iova_tree_remove of the region)."""
    vmm, stats = shadow_vmm()
    table = guest_table()
    table.map(IOVA, GPA, 8 * PAGE_SIZE)
    vmm.handle(psi(IOVA, 8), 0, SID, table)
    vmm.log.take()
    table.unmap(IOVA, M2)
    assert table.freed_tables == 1
    vmm.handle(psi(IOVA, 8), 0, SID, table, unmap_id=7)
    ops = vmm.log.take()
    assert ops["op"].tolist() == [OP_VFIO_UNMAP]
    assert (int(ops["a0"][0]), int(ops["a1"][0]), int(ops["a3"][0])) == (IOVA, M2, 7)
    assert stats["vmm_unmap_calls"] == 1 and vmm.shadowed[SID] == {}


def test_entries_over_nothing_shadowed_send_nothing():
    """A non-present entry whose region holds nothing shadowed is skipped, at any level:
    a domain-wide resync of an empty domain reads the 512 root entries and calls nothing."""
    vmm, stats = shadow_vmm()
    table = guest_table()
    t = vmm.handle([qi.decode(qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, 1))], 0, SID, table)
    assert calls(vmm) == [] and t == C.vmm_trap_ns + 512 * C.vmm_pte_read_ns
    table.map(IOVA, GPA, PAGE_SIZE)
    vmm.handle(psi(IOVA, 1), 0, SID, table)
    vmm.log.take()
    vmm.handle(psi(IOVA + PAGE_SIZE, 1), 0, SID, table)   # an empty neighbour
    assert calls(vmm) == [] and stats["vmm_unmap_calls"] == 0


def test_a_changed_leaf_is_an_unmap_of_its_page_then_a_map():
    """vtd_page_walk_one: the same IOVA with another GPA or permission emulates an UNMAP of
    the old page first, then MAPs the new one."""
    vmm, _ = shadow_vmm()
    table = guest_table()
    table.map(IOVA, GPA, 2 * PAGE_SIZE)
    vmm.handle(psi(IOVA, 2), 0, SID, table)
    vmm.log.take()
    table.map(IOVA + PAGE_SIZE, GPA + 0x10_0000, PAGE_SIZE, write=False)
    vmm.handle(psi(IOVA, 2), 0, SID, table)
    assert calls(vmm) == [(OP_VFIO_UNMAP, IOVA + PAGE_SIZE, PAGE_SIZE),
                          (OP_VFIO_MAP, IOVA + PAGE_SIZE, PAGE_SIZE)]
    assert vmm.shadowed[SID][(IOVA + PAGE_SIZE) >> 12] == ((GPA + 0x10_0000) >> 12, False)


def test_walk_range_stops_at_leaves_and_empty_entries_with_stacked_permissions():
    """The walk's events: leaves with their level, empty entries over their whole region,
    and a leaf under a read-only table entry is read-only (permissions stacked)."""
    table = guest_table()
    table.map(IOVA, GPA, PAGE_SIZE)
    events, reads = table.walk_range(IOVA, IOVA + 2 * PAGE_SIZE)
    assert events == [(IOVA, 1, GPA, True), (IOVA + PAGE_SIZE, 1, None, False)]
    assert reads == 5
    events, _ = table.walk_range(IOVA + M2, IOVA + M2 + PAGE_SIZE)
    assert events == [(IOVA + M2, 2, None, False)]
    # make the level-2 entry read-only: the leaf below it loses W
    l3 = table.store.read(table.root) & ~0xFFF
    l2 = table.store.read(l3) & ~0xFFF
    ea = l2 + 8 * (IOVA // M2)
    table.store.write(ea, (table.store.read(ea) & ~0x2))
    assert table.walk_range(IOVA, IOVA + PAGE_SIZE)[0] == [(IOVA, 1, GPA, False)]
    table.store.write(ea, table.store.read(ea) & ~0x3)   # no permission left: maps nothing
    assert table.walk_range(IOVA, IOVA + PAGE_SIZE)[0] == [(IOVA, 2, None, False)]


def test_guest_dma_api_16_page_map_and_strict_unmap_cost_16_vfio_calls_each():
    """Through the guest DMA API: one map call of 16 pages is one trap and 16 VFIO maps;
    its strict unmap (which frees no table page) one trap and 16 VFIO unmaps."""
    a = agent("shadow")
    a.log.take()
    dev = a.workload.dev
    iova, t = a.dma_map(0, dev, a.alloc_buffer(16 * PAGE_SIZE), 16 * PAGE_SIZE,
                        DMA_FROM_DEVICE, 0)
    assert (a.stats["vm_exits"], a.stats["vmm_map_calls"]) == (1, 16)
    a.dma_unmap(0, dev, iova, 16 * PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert (a.stats["vm_exits"], a.stats["vmm_unmap_calls"]) == (2, 16)
    ops = a.log.take()
    assert int((ops["op"] == OP_VFIO_UNMAP).sum()) == 16
    assert set(ops["a1"][ops["op"] == OP_VFIO_UNMAP].tolist()) == {PAGE_SIZE}
