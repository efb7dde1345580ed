"""The guest's IOVA allocator as numba kernels over array state (Linux drivers/iommu/iova.c).

The same allocator as vm_agent/iova.py's ``IovaDomain`` / ``IovaRcache`` (the rbtree with
cached_node / cached32_node / max32_alloc_size, per-CPU loaded/prev magazines, a bounded depot
of MAX_GLOBAL_MAGS magazines per size class, the pre-6.7 iova.c), held in three int64 arrays so
that a whole-VM-epoch kernel can call these functions directly:

- ``tree``: int64[cap, 3], a node a row: columns T_LO, T_HI (pfn_lo, pfn_hi, rows sorted by
  pfn_lo: the rbtree in order, rb_prev / rb_next are the neighbouring rows) and T_MAG (1 while
  the node's IOVA sits in a magazine). The live rows are st[S_BASE] .. st[S_BASE] +
  st[S_NODES] - 1, the anchor last, with free rows on both sides: an insert or erase moves the
  rows on its shorter side (below it, or above it), so the top-down allocator's inserts at
  the low end of the 32-bit or of the 64-bit nodes move few rows.
- ``st``: int64[ST_LEN], the scalars (S_*): node count, cached_node and cached32_node (as
  pfn_lo, as iova.c's node pointers), max32_alloc_size, start_pfn, dma_32bit_pfn, the tree
  and rcache counters, the CPU count and each class's depot size.
- ``mag``: int64[cpus * 2 * CLASSES + CLASSES * MAX_GLOBAL_MAGS, MAG_COLS]: one magazine a
  row, column 0 its size and columns 1 .. IOVA_MAG_SIZE its pfns (mag->pfns[]). Row
  ``mag_row(cpu, slot, order)`` is a CPU's loaded (slot 0) or prev (slot 1) magazine, row
  ``depot_row(cpus, order, k)`` the k-th depot magazine of a class. Where iova.c swaps or moves
  magazine pointers these kernels copy rows (at most once per IOVA_MAG_SIZE frees).

Values are int64: the anchor's pfn ~0UL is stored as ANCHOR (2^63 - 1), and every pfn, limit
and size the kernels take must lie strictly between -PFN_LIMIT and PFN_LIMIT (2^62), so no
arithmetic here overflows; the Python wrappers refuse anything else. Kernels return a pfn or
size (>= 0) or a negative code: NONE (no room in the IOVA space), ROOM (the tree array is full:
the caller grows it and calls again; nothing changed) or an E_* refusal (IovaError in Python).
A kernel that may insert a node checks for ROOM before it changes anything, and inserts at most
one node per call.
"""

from __future__ import annotations

import numpy as np
from numba import njit

IOVA_MAG_SIZE = 127                  # iova.c: pfns a magazine holds
CLASSES = 6                          # iova.h IOVA_RANGE_CACHE_MAX_SIZE: orders 0..5 cached
MAX_GLOBAL_MAGS = 32                 # iova.c (before 6.7): full magazines per depot
CACHED_MAX_PAGES = 1 << (CLASSES - 1)
MAG_COLS = IOVA_MAG_SIZE + 1         # column 0: the magazine's size
ANCHOR = (1 << 63) - 1               # stands for IOVA_ANCHOR (~0UL)
PFN_LIMIT = 1 << 62                  # |pfn|, |limit|, |size| < PFN_LIMIT

# tree columns
T_LO, T_HI, T_MAG = 0, 1, 2
TREE_COLS = 3
# st slots
(S_NODES, S_BASE, S_CACHED, S_CACHED32, S_MAX32, S_START_PFN, S_DMA32, S_TREE_ALLOCS,
 S_TREE_FREES, S_FAILURES, S_HITS, S_MISSES, S_DEPOT_PUSHES, S_DEPOT_POPS, S_DEPOT_OVERFLOWS,
 S_FLUSHES, S_CACHED_IOVAS, S_CPUS, S_DEPOT) = range(19)
ST_LEN = S_DEPOT + CLASSES           # S_DEPOT + order: that class's depot size
# return codes
NONE, ROOM, E_SIZE, E_CPU, E_NOT_ALLOC, E_IN_MAG, E_WRONG_SIZE, E_BAD_RANGE, E_OVERLAP = (
    -1, -2, -3, -4, -5, -6, -7, -8, -9)


