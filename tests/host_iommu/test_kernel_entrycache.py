"""The compiled context- and PASID-caches (host_iommu/entrycache.py over
host_iommu/kernels/entrycache.py) against the plain-int caches they replaced, step by step.

``PlainSetAssoc`` below is that earlier implementation as it was (lines of Python lists, one
request at a time), sharing nothing with the kernels but the set-placement multiplier. Random
scripts of look-ups, fills and every invalidation run on both; after every step the answers
(the very objects cached), every line with its set, way, DID and stamp, the clock and the
counters agree.

The compiled context stage (kernels.entrycache.contexts_hit, which HostIommu._contexts runs
when every distinct (sid, pasid) of a batch hits both caches) against the Python context
stage on a copy of the host: the same batches (hits, misses, FPD from the context or the
PASID entry, a cached decoded fault, malformed ids) give the same per-request answers, and
the same cache lines, stamps, counters, translations, statistics and fault log.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import iommu as iommu_mod
from host_iommu.defs import MAX_PASID, PAGE_SIZE, PGTT_PT, FaultReason
from host_iommu.entrycache import ContextEntryCache, PasidEntryCache
from host_iommu.iotlb import CC_FM_SID_MASK, SET_MIX, CacheError
from host_iommu.kernels.entrycache import MAX_KEYS, contexts_hit
from host_iommu.kernels.translate import R_CTX, R_CTX_REFS, R_DID, R_DTE, R_FAULT, R_FPD
from host_iommu.pasid import PasidEntry
from host_iommu.qi import QI_CC_GRAN_DEVICE, QI_PC_ALL_PASIDS
from tests.host_iommu.conftest import DATA_GPA, IOVA, SID
from tests.host_iommu.test_kernel_translate import ATS_SID, compare, make_host

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


# --- the compiled context stage (kernels.entrycache.contexts_hit) against Python ---------

FPD_SID = 0x118          # attached with FPD set in its context entry


def context_host(ctx_geom: tuple[int, int], pasid_geom: tuple[int, int]):
    """test_kernel_translate's host (nested, second-level-only and pass-through PASIDs, an
    ATS device, unbound PASIDs) with small context/PASID caches, an FPD device and an FPD
    PASID entry; a PASID-cache line holding a decoded fault (the Python path's hit on a
    FaultReason)."""
    h = make_host(32, True)
    c = h.caches
    c.ctxc, c.pasidc = ContextEntryCache(*ctx_geom), PasidEntryCache(*pasid_geom)
    vm = next(iter(h.vms))
    h.attach_device(FPD_SID, vm)
    h.set_pasid_entry(FPD_SID, 0, PasidEntry(pgtt=PGTT_PT, did=h.alloc_did()))
    h.set_pasid_entry(FPD_SID, 0, PasidEntry(pgtt=PGTT_PT, did=7))
    h.set_pasid_entry(FPD_SID, 1, PasidEntry(pgtt=PGTT_PT, did=7, fpd=True))
    h.attach_device(FPD_SID + 1, vm, fpd=True)
    h.set_pasid_entry(FPD_SID + 1, 0, PasidEntry(pgtt=PGTT_PT, did=8))
    c.ctxc.fill(ATS_SID, c.ctxc.lookup(ATS_SID) or h.sm.fetch_context(ATS_SID)[0])
    c.pasidc.fill(ATS_SID, 5, 9, FaultReason.PASID_ENTRY_RSVD)
    return h


# (sid, pasid) a context stage can cache (the FaultReason line while it is not invalidated)
CACHEABLE = np.array([(SID, 0), (ATS_SID, 0), (FPD_SID, 1), (FPD_SID + 1, 0), (SID, 1),
                      (SID, 2), (SID, 3), (FPD_SID, 0), (ATS_SID, 5)], np.int64)


def context_batch(rng: np.random.Generator, n: int, spread: int):
    """``spread`` 1-9: requests of the first ``spread`` cacheable keys (all hit on a
    replay unless evicted); 10-16: also unattached, unbound and malformed ids."""
    if spread <= len(CACHEABLE):
        sid, pasid = CACHEABLE[rng.integers(0, spread, n)].T.copy()
    else:
        sids = np.array([SID, ATS_SID, FPD_SID, FPD_SID + 1, 0x110, 0x1_0000 + 3, -1])
        p = np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
        spread -= len(CACHEABLE)
        sid = sids[rng.choice(spread, n, p=p[:spread] / p[:spread].sum())]
        pasid = rng.choice(np.array([0, 0, 0, 1, 2, 3, 5, MAX_PASID + 1, -4], np.int64), n)
    page = rng.integers(0, 48, n).astype(np.uint64)
    addr = np.where(pasid == 2, DATA_GPA, IOVA).astype(np.uint64) + page * np.uint64(PAGE_SIZE)
    return sid, pasid, addr, rng.integers(1, 3, n).astype(np.uint8), np.arange(n) * 10


def python_contexts(h, sid, pasid):
    """HostIommu._contexts with the kernel declining every batch (today's Python path)."""
    with mock.patch.object(iommu_mod, "contexts_hit", lambda *a: -1):
        return h._contexts(sid, pasid)


def assert_same_contexts(a, b) -> None:
    """Per request: every req column but the row, and the row's walk inputs."""
    ra, rb = a.req, b.req
    cols = [R_FAULT, R_DID, R_DTE, R_CTX_REFS, R_FPD]
    assert np.array_equal(ra[:, cols], rb[:, cols])
    assert np.array_equal(a.ctx[ra[:, R_CTX]], b.ctx[rb[:, R_CTX]])


def run_contexts(seed: int, ctx_geom, pasid_geom, sizes: list[int]) -> tuple[int, int]:
    """Both copies see the same batches (each twice; ``sizes`` in pairs) and invalidations;
    ``a`` runs the kernel when it accepts, ``b`` always Python. Returns (batches the kernel
    took, batches it declined)."""
    a = context_host(ctx_geom, pasid_geom)
    b = copy.deepcopy(a)
    rng = np.random.default_rng(seed)
    took = [0, 0]
    real = iommu_mod.contexts_hit

    def counting(*args):
        rows = real(*args)
        took[rows < 0] += 1
        return rows

    for i, n in enumerate(sizes):
        # each batch twice: the second time its keys are cached unless the first evicted them
        if i % 2 == 0:
            sid, pasid, addr, access, t = context_batch(rng, n, 1 + i // 2 % 16)
        with mock.patch.object(iommu_mod, "contexts_hit", counting):
            ca = a._contexts(sid, pasid)
            assert_same_contexts(ca, python_contexts(b, sid, pasid))
            compare(a, b)
            ra = a.translate(sid, pasid, addr, access, t)
        with mock.patch.object(iommu_mod, "contexts_hit", lambda *x: -1):
            rb = b.translate(sid, pasid, addr, access, t)
        assert np.array_equal(ra, rb)
        compare(a, b)
        kind = int(rng.integers(0, 6)) if i % 2 else 0     # none before a replay
        for h in (a, b):
            if kind == 1:
                h.caches.pasid_cache(QI_PC_ALL_PASIDS, 7, 0)                    # 0x7 DID 7
            elif kind == 2:
                h.caches.context_cache(QI_CC_GRAN_DEVICE, 0, SID, 0)         # 0x1 device
            elif kind == 3:
                h.caches.pasidc.inv_entry(FPD_SID, 1)
    return took[0], took[1]


def test_context_kernel_matches_python_context_stage():
    """Repeated small batches hit (kernel) and new keys or invalidations miss (Python);
    answers, every cache line with its stamp, counters, statistics and faults agree."""
    for geom in ((4, 2), (8, 2)), ((64, 4), (64, 4)):
        took, declined = run_contexts(3, *geom, [1, 1, 2, 2, 3, 3, 9, 9, 20, 20] * 3 + [300] * 4)
        assert took > 5 and declined > 5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       ctx_geom=st.sampled_from([(0, 1), (1, 1), (4, 2), (64, 4)]),
       pasid_geom=st.sampled_from([(0, 1), (2, 1), (8, 2), (64, 4)]),
       sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4).map(
           lambda x: [v for v in x for _ in (0, 1)]))
