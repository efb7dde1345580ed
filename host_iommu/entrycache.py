"""Context-cache and PASID-cache of the live path: compiled kernels over one int64 array each.

VT-d spec 6.2.1 (context-cache) and 6.2.2 (PASID-cache); invalidation as 6.5.2.1 (0x1, with
QEMU vtd_context_device_invalidate's function mask) and 6.5.2.5 (0x7). Placement, LRU and
counters as host_iommu/reference_cache.py's RefSetAssoc (set = the key fields mixed with
SET_MIX, modulo the sets; a look-up stamps the clock on a hit and advances it by one; a fill
replaces the line of the same key, else takes the lowest free way, else evicts the oldest
stamp, first of equals), one request at a time: translate resolves a few (sid, pasid) per
batch. The kernels (host_iommu/kernels/entrycache.py) hold keys, DIDs and stamps; beside
them each line keeps the decoded entry a hit gives (decoding is a pure function of the
entry's words, so it is done once, at fill), and its fields as numbers for the compiled
context stage (kernels.entrycache.contexts_hit). Tested against RefSetAssoc
(tests/host_iommu/test_entrycache.py) and against the plain-int caches these replaced
(tests/host_iommu/test_kernel_entrycache.py).

Keys are a source-id (16 bits) and a PASID (20 bits): the caller (HostIommu._contexts)
refuses others before a look-up. Invalidation arguments are checked here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from host_iommu.defs import FaultReason
from host_iommu.iotlb import CC_FM_SID_MASK, CacheError
from host_iommu.kernels.entrycache import (
    H_CLOCK,
    H_EVICTIONS,
    H_FILLS,
    H_HITS,
    H_INVALIDATED,
    H_MISSES,
    HDR,
    INV_ALL,
    INV_DID,
    INV_DID_PASID,
    INV_SID,
    INV_SID_PASID,
    NVALS,
    P_DID,
    P_PASID,
    P_SID,
    P_STAMP,
    P_VALID,
    PLANES,
    V_DID,
    V_DTE,
    V_FAULT,
    V_FL_LEVELS,
    V_FLPTR,
    V_FPD,
    V_KFILL,
    V_OK,
    V_PDIR,
    V_PDTS,
    V_PGSNP,
    V_PGTT,
    V_RID_PASID,
    V_SL_LEVELS,
    V_SLPTR,
    V_SRE,
    V_SSADE,
    _fill,
    _invalidate,
    _lookup,
    new_state,
)
from host_iommu.pasid import ContextEntry, PasidEntry

M64 = (1 << 64) - 1
ALL_BITS = -1   # an INV_SID mask comparing every source-id bit


def _check(x: int, name: str) -> int:
    """An invalidation field as the int64 with its 64-bit pattern (CacheError outside)."""
    if isinstance(x, bool) or not 0 <= int(x) <= M64:
        raise CacheError(f"{name}: {x!r} is not an integer in [0, 2**64)")
    x = int(x)
    return x - (1 << 64) if x >> 63 else x


def _bits(x: int) -> int:
    """A 64-bit address as the int64 with its bit pattern (the ``vals`` columns)."""
    return x - (1 << 64) if x >> 63 else x


class EntryArrays:
    """Lines of one context- or PASID-cache: the kernels' state ``st`` and, per line, the
    decoded entry (``values[set * ways + way]``, meaningful while the line is valid) and its
    fields as numbers (``vals[line, V_*]``, host_iommu/kernels/entrycache.py), which
    kernels.entrycache.contexts_hit reads. A line the compiled context stage filled
    (kernels.entrycache.contexts_fetch: V_KFILL) has only its numbers; ``value`` builds its
    decoded entry from them (the same entry the Python fill decodes from the words)."""

    def __init__(self, entries: int, ways: int, nkeys: int) -> None:
        self.st = new_state(entries, ways, nkeys)
        self.entries, self.ways, self.sets = entries, ways, entries // ways
        self.nkeys = nkeys
        self.values: list[Any] = [None] * entries
        self.vals = np.zeros((entries, NVALS), dtype=np.int64)

    def _build(self, row: np.ndarray) -> Any:
        raise NotImplementedError

    def value(self, line: int) -> Any:
        """The decoded entry of a valid line (built from ``vals`` if the kernel filled it)."""
        row = self.vals[line]
        if row[V_KFILL]:
            self.values[line] = self._build(row)
            row[V_KFILL] = 0
        return self.values[line]

    @property
    def planes(self) -> np.ndarray:
        """The line planes as (P_*, sets, ways), a view of ``st`` (a view kept as an
        attribute would not survive copy.deepcopy, which copies it apart from ``st``)."""
        return self.st[HDR:].reshape(PLANES, self.sets, self.ways)

    @property
    def cache(self) -> EntryArrays:
        """The store itself (the counters, lines and clock are read here)."""
        return self

    @property
    def clock(self) -> int:
        return int(self.st[H_CLOCK])

    @property
    def hits(self) -> int:
        return int(self.st[H_HITS])

    @property
    def misses(self) -> int:
        return int(self.st[H_MISSES])

    def counters(self) -> dict[str, int]:
        """hits, misses, fills, evictions, invalidated (RefSetAssoc.counters)."""
        st = self.st
        return {"hits": int(st[H_HITS]), "misses": int(st[H_MISSES]),
                "fills": int(st[H_FILLS]), "evictions": int(st[H_EVICTIONS]),
                "invalidated": int(st[H_INVALIDATED])}

    def occupancy(self) -> int:
        """Number of valid lines."""
        return int(self.planes[P_VALID].sum())

    @property
    def lines(self) -> list[list[list | None]]:
        """Per set, per way: ``[key tuple, did, decoded entry, stamp]`` or None (free)."""
        pl = self.planes
        out: list[list[list | None]] = []
        for s in range(self.sets):
            row: list[list | None] = []
            for w in range(self.ways):
                if pl[P_VALID, s, w]:
                    key = (int(pl[P_SID, s, w]), int(pl[P_PASID, s, w]))[:self.nkeys]
                    row.append([key, int(pl[P_DID, s, w]), self.value(s * self.ways + w),
                                int(pl[P_STAMP, s, w])])
                else:
                    row.append(None)
            out.append(row)
        return out

    def contents(self, layout: bool = False) -> list[tuple]:
        """Valid lines as ((set, way, stamp,)? key..., did, entry), sorted:
        RefSetAssoc.contents' format with the values (did, entry)."""
        out = []
        for s, row in enumerate(self.lines):
            for w, line in enumerate(row):
                if line is not None:
                    head = (s, w, line[3]) if layout else ()
                    out.append((*head, *line[0], line[1], line[2]))
        return sorted(out)

    def _inv(self, kind: int, sid: int = 0, keep: int = ALL_BITS, pasid: int = 0,
             did: int = 0) -> int:
        return int(_invalidate(self.st, kind, sid, keep, pasid, did))


