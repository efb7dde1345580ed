"""The VMM's trap handlers (vm_agent/vmm.py): what each trapped invalidation becomes at the
host boundary. Shadow follows QEMU's caching-mode shadow sync (VFIO map/unmap of the
differences), nested forwards PASID-based invalidations as IOMMU_HWPT_INVALIDATE, and
pass-through never traps."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SIZE
from host_iommu.invalidate import ALL_PAGES, domain_flush_descs, pasid_flush_descs
from host_iommu.nested import IOMMU_VTD_INV_FLAGS_LEAF
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OP_HWPT_INV, OP_VFIO_MAP, OP_VFIO_UNMAP, OpLog
from vm_agent.agent import GUEST_COUNTERS
from vm_agent.memory import GuestMemory, GuestTableStore
from vm_agent.vmm import VMMS, NestedVmm, PassthroughVmm, ShadowVmm

C = CostModel()
SID = 0x100
IOVA = 0x10_0000
GPA = 0x40_0000


def cmds(*descs: np.void) -> list[qi.InvCommand]:
    return [qi.decode(d) for d in descs]


def make(cls):
    log = OpLog(1)
    stats = dict.fromkeys(GUEST_COUNTERS, 0)
    return cls(log, C, stats), log, stats


def guest_table() -> PageTable:
    """A shadow guest's second-level-format table in its own memory."""
    return PageTable(GuestTableStore(GuestMemory(16 << 8)), "sl", 4, max_order=0)


def rows(log: OpLog) -> list[tuple]:
    ops = log.take()
    return [(int(o["op"]), int(o["sid"]), int(o["pasid"]), int(o["a0"]), int(o["a1"]),
             int(o["a2"]), int(o["a3"])) for o in ops]


def test_registry_names_every_mode():
    assert {m: c.mode for m, c in VMMS.items()} == {
        "shadow": "shadow", "nested": "nested", "passthrough": "passthrough"}


# --- nested ------------------------------------------------------------------------------
def test_nested_forwards_a_page_selective_invalidation():
    """A strict unmap's 0x6 PSI (4 pages at 0x4000) + wait: one OP_HWPT_INV {addr, npages,
    flags} carrying the unmap id; the wait rides along. Time: trap + one forward + wait."""
    vmm, log, stats = make(NestedVmm)
    descs = pasid_flush_descs(1, 0, 0x5000, 2, leaf=False, ats_sids=[])
    t = vmm.handle(cmds(*descs, qi.wait_desc()), 1000, SID, None, unmap_id=42)
    assert rows(log) == [(OP_HWPT_INV, SID, 0, 0x4000, 4, 0, 42)]
    assert stats["vmm_invalidate_calls"] == 1
    assert t == 1000 + C.vmm_trap_ns + C.hwpt_invalidate_ns + C.qi_desc_ns + C.qi_wait_ns


def test_nested_leaf_hint_becomes_the_leaf_flag():
    vmm, log, _ = make(NestedVmm)
    vmm.handle(cmds(*pasid_flush_descs(1, 3, IOVA, 1, leaf=True, ats_sids=[])), 0, SID, None)
    assert rows(log) == [(OP_HWPT_INV, SID, 3, IOVA, 1, IOMMU_VTD_INV_FLAGS_LEAF, -1)]


def test_nested_pasid_wide_flush_is_everything():
    """A lazy flush (0x6 G=10b, plus 0x8 with ATS): addr 0, npages all-ones, no unmap id."""
    vmm, log, stats = make(NestedVmm)
    descs = pasid_flush_descs(1, 0, 0, ALL_PAGES, leaf=False, ats_sids=[SID])
    vmm.handle(cmds(*descs, qi.wait_desc()), 0, SID, None)
    ops = log.take()
    assert ops.size == 1 and ops["op"][0] == OP_HWPT_INV
    assert (int(ops["a0"][0]), int(ops["a1"][0]), int(ops["a3"][0])) == (0, ALL_PAGES, -1)
    assert stats["vmm_invalidate_calls"] == 1


def test_nested_one_forward_per_pasid_invalidation():
    vmm, log, stats = make(NestedVmm)
    a = pasid_flush_descs(1, 0, 0x1000, 1, leaf=False, ats_sids=[])
    b = pasid_flush_descs(1, 0, 0x9000, 1, leaf=False, ats_sids=[])
    vmm.handle(cmds(*a, *b, qi.wait_desc()), 0, SID, None, unmap_id=5)
    assert [(r[3], r[6]) for r in rows(log)] == [(0x1000, 5), (0x9000, 5)]
    assert stats["vmm_invalidate_calls"] == 2


# --- shadow ------------------------------------------------------------------------------
def psi(addr: int, pages: int) -> list[qi.InvCommand]:
    return cmds(*domain_flush_descs(1, addr, pages, ats_sids=[]), qi.wait_desc())


