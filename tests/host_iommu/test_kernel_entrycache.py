"""The compiled context- and PASID-caches (host_iommu/entrycache.py over
host_iommu/kernels/entrycache.py) against the plain-int caches they replaced, step by step.

``PlainSetAssoc`` below is that earlier implementation as it was (lines of Python lists, one
request at a time), sharing nothing with the kernels but the set-placement multiplier. Random
scripts of look-ups, fills and every invalidation run on both; after every step the answers
(the very objects cached), every line with its set, way, DID and stamp, the clock and the
counters agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.entrycache import ContextEntryCache, PasidEntryCache
from host_iommu.iotlb import CC_FM_SID_MASK, SET_MIX, CacheError

M64 = (1 << 64) - 1


class PlainSetAssoc:
    """Lines ``[key tuple, did, value, stamp]`` per set, ``ways`` slots each (None: free)."""

    def __init__(self, entries: int, ways: int) -> None:
        self.ways, self.sets = ways, entries // ways
        self.lines: list[list[list | None]] = [[None] * ways for _ in range(self.sets)]
        self.clock = 0
        self.hits = self.misses = self.fills = self.evictions = self.invalidated = 0

    def set_index(self, key: tuple[int, ...]) -> int:
        h = 0
        for k in key:
            h = ((h ^ k) * SET_MIX) & M64
            h ^= h >> 32
        return h % self.sets

    def lookup(self, key: tuple[int, ...]) -> Any:
        clock = self.clock
        self.clock = clock + 1
        if self.sets:
            for line in self.lines[self.set_index(key)]:
                if line is not None and line[0] == key:
                    line[3] = clock
                    self.hits += 1
                    return line[2]
        self.misses += 1
        return None

    def fill(self, key: tuple[int, ...], did: int, value: Any) -> None:
        clock = self.clock
        self.clock = clock + 1
        if not self.sets:
            return
        self.fills += 1
        ways = self.lines[self.set_index(key)]
        way = next((w for w, line in enumerate(ways) if line is not None and line[0] == key),
                   -1)
        if way < 0:
            way = next((w for w, line in enumerate(ways) if line is None), -1)
        if way < 0:
            way = min(range(self.ways), key=lambda j: ways[j][3])
            self.evictions += 1
        ways[way] = [key, did, value, clock]

    def invalidate(self, pred: Callable[[tuple[int, ...], int], bool]) -> int:
        dropped = 0
        for ways in self.lines:
            for w, line in enumerate(ways):
                if line is not None and pred(line[0], line[1]):
                    ways[w] = None
                    dropped += 1
        self.invalidated += dropped
        return dropped

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "fills": self.fills,
                "evictions": self.evictions, "invalidated": self.invalidated}


def check(fast, plain: PlainSetAssoc) -> None:
    assert fast.cache.lines == plain.lines
    assert fast.cache.clock == plain.clock
    assert fast.cache.counters() == plain.counters()


GEOMETRIES = st.sampled_from([(0, 1), (0, 4), (4, 4), (8, 4), (12, 4), (64, 4), (16, 1),
                              (6, 2), (9, 3), (16, 16)])
# Few keys so sets collide, plus the widest a source-id, PASID and DID can be.
SIDS = st.one_of(st.integers(0, 5), st.sampled_from([0xFF, 0x100, 0x107, 0xFFFF]))
PASIDS = st.one_of(st.integers(0, 4), st.just((1 << 20) - 1))
DIDS = st.one_of(st.integers(0, 3), st.just(0xFFFF))
VALUES = [object() for _ in range(8)]   # compared by identity: the cached object comes back


@settings(max_examples=200, deadline=None)
@given(GEOMETRIES, st.lists(st.tuples(
    st.sampled_from(["lookup", "lookup", "fill", "fill", "fill", "global", "domain", "pasid",
                     "sid", "entry"]),
    SIDS, PASIDS, DIDS, st.integers(0, len(VALUES) - 1)), max_size=80))
def test_pasid_cache_kernel_matches_plain_cache(geom, steps):
    """PasidEntryCache: placement, LRU, replacement, eviction and the 0x7/0x1 selections."""
    fast, plain = PasidEntryCache(*geom), PlainSetAssoc(*geom)
    for op, sid, pasid, did, v in steps:
        if op == "lookup":
            assert fast.lookup(sid, pasid) is plain.lookup((sid, pasid))
        elif op == "fill":
            fast.fill(sid, pasid, did, VALUES[v])
            plain.fill((sid, pasid), did, VALUES[v])
        elif op == "global":
            assert fast.inv_global() == plain.invalidate(lambda k, d: True)
        elif op == "domain":
            assert fast.inv_domain(did) == plain.invalidate(lambda k, d, x=did: d == x)
        elif op == "pasid":
            assert fast.inv_pasid(did, pasid) == plain.invalidate(
                lambda k, d, x=did, p=pasid: d == x and k[1] == p)
        elif op == "sid":
            assert fast.inv_sid(sid) == plain.invalidate(lambda k, d, s=sid: k[0] == s)
        else:
            assert fast.inv_entry(sid, pasid) == plain.invalidate(
                lambda k, d, key=(sid, pasid): k == key)
        check(fast, plain)


@settings(max_examples=200, deadline=None)
@given(GEOMETRIES, st.lists(st.tuples(
    st.sampled_from(["lookup", "lookup", "fill", "fill", "global", "domain", "device"]),
    st.one_of(st.integers(0, 23), SIDS), st.integers(0, 3), DIDS,
    st.integers(0, len(VALUES) - 1)), max_size=80))
def test_context_cache_kernel_matches_plain_cache(geom, steps):
    """ContextEntryCache: the same, with device-selective 0x1 under every function mask."""
    fast, plain = ContextEntryCache(*geom), PlainSetAssoc(*geom)
    for op, sid, fm, did, v in steps:
        if op == "lookup":
            assert fast.lookup(sid) is plain.lookup((sid,))
        elif op == "fill":
            fast.fill(sid, VALUES[v])
            plain.fill((sid,), 0, VALUES[v])
        elif op == "global":
            assert fast.inv_global() == plain.invalidate(lambda k, d: True)
        elif op == "domain":
            assert fast.inv_domain(did) == plain.invalidate(lambda k, d, x=did: d == x)
        else:
            keep = ~CC_FM_SID_MASK[fm] & 0xFFFF
            assert fast.inv_device(sid, fm) == plain.invalidate(
                lambda k, d, s=sid, m=keep: (k[0] & m) == (s & m))
        check(fast, plain)


def test_one_set_thrash_keeps_exact_lru():
    """Keys of one 4-way set re-touched in a fixed pattern: the same victims, hits, stamps."""
    fast, plain = PasidEntryCache(4, 4), PlainSetAssoc(4, 4)
    for i in range(400):
        k = (i * 7) % 9 if i % 3 else (i // 3 * 5) % 9
        if i % 3:
            assert fast.lookup(1, k) is plain.lookup((1, k))
        else:
            fast.fill(1, k, k % 2, VALUES[k % 8])
            plain.fill((1, k), k % 2, VALUES[k % 8])
        check(fast, plain)
    assert plain.evictions > 50 and plain.hits > 50


def test_invalidation_arguments_beyond_64_bits_are_refused():
    """An invalidation field outside [0, 2^64) is a CacheError; the state is unchanged."""
    pc = PasidEntryCache(8, 2)
    pc.fill(1, 2, 3, VALUES[0])
    for call in (lambda: pc.inv_domain(-1), lambda: pc.inv_pasid(3, 1 << 64),
                 lambda: pc.inv_sid(True), lambda: ContextEntryCache(8, 2).inv_device(1, 7)):
        with pytest.raises(CacheError):
            call()
    assert pc.inv_domain(M64) == 0 and pc.lookup(1, 2) is VALUES[0]
