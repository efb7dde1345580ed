"""The live context- and PASID-caches (host_iommu/entrycache.py) against RefSetAssoc.

Random scripts of look-ups, fills and every invalidation the caches offer run on both; after
every step the results, every line with its set, way and LRU stamp, and the counters agree.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.entrycache import ContextEntryCache, PasidEntryCache
from host_iommu.iotlb import CC_FM_SID_MASK
from host_iommu.reference_cache import RefSetAssoc


def layout(cache) -> list[tuple[int, ...]]:
    """The cache's lines in RefSetAssoc.contents(layout=True) form: (set, way, stamp,
    key..., did, value)."""
    out = []
    for s, ways in enumerate(cache.lines):
        for w, line in enumerate(ways):
            if line is not None:
                out.append((s, w, line[3], *line[0], line[1], line[2]))
    return sorted(out)


def check(fast, ref) -> None:
    assert layout(fast.cache) == ref.contents(layout=True)
    assert fast.cache.counters() == ref.counters()
    assert fast.cache.clock == ref.clock


SIZES = st.sampled_from([(0, 1), (4, 4), (8, 4), (12, 4), (64, 4), (16, 1), (6, 2)])
SMALL = st.integers(0, 5)
STEP = st.tuples(st.sampled_from(["lookup", "lookup", "fill", "fill", "fill", "global",
                                  "domain", "pasid", "sid", "entry"]),
                 SMALL, SMALL, SMALL, st.integers(0, 1000))


@settings(max_examples=150, deadline=None)
@given(size=SIZES, steps=st.lists(STEP, max_size=80))
def test_pasid_cache_matches_reference(size, steps):
    """PasidEntryCache: LRU placement, replacement, eviction and 0x7 selections."""
    entries, ways = size
    fast = PasidEntryCache(entries, ways)
    ref = RefSetAssoc(entries, ways, ("sid", "pasid"), ("did", "val"))
    for op, sid, pasid, did, val in steps:
        if op == "lookup":
            got = fast.lookup(sid, pasid)
            (p, v), = ref.lookup_first([[(sid, pasid)]])
            assert got == (None if p < 0 else v[1])
        elif op == "fill":
            fast.fill(sid, pasid, did, val)
            ref.fill([((sid, pasid), (did, val))])
        elif op == "global":
            assert fast.inv_global() == ref.invalidate(lambda f: True)
        elif op == "domain":
            assert fast.inv_domain(did) == ref.invalidate(lambda f, d=did: f["did"] == d)
        elif op == "pasid":
            assert fast.inv_pasid(did, pasid) == ref.invalidate(
                lambda f, d=did, p=pasid: f["did"] == d and f["pasid"] == p)
        elif op == "sid":
            assert fast.inv_sid(sid) == ref.invalidate(lambda f, s=sid: f["sid"] == s)
        else:
            assert fast.inv_entry(sid, pasid) == ref.invalidate(
                lambda f, s=sid, p=pasid: f["sid"] == s and f["pasid"] == p)
        check(fast, ref)


@settings(max_examples=150, deadline=None)
@given(size=SIZES, steps=st.lists(
    st.tuples(st.sampled_from(["lookup", "fill", "fill", "global", "domain", "device"]),
              st.integers(0, 15), st.integers(0, 3), st.integers(0, 1000)), max_size=80))
def test_context_cache_matches_reference(size, steps):
    """ContextEntryCache: the same, with device-selective 0x1 under every function mask."""
    entries, ways = size
    fast = ContextEntryCache(entries, ways)
    ref = RefSetAssoc(entries, ways, ("sid",), ("did", "val"))
    for op, sid, fm, val in steps:
        if op == "lookup":
            got = fast.lookup(sid)
            (p, v), = ref.lookup_first([[(sid,)]])
            assert got == (None if p < 0 else v[1])
        elif op == "fill":
            fast.fill(sid, val)
            ref.fill([((sid,), (0, val))])
        elif op == "global":
            assert fast.inv_global() == ref.invalidate(lambda f: True)
        elif op == "domain":
            assert fast.inv_domain(fm) == ref.invalidate(lambda f, d=fm: f["did"] == d)
        else:
            keep = ~CC_FM_SID_MASK[fm] & 0xFFFF
            assert fast.inv_device(sid, fm) == ref.invalidate(
                lambda f, s=sid, k=keep: (f["sid"] & k) == (s & k))
        check(fast, ref)


def test_one_set_thrash_evicts_the_oldest():
    """Five keys through one 4-way set: the fifth evicts the least recently looked-up."""
    fast = PasidEntryCache(4, 4)
    ref = RefSetAssoc(4, 4, ("sid", "pasid"), ("did", "val"))
    for k in range(4):
        fast.fill(1, k, 7, k)
        ref.fill([((1, k), (7, k))])
    for k in (2, 0, 3):
        fast.lookup(1, k)
        ref.lookup_first([[(1, k)]])
    fast.fill(1, 9, 7, 9)
    ref.fill([((1, 9), (7, 9))])
    check(fast, ref)
    assert fast.lookup(1, 1) is None and fast.lookup(1, 9) == 9
