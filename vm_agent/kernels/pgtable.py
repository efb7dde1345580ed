"""The guest's IOMMU page tables in one array, with compiled map and unmap of a run.

One int64 array per guest domain, ``state``, holds everything the kernels touch (one array,
so a call from Python costs one array's dispatch): a header, then

- ``row_of[frames]``: the slab row of the table page at each GPA frame (-1: the page is no
  table, and reads as zeros, as GuestTableStore.read answers);
- ``used[rows]``: each table's non-zero entries (PageTable's per-table count);
- ``mark[rows]``: stamps of the tables an unmap reached (the stamp counter in the header);
- ``out[2 * events]``: the stores a call made, as (address, value) pairs in order; a table an
  unmap freed is listed in its place as (address | FREED, 0);
- ``slab[rows, 512]``: the table pages' entries (uint64 bits in int64 words).

The kernels do what host_iommu/pgtable.py PageTable's walks do, store for store and in the
same order:

- ``map_4k``: PageTable.map of 4-KiB pages (Linux drivers/iommu/intel/iommu.c
  __domain_mapping: pfn_to_dma_pte allocating a missing table, then one leaf per page),
  one walk per 2-MiB run (PageTable._walk_to, _install_4k_run).
- ``unmap_range``: PageTable.unmap (Linux dma_pte_clear_range / dma_pte_clear_level: an
  entry whose whole region the range covers is cleared with one store and the tables below
  it are freed, children before parents as dma_pte_list_pagetables lists them; a partly
  covered table is descended into and stays).

Table pages come from the guest's page allocator, which a kernel cannot call, and each
allocation's zeroing stores must reach the host between the stores around it: ``map_4k``
stops with NEED_TABLE at a missing entry, the caller allocates (GuestTableStore.alloc_table)
and calls again with the new table, and the walk picks up where it stopped. Whatever a
kernel does not do as PageTable would (a large leaf to split, an entry leading to a page
that is no table, a table reached twice) it leaves untouched and answers FALLBACK, for
PageTable's Python walk to do from there. Growing the array is the caller's (``grown``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.pgtable import RUN_DONE as DONE
from host_iommu.pgtable import RUN_FALLBACK as FALLBACK
from host_iommu.pgtable import RUN_MORE as MORE
from host_iommu.pgtable import RUN_NEED_TABLE as NEED_TABLE

NEED_ROOM = 4   # (unmap) ``out`` needs room for more stores; nothing was done

# Header words of ``state``: its room, then the one tree it holds (``bind``).
H_FRAMES = 0    # GPA frames row_of covers
H_ROWS = 1      # slab rows (table pages it can hold)
H_EVENTS = 2    # stores out can hold
H_STAMP = 3     # the last stamp unmap_range gave
H_ROOT = 4      # the tree's root table (GPA)
H_LEVELS = 5    # its levels (3..5)
H_PRESENT = 6   # the format's present bits (first level: P; second level: R|W)
H_PS = 7        # the format's page-size bit
H_AMASK = 8     # the address field of an entry (bits haw-1..12)
H_LINK = 9      # the bits of a non-leaf entry besides its address (fl_table, sl_table)
HEADER = 10
EVENT = 2       # int64 words per reported store: address, value
FREED = 1       # low bit of a reported address: the table page at address - 1 was freed
SLOTS = 512     # entries per table page

_PAGE_SHIFT = 12
_STRIDE = 9
_L2_SHIFT = 21  # one level-1 table maps 2 MiB
_MAX_LEVELS = 5


def offsets(frames: int, rows: int, events: int) -> tuple[int, int, int, int, int]:
    """Where row_of, used, mark, out and slab start, and (as the last) the words in all."""
    used = HEADER + frames
    mark = used + rows
    out = mark + rows
    slab = out + EVENT * events
    return used, mark, out, slab, slab + rows * SLOTS


def grown(old: np.ndarray | None, frames: int, rows: int, events: int) -> np.ndarray:
    """A state array with room for ``frames``, ``rows`` and ``events``, holding ``old``'s
    tables (None: empty); row_of is -1 where no table is."""
    used, mark, _out, slab, size = offsets(frames, rows, events)
    state = np.zeros(size, np.int64)
    state[HEADER:used] = -1
    if old is not None:
        f0, r0, e0 = (int(x) for x in old[:H_STAMP])
        used0, mark0, _out0, slab0, end0 = offsets(f0, r0, e0)
        state[:HEADER] = old[:HEADER]
        state[HEADER:HEADER + f0] = old[HEADER:used0]
        state[used:used + r0] = old[used0:mark0]
        state[mark:mark + r0] = old[mark0:mark0 + r0]
        state[slab:slab + r0 * SLOTS] = old[slab0:end0]
    state[H_FRAMES], state[H_ROWS], state[H_EVENTS] = frames, rows, events
    return state


def bind(state: np.ndarray, root: int, levels: int, present: int, ps: int, amask: int,
         link_bits: int) -> None:
    """Record the tree ``state`` holds: its root and levels, and its format's bits."""
    state[H_ROOT], state[H_LEVELS] = root, levels
    state[H_PRESENT], state[H_PS], state[H_AMASK], state[H_LINK] = present, ps, amask, link_bits


