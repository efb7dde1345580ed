"""The guest's DMA API over its IOMMU driver: map, unmap, scatter lists, strict or lazy flush.

Follows Linux drivers/iommu/dma-iommu.c (iommu_dma_map_page / __iommu_dma_map: allocate an
IOVA, iommu_map, iotlb_sync_map; __iommu_dma_unmap: iommu_unmap, then either a strict
invalidation with a wait or queue_iova onto the flush queue; iommu_dma_map_sg: one IOVA range
for the whole list) and drivers/iommu/intel/iommu.c for what the VT-d driver writes: under
caching mode (shadow) with second-level-format tables every map is followed by one
page-selective invalidation over the mapped range (iotlb_sync_map), and Linux forces strict
mode; with first-level tables (nested) a map needs no invalidation and an unmap a PASID-based
one. Each strict flush is its own QI submission: the invalidation(s) plus a wait descriptor and
one tail-register write, which traps to the VMM. A lazy flush is one PASID-wide invalidation for
the whole queue. Pass-through (no vIOMMU) is dma-direct: the DMA address is the GPA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import NO_PASID, PAGE_SHIFT, PAGE_SIZE
from host_iommu.invalidate import ALL_PAGES, domain_flush_words, pasid_flush_words
from host_iommu.pgtable import PageTable
from host_iommu.protocol import MAX_RETIRE_RUN, OP_UNMAP_RET, OP_UNMAP_RETIRE, OpLog
from vm_agent.flushq import DEFAULT_HZ, FlushQueue
from vm_agent.iova import IovaDomain, IovaRcache
from vm_agent.viommu import VIommu
from vm_agent.vmm import Vmm
from workloads.base import DMA_TO_DEVICE

DMA_BIT_MASK_32_PFN = ((1 << 32) - 1) >> PAGE_SHIFT
DMA_MAPPING_ERROR = (1 << 64) - 1  # include/linux/dma-mapping.h: ~(dma_addr_t)0
DIRECT_CALL_NS = 40  # dma-direct map/unmap: a few dozen instructions


def domain_key(dev) -> int:
    """The DMA API's key of a device's domain: the sid, with the PASID above it (a device's
    PASID 0 domain is keyed by its sid alone)."""
    return dev.sid | (getattr(dev, "pasid", NO_PASID) << 16)


class DmaError(Exception):
    """A DMA API call the guest kernel would refuse (WARN + error return), named."""


@dataclass(slots=True)
class Mapping:
    """One live DMA mapping of the domain (a map call), by its first IOVA page."""

    pfn: int
    pages: int


class IommuDomain:
    """The guest driver's DMA domain for one device: IOVA allocator, table, flush policy."""

    def __init__(self, sid: int, mode: str, table: PageTable | None, vcpus: int,
                 lazy: bool, per_cpu_fq: bool, hz: int = DEFAULT_HZ) -> None:
        self.sid = sid
        self.pasid = NO_PASID
        self.did = 1  # the guest's own domain id for its vIOMMU descriptors
        self.mode = mode
        self.table = table
        self.iovad = IovaDomain()
        self.rcache = IovaRcache(self.iovad, vcpus)
        # The domain's aperture (geometry.aperture_end): the table's input width; a first-level
        # table keeps to the canonical lower half, 2^(gaw-1) (iommu.c: "skip bit [N-1]").
        self.limit_pfn = ((table.limit if table is not None else 1 << 48) - 1) >> PAGE_SHIFT
        # dev->iommu->pci_32bit_workaround: try below 4 GiB first until that fails once.
        self.pci_32bit_workaround = True
        self.freed_ns: dict[int, int] = {}   # pfn -> virtual time its free took place
        self.fq = FlushQueue(vcpus, per_cpu=per_cpu_fq, hz=hz) if lazy else None
        self.mappings: dict[int, Mapping] = {}   # iova page -> mapping (start pages only)


