"""The VFIO type1 side of shadowing: map/unmap of a GIOVA->HPA shadow table, pinning counted.

What QEMU's caching-mode vIOMMU calls on every trapped invalidation (hw/vfio/common.c
vfio_iommu_map_notify -> VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA) and what the host does for
it (drivers/vfio/vfio_iommu_type1.c: pin the pages, iommu_map into the container's domain;
unmap, flush the IOTLB, unpin). The shadow domain is a second-level-only (PGTT=2) translation
whose table maps GIOVA straight to HPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from host_iommu import qi
from host_iommu.defs import NO_PASID, PAGE_SHIFT, PAGE_SIZE, PGTT_SL_ONLY
from host_iommu.invalidate import domain_flush_descs
from host_iommu.iommu import HostIommu
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import HostTableStore, PageTable


class VfioError(Exception):
    """A VFIO request the host refuses (the ioctl's -EINVAL/-EFAULT), named."""


@dataclass
class ShadowDomain:
    """A VFIO container domain for one VM's assigned devices: GIOVA -> HPA."""

    vm: int
    did: int
    table: PageTable
    sids: list[int] = field(default_factory=list)
    pins: dict[int, int] = field(default_factory=dict)  # GPA frame -> pin count
    gpa_of_iova: dict[int, int] = field(default_factory=dict)  # IOVA page -> GPA frame
    pinned_pages: int = 0   # pin operations performed (first pin of a page per mapping)
    pte_writes: int = 0


def vfio_attach(host: HostIommu, vm: int, sids: list[int], *, ats: bool = False
                ) -> ShadowDomain:
    """Open the VM's devices into one container: an empty shadow table bound to each."""
    v = host.vms[vm]
    table = PageTable(HostTableStore(host.mem, 0), "sl", v.sl.levels, host.p.haw, max_order=0)
    dom = ShadowDomain(vm, host.alloc_did(), table)
    for sid in sids:
        host.attach_device(sid, vm, ats=ats)
        host.set_pasid_entry(sid, NO_PASID, PasidEntry(pgtt=PGTT_SL_ONLY, did=dom.did,
                                                       slptr=table.root,
                                                       sl_levels=table.levels))
        dom.sids.append(sid)
    v.tags.append(("shadow", dom.did, sids[0] if sids else 0, NO_PASID))
    return dom


def vfio_map(host: HostIommu, dom: ShadowDomain, iova: int, gpa: int, size: int,
             write: bool = True) -> int:
    """VFIO_IOMMU_MAP_DMA of [gpa, gpa+size) at iova: pin each page, map GIOVA->HPA.

    Returns the pages pinned. Raises VfioError for unaligned or unbacked ranges.
    """
    if iova % PAGE_SIZE or gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
        raise VfioError(f"unaligned VFIO map iova={iova:#x} gpa={gpa:#x} size={size:#x}")
    pinned = 0
    for off in range(0, size, PAGE_SIZE):
        hpa = host.gpa_to_hpa(dom.vm, gpa + off)
        if hpa is None:
            raise VfioError(f"VFIO map of unbacked GPA {gpa + off:#x}")
        f = (gpa + off) >> PAGE_SHIFT
        dom.pins[f] = dom.pins.get(f, 0) + 1
        dom.gpa_of_iova[(iova + off) >> PAGE_SHIFT] = f
        pinned += 1
        dom.pte_writes += dom.table.map(iova + off, hpa, PAGE_SIZE, write=write)
    dom.pinned_pages += pinned
    return pinned


def vfio_unmap(host: HostIommu, dom: ShadowDomain, iova: int, size: int, t_ns: int
               ) -> tuple[int, int]:
    """VFIO_IOMMU_UNMAP_DMA: clear the shadow range, flush, unpin.

    Returns (time the flush completed, descriptors queued).
    """
    if iova % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
        raise VfioError(f"unaligned VFIO unmap iova={iova:#x} size={size:#x}")
    for off in range(0, size, PAGE_SIZE):
        gframe = dom.gpa_of_iova.pop((iova + off) >> PAGE_SHIFT, None)
        if gframe is not None and gframe in dom.pins:
            dom.pins[gframe] -= 1
            if dom.pins[gframe] <= 0:
                del dom.pins[gframe]
    dom.pte_writes += dom.table.unmap(iova, size)
    ats = [s for s in dom.sids if s in host.ats_sids]
    descs = [*domain_flush_descs(dom.did, iova, size >> PAGE_SHIFT, ats_sids=ats), qi.wait_desc()]
    return host.submit_qi(np.array(descs), t_ns)
