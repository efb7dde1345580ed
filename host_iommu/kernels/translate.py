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

The context stage (root, context and PASID entries through their caches) stays in Python:
a batch resolves a few (sid, pasid). host_iommu/refengine.py is the request-by-request
reference, compared on whole runs by tests/system/test_fast_vs_reference.py; the kernel is
compared with the numpy orchestration it replaced by tests/host_iommu/test_kernel_translate.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.defs import ACCESS_WRITE, Stage
from host_iommu.kernels.iotlb import _fill, _lookup
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
    r_fault = np.empty(n, np.uint8)
    r_did = np.empty(n, np.int64)
    r_dte = np.empty(n, np.bool_)
    u_of = np.empty(n, np.int64)
    for i in range(n):
        r_fault[i] = req[i, R_FAULT]
        r_did[i] = req[i, R_DID]
        r_dte[i] = req[i, R_DTE] != 0
        u_of[i] = req[i, R_CTX]
    pgtt = ctx[:, C_PGTT].astype(np.uint8)
    flptr = ctx[:, C_FLPTR].copy()
    fl_levels = ctx[:, C_FL_LEVELS].astype(np.uint8)
    slptr = ctx[:, C_SLPTR].copy()
    sl_levels = ctx[:, C_SL_LEVELS].astype(np.uint8)
    ssade = ctx[:, C_SSADE] != 0
    hpa = np.zeros(n, np.uint64)
    fault = r_fault.copy()
    stage = np.zeros(n, np.uint8)
    for i in range(n):
        if fault[i] != 0:
            stage[i] = ST_CONTEXT
    walk_refs = np.zeros(n, np.int64)
    order = np.zeros(n, np.uint8)
    iotlb_hit = np.zeros(n, np.bool_)
    devtlb_hit = np.zeros(n, np.bool_)
    perm = np.zeros(n, np.uint8)
    stats = np.zeros(6, np.int64)
    need = np.empty(n, np.uint8)
    live = np.empty(n, np.bool_)
    for i in range(n):
        need[i] = 2 if access[i] == ACCESS_WRITE else 1
        live[i] = r_fault[i] == 0
    # 2. device-TLB (ATS devices): a hit with the permission needs no IOMMU look-up
    nd = 0
    for i in range(n):
        if r_dte[i]:
            nd += 1
    dix = np.empty(nd, np.int64)
    j = 0
    for i in range(n):
        if r_dte[i]:
            dix[j] = i
            j += 1
    if nd:
        d_sid = np.empty(nd, np.uint64)
        d_pasid = np.empty(nd, np.uint64)
        d_addr = np.empty(nd, np.uint64)
        for j in range(nd):
            d_sid[j] = np.uint64(sid[dix[j]])
            d_pasid[j] = np.uint64(pasid[dix[j]])
            d_addr[j] = addr[dix[j]]
        h = np.zeros(nd, np.bool_)
        a = np.zeros(nd, np.uint64)
        p = np.zeros(nd, np.uint8)
        o = np.zeros(nd, np.uint8)
        g = np.zeros(nd, np.uint8)
        _lookup(dtlb, dtlb_counts, d_sid, d_pasid, d_addr, h, a, p, o, g)
        for j in range(nd):
            i = dix[j]
            if h[j] and (p[j] & need[i]) == need[i]:
                devtlb_hit[i] = True
                hpa[i] = a[j]
                order[i] = o[j]
                live[i] = False
    # 3. IOTLB
    ni = 0
    for i in range(n):
        if live[i]:
            ni += 1
    ix = np.empty(ni, np.int64)
    i_did = np.empty(ni, np.uint64)
    i_pasid = np.empty(ni, np.uint64)
    i_addr = np.empty(ni, np.uint64)
    j = 0
    for i in range(n):
        if live[i]:
            ix[j] = i
            i_did[j] = np.uint64(r_did[i])
            i_pasid[j] = np.uint64(pasid[i])
            i_addr[j] = addr[i]
            j += 1
    h = np.zeros(ni, np.bool_)
    a = np.zeros(ni, np.uint64)
    p = np.zeros(ni, np.uint8)
    o = np.zeros(ni, np.uint8)
    g = np.zeros(ni, np.uint8)
    _lookup(iotlb, iotlb_counts, i_did, i_pasid, i_addr, h, a, p, o, g)
    nm = 0
    for j in range(ni):
        i = ix[j]
        if h[j] and (p[j] & need[i]) == need[i]:
            perm[i] = p[j]
            hpa[i] = a[j]
            order[i] = o[j]
            iotlb_hit[i] = True
        else:
            nm += 1
    miss = np.empty(nm, np.int64)
    k = 0
    for j in range(ni):
        if not iotlb_hit[ix[j]]:
            miss[k] = ix[j]
            k += 1
    stats[S_IOTLB_MISSES] = nm
    # 4. walk the misses, coalesced by (did, pasid, page, access)
    if nm:
        m_did = np.empty(nm, np.int64)
        m_pasid = np.empty(nm, np.int64)
        m_page = np.empty(nm, np.uint64)
        m_acc = np.empty(nm, np.uint8)
        for k in range(nm):
            i = miss[k]
            m_did[k] = r_did[i]
            m_pasid[k] = pasid[i]
            m_page[k] = addr[i] >> np.uint64(12)
            m_acc[k] = access[i]
        lead = _leaders(m_did, m_pasid, m_page, m_acc)
        nl = 0
        for k in range(nm):
            if lead[k] == k:
                nl += 1
        lpos = np.empty(nl, np.int64)       # position in miss of each leader
        rank = np.empty(nm, np.int64)       # leader rank of each miss
        j = 0
        for k in range(nm):
            if lead[k] == k:
                lpos[j] = k
                rank[k] = j
                j += 1
        w_addr = np.empty(nl, np.uint64)
        w_acc = np.empty(nl, np.uint8)
        w_pgtt = np.empty(nl, np.uint8)
        w_did = np.empty(nl, np.int64)
        w_pasid = np.empty(nl, np.int64)
        w_flptr = np.empty(nl, np.uint64)
        w_fll = np.empty(nl, np.uint8)
        w_slptr = np.empty(nl, np.uint64)
        w_sll = np.empty(nl, np.uint8)
        w_ssade = np.empty(nl, np.bool_)
        for j in range(nl):
            i = miss[lpos[j]]
            u = u_of[i]
            w_addr[j] = addr[i]
            w_acc[j] = access[i]
            w_pgtt[j] = pgtt[u]
            w_did[j] = r_did[i]
            w_pasid[j] = pasid[i]
            w_flptr[j] = flptr[u]
            w_fll[j] = fl_levels[u]
            w_slptr[j] = slptr[u]
            w_sll[j] = sl_levels[u]
            w_ssade[j] = ssade[u]
        wh = np.zeros(nl, np.uint64)
        wf = np.zeros(nl, np.uint8)
        ws = np.zeros(nl, np.uint8)
        wr = np.zeros(nl, np.int64)
        wo = np.zeros(nl, np.uint8)
        wp = np.zeros(nl, np.uint8)
        stats[S_AD] = walk_batch(slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, w_addr, w_acc,
                                 w_pgtt, w_did, w_pasid, w_flptr, w_fll, w_slptr, w_sll,
                                 w_ssade, use_fl, fl_pwc, fl_counts, use_sl, sl_pwc,
                                 sl_counts, use_fl or use_sl, wh, wf, ws, wr, wo, wp)
        has_iotlb = iotlb.shape[1] > 0
        for k in range(nm):
            i = miss[k]
            j = rank[lead[k]]
            if lead[k] == k:
                hpa[i] = wh[j]
                fault[i] = wf[j]
                stage[i] = ws[j]
                walk_refs[i] = wr[j]
                order[i] = wo[j]
                perm[i] = wp[j]
                continue
            # a follower takes its leader's outcome, at its own offset within the page
            ok = wf[j] == 0
            hpa[i] = ((wh[j] & ~PAGE_MASK_4K) | (addr[i] & PAGE_MASK_4K)) if ok else 0
            fault[i] = wf[j]
            stage[i] = ws[j]
            order[i] = wo[j]
            if has_iotlb:
                iotlb_hit[i] = ok          # answered by the leader's fill
                stats[S_IOTLB_MISSES] -= 1
            else:                          # no IOTLB to hold that fill: it walks itself
                walk_refs[i] = wr[j]
            perm[i] = wp[j]
        # IOTLB fills for the successful walks, in request order
        nf = 0
        for j in range(nl):
            if wf[j] == 0:
                nf += 1
        f_did = np.empty(nf, np.uint64)
        f_pasid = np.empty(nf, np.uint64)
        f_addr = np.empty(nf, np.uint64)
        f_order = np.empty(nf, np.uint64)
        f_hpa = np.empty(nf, np.uint64)
        f_perm = np.empty(nf, np.uint64)
        f_pgtt = np.empty(nf, np.uint64)
        t = 0
        for j in range(nl):
            if wf[j] == 0:
                shift = np.uint64(12 + 9 * np.int64(wo[j]))
                f_did[t] = np.uint64(w_did[j])
                f_pasid[t] = np.uint64(w_pasid[j])
                f_addr[t] = w_addr[j]
                f_order[t] = np.uint64(wo[j])
                f_hpa[t] = (wh[j] >> shift) << shift
                f_perm[t] = np.uint64(wp[j])
                f_pgtt[t] = np.uint64(w_pgtt[j])
                t += 1
        if nf:
            _fill(iotlb, iotlb_counts, f_did, f_pasid, f_addr, f_order, f_hpa, f_perm, f_pgtt)
    for i in range(n):
        if fault[i] != 0:
            hpa[i] = 0
            stats[S_FAULTS] += 1
        if devtlb_hit[i]:
            stats[S_DEVTLB_HITS] += 1
        if iotlb_hit[i]:
            stats[S_IOTLB_HITS] += 1
        stats[S_WALK_REFS] += walk_refs[i]
    # device-TLB fills: every ATS translation completion the device received
    nf = 0
    for i in range(n):
        if r_dte[i] and not devtlb_hit[i] and fault[i] == 0:
            nf += 1
    if nf:
        f_sid = np.empty(nf, np.uint64)
        f_pasid = np.empty(nf, np.uint64)
        f_addr = np.empty(nf, np.uint64)
        f_order = np.empty(nf, np.uint64)
        f_hpa = np.empty(nf, np.uint64)
        f_perm = np.empty(nf, np.uint64)
        t = 0
        for i in range(n):
            if r_dte[i] and not devtlb_hit[i] and fault[i] == 0:
                shift = np.uint64(12 + 9 * np.int64(order[i]))
                f_sid[t] = np.uint64(sid[i])
                f_pasid[t] = np.uint64(pasid[i])
                f_addr[t] = addr[i]
                f_order[t] = np.uint64(order[i])
                f_hpa[t] = (hpa[i] >> shift) << shift
                f_perm[t] = np.uint64(perm[i])
                t += 1
        _fill(dtlb, dtlb_counts, f_sid, f_pasid, f_addr, f_order, f_hpa, f_perm,
              np.zeros(nf, np.uint64))
    for i in range(n):
        out[i]["hpa"] = hpa[i]
        out[i]["fault"] = fault[i]
        out[i]["stage"] = stage[i]
        out[i]["walk_refs"] = walk_refs[i]
        out[i]["ctx_refs"] = req[i, R_CTX_REFS]
        out[i]["iotlb_hit"] = iotlb_hit[i] or devtlb_hit[i]
        out[i]["page_order"] = order[i]
    return stats, devtlb_hit
