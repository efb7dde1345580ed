"""Nested translation for a VM: bind guest first levels per PASID, forward invalidations.

Follows Linux drivers/iommu/intel/nested.c and pasid.c (intel_pasid_setup_nested /
pasid_pte_config_nestd: PGTT=nested, FLPTR = the guest's first-level root as a GPA, SLPTR = the
VM's second level shared by all its devices and PASIDs), iommufd's IOMMU_HWPT_ALLOC and
IOMMU_HWPT_INVALIDATE (entries of {addr, npages, flags}; addr 0 with npages all-ones is
everything; the LEAF flag says only leaf entries changed), and cache.c's cache tags: every
domain derived from a second level is recorded on it, so a second-level change (balloon,
unplug) flushes every nested IOTLB and device-TLB entry derived from it, domain-wide, since a
combined entry cannot be found by GPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from host_iommu import qi
from host_iommu.defs import (
    KIND_DATA,
    MAX_PASID,
    NO_PASID,
    PAGE_SHIFT,
    PAGE_SIZE,
    PGTT_NESTED,
    PGTT_SL_ONLY,
)
from host_iommu.invalidate import (
    ALL_PAGES,
    devtlb_flush_descs,
    domain_flush_descs,
    pasid_flush_words,
)
from host_iommu.iommu import HostIommu, VmMemory
from host_iommu.memory import HostMemoryError
from host_iommu.pasid import FLPM_BY_FL_LEVELS, PasidEntry

IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0  # include/uapi/linux/iommufd.h


class IommufdError(ValueError):
    """A host-interface request the host refuses (the ioctl's -EINVAL/-EBUSY/-ENOMEM), named."""


@dataclass
class NestedDomain:
    """A nested HWPT: one guest first level bound for (sid, pasid) over the VM's second level."""

    vm: int
    did: int
    sid: int
    pasid: int
    flptr_gpa: int
    fl_levels: int


def vm_memory(host: HostIommu, vm: int) -> VmMemory:
    """The VM's host-side memory, or IommufdError naming the unknown VM."""
    v = host.vms.get(vm)
    if v is None:
        raise IommufdError(f"VM {vm} does not exist on host {host.host}")
    return v


def _claim_sid(host: HostIommu, vm: int, sid: int) -> None:
    """Refuse a source-id the VM may not bind: out of 16 bits, or assigned to another VM."""
    if not 0 <= sid <= 0xFFFF:
        raise IommufdError(f"source-id {sid:#x} is not a 16-bit PCI requester id")
    owner = host.owner_of_sid.get(sid)
    if owner is not None and owner != vm:
        raise IommufdError(f"device {sid:#06x} is assigned to VM {owner}, not VM {vm}")


def _unbind(host: HostIommu, v: VmMemory, sid: int, pasid: int, t_ns: int) -> None:
    """Drop the cache tag of whatever was bound at (sid, pasid) and flush what it cached.

    As Linux's intel_pasid_tear_down_entry after clearing or replacing an entry: PASID-cache
    (0x7, PASID-selective), the old DID's IOTLB (0x2 domain-selective: nested and second-level
    entries) and the device-TLB of that PASID, then a wait. The flush is applied at once.
    """
    old = [t for t in v.tags if t[2] == sid and t[3] == pasid]
    if not old:
        return
    v.tags[:] = [t for t in v.tags if not (t[2] == sid and t[3] == pasid)]
    live = {t[1] for t in v.tags}
    descs: list[np.void] = []
    for _kind, did, _sid, _pasid in old:
        descs.append(qi.pc_desc(qi.QI_PC_PASID_SEL, did, pasid))
        if did not in live:  # a DID still bound elsewhere keeps its entries until they age
            descs.append(qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, did))
    if sid in host.ats_sids:
        descs += devtlb_flush_descs(sid, pasid, None, 0)
    descs.append(qi.wait_desc())
    t_done, _n = host.submit_qi(qi.descs(*descs), max(t_ns, host.now_ns))
    host.advance_to(t_done)


def attach_second_level(host: HostIommu, vm: int, sid: int, *, ats: bool = False) -> int:
    """Pass-through for the guest (no vIOMMU): the device uses GPAs, second level only."""
    v = vm_memory(host, vm)
    _claim_sid(host, vm, sid)
    host.attach_device(sid, vm, ats=ats)
    _unbind(host, v, sid, NO_PASID, host.now_ns)
    host.set_pasid_entry(sid, NO_PASID, PasidEntry(pgtt=PGTT_SL_ONLY, did=v.did,
                                                   slptr=v.sl.root, sl_levels=v.sl.levels))
    v.tags.append(("sl", v.did, sid, NO_PASID))
    return v.did


