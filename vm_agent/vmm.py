"""The VMM's per-VM trap handling for the vIOMMU: shadow, nested or pass-through.

Shadow follows QEMU's caching-mode path (hw/i386/intel_iommu.c vtd_iotlb_page_invalidate ->
vtd_sync_shadow_page_table_range / vtd_page_walk -> memory_region_notify_iommu -> VFIO
map/unmap): on every trapped IOTLB invalidation it walks the guest's table over the range and
maps what is present, unmaps what is not. Nested follows QEMU's iommufd nesting series and
Linux iommufd: the first level was bound once; a trapped PASID-based invalidation is forwarded
as IOMMU_HWPT_INVALIDATE. Pass-through has no vIOMMU at all. Each handler returns the time the
guest resumes, and appends the host operations it caused to the VM's operation log.
"""

from __future__ import annotations

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SHIFT
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


class ShadowVmm(Vmm):
    """Caching mode: keep the host's shadow GIOVA->HPA table in sync with the guest's.

    Like QEMU's per-address-space iova_tree, the VMM remembers what it has shadowed, so a
    walk sends VFIO only the differences: an unmap for each page that disappeared or changed,
    then a map for each page that appeared or changed, in runs of contiguous pages. A
    domain-wide or global invalidation resyncs the whole domain (vtd_sync_shadow_page_table).

    The work is bounded by what is mapped, never by the address space a descriptor names: the
    guest table is walked only where the range meets present entries, each table page once (a
    loop or a shared table page reads as non-present), and the shadowed pages come from the
    record. Only 4-KiB guest leaves are shadowed, as the shadow domain maps 4-KiB pages: this
    vIOMMU advertises no second-level large pages (CAP.SLLPS = 0), so a large leaf in the
    guest's table is an entry with a reserved bit set, which the walk skips.
    """

    mode = "shadow"

    def __init__(self, log: OpLog, costs: CostModel, stats: dict[str, int]) -> None:
        super().__init__(log, costs, stats)
        self.shadowed: dict[int, dict[int, tuple[int, bool]]] = {}  # sid -> page -> (gpa pg, w)

    @staticmethod
    def _guest_pages(table: PageTable, start: int, end: int | None
                     ) -> dict[int, tuple[int, bool]]:
        """The guest's 4-KiB leaves in [start, end) pages: page -> (gpa page, writable)."""
        hi = None if end is None else end << PAGE_SHIFT
        return {iova >> PAGE_SHIFT: (phys >> PAGE_SHIFT, write)
                for iova, phys, order, _read, write in table.leaves(start << PAGE_SHIFT, hi)
                if order == 0}

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        c = self.costs
        t = t_ns + c.vmm_trap_ns
        shadow = self.shadowed.setdefault(sid, {})
        for cmd in cmds:
            if cmd.type != qi.QI_IOTLB_TYPE or table is None:
                continue  # wait, device-TLB: nothing to shadow
            if cmd.gran == qi.QI_IOTLB_GRAN_PAGE:
                lo = cmd.addr >> PAGE_SHIFT
                hi = lo + (1 << cmd.am)
                # QEMU's vtd_page_walk reads the range entry by entry: the modelled time
                # counts every page of it, the emulator's work only what is mapped.
                t += c.vmm_pte_read_ns * table.levels * (hi - lo)
                want = self._guest_pages(table, lo, hi)
                if hi - lo <= len(shadow):
                    have = [p for p in range(lo, hi) if p in shadow]
                else:
                    have = [p for p in shadow if lo <= p < hi]
            else:
                want = self._guest_pages(table, 0, None)
                have = list(shadow)
                t += c.vmm_pte_read_ns * table.levels * len(want.keys() | shadow.keys())
            unmaps: list[int] = []
            maps: list[tuple[int, int, bool]] = []
            for page in sorted(want.keys() | set(have)):
                w = want.get(page)
                h = shadow.get(page)
                if w == h:
                    continue
                if h is not None:
                    unmaps.append(page)
                    del shadow[page]
                if w is not None:
                    maps.append((page, *w))
                    shadow[page] = w
            for start, n in _runs([(p, p, True) for p in unmaps]):
                self.log.add(t, OP_VFIO_UNMAP, sid=sid, a0=start << PAGE_SHIFT,
                             a1=n << PAGE_SHIFT, a3=unmap_id)
                self.stats["vmm_unmap_calls"] += 1
                t += c.vfio_unmap_ns + c.qi_desc_ns + c.qi_wait_ns
            for start, n, gpa_page, write in _map_runs(maps):
                self.log.add(t, OP_VFIO_MAP, sid=sid, a0=start << PAGE_SHIFT,
                             a1=gpa_page << PAGE_SHIFT, a2=n << PAGE_SHIFT, a3=int(write))
                self.stats["vmm_map_calls"] += 1
                t += c.vfio_map_ns + c.pin_page_ns * n
        return t


def _map_runs(maps: list[tuple[int, int, bool]]) -> list[tuple[int, int, int, bool]]:
    """(iova page, pages, gpa page, write) runs of pages contiguous in both spaces."""
    out: list[list] = []
    for page, gpa_page, write in maps:
        if out and (page == out[-1][0] + out[-1][1] and gpa_page == out[-1][2] + out[-1][1]
                    and write == out[-1][3]):
            out[-1][1] += 1
        else:
            out.append([page, 1, gpa_page, write])
    return [tuple(r) for r in out]


def _runs(pages: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    """(start, count) runs of contiguous pages."""
    return [(r[0], r[1]) for r in _map_runs(pages)]


class NestedVmm(Vmm):
    """Nesting: forward PASID-based IOTLB invalidations as IOMMU_HWPT_INVALIDATE."""

    mode = "nested"

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        c = self.costs
        t = t_ns + c.vmm_trap_ns
        for cmd in cmds:
            if cmd.type != qi.QI_EIOTLB_TYPE:
                continue  # device-TLB and wait descriptors ride along in the host's request
            if cmd.gran == qi.QI_GRAN_NONG_PASID:
                addr, npages, flags = 0, ALL_PAGES, 0
            else:
                addr, npages = cmd.addr, 1 << cmd.am
                flags = IOMMU_VTD_INV_FLAGS_LEAF if cmd.ih else 0
            self.log.add(t, OP_HWPT_INV, sid=sid, pasid=cmd.pasid, a0=addr,
                         a1=npages & 0xFFFF_FFFF_FFFF_FFFF, a2=flags, a3=unmap_id)
            self.stats["vmm_invalidate_calls"] += 1
            t += c.hwpt_invalidate_ns + c.qi_desc_ns
        return t + c.qi_wait_ns


class PassthroughVmm(Vmm):
    """No vIOMMU: nothing ever traps."""

    mode = "passthrough"

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        return t_ns


VMMS: dict[str, type[Vmm]] = {"shadow": ShadowVmm, "nested": NestedVmm,
                              "passthrough": PassthroughVmm}
