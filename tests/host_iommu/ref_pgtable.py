"""The scalar PageTable as it was before its fast paths (decode every entry, one walk per
page): the plain reference test_pgtable_fastpath.py and test_kernel_pgtable.py compare
host_iommu.pgtable.PageTable with. It shares only the entry encoders and decoders (fl_leaf,
sl_decode, ...) with the code under test, never its walks. ``apply_op`` is the step both
differential tests replay on a (fast, reference) pair.
"""

from __future__ import annotations

from collections.abc import Iterator

from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    DEFAULT_HAW,
    FL_WIDTH_BY_LEVELS,
    PAGE_ORDERS,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTES_PER_TABLE,
    SL_WIDTH_BY_LEVELS,
    order_size,
)
from host_iommu.pgtable import (
    FL_PS,
    SL_PS,
    PteInfo,
    TableStore,
    addr_mask,
    fl_decode,
    fl_index,
    fl_leaf,
    fl_table,
    level_shift,
    sl_decode,
    sl_leaf,
    sl_table,
)

U64 = (1 << 64) - 1
_ATTR_MASK = U64 & ~((1 << 52) - 1 - (PAGE_SIZE - 1))


class RefPageTable:
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
        self._used: dict[int, int] = {}  # table address -> non-zero entries in it
        self.freed_tables = 0
        self.root = self._alloc()

    # --- entry helpers ----------------------------------------------------------------------
    def _decode(self, entry: int, level: int) -> PteInfo:
        return (fl_decode if self.fmt == "fl" else sl_decode)(entry, level, self.haw)

    def _table_entry(self, addr: int) -> int:
        return fl_table(addr) if self.fmt == "fl" else sl_table(addr)

    def _leaf_entry(self, phys: int, order: int, read: bool, write: bool) -> int:
        if self.fmt == "fl":
            return fl_leaf(phys, order, write)
        return sl_leaf(phys, order, read, write)

    def _alloc(self) -> int:
        addr = self.store.alloc_table()
        self._used[addr] = 0
        return addr

    def _write(self, ea: int, value: int) -> int:
        table = ea & ~(PAGE_SIZE - 1)
        old = self.store.read(ea)
        self.store.write(ea, value)
        self._used[table] += (value != 0) - (old != 0)
        return 1

    def _free_subtree(self, table: int, level: int) -> int:
        """Free ``table`` and every table below it; returns the pages freed."""
        freed = 1
        if level > 1:
            for idx in range(PTES_PER_TABLE):
                info = self._decode(self.store.read(table + 8 * idx), level)
                if info.present and not info.leaf:
                    freed += self._free_subtree(info.addr, level - 1)
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
        if not self._used:
            raise ValueError("page table was destroyed")
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
        writes = 0
        end = iova + size
        while iova < end:
            order = top
            while order and ((iova | phys) & (order_size(order) - 1)
                             or end - iova < order_size(order)):
                order -= 1
            entry = self._leaf_entry(phys, order, read, write)
            writes += self._install(iova, order, entry)
            iova += order_size(order)
            phys += order_size(order)
        return writes

    def _install(self, iova: int, order: int, entry: int) -> int:
        writes = 0
        table = self.root
        target = order + 1
        for level in range(self.levels, target, -1):
            ea = table + 8 * fl_index(iova, level)
            info = self._decode(self.store.read(ea), level)
            if not info.present:
                table = self._alloc()
                writes += self._write(ea, self._table_entry(table))
                continue
            if info.leaf:
                writes += self._split(ea, self.store.read(ea), level)
                info = self._decode(self.store.read(ea), level)
            table = info.addr
        ea = table + 8 * fl_index(iova, target)
        old = self._decode(self.store.read(ea), target)
        if old.present and not old.leaf:
            self._free_subtree(old.addr, target - 1)
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
        return self._unmap(self.root, self.levels, 0, iova, iova + size)

    def _unmap(self, table: int, level: int, base: int, start: int, end: int) -> int:
        shift = level_shift(level)
        span = 1 << shift
        writes = 0
        for idx in range((start - base) >> shift, ((end - 1 - base) >> shift) + 1):
            ea = table + 8 * idx
            entry = self.store.read(ea)
            info = self._decode(entry, level)
            if not info.present:
                continue
            lo = base + idx * span
            hi = lo + span
            if start <= lo and hi <= end:  # the whole region: clear it, free its tables
                if not info.leaf:
                    self.freed_tables += self._free_subtree(info.addr, level - 1)
                writes += self._write(ea, 0)
                continue
            if info.leaf:
                writes += self._split(ea, entry, level)
                info = self._decode(self.store.read(ea), level)
            writes += self._unmap(info.addr, level - 1, lo, max(start, lo), min(end, hi))
        return writes

    def lookup(self, iova: int) -> tuple[int, int, bool, bool] | None:
        """(phys of iova, page order, read, write), or None when not mapped.

        Permissions are those of the whole walk (the AND over every level's entry).
        """
        if not isinstance(iova, int) or not 0 <= iova < self.limit:
            raise ValueError(f"iova {iova!r} outside the {self.width}-bit {self.fmt} space")
        table = self.root
        perms = ACCESS_READ | ACCESS_WRITE
        for level in range(self.levels, 0, -1):
            info = self._decode(self.store.read(table + 8 * fl_index(iova, level)), level)
            if not info.present:
                return None
            perms &= info.perms
            if info.leaf:
                offset = iova & ((1 << level_shift(level)) - 1)
                return (info.addr + offset, level - 1, bool(perms & ACCESS_READ),
                        bool(perms & ACCESS_WRITE))
            table = info.addr
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
        shift = level_shift(level)
        span = 1 << shift
        first = max(0, (start - base) >> shift)
        last = min(PTES_PER_TABLE - 1, (end - 1 - base) >> shift)
        for idx in range(first, last + 1):
            info = self._decode(self.store.read(table + 8 * idx), level)
            if not info.present:
                continue
            p = perms & info.perms
            if info.leaf:
                yield (base + idx * span, info.addr, level - 1, bool(p & ACCESS_READ),
                       bool(p & ACCESS_WRITE))
            elif info.addr not in seen:
                seen.add(info.addr)
                yield from self._leaves(info.addr, level - 1, base + idx * span, p,
                                        start, end, seen)

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
        reads = [0]
        if max(start, 0) < hi:
            self._walk_range(self.root, self.levels, 0, ACCESS_READ | ACCESS_WRITE,
                             max(start, 0), hi, {self.root}, events, reads)
        return events, reads[0]

    def _walk_range(self, table: int, level: int, base: int, perms: int, start: int,
                    end: int, seen: set[int], events: list, reads: list[int]) -> None:
        shift = level_shift(level)
        first = (start - base) >> shift
        last = min(PTES_PER_TABLE - 1, (end - 1 - base) >> shift)
        for idx in range(first, last + 1):
            reads[0] += 1
            info = self._decode(self.store.read(table + 8 * idx), level)
            region = base + (idx << shift)
            p = perms & info.perms if info.present else 0
            if p and info.leaf:
                events.append((region, level, info.addr, bool(p & ACCESS_WRITE)))
            elif p and info.addr not in seen:
                seen.add(info.addr)
                self._walk_range(info.addr, level - 1, region, p, max(start, region),
                                 min(end, region + (1 << shift)), seen, events, reads)
            else:
                events.append((region, level, None, False))

    def destroy(self) -> None:
        """Free every table page, root included; the table is unusable afterwards."""
        if self._used:
            self._free_subtree(self.root, self.levels)


