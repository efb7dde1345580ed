"""The compiled context stage with its fetches (kernels.entrycache.contexts_fetch) against
the Python context stage (HostIommu._contexts with _resolve, ScalableModeTables' fetches).

Both run on copies of one host whose context and PASID caches are small (misses, evictions,
LRU order matter) and whose tables are hostile: devices with no root or context entry, a
context entry with reserved bits, without PASIDE, with a PASID directory beyond memory;
PASID-directory entries not present, with reserved bits, pointing beyond memory or with
bit 63 set; PASID-table entries not present, with reserved bits, PGTT/AW/FLPM without a
meaning, FPD on faults, first-level pointers with bit 63 set; PASIDs beyond the directory
(PDTS) and ids outside 16/20 bits. Between batches both copies see the same table changes
(entries torn down, rewritten, corrupted) and invalidations. After every batch: the same
answer per request (fault, DID, ATS, fetches paid, FPD, walk inputs), and the same cache
lines (keys, DIDs, decoded entries, stamps), clocks and counters.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_iommu.defs import MAX_PASID, PGTT_FL_ONLY, PGTT_NESTED, PGTT_PT, PGTT_SL_ONLY
from host_iommu.entrycache import ContextEntryCache, PasidEntryCache
from host_iommu.kernels.entrycache import V_OK, contexts_fetch
from host_iommu.pasid import (
    CE_DTE,
    CE_FPD,
    CE_P,
    CE_PASIDE,
    PASID_PDE_SHIFT,
    PasidEntry,
)
from tests.host_iommu.conftest import SID
from tests.host_iommu.test_kernel_entrycache import (
    FPD_SID,
    assert_same_contexts,
    context_host,
    python_contexts,
)
from tests.host_iommu.test_kernel_translate import ATS_SID

RSVD_SID, NOPASIDE_SID, NOTP_SID, FARDIR_SID = 0x120, 0x121, 0x122, 0x123
NOROOT_SID, UPPER_SID = 0x0700, 0x1A0           # a bus with no root entry, devfn >= 128
SIDS = (SID, ATS_SID, FPD_SID, FPD_SID + 1, RSVD_SID, NOPASIDE_SID, NOTP_SID, FARDIR_SID,
        NOROOT_SID, UPPER_SID, 0x110, 0x1_0000, -1)
PASIDS = (0, 0, 0, 1, 2, 3, 5, 7, 9, 11, 64, 65, 130, 200, 1 << 12, 1 << 15, MAX_PASID,
          MAX_PASID + 1, -4)
M64 = (1 << 64) - 1


def _ce_addr(h, sid: int) -> int:
    return h.sm.context_entry_addr(sid, create=True)


def _pde_addr(h, sid: int, pasid: int) -> int:
    w0 = h.mem.read_u64(_ce_addr(h, sid))
    return (w0 & ~0xFFF & M64) + (pasid >> PASID_PDE_SHIFT) * 8


def hostile_host(ctx_geom: tuple[int, int], pasid_geom: tuple[int, int]):
    """context_host (nested, second-level-only, pass-through PASIDs, an ATS device, FPD in
    context and PASID entries, a cached decoded fault) plus every hostile structure above."""
    h = context_host(ctx_geom, pasid_geom)
    vm = next(iter(h.vms))
    for sid in (RSVD_SID, NOPASIDE_SID, NOTP_SID, FARDIR_SID, UPPER_SID):
        h.attach_device(sid, vm, ats=sid == UPPER_SID)
        h.set_pasid_entry(sid, 0, PasidEntry(pgtt=PGTT_PT, did=11))
    w = h.mem.write_u64
    a = _ce_addr(h, RSVD_SID)
    w(a, h.mem.read_u64(a) | 0x20)                        # a reserved bit (8:5)
    a = _ce_addr(h, NOPASIDE_SID)
    w(a, h.mem.read_u64(a) & ~CE_PASIDE)
    a = _ce_addr(h, NOTP_SID)
    w(a, h.mem.read_u64(a) & ~CE_P)
    a = _ce_addr(h, FARDIR_SID)                           # directory far beyond memory
    w(a, (1 << 63) | (7 << 9) | CE_PASIDE | CE_DTE | CE_FPD | CE_P)
    sm = h.sm
    raw = {
        5: [0x1 | (5 << 6) | (2 << 2)],                   # PGTT 5: no meaning
        7: [0x1 | (PGTT_SL_ONLY << 6) | (0 << 2) | 0x2],   # SL-only, AW 0, FPD
        9: [0x1 | (PGTT_NESTED << 6) | (2 << 2), 0, 2 << 2],   # FLPM 2
        11: [0x1 | (PGTT_PT << 6), 9, 0, 1],               # w3 non-zero
        65: [0x2],                                          # not present, FPD
        130: [0x1 | (PGTT_FL_ONLY << 6) | 0x400, 3],        # reserved w0 bit 10
        200: [0x1 | (PGTT_FL_ONLY << 6) | 0x200, 12 | (1 << 24),
              (1 << 63) | 0x1000 | (1 << 2) | 0x1],          # flptr bit 63, SRE, PGSNP, 5 lvl
    }
    for p, words in raw.items():
        sm.write_raw_pasid_entry(FPD_SID, p, words + [0] * (8 - len(words)))
    sm.write_raw_pasid_entry(SID, 64, [0x1 | (PGTT_PT << 6), 4] + [0] * 6)
    w(_pde_addr(h, SID, 64), h.mem.read_u64(_pde_addr(h, SID, 64)) | 0x10)   # PDE reserved
    w(_pde_addr(h, FPD_SID, 1 << 12), (h.mem.frames + 3) << 12 | 0x3)   # table beyond memory
    w(_pde_addr(h, ATS_SID, 1 << 12), (1 << 63) | 0x1001)                 # pointer bit 63
    return h


def cache_view(h) -> list:
    c = h.caches
    return [repr((ec.lines, ec.clock, ec.counters())) for ec in (c.ctxc, c.pasidc)]


def fetch(h, sid: np.ndarray, pasid: np.ndarray):
    """contexts_fetch on the host's caches and memory, as the epoch kernel calls it."""
    c, n = h.caches, sid.size
    req, ctx = np.empty((n, 6), np.int64), np.empty((n + 1, 6), np.uint64)
    rows = contexts_fetch(sid, pasid, c.ctxc.st, c.ctxc.vals, c.pasidc.st, c.pasidc.vals,
                          h.mem.slab, h.mem.slot_of, h.sm.rtaddr, req, ctx)
    return rows, req, ctx


