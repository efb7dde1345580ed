"""Translation caches: fast path vs reference model, isolation, invalidation scope, LRU."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_iommu import iotlb
from host_iommu.defs import PGTT_FL_ONLY, PGTT_NESTED, PGTT_PT, PGTT_SL_ONLY
from host_iommu.iotlb import (
    IOTLB,
    CacheError,
    ContextCache,
    DeviceTLB,
    PagingStructureCache,
    PasidCache,
    SetAssocCache,
)
from host_iommu.reference_cache import RefDeviceTLB, RefIOTLB, RefPagingStructureCache

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# (entries, ways): power-of-two sets, a non-power-of-two set count, ways without the
# byte-view fast path, direct-mapped, and disabled.
GEOMETRIES = [(8, 2), (12, 4), (9, 3), (4, 1), (16, 16), (0, 4)]
# 4K page numbers near 2M and 1G boundaries, so large pages cover several of them.
VPNS = [0, 1, 2, 3, 4, 5, 8, 511, 512, 513, 1024, 262143, 262144, 262145, 262656]


def assert_same(fast, ref) -> None:
    assert fast.cache.counters() == ref.cache.counters()
    assert fast.cache.contents(layout=True) == ref.cache.contents(layout=True)


def assert_results(a: tuple, b: tuple) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x).astype(np.uint64),
                                      np.asarray(y).astype(np.uint64))


# --- differential: IOTLB ---------------------------------------------------------------------
def _addr(vpn: int, off: int) -> int:
    return (vpn << 12) | off


dids = st.sampled_from([1, 2])
pasids = st.sampled_from([0, 5, 6])
addrs = st.builds(_addr, st.sampled_from(VPNS), st.sampled_from([0, 0x123, 0xFFF]))
ams = st.sampled_from([0, 1, 2, 9, 10, 18, 30])
lookup_reqs = st.lists(st.tuples(dids, pasids, addrs), min_size=1, max_size=12)
fill_reqs = st.lists(st.tuples(dids, pasids, addrs, st.integers(0, 2), st.integers(0, 7),
                               st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=12)
iotlb_ops = st.lists(st.one_of(
    st.tuples(st.just("lookup"), lookup_reqs),
    st.tuples(st.just("fill"), fill_reqs),
    st.tuples(st.just("inv_global")),
    st.tuples(st.just("inv_domain"), dids),
    st.tuples(st.just("inv_page"), dids, addrs, ams, st.integers(0, 1)),
    st.tuples(st.just("inv_pasid"), dids, pasids),
    st.tuples(st.just("inv_pasid_page"), dids, pasids, addrs, ams, st.integers(0, 1)),
), min_size=1, max_size=25)


def run_iotlb_op(fast, ref, op: tuple) -> None:
    kind, *args = op
    if kind == "lookup":
        did, pasid, addr = (np.array(c, dtype=np.uint64) for c in zip(*args[0], strict=True))
        assert_results(fast.lookup(did, pasid, addr), ref.lookup(did, pasid, addr))
    elif kind == "fill":
        did, pasid, addr, order, hidx, perm, pgtt = (
            np.array(c, dtype=np.uint64) for c in zip(*args[0], strict=True))
        hpa = (hidx + 1) << (12 + 9 * order)
        fast.fill(did, pasid, addr, order, hpa, perm, pgtt)
        ref.fill(did, pasid, addr, order, hpa, perm, pgtt)
    else:
        assert getattr(fast, kind)(*args) == getattr(ref, kind)(*args)
    assert_same(fast, ref)


@SETTINGS
@given(st.sampled_from(GEOMETRIES), iotlb_ops)
def test_iotlb_matches_reference(geometry, ops):
    """Random op sequences give identical results, counters and placement in both models."""
    fast, ref = IOTLB(*geometry), RefIOTLB(*geometry)
    for op in ops:
        run_iotlb_op(fast, ref, op)


def test_iotlb_matches_reference_long_random():
    """~5,000 mixed lookups, fills and invalidations on tiny caches agree exactly."""
    rng = np.random.default_rng(20240601)
    for geometry in [(8, 2), (12, 3)]:
        fast, ref = IOTLB(*geometry), RefIOTLB(*geometry)
        done = 0
        while done < 2500:
            r = rng.random()
            n = int(rng.integers(1, 16))
            did = rng.integers(1, 4, n)
            pasid = rng.choice([0, 5, 6], n)
            addr = (rng.integers(0, 40, n) << 12) + rng.choice([0, 1 << 21, 1 << 30], n)
            if r < 0.45:
                run_iotlb_op(fast, ref, ("lookup", list(zip(did, pasid, addr, strict=True))))
            elif r < 0.85:
                order = rng.integers(0, 3, n)
                reqs = list(zip(did, pasid, addr, order, rng.integers(0, 7, n),
                                rng.integers(0, 4, n), rng.integers(1, 5, n), strict=True))
                run_iotlb_op(fast, ref, ("fill", reqs))
            else:
                d, p, a = int(did[0]), int(pasid[0]), int(addr[0])
                am = int(rng.choice([0, 1, 9, 18]))
                op = [("inv_domain", d), ("inv_page", d, a, am, 0), ("inv_pasid", d, p),
                      ("inv_pasid_page", d, p, a, am, 1), ("inv_global",)][
                    int(rng.choice(5, p=[0.15, 0.35, 0.15, 0.3, 0.05]))]
                run_iotlb_op(fast, ref, op)
            done += n
        assert fast.cache.evictions > 100 and fast.cache.hits > 100


def test_iotlb_adversarial_one_set():
    """Batches that all fall in one set, with repeated keys, keep sequential LRU semantics."""
    fast, ref = IOTLB(8, 2), RefIOTLB(8, 2)
    vpn = np.array([0, 4, 8, 4, 12, 0, 16, 4, 4, 20], dtype=np.uint64)  # 4 sets: one set
    assert len(set(fast.cache.set_index(1, 5, vpn, 0).tolist())) == 1
    for _ in range(3):
        run_iotlb_op(fast, ref, ("fill", [(1, 5, int(v) << 12, 0, i, 3, 2)
                                          for i, v in enumerate(vpn)]))
        run_iotlb_op(fast, ref, ("lookup", [(1, 5, int(v) << 12) for v in vpn[::-1]]))
    assert fast.cache.evictions > 0


def test_tag_collisions_fall_back_to_full_compare(monkeypatch):
    """With every key's tag colliding, lookups still agree with the reference exactly."""
    monkeypatch.setattr(iotlb, "_tag", lambda others, page: np.zeros(1, dtype=np.uint32))
    rng = np.random.default_rng(7)
    for geometry in [(8, 2), (12, 4), (9, 3)]:
        fast, ref = IOTLB(*geometry), RefIOTLB(*geometry)
        for _ in range(40):
            n = 6
            did, pasid = rng.integers(1, 3, n), rng.choice([5, 6], n)
            addr = rng.integers(0, 24, n) << 12
            run_iotlb_op(fast, ref, ("fill", list(zip(did, pasid, addr, [0] * n, range(n),
                                                      [3] * n, [2] * n, strict=True))))
            run_iotlb_op(fast, ref, ("lookup", list(zip(did[::-1], pasid, addr, strict=True))))
            run_iotlb_op(fast, ref, ("inv_page", int(did[0]), int(addr[0]), 0, 0))
        assert fast.cache.hits > 20