def new_state(start_pfn: int, dma_32bit_pfn: int, cap: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A fresh domain (init_iova_domain): (tree, st) holding only the anchor."""
    tree = np.zeros((max(cap, 1), TREE_COLS), np.int64)
    st = np.zeros(ST_LEN, np.int64)
    st[S_NODES] = 1
    st[S_BASE] = base = tree.shape[0] // 2
    tree[base, T_LO] = tree[base, T_HI] = ANCHOR
    st[S_CACHED] = st[S_CACHED32] = ANCHOR
    st[S_MAX32] = st[S_DMA32] = dma_32bit_pfn
    st[S_START_PFN] = start_pfn
    return tree, st


def new_magazines(st: np.ndarray, cpus: int) -> np.ndarray:
    """Empty magazines for ``cpus`` CPUs (iova_domain_init_rcaches); records ``cpus`` in st."""
    st[S_CPUS] = cpus
    return np.zeros((cpus * 2 * CLASSES + CLASSES * MAX_GLOBAL_MAGS, MAG_COLS), np.int64)


def grown(tree: np.ndarray, st: np.ndarray) -> np.ndarray:
    """A copy of ``tree`` with twice the node capacity (after a kernel returned ROOM), the
    live rows in the middle; updates st[S_BASE]."""
    n, base = int(st[S_NODES]), int(st[S_BASE])
    out = np.zeros((2 * tree.shape[0], TREE_COLS), np.int64)
    new_base = (out.shape[0] - n) // 2
    out[new_base:new_base + n] = tree[base:base + n]
    st[S_BASE] = new_base
    return out


# --- helpers ----------------------------------------------------------------------------
@njit(cache=True)
def mag_row(cpu, slot, order):
    """Row of a CPU's loaded (slot 0) or prev (slot 1) magazine of class ``order``."""
    return (cpu * 2 + slot) * CLASSES + order


@njit(cache=True)
def depot_row(cpus, order, k):
    """Row of the k-th depot magazine of class ``order``."""
    return cpus * 2 * CLASSES + order * MAX_GLOBAL_MAGS + k


@njit(cache=True)
def _bisect_left(tree, st, x):
    """First live row whose pfn_lo >= x (bisect.bisect_left); the end if none."""
    lo = st[S_BASE]
    hi = lo + st[S_NODES]
    while lo < hi:
        mid = (lo + hi) >> 1
        if tree[mid, T_LO] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def _node_at(tree, st, pfn):
    """Row of the node starting at ``pfn`` (the anchor excluded), or -1."""
    i = _bisect_left(tree, st, pfn)
    if i < st[S_BASE] + st[S_NODES] - 1 and tree[i, T_LO] == pfn:
        return i
    return -1


@njit(cache=True)
def _fls(x):
    """fls_long: position of the highest set bit, 1-based; 0 for 0."""
    n = 0
    while x > 0:
        x >>= 1
        n += 1
    return n


@njit(cache=True)
def _order(size_pages):
    """order_base_2 for 1 <= size_pages <= 32: the rcache class."""
    return _fls(size_pages - 1)


# --- the tree ---------------------------------------------------------------------------
@njit(cache=True)
def _insert_below(tree, st, j, pfn_lo, pfn_hi):
    """Insert node (pfn_lo, pfn_hi) right below the node in row j (the caller checked for
    room): the rows below j move down one (the new node takes row j - 1), or, when that side
    is longer or has no free row, j and the rows above move up one (it takes row j)."""
    base = st[S_BASE]
    end = base + st[S_NODES]
    if base > 0 and (j - base <= end - j or end == tree.shape[0]):
        for r in range(base, j):
            for c in range(TREE_COLS):
                tree[r - 1, c] = tree[r, c]
        j -= 1
        st[S_BASE] = base - 1
    else:
        for r in range(end, j, -1):
            for c in range(TREE_COLS):
                tree[r, c] = tree[r - 1, c]
    tree[j, T_LO] = pfn_lo
    tree[j, T_HI] = pfn_hi
    tree[j, T_MAG] = 0
    st[S_NODES] += 1


@njit(cache=True)
def _remove_at(tree, st, i):
    """remove_iova of the node in row i: __cached_rbnode_delete_update, then rb_erase (the
    rows on the shorter side close the gap); its size."""
    lo = tree[i, T_LO]
    hi = tree[i, T_HI]
    nxt = tree[i + 1, T_LO]                  # rb_next: the anchor guarantees one
    dma32 = st[S_DMA32]
    c32 = st[S_CACHED32]
    if lo == c32 or (hi < dma32 and lo >= c32):
        st[S_CACHED32] = nxt
    if lo < dma32:
        st[S_MAX32] = dma32
    if lo >= st[S_CACHED]:
        st[S_CACHED] = nxt
    base = st[S_BASE]
    end = base + st[S_NODES]
    if i - base <= end - 1 - i:
        for r in range(i, base, -1):
            for c in range(TREE_COLS):
                tree[r, c] = tree[r - 1, c]
        st[S_BASE] = base + 1
    else:
        for r in range(i, end - 1):
            for c in range(TREE_COLS):
                tree[r, c] = tree[r + 1, c]
    st[S_NODES] -= 1
    st[S_TREE_FREES] += 1
    return hi - lo + 1


@njit(cache=True)
def _alloc_range(tree, st, size, limit_excl, aligned):
    """__alloc_and_insert_iova_range (``limit_excl`` exclusive, as Linux passes it).

    Walks backwards from the cached node to start_pfn, then once more from the limit down to
    just above the cached node (the retry); records a failed size in max32_alloc_size.
    """
    dma32 = st[S_DMA32]
    if limit_excl <= dma32 and size >= st[S_MAX32]:
        return NONE                                          # goto iova32_full
    align_mask = np.int64(-1)
    if aligned:
        align_mask = align_mask << _fls(size - 1)
    base = st[S_BASE]
    cached = st[S_CACHED32] if limit_excl <= dma32 else st[S_CACHED]
    i = _bisect_left(tree, st, cached)
    retry_pfn = tree[i, T_HI]
    high = limit_excl
    start = st[S_START_PFN]
    low = start
    new_pfn = np.int64(0)
    while True:
        while True:
            lo = tree[i, T_LO]
            if lo < high:
                high = lo
            new_pfn = (high - size) & align_mask
            i -= 1                                           # rb_prev
            if i < base or new_pfn < low or new_pfn > tree[i, T_HI]:
                break
        if high >= size and new_pfn >= low:
            break
        if low == start and retry_pfn < limit_excl:
            high = limit_excl                                # iova_find_limit, then retry
            low = retry_pfn + 1
            i = _bisect_left(tree, st, limit_excl)
            continue
        st[S_MAX32] = size
        return NONE
    new_hi = new_pfn + size - 1
    _insert_below(tree, st, i + 1, new_pfn, new_hi)
    if new_hi < dma32:                                       # __cached_rbnode_insert_update
        st[S_CACHED32] = new_pfn
    else:
        st[S_CACHED] = new_pfn
    return new_pfn


@njit(cache=True)
def _alloc_counted(tree, st, size, limit_pfn, aligned):
    """alloc_iova after its checks: the range, counted as an allocation or a failure."""
    pfn = _alloc_range(tree, st, size, limit_pfn + 1, aligned)
    if pfn == NONE:
        st[S_FAILURES] += 1
    else:
        st[S_TREE_ALLOCS] += 1
    return pfn


@njit(cache=True)
def alloc_iova(tree, st, size_pages, limit_pfn, aligned):
    """alloc_iova: ``size_pages`` pfns ending at or below ``limit_pfn``; pfn_lo, NONE, ROOM or
    E_SIZE. With ``aligned`` the start is aligned to the size rounded up to a power of two."""
    if size_pages <= 0:
        return E_SIZE
    if st[S_NODES] >= tree.shape[0]:
        return ROOM
    return _alloc_counted(tree, st, size_pages, limit_pfn, aligned)


@njit(cache=True)
def reserve_iova(tree, st, pfn_lo, pfn_hi):
    """reserve_iova: mark [pfn_lo, pfn_hi] allocated; 0, ROOM, E_BAD_RANGE or E_OVERLAP
    (Linux merges overlapping reservations; here an overlap is refused)."""
    if pfn_lo < 0 or pfn_lo > pfn_hi or pfn_hi >= ANCHOR:
        return E_BAD_RANGE
    if st[S_NODES] >= tree.shape[0]:
        return ROOM
    i = _bisect_left(tree, st, pfn_lo)
    if tree[i, T_LO] <= pfn_hi or (i > st[S_BASE] and tree[i - 1, T_HI] >= pfn_lo):
        return E_OVERLAP
    _insert_below(tree, st, i, pfn_lo, pfn_hi)     # no cached-node update, as Linux
    return 0


@njit(cache=True)
def find_iova(tree, st, pfn):
    """find_iova: row of the node containing ``pfn`` (the anchor never), or -1."""
    i = _bisect_left(tree, st, pfn + 1) - 1   # the last node starting at or below pfn
    base = st[S_BASE]
    if i < base or i == base + st[S_NODES] - 1 or tree[i, T_HI] < pfn:
        return -1
    return i


@njit(cache=True)
def free_iova(tree, st, pfn):
    """free_iova: free the allocation starting at ``pfn``; its size, E_NOT_ALLOC or E_IN_MAG."""
    i = _node_at(tree, st, pfn)
    if i < 0:
        return E_NOT_ALLOC
    if tree[i, T_MAG] != 0:
        return E_IN_MAG
    return _remove_at(tree, st, i)


# --- magazines ----------------------------------------------------------------------------
@njit(cache=True)
def _copy_row(mag, dst, src):
    """Copy magazine row ``src`` (its size and pfns) over row ``dst``."""
    for k in range(mag[src, 0] + 1):
        mag[dst, k] = mag[src, k]


@njit(cache=True)
def _magazine_free_pfns(tree, st, mag, row):
    """iova_magazine_free_pfns: each pfn of the magazine back to the tree, in array order."""
    for k in range(1, mag[row, 0] + 1):
        i = _node_at(tree, st, mag[row, k])
        tree[i, T_MAG] = 0
        st[S_CACHED_IOVAS] -= 1
        _remove_at(tree, st, i)
    mag[row, 0] = 0


@njit(cache=True)
def _magazine_pop(mag, row, max_pfn):
    """iova_magazine_pop: the topmost pfn <= max_pfn, its slot refilled from the top; or NONE."""
    size = mag[row, 0]
    for k in range(size, 0, -1):
        pfn = mag[row, k]
        if pfn <= max_pfn:
            mag[row, k] = mag[row, size]     # mag->pfns[i] = mag->pfns[--mag->size]
            mag[row, 0] = size - 1
            return pfn
    return NONE


@njit(cache=True)
def free_cpu_cached_iovas(tree, st, mag, cpu):
    """free_cpu_cached_iovas: per class, the CPU's loaded then prev magazine to the tree."""
    for order in range(CLASSES):
        _magazine_free_pfns(tree, st, mag, mag_row(cpu, 0, order))
        _magazine_free_pfns(tree, st, mag, mag_row(cpu, 1, order))


@njit(cache=True)
def free_global_cached_iovas(tree, st, mag):
    """free_global_cached_iovas: every depot magazine to the tree, class 0 and depot[0] first."""
    cpus = st[S_CPUS]
    for order in range(CLASSES):
        for k in range(st[S_DEPOT + order]):
            _magazine_free_pfns(tree, st, mag, depot_row(cpus, order, k))
        st[S_DEPOT + order] = 0


@njit(cache=True)
def _rcache_get(tree, st, mag, cpu, order, max_pfn):
    """__iova_rcache_get: a pfn <= max_pfn from the CPU's magazines of ``order``, or NONE."""
    loaded = mag_row(cpu, 0, order)
    if mag[loaded, 0] == 0:
        prev = mag_row(cpu, 1, order)
        if mag[prev, 0] > 0:                                 # swap(loaded, prev)
            _copy_row(mag, loaded, prev)
            mag[prev, 0] = 0
        elif st[S_DEPOT + order] > 0:                        # loaded = depot[--depot_size]
            st[S_DEPOT + order] -= 1
            _copy_row(mag, loaded, depot_row(st[S_CPUS], order, st[S_DEPOT + order]))
            st[S_DEPOT_POPS] += 1
    if mag[loaded, 0] > 0:
        pfn = _magazine_pop(mag, loaded, max_pfn)
        if pfn != NONE:
            st[S_HITS] += 1
            tree[_node_at(tree, st, pfn), T_MAG] = 0
            st[S_CACHED_IOVAS] -= 1
            return pfn
    st[S_MISSES] += 1
    return NONE


@njit(cache=True)
def alloc_iova_fast(tree, st, mag, cpu, size_pages, limit_pfn, flush_rcache):
    """alloc_iova_fast: ``size_pages`` (rounded up to a power of two below 32) at or below
    ``limit_pfn`` from the CPU's rcache, else the tree, else (with ``flush_rcache``) free every
    cached IOVA to the tree and retry once. A pfn, NONE, ROOM, E_CPU or E_SIZE."""
    if cpu < 0 or cpu >= st[S_CPUS]:
        return E_CPU
    if size_pages <= 0:
        return E_SIZE
    if st[S_NODES] >= tree.shape[0]:
        return ROOM
    size = size_pages
    if size_pages <= CACHED_MAX_PAGES:
        order = _order(size_pages)
        size = np.int64(1) << order
        pfn = _rcache_get(tree, st, mag, cpu, order, limit_pfn + 1 - size)
        if pfn != NONE:
            return pfn
    pfn = _alloc_counted(tree, st, size, limit_pfn, True)
    if pfn == NONE and flush_rcache:
        st[S_FLUSHES] += 1
        for c in range(st[S_CPUS]):
            free_cpu_cached_iovas(tree, st, mag, c)
        free_global_cached_iovas(tree, st, mag)
        pfn = _alloc_counted(tree, st, size, limit_pfn, True)
    return pfn


@njit(cache=True)
def free_iova_fast(tree, st, mag, cpu, pfn, size_pages):
    """free_iova_fast: give back an allocation of ``size_pages`` (the size asked of
    alloc_iova_fast) into the CPU's magazine of its class (__iova_rcache_insert), else to the
    tree. 0, E_CPU, E_NOT_ALLOC (not allocated, or already in a magazine) or E_WRONG_SIZE."""
    if cpu < 0 or cpu >= st[S_CPUS]:
        return E_CPU
    i = _node_at(tree, st, pfn)
    if i < 0 or tree[i, T_MAG] != 0:
        return E_NOT_ALLOC
    allocated = tree[i, T_HI] - pfn + 1
    if size_pages <= 0 or size_pages > CACHED_MAX_PAGES:
        if allocated != size_pages:
            return E_WRONG_SIZE
        _remove_at(tree, st, i)
        return 0
    order = _order(size_pages)
    if allocated != np.int64(1) << order:
        return E_WRONG_SIZE
    loaded = mag_row(cpu, 0, order)
    if mag[loaded, 0] >= IOVA_MAG_SIZE:
        prev = mag_row(cpu, 1, order)
        if mag[prev, 0] < IOVA_MAG_SIZE:                     # swap(loaded, prev)
            tmp = mag[loaded].copy()
            _copy_row(mag, loaded, prev)
            mag[prev] = tmp
        else:
            d = st[S_DEPOT + order]
            if d < MAX_GLOBAL_MAGS:                          # depot[depot_size++] = loaded
                _copy_row(mag, depot_row(st[S_CPUS], order, d), loaded)
                st[S_DEPOT + order] = d + 1
                st[S_DEPOT_PUSHES] += 1
            else:                                            # the depot is full: to the tree
                st[S_DEPOT_OVERFLOWS] += 1
                _magazine_free_pfns(tree, st, mag, loaded)
                i = _node_at(tree, st, pfn)
            mag[loaded, 0] = 0
    size = mag[loaded, 0] + 1                                # iova_magazine_push
    mag[loaded, size] = pfn
    mag[loaded, 0] = size
    tree[i, T_MAG] = 1
    st[S_CACHED_IOVAS] += 1
    return 0


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel above once, on a tiny domain."""
    tree, st = new_state(1, 1 << 20, cap=1)
    mag = new_magazines(st, 1)
    tree = grown(tree, st)
    limit = np.int64((1 << 36) - 1)
    pfn = alloc_iova(tree, st, np.int64(3), limit, True)
    find_iova(tree, st, pfn)
    free_iova(tree, st, pfn)
    reserve_iova(tree, st, np.int64(1), np.int64(1))
    pfn = alloc_iova_fast(tree, st, mag, np.int64(0), np.int64(1), limit, True)
    free_iova_fast(tree, st, mag, np.int64(0), pfn, np.int64(1))
    free_cpu_cached_iovas(tree, st, mag, np.int64(0))
    free_global_cached_iovas(tree, st, mag)
