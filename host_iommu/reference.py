"""Reference model: the walker's semantics one request at a time, in plain Python.

Small and obviously correct, kept beside the batch walker (host_iommu/walk.py) so tests can
compare the two on random and adversarial inputs. It follows the VT-d spec chapter 3 text
literally (3.6 first level, 3.7 second level, 3.8 nested) and the entry formats of chapter 9
(9.7 first-level paging entries, 9.8 second-level paging entries), reading memory through
``HostMemory.read_u64``. It shares no code with what it checks: the entry bits, the address
field and the reserved bits below are written here from the spec's tables, not imported from
host_iommu/pgtable.py. Paging-structure caches, when given (tests pass the plain-list model of
host_iommu/reference_cache.py), are looked up before any fill of the batch and filled
afterwards in request order, walk order, level top-down: the batch semantics documented in
walk.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from host_iommu.defs import (
    ACCESS_WRITE,
    FL_WIDTH_BY_LEVELS,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
    SL_WIDTH_BY_LEVELS,
    Stage,
)
from host_iommu.memory import HostMemory

MASK64 = (1 << 64) - 1

# Scalable-mode fault reasons (VT-d spec table "Scalable-Mode Fault Reasons"; the same codes
# Linux dmar.c prints from dma_remap_sm_fault_reasons), written here, not imported.
SM_PASID_ENTRY_INV = 0x5B   # invalid scalable-mode PASID table entry (PGTT)
SM_FL_ACCESS = 0x70         # error attempting to access a first-level paging entry
SM_FL_P = 0x71              # present bit in a first-level paging entry is clear
SM_FL_RSVD = 0x72           # non-zero reserved field set in a first-level paging entry
SM_SL_ACCESS = 0x78         # error attempting to access a second-level paging entry
SM_SL_RW = 0x79             # read/write permission error (R and W clear) in a second-level entry
SM_SL_RSVD = 0x7A           # non-zero reserved field set in a second-level paging entry
SM_NON_CANONICAL = 0x80     # first-level input address not canonical
SM_US = 0x81                # U/S clear for a first-level user request
SM_BEYOND_MAX = 0x83        # address beyond the hardware max (AGAW of the SL, or the HAW)
SM_NO_WRITE = 0x85          # no write permission for a write request
SM_NO_READ = 0x86           # no read permission for a read request

# First-level paging entries (VT-d spec 9.7, the IA-32e formats of the PML5E .. PTE tables).
FL_P = 1 << 0    # Present
FL_RW = 1 << 1   # Read/Write: 0 makes the region read-only
FL_US = 1 << 2   # User/Supervisor: 1 allows user-mode (DMA) requests
FL_A = 1 << 5    # Accessed
FL_D = 1 << 6    # Dirty (leaf entries)
FL_PS = 1 << 7   # Page Size in a PDPE or PDE; PAT in a PTE

# Second-level paging entries (VT-d spec 9.8, SL-PML5E .. SL-PTE).
SL_R = 1 << 0    # Read
SL_W = 1 << 1    # Write
SL_PS = 1 << 7   # Page Size in an SL-PDPE or SL-PDE; ignored in an SL-PTE
SL_A = 1 << 8    # Accessed
SL_D = 1 << 9    # Dirty
SL_SNP = 1 << 11  # Snoop: leaf entries only, reserved in entries that point to a table
SL_RSVD_62 = 1 << 62  # reserved in every second-level entry


def bits(hi: int, lo: int) -> int:
    """The mask of bits hi..lo inclusive (empty when hi < lo)."""
    return 0 if hi < lo else ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


def address_field(haw: int) -> int:
    """Bits HAW-1:12 of an entry: the address of the next table or of the page."""
    return bits(haw - 1, 12)


def fl_reserved(entry: int, level: int, haw: int) -> int:
    """The reserved bits set in a first-level entry at ``level`` (spec 9.7 tables).

    Every entry: bits 51:HAW. PML5E and PML4E: bit 7 (PS). A PDPE mapping a 1-GiB page:
    bits 29:13. A PDE mapping a 2-MiB page: bits 20:13. A PTE: nothing more (bit 7 is PAT).
    Bits 62:52 are ignored, not reserved.
    """
    rsvd = bits(51, haw)
    if level >= 4:
        rsvd |= FL_PS
    elif level == 3 and entry & FL_PS:
        rsvd |= bits(29, 13)
    elif level == 2 and entry & FL_PS:
        rsvd |= bits(20, 13)
    return entry & rsvd


def sl_reserved(entry: int, level: int, haw: int) -> int:
    """The reserved bits set in a second-level entry at ``level`` (spec 9.8 tables).

    Every entry: bits 51:HAW and bit 62. SL-PML5E and SL-PML4E: bit 7 (PS) and bit 11
    (SNP). An SL-PDPE or SL-PDE pointing to a table: bit 11; mapping a 1-GiB page: bits
    29:12; mapping a 2-MiB page: bits 20:12. An SL-PTE: nothing more (bit 7 is ignored).
    """
    rsvd = bits(51, haw) | SL_RSVD_62
    if level >= 4:
        rsvd |= SL_PS | SL_SNP
    elif level in (2, 3) and entry & SL_PS:
        rsvd |= bits(29, 12) if level == 3 else bits(20, 12)
    elif level in (2, 3):
        rsvd |= SL_SNP
    return entry & rsvd


@dataclass
class RefRequest:
    addr: int
    access: int
    pgtt: int
    did: int
    pasid: int
    flptr: int
    fl_levels: int
    slptr: int
    sl_levels: int
    ssade: bool = False


@dataclass
class RefResult:
    hpa: int = 0
    fault: int = 0
    stage: int = 0
    refs: int = 0
    order: int = 0
    perm: int = 0


class _Fault(Exception):
    def __init__(self, reason: int, stage: Stage) -> None:
        self.reason, self.stage = reason, stage


class ReferenceWalker:
    """One request at a time. PWCs, if given, are paging-structure caches (``lookup_deepest``,
    ``fill``), consulted before the batch's fills and filled by ``flush_fills``."""

    def __init__(self, mem: HostMemory, haw: int, fl_pwc=None, sl_pwc=None) -> None:
        self.mem = mem
        self.haw = haw
        self.amask = address_field(haw)
        self.fl_pwc = fl_pwc
        self.sl_pwc = sl_pwc
        self.fl_fills: list[tuple[int, int, int, int, int, int]] = []
        self.sl_fills: list[tuple[int, int, int, int, int, int]] = []
        self.ad_writes = 0
        self._index = 0

    def _pwc_deepest(self, pwc, did: int, pasid: int, addr: int, levels: int):
        if pwc is None:
            return 0, 0
        lvl, entry = pwc.lookup_deepest(np.array([did], np.int64), np.array([pasid], np.int64),
                                        np.array([addr], np.uint64), np.array([levels]))
        return int(lvl[0]), int(entry[0])

    # --- stages ------------------------------------------------------------------------------
    def sl_translate(self, req: RefRequest, gpa: int, write: bool, seq: int,
                     res: RefResult) -> tuple[int, int, bool, bool]:
        """(hpa, order, r, w) of ``gpa``; raises _Fault naming stage SECOND."""
        levels = req.sl_levels
        if gpa >> SL_WIDTH_BY_LEVELS[levels]:
            raise _Fault(SM_BEYOND_MAX, Stage.SECOND)
        table, level, r, w = req.slptr, levels, True, True
        hit, entry = self._pwc_deepest(self.sl_pwc, req.did, 0, gpa, levels)
        if hit:
            table, level = entry & self.amask, hit - 1
            r, w = bool(entry & SL_R), bool(entry & SL_W)
        while True:
            ea = table + ((gpa >> (12 + 9 * (level - 1))) & 511) * 8
            res.refs += 1
            if (ea >> 12) >= self.mem.frames:
                raise _Fault(SM_SL_ACCESS, Stage.SECOND)
            e = self.mem.read_u64(ea)
            if not e & (SL_R | SL_W):
                raise _Fault(SM_SL_RW, Stage.SECOND)
            if sl_reserved(e, level, self.haw):
                raise _Fault(SM_SL_RSVD, Stage.SECOND)
            ps = bool(e & SL_PS) and level in (2, 3)
            r, w = r and bool(e & SL_R), w and bool(e & SL_W)
            if req.ssade and not e & SL_A:
                self._or(ea, SL_A)
            if level == 1 or ps:
                size = 1 << (12 + 9 * (level - 1))
                hpa = (e & self.amask & ~(size - 1)) | (gpa & (size - 1))
                if req.ssade and write and w and not e & SL_D:
                    self._or(ea, SL_D)
                if write and not w:
                    raise _Fault(SM_NO_WRITE, Stage.SECOND)
                if not write and not r:
                    raise _Fault(SM_NO_READ, Stage.SECOND)
                return hpa, level - 1, r, w
            if self.sl_pwc is not None:
                perms = (SL_R if r else 0) | (SL_W if w else 0)
                self.sl_fills.append((self._index, seq, level, req.did, gpa,
                                      (e & ~(SL_R | SL_W) & MASK64) | perms))
            table = e & self.amask
            level -= 1

    def fl_translate(self, req: RefRequest, res: RefResult, nested: bool
                     ) -> tuple[int, int, bool]:
        """(output address, order, rw) of the first-level walk; raises _Fault."""
        iova, levels = req.addr, req.fl_levels
        width = FL_WIDTH_BY_LEVELS[levels]
        top = iova >> (width - 1)
        if top not in (0, MASK64 >> (width - 1)):
            raise _Fault(SM_NON_CANONICAL, Stage.FIRST)
        write = req.access == ACCESS_WRITE
        table, level, rw, us = req.flptr, levels, True, True
        hit, entry = self._pwc_deepest(self.fl_pwc, req.did, req.pasid, iova, levels)
        if hit:
            table, level = entry & self.amask, hit - 1
            rw, us = bool(entry & FL_RW), bool(entry & FL_US)
        seq = 0
        while True:
            ea = table + ((iova >> (12 + 9 * (level - 1))) & 511) * 8
            if nested:
                ea, _o, _r, _w = self.sl_translate(req, ea, False, seq, res)
                seq += 1
            res.refs += 1
            if (ea >> 12) >= self.mem.frames:
                raise _Fault(SM_FL_ACCESS, Stage.FIRST)
            e = self.mem.read_u64(ea)
            if not e & FL_P:
                raise _Fault(SM_FL_P, Stage.FIRST)
            if fl_reserved(e, level, self.haw):
                raise _Fault(SM_FL_RSVD, Stage.FIRST)
            ps = bool(e & FL_PS) and level in (2, 3)
            rw, us = rw and bool(e & FL_RW), us and bool(e & FL_US)
            if not e & FL_A:
                self._or(ea, FL_A)
            if level == 1 or ps:
                size = 1 << (12 + 9 * (level - 1))
                out = (e & self.amask & ~(size - 1)) | (iova & (size - 1))
                if us and (not write or rw) and write and not e & FL_D:
                    self._or(ea, FL_D)
                if not us:
                    raise _Fault(SM_US, Stage.FIRST)
                if write and not rw:
                    raise _Fault(SM_NO_WRITE, Stage.FIRST)
                return out, level - 1, rw
            if self.fl_pwc is not None:
                perms = (FL_RW if rw else 0) | (FL_US if us else 0)
                self.fl_fills.append((self._index, 0, level, req.did, iova,
                                      (e & ~(FL_RW | FL_US) & MASK64) | perms, req.pasid))
            table = e & self.amask
            level -= 1

    def _or(self, ea: int, bit: int) -> None:
        self.mem.or_u64(np.array([ea], dtype=np.uint64), bit)
        self.ad_writes += 1

    # --- one request ------------------------------------------------------------------------
    def translate(self, req: RefRequest, index: int = 0) -> RefResult:
        self._index = index
        res = RefResult()
        write = req.access == ACCESS_WRITE
        try:
            if req.pgtt == PGTT_PT:
                if req.addr >> self.haw:
                    raise _Fault(SM_BEYOND_MAX, Stage.SECOND)
                res.hpa, res.perm = req.addr, 3
            elif req.pgtt == PGTT_SL_ONLY:
                hpa, order, r, w = self.sl_translate(req, req.addr, write, 0, res)
                res.hpa, res.order, res.perm = hpa, order, int(r) | (int(w) << 1)
            elif req.pgtt == PGTT_FL_ONLY:
                out, order, rw = self.fl_translate(req, res, False)
                res.hpa, res.order, res.perm = out, order, 1 | (int(rw) << 1)
            elif req.pgtt == PGTT_NESTED:
                gpa, forder, rw = self.fl_translate(req, res, True)
                hpa, sorder, r, w = self.sl_translate(req, gpa, write, 5, res)
                res.hpa, res.order = hpa, min(forder, sorder)
                res.perm = int(r) | (int(w and rw) << 1)
            else:
                raise _Fault(SM_PASID_ENTRY_INV, Stage.CONTEXT)
        except _Fault as f:
            res.fault, res.stage, res.hpa = int(f.reason), int(f.stage), 0
        return res

    def flush_fills(self) -> None:
        """Apply the batch's PWC fills in (request, walk order, level top-down) order."""
        if self.fl_pwc is not None and self.fl_fills:
            fills = sorted(self.fl_fills, key=lambda f: (f[0], f[1], -f[2]))
            self.fl_pwc.fill(np.array([f[3] for f in fills], np.int64),
                             np.array([f[6] for f in fills], np.int64),
                             np.array([f[4] for f in fills], np.uint64),
                             np.array([f[2] for f in fills], np.int64),
                             np.array([f[5] for f in fills], np.uint64))
        if self.sl_pwc is not None and self.sl_fills:
            fills = sorted(self.sl_fills, key=lambda f: (f[0], f[1], -f[2]))
            self.sl_pwc.fill(np.array([f[3] for f in fills], np.int64),
                             np.zeros(len(fills), np.int64),
                             np.array([f[4] for f in fills], np.uint64),
                             np.array([f[2] for f in fills], np.int64),
                             np.array([f[5] for f in fills], np.uint64))
        self.fl_fills.clear()
        self.sl_fills.clear()

