"""Bit-exact first-level (x86-64 paging) and second-level (VT-d) page-table formats and builders.

Follows the Intel VT-d specification sections 3.6/9.7 (first-level entries) and 3.7/9.8
(second-level entries); reserved-bit masks as QEMU's hw/i386/intel_iommu_internal.h
(VTD_SPTE_*_RSVD_MASK, VTD_SL_IGN_COM); entry attributes as Linux drivers/iommu/intel/iommu.c
(__domain_mapping, pfn_to_dma_pte: DMA_PTE_READ/WRITE, DMA_FL_PTE_US/ACCESS/DIRTY).

A table is one 4-KiB page of 512 64-bit entries living in a TableStore (HPA space for host
tables, GPA space for guest tables). PageTable builds one tree in a store with scalar Python:
it is the slow, obviously correct writer that the VMM (shadow tables), the guest driver (its
own first-level tables) and test fixtures share; batch walkers read what it wrote. On the
guest's store (vm_agent.memory.GuestTableStore) its 4-KiB maps and its unmaps run compiled
(vm_agent/kernels/pgtable.py), store for store as the Python walks below would make them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np

from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    DEFAULT_HAW,
    FL_WIDTH_BY_LEVELS,
    KIND_PAGETABLE,
    LEVEL_STRIDE,
    PAGE_ORDERS,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_DTYPE,
    PTES_PER_TABLE,
    SL_WIDTH_BY_LEVELS,
    order_size,
)
from host_iommu.memory import HostMemory

U64 = (1 << 64) - 1
_L2_SHIFT = PAGE_SHIFT + LEVEL_STRIDE   # 21: one level-1 table maps 2 MiB
MAX_HAW = 52  # address fields end at bit 51 in both formats (spec 9.7, 9.8)
MAX_LEVELS = 5

# --- First-level entry bits: x86-64 paging (VT-d spec 3.6, 9.7) ----------------------------
FL_P = 1 << 0     # bit 0: present
FL_RW = 1 << 1    # bit 1: read/write (0 = read-only)
FL_US = 1 << 2    # bit 2: user/supervisor (1 = user pages)
FL_PWT = 1 << 3   # bit 3: page-level write-through
FL_PCD = 1 << 4   # bit 4: page-level cache disable
FL_A = 1 << 5     # bit 5: accessed
FL_D = 1 << 6     # bit 6: dirty (leaves only)
FL_PS = 1 << 7    # bit 7: page size (levels 2, 3); PAT at level 1
FL_G = 1 << 8     # bit 8: global (leaves only)
FL_XD = 1 << 63   # bit 63: execute disable
FL_LPAGE_PAT = 1 << 12  # bit 12: PAT of a 2-MiB / 1-GiB leaf
FL_IGNORED_HI = ((1 << 63) - 1) & ~((1 << 52) - 1)  # bits 62:52: ignored (spec 9.7)

# --- Second-level entry bits: VT-d second-level format (spec 3.7, 9.8) ---------------------
SL_R = 1 << 0            # bit 0: read
SL_W = 1 << 1            # bit 1: write
SL_X = 1 << 2            # bit 2: execute
SL_EMT_SHIFT = 3         # bits 5:3: extended memory type
SL_EMT = 0x7 << SL_EMT_SHIFT
SL_IPAT = 1 << 6         # bit 6: ignore PAT
SL_PS = 1 << 7           # bit 7: page size (levels 2, 3); ignored at level 1
SL_A = 1 << 8            # bit 8: accessed
SL_D = 1 << 9            # bit 9: dirty
SL_SNP = 1 << 11         # bit 11: snoop (leaves); reserved in non-leaf entries
SL_RSVD_62 = 1 << 62     # bit 62: reserved (QEMU VTD_SL_IGN_COM leaves it out)
SL_IGN_COM = (1 << 63) | (((1 << 62) - 1) & ~((1 << 52) - 1))  # bits 63, 61:52: ignored

# Attribute bits that survive a split of a large leaf into 512 smaller ones.
_ATTR_MASK = U64 & ~((1 << MAX_HAW) - 1 - (PAGE_SIZE - 1))


class PteInfo(NamedTuple):
    """A decoded entry: present, address (page-aligned for leaves), leaf, ACCESS_* bits."""

    present: bool
    addr: int
    leaf: bool
    perms: int


def addr_mask(haw: int) -> int:
    """Address field of an entry: bits haw-1..12."""
    _check_haw(haw)
    return ((1 << haw) - 1) & ~(PAGE_SIZE - 1)


def _bits(hi: int, lo: int) -> int:
    """Mask of bits hi..lo inclusive."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def _check_haw(haw: int) -> None:
    if not isinstance(haw, int) or not PAGE_SHIFT < haw <= MAX_HAW:
        raise ValueError(f"host address width {haw!r} outside {PAGE_SHIFT + 1}..{MAX_HAW}")


def level_shift(level: int) -> int:
    """Address shift of the region one entry at ``level`` covers (12, 21, 30, 39, 48)."""
    return PAGE_SHIFT + LEVEL_STRIDE * (level - 1)


