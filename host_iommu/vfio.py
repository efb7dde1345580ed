"""The VFIO type1 side of shadowing: map/unmap of a GIOVA->HPA shadow table, pinning counted.

What QEMU's caching-mode vIOMMU calls on every trapped invalidation (hw/vfio/common.c
vfio_iommu_map_notify -> VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA) and what the host does for
it (drivers/vfio/vfio_iommu_type1.c: pin the pages, iommu_map into the container's domain;
unmap, flush the IOTLB, unpin). The shadow domain is a second-level-only (PGTT=2) translation
whose table maps GIOVA straight to HPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from host_iommu import qi
from host_iommu.defs import NO_PASID, PAGE_SHIFT, PAGE_SIZE, PGTT_SL_ONLY
from host_iommu.invalidate import domain_flush_descs
from host_iommu.iommu import HostIommu
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import HostTableStore, PageTable


class VfioError(Exception):
    """A VFIO request the host refuses (the ioctl's -EINVAL/-EFAULT/-EEXIST), named."""


@dataclass
class ShadowDomain:
    """A VFIO container domain for one VM's assigned devices: GIOVA -> HPA.

    Pins are held on the VM's memory (``VmMemory.pins``, one count per mapping of a GPA
    page), so a second-level change can see them; ``gpa_of_iova`` is the container's record
    of what is mapped, which unmap walks instead of the requested range.
    """

    vm: int
    did: int
    table: PageTable
    sids: list[int] = field(default_factory=list)
    gpa_of_iova: dict[int, int] = field(default_factory=dict)  # IOVA page -> GPA frame
    pinned_pages: int = 0   # pin operations performed (first pin of a page per mapping)
    pte_writes: int = 0


def vfio_attach(host: HostIommu, vm: int, sids: list[int], *, ats: bool = False
                ) -> ShadowDomain:
    """Open the VM's devices into one container: an empty shadow table bound to each."""
    v = host.vms[vm]
    for sid in sids:
        owner = host.owner_of_sid.get(sid)
        if not 0 <= sid <= 0xFFFF or owner not in (None, vm):
            raise VfioError(f"device {sid:#x} cannot join VM {vm}'s container "
                            f"(owner {owner})")
    table = PageTable(HostTableStore(host.mem, 0, defer_free=True), "sl", v.sl.levels,
                      host.p.haw, max_order=0)
    dom = ShadowDomain(vm, host.alloc_did(), table)
    for sid in sids:
        host.attach_device(sid, vm, ats=ats)
        host.set_pasid_entry(sid, NO_PASID, PasidEntry(pgtt=PGTT_SL_ONLY, did=dom.did,
                                                       slptr=table.root,
                                                       sl_levels=table.levels))
        dom.sids.append(sid)
        v.tags.append(("shadow", dom.did, sid, NO_PASID))
    return dom


def vfio_map(host: HostIommu, dom: ShadowDomain, iova: int, gpa: int, size: int,
             write: bool = True) -> int:
    """VFIO_IOMMU_MAP_DMA of [gpa, gpa+size) at iova: pin each page, map GIOVA->HPA.

    Checked whole before anything changes (type1 vfio_dma_do_map): an unaligned or empty
    range, an IOVA range beyond the shadow table, a GPA range the VM does not back, or an IOVA
    already mapped (-EEXIST) raises VfioError. Returns the pages pinned.
    """
    if iova < 0 or gpa < 0 or iova % PAGE_SIZE or gpa % PAGE_SIZE or size <= 0 \
            or size % PAGE_SIZE:
        raise VfioError(f"unaligned VFIO map iova={iova:#x} gpa={gpa:#x} size={size:#x}")
    if iova + size > dom.table.limit:
        raise VfioError(f"VFIO map iova={iova:#x} size={size:#x} beyond the "
                        f"{dom.table.width}-bit IOVA space")
    v = host.vms[dom.vm]
    f0, n = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
    if f0 + n > v.gpa_frames or (v.hpa_of[f0:f0 + n] < 0).any():
        raise VfioError(f"VFIO map of unbacked GPA range {gpa:#x}+{size:#x}")
    p0 = iova >> PAGE_SHIFT
    if n <= len(dom.gpa_of_iova):
        taken = any(p in dom.gpa_of_iova for p in range(p0, p0 + n))
    else:
        taken = any(p0 <= p < p0 + n for p in dom.gpa_of_iova)
    if taken:
        raise VfioError(f"VFIO map iova={iova:#x} size={size:#x} overlaps a mapping")
    v.pins[f0:f0 + n] += 1
    dom.gpa_of_iova.update(zip(range(p0, p0 + n), range(f0, f0 + n), strict=True))
    frames = v.hpa_of[f0:f0 + n].tolist()
    if dom.table.max_order != 0:
        for i in range(n):
            dom.pte_writes += dom.table.map(iova + (i << PAGE_SHIFT), frames[i] << PAGE_SHIFT,
                                            PAGE_SIZE, write=write)
    else:
        # One table map per run of consecutive host frames: a table of 4-KiB pages only
        # (max_order 0, as vfio_attach builds it) installs the same entries, in the same
        # order, as the map per page above.
        a = 0
        for b in range(1, n + 1):
            if b == n or frames[b] != frames[b - 1] + 1:
                dom.pte_writes += dom.table.map(iova + (a << PAGE_SHIFT),
                                                frames[a] << PAGE_SHIFT,
                                                (b - a) << PAGE_SHIFT, write=write)
                a = b
    dom.pinned_pages += n
    return n


def vfio_unmap(host: HostIommu, dom: ShadowDomain, iova: int, size: int, t_ns: int
               ) -> tuple[int, int]:
    """VFIO_IOMMU_UNMAP_DMA: clear the shadow range, flush, unpin.

    The work follows what is mapped, not the size asked for (type1 walks its vfio_dma tree):
    the mapped IOVA pages inside the range are found from the container's record. Returns
    (time the flush completed, descriptors queued).
    """
    if iova < 0 or iova % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
        raise VfioError(f"unaligned VFIO unmap iova={iova:#x} size={size:#x}")
    if iova + size > dom.table.limit:
        raise VfioError(f"VFIO unmap iova={iova:#x} size={size:#x} beyond the "
                        f"{dom.table.width}-bit IOVA space")
    v = host.vms[dom.vm]
    p0, n = iova >> PAGE_SHIFT, size >> PAGE_SHIFT
    if n <= len(dom.gpa_of_iova):
        pages = [p for p in range(p0, p0 + n) if p in dom.gpa_of_iova]
    else:
        pages = sorted(p for p in dom.gpa_of_iova if p0 <= p < p0 + n)
    for p in pages:
        gframe = dom.gpa_of_iova.pop(p)
        v.pins[gframe] -= 1
    # The table walk visits only present tables, whatever the range.
    dom.pte_writes += dom.table.unmap(iova, size)
    ats = [sid for sid in dom.sids if sid in host.ats_sids]
    # IH when no table page was freed (intel_iommu_tlb_sync: list_empty(&gather->freelist))
    descs = domain_flush_descs(dom.did, iova, n, ats_sids=ats, mamv=host.p.mamv,
                               ih=not dom.table.freed_tables)
    t_done, nd = host.submit_qi(qi.descs(*descs, qi.wait_desc()), t_ns)
    # table pages the unmap emptied go back to the allocator only after the flush
    host.free_after(dom.table.store.take_freed(), t_done)
    return t_done, nd
