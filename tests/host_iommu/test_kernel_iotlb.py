"""The compiled IOTLB, PWC and device-TLB kernels against the reference caches, step by step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.kernels.devtlb import DeviceTlbArrays
from host_iommu.kernels.iotlb import IotlbArrays
from host_iommu.kernels.pwc import PwcArrays
from host_iommu.reference_cache import RefDeviceTLB, RefIOTLB, RefPagingStructureCache

# Few DIDs, PASIDs and pages, so sets collide, ways fill and LRU victims are chosen.
req = st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 40),
                st.integers(0, 4095), st.integers(0, 2))
batch = st.tuples(st.sampled_from(["lookup", "fill"]), st.lists(req, max_size=24))
# (kind, did, pasid, page, am): every 0x2 and 0x6 granularity, ranges from 1 page to 2^20.
inv = st.tuples(st.sampled_from(["inv_global", "inv_domain", "inv_page", "inv_pasid",
                                 "inv_pasid_page"]),
                st.integers(0, 3), st.integers(0, 2), st.integers(0, 40),
                st.sampled_from([0, 1, 3, 9, 10, 18, 20]))
geometry = st.sampled_from([(0, 1), (4, 4), (8, 2), (16, 8), (12, 3), (32, 1)])


def _addr(page: int, offset: int, order: int) -> int:
    # Pages spread over 4 KiB, 2 MiB and 1 GiB regions so every size meets others.
    return (page << (12 + 9 * (page % 3))) + offset


def _invalidate(cache, kind: str, did: int, pasid: int, page: int, am: int) -> int:
    addr = _addr(page, 0, 0)
    if kind == "inv_global":
        return cache.inv_global()
    if kind == "inv_domain":
        return cache.inv_domain(did)
    if kind == "inv_page":
        return cache.inv_page(did, addr, am)
    if kind == "inv_pasid":
        return cache.inv_pasid(did, pasid)
    return cache.inv_pasid_page(did, pasid, addr, am)


@settings(max_examples=150, deadline=None)
@given(geometry, st.lists(st.one_of(batch, inv), max_size=20))
def test_kernel_matches_reference_batch_by_batch(geom, script):
    entries, ways = geom
    fast, ref = IotlbArrays(entries, ways), RefIOTLB(entries, ways)
    for step in script:
        if step[0].startswith("inv"):
            assert _invalidate(fast, *step) == _invalidate(ref, *step)
            assert fast.contents(layout=True) == ref.cache.contents(layout=True)
            continue
        kind, rows = step
        if not rows:
            continue
        did, pasid, page, off, order = (np.array(c, dtype=np.int64) for c in zip(*rows,
                                                                               strict=True))
        addr = np.array([_addr(p, o, 0) for p, o in zip(page.tolist(), off.tolist(),
                                                        strict=True)], dtype=np.uint64)
        if kind == "lookup":
            got, want = fast.lookup(did, pasid, addr), ref.lookup(did, pasid, addr)
            for g, w in zip(got, want, strict=True):
                assert np.array_equal(g, w)
        else:
            hpa_page = (page.astype(np.uint64) + np.uint64(7)) << np.uint64(30)
            perm, pgtt = (did % 3) + 1, (pasid % 4) + 1
            fast.fill(did, pasid, addr, order, hpa_page, perm, pgtt)
            ref.fill(did, pasid, addr, order, hpa_page, perm, pgtt)
        assert fast.contents(layout=True) == ref.cache.contents(layout=True)
        assert fast.counters() == ref.cache.counters()


def test_adversarial_one_set_thrash_keeps_exact_lru():
    """One set, more keys than ways, re-touched in a fixed pattern: same victims."""
    fast, ref = IotlbArrays(4, 4), RefIOTLB(4, 4)
    rng = np.random.default_rng(1)
    for _ in range(200):
        pages = rng.integers(0, 7, size=5).astype(np.uint64) << np.uint64(12)
        for c in (fast, ref):
            c.fill(1, 0, pages, 0, pages + np.uint64(1 << 40), 3, 2)
        probe = rng.integers(0, 7, size=6).astype(np.uint64) << np.uint64(12)
        assert all(np.array_equal(a, b) for a, b in zip(fast.lookup(1, 0, probe),
                                                        ref.lookup(1, 0, probe), strict=True))
    assert fast.contents(layout=True) == ref.cache.contents(layout=True)
    assert fast.counters()["evictions"] == ref.cache.counters()["evictions"] > 100


def test_large_pages_hit_with_the_offset_inside_them():
    c = IotlbArrays(64, 8)
    c.fill(5, 1, 0x4000_0000, 2, 0x8_0000_0000, 3, 1)   # a 1-GiB page
    hit, hpa, perm, order, pgtt = c.lookup(5, 1, [0x4012_3456, 0x8000_0000])
    assert hit.tolist() == [True, False]
    assert int(hpa[0]) == 0x8_0012_3456 and order.tolist() == [2, 0]
    assert perm.tolist() == [3, 0] and pgtt.tolist() == [1, 0]


def test_invalidation_selects_by_pgtt_as_the_descriptors_do():
    """0x2 page-selective drops an SL-only entry only in range but every nested entry of the
    DID; 0x6 never touches SL-only or pass-through entries."""
    c = IotlbArrays(64, 8)
    c.fill([1, 1, 1], [0, 0, 0], [0x1000, 0x9000, 0x5000], 0, [0x7000, 0x8000, 0x6000], 3,
           [2, 3, 4])                      # SL-only at page 1, nested at page 9, PT at page 5
    assert c.inv_pasid(1, 0) == 1          # the nested one
    assert c.inv_page(1, 0x4000, 0) == 0   # page 4: nothing SL-only/PT there
    assert c.inv_page(1, 0x4000, 2) == 1   # pages 4..7: the PT entry at page 5
    assert [line[2] for line in c.contents()] == [1]
    assert c.counters()["invalidated"] == 2


@pytest.mark.parametrize(("page", "dropped"), [(3, 0), (4, 1), (7, 1), (8, 0)])
def test_range_edges_are_inclusive(page, dropped):
    """A 4-KiB entry on the first or last page of a 2^am-page range is in it; a neighbour
    is not (both caches agree)."""
    for cache in (IotlbArrays(64, 8), RefIOTLB(64, 8)):
        cache.fill(1, 2, page << 12, 0, 0x7000, 3, 1)
        assert cache.inv_pasid_page(1, 2, 0x4000, 2) == dropped


def test_bad_columns_are_refused_with_a_reason():
    c = IotlbArrays(8, 2)
    with pytest.raises(ValueError, match="am"):
        c.inv_page(1, 0, 64)
    with pytest.raises(ValueError, match="order"):
        c.fill(1, 0, 0, 3, 0, 3, 1)
    with pytest.raises(ValueError, match="non-negative"):
        c.lookup(-1, 0, 0)
    with pytest.raises(ValueError, match="multiple of ways"):
        IotlbArrays(6, 4)


# --- the paging-structure cache kernels (host_iommu/kernels/pwc.py) ---------------------------
pwc_req = st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 60),
                    st.integers(2, 5))
pwc_step = st.one_of(
    st.tuples(st.sampled_from(["lookup", "fill"]), st.lists(pwc_req, max_size=20)),
    st.tuples(st.sampled_from(["inv_global", "inv_domain", "inv_pasid", "inv_range",
                               "inv_range_all_pasids"]),
              st.integers(0, 3), st.integers(0, 2), st.integers(0, 60),
              st.sampled_from([0, 9, 18, 27, 30])))


def _pwc_addr(page: int) -> int:
    # Addresses spread over every level's span: 4 KiB, 2 MiB, 1 GiB and 512 GiB apart.
    return page << (12 + 9 * (page % 4))


def _pwc_invalidate(cache, kind: str, did: int, pasid: int, addr: int, am: int) -> int:
    if kind == "inv_global":
        return cache.inv_global()
    if kind == "inv_domain":
        return cache.inv_domain(did)
    if kind == "inv_pasid":
        return cache.inv_pasid(did, pasid)
    return cache.inv_range(did, None if kind == "inv_range_all_pasids" else pasid, addr, am)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(["fl", "sl"]), geometry, st.lists(pwc_step, max_size=20))
def test_pwc_kernel_matches_reference_step_by_step(stage, geom, script):
    entries, ways = geom
    fast, ref = PwcArrays(entries, ways, stage), RefPagingStructureCache(entries, ways, stage)
    for step in script:
        kind = step[0]
        if kind.startswith("inv"):
            _k, did, pasid, page, am = step
            addr = _pwc_addr(page)
            if kind == "inv_pasid" and stage == "sl":
                continue
            assert (_pwc_invalidate(fast, kind, did, pasid, addr, am)
                    == _pwc_invalidate(ref, kind, did, pasid, addr, am))
        elif step[1]:
            did, pasid, page, level = (np.array(c, dtype=np.int64)
                                       for c in zip(*step[1], strict=True))
            addr = np.array([_pwc_addr(p) for p in page.tolist()], dtype=np.uint64)
            if kind == "lookup":
                got = fast.lookup_deepest(did, pasid, addr, level)
                want = ref.lookup_deepest(did, pasid, addr, level)
                assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
            else:
                entry = (page.astype(np.uint64) << np.uint64(12)) | np.uint64(3)
                fast.fill(did, pasid, addr, level, entry)
                ref.fill(did, pasid, addr, level, entry)
        assert fast.contents(layout=True) == ref.cache.contents(layout=True)
        assert fast.counters() == ref.cache.counters()


def test_pwc_deepest_level_wins_and_sl_ignores_pasid():
    c = PwcArrays(32, 4, "sl")
    c.fill(1, 7, 0x4020_0000, [4, 3, 2], [0xA003, 0xB003, 0xC003])
    level, entry = c.lookup_deepest(1, 9, [0x4020_1000, 0x4040_0000], 4)
    assert level.tolist() == [2, 3] and entry.tolist() == [0xC003, 0xB003]
    # The first 2 MiB of the GiB: the level-4 and level-3 entries cover it, not level 2's.
    assert c.inv_range(1, None, 0x4000_0000, 9) == 2
    assert [line[2] for line in c.contents()] == [2]
    assert c.inv_range(1, 5, 0x4020_0000, 0) == 1   # SL entries are shared by every PASID
    with pytest.raises(ValueError, match="PASID"):
        c.inv_pasid(1, 0)
    with pytest.raises(ValueError, match="level"):
        c.fill(1, 0, 0, 6, 0)


# --- the device-TLB kernels (host_iommu/kernels/devtlb.py) ------------------------------------
dev_inv = st.tuples(st.sampled_from(["inv", "inv_all_pasids", "inv_global"]),
                    st.integers(0, 3), st.integers(0, 2), st.integers(0, 40),
                    st.sampled_from([4096, 8192, 1 << 21, 1 << 30, 1 << 40]))


def _dev_invalidate(cache, kind: str, sid: int, pasid: int, page: int, size: int) -> int:
    if kind == "inv_global":
        return cache.inv_global()
    addr = (_addr(page, 0, 0) // size) * size
    return cache.inv(sid, None if kind == "inv_all_pasids" else pasid, addr, size)


@settings(max_examples=120, deadline=None)
@given(geometry, st.lists(st.one_of(batch, dev_inv), max_size=20))
def test_devtlb_kernel_matches_reference_step_by_step(geom, script):
    entries, ways = geom
    fast, ref = DeviceTlbArrays(entries, ways), RefDeviceTLB(entries, ways)
    for step in script:
        if step[0].startswith("inv"):
            assert _dev_invalidate(fast, *step) == _dev_invalidate(ref, *step)
        elif step[1]:
            sid, pasid, page, off, order = (np.array(c, dtype=np.int64)
                                            for c in zip(*step[1], strict=True))
            addr = np.array([_addr(p, o, 0) for p, o in zip(page.tolist(), off.tolist(),
                                                            strict=True)], dtype=np.uint64)
            if step[0] == "lookup":
                got, want = fast.lookup(sid, pasid, addr), ref.lookup(sid, pasid, addr)
                assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
            else:
                hpa_page = (page.astype(np.uint64) + np.uint64(3)) << np.uint64(30)
                fast.fill(sid, pasid, addr, order, hpa_page, (sid % 3) + 1)
                ref.fill(sid, pasid, addr, order, hpa_page, (sid % 3) + 1)
        assert fast.contents(layout=True) == ref.cache.contents(layout=True)
        assert fast.counters() == ref.cache.counters()


def test_devtlb_global_pasid_flag_and_byte_range_edges():
    c = DeviceTlbArrays(32, 4)
    c.fill([0x10, 0x10, 0x10, 0x11], [1, 2, 1, 1], [0x3000, 0x3000, 0x4000, 0x3000], 0,
           0x9000, 3)
    assert c.inv(0x10, 1, 0x3FFF, 1) == 1          # one byte on page 3: (0x10, 1) page 3
    assert c.inv(0x10, None, 0x3000, 0x1001) == 2  # pages 3..4, every PASID of 0x10
    assert [line[0] for line in c.contents()] == [0x11]
    with pytest.raises(ValueError, match="size_bytes"):
        c.inv(0x10, None, 0, 0)
