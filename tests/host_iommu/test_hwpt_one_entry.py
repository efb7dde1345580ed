"""A one-entry IOMMU_HWPT_INVALIDATE (host_iommu/nested.py hwpt_invalidate_one) keeps the
descriptors it submits by key (nested._ONE_ENTRY): every submission must equal what building
them afresh gives (invalidate.pasid_flush_words and the wait, as Linux's
intel_nested_cache_invalidate_user queues them), and every refusal must stay a refusal,
whether the key was seen before or not, whatever the bound evicts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import nested, qi
from host_iommu.invalidate import ALL_PAGES, pasid_flush_words
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.nested import (
    IOMMU_VTD_INV_FLAGS_LEAF,
    IommufdError,
    alloc_nested,
    check_inv_entry,
    hwpt_invalidate,
    hwpt_invalidate_one,
)
from tests.host_iommu.conftest import SID, TABLE_GPA


def _host(ats: bool, pasids: int = 1) -> tuple[HostIommu, list[nested.NestedDomain], list]:
    """VM 1 with ``pasids`` nested domains on SID; submit_qi spied: the list gets a copy of
    every submission's words."""
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=64, devtlb_entries=16))
    h.create_vm(1, 16 << 20)
    doms = [alloc_nested(h, 1, SID, p, TABLE_GPA, ats=ats) for p in range(pasids)]
    sent: list[np.ndarray] = []
    submit = h.submit_qi

    def spy(descs: np.ndarray, t_ns: int) -> tuple[int, int]:
        sent.append(descs.view(np.uint64).reshape(-1, 4).copy())
        return submit(descs, t_ns)

    h.submit_qi = spy   # type: ignore[method-assign]
    return h, doms, sent


def _expected(dom: nested.NestedDomain, ats: bool, addr: int, npages: int, flags: int
              ) -> np.ndarray:
    words = pasid_flush_words(dom.did, dom.pasid, addr, npages,
                              leaf=bool(flags & IOMMU_VTD_INV_FLAGS_LEAF),
                              ats_sids=[dom.sid] if ats else [])
    return np.array([*words, qi.WAIT_WORDS], dtype=np.uint64).reshape(-1, 4)


def _refused(addr: int, npages: int, flags: int) -> bool:
    try:
        check_inv_entry(addr, npages, flags)
    except IommufdError:
        return True
    return False


ADDRS = st.sampled_from([0, 0x1000, 0x1000_0000, 0x1000_3000, 0x7FFF_F000, 0x1234])
NPAGES = st.sampled_from([0, 1, 2, 3, 16, 1 << 20, ALL_PAGES])
FLAGS = st.sampled_from([0, IOMMU_VTD_INV_FLAGS_LEAF, 2, 3])


@settings(max_examples=60, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(0, 1), st.booleans(), ADDRS, NPAGES, FLAGS),
                      min_size=1, max_size=40),
       bound=st.sampled_from([1, 3, 1 << 14]))
def test_every_submission_equals_a_fresh_build(calls, bound):
    """Calls on two hosts (one with ATS on the device, one without: the same DIDs) and two
    PASIDs, with repeats, under a small or the real bound: each submits exactly the fresh
    build, or is refused exactly when check_inv_entry refuses, leaving no trace."""
    hosts = {ats: _host(ats, pasids=2) for ats in (False, True)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nested, "_ONE_ENTRY", {})
        mp.setattr(nested, "_ONE_ENTRY_MAX", bound)
        for t, (p, ats, addr, npages, flags) in enumerate(calls):
            h, doms, sent = hosts[ats]
            before = len(sent)
            if _refused(addr, npages, flags):
                with pytest.raises(IommufdError):
                    hwpt_invalidate_one(h, doms[p], addr, npages, flags, 1000 * t)
                assert len(sent) == before
                continue
            _t, nd = hwpt_invalidate_one(h, doms[p], addr, npages, flags, 1000 * t)
            assert len(sent) == before + 1
            want = _expected(doms[p], ats, addr, npages, flags)
            assert np.array_equal(sent[-1], want)
            assert nd == want.shape[0]
            assert len(nested._ONE_ENTRY) <= bound


def test_a_key_seen_on_a_host_without_ats_still_flushes_the_device_tlb_elsewhere():
    """The same DID, PASID and range on a host where the device has ATS: the device-TLB
    invalidation (0x3: PASID 0 is NO_PASID, requests without PASID) is submitted there,
    not the other host's two descriptors."""
    h0, [d0], _sent0 = _host(ats=False)
    h1, [d1], sent1 = _host(ats=True)
    assert (d0.did, d0.pasid, d0.sid) == (d1.did, d1.pasid, d1.sid)
    assert hwpt_invalidate_one(h0, d0, 0x1000_0000, 1, 0, 0)[1] == 2
    assert hwpt_invalidate_one(h1, d1, 0x1000_0000, 1, 0, 0)[1] == 3
    assert qi.desc_type(int(sent1[-1][1, 0])) == qi.QI_DIOTLB_TYPE


def test_a_refused_entry_is_refused_every_time():
    h, [dom], sent = _host(ats=False)
    for _ in range(2):
        with pytest.raises(IommufdError, match="only LEAF"):
            hwpt_invalidate_one(h, dom, 0x1000, 1, 2, 0)
        with pytest.raises(IommufdError, match="4-KiB aligned"):
            hwpt_invalidate_one(h, dom, 0x1000, ALL_PAGES, 0, 0)
    assert sent == []


def test_the_list_form_matches_the_one_entry_form_and_checks_all_entries_first():
    """hwpt_invalidate of one entry is hwpt_invalidate_one; of several, a refused entry
    anywhere refuses the whole request before anything is submitted."""
    h, [dom], sent = _host(ats=True)
    hwpt_invalidate(h, dom, [(0x1000_0000, 4, 1)], 0)
    hwpt_invalidate_one(h, dom, 0x1000_0000, 4, 1, 0)
    assert np.array_equal(sent[0], sent[1])
    with pytest.raises(IommufdError):
        hwpt_invalidate(h, dom, [(0x1000_0000, 4, 1), (0x1001, 1, 0)], 0)
    assert len(sent) == 2
    _t, nd = hwpt_invalidate(h, dom, [(0x1000_0000, 4, 1), (0, ALL_PAGES, 0)], 0)
    assert nd == 5 and np.array_equal(sent[2][:2], sent[0][:2])


def test_a_submission_leaves_the_kept_descriptors_as_they_were():
    h, [dom], _sent = _host(ats=True)
    hwpt_invalidate_one(h, dom, 0x2000, 2, 0, 0)
    key = (dom.did, dom.pasid, 0x2000, 2, 0, True)
    kept = nested._ONE_ENTRY[key].copy()
    for t in range(3):
        hwpt_invalidate_one(h, dom, 0x2000, 2, 0, 10_000 * t)
    assert nested._ONE_ENTRY[key].tobytes() == kept.tobytes()
