"""The VFIO type1 side of shadowing: map/unmap of a GIOVA->HPA shadow table, pinning counted.

What QEMU's caching-mode vIOMMU calls on every trapped invalidation (hw/vfio/common.c
vfio_iommu_map_notify -> VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA) and what the host does for
it (drivers/vfio/vfio_iommu_type1.c: pin the pages, iommu_map into the container's domain;
unmap, flush the IOTLB, unpin). The shadow domain is a second-level-only (PGTT=2) translation
whose table maps GIOVA straight to HPA.

A container's record of what is mapped (``ShadowDomain.gpa_of_iova``) is a dict, or, once a
HostServer runs its epochs on the compiled kernel, a ``DomainRecord``: the same mapping kept
in the server's ``VfioRecord`` arrays, which host_iommu/kernels/vfio.py updates in place when
the epoch kernel applies a map or an unmap itself. These functions read and write either
through the mapping interface alone, so they stay the reference for both.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field

import numpy as np

from host_iommu import qi
from host_iommu.defs import NO_PASID, PAGE_SHIFT, PAGE_SIZE, PGTT_SL_ONLY
from host_iommu.invalidate import domain_flush_descs
from host_iommu.iommu import HostIommu
from host_iommu.kernels import vfio as vk
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import HostTableStore, PageTable


class VfioError(Exception):
    """A VFIO request the host refuses (the ioctl's -EINVAL/-EFAULT/-EEXIST), named."""


class VfioRecord:
    """Every container's record of one host in arrays (kernels/vfio.py: keys
    ``did << 46 | IOVA page``, open addressing, at most half full; GPA frames)."""

    def __init__(self, cap: int = 1 << 12) -> None:
        self.keys = np.full(cap, vk.EMPTY, dtype=np.int64)
        self.vals = np.zeros(cap, dtype=np.int64)
        self.held = np.zeros(1, dtype=np.int64)
        self.count = np.zeros(1 << 16, dtype=np.int64)   # per DID

    def reserve(self, extra: int) -> None:
        """Grow (rehash) until ``extra`` more keys keep the table at most half full."""
        cap = self.keys.size
        while 2 * (int(self.held[0]) + extra) > cap:
            cap *= 2
        if cap != self.keys.size:
            keys = np.full(cap, vk.EMPTY, dtype=np.int64)
            vals = np.zeros(cap, dtype=np.int64)
            vk.rec_rehash(self.keys, self.vals, keys, vals, self.held, self.count)
            self.keys, self.vals = keys, vals


class DomainRecord(MutableMapping):
    """One container's ``gpa_of_iova`` (IOVA page -> GPA frame) kept in a VfioRecord."""

    def __init__(self, rec: VfioRecord, did: int) -> None:
        self.rec = rec
        self.did = did

    def _key(self, page: int) -> int:
        if not isinstance(page, int) or not 0 <= page < 1 << vk.KEY_SHIFT:
            raise KeyError(page)
        return (self.did << vk.KEY_SHIFT) | page

    def __getitem__(self, page: int) -> int:
        s = vk.rec_find(self.rec.keys, self._key(page))
        if s < 0:
            raise KeyError(page)
        return int(self.rec.vals[s])

    def __contains__(self, page: object) -> bool:
        try:
            key = self._key(page)   # type: ignore[arg-type]
        except KeyError:
            return False
        return vk.rec_find(self.rec.keys, key) >= 0

    def __setitem__(self, page: int, gframe: int) -> None:
        key = self._key(page)
        r = self.rec
        r.reserve(1)
        vk.rec_put(r.keys, r.vals, r.held, r.count, key, int(gframe))

    def __delitem__(self, page: int) -> None:
        r = self.rec
        s = vk.rec_find(r.keys, self._key(page))
        if s < 0:
            raise KeyError(page)
        vk.rec_del(r.keys, r.vals, r.held, r.count, s)

    def any_in(self, p0: int, n: int) -> bool:
        """Whether any IOVA page in [p0, p0 + n) is mapped (the record's own probe or scan,
        not an iteration over every container's keys)."""
        if len(self) == 0 or n <= 0:
            return False
        if p0 < 0 or p0 + n > 1 << vk.KEY_SHIFT:
            return any(p0 <= p < p0 + n for p in self)
        return bool(vk.rec_any_in(self.rec.keys, self.did, p0, n))

    def pages_in(self, p0: int, n: int) -> list[int]:
        """The mapped IOVA pages in [p0, p0 + n), ascending."""
        if len(self) == 0 or n <= 0:
            return []
        if p0 < 0 or p0 + n > 1 << vk.KEY_SHIFT:
            return sorted(p for p in self if p0 <= p < p0 + n)
        out = np.empty(min(n, len(self)), dtype=np.int64)
        k = vk.rec_pages_in(self.rec.keys, self.rec.vals, self.did, p0, n, out)
        return out[:k].tolist()

    def put_run(self, p0: int, f0: int, n: int) -> None:
        """self[p0 + i] = f0 + i for i in 0..n-1, in that order."""
        if n <= 0:
            return
        self._key(p0)
        self._key(p0 + n - 1)
        r = self.rec
        r.reserve(n)
        vk.rec_put_run(r.keys, r.vals, r.held, r.count, self.did, p0, f0, n)

    def _pairs(self) -> tuple[list[int], list[int]]:
        n = len(self)
        p, g = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        vk.rec_pages(self.rec.keys, self.rec.vals, self.did, p, g)
        order = np.argsort(p, kind="stable")
        return p[order].tolist(), g[order].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._pairs()[0])

    def __len__(self) -> int:
        return int(self.rec.count[self.did])

    def __repr__(self) -> str:
        return repr(dict(zip(*self._pairs(), strict=True)))


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
    # IOVA page -> GPA frame: a dict, or a DomainRecord (the server's compiled epochs)
    gpa_of_iova: MutableMapping[int, int] = field(default_factory=dict)
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
    rec = dom.gpa_of_iova
    if type(rec) is DomainRecord:     # the same answer as below, without iterating
        taken = rec.any_in(p0, n)
    elif n <= len(rec):
        taken = any(p in rec for p in range(p0, p0 + n))
    else:
        taken = any(p0 <= p < p0 + n for p in rec)
    if taken:
        raise VfioError(f"VFIO map iova={iova:#x} size={size:#x} overlaps a mapping")
    v.pins[f0:f0 + n] += 1
    if type(rec) is DomainRecord:
        rec.put_run(p0, f0, n)
    else:
        rec.update(zip(range(p0, p0 + n), range(f0, f0 + n), strict=True))
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
    if type(dom.gpa_of_iova) is DomainRecord:    # the same pages, without iterating
        pages = dom.gpa_of_iova.pages_in(p0, n)
    elif n <= len(dom.gpa_of_iova):
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