# --- differential: paging-structure caches and device-TLB -----------------------------------
pwc_ops = st.lists(st.one_of(
    st.tuples(st.just("lookup_deepest"),
              st.lists(st.tuples(dids, pasids, addrs, st.integers(2, 5)), min_size=1,
                       max_size=10)),
    st.tuples(st.just("lookup"),
              st.lists(st.tuples(dids, pasids, addrs, st.integers(2, 5)), min_size=1,
                       max_size=10)),
    st.tuples(st.just("fill"),
              st.lists(st.tuples(dids, pasids, addrs, st.integers(2, 5),
                                 st.integers(0, 2**64 - 1)), min_size=1, max_size=10)),
    st.tuples(st.just("inv_global")),
    st.tuples(st.just("inv_domain"), dids),
    st.tuples(st.just("inv_pasid"), dids, pasids),
    st.tuples(st.just("inv_range"), dids, st.one_of(st.none(), pasids), addrs, ams),
), min_size=1, max_size=25)


@SETTINGS
@given(st.sampled_from(GEOMETRIES), st.sampled_from(["fl", "sl"]), pwc_ops)
def test_pwc_matches_reference(geometry, stage, ops):
    """Paging-structure caches (both stages) agree with the reference on random ops."""
    fast = PagingStructureCache(*geometry, stage)
    ref = RefPagingStructureCache(*geometry, stage)
    for kind, *args in ops:
        if kind == "inv_pasid" and stage == "sl":
            with pytest.raises(CacheError):
                fast.inv_pasid(*args)
            continue
        if kind in ("lookup", "lookup_deepest", "fill"):
            cols = [np.array(c, dtype=np.uint64) for c in zip(*args[0], strict=True)]
            got = getattr(fast, kind)(*cols)
            want = getattr(ref, kind)(*cols)
            if kind != "fill":
                assert_results(got, want)
        else:
            assert getattr(fast, kind)(*args) == getattr(ref, kind)(*args)
        assert_same(fast, ref)