class PasidEntryCache(EntryArrays):
    """The PASID-cache (spec 6.2.2): decoded PASID-table entries keyed (sid, pasid), tagged
    with the entry's DID for domain- and PASID-selective 0x7 invalidations."""

    def __init__(self, entries: int, ways: int) -> None:
        super().__init__(entries, ways, 2)

    def lookup(self, sid: int, pasid: int) -> Any:
        """The decoded entry (PasidEntry or FaultReason) cached for (sid, pasid), or None."""
        line = _lookup(self.st, sid, pasid)
        return None if line < 0 else self.value(line)

    def fill(self, sid: int, pasid: int, did: int, decoded: Any) -> None:
        line = _fill(self.st, sid, pasid, did)
        if line >= 0:
            self.values[line] = decoded
            row = self.vals[line]
            row[:] = 0
            if isinstance(decoded, FaultReason):
                row[V_FAULT] = int(decoded)
                row[V_OK] = 1
            elif isinstance(decoded, PasidEntry):
                row[V_FPD], row[V_PGTT], row[V_DID] = bool(decoded.fpd), decoded.pgtt, decoded.did
                row[V_FLPTR], row[V_FL_LEVELS] = _bits(decoded.flptr), decoded.fl_levels
                row[V_SLPTR], row[V_SL_LEVELS] = _bits(decoded.slptr), decoded.sl_levels
                row[V_SSADE] = bool(decoded.ssade)
                row[V_SRE], row[V_PGSNP] = bool(decoded.sre), bool(decoded.pgsnp)
                row[V_OK] = 1

    def _build(self, row: np.ndarray) -> PasidEntry:
        fpd, pgtt, did, flptr, fll, slptr, sll, ssade, sre, pgsnp = row[
            [V_FPD, V_PGTT, V_DID, V_FLPTR, V_FL_LEVELS, V_SLPTR, V_SL_LEVELS, V_SSADE, V_SRE,
             V_PGSNP]].tolist()
        return PasidEntry(present=True, fpd=bool(fpd), pgtt=pgtt, did=did, slptr=slptr & M64,
                          sl_levels=sll, ssade=bool(ssade), flptr=flptr & M64, fl_levels=fll,
                          sre=bool(sre), pgsnp=bool(pgsnp))

    def inv_global(self) -> int:
        return self._inv(INV_ALL)

    def inv_domain(self, did: int) -> int:
        return self._inv(INV_DID, did=_check(did, "did"))

    def inv_pasid(self, did: int, pasid: int) -> int:
        return self._inv(INV_DID_PASID, pasid=_check(pasid, "pasid"), did=_check(did, "did"))

    def inv_sid(self, sid: int) -> int:
        return self._inv(INV_SID, sid=_check(sid, "sid"))

    def inv_entry(self, sid: int, pasid: int) -> int:
        """Drop the entry of one (sid, pasid), whatever DID it was cached with."""
        return self._inv(INV_SID_PASID, sid=_check(sid, "sid"), pasid=_check(pasid, "pasid"))


