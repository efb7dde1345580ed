"""IOMMU translation caches: IOTLB, paging-structure caches, PASID/context caches, device-TLB.

Follows the VT-d spec chapter 6 "Caching Translation Information" (6.2.1 context-cache, 6.2.2
PASID-cache, 6.2.3 IOTLB, 6.2.4 paging-structure caches, 6.5.2 invalidation descriptors
0x1/0x2/0x3/0x6/0x7/0x8) and, for what each invalidation is used for, Linux
drivers/iommu/intel/cache.c; the context-cache function mask follows QEMU
hw/i386/intel_iommu.c (vtd_context_device_invalidate). host_iommu/reference_cache.py is the
slow, obvious model of the same semantics that the tests compare against.

Module length (~760 lines): one generic store plus five thin named caches over it; splitting
them would scatter the shared batch semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike

from host_iommu.defs import (
    LEVEL_STRIDE,
    PAGE_ORDERS,
    PAGE_SHIFT,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
)

# --- Cached permissions (VT-d spec 6.2.3: an IOTLB entry caches the effective R/W) ---------
PERM_R = 1 << 0  # bit 0: read permitted
PERM_W = 1 << 1  # bit 1: write permitted
PERM_MASK = PERM_R | PERM_W

# --- Set-index and tag hashing (fixed constants: placement is a pure function of the key) ---
SET_MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier, mixes the non-page keys into the index
TAG_MIX = 0xBF58476D1CE4E5B9  # splitmix64 multiplier, for the fast path's 64-bit key digest
TAG_SEED = 0x94D049BB133111EB
M64 = (1 << 64) - 1

# Paging-structure-cache levels: an entry AT level L (2..5) points to a level L-1 table.
PWC_MIN_LEVEL = 2
PWC_MAX_LEVEL = 5

# Context-cache device-selective invalidation, function mask FM (VT-d spec 6.5.2.1; QEMU
# vtd_context_device_invalidate): FM 0 masks no SID bit, 1 bit 2, 2 bits 2:1, 3 bits 2:0.
CC_FM_SID_MASK = {0: 0x0, 1: 0x4, 2: 0x6, 3: 0x7}

PASID_ENTRY_WORDS = 8    # a scalable-mode PASID-table entry is 512 bits (spec 9.6)
CONTEXT_ENTRY_WORDS = 4  # a scalable-mode context entry is 256 bits (spec 9.4)

_U64 = np.dtype(np.uint64)
_MAX_PFN = (1 << (64 - PAGE_SHIFT)) - 1


Probe = Sequence[ArrayLike] | Callable[[np.ndarray | None], Sequence[ArrayLike]]


class CacheError(ValueError):
    """A cache was built or called with invalid arguments (a bug in the caller)."""


# --- input helpers ---------------------------------------------------------------------------
def _as_u64(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a uint64 array; negative, non-integer or too-large values are a CacheError."""
    try:
        a = np.asarray(x)
    except (OverflowError, ValueError) as e:
        raise CacheError(f"{name}: not a uint64 value ({e})") from None
    if a.dtype.kind == "u":
        return a.astype(_U64, copy=False)
    if a.dtype.kind in "ib":
        if a.size and a.min() < 0:
            raise CacheError(f"{name}: negative value")
        return a.astype(_U64)
    if a.dtype == object:
        try:
            return np.array(a.tolist(), dtype=_U64)
        except (OverflowError, TypeError, ValueError):
            raise CacheError(f"{name}: values must be integers in [0, 2**64)") from None
    raise CacheError(f"{name}: integer values expected, got {a.dtype}")


def _as_dtype(x: ArrayLike, dtype: np.dtype, name: str) -> np.ndarray:
    """``x`` cast to ``dtype`` exactly (a value that does not fit is a CacheError)."""
    a = _as_u64(x, name)
    out = a.astype(dtype)
    if not np.array_equal(out.astype(_U64), a):
        raise CacheError(f"{name}: value does not fit {np.dtype(dtype).name}")
    return out


def _scalar(x: int, name: str) -> np.uint64:
    """A scalar selector of an invalidation (did, pasid, sid) as np.uint64."""
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or not 0 <= int(x) <= M64:
        raise CacheError(f"{name}: {x!r} is not an integer in [0, 2**64)")
    return np.uint64(int(x))


def _batch(arrays: Sequence[ArrayLike], names: Sequence[str]) -> list[np.ndarray]:
    """Broadcast scalars and 1-D arrays to one 1-D batch of uint64 columns."""
    cols, n = _columns(arrays, names)
    return [np.broadcast_to(c, (n,)) for c in cols]


