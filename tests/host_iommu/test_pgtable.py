"""Tests for host_iommu.pgtable: entry formats, reserved masks and the PageTable builder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    KIND_GUEST_TABLE,
    KIND_PAGETABLE,
    OWNER_FREE,
    order_size,
)
from host_iommu.memory import HostMemory
from host_iommu.pgtable import (
    FL_A,
    FL_D,
    FL_P,
    FL_PS,
    FL_RW,
    FL_US,
    FL_XD,
    SL_PS,
    SL_R,
    SL_SNP,
    SL_W,
    HostTableStore,
    PageTable,
    addr_mask,
    canonical,
    canonical_np,
    fl_decode,
    fl_index,
    fl_leaf,
    fl_reserved_masks,
    fl_table,
    sl_decode,
    sl_index,
    sl_leaf,
    sl_reserved_masks,
    sl_table,
)

K4, M2, G1 = order_size(0), order_size(1), order_size(2)
U64 = (1 << 64) - 1
VM = 3


def make_table(fmt: str = "fl", levels: int = 4, **kw) -> tuple[HostMemory, PageTable]:
    mem = HostMemory(2048)
    return mem, PageTable(HostTableStore(mem, VM), fmt, levels, **kw)


def entry_at(pt: PageTable, iova: int, level: int) -> int:
    """Raw entry that translates ``iova`` at ``level`` (walking down from the root)."""
    dec = fl_decode if pt.fmt == "fl" else sl_decode
    table = pt.root
    for lvl in range(pt.levels, level, -1):
        table = dec(pt.store.read(table + 8 * fl_index(iova, lvl)), lvl).addr
    return pt.store.read(table + 8 * fl_index(iova, level))


# --- constants, indices, canonical ----------------------------------------------------------
def test_bit_constants_match_the_spec_layout():
    """FL bits are x86-64 paging bits; SL bits are the VT-d second-level bits."""
    assert (FL_P, FL_RW, FL_US, FL_A, FL_D, FL_PS, FL_XD) == (1, 2, 4, 0x20, 0x40, 0x80, 1 << 63)
    assert (SL_R, SL_W, SL_PS, SL_SNP) == (1, 2, 0x80, 0x800)
    assert addr_mask(48) == 0x0000_FFFF_FFFF_F000
    assert addr_mask(52) == 0x000F_FFFF_FFFF_F000


@given(st.integers(0, U64), st.integers(1, 5))
@settings(max_examples=50)
def test_index_scalar_matches_numpy(addr, level):
    """fl_index/sl_index give the same 9-bit index for ints and uint64 arrays."""
    arr = np.array([addr, addr ^ (1 << 63)], dtype=np.uint64)
    expect = (addr >> (12 + 9 * (level - 1))) & 511
    assert fl_index(addr, level) == sl_index(addr, level) == expect
    assert int(fl_index(arr, level)[0]) == expect


def test_canonical_hand_checked():
    """48-bit canonical: bits 63..47 all equal."""
    assert canonical(0x0000_7FFF_FFFF_FFFF, 48)
    assert not canonical(0x0000_8000_0000_0000, 48)
    assert canonical(0xFFFF_8000_0000_0000, 48)
    assert not canonical(0xFFFF_0000_0000_0000, 48)
    assert canonical(0x00FF_FFFF_FFFF_FFFF, 57)
    assert not canonical(0x01FF_FFFF_FFFF_FFFF, 57)
    assert canonical(0x00FF_FFFF_FFFF_FFFF, 64)
    with pytest.raises(ValueError):
        canonical(-1, 48)


@given(st.lists(st.integers(0, U64), min_size=1, max_size=20), st.sampled_from([39, 48, 57]))
@settings(max_examples=40)
def test_canonical_np_matches_scalar(addrs, width):
    """The vectorized check agrees with the scalar one."""
    got = canonical_np(np.array(addrs, dtype=np.uint64), width)
    assert got.tolist() == [canonical(a, width) for a in addrs]


# --- encoders / decoders --------------------------------------------------------------------
@given(st.integers(0, (1 << 40) - 1), st.sampled_from([0, 1, 2]), st.booleans(), st.booleans())
@settings(max_examples=60)
def test_fl_leaf_round_trip(page, order, writable, xd):
    """An FL leaf decodes to its address, leafness and permissions, with no reserved bit."""
    phys = (page << 12) & ~(order_size(order) - 1)
    level = order + 1
    entry = fl_leaf(phys, order, writable, xd=xd)
    info = fl_decode(entry, level)
    assert info == (True, phys, True, ACCESS_READ | (ACCESS_WRITE if writable else 0))
    assert bool(entry & FL_D) == writable and entry & FL_A and entry & FL_US
    assert bool(entry & FL_XD) == xd
    assert entry & int(fl_reserved_masks(52)[level, int(bool(entry & FL_PS))]) == 0


@given(st.integers(0, (1 << 40) - 1), st.sampled_from([0, 1, 2]), st.booleans(), st.booleans(),
       st.booleans())
@settings(max_examples=60)
def test_sl_leaf_round_trip(page, order, read, write, snp):
    """An SL leaf decodes to its address and R/W; present iff R or W; SNP is not reserved."""
    phys = (page << 12) & ~(order_size(order) - 1)
    level = order + 1
    entry = sl_leaf(phys, order, read, write, snp=snp)
    perms = (ACCESS_READ if read else 0) | (ACCESS_WRITE if write else 0)
    assert sl_decode(entry, level) == (read or write, phys, True, perms)
    assert entry & int(sl_reserved_masks(52)[level, int(bool(entry & SL_PS))]) == 0


@given(st.integers(1, (1 << 40) - 1), st.integers(2, 5))
@settings(max_examples=40)
def test_table_entries_round_trip(page, level):
    """Non-leaf entries decode as present, non-leaf, read+write, with no reserved bit."""
    addr = page << 12
    rw = ACCESS_READ | ACCESS_WRITE
    assert fl_decode(fl_table(addr), level) == (True, addr, False, rw)
    assert sl_decode(sl_table(addr), level) == (True, addr, False, rw)
    assert fl_table(addr) & int(fl_reserved_masks(52)[level, 0]) == 0
    assert sl_table(addr) & int(sl_reserved_masks(52)[level, 0]) == 0


def test_encoders_reject_bad_input():
    """Unaligned, out-of-range addresses and unknown orders are ValueErrors."""
    for bad in (lambda: fl_leaf(0x1000, 1, True), lambda: sl_leaf(0x20_0000, 2, True, True),
                lambda: fl_leaf(0, 3, True), lambda: fl_table(0x1008),
                lambda: sl_table(1 << 52), lambda: sl_leaf(-4096, 0, True, False)):
        with pytest.raises(ValueError):
            bad()


def test_fl_decode_level1_bit7_is_pat_and_large_leaf_drops_pat():
    """Bit 7 at level 1 does not make a table; bit 12 of a 2M leaf is PAT, not address."""
    assert fl_decode(0x5000 | FL_P | FL_PS, 1).leaf
    assert fl_decode(0x20_0000 | 0x1000 | FL_P | FL_PS, 2).addr == 0x20_0000
    assert not fl_decode(0x5000 | FL_RW, 1).present
    assert fl_leaf(0x5000, 0, True, preset_ad=False) & (FL_A | FL_D) == 0


# --- reserved masks -------------------------------------------------------------------------
def rsvd(masks: np.ndarray, entry: int, level: int, ps_bit: int) -> bool:
    return entry & int(masks[level, int(bool(entry & ps_bit))]) != 0


def test_fl_reserved_masks_hand_checked():
    """2M leaf: 13 reserved, 12 (PAT) not; 1G: 29 reserved, 30 not; PS at L4/L5; beyond HAW."""
    m = fl_reserved_masks(52)
    assert m.shape == (6, 2) and m.dtype == np.uint64
    leaf2m = fl_leaf(0x4000_0000, 1, True)
    assert rsvd(m, leaf2m | (1 << 13), 2, FL_PS)
    assert not rsvd(m, leaf2m | (1 << 12), 2, FL_PS)
    assert not rsvd(m, leaf2m | (1 << 13), 2, 0)  # a table entry's bit 13 is address
    leaf1g = fl_leaf(0x4000_0000, 2, True)
    assert rsvd(m, leaf1g | (1 << 29), 3, FL_PS)
    assert not rsvd(m, leaf1g | (1 << 30), 3, FL_PS)
    assert rsvd(m, fl_table(0x1000) | FL_PS, 4, FL_PS)
    assert rsvd(m, fl_table(0x1000) | FL_PS, 5, FL_PS)
    assert m[1, 0] == m[1, 1]
    assert not rsvd(m, fl_leaf(0x1000, 0, True) | (0x7FF << 52), 1, FL_PS)  # 62:52 ignored
    m39 = fl_reserved_masks(39)
    assert rsvd(m39, fl_leaf(1 << 39, 0, True), 1, FL_PS)
    assert not rsvd(m39, fl_leaf(1 << 38, 0, True), 1, FL_PS)


@pytest.mark.parametrize("aw", [39, 48, 52])
def test_sl_reserved_masks_match_qemu(aw):
    """Same bits as QEMU's VTD_SPTE_*_RSVD_MASK with SNP allowed on leaves."""
    haw_mask = (1 << aw) - 1
    ign_com = 0xBFF0_0000_0000_0000
    q = lambda low: (low | ~(haw_mask | ign_com)) & U64  # noqa: E731
    m = sl_reserved_masks(aw)
    assert int(m[1, 0]) == q(0x800) & ~SL_SNP
    assert int(m[2, 0]) == q(0x800) and int(m[3, 0]) == q(0x800)
    assert int(m[4, 0]) == q(0x880) and int(m[4, 1]) == q(0x880)
    assert int(m[2, 1]) == q(0x1FF800) & ~SL_SNP
    assert int(m[3, 1]) == q(0x3FFFF800) & ~SL_SNP