def alloc_nested(host: HostIommu, vm: int, sid: int, pasid: int, flptr_gpa: int,
                 fl_levels: int = 4, *, ats: bool = False, t_ns: int | None = None
                 ) -> NestedDomain:
    """IOMMU_HWPT_ALLOC of a nested domain and its attachment to (sid, pasid).

    Refused (IommufdError) before anything is written: an unknown VM, a device of another
    VM, a first-level mode other than 4- or 5-level paging, an unaligned root, or a PASID the
    device's PASID directory cannot hold (its context entry's PDTS). Binding a (sid, pasid)
    that is already bound replaces the old binding: its cache tag goes, its caches are flushed.
    """
    v = vm_memory(host, vm)
    _claim_sid(host, vm, sid)
    if fl_levels not in FLPM_BY_FL_LEVELS:
        raise IommufdError(f"first-level paging of {fl_levels!r} levels: the PASID entry's "
                           f"FLPM encodes {sorted(FLPM_BY_FL_LEVELS)}")
    if not 0 <= flptr_gpa < 1 << 64 or flptr_gpa % PAGE_SIZE:
        raise IommufdError(f"first-level root {flptr_gpa:#x} is not a 4-KiB aligned GPA")
    limit = min(host.sm.max_pasids(sid), MAX_PASID + 1)
    if not 0 <= pasid < limit:
        raise IommufdError(f"PASID {pasid:#x} of device {sid:#06x} is beyond its PASID "
                           f"directory (PASIDs below {limit:#x})")
    if sid not in host.owner_of_sid:
        host.attach_device(sid, vm, ats=ats)
    _unbind(host, v, sid, pasid, host.now_ns if t_ns is None else t_ns)
    did = host.alloc_did()
    host.set_pasid_entry(sid, pasid, PasidEntry(
        pgtt=PGTT_NESTED, did=did, slptr=v.sl.root, sl_levels=v.sl.levels,
        flptr=flptr_gpa, fl_levels=fl_levels))
    v.tags.append(("nested", did, sid, pasid))
    return NestedDomain(vm, did, sid, pasid, flptr_gpa, fl_levels)


def free_nested(host: HostIommu, dom: NestedDomain, t_ns: int | None = None) -> None:
    """Detach and free a nested HWPT: clear its PASID entry, drop its tag, flush its caches."""
    v = vm_memory(host, dom.vm)
    if ("nested", dom.did, dom.sid, dom.pasid) not in v.tags:
        return  # already replaced or freed
    host.sm.clear_pasid_entry(dom.sid, dom.pasid)
    _unbind(host, v, dom.sid, dom.pasid, host.now_ns if t_ns is None else t_ns)


def check_inv_entry(addr: int, npages: int, flags: int) -> None:
    """Refuse an IOMMU_HWPT_INVALIDATE entry as Linux intel_nested_cache_invalidate_user
    does: a flag other than LEAF (-EOPNOTSUPP), an address not 4-KiB aligned, or a nonzero
    address with npages all-ones (-EINVAL) raise IommufdError."""
    if flags & ~IOMMU_VTD_INV_FLAGS_LEAF:
        raise IommufdError(f"invalidation flags {flags:#x}: only LEAF is defined")
    if addr % PAGE_SIZE or (npages == ALL_PAGES and addr):
        raise IommufdError(f"invalidation of {npages:#x} pages at {addr:#x}: the address "
                           "must be 4-KiB aligned, and 0 when npages is all-ones")


def hwpt_invalidate(host: HostIommu, dom: NestedDomain, entries: list[tuple[int, int, int]],
                    t_ns: int) -> tuple[int, int]:
    """IOMMU_HWPT_INVALIDATE: entries of (addr, npages, flags). Returns (t_done, descriptors).

    Every entry is checked (check_inv_entry) before any is applied: a refused request
    changes nothing. An entry of 0 pages invalidates nothing. A request of one entry (what
    a guest's strict unmap sends) goes through hwpt_invalidate_one.
    """
    if len(entries) == 1:
        addr, npages, flags = entries[0]
        return hwpt_invalidate_one(host, dom, addr, npages, flags, t_ns)
    for addr, npages, flags in entries:
        check_inv_entry(addr, npages, flags)
    ats = [dom.sid] if dom.sid in host.ats_sids else []
    words = [w for addr, npages, flags in entries
             for w in pasid_flush_words(dom.did, dom.pasid, addr, npages,
                                        leaf=bool(flags & IOMMU_VTD_INV_FLAGS_LEAF),
                                        ats_sids=ats)]
    words.append(qi.WAIT_WORDS)
    return host.submit_qi(qi.as_descs(words), t_ns)