def fl_index(addr: int | np.ndarray, level: int) -> int | np.ndarray:
    """Entry index of ``addr`` in a table at ``level`` (1..5); works on uint64 arrays too."""
    if isinstance(addr, np.ndarray | np.generic):
        a = np.asarray(addr, dtype=PTE_DTYPE)
        return (a >> np.uint64(level_shift(level))) & np.uint64(PTES_PER_TABLE - 1)
    return (addr >> level_shift(level)) & (PTES_PER_TABLE - 1)


sl_index = fl_index  # both formats use 9 bits per level above the 12-bit page offset
_LEVEL_SHIFT = (0, *(level_shift(level) for level in range(1, MAX_LEVELS + 1)))  # [level]


# --- Canonical addresses (first level, spec 3.6) -------------------------------------------
def canonical(addr: int, width: int) -> bool:
    """True if bits 63..width-1 of the 64-bit ``addr`` are all equal."""
    if not 0 <= addr <= U64:
        raise ValueError(f"address {addr!r} is not a 64-bit unsigned value")
    top = addr >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


def canonical_np(addr: np.ndarray, width: int) -> np.ndarray:
    """Vectorized ``canonical`` over a uint64 array; returns a bool array."""
    a = np.asarray(addr, dtype=PTE_DTYPE)
    top = a >> np.uint64(width - 1)
    return (top == np.uint64(0)) | (top == np.uint64((1 << (65 - width)) - 1))


# --- Reserved-bit masks, indexed [level 1..5][ps 0/1] ---------------------------------------
def _beyond_haw(haw: int) -> int:
    """Bits 51..haw: address bits the host cannot carry (reserved in both formats)."""
    _check_haw(haw)
    return ((1 << MAX_HAW) - 1) & ~((1 << haw) - 1)


def fl_reserved_masks(haw: int = DEFAULT_HAW) -> np.ndarray:
    """First-level reserved bits as a (6, 2) uint64 table: ``entry & RSVD[level, ps]``.

    Row 0 is all ones (no level 0). Bits 51..haw are reserved everywhere; PS is reserved at
    levels 4 and 5; a 2-MiB leaf reserves bits 20:13, a 1-GiB leaf bits 29:13 (bit 12 is its
    PAT). Bit 7 at level 1 is PAT, so both level-1 columns match. Bits 62:52 are ignored.
    """
    hi = _beyond_haw(haw)
    masks = [[U64, U64], [hi, hi], [hi, hi | _bits(20, 13)], [hi, hi | _bits(29, 13)],
             [hi | FL_PS, hi | FL_PS], [hi | FL_PS, hi | FL_PS]]
    return np.array(masks, dtype=PTE_DTYPE)


