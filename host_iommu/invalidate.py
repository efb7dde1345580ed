"""Host-driver invalidation helpers: turn a range into the VT-d descriptors Linux would queue.

Follows Linux drivers/iommu/intel/cache.c (cache_tag_flush_range, calculate_psi_aligned_address:
one page-selective descriptor whose 2^AM-page aligned range covers the request; domain- or
PASID-wide when the range is too large). Callers end each submission with a wait descriptor,
as dmar.c qi_submit_sync does. The guest's driver and the host's use the same helpers, as both
run Linux's VT-d driver.
"""

from __future__ import annotations

import numpy as np

from host_iommu import qi
from host_iommu.defs import NO_PASID, PAGE_SHIFT

# Linux falls back to a domain-wide flush when the aligned mask exceeds the hardware's MAMV.
MAX_AM = 9
ALL_PAGES = (1 << 64) - 1  # iommufd: npages all-ones with addr 0 means "everything"
DEVTLB_ALL_BYTES = 1 << 63  # the widest ATS invalidation range this model encodes


def psi_aligned(addr: int, npages: int) -> tuple[int, int] | None:
    """(aligned addr, am) covering [addr, addr + npages pages), or None if wider than MAX_AM."""
    if npages <= 0:
        return None
    start = addr >> PAGE_SHIFT
    end = start + npages - 1
    am = max(0, (npages - 1).bit_length())
    while (start >> am) != (end >> am):
        am += 1
    if am > MAX_AM:
        return None
    return (start >> am) << am << PAGE_SHIFT, am


def pasid_flush_descs(did: int, pasid: int, addr: int, npages: int, *, leaf: bool,
                      ats_sids: list[int]) -> list[np.void]:
    """PASID-based IOTLB (+ device-TLB) invalidation of a range, or of the whole PASID."""
    out: list[np.void] = []
    psi = None if (addr == 0 and npages == ALL_PAGES) else psi_aligned(addr, npages)
    if psi is None:
        out.append(qi.piotlb_desc(did, pasid, qi.QI_GRAN_NONG_PASID))
        out += [qi.pasid_dev_iotlb_desc(s, s, pasid, 0, 1 << 63) for s in ats_sids]
    else:
        a, am = psi
        out.append(qi.piotlb_desc(did, pasid, qi.QI_GRAN_PSI_PASID, a, am, ih=leaf))
        out += [qi.pasid_dev_iotlb_desc(s, s, pasid, a, 1 << (am + PAGE_SHIFT))
                for s in ats_sids]
    return out


def domain_flush_descs(did: int, addr: int | None, npages: int, *,
                       ats_sids: list[int]) -> list[np.void]:
    """IOTLB (0x2) invalidation: page-selective over a range, or domain-selective."""
    out: list[np.void] = []
    psi = None if addr is None else psi_aligned(addr, npages)
    if psi is None:
        out.append(qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, did))
        out += [qi.dev_iotlb_desc(s, s, 0, 0, 1 << 63) for s in ats_sids]
    else:
        a, am = psi
        out.append(qi.iotlb_desc(qi.QI_IOTLB_GRAN_PAGE, did, a, am))
        out += [qi.dev_iotlb_desc(s, s, 0, a, 1 << (am + PAGE_SHIFT)) for s in ats_sids]
    return out


def devtlb_flush_descs(sid: int, pasid: int, addr: int | None, npages: int) -> list[np.void]:
    """Device-TLB invalidation for one cache tag (cache.c cache_tag_flush_range): 0x3 for
    requests without PASID, 0x8 for the tag's PASID; the whole range when ``addr`` is None."""
    psi = None if addr is None else psi_aligned(addr, npages)
    a, size = (0, DEVTLB_ALL_BYTES) if psi is None else (psi[0], 1 << (psi[1] + PAGE_SHIFT))
    if pasid == NO_PASID:
        return [qi.dev_iotlb_desc(sid, sid, 0, a, size)]
    return [qi.pasid_dev_iotlb_desc(sid, sid, pasid, a, size)]
