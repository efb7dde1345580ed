"""The guest's physical memory (GPA space): a page allocator and its page-table pages.

Models the guest kernel's page allocator only as far as DMA needs it: buffers of 2^k pages,
page-table pages for the IOMMU driver, and pages the balloon driver hands back to the host.
Allocation is deterministic (size-class free lists, then a bump pointer), so a run is a pure
function of its inputs. Page-table pages are kept locally (512 64-bit entries each, as a list of
Python ints: the driver reads and writes one entry at a time, and a list index is several times
cheaper than a numpy scalar), because the guest reads its own tables; under nesting every store
into them is also logged for the host, which holds the real memory the IOMMU walks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE, PTES_PER_TABLE

_U64 = (1 << 64) - 1


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

    ``on_write(gpa, value)`` is called for every store (the agent logs them for the host under
    nesting, stamped with ``now``: the virtual time of the driver code doing the store);
    ``writes`` counts them.
    """

    # Every change to these pages goes through write() and is counted in ``writes`` (no
    # walker sets A/D bits here: the host holds the memory the IOMMU walks), so PageTable may
    # keep the level-1 tables of its recent walks (host_iommu.pgtable.TableStore).
    exclusive_writes = True

    def __init__(self, mem: GuestMemory, on_write: Callable[[int, int], None] | None = None
                 ) -> None:
        self.mem = mem
        self.pages: dict[int, list[int]] = {}   # GPA -> its 512 entries (ints in 0..2^64-1)
        self.on_write = on_write
        self.writes = 0
        self.now = 0
        self.zeroing: int | None = None  # the table page whose zeroing stores are under way

    def alloc_table(self) -> int:
        """A zeroed page-table page (Linux iommu_alloc_page: __GFP_ZERO).

        The zeroing is a guest CPU memset the IOMMU sees: a page that was a table before
        still holds its old entries in memory, so under nesting its non-zero slots are
        stored as 0 (``on_write``) before the page is used. They are not PTE writes of the
        driver (``writes`` does not count them).
        """
        gpa = self.mem.alloc(1)
        self.pages[gpa] = [0] * PTES_PER_TABLE
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
            # np.flatnonzero over the page, as int64 slot indices
            residue = np.array([i for i, v in enumerate(page) if v], dtype=np.int64)
            if residue.size:
                self.mem.table_residue[addr] = residue
        self.mem.free(addr, 1)

    def read(self, addr: int) -> int:
        page = self.pages.get(addr & ~(PAGE_SIZE - 1))
        return 0 if page is None else page[(addr >> 3) & 511]

    def write(self, addr: int, value: int) -> None:
        if not 0 <= value <= _U64:   # what a uint64 slot would refuse
            raise OverflowError(f"entry {value!r} is not a 64-bit unsigned value")
        self.pages[addr & ~(PAGE_SIZE - 1)][(addr >> 3) & 511] = value
        self.writes += 1
        if self.on_write is not None:
            self.on_write(addr, value)
