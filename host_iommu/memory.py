"""Emulated host physical memory: 4-KiB frames, their owners, and page-table pages.

Models what the IOMMU hardware reads and writes: memory addressed by HPA. Data frames carry
no bytes (only who owns them, so the oracle can check every DMA target); frames used as
tables (IOMMU root/context/PASID structures, second-level tables, and guest memory that the
guest uses as first-level tables) hold 512 x uint64 entries in one growing numpy slab, so a
batch walker reads entries with a single gather. A read of a frame that holds no table returns
zeros (a non-present entry), as reading a zeroed data page would.
"""

from __future__ import annotations

import numpy as np

from host_iommu.defs import (
    FRAME_DTYPE,
    KIND_DATA,
    KIND_FREE,
    KIND_GUEST_TABLE,
    KIND_PAGETABLE,
    OWNER_DTYPE,
    OWNER_FREE,
    OWNER_HOST,
    PAGE_SHIFT,
    PTE_DTYPE,
    PTES_PER_TABLE,
)


class HostMemoryError(Exception):
    """Host memory exhausted or misused by the emulator itself (not by a guest)."""


class HostMemory:
    """Frames of one host: owner and kind per frame, and a slab of table pages.

    Invariants: a frame is free (owner OWNER_FREE, kind KIND_FREE) or allocated to exactly one
    owner (OWNER_HOST or a VM id >= 1). A frame has a table slot (``slot_of[frame] >= 0``) iff
    its entries were ever written since allocation; freeing a frame drops its slot.
    """

    def __init__(self, frames: int, *, first_frame: int = 1) -> None:
        if frames <= first_frame:
            raise ValueError(f"host memory of {frames} frames is too small")
        self.frames = frames
        self.owner = np.full(frames, OWNER_FREE, dtype=OWNER_DTYPE)
        self.kind = np.zeros(frames, dtype=np.uint8)
        # Frame 0 is never handed out: a zero pointer in an entry stays obviously wrong.
        self.owner[:first_frame] = OWNER_HOST
        self.kind[:first_frame] = KIND_DATA
        self.slot_of = np.full(frames, -1, dtype=np.int32)
        self.slab = np.zeros((64, PTES_PER_TABLE), dtype=PTE_DTYPE)
        self._free_slots: list[int] = list(range(63, -1, -1))
        # Free frames are handed out lowest first, so layouts are a pure function of the calls.
        # A frame is free iff its owner is OWNER_FREE; none below ``_lo`` is free.
        self._nfree = frames - first_frame
        self._lo = first_frame
        self.pte_writes = 0

    # --- frames ---------------------------------------------------------------------------
    @property
    def free_frames(self) -> int:
        return self._nfree

    def _lowest_free(self, n: int) -> np.ndarray:
        """The ``n`` lowest free frames, ascending (windows from ``_lo``, doubling)."""
        parts, pos, width = [], self._lo, max(64, 2 * n)
        while n > 0 and pos < self.frames:
            found = np.flatnonzero(self.owner[pos:pos + width] == OWNER_FREE)[:n] + pos
            parts.append(found)
            n -= found.size
            pos += width
            width *= 2
        return np.concatenate(parts).astype(FRAME_DTYPE) if parts else np.zeros(0, FRAME_DTYPE)

    def _take(self, frames: np.ndarray, owner: int, kind: int) -> None:
        self.owner[frames] = owner
        self.kind[frames] = kind
        self._nfree -= frames.size

    def alloc_frames(self, n: int, owner: int, kind: int = KIND_DATA) -> np.ndarray:
        """Allocate the ``n`` lowest free frames (not necessarily contiguous) to ``owner``."""
        if n > self._nfree:
            raise HostMemoryError(f"host memory exhausted: need {n} frames, "
                               f"{self._nfree} free")
        got = self._lowest_free(n)
        self._take(got, owner, kind)
        if n:
            self._lo = int(got[-1]) + 1   # every free frame up to there was taken
        return got

    def alloc_contiguous(self, n: int, owner: int, align: int = 1,
                         kind: int = KIND_DATA) -> int:
        """Allocate the lowest ``n`` physically contiguous free frames aligned to ``align``."""
        base = (self._lo // align) * align   # no free frame below _lo: no fit starts lower
        width = max(4 * n, 1024)
        while base + n <= self.frames:
            end = min(self.frames, base + width + n)
            free = (self.owner[base:end] == OWNER_FREE).astype(np.int64)
            csum = np.concatenate([[0], np.cumsum(free)])
            starts = np.arange(0, end - base - n + 1, align, dtype=np.int64)
            fits = np.flatnonzero(csum[starts + n] - csum[starts] == n)
            if fits.size:
                start = base + int(starts[fits[0]])
                self._take(np.arange(start, start + n, dtype=FRAME_DTYPE), owner, kind)
                return start
            base += (width // align) * align or align
            width *= 2
        raise HostMemoryError(f"no {n} contiguous free frames aligned to {align}")

    def free(self, frames: np.ndarray | list[int] | int) -> None:
        """Return frames to the free pool, dropping any table contents."""
        arr = np.atleast_1d(np.asarray(frames, dtype=FRAME_DTYPE))
        if arr.size == 0:
            return
        if np.any(self.owner[arr] == OWNER_FREE) or np.unique(arr).size != arr.size:
            raise HostMemoryError("double free of a host frame")
        for f in arr.tolist():
            slot = int(self.slot_of[f])
            if slot >= 0:
                self.slab[slot] = 0
                self._free_slots.append(slot)
                self.slot_of[f] = -1
        self.owner[arr] = OWNER_FREE
        self.kind[arr] = KIND_FREE
        self._nfree += arr.size
        self._lo = min(self._lo, int(arr.min()))

    def set_kind(self, frames: np.ndarray | int, kind: int) -> None:
        self.kind[np.atleast_1d(np.asarray(frames, dtype=FRAME_DTYPE))] = kind

    # --- table pages ----------------------------------------------------------------------
    def alloc_table(self, owner: int = OWNER_HOST, kind: int = KIND_PAGETABLE) -> int:
        """Allocate one zeroed frame to hold a table; returns its frame number."""
        frame = int(self.alloc_frames(1, owner, kind)[0])
        self._slot(frame)
        return frame

    def _slot(self, frame: int) -> int:
        slot = int(self.slot_of[frame])
        if slot < 0:
            if not self._free_slots:
                old = self.slab.shape[0]
                self.slab = np.concatenate([self.slab, np.zeros_like(self.slab)])
                self._free_slots = list(range(2 * old - 1, old - 1, -1))
            slot = self._free_slots.pop()
            self.slot_of[frame] = slot
        return slot

    def table(self, frame: int) -> np.ndarray:
        """The 512 entries of a frame as a writable view (creates the slot if needed)."""
        slot = self._slot(frame)  # may grow the slab: index it only afterwards
        return self.slab[slot]

    def has_table(self, frame: int) -> bool:
        return bool(self.slot_of[frame] >= 0)

    def read_u64(self, hpa: int) -> int:
        """One 64-bit read at a host physical address (8-byte aligned)."""
        frame = hpa >> PAGE_SHIFT
        if frame < 0 or frame >= self.frames:
            return 0
        slot = int(self.slot_of[frame])
        if slot < 0:
            return 0
        return int(self.slab[slot, (hpa >> 3) & (PTES_PER_TABLE - 1)])

    def write_u64(self, hpa: int, value: int) -> None:
        """One 64-bit write at a host physical address (counted as a PTE write)."""
        frame = hpa >> PAGE_SHIFT
        if frame < 0 or frame >= self.frames or self.owner[frame] == OWNER_FREE:
            raise HostMemoryError(f"write to unallocated host address {hpa:#x}")
        self.table(frame)[(hpa >> 3) & (PTES_PER_TABLE - 1)] = np.uint64(value)
        self.pte_writes += 1

    def gather_u64(self, hpa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batch read: entry values at ``hpa`` and a mask of addresses inside host memory.

        Addresses beyond the host's frames read as 0 with ``ok`` False (the walker turns that
        into an access-error fault); frames without a table read as 0 with ``ok`` True.
        """
        frame = (hpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        ok = frame < self.frames
        frame = np.where(ok, frame, 0)
        slot = self.slot_of[frame]
        idx = ((hpa >> np.uint64(3)) & np.uint64(PTES_PER_TABLE - 1)).astype(np.int64)
        vals = self.slab[np.maximum(slot, 0), idx]
        vals = np.where((slot >= 0) & ok, vals, np.uint64(0))
        return vals, ok

    def or_u64(self, hpa: np.ndarray, bits: np.ndarray | int) -> None:
        """Batch atomic OR into table entries (A/D updates); non-table frames are skipped."""
        frame = (hpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        ok = frame < self.frames
        frame = frame[ok]
        slot = self.slot_of[frame]
        has = slot >= 0
        idx = ((hpa[ok] >> np.uint64(3)) & np.uint64(PTES_PER_TABLE - 1)).astype(np.int64)
        bits_arr = np.broadcast_to(np.asarray(bits, dtype=PTE_DTYPE), hpa.shape)[ok]
        np.bitwise_or.at(self.slab, (slot[has], idx[has]), bits_arr[has])

    def owned_by(self, owner: int) -> np.ndarray:
        return np.flatnonzero(self.owner == owner)


__all__ = [
    "KIND_DATA",
    "KIND_FREE",
    "KIND_GUEST_TABLE",
    "KIND_PAGETABLE",
    "OWNER_FREE",
    "OWNER_HOST",
    "HostMemory",
    "HostMemoryError",
]
