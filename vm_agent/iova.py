"""The guest kernel's IOVA allocator: a top-down range allocator plus per-CPU magazine caches.

Follows Linux drivers/iommu/iova.c: ``IovaDomain`` is the rbtree allocator
(__alloc_and_insert_iova_range with cached_node / cached32_node / max32_alloc_size),
``IovaRcache`` the "rcache" of per-CPU magazines and a global depot (iova_rcache,
iova_cpu_rcache, iova_magazine; alloc_iova_fast / free_iova_fast).

Units: a pfn is an IOVA in granule units (IOVA >> log2(granule)); sizes are in granules
(``_pages``). Limits are inclusive, as alloc_iova's ``limit_pfn``. An IOVA held in a magazine
stays allocated in the tree, as in Linux; only a tree free makes the range free again.

The depot is the older bounded one (MAX_GLOBAL_MAGS full magazines per size class; a full
magazine that finds the depot full is freed to the tree), not the unbounded depot with delayed
reclaim of Linux 6.7+: it is deterministic without a time source.

``ArrayIovaDomain`` / ``ArrayIovaRcache`` are the same allocator with its state in int64 arrays,
worked on by the compiled kernels of vm_agent/kernels/iova.py (the building blocks of a
guest-epoch kernel). The DMA layer uses the plain classes: called once per map or unmap from
Python, a kernel's dispatch costs more than the whole dict-and-list rcache hit.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from vm_agent.kernels import iova as _k

IOVA_ANCHOR = (1 << 64) - 1          # iova.c IOVA_ANCHOR (~0UL): the anchor node's pfn
IOVA_MAG_SIZE = 127                  # iova.c: pfns a magazine holds
IOVA_RANGE_CACHE_MAX_SIZE = 6        # iova.h: log2 size classes cached (orders 0..5)
MAX_GLOBAL_MAGS = 32                 # iova.c (before 6.7): full magazines per depot
IOVA_CACHED_MAX_PAGES = 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1)   # 32: largest cached size

# size_pages (1..32) -> (size after alloc_iova_fast's rounding, rcache class = order_base_2).
# alloc_iova_fast rounds only when size < 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1); 32 is already
# a power of two, so every size up to 32 maps to a power of two and its order.
_SIZE_CLASS: tuple[tuple[int, int], ...] = (
    (0, -1),
    *((1 << (s - 1).bit_length(), (s - 1).bit_length())
      for s in range(1, IOVA_CACHED_MAX_PAGES + 1)),
)


class IovaError(Exception):
    """Bad use of the IOVA allocator: freeing what is not allocated, a bad size or CPU."""


class IovaDomain:
    """A guest DMA domain's IOVA space: allocated pfn ranges, searched top-down.

    Allocation (alloc_iova) walks backwards from a cached node, as
    __alloc_and_insert_iova_range does: first from ``cached32_node`` (limits at or below 4 GiB)
    or ``cached_node`` down to ``start_pfn``, then, if that found nothing, once more from the
    limit down to just above the cached node. A fresh domain therefore hands out the highest
    fitting range first. ``max32_alloc_size`` remembers the smallest size that failed, so a
    32-bit allocation at least that large fails at once until something below 4 GiB is freed.
    """

    def __init__(self, granule: int = 4096, start_pfn: int = 1) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise IovaError(f"granule {granule} is not a power of two")
        if start_pfn < 0:
            raise IovaError(f"start_pfn {start_pfn} is negative")
        self.granule = granule
        self.shift = granule.bit_length() - 1
        self.start_pfn = start_pfn
        self.dma_32bit_pfn = 1 << (32 - self.shift)
        self.max32_alloc_size = self.dma_32bit_pfn
        # The "rbtree": sorted pfn_lo list (bisect) and pfn_lo -> pfn_hi; the anchor is last.
        self._los: list[int] = [IOVA_ANCHOR]
        self._hi: dict[int, int] = {IOVA_ANCHOR: IOVA_ANCHOR}
        self.cached_node = IOVA_ANCHOR       # pfn_lo of the node to start searches from
        self.cached32_node = IOVA_ANCHOR
        self._rcached: set[int] = set()      # pfns now held in an IovaRcache magazine
        self.tree_allocs = 0
        self.tree_frees = 0
        self.failures = 0

    def __len__(self) -> int:
        """Allocated ranges (reserved ones included, the anchor not)."""
        return len(self._los) - 1

    def alloc_iova(self, size_pages: int, limit_pfn: int, size_aligned: bool = True) -> int | None:
        """Allocate ``size_pages`` pfns ending at or below ``limit_pfn``; the pfn_lo or None.

        With ``size_aligned`` the start is aligned to the size rounded up to a power of two.
        """
        if size_pages <= 0:
            raise IovaError(f"alloc of {size_pages} pages")
        pfn = self._alloc_range(size_pages, limit_pfn + 1, size_aligned)
        if pfn is None:
            self.failures += 1
        else:
            self.tree_allocs += 1
        return pfn

    def _alloc_range(self, size: int, limit_excl: int, size_aligned: bool) -> int | None:
        dma32 = self.dma_32bit_pfn
        if limit_excl <= dma32 and size >= self.max32_alloc_size:
            return None
        align_mask = (-1 << (size - 1).bit_length()) if size_aligned else -1
        los = self._los
        his = self._hi
        cached = self.cached32_node if limit_excl <= dma32 else self.cached_node
        i = bisect_left(los, cached)
        retry_pfn = his[cached]
        high = limit_excl
        low = self.start_pfn
        while True:
            while True:
                lo = los[i]
                if lo < high:
                    high = lo
                new_pfn = (high - size) & align_mask
                i -= 1
                if i < 0 or new_pfn < low or new_pfn > his[los[i]]:
                    break
            if high >= size and new_pfn >= low:
                break
            if low == self.start_pfn and retry_pfn < limit_excl:
                # Retry the gaps above the cached node (iova_find_limit).
                high = limit_excl
                low = retry_pfn + 1
                i = bisect_left(los, limit_excl)
                continue
            self.max32_alloc_size = size
            return None
        new_hi = new_pfn + size - 1
        los.insert(i + 1, new_pfn)
        his[new_pfn] = new_hi
        if new_hi < dma32:                   # __cached_rbnode_insert_update
            self.cached32_node = new_pfn
        else:
            self.cached_node = new_pfn
        return new_pfn

    def reserve_iova(self, pfn_lo: int, pfn_hi: int) -> None:
        """Mark [pfn_lo, pfn_hi] allocated (an MSI window, say); it is never handed out.

        Unlike Linux, which merges overlapping reservations, an overlap is an IovaError.
        """
        if not 0 <= pfn_lo <= pfn_hi < IOVA_ANCHOR:
            raise IovaError(f"bad reservation [{pfn_lo:#x}, {pfn_hi:#x}]")
        los = self._los
        i = bisect_left(los, pfn_lo)
        if los[i] <= pfn_hi or (i > 0 and self._hi[los[i - 1]] >= pfn_lo):
            raise IovaError(f"reservation [{pfn_lo:#x}, {pfn_hi:#x}] overlaps an allocation")
        los.insert(i, pfn_lo)
        self._hi[pfn_lo] = pfn_hi

    def find_iova(self, pfn: int) -> tuple[int, int] | None:
        """The allocated (pfn_lo, pfn_hi) containing ``pfn``, or None."""
        los = self._los
        i = bisect_right(los, pfn) - 1
        if i < 0:
            return None
        lo = los[i]
        hi = self._hi[lo]
        if lo == IOVA_ANCHOR or hi < pfn:
            return None
        return lo, hi

    def free_iova(self, pfn: int) -> int:
        """Free the allocation starting at ``pfn``; returns its size in pages."""
        his = self._hi
        hi = his.get(pfn)
        if hi is None or pfn == IOVA_ANCHOR:
            raise IovaError(f"free of pfn {pfn:#x}, which starts no allocation")
        if pfn in self._rcached:
            raise IovaError(f"free of pfn {pfn:#x}, which sits in an rcache magazine")
        los = self._los
        i = bisect_left(los, pfn)
        nxt = los[i + 1]                      # rb_next(free): the anchor guarantees one
        dma32 = self.dma_32bit_pfn
        # __cached_rbnode_delete_update
        c32 = self.cached32_node
        if pfn == c32 or (hi < dma32 and pfn >= c32):
            self.cached32_node = nxt
        if pfn < dma32:
            self.max32_alloc_size = dma32
        if pfn >= self.cached_node:
            self.cached_node = nxt
        del los[i]
        del his[pfn]
        self.tree_frees += 1
        return hi - pfn + 1


class IovaRcache:
    """Per-CPU magazine caches in front of an IovaDomain (iova.c "rcache").

    For each size class (1, 2, 4, ..., 32 pages) each CPU has a ``loaded`` and a ``prev``
    magazine of up to IOVA_MAG_SIZE pfns, and the class has a depot of up to MAX_GLOBAL_MAGS
    full magazines shared by all CPUs. A free pushes onto ``loaded`` (swapping with a non-full
    ``prev``, else moving the full ``loaded`` to the depot); an alloc pops from ``loaded``
    (swapping with a non-empty ``prev``, else taking a depot magazine). Magazines are LIFO, so
    an IOVA freed on a CPU is the next one that CPU allocates at that size; another CPU sees
    it only once its magazine reaches the depot.
    """

    def __init__(self, domain: IovaDomain, cpus: int) -> None:
        if cpus <= 0:
            raise IovaError(f"rcache for {cpus} CPUs")
        self.domain = domain
        self.cpus = cpus
        classes = range(IOVA_RANGE_CACHE_MAX_SIZE)
        self._loaded: list[list[list[int]]] = [[[] for _ in classes] for _ in range(cpus)]
        self._prev: list[list[list[int]]] = [[[] for _ in classes] for _ in range(cpus)]
        self._depot: list[list[list[int]]] = [[] for _ in classes]
        self.rcache_hits = 0
        self.rcache_misses = 0          # cacheable sizes the rcache could not serve
        self.depot_pushes = 0
        self.depot_pops = 0
        self.depot_overflows = 0        # full magazines freed to the tree, depot being full
        self.rcache_flushes = 0         # tree failures that emptied every cache and retried

    def alloc_iova_fast(self, cpu: int, size_pages: int, limit_pfn: int,
                        flush_rcache: bool = True) -> int | None:
        """Allocate ``size_pages`` (rounded up to a power of two if < 32) at or below
        ``limit_pfn``: from the rcache, else the tree, else (with ``flush_rcache``) free every
        cached IOVA to the tree and retry once."""
        if not 0 <= cpu < self.cpus:
            raise IovaError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
        if 0 < size_pages <= IOVA_CACHED_MAX_PAGES:
            size, order = _SIZE_CLASS[size_pages]
            loaded = self._loaded[cpu]
            mag = loaded[order]
            if not mag:                                  # __iova_rcache_get
                prev = self._prev[cpu]
                if prev[order]:
                    mag = loaded[order] = prev[order]
                    prev[order] = []
                else:
                    depot = self._depot[order]
                    if depot:
                        mag = loaded[order] = depot.pop()
                        self.depot_pops += 1
            if mag:
                pfn = _magazine_pop(mag, limit_pfn + 1 - size)
                if pfn is not None:
                    self.rcache_hits += 1
                    self.domain._rcached.discard(pfn)
                    return pfn
            self.rcache_misses += 1
        elif size_pages <= 0:
            raise IovaError(f"alloc of {size_pages} pages")
        else:
            size = size_pages
        domain = self.domain
        pfn = domain.alloc_iova(size, limit_pfn, True)
        if pfn is None and flush_rcache:
            self.rcache_flushes += 1
            for c in range(self.cpus):
                self.free_cpu_cached_iovas(c)
            self.free_global_cached_iovas()
            pfn = domain.alloc_iova(size, limit_pfn, True)
        return pfn

    def free_iova_fast(self, cpu: int, pfn: int, size_pages: int) -> None:
        """Give back an allocation of ``size_pages`` (the size asked of alloc_iova_fast)."""
        if not 0 <= cpu < self.cpus:
            raise IovaError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
        domain = self.domain
        hi = domain._hi.get(pfn)
        if hi is None or pfn == IOVA_ANCHOR or pfn in domain._rcached:
            raise IovaError(f"free of pfn {pfn:#x}, which is not allocated")
        if not 0 < size_pages <= IOVA_CACHED_MAX_PAGES:
            if hi - pfn + 1 != size_pages:
                raise IovaError(f"free of pfn {pfn:#x} with size {size_pages}, "
                                f"allocated {hi - pfn + 1}")
            domain.free_iova(pfn)
            return
        size, order = _SIZE_CLASS[size_pages]
        if hi - pfn + 1 != size:
            raise IovaError(f"free of pfn {pfn:#x} with size {size_pages}, "
                            f"allocated {hi - pfn + 1}")
        loaded = self._loaded[cpu]
        mag = loaded[order]
        to_free = None
        if len(mag) >= IOVA_MAG_SIZE:                    # __iova_rcache_insert
            prev = self._prev[cpu]
            if len(prev[order]) < IOVA_MAG_SIZE:
                loaded[order], prev[order] = prev[order], mag
            else:
                depot = self._depot[order]
                if len(depot) < MAX_GLOBAL_MAGS:
                    depot.append(mag)
                    self.depot_pushes += 1
                else:
                    to_free = mag
                    self.depot_overflows += 1
                loaded[order] = []
            mag = loaded[order]
        mag.append(pfn)
        domain._rcached.add(pfn)
        if to_free is not None:
            self._magazine_free_pfns(to_free)

    def free_cpu_cached_iovas(self, cpu: int) -> None:
        """Free one CPU's loaded and prev magazines to the tree."""
        for order in range(IOVA_RANGE_CACHE_MAX_SIZE):
            self._magazine_free_pfns(self._loaded[cpu][order])
            self._magazine_free_pfns(self._prev[cpu][order])

    def free_global_cached_iovas(self) -> None:
        """Free every depot magazine to the tree."""
        for depot in self._depot:
            for mag in depot:
                self._magazine_free_pfns(mag)
            depot.clear()

    def cached(self) -> int:
        """IOVAs now held in magazines (per-CPU and depot)."""
        return len(self.domain._rcached)

    def depot_size(self, size_pages: int) -> int:
        """Full magazines in the depot of the class serving ``size_pages``."""
        return len(self._depot[_SIZE_CLASS[size_pages][1]])

    def _magazine_free_pfns(self, mag: list[int]) -> None:
        domain = self.domain
        rcached = domain._rcached
        for pfn in mag:
            rcached.discard(pfn)
            domain.free_iova(pfn)
        mag.clear()


