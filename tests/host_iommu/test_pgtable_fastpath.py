"""PageTable's fast walks (plain-int entries, one walk per run of 4-KiB pages, the one-table
unmap) against the scalar reference they replaced (ref_pgtable.RefPageTable): the same
table allocations, frees and entry stores in the same order, the same return values,
``freed_tables`` and per-table counts, and the same look-ups, leaves and shadow walks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE, PTES_PER_TABLE
from host_iommu.pgtable import FL_PS, FL_RW, SL_W, PageTable
from tests.host_iommu.ref_pgtable import RefPageTable, apply_op
from vm_agent.memory import GuestMemory, GuestTableStore

MIB2_PAGES = 1 << 9
GIB_PAGES = 1 << 18


class RecordingStore:
    """A TableStore that logs every allocation, free and store, in order; frees are reused
    last-in first-out, so two tables making the same calls get the same addresses."""

    def __init__(self, exclusive: bool = False) -> None:
        self.exclusive_writes = exclusive   # PageTable may then keep its level-1 walks
        self.writes = 0
        self.pages: dict[int, list[int]] = {}
        self.free: list[int] = []
        self.next = 1 << 30
        self.log: list[tuple] = []

    def alloc_table(self) -> int:
        if self.free:
            addr = self.free.pop()
        else:
            addr, self.next = self.next, self.next + PAGE_SIZE
        self.pages[addr] = [0] * PTES_PER_TABLE
        self.log.append(("alloc", addr))
        return addr

    def free_table(self, addr: int) -> None:
        del self.pages[addr]
        self.free.append(addr)
        self.log.append(("free", addr))

    def read(self, addr: int) -> int:
        page = self.pages.get(addr & ~(PAGE_SIZE - 1))
        return 0 if page is None else page[(addr >> 3) & 511]

    def write(self, addr: int, value: int) -> None:
        self.pages[addr & ~(PAGE_SIZE - 1)][(addr >> 3) & 511] = value
        self.writes += 1
        self.log.append(("write", addr, value))


# Page numbers near table edges: inside one level-1 table, across 2 MiB and 1 GiB.
_BASES = (0, 1, 509, MIB2_PAGES, 3 * MIB2_PAGES - 2, GIB_PAGES - 3, GIB_PAGES, 5 * GIB_PAGES)

op = st.one_of(
    st.tuples(st.just("map"), st.sampled_from(_BASES), st.integers(0, 40),
              st.sampled_from((1, 1, 2, 16, 33, 512, 700)), st.integers(0, 1 << 12),
              st.booleans(), st.booleans(), st.sampled_from((None, 0, 1, 2))),
    st.tuples(st.just("unmap"), st.sampled_from(_BASES), st.integers(0, 40),
              st.sampled_from((1, 1, 3, 16, 512, 1024, GIB_PAGES))),
    st.tuples(st.just("poke"), st.integers(0, 1 << 16), st.integers(0, 511),
              st.sampled_from((0, FL_RW, SL_W, 1, FL_PS))),
)

layouts = st.sampled_from((("fl", 4, 0), ("fl", 4, 2), ("fl", 5, 1), ("sl", 4, 0),
                           ("sl", 4, 2), ("sl", 3, 1)))


def _same(fast: PageTable, ref: RefPageTable, fs: RecordingStore, rs: RecordingStore) -> None:
    assert fs.log == rs.log
    assert fast._used == ref._used
    assert fast.table_pages == ref.table_pages
    assert list(fast.leaves()) == list(ref.leaves())
    for lo, hi in ((0, None), (1 << 21, 3 << 21), (5 << 30, (5 << 30) + (40 << 12))):
        assert fast.walk_range(lo, hi) == ref.walk_range(lo, hi)
    for page in (*_BASES, 7, 520, GIB_PAGES + 1):
        assert fast.lookup(page << PAGE_SHIFT) == ref.lookup(page << PAGE_SHIFT)


@settings(max_examples=150, deadline=None)
@given(layouts, st.lists(op, max_size=25), st.booleans())
def test_fast_walks_make_the_reference_writes(layout, ops, exclusive):
    """Every map, unmap and external store leaves both tables making the same calls (with
    the level-1 walk cache on an ``exclusive_writes`` store, and without)."""
    fmt, levels, max_order = layout
    fs, rs = RecordingStore(exclusive), RecordingStore()
    fast = PageTable(fs, fmt, levels, max_order=max_order)
    ref = RefPageTable(rs, fmt, levels, max_order=max_order)
    for o in ops:
        if not apply_op(o, fast, ref, fs, rs, fmt):
            return
        _same(fast, ref, fs, rs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.sampled_from((1, 1, 2, 5, 16, 32))),
                max_size=40))
def test_guest_store_driver_pattern(maps):
    """The guest driver's pattern on GuestTableStore (4-KiB first level, map then unmap):
    the same stores reach on_write, in order, as with the reference."""
    logs: list[list[tuple[int, int]]] = [[], []]
    stores = [GuestTableStore(GuestMemory(1 << 14), on_write=lambda a, v, k=k:
                              logs[k].append((a, v))) for k in (0, 1)]
    fast = PageTable(stores[0], "fl", 4, max_order=0)
    ref = RefPageTable(stores[1], "fl", 4, max_order=0)
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
        assert logs[0] == logs[1]
        assert stores[0].writes == stores[1].writes
        assert stores[0].pages.keys() == stores[1].pages.keys()
    assert stores[0].mem.table_residue.keys() == stores[1].mem.table_residue.keys()


def test_small_pages_into_large_leaves():
    """A 4-KiB map or unmap inside a 2-MiB or 1-GiB leaf splits it on the way down, as the
    reference does (no step of the fast walk may take a large leaf for a table)."""
    for fmt, levels in (("fl", 4), ("sl", 4), ("sl", 3)):
        for big_pages in (MIB2_PAGES, GIB_PAGES):
            fs, rs = RecordingStore(exclusive=True), RecordingStore()
            fast = PageTable(fs, fmt, levels, max_order=2)
            ref = RefPageTable(rs, fmt, levels, max_order=2)
            iova, phys = GIB_PAGES << PAGE_SHIFT, 3 * GIB_PAGES << PAGE_SHIFT
            size = big_pages << PAGE_SHIFT
            assert fast.map(iova, phys, size) == ref.map(iova, phys, size)
            inner = iova + (MIB2_PAGES + 5 << PAGE_SHIFT) % size
            last = iova + size - 2 * PAGE_SIZE   # inside a leaf no map below has split
            assert fast.unmap(last, PAGE_SIZE) == ref.unmap(last, PAGE_SIZE)
            _same(fast, ref, fs, rs)
            assert fast.map(inner, 0x5000, 2 * PAGE_SIZE, write=False) == ref.map(
                inner, 0x5000, 2 * PAGE_SIZE, write=False)
            _same(fast, ref, fs, rs)
            assert fast.unmap(inner + 0x3000, PAGE_SIZE) == ref.unmap(inner + 0x3000,
                                                                     PAGE_SIZE)
            _same(fast, ref, fs, rs)
            assert fast.unmap(iova, size) == ref.unmap(iova, size)
            assert fast.freed_tables == ref.freed_tables
            _same(fast, ref, fs, rs)


def test_walk_cache_follows_frees_and_outside_stores():
    """The level-1 walk cache of an exclusive_writes store: a table freed by an unmap over
    its whole 2 MiB, or an upper entry changed by an outside store, is walked afresh."""
    for fmt in ("fl", "sl"):
        fs, rs = RecordingStore(exclusive=True), RecordingStore()
        fast = PageTable(fs, fmt, 4, max_order=0)
        ref = RefPageTable(rs, fmt, 4, max_order=0)
        region = 3 << 21
        for fn in (fast, ref):
            fn.map(region + PAGE_SIZE, 0x9000, PAGE_SIZE)
            fn.unmap(region + PAGE_SIZE, PAGE_SIZE)           # the walks are cached
            fn.unmap(region, 1 << 21)                         # frees the level-1 table
            fn.map(region + 2 * PAGE_SIZE, 0xA000, PAGE_SIZE)  # a new one is made
        _same(fast, ref, fs, rs)
        for store in (fs, rs):   # an outside store takes the level-2 entry's present bit
            l2 = next(t for t in sorted(store.pages) if t != fast.root
                      and any(store.pages[t][3:4]))
            store.write(l2 + 8 * 3, store.read(l2 + 8 * 3) & ~1 & ~SL_W)
        for fn in (fast, ref):
            fn.map(region + 5 * PAGE_SIZE, 0xB000, PAGE_SIZE)
            fn.unmap(region + 2 * PAGE_SIZE, PAGE_SIZE)
        _same(fast, ref, fs, rs)
