"""Table-page freeing and the invalidation hint (IH): Linux frees a page-table page only when
an unmap covers its whole range (drivers/iommu/intel/iommu.c dma_pte_clear_level /
domain_unmap with the gather's freelist), and flushes with IH set, iommufd's LEAF flag, when
no table page was freed (intel_iommu_tlb_sync), so paging-structure caches survive ordinary
unmaps. Map-time flushes (cache.c cache_tag_flush_range_np) touch the IOTLB only."""

from __future__ import annotations

import numpy as np

from host_iommu import qi
from host_iommu.defs import ACCESS_READ, PAGE_SIZE
from host_iommu.iommu import HostIommu
from host_iommu.nested import IOMMU_VTD_INV_FLAGS_LEAF
from host_iommu.protocol import OP_HWPT_INV
from host_iommu.vfio import vfio_map, vfio_unmap
from tests.host_iommu.test_isolation import server
from tests.host_iommu.test_pgtable import make_table
from tests.vm_agent.test_agent import agent
from workloads.base import DMA_FROM_DEVICE

G1, M2 = 1 << 30, 2 << 20
BASE = G1   # 1-GiB aligned


def test_unmap_frees_only_the_tables_it_covers_whole():
    """Unmapping one page leaves its (now empty) level-1 table; unmapping the 2 MiB frees it
    with one write to the level-2 entry; the 512 GiB below the root frees the rest."""
    _mem, pt = make_table("sl", 4)
    pt.map(BASE, 0x10_0000, 2 * PAGE_SIZE, max_order=0)
    assert pt.table_pages == 4
    assert pt.unmap(BASE, PAGE_SIZE) == 1 and pt.freed_tables == 0
    assert pt.unmap(BASE + PAGE_SIZE, PAGE_SIZE) == 1 and pt.freed_tables == 0
    assert pt.table_pages == 4 and list(pt.leaves()) == []
    assert pt.unmap(BASE, M2) == 1 and pt.freed_tables == 1 and pt.table_pages == 3
    assert pt.unmap(0, 1 << 39) == 1 and pt.freed_tables == 2 and pt.table_pages == 1


def test_covered_region_is_cleared_at_its_top_entry():
    """An unmap covering a table's whole region writes the entry above it once; the leaves
    inside are not rewritten (dma_pte_clear_level clears the covering entry)."""
    _mem, pt = make_table("sl", 4)
    pt.map(BASE, 0x10_0000, 16 * PAGE_SIZE, max_order=0)
    assert pt.unmap(BASE, M2) == 1 and pt.freed_tables == 1
    assert pt.lookup(BASE) is None


def hwpt_flags(a) -> list[int]:
    ops = a.log.take()
    return ops["a2"][ops["op"] == OP_HWPT_INV].tolist()


def test_nested_strict_unmap_sets_leaf_unless_it_freed_a_table():
    """A strict unmap that freed no table page is forwarded with LEAF; a 2-MiB unmap that
    covers its level-1 table (freed) is forwarded without it."""
    a = agent("nested")
    dev = a.workload.dev
    iova, t = a.dma_map(0, dev, a.alloc_buffer(PAGE_SIZE), PAGE_SIZE, DMA_FROM_DEVICE, 0)
    a.log.take()
    t = a.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert hwpt_flags(a) == [IOMMU_VTD_INV_FLAGS_LEAF]
    gpa = a.alloc_buffer(M2 + PAGE_SIZE)
    big, t = a.dma_map(0, dev, gpa, M2 + PAGE_SIZE, DMA_FROM_DEVICE, t)
    a.log.take()
    a.dma_unmap(0, dev, big, M2 + PAGE_SIZE, DMA_FROM_DEVICE, t)
    dom = a.dma.domains[dev.sid]
    assert dom.table.freed_tables >= 1
    assert hwpt_flags(a) == [0]


def test_shadow_unmap_sets_ih_and_map_time_flush_has_no_devtlb():
    """Caching mode with ATS: the map's iotlb_sync_map is a 0x2 PSI (IH 0) and a wait, no
    device-TLB descriptor; the strict unmap is a 0x2 PSI with IH (no table freed) plus the
    0x3 device-TLB invalidation and a wait."""
    a = agent("shadow", ats=True)
    seen: list[list] = []
    handle = a.vmm.handle
    a.vmm.handle = lambda cmds, *rest, **kw: (seen.append(cmds), handle(cmds, *rest, **kw))[1]
    dev = a.workload.dev
    iova, t = a.dma_map(0, dev, a.alloc_buffer(PAGE_SIZE), PAGE_SIZE, DMA_FROM_DEVICE, 0)
    assert [c.type for c in seen[0]] == [qi.QI_IOTLB_TYPE, qi.QI_IWD_TYPE]
    assert seen[0][0].ih is False
    a.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert [c.type for c in seen[1]] == [qi.QI_IOTLB_TYPE, qi.QI_DIOTLB_TYPE,
                                         qi.QI_IWD_TYPE]
    assert seen[1][0].ih is True


def translate(h: HostIommu, sid: int, addr: int, t: int) -> np.void:
    return h.translate(np.array([sid]), np.array([0]), np.array([addr], np.uint64),
                       np.array([ACCESS_READ]), np.array([t]))[0]


def test_host_vfio_unmap_with_ih_keeps_the_paging_structure_caches():
    """VFIO's unmap of one page frees no shadow table, so the host flush carries IH and a
    DMA to the neighbouring page still finds its level-1 table in the PWC (one entry read);
    an unmap that frees tables drops them, and the same DMA walks from the root."""
    hs = server("shadow")
    h, dom = hs.iommu, hs.shadow[1]
    sid = dom.sids[0]
    vfio_map(h, dom, BASE, 0x20000, 2 * PAGE_SIZE)
    vfio_map(h, dom, BASE + M2, 0x30000, PAGE_SIZE)
    assert translate(h, sid, BASE, 10)["walk_refs"] == 4            # cold
    t_done, _ = vfio_unmap(h, dom, BASE, PAGE_SIZE, 100)
    h.advance_to(t_done)
    r = translate(h, sid, BASE + PAGE_SIZE, t_done)
    assert (r["fault"], r["walk_refs"]) == (0, 1)                   # PWC kept
    t_done, _ = vfio_unmap(h, dom, BASE, M2, t_done)                 # frees the L1 table
    h.advance_to(t_done)
    r = translate(h, sid, BASE + M2, t_done)
    assert (r["fault"], r["walk_refs"]) == (0, 4)                   # PWC dropped