def test_context_kernel_vs_python_random(seed, ctx_geom, pasid_geom, sizes):
    """Hypothesis: cache geometries (none, one line, thrashing, roomy) and batch sizes."""
    run_contexts(seed, ctx_geom, pasid_geom, sizes)


def test_context_kernel_declines_many_distinct_keys():
    """More than MAX_KEYS distinct (sid, pasid), all cached: the kernel declines and changes
    nothing; MAX_KEYS of them it resolves."""
    h = context_host((4, 2), (256, 4))
    pas = np.arange(10, 11 + MAX_KEYS, dtype=np.int64)
    for p in pas.tolist():
        h.set_pasid_entry(FPD_SID, p, PasidEntry(pgtt=PGTT_PT, did=7))
    sid = np.full(pas.size, FPD_SID, np.int64)
    python_contexts(h, sid, pas)                     # now every key is cached
    c = h.caches
    before = [x.copy() for x in (c.ctxc.st, c.pasidc.st)]
    req, ctx = np.empty((pas.size, 6), np.int64), np.empty((pas.size + 1, 6), np.uint64)
    assert contexts_hit(sid, pas, c.ctxc.st, c.ctxc.vals, c.pasidc.st, c.pasidc.vals,
                        req, ctx) == -1
    assert all(np.array_equal(x, y) for x, y in zip(before, (c.ctxc.st, c.pasidc.st),
                                                   strict=True))
    assert contexts_hit(sid[1:], pas[1:], c.ctxc.st, c.ctxc.vals, c.pasidc.st, c.pasidc.vals,
                        req, ctx) == MAX_KEYS
    assert c.pasidc.hits == MAX_KEYS