def _magazine_pop(mag: list[int], max_pfn: int) -> int | None:
    """iova_magazine_pop: the topmost pfn <= max_pfn, swapped out with the top; else None."""
    pfn = mag[-1]
    if pfn <= max_pfn:
        return mag.pop()
    for i in range(len(mag) - 2, -1, -1):
        pfn = mag[i]
        if pfn <= max_pfn:
            mag[i] = mag.pop()
            return pfn
    return None


# --- the same allocator over array state (vm_agent/kernels/iova.py) ----------------------------
_PFN_LIMIT = _k.PFN_LIMIT


def _stat(slot: int, doc: str) -> property:
    return property(lambda self: int(self._st[slot]), doc=doc)


class ArrayIovaDomain:
    """``IovaDomain`` with its state in arrays, worked on by the compiled kernels.

    The tree is ``_tree`` (int64[cap, 3]: pfn_lo, pfn_hi, in-a-magazine mark per node, sorted,
    the anchor last, free rows on both sides) and the scalars ``_st`` (kernels/iova.py S_*), the
    arrays a guest-epoch kernel works on. Same calls, results, counters and refusals as
    ``IovaDomain``, except that a limit, size or reservation beyond 2^62 pfns (2^74 bytes at
    4 KiB) is an IovaError.
    """

    tree_allocs = _stat(_k.S_TREE_ALLOCS, "tree allocations that succeeded")
    tree_frees = _stat(_k.S_TREE_FREES, "ranges freed to the tree")
    failures = _stat(_k.S_FAILURES, "tree allocations that found no room")
    max32_alloc_size = _stat(_k.S_MAX32, "smallest size a 32-bit allocation failed at")

    def __init__(self, granule: int = 4096, start_pfn: int = 1) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise IovaError(f"granule {granule} is not a power of two")
        if start_pfn < 0:
            raise IovaError(f"start_pfn {start_pfn} is negative")
        if start_pfn >= _PFN_LIMIT:
            raise IovaError(f"start_pfn {start_pfn:#x} beyond the 2^62-pfn space")
        self.granule = granule
        self.shift = granule.bit_length() - 1
        self.start_pfn = start_pfn
        self.dma_32bit_pfn = 1 << (32 - self.shift)
        self._tree, self._st = _k.new_state(start_pfn, self.dma_32bit_pfn)
        self._has_rcache = False

    def __len__(self) -> int:
        """Allocated ranges (reserved ones included, the anchor not)."""
        return int(self._st[_k.S_NODES]) - 1

    @property
    def cached_node(self) -> int:
        """pfn_lo of the node 64-bit searches start from (IOVA_ANCHOR for the anchor)."""
        return _unanchor(int(self._st[_k.S_CACHED]))

    @property
    def cached32_node(self) -> int:
        """pfn_lo of the node 32-bit searches start from (IOVA_ANCHOR for the anchor)."""
        return _unanchor(int(self._st[_k.S_CACHED32]))

    def alloc_iova(self, size_pages: int, limit_pfn: int, size_aligned: bool = True) -> int | None:
        """Allocate ``size_pages`` pfns ending at or below ``limit_pfn``; the pfn_lo or None."""
        _check_range(limit_pfn, size_pages)
        while True:
            pfn = _k.alloc_iova(self._tree, self._st, size_pages, limit_pfn, size_aligned)
            if pfn >= 0:
                return pfn
            if pfn == _k.NONE:
                return None
            if pfn != _k.ROOM:
                raise IovaError(f"alloc of {size_pages} pages")
            self._grow()

    def reserve_iova(self, pfn_lo: int, pfn_hi: int) -> None:
        """Mark [pfn_lo, pfn_hi] allocated; an overlap is an IovaError (see IovaDomain)."""
        if not 0 <= pfn_lo <= pfn_hi < _PFN_LIMIT:
            raise IovaError(f"bad reservation [{pfn_lo:#x}, {pfn_hi:#x}]")
        while (code := _k.reserve_iova(self._tree, self._st, pfn_lo, pfn_hi)) == _k.ROOM:
            self._grow()
        if code < 0:
            raise IovaError(f"reservation [{pfn_lo:#x}, {pfn_hi:#x}] overlaps an allocation")

    def find_iova(self, pfn: int) -> tuple[int, int] | None:
        """The allocated (pfn_lo, pfn_hi) containing ``pfn``, or None."""
        if not -_PFN_LIMIT < pfn < _PFN_LIMIT:
            return None              # every node but the anchor lies below 2^62
        i = _k.find_iova(self._tree, self._st, pfn)
        if i < 0:
            return None
        return int(self._tree[i, _k.T_LO]), int(self._tree[i, _k.T_HI])

    def free_iova(self, pfn: int) -> int:
        """Free the allocation starting at ``pfn``; returns its size in pages."""
        size = _k.free_iova(self._tree, self._st, pfn) if 0 <= pfn < _PFN_LIMIT else _k.E_NOT_ALLOC
        if size >= 0:
            return size
        if size == _k.E_IN_MAG:
            raise IovaError(f"free of pfn {pfn:#x}, which sits in an rcache magazine")
        raise IovaError(f"free of pfn {pfn:#x}, which starts no allocation")

    def _grow(self) -> None:
        self._tree = _k.grown(self._tree, self._st)


