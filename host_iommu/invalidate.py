"""Host-driver invalidation helpers: turn a range into the VT-d descriptors Linux would queue.

Follows Linux drivers/iommu/intel/cache.c (cache_tag_flush_range, calculate_psi_aligned_address:
one page-selective descriptor whose 2^AM-page aligned range covers the request; domain-wide
only when the mask exceeds CAP.MAMV, and PASID-wide only when everything is asked for).
Callers end each submission with a wait descriptor, as dmar.c qi_submit_sync does. The
guest's driver and the host's use the same helpers, as both run Linux's VT-d driver.
Each helper comes twice: ``*_words`` gives the descriptors as words (qi.Words, plain ints, for
a caller that builds a queue array at once with qi.as_descs), ``*_descs`` as DESC_DTYPE records.
pasid_flush_words and domain_flush_words are pure functions of their arguments, and the same
few recur (every strict unmap of an IOVA the allocator hands out again): their results are
kept by argument in a bounded dict, as qi.decode_words keeps decoded descriptors.
"""

from __future__ import annotations

import numpy as np

from host_iommu import qi
from host_iommu.defs import NO_PASID, PAGE_SHIFT

ALL_PAGES = (1 << 64) - 1  # iommufd: npages all-ones with addr 0 means "everything"
# Linux MAX_AGAW_PFN_WIDTH: a mask this wide covers the whole 64-bit space (2^52 pages).
MAX_AGAW_PFN_WIDTH = 64 - PAGE_SHIFT
DEVTLB_ALL_BYTES = 1 << 64  # qi_flush_dev_iotlb(addr 0, mask MAX_AGAW_PFN_WIDTH)


def psi_aligned(addr: int, npages: int, mamv: int | None = qi.QI_MAMV_DEFAULT
                ) -> tuple[int, int] | None:
    """(aligned addr, am) covering [addr, addr + npages pages), as Linux's
    calculate_psi_aligned_address; None for no pages or when am exceeds ``mamv`` (CAP.MAMV:
    the caller falls back to a domain-selective flush). ``mamv=None`` never falls back; the
    mask is then at most MAX_AGAW_PFN_WIDTH, which covers every address."""
    if npages <= 0:
        return None
    start = addr >> PAGE_SHIFT
    end = start + npages - 1
    am = max(0, (npages - 1).bit_length())
    if start >= 0:
        # The smallest am >= the size's order with start >> am == end >> am: the highest bit
        # in which start and end differ. The next lines are equivalent and left for reference:
        #     while am < MAX_AGAW_PFN_WIDTH and (start >> am) != (end >> am):
        #         am += 1
        am = max(am, (start ^ end).bit_length())
    else:
        while am < MAX_AGAW_PFN_WIDTH and (start >> am) != (end >> am):
            am += 1
    am = min(am, MAX_AGAW_PFN_WIDTH)
    if mamv is not None and am > mamv:
        return None
    return (start >> am) << am << PAGE_SHIFT, am


# (helper, its arguments..., the ATS sids...) -> the descriptors, for pasid_flush_words (0)
# and domain_flush_words (1). Only results are kept: a call that raises (QiError: a field out
# of range) is not, so it raises again when repeated. Callers get a new list each time.
_FLUSH: dict[tuple[int | bool | None, ...], tuple[qi.Words, ...]] = {}
_FLUSH_MAX = 1 << 14   # about 6 MB at most


def _kept(key: tuple[int | bool | None, ...], words: list[qi.Words]) -> list[qi.Words]:
    if len(_FLUSH) >= _FLUSH_MAX:
        _FLUSH.clear()
    _FLUSH[key] = tuple(words)
    return words


def pasid_flush_words(did: int, pasid: int, addr: int, npages: int, *, leaf: bool,
                      ats_sids: list[int]) -> list[qi.Words]:
    """PASID-based IOTLB (+ device-TLB) invalidation of a range, or of the whole PASID:
    _pasid_flush_words, kept by argument."""
    key = (0, did, pasid, addr, npages, leaf, *ats_sids)
    words = _FLUSH.get(key)
    if words is not None:
        return list(words)
    return _kept(key, _pasid_flush_words(did, pasid, addr, npages, leaf=leaf,
                                         ats_sids=ats_sids))


