"""The VMM's per-VM trap handling for the vIOMMU: shadow, nested or pass-through.

Shadow follows QEMU's caching-mode path (hw/i386/intel_iommu.c vtd_iotlb_page_invalidate ->
vtd_sync_shadow_page_table_range / vtd_page_walk -> vtd_page_walk_one -> VFIO map/unmap): on
every trapped IOTLB invalidation it walks the guest's table over the range, and each leaf or
empty entry that differs from what it shadowed is one notifier event and one VFIO ioctl.
Nested follows QEMU's iommufd nesting series and Linux iommufd: the first level was bound
once; a trapped PASID-based invalidation is forwarded as IOMMU_HWPT_INVALIDATE. Pass-through
has no vIOMMU at all. Each handler returns the time the guest resumes, and appends the host
operations it caused to the VM's operation log.
"""

from __future__ import annotations

import bisect

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import LEVEL_STRIDE, PAGE_SHIFT, PAGE_SIZE
from host_iommu.invalidate import ALL_PAGES
from host_iommu.nested import IOMMU_VTD_INV_FLAGS_LEAF
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OP_HWPT_INV, OP_VFIO_MAP, OP_VFIO_UNMAP, OpLog


class Vmm:
    """Trap handling of one VM. Subclasses: ShadowVmm, NestedVmm, PassthroughVmm."""

    mode = "base"

    def __init__(self, log: OpLog, costs: CostModel, stats: dict[str, int]) -> None:
        self.log, self.costs, self.stats = log, costs, stats

    def handle(self, cmds: list[qi.InvCommand], t_ns: int, sid: int, table: PageTable | None,
               unmap_id: int = -1) -> int:
        raise NotImplementedError