class ArrayIovaRcache:
    """``IovaRcache`` over an ``ArrayIovaDomain``: magazines and depot in ``_mag`` (one row a
    magazine, kernels/iova.py), counters in the domain's ``_st``. One rcache per domain."""

    rcache_hits = _stat(_k.S_HITS, "allocations the magazines served")
    rcache_misses = _stat(_k.S_MISSES, "cacheable sizes the rcache could not serve")
    depot_pushes = _stat(_k.S_DEPOT_PUSHES, "full magazines moved to the depot")
    depot_pops = _stat(_k.S_DEPOT_POPS, "depot magazines a CPU took")
    depot_overflows = _stat(_k.S_DEPOT_OVERFLOWS, "full magazines freed to the tree, depot full")
    rcache_flushes = _stat(_k.S_FLUSHES, "tree failures that emptied every cache and retried")

    def __init__(self, domain: ArrayIovaDomain, cpus: int) -> None:
        if cpus <= 0:
            raise IovaError(f"rcache for {cpus} CPUs")
        if domain._has_rcache:
            raise IovaError("the domain already has an rcache")
        domain._has_rcache = True
        self.domain = domain
        self.cpus = cpus
        self._st = domain._st            # never reallocated (only the tree grows)
        self._mag = _k.new_magazines(domain._st, cpus)

    def alloc_iova_fast(self, cpu: int, size_pages: int, limit_pfn: int,
                        flush_rcache: bool = True) -> int | None:
        """As IovaRcache.alloc_iova_fast."""
        if not (-_PFN_LIMIT < limit_pfn < _PFN_LIMIT and -_PFN_LIMIT < size_pages < _PFN_LIMIT
                and -_PFN_LIMIT < cpu < _PFN_LIMIT):
            _check_range(limit_pfn, size_pages, cpu)
        d = self.domain
        pfn = _k.alloc_iova_fast(d._tree, d._st, self._mag, cpu, size_pages, limit_pfn,
                                 flush_rcache)
        if pfn >= 0:
            return pfn
        while pfn == _k.ROOM:
            d._grow()
            pfn = _k.alloc_iova_fast(d._tree, d._st, self._mag, cpu, size_pages, limit_pfn,
                                     flush_rcache)
        if pfn == _k.E_CPU:
            raise IovaError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
        if pfn == _k.E_SIZE:
            raise IovaError(f"alloc of {size_pages} pages")
        return None if pfn == _k.NONE else pfn

    def free_iova_fast(self, cpu: int, pfn: int, size_pages: int) -> None:
        """As IovaRcache.free_iova_fast."""
        d = self.domain
        if -_PFN_LIMIT < cpu < _PFN_LIMIT and 0 <= pfn < _PFN_LIMIT \
                and -_PFN_LIMIT < size_pages < _PFN_LIMIT:
            code = _k.free_iova_fast(d._tree, d._st, self._mag, cpu, pfn, size_pages)
            if code == 0:
                return
        elif not 0 <= cpu < self.cpus:
            code = _k.E_CPU
        elif not 0 <= pfn < _PFN_LIMIT:
            code = _k.E_NOT_ALLOC
        else:        # a size no allocation has: size 0 gives the same refusal, changing nothing
            code = _k.free_iova_fast(d._tree, d._st, self._mag, cpu, pfn, 0)
        if code == _k.E_CPU:
            raise IovaError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
        if code == _k.E_NOT_ALLOC:
            raise IovaError(f"free of pfn {pfn:#x}, which is not allocated")
        lo, hi = d.find_iova(pfn)
        raise IovaError(f"free of pfn {pfn:#x} with size {size_pages}, allocated {hi - lo + 1}")

    def free_cpu_cached_iovas(self, cpu: int) -> None:
        """Free one CPU's loaded and prev magazines to the tree."""
        if -self.cpus <= cpu < 0:
            cpu += self.cpus             # as IovaRcache's list indexing
        if not 0 <= cpu < self.cpus:
            raise IndexError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
        _k.free_cpu_cached_iovas(self.domain._tree, self.domain._st, self._mag, cpu)

    def free_global_cached_iovas(self) -> None:
        """Free every depot magazine to the tree."""
        _k.free_global_cached_iovas(self.domain._tree, self.domain._st, self._mag)

    def cached(self) -> int:
        """IOVAs now held in magazines (per-CPU and depot)."""
        return int(self.domain._st[_k.S_CACHED_IOVAS])

    def depot_size(self, size_pages: int) -> int:
        """Full magazines in the depot of the class serving ``size_pages``."""
        return int(self.domain._st[_k.S_DEPOT + range(IOVA_RANGE_CACHE_MAX_SIZE)[
            _SIZE_CLASS[size_pages][1]]])


def _unanchor(pfn: int) -> int:
    return IOVA_ANCHOR if pfn == _k.ANCHOR else pfn


def _check_range(*values: int) -> None:
    for v in values:
        if not -_PFN_LIMIT < v < _PFN_LIMIT:
            raise IovaError(f"{v:#x} beyond the 2^62-pfn space the allocator's arrays hold")
