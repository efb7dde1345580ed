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
kernels/entrycache.py contexts_hit and contexts_fetch. Per-request state lives in a few
arrays (rows of one array per dtype) and the IOTLB and device-TLB fills go line by line
(iotlb._fill_line): a DMA run is often only a few requests long, and numba's array
allocations were most of such a call. host_iommu/refengine.py is the request-by-request
reference, compared on whole runs by tests/system/test_fast_vs_reference.py; the kernel is
compared with the numpy orchestration it replaced by tests/host_iommu/test_kernel_translate.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.defs import ACCESS_WRITE, Stage
from host_iommu.kernels.iotlb import C_CLOCK as I_CLOCK
from host_iommu.kernels.iotlb import _fill_line, _lookup
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
# Rows of translate_batch's per-request arrays, indexed in place (a row view costs an atomic
# reference count update): u8 fault, stage, page order, permission, permission needed;
# bool IOTLB hit, still to be looked up.
T8_FAULT, T8_STAGE, T8_ORDER, T8_PERM, T8_NEED = range(5)
TB_HIT, TB_LIVE = range(2)


@njit(cache=True)
def _leaders(did, pasid, page, access):
    """Leader (first member, by position) of each request's (did, pasid, page, access) group:
    a stable sort by page, then a scan of each run of equal pages."""
    m = did.shape[0]
    leader = np.empty(m, np.int64)
    if m == 0:
        return leader
    order = np.argsort(page, kind="mergesort")
    seen = np.empty(m, np.int64)     # distinct keys met in the current run (their leaders)
    start = 0
    while start < m:
        end = start
        pg = page[order[start]]
        while end < m and page[order[end]] == pg:
            end += 1
        ns = 0
        for j in range(start, end):
            k = order[j]
            found = -1
            for t in range(ns):
                q = seen[t]
                if did[q] == did[k] and pasid[q] == pasid[k] and access[q] == access[k]:
                    found = q
                    break
            if found < 0:       # positions ascend within the run (stable sort): k is first
                seen[ns] = k
                ns += 1
                leader[k] = k
            else:
                leader[k] = found
        start = end
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
    batch's RESULT_DTYPE array (zeroed), filled here.
    """
    n = sid.shape[0]
    # per-request state, one array per dtype (few allocations: this runs per DMA run):
    # rows T8_* of u8, TB_* of b, indexed in place
    u8 = np.zeros((5, n), np.uint8)
    b = np.zeros((2, n), np.bool_)
    hpa = np.zeros(n, np.uint64)
    walk_refs = np.zeros(n, np.int64)
    devtlb_hit = np.zeros(n, np.bool_)
    stats = np.zeros(6, np.int64)
    nd = 0
    for i in range(n):
        f = req[i, R_FAULT]
        u8[T8_FAULT, i] = f
        if f != 0:
            u8[T8_STAGE, i] = ST_CONTEXT
        u8[T8_NEED, i] = 2 if access[i] == ACCESS_WRITE else 1
        b[TB_LIVE, i] = f == 0
        if req[i, R_DTE] != 0:
            nd += 1
    # 2. device-TLB (ATS devices): a hit with the permission needs no IOMMU look-up
    if nd:
        dix = np.empty(nd, np.int64)
        j = 0
        for i in range(n):
            if req[i, R_DTE] != 0:
                dix[j] = i
                j += 1
        du = np.zeros((4, nd), np.uint64)       # sid, pasid, addr; hpa out
        d8 = np.zeros((3, nd), np.uint8)        # perm, order, pgtt out
        h = np.zeros(nd, np.bool_)
        for j in range(nd):
            du[0, j] = np.uint64(sid[dix[j]])
            du[1, j] = np.uint64(pasid[dix[j]])
            du[2, j] = addr[dix[j]]
        _lookup(dtlb, dtlb_counts, du[0], du[1], du[2], h, du[3], d8[0], d8[1], d8[2])
        for j in range(nd):
            i = dix[j]
            if h[j] and (d8[0, j] & u8[T8_NEED, i]) == u8[T8_NEED, i]:
                devtlb_hit[i] = True
                hpa[i] = du[3, j]
                u8[T8_ORDER, i] = d8[1, j]
                b[TB_LIVE, i] = False
    # 3. IOTLB
    ni = 0
    for i in range(n):
        if b[TB_LIVE, i]:
            ni += 1
    # the look-up's columns as arrays of their own: rows of a 2-D array would be typed
    # non-contiguous there, which cost a third of a large batch of hits
    ix = np.empty(ni, np.int64)
    i_did = np.empty(ni, np.uint64)
    i_pasid = np.empty(ni, np.uint64)
    i_addr = np.empty(ni, np.uint64)
    i_hpa = np.zeros(ni, np.uint64)
    i_perm = np.zeros(ni, np.uint8)
    i_order = np.zeros(ni, np.uint8)
    i_pgtt = np.zeros(ni, np.uint8)
    h = np.zeros(ni, np.bool_)
    j = 0
    for i in range(n):
        if b[TB_LIVE, i]:
            ix[j] = i
            i_did[j] = np.uint64(req[i, R_DID])
            i_pasid[j] = np.uint64(pasid[i])
            i_addr[j] = addr[i]
            j += 1
    _lookup(iotlb, iotlb_counts, i_did, i_pasid, i_addr, h, i_hpa, i_perm, i_order, i_pgtt)
    nm = 0
    for j in range(ni):
        i = ix[j]
        if h[j] and (i_perm[j] & u8[T8_NEED, i]) == u8[T8_NEED, i]:
            u8[T8_PERM, i] = i_perm[j]
            hpa[i] = i_hpa[j]
            u8[T8_ORDER, i] = i_order[j]
            b[TB_HIT, i] = True
        else:
            nm += 1
    stats[S_IOTLB_MISSES] = nm
    # 4. walk the misses, coalesced by (did, pasid, page, access)
    if nm:
        miss = np.empty(nm, np.int64)
        mk = np.empty((4, nm), np.int64)        # did, pasid, page, access
        k = 0
        for j in range(ni):
            i = ix[j]
            if not b[TB_HIT, i]:
                miss[k] = i
                mk[0, k] = req[i, R_DID]
                mk[1, k] = pasid[i]
                mk[2, k] = np.int64(addr[i] >> np.uint64(12))
                mk[3, k] = access[i]
                k += 1
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
            if lead[k] == k:
                hpa[i] = wu[3, j]
                u8[T8_FAULT, i] = w8[4, j]
                u8[T8_STAGE, i] = w8[5, j]
                walk_refs[i] = wi[2, j]
                u8[T8_ORDER, i] = w8[6, j]
                u8[T8_PERM, i] = w8[7, j]
                continue
            # a follower takes its leader's outcome, at its own offset within the page
            ok = w8[4, j] == 0
            hpa[i] = ((wu[3, j] & ~PAGE_MASK_4K) | (addr[i] & PAGE_MASK_4K)) if ok else 0
            u8[T8_FAULT, i] = w8[4, j]
            u8[T8_STAGE, i] = w8[5, j]
            u8[T8_ORDER, i] = w8[6, j]
            if has_iotlb:
                b[TB_HIT, i] = ok          # answered by the leader's fill
                stats[S_IOTLB_MISSES] -= 1
            else:                          # no IOTLB to hold that fill: it walks itself
                walk_refs[i] = wi[2, j]
            u8[T8_PERM, i] = w8[7, j]
        # IOTLB fills for the successful walks, in request order (iotlb._fill, line by line)
        clock = iotlb_counts[I_CLOCK]
        t = 0
        for j in range(nl):
            if w8[4, j] == 0:
                o = np.uint64(w8[6, j])
                shift = np.uint64(12) + np.uint64(9) * o
                _fill_line(iotlb, iotlb_counts, np.uint64(wi[0, j]), np.uint64(wi[1, j]),
                           wu[0, j] >> shift, o, (wu[3, j] >> shift) << shift,
                           np.uint64(w8[7, j]), np.uint64(w8[1, j]), clock + t)
                t += 1
        iotlb_counts[I_CLOCK] = clock + t
    for i in range(n):
        if u8[T8_FAULT, i] != 0:
            hpa[i] = 0
            stats[S_FAULTS] += 1
        if devtlb_hit[i]:
            stats[S_DEVTLB_HITS] += 1
        if b[TB_HIT, i]:
            stats[S_IOTLB_HITS] += 1
        stats[S_WALK_REFS] += walk_refs[i]
    # device-TLB fills: every ATS translation completion the device received (in order)
    clock = dtlb_counts[I_CLOCK]
    t = 0
    for i in range(n):
        if req[i, R_DTE] != 0 and not devtlb_hit[i] and u8[T8_FAULT, i] == 0:
            o = np.uint64(u8[T8_ORDER, i])
            shift = np.uint64(12) + np.uint64(9) * o
            _fill_line(dtlb, dtlb_counts, np.uint64(sid[i]), np.uint64(pasid[i]),
                       addr[i] >> shift, o, (hpa[i] >> shift) << shift, np.uint64(u8[T8_PERM, i]),
                       np.uint64(0), clock + t)
            t += 1
    dtlb_counts[I_CLOCK] = clock + t
    for i in range(n):
        out[i]["hpa"] = hpa[i]
        out[i]["fault"] = u8[T8_FAULT, i]
        out[i]["stage"] = u8[T8_STAGE, i]
        out[i]["walk_refs"] = walk_refs[i]
        out[i]["ctx_refs"] = req[i, R_CTX_REFS]
        out[i]["iotlb_hit"] = b[TB_HIT, i] or devtlb_hit[i]
        out[i]["page_order"] = u8[T8_ORDER, i]
    return stats, devtlb_hit
