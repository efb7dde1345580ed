"""The batch page walker as one numba kernel: first-level, second-level, nested and pass-through.

VT-d spec rev. 3.x chapter 3 (3.6 first-level, 3.7 second-level, 3.8 nested translation) and
QEMU vtd_iova_to_flpte / vtd_iova_to_slpte, with the batch semantics of host_iommu/walk.py
kept step for step, so results, memory (A/D bits), counters and cache state are the same:

- requests are walked level-synchronously within one call of a stage walk: at each level
  every request still walking reads its entry first, then A/D bits are set (so requests of
  one level do not see each other's A/D writes, as walk.py's one gather per level);
- the groups run in walk.py's order: pass-through, second level only, first level only,
  nested (its first level, where each table pointer goes through a second-level walk of the
  requests at that level, then the final GPA);
- every stage walk looks the paging-structure cache up once for all its requests, as
  walk.py's ``lookup_deepest`` calls (the LRU clock advances by the call's size), all
  before any fill; fills come after the batch in (request, walk order, level top-down)
  order through the PWC kernels' keyed fill (host_iommu/kernels/pwc.py).

``host_iommu/reference.py`` is the one-request-at-a-time reference it is tested against
(tests/host_iommu/test_kernel_walk.py). Bit layouts are walk.py's (host_iommu/pgtable.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.defs import (
    ACCESS_WRITE,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
    FaultReason,
    Stage,
)
from host_iommu.kernels.iotlb import C_CLOCK as PWC_CLOCK
from host_iommu.kernels.iotlb import C_HITS as PWC_HITS
from host_iommu.kernels.iotlb import C_MISSES as PWC_MISSES
from host_iommu.kernels.iotlb import F_STAMP, _fill_line
from host_iommu.kernels.pwc import _probe_deepest, _probe_find
from host_iommu.pgtable import FL_A, FL_D, FL_P, FL_PS, FL_RW, FL_US, SL_A, SL_D, SL_PS, SL_R, SL_W

# Fault reasons and stages as plain ints for the kernel.
F_ADDR_BEYOND = int(FaultReason.ADDR_BEYOND_MGAW)
F_SL_NOT_PRESENT = int(FaultReason.PAGING_ENTRY_INV)
F_SL_ACCESS = int(FaultReason.SL_PAGING_ENTRY_ACCESS)
F_SL_RSVD = int(FaultReason.PAGING_ENTRY_RSVD)
F_READ = int(FaultReason.READ)
F_WRITE = int(FaultReason.WRITE)
F_NON_CANONICAL = int(FaultReason.FS_NON_CANONICAL)
F_FL_ACCESS = int(FaultReason.FS_PAGING_ENTRY_INV)
F_FL_NOT_PRESENT = int(FaultReason.FS_PAGING_ENTRY_P)
F_FL_RSVD = int(FaultReason.FS_PAGING_ENTRY_RSVD)
F_FL_US = int(FaultReason.FS_PAGING_ENTRY_US)
F_FL_WRITE = int(FaultReason.SM_WRITE)
F_PGTT = int(FaultReason.PASID_TABLE_ENTRY_INV)
ST_CONTEXT, ST_FIRST, ST_SECOND = int(Stage.CONTEXT), int(Stage.FIRST), int(Stage.SECOND)

# Widths of the input address by levels (index = levels): walk.py's SL/FL_WIDTH_OF_LEVELS.
SL_WIDTH = np.array([0, 0, 0, 39, 48, 57], dtype=np.uint64)
FL_WIDTH = np.array([0, 0, 0, 0, 48, 57], dtype=np.uint64)
FL_PERM_BITS = FL_RW | FL_US
SL_PERM_BITS = SL_R | SL_W
# Second-level PWC fills one request can make: 6 second-level walks (5 table pointers and the
# final GPA) of at most 4 non-leaf entries each.
MAX_FILLS_PER_REQUEST = 24

# Indices of the walk's scalar context vector ``ctx`` (int64).
CX_AD, CX_NFL, CX_NSL = range(3)
# Rows of _sl_walk's per-request arrays (u64, i64, u8, bool): hpa, table, entry read, its
# address; references, levels, start level, selected; page order, fault; read and write
# permission, beyond the address width, still walking, read inside memory.
SU_HPA, SU_TABLE, SU_VAL, SU_EA = range(4)
SI_REFS, SI_LEVELS, SI_START, SI_SEL = range(4)
S8_ORDER, S8_FAULT = range(2)
SB_R, SB_W, SB_BEYOND, SB_LIVE, SB_OK = range(5)
# Rows of _fl_walk's: output address, IOVA, table, entry read, its address, the table
# pointers' GPAs for the nested second-level walks; references, levels, start level,
# selected, their batch requests; page order, fault, stage; read-write and user
# permission, a write, canonical, still walking, read inside memory, all False (reads).
FU_OUT, FU_IOVA, FU_TABLE, FU_VAL, FU_EA, FU_SGPA = range(6)
FI_REFS, FI_LEVELS, FI_START, FI_SEL, FI_SUB = range(5)
F8_ORDER, F8_FAULT, F8_STAGE = range(3)
FB_RW, FB_US, FB_WRITE, FB_CANON, FB_LIVE, FB_OK, FB_READS = range(7)


@njit(cache=True, inline="always")
def _read(slab, slot_of, ea):
    """(entry, inside memory): HostMemory.gather_u64 of one address."""
    frame = ea >> np.uint64(12)
    if frame >= np.uint64(slot_of.shape[0]):
        return np.uint64(0), False
    slot = slot_of[np.int64(frame)]
    if slot < 0:
        return np.uint64(0), True
    return slab[slot, np.int64((ea >> np.uint64(3)) & np.uint64(511))], True


@njit(cache=True, inline="always")
def _or(slab, slot_of, ea, bit):
    """HostMemory.or_u64 of one address: frames beyond memory or without a table skipped."""
    frame = ea >> np.uint64(12)
    if frame < np.uint64(slot_of.shape[0]):
        slot = slot_of[np.int64(frame)]
        if slot >= 0:
            idx = np.int64((ea >> np.uint64(3)) & np.uint64(511))
            slab[slot, idx] = slab[slot, idx] | np.uint64(bit)


@njit(cache=True)
def _sl_walk(slab, slot_of, amask, sl_rsvd, ix, gpa, write, seq, did, sl_levels, slptr, ssade,
             use_pwc, pwc, pwc_counts, fill_pwc, fills, ctx):
    """Second-level walk of ``gpa[k]`` for batch requests ``ix[k]`` (walk.py Walker.sl_walk).

    slab: uint64[slots, 512] and slot_of: int32[frames] (HostMemory); amask: the entries'
    address field; sl_rsvd: uint64[6, 2] reserved bits by (level, PS); ix: int64[m]; gpa:
    uint64[m]; write: bool[m]; seq: walk order of this call within a request (PWC fills);
    did, sl_levels, slptr, ssade: per batch request; pwc, pwc_counts: the second-level PWC
    (use_pwc); fills: int64/uint64 rows (req, seq, level, addr, value) appended at ctx[CX_NSL].
    Returns (u64, u8, b, i64): per k, u64[SU_HPA], u8[S8_ORDER], b[SB_R], b[SB_W],
    u8[S8_FAULT], i64[SI_REFS] are its hpa, order, read and write permission, fault, refs.
    """
    n = ix.shape[0]
    # per-request state in one array per dtype, indexed in place (no row views: each view
    # costs an atomic reference count update, most of a short walk's time): rows
    # SU_* of u64, SI_* of i64, S8_* of u8, SB_* of b
    u64 = np.zeros((4, n), np.uint64)
    i64 = np.zeros((4, n), np.int64)
    u8 = np.zeros((2, n), np.uint8)
    b = np.zeros((5, n), np.bool_)
    for k in range(n):
        b[SB_R, k] = True
        b[SB_W, k] = True
    if n == 0:
        return u64, u8, b, i64
    for k in range(n):
        i = ix[k]
        i64[SI_LEVELS, k] = sl_levels[i]
        b[SB_BEYOND, k] = (gpa[k] >> SL_WIDTH[i64[SI_LEVELS, k]]) != np.uint64(0)
        if b[SB_BEYOND, k]:
            u8[S8_FAULT, k] = F_ADDR_BEYOND
        u64[SU_TABLE, k] = slptr[i]
        i64[SI_START, k] = 0 if b[SB_BEYOND, k] else i64[SI_LEVELS, k]
    if use_pwc:
        clock = pwc_counts[PWC_CLOCK]
        hits = 0
        for k in range(n):
            lv, e = _probe_deepest(pwc, np.uint64(did[ix[k]]), np.uint64(0), gpa[k],
                                   np.uint64(i64[SI_LEVELS, k]), clock + k)
            if lv > 0:
                hits += 1
                if not b[SB_BEYOND, k]:
                    u64[SU_TABLE, k] = e & amask
                    i64[SI_START, k] = lv - 1
                    b[SB_R, k] = (e & np.uint64(SL_R)) != 0
                    b[SB_W, k] = (e & np.uint64(SL_W)) != 0
        pwc_counts[PWC_HITS] += hits
        pwc_counts[PWC_MISSES] += n - hits
        pwc_counts[PWC_CLOCK] = clock + n
    for k in range(n):
        b[SB_LIVE, k] = i64[SI_START, k] > 0
    for lvl in range(5, 0, -1):
        m = 0
        for k in range(n):
            if b[SB_LIVE, k] and i64[SI_START, k] >= lvl:
                i64[SI_SEL, m] = k
                m += 1
        if m == 0:
            continue
        shift = np.uint64(12 + 9 * (lvl - 1))
        for j in range(m):           # every read of the level before any A/D write
            k = i64[SI_SEL, j]
            u64[SU_EA, j] = u64[SU_TABLE, k] + ((gpa[k] >> shift) & np.uint64(511)) * np.uint64(8)
            u64[SU_VAL, j], b[SB_OK, j] = _read(slab, slot_of, u64[SU_EA, j])
            i64[SI_REFS, k] += 1
        for j in range(m):
            k = i64[SI_SEL, j]
            v = u64[SU_VAL, j]
            ok = b[SB_OK, j]
            ps = ((v & np.uint64(SL_PS)) != 0) and (lvl == 2 or lvl == 3)
            rsvd = (v & sl_rsvd[lvl, 1 if ps else 0]) != 0
            present = (v & np.uint64(SL_R | SL_W)) != 0
            if not present:
                u8[S8_FAULT, k] = F_SL_NOT_PRESENT
            if not ok:
                u8[S8_FAULT, k] = F_SL_ACCESS
            bad = (not ok) or (not present)
            if not bad and rsvd:
                u8[S8_FAULT, k] = F_SL_RSVD
            good = not bad and not rsvd
            b[SB_R, k] = b[SB_R, k] and (v & np.uint64(SL_R)) != 0
            b[SB_W, k] = b[SB_W, k] and (v & np.uint64(SL_W)) != 0
            leaf = good and (ps or lvl == 1)
            nonleaf = good and not leaf
            i = ix[k]
            if ssade[i] and good and (v & np.uint64(SL_A)) == 0:
                _or(slab, slot_of, u64[SU_EA, j], SL_A)
                ctx[CX_AD] += 1
            if fill_pwc and nonleaf:
                perms = (np.uint64(SL_R) if b[SB_R, k] else np.uint64(0)) | (
                    np.uint64(SL_W) if b[SB_W, k] else np.uint64(0))
                f = ctx[CX_NSL]
                fills[0, f] = i
                fills[1, f] = seq
                fills[2, f] = lvl
                fills[3, f] = np.int64(gpa[k])
                fills[4, f] = np.int64((v & ~np.uint64(SL_PERM_BITS)) | perms)
                ctx[CX_NSL] = f + 1
            if nonleaf:
                u64[SU_TABLE, k] = v & amask
            if leaf:
                size_mask = (np.uint64(1) << shift) - np.uint64(1)
                u64[SU_HPA, k] = (v & amask & ~size_mask) | (gpa[k] & size_mask)
                u8[S8_ORDER, k] = lvl - 1
                if ssade[i] and write[k] and b[SB_W, k] and (v & np.uint64(SL_D)) == 0:
                    _or(slab, slot_of, u64[SU_EA, j], SL_D)
                    ctx[CX_AD] += 1
            if not nonleaf:
                b[SB_LIVE, k] = False
    for k in range(n):
        if u8[S8_FAULT, k] == 0 and not b[SB_BEYOND, k]:
            if write[k] and not b[SB_W, k]:
                u8[S8_FAULT, k] = F_WRITE
            elif not write[k] and not b[SB_R, k]:
                u8[S8_FAULT, k] = F_READ
    return u64, u8, b, i64


@njit(cache=True)
def _fl_walk(slab, slot_of, amask, fl_rsvd, sl_rsvd, ix, nested, addr, access, did, pasid,
             flptr, fl_levels, sl_levels, slptr, ssade, use_fl, fl_pwc, fl_counts, use_sl,
             sl_pwc, sl_counts, fill_pwc, fl_fills, sl_fills, ctx):
    """First-level walk of batch requests ``ix`` (walk.py Walker.fl_walk); under ``nested``
    every table pointer is a GPA walked through the second level first.

    Arguments as _sl_walk's, plus addr, access, pasid, flptr, fl_levels per batch request and
    the first-level PWC (use_fl, fl_pwc, fl_counts, fills at ctx[CX_NFL]).
    Returns (out_addr, order, rw, fault, stage, refs) per k; out_addr is a GPA when nested.
    """
    n = ix.shape[0]
    # per-request state in one array per dtype, indexed in place (rows FU_*, FI_*, F8_*,
    # FB_*; no row views, as in _sl_walk)
    u64 = np.zeros((6, n), np.uint64)
    i64 = np.zeros((5, n), np.int64)
    u8 = np.zeros((3, n), np.uint8)
    b = np.zeros((7, n), np.bool_)
    for k in range(n):
        b[FB_RW, k] = True
        b[FB_US, k] = True
    if n == 0:
        return (u64[FU_OUT], u8[F8_ORDER], b[FB_RW], u8[F8_FAULT], u8[F8_STAGE],
            i64[FI_REFS])
    ones = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    for k in range(n):
        i = ix[k]
        u64[FU_IOVA, k] = addr[i]
        i64[FI_LEVELS, k] = fl_levels[i]
        b[FB_WRITE, k] = access[i] == ACCESS_WRITE
        sh = FL_WIDTH[i64[FI_LEVELS, k]] - np.uint64(1)
        top = u64[FU_IOVA, k] >> sh
        b[FB_CANON, k] = top == 0 or top == (ones >> sh)
        if not b[FB_CANON, k]:
            u8[F8_FAULT, k] = F_NON_CANONICAL
            u8[F8_STAGE, k] = ST_FIRST
        u64[FU_TABLE, k] = flptr[i]
        i64[FI_START, k] = i64[FI_LEVELS, k] if b[FB_CANON, k] else 0
    if use_fl:
        clock = fl_counts[PWC_CLOCK]
        hits = 0
        for k in range(n):
            lv, e = _probe_deepest(fl_pwc, np.uint64(did[ix[k]]), np.uint64(pasid[ix[k]]),
                                   u64[FU_IOVA, k], np.uint64(i64[FI_LEVELS, k]), clock + k)
            if lv > 0:
                hits += 1
                if b[FB_CANON, k]:
                    u64[FU_TABLE, k] = e & amask
                    i64[FI_START, k] = lv - 1
                    b[FB_RW, k] = (e & np.uint64(FL_RW)) != 0
                    b[FB_US, k] = (e & np.uint64(FL_US)) != 0
        fl_counts[PWC_HITS] += hits
        fl_counts[PWC_MISSES] += n - hits
        fl_counts[PWC_CLOCK] = clock + n
    for k in range(n):
        b[FB_LIVE, k] = i64[FI_START, k] > 0
    seq = np.int64(0)   # walk order of the second-level walks (not a literal: see __init__)
    for lvl in range(5, 0, -1):
        m = 0
        for k in range(n):
            if b[FB_LIVE, k] and i64[FI_START, k] >= lvl:
                i64[FI_SEL, m] = k
                m += 1
        if m == 0:
            continue
        shift = np.uint64(12 + 9 * (lvl - 1))
        for j in range(m):
            k = i64[FI_SEL, j]
            u64[FU_EA, j] = u64[FU_TABLE, k] + (
                (u64[FU_IOVA, k] >> shift) & np.uint64(511)) * np.uint64(8)
        if nested:
            # the table pointers' GPAs of this level, through the second level (table reads)
            for j in range(m):
                i64[FI_SUB, j] = ix[i64[FI_SEL, j]]
                u64[FU_SGPA, j] = u64[FU_EA, j]
            su, s8, _sb, si = _sl_walk(
                slab, slot_of, amask, sl_rsvd, i64[FI_SUB, :m], u64[FU_SGPA, :m],
                b[FB_READS, :m], seq, did, sl_levels, slptr, ssade, use_sl, sl_pwc, sl_counts,
                fill_pwc, sl_fills, ctx)
            seq += 1
            kept = 0
            for j in range(m):
                k = i64[FI_SEL, j]
                i64[FI_REFS, k] += si[SI_REFS, j]
                if s8[S8_FAULT, j] != 0:
                    u8[F8_FAULT, k] = s8[S8_FAULT, j]
                    u8[F8_STAGE, k] = ST_SECOND
                    b[FB_LIVE, k] = False
                else:
                    i64[FI_SEL, kept] = k
                    u64[FU_EA, kept] = su[SU_HPA, j]
                    kept += 1
            m = kept
            if m == 0:
                continue
        for j in range(m):           # every read of the level before any A/D write
            u64[FU_VAL, j], b[FB_OK, j] = _read(slab, slot_of, u64[FU_EA, j])
            i64[FI_REFS, i64[FI_SEL, j]] += 1
        for j in range(m):
            k = i64[FI_SEL, j]
            v = u64[FU_VAL, j]
            ok = b[FB_OK, j]
            present = (v & np.uint64(FL_P)) != 0
            ps_bit = (v & np.uint64(FL_PS)) != 0
            ps = ps_bit and (lvl == 2 or lvl == 3)
            # PS at levels 4/5 is reserved: the [ps] column is indexed by the raw bit there
            ps_col = ps_bit if lvl >= 4 else ps
            rsvd = (v & fl_rsvd[lvl, 1 if ps_col else 0]) != 0
            if not ok:
                u8[F8_FAULT, k] = F_FL_ACCESS
            elif not present:
                u8[F8_FAULT, k] = F_FL_NOT_PRESENT
            elif rsvd:
                u8[F8_FAULT, k] = F_FL_RSVD
            good = ok and present and not rsvd
            if not good:
                u8[F8_STAGE, k] = ST_FIRST
            b[FB_RW, k] = b[FB_RW, k] and (v & np.uint64(FL_RW)) != 0
            b[FB_US, k] = b[FB_US, k] and (v & np.uint64(FL_US)) != 0
            leaf = good and (ps or lvl == 1)
            nonleaf = good and not leaf
            if good and (v & np.uint64(FL_A)) == 0:
                _or(slab, slot_of, u64[FU_EA, j], FL_A)
                ctx[CX_AD] += 1
            if fill_pwc and nonleaf:
                perms = (np.uint64(FL_RW) if b[FB_RW, k] else np.uint64(0)) | (
                    np.uint64(FL_US) if b[FB_US, k] else np.uint64(0))
                f = ctx[CX_NFL]
                fl_fills[0, f] = ix[k]
                fl_fills[1, f] = 0
                fl_fills[2, f] = lvl
                fl_fills[3, f] = np.int64(u64[FU_IOVA, k])
                fl_fills[4, f] = np.int64((v & ~np.uint64(FL_PERM_BITS)) | perms)
                ctx[CX_NFL] = f + 1
            if nonleaf:
                u64[FU_TABLE, k] = v & amask
            if leaf:
                size_mask = (np.uint64(1) << shift) - np.uint64(1)
                u64[FU_OUT, k] = (v & amask & ~size_mask) | (u64[FU_IOVA, k] & size_mask)
                u8[F8_ORDER, k] = lvl - 1
                perm_ok = b[FB_US, k] and ((not b[FB_WRITE, k]) or b[FB_RW, k])
                if perm_ok and b[FB_WRITE, k] and (v & np.uint64(FL_D)) == 0:
                    _or(slab, slot_of, u64[FU_EA, j], FL_D)
                    ctx[CX_AD] += 1
            if not nonleaf:
                b[FB_LIVE, k] = False
    for k in range(n):
        if u8[F8_FAULT, k] == 0 and b[FB_CANON, k]:
            if not b[FB_US, k]:
                u8[F8_FAULT, k] = F_FL_US
                u8[F8_STAGE, k] = ST_FIRST
            elif b[FB_WRITE, k] and not b[FB_RW, k]:
                u8[F8_FAULT, k] = F_FL_WRITE
                u8[F8_STAGE, k] = ST_FIRST
    return (u64[FU_OUT], u8[F8_ORDER], b[FB_RW], u8[F8_FAULT], u8[F8_STAGE],
            i64[FI_REFS])


@njit(cache=True)
def _pwc_fill(pwc, counts, fills, nf, did, pasid, pasid0):
    """Fill a PWC with ``fills[:, :nf]`` in (request, walk order, level top-down) order
    (walk.py PwcFills.ordered, then PwcArrays.fill: iotlb.py _fill_keyed, one line at a
    time); did, pasid: per batch request (pasid0: PASID 0 for every line, the second
    level's tag)."""
    if nf == 0:
        return
    key = np.empty((2, nf), np.int64)
    for f in range(nf):     # a stable insertion sort: fills come nearly ordered, few
        kf = (fills[0, f] * 64 + fills[1, f]) * 8 + (7 - fills[2, f])
        j = f
        while j > 0 and key[0, j - 1] > kf:
            key[0, j] = key[0, j - 1]
            key[1, j] = key[1, j - 1]
            j -= 1
        key[0, j] = kf
        key[1, j] = f
    clock = counts[PWC_CLOCK]
    zero = np.uint64(0)
    for j in range(nf):
        f = key[1, j]
        req = fills[0, f]
        lv = np.uint64(fills[2, f])
        tag = np.uint64(fills[3, f]) >> (np.uint64(12) + np.uint64(9) * (lv - np.uint64(1)))
        _fill_line(pwc, counts, np.uint64(did[req]), zero if pasid0 else np.uint64(pasid[req]),
                   tag, lv, np.uint64(fills[4, f]), zero, zero, clock + j)
    counts[PWC_CLOCK] = clock + nf


# --- Depth-first path --------------------------------------------------------------------------
# The level-synchronous walks above reproduce walk.py's batch semantics in full; they matter
# only where a walk writes memory (A/D bits): a write is seen by the next level's reads of the
# batch but not by its own level's. A batch that sets no A/D bit reads memory that does not
# change, so its requests can be walked one after the other, each to its leaf (about one pass
# over each request's state instead of one per level and stage), with the same reads. The
# paging-structure caches come out the same too: look-ups see the caches as they were at the
# batch's start either way (fills come after it); each hit is recorded with its call (the
# first level's one look-up, or the second-level walk a nested level or the final GPA makes,
# in the level-synchronous order) and rank within it, and stamped after the batch in that
# order, from the clock each call would have started at. Fills are keyed by (request, walk,
# level) and sorted, as before. The first entry that needs an A/D write stops the attempt
# before anything is written: the group is then walked level-synchronously from the start.
DF_CALLS = 6    # second-level calls of one nested group: first-level levels 5..1, final GPA
DF_FINAL = 5
# The nested depth-first walk's memo of table-page walks (direct-mapped, per batch): a nested
# walk translates each first-level table pointer through the second level, and the requests
# of a batch share most table pages. With memory unchanged during the batch and the PWCs'
# look-ups seeing their state at its start, the walk of one page (key: page, SLPTR, DID,
# levels, SSADE) has one outcome: references, fault, permissions, leaf, the PWC hit (its
# line) and the fills. A later walk of that page replays it for its own request and call:
# the same counts, stamps, fills and results as walking it again, without the reads.
MEMO_BITS = 9
MEMO_SHIFT = np.uint64(64 - MEMO_BITS)
MEMO_MIX = np.uint64(0x9E3779B97F4A7C15)
MEMO_MIN_BATCH = 16     # smaller groups walk without it (a memo costs a 4-KiB clear)
(M_PAGE, M_SLPTR, M_CTX, M_BASE, M_MASK, M_ORDER, M_R, M_W, M_FAULT, M_REFS, M_LINE, M_NFILL,
 M_FILL) = range(13)
M_FIELDS = M_FILL + 8   # fill levels, then fill values (at most 4 non-leaf entries each)


@njit(cache=True)
def _group_df(slab, slot_of, amask, fl_rsvd, sl_rsvd, ix, kind, addr, access, did, pasid,
              flptr, fl_levels, sl_levels, slptr, ssade, use_fl, fl_pwc, fl_counts, use_sl,
              sl_pwc, sl_counts, fill_fl, fill_sl, fl_fills, sl_fills, ctx, hpa, fault, stage,
              refs, order, perm):
    """Walk one PGTT group (requests ``ix``; kind: PGTT_SL_ONLY, PGTT_FL_ONLY or
    PGTT_NESTED) depth-first, with walk_batch's arguments and outputs; returns False, having
    changed nothing (outputs of ``ix`` zero again), when some entry needs an A/D write.

    Each request runs _fl_walk's steps for its first level (when the group has one) and
    _sl_walk's for each second-level walk: the table pointer of each nested level, then the
    final GPA (or the input address of the second-level-only group). The second-level walk is
    written once, at the top of the loop over a request's steps (the kernel calls no helper
    that takes arrays: each such call costs reference count updates)."""
    n = ix.shape[0]
    nested = kind == PGTT_NESTED
    first = kind != PGTT_SL_ONLY
    second = kind != PGTT_FL_ONLY
    nfl = ctx[CX_NFL]
    nsl = ctx[CX_NSL]
    fl_rec = np.empty((2, n if (use_fl and first) else 0), np.int64)   # line, stamp
    sl_rec = np.empty((3, (n * DF_CALLS if nested else n) if use_sl else 0), np.int64)
    cnt = np.zeros(DF_CALLS, np.int64)      # requests of each second-level call
    use_memo = nested and n >= MEMO_MIN_BATCH
    memo = np.empty((M_FIELDS, (1 << MEMO_BITS) if use_memo else 0), np.int64)
    for t in range(memo.shape[1]):
        memo[M_PAGE, t] = 0                 # page + 1: 0 is an empty slot
    nfr = 0
    nsr = 0
    fl_hits = 0
    sl_hits = 0
    fl_clock = fl_counts[PWC_CLOCK]
    fl_ways = fl_pwc.shape[2]
    sl_ways = sl_pwc.shape[2]
    ones = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    zero = np.uint64(0)
    nine = np.uint64(511)
    eight = np.uint64(8)
    ad = False
    k = 0
    while k < n:
        i = ix[k]
        wr = access[i] == ACCESS_WRITE
        # first-level state (_fl_walk's rows for this request)
        f = 0
        stg = 0
        rf = 0
        rw = True
        us = True
        canon = True
        out = zero
        fo = 0
        table = zero
        iova = addr[i]
        lvl = 0
        if first:
            levels = np.int64(fl_levels[i])
            sh = FL_WIDTH[levels] - np.uint64(1)
            top = iova >> sh
            canon = top == 0 or top == (ones >> sh)
            if not canon:
                f = F_NON_CANONICAL
                stg = ST_FIRST
            table = flptr[i]
            lvl = levels if canon else 0
            if use_fl:
                lv, e, s, way = _probe_find(fl_pwc, np.uint64(did[i]), np.uint64(pasid[i]),
                                            iova, np.uint64(levels))
                if lv > 0:
                    fl_hits += 1
                    fl_rec[0, nfr] = s * fl_ways + way
                    fl_rec[1, nfr] = fl_clock + k
                    nfr += 1
                    if canon:
                        table = e & amask
                        lvl = lv - 1
                        rw = (e & np.uint64(FL_RW)) != 0
                        us = (e & np.uint64(FL_US)) != 0
        else:
            out = iova          # the second-level walk of the input address
        # second-level walk results (_sl_walk's rows), of the last such walk
        s_hpa = zero
        s_order = 0
        s_r = True
        s_w = True
        s_fault = 0
        s_refs = 0
        final = False
        ea = zero
        while True:
            if lvl > 0:
                shift = np.uint64(12 + 9 * (lvl - 1))
                ea = table + ((iova >> shift) & nine) * eight
            elif first:     # the first level is done: its permission checks
                if f == 0 and canon:
                    if not us:
                        f = F_FL_US
                        stg = ST_FIRST
                    elif wr and not rw:
                        f = F_FL_WRITE
                        stg = ST_FIRST
                if not nested or f != 0:
                    break
            if second:
                # one second-level walk: of a nested level's table pointer (a read), or of
                # the final GPA (or input address) with the request's access
                final = lvl == 0
                gpa = out if final else ea
                swr = wr if final else False
                c = (DF_FINAL if nested else 0) if final else DF_FINAL - lvl
                j = cnt[c]
                cnt[c] = j + 1
                mh = -1
                hit_memo = False
                page = zero
                ck = 0
                if use_memo and not final:
                    # a table page's walk seen before in this batch: its outcome again
                    page = gpa >> np.uint64(12)
                    ck = (did[i] << 8) | (np.int64(sl_levels[i]) << 1) | (
                        1 if ssade[i] else 0)
                    mh = np.int64(((page ^ (slptr[i] >> np.uint64(12))) * MEMO_MIX)
                                   >> MEMO_SHIFT)
                    if (memo[M_PAGE, mh] == np.int64(page) + 1
                            and memo[M_SLPTR, mh] == np.int64(slptr[i])
                            and memo[M_CTX, mh] == ck):
                        hit_memo = True
                        mi = mh
                        mh = -1
                        s_line = memo[M_LINE, mi]
                        if s_line >= 0:
                            sl_hits += 1
                            sl_rec[0, nsr] = s_line
                            sl_rec[1, nsr] = c
                            sl_rec[2, nsr] = j
                            nsr += 1
                        if fill_sl:
                            for q in range(memo[M_NFILL, mi]):
                                sl_fills[0, nsl] = i
                                sl_fills[1, nsl] = c
                                sl_fills[2, nsl] = memo[M_FILL + q, mi]
                                sl_fills[3, nsl] = np.int64(gpa)
                                sl_fills[4, nsl] = memo[M_FILL + 4 + q, mi]
                                nsl += 1
                        s_hpa = np.uint64(memo[M_BASE, mi]) | (
                            gpa & np.uint64(memo[M_MASK, mi]))
                        s_order = memo[M_ORDER, mi]
                        s_r = memo[M_R, mi] != 0
                        s_w = memo[M_W, mi] != 0
                        s_fault = memo[M_FAULT, mi]
                        s_refs = memo[M_REFS, mi]
                if not hit_memo:
                    sl = np.int64(sl_levels[i])
                    s_line = -1
                    nsl0 = nsl
                    beyond = (gpa >> SL_WIDTH[sl]) != zero
                    s_fault = F_ADDR_BEYOND if beyond else 0
                    stab = slptr[i]
                    slv = 0 if beyond else sl
                    s_r = True
                    s_w = True
                    if use_sl:
                        lv, e, s, way = _probe_find(sl_pwc, np.uint64(did[i]), zero, gpa,
                                                    np.uint64(sl))
                        if lv > 0:
                            sl_hits += 1
                            s_line = s * sl_ways + way
                            sl_rec[0, nsr] = s_line
                            sl_rec[1, nsr] = c
                            sl_rec[2, nsr] = j
                            nsr += 1
                            if not beyond:
                                stab = e & amask
                                slv = lv - 1
                                s_r = (e & np.uint64(SL_R)) != 0
                                s_w = (e & np.uint64(SL_W)) != 0
                    s_hpa = zero
                    s_order = 0
                    s_refs = 0
                    s_mask = zero
                    while slv > 0:
                        sshift = np.uint64(12 + 9 * (slv - 1))
                        sea = stab + ((gpa >> sshift) & nine) * eight
                        v, ok = _read(slab, slot_of, sea)
                        s_refs += 1
                        ps = ((v & np.uint64(SL_PS)) != 0) and (slv == 2 or slv == 3)
                        rsvd = (v & sl_rsvd[slv, 1 if ps else 0]) != 0
                        present = (v & np.uint64(SL_R | SL_W)) != 0
                        if not present:
                            s_fault = F_SL_NOT_PRESENT
                        if not ok:
                            s_fault = F_SL_ACCESS
                        bad = (not ok) or (not present)
                        if not bad and rsvd:
                            s_fault = F_SL_RSVD
                        good = not bad and not rsvd
                        s_r = s_r and (v & np.uint64(SL_R)) != 0
                        s_w = s_w and (v & np.uint64(SL_W)) != 0
                        leaf = good and (ps or slv == 1)
                        nonleaf = good and not leaf
                        if ssade[i] and good and (v & np.uint64(SL_A)) == 0:
                            ad = True
                            break
                        if fill_sl and nonleaf:
                            perms = (np.uint64(SL_R) if s_r else zero) | (
                                np.uint64(SL_W) if s_w else zero)
                            sl_fills[0, nsl] = i
                            sl_fills[1, nsl] = c
                            sl_fills[2, nsl] = slv
                            sl_fills[3, nsl] = np.int64(gpa)
                            sl_fills[4, nsl] = np.int64((v & ~np.uint64(SL_PERM_BITS)) | perms)
                            nsl += 1
                        if not nonleaf:
                            if leaf:
                                size_mask = (np.uint64(1) << sshift) - np.uint64(1)
                                s_hpa = (v & amask & ~size_mask) | (gpa & size_mask)
                                s_mask = size_mask
                                s_order = slv - 1
                                if ssade[i] and swr and s_w and (v & np.uint64(SL_D)) == 0:
                                    ad = True
                            break
                        stab = v & amask
                        slv -= 1
                    if ad:
                        break
                    if s_fault == 0 and not beyond:
                        if swr and not s_w:
                            s_fault = F_WRITE
                        elif not swr and not s_r:
                            s_fault = F_READ
                    if mh >= 0:
                        nf = nsl - nsl0
                        memo[M_PAGE, mh] = np.int64(page) + 1
                        memo[M_SLPTR, mh] = np.int64(slptr[i])
                        memo[M_CTX, mh] = ck
                        memo[M_BASE, mh] = np.int64(s_hpa & ~s_mask)
                        memo[M_MASK, mh] = np.int64(s_mask)
                        memo[M_ORDER, mh] = s_order
                        memo[M_R, mh] = 1 if s_r else 0
                        memo[M_W, mh] = 1 if s_w else 0
                        memo[M_FAULT, mh] = s_fault
                        memo[M_REFS, mh] = s_refs
                        memo[M_LINE, mh] = s_line
                        memo[M_NFILL, mh] = nf if fill_sl else 0
                        if fill_sl:
                            for q in range(nf):
                                memo[M_FILL + q, mh] = sl_fills[2, nsl0 + q]
                                memo[M_FILL + 4 + q, mh] = sl_fills[4, nsl0 + q]
                if final:
                    break
                rf += s_refs
                if s_fault != 0:
                    f = s_fault
                    stg = ST_SECOND
                    lvl = 0
                    continue
                ea = s_hpa
            # one first-level read at lvl (_fl_walk's level step)
            v, ok = _read(slab, slot_of, ea)
            rf += 1
            present = (v & np.uint64(FL_P)) != 0
            ps_bit = (v & np.uint64(FL_PS)) != 0
            ps = ps_bit and (lvl == 2 or lvl == 3)
            ps_col = ps_bit if lvl >= 4 else ps
            rsvd = (v & fl_rsvd[lvl, 1 if ps_col else 0]) != 0
            if not ok:
                f = F_FL_ACCESS
            elif not present:
                f = F_FL_NOT_PRESENT
            elif rsvd:
                f = F_FL_RSVD
            good = ok and present and not rsvd
            if not good:
                stg = ST_FIRST
            rw = rw and (v & np.uint64(FL_RW)) != 0
            us = us and (v & np.uint64(FL_US)) != 0
            leaf = good and (ps or lvl == 1)
            nonleaf = good and not leaf
            if good and (v & np.uint64(FL_A)) == 0:
                ad = True
                break
            if fill_fl and nonleaf:
                perms = (np.uint64(FL_RW) if rw else zero) | (np.uint64(FL_US) if us else zero)
                fl_fills[0, nfl] = i
                fl_fills[1, nfl] = 0
                fl_fills[2, nfl] = lvl
                fl_fills[3, nfl] = np.int64(iova)
                fl_fills[4, nfl] = np.int64((v & ~np.uint64(FL_PERM_BITS)) | perms)
                nfl += 1
            if nonleaf:
                table = v & amask
                lvl -= 1
                continue
            if leaf:
                shift = np.uint64(12 + 9 * (lvl - 1))
                size_mask = (np.uint64(1) << shift) - np.uint64(1)
                out = (v & amask & ~size_mask) | (iova & size_mask)
                fo = lvl - 1
                perm_ok = us and ((not wr) or rw)
                if perm_ok and wr and (v & np.uint64(FL_D)) == 0:
                    ad = True
                    break
            lvl = 0
        if ad:
            break
        if not first:
            hpa[i], order[i], fault[i], refs[i] = s_hpa, s_order, s_fault, s_refs
            if s_fault != 0:
                stage[i] = ST_SECOND
            perm[i] = (1 if s_r else 0) | (2 if s_w else 0)
        elif not nested:
            hpa[i], order[i], fault[i], stage[i], refs[i] = out, fo, f, stg, rf
            perm[i] = 1 | (2 if rw else 0)
        else:
            fault[i], stage[i], refs[i] = f, stg, rf
            if final:
                refs[i] = rf + s_refs
                hpa[i] = s_hpa
                fault[i] = s_fault
                if s_fault != 0:
                    stage[i] = ST_SECOND
                order[i] = min(fo, s_order)
                perm[i] = (1 if s_r else 0) | (2 if (s_w and rw) else 0)
        k += 1
    if ad:      # undo: the outputs of the requests walked so far, as the caller zeroed them
        for t in range(k):
            i = ix[t]
            hpa[i] = 0
            fault[i] = 0
            stage[i] = 0
            refs[i] = 0
            order[i] = 0
            perm[i] = 0
        return False
    # commit: PWC stamps, counters and fills as the level-synchronous calls leave them
    if use_fl and first:
        for t in range(nfr):
            line = fl_rec[0, t]
            fl_pwc[F_STAMP, line // fl_ways, line % fl_ways] = np.uint64(fl_rec[1, t])
        fl_counts[PWC_HITS] += fl_hits
        fl_counts[PWC_MISSES] += n - fl_hits
        fl_counts[PWC_CLOCK] = fl_clock + n
    if use_sl and second:
        clock = sl_counts[PWC_CLOCK]
        off = 0
        for c in range(DF_CALLS):       # calls in order; ranks ascend within a call
            if cnt[c] == 0:
                continue
            for t in range(nsr):
                if sl_rec[1, t] == c:
                    line = sl_rec[0, t]
                    sl_pwc[F_STAMP, line // sl_ways, line % sl_ways] = np.uint64(
                        clock + off + sl_rec[2, t])
            off += cnt[c]
        sl_counts[PWC_HITS] += sl_hits
        sl_counts[PWC_MISSES] += off - sl_hits
        sl_counts[PWC_CLOCK] = clock + off
    ctx[CX_NFL] = nfl
    ctx[CX_NSL] = nsl
    return True


@njit(cache=True)
def walk_batch(slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, addr, access, pgtt, did, pasid,
               flptr, fl_levels, slptr, sl_levels, ssade, use_fl, fl_pwc, fl_counts, use_sl,
               sl_pwc, sl_counts, fill_pwc, hpa, fault, stage, refs, order, perm):
    """walk_batch_mode with the depth-first path on (its docstring has the arguments)."""
    return walk_batch_mode(slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, addr, access, pgtt,
                           did, pasid, flptr, fl_levels, slptr, sl_levels, ssade, use_fl,
                           fl_pwc, fl_counts, use_sl, sl_pwc, sl_counts, fill_pwc, hpa, fault,
                           stage, refs, order, perm, True)


@njit(cache=True)
def walk_batch_mode(slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, addr, access, pgtt, did,
                    pasid, flptr, fl_levels, slptr, sl_levels, ssade, use_fl, fl_pwc, fl_counts,
                    use_sl, sl_pwc, sl_counts, fill_pwc, hpa, fault, stage, refs, order, perm,
                    depth_first):
    """Walk every request of a batch by its PGTT (walk.py Walker.walk); returns A/D writes.

    slab, slot_of: HostMemory's table slab and frame->slot map; haw: host address width;
    amask: address field of an entry; fl_rsvd, sl_rsvd: uint64[6, 2] reserved-bit tables.
    Per request (length n): addr uint64, access uint8, pgtt uint8, did int64, pasid int64,
    flptr uint64, fl_levels uint8, slptr uint64, sl_levels uint8, ssade bool.
    fl_pwc/sl_pwc with their counters: the PWCs' line planes (used when use_fl/use_sl);
    fill_pwc: fill them after the batch. Outputs (length n, zeroed by the caller): hpa
    uint64, fault, stage, order, perm uint8, refs int64. depth_first: try each group's
    depth-first walk (_group_df) first; False walks every group level-synchronously (the
    tests compare the two).
    """
    n = addr.shape[0]
    ctx = np.zeros(3, np.int64)
    fill_fl = fill_pwc and use_fl
    fill_sl = fill_pwc and use_sl
    fl_fills = np.empty((5, n * 4 + 1 if fill_fl else 1), np.int64)
    sl_fills = np.empty((5, n * MAX_FILLS_PER_REQUEST + 1 if fill_sl else 1), np.int64)
    groups = np.zeros(5, np.int64)
    for i in range(n):
        g = pgtt[i]
        if g == PGTT_PT:
            if (addr[i] >> np.uint64(haw)) != 0:
                fault[i] = F_ADDR_BEYOND
                stage[i] = ST_SECOND
            hpa[i] = addr[i]
            perm[i] = 3
        elif g in (PGTT_FL_ONLY, PGTT_SL_ONLY, PGTT_NESTED):
            groups[g] += 1
    # second level only
    ix = np.empty(groups[PGTT_SL_ONLY], np.int64)
    m = 0
    for i in range(n):
        if pgtt[i] == PGTT_SL_ONLY:
            ix[m] = i
            m += 1
    if m and not (depth_first and _group_df(
            slab, slot_of, amask, fl_rsvd, sl_rsvd, ix, np.int64(PGTT_SL_ONLY), addr, access,
            did, pasid, flptr, fl_levels, sl_levels, slptr, ssade, use_fl, fl_pwc, fl_counts,
            use_sl, sl_pwc, sl_counts, fill_fl, fill_sl, fl_fills, sl_fills, ctx, hpa, fault,
            stage, refs, order, perm)):
        g_addr = np.empty(m, np.uint64)
        g_write = np.empty(m, np.bool_)
        for k in range(m):
            g_addr[k] = addr[ix[k]]
            g_write[k] = access[ix[k]] == ACCESS_WRITE
        su, s8, sb, si = _sl_walk(slab, slot_of, amask, sl_rsvd, ix, g_addr, g_write,
                                  np.int64(0), did, sl_levels, slptr, ssade, use_sl, sl_pwc,
                                  sl_counts, fill_sl, sl_fills, ctx)
        for k in range(m):
            i = ix[k]
            hpa[i], order[i] = su[SU_HPA, k], s8[S8_ORDER, k]
            fault[i], refs[i] = s8[S8_FAULT, k], si[SI_REFS, k]
            if s8[S8_FAULT, k] != 0:
                stage[i] = ST_SECOND
            perm[i] = (1 if sb[SB_R, k] else 0) | (2 if sb[SB_W, k] else 0)
    # first level only, then nested
    for g, nested in ((PGTT_FL_ONLY, False), (PGTT_NESTED, True)):
        ix = np.empty(groups[g], np.int64)
        m = 0
        for i in range(n):
            if pgtt[i] == g:
                ix[m] = i
                m += 1
        if m == 0:
            continue
        if depth_first and _group_df(
                slab, slot_of, amask, fl_rsvd, sl_rsvd, ix, g, addr, access, did, pasid, flptr,
                fl_levels, sl_levels, slptr, ssade, use_fl, fl_pwc, fl_counts, use_sl, sl_pwc,
                sl_counts, fill_fl, fill_sl, fl_fills, sl_fills, ctx, hpa, fault, stage, refs,
                order, perm):
            continue
        out, fo, rw, f, s, rf = _fl_walk(
            slab, slot_of, amask, fl_rsvd, sl_rsvd, ix, nested, addr, access, did, pasid,
            flptr, fl_levels, sl_levels, slptr, ssade, use_fl, fl_pwc, fl_counts, use_sl,
            sl_pwc, sl_counts, fill_fl, fl_fills, sl_fills, ctx)
        if not nested:
            for k in range(m):
                i = ix[k]
                hpa[i], order[i], fault[i], stage[i], refs[i] = out[k], fo[k], f[k], s[k], rf[k]
                perm[i] = 1 | (2 if rw[k] else 0)
            continue
        okn = 0
        for k in range(m):
            i = ix[k]
            fault[i], stage[i], refs[i] = f[k], s[k], rf[k]
            if f[k] == 0:
                okn += 1
        if okn == 0:
            continue
        sub = np.empty(okn, np.int64)
        gpa = np.empty(okn, np.uint64)
        sw = np.empty(okn, np.bool_)
        kk = np.empty(okn, np.int64)
        j = 0
        for k in range(m):
            if f[k] == 0:
                sub[j] = ix[k]
                gpa[j] = out[k]
                sw[j] = access[ix[k]] == ACCESS_WRITE
                kk[j] = k
                j += 1
        su, s8, sb, si = _sl_walk(slab, slot_of, amask, sl_rsvd, sub, gpa, sw, np.int64(5),
                                  did, sl_levels, slptr, ssade, use_sl, sl_pwc, sl_counts,
                                  fill_sl, sl_fills, ctx)
        for j in range(okn):
            i = sub[j]
            refs[i] += si[SI_REFS, j]
            hpa[i] = su[SU_HPA, j]
            fault[i] = s8[S8_FAULT, j]
            if s8[S8_FAULT, j] != 0:
                stage[i] = ST_SECOND
            order[i] = min(fo[kk[j]], s8[S8_ORDER, j])
            perm[i] = (1 if sb[SB_R, j] else 0) | (2 if (sb[SB_W, j] and rw[kk[j]]) else 0)
    for i in range(n):
        g = pgtt[i]
        if g not in (PGTT_PT, PGTT_SL_ONLY, PGTT_FL_ONLY, PGTT_NESTED):
            fault[i] = F_PGTT
            stage[i] = ST_CONTEXT
        if fault[i] != 0:   # a fault translates nothing: no address, no page size
            hpa[i] = 0
            order[i] = 0
    if fill_fl:
        _pwc_fill(fl_pwc, fl_counts, fl_fills, ctx[CX_NFL], did, pasid, False)
    if fill_sl:   # second-level entries are tagged PASID 0
        _pwc_fill(sl_pwc, sl_counts, sl_fills, ctx[CX_NSL], did, pasid, True)
    return ctx[CX_AD]
