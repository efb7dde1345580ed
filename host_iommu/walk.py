"""The batch page walker: first-level, second-level, nested (2-D) and pass-through walks.

Follows the VT-d spec rev. 3.x chapter 3 (3.6 first-level translation, 3.7 second-level
translation, 3.8 nested translation) and QEMU's vtd_iova_to_flpte / vtd_iova_to_slpte.
Every request of a batch is walked at once with numpy: one gather per paging level for all
requests still walking. Under nesting every first-level table pointer and the final GPA go
through a second-level walk, so a cold 4-level/4-level walk reads (4+1)*(4+1)-1 = 24 entries.

Counting: ``walk_refs`` counts page-table entry reads of both stages (root, context and PASID
structure fetches are counted by the caller as ``ctx_refs``). A/D updates are writes, counted
in ``ad_writes``, not references.

Paging-structure caches (optional) are looked up as they were when the batch started (the
requests of a batch are in flight together and do not see each other's fills); each walk's
non-leaf entries are then filled in request order, then walk order, then level (top down).
A cached entry carries the permissions accumulated down to it, as x86 PWCs do.
``host_iommu/reference.py`` implements the same semantics one request at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from host_iommu.defs import (
    ACCESS_WRITE,
    FL_WIDTH_BY_LEVELS,
    PAGE_SHIFT,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
    FaultReason,
    Stage,
)
from host_iommu.kernels.iotlb import LINE_FIELDS
from host_iommu.kernels.pwc import PwcArrays
from host_iommu.kernels.walk import walk_batch
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

U64 = np.uint64
NO_PWC = (np.zeros((len(LINE_FIELDS), 0, 1), dtype=np.uint64), np.zeros(6, dtype=np.int64))


def _c(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as a contiguous array of ``dtype`` (a kernel argument)."""
    return np.ascontiguousarray(a, dtype=dtype)
_SHIFT = {lvl: np.uint64(PAGE_SHIFT + 9 * (lvl - 1)) for lvl in range(1, 7)}
_NINE = np.uint64(511)
_EIGHT = np.uint64(8)
SL_WIDTH_OF_LEVELS = np.array([0, 0, 0, 39, 48, 57], dtype=np.uint64)
FL_WIDTH_OF_LEVELS = np.array([0, 0, 0, 0, FL_WIDTH_BY_LEVELS[4], FL_WIDTH_BY_LEVELS[5]],
                              dtype=np.uint64)
# Permission bits a PWC entry carries (the AND of the path down to it).
FL_PERM_BITS = FL_RW | FL_US
SL_PERM_BITS = SL_R | SL_W


@dataclass
class PwcFills:
    """Non-leaf entries read by walks of a batch, to fill a paging-structure cache later."""

    req: list[np.ndarray] = field(default_factory=list)    # request index
    seq: list[np.ndarray] = field(default_factory=list)    # walk order within the request
    level: list[np.ndarray] = field(default_factory=list)
    addr: list[np.ndarray] = field(default_factory=list)   # the walk's input address
    value: list[np.ndarray] = field(default_factory=list)  # entry with accumulated perms

    def add(self, req: np.ndarray, seq: int, level: int, addr: np.ndarray,
            value: np.ndarray) -> None:
        if req.size:
            self.req.append(req)
            self.seq.append(np.full(req.size, seq, dtype=np.int64))
            self.level.append(np.full(req.size, level, dtype=np.int64))
            self.addr.append(addr)
            self.value.append(value)

    def ordered(self) -> tuple[np.ndarray, ...] | None:
        """(req, level, addr, value) in fill order: request, walk order, level top-down."""
        if not self.req:
            return None
        req = np.concatenate(self.req)
        seq = np.concatenate(self.seq)
        level = np.concatenate(self.level)
        order = np.lexsort((-level, seq, req))
        return (req[order], level[order], np.concatenate(self.addr)[order],
                np.concatenate(self.value)[order])


@dataclass
class WalkBatch:
    """Per-request walk inputs, resolved from PASID entries (numpy arrays of equal length)."""

    addr: np.ndarray        # uint64 input address (IOVA, or GPA for second-level only)
    access: np.ndarray      # uint8 ACCESS_READ / ACCESS_WRITE
    pgtt: np.ndarray        # uint8
    did: np.ndarray         # int64
    pasid: np.ndarray       # int64
    flptr: np.ndarray       # uint64 (GPA under nesting)
    fl_levels: np.ndarray   # uint8 (4 or 5)
    slptr: np.ndarray       # uint64 HPA
    sl_levels: np.ndarray   # uint8 (3, 4 or 5)
    ssade: np.ndarray       # bool: set second-level A/D bits