class IovaTree(dict):
    """What the VMM has shadowed for one device: IOVA page -> (GPA page, writable).

    QEMU's per-address-space iova_tree (util/iova-tree.c): a look-up by page, and a removal of
    everything overlapping a region, kept in IOVA order so the removal costs what it finds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[int] = []   # the keys, sorted

    def insert(self, page: int, value: tuple[int, bool]) -> None:
        if page not in self:
            bisect.insort(self.pages, page)
        self[page] = value

    def remove_range(self, lo: int, hi: int) -> int:
        """iova_tree_remove: drop every page in [lo, hi); returns how many there were."""
        i, j = bisect.bisect_left(self.pages, lo), bisect.bisect_left(self.pages, hi)
        for page in self.pages[i:j]:
            del self[page]
        del self.pages[i:j]
        return j - i


class ShadowVmm(Vmm):
    """Caching mode: keep the host's shadow GIOVA->HPA table in sync with the guest's.

    Follows QEMU's vtd_sync_shadow_page_table_range: the walk (PageTable.walk_range, as
    vtd_page_walk_level) stops at each leaf and each entry that maps nothing, and each stop
    is one notifier event filtered through the iova_tree (vtd_page_walk_one): a 4-KiB leaf
    already shadowed with the same translation is skipped; a new one is one VFIO map of its
    page; a changed one is a VFIO unmap of its page then a map; an entry that maps nothing is
    one VFIO unmap of its whole region at its level (4 KiB, 2 MiB, 1 GiB or 512 GiB) when
    something shadowed lies inside it, else skipped. Each event is its own ioctl (vfio
    listener: one VFIO_IOMMU_MAP_DMA / UNMAP_DMA per notification), so a 16-page buffer
    costs 16 maps and, while its level-1 table stays, 16 unmaps. A domain-wide or global
    invalidation walks the whole domain (vtd_sync_shadow_page_table).

    The modelled time charges ``vmm_pte_read_ns`` per entry the walk reads, then each VFIO
    call. The work is bounded by the table pages that exist (a loop or a shared table page
    reads as nothing). Only 4-KiB guest leaves are shadowed: this vIOMMU advertises no
    second-level large pages (CAP.SLLPS = 0), so a large leaf has a reserved bit set and the
    walk skips it without an event (vtd_slpte_nonzero_rsvd: "skip reserve").
    """

    mode = "shadow"

    def __init__(self, log: OpLog, costs: CostModel, stats: dict[str, int]) -> None:
        super().__init__(log, costs, stats)
        self.shadowed: dict[int, IovaTree] = {}  # sid -> its iova_tree

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        c = self.costs
        t = t_ns + c.vmm_trap_ns
        shadow = self.shadowed.get(sid)
        if shadow is None:
            shadow = self.shadowed[sid] = IovaTree()
        for cmd in cmds:
            if cmd.type != qi.QI_IOTLB_TYPE or table is None:
                continue  # wait, device-TLB: nothing to shadow
            if cmd.gran == qi.QI_IOTLB_GRAN_PAGE:
                events, reads = table.walk_range(cmd.addr, cmd.addr + (PAGE_SIZE << cmd.am))
            else:
                events, reads = table.walk_range(0, None)
            t += c.vmm_pte_read_ns * reads
            for iova, level, phys, write in events:
                page = iova >> PAGE_SHIFT
                if phys is None:  # IOMMU_NOTIFIER_UNMAP of the entry's region
                    pages = 1 << (LEVEL_STRIDE * (level - 1))
                    if shadow.remove_range(page, page + pages):
                        t = self._unmap(t, sid, page, pages, unmap_id)
                    continue
                if level > 1:
                    continue  # a large leaf: reserved without SLLPS, skipped
                want = (phys >> PAGE_SHIFT, write)
                have = shadow.get(page)
                if have == want:
                    continue  # the same translation: vtd_page_walk_one skips it
                if have is not None:  # changed: an emulated UNMAP first
                    shadow.remove_range(page, page + 1)
                    t = self._unmap(t, sid, page, 1, unmap_id)
                shadow.insert(page, want)
                self.log.add(t, OP_VFIO_MAP, sid=sid, a0=iova, a1=phys, a2=PAGE_SIZE,
                             a3=int(write))
                self.stats["vmm_map_calls"] += 1
                t += c.vfio_map_ns + c.pin_page_ns
        return t

    def _unmap(self, t: int, sid: int, page: int, pages: int, unmap_id: int) -> int:
        """One VFIO_IOMMU_UNMAP_DMA, blocking on the host's flush."""
        c = self.costs
        self.log.add(t, OP_VFIO_UNMAP, sid=sid, a0=page << PAGE_SHIFT, a1=pages << PAGE_SHIFT,
                     a3=unmap_id)
        self.stats["vmm_unmap_calls"] += 1
        return t + c.vfio_unmap_ns + c.qi_desc_ns + c.qi_wait_ns


class NestedVmm(Vmm):
    """Nesting: forward PASID-based IOTLB invalidations as IOMMU_HWPT_INVALIDATE."""

    mode = "nested"

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        c = self.costs
        t = t_ns + c.vmm_trap_ns
        rows = self.log.rows    # OpLog.add's row, appended here (a call per invalidation)
        calls = 0
        for cmd in cmds:
            if cmd.type != qi.QI_EIOTLB_TYPE:
                continue  # device-TLB and wait descriptors ride along in the host's request
            if cmd.gran == qi.QI_GRAN_NONG_PASID:
                addr, npages, flags = 0, ALL_PAGES, 0
            else:
                addr, npages = cmd.addr, 1 << cmd.am
                flags = IOMMU_VTD_INV_FLAGS_LEAF if cmd.ih else 0
            rows.extend((t, OP_HWPT_INV, sid, cmd.pasid, addr, npages & 0xFFFF_FFFF_FFFF_FFFF,
                         flags, unmap_id))
            calls += 1
            t += c.hwpt_invalidate_ns + c.qi_desc_ns
        if calls:
            self.stats["vmm_invalidate_calls"] += calls
        return t + c.qi_wait_ns


class PassthroughVmm(Vmm):
    """No vIOMMU: nothing ever traps."""

    mode = "passthrough"

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        return t_ns


VMMS: dict[str, type[Vmm]] = {"shadow": ShadowVmm, "nested": NestedVmm,
                              "passthrough": PassthroughVmm}
