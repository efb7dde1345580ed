"""Context-cache and PASID-cache look-up, fill and invalidation: numba kernels on one array.

VT-d spec 6.2.1 (context-cache: scalable-mode context entries keyed by source-id) and 6.2.2
(PASID-cache: PASID-table entries keyed (source-id, PASID), tagged with the entry's DID);
invalidation as 6.5.2.1 (descriptor 0x1, device-selective with QEMU
vtd_context_device_invalidate's function mask) and 6.5.2.5 (0x7 global, domain- and
PASID-selective). Placement, LRU and counters as host_iommu/reference_cache.py's RefSetAssoc
for a key without a page field: the set is the key fields mixed with SET_MIX modulo the
sets; a look-up stamps the clock on a hit and advances the clock by one; a fill replaces the
line of the same key, else takes the lowest free way, else evicts the oldest stamp (the first
of equals). The kernels keep only keys, DIDs and stamps; the decoded entry a hit gives is a
Python object the wrapper (host_iommu/entrycache.py) holds per line, indexed by the line
number the kernels return. Tested against the plain-int caches they replaced and RefSetAssoc
(tests/host_iommu/test_kernel_entrycache.py, test_entrycache.py).

State: one int64 array, a header then five planes of ``sets * ways`` lines (line = set *
ways + way), so each call passes a single array:

    st[H_CLOCK .. H_INVALIDATED]   clock, hits, misses, fills, evictions, invalidated
    st[H_SETS], st[H_WAYS]         geometry
    st[H_NKEYS]                    key fields: 1 (sid) or 2 (sid, pasid)
    st[HDR + P * lines + line]     plane P (P_VALID, P_SID, P_PASID, P_DID, P_STAMP)

Keys and DIDs are int64 (source-id 16 bits, PASID 20 bits, DID 16 bits in use); the set hash
mixes their 64-bit patterns as uint64, as RefSetAssoc does on Python ints.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.iotlb import SET_MIX

H_CLOCK, H_HITS, H_MISSES, H_FILLS, H_EVICTIONS, H_INVALIDATED, H_SETS, H_WAYS, H_NKEYS = (
    range(9))
HDR = 9
P_VALID, P_SID, P_PASID, P_DID, P_STAMP = range(5)
PLANES = 5
# Invalidation kinds (_invalidate's ``kind``): every line; every line of a DID; lines of a
# (DID, PASID); lines whose source-id matches under a mask; the line of one (sid, pasid).
INV_ALL, INV_DID, INV_DID_PASID, INV_SID, INV_SID_PASID = range(5)


def new_state(entries: int, ways: int, nkeys: int) -> np.ndarray:
    """A zeroed state (header and planes) for ``entries`` lines of ``ways`` ways."""
    if entries < 0 or ways < 1 or entries % ways:
        raise ValueError(f"entries={entries} must be a non-negative multiple of ways={ways}")
    st = np.zeros(HDR + PLANES * entries, dtype=np.int64)
    st[H_SETS], st[H_WAYS], st[H_NKEYS] = entries // ways, ways, nkeys
    return st


@njit(cache=True)
def _set_of(st, sid, pasid):
    """Set of the key: h = ((h ^ k) * SET_MIX) mod 2^64, h ^= h >> 32 per key field."""
    mix = np.uint64(SET_MIX)
    sh = np.uint64(32)
    h = (np.uint64(0) ^ np.uint64(sid)) * mix
    h ^= h >> sh
    if st[H_NKEYS] == 2:
        h = (h ^ np.uint64(pasid)) * mix
        h ^= h >> sh
    return int(h % np.uint64(st[H_SETS]))


@njit(cache=True)
def _find(st, s, sid, pasid):
    """Line of set ``s`` holding the key (sid, pasid), or -1."""
    ways = st[H_WAYS]
    lines = st[H_SETS] * ways
    for line in range(s * ways, s * ways + ways):
        if (st[HDR + P_VALID * lines + line] == 1 and st[HDR + P_SID * lines + line] == sid
                and st[HDR + P_PASID * lines + line] == pasid):
            return line
    return -1


@njit(cache=True)
def _lookup(st, sid, pasid):
    """Look one key up: the line that holds it (its stamp set to the clock) or -1.

    st: the state (module docstring); sid, pasid: the key (pasid 0 for the context-cache).
    Counts a hit or a miss and advances the clock by one either way.
    """
    clock = st[H_CLOCK]
    st[H_CLOCK] = clock + 1
    if st[H_SETS] > 0:
        line = _find(st, _set_of(st, sid, pasid), sid, pasid)
        if line >= 0:
            st[HDR + P_STAMP * (st[H_SETS] * st[H_WAYS]) + line] = clock
            st[H_HITS] += 1
            return line
    st[H_MISSES] += 1
    return -1


@njit(cache=True)
def _fill(st, sid, pasid, did):
    """Insert or replace the line of (sid, pasid) with ``did``; returns the line, or -1 when
    the cache has no sets (then nothing is counted). Advances the clock by one.

    The line of the same key is replaced; otherwise the lowest-numbered free way, otherwise
    the way with the oldest stamp (the first of equals) is evicted.
    """
    clock = st[H_CLOCK]
    st[H_CLOCK] = clock + 1
    sets = st[H_SETS]
    if sets == 0:
        return -1
    st[H_FILLS] += 1
    ways = st[H_WAYS]
    lines = sets * ways
    s = _set_of(st, sid, pasid)
    line = _find(st, s, sid, pasid)
    if line < 0:
        for cand in range(s * ways, s * ways + ways):
            if st[HDR + P_VALID * lines + cand] == 0:
                line = cand
                break
    if line < 0:
        line = s * ways
        stamp = HDR + P_STAMP * lines
        for cand in range(s * ways + 1, s * ways + ways):
            if st[stamp + cand] < st[stamp + line]:
                line = cand
        st[H_EVICTIONS] += 1
    st[HDR + P_VALID * lines + line] = 1
    st[HDR + P_SID * lines + line] = sid
    st[HDR + P_PASID * lines + line] = pasid
    st[HDR + P_DID * lines + line] = did
    st[HDR + P_STAMP * lines + line] = clock
    return line


@njit(cache=True)
def _invalidate(st, kind, sid, sid_keep, pasid, did):
    """Drop the lines one invalidation selects; returns how many.

    kind: INV_*; sid, pasid, did: the descriptor's fields (those the kind names); sid_keep:
    the source-id bits compared by INV_SID (all ones, or the function mask's complement for
    a context-cache device-selective invalidation).
    """
    lines = st[H_SETS] * st[H_WAYS]
    want = sid & sid_keep
    dropped = 0
    for line in range(lines):
        if st[HDR + P_VALID * lines + line] == 0:
            continue
        if kind == INV_ALL:
            drop = True
        elif kind == INV_DID:
            drop = st[HDR + P_DID * lines + line] == did
        elif kind == INV_DID_PASID:
            drop = (st[HDR + P_DID * lines + line] == did
                    and st[HDR + P_PASID * lines + line] == pasid)
        elif kind == INV_SID:
            drop = (st[HDR + P_SID * lines + line] & sid_keep) == want
        else:
            drop = (st[HDR + P_SID * lines + line] == sid
                    and st[HDR + P_PASID * lines + line] == pasid)
        if drop:
            st[HDR + P_VALID * lines + line] = 0
            dropped += 1
    st[H_INVALIDATED] += dropped
    return dropped