def sl_reserved_masks(haw: int = DEFAULT_HAW,
                      large_pages: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """Second-level reserved bits as a (6, 2) uint64 table (QEMU VTD_SPTE_*_RSVD_MASK).

    ``large_pages`` lists the supported large-page orders (1 = 2 MiB, 2 = 1 GiB; CAP.SLLPS).
    Bits 51..haw and 62 are reserved everywhere; bit 11 in non-leaf entries; PS at levels >= 4
    and where the page size is unsupported; a 2-MiB leaf reserves 20:12 and a 1-GiB leaf
    29:12. SNP (bit 11) is allowed on leaves (scalable mode). Bits 63, 61:52 are ignored; bit
    7 at level 1 is ignored, so both level-1 columns match.
    """
    if any(o not in (1, 2) for o in large_pages):
        raise ValueError(f"large_pages {large_pages!r}: orders must be 1 (2M) or 2 (1G)")
    base = _beyond_haw(haw) | SL_RSVD_62
    masks = [[U64, U64], [base, base]]
    for level in range(2, MAX_LEVELS + 1):
        order = level - 1
        if level >= 4 or order not in large_pages:
            bad = base | SL_SNP | SL_PS
            masks.append([bad, bad])
        else:
            lpage = _bits(20, 12) if order == 1 else _bits(29, 12)
            masks.append([base | SL_SNP, base | lpage])
    return np.array(masks, dtype=PTE_DTYPE)


# --- Entry encoders and decoders ------------------------------------------------------------
def _check_phys(phys: int, order: int) -> None:
    if order not in PAGE_ORDERS:
        raise ValueError(f"page order {order!r} not in {PAGE_ORDERS}")
    if not isinstance(phys, int) or phys < 0 or phys >= 1 << MAX_HAW:
        raise ValueError(f"address {phys!r} outside 0..2^{MAX_HAW}")
    if phys & (order_size(order) - 1):
        raise ValueError(f"address {phys:#x} not aligned to a page of order {order}")


def fl_leaf(phys: int, order: int, writable: bool, *, user: bool = True,
            preset_ad: bool = True, xd: bool = False) -> int:
    """First-level leaf for a page of ``order`` at ``phys`` (Linux: P|US|A, RW and D if writable).

    ``preset_ad`` sets A (and D when writable) up front as Linux does; without it both are
    left for the walker to set.
    """
    _check_phys(phys, order)
    entry = phys | FL_P
    if order:
        entry |= FL_PS
    if writable:
        entry |= FL_RW
    if user:
        entry |= FL_US
    if preset_ad:
        entry |= FL_A | (FL_D if writable else 0)
    if xd:
        entry |= FL_XD
    return entry


def fl_table(next_table_addr: int) -> int:
    """First-level non-leaf entry pointing at a table (Linux: P|RW|US|A)."""
    _check_phys(next_table_addr, 0)
    return next_table_addr | FL_P | FL_RW | FL_US | FL_A


def sl_leaf(phys: int, order: int, read: bool, write: bool, *, snp: bool = False) -> int:
    """Second-level leaf for a page of ``order`` at ``phys`` with R/W as asked."""
    _check_phys(phys, order)
    entry = phys | (SL_R if read else 0) | (SL_W if write else 0)
    if order:
        entry |= SL_PS
    if snp:
        entry |= SL_SNP
    return entry


def sl_table(next_table_addr: int) -> int:
    """Second-level non-leaf entry pointing at a table (Linux: DMA_PTE_READ|DMA_PTE_WRITE)."""
    _check_phys(next_table_addr, 0)
    return next_table_addr | SL_R | SL_W


def _leaf_addr(entry: int, level: int, haw: int, is_leaf: bool) -> int:
    addr = entry & addr_mask(haw)
    if is_leaf:
        addr &= ~((1 << level_shift(level)) - 1)  # drops PAT (bit 12) of a large FL leaf
    return addr


def fl_decode(entry: int, level: int, haw: int = DEFAULT_HAW) -> PteInfo:
    """Decode a first-level entry found at ``level`` (bit 7 is PAT, not PS, at level 1)."""
    present = bool(entry & FL_P)
    is_leaf = level == 1 or bool(entry & FL_PS)
    perms = (ACCESS_READ | (ACCESS_WRITE if entry & FL_RW else 0)) if present else 0
    return PteInfo(present, _leaf_addr(entry, level, haw, is_leaf), is_leaf, perms)


def sl_decode(entry: int, level: int, haw: int = DEFAULT_HAW) -> PteInfo:
    """Decode a second-level entry at ``level``; present when R or W is set (QEMU)."""
    present = bool(entry & (SL_R | SL_W))
    is_leaf = level == 1 or bool(entry & SL_PS)
    perms = (ACCESS_READ if entry & SL_R else 0) | (ACCESS_WRITE if entry & SL_W else 0)
    return PteInfo(present, _leaf_addr(entry, level, haw, is_leaf), is_leaf, perms)


# --- Table stores ---------------------------------------------------------------------------
class TableStore(Protocol):
    """Memory that holds table pages. Addresses are bytes in the store's address space."""

    def alloc_table(self) -> int:
        """Page-aligned address of a new zeroed table page."""
        ...

    def free_table(self, addr: int) -> None: ...

    def read(self, addr: int) -> int:
        """One 64-bit entry at byte address ``addr``."""
        ...

    def write(self, addr: int, value: int) -> None: ...

    # A store may declare ``exclusive_writes = True`` when every change to its pages goes
    # through write() and is counted in an int ``writes`` attribute: PageTable then keeps the
    # level-1 tables of its recent 4-KiB walks (dropped whenever ``writes`` moves behind its
    # back). A store whose memory others write (the walker's A/D bits) must not declare it.
    #
    # A store may also run PageTable's 4-KiB maps and its unmaps compiled over its own
    # pages (vm_agent.memory's GuestTableStore, vm_agent/kernels/pgtable.py), making,
    # counting and reporting the same stores in the same order:
    #   bind(root, levels, fmt_bits): the tree; fmt_bits: (present bits, PS, address field,
    #       non-leaf entry bits)
    #   map_4k(iova, end, phys, bits, new_table) -> (RUN_* code, IOVA reached); new_table:
    #       a table allocated for the RUN_NEED_TABLE it answered, or -1
    #   unmap_range(start, end) -> (stores made, table pages for the caller to free, in
    #       order), or None when it did nothing
    #   table_counts() -> the mapping PageTable keeps as ``_used`` (the kernels count there)
    # PageTable uses them when it is the only tree in the store (no ``pages`` yet when it is
    # made), and its Python walks for everything else.


# Answers of a store's compiled map_4k (vm_agent/kernels/pgtable.py uses the same numbers).
RUN_DONE = 0        # the whole run is mapped
RUN_NEED_TABLE = 1  # a missing table on the walk of the IOVA reached: allocate, call again
RUN_MORE = 2        # the store's report buffer is full: call again from the IOVA reached
RUN_FALLBACK = 3    # nothing done from the IOVA reached on: PageTable's Python walk goes on


class HostTableStore:
    """TableStore over HostMemory: addresses are HPAs (frame << 12), pages owned by ``owner``.

    With ``defer_free`` a freed table page is only listed in ``freed``: the caller returns it
    to the allocator once the invalidation that drops it from the paging-structure caches has
    taken effect (Linux frees page-table pages after the IOTLB flush, from the iotlb_gather
    freelist), so no cached entry can lead into a frame someone else was given.
    """

    def __init__(self, mem: HostMemory, owner: int, kind: int = KIND_PAGETABLE, *,
                 defer_free: bool = False) -> None:
        self.mem = mem
        self.owner = owner
        self.kind = kind
        self.defer_free = defer_free
        self.freed: list[int] = []   # frames awaiting the caller's flush (defer_free)

    def take_freed(self) -> list[int]:
        """The frames freed since the last call, for the caller to free after its flush."""
        out, self.freed = self.freed, []
        return out

    def alloc_table(self) -> int:
        return self.mem.alloc_table(self.owner, self.kind) << PAGE_SHIFT

    def free_table(self, addr: int) -> None:
        if addr & (PAGE_SIZE - 1):
            raise ValueError(f"table address {addr:#x} is not page-aligned")
        if self.defer_free:
            self.freed.append(addr >> PAGE_SHIFT)
        else:
            self.mem.free(addr >> PAGE_SHIFT)

    def read(self, addr: int) -> int:
        return self.mem.read_u64(addr)

    def write(self, addr: int, value: int) -> None:
        self.mem.write_u64(addr, value)


# --- One table tree -------------------------------------------------------------------------
class PageTable:
    """One first- or second-level table tree (root at ``levels``) built in a TableStore.

    Leaves are 4-KiB, 2-MiB or 1-GiB pages (order 0..max_order). A table page is freed only
    when an unmap covers the whole region it maps (Linux dma_pte_clear_level), so a table an
    unmap merely empties stays, with no present entry, until a later unmap covers it.
    Mutating methods return the number of entry writes made, as a driver would count them;
    ``freed_tables`` is the number of table pages the last unmap freed.
    """

    def __init__(self, store: TableStore, fmt: str, levels: int, haw: int = DEFAULT_HAW,
                 max_order: int = 2) -> None:
        widths = {"fl": FL_WIDTH_BY_LEVELS, "sl": SL_WIDTH_BY_LEVELS}
        if fmt not in widths:
            raise ValueError(f"page-table format {fmt!r} is not 'fl' or 'sl'")
        if levels not in widths[fmt]:
            raise ValueError(f"{fmt} tables have {sorted(widths[fmt])} levels, not {levels!r}")
        _check_haw(haw)
        if max_order not in PAGE_ORDERS:
            raise ValueError(f"max_order {max_order!r} not in {PAGE_ORDERS}")
        self.store = store
        self.fmt = fmt
        self.levels = levels
        self.haw = haw
        self.max_order = max_order
        # fl: canonical lower half only; sl: the AGAW of the levels.
        self.width = widths[fmt][levels]
        self.limit = 1 << (self.width - 1 if fmt == "fl" else self.width)
        self._addr_mask = addr_mask(haw)
        self._ps = FL_PS if fmt == "fl" else SL_PS
        self._present = FL_P if fmt == "fl" else SL_R | SL_W   # what makes an entry present
        self._used: dict[int, int] = {}  # table address -> non-zero entries in it
        # The level-1 table of each 2-MiB region the 4-KiB fast paths walked to, kept only
        # over a store whose every write goes through its counted write() (``exclusive_writes``)
        # and only while no entry above level 1 changed: any _write (the walks' table links,
        # splits, large leaves, the general unmap) and any table free drop it all, and a
        # write someone else made (``store.writes`` moved) drops it before it is used.
        # The store's compiled runs (TableStore above), when this is the only tree in it.
        self._kernel = (getattr(store, "map_4k", None) is not None
                        and not getattr(store, "pages", True))
        if self._kernel:
            self._used = store.table_counts()
        self._l1_on = bool(getattr(store, "exclusive_writes", False)) and not self._kernel
        self._l1: dict[int, int] = {}    # iova >> 21 -> level-1 table address
        self._l1_writes = -1             # store.writes when _l1 was last known good
        self.freed_tables = 0
        self.root = self._alloc()
        self._live = True   # until destroy()
        if self._kernel:
            link = FL_P | FL_RW | FL_US | FL_A if fmt == "fl" else SL_R | SL_W  # fl_/sl_table
            store.bind(self.root, levels, (self._present, self._ps, self._addr_mask, link))

    # --- entry helpers ----------------------------------------------------------------------
    # The walks below read entries as plain ints: ``entry & self._present`` is fl_decode's /
    # sl_decode's ``present`` (P, or R|W), ``level == 1 or entry & self._ps`` their ``leaf``,
    # ``entry & self._addr_mask`` a table's address, ``self._perms_of(entry)`` their
    # ``perms``. The next line is equivalent and left for reference:
    #     info = self._decode(self.store.read(ea), level)
    def _decode(self, entry: int, level: int) -> PteInfo:
        return (fl_decode if self.fmt == "fl" else sl_decode)(entry, level, self.haw)

    def _perms_of(self, entry: int) -> int:
        """ACCESS_* bits of one entry, as ``_decode(entry, level).perms``."""
        if self.fmt == "fl":
            return (ACCESS_READ | (ACCESS_WRITE if entry & FL_RW else 0)) if entry & FL_P else 0
        return (ACCESS_READ if entry & SL_R else 0) | (ACCESS_WRITE if entry & SL_W else 0)

    def _table_entry(self, addr: int) -> int:
        return fl_table(addr) if self.fmt == "fl" else sl_table(addr)

    def _leaf_entry(self, phys: int, order: int, read: bool, write: bool) -> int:
        if self.fmt == "fl":
            return fl_leaf(phys, order, write)
        return sl_leaf(phys, order, read, write)

    def _leaf_bits(self, read: bool, write: bool) -> int:
        """The bits ``_leaf_entry`` adds to a 4-KiB page's address (PS comes on top for a
        large page): fl_leaf's P|US|A (+RW|D), sl_leaf's R/W."""
        if self.fmt == "fl":
            return FL_P | FL_US | FL_A | ((FL_RW | FL_D) if write else 0)
        return (SL_R if read else 0) | (SL_W if write else 0)

    def _alloc(self) -> int:
        addr = self.store.alloc_table()
        self._used[addr] = 0
        return addr

    def _write(self, ea: int, value: int) -> int:
        if self._l1:
            self._l1.clear()
        table = ea & ~(PAGE_SIZE - 1)
        old = self.store.read(ea)
        self.store.write(ea, value)
        self._used[table] += (value != 0) - (old != 0)
        return 1

    def _free_subtree(self, table: int, level: int) -> int:
        """Free ``table`` and every table below it; returns the pages freed."""
        freed = 1
        if level > 1:
            read = self.store.read
            present, ps, amask = self._present, self._ps, self._addr_mask
            for idx in range(PTES_PER_TABLE):
                entry = read(table + 8 * idx)
                if entry & present and not entry & ps:   # a table below (level > 1)
                    freed += self._free_subtree(entry & amask, level - 1)
        self._l1.clear()
        self.store.free_table(table)
        del self._used[table]
        return freed

    def _split(self, ea: int, entry: int, level: int) -> int:
        """Replace the large leaf ``entry`` at ``ea`` by a table of 512 smaller leaves."""
        base = self._decode(entry, level).addr
        attrs = entry & _ATTR_MASK & ~self._ps
        child_ps = self._ps if level - 1 > 1 else 0
        span = 1 << level_shift(level - 1)
        table = self._alloc()
        writes = 0
        for idx in range(PTES_PER_TABLE):
            writes += self._write(table + 8 * idx, (base + idx * span) | attrs | child_ps)
        return writes + self._write(ea, self._table_entry(table))

    def _check_range(self, iova: int, size: int) -> None:
        if not self._live:
            raise ValueError("page table was destroyed")
        if type(iova) is not int or type(size) is not int:   # else both are plain ints
            for name, value in (("iova", iova), ("size", size)):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{name} {value!r} is not an int")
        if iova < 0 or size <= 0:
            raise ValueError(f"bad range iova={iova:#x} size={size:#x}")
        if (iova | size) & (PAGE_SIZE - 1):
            raise ValueError(f"range iova={iova:#x} size={size:#x} not 4-KiB aligned")
        if iova + size > self.limit:
            raise ValueError(f"range iova={iova:#x} size={size:#x} beyond the {self.width}-bit "
                             f"{self.fmt} address space")

    # --- public API -------------------------------------------------------------------------
    @property
    def table_pages(self) -> int:
        return len(self._used)

    def map(self, iova: int, phys: int, size: int, *, write: bool = True, read: bool = True,
            max_order: int | None = None) -> int:
        """Map [iova, iova+size) to [phys, phys+size), replacing what was there.

        Each piece uses the largest page (up to ``max_order``) that the alignment of both
        addresses and the remaining size allow. Returns the entry writes made.
        """
        self._check_range(iova, size)
        if not isinstance(phys, int) or phys < 0 or phys & (PAGE_SIZE - 1):
            raise ValueError(f"phys {phys!r} is not a 4-KiB aligned address")
        if phys + size > 1 << self.haw:
            raise ValueError(f"phys range {phys:#x}+{size:#x} beyond the {self.haw}-bit HAW")
        top = self.max_order if max_order is None else max_order
        if top not in PAGE_ORDERS:
            raise ValueError(f"max_order {max_order!r} not in {PAGE_ORDERS}")
        if self.fmt == "fl" and not read:
            raise ValueError("first-level entries cannot map a page without read access")
        if not (read or write):
            raise ValueError("a mapping needs read or write access")
        bits = self._leaf_bits(read, write)
        ps = self._ps
        writes = 0
        end = iova + size
        if self._kernel and top == 0:
            return self._map_kernel(iova, phys, end, bits)
        while iova < end:
            order = top
            while order and ((iova | phys) & (order_size(order) - 1)
                             or end - iova < order_size(order)):
                order -= 1
            if order == 0:
                # A run of 4-KiB pages up to the end of this level-1 table: no page inside it
                # is 2-MiB aligned, so each would be given order 0 here; one walk for all.
                run_end = min(end, ((iova >> _L2_SHIFT) + 1) << _L2_SHIFT)
                if self._kernel:
                    writes += self._map_kernel(iova, phys, run_end, bits)
                else:
                    writes += self._install_4k_run(iova, phys, (run_end - iova) >> PAGE_SHIFT,
                                                   bits)
                phys += run_end - iova
                iova = run_end
                continue
            # The next line is equivalent and left for reference:
            #     entry = self._leaf_entry(phys, order, read, write)
            entry = phys | bits | ps
            writes += self._install(iova, order, entry)
            iova += order_size(order)
            phys += order_size(order)
        return writes

    def _walk_to(self, iova: int, target: int) -> tuple[int, int]:
        """The table at level ``target`` on ``iova``'s path, made as _install makes it:
        a missing table is allocated and linked, a large leaf on the way is split. Returns
        (table address, entry writes made)."""
        writes = 0
        table = self.root
        read = self.store.read
        present, ps, amask = self._present, self._ps, self._addr_mask
        for level in range(self.levels, target, -1):
            ea = table + 8 * ((iova >> _LEVEL_SHIFT[level]) & (PTES_PER_TABLE - 1))
            entry = read(ea)
            if not entry & present:
                table = self._alloc()
                writes += self._write(ea, self._table_entry(table))
                continue
            if entry & ps:   # a large leaf (level >= 2 here): split it
                writes += self._split(ea, entry, level)
                entry = read(ea)
            table = entry & amask
        return table, writes

    def _install_4k_run(self, iova: int, phys: int, pages: int, bits: int) -> int:
        """Install ``pages`` 4-KiB leaves from ``iova`` (all in one level-1 table) as that
        many _install(iova + 4096 k, 0, ...) calls would: the walk is made once, since the
        leaves written on the way change no entry above level 1."""
        table = self._cached_l1(iova)
        if table is None:
            table, writes = self._walk_to(iova, 1)
            if self._l1_on:
                self._l1[iova >> _L2_SHIFT] = table
        else:
            writes = 0
        read, write = self.store.read, self.store.write
        used = self._used
        ea = table + 8 * ((iova >> PAGE_SHIFT) & (PTES_PER_TABLE - 1))
        for k in range(pages):
            old = read(ea)
            value = (phys + (k << PAGE_SHIFT)) | bits
            write(ea, value)
            used[table] += 1 - (old != 0)
            ea += 8
        if self._l1_on:
            self._l1_writes = self.store.writes
        return writes + pages

    def _map_kernel(self, iova: int, phys: int, end: int, bits: int) -> int:
        """4-KiB leaves over [iova, end) by the store's compiled map_4k, as that many
        _install(iova + 4096 k, 0, ...) calls would make them: a missing table is allocated
        here when the kernel stops for one (its zeroing stores fall between the kernel's
        stores, as in _walk_to), and a run the kernel leaves (a large leaf to split, an
        entry leading to no table) is walked in Python from where it stopped."""
        store = self.store
        writes0 = store.writes
        new_table = -1
        while True:
            code, pos = store.map_4k(iova, end, phys, bits, new_table)
            new_table = -1
            if code == RUN_DONE:
                return store.writes - writes0
            phys += pos - iova
            iova = pos
            if code == RUN_NEED_TABLE:
                new_table = self._alloc()
            elif code == RUN_FALLBACK:   # this 2-MiB run in Python, then the kernel again
                run_end = min(end, ((iova >> _L2_SHIFT) + 1) << _L2_SHIFT)
                self._install_4k_run(iova, phys, (run_end - iova) >> PAGE_SHIFT, bits)
                phys += run_end - iova
                iova = run_end
                if iova == end:
                    return store.writes - writes0

    def _unmap_kernel(self, start: int, end: int) -> int | None:
        """_unmap from the root by the store's compiled unmap_range: the same stores and
        table frees in the same order (the frees made here, children first). None when the
        kernel did nothing (a large leaf to split, an entry leading to no table, a table
        reached twice): the Python walk does it all."""
        done = self.store.unmap_range(start, end)
        if done is None:
            return None
        writes, freed = done
        for table in freed:   # children first, as _free_subtree frees them
            self.store.free_table(table)
            del self._used[table]
        self.freed_tables = len(freed)
        return writes

    def _cached_l1(self, iova: int) -> int | None:
        """The level-1 table a fast walk found for ``iova``'s 2 MiB, if still valid."""
        if not self._l1:
            return None
        if self.store.writes != self._l1_writes:   # someone else wrote: forget every walk
            self._l1.clear()
            return None
        return self._l1.get(iova >> _L2_SHIFT)

    def _install(self, iova: int, order: int, entry: int) -> int:
        target = order + 1
        table, writes = self._walk_to(iova, target)
        ea = table + 8 * fl_index(iova, target)
        old = self.store.read(ea)
        if old & self._present and not (target == 1 or old & self._ps):   # a table: free it
            self._free_subtree(old & self._addr_mask, target - 1)
        return writes + self._write(ea, entry)

    def unmap(self, iova: int, size: int) -> int:
        """Clear [iova, iova+size) as Linux domain_unmap does, splitting partly covered large
        pages.

        An entry whose whole region the range covers is cleared with one write, and the
        table pages below it are freed (dma_pte_clear_level: dma_pte_list_pagetables onto
        the freelist, then dma_clear_pte); a partly covered table is recursed into and
        stays, even when it ends up with no present entry. ``freed_tables`` then says how
        many table pages were freed: with none, the caller's flush may set the invalidation
        hint (intel_iommu_tlb_sync: ``ih = list_empty(&gather->freelist)``). Returns the
        entry writes made (0 when nothing was mapped there).
        """
        self._check_range(iova, size)
        self.freed_tables = 0
        end = iova + size
        if self._kernel:
            writes = self._unmap_kernel(iova, end)
            if writes is not None:
                return writes
        if iova >> _L2_SHIFT == (end - 1) >> _L2_SHIFT and size < 1 << _L2_SHIFT:
            writes = self._unmap_4k_run(iova, end)
            if writes is not None:
                return writes
        return self._unmap(self.root, self.levels, 0, iova, end)

    def _unmap_4k_run(self, start: int, end: int) -> int | None:
        """_unmap of a range inside one level-1 table's 2 MiB, smaller than it: no entry
        above level 1 is covered whole, so the walk only descends, and at level 1 each
        present entry is cleared. None (nothing done) when a large leaf on the way would
        need a split: the caller then takes the general path."""
        read = self.store.read
        present = self._present
        table = self._cached_l1(start)
        if table is None:
            table = self.root
            ps, amask = self._ps, self._addr_mask
            for level in range(self.levels, 1, -1):
                entry = read(table + 8 * ((start >> _LEVEL_SHIFT[level])
                                          & (PTES_PER_TABLE - 1)))
                if not entry & present:
                    return 0
                if entry & ps:
                    return None
                table = entry & amask
            if self._l1_on:
                self._l1[start >> _L2_SHIFT] = table
        write = self.store.write
        writes = 0
        ea = table + 8 * ((start >> PAGE_SHIFT) & (PTES_PER_TABLE - 1))
        for _ in range((end - start) >> PAGE_SHIFT):
            if read(ea) & present:   # _write(ea, 0) of a present (so non-zero) entry
                write(ea, 0)
                self._used[table] -= 1
                writes += 1
            ea += 8
        if self._l1_on:
            self._l1_writes = self.store.writes
        return writes

    def _unmap(self, table: int, level: int, base: int, start: int, end: int) -> int:
        shift = _LEVEL_SHIFT[level]
        span = 1 << shift
        writes = 0
        read = self.store.read
        present, ps, amask = self._present, self._ps, self._addr_mask
        for idx in range((start - base) >> shift, ((end - 1 - base) >> shift) + 1):
            ea = table + 8 * idx
            entry = read(ea)
            if not entry & present:
                continue
            lo = base + idx * span
            hi = lo + span
            leaf = level == 1 or entry & ps
            if start <= lo and hi <= end:  # the whole region: clear it, free its tables
                if not leaf:
                    self.freed_tables += self._free_subtree(entry & amask, level - 1)
                writes += self._write(ea, 0)
                continue
            if leaf:
                writes += self._split(ea, entry, level)
                entry = read(ea)
            writes += self._unmap(entry & amask, level - 1, lo, max(start, lo), min(end, hi))
        return writes

    def lookup(self, iova: int) -> tuple[int, int, bool, bool] | None:
        """(phys of iova, page order, read, write), or None when not mapped.

        Permissions are those of the whole walk (the AND over every level's entry).
        """
        if not isinstance(iova, int) or not 0 <= iova < self.limit:
            raise ValueError(f"iova {iova!r} outside the {self.width}-bit {self.fmt} space")
        table = self.root
        perms = ACCESS_READ | ACCESS_WRITE
        read = self.store.read
        present, ps, amask = self._present, self._ps, self._addr_mask
        for level in range(self.levels, 0, -1):
            entry = read(table + 8 * fl_index(iova, level))
            if not entry & present:
                return None
            perms &= self._perms_of(entry)
            if level == 1 or entry & ps:
                mask = (1 << level_shift(level)) - 1
                return ((entry & amask & ~mask) + (iova & mask), level - 1,
                        bool(perms & ACCESS_READ), bool(perms & ACCESS_WRITE))
            table = entry & amask
        raise AssertionError("unreachable: level-1 entries are always leaves")

    def leaves(self, start: int = 0, end: int | None = None
               ) -> Iterator[tuple[int, int, int, bool, bool]]:
        """Every mapped page meeting [start, end) as (iova, phys, order, read, write), in
        iova order.

        The walk descends only into entries that meet the range, and visits each table page
        once: an entry pointing at a table already visited (a loop back to an upper level,
        or two entries sharing a table, which only a hostile writer makes) reads as
        non-present, as QEMU's shadow walk treats an entry it cannot use. So the work is
        bounded by the table pages that exist, never by the address space.
        """
        hi = self.limit if end is None else min(end, self.limit)
        if start >= hi:
            return
        yield from self._leaves(self.root, self.levels, 0, ACCESS_READ | ACCESS_WRITE,
                                max(start, 0), hi, {self.root})

    def _leaves(self, table: int, level: int, base: int, perms: int, start: int, end: int,
                seen: set[int]) -> Iterator[tuple[int, int, int, bool, bool]]:
        shift = _LEVEL_SHIFT[level]
        span = 1 << shift
        first = max(0, (start - base) >> shift)
        last = min(PTES_PER_TABLE - 1, (end - 1 - base) >> shift)
        read = self.store.read
        present, ps, amask = self._present, self._ps, self._addr_mask
        for idx in range(first, last + 1):
            entry = read(table + 8 * idx)
            if not entry & present:
                continue
            p = perms & self._perms_of(entry)
            if level == 1 or entry & ps:
                yield (base + idx * span, entry & amask & ~(span - 1), level - 1,
                       bool(p & ACCESS_READ), bool(p & ACCESS_WRITE))
            elif (addr := entry & amask) not in seen:
                seen.add(addr)
                yield from self._leaves(addr, level - 1, base + idx * span, p, start, end,
                                        seen)

    def walk_range(self, start: int, end: int | None = None
                   ) -> tuple[list[tuple[int, int, int | None, bool]], int]:
        """QEMU's shadow page walk over [start, end): the entries it stops at, and its reads.

        Follows hw/i386/intel_iommu.c vtd_page_walk / vtd_page_walk_level: at each level the
        entries meeting the range are read in IOVA order; a valid non-leaf entry (R or W
        left after stacking the parents' permissions) is walked into, and every other entry
        is one event over its whole region at its level (``iova & subpage_mask``, size
        ``~subpage_mask + 1``): ``(region iova, level, phys, write)`` with ``phys`` the leaf's
        address, or None for an entry that maps nothing (not present, no permission, or a
        table page already visited: a loop or a shared table, which QEMU would walk again
        and this walk reads as nothing, so the work stays bounded by the table pages that
        exist). The end is clamped to the address width, as vtd_page_walk clamps it.
        """
        hi = self.limit if end is None else min(end, self.limit)
        events: list[tuple[int, int, int | None, bool]] = []
        reads = 0
        if max(start, 0) < hi:
            reads = self._walk_range(self.root, self.levels, 0, ACCESS_READ | ACCESS_WRITE,
                                     max(start, 0), hi, {self.root}, events)
        return events, reads

    def _walk_range(self, table: int, level: int, base: int, perms: int, start: int,
                    end: int, seen: set[int], events: list) -> int:
        """One level of walk_range; returns the entries read at this level and below."""
        shift = _LEVEL_SHIFT[level]
        span = 1 << shift
        first = (start - base) >> shift
        last = min(PTES_PER_TABLE - 1, (end - 1 - base) >> shift)
        read = self.store.read
        ps, amask = self._ps, self._addr_mask
        fl = self.fmt == "fl"
        reads = last + 1 - first
        for idx in range(first, last + 1):
            entry = read(table + 8 * idx)
            region = base + (idx << shift)
            # The next line is equivalent and left for reference (present and perms, both
            # formats): p = perms & info.perms if info.present else 0
            if fl:
                p = perms & (ACCESS_READ | (ACCESS_WRITE if entry & FL_RW else 0)
                             ) if entry & FL_P else 0
            else:
                p = perms & ((ACCESS_READ if entry & SL_R else 0)
                             | (ACCESS_WRITE if entry & SL_W else 0))
            if p and (level == 1 or entry & ps):
                events.append((region, level, entry & amask & ~(span - 1),
                               bool(p & ACCESS_WRITE)))
            elif p and (addr := entry & amask) not in seen:
                seen.add(addr)
                reads += self._walk_range(addr, level - 1, region, p, max(start, region),
                                          min(end, region + span), seen, events)
            else:
                events.append((region, level, None, False))
        return reads

    def destroy(self) -> None:
        """Free every table page, root included; the table is unusable afterwards."""
        if self._live:
            self._live = False
            self._free_subtree(self.root, self.levels)


__all__ = [
    "FL_A", "FL_D", "FL_G", "FL_P", "FL_PCD", "FL_PS", "FL_PWT", "FL_RW", "FL_US", "FL_XD",
    "RUN_DONE", "RUN_FALLBACK", "RUN_MORE", "RUN_NEED_TABLE",
    "SL_A", "SL_D", "SL_EMT", "SL_IPAT", "SL_PS", "SL_R", "SL_SNP", "SL_W", "SL_X",
    "HostTableStore", "PageTable", "PteInfo", "TableStore",
    "addr_mask", "canonical", "canonical_np", "fl_decode", "fl_index", "fl_leaf",
    "fl_reserved_masks", "fl_table", "level_shift", "sl_decode", "sl_index", "sl_leaf",
    "sl_reserved_masks", "sl_table",
]
