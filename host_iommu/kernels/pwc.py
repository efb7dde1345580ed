"""Paging-structure cache lookup, fill and invalidation as numba kernels (VT-d spec 6.2.4).

The same cache as host_iommu/iotlb.py's PagingStructureCache: non-leaf entries keyed (DID,
PASID, level, prefix), where the entry at level L (2..5) is selected by ``addr >> (12 + 9 *
(L - 1))`` and covers 2^(9*(L-1)) 4-KiB pages; second-level entries are tagged PASID 0.
Set placement, LRU and batch semantics as host_iommu/reference_cache.py (the lookup batch
sees the cache at its start; fills in request order). Uses the IOTLB kernels' line layout
and set hash (host_iommu/kernels/iotlb.py), with ``level`` in the order field and the entry
in the hpa field. HostIommu's live paging-structure caches (iommu.py CacheSet; the walk
kernel, host_iommu/kernels/walk.py, looks them up and fills them).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import ArrayLike

from host_iommu.kernels.iotlb import (
    C_CLOCK,
    C_HITS,
    C_MISSES,
    COUNTERS,
    F_DID,
    F_HPA,
    F_ORDER,
    F_PASID,
    F_STAMP,
    F_VPN,
    LINE_FIELDS,
    MAX_PFN,
    _fill_keyed,
    _find_way,
    _inv_range,
    _set_index,
    _u64,
    counters_dict,
    line_contents,
)

PWC_MIN_LEVEL, PWC_MAX_LEVEL = 2, 5


@njit(cache=True)
def _lookup_deepest(state, counters, did, pasid, addr, levels, level_hit, entry):
    """Per request the lowest cached level L in 2..levels[i]: level_hit[i] = L (0 on a miss)
    and entry[i] = the cached entry at L.

    state: uint64[9, sets, ways] (iotlb.py's F_* planes; F_ORDER holds the level, F_HPA the
    entry); counters: int64[6]; did, pasid, addr, levels: uint64[n]; level_hit: int64[n];
    entry: uint64[n]. Hits are stamped in request order (the same as after the batch).
    """
    clock = counters[C_CLOCK]
    n = did.shape[0]
    hits = 0
    for i in range(n):
        lv, e = _probe_deepest(state, did[i], pasid[i], addr[i], levels[i], clock + i)
        if lv > 0:
            level_hit[i] = lv
            entry[i] = e
            hits += 1
    counters[C_HITS] += hits
    counters[C_MISSES] += n - hits
    counters[C_CLOCK] = clock + n


@njit(cache=True, inline="always")
def _probe_deepest(state, did, pasid, addr, levels, stamp):
    """One request of _lookup_deepest (the caller counts and advances the clock): (the
    lowest cached level in 2..levels, 0 on a miss; its entry), the hit stamped ``stamp``.
    did, pasid, addr, levels: uint64."""
    lv, e, s, way = _probe_find(state, did, pasid, addr, levels)
    if lv > 0:
        state[F_STAMP, s, way] = np.uint64(stamp)
    return lv, e


@njit(cache=True, inline="always")
def _probe_find(state, did, pasid, addr, levels):
    """_probe_deepest without the stamp: (the lowest cached level in 2..levels, 0 on a miss;
    its entry; its set and way, -1 on a miss). The walk kernel's depth-first path stamps its
    hits after the batch, in the order the level-synchronous walk would (kernels/walk.py)."""
    sets = state.shape[1]
    if sets == 0:
        return 0, np.uint64(0), np.int64(-1), np.int64(-1)
    for lv in range(PWC_MIN_LEVEL, int(levels) + 1):
        ulv = np.uint64(lv)
        prefix = addr >> np.uint64(12 + 9 * (lv - 1))
        s = _set_index(did, pasid, prefix, ulv, sets)
        way = _find_way(state, s, did, pasid, prefix, ulv)
        if way >= 0:
            return lv, state[F_HPA, s, way], np.int64(s), np.int64(way)
    return 0, np.uint64(0), np.int64(-1), np.int64(-1)


class PwcArrays:
    """A paging-structure cache of one stage ("fl" or "sl") in arrays, driven by compiled
    kernels; the interface of RefPagingStructureCache (lookup_deepest, fill, inv_*)."""

    def __init__(self, entries: int, ways: int, stage: str) -> None:
        if stage not in ("fl", "sl"):
            raise ValueError(f"stage must be 'fl' or 'sl', not {stage!r}")
        if entries < 0 or ways < 1 or entries % ways:
            raise ValueError("entries must be a non-negative multiple of ways")
        self.stage, self.ways, self.sets = stage, ways, entries // ways
        self.state = np.zeros((len(LINE_FIELDS), self.sets, ways), dtype=np.uint64)
        self.counts = np.zeros(COUNTERS, dtype=np.int64)

    def _cols(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, level: ArrayLike,
              *rest: ArrayLike) -> list[np.ndarray]:
        cols = _u64(did, 0 if self.stage == "sl" else pasid, addr, level, *rest)
        lv = cols[3]
        if lv.size and (int(lv.min()) < PWC_MIN_LEVEL or int(lv.max()) > PWC_MAX_LEVEL):
            raise ValueError(f"level must be {PWC_MIN_LEVEL}..{PWC_MAX_LEVEL}")
        return cols

    def lookup_deepest(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike,
                       levels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Per request the lowest cached level L in 2..levels: (L or 0, entry at L)."""
        d, p, a, lv = self._cols(did, pasid, addr, levels)
        level_hit = np.zeros(d.size, dtype=np.int64)
        entry = np.zeros(d.size, dtype=np.uint64)
        _lookup_deepest(self.state, self.counts, d, p, a, lv, level_hit, entry)
        return level_hit, entry

    def fill(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, level: ArrayLike,
             entry: ArrayLike) -> None:
        """Cache the entry at ``level`` on the walk of ``addr`` (iotlb.py's keyed fill)."""
        d, p, a, lv, e = self._cols(did, pasid, addr, level, entry)
        # Key (did, pasid, level, prefix = addr >> (12 + 9 * (level - 1))), value the entry.
        tag = a >> (np.uint64(12) + np.uint64(9) * (lv - np.uint64(1)))
        zeros = np.zeros_like(d)
        _fill_keyed(self.state, self.counts, d, p, tag, lv, e, zeros, zeros)

    def inv_global(self) -> int:
        return self._inv(True, 0, True, 0, 0, MAX_PFN)

    def inv_domain(self, did: int) -> int:
        return self._inv(False, did, True, 0, 0, MAX_PFN)

    def inv_pasid(self, did: int, pasid: int) -> int:
        if self.stage != "fl":
            raise ValueError("second-level paging-structure entries are not tagged by PASID")
        return self._inv(False, did, False, pasid, 0, MAX_PFN)

    def inv_range(self, did: int, pasid: int | None, addr: int, am: int) -> int:
        """Entries of ``did`` (and ``pasid`` unless None) whose range meets 2^am pages."""
        if not 0 <= int(am) <= 63 or not 0 <= int(addr) < 1 << 64:
            raise ValueError(f"addr={addr!r} am={am!r} outside 64 bits / 0..63")
        lo = ((int(addr) >> 12) >> int(am)) << int(am)
        hi = min(lo + (1 << int(am)) - 1, MAX_PFN)
        want = 0 if pasid is None or self.stage == "sl" else pasid
        return self._inv(False, did, pasid is None, want, lo, hi)

    def _inv(self, all_dids: bool, did: int, any_pasid: bool, pasid: int, lo: int,
             hi: int) -> int:
        return int(_inv_range(self.state, self.counts, all_dids, np.uint64(did), any_pasid,
                              np.uint64(pasid), np.uint64(lo), np.uint64(hi), np.uint64(1)))

    def counters(self) -> dict[str, int]:
        return counters_dict(self.counts)

    @property
    def cache(self) -> PwcArrays:
        """The store itself (iotlb.py's caches keep theirs in ``.cache``: the same reads)."""
        return self

    @property
    def hits(self) -> int:
        return int(self.counts[C_HITS])

    @property
    def misses(self) -> int:
        return int(self.counts[C_MISSES])

    def contents(self, layout: bool = False) -> list[tuple[int, ...]]:
        """Valid lines as ((set, way, stamp,)? did, pasid, level, prefix, entry), sorted:
        RefSetAssoc.contents' format for the PWC key."""
        return line_contents(self.state, (F_DID, F_PASID, F_ORDER, F_VPN, F_HPA), layout)