def both(fast_fn, ref_fn, args: tuple, kwargs: dict, fs, rs) -> bool:
    """Call both: the same result, or the same exception after the same logged stores (an
    outside store may lead a walk to a page that is no table). False when they raised."""
    out = []
    for fn in (fast_fn, ref_fn):
        try:
            out.append(("ok", fn(*args, **kwargs)))
        except (KeyError, ValueError) as e:
            out.append(("raised", type(e)))
    assert out[0] == out[1]
    if out[0][0] == "raised":
        assert fs.log == rs.log
        return False
    return True


def apply_op(o: tuple, fast, ref: RefPageTable, fs, rs, fmt: str) -> bool:
    """One generated operation on both tables: ("map", base, off, pages, phys_page, write,
    read, top), ("unmap", base, off, pages) or ("poke", pick, slot, bits), a store made
    outside the table flipping bits of a present entry. False once both raised (stop)."""
    if o[0] == "map":
        _k, base, off, pages, phys_page, write, read, top = o
        iova, size = (base + off) << PAGE_SHIFT, pages << PAGE_SHIFT
        if iova + size > fast.limit:
            return True
        phys = phys_page << (PAGE_SHIFT + (9 if phys_page & 1 else 0))
        read = read or fmt == "fl" or not write
        return both(fast.map, ref.map, (iova, phys, size),
                    dict(write=write, read=read, max_order=top), fs, rs)
    if o[0] == "unmap":
        _k, base, off, pages = o
        iova, size = (base + off) << PAGE_SHIFT, pages << PAGE_SHIFT
        if iova + size > fast.limit:
            return True
        if not both(fast.unmap, ref.unmap, (iova, size), {}, fs, rs):
            return False
        assert fast.freed_tables == ref.freed_tables
        return True
    _k, pick, slot, bits = o
    tables = sorted(fs.pages)
    table = tables[pick % len(tables)]
    used = [i for i, v in enumerate(fs.pages[table]) if v]
    addr = table + 8 * (used[slot % len(used)] if used else slot)
    if fs.read(addr):   # a zero entry made present would point at address 0
        fs.write(addr, fs.read(addr) ^ bits)
        rs.write(addr, rs.read(addr) ^ bits)
    return True