def slab_of(state: np.ndarray) -> np.ndarray:
    """The slab as a uint64[rows, 512] view of ``state``."""
    rows = int(state[H_ROWS])
    *_, slab, end = offsets(int(state[H_FRAMES]), rows, int(state[H_EVENTS]))
    return state[slab:end].view(np.uint64).reshape(rows, SLOTS)


@njit(cache=True)
def _layout(state):
    """(row_of, used, mark, out, slab) offsets, as ``offsets``."""
    used = HEADER + state[H_FRAMES]
    mark = used + state[H_ROWS]
    out = mark + state[H_ROWS]
    return used, mark, out, out + EVENT * state[H_EVENTS]


@njit(cache=True)
def _row(state, addr):
    """Slab row of the table page at ``addr``; -1 when that page is no table."""
    frame = addr >> _PAGE_SHIFT
    if frame < 0 or frame >= state[H_FRAMES]:
        return -1
    return state[HEADER + frame]


@njit(cache=True)
def map_4k(state, iova, end, phys, bits, new_table):
    """Map [iova, end) to 4-KiB leaves ``(phys + offset) | bits``; (code, pos, stores).

    The tree and its format are the header's (``bind``). ``new_table`` is a zeroed table
    page to link at the first missing entry, or -1. The answer's ``pos`` is the
    IOVA to call again from (NEED_TABLE, MORE, FALLBACK); the stores before it are made and
    listed in ``out``. Per 2-MiB run: the walk from the root (a missing entry linked to a
    new table, as PageTable._walk_to), then one leaf per page in IOVA order.
    """
    used, _mark, out, slab = _layout(state)
    root, levels, present, ps = state[H_ROOT], state[H_LEVELS], state[H_PRESENT], state[H_PS]
    amask, link_bits = state[H_AMASK], state[H_LINK]
    n = 0
    cap = state[H_EVENTS]
    while iova < end:
        if n + levels + SLOTS > cap:
            return MORE, iova, n
        table = root
        row = _row(state, table)
        for level in range(levels, 1, -1):
            idx = (iova >> (_PAGE_SHIFT + _STRIDE * (level - 1))) & (SLOTS - 1)
            at = slab + row * SLOTS + idx
            entry = state[at]
            if not entry & present:
                if new_table < 0:
                    return NEED_TABLE, iova, n
                value = new_table | link_bits
                state[at] = value
                state[used + row] += 1 - (entry != 0)
                state[out + EVENT * n] = table + 8 * idx
                state[out + EVENT * n + 1] = value
                n += 1
                table = new_table
                new_table = -1
            elif entry & ps:          # a large leaf to split: PageTable._split
                return FALLBACK, iova, n
            else:
                table = entry & amask
            row = _row(state, table)
            if row < 0:               # an entry leading to a page that is no table
                return FALLBACK, iova, n
        run_end = min(end, ((iova >> _L2_SHIFT) + 1) << _L2_SHIFT)
        idx = (iova >> _PAGE_SHIFT) & (SLOTS - 1)
        at = slab + row * SLOTS + idx
        ea = table + 8 * idx
        count = 0
        for k in range((run_end - iova) >> _PAGE_SHIFT):
            old = state[at + k]
            value = (phys + (k << _PAGE_SHIFT)) | bits
            state[at + k] = value
            count += 1 - (old != 0)
            state[out + EVENT * n] = ea + 8 * k
            state[out + EVENT * n + 1] = value
            n += 1
        state[used + row] += count
        phys += run_end - iova
        iova = run_end
    return DONE, iova, n


