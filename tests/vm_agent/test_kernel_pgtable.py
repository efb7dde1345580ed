"""The compiled guest page tables (vm_agent/kernels/pgtable.py, through PageTable on a
GuestTableStore) against the scalar reference (tests/host_iommu/ref_pgtable.py) on a store of
its own: the same table allocations and entry stores reaching ``on_write`` in the same order
(zeroing stores of a reused table page included), the same table pages freed in the same
order, the same return values, ``freed_tables``, ``writes``, per-table counts, table
contents, residue, look-ups, leaves and shadow walks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.pgtable import FL_PS, FL_RW, SL_W, PageTable
from tests.host_iommu.ref_pgtable import RefPageTable, apply_op
from vm_agent.kernels import pgtable as kpg
from vm_agent.memory import GuestMemory, GuestTableStore

MIB2_PAGES = 1 << 9
GIB_PAGES = 1 << 18
FRAMES = 1 << 16


class LoggedStore(GuestTableStore):
    """A GuestTableStore whose allocations and stores go to one log, in order, and whose
    frees go to another (an unmap's frees and stores touch different pages, and the
    compiled unmap reports its stores before its caller frees)."""

    def __init__(self, out_events: int = 2048) -> None:
        self.log: list[tuple] = []
        self.frees: list[int] = []
        super().__init__(GuestMemory(FRAMES), on_write=lambda a, v: self.log.append((a, v)),
                         out_events=out_events)

    def alloc_table(self) -> int:
        gpa = super().alloc_table()
        self.log.append(("alloc", gpa))
        return gpa

    def free_table(self, addr: int) -> None:
        self.frees.append(addr)
        super().free_table(addr)


def _pair(fmt: str, levels: int, max_order: int, out_events: int = 2048
          ) -> tuple[PageTable, RefPageTable, LoggedStore, LoggedStore]:
    fs, rs = LoggedStore(out_events), LoggedStore()
    fast = PageTable(fs, fmt, levels, max_order=max_order)
    ref = RefPageTable(rs, fmt, levels, max_order=max_order)
    assert fast._kernel
    return fast, ref, fs, rs


def _same(fast: PageTable, ref: RefPageTable, fs: LoggedStore, rs: LoggedStore) -> None:
    assert fs.log == rs.log
    assert fs.frees == rs.frees
    assert fs.writes == rs.writes
    assert fast._used == ref._used
    assert fast.table_pages == ref.table_pages
    assert fs.pages.keys() == rs.pages.keys()
    for gpa, page in fs.pages.items():
        assert np.array_equal(page, rs.pages[gpa])
    assert fs.mem.table_residue.keys() == rs.mem.table_residue.keys()
    for gpa, slots in fs.mem.table_residue.items():
        assert np.array_equal(slots, rs.mem.table_residue[gpa])
    assert fs.mem.free_lists == rs.mem.free_lists
    assert fs.mem.next_frame == rs.mem.next_frame
    assert list(fast.leaves()) == list(ref.leaves())
    for lo, hi in ((0, None), (1 << 21, 3 << 21), (GIB_PAGES - 3 << PAGE_SHIFT, 1 << 31)):
        assert fast.walk_range(lo, hi) == ref.walk_range(lo, hi)
    for page in (*_BASES, 7, 520, GIB_PAGES + 1):
        if page << PAGE_SHIFT < fast.limit:
            assert fast.lookup(page << PAGE_SHIFT) == ref.lookup(page << PAGE_SHIFT)


# Page numbers near table edges: inside one level-1 table, across 2 MiB and 1 GiB.
_BASES = (0, 1, 509, MIB2_PAGES, 3 * MIB2_PAGES - 2, GIB_PAGES - 3, GIB_PAGES, 5 * GIB_PAGES)

op = st.one_of(
    st.tuples(st.just("map"), st.sampled_from(_BASES), st.integers(0, 40),
              st.sampled_from((1, 1, 2, 16, 33, 512, 700, 2 * MIB2_PAGES + 3)),
              st.integers(0, 1 << 12), st.booleans(), st.booleans(),
              st.sampled_from((None, 0, 0, 1, 2))),
    st.tuples(st.just("unmap"), st.sampled_from(_BASES), st.integers(0, 40),
              st.sampled_from((1, 1, 3, 16, 512, 1024, GIB_PAGES, 2 * GIB_PAGES))),
    st.tuples(st.just("poke"), st.integers(0, 1 << 16), st.integers(0, 511),
              st.sampled_from((0, FL_RW, SL_W, 1, FL_PS))),
)

layouts = st.sampled_from((("fl", 4, 0), ("fl", 4, 2), ("fl", 5, 0), ("fl", 5, 1),
                           ("sl", 4, 0), ("sl", 4, 2), ("sl", 3, 0), ("sl", 5, 1)))


# Found by hypothesis: PS set on a level-3 table link (a 1-GiB leaf), split by a map into
# 2-MiB leaves, one of which loses PS again: a link to a page that is no table, which an
# unmap over it frees (the reference's KeyError, not a silent free).
_STRAY_LINK = [("map", 0, 38, 1027, 30, False, False, None), ("poke", 30, 97, 128),
               ("map", 512, 17, 1, 832, False, True, None), ("unmap", 1310720, 8, 524288),
               ("map", 0, 29, 1, 295, False, False, None),
               ("map", 262144, 27, 1, 1834, False, False, None), ("poke", 30, 97, 128),
               ("unmap", 0, 28, 524288), ("map", 0, 0, 1, 0, False, False, None)]


@settings(max_examples=150, deadline=None)
@given(layouts, st.lists(op, max_size=25), st.sampled_from((2048, 600)))
@example(("fl", 4, 0), _STRAY_LINK, 2048)
def test_compiled_runs_make_the_reference_stores(layout, ops, out_events):
    """Random and edge maps and unmaps (runs across 2 MiB and 1 GiB, unmaps freeing whole
    tables, large leaves the compiled runs leave to Python, outside stores), with a report
    buffer large or small (map asks to be called again, unmap grows it)."""
    fmt, levels, max_order = layout
    fast, ref, fs, rs = _pair(fmt, levels, max_order, out_events)
    for o in ops:
        if not apply_op(o, fast, ref, fs, rs, fmt):
            return
        _same(fast, ref, fs, rs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.sampled_from((1, 1, 2, 5, 16, 32))),
                max_size=40), st.sampled_from((("fl", 4), ("fl", 5), ("sl", 4))))
def test_guest_driver_pattern(maps, layout):
    """The guest driver's pattern (4-KiB pages at the top of the 32-bit space, map then
    unmap in IOVA allocator order, table pages reused with their residue zeroed)."""
    fmt, levels = layout
    fast, ref, fs, rs = _pair(fmt, levels, 0)
    live: list[tuple[int, int]] = []
    for i, (page, pages) in enumerate(maps):
        iova, size = (0x7FFF_0000 + page) << PAGE_SHIFT, pages << PAGE_SHIFT
        if i % 3 == 2 and live:
            iova, size = live.pop(0)
            assert fast.unmap(iova, size) == ref.unmap(iova, size)
            assert fast.freed_tables == ref.freed_tables
        else:
            assert fast.map(iova, 0x40_0000, size) == ref.map(iova, 0x40_0000, size)
            live.append((iova, size))
        assert fs.log == rs.log and fs.frees == rs.frees
    _same(fast, ref, fs, rs)


def test_whole_tables_freed_children_first_and_reused():
    """An unmap covering a 1-GiB region frees its level-2 table after its level-1 tables;
    the next map takes the pages back (last freed first) and zeroes their old entries."""
    for fmt, levels in (("fl", 4), ("sl", 4), ("fl", 5), ("sl", 3)):
        fast, ref, fs, rs = _pair(fmt, levels, 0)
        for t in (fast, ref):
            t.map(GIB_PAGES - 3 << PAGE_SHIFT, 0x40_0000, 3 * MIB2_PAGES + 6 << PAGE_SHIFT)
        _same(fast, ref, fs, rs)
        assert fast.unmap(GIB_PAGES << PAGE_SHIFT, GIB_PAGES << PAGE_SHIFT) == ref.unmap(
            GIB_PAGES << PAGE_SHIFT, GIB_PAGES << PAGE_SHIFT)
        assert fast.freed_tables == ref.freed_tables == 5   # 4 level-1 + 1 level-2
        _same(fast, ref, fs, rs)
        n0 = len(fs.log)
        for t in (fast, ref):
            t.map(7 << PAGE_SHIFT, 0x9000, 2 * MIB2_PAGES << PAGE_SHIFT)
        _same(fast, ref, fs, rs)
        assert any(e[0] != "alloc" and e[1] == 0 for e in fs.log[n0:])   # zeroing stores


def test_unmap_grows_its_report_room():
    """An unmap listing more stores than the report buffer holds grows it and does it all."""
    fast, ref, fs, rs = _pair("fl", 4, 0, out_events=5 + kpg.SLOTS)
    for t in (fast, ref):
        t.map(1 << PAGE_SHIFT, 0x40_0000, 3 * MIB2_PAGES << PAGE_SHIFT)
    size = 3 * MIB2_PAGES - 3 << PAGE_SHIFT   # two level-1 tables partly, one whole
    assert fast.unmap(2 << PAGE_SHIFT, size) == ref.unmap(2 << PAGE_SHIFT, size) > 5 + kpg.SLOTS
    assert fast.freed_tables == ref.freed_tables == 1
    _same(fast, ref, fs, rs)


def test_copied_store_keeps_its_views():
    """A copied table and store (pickling) go on as the original does."""
    fast, _ref, fs, _rs = _pair("sl", 4, 0)
    fast.map(5 << PAGE_SHIFT, 0x8000, 40 << PAGE_SHIFT)
    twin = copy.deepcopy(fast)
    for t in (fast, twin):
        t.unmap(6 << PAGE_SHIFT, 3 << PAGE_SHIFT)
        t.map(600 << PAGE_SHIFT, 0xA000, 30 * MIB2_PAGES << PAGE_SHIFT)   # the slab grows
    assert list(twin.leaves()) == list(fast.leaves())
    assert twin.store.pages.keys() == fs.pages.keys()
    assert all(np.array_equal(twin.store.pages[g], p) for g, p in fs.pages.items())


def test_second_tree_in_a_store_stays_on_python_walks():
    """The compiled runs serve the one tree of a store: a second tree there walks in
    Python, and small report buffers are refused."""
    store = GuestTableStore(GuestMemory(1 << 12))
    assert PageTable(store, "fl", 4, max_order=0)._kernel
    assert not PageTable(store, "fl", 4, max_order=0)._kernel
    with pytest.raises(ValueError, match="out_events"):
        GuestTableStore(GuestMemory(1 << 12), out_events=100)


def test_destroyed_table_refuses_maps():
    fast, ref, fs, rs = _pair("fl", 4, 0)
    for t in (fast, ref):
        t.map(3 << PAGE_SHIFT, 0x40_0000, 2 * MIB2_PAGES << PAGE_SHIFT)
        t.destroy()
    assert fs.frees == rs.frees and fast.table_pages == ref.table_pages == 0
    with pytest.raises(ValueError, match="destroyed"):
        fast.map(0, 0, PAGE_SIZE)