def test_sl_reserved_masks_hand_checked():
    """Bit 62 reserved, 63/61 ignored; bit 11 only in non-leaves; unsupported PS reserved."""
    m = sl_reserved_masks(48)
    leaf = sl_leaf(0x1000, 0, True, True)
    assert rsvd(m, leaf | (1 << 62), 1, SL_PS)
    assert not rsvd(m, leaf | (1 << 63) | (1 << 61), 1, SL_PS)
    assert not rsvd(m, leaf | SL_SNP, 1, SL_PS)
    assert rsvd(m, sl_table(0x1000) | SL_SNP, 2, SL_PS)
    assert rsvd(m, sl_leaf(0x20_0000, 1, True, True) | (1 << 12), 2, SL_PS)
    assert not rsvd(m, sl_leaf(0x20_0000, 1, True, True) | SL_SNP, 2, SL_PS)
    only2m = sl_reserved_masks(48, large_pages=(1,))
    assert rsvd(only2m, sl_leaf(G1, 2, True, True), 3, SL_PS)
    assert not rsvd(only2m, sl_leaf(M2, 1, True, True), 2, SL_PS)
    with pytest.raises(ValueError):
        sl_reserved_masks(48, large_pages=(3,))
    with pytest.raises(ValueError):
        fl_reserved_masks(53)