# The descriptors of a one-entry IOMMU_HWPT_INVALIDATE (its PASID-based IOTLB invalidation,
# the device-TLB one when the device has ATS, the wait) are a pure function of (DID, PASID,
# addr, npages, flags, ATS): the same few recur, as the guest's IOVA allocator hands the same
# ranges out again, so the DESC_DTYPE array submitted is kept by that key, bounded as
# qi._DECODED is. Only an entry check_inv_entry accepted is kept, so a hit needs no check.
# The arrays are shared: nothing writes them (the queue reads a submission; what it keeps
# of one, it copies).
_ONE_ENTRY: dict[tuple[int, int, int, int, int, bool], np.ndarray] = {}
_ONE_ENTRY_MAX = 1 << 14   # about 5 MB at most


def hwpt_invalidate_one(host: HostIommu, dom: NestedDomain, addr: int, npages: int,
                        flags: int, t_ns: int) -> tuple[int, int]:
    """hwpt_invalidate of the single entry (addr, npages, flags): refused (IommufdError)
    as check_inv_entry refuses it; else (t_done, descriptors)."""
    return host.submit_qi(one_entry_descs(host, dom, addr, npages, flags), t_ns)


def one_entry_descs(host: HostIommu, dom: NestedDomain, addr: int, npages: int,
                    flags: int) -> np.ndarray:
    """The DESC_DTYPE array hwpt_invalidate_one submits for (addr, npages, flags), kept
    (shared, read-only); IommufdError when check_inv_entry refuses the entry. The host's
    epoch kernel (host_iommu/kernels/epoch.py) submits these same words itself."""
    ats = dom.sid in host.ats_sids
    key = (dom.did, dom.pasid, addr, npages, flags, ats)
    descs = _ONE_ENTRY.get(key)
    if descs is None:
        check_inv_entry(addr, npages, flags)
        words = pasid_flush_words(dom.did, dom.pasid, addr, npages,
                                  leaf=bool(flags & IOMMU_VTD_INV_FLAGS_LEAF),
                                  ats_sids=[dom.sid] if ats else [])
        words.append(qi.WAIT_WORDS)
        descs = qi.as_descs(words)
        if len(_ONE_ENTRY) >= _ONE_ENTRY_MAX:
            _ONE_ENTRY.clear()
        _ONE_ENTRY[key] = descs
    return descs


# qw0 of a page-selective-within-PASID PASID-based IOTLB invalidation (qi.piotlb_words,
# VT-d spec 6.5.2.4), less its DID and PASID fields.
_PIOTLB_PSI_QW0 = qi.QI_EIOTLB_TYPE | qi.QI_GRAN_PSI_PASID << qi.QI_GRAN_SHIFT
_MAX_PFN_WIDTH = 64 - PAGE_SHIFT     # invalidate.MAX_AGAW_PFN_WIDTH


def one_entry_words(host: HostIommu, dom: NestedDomain, addr: int, npages: int,
                    flags: int) -> list[int]:
    """The words of one_entry_descs(host, dom, addr, npages, flags), flat (4 per
    descriptor), for the epoch kernel's table of resolved invalidations.

    The common case, a range of a device without ATS (a guest's strict unmap: one
    page-selective PASID-based IOTLB invalidation with the aligned range of Linux
    calculate_psi_aligned_address, then the wait), is encoded here directly; every other
    case (ATS, everything, no pages, a refused entry, a field out of range) is
    one_entry_descs' own (tests/host_iommu/test_one_entry_words.py compares the two)."""
    if (dom.sid not in host.ats_sids and flags & ~IOMMU_VTD_INV_FLAGS_LEAF == 0
            and 0 < npages < ALL_PAGES and 0 <= addr <= qi.U64 and addr % PAGE_SIZE == 0
            and 0 <= dom.did <= qi.QI_DID_MASK and 0 <= dom.pasid <= qi.QI_PASID_MASK):
        start = addr >> PAGE_SHIFT
        am = max((npages - 1).bit_length(), (start ^ (start + npages - 1)).bit_length())
        am = min(am, _MAX_PFN_WIDTH)
        qw0 = (_PIOTLB_PSI_QW0 | dom.did << qi.QI_DID_SHIFT
               | dom.pasid << qi.QI_PASID_SHIFT)
        qw1 = ((start >> am) << am << PAGE_SHIFT | (qi.QI_IH if flags else 0) | am)
        return [qw0, qw1, 0, 0, *qi.WAIT_WORDS]
    return one_entry_descs(host, dom, addr, npages, flags).view(np.uint64).tolist()


