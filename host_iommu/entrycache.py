"""Context-cache and PASID-cache of the live path: small set-associative stores on Python ints.

VT-d spec 6.2.1 (context-cache) and 6.2.2 (PASID-cache); invalidation as 6.5.2.1 (0x1, with
QEMU vtd_context_device_invalidate's function mask) and 6.5.2.5 (0x7). The same placement,
LRU and counters as host_iommu/iotlb.py's ContextCache and PasidCache (SetAssocCache: set =
the key fields mixed with SET_MIX, modulo the sets; a lookup stamps ``clock`` and advances it
by one; a fill replaces a line of the same key, else takes the lowest free way, else evicts
the oldest stamp, first of equals), but one request at a time on plain ints: translate
resolves a few (sid, pasid) per batch, where numpy's per-call cost dominated. A line holds
the entry's 64-bit words and, beside them, the decoded entry a hit gives (decoding is a pure
function of the words, so it is done once at fill). host_iommu/reference_cache.py's
RefSetAssoc is the reference these are tested against (tests/host_iommu/test_entrycache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from host_iommu.iotlb import CC_FM_SID_MASK, SET_MIX, CacheError

M64 = (1 << 64) - 1


class SmallSetAssoc:
    """Lines ``[key tuple, did, value, stamp]`` per set, ``ways`` slots each (None: free)."""

    def __init__(self, entries: int, ways: int) -> None:
        if entries < 0 or ways < 1 or entries % ways:
            raise ValueError(f"entries={entries} must be a non-negative multiple of ways={ways}")
        self.entries, self.ways, self.sets = entries, ways, entries // ways
        self.lines: list[list[list | None]] = [[None] * ways for _ in range(self.sets)]
        self.clock = 0
        self.hits = self.misses = self.fills = self.evictions = self.invalidated = 0

    def set_index(self, key: tuple[int, ...]) -> int:
        """SetAssocCache's placement for a key without a page field."""
        h = 0
        for k in key:
            h = ((h ^ k) * SET_MIX) & M64
            h ^= h >> 32
        return h % self.sets

    def lookup(self, key: tuple[int, ...]) -> Any:
        """The value cached under ``key`` or None; a hit is stamped with the clock."""
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
        """Insert or replace one line (SetAssocCache.fill of a batch of one)."""
        clock = self.clock
        self.clock = clock + 1
        if not self.sets:
            return
        self.fills += 1
        ways = self.lines[self.set_index(key)]
        way = -1
        for w, line in enumerate(ways):
            if line is not None and line[0] == key:
                way = w
                break
        if way < 0:
            for w, line in enumerate(ways):
                if line is None:
                    way = w
                    break
        if way < 0:
            way = min(range(self.ways), key=lambda j: ways[j][3])
            self.evictions += 1
        ways[way] = [key, did, value, clock]

    def invalidate(self, pred: Callable[[tuple[int, ...], int], bool]) -> int:
        """Drop every line whose (key, did) satisfies ``pred``; returns how many."""
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


def _check(x: int, name: str) -> int:
    if isinstance(x, bool) or not 0 <= int(x) <= M64:
        raise CacheError(f"{name}: {x!r} is not an integer in [0, 2**64)")
    return int(x)


class PasidEntryCache:
    """The PASID-cache (spec 6.2.2): decoded PASID-table entries keyed (sid, pasid), tagged
    with the entry's DID for domain- and PASID-selective 0x7 invalidations."""

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = SmallSetAssoc(entries, ways)

    def lookup(self, sid: int, pasid: int) -> Any:
        """The decoded entry (PasidEntry or FaultReason) cached for (sid, pasid), or None."""
        return self.cache.lookup((sid, pasid))

    def fill(self, sid: int, pasid: int, did: int, decoded: Any) -> None:
        self.cache.fill((sid, pasid), did, decoded)

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda k, d: True)

    def inv_domain(self, did: int) -> int:
        did = _check(did, "did")
        return self.cache.invalidate(lambda k, d: d == did)

    def inv_pasid(self, did: int, pasid: int) -> int:
        did, pasid = _check(did, "did"), _check(pasid, "pasid")
        return self.cache.invalidate(lambda k, d: d == did and k[1] == pasid)

    def inv_sid(self, sid: int) -> int:
        sid = _check(sid, "sid")
        return self.cache.invalidate(lambda k, d: k[0] == sid)

    def inv_entry(self, sid: int, pasid: int) -> int:
        """Drop the entry of one (sid, pasid), whatever DID it was cached with."""
        key = (_check(sid, "sid"), _check(pasid, "pasid"))
        return self.cache.invalidate(lambda k, d: k == key)


class ContextEntryCache:
    """The context-cache (spec 6.2.1): decoded scalable-mode context entries keyed by sid
    (cached with DID 0: a scalable-mode context entry carries none)."""

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = SmallSetAssoc(entries, ways)

    def lookup(self, sid: int) -> Any:
        return self.cache.lookup((sid,))

    def fill(self, sid: int, decoded: Any) -> None:
        self.cache.fill((sid,), 0, decoded)

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda k, d: True)

    def inv_domain(self, did: int) -> int:
        did = _check(did, "did")
        return self.cache.invalidate(lambda k, d: d == did)

    def inv_device(self, sid: int, fm: int) -> int:
        """0x1 device-selective: entries of ``sid`` with the FM-masked function bits ignored."""
        if fm not in CC_FM_SID_MASK:
            raise CacheError(f"function mask {fm} outside 0..3")
        keep = ~CC_FM_SID_MASK[fm] & 0xFFFF
        want = _check(sid, "sid") & keep
        return self.cache.invalidate(lambda k, d: (k[0] & keep) == want)