def _pasid_flush_words(did: int, pasid: int, addr: int, npages: int, *, leaf: bool,
                       ats_sids: list[int]) -> list[qi.Words]:
    """PASID-based IOTLB (+ device-TLB) invalidation of a range, or of the whole PASID.

    The first-level path never falls back to a PASID-wide flush for a large range (cache.c
    cache_tag_flush_range with use_first_level: qi_flush_piotlb with the aligned range, no
    MAMV check); only "everything" (addr 0, npages all-ones: cache_tag_flush_all) is
    PASID-wide. The device-TLB invalidation covers the same aligned range.
    """
    if npages <= 0:
        return []
    if addr == 0 and npages == ALL_PAGES:
        out = [qi.piotlb_words(did, pasid, qi.QI_GRAN_NONG_PASID)]
        return out + [d for s in ats_sids for d in devtlb_flush_words(s, pasid, None, 0)]
    a, am = psi_aligned(addr, npages, mamv=None)
    out = [qi.piotlb_words(did, pasid, qi.QI_GRAN_PSI_PASID, a, am, ih=leaf)]
    return out + [d for s in ats_sids for d in devtlb_flush_words(s, pasid, a, 1 << am)]


def pasid_flush_descs(did: int, pasid: int, addr: int, npages: int, *, leaf: bool,
                      ats_sids: list[int]) -> list[np.void]:
    """pasid_flush_words as DESC_DTYPE records."""
    return [qi.as_desc(w) for w in pasid_flush_words(did, pasid, addr, npages, leaf=leaf,
                                                     ats_sids=ats_sids)]


def domain_flush_words(did: int, addr: int | None, npages: int, *, ats_sids: list[int],
                       mamv: int = qi.QI_MAMV_DEFAULT, ih: bool = False) -> list[qi.Words]:
    """IOTLB (0x2) invalidation of a range or of the domain, then the device-TLB ones:
    _domain_flush_words, kept by argument."""
    key = (1, did, addr, npages, mamv, ih, *ats_sids)
    words = _FLUSH.get(key)
    if words is not None:
        return list(words)
    return _kept(key, _domain_flush_words(did, addr, npages, ats_sids=ats_sids, mamv=mamv,
                                          ih=ih))


def _domain_flush_words(did: int, addr: int | None, npages: int, *, ats_sids: list[int],
                        mamv: int = qi.QI_MAMV_DEFAULT, ih: bool = False) -> list[qi.Words]:
    """IOTLB (0x2) invalidation: page-selective over a range, or domain-selective when the
    range is None or its mask exceeds ``mamv`` (cache.c: ``mask > cap_max_amask_val``).
    Device-TLB invalidations of the ATS devices follow, over the same range."""
    psi = None if addr is None else psi_aligned(addr, npages, mamv)
    if psi is None:
        out = [qi.iotlb_words(qi.QI_IOTLB_GRAN_DOMAIN, did)]
    else:
        out = [qi.iotlb_words(qi.QI_IOTLB_GRAN_PAGE, did, psi[0], psi[1], ih=ih)]
    return out + [d for s in ats_sids for d in devtlb_flush_words(s, NO_PASID, addr, npages)]


def domain_flush_descs(did: int, addr: int | None, npages: int, *, ats_sids: list[int],
                       mamv: int = qi.QI_MAMV_DEFAULT, ih: bool = False) -> list[np.void]:
    """domain_flush_words as DESC_DTYPE records."""
    return [qi.as_desc(w) for w in domain_flush_words(did, addr, npages, ats_sids=ats_sids,
                                                      mamv=mamv, ih=ih)]


def devtlb_flush_words(sid: int, pasid: int, addr: int | None, npages: int) -> list[qi.Words]:
    """Device-TLB invalidation for one cache tag (cache.c cache_tag_flush_range): 0x3 for
    requests without PASID, 0x8 for the tag's PASID. The range is aligned as for the IOTLB
    (no MAMV: a device-TLB has none); ``addr`` None is the whole 64-bit space."""
    psi = None if addr is None else psi_aligned(addr, npages, mamv=None)
    a, size = (0, DEVTLB_ALL_BYTES) if psi is None else (psi[0], 1 << (psi[1] + PAGE_SHIFT))
    if pasid == NO_PASID:
        return [qi.dev_iotlb_words(sid, sid, 0, a, size)]
    return [qi.pasid_dev_iotlb_words(sid, sid, pasid, a, size)]


def devtlb_flush_descs(sid: int, pasid: int, addr: int | None, npages: int) -> list[np.void]:
    """devtlb_flush_words as DESC_DTYPE records."""
    return [qi.as_desc(w) for w in devtlb_flush_words(sid, pasid, addr, npages)]
