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
from host_iommu.defs import KIND_DATA, NO_PASID, PAGE_SHIFT, PGTT_NESTED, PGTT_SL_ONLY
from host_iommu.invalidate import domain_flush_descs, pasid_flush_descs
from host_iommu.iommu import HostIommu
from host_iommu.pasid import PasidEntry

IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0  # include/uapi/linux/iommufd.h


@dataclass
class NestedDomain:
    """A nested HWPT: one guest first level bound for (sid, pasid) over the VM's second level."""

    vm: int
    did: int
    sid: int
    pasid: int
    flptr_gpa: int
    fl_levels: int


def attach_second_level(host: HostIommu, vm: int, sid: int, *, ats: bool = False) -> int:
    """Pass-through for the guest (no vIOMMU): the device uses GPAs, second level only."""
    v = host.vms[vm]
    host.attach_device(sid, vm, ats=ats)
    host.set_pasid_entry(sid, NO_PASID, PasidEntry(pgtt=PGTT_SL_ONLY, did=v.did,
                                                   slptr=v.sl.root, sl_levels=v.sl.levels))
    v.tags.append(("sl", v.did, sid, NO_PASID))
    return v.did


def alloc_nested(host: HostIommu, vm: int, sid: int, pasid: int, flptr_gpa: int,
                 fl_levels: int = 4, *, ats: bool = False) -> NestedDomain:
    """IOMMU_HWPT_ALLOC of a nested domain and its attachment to (sid, pasid)."""
    v = host.vms[vm]
    if sid not in host.owner_of_sid:
        host.attach_device(sid, vm, ats=ats)
    did = host.alloc_did()
    host.set_pasid_entry(sid, pasid, PasidEntry(
        pgtt=PGTT_NESTED, did=did, slptr=v.sl.root, sl_levels=v.sl.levels,
        flptr=flptr_gpa, fl_levels=fl_levels))
    v.tags.append(("nested", did, sid, pasid))
    return NestedDomain(vm, did, sid, pasid, flptr_gpa, fl_levels)


def hwpt_invalidate(host: HostIommu, dom: NestedDomain, entries: list[tuple[int, int, int]],
                    t_ns: int) -> tuple[int, int]:
    """IOMMU_HWPT_INVALIDATE: entries of (addr, npages, flags). Returns (t_done, descriptors)."""
    ats = [dom.sid] if dom.sid in host.ats_sids else []
    descs = [d for addr, npages, flags in entries
             for d in pasid_flush_descs(dom.did, dom.pasid, addr, npages,
                                        leaf=bool(flags & IOMMU_VTD_INV_FLAGS_LEAF),
                                        ats_sids=ats)]
    descs.append(qi.wait_desc())
    return host.submit_qi(np.array(descs), t_ns)


def flush_derived(host: HostIommu, vm: int, gpa: int, npages: int, t_ns: int
                  ) -> tuple[int, int]:
    """Flush everything derived from a range of the VM's second level (cache tags)."""
    v = host.vms[vm]
    descs: list[np.void] = []
    for kind, did, sid, _pasid in v.tags:
        ats = [sid] if sid in host.ats_sids else []
        if kind == "sl":
            descs += domain_flush_descs(did, gpa, npages, ats_sids=ats)
        else:  # nested or shadow: entries are tagged by IOVA, flush the whole domain
            descs += domain_flush_descs(did, None, 0, ats_sids=ats)
    if not descs:
        return t_ns, 0
    descs.append(qi.wait_desc())
    return host.submit_qi(np.array(descs), t_ns)


def sl_unmap(host: HostIommu, vm: int, gpa: int, npages: int, t_ns: int) -> tuple[int, int, int]:
    """Take GPA pages away from the VM (balloon inflate / unplug): unmap, flush, free frames.

    The frames go back to the host only after the flush completed, so no cached translation
    can reach them once another owner has them. Returns (t_done, descriptors, pages freed).
    """
    v = host.vms[vm]
    f0 = gpa >> PAGE_SHIFT
    frames = v.hpa_of[f0:f0 + npages]
    backed = frames[frames >= 0]
    v.sl.unmap(gpa, npages << PAGE_SHIFT)
    t_done, nd = flush_derived(host, vm, gpa, npages, t_ns)
    host.advance_to(t_done)
    v.hpa_of[f0:f0 + npages] = -1
    if backed.size:
        host.mem.free(backed)
    return t_done, nd, int(backed.size)


def sl_map(host: HostIommu, vm: int, gpa: int, npages: int) -> int:
    """Give GPA pages back (balloon deflate / plug): new frames, mapped in the second level."""
    v = host.vms[vm]
    f0 = gpa >> PAGE_SHIFT
    missing = np.flatnonzero(v.hpa_of[f0:f0 + npages] < 0) + f0
    if missing.size == 0:
        return 0
    v.hpa_of[missing] = host.mem.alloc_frames(missing.size, vm, KIND_DATA)
    for f in missing.tolist():
        v.sl.map(f << PAGE_SHIFT, int(v.hpa_of[f]) << PAGE_SHIFT, 1 << PAGE_SHIFT, max_order=0)
    return int(missing.size)
