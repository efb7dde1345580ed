"""Reference model of the translation caches: one request at a time, lists and Python ints.

The slow, obviously correct twin of host_iommu/iotlb.py (VT-d spec chapter 6 "Caching
Translation Information"): the same set placement, LRU and batch semantics (a lookup batch
sees the state at its start, then stamps its hits in request order; a fill batch is applied
in request order), written as plain loops. Tests compare the two on random and adversarial
batches. Only the set-index hash multiplier, a number, is shared with the fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from host_iommu.defs import (
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
)
from host_iommu.iotlb import SET_MIX  # the set-placement hash multiplier: a pure number

M64 = (1 << 64) - 1

Key = tuple[int, ...]
Line = list  # [key tuple, value tuple, stamp]


def _ints(x: ArrayLike, n: int) -> list[int]:
    a = np.atleast_1d(np.asarray(x))
    vals = [int(v) for v in a.tolist()]
    return vals * n if len(vals) == 1 else vals


def _n(*xs: ArrayLike) -> int:
    return max(np.atleast_1d(np.asarray(x)).shape[0] for x in xs)


class RefSetAssoc:
    """A set-associative store as a list of sets, each a list of ``ways`` lines or None."""

    def __init__(self, entries: int, ways: int, key_fields: Sequence[str],
                 value_fields: Sequence[str], page_field: str | None = None) -> None:
        if entries < 0 or ways < 1 or entries % ways:
            raise ValueError("entries must be a non-negative multiple of ways")
        self.ways, self.sets = ways, entries // ways
        self.key_fields, self.value_fields = tuple(key_fields), tuple(value_fields)
        self.page_pos = None if page_field is None else self.key_fields.index(page_field)
        self.lines: list[list[Line | None]] = [[None] * ways for _ in range(self.sets)]
        self.clock = 0
        self.hits = self.misses = self.fills = self.evictions = self.invalidated = 0

    def set_index(self, key: Key) -> int:
        h = 0
        for j, k in enumerate(key):
            if j != self.page_pos:
                h = ((h ^ k) * SET_MIX) & M64
                h ^= h >> 32
        if self.page_pos is not None:
            h ^= key[self.page_pos]
        return h % self.sets

    def _find(self, key: Key) -> tuple[int, int] | None:
        s = self.set_index(key)
        for w, line in enumerate(self.lines[s]):
            if line is not None and line[0] == key:
                return s, w
        return None

    def lookup_first(self, requests: Sequence[Sequence[Key]]
                     ) -> list[tuple[int, tuple[int, ...] | None]]:
        """Per request: (index of the first candidate key that hits or -1, its value)."""
        found = []
        for cands in requests:
            got = (-1, None, None)
            for p, key in enumerate(cands if self.sets else ()):
                where = self._find(key)
                if where is not None:
                    s, w = where
                    got = (p, self.lines[s][w][1], where)
                    break
            found.append(got)
        for i, (_, _, where) in enumerate(found):  # stamp after the snapshot, in order
            if where is not None:
                self.lines[where[0]][where[1]][2] = self.clock + i
        n_hit = sum(1 for p, _, _ in found if p >= 0)
        self.hits += n_hit
        self.misses += len(found) - n_hit
        self.clock += len(found)
        return [(p, v) for p, v, _ in found]

    def fill(self, items: Sequence[tuple[Key, tuple[int, ...]]]) -> None:
        for i, (key, value) in enumerate(items):
            if not self.sets:
                continue
            self.fills += 1
            stamp = self.clock + i
            where = self._find(key)
            if where is not None:
                self.lines[where[0]][where[1]] = [key, value, stamp]
                continue
            ways = self.lines[self.set_index(key)]
            free = [w for w, line in enumerate(ways) if line is None]
            if free:
                w = free[0]
            else:
                w = min(range(self.ways), key=lambda j: ways[j][2])
                self.evictions += 1
            ways[w] = [key, value, stamp]
        self.clock += len(items)

    def invalidate(self, pred: Callable[[dict[str, int]], bool]) -> int:
        dropped = 0
        for ways in self.lines:
            for w, line in enumerate(ways):
                if line is None:
                    continue
                fields = dict(zip(self.key_fields, line[0], strict=True))
                fields.update(zip(self.value_fields, line[1], strict=True))
                if pred(fields):
                    ways[w] = None
                    dropped += 1
        self.invalidated += dropped
        return dropped

    def occupancy(self) -> int:
        return sum(line is not None for ways in self.lines for line in ways)

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "fills": self.fills,
                "evictions": self.evictions, "invalidated": self.invalidated}

    def contents(self, layout: bool = False) -> list[tuple[int, ...]]:
        out = []
        for s, ways in enumerate(self.lines):
            for w, line in enumerate(ways):
                if line is not None:
                    head = (s, w, line[2]) if layout else ()
                    out.append((*head, *line[0], *line[1]))
        return sorted(out)


# --- helpers on 4-KiB page ranges -------------------------------------------------------------
def _am_range(addr: int, am: int) -> tuple[int, int]:
    first = ((addr >> 12) >> am) << am
    return first, min(first + 2 ** am - 1, 2 ** 52 - 1)


def _meets(first: int, pages: int, lo: int, hi: int) -> bool:
    return first <= hi and first + pages - 1 >= lo


class _RefLeafTLB:
    """Shared model of the IOTLB and device-TLB: leaf entries at 4K, 2M or 1G."""

    ctx_fields: tuple[str, str]
    value_fields: tuple[str, ...]

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = RefSetAssoc(entries, ways, (*self.ctx_fields, "vpn_at_order", "order"),
                                 self.value_fields, page_field="vpn_at_order")

    def _lookup(self, a: ArrayLike, b: ArrayLike, addr: ArrayLike) -> tuple:
        n = _n(a, b, addr)
        a, b, addr = _ints(a, n), _ints(b, n), _ints(addr, n)
        reqs = [[(x, y, ad >> (12 + 9 * o), o) for o in (0, 1, 2)]
                for x, y, ad in zip(a, b, addr, strict=True)]
        res = self.cache.lookup_first(reqs)
        hit = np.array([p >= 0 for p, _ in res], dtype=bool)
        order = np.array([max(p, 0) for p, _ in res], dtype=np.uint8)
        hpa = np.array([v[0] + (ad & ((1 << (12 + 9 * p)) - 1)) if p >= 0 else 0
                        for (p, v), ad in zip(res, addr, strict=True)], dtype=np.uint64)
        rest = [np.array([v[j] if p >= 0 else 0 for p, v in res], dtype=np.uint8)
                for j in range(1, len(self.value_fields))]
        return hit, hpa, order, rest

    def _fill(self, a: ArrayLike, b: ArrayLike, addr: ArrayLike, order: ArrayLike,
              *values: ArrayLike) -> None:
        n = _n(a, b, addr, order, *values)
        cols = [_ints(x, n) for x in (a, b, addr, order, *values)]
        items = [((x, y, ad >> (12 + 9 * o), o), tuple(v))
                 for x, y, ad, o, *v in zip(*cols, strict=True)]
        self.cache.fill(items)

    @staticmethod
    def _covers(f: dict[str, int], lo: int, hi: int) -> bool:
        o = f["order"]
        return _meets(f["vpn_at_order"] << (9 * o), 1 << (9 * o), lo, hi)


class RefIOTLB(_RefLeafTLB):
    """Reference IOTLB: same public methods as host_iommu.iotlb.IOTLB."""

    ctx_fields = ("did", "pasid")
    value_fields = ("hpa_page", "perm", "pgtt")

    def lookup(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike) -> tuple:
        hit, hpa, order, (perm, pgtt) = self._lookup(did, pasid, addr)
        return hit, hpa, perm, order, pgtt

    def fill(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, order: ArrayLike,
             hpa_page: ArrayLike, perm: ArrayLike, pgtt: ArrayLike) -> None:
        self._fill(did, pasid, addr, order, hpa_page, perm, pgtt)

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda f: True)

    def inv_domain(self, did: int) -> int:
        return self.cache.invalidate(lambda f: f["did"] == did)

    def inv_page(self, did: int, addr: int, am: int, ih: int = 0) -> int:
        lo, hi = _am_range(addr, am)

        def pred(f: dict[str, int]) -> bool:
            if f["did"] != did:
                return False
            if f["pgtt"] in (PGTT_NESTED, PGTT_FL_ONLY):
                return True
            return f["pgtt"] in (PGTT_SL_ONLY, PGTT_PT) and self._covers(f, lo, hi)
        return self.cache.invalidate(pred)

    def inv_pasid(self, did: int, pasid: int) -> int:
        return self.cache.invalidate(
            lambda f: f["did"] == did and f["pasid"] == pasid
            and f["pgtt"] in (PGTT_FL_ONLY, PGTT_NESTED))

    def inv_pasid_page(self, did: int, pasid: int, addr: int, am: int, ih: int = 0) -> int:
        lo, hi = _am_range(addr, am)
        return self.cache.invalidate(
            lambda f: f["did"] == did and f["pasid"] == pasid
            and f["pgtt"] in (PGTT_FL_ONLY, PGTT_NESTED) and self._covers(f, lo, hi))


class RefDeviceTLB(_RefLeafTLB):
    """Reference device-TLB: same public methods as host_iommu.iotlb.DeviceTLB."""

    ctx_fields = ("sid", "pasid")
    value_fields = ("hpa_page", "perm")

    def lookup(self, sid: ArrayLike, pasid: ArrayLike, addr: ArrayLike) -> tuple:
        hit, hpa, order, (perm,) = self._lookup(sid, pasid, addr)
        return hit, hpa, perm, order

    def fill(self, sid: ArrayLike, pasid: ArrayLike, addr: ArrayLike, order: ArrayLike,
             hpa_page: ArrayLike, perm: ArrayLike) -> None:
        self._fill(sid, pasid, addr, order, hpa_page, perm)

    def inv(self, sid: int, pasid: int | None, addr: int, size_bytes: int) -> int:
        lo = addr >> 12
        hi = min((addr + size_bytes - 1) >> 12, 2 ** 52 - 1)
        return self.cache.invalidate(
            lambda f: f["sid"] == sid and (pasid is None or f["pasid"] == pasid)
            and self._covers(f, lo, hi))

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda f: True)


class RefPagingStructureCache:
    """Reference paging-structure cache: same public methods as PagingStructureCache."""

    def __init__(self, entries: int, ways: int, stage: str) -> None:
        self.stage = stage
        self.cache = RefSetAssoc(entries, ways, ("did", "pasid", "level", "prefix"),
                                 ("entry",), page_field="prefix")

    def _key(self, did: int, pasid: int, addr: int, level: int) -> Key:
        return (did, 0 if self.stage == "sl" else pasid, level, addr >> (12 + 9 * (level - 1)))

    def lookup(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, level: ArrayLike
               ) -> tuple[np.ndarray, np.ndarray]:
        n = _n(did, pasid, addr, level)
        cols = [_ints(x, n) for x in (did, pasid, addr, level)]
        res = self.cache.lookup_first([[self._key(*r)] for r in zip(*cols, strict=True)])
        return (np.array([p >= 0 for p, _ in res], dtype=bool),
                np.array([v[0] if p >= 0 else 0 for p, v in res], dtype=np.uint64))

    def lookup_deepest(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike,
                       levels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        n = _n(did, pasid, addr, levels)
        cols = [_ints(x, n) for x in (did, pasid, addr, levels)]
        reqs = [[self._key(d, p, a, lv) for lv in range(2, top + 1)]
                for d, p, a, top in zip(*cols, strict=True)]
        res = self.cache.lookup_first(reqs)
        return (np.array([p + 2 if p >= 0 else 0 for p, _ in res], dtype=np.int64),
                np.array([v[0] if p >= 0 else 0 for p, v in res], dtype=np.uint64))

    def fill(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, level: ArrayLike,
             entry: ArrayLike) -> None:
        n = _n(did, pasid, addr, level, entry)
        cols = [_ints(x, n) for x in (did, pasid, addr, level, entry)]
        self.cache.fill([(self._key(d, p, a, lv), (e,))
                         for d, p, a, lv, e in zip(*cols, strict=True)])

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda f: True)

    def inv_domain(self, did: int) -> int:
        return self.cache.invalidate(lambda f: f["did"] == did)

    def inv_pasid(self, did: int, pasid: int) -> int:
        if self.stage != "fl":
            raise ValueError("second-level paging-structure entries are not tagged by PASID")
        return self.cache.invalidate(lambda f: f["did"] == did and f["pasid"] == pasid)

    def inv_range(self, did: int, pasid: int | None, addr: int, am: int) -> int:
        lo, hi = _am_range(addr, am)
        want = None if pasid is None else (0 if self.stage == "sl" else pasid)

        def pred(f: dict[str, int]) -> bool:
            span = 9 * (f["level"] - 1)
            return (f["did"] == did and (want is None or f["pasid"] == want)
                    and _meets(f["prefix"] << span, 1 << span, lo, hi))
        return self.cache.invalidate(pred)


class RefPasidCache:
    """Reference PASID-cache (VT-d spec 6.2.2): the eight words of a PASID-table entry keyed
    (sid, pasid), with the entry's DID for the 0x7 selections. For the reference engine
    (host_iommu/refengine.py), one request at a time."""

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = RefSetAssoc(entries, ways, ("sid", "pasid"),
                                 ("did", *(f"w{i}" for i in range(8))))

    def lookup(self, sid: int, pasid: int) -> tuple[int, ...] | None:
        """(did, w0..w7) cached for (sid, pasid), or None."""
        (p, value), = self.cache.lookup_first([[(sid, pasid)]])
        return value if p >= 0 else None

    def fill(self, sid: int, pasid: int, did: int, words: Sequence[int]) -> None:
        self.cache.fill([((sid, pasid), (did, *(int(w) for w in words)))])

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda f: True)

    def inv_domain(self, did: int) -> int:
        return self.cache.invalidate(lambda f: f["did"] == did)

    def inv_pasid(self, did: int, pasid: int) -> int:
        return self.cache.invalidate(lambda f: f["did"] == did and f["pasid"] == pasid)

    def inv_sid(self, sid: int) -> int:
        return self.cache.invalidate(lambda f: f["sid"] == sid)

    def inv_entry(self, sid: int, pasid: int) -> int:
        return self.cache.invalidate(lambda f: f["sid"] == sid and f["pasid"] == pasid)


class RefContextCache:
    """Reference context-cache (VT-d spec 6.2.1): a scalable-mode context entry's low words
    keyed by sid (DID 0: the entry has none); 0x1 device-selective with QEMU's function mask
    (vtd_context_device_invalidate: FM 1 ignores bit 2 of the sid, 2 bits 2:1, 3 bits 2:0)."""

    FM_IGNORED = (0b000, 0b100, 0b110, 0b111)   # sid bits ignored, by FM

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = RefSetAssoc(entries, ways, ("sid",), ("did", "w0", "w1"))

    def lookup(self, sid: int) -> tuple[int, ...] | None:
        """(did, w0, w1) cached for sid, or None."""
        (p, value), = self.cache.lookup_first([[(sid,)]])
        return value if p >= 0 else None

    def fill(self, sid: int, w0: int, w1: int) -> None:
        self.cache.fill([((sid,), (0, w0, w1))])

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda f: True)

    def inv_domain(self, did: int) -> int:
        return self.cache.invalidate(lambda f: f["did"] == did)

    def inv_device(self, sid: int, fm: int) -> int:
        keep = 0xFFFF & ~self.FM_IGNORED[fm]
        return self.cache.invalidate(lambda f: f["sid"] & keep == sid & keep)
