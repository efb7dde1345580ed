"""The guest's physical memory (GPA space): a page allocator and its page-table pages.

Models the guest kernel's page allocator only as far as DMA needs it: buffers of 2^k pages,
page-table pages for the IOMMU driver, and pages the balloon driver hands back to the host.
Allocation is deterministic (size-class free lists, then a bump pointer), so a run is a pure
function of its inputs. Page-table pages are kept locally, because the guest reads its own
tables: one uint64 slab of 512-entry rows per domain, which the compiled map and unmap of a run
(vm_agent/kernels/pgtable.py) work on in place; under nesting every store into them is also
logged for the host, which holds the real memory the IOMMU walks (Linux's driver writes its
tables with plain CPU stores, drivers/iommu/intel/iommu.c).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping

import numpy as np

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from vm_agent.kernels import pgtable as kpg

_U64 = (1 << 64) - 1
_FIRST_ROWS = 16       # table pages the slab holds before it first grows
_FIRST_FRAMES = 1024   # GPA frames row_of covers before it first grows
_OUT_EVENTS = 1024     # stores a map call may list before it asks to be called again


class GuestMemoryError(Exception):
    """The guest ran out of memory (a config too small for its workload)."""


class GuestMemory:
    """GPA frames [first_frame, frames): power-of-two buffer classes over a bump pointer."""

    def __init__(self, frames: int, first_frame: int = 16) -> None:
        self.frames = frames
        self.next_frame = first_frame
        self.free_lists: dict[int, list[int]] = {}
        self.ballooned: list[int] = []
        self.used_pages = 0
        # Slots a freed page-table page still holds in memory (an unmap that covers a whole
        # table frees it without clearing it, as Linux's freelist does): GPA -> slot indices.
        self.table_residue: dict[int, np.ndarray] = {}

    @staticmethod
    def _order(npages: int) -> int:
        return max(0, (npages - 1).bit_length())

    def alloc(self, npages: int) -> int:
        """GPA of 2^ceil(log2(npages)) contiguous pages, aligned to their size."""
        order = self._order(npages)
        fl = self.free_lists.get(order)
        if fl:
            frame = fl.pop()
        else:
            size = 1 << order
            frame = -(-self.next_frame // size) * size
            if frame + size > self.frames:
                raise GuestMemoryError(
                    f"guest memory exhausted allocating {npages} pages "
                    f"({self.frames} frames): raise vm.memory_mib")
            self.next_frame = frame + size
        self.used_pages += 1 << order
        return frame << PAGE_SHIFT

    def free(self, gpa: int, npages: int) -> None:
        order = self._order(npages)
        self.free_lists.setdefault(order, []).append(gpa >> PAGE_SHIFT)
        self.used_pages -= 1 << order

    def balloon_take(self, npages: int) -> list[int]:
        """Free single pages the balloon driver gives to the host (GPA frames)."""
        got: list[int] = []
        fl = self.free_lists.setdefault(0, [])
        while len(got) < npages and fl:
            got.append(fl.pop())
        while len(got) < npages and self.next_frame < self.frames:
            got.append(self.next_frame)
            self.next_frame += 1
        self.ballooned.extend(got)
        return got

    def balloon_return(self, npages: int) -> list[int]:
        back = self.ballooned[-npages:] if npages else []
        del self.ballooned[len(self.ballooned) - len(back):]
        self.free_lists.setdefault(0, []).extend(back)
        return back


class GuestTableStore:
    """TableStore (host_iommu.pgtable) over guest memory: addresses are GPAs.

    The table pages live in one int64 array with the kernels' layout
    (vm_agent/kernels/pgtable.py): a slab of 512-entry rows (a freed page's row is taken
    again by the next allocation), each table's non-zero entry count, and ``row_of`` from
    GPA frame to row. ``pages`` maps each table's GPA to its row as a uint64 view (made
    again whenever the array grows). PageTable runs its 4-KiB maps and its unmaps on it
    compiled (``map_4k``, ``unmap_range``) and keeps its per-table counts there
    (``table_counts``). Which GPA a table gets is the guest page allocator's choice alone
    (GuestMemory.alloc).

    ``on_write(gpa, value)`` is called for every store (the agent logs them for the host under
    nesting, stamped with ``now``: the virtual time of the driver code doing the store);
    ``writes`` counts them. ``on_writes(pairs)``, when set, takes the compiled runs' stores
    instead, one call per run with their flat ``[gpa, value, gpa, value, ...]`` in store
    order (the agent logs them in one step); ``on_write`` still takes the others.
    """

    # Every change to these pages goes through write() or the kernels and is counted in
    # ``writes`` (no walker sets A/D bits here: the host holds the memory the IOMMU walks),
    # so PageTable may keep the level-1 tables of its recent walks or run them compiled
    # (host_iommu.pgtable.TableStore).
    exclusive_writes = True

    def __init__(self, mem: GuestMemory, on_write: Callable[[int, int], None] | None = None,
                 *, out_events: int = _OUT_EVENTS) -> None:
        """``out_events``: the stores one map call may list (at least a 5-level walk and
        one level-1 table's 512) before PageTable calls again; an unmap grows it."""
        if out_events < 5 + kpg.SLOTS:
            raise ValueError(f"out_events {out_events} below {5 + kpg.SLOTS}")
        self.mem = mem
        self.on_write = on_write
        self.on_writes: Callable[[list[int]], None] | None = None
        self.writes = 0
        self.now = 0
        self.zeroing: int | None = None  # the table page whose zeroing stores are under way
        self._rows: dict[int, int] = {}   # GPA -> slab row of each table page
        self._free_rows: list[int] = []
        self._next_row = 0
        self._freed: int | None = None   # the table page the last free_table freed
        self._resize(kpg.grown(None, _FIRST_FRAMES, _FIRST_ROWS, out_events))

    def _resize(self, state: np.ndarray) -> None:
        self.state = state
        frames, rows, events = (int(x) for x in state[:kpg.H_STAMP])
        self._used_at, _mark, self._out_at, _slab, _end = kpg.offsets(frames, rows, events)
        slab = kpg.slab_of(state)
        self.pages: dict[int, np.ndarray] = {gpa: slab[row] for gpa, row in self._rows.items()}

    # --- pickling: the views in ``pages`` are made again over the copied array --------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["pages"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._resize(self.state)

    def _take_row(self, gpa: int) -> None:
        frames, rows, events = (int(x) for x in self.state[:kpg.H_STAMP])
        frame = gpa >> PAGE_SHIFT
        row = self._free_rows.pop() if self._free_rows else self._next_row
        if row == self._next_row:
            self._next_row += 1
        if row >= rows or frame >= frames:
            room = max(frames, min(2 * frame, self.mem.frames), frame + 1)
            self._resize(kpg.grown(self.state, room, 2 * rows if row >= rows else rows, events))
        self.state[kpg.HEADER + frame] = row
        self.state[self._used_at + row] = 0
        self._rows[gpa] = row
        page = kpg.slab_of(self.state)[row]
        page[:] = 0
        self.pages[gpa] = page

    def alloc_table(self) -> int:
        """A zeroed page-table page (Linux iommu_alloc_page: __GFP_ZERO).

        The zeroing is a guest CPU memset the IOMMU sees: a page that was a table before
        still holds its old entries in memory, so under nesting its non-zero slots are
        stored as 0 (``on_write``) before the page is used. They are not PTE writes of the
        driver (``writes`` does not count them).
        """
        gpa = self.mem.alloc(1)
        self._take_row(gpa)
        residue = self.mem.table_residue.pop(gpa, None)
        if residue is not None and self.on_write is not None:
            self.zeroing = gpa
            for slot in residue.tolist():
                self.on_write(gpa + 8 * slot, 0)
            self.zeroing = None
        return gpa

    def free_table(self, addr: int) -> None:
        page = self.pages.pop(addr, None)
        if page is not None:
            residue = np.flatnonzero(page)   # int64 slot indices
            if residue.size:
                self.mem.table_residue[addr] = residue
            self._free_rows.append(self._rows.pop(addr))
            self.state[kpg.HEADER + (addr >> PAGE_SHIFT)] = -1
        self._freed = addr if page is not None else None   # for TableCounts' del
        self.mem.free(addr, 1)

    def read(self, addr: int) -> int:
        page = self.pages.get(addr & ~(PAGE_SIZE - 1))
        return 0 if page is None else page.item((addr >> 3) & 511)

    def write(self, addr: int, value: int) -> None:
        if not 0 <= value <= _U64:   # what a uint64 slot would refuse
            raise OverflowError(f"entry {value!r} is not a 64-bit unsigned value")
        self.pages[addr & ~(PAGE_SIZE - 1)][(addr >> 3) & 511] = value
        self.writes += 1
        if self.on_write is not None:
            self.on_write(addr, value)

    # --- PageTable's compiled runs (host_iommu.pgtable.TableStore) --------------------------
    def table_counts(self) -> TableCounts:
        """The non-zero entries of each table page, as PageTable counts them."""
        return TableCounts(self)

    def bind(self, root: int, levels: int, fmt_bits: tuple[int, int, int, int]) -> None:
        """The one tree the kernels work on: its root, levels and format's bits (present
        bits, PS, address field, non-leaf entry bits)."""
        kpg.bind(self.state, root, levels, *fmt_bits)

    def _report(self, n: int, frees: int) -> list[int]:
        """Report the stores among the kernel's ``n`` listed (address, value) pairs, ``frees``
        of them freed tables, to ``on_writes`` (all at once) or ``on_write`` (one by one) in
        order; returns the tables listed as freed, in order."""
        on_writes = self.on_writes
        state, at = self.state, self._out_at
        if n == 1:   # the common one store: two scalar reads beat a slice
            addr = state.item(at)
            if addr & kpg.FREED:
                return [addr - kpg.FREED]
            if on_writes is not None:
                on_writes([addr, state.item(at + 1)])
            elif self.on_write is not None:
                self.on_write(addr, state.item(at + 1))
            return []
        listed = state[at:at + kpg.EVENT * n].tolist()
        if not frees and on_writes is not None and kpg.EVENT == 2:
            on_writes(listed)    # the listed pairs are the stores
            return []
        freed = []
        pairs = []
        for i in range(0, len(listed), kpg.EVENT):
            addr = listed[i]
            if addr & kpg.FREED:
                freed.append(addr - kpg.FREED)
            else:
                pairs.append(addr)
                pairs.append(listed[i + 1])
        if on_writes is not None:
            if pairs:
                on_writes(pairs)
        elif self.on_write is not None:
            on_write = self.on_write
            for i in range(0, len(pairs), 2):
                on_write(pairs[i], pairs[i + 1])
        return freed

    def map_4k(self, iova: int, end: int, phys: int, bits: int, new_table: int
               ) -> tuple[int, int]:
        """kpg.map_4k on this array: (RUN_* code, IOVA reached), its stores counted and
        reported (a map frees no table)."""
        code, pos, n = kpg.map_4k(self.state, iova, end, phys, bits, new_table)
        self.writes += n
        if n == 1 and self.on_writes is not None:   # the common one store, _report inlined
            at = self._out_at
            self.on_writes([self.state.item(at), self.state.item(at + 1)])
        elif n and (self.on_writes is not None or self.on_write is not None):
            self._report(n, 0)
        return code, pos

    def unmap_range(self, start: int, end: int) -> tuple[int, list[int]] | None:
        """kpg.unmap_range on this array: (stores made, tables to free in order), the stores
        counted and reported; None when it did nothing (PageTable's walk must)."""
        code, stores, frees = kpg.unmap_range(self.state, start, end)
        while code == kpg.NEED_ROOM:
            frames, rows, events = (int(x) for x in self.state[:kpg.H_STAMP])
            self._resize(kpg.grown(self.state, frames, rows,
                                   max(stores + frees, 2 * events)))
            code, stores, frees = kpg.unmap_range(self.state, start, end)
        if code == kpg.FALLBACK:
            return None
        self.writes += stores
        if stores == 1 and not frees and self.on_writes is not None:   # _report inlined
            at = self._out_at
            self.on_writes([self.state.item(at), self.state.item(at + 1)])
            return stores, []
        if frees or (stores and (self.on_writes is not None or self.on_write is not None)):
            return stores, self._report(stores + frees, frees)
        return stores, []


class TableCounts(MutableMapping):
    """PageTable's ``_used`` (table GPA -> its non-zero entries) over a GuestTableStore's
    array, where the kernels keep the counts: the keys are the store's table pages, and a
    free drops the page's count with it. So ``del`` (which PageTable makes right after
    GuestTableStore.free_table) has nothing left to drop, and raises KeyError, as a dict
    would, unless that free took a table page."""

    def __init__(self, store: GuestTableStore) -> None:
        self.store = store

    def __getitem__(self, gpa: int) -> int:
        s = self.store
        return int(s.state[s._used_at + s._rows[gpa]])

    def __setitem__(self, gpa: int, count: int) -> None:
        s = self.store
        s.state[s._used_at + s._rows[gpa]] = count

    def __delitem__(self, gpa: int) -> None:
        if self.store._freed != gpa:
            raise KeyError(gpa)
        self.store._freed = None

    def __iter__(self) -> Iterator[int]:
        return iter(self.store._rows)

    def __len__(self) -> int:
        return len(self.store._rows)