def flush_derived(host: HostIommu, vm: int, gpa: int, npages: int, t_ns: int, *,
                  ih: bool = False) -> tuple[int, int]:
    """Flush everything derived from a range of the VM's second level (cache tags).

    Follows Linux cache.c cache_tag_flush_range on the parent domain. One IOTLB invalidation
    per DID: page-selective with the GPA range on the second-level and nesting DIDs (a 0x2
    page-selective invalidation drops every nested entry of its DID, which cannot be found by
    GPA), domain-selective when the mask exceeds MAMV. Then a device-TLB invalidation per ATS
    tag: 0x3 for requests without PASID, 0x8 with the tag's PASID; over the GPA range for
    second-level tags, over everything for nesting tags (CACHE_TAG_NESTING_DEVTLB: a device
    caches nested results, which cannot be found by GPA). A shadow domain maps IOVAs, not
    GPAs, and holds only pinned pages, which a second-level change never takes: its DID is
    flushed domain-wide all the same. ``ih`` (no table page of the second level was freed)
    goes on the page-selective descriptors, as cache_tag_flush_range passes it on.
    """
    v = vm_memory(host, vm)
    descs: list[np.void] = []
    seen: set[int] = set()
    for kind, did, sid, pasid in v.tags:
        if did not in seen:
            seen.add(did)
            descs += domain_flush_descs(did, None if kind == "shadow" else gpa, npages,
                                        ats_sids=[], mamv=host.p.mamv, ih=ih)
        if sid in host.ats_sids:
            descs += devtlb_flush_descs(sid, pasid, gpa if kind == "sl" else None, npages)
    if not descs:
        return t_ns, 0
    descs.append(qi.wait_desc())
    return host.submit_qi(qi.descs(*descs), t_ns)


def _gpa_frames(v: VmMemory, gpa: int, npages: int) -> tuple[int, int]:
    """[first, end) GPA frames of a VMM memory request, or IommufdError naming what is wrong."""
    if gpa < 0 or gpa % PAGE_SIZE:
        raise IommufdError(f"GPA {gpa:#x} is not a 4-KiB aligned guest address")
    f0 = gpa >> PAGE_SHIFT
    if npages < 1 or f0 + npages > v.gpa_frames:
        raise IommufdError(f"{npages} pages at GPA {gpa:#x}: VM {v.vm} has "
                           f"{v.gpa_frames} pages of memory")
    return f0, f0 + npages


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index runs where ``mask`` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def sl_unmap(host: HostIommu, vm: int, gpa: int, npages: int, t_ns: int
             ) -> tuple[int, int, int, int]:
    """Take GPA pages away from the VM (balloon inflate / unplug): unmap, flush, free frames.

    A page VFIO has pinned (a shadow mapping of it exists) is refused and stays: QEMU does not
    discard RAM while a VFIO device may DMA to it, and type1 keeps pinned pages. The other
    frames go back to the host only after the flush completed, so no cached translation can
    reach them once another owner has them. Returns (t_done, descriptors, pages freed, pages
    refused because pinned). Raises IommufdError for a range outside the VM's memory.
    """
    v = vm_memory(host, vm)
    f0, f1 = _gpa_frames(v, gpa, npages)
    backed = v.hpa_of[f0:f1] >= 0
    pinned = v.pins[f0:f1] > 0
    take = backed & ~pinned
    refused = int((backed & pinned).sum())
    if not take.any():
        return t_ns, 0, 0, refused
    freed = 0
    for a, b in _runs(take):
        v.sl.unmap((f0 + a) << PAGE_SHIFT, (b - a) << PAGE_SHIFT)
        freed += v.sl.freed_tables
    t_done, nd = flush_derived(host, vm, gpa, npages, t_ns, ih=not freed)
    host.free_after(v.sl.store.take_freed(), t_done)   # emptied table pages: after the flush
    host.advance_to(t_done)
    idx = np.flatnonzero(take) + f0
    frames = v.hpa_of[idx].copy()
    v.hpa_of[idx] = -1
    host.mem.free(frames)
    return t_done, nd, int(frames.size), refused


def sl_map(host: HostIommu, vm: int, gpa: int, npages: int) -> int:
    """Give GPA pages back (balloon deflate / plug): new frames, mapped in the second level."""
    v = vm_memory(host, vm)
    f0, f1 = _gpa_frames(v, gpa, npages)
    missing = np.flatnonzero(v.hpa_of[f0:f1] < 0) + f0
    if missing.size == 0:
        return 0
    try:
        frames = host.mem.alloc_frames(missing.size, vm, KIND_DATA)
    except HostMemoryError as exc:
        raise IommufdError(f"cannot back {missing.size} pages of VM {vm}: {exc}") from None
    v.hpa_of[missing] = frames
    for f in missing.tolist():
        v.sl.map(f << PAGE_SHIFT, int(v.hpa_of[f]) << PAGE_SHIFT, 1 << PAGE_SHIFT, max_order=0)
    return int(missing.size)
