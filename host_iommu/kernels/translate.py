"""One batch of DMA translations after context resolution, as one numba kernel.

HostIommu.translate's steps 2-6 (host_iommu/iommu.py; VT-d spec 3.x chapter 3 translation,
6.2.3 IOTLB, 6.2.7 device-TLB; QEMU vtd_do_iommu_translate), in its order and with its batch
semantics, so that a small batch costs one call instead of some hundred numpy operations:

- device-TLB look-up of the requests of ATS devices, then the IOTLB for the others, both as
  the batch found them (the IOTLB and device-TLB kernels, host_iommu/kernels/iotlb.py), a hit
  needing the access's permission;
- the misses of one (DID, PASID, 4-KiB page, access) are walked once, by the first of them
  (the walk kernel, host_iommu/kernels/walk.py); the others take its outcome at their own
  offset and count as IOTLB hits when an IOTLB holds the fill (else they walk themselves);
- IOTLB fills of the successful walks in request order, then device-TLB fills of every
  ATS completion sent.

The context stage (root, context and PASID entries through their caches) comes before it:
HostIommu._contexts in Python, or from the host's epoch kernel (kernels/epoch.py)
kernels/entrycache.py contexts_hit and contexts_fetch. One pass over the requests looks each
up (iotlb._lookup_one) and writes the result of each that needs no walk straight into the
batch's result rows; only the misses get arrays of their own (_walk_misses), grouped by a
hash table (_leaders), and the IOTLB and device-TLB fills go line by line
(iotlb._fill_line): a DMA run is often only a few requests long, and numba's array
allocations were most of such a call, while a bench batch of a million hits is bound by the
memory its passes stream through. host_iommu/refengine.py is the request-by-request
reference, compared on whole runs by tests/system/test_fast_vs_reference.py; the kernel is
compared with the numpy orchestration it replaced by tests/host_iommu/test_kernel_translate.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.defs import ACCESS_WRITE, Stage
from host_iommu.kernels.iotlb import C_CLOCK as I_CLOCK
from host_iommu.kernels.iotlb import C_HITS, C_MISSES, _fill_line, _lookup_one
from host_iommu.kernels.walk import walk_batch

ST_CONTEXT = int(Stage.CONTEXT)
PAGE_MASK_4K = np.uint64(4095)
# Columns of the per-request context array ``req`` (int64[n, 6]): the context stage's fault
# (0 if none), the DID, whether the device caches translations (ATS, context fine), the row
# of its context in ``ctx``, the structure fetches it pays (its first request only), FPD.
R_FAULT, R_DID, R_DTE, R_CTX, R_CTX_REFS, R_FPD = range(6)
# Columns of the per-context array ``ctx`` (uint64[rows, 6]): the PASID entry's walk inputs.
C_PGTT, C_FLPTR, C_FL_LEVELS, C_SLPTR, C_SL_LEVELS, C_SSADE = range(6)
# Indices of the returned statistics vector (int64): IOTLB misses counted (misses less the
# followers answered by a leader's fill), A/D writes, device-TLB hits, IOTLB hits (not
# counting device-TLB hits), walk references, faults.
S_IOTLB_MISSES, S_AD, S_DEVTLB_HITS, S_IOTLB_HITS, S_WALK_REFS, S_FAULTS = range(6)
LEADER_MIX = np.uint64(0x9E3779B97F4A7C15)     # _leaders' multiplicative hash


@njit(cache=True)
def _leaders(did, pasid, page, access):
    """Leader (first member, by position) of each request's (did, pasid, page, access) group:
    one pass in position order over an open-addressing table of the groups met so far
    (slot: the leader's position and its page), so the first member of each group is the
    one that enters it."""
    m = did.shape[0]
    leader = np.empty(m, np.int64)
    bits = 4
    while (1 << bits) < 2 * m:
        bits += 1
    mask = (1 << bits) - 1
    shift = np.uint64(64 - bits)
    table = np.full(2 << bits, -1, np.int64)     # per slot: leader position, its page
    for k in range(m):
        pg = page[k]
        key = (np.uint64(pg) ^ (np.uint64(did[k]) << np.uint64(40))
               ^ (np.uint64(pasid[k]) << np.uint64(20)) ^ np.uint64(access[k]))
        h = np.int64((key * LEADER_MIX) >> shift)
        while True:
            q = table[2 * h]
            if q < 0:
                table[2 * h] = k
                table[2 * h + 1] = pg
                leader[k] = k
                break
            if (table[2 * h + 1] == pg and did[q] == did[k] and pasid[q] == pasid[k]
                    and access[q] == access[k]):
                leader[k] = q
                break
            h = (h + 1) & mask
    return leader


@njit(cache=True)
def translate_batch(sid, pasid, addr, access, req, ctx, iotlb, iotlb_counts, dtlb, dtlb_counts,
                    slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, use_fl, fl_pwc, fl_counts,
                    use_sl, sl_pwc, sl_counts, out):
    """Translate a batch whose contexts are resolved into ``out``; returns (statistics,
    int64[6] by S_*; device-TLB hit per request, bool).

    Requests (length n): sid, pasid int64, addr uint64, access uint8; req: int64[n, 6] by
    R_* (the context stage's fault, DID, ATS, context row, structure fetches, FPD). Per
    resolved context row: ctx uint64[rows, 6] by C_* (PGTT, FLPTR, FL levels, SLPTR, SL
    levels, SSADE). iotlb/dtlb and counts: the IOTLB and device-TLB line planes
    (kernels/iotlb.py); slab ... sl_counts: walk_batch's memory and PWC arguments. out: the
    batch's RESULT_DTYPE array, filled here (every field of every request).

    One pass over the requests does steps 2 and 3 (a request's device-TLB look-up, then its
    IOTLB look-up, each stamped at its rank among that cache's look-ups: no fill comes
    between, so each look-up sees its cache as the batch found it) and writes the results
    of the requests that need no walk; the misses are walked and written after it.
    """
    n = sid.shape[0]
    devtlb_hit = np.zeros(n, np.bool_)
    perm = np.zeros(n, np.uint8)        # permission of each translation (device-TLB fills)
    miss = np.empty(n, np.int64)
    stats = np.zeros(6, np.int64)
    clock = iotlb_counts[I_CLOCK]
    dclock = dtlb_counts[I_CLOCK]
    ni = 0          # IOTLB look-ups, hits (any permission), misses to walk
    ihits = 0
    nm = 0
    nd = 0          # device-TLB look-ups, hits (any permission)
    dhits = 0
    zero = np.uint64(0)
    for i in range(n):
        f = req[i, R_FAULT]
        need = np.uint8(2) if access[i] == ACCESS_WRITE else np.uint8(1)
        live = f == 0
        hd = False
        hi = False
        a = zero
        o = np.uint8(0)
        # 2. device-TLB (ATS devices): a hit with the permission needs no IOMMU look-up
        if req[i, R_DTE] != 0:
            h, a1, p, o1, _g = _lookup_one(dtlb, np.uint64(sid[i]), np.uint64(pasid[i]),
                                           addr[i], dclock + nd)
            nd += 1
            if h:
                dhits += 1
                if (p & need) == need:
                    hd = True
                    a = a1
                    o = o1
                    live = False
        # 3. IOTLB
        if live:
            h, a1, p, o1, _g = _lookup_one(iotlb, np.uint64(req[i, R_DID]),
                                           np.uint64(pasid[i]), addr[i], clock + ni)
            ni += 1
            if h:
                ihits += 1
            if h and (p & need) == need:
                hi = True
                a = a1
                o = o1
                perm[i] = p
            else:
                miss[nm] = i
                nm += 1
                continue
        rec = out[i]
        rec["hpa"] = zero if f != 0 else a
        rec["fault"] = f
        rec["stage"] = ST_CONTEXT if f != 0 else 0
        rec["walk_refs"] = 0
        rec["ctx_refs"] = req[i, R_CTX_REFS]
        rec["iotlb_hit"] = hi or hd
        rec["page_order"] = o
        devtlb_hit[i] = hd
        if f != 0:
            stats[S_FAULTS] += 1
        if hd:
            stats[S_DEVTLB_HITS] += 1
        if hi:
            stats[S_IOTLB_HITS] += 1
    dtlb_counts[C_HITS] += dhits
    dtlb_counts[C_MISSES] += nd - dhits
    dtlb_counts[I_CLOCK] = dclock + nd
    iotlb_counts[C_HITS] += ihits
    iotlb_counts[C_MISSES] += ni - ihits
    iotlb_counts[I_CLOCK] = clock + ni
    stats[S_IOTLB_MISSES] = nm
    # 4. walk the misses, coalesced by (did, pasid, page, access)
    if nm:
        _walk_misses(addr, access, pasid, req, ctx, miss, nm, iotlb, iotlb_counts, slab,
                     slot_of, haw, amask, fl_rsvd, sl_rsvd, use_fl, fl_pwc, fl_counts, use_sl,
                     sl_pwc, sl_counts, out, perm, stats)
    # device-TLB fills: every ATS translation completion the device received (in order)
    clock = dtlb_counts[I_CLOCK]
    t = 0
    if nd:
        for i in range(n):
            if req[i, R_DTE] != 0 and not devtlb_hit[i] and out[i]["fault"] == 0:
                o = np.uint64(out[i]["page_order"])
                shift = np.uint64(12) + np.uint64(9) * o
                _fill_line(dtlb, dtlb_counts, np.uint64(sid[i]), np.uint64(pasid[i]),
                           addr[i] >> shift, o, (out[i]["hpa"] >> shift) << shift,
                           np.uint64(perm[i]), zero, clock + t)
                t += 1
    dtlb_counts[I_CLOCK] = clock + t
    return stats, devtlb_hit


@njit(cache=True)
def _walk_misses(addr, access, pasid, req, ctx, miss, nm, iotlb, iotlb_counts, slab, slot_of,
                 haw, amask, fl_rsvd, sl_rsvd, use_fl, fl_pwc, fl_counts, use_sl, sl_pwc,
                 sl_counts, out, perm, stats):
    """translate_batch's step 4 for the ``nm`` misses ``miss[:nm]`` (request order): walk
    each (did, pasid, page, access) once, by its first request; the others take its outcome
    at their own offset and count as IOTLB hits when the IOTLB holds the fill (else they
    walk themselves); IOTLB fills of the successful walks in request order. Writes the
    misses' ``out`` rows and ``perm``, and the statistics."""
    mk = np.empty((4, nm), np.int64)        # did, pasid, page, access
    for k in range(nm):
        i = miss[k]
        mk[0, k] = req[i, R_DID]
        mk[1, k] = pasid[i]
        mk[2, k] = np.int64(addr[i] >> np.uint64(12))
        mk[3, k] = access[i]
    if nm == 1:
        lead = np.zeros(1, np.int64)
    else:
        lead = _leaders(mk[0], mk[1], mk[2], mk[3])
    nl = 0
    for k in range(nm):
        if lead[k] == k:
            nl += 1
    pos = np.empty((2, nm), np.int64)       # position in miss of each leader; ranks
    j = 0
    for k in range(nm):
        if lead[k] == k:
            pos[0, j] = k
            pos[1, k] = j
            j += 1
    wu = np.zeros((4, nl), np.uint64)       # addr, flptr, slptr; hpa out
    w8 = np.zeros((8, nl), np.uint8)        # access, pgtt, fl/sl levels; outs
    wi = np.zeros((3, nl), np.int64)        # did, pasid; refs out
    wss = np.zeros(nl, np.bool_)
    for j in range(nl):
        i = miss[pos[0, j]]
        u = req[i, R_CTX]
        wu[0, j] = addr[i]
        wu[1, j] = ctx[u, C_FLPTR]
        wu[2, j] = ctx[u, C_SLPTR]
        w8[0, j] = access[i]
        w8[1, j] = np.uint8(ctx[u, C_PGTT])
        w8[2, j] = np.uint8(ctx[u, C_FL_LEVELS])
        w8[3, j] = np.uint8(ctx[u, C_SL_LEVELS])
        wi[0, j] = req[i, R_DID]
        wi[1, j] = pasid[i]
        wss[j] = ctx[u, C_SSADE] != 0
    stats[S_AD] = walk_batch(slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, wu[0], w8[0],
                             w8[1], wi[0], wi[1], wu[1], w8[2], wu[2], w8[3], wss,
                             use_fl, fl_pwc, fl_counts, use_sl, sl_pwc, sl_counts,
                             use_fl or use_sl, wu[3], w8[4], w8[5], wi[2], w8[6], w8[7])
    has_iotlb = iotlb.shape[1] > 0
    for k in range(nm):
        i = miss[k]
        j = pos[1, lead[k]]
        f = w8[4, j]
        rec = out[i]
        rec["fault"] = f
        rec["stage"] = w8[5, j]
        rec["page_order"] = w8[6, j]
        rec["ctx_refs"] = req[i, R_CTX_REFS]
        perm[i] = w8[7, j]
        refs = 0
        hit = False
        if lead[k] == k:
            hpa = wu[3, j]
            refs = wi[2, j]
        else:
            # a follower takes its leader's outcome, at its own offset within the page
            hpa = (wu[3, j] & ~PAGE_MASK_4K) | (addr[i] & PAGE_MASK_4K)
            if has_iotlb:
                hit = f == 0            # answered by the leader's fill
                stats[S_IOTLB_MISSES] -= 1
            else:                       # no IOTLB to hold that fill: it walks itself
                refs = wi[2, j]
        if f != 0:
            hpa = np.uint64(0)
            stats[S_FAULTS] += 1
        if hit:
            stats[S_IOTLB_HITS] += 1
        stats[S_WALK_REFS] += refs
        rec["hpa"] = hpa
        rec["walk_refs"] = refs
        rec["iotlb_hit"] = hit
    # IOTLB fills for the successful walks, in request order (iotlb._fill, line by line)
    clock = iotlb_counts[I_CLOCK]
    t = 0
    for j in range(nl):
        if w8[4, j] == 0 and has_iotlb:     # (a cache without sets: only the clock moves)
            o = np.uint64(w8[6, j])
            shift = np.uint64(12) + np.uint64(9) * o
            _fill_line(iotlb, iotlb_counts, np.uint64(wi[0, j]), np.uint64(wi[1, j]),
                       wu[0, j] >> shift, o, (wu[3, j] >> shift) << shift,
                       np.uint64(w8[7, j]), np.uint64(w8[1, j]), clock + t)
        if w8[4, j] == 0:
            t += 1
    iotlb_counts[I_CLOCK] = clock + t