def test_shadow_map_becomes_one_vfio_map_per_leaf():
    """Four pages mapped to contiguous GPAs, then iotlb_sync_map's PSI: QEMU notifies each
    leaf, so four VFIO maps of 4 KiB (writable), each costed with the VFIO call and its pin;
    the walk read one entry at levels 4, 3, 2 and four at level 1."""
    vmm, log, stats = make(ShadowVmm)
    table = guest_table()
    table.map(IOVA, GPA, 4 * PAGE_SIZE, write=True)
    t = vmm.handle(psi(IOVA, 4), 0, SID, table)
    assert rows(log) == [(OP_VFIO_MAP, SID, 0, IOVA + i * PAGE_SIZE, GPA + i * PAGE_SIZE,
                          PAGE_SIZE, 1) for i in range(4)]
    assert stats["vmm_map_calls"] == 4 and stats["vmm_unmap_calls"] == 0
    assert t == (C.vmm_trap_ns + 7 * C.vmm_pte_read_ns + 4 * C.vfio_map_ns
                 + 4 * C.pin_page_ns)


def test_shadow_split_runs_and_read_only():
    """Pages whose GPAs are not contiguous, or whose permission differs, are separate maps."""
    vmm, log, _ = make(ShadowVmm)
    table = guest_table()
    table.map(IOVA, GPA, PAGE_SIZE, write=False)
    table.map(IOVA + PAGE_SIZE, GPA + 0x10_0000, PAGE_SIZE, write=True)
    vmm.handle(psi(IOVA, 2), 0, SID, table)
    assert [(r[3], r[4], r[5], r[6]) for r in rows(log)] == [
        (IOVA, GPA, PAGE_SIZE, 0), (IOVA + PAGE_SIZE, GPA + 0x10_0000, PAGE_SIZE, 1)]


def test_shadow_unmap_becomes_a_vfio_unmap_per_cleared_entry():
    """The strict unmap's PSI over cleared entries (the level-1 table stays: the unmap does
    not cover it): one VFIO unmap per 4-KiB entry, each carrying the unmap id, costed as
    VFIO_IOMMU_UNMAP_DMA blocking on the host's flush."""
    vmm, log, stats = make(ShadowVmm)
    table = guest_table()
    table.map(IOVA, GPA, 2 * PAGE_SIZE)
    vmm.handle(psi(IOVA, 2), 0, SID, table)
    log.take()
    table.unmap(IOVA, 2 * PAGE_SIZE)
    t = vmm.handle(psi(IOVA, 2), 0, SID, table, unmap_id=9)
    assert rows(log) == [(OP_VFIO_UNMAP, SID, 0, IOVA, PAGE_SIZE, 0, 9),
                         (OP_VFIO_UNMAP, SID, 0, IOVA + PAGE_SIZE, PAGE_SIZE, 0, 9)]
    assert stats["vmm_unmap_calls"] == 2
    assert t == (C.vmm_trap_ns + 5 * C.vmm_pte_read_ns
                 + 2 * (C.vfio_unmap_ns + C.qi_desc_ns + C.qi_wait_ns))


def test_shadow_sends_only_differences():
    """A second sync of an unchanged range sends nothing; a remapped page is unmapped, then
    mapped at its new GPA; the wait descriptor alone does nothing."""
    vmm, log, _ = make(ShadowVmm)
    table = guest_table()
    table.map(IOVA, GPA, PAGE_SIZE)
    vmm.handle(psi(IOVA, 1), 0, SID, table)
    log.take()
    vmm.handle(psi(IOVA, 1), 0, SID, table)
    vmm.handle(cmds(qi.wait_desc()), 0, SID, table)
    assert rows(log) == []
    table.unmap(IOVA, PAGE_SIZE)
    table.map(IOVA, GPA + 0x8000, PAGE_SIZE)
    vmm.handle(psi(IOVA, 1), 0, SID, table, unmap_id=3)
    assert [(r[0], r[3]) for r in rows(log)] == [(OP_VFIO_UNMAP, IOVA), (OP_VFIO_MAP, IOVA)]


def test_shadow_domain_wide_invalidation_resyncs_everything():
    """A domain-selective 0x2 walks the whole table: new pages mapped, vanished ones unmapped
    (vtd_sync_shadow_page_table)."""
    vmm, log, _ = make(ShadowVmm)
    table = guest_table()
    table.map(IOVA, GPA, PAGE_SIZE)
    vmm.handle(psi(IOVA, 1), 0, SID, table)
    log.take()
    table.unmap(IOVA, PAGE_SIZE)
    table.map(0x80_0000, GPA, PAGE_SIZE)
    vmm.handle(cmds(*domain_flush_descs(1, None, 0, ats_sids=[])), 0, SID, table)
    assert [(r[0], r[3]) for r in rows(log)] == [(OP_VFIO_UNMAP, IOVA),
                                                 (OP_VFIO_MAP, 0x80_0000)]


def test_shadow_ignores_pasid_descriptors_and_devtlb():
    """Device-TLB descriptors reach no VFIO call (the host flushes its own device-TLB)."""
    vmm, log, _ = make(ShadowVmm)
    table = guest_table()
    table.map(IOVA, GPA, PAGE_SIZE)
    vmm.handle(cmds(qi.dev_iotlb_desc(SID, SID, 0, IOVA, PAGE_SIZE)), 0, SID, table)
    assert rows(log) == []


# --- pass-through ------------------------------------------------------------------------
@pytest.mark.parametrize("t0", [0, 12345])
def test_passthrough_never_traps(t0):
    vmm, log, stats = make(PassthroughVmm)
    assert vmm.handle(psi(IOVA, 1), t0, SID, None, unmap_id=1) == t0
    assert rows(log) == [] and not any(stats.values())
