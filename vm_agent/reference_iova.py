"""Reference model of the guest's IOVA allocator: a sorted list of ranges and plain magazines.

The slow, obviously correct twin of vm_agent/iova.py, written from Linux
drivers/iommu/iova.c (the bounded-depot version before Linux 6.7, which vm_agent/iova.py
follows) and sharing no code with it. Tests drive both with the same calls and compare every
return value, counter and error.

- ``IovaDomain``: the rbtree becomes a list of (pfn_lo, pfn_hi) kept sorted by pfn_lo, with the
  anchor node (IOVA_ANCHOR, IOVA_ANCHOR) last; rb_prev / rb_next are the list neighbours.
  __alloc_and_insert_iova_range is transcribed line by line, unsigned arithmetic included
  (``new_pfn = (high_pfn - size) & align_mask`` wraps in C).
  cached_node, cached32_node and max32_alloc_size are kept because they change results: the
  search starts below the cached node, so a hole above it is found only by the retry.
- ``IovaRcache``: per size class (order_base_2 of the size, 0..5) each CPU holds a ``loaded``
  and a ``prev`` magazine (a Python list used as the C array pfns[0..size-1]) and the class a
  depot of at most MAX_GLOBAL_MAGS full magazines (__iova_rcache_insert, __iova_rcache_get,
  iova_magazine_pop, iova_magazine_free_pfns, free_cpu_cached_iovas,
  free_global_cached_iovas, alloc_iova_fast, free_iova_fast).

Where Linux would WARN or corrupt its state (freeing what is not allocated, freeing with the
wrong size, freeing an IOVA that sits in a magazine, overlapping reservations) this model
raises ``IovaError``, which is the documented contract of vm_agent/iova.py.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

U64 = (1 << 64) - 1
IOVA_ANCHOR = U64                    # iova.c: the anchor node's pfn_lo and pfn_hi (~0UL)
IOVA_MAG_SIZE = 127                  # iova.c: pfns in one magazine
IOVA_RANGE_CACHE_MAX_SIZE = 6        # iova.h: size classes 2^0 .. 2^5 pages are cached
MAX_GLOBAL_MAGS = 32                 # iova.c (before 6.7): full magazines in a depot


class IovaError(Exception):
    """Bad use of the reference allocator (the same misuses vm_agent/iova.py refuses)."""


def fls_long(x: int) -> int:
    """Position of the highest set bit, 1-based; 0 for 0 (include/asm-generic/bitops/fls64.h)."""
    return x.bit_length()


def order_base_2(n: int) -> int:
    """log2 of n rounded up (include/linux/log2.h); 0 for n == 1."""
    order = 0
    while (1 << order) < n:
        order += 1
    return order


def roundup_pow_of_two(n: int) -> int:
    return 1 << order_base_2(n)


class IovaDomain:
    """struct iova_domain without the rcaches: allocated ranges, searched top-down.

    ``nodes`` is the rbtree in order: (pfn_lo, pfn_hi) sorted by pfn_lo, the anchor last.
    ``cached_node`` and ``cached32_node`` name a node by its pfn_lo (pfn_lo is unique).
    """

    def __init__(self, granule: int = 4096, start_pfn: int = 1) -> None:
        # init_iova_domain
        if granule <= 0 or granule & (granule - 1) != 0:
            raise IovaError(f"granule {granule} is not a power of two")
        if start_pfn < 0:
            raise IovaError(f"start_pfn {start_pfn} is negative")
        self.granule = granule
        self.start_pfn = start_pfn
        self.dma_32bit_pfn = (1 << 32) // granule      # 1UL << (32 - iova_shift(iovad))
        self.max32_alloc_size = self.dma_32bit_pfn
        self.nodes: list[tuple[int, int]] = [(IOVA_ANCHOR, IOVA_ANCHOR)]
        self.cached_node = IOVA_ANCHOR
        self.cached32_node = IOVA_ANCHOR
        self.rcache: IovaRcache | None = None   # set by IovaRcache: who holds magazine pfns
        self.tree_allocs = 0
        self.tree_frees = 0
        self.failures = 0

    def __len__(self) -> int:
        """Allocated ranges, reserved ones included, the anchor not."""
        return len(self.nodes) - 1

    # --- tree helpers: the sorted list stands for the rbtree ----------------------------------
    def _index_of(self, pfn_lo: int) -> int:
        """The index of the node starting at ``pfn_lo`` (bisect on the sorted list)."""
        i = bisect_left(self.nodes, (pfn_lo,))
        assert self.nodes[i][0] == pfn_lo, f"no node starts at {pfn_lo:#x}"
        return i

    def _node_at(self, i: int) -> tuple[int, int] | None:
        """The i-th node in order, None past either end (rb_prev of the first is NULL)."""
        return self.nodes[i] if 0 <= i < len(self.nodes) else None

    def _insert(self, pfn_lo: int, pfn_hi: int) -> None:
        insort(self.nodes, (pfn_lo, pfn_hi))

    def _find_limit(self, limit_pfn: int) -> int:
        """iova_find_limit: where the retry's backward walk starts, as a node index.

        Linux returns the anchor above the 32-bit boundary and otherwise a node at the limit
        found in the tree; starting the walk at the first node not wholly below the limit
        gives the same walk in every case (nodes above the limit leave high_pfn at limit_pfn).
        """
        if limit_pfn > self.dma_32bit_pfn:
            return len(self.nodes) - 1
        for i, (_lo, hi) in enumerate(self.nodes):
            if hi >= limit_pfn:
                return i
        raise AssertionError("the anchor is never below a limit")

    # --- alloc_iova --------------------------------------------------------------------
    def alloc_iova(self, size_pages: int, limit_pfn: int, size_aligned: bool = True) -> int | None:
        """alloc_iova: ``size_pages`` pfns ending at or below ``limit_pfn``; pfn_lo or None."""
        if size_pages <= 0:
            raise IovaError(f"alloc of {size_pages} pages")
        pfn = self._alloc_and_insert_iova_range(size_pages, limit_pfn + 1, size_aligned)
        if pfn is None:
            self.failures += 1
        else:
            self.tree_allocs += 1
        return pfn

    def _alloc_and_insert_iova_range(self, size: int, limit_pfn: int,
                                     size_aligned: bool) -> int | None:
        """__alloc_and_insert_iova_range, with ``limit_pfn`` exclusive as Linux passes it."""
        align_mask = U64
        high_pfn = limit_pfn
        low_pfn = self.start_pfn
        if size_aligned:
            align_mask = (align_mask << fls_long(size - 1)) & U64

        if limit_pfn <= self.dma_32bit_pfn and size >= self.max32_alloc_size:
            return None                                       # goto iova32_full

        # __get_cached_rbnode
        cached = self.cached32_node if limit_pfn <= self.dma_32bit_pfn else self.cached_node
        curr = self._index_of(cached)
        curr_iova = self._node_at(curr)
        retry_pfn = curr_iova[1]

        while True:                                           # retry:
            while True:                                       # do { ... } while (...)
                high_pfn = min(high_pfn, curr_iova[0])
                new_pfn = ((high_pfn - size) & U64) & align_mask
                prev = curr
                curr = curr - 1                               # rb_prev
                curr_iova = self._node_at(curr)
                if not (curr_iova is not None and new_pfn <= curr_iova[1]
                        and new_pfn >= low_pfn):
                    break
            if high_pfn < size or new_pfn < low_pfn:
                if low_pfn == self.start_pfn and retry_pfn < limit_pfn:
                    high_pfn = limit_pfn
                    low_pfn = retry_pfn + 1
                    curr = self._find_limit(limit_pfn)
                    curr_iova = self._node_at(curr)
                    continue                                  # goto retry
                self.max32_alloc_size = size
                return None                                   # goto iova32_full
            break

        new_lo, new_hi = new_pfn, new_pfn + size - 1
        assert self.nodes[prev][0] > new_hi                   # inserted right below prev
        self._insert(new_lo, new_hi)
        # __cached_rbnode_insert_update
        if new_hi < self.dma_32bit_pfn:
            self.cached32_node = new_lo
        else:
            self.cached_node = new_lo
        return new_lo

    # --- reserve, find, free -------------------------------------------------------------
    def reserve_iova(self, pfn_lo: int, pfn_hi: int) -> None:
        """reserve_iova, except that an overlap with an allocation is an IovaError."""
        if pfn_lo < 0 or pfn_lo > pfn_hi or pfn_hi >= IOVA_ANCHOR:
            raise IovaError(f"bad reservation [{pfn_lo:#x}, {pfn_hi:#x}]")
        for lo, hi in self.nodes:
            if lo <= pfn_hi and pfn_lo <= hi:
                raise IovaError(f"reservation [{pfn_lo:#x}, {pfn_hi:#x}] overlaps "
                                f"[{lo:#x}, {hi:#x}]")
        self._insert(pfn_lo, pfn_hi)      # no cached-node update, as Linux

    def find_iova(self, pfn: int) -> tuple[int, int] | None:
        """find_iova: the allocated (pfn_lo, pfn_hi) containing ``pfn``, or None."""
        i = bisect_right(self.nodes, (pfn, IOVA_ANCHOR)) - 1   # the last node starting <= pfn
        if i < 0 or i == len(self.nodes) - 1:
            return None
        lo, hi = self.nodes[i]
        return (lo, hi) if pfn <= hi else None

    def free_iova(self, pfn: int) -> int:
        """Free the allocation starting at ``pfn`` (free_iova); its size in pages."""
        node = self.find_iova(pfn)
        if node is None or node[0] != pfn:
            raise IovaError(f"free of pfn {pfn:#x}, which starts no allocation")
        if self.rcache is not None and self.rcache.holds(pfn, node[1] - node[0] + 1):
            raise IovaError(f"free of pfn {pfn:#x}, which sits in an rcache magazine")
        return self._remove_iova(pfn)

    def _remove_iova(self, pfn_lo: int) -> int:
        """remove_iova: __cached_rbnode_delete_update, then rb_erase."""
        i = self._index_of(pfn_lo)
        lo, hi = self.nodes[i]
        nxt = self.nodes[i + 1][0]                            # rb_next(&free->node)
        c32_lo = self.cached32_node
        if lo == c32_lo or (hi < self.dma_32bit_pfn and lo >= c32_lo):
            self.cached32_node = nxt
        if lo < self.dma_32bit_pfn:
            self.max32_alloc_size = self.dma_32bit_pfn
        if lo >= self.cached_node:
            self.cached_node = nxt
        del self.nodes[i]
        self.tree_frees += 1
        return hi - lo + 1


class IovaRcache:
    """The rcaches of an iova_domain: per-CPU loaded/prev magazines and a depot per class.

    ``loaded[cpu][order]`` and ``prev[cpu][order]`` are magazines (lists of pfns, index 0
    first, as mag->pfns[]); ``depot[order]`` is rcache->depot[0 .. depot_size-1].
    """

    def __init__(self, domain: IovaDomain, cpus: int) -> None:
        if cpus <= 0:
            raise IovaError(f"rcache for {cpus} CPUs")
        self.domain = domain
        domain.rcache = self
        self.cpus = cpus
        orders = range(IOVA_RANGE_CACHE_MAX_SIZE)
        self.loaded = [[[] for _ in orders] for _ in range(cpus)]
        self.prev = [[[] for _ in orders] for _ in range(cpus)]
        self.depot: list[list[list[int]]] = [[] for _ in orders]
        self.rcache_hits = 0
        self.rcache_misses = 0
        self.depot_pushes = 0
        self.depot_pops = 0
        self.depot_overflows = 0
        self.rcache_flushes = 0

    def _magazines(self) -> list[list[int]]:
        mags = [m for cpu in self.loaded for m in cpu]
        mags += [m for cpu in self.prev for m in cpu]
        mags += [m for depot in self.depot for m in depot]
        return mags

    def holds(self, pfn: int, pages: int) -> bool:
        """Whether the allocation of ``pages`` at ``pfn`` sits in a magazine. Only exact
        powers of two up to 32 pages are ever cached, each in the class of its order."""
        order = order_base_2(pages)
        if 1 << order != pages or order >= IOVA_RANGE_CACHE_MAX_SIZE:
            return False
        mags = [self.loaded[c][order] for c in range(self.cpus)]
        mags += [self.prev[c][order] for c in range(self.cpus)]
        mags += self.depot[order]
        return any(pfn in mag for mag in mags)

    def cached(self) -> int:
        """IOVAs held in magazines (per-CPU and depot)."""
        return sum(len(mag) for mag in self._magazines())

    def depot_size(self, size_pages: int) -> int:
        """Full magazines in the depot of the class serving ``size_pages`` (1..32)."""
        return len(self.depot[order_base_2(size_pages)])

    # --- alloc_iova_fast -----------------------------------------------------------------
    def alloc_iova_fast(self, cpu: int, size_pages: int, limit_pfn: int,
                        flush_rcache: bool = True) -> int | None:
        """alloc_iova_fast: the rcache, else the tree, else flush every cache and retry."""
        self._check_cpu(cpu)
        if size_pages <= 0:
            raise IovaError(f"alloc of {size_pages} pages")
        size = size_pages
        if size < 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1):
            size = roundup_pow_of_two(size)
        pfn = self._iova_rcache_get(cpu, size, limit_pfn + 1)
        if pfn is not None:
            return pfn
        while True:                                           # retry:
            pfn = self.domain.alloc_iova(size, limit_pfn, True)
            if pfn is not None:
                return pfn
            if not flush_rcache:
                return None
            flush_rcache = False
            self.rcache_flushes += 1
            for c in range(self.cpus):
                self.free_cpu_cached_iovas(c)
            self.free_global_cached_iovas()

    def _iova_rcache_get(self, cpu: int, size: int, limit_pfn: int) -> int | None:
        """iova_rcache_get + __iova_rcache_get (``limit_pfn`` exclusive)."""
        log_size = order_base_2(size)
        if log_size >= IOVA_RANGE_CACHE_MAX_SIZE:
            return None
        loaded, prev = self.loaded[cpu], self.prev[cpu]
        has_pfn = False
        if len(loaded[log_size]) > 0:
            has_pfn = True
        elif len(prev[log_size]) > 0:
            loaded[log_size], prev[log_size] = prev[log_size], loaded[log_size]
            has_pfn = True
        elif len(self.depot[log_size]) > 0:
            loaded[log_size] = self.depot[log_size].pop()     # depot[--depot_size]
            self.depot_pops += 1
            has_pfn = True
        pfn = None
        if has_pfn:
            pfn = self._magazine_pop(loaded[log_size], limit_pfn - size)
        if pfn is None:
            self.rcache_misses += 1
        else:
            self.rcache_hits += 1
        return pfn

    @staticmethod
    def _magazine_pop(mag: list[int], limit_pfn: int) -> int | None:
        """iova_magazine_pop: the last pfn <= limit_pfn, its slot refilled from the top."""
        i = len(mag) - 1
        while mag[i] > limit_pfn:
            if i == 0:
                return None
            i -= 1
        pfn = mag[i]
        top = mag.pop()                                       # mag->pfns[--mag->size]
        if i < len(mag):
            mag[i] = top
        return pfn

    # --- free_iova_fast ------------------------------------------------------------------
    def free_iova_fast(self, cpu: int, pfn: int, size_pages: int) -> None:
        """free_iova_fast: into this CPU's magazine of the size class, else to the tree."""
        self._check_cpu(cpu)
        node = self.domain.find_iova(pfn)
        if node is None or node[0] != pfn:
            raise IovaError(f"free of pfn {pfn:#x}, which is not allocated")
        allocated = node[1] - node[0] + 1
        if self.holds(pfn, allocated):
            raise IovaError(f"free of pfn {pfn:#x}, which is not allocated (cached)")
        cacheable = size_pages > 0 and order_base_2(size_pages) < IOVA_RANGE_CACHE_MAX_SIZE
        expect = size_pages
        if cacheable and size_pages < 1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1):
            expect = roundup_pow_of_two(size_pages)    # what alloc_iova_fast handed out
        if allocated != expect:
            raise IovaError(f"free of pfn {pfn:#x} with size {size_pages}, "
                            f"allocated {allocated}")
        if cacheable:
            self._iova_rcache_insert(cpu, pfn, order_base_2(size_pages))
        else:
            self.domain.free_iova(pfn)

    def _iova_rcache_insert(self, cpu: int, pfn: int, log_size: int) -> None:
        """__iova_rcache_insert (a magazine allocation never fails here)."""
        loaded, prev = self.loaded[cpu], self.prev[cpu]
        mag_to_free = None
        if len(loaded[log_size]) < IOVA_MAG_SIZE:
            pass
        elif len(prev[log_size]) < IOVA_MAG_SIZE:
            loaded[log_size], prev[log_size] = prev[log_size], loaded[log_size]
        else:
            if len(self.depot[log_size]) < MAX_GLOBAL_MAGS:
                self.depot[log_size].append(loaded[log_size])
                self.depot_pushes += 1
            else:
                mag_to_free = loaded[log_size]
                self.depot_overflows += 1
            loaded[log_size] = []
        loaded[log_size].append(pfn)                          # iova_magazine_push
        if mag_to_free is not None:
            self._magazine_free_pfns(mag_to_free)

    # --- flushing the caches ---------------------------------------------------------------
    def _magazine_free_pfns(self, mag: list[int]) -> None:
        """iova_magazine_free_pfns: each pfn back to the tree, in array order."""
        pfns = list(mag)
        mag.clear()
        for pfn in pfns:
            self.domain._remove_iova(pfn)

    def free_cpu_cached_iovas(self, cpu: int) -> None:
        """free_cpu_cached_iovas: per class, the loaded then the prev magazine to the tree."""
        for i in range(IOVA_RANGE_CACHE_MAX_SIZE):
            self._magazine_free_pfns(self.loaded[cpu][i])
            self._magazine_free_pfns(self.prev[cpu][i])

    def free_global_cached_iovas(self) -> None:
        """free_global_cached_iovas: every depot magazine to the tree, depot[0] first."""
        for i in range(IOVA_RANGE_CACHE_MAX_SIZE):
            for mag in self.depot[i]:
                self._magazine_free_pfns(mag)
            self.depot[i] = []

    def _check_cpu(self, cpu: int) -> None:
        if cpu < 0 or cpu >= self.cpus:
            raise IovaError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