# --- exact entry bits written by PageTable --------------------------------------------------
def test_fl_4level_mapping_entry_bits():
    """Non-leaves are P|RW|US|A; a writable leaf adds D; a read-only leaf has neither RW nor D."""
    _, pt = make_table("fl", 4)
    iova = (5 << 39) | (6 << 30) | (7 << 21) | (8 << 12)
    pt.map(iova, 0x1234_5000, K4)
    pt.map(iova + K4, 0x9000, K4, write=False)
    for level in (4, 3, 2):
        e = entry_at(pt, iova, level)
        assert e & 0xFFF == FL_P | FL_RW | FL_US | FL_A == 0x27
        assert e & FL_XD == 0
    assert entry_at(pt, iova, 1) == 0x1234_5000 | 0x67
    assert entry_at(pt, iova + K4, 1) == 0x9000 | FL_P | FL_US | FL_A
    pt.map(G1, 2 * G1, 2 * M2, max_order=1)
    assert entry_at(pt, G1 + M2, 2) == (2 * G1 + M2) | 0x67 | FL_PS


def test_sl_mapping_entry_bits():
    """SL non-leaves are R|W; leaves carry R/W as asked and PS when large."""
    _, pt = make_table("sl", 3)
    pt.map(0x7000, 0xA000, K4, write=False)
    assert entry_at(pt, 0x7000, 3) & 0xFFF == SL_R | SL_W
    assert entry_at(pt, 0x7000, 2) & 0xFFF == SL_R | SL_W
    assert entry_at(pt, 0x7000, 1) == 0xA000 | SL_R
    pt.map(M2, 4 * M2, M2, read=False)
    assert entry_at(pt, M2, 2) == 4 * M2 | SL_W | SL_PS
    pt.map(G1, G1, G1)
    assert entry_at(pt, G1, 3) == G1 | SL_R | SL_W | SL_PS
    assert pt.lookup(M2 + 0x123) == (4 * M2 + 0x123, 1, False, True)


