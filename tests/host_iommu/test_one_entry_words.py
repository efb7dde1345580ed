"""nested.one_entry_words (what the epoch kernel's table of resolved HWPT invalidations
keeps) against nested.one_entry_descs (what hwpt_invalidate_one submits): the same words
for every entry, including the cases its direct encoding leaves to one_entry_descs (ATS,
"everything", no pages, refused flags or addresses, DIDs and PASIDs out of range)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.nested import NestedDomain, one_entry_descs, one_entry_words

ATS_SID, SID = 0x200, 0x100
M64 = (1 << 64) - 1


def _host() -> HostIommu:
    h = HostIommu(IommuParams(memory_mib=16))
    h.ats_sids.add(ATS_SID)
    return h


def _outcome(f, *args):
    try:
        out = f(*args)
    except Exception as exc:          # the same refusal, of the same type
        return type(exc).__name__
    return np.asarray(out).view(np.uint64).ravel().tolist() if f is one_entry_descs else out


addrs = st.one_of(st.integers(0, 1 << 40).map(lambda x: x << 12), st.integers(0, M64),
                  st.sampled_from([0, M64 & ~0xFFF, (1 << 63), 0x1000]))
npages = st.one_of(st.integers(0, 600), st.sampled_from([M64, M64 - 1, 1 << 52, 1 << 63]),
                   st.integers(0, M64))


@settings(max_examples=400, deadline=None)
@given(addr=addrs, n=npages, flags=st.sampled_from([0, 1, 2, 3, -1]),
       sid=st.sampled_from([SID, ATS_SID]), did=st.sampled_from([1, 7, 0xFFFF, 0x1_0000]),
       pasid=st.sampled_from([0, 5, (1 << 20) - 1, 1 << 20]))
def test_words_equal_descs(addr, n, flags, sid, did, pasid):
    h = _host()
    dom = NestedDomain(1, did, sid, pasid, 0x1000, 4)
    assert _outcome(one_entry_words, h, dom, addr, n, flags) == _outcome(
        one_entry_descs, h, dom, addr, n, flags)


@pytest.mark.parametrize("addr, n", [(0x1000, 1), (0x3000, 2), (0xFFFF_F000, 3),
                                     ((1 << 52) - 4096, 1 << 40), (0, M64), (0x1000, 0)])
def test_edges(addr, n):
    h = _host()
    for sid in (SID, ATS_SID):
        dom = NestedDomain(1, 3, sid, 2, 0x1000, 4)
        for flags in (0, 1):
            assert one_entry_words(h, dom, addr, n, flags) == _outcome(
                one_entry_descs, h, dom, addr, n, flags)