class _Cx:
    def __init__(self, req, ctx):
        self.req, self.ctx = req, ctx


def mutate(h, kind: int) -> None:
    """One table change or invalidation (the same on both copies)."""
    sm, c = h.sm, h.caches
    if kind == 1:
        sm.clear_pasid_entry(SID, 0)                       # torn down, caches stale
    elif kind == 2:
        sm.clear_pasid_entry(ATS_SID, 0)
        c.pasidc.inv_entry(ATS_SID, 0)
    elif kind == 3:
        h.set_pasid_entry(SID, 0, PasidEntry(pgtt=PGTT_PT, did=21, fpd=True))
    elif kind == 4:
        c.ctxc.inv_global()
        c.pasidc.inv_global()
    elif kind == 5:
        a = _ce_addr(h, FPD_SID + 1)                       # context entry gone, cache stale
        h.mem.write_u64(a, 0)
    elif kind == 6:
        c.ctxc.inv_device(FPD_SID + 1, 0)
        c.pasidc.inv_sid(FPD_SID + 1)
    elif kind == 7:
        sm.write_raw_pasid_entry(FPD_SID, 1, [0x1 | (7 << 6)] + [0] * 7)
    elif kind == 8:
        c.pasidc.inv_domain(7)


def run(seed: int, ctx_geom, pasid_geom, sizes: list[int], kinds: list[int]) -> int:
    """Both copies: ``a`` on contexts_fetch, ``b`` on the Python stage; returns the
    number of batches the kernel resolved (the others it declined, changing nothing)."""
    a = hostile_host(ctx_geom, pasid_geom)
    b = copy.deepcopy(a)
    rng = np.random.default_rng(seed)
    took = 0
    for i, n in enumerate(sizes):
        if i % 2 == 0:
            sid = np.array(SIDS, np.int64)[rng.integers(0, len(SIDS), n)]
            pasid = np.array(PASIDS, np.int64)[rng.integers(0, len(PASIDS), n)]
        before = cache_view(a)
        rows, req, ctx = fetch(a, sid, pasid)
        if rows < 0:      # declined (a line Python filled with an object): nothing changed
            assert cache_view(a) == before
            python_contexts(a, sid, pasid)
            python_contexts(b, sid, pasid)
        else:
            took += 1
            assert_same_contexts(_Cx(req, ctx), python_contexts(b, sid, pasid))
        assert cache_view(a) == cache_view(b)
        for h in (a, b):
            mutate(h, kinds[i % len(kinds)])
    assert cache_view(a) == cache_view(b)
    return took