class DmaApi:
    """DMA API of one guest (all its devices). Times are virtual ns; the caller picks vCPUs."""

    def __init__(self, *, mode: str, costs: CostModel, log: OpLog, vmm: Vmm, viommu: VIommu,
                 stats: dict[str, int], schedule: Callable, ats: bool = False) -> None:
        self.mode = mode
        self.costs = costs
        self.log = log
        self.vmm = vmm
        self.viommu = viommu
        self.stats = stats
        self.schedule = schedule
        self.ats = ats
        # Keyed by domain_key: the sid, plus the PASID above bit 16 for a device's other PASIDs.
        self.domains: dict[int, IommuDomain] = {}
        self.mapped_pages: set[tuple[int, int]] = set()       # (key, iova page)
        self.unmap_id_of: dict[tuple[int, int], int] = {}     # (key, iova page) -> unmap id
        self.pages_tagged: dict[int, int] = {}   # unmap id -> pages unmap_id_of gives it
        self.retired: list[int] = []             # ids whose last page went this epoch
        self.last_unmapped: dict[int, int] = {}               # key -> iova
        self.next_unmap_id = 0
        self.stale_bound_ns = 0

    def add_domain(self, dom: IommuDomain) -> None:
        self.domains[domain_key(dom)] = dom

    # --- traps -------------------------------------------------------------------------
    def _invalidate(self, dom: IommuDomain, t: int, descs: list, unmap_id: int
                    ) -> tuple[int, bool]:
        """qi_submit_sync: write the descriptors and the tail (one trap to the VMM).

        Returns (time, ok). A queue error (FSTS.IQE) makes ``ok`` False, as qi_submit_sync
        returns -EINVAL: like dmar.c qi_check_fault the driver copies its wait descriptor over
        the faulting one and clears IQE (a register write, so one more trap); the vIOMMU then
        fetches what was queued behind the error and the VMM emulates it, so no invalidation
        is skipped. Linux handles only an error at the first descriptor of its own submission
        (the only place its own bad descriptor can be); the driver here clears whatever error
        it finds, so a queue left in error by anyone never stalls it. Each cleared error
        counts in ``qi_errors``.
        """
        c = self.costs
        self.stats["inv_descriptors"] += len(descs)
        t += c.qi_submit_ns
        cmds = self.viommu.submit(descs)
        if self.mode == "passthrough":
            return t, True
        t = self._trap(dom, t, cmds, unmap_id)
        ok = True
        while self.viommu.iqe:  # each clear fetches at least the replacement: bounded
            ok = False
            self.stats["qi_errors"] += 1
            t = self._trap(dom, t, self.viommu.clear_iqe(descs[-1]), unmap_id)
        return t, ok

    def _trap(self, dom: IommuDomain, t: int, cmds: list, unmap_id: int) -> int:
        """One vIOMMU register write: VM exit, the VMM emulates ``cmds``, VM entry."""
        c = self.costs
        self.stats["vm_exits"] += 1
        t += c.vm_exit_ns // 2
        t = self.vmm.handle(cmds, t, dom.sid, dom.table, unmap_id)
        return t + c.vm_exit_ns - c.vm_exit_ns // 2

    def _flush_descs(self, dom: IommuDomain, iova: int, pages: int, *, leaf: bool = False,
                     on_map: bool = False) -> list[qi.Words]:
        """One strict flush: the range's invalidation(s) then a wait (qi_submit_sync), as
        descriptor words (the vIOMMU takes words or DESC_DTYPE records).

        Shadow guests see a vIOMMU with second-level tables and use IOTLB invalidations (0x2);
        nested guests use PASID-based ones (0x6). ``leaf`` sets the invalidation hint: the
        unmap freed no page-table page (intel_iommu_tlb_sync: ``ih`` when the gather's
        freelist is empty), so paging-structure caches may stay. Device-TLB invalidations
        follow for ATS, except at map time: iotlb_sync_map (cache.c
        cache_tag_flush_range_np) flushes the IOTLB tags only, with IH 0, since a device
        cannot cache a translation that was not present.
        """
        ats = [dom.sid] if self.ats and not on_map else []
        if self.mode == "shadow":   # both helpers keep their results (invalidate.py)
            words = domain_flush_words(dom.did, iova, pages, ats_sids=ats, ih=leaf)
        else:
            words = pasid_flush_words(dom.did, dom.pasid, iova, pages, leaf=leaf, ats_sids=ats)
        words.append(qi.WAIT_WORDS)
        return words

    # --- map ---------------------------------------------------------------------------
    def _alloc_iova(self, dom: IommuDomain, cpu: int, pages: int) -> tuple[int, int]:
        """iommu_dma_alloc_iova (dma-iommu.c): (pfn, cost).

        While the device's pci_32bit_workaround holds, try below 4 GiB first without flushing
        the rcaches; the first failure there drops the workaround for good ("Using %d-bit
        DMA addresses") and every later allocation uses the whole aperture, flushing the
        rcaches before giving up. Streaming maps and coherent allocations take this same path
        (iommu_dma_alloc -> __iommu_dma_map -> iommu_dma_alloc_iova).
        """
        c = self.costs
        rc = dom.rcache
        hits = rc.rcache_hits
        pfn = None
        if dom.limit_pfn > DMA_BIT_MASK_32_PFN and dom.pci_32bit_workaround:
            pfn = rc.alloc_iova_fast(cpu, pages, DMA_BIT_MASK_32_PFN, flush_rcache=False)
            if pfn is None:
                dom.pci_32bit_workaround = False
        if pfn is None:
            pfn = rc.alloc_iova_fast(cpu, pages, dom.limit_pfn, flush_rcache=True)
        if pfn is None:
            raise DmaError(f"IOVA space exhausted for device {dom.sid:#06x}")
        cost = c.iova_alloc_fast_ns if rc.rcache_hits > hits else c.iova_alloc_slow_ns
        return pfn, cost

    def map_segments(self, cpu: int, sid: int, segs: list[tuple[int, int]], direction: int,
                     t: int) -> tuple[list[tuple[int, int]], int]:
        """Map a list of (gpa, len) into one IOVA range (one sync for all): (segments, t).

        When the caching-mode sync hits a queue error the call fails as iommu_map does
        (undo the mapping, free the IOVA): every segment comes back as DMA_MAPPING_ERROR.
        """
        c = self.costs
        t += c.dma_call_ns
        self.stats["maps"] += 1
        if self.mode == "passthrough":
            return list(segs), t + DIRECT_CALL_NS
        dom = self.domains[sid]
        pages_each = [((g & (PAGE_SIZE - 1)) + ln + PAGE_SIZE - 1) >> PAGE_SHIFT for g, ln in segs]
        total = sum(pages_each)
        pfn, cost = self._alloc_iova(dom, cpu, total)
        # A reused IOVA is mapped no earlier than its free: a caller off the vCPU timeline
        # (dma_alloc_coherent) or another CPU's magazine from the depot may hold an IOVA
        # whose unmap ends later in virtual time than this call starts.
        t = max(t, dom.freed_ns.pop(pfn, 0)) + cost
        write = direction != DMA_TO_DEVICE
        out: list[tuple[int, int]] = []
        page = pfn
        table = dom.table
        store = table.store
        stats = self.stats
        writes0 = store.writes
        for (gpa, ln), np_ in zip(segs, pages_each, strict=True):
            store.now = t
            table.map(page << PAGE_SHIFT, gpa & ~(PAGE_SIZE - 1), np_ << PAGE_SHIFT,
                      write=write)
            out.append(((page << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1)), ln))
            stats["iommu_map_events"] += 1
            page += np_
        pte = store.writes - writes0
        stats["pte_writes"] += pte
        t += pte * c.pte_write_ns
        if self.mode == "shadow":  # caching mode: iotlb_sync_map flushes the new range
            t, ok = self._invalidate(dom, t, self._flush_descs(dom, pfn << PAGE_SHIFT, total,
                                                                on_map=True), -1)
            t += c.qi_wait_ns
            if not ok:
                return self._map_failed(dom, cpu, pfn, total, segs, t)
        dom.mappings[pfn] = Mapping(pfn, total)
        mapped = self.mapped_pages
        tagged = self.unmap_id_of
        for p in range(pfn, pfn + total):
            mapped.add((sid, p))
            if (sid, p) in tagged:
                self._untag(sid, p)
        return out, t

    def _map_failed(self, dom: IommuDomain, cpu: int, pfn: int, pages: int,
                    segs: list[tuple[int, int]], t: int) -> tuple[list[tuple[int, int]], int]:
        """iommu_map's error path, then __iommu_dma_map's: iommu_unmap the range (a strict
        flush of its own), free the IOVA, return DMA_MAPPING_ERROR for every segment."""
        c = self.costs
        self.stats["dma_map_errors"] += 1
        t = self._clear_ptes(dom, pfn, pages, t)
        t, _ok = self._invalidate(dom, t, self._flush_descs(
            dom, pfn << PAGE_SHIFT, pages, leaf=not dom.table.freed_tables), -1)
        t += c.qi_wait_ns + c.iova_free_ns
        self._free_iova(dom, cpu, pfn, pages, t)
        return [(DMA_MAPPING_ERROR, ln) for _gpa, ln in segs], t

    def _clear_ptes(self, dom: IommuDomain, pfn: int, pages: int, t: int) -> int:
        """iommu_unmap's table work: clear the range's entries and free the table pages it
        covers whole (``dom.table.freed_tables`` says how many: the flush's IH)."""
        writes0 = dom.table.store.writes
        dom.table.store.now = t
        dom.table.unmap(pfn << PAGE_SHIFT, pages << PAGE_SHIFT)
        pte = dom.table.store.writes - writes0
        self.stats["pte_writes"] += pte
        return t + pte * self.costs.pte_write_ns

    # --- unmap -------------------------------------------------------------------------
    def unmap_range(self, cpu: int, sid: int, iova: int, t: int) -> int:
        """Unmap the mapping starting at ``iova`` (map_segments' first segment)."""
        c = self.costs
        t += c.dma_call_ns
        self.stats["unmaps"] += 1
        self.last_unmapped[sid] = iova
        if self.mode == "passthrough":
            return t + DIRECT_CALL_NS
        dom = self.domains[sid]
        pfn = iova >> PAGE_SHIFT
        m = dom.mappings.pop(pfn, None)
        if m is None:
            self.stats["dma_api_errors"] += 1  # unmap of something never mapped: WARN
            return t
        unmap_id = self.next_unmap_id
        self.next_unmap_id += 1
        t = self._clear_ptes(dom, pfn, m.pages, t)
        mapped = self.mapped_pages
        tagged = self.unmap_id_of
        for p in range(pfn, pfn + m.pages):
            mapped.discard((sid, p))
            if (sid, p) in tagged:
                self._untag(sid, p)
            tagged[(sid, p)] = unmap_id
        if m.pages:
            self.pages_tagged[unmap_id] = m.pages
        else:   # an empty mapping tags no page
            self.retired.append(unmap_id)
        if dom.fq is None:  # strict: invalidate and wait now, then free the IOVA
            # A queue error (counted in qi_errors) is a WARN: the queued invalidation still
            # reached the VMM when the driver cleared IQE, so the IOVA is freed as Linux does.
            t, _ok = self._invalidate(dom, t, self._flush_descs(
                dom, pfn << PAGE_SHIFT, m.pages, leaf=not dom.table.freed_tables), unmap_id)
            t += c.qi_wait_ns + c.iova_free_ns
            self._free_iova(dom, cpu, pfn, m.pages, t)
        else:
            res = dom.fq.queue(cpu, pfn, m.pages, t)
            self._give_back(dom, cpu, res.freed, t)
            if res.flush_now:
                t = self._flush_all(dom, cpu, t)
            if res.timer_deadline_ns is not None:
                self.schedule(res.timer_deadline_ns, self._on_timer, dom, cpu)
            t += c.iova_free_ns
        self.log.add(t, OP_UNMAP_RET, a0=unmap_id, a1=t, a2=cpu)
        return t

    def _free_iova(self, dom: IommuDomain, cpu: int, pfn: int, pages: int, t: int) -> None:
        """free_iova_fast at virtual time ``t`` (remembered for the IOVA's next map)."""
        dom.rcache.free_iova_fast(cpu, pfn, pages)
        dom.freed_ns[pfn] = t

    def _give_back(self, dom: IommuDomain, cpu: int, freed, t: int) -> None:
        for pfn, pages in freed:
            self._free_iova(dom, cpu, pfn, pages, t)
        if len(freed):
            self.stale_bound_ns = max(self.stale_bound_ns, freed.max_stale_ns)

    def _flush_all(self, dom: IommuDomain, cpu: int, t: int) -> int:
        """fq_flush_iotlb: one PASID-wide invalidation for everything queued, then free."""
        self.stats["lazy_flushes"] += 1
        t, _ok = self._invalidate(dom, t, self._flush_descs(dom, 0, ALL_PAGES), -1)
        t += self.costs.qi_wait_ns
        self._give_back(dom, cpu, dom.fq.flush_done(t), t)
        return t

    def _on_timer(self, dom: IommuDomain, cpu: int) -> None:
        t = dom.fq.timer_deadline()
        if t is not None and dom.fq.on_timer(t):
            self._flush_all(dom, cpu, t)

    # --- what the oracle needs for each device DMA ----------------------------------------
    def _untag(self, key: int, page: int) -> None:
        """The page no longer carries its unmap id (mapped again, or covered by a newer
        unmap); an id left on no page can never stamp a DMA again: it is retired."""
        uid = self.unmap_id_of.pop((key, page), None)
        if uid is not None:
            left = self.pages_tagged[uid] - 1
            if left:
                self.pages_tagged[uid] = left
            else:
                del self.pages_tagged[uid]
                self.retired.append(uid)

    def log_retired(self, t_ns: int) -> None:
        """Tell the host, in runs of consecutive ids, which unmap ids were retired since the
        last call (OP_UNMAP_RETIRE; the host drops them after the epoch's DMAs)."""
        ids = sorted(self.retired)
        self.retired.clear()
        i = 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1 and j - i < MAX_RETIRE_RUN:
                j += 1
            self.log.add(t_ns, OP_UNMAP_RETIRE, a0=ids[i], a1=j - i)
            i = j

    def unmap_tag(self, sid: int, page: int) -> int:
        """-1 while (sid, IOVA page) is mapped, else the id of the unmap that last covered it."""
        key = (sid, page)
        if key in self.mapped_pages or self.mode == "passthrough":
            return -1
        return self.unmap_id_of.get(key, -2)