# --- PageTable against an obvious model -----------------------------------------------------
class Model:
    """Last operation covering an address wins: (iova, size, phys or None, read, write)."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, int, int | None, bool, bool]] = []

    def lookup(self, addr: int) -> tuple[int, bool, bool] | None:
        for iova, size, phys, read, write in reversed(self.ops):
            if iova <= addr < iova + size:
                return None if phys is None else (phys + addr - iova, read, write)
        return None


def apply(pt: PageTable, mem: HostMemory, model: Model, op: tuple) -> None:
    kind, iova, size, phys, write = op
    before = mem.pte_writes
    if kind == "map":
        writes = pt.map(iova, phys, size, write=write)
        model.ops.append((iova, size, phys, True, write))
    else:
        writes = pt.unmap(iova, size)
        model.ops.append((iova, size, None, False, False))
    assert writes == mem.pte_writes - before


def check(pt: PageTable, model: Model, probes) -> None:
    for addr in probes:
        got = pt.lookup(addr)
        want = model.lookup(addr)
        assert (got and (got[0], got[2], got[3])) == want, hex(addr)
        if got:
            assert addr & (order_size(got[1]) - 1) == got[0] & (order_size(got[1]) - 1)
    # leaves() is sorted, non-overlapping and agrees with lookup at each leaf's start
    prev_end = 0
    for iova, phys, order, read, write in pt.leaves():
        assert iova >= prev_end and iova % order_size(order) == 0
        prev_end = iova + order_size(order)
        assert model.lookup(iova) == (phys, read, write)


def small_ops():
    page = st.integers(0, 2047)
    npages = st.sampled_from([1, 2, 3, 511, 512, 513, 1024])
    return st.lists(st.tuples(st.sampled_from(["map", "map", "unmap"]), page, npages,
                              st.integers(0, 4096), st.booleans()), max_size=8)


@given(small_ops())
@settings(max_examples=25, deadline=None)
def test_4k_2m_mix_every_page_matches_model(ops):
    """After random maps/unmaps in an 8 MiB window every page translates as the model says."""
    mem, pt = make_table("fl", 4)
    model = Model()
    for kind, page, npages, ppage, write in ops:
        npages = min(npages, 2048 - page)
        apply(pt, mem, model, (kind, page * K4, npages * K4, ppage * M2 + page * K4, write))
    check(pt, model, range(0, 2048 * K4, K4))
    pt.unmap(0, 2048 * K4)   # frees the level-1 tables it covers; L3 and L2 stay, empty
    assert list(pt.leaves()) == [] and pt.table_pages <= 3
    pt.unmap(0, pt.limit)
    assert pt.table_pages == 1


def big_ops():
    unit = st.integers(0, 2047)  # 2-MiB units in a 4-GiB window
    nunits = st.sampled_from([1, 2, 511, 512, 513, 1024])
    return st.lists(st.tuples(st.sampled_from(["map", "map", "unmap"]), unit, nunits,
                              st.integers(0, 64), st.booleans()), max_size=6)


@given(big_ops(), st.integers(0, 511))
@settings(max_examples=15, deadline=None)
def test_2m_1g_mix_matches_model(ops, offset_page):
    """Maps/unmaps of 2M..2G pieces (using 1G pages where aligned) match the model."""
    mem, pt = make_table("sl", 4)
    model = Model()
    for kind, unit, nunits, gshift, write in ops:
        nunits = min(nunits, 2048 - unit)
        phys = gshift * G1 + unit * M2
        apply(pt, mem, model, (kind, unit * M2, nunits * M2, phys, write))
    check(pt, model, [u * M2 + offset_page * K4 for u in range(2048)])
    pt.unmap(0, 4 * G1)
    assert list(pt.leaves()) == [] and pt.table_pages <= 2   # the L3 table stays
    pt.unmap(0, pt.limit)
    assert pt.table_pages == 1
    assert mem.owned_by(VM).tolist() == [pt.root >> 12]


def test_map_uses_largest_page_alignment_allows():
    """2M-aligned on both sides gives 2M pages; a 4K-misaligned phys forces 4K pages."""
    _, pt = make_table("fl", 4)
    pt.map(0, G1, 2 * M2 + K4)
    assert [(o, i) for i, _, o, _, _ in pt.leaves()] == [(1, 0), (1, M2), (0, 2 * M2)]
    _, pt2 = make_table("fl", 4)
    pt2.map(0, G1 + K4, M2)
    assert {o for _, _, o, _, _ in pt2.leaves()} == {0}
    _, pt3 = make_table("fl", 4, max_order=1)
    pt3.map(0, 0, G1)
    assert pt3.lookup(G1 - K4)[1] == 1
    assert pt3.map(G1, G1, G1, max_order=2) == 1  # one level-3 leaf; the L4 entry exists
    assert pt3.lookup(G1)[1] == 2


def test_map_over_small_pages_frees_their_table():
    """Mapping a 2M page where 4K pages were replaces the level-1 table and frees it."""
    mem, pt = make_table("fl", 4)
    pt.map(M2, 0x10_0000_0000, 8 * K4)
    assert pt.table_pages == 4
    pt.map(M2, 0x20_0000_0000, M2)
    assert pt.table_pages == 3
    assert pt.lookup(M2 + K4) == (0x20_0000_0000 + K4, 1, True, True)
    assert len(mem.owned_by(VM)) == 3


def test_split_1g_on_4k_unmap_keeps_other_pages():
    """Unmapping one 4K page of a 1G page splits 1G -> 2M -> 4K; the rest still translates."""
    mem, pt = make_table("fl", 4)
    iova, phys = 3 * G1, 7 * G1
    pt.map(iova, phys, G1)
    assert pt.lookup(iova)[1] == 2
    hole = iova + 5 * M2 + 7 * K4
    before = mem.pte_writes
    writes = pt.unmap(hole, K4)
    assert writes == (512 + 1) + (512 + 1) + 1 == mem.pte_writes - before
    assert pt.lookup(hole) is None
    rng = np.random.default_rng(7)
    sample = {int(x) for x in rng.integers(0, G1 // K4, 2000)} | {5 * 512 + 6, 5 * 512 + 8, 0}
    for p in sorted(sample - {5 * 512 + 7}):
        got = pt.lookup(iova + p * K4 + 0x18)
        assert got is not None and got[0] == phys + p * K4 + 0x18 and got[2:] == (True, True)
    # the entries it wrote: a table at L3, 511 2M leaves and one table at L2, 511 4K leaves
    attrs = FL_P | FL_RW | FL_US | FL_A
    assert entry_at(pt, iova, 3) & 0xFFF == attrs
    assert entry_at(pt, iova, 2) == phys | attrs | FL_D | FL_PS
    assert entry_at(pt, hole, 2) & 0xFFF == attrs
    assert entry_at(pt, hole - K4, 1) == (phys + 5 * M2 + 6 * K4) | attrs | FL_D
    orders = [o for _, _, o, _, _ in pt.leaves()]
    assert orders.count(1) == 511 and orders.count(0) == 511
    assert pt.table_pages == 4  # root, L3, the L2 and L1 tables the splits made


def test_unmap_everything_frees_tables_and_unmapped_is_noop():
    """Unmapping all leaves returns table_pages to 1; unmapping nothing writes nothing."""
    mem, pt = make_table("fl", 5)
    assert pt.unmap(0, G1) == 0
    pt.map(1 << 55, 0x8000, 3 * K4)
    pt.map(G1 + M2, 4 * M2, M2 + K4)
    assert pt.lookup((1 << 55) + K4) == (0x9000, 0, True, True)
    pt.unmap(1 << 55, K4)
    assert pt.unmap(1 << 55, K4) == 0
    pt.unmap(0, 2 * G1)
    pt.unmap(1 << 55, G1)
    assert list(pt.leaves()) == [] and pt.table_pages > 1   # partly covered tables stay
    pt.unmap(0, pt.limit)
    assert pt.table_pages == 1
    assert len(mem.owned_by(VM)) == 1
    pt.destroy()
    assert pt.table_pages == 0 and len(mem.owned_by(VM)) == 0
    with pytest.raises(ValueError):
        pt.map(0, 0, K4)


def test_destroy_frees_every_table_page():
    """destroy() returns all table frames, leaves included, to host memory."""
    mem, pt = make_table("sl", 4)
    free0 = mem.free_frames
    pt.map(0, 0, 3 * K4)
    pt.map(5 * G1, 0, 2 * G1 + M2)
    pt.destroy()
    assert mem.free_frames == free0 + 1
    assert (mem.owner == VM).sum() == 0


def test_host_table_store_pages():
    """HostTableStore pages are aligned HPAs owned by the owner with the requested kind."""
    mem = HostMemory(64)
    store = HostTableStore(mem, VM, KIND_GUEST_TABLE)
    addr = store.alloc_table()
    assert addr % 4096 == 0 and mem.owner[addr >> 12] == VM
    assert mem.kind[addr >> 12] == KIND_GUEST_TABLE
    store.write(addr + 16, 0xABC)
    assert store.read(addr + 16) == 0xABC and store.read(addr + 8) == 0
    store.free_table(addr)
    assert mem.owner[addr >> 12] == OWNER_FREE
    assert HostTableStore(mem, VM).kind == KIND_PAGETABLE
    with pytest.raises(ValueError):
        store.free_table(addr + 8)


@pytest.mark.parametrize(("fmt", "levels", "limit"),
                         [("fl", 4, 1 << 47), ("fl", 5, 1 << 56), ("sl", 3, 1 << 39),
                          ("sl", 4, 1 << 48), ("sl", 5, 1 << 57)])
def test_width_limits(fmt, levels, limit):
    """The last page below the format's width maps; the first page beyond it is refused."""
    _, pt = make_table(fmt, levels)
    pt.map(limit - K4, 0x5000, K4)
    assert pt.lookup(limit - 1) == (0x5FFF, 0, True, True)
    with pytest.raises(ValueError):
        pt.map(limit, 0x5000, K4)
    with pytest.raises(ValueError):
        pt.map(limit - K4, 0x5000, 2 * K4)
    with pytest.raises(ValueError):
        pt.lookup(limit)