def test_fetch_matches_python_on_hostile_tables():
    """Small, thrashing and roomy caches, batches of 1 to 300 requests, each table change."""
    for ctx_geom, pasid_geom in (((2, 1), (4, 2)), ((4, 2), (8, 2)), ((64, 4), (64, 4)),
                                 ((0, 1), (0, 1))):
        took = run(5, ctx_geom, pasid_geom, [1, 1, 3, 3, 8, 8, 40, 40, 300, 300] * 3,
                   list(range(9)))
        assert took >= 20


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1),
       ctx_geom=st.sampled_from([(0, 1), (1, 1), (2, 1), (4, 2), (64, 4)]),
       pasid_geom=st.sampled_from([(0, 1), (2, 1), (8, 2), (16, 4), (64, 4)]),
       sizes=st.lists(st.integers(1, 80), min_size=1, max_size=6).map(
           lambda x: [v for v in x for _ in (0, 1)]),
       kinds=st.lists(st.integers(0, 8), min_size=1, max_size=6))
def test_fetch_vs_python_random(seed, ctx_geom, pasid_geom, sizes, kinds):
    """Hypothesis: cache geometries, batch sizes and the order of table changes."""
    run(seed, ctx_geom, pasid_geom, sizes, kinds)


def test_fetch_declines_a_line_python_filled_with_an_object():
    """A context-cache line holding an object with no numeric form (V_OK 0): the kernel
    declines the batch naming its key and changes nothing; without that key it resolves."""
    h = hostile_host((4, 2), (8, 2))
    h.caches.ctxc.fill(SID, ("context", 1))
    assert h.caches.ctxc.lookup(SID) == ("context", 1)
    before = cache_view(h)
    assert fetch(h, np.array([ATS_SID, SID], np.int64), np.zeros(2, np.int64))[0] == -1
    assert cache_view(h) == before
    assert fetch(h, np.array([ATS_SID], np.int64), np.zeros(1, np.int64))[0] == 1


def test_kernel_filled_lines_decode_as_python_fills():
    """The decoded entries a kernel fill leaves (built from the line's numbers on first
    use) equal those the Python fill decodes from the entry's words, pointers with bit 63
    set, SRE and PGSNP included; a Python look-up of such a line answers that entry."""
    a = hostile_host((64, 4), (64, 4))
    b = copy.deepcopy(a)
    sid = np.array([FPD_SID, FPD_SID, SID, ATS_SID, UPPER_SID], np.int64)
    pasid = np.array([200, 0, 2, 0, 0], np.int64)
    assert fetch(a, sid, pasid)[0] == 5
    python_contexts(b, sid, pasid)
    assert cache_view(a) == cache_view(b)
    e = a.caches.pasidc.lookup(FPD_SID, 200)
    assert isinstance(e, PasidEntry) and e.flptr >> 63 and e.sre and e.pgsnp
    assert e == b.caches.pasidc.lookup(FPD_SID, 200)
    assert a.caches.ctxc.lookup(UPPER_SID) == b.caches.ctxc.lookup(UPPER_SID)
    assert cache_view(a) == cache_view(b)


def test_new_caches_hold_numeric_lines():
    """Python fills of entries with 64-bit pointers keep a numeric form (V_OK)."""
    c = PasidEntryCache(4, 2)
    c.fill(1, 2, 3, PasidEntry(pgtt=PGTT_FL_ONLY, did=3, flptr=(1 << 63) | 0x1000))
    assert c.vals[:, V_OK].sum() == 1
    k = ContextEntryCache(4, 2)
    k.fill(1, ("not", "an entry"))
    assert k.vals[:, V_OK].sum() == 0
