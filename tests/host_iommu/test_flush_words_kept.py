"""pasid_flush_words and domain_flush_words keep their results by argument
(host_iommu/invalidate.py _FLUSH): each call must give what the uncached helper gives for
the same arguments (Linux cache.c's descriptors), repeated or not, under any bound; a call
that raises must raise again; and a caller's list is its own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import invalidate, qi
from host_iommu.defs import MAX_PASID
from host_iommu.invalidate import ALL_PAGES

ADDRS = st.sampled_from([0, 0x1000, 0x3000, 0x1000_0000, 0x7FFF_F000, 1 << 47])
NPAGES = st.sampled_from([0, 1, 2, 5, 512, 1 << 20, ALL_PAGES])
SIDS = st.sampled_from([[], [0x100], [0x108], [0x100, 0x108]])
CALL = st.tuples(st.booleans(), st.sampled_from([1, 2, 0xFFFF]), st.sampled_from([0, 3]),
                 st.one_of(st.none(), ADDRS), NPAGES, st.booleans(), SIDS,
                 st.sampled_from([None, 0, 9, qi.QI_MAMV_DEFAULT]))


def _both(pasid_side: bool, did: int, pasid: int, addr: int | None, npages: int, flag: bool,
          sids: list[int], mamv: int | None) -> tuple[object, object]:
    """(kept helper's outcome, uncached helper's outcome): a list, or the exception type."""
    def outcome(f, **kw):
        try:
            return f(**kw)
        except (qi.QiError, TypeError) as exc:
            return type(exc)

    if pasid_side:
        kw = dict(did=did, pasid=pasid, addr=addr or 0, npages=npages, leaf=flag,
                  ats_sids=list(sids))
        return (outcome(invalidate.pasid_flush_words, **kw),
                outcome(invalidate._pasid_flush_words, **kw))
    kw = dict(did=did, addr=addr, npages=npages, ats_sids=list(sids), mamv=mamv, ih=flag)
    return (outcome(invalidate.domain_flush_words, **kw),
            outcome(invalidate._domain_flush_words, **kw))


@settings(max_examples=80, deadline=None)
@given(calls=st.lists(CALL, min_size=1, max_size=40), bound=st.sampled_from([1, 4, 1 << 14]))
def test_every_call_gives_what_the_uncached_helper_gives(calls, bound):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(invalidate, "_FLUSH", {})
        mp.setattr(invalidate, "_FLUSH_MAX", bound)
        for call in calls + calls:      # every call again, most of them kept by then
            kept, fresh = _both(*call)
            assert kept == fresh
            assert len(invalidate._FLUSH) <= bound


def test_a_refused_field_raises_every_time():
    """A DID beyond 16 bits and a PASID beyond 20 are refused (qi._check) on every call."""
    for _ in range(2):
        with pytest.raises(qi.QiError, match="did"):
            invalidate.pasid_flush_words(1 << 16, 0, 0x1000, 1, leaf=False, ats_sids=[])
        with pytest.raises(qi.QiError, match="pasid"):
            invalidate.pasid_flush_words(1, MAX_PASID + 1, 0x1000, 1, leaf=False, ats_sids=[])
        with pytest.raises(qi.QiError, match="did"):
            invalidate.domain_flush_words(1 << 16, None, 0, ats_sids=[])


def test_a_callers_list_is_its_own():
    a = invalidate.pasid_flush_words(7, 1, 0x5000, 2, leaf=True, ats_sids=[0x100])
    want = list(a)
    a.append(qi.WAIT_WORDS)
    a[0] = (0, 0, 0, 0)
    assert invalidate.pasid_flush_words(7, 1, 0x5000, 2, leaf=True, ats_sids=[0x100]) == want
    d = invalidate.domain_flush_words(7, 0x5000, 2, ats_sids=[])
    d.clear()
    assert invalidate.domain_flush_words(7, 0x5000, 2, ats_sids=[]) == \
        invalidate._domain_flush_words(7, 0x5000, 2, ats_sids=[]) != []


def test_the_ats_devices_and_the_flags_are_part_of_the_key():
    """The same range with and without a device-TLB to flush, leaf or not, ih or not."""
    p = [invalidate.pasid_flush_words(3, 1, 0x2000, 1, leaf=leaf, ats_sids=sids)
         for sids in ([], [0x100], [0x108]) for leaf in (False, True)]
    assert len({tuple(x) for x in p}) == 6 and [len(x) for x in p] == [1, 1, 2, 2, 2, 2]
    for npages in (1, 2):     # 2 pages need am 1: beyond MAMV 0, domain-selective
        for sids in ([], [0x100]):
            for ih in (False, True):
                for m in (0, 9):
                    assert invalidate.domain_flush_words(
                        3, 0x2000, npages, ats_sids=sids, ih=ih, mamv=m
                    ) == invalidate._domain_flush_words(3, 0x2000, npages, ats_sids=sids,
                                                        ih=ih, mamv=m)
    assert invalidate.domain_flush_words(3, 0x2000, 2, ats_sids=[], mamv=0) == \
        [qi.iotlb_words(qi.QI_IOTLB_GRAN_DOMAIN, 3)]
