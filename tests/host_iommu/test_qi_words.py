"""Word-level encoders, the decoded-descriptor cache and psi_aligned's closed form.

qi.*_words give the same descriptors as the qi.*_desc records; decode_words (cached) gives
what an uncached decode gives; invalidate.psi_aligned equals Linux's loop
(calculate_psi_aligned_address) it replaced.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import invalidate, qi
from host_iommu.defs import MAX_PASID, NO_PASID, PAGE_SHIFT
from host_iommu.invalidate import MAX_AGAW_PFN_WIDTH, psi_aligned

u64 = st.integers(0, (1 << 64) - 1)
words4 = st.tuples(u64, u64, st.sampled_from([0, 0, 0, 1 << 63]), st.sampled_from([0, 0, 5]))


def psi_loop(addr: int, npages: int, mamv: int | None) -> tuple[int, int] | None:
    """Linux calculate_psi_aligned_address as a loop (the form psi_aligned had)."""
    if npages <= 0:
        return None
    start = addr >> PAGE_SHIFT
    end = start + npages - 1
    am = max(0, (npages - 1).bit_length())
    while am < MAX_AGAW_PFN_WIDTH and (start >> am) != (end >> am):
        am += 1
    am = min(am, MAX_AGAW_PFN_WIDTH)
    if mamv is not None and am > mamv:
        return None
    return (start >> am) << am << PAGE_SHIFT, am


@settings(max_examples=500, deadline=None)
@given(st.one_of(u64, st.integers(0, 1 << 32).map(lambda p: p << PAGE_SHIFT)),
       st.one_of(st.integers(-2, 4096), st.integers(1, (1 << 64) - 1)),
       st.sampled_from([None, 0, 9, 18, 52, 60]))
def test_psi_aligned_equals_the_loop(addr, npages, mamv):
    assert psi_aligned(addr, npages, mamv) == psi_loop(addr, npages, mamv)


def uncached(words: tuple[int, int, int, int], mamv: int) -> qi.InvCommand | qi.DescError:
    qi._DECODED.clear()
    return qi.decode_words(*words, mamv)


@settings(max_examples=400, deadline=None)
@given(words4, st.sampled_from([qi.QI_MAMV_DEFAULT, 0, 40]))
def test_cached_decode_is_the_uncached_decode(words, mamv):
    first = uncached(words, mamv)
    again = qi.decode_words(*words, mamv)          # from the cache
    rec = qi.as_desc(words)
    assert again == first
    assert qi.decode(rec, mamv) == first
    # the record's fields read one by one (the path for foreign records) agree too
    assert qi._decode_words(*(int(rec[f]) for f in qi.DESC_DTYPE.names), mamv) == first


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(qi, "_DECODED_MAX", 8)
    qi._DECODED.clear()
    for pfn in range(50):
        qi.decode_words(*qi.piotlb_words(1, 0, qi.QI_GRAN_PSI_PASID, pfn << PAGE_SHIFT))
        assert len(qi._DECODED) <= 8


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, MAX_PASID), st.integers(0, 1 << 30),
       st.integers(1, 1 << 20), st.booleans(), st.booleans(), st.integers(0, 3))
def test_words_are_the_records(did, pasid, pfn, npages, leaf, ats, which):
    addr = pfn << PAGE_SHIFT
    sids = [0x100] if ats else []
    if which == 0:
        words = invalidate.pasid_flush_words(did, pasid, addr, npages, leaf=leaf,
                                             ats_sids=sids)
        recs = invalidate.pasid_flush_descs(did, pasid, addr, npages, leaf=leaf,
                                            ats_sids=sids)
    elif which == 1:
        words = invalidate.domain_flush_words(did, addr, npages, ats_sids=sids, ih=leaf)
        recs = invalidate.domain_flush_descs(did, addr, npages, ats_sids=sids, ih=leaf)
    elif which == 2:
        words = invalidate.devtlb_flush_words(0x10, NO_PASID if leaf else pasid, addr, npages)
        recs = invalidate.devtlb_flush_descs(0x10, NO_PASID if leaf else pasid, addr, npages)
    else:
        words = invalidate.pasid_flush_words(did, pasid, 0, invalidate.ALL_PAGES, leaf=leaf,
                                             ats_sids=sids)
        recs = invalidate.pasid_flush_descs(did, pasid, 0, invalidate.ALL_PAGES, leaf=leaf,
                                            ats_sids=sids)
    assert [r.item() for r in recs] == words
    arr = qi.as_descs(words)
    assert arr.dtype == qi.DESC_DTYPE and arr.tolist() == words
    assert np.array_equal(arr, qi.descs(*recs))


def test_each_encoder_matches_its_words():
    assert qi.cc_desc(3, 7, 0x108, 2).item() == qi.cc_words(3, 7, 0x108, 2)
    assert qi.iotlb_desc(3, 9, 0x4000, 2, True, True).item() == qi.iotlb_words(
        3, 9, 0x4000, 2, True, True)
    assert qi.wait_desc().item() == qi.WAIT_WORDS == qi.wait_words()
    assert qi.wait_desc(7, 0x40, True, False, True).item() == qi.wait_words(
        7, 0x40, True, False, True)
    assert qi.pc_desc(1, 3, 5).item() == qi.pc_words(1, 3, 5)
    assert qi.dev_iotlb_desc(1, 2, 3, 0x8000, 0x8000).item() == qi.dev_iotlb_words(
        1, 2, 3, 0x8000, 0x8000)
    assert qi.pasid_dev_iotlb_desc(1, 2, 3, 0, 1 << 64, True, 4).item() == \
        qi.pasid_dev_iotlb_words(1, 2, 3, 0, 1 << 64, True, 4)
