"""Reference model: the walker's semantics one request at a time, in plain Python.

Small and obviously correct, kept beside the batch walker (host_iommu/walk.py) so tests can
compare the two on random and adversarial inputs. It follows the VT-d spec chapter 3 text
literally (3.6 first level, 3.7 second level, 3.8 nested) and reads memory through
``HostMemory.read_u64``. Paging-structure caches, when given, are looked up before any fill of
the batch and filled afterwards in request order, walk order, level top-down: the batch
semantics documented in walk.py.
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
    FaultReason,
    Stage,
)
from host_iommu.memory import HostMemory
from host_iommu.pgtable import (
    FL_A,
    FL_D,
    FL_P,
    FL_PS,
    FL_RW,
    FL_US,
    SL_A,
    SL_D,
    SL_PS,
    SL_R,
    SL_W,
    addr_mask,
    fl_reserved_masks,
    sl_reserved_masks,
)

MASK64 = (1 << 64) - 1


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
    def __init__(self, reason: FaultReason, stage: Stage) -> None:
        self.reason, self.stage = reason, stage


class ReferenceWalker:
    """One request at a time. PWCs, if given, are paging-structure caches (``lookup_deepest``,
    ``fill``), consulted before the batch's fills and filled by ``flush_fills``."""

    def __init__(self, mem: HostMemory, haw: int, fl_pwc=None, sl_pwc=None) -> None:
        self.mem = mem
        self.haw = haw
        self.amask = addr_mask(haw)
        self.fl_rsvd = fl_reserved_masks(haw)
        self.sl_rsvd = sl_reserved_masks(haw)
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
            raise _Fault(FaultReason.ADDR_BEYOND_MGAW, Stage.SECOND)
        table, level, r, w = req.slptr, levels, True, True
        hit, entry = self._pwc_deepest(self.sl_pwc, req.did, 0, gpa, levels)
        if hit:
            table, level = entry & self.amask, hit - 1
            r, w = bool(entry & SL_R), bool(entry & SL_W)
        while True:
            ea = table + ((gpa >> (12 + 9 * (level - 1))) & 511) * 8
            res.refs += 1
            if (ea >> 12) >= self.mem.frames:
                raise _Fault(FaultReason.PAGING_ENTRY_INV, Stage.SECOND)
            e = self.mem.read_u64(ea)
            if not e & (SL_R | SL_W):
                raise _Fault(FaultReason.PAGING_ENTRY_INV, Stage.SECOND)
            ps = bool(e & SL_PS) and level in (2, 3)
            if e & int(self.sl_rsvd[level, int(ps)]):
                raise _Fault(FaultReason.PAGING_ENTRY_RSVD, Stage.SECOND)
            r, w = r and bool(e & SL_R), w and bool(e & SL_W)
            if req.ssade and not e & SL_A:
                self._or(ea, SL_A)
            if level == 1 or ps:
                size = 1 << (12 + 9 * (level - 1))
                hpa = (e & self.amask & ~(size - 1)) | (gpa & (size - 1))
                if req.ssade and write and w and not e & SL_D:
                    self._or(ea, SL_D)
                if write and not w:
                    raise _Fault(FaultReason.WRITE, Stage.SECOND)
                if not write and not r:
                    raise _Fault(FaultReason.READ, Stage.SECOND)
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
            raise _Fault(FaultReason.FS_NON_CANONICAL, Stage.FIRST)
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
                raise _Fault(FaultReason.FS_PAGING_ENTRY_INV, Stage.FIRST)
            e = self.mem.read_u64(ea)
            if not e & FL_P:
                raise _Fault(FaultReason.FS_PAGING_ENTRY_P, Stage.FIRST)
            ps_bit = bool(e & FL_PS)
            ps = ps_bit and level in (2, 3)
            col = int(ps_bit) if level >= 4 else int(ps)
            if e & int(self.fl_rsvd[level, col]):
                raise _Fault(FaultReason.FS_PAGING_ENTRY_RSVD, Stage.FIRST)
            rw, us = rw and bool(e & FL_RW), us and bool(e & FL_US)
            if not e & FL_A:
                self._or(ea, FL_A)
            if level == 1 or ps:
                size = 1 << (12 + 9 * (level - 1))
                out = (e & self.amask & ~(size - 1)) | (iova & (size - 1))
                if us and (not write or rw) and write and not e & FL_D:
                    self._or(ea, FL_D)
                if not us:
                    raise _Fault(FaultReason.FS_PAGING_ENTRY_US, Stage.FIRST)
                if write and not rw:
                    raise _Fault(FaultReason.SM_WRITE, Stage.FIRST)
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
                    raise _Fault(FaultReason.ADDR_BEYOND_MGAW, Stage.SECOND)
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
                raise _Fault(FaultReason.PASID_TABLE_ENTRY_INV, Stage.CONTEXT)
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