@njit(cache=True)
def _free_list(state, stamp, n, table, level, present, ps, amask):
    """List ``table`` and every table below it, children first (PageTable._free_subtree's
    order), as FREED stores of ``out`` from ``n`` (counted past its room, written within
    it); (ok, n). Not ok when an entry leads to a page that is no table or to a table
    already reached: PageTable's walk must decide."""
    _used, mark, out, slab = _layout(state)
    cap = state[H_EVENTS]
    rows = np.empty(_MAX_LEVELS, np.int64)
    addrs = np.empty(_MAX_LEVELS, np.int64)
    lvls = np.empty(_MAX_LEVELS, np.int64)
    nxt = np.empty(_MAX_LEVELS, np.int64)
    row = _row(state, table)
    if row < 0 or state[mark + row] == stamp:
        return False, n
    state[mark + row] = stamp
    sp = 0
    rows[0], addrs[0], lvls[0], nxt[0] = row, table, level, 0
    while sp >= 0:
        if lvls[sp] == 1 or nxt[sp] == SLOTS:
            if n < cap:
                state[out + EVENT * n] = addrs[sp] | FREED
                state[out + EVENT * n + 1] = 0
            n += 1
            sp -= 1
            continue
        entry = state[slab + rows[sp] * SLOTS + nxt[sp]]
        nxt[sp] += 1
        if entry & present and not entry & ps:
            child = entry & amask
            crow = _row(state, child)
            if crow < 0 or state[mark + crow] == stamp:
                return False, n
            state[mark + crow] = stamp
            sp += 1
            rows[sp], addrs[sp], lvls[sp], nxt[sp] = crow, child, lvls[sp - 1] - 1, 0
    return True, n


@njit(cache=True)
def unmap_range(state, start, end):
    """Clear [start, end) as PageTable._unmap; (code, stores, frees) in ``out``.

    First a read-only pass lists every store and free in PageTable's order; only when
    nothing in it needs the Python walk (a partly covered large leaf to split, an entry
    leading to a page that is no table, a table reached twice) and ``out`` holds it all are
    the stores made (the frees are the caller's, in the listed order). NEED_ROOM: ``out``
    needs room for stores + frees; FALLBACK: nothing done.
    """
    used, mark, out, slab = _layout(state)
    root, levels, present, ps = state[H_ROOT], state[H_LEVELS], state[H_PRESENT], state[H_PS]
    amask = state[H_AMASK]
    cap = state[H_EVENTS]
    stamp = state[H_STAMP] + 1
    state[H_STAMP] = stamp
    rows = np.empty(_MAX_LEVELS, np.int64)
    tables = np.empty(_MAX_LEVELS, np.int64)
    lvls = np.empty(_MAX_LEVELS, np.int64)
    base = np.empty(_MAX_LEVELS, np.int64)
    lo_s = np.empty(_MAX_LEVELS, np.int64)
    hi_e = np.empty(_MAX_LEVELS, np.int64)
    nxt = np.empty(_MAX_LEVELS, np.int64)
    last = np.empty(_MAX_LEVELS, np.int64)
    row = _row(state, root)
    state[mark + row] = stamp
    shift = _PAGE_SHIFT + _STRIDE * (levels - 1)
    sp = 0
    rows[0], tables[0], lvls[0], base[0], lo_s[0], hi_e[0] = row, root, levels, 0, start, end
    nxt[0], last[0] = start >> shift, (end - 1) >> shift
    n = 0
    frees = 0
    while sp >= 0:
        if nxt[sp] > last[sp]:
            sp -= 1
            continue
        idx = nxt[sp]
        nxt[sp] += 1
        level = lvls[sp]
        entry = state[slab + rows[sp] * SLOTS + idx]
        if not entry & present:
            continue
        shift = _PAGE_SHIFT + _STRIDE * (level - 1)
        lo = base[sp] + (idx << shift)
        hi = lo + (1 << shift)
        leaf = level == 1 or entry & ps
        if lo_s[sp] <= lo and hi <= hi_e[sp]:   # the whole region: free below, clear
            if not leaf:
                ok, n2 = _free_list(state, stamp, n, entry & amask, level - 1, present, ps,
                                    amask)
                if not ok:
                    return FALLBACK, 0, 0
                frees += n2 - n
                n = n2
            if n < cap:
                state[out + EVENT * n] = tables[sp] + 8 * idx
                state[out + EVENT * n + 1] = 0
            n += 1
            continue
        if leaf:                                 # a large leaf partly covered: split
            return FALLBACK, 0, 0
        child = entry & amask
        crow = _row(state, child)
        if crow < 0 or state[mark + crow] == stamp:
            return FALLBACK, 0, 0
        state[mark + crow] = stamp
        s, e = max(lo_s[sp], lo), min(hi_e[sp], hi)
        cshift = shift - _STRIDE
        sp += 1
        rows[sp], tables[sp], lvls[sp], base[sp], lo_s[sp], hi_e[sp] = (
            crow, child, level - 1, lo, s, e)
        nxt[sp], last[sp] = (s - lo) >> cshift, (e - 1 - lo) >> cshift
    if n > cap:
        return NEED_ROOM, n - frees, frees
    for i in range(n):
        ea = state[out + EVENT * i]
        if ea & FREED:
            continue
        row = _row(state, ea & ~(4096 - 1))
        state[slab + row * SLOTS + ((ea >> 3) & (SLOTS - 1))] = 0
        state[used + row] -= 1
    return DONE, n - frees, frees