dtlb_ops = st.lists(st.one_of(
    st.tuples(st.just("lookup"), lookup_reqs),
    st.tuples(st.just("fill"), fill_reqs),
    st.tuples(st.just("inv"), dids, st.one_of(st.none(), pasids), addrs,
              st.sampled_from([1, 4096, 8192, 1 << 21, 3 << 20, 1 << 30, 1 << 64])),
    st.tuples(st.just("inv_global")),
), min_size=1, max_size=25)


@SETTINGS
@given(st.sampled_from(GEOMETRIES), dtlb_ops)
def test_device_tlb_matches_reference(geometry, ops):
    """The device-TLB agrees with the reference (dids stand in for sids here)."""
    fast, ref = DeviceTLB(*geometry), RefDeviceTLB(*geometry)
    for kind, *args in ops:
        if kind == "lookup":
            cols = [np.array(c, dtype=np.uint64) for c in zip(*args[0], strict=True)]
            assert_results(fast.lookup(*cols), ref.lookup(*cols))
        elif kind == "fill":
            sid, pasid, addr, order, hidx, perm, _ = (
                np.array(c, dtype=np.uint64) for c in zip(*args[0], strict=True))
            hpa = hidx << (12 + 9 * order)
            fast.fill(sid, pasid, addr, order, hpa, perm)
            ref.fill(sid, pasid, addr, order, hpa, perm)
        else:
            assert getattr(fast, kind)(*args) == getattr(ref, kind)(*args)
        assert_same(fast, ref)


# --- isolation and invalidation scope ---------------------------------------------------------
def _full_tlb() -> IOTLB:
    """Entries for DIDs 1/2, PASIDs 5/6, PGTT 1..4, pages 0..3 (fits without evictions)."""
    tlb = IOTLB(1024, 8)
    for did in (1, 2):
        for pasid in (5, 6):
            for pgtt in (PGTT_FL_ONLY, PGTT_SL_ONLY, PGTT_NESTED, PGTT_PT):
                base = pgtt << 20  # a distinct IOVA region per PGTT
                vpn = np.arange(4, dtype=np.uint64) + np.uint64(base)
                tlb.fill(did, pasid, vpn << np.uint64(12), 0, vpn << np.uint64(13), 3, pgtt)
    assert tlb.cache.occupancy() == 2 * 2 * 4 * 4
    return tlb


def _keys(tlb: IOTLB) -> set[tuple[int, int, int, int]]:
    """(did, pasid, vpn, pgtt) of every cached entry."""
    return {(e[0], e[1], e[2], e[6]) for e in tlb.cache.contents()}


def test_entry_is_isolated_by_did_and_pasid():
    """An entry filled for (did 1, pasid 5) is never returned for (1, 6) or (2, 5)."""
    tlb = IOTLB(64, 4)
    tlb.fill(1, 5, 0x7000, 0, 0x99000, 3, PGTT_NESTED)
    hit, hpa, perm, _, pgtt = tlb.lookup([1, 1, 2, 1], [5, 6, 5, 5], 0x7abc)
    assert hit.tolist() == [True, False, False, True]
    assert hpa.tolist() == [0x99ABC, 0, 0, 0x99ABC]
    assert perm.tolist() == [3, 0, 0, 3] and pgtt.tolist() == [3, 0, 0, 3]