def test_bad_arguments_raise_value_error():
    """Unaligned, negative, empty, overflowing and unsupported arguments are ValueErrors."""
    _, pt = make_table("fl", 4, haw=40)
    bad_calls = [
        lambda: pt.map(0x800, 0, K4), lambda: pt.map(0, 0x800, K4), lambda: pt.map(0, 0, 100),
        lambda: pt.map(-K4, 0, K4), lambda: pt.map(0, -K4, K4), lambda: pt.map(0, 0, 0),
        lambda: pt.map(0, (1 << 40) - K4, 2 * K4), lambda: pt.map(0, 0, K4, read=False),
        lambda: pt.map(0, 0, K4, max_order=3), lambda: pt.unmap(0, -K4),
        lambda: pt.unmap(K4 + 1, K4), lambda: pt.lookup(-1), lambda: pt.map(0.0, 0, K4),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    _, sl = make_table("sl", 3)
    with pytest.raises(ValueError):
        sl.map(0, 0, K4, read=False, write=False)
    mem = HostMemory(16)
    for args in (("xl", 4), ("fl", 3), ("sl", 6)):
        with pytest.raises(ValueError):
            PageTable(HostTableStore(mem, VM), *args)
    with pytest.raises(ValueError):
        PageTable(HostTableStore(mem, VM), "sl", 4, max_order=3)
    assert pt.table_pages == 1 and list(pt.leaves()) == []