def _columns(arrays: Sequence[ArrayLike], names: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """uint64 columns of shape (1,) (a scalar, left unbroadcast) or (n,), and n."""
    cols = [np.atleast_1d(_as_u64(a, nm)) for a, nm in zip(arrays, names, strict=True)]
    if any(c.ndim != 1 for c in cols):
        raise CacheError("batch columns must be scalars or 1-D arrays")
    lengths = {len(c) for c in cols} - {1}
    if len(lengths) > 1:
        raise CacheError(f"batch columns {tuple(names)} have different lengths")
    return cols, (lengths.pop() if lengths else 1)


def set_mix(others: Sequence[np.ndarray]) -> np.ndarray:
    """Fixed mix of key columns: h = ((h ^ k) * SET_MIX), h ^= h >> 32 per column, in uint64."""
    h = np.zeros(1, dtype=_U64)
    mul, sh = np.uint64(SET_MIX), np.uint64(32)
    for k in others:
        h = (h ^ k) * mul
        h ^= h >> sh
    return h


def _tag(others: Sequence[np.ndarray], page: np.ndarray | None) -> np.ndarray:
    """32-bit digest of a key, page field last (a filter only: hits are verified on all keys)."""
    t = np.full(1, TAG_SEED, dtype=_U64)
    mul, sh = np.uint64(TAG_MIX), np.uint64(31)
    for k in [*others, *([] if page is None else [page])]:
        t = (t ^ k) * mul
        t ^= t >> sh
    return (t >> np.uint64(32)).astype(np.uint32)


# Way of the single candidate from a row of `ways` 0/1 bytes viewed as one little-endian
# integer 2^(8k): (row * C) >> 8*(ways-1) where byte ways-1-k of C is k.
_WAY_VIEW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_WAY_MAGIC = {w: sum(k << (8 * (w - 1 - k)) for k in range(w)) for w in _WAY_VIEW}


def pfn_range(addr: int, am: int) -> tuple[int, int]:
    """First and last 4-KiB page of ``addr`` aligned down to 2^am pages (spec 6.5.2.3 AM)."""
    if not 0 <= am <= 63:
        raise CacheError(f"address mask {am} outside 0..63")
    if not 0 <= addr <= M64:
        raise CacheError(f"address {addr:#x} outside 64 bits")
    first = (addr >> PAGE_SHIFT) & ~((1 << am) - 1)
    return first, min(first + (1 << am) - 1, _MAX_PFN)


def byte_pfn_range(addr: int, size_bytes: int) -> tuple[int, int]:
    """First and last 4-KiB page touched by [addr, addr + size_bytes)."""
    if size_bytes <= 0 or not 0 <= addr <= M64:
        raise CacheError(f"invalid range addr={addr:#x} size={size_bytes}")
    return addr >> PAGE_SHIFT, min((addr + size_bytes - 1) >> PAGE_SHIFT, _MAX_PFN)


def _overlaps(first_pfn: np.ndarray, span_shift: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Entries covering pages [first_pfn, first_pfn + 2^span_shift) that meet [lo, hi]."""
    last = first_pfn + ((np.uint64(1) << span_shift) - np.uint64(1))
    return (first_pfn <= np.uint64(hi)) & (last >= np.uint64(lo))


# --- the generic store -----------------------------------------------------------------------
class SetAssocCache:
    """A vectorized set-associative tag store with LRU replacement within a set.

    State: numpy arrays of shape (sets, ways): ``valid``, one uint64 column per key field, one
    column per value field, and ``stamp`` (int64 last use). The set of a key is a fixed hash:
    ``(page ^ set_mix(other keys)) % sets`` where ``page`` is the ``page_field`` key (0 when
    there is none), so consecutive pages of one context fall in consecutive sets.

    Batch semantics (host_iommu/reference_cache.py implements the same, one request at a time):

    - ``lookup``: every request is looked up against the state at the start of the call; a hit
      refreshes its way's stamp to ``clock + request index``, so the last use in the batch
      wins. Then ``clock += n``. (``lookup_first`` probes several keys per request in order
      and uses the first that hits; only that way is refreshed.)
    - ``fill``: applied in request order exactly as a sequential loop: a present key has its
      value replaced and stamp set to ``clock + i``; otherwise the lowest-index invalid way is
      used, else the way with the smallest stamp is evicted (counted). Then ``clock += n``.
    - ``invalidate(mask_fn)``: ``mask_fn`` gets a dict of all (sets, ways) key and value
      columns and returns a boolean array; every valid entry where it is true is dropped.

    ``entries == 0`` disables the cache: every lookup misses, fills are dropped (not counted).
    Counters: hits, misses, fills, evictions, invalidated.
    """

    def __init__(self, entries: int, ways: int, key_fields: tuple[str, ...],
                 value_fields: Mapping[str, np.dtype], *, page_field: str | None = None) -> None:
        if entries < 0 or ways < 1 or entries % ways:
            raise ValueError(f"entries={entries} must be a non-negative multiple of ways={ways}")
        if not key_fields or len(set(key_fields) | set(value_fields)) != (
                len(key_fields) + len(value_fields)):
            raise ValueError("key and value field names must be distinct and non-empty")
        if page_field is not None and page_field not in key_fields:
            raise ValueError(f"page_field {page_field!r} is not a key field")
        self.entries, self.ways = entries, ways
        self.sets = entries // ways
        self.key_fields = tuple(key_fields)
        self.value_fields = {k: np.dtype(v) for k, v in value_fields.items()}
        self._page_pos = None if page_field is None else self.key_fields.index(page_field)
        shape = (self.sets, ways)
        self.valid = np.zeros(shape, dtype=bool)
        self.keys = {k: np.zeros(shape, dtype=_U64) for k in self.key_fields}
        self.values = {k: np.zeros(shape, dtype=d) for k, d in self.value_fields.items()}
        self.stamp = np.zeros(shape, dtype=np.int64)
        # An invalid way holds the tag of its keys XOR 1, so it never verifies (see _probe).
        zero = [np.zeros(1, dtype=_U64)] * len(self.key_fields)
        self._tags = np.full(shape, self._tags_of(zero, 1)[0] ^ np.uint32(1), dtype=np.uint32)
        self.clock = 0
        self.hits = self.misses = self.fills = self.evictions = self.invalidated = 0

    # --- placement ---
    def set_index(self, *keys: ArrayLike) -> np.ndarray:
        """The set each key falls in (int64); empty result when the cache is disabled."""
        cols = _batch(keys, self.key_fields)
        return self._set_index(cols, len(cols[0]))

    def _split(self, cols: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
        pp = self._page_pos
        return [c for j, c in enumerate(cols) if j != pp], None if pp is None else cols[pp]

    def _set_index(self, cols: Sequence[np.ndarray], n: int) -> np.ndarray:
        """Set of each key (int64, length n); columns may be (1,) or (n,)."""
        if self.sets == 0:
            return np.zeros(n, dtype=np.int64)
        others, page = self._split(cols)
        h = set_mix(others)
        if page is not None:
            h = h ^ page
        if self.sets & (self.sets - 1) == 0:
            h = h & np.uint64(self.sets - 1)
        else:
            h = h % np.uint64(self.sets)
        return np.broadcast_to(h, (n,)).astype(np.int64)

    def _tags_of(self, cols: Sequence[np.ndarray], n: int) -> np.ndarray:
        others, page = self._split(cols)
        return np.broadcast_to(_tag(others, page), (n,))

    # --- lookup ---
    def _probe(self, cols: Sequence[np.ndarray], rows: np.ndarray, n: int) -> np.ndarray:
        """Way of each key in the current state, or -1 (vectorized, exact).

        Candidates are the ways whose 32-bit tag matches; a single candidate is verified on
        every key column. An invalid way holds the tag of its keys XOR 1 (see ``_drop``), so
        a way whose keys equal the request's and whose tag matched is valid. Rows with
        several candidates are compared in full.
        """
        tag = self._tags_of(cols, n)
        cand = np.take(self._tags, rows, axis=0) == tag[:, None]     # (n, ways)
        view = _WAY_VIEW.get(self.ways)
        if view is not None:
            bits = cand.view(view).reshape(n)
            multi = np.flatnonzero(bits & (bits - view(1)))
            way = ((bits * view(_WAY_MAGIC[self.ways])) >> view(8 * (self.ways - 1)))
            # meaningful for one candidate only; rows with several are redone below
            way = np.minimum(way, view(self.ways - 1)).astype(np.int64)
            ok = bits != 0
        else:
            way = cand.argmax(axis=1)
            multi = np.flatnonzero(np.count_nonzero(cand, axis=1) > 1)
            ok = cand[np.arange(n), way]
        flat = rows * self.ways + way
        for name, c in zip(self.key_fields, cols, strict=True):
            ok &= np.take(self.keys[name].reshape(-1), flat) == c
        out = np.where(ok, way, -1)
        if multi.size:  # a 32-bit tag collision within a set: compare fully
            r = rows[multi]
            m = self.valid[r]
            for name, c in zip(self.key_fields, cols, strict=True):
                m &= self.keys[name][r] == (c if c.shape[0] == 1 else c[multi])[:, None]
            out[multi] = np.where(m.any(axis=1), m.argmax(axis=1), -1)
        return out

    def lookup_first(self, probes: Sequence[Probe], n: int | None = None,
                     active: Sequence[np.ndarray | None] | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Probe each request with ``probes[0]``, then ``probes[1]`` where it missed, ...

        A probe is a sequence of key columns, or a function ``f(sel)`` returning the key
        columns of the requests ``sel`` (an index array; None for all), so later probes are
        computed only for the requests still missing. A request is not probed with
        ``probes[p]`` where ``active[p]`` is false. Returns (hit, which probe hit or -1,
        values with zeros on misses); counts one hit or miss per request and refreshes only
        the way that hit (snapshot semantics of ``lookup``).
        """
        if n is None:
            lengths = {m for p in probes if not callable(p)
                       for m in [_columns(p, self.key_fields)[1]]} - {1}
            if len(lengths) > 1:
                raise CacheError("probes of one lookup have different lengths")
            n = lengths.pop() if lengths else 1
        which = np.full(n, -1, dtype=np.int64)
        flat_hit = np.zeros(n, dtype=np.int64)
        pending: np.ndarray | None = None  # None: every request still pending
        for p, probe in enumerate(probes if self.sets else ()):
            sel = None if pending is None else np.flatnonzero(pending)
            if active is not None and active[p] is not None:
                on = np.broadcast_to(np.asarray(active[p], dtype=bool), (n,))
                sel = np.flatnonzero(on) if sel is None else sel[on[sel]]
            m = n if sel is None else sel.size
            if m == 0:
                continue
            if callable(probe):
                cols, _ = _columns(probe(sel), self.key_fields)
            else:
                cols, _ = _columns(probe, self.key_fields)
                if sel is not None:
                    cols = [c if c.shape[0] == 1 else c[sel] for c in cols]
            rows = self._set_index(cols, m)
            way = self._probe(cols, rows, m)
            got = way >= 0
            if sel is None and got.all():
                which[:] = p
                flat_hit = rows * self.ways + way
                pending = np.zeros(n, dtype=bool)
                break
            idx = np.flatnonzero(got) if sel is None else sel[got]
            which[idx] = p
            flat_hit[idx] = rows[got] * self.ways + way[got]
            if pending is None:
                pending = np.ones(n, dtype=bool)
            pending[idx] = False
        hit = which >= 0
        n_hit = int(np.count_nonzero(hit))
        hit_idx = None if n_hit == n else np.flatnonzero(hit)
        flat = flat_hit if hit_idx is None else flat_hit[hit_idx]
        vals = {}
        for name, col in self.values.items():
            if hit_idx is None:
                vals[name] = np.take(col.reshape(-1), flat)
            else:
                vals[name] = np.zeros(n, dtype=col.dtype)
                vals[name][hit_idx] = np.take(col.reshape(-1), flat)
        if n_hit:
            stamps = self.clock + (np.arange(n) if hit_idx is None else hit_idx)
            np.maximum.at(self.stamp.reshape(-1), flat, stamps)
        self.hits += n_hit
        self.misses += n - n_hit
        self.clock += n
        return hit, which, vals

    def lookup(self, *keys: ArrayLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Look a batch of keys up: (hit, values with zeros on misses)."""
        hit, _, vals = self.lookup_first([keys])
        return hit, vals

    # --- fill ---
    def fill(self, *keys: ArrayLike, **values: ArrayLike) -> None:
        """Insert or replace a batch of entries, exactly as a sequential loop in request order."""
        if set(values) != set(self.value_fields):
            raise CacheError(f"fill needs values {sorted(self.value_fields)}, got {sorted(values)}")
        names = list(self.key_fields) + list(self.value_fields)
        cols = _batch(list(keys) + [values[k] for k in self.value_fields], names)
        nk = len(self.key_fields)
        kcols = cols[:nk]
        vcols = {name: _as_dtype(c, d, name) for c, (name, d) in
                 zip(cols[nk:], self.value_fields.items(), strict=True)}
        n = len(kcols[0])
        if self.sets == 0 or n == 0:
            self.clock += n
            return
        rows = self._set_index(kcols, n)
        tags = self._tags_of(kcols, n)
        # Requests to different sets are independent; round r applies the r-th request of each
        # set, so every round touches a set at most once and keeps per-set request order.
        order = np.argsort(rows, kind="stable")
        srows = rows[order]
        start = np.ones(n, dtype=bool)
        start[1:] = srows[1:] != srows[:-1]
        pos = np.arange(n)
        rank = pos - np.maximum.accumulate(np.where(start, pos, 0))
        for r in range(int(rank.max()) + 1):
            sel = order[rank == r]
            self._fill_round(sel, rows[sel], [c[sel] for c in kcols],
                             {k: v[sel] for k, v in vcols.items()}, tags[sel])
        self.fills += n
        self.clock += n

    def _fill_round(self, idx: np.ndarray, rows: np.ndarray, kcols: list[np.ndarray],
                    vcols: dict[str, np.ndarray], tags: np.ndarray) -> None:
        valid = self.valid[rows]
        same = valid.copy()
        for name, c in zip(self.key_fields, kcols, strict=True):
            same &= self.keys[name][rows] == c[:, None]
        present = same.any(axis=1)
        free = ~valid
        has_free = free.any(axis=1)
        way = np.where(present, same.argmax(axis=1),
                       np.where(has_free, free.argmax(axis=1),
                                self.stamp[rows].argmin(axis=1)))
        self.evictions += int(np.count_nonzero(~present & ~has_free))
        self.valid[rows, way] = True
        for name, c in zip(self.key_fields, kcols, strict=True):
            self.keys[name][rows, way] = c
        for name, v in vcols.items():
            self.values[name][rows, way] = v
        self._tags[rows, way] = tags
        self.stamp[rows, way] = self.clock + idx

    # --- invalidation and inspection ---
    def invalidate(self, mask_fn: Callable[[dict[str, np.ndarray]], ArrayLike]) -> int:
        """Drop every valid entry where ``mask_fn(columns)`` is true; return how many."""
        cols = {**self.keys, **self.values}
        drop = np.asarray(mask_fn(cols), dtype=bool) & self.valid
        dropped = int(np.count_nonzero(drop))
        self.valid[drop] = False
        self._tags[drop] ^= np.uint32(1)
        self.invalidated += dropped
        return dropped

    def occupancy(self) -> int:
        """Number of valid entries."""
        return int(np.count_nonzero(self.valid))

    def counters(self) -> dict[str, int]:
        """hits, misses, fills, evictions, invalidated."""
        return {"hits": self.hits, "misses": self.misses, "fills": self.fills,
                "evictions": self.evictions, "invalidated": self.invalidated}

    def contents(self, layout: bool = False) -> list[tuple[int, ...]]:
        """Sorted valid entries as (keys..., values...); with ``layout``: (set, way, stamp, ...)."""
        rows, ways = np.nonzero(self.valid)
        cols = [self.keys[k][rows, ways] for k in self.key_fields]
        cols += [self.values[k][rows, ways] for k in self.value_fields]
        if layout:
            cols = [rows, ways, self.stamp[rows, ways], *cols]
        return sorted(zip(*[c.tolist() for c in cols], strict=True))


# --- IOTLB and device-TLB: leaf translations tagged by page number and page size -------------
_ORDER_SHIFT = np.array([PAGE_SHIFT + LEVEL_STRIDE * o for o in PAGE_ORDERS], dtype=_U64)
_ORDER_SPAN = np.array([LEVEL_STRIDE * o for o in PAGE_ORDERS], dtype=_U64)  # log2 4K pages


def _leaf_lookup(cache: SetAssocCache, ctx: Sequence[ArrayLike], names: Sequence[str],
                 addr: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Probe 4K, then 2M, then 1G entries; (hit, hpa, order, values)."""
    cols, n = _columns([*ctx, addr], [*names, "addr"])
    ctx_cols, a = cols[:-1], np.broadcast_to(cols[-1], (n,))
    def probe(o: int) -> Probe:
        def cols(sel: np.ndarray | None) -> list[np.ndarray]:
            sub = [c if sel is None or c.shape[0] == 1 else c[sel] for c in ctx_cols]
            return [*sub, (a if sel is None else a[sel]) >> _ORDER_SHIFT[o], np.uint64(o)]
        return cols

    probes = [probe(o) for o in PAGE_ORDERS]
    hit, which, vals = cache.lookup_first(probes, n)
    order = np.where(hit, which, 0).astype(np.uint8)
    offset = a & ((np.uint64(1) << _ORDER_SHIFT[order]) - np.uint64(1))
    hpa = np.where(hit, vals["hpa_page"] + offset, np.uint64(0))
    return hit, hpa, order, vals


def _leaf_fill(cache: SetAssocCache, ctx: Sequence[ArrayLike], names: Sequence[str],
               addr: ArrayLike, order: ArrayLike, hpa_page: ArrayLike, perm: ArrayLike,
               **extra: ArrayLike) -> None:
    cols = _batch([*ctx, addr, order, hpa_page, perm], [*names, "addr", "order", "hpa_page",
                                                        "perm"])
    *ctx_cols, a, o, hpa, p = cols
    if o.size and int(o.max()) > PAGE_ORDERS[-1]:
        raise CacheError(f"page order must be one of {PAGE_ORDERS}")
    if np.any(hpa & ((np.uint64(1) << _ORDER_SHIFT[o]) - np.uint64(1))):
        raise CacheError("hpa_page is not aligned to the page size of its order")
    if p.size and int(p.max()) > PERM_MASK:
        raise CacheError("perm has bits other than PERM_R | PERM_W")
    cache.fill(*ctx_cols, a >> _ORDER_SHIFT[o], o, hpa_page=hpa, perm=p, **extra)


def _leaf_overlaps(c: Mapping[str, np.ndarray], lo: int, hi: int) -> np.ndarray:
    span = c["order"] * np.uint64(LEVEL_STRIDE)
    return _overlaps(c["vpn_at_order"] << span, span, lo, hi)


class IOTLB:
    """The IOTLB (VT-d spec 6.2.3): leaf translations tagged (did, pasid, page number, size).

    A translation is cached at its own page size; ``lookup`` probes 4K, 2M then 1G entries and
    uses the first hit. The PGTT of the PASID entry that produced it is kept, because the
    invalidation descriptors select by it (spec 6.5.2.3 / 6.5.2.4, Linux cache.c): 0x2 IOTLB
    invalidations act on second-level-only and pass-through entries by address, and on every
    first-level and nested entry of the domain whatever the address (those are tagged by the
    first-level input address, which a second-level address cannot name); 0x6 PASID-based
    invalidations act on first-level and nested entries. The hint IH only
    concerns the paging-structure caches: the caller keeps PWC entries when IH=1.
    """

    KEY_FIELDS = ("did", "pasid", "vpn_at_order", "order")
    VALUE_FIELDS: ClassVar[dict[str, np.dtype]] = {
        "hpa_page": np.dtype(np.uint64), "perm": np.dtype(np.uint8), "pgtt": np.dtype(np.uint8)}

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = SetAssocCache(entries, ways, self.KEY_FIELDS, self.VALUE_FIELDS,
                                   page_field="vpn_at_order")

    def lookup(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hit, hpa, perm, order, pgtt) per request; zeros where it missed."""
        hit, hpa, order, vals = _leaf_lookup(self.cache, [did, pasid], ("did", "pasid"), addr)
        return hit, hpa, vals["perm"], order, vals["pgtt"]

    def fill(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, order: ArrayLike,
             hpa_page: ArrayLike, perm: ArrayLike, pgtt: ArrayLike) -> None:
        """Cache translations of ``addr`` at page size ``order`` (hpa_page: the page's base)."""
        g = _as_u64(pgtt, "pgtt")
        if g.size and (int(g.min()) < PGTT_FL_ONLY or int(g.max()) > PGTT_PT):
            raise CacheError("pgtt must be 1..4")
        _leaf_fill(self.cache, [did, pasid], ("did", "pasid"), addr, order, hpa_page, perm,
                   pgtt=g)

    def inv_global(self) -> int:
        """0x2 global: every entry."""
        return self.cache.invalidate(lambda c: np.ones(c["did"].shape, dtype=bool))

    def inv_domain(self, did: int) -> int:
        """0x2 domain-selective: every entry of ``did``, any PASID, any PGTT."""
        return self.cache.invalidate(lambda c: c["did"] == _scalar(did, "did"))

    def inv_page(self, did: int, addr: int, am: int, ih: int = 0) -> int:
        """0x2 page-selective: SL-only/PT entries of ``did`` overlapping 2^am pages at
        ``addr``, plus every first-level and nested entry of ``did``."""
        lo, hi = pfn_range(addr, am)

        def mask(c: Mapping[str, np.ndarray]) -> np.ndarray:
            g = c["pgtt"]
            sl = ((g == PGTT_SL_ONLY) | (g == PGTT_PT)) & _leaf_overlaps(c, lo, hi)
            fl = (g == PGTT_NESTED) | (g == PGTT_FL_ONLY)
            return (c["did"] == _scalar(did, "did")) & (sl | fl)
        return self.cache.invalidate(mask)

    def inv_pasid(self, did: int, pasid: int) -> int:
        """0x6 all-in-PASID: first-level and nested entries of (did, pasid)."""
        return self.cache.invalidate(lambda c: self._fl_of(c, did, pasid))

    def inv_pasid_page(self, did: int, pasid: int, addr: int, am: int, ih: int = 0) -> int:
        """0x6 page-selective-within-PASID: FL/nested entries of (did, pasid) overlapping."""
        lo, hi = pfn_range(addr, am)
        return self.cache.invalidate(
            lambda c: self._fl_of(c, did, pasid) & _leaf_overlaps(c, lo, hi))

    @staticmethod
    def _fl_of(c: Mapping[str, np.ndarray], did: int, pasid: int) -> np.ndarray:
        g = c["pgtt"]
        return ((c["did"] == _scalar(did, "did")) & (c["pasid"] == _scalar(pasid, "pasid"))
                & ((g == PGTT_FL_ONLY) | (g == PGTT_NESTED)))


class DeviceTLB:
    """Device-TLBs of all ATS devices in one store (VT-d spec 6.2.7, PCIe ATS): key (sid,
    pasid, page number, size). ``inv`` is descriptor 0x3 (pasid NO_PASID: the device's
    requests without PASID, which this model tags PASID 0) or 0x8 (one PASID; its global flag
    gives pasid None: every PASID of the device)."""

    KEY_FIELDS = ("sid", "pasid", "vpn_at_order", "order")
    VALUE_FIELDS: ClassVar[dict[str, np.dtype]] = {
        "hpa_page": np.dtype(np.uint64), "perm": np.dtype(np.uint8)}

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = SetAssocCache(entries, ways, self.KEY_FIELDS, self.VALUE_FIELDS,
                                   page_field="vpn_at_order")

    def lookup(self, sid: ArrayLike, pasid: ArrayLike, addr: ArrayLike
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hit, hpa, perm, order) per request; zeros where it missed."""
        hit, hpa, order, vals = _leaf_lookup(self.cache, [sid, pasid], ("sid", "pasid"), addr)
        return hit, hpa, vals["perm"], order

    def fill(self, sid: ArrayLike, pasid: ArrayLike, addr: ArrayLike, order: ArrayLike,
             hpa_page: ArrayLike, perm: ArrayLike) -> None:
        """Cache translation completions the device received."""
        _leaf_fill(self.cache, [sid, pasid], ("sid", "pasid"), addr, order, hpa_page, perm)

    def inv(self, sid: int, pasid: int | None, addr: int, size_bytes: int) -> int:
        """Drop entries of device ``sid`` (and ``pasid`` unless None) meeting the byte range."""
        lo, hi = byte_pfn_range(addr, size_bytes)

        def mask(c: Mapping[str, np.ndarray]) -> np.ndarray:
            m = (c["sid"] == _scalar(sid, "sid")) & _leaf_overlaps(c, lo, hi)
            return m if pasid is None else m & (c["pasid"] == _scalar(pasid, "pasid"))
        return self.cache.invalidate(mask)

    def inv_global(self) -> int:
        """Every entry of every device."""
        return self.cache.invalidate(lambda c: np.ones(c["sid"].shape, dtype=bool))


# --- paging-structure caches ------------------------------------------------------------------
class PagingStructureCache:
    """Non-leaf entries of one stage (VT-d spec 6.2.4): key (did, pasid, level, prefix).

    The entry AT level L (2..5) points to a level L-1 table and is selected by the address
    bits above what that table resolves: ``prefix = addr >> (12 + 9 * (L - 1))``; it covers
    2^(9*(L-1)) 4-KiB pages. Second-level entries are tagged pasid 0 (shared by all PASIDs).
    Page-selective invalidations with IH=1 must not call ``inv_range`` (the caller's choice).
    """

    KEY_FIELDS = ("did", "pasid", "level", "prefix")
    VALUE_FIELDS: ClassVar[dict[str, np.dtype]] = {"entry": np.dtype(np.uint64)}

    def __init__(self, entries: int, ways: int, stage: str) -> None:
        if stage not in ("fl", "sl"):
            raise CacheError(f"stage must be 'fl' or 'sl', not {stage!r}")
        self.stage = stage
        self.cache = SetAssocCache(entries, ways, self.KEY_FIELDS, self.VALUE_FIELDS,
                                   page_field="prefix")

    def _pasid(self, pasid: ArrayLike) -> ArrayLike:
        return 0 if self.stage == "sl" else pasid

    @staticmethod
    def _levels(level: ArrayLike) -> np.ndarray:
        lv = np.atleast_1d(_as_u64(level, "level"))
        if lv.size and (int(lv.min()) < PWC_MIN_LEVEL or int(lv.max()) > PWC_MAX_LEVEL):
            raise CacheError(f"level must be {PWC_MIN_LEVEL}..{PWC_MAX_LEVEL}")
        return lv

    def lookup(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, level: ArrayLike
               ) -> tuple[np.ndarray, np.ndarray]:
        """(hit, entry) for the entry at ``level`` on the walk of ``addr``."""
        did, pasid, a, lv = _batch([did, self._pasid(pasid), addr, self._levels(level)],
                                   ("did", "pasid", "addr", "level"))
        prefix = a >> (np.uint64(PAGE_SHIFT - LEVEL_STRIDE) + np.uint64(LEVEL_STRIDE) * lv)
        hit, vals = self.cache.lookup(did, pasid, lv, prefix)
        return hit, vals["entry"]

    def lookup_deepest(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike,
                       levels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Per request the lowest cached level L in 2..levels: (L or 0, entry at L)."""
        lvmax = self._levels(levels)
        did, pasid, a, lvmax = _batch([did, self._pasid(pasid), addr, lvmax],
                                      ("did", "pasid", "addr", "levels"))
        top = int(lvmax.max()) if lvmax.size else PWC_MIN_LEVEL
        probes, active = [], []
        for lv in range(PWC_MIN_LEVEL, top + 1):
            shift = np.uint64(PAGE_SHIFT + LEVEL_STRIDE * (lv - 1))
            probes.append([did, pasid, np.uint64(lv), a >> shift])
            active.append(lvmax >= np.uint64(lv))
        hit, which, vals = self.cache.lookup_first(probes, len(a), active)
        level_hit = np.where(hit, which + PWC_MIN_LEVEL, 0)
        return level_hit, vals["entry"]

    def fill(self, did: ArrayLike, pasid: ArrayLike, addr: ArrayLike, level: ArrayLike,
             entry: ArrayLike) -> None:
        """Cache the entry at ``level`` on the walk of ``addr``."""
        did, pasid, a, lv, e = _batch([did, self._pasid(pasid), addr, self._levels(level),
                                       entry], ("did", "pasid", "addr", "level", "entry"))
        prefix = a >> (np.uint64(PAGE_SHIFT - LEVEL_STRIDE) + np.uint64(LEVEL_STRIDE) * lv)
        self.cache.fill(did, pasid, lv, prefix, entry=e)

    def inv_global(self) -> int:
        """Every entry."""
        return self.cache.invalidate(lambda c: np.ones(c["did"].shape, dtype=bool))

    def inv_domain(self, did: int) -> int:
        """Every entry of ``did``."""
        return self.cache.invalidate(lambda c: c["did"] == _scalar(did, "did"))

    def inv_pasid(self, did: int, pasid: int) -> int:
        """Every entry of (did, pasid); first-level caches only."""
        if self.stage != "fl":
            raise CacheError("second-level paging-structure entries are not tagged by PASID")
        return self.cache.invalidate(
            lambda c: (c["did"] == _scalar(did, "did")) & (c["pasid"] == _scalar(pasid, "pasid")))

    def inv_range(self, did: int, pasid: int | None, addr: int, am: int) -> int:
        """Entries of ``did`` (and ``pasid`` unless None) whose range meets 2^am pages."""
        lo, hi = pfn_range(addr, am)

        def mask(c: Mapping[str, np.ndarray]) -> np.ndarray:
            span = (c["level"] - np.uint64(1)) * np.uint64(LEVEL_STRIDE)
            m = (c["did"] == _scalar(did, "did")) & _overlaps(c["prefix"] << span, span, lo, hi)
            if pasid is not None:
                m &= c["pasid"] == _scalar(self._pasid(pasid), "pasid")
            return m
        return self.cache.invalidate(mask)


# --- context and PASID caches -------------------------------------------------------------------
def _words(words: ArrayLike, count: int, n: int) -> list[np.ndarray]:
    w = np.atleast_2d(_as_u64(words, "words"))
    if w.shape[-1] != count:
        raise CacheError(f"an entry is {count} uint64 words")
    w = np.broadcast_to(w, (n, count)) if w.shape[0] == 1 else w
    if w.shape[0] != n:
        raise CacheError("words and keys have different batch lengths")
    return [w[:, i] for i in range(count)]


class PasidCache:
    """The PASID-cache (VT-d spec 6.2.2): PASID-table entries keyed (sid, pasid).

    Invalidations: 0x7 granularities (global, domain-selective, PASID-selective) and
    ``inv_sid`` for a context-cache device-selective invalidation, which also drops the PASID
    entries cached for that device.
    """

    WORDS = tuple(f"w{i}" for i in range(PASID_ENTRY_WORDS))

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = SetAssocCache(entries, ways, ("sid", "pasid"),
                                   {"did": np.dtype(np.uint16)} | dict.fromkeys(self.WORDS, _U64))

    def lookup(self, sid: ArrayLike, pasid: ArrayLike) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
        """(hit, did, words of shape (n, 8)); zeros where it missed."""
        hit, v = self.cache.lookup(sid, pasid)
        return hit, v["did"], np.stack([v[w] for w in self.WORDS], axis=1)

    def fill(self, sid: ArrayLike, pasid: ArrayLike, did: ArrayLike, words: ArrayLike) -> None:
        """Cache PASID entries (words: (8,) or (n, 8) uint64)."""
        s, p, d = _batch([sid, pasid, did], ("sid", "pasid", "did"))
        ws = _words(words, PASID_ENTRY_WORDS, len(s))
        self.cache.fill(s, p, did=d, **dict(zip(self.WORDS, ws, strict=True)))

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda c: np.ones(c["sid"].shape, dtype=bool))

    def inv_domain(self, did: int) -> int:
        return self.cache.invalidate(lambda c: c["did"] == _scalar(did, "did"))

    def inv_pasid(self, did: int, pasid: int) -> int:
        return self.cache.invalidate(
            lambda c: (c["did"] == _scalar(did, "did")) & (c["pasid"] == _scalar(pasid, "pasid")))

    def inv_sid(self, sid: int) -> int:
        return self.cache.invalidate(lambda c: c["sid"] == _scalar(sid, "sid"))

    def inv_entry(self, sid: int, pasid: int) -> int:
        """Drop the entry of one (sid, pasid), whatever DID it was cached with."""
        return self.cache.invalidate(
            lambda c: (c["sid"] == _scalar(sid, "sid")) & (c["pasid"] == _scalar(pasid, "pasid")))


class ContextCache:
    """The context-cache (VT-d spec 6.2.1): scalable-mode context entries keyed by sid."""

    WORDS = tuple(f"w{i}" for i in range(CONTEXT_ENTRY_WORDS))

    def __init__(self, entries: int, ways: int) -> None:
        self.cache = SetAssocCache(entries, ways, ("sid",),
                                   {"did": np.dtype(np.uint16)} | dict.fromkeys(self.WORDS, _U64))

    def lookup(self, sid: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hit, did, words of shape (n, 4)); zeros where it missed."""
        hit, v = self.cache.lookup(sid)
        return hit, v["did"], np.stack([v[w] for w in self.WORDS], axis=1)

    def fill(self, sid: ArrayLike, did: ArrayLike, words: ArrayLike) -> None:
        """Cache context entries (words: (4,) or (n, 4) uint64)."""
        s, d = _batch([sid, did], ("sid", "did"))
        ws = _words(words, CONTEXT_ENTRY_WORDS, len(s))
        self.cache.fill(s, did=d, **dict(zip(self.WORDS, ws, strict=True)))

    def inv_global(self) -> int:
        return self.cache.invalidate(lambda c: np.ones(c["sid"].shape, dtype=bool))

    def inv_domain(self, did: int) -> int:
        return self.cache.invalidate(lambda c: c["did"] == _scalar(did, "did"))

    def inv_device(self, sid: int, fm: int) -> int:
        """0x1 device-selective: entries of ``sid`` with the FM-masked function bits ignored."""
        if fm not in CC_FM_SID_MASK:
            raise CacheError(f"function mask {fm} outside 0..3")
        keep = np.uint64(~CC_FM_SID_MASK[fm] & 0xFFFF)
        return self.cache.invalidate(lambda c: (c["sid"] & keep) == (_scalar(sid, "sid") & keep))