class ContextEntryCache(EntryArrays):
    """The context-cache (spec 6.2.1): decoded scalable-mode context entries keyed by sid
    (cached with DID 0: a scalable-mode context entry carries none)."""

    def __init__(self, entries: int, ways: int) -> None:
        super().__init__(entries, ways, 1)

    def lookup(self, sid: int) -> Any:
        line = _lookup(self.st, sid, 0)
        return None if line < 0 else self.value(line)

    def fill(self, sid: int, decoded: Any) -> None:
        line = _fill(self.st, sid, 0, 0)
        if line >= 0:
            self.values[line] = decoded
            row = self.vals[line]
            row[:] = 0
            if isinstance(decoded, ContextEntry):
                row[V_FPD], row[V_DTE], row[V_OK] = bool(decoded.fpd), bool(decoded.dte), 1
                row[V_PDIR], row[V_PDTS] = _bits(decoded.pasid_dir), decoded.pdts
                row[V_RID_PASID] = decoded.rid_pasid

    def _build(self, row: np.ndarray) -> ContextEntry:
        fpd, dte, pdir, pdts, rid = row[[V_FPD, V_DTE, V_PDIR, V_PDTS, V_RID_PASID]].tolist()
        return ContextEntry(fpd=bool(fpd), dte=bool(dte), pasid_dir=pdir & M64, pdts=pdts,
                            rid_pasid=rid)

    def inv_global(self) -> int:
        return self._inv(INV_ALL)

    def inv_domain(self, did: int) -> int:
        return self._inv(INV_DID, did=_check(did, "did"))

    def inv_device(self, sid: int, fm: int) -> int:
        """0x1 device-selective: entries of ``sid`` with the FM-masked function bits ignored."""
        if fm not in CC_FM_SID_MASK:
            raise CacheError(f"function mask {fm} outside 0..3")
        return self._inv(INV_SID, sid=_check(sid, "sid"), keep=~CC_FM_SID_MASK[fm] & 0xFFFF)
