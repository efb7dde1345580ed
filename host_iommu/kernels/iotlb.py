"""IOTLB lookup, fill and invalidation: numba kernels over struct-of-arrays state (VT-d 6.2.3).

The same cache as host_iommu/iotlb.py's IOTLB (set-associative, LRU within a set, entries
tagged (DID, PASID, page number at the entry's size, size)), with the batch semantics of
host_iommu/reference_cache.py: a lookup batch sees the cache as it was at the batch's start
and stamps its hits in request order; a fill batch is applied in request order, replacing a
matching line, else the lowest free way, else the least recently used way; invalidations drop
the lines the descriptor selects (spec 6.5.2.3 IOTLB, 6.5.2.4 PASID-based IOTLB: 0x2 acts on
second-level-only and pass-through entries by address and on every first-level and nested
entry of the domain; 0x6 on first-level and nested entries of the PASID). Only the set-index
multiplier (a number) is shared with iotlb.py. It is HostIommu's live IOTLB (iommu.py
CacheSet, and the translate kernel, host_iommu/kernels/translate.py); whole runs are compared
with the reference engine by tests/system/test_fast_vs_reference.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import ArrayLike

from host_iommu.defs import PGTT_FL_ONLY, PGTT_NESTED, PGTT_PT, PGTT_SL_ONLY
from host_iommu.iotlb import SET_MIX

# --- State: one uint64 plane per field, each (sets, ways) ------------------------------------
F_VALID, F_DID, F_PASID, F_VPN, F_ORDER, F_HPA, F_PERM, F_PGTT, F_STAMP = range(9)
LINE_FIELDS = ("valid", "did", "pasid", "vpn_at_order", "order", "hpa_page", "perm", "pgtt",
               "stamp")
# Counters: the LRU clock, then hits, misses, fills, evictions, invalidated (RefSetAssoc order).
C_CLOCK, C_HITS, C_MISSES, C_FILLS, C_EVICTIONS, C_INVALIDATED = range(6)
# After them, where the vector is long enough (IotlbArrays, PwcArrays: COUNTERS), C_IRREG: an
# upper bound on the valid lines a set probe cannot enumerate (PASID != 0, or PGTT first-level
# or nested): every such fill adds one (_fill_line), a full _invalidate scan sets the exact
# count; drops elsewhere (_inv_range, qiq.py _probe_range) leave it high. While it is 0 a
# page-selective invalidation need only visit the sets the range's keys hash to.
C_IRREG = 6
COUNTERS = 7
PAGE_ORDERS = 3      # 4 KiB, 2 MiB, 1 GiB: probed in that order
# Invalidation kinds (_invalidate's ``kind``): descriptor 0x2 global / domain / page-selective,
# descriptor 0x6 all-in-PASID / page-selective-within-PASID.
INV_GLOBAL, INV_DOMAIN, INV_PAGE, INV_PASID, INV_PASID_PAGE = range(5)
MAX_PFN = (1 << 52) - 1


@njit(cache=True)
def _set_index(did: np.uint64, pasid: np.uint64, vpn: np.uint64, order: np.uint64,
               sets: int) -> int:
    """Set of a key: the non-page fields mixed in key order, then the page number XORed.

    (did, pasid, order) is the IOTLB's key order; a PWC key (did, pasid, level) mixes the
    same way with its level in ``order``."""
    mix = np.uint64(SET_MIX)
    sh = np.uint64(32)
    h = np.uint64(0)
    h = (h ^ did) * mix
    h ^= h >> sh
    h = (h ^ pasid) * mix
    h ^= h >> sh
    h = (h ^ order) * mix
    h ^= h >> sh
    h ^= vpn
    return int(h % np.uint64(sets))


@njit(cache=True)
def _find_way(state, s, did, pasid, tag, mixed) -> int:
    """Way of set ``s`` holding the key (did, pasid, tag, mixed), or -1."""
    for w in range(state.shape[2]):
        if (state[F_VALID, s, w] == 1 and state[F_VPN, s, w] == tag
                and state[F_ORDER, s, w] == mixed and state[F_DID, s, w] == did
                and state[F_PASID, s, w] == pasid):
            return w
    return -1


@njit(cache=True)
def _lookup(state, counters, did, pasid, addr, hit, hpa, perm, order, pgtt):
    """Look up a batch of requests; write results into the output arrays.

    state: uint64[9, sets, ways], the line planes (F_*); counters: int64[5] (C_*).
    did, pasid, addr: uint64[n], the requests (addr a byte address).
    hit: bool[n]; hpa: uint64[n] (translated byte address); perm, order, pgtt: uint8[n].
    Spec 6.2.3: a request hits the entry of the smallest page size that holds its page.
    """
    clock = counters[C_CLOCK]
    n = did.shape[0]
    hits = 0
    for i in range(n):
        h, a, p, o, g = _lookup_one(state, did[i], pasid[i], addr[i], clock + i)
        if h:
            hit[i] = True
            hpa[i] = a
            perm[i] = p
            order[i] = o
            pgtt[i] = g
            hits += 1
    counters[C_HITS] += hits
    counters[C_MISSES] += n - hits
    counters[C_CLOCK] = clock + n


@njit(cache=True, inline="always")
def _lookup_one(state, did, pasid, addr, stamp):
    """One request of _lookup (the caller counts and advances the clock): (hit, translated
    address, perm, order, pgtt), the hit line stamped ``stamp``. did, pasid, addr: uint64.
    Stamping at once equals stamping after the batch: stamps never change a lookup."""
    sets = state.shape[1]
    if sets == 0:
        return False, np.uint64(0), np.uint8(0), np.uint8(0), np.uint8(0)
    for o in range(PAGE_ORDERS):
        shift = np.uint64(12 + 9 * o)
        vpn = addr >> shift
        uo = np.uint64(o)
        s = _set_index(did, pasid, vpn, uo, sets)
        way = _find_way(state, s, did, pasid, vpn, uo)
        if way >= 0:
            state[F_STAMP, s, way] = np.uint64(stamp)
            return (True, state[F_HPA, s, way] + (addr & ((np.uint64(1) << shift)
                                                          - np.uint64(1))),
                    np.uint8(state[F_PERM, s, way]), np.uint8(o),
                    np.uint8(state[F_PGTT, s, way]))
    return False, np.uint64(0), np.uint8(0), np.uint8(0), np.uint8(0)


@njit(cache=True)
def _fill(state, counters, did, pasid, addr, order, hpa_page, perm, pgtt):
    """Fill a batch of translations in request order.

    state, counters: as in _lookup. did, pasid, addr, order, hpa_page, perm, pgtt: uint64[n];
    the entry is tagged by addr's page number at its ``order`` (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
    """
    tag = np.empty_like(addr)
    for i in range(addr.shape[0]):
        tag[i] = addr[i] >> (np.uint64(12) + np.uint64(9) * order[i])
    _fill_keyed(state, counters, did, pasid, tag, order, hpa_page, perm, pgtt)


@njit(cache=True, inline="always")
def _irregular(pasid, pgtt) -> bool:
    """A line a page-selective set probe cannot find by its key: PASID != 0 (the probe
    hashes PASID 0), or first-level / nested (INV_PAGE drops those at any address)."""
    return pasid != 0 or pgtt in (PGTT_FL_ONLY, PGTT_NESTED)


@njit(cache=True)
def _fill_line(state, counters, did, pasid, tag, mixed, v0, v1, v2, stamp):
    """One fill of _fill_keyed (the caller advances the clock): the line of the key
    (did, pasid, tag, mixed) replaced, else the lowest free way, else the oldest stamp (the
    first of equals) evicted; stamped ``stamp``. A cache with no sets counts nothing."""
    sets = state.shape[1]
    if sets == 0:
        return
    ways = state.shape[2]
    counters[C_FILLS] += 1
    s = _set_index(did, pasid, tag, mixed, sets)
    way = _find_way(state, s, did, pasid, tag, mixed)
    if way < 0:
        for w in range(ways):
            if state[F_VALID, s, w] == 0:
                way = w
                break
    if way < 0:
        way = 0
        for w in range(1, ways):
            if state[F_STAMP, s, w] < state[F_STAMP, s, way]:
                way = w
        counters[C_EVICTIONS] += 1
    if counters.shape[0] > C_IRREG and _irregular(pasid, v2):
        counters[C_IRREG] += 1
    state[F_VALID, s, way] = 1
    state[F_DID, s, way] = did
    state[F_PASID, s, way] = pasid
    state[F_VPN, s, way] = tag
    state[F_ORDER, s, way] = mixed
    state[F_HPA, s, way] = v0
    state[F_PERM, s, way] = v1
    state[F_PGTT, s, way] = v2
    state[F_STAMP, s, way] = np.uint64(stamp)


@njit(cache=True)
def _fill_keyed(state, counters, did, pasid, tag, mixed, v0, v1, v2):
    """Fill lines keyed (did, pasid, tag, mixed) with values (v0, v1, v2), in request order.

    state, counters: as in _lookup; every argument after them is uint64[n]. ``tag`` is the
    page field (F_VPN), XORed into the set index; ``mixed`` (F_ORDER: the page order, or a
    PWC entry's level) is mixed into it with did and pasid. A line with the same key is
    replaced; otherwise the lowest-numbered free way, otherwise the way with the oldest
    stamp (the first of equals) is evicted.
    """
    clock = counters[C_CLOCK]
    n = did.shape[0]
    for i in range(n):
        _fill_line(state, counters, did[i], pasid[i], tag[i], mixed[i], v0[i], v1[i], v2[i],
                   clock + i)
    counters[C_CLOCK] = clock + n


@njit(cache=True)
def _invalidate(state, counters, kind, did, pasid, lo, hi):
    """Drop the lines one invalidation selects; returns how many were dropped.

    state, counters: as in _lookup. kind: INV_*; did, pasid: the descriptor's fields; lo, hi:
    first and last 4-KiB page of the address range (page-selective kinds only). A line covers
    pages [vpn << 9*order, (vpn + 1) << 9*order); it meets the range if any of those is in it.
    The same lines and counters as _invalidate_scan: a page-selective 0x2 (INV_PAGE) while
    no line is irregular (C_IRREG 0: every line PASID 0, none first-level or nested) visits
    only the sets of the range's keys (_probe_page); otherwise every line is scanned (the
    predicate of _invalidate_scan, the reference), and the scan sets C_IRREG to the
    irregular lines it leaves.
    """
    if kind == INV_PAGE and counters.shape[0] > C_IRREG and counters[C_IRREG] == 0:
        dropped = _probe_page(state, counters, did, lo, hi)
        if dropped >= 0:
            return dropped
    sets = state.shape[1]
    ways = state.shape[2]
    dropped = 0
    left = 0                 # irregular lines kept
    nine = np.uint64(9)
    one = np.uint64(1)
    for s in range(sets):
        for w in range(ways):
            if state[F_VALID, s, w] == 0:
                continue
            g = state[F_PGTT, s, w]
            first_level = g in (PGTT_FL_ONLY, PGTT_NESTED)
            first = state[F_VPN, s, w] << (nine * state[F_ORDER, s, w])
            last = first + ((one << (nine * state[F_ORDER, s, w])) - one)
            meets = first <= hi and last >= lo
            same_did = state[F_DID, s, w] == did
            if kind == INV_GLOBAL:
                drop = True
            elif kind == INV_DOMAIN:
                drop = same_did
            elif kind == INV_PAGE:
                drop = same_did and (first_level or (g in (PGTT_SL_ONLY, PGTT_PT) and meets))
            elif kind == INV_PASID:
                drop = same_did and state[F_PASID, s, w] == pasid and first_level
            else:
                drop = (same_did and state[F_PASID, s, w] == pasid and first_level
                        and meets)
            if drop:
                state[F_VALID, s, w] = 0
                dropped += 1
            elif first_level or state[F_PASID, s, w] != 0:
                left += 1
    counters[C_INVALIDATED] += dropped
    if counters.shape[0] > C_IRREG:
        counters[C_IRREG] = left
    return dropped


@njit(cache=True)
def _probe_page(state, counters, did, lo, hi) -> int:
    """INV_PAGE of ``did`` over pages [lo, hi] when every valid line is PASID 0 and neither
    first-level nor nested: drops the second-level-only and pass-through lines of ``did``
    meeting the range, visiting only the sets _fill_line placed such lines in (the set of
    key (did, 0, tag, order) for each order 0..2 and each tag in [lo >> 9 order, hi >> 9
    order]); returns the count, or -1 (nothing done) when that is at least as many sets as
    the cache has. A set visited twice drops nothing the second time."""
    sets = state.shape[1]
    if sets == 0:
        return 0
    nine = np.uint64(9)
    one = np.uint64(1)
    zero = np.uint64(0)
    probes = 0
    for o in range(PAGE_ORDERS):
        sh = nine * np.uint64(o)
        probes += int((hi >> sh) - (lo >> sh)) + 1
        if probes >= sets:
            return -1
    dropped = 0
    for o in range(PAGE_ORDERS):
        uo = np.uint64(o)
        sh = nine * uo
        for tag in range(int(lo >> sh), int(hi >> sh) + 1):
            s = _set_index(did, zero, np.uint64(tag), uo, sets)
            for w in range(state.shape[2]):
                if state[F_VALID, s, w] == 0 or state[F_DID, s, w] != did:
                    continue
                g = state[F_PGTT, s, w]
                if g not in (PGTT_SL_ONLY, PGTT_PT):
                    continue
                span = nine * state[F_ORDER, s, w]
                first = state[F_VPN, s, w] << span
                last = first + ((one << span) - one)
                if first <= hi and last >= lo:
                    state[F_VALID, s, w] = 0
                    dropped += 1
    counters[C_INVALIDATED] += dropped
    return dropped


@njit(cache=True)
def _invalidate_scan(state, counters, kind, did, pasid, lo, hi):
    """Drop the lines one invalidation selects, scanning every line; returns how many were
    dropped. The reference _invalidate is held to (tests/host_iommu/test_kernel_inv_probe.py).

    state, counters: as in _lookup. kind: INV_*; did, pasid: the descriptor's fields; lo, hi:
    first and last 4-KiB page of the address range (page-selective kinds only). A line covers
    pages [vpn << 9*order, (vpn + 1) << 9*order); it meets the range if any of those is in it.
    """
    sets = state.shape[1]
    ways = state.shape[2]
    dropped = 0
    nine = np.uint64(9)
    one = np.uint64(1)
    for s in range(sets):
        for w in range(ways):
            if state[F_VALID, s, w] == 0:
                continue
            g = state[F_PGTT, s, w]
            first_level = g in (PGTT_FL_ONLY, PGTT_NESTED)
            first = state[F_VPN, s, w] << (nine * state[F_ORDER, s, w])
            last = first + ((one << (nine * state[F_ORDER, s, w])) - one)
            meets = first <= hi and last >= lo
            same_did = state[F_DID, s, w] == did
            if kind == INV_GLOBAL:
                drop = True
            elif kind == INV_DOMAIN:
                drop = same_did
            elif kind == INV_PAGE:
                drop = same_did and (first_level or (g in (PGTT_SL_ONLY, PGTT_PT) and meets))
            elif kind == INV_PASID:
                drop = same_did and state[F_PASID, s, w] == pasid and first_level
            else:
                drop = (same_did and state[F_PASID, s, w] == pasid and first_level
                        and meets)
            if drop:
                state[F_VALID, s, w] = 0
                dropped += 1
    counters[C_INVALIDATED] += dropped
    return dropped


@njit(cache=True)
def _inv_range(state, counters, all_dids, did, any_pasid, pasid, lo, hi, span_base):
    """Drop lines of ``did`` (every DID if all_dids) and ``pasid`` (any if any_pasid) whose
    pages meet [lo, hi] (0..MAX_PFN for a whole-domain or PASID invalidation); returns the
    count. state, counters: as in _lookup. A line covers 2^(9 * (F_ORDER - span_base)) pages
    from ``F_VPN << that``: span_base 0 for leaf lines (order), 1 for PWC lines (level)."""
    dropped = 0
    for s in range(state.shape[1]):
        for w in range(state.shape[2]):
            if state[F_VALID, s, w] == 0:
                continue
            span = np.uint64(9) * (state[F_ORDER, s, w] - span_base)
            first = state[F_VPN, s, w] << span
            last = first + ((np.uint64(1) << span) - np.uint64(1))
            if ((all_dids or state[F_DID, s, w] == did)
                    and (any_pasid or state[F_PASID, s, w] == pasid)
                    and first <= hi and last >= lo):
                state[F_VALID, s, w] = 0
                dropped += 1
    counters[C_INVALIDATED] += dropped
    return dropped


def line_contents(state: np.ndarray, fields: tuple[int, ...], layout: bool
                  ) -> list[tuple[int, ...]]:
    """Valid lines as sorted tuples of ``fields`` (F_*), led by (set, way, stamp) if layout."""
    out = []
    for s, w in zip(*np.nonzero(state[F_VALID] == 1), strict=True):
        head = (int(s), int(w), int(state[F_STAMP, s, w])) if layout else ()
        out.append((*head, *(int(state[f, s, w]) for f in fields)))
    return sorted(out)


def counters_dict(counts: np.ndarray) -> dict[str, int]:
    """The counter vector (C_*) as RefSetAssoc.counters names it."""
    return {"hits": int(counts[C_HITS]), "misses": int(counts[C_MISSES]),
            "fills": int(counts[C_FILLS]), "evictions": int(counts[C_EVICTIONS]),
            "invalidated": int(counts[C_INVALIDATED])}


def _u64(*cols: ArrayLike) -> list[np.ndarray]:
    arrs = [np.atleast_1d(np.asarray(c)) for c in cols]
    if any(a.ndim != 1 or (a.size and int(a.min()) < 0) for a in arrs):
        raise ValueError("IOTLB batch columns must be non-negative scalars or 1-D arrays")
    out = np.broadcast_arrays(*[a.astype(np.uint64) for a in arrs])
    return [np.ascontiguousarray(a) for a in out]


class IotlbArrays:
    """An IOTLB held in arrays, driven by the compiled kernels; the interface of RefIOTLB's
    lookup and fill (see host_iommu/reference_cache.py)."""

    def __init__(self, entries: int, ways: int) -> None:
        if entries < 0 or ways < 1 or entries % ways:
            raise ValueError("entries must be a non-negative multiple of ways")
        self.ways, self.sets = ways, entries // ways
        self.state = np.zeros((len(LINE_FIELDS), self.sets, ways), dtype=np.uint64)
        self.counts = np.zeros(COUNTERS, dtype=np.int64)

    def lookup(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hit, hpa, perm, order, pgtt) per request; zeros where it missed."""
        d, p, a = _u64(did, pasid, addr)
        n = d.size
        hit = np.zeros(n, dtype=bool)
        hpa = np.zeros(n, dtype=np.uint64)
        perm, order, pgtt = (np.zeros(n, dtype=np.uint8) for _ in range(3))
        _lookup(self.state, self.counts, d, p, a, hit, hpa, perm, order, pgtt)
        return hit, hpa, perm, order, pgtt

    def fill(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, order: ArrayLike,
             hpa_page: ArrayLike, perm: ArrayLike, pgtt: ArrayLike) -> None:
        """Cache translations of ``addr`` at page size ``order`` (hpa_page: the page's base)."""
        cols = _u64(did, pasid, addr, order, hpa_page, perm, pgtt)
        if cols[3].size and int(cols[3].max()) >= PAGE_ORDERS:
            raise ValueError("order must be 0 (4 KiB), 1 (2 MiB) or 2 (1 GiB)")
        _fill(self.state, self.counts, *cols)

    # --- invalidation (the interface of host_iommu.iotlb.IOTLB's inv_*) --------------------
    def _inv(self, kind: int, did: int = 0, pasid: int = 0, addr: int = 0, am: int = 0) -> int:
        did, pasid, addr, am = int(did), int(pasid), int(addr), int(am)
        if not (0 <= did <= 0xFFFF and 0 <= pasid < 1 << 20 and 0 <= addr < 1 << 64
                and 0 <= am <= 63):
            raise ValueError(f"invalidation did={did:#x} pasid={pasid:#x} addr={addr:#x} "
                             f"am={am} outside did 0..0xffff, pasid 0..0xfffff, 64 bits, 0..63")
        lo = ((addr >> 12) >> am) << am
        hi = min(lo + (1 << am) - 1, MAX_PFN)
        return int(_invalidate(self.state, self.counts, kind, np.uint64(did), np.uint64(pasid),
                               np.uint64(lo), np.uint64(hi)))

    def inv_global(self) -> int:
        """0x2 global: every entry."""
        return self._inv(INV_GLOBAL)

    def inv_domain(self, did: int) -> int:
        """0x2 domain-selective: every entry of ``did``."""
        return self._inv(INV_DOMAIN, did)

    def inv_page(self, did: int, addr: int, am: int, ih: int = 0) -> int:
        """0x2 page-selective: SL-only/PT entries of ``did`` meeting 2^am pages at ``addr``,
        plus every first-level and nested entry of ``did`` (ih concerns only the PWC)."""
        return self._inv(INV_PAGE, did, 0, addr, am)

    def inv_pasid(self, did: int, pasid: int) -> int:
        """0x6 all-in-PASID: first-level and nested entries of (did, pasid)."""
        return self._inv(INV_PASID, did, pasid)

    def inv_pasid_page(self, did: int, pasid: int, addr: int, am: int, ih: int = 0) -> int:
        """0x6 page-selective within a PASID: its FL/nested entries meeting the range."""
        return self._inv(INV_PASID_PAGE, did, pasid, addr, am)

    def counters(self) -> dict[str, int]:
        return counters_dict(self.counts)

    @property
    def cache(self) -> IotlbArrays:
        """The store itself (iotlb.py's caches keep theirs in ``.cache``: the same reads)."""
        return self

    @property
    def hits(self) -> int:
        return int(self.counts[C_HITS])

    @property
    def misses(self) -> int:
        return int(self.counts[C_MISSES])

    def occupancy(self) -> int:
        """Number of valid lines."""
        return int(np.count_nonzero(self.state[F_VALID]))

    def contents(self, layout: bool = False) -> list[tuple[int, ...]]:
        """Valid lines as ((set, way, stamp,)? did, pasid, vpn_at_order, order, hpa_page,
        perm, pgtt), sorted: RefSetAssoc.contents' format."""
        return line_contents(self.state, (F_DID, F_PASID, F_VPN, F_ORDER, F_HPA, F_PERM,
                                          F_PGTT), layout)