@dataclass
class WalkResult:
    hpa: np.ndarray
    fault: np.ndarray       # uint8 FaultReason
    stage: np.ndarray       # uint8 Stage
    walk_refs: np.ndarray   # int64
    order: np.ndarray       # uint8 page order of the translation
    perm: np.ndarray        # uint8: bit0 read, bit1 write (effective, both stages)
    ad_writes: int = 0


class Walker:
    """Batch walker over one host's memory. Caches are optional ``PagingStructureCache``s."""

    def __init__(self, mem: HostMemory, haw: int, fl_pwc=None, sl_pwc=None) -> None:
        self.mem = mem
        self.haw = haw
        self.amask = U64(addr_mask(haw))
        self.fl_rsvd = fl_reserved_masks(haw)
        self.sl_rsvd = sl_reserved_masks(haw)
        self.fl_pwc = fl_pwc
        self.sl_pwc = sl_pwc
        self._ad = 0  # A/D writes of the walk in progress

    # --- second level ---------------------------------------------------------------------
    def sl_walk(self, ix: np.ndarray, gpa: np.ndarray, b: WalkBatch, write: np.ndarray,
                seq: int, fills: PwcFills | None):
        """Translate ``gpa`` (one per request index in ``ix``) through the second level.

        Returns (hpa, order, r, w, fault, refs) arrays aligned with ``ix``.
        """
        n = ix.size
        hpa = np.zeros(n, dtype=U64)
        order = np.zeros(n, dtype=np.uint8)
        r = np.ones(n, dtype=bool)
        w = np.ones(n, dtype=bool)
        fault = np.zeros(n, dtype=np.uint8)
        refs = np.zeros(n, dtype=np.int64)
        if n == 0:
            return hpa, order, r, w, fault, refs
        levels = b.sl_levels[ix].astype(np.int64)
        did = b.did[ix]
        beyond = (gpa >> SL_WIDTH_OF_LEVELS[levels]) != 0
        fault[beyond] = FaultReason.ADDR_BEYOND_MGAW
        table = b.slptr[ix].copy()
        start = np.where(beyond, 0, levels)
        if self.sl_pwc is not None:
            hit_lvl, entry = self.sl_pwc.lookup_deepest(did, np.zeros(n, np.int64), gpa, levels)
            hit = (hit_lvl > 0) & ~beyond
            if hit.any():
                e = np.asarray(entry, dtype=U64)[hit]
                table[hit] = e & self.amask
                start[hit] = hit_lvl[hit] - 1
                r[hit] = (e & U64(SL_R)) != 0
                w[hit] = (e & U64(SL_W)) != 0
        live = start > 0
        ssade = b.ssade[ix]
        for lvl in range(5, 0, -1):
            sel = np.flatnonzero(live & (start >= lvl))
            if sel.size == 0:
                continue
            g = gpa[sel]
            ea = table[sel] + ((g >> _SHIFT[lvl]) & _NINE) * _EIGHT
            vals, ok = self.mem.gather_u64(ea)
            refs[sel] += 1
            ps = ((vals & U64(SL_PS)) != 0) & (lvl in (2, 3))
            rsvd = (vals & self.sl_rsvd[lvl, ps.astype(np.int64)]) != 0
            present = (vals & U64(SL_R | SL_W)) != 0
            bad = ~ok | ~present
            fault[sel[~present]] = FaultReason.PAGING_ENTRY_INV       # R and W clear
            fault[sel[~ok]] = FaultReason.SL_PAGING_ENTRY_ACCESS     # entry not readable
            rbad = ~bad & rsvd
            fault[sel[rbad]] = FaultReason.PAGING_ENTRY_RSVD
            good = ~bad & ~rbad
            r[sel] &= (vals & U64(SL_R)) != 0
            w[sel] &= (vals & U64(SL_W)) != 0
            leaf = good & (ps | (lvl == 1))
            nonleaf = good & ~leaf
            if ssade.any():
                sa = ssade[sel] & good & ((vals & U64(SL_A)) == 0)
                if sa.any():
                    self.mem.or_u64(ea[sa], U64(SL_A))
                    self._ad += int(sa.sum())
            if fills is not None and nonleaf.any():
                nl = sel[nonleaf]
                perms = (r[nl].astype(U64) * U64(SL_R)) | (w[nl].astype(U64) * U64(SL_W))
                fills.add(ix[nl], seq, lvl, gpa[nl],
                          (vals[nonleaf] & ~U64(SL_PERM_BITS)) | perms)
            table[sel[nonleaf]] = vals[nonleaf] & self.amask
            if leaf.any():
                lf = sel[leaf]
                size_mask = (U64(1) << _SHIFT[lvl]) - U64(1)
                hpa[lf] = (vals[leaf] & self.amask & ~size_mask) | (gpa[lf] & size_mask)
                order[lf] = lvl - 1
                if ssade.any():
                    dirty = (ssade[lf] & write[lf] & w[lf]
                             & ((vals[leaf] & U64(SL_D)) == 0))
                    if dirty.any():
                        self.mem.or_u64(ea[leaf][dirty], U64(SL_D))
                        self._ad += int(dirty.sum())
            live[sel[~nonleaf]] = False
        perm_fault = (fault == 0) & ~beyond
        need_w = write & perm_fault & ~w
        need_r = ~write & perm_fault & ~r
        fault[need_r] = FaultReason.READ
        fault[need_w] = FaultReason.WRITE
        return hpa, order, r, w, fault, refs

    # --- first level (optionally nested) -------------------------------------------------
    def fl_walk(self, ix: np.ndarray, b: WalkBatch, nested: bool,
                fl_fills: PwcFills | None, sl_fills: PwcFills | None):
        """First-level walk for requests ``ix``; under ``nested`` table pointers are GPAs.

        Returns (out_addr, order, rw, fault, stage, refs): ``out_addr`` is a GPA when nested.
        """
        n = ix.size
        out = np.zeros(n, dtype=U64)
        order = np.zeros(n, dtype=np.uint8)
        fault = np.zeros(n, dtype=np.uint8)
        stage = np.zeros(n, dtype=np.uint8)
        refs = np.zeros(n, dtype=np.int64)
        rw = np.ones(n, dtype=bool)
        us = np.ones(n, dtype=bool)
        if n == 0:
            return out, order, rw, fault, stage, refs
        iova = b.addr[ix]
        levels = b.fl_levels[ix].astype(np.int64)
        write = b.access[ix] == ACCESS_WRITE
        width = FL_WIDTH_OF_LEVELS[levels]
        # canonical: bits 63..width-1 all equal
        top = iova >> (width - U64(1))
        canon = (top == 0) | (top == (U64(0xFFFF_FFFF_FFFF_FFFF) >> (width - U64(1))))
        fault[~canon] = FaultReason.FS_NON_CANONICAL
        stage[~canon] = Stage.FIRST
        table = b.flptr[ix].copy()
        start = np.where(canon, levels, 0)
        if self.fl_pwc is not None:
            hit_lvl, entry = self.fl_pwc.lookup_deepest(b.did[ix], b.pasid[ix], iova, levels)
            hit = (hit_lvl > 0) & canon
            if hit.any():
                e = np.asarray(entry, dtype=U64)[hit]
                table[hit] = e & self.amask
                start[hit] = hit_lvl[hit] - 1
                rw[hit] = (e & U64(FL_RW)) != 0
                us[hit] = (e & U64(FL_US)) != 0
        live = start > 0
        seq = 0
        table_reads = np.zeros(n, dtype=bool)  # table fetches are reads
        for lvl in range(5, 0, -1):
            sel = np.flatnonzero(live & (start >= lvl))
            if sel.size == 0:
                continue
            v = iova[sel]
            ea = table[sel] + ((v >> _SHIFT[lvl]) & _NINE) * _EIGHT
            if nested:
                hpa, _o, _r, _w, sfault, srefs = self.sl_walk(
                    ix[sel], ea, b, table_reads[sel], seq, sl_fills)
                seq += 1
                refs[sel] += srefs
                sf = sfault != 0
                fault[sel[sf]] = sfault[sf]
                stage[sel[sf]] = Stage.SECOND
                live[sel[sf]] = False
                keep = ~sf
                sel, ea, v = sel[keep], hpa[keep], v[keep]
                if sel.size == 0:
                    continue
            vals, ok = self.mem.gather_u64(ea)
            refs[sel] += 1
            present = (vals & U64(FL_P)) != 0
            ps = ((vals & U64(FL_PS)) != 0) & (lvl in (2, 3))
            # PS at levels 4/5 is reserved: index the [ps] column by the raw bit there.
            ps_col = np.where(lvl >= 4, (vals & U64(FL_PS)) != 0, ps).astype(np.int64)
            rsvd = (vals & self.fl_rsvd[lvl, ps_col]) != 0
            bad = ~ok
            fault[sel[bad]] = FaultReason.FS_PAGING_ENTRY_INV
            np_ = ok & ~present
            fault[sel[np_]] = FaultReason.FS_PAGING_ENTRY_P
            rbad = ok & present & rsvd
            fault[sel[rbad]] = FaultReason.FS_PAGING_ENTRY_RSVD
            good = ok & present & ~rsvd
            stage[sel[~good]] = Stage.FIRST
            rw[sel] &= (vals & U64(FL_RW)) != 0
            us[sel] &= (vals & U64(FL_US)) != 0
            leaf = good & (ps | (lvl == 1))
            nonleaf = good & ~leaf
            need_a = good & ((vals & U64(FL_A)) == 0)
            if need_a.any():
                self.mem.or_u64(ea[need_a], U64(FL_A))
                self._ad += int(need_a.sum())
            if fl_fills is not None and nonleaf.any():
                nl = sel[nonleaf]
                perms = (rw[nl].astype(U64) * U64(FL_RW)) | (us[nl].astype(U64) * U64(FL_US))
                fl_fills.add(ix[nl], 0, lvl, iova[nl],
                             (vals[nonleaf] & ~U64(FL_PERM_BITS)) | perms)
            table[sel[nonleaf]] = vals[nonleaf] & self.amask
            if leaf.any():
                lf = sel[leaf]
                size_mask = (U64(1) << _SHIFT[lvl]) - U64(1)
                out[lf] = (vals[leaf] & self.amask & ~size_mask) | (iova[lf] & size_mask)
                order[lf] = lvl - 1
                perm_ok = us[lf] & (~write[lf] | rw[lf])
                need_d = perm_ok & write[lf] & ((vals[leaf] & U64(FL_D)) == 0)
                if need_d.any():
                    self.mem.or_u64(ea[leaf][need_d], U64(FL_D))
                    self._ad += int(need_d.sum())
            live[sel[~nonleaf]] = False
        done = (fault == 0) & canon
        us_bad = done & ~us
        fault[us_bad] = FaultReason.FS_PAGING_ENTRY_US
        w_bad = done & us & write & ~rw
        fault[w_bad] = FaultReason.SM_WRITE
        stage[us_bad | w_bad] = Stage.FIRST
        return out, order, rw, fault, stage, refs

    # --- all PGTTs -------------------------------------------------------------------------
    def walk(self, b: WalkBatch, *, fill_pwc: bool = True) -> WalkResult:
        """Walk every request of ``b`` according to its PGTT; fills PWCs after the batch.

        Runs the compiled kernel (host_iommu/kernels/walk.py) when the PWCs are array state
        (or absent), else ``walk_numpy``; both implement the semantics described here.
        """
        if all(c is None or isinstance(c, PwcArrays) for c in (self.fl_pwc, self.sl_pwc)):
            return self.walk_compiled(b, fill_pwc=fill_pwc)
        return self.walk_numpy(b, fill_pwc=fill_pwc)

    def walk_compiled(self, b: WalkBatch, *, fill_pwc: bool = True) -> WalkResult:
        """``walk`` by the compiled kernel over HostMemory's slab and the PWCs' line planes."""
        n = b.addr.size
        hpa = np.zeros(n, dtype=U64)
        fault = np.zeros(n, dtype=np.uint8)
        stage = np.zeros(n, dtype=np.uint8)
        refs = np.zeros(n, dtype=np.int64)
        order = np.zeros(n, dtype=np.uint8)
        perm = np.zeros(n, dtype=np.uint8)
        if n == 0:
            return WalkResult(hpa, fault, stage, refs, order, perm, 0)
        fl, sl = self.fl_pwc, self.sl_pwc
        none = NO_PWC
        ad = walk_batch(
            self.mem.slab, self.mem.slot_of, self.haw, self.amask, self.fl_rsvd, self.sl_rsvd,
            _c(b.addr, U64), _c(b.access, np.uint8), _c(b.pgtt, np.uint8),
            _c(b.did, np.int64), _c(b.pasid, np.int64), _c(b.flptr, U64),
            _c(b.fl_levels, np.uint8), _c(b.slptr, U64), _c(b.sl_levels, np.uint8),
            _c(b.ssade, np.bool_),
            fl is not None, none[0] if fl is None else fl.state,
            none[1] if fl is None else fl.counts,
            sl is not None, none[0] if sl is None else sl.state,
            none[1] if sl is None else sl.counts,
            fill_pwc, hpa, fault, stage, refs, order, perm)
        return WalkResult(hpa, fault, stage, refs, order, perm, int(ad))

    def walk_numpy(self, b: WalkBatch, *, fill_pwc: bool = True) -> WalkResult:
        """``walk`` with numpy: one gather per level for all requests still walking."""
        n = b.addr.size
        self._ad = 0
        hpa = np.zeros(n, dtype=U64)
        fault = np.zeros(n, dtype=np.uint8)
        stage = np.zeros(n, dtype=np.uint8)
        refs = np.zeros(n, dtype=np.int64)
        order = np.zeros(n, dtype=np.uint8)
        perm = np.zeros(n, dtype=np.uint8)
        write = b.access == ACCESS_WRITE
        fl_fills = PwcFills() if (fill_pwc and self.fl_pwc is not None) else None
        sl_fills = PwcFills() if (fill_pwc and self.sl_pwc is not None) else None

        # pass-through: HPA = input, checked against the host address width
        ix = np.flatnonzero(b.pgtt == PGTT_PT)
        if ix.size:
            beyond = (b.addr[ix] >> U64(self.haw)) != 0
            hpa[ix] = b.addr[ix]
            fault[ix[beyond]] = FaultReason.ADDR_BEYOND_MGAW
            stage[ix[beyond]] = Stage.SECOND
            perm[ix] = 3

        # second level only
        ix = np.flatnonzero(b.pgtt == PGTT_SL_ONLY)
        if ix.size:
            h, o, r, w, f, rf = self.sl_walk(ix, b.addr[ix], b, write[ix], 0, sl_fills)
            hpa[ix], order[ix], fault[ix], refs[ix] = h, o, f, rf
            stage[ix[f != 0]] = Stage.SECOND
            perm[ix] = r.astype(np.uint8) | (w.astype(np.uint8) << 1)

        # first level only: table pointers are HPAs
        ix = np.flatnonzero(b.pgtt == PGTT_FL_ONLY)
        if ix.size:
            o_addr, o, rw, f, s, rf = self.fl_walk(ix, b, False, fl_fills, None)
            hpa[ix], order[ix], fault[ix], stage[ix], refs[ix] = o_addr, o, f, s, rf
            perm[ix] = 1 | (rw.astype(np.uint8) << 1)

        # nested: first level over the second level, then the final GPA
        ix = np.flatnonzero(b.pgtt == PGTT_NESTED)
        if ix.size:
            gpa, fo, rw, f, s, rf = self.fl_walk(ix, b, True, fl_fills, sl_fills)
            fault[ix], stage[ix], refs[ix] = f, s, rf
            okix = np.flatnonzero(f == 0)
            if okix.size:
                sub = ix[okix]
                h, so, r, w, sf, srf = self.sl_walk(sub, gpa[okix], b, write[sub], 5,
                                                    sl_fills)
                refs[sub] += srf
                hpa[sub] = h
                fault[sub] = sf
                stage[sub[sf != 0]] = Stage.SECOND
                order[sub] = np.minimum(fo[okix], so)
                perm[sub] = (r.astype(np.uint8)
                             | ((w & rw[okix]).astype(np.uint8) << 1))

        unknown = ~np.isin(b.pgtt, (PGTT_PT, PGTT_SL_ONLY, PGTT_FL_ONLY, PGTT_NESTED))
        fault[unknown] = FaultReason.PASID_TABLE_ENTRY_INV
        stage[unknown] = Stage.CONTEXT
        hpa[fault != 0] = 0        # a fault translates nothing: no address, no page size
        order[fault != 0] = 0

        if fl_fills is not None:
            self._fill(self.fl_pwc, fl_fills, b)
        if sl_fills is not None:
            self._fill(self.sl_pwc, sl_fills, b, pasid_zero=True)
        return WalkResult(hpa, fault, stage, refs, order, perm, self._ad)

    @staticmethod
    def _fill(pwc, fills: PwcFills, b: WalkBatch, pasid_zero: bool = False) -> None:
        got = fills.ordered()
        if got is None:
            return
        req, level, addr, value = got
        pasid = np.zeros(req.size, np.int64) if pasid_zero else b.pasid[req]
        pwc.fill(b.did[req], pasid, addr, level, value)
