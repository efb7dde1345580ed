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
from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.invalidate import ALL_PAGES
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OP_HWPT_INV, OP_VFIO_MAP, OP_VFIO_UNMAP, OpLog

IOMMU_VTD_INV_FLAGS_LEAF = 1


class Vmm:
    """Trap handling of one VM. Subclasses: ShadowVmm, NestedVmm, PassthroughVmm."""

    mode = "base"

    def __init__(self, log: OpLog, costs: CostModel, stats: dict[str, int]) -> None:
        self.log, self.costs, self.stats = log, costs, stats

    def handle(self, cmds: list[qi.InvCommand], t_ns: int, sid: int, table: PageTable | None,
               unmap_id: int = -1) -> int:
        raise NotImplementedError


class ShadowVmm(Vmm):
    """Caching mode: keep the host's shadow GIOVA->HPA table in sync with the guest's."""

    mode = "shadow"

    def handle(self, cmds, t_ns, sid, table, unmap_id=-1):
        c = self.costs
        t = t_ns + c.vmm_trap_ns
        for cmd in cmds:
            if cmd.type not in (qi.QI_IOTLB_TYPE, qi.QI_EIOTLB_TYPE):
                continue
            if cmd.type == qi.QI_IOTLB_TYPE and cmd.gran != qi.QI_IOTLB_GRAN_PAGE:
                continue  # domain-wide: QEMU resyncs everything; not issued by this driver
            start, npages = cmd.addr, 1 << cmd.am
            # walk the guest table over the range (vtd_page_walk): one read per level
            run_start, run_gpa, run_len, run_w = None, 0, 0, True
            unmapped_start, unmapped_len = None, 0
            for p in range(npages):
                iova = start + (p << PAGE_SHIFT)
                t += c.vmm_pte_read_ns * (table.levels if table is not None else 1)
                hit = table.lookup(iova) if table is not None else None
                if hit is not None:
                    gpa, _order, _r, w = hit
                    gpa &= ~(PAGE_SIZE - 1)
                    if (run_start is not None and gpa == run_gpa + run_len
                            and w == run_w):
                        run_len += PAGE_SIZE
                        continue
                    t = self._flush_map(run_start, run_gpa, run_len, run_w, sid, t)
                    run_start, run_gpa, run_len, run_w = iova, gpa, PAGE_SIZE, w
                else:
                    t = self._flush_map(run_start, run_gpa, run_len, run_w, sid, t)
                    run_start = None
                    if unmapped_start is None:
                        unmapped_start = iova
                    unmapped_len += PAGE_SIZE
            t = self._flush_map(run_start, run_gpa, run_len, run_w, sid, t)
            if unmapped_start is not None:
                self.log.add(t, OP_VFIO_UNMAP, sid=sid, a0=unmapped_start, a1=unmapped_len,
                             a3=unmap_id)
                self.stats["vmm_unmap_calls"] += 1
                t += c.vfio_unmap_ns + c.qi_desc_ns + c.qi_wait_ns
        return t

    def _flush_map(self, iova, gpa, size, write, sid, t):
        if iova is None or size == 0:
            return t
        c = self.costs
        self.log.add(t, OP_VFIO_MAP, sid=sid, a0=iova, a1=gpa, a2=size, a3=int(write))
        self.stats["vmm_map_calls"] += 1
        self.stats["pinned_pages"] += size >> PAGE_SHIFT
        return t + c.vfio_map_ns + c.pin_page_ns * (size >> PAGE_SHIFT)


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