@pytest.mark.parametrize(("call", "gone"), [
    (("inv_global",), lambda d, p, v, g: True),
    (("inv_domain", 1), lambda d, p, v, g: d == 1),
    # 4 pages at 2 << 20 (PGTT 2's region) with am=1: pages 0x200000, 0x200001 only
    # 0x2 page-selective also drops every first-level and nested entry of its DID
    (("inv_page", 1, (2 << 20 | 1) << 12, 1, 0),
     lambda d, p, v, g: d == 1 and (g in (PGTT_NESTED, PGTT_FL_ONLY)
                                    or (g == PGTT_SL_ONLY and v in (2 << 20, 2 << 20 | 1)))),
    (("inv_page", 2, (4 << 20) << 12, 0, 1),
     lambda d, p, v, g: d == 2 and (g in (PGTT_NESTED, PGTT_FL_ONLY)
                                    or (g == PGTT_PT and v == 4 << 20))),
    (("inv_pasid", 1, 6), lambda d, p, v, g: d == 1 and p == 6 and g in (1, 3)),
    (("inv_pasid_page", 2, 5, (1 << 20 | 3) << 12, 0, 0),
     lambda d, p, v, g: d == 2 and p == 5 and g == 1 and v == 1 << 20 | 3),
    (("inv_pasid_page", 2, 5, (3 << 20) << 12, 2, 0),
     lambda d, p, v, g: d == 2 and p == 5 and g == 3),
])
def test_each_invalidation_removes_exactly_what_it_names(call, gone):
    """Survivors are exactly the entries outside the invalidation's scope."""
    tlb = _full_tlb()
    before = _keys(tlb)
    dropped = getattr(tlb, call[0])(*call[1:])
    want = {k for k in before if not gone(*k)}
    assert _keys(tlb) == want
    assert dropped == len(before) - len(want) > 0


def test_large_pages_hit_every_4k_inside_and_die_by_any_page():
    """A 2M / 1G entry serves every 4K page inside it; a page-selective invalidation of any
    page inside drops it."""
    for order, size in ((1, 1 << 21), (2, 1 << 30)):
        base, hpa = 3 * size, 7 * size
        pages = np.arange(0, size, 4096 * 37, dtype=np.uint64) + np.uint64(base + 5)
        for inv in ("inv_page", "inv_pasid_page"):
            tlb = IOTLB(64, 4)
            pgtt = PGTT_SL_ONLY if inv == "inv_page" else PGTT_FL_ONLY
            tlb.fill(1, 5, base, order, hpa, 1, pgtt)
            hit, got, _, orders, _ = tlb.lookup(1, 5, pages)
            assert hit.all() and (orders == order).all()
            assert (got == pages - np.uint64(base) + np.uint64(hpa)).all()
            assert not tlb.lookup(1, 5, [base - 4096, base + size])[0].any()
            tlb.fill(1, 5, 0, 0, 0x1000, 1, pgtt)  # an unrelated 4K neighbour survives
            inside = base + size - 4096
            args = (1, inside, 0, 0) if inv == "inv_page" else (1, 5, inside, 0, 0)
            assert getattr(tlb, inv)(*args) == 1
            assert not tlb.lookup(1, 5, pages)[0].any()
            assert tlb.lookup(1, 5, 0)[0].all()


def test_lru_evicts_least_recently_used():
    """Filling one set beyond its ways evicts the way used longest ago."""
    tlb = IOTLB(16, 4)  # 4 sets: vpn 0, 4, 8, ... share one set
    vpn = [0, 4, 8, 12]
    tlb.fill(1, 0, [v << 12 for v in vpn], 0, 0x1000, 3, 2)
    tlb.lookup(1, 0, [0, 8 << 12, 12 << 12, 0])  # 4 is now least recently used
    tlb.fill(1, 0, 16 << 12, 0, 0x1000, 3, 2)
    assert tlb.lookup(1, 0, [v << 12 for v in [0, 4, 8, 12, 16]])[0].tolist() == [
        True, False, True, True, True]
    assert tlb.cache.evictions == 1
    tlb.fill(1, 0, 20 << 12, 0, 0x1000, 3, 2)  # then the oldest of the rest: 0 was used
    assert tlb.lookup(1, 0, [v << 12 for v in [0, 8, 12, 16, 20]])[0].tolist() == [
        False, True, True, True, True]


