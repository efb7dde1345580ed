"""Nesting and second-level churn (host_iommu/nested.py): a bound guest first level over the
VM's second level; IOMMU_HWPT_INVALIDATE; and a balloon that frees a frame only after every
translation derived from it (IOTLB, device-TLB) has been flushed."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, OWNER_FREE, PAGE_SHIFT, PAGE_SIZE
from host_iommu.invalidate import ALL_PAGES
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.nested import (
    IOMMU_VTD_INV_FLAGS_LEAF,
    alloc_nested,
    attach_second_level,
    hwpt_invalidate,
    sl_map,
    sl_unmap,
)
from host_iommu.pgtable import PageTable
from tests.host_iommu.conftest import DATA_GPA, IOVA, SID, TABLE_GPA, GuestTableStore


def nested_host(ats: bool = False):
    """VM 1 (64 MiB) with a guest first level mapping IOVA -> DATA_GPA (8 pages), bound at
    (SID, PASID 0) by alloc_nested; caches on."""
    h = HostIommu(IommuParams(memory_mib=256, iotlb_entries=256, devtlb_entries=64))
    h.create_vm(1, 64 << 20)
    h.create_vm(2, 16 << 20)
    fl = PageTable(GuestTableStore(h, 1, TABLE_GPA, 64 << 20), "fl", 4, h.p.haw)
    fl.map(IOVA, DATA_GPA, 8 * PAGE_SIZE)
    return h, fl, alloc_nested(h, 1, SID, 0, fl.root, ats=ats)


def dma(h: HostIommu, addr: int, t: int = 0, access: int = ACCESS_READ, sid: int = SID):
    return h.translate(np.array([sid]), np.array([0]), np.array([addr], np.uint64),
                       np.array([access]), np.array([t]))[0]


def test_nested_translation_reaches_the_vms_frame():
    """A cold nested 4-over-4 walk reads 24 entries and lands in VM 1's frame of the GPA."""
    h, _fl, dom = nested_host()
    r = dma(h, IOVA + 0x40, access=ACCESS_WRITE)
    assert (r["fault"], r["walk_refs"]) == (0, 24)
    assert r["hpa"] == h.gpa_to_hpa(1, DATA_GPA + 0x40)
    assert h.owner_of_sid[SID] == 1 and dom.vm == 1 and dom.did != h.vms[1].did
    assert ("nested", dom.did, SID, 0) in h.vms[1].tags


def test_each_binding_gets_its_own_domain_over_the_shared_second_level():
    h, fl, d0 = nested_host()
    d1 = alloc_nested(h, 1, SID, 1, fl.root)
    assert d1.did != d0.did
    assert {t[1] for t in h.vms[1].tags if t[0] == "nested"} >= {d0.did, d1.did}


def test_pass_through_attach_uses_gpas():
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=0))
    h.create_vm(1, 8 << 20)
    did = attach_second_level(h, 1, 0x300)
    r = dma(h, 0x12340, sid=0x300)
    assert (r["fault"], r["walk_refs"]) == (0, 4)
    assert r["hpa"] == h.gpa_to_hpa(1, 0x12340) and did == h.vms[1].did


@pytest.mark.parametrize(("entry", "ats", "descs"), [
    ((IOVA, 1, 0), False, 2),                              # PSI + wait
    ((IOVA, 1, IOMMU_VTD_INV_FLAGS_LEAF), True, 3),        # PSI + 0x8 + wait
    ((0, ALL_PAGES, 0), True, 3),                          # PASID-wide + 0x8 + wait
])
def test_hwpt_invalidate_drops_the_cached_translation(entry, ats, descs):
    """After the guest cleared its PTE, the cached translation survives until the host's
    invalidation completes, then the DMA faults."""
    h, fl, dom = nested_host(ats)
    assert dma(h, IOVA)["fault"] == 0
    fl.unmap(IOVA, PAGE_SIZE)
    assert dma(h, IOVA, 10)["fault"] == 0                  # still cached
    t_done, nd = hwpt_invalidate(h, dom, [entry], 100)
    assert nd == descs and t_done > 100
    h.advance_to(t_done)
    assert dma(h, IOVA, t_done)["fault"] != 0
    assert dma(h, IOVA + PAGE_SIZE, t_done)["fault"] == 0  # its neighbour is still mapped


@pytest.mark.parametrize("ats", [False, True])
def test_balloon_flushes_before_freeing(ats):
    """sl_unmap of a GPA page the device has cached: it queues flushes of every derived
    domain, frees the frame only after they complete, and the DMA then faults."""
    h, _fl, _dom = nested_host(ats)
    assert dma(h, IOVA)["fault"] == 0                       # IOTLB (and device-TLB) filled
    frame = h.gpa_to_hpa(1, DATA_GPA) >> PAGE_SHIFT
    res = sl_unmap(h, 1, DATA_GPA, 1, 1000)
    t_done, nd, freed = res[0], res[1], res[2]
    assert nd >= (3 if ats else 2) and t_done > 1000 and freed == 1
    assert h.mem.owner[frame] == OWNER_FREE
    assert h.gpa_to_hpa(1, DATA_GPA) is None
    r = dma(h, IOVA, t_done)
    assert r["fault"] != 0 and r["hpa"] == 0
    assert dma(h, IOVA + PAGE_SIZE, t_done)["fault"] == 0   # other pages untouched


def test_balloon_of_a_page_no_device_uses_still_flushes_and_frees():
    h, _fl, _dom = nested_host()
    res = sl_unmap(h, 1, 0x200_0000, 4, 0)
    assert res[1] >= 2 and res[2] == 4
    assert all(h.gpa_to_hpa(1, 0x200_0000 + i * PAGE_SIZE) is None for i in range(4))


def test_deflate_backs_the_page_again():
    """sl_map gives the GPA page a new frame owned by the VM; translation works again."""
    h, _fl, _dom = nested_host()
    sl_unmap(h, 1, DATA_GPA, 1, 0)
    h.drain()
    assert sl_map(h, 1, DATA_GPA, 1) == 1
    assert sl_map(h, 1, DATA_GPA, 1) == 0                   # already backed
    hpa = h.gpa_to_hpa(1, DATA_GPA)
    assert h.mem.owner[hpa >> PAGE_SHIFT] == 1
    r = dma(h, IOVA + 8, 10**6)
    assert r["fault"] == 0 and r["hpa"] == hpa + 8