def test_refill_replaces_value_without_eviction():
    """Filling a cached key again replaces its value in place."""
    tlb = IOTLB(4, 2)
    tlb.fill(1, 0, 0, 0, [0x1000, 0x2000], [1, 3], 2)
    assert tlb.lookup(1, 0, 0x10)[1].tolist() == [0x2010]
    assert tlb.cache.occupancy() == 1 and tlb.cache.evictions == 0


def test_zero_entries_disables():
    """entries=0: every lookup misses and fills are dropped."""
    for cache in (IOTLB(0, 4), DeviceTLB(0, 1)):
        cache.fill(1, 0, [0, 4096], 0, 0x1000, 3, *([2] if isinstance(cache, IOTLB) else []))
        assert not cache.lookup(1, 0, [0, 4096])[0].any()
        assert cache.cache.occupancy() == 0
        assert cache.cache.counters()["misses"] == 2 and cache.cache.counters()["fills"] == 0
    pwc = PagingStructureCache(0, 2, "sl")
    pwc.fill(1, 0, 0, 2, 5)
    assert pwc.lookup_deepest(1, 0, 0, 4)[0].tolist() == [0]


# --- paging-structure cache ---------------------------------------------------------------------
def test_pwc_lookup_deepest_and_range():
    """The lowest cached level wins; an entry covers 2^(9*(L-1)) pages for inv_range."""
    pwc = PagingStructureCache(64, 4, "fl")
    a = 0x1234_5678_9000
    pwc.fill(1, 5, a, [3, 4], [0x30, 0x40])
    level, entry = pwc.lookup_deepest([1, 1, 1, 2], [5, 6, 5, 5],
                                      [a, a, a ^ (1 << 30), a], [4, 4, 4, 4])
    assert level.tolist() == [3, 0, 4, 0] and entry.tolist() == [0x30, 0, 0x40, 0]
    assert pwc.lookup_deepest(1, 5, a, 3)[0].tolist() == [3]
    pwc.fill(1, 5, a, 2, 0x20)
    assert pwc.lookup_deepest(1, 5, a ^ 0x1F_F000, 4)[0].tolist() == [2]  # same 2M region
    # a range in another 2M region of the same 1G region drops level 3 and 4, not 2
    assert pwc.inv_range(1, 5, a ^ (1 << 21), 0) == 2
    assert pwc.lookup(1, 5, a, [2, 3, 4])[0].tolist() == [True, False, False]
    assert pwc.inv_range(1, 6, a, 0) == 0 and pwc.inv_range(1, None, a, 0) == 1


def test_pwc_sl_ignores_pasid_and_invalidations_are_scoped():
    """Second-level entries are shared by every PASID; DID scopes everything."""
    pwc = PagingStructureCache(64, 4, "sl")
    pwc.fill([1, 2], 7, 0x4000_0000, 3, [0xA, 0xB])
    assert pwc.lookup([1, 2], 9, 0x4000_0000, 3)[0].all()
    assert pwc.inv_domain(2) == 1
    assert pwc.lookup([1, 2], 0, 0x4000_0000, 3)[0].tolist() == [True, False]
    with pytest.raises(CacheError):
        pwc.inv_pasid(1, 0)
    assert pwc.inv_global() == 1


# --- PASID and context caches ----------------------------------------------------------------
def test_pasid_cache_invalidations():
    """0x7 global/domain/PASID granularities and device-selective drop only their scope."""
    pc = PasidCache(64, 4)
    words = np.arange(8, dtype=np.uint64)
    sids, pasids, dids = [0x10, 0x10, 0x10, 0x18], [1, 2, 3, 1], [7, 7, 8, 7]
    pc.fill(sids, pasids, dids, words)
    hit, did, w = pc.lookup([0x10, 0x18, 0x11], [2, 1, 2])
    assert hit.tolist() == [True, True, False] and did.tolist() == [7, 7, 0]
    assert (w[0] == words).all() and (w[2] == 0).all()
    assert pc.inv_pasid(7, 1) == 2        # (0x10, 1) and (0x18, 1)
    assert pc.inv_domain(8) == 1          # (0x10, 3)
    assert pc.inv_sid(0x18) == 0
    assert pc.lookup(0x10, 2)[0].all()
    assert pc.inv_sid(0x10) == 1 and pc.cache.occupancy() == 0
    pc.fill(1, 1, 1, words)
    assert pc.inv_global() == 1


@pytest.mark.parametrize(("fm", "dropped"), [
    (0, {0x11}), (1, {0x11, 0x15}), (2, {0x11, 0x13, 0x15, 0x17}),
    (3, {0x10, 0x11, 0x13, 0x15, 0x17}),
])
def test_context_device_invalidation_function_mask(fm, dropped):
    """FM 0/1/2/3 ignore no bit, bit 2, bits 2:1, bits 2:0 of the function (QEMU, spec)."""
    cc = ContextCache(32, 4)
    sids = [0x10, 0x11, 0x13, 0x15, 0x17, 0x19, 0x111]  # 0x19: other device, 0x111: bus 1
    cc.fill(sids, 3, np.array([1, 2, 3, 4], dtype=np.uint64))
    assert cc.inv_device(0x11, fm) == len(dropped)
    assert {e[0] for e in cc.cache.contents()} == set(sids) - dropped
    assert cc.lookup(0x19)[2].tolist() == [[1, 2, 3, 4]]
    assert cc.inv_domain(3) == len(sids) - len(dropped)


def test_device_tlb_inv_scope():
    """0x3 drops every PASID of the device in range; 0x8 one PASID; other devices survive."""
    dt = DeviceTLB(64, 4)
    dt.fill([0x100, 0x100, 0x100, 0x200], [0, 5, 5, 5], [0, 0, 0x3000, 0], 0,
            [0x10000, 0x20000, 0x30000, 0x40000], 3)
    assert dt.inv(0x100, 5, 0, 4096) == 1
    assert dt.lookup([0x100, 0x100, 0x100, 0x200], [0, 5, 5, 5], [0, 0, 0x3000, 0])[
        0].tolist() == [True, False, True, True]
    assert dt.inv(0x100, None, 0, 1 << 64) == 2
    assert dt.cache.contents() == [(0x200, 5, 0, 0, 0x40000, 3)]


# --- bad input ---------------------------------------------------------------------------------
def test_bad_input_is_a_named_error():
    """Invalid geometry and arguments raise ValueError / CacheError, never something else."""
    with pytest.raises(ValueError):
        SetAssocCache(10, 4, ("a",), {"v": np.dtype(np.uint8)})
    tlb = IOTLB(16, 4)
    bad = [
        lambda: tlb.fill(-1, 0, 0, 0, 0, 1, 2),                 # negative DID
        lambda: tlb.fill(1, 0, 0, 3, 0, 1, 2),                  # no 512G pages
        lambda: tlb.fill(1, 0, 0, 1, 0x1000, 1, 2),             # misaligned 2M page
        lambda: tlb.fill(1, 0, 0, 0, 0x1000, 4, 2),             # unknown perm bit
        lambda: tlb.fill(1, 0, 0, 0, 0x1000, 1, 7),             # PGTT 7
        lambda: tlb.lookup([1, 2], 0, [0, 1, 2]),               # ragged batch
        lambda: tlb.inv_page(1, 0, 64),                         # AM beyond 63
        lambda: tlb.inv_domain(-3),
        lambda: PagingStructureCache(8, 2, "l3"),
        lambda: PagingStructureCache(8, 2, "fl").lookup(1, 1, 0, 1),
        lambda: ContextCache(8, 2).inv_device(1, 4),
        lambda: PasidCache(8, 2).fill(1, 1, 1, np.zeros(4, dtype=np.uint64)),
        lambda: DeviceTLB(8, 2).inv(1, None, 0, 0),
    ]
    for call in bad:
        with pytest.raises(CacheError):
            call()
    assert tlb.cache.occupancy() == 0
