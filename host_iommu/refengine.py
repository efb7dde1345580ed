"""The reference translate engine: HostIommu.translate request by request on the references.

``IommuParams.with_engine("reference")`` makes a HostIommu translate through this module: the
caches are host_iommu/reference_cache.py's plain-list models (IOTLB, paging-structure caches,
PASID and context caches, device-TLB) and the walks host_iommu/reference.py's
ReferenceWalker, written from the VT-d spec (chapter 3 translation, chapter 6 caching) and
sharing no code with the kernels of the fast engine. Everything else of the host (memory,
tables, invalidation queue, fault log) is the same object, so a whole run on each engine must
give the same result tables (tests/system/test_fast_vs_reference.py).

The batch semantics are those HostIommu documents (host_iommu/iommu.py, docs/architecture.md
"How a DMA is translated"), here as one loop per step over the requests in order:

1. context: each distinct (sid, pasid) is resolved once, in ascending (sid, pasid) order,
   through the context and PASID caches (filled on a miss at once); its first request pays
   the structure fetches;
2. device-TLB look-up for ATS devices, then the IOTLB for the rest (VT-d 6.2.3: a hit needs
   the access's permission), all against the caches as the batch found them;
3. the misses of one (DID, PASID, 4-KiB page, access) are walked once by the first of them;
   the others take its outcome (an IOTLB hit when an IOTLB holds the fill, else a walk of
   their own); paging-structure caches are filled after the batch (ReferenceWalker);
4. IOTLB fills of the walks, then device-TLB fills of the ATS completions, in request order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    MAX_PASID,
    RESULT_DTYPE,
    FaultReason,
    Stage,
)
from host_iommu.pasid import ContextEntry, ContextResult, decode_pasid_entry
from host_iommu.reference import ReferenceWalker, RefRequest
from host_iommu.reference_cache import (
    RefContextCache,
    RefDeviceTLB,
    RefIOTLB,
    RefPagingStructureCache,
    RefPasidCache,
)

if TYPE_CHECKING:
    from host_iommu.iommu import CacheSet, HostIommu

PAGE = 4096


# The reference caches, in CacheSet's order (IOTLB, paging-structure cache, PASID cache,
# context cache, device-TLB): HostIommu's CacheSet built on them dispatches each invalidation
# to them exactly as to the live caches (which caches a descriptor reaches is not what the
# reference engine checks; how each cache drops what it names is).
CACHE_KINDS = (RefIOTLB, RefPagingStructureCache, RefPasidCache, RefContextCache, RefDeviceTLB)


def make_walker(host: HostIommu, caches: CacheSet) -> ReferenceWalker:
    return ReferenceWalker(host.mem, host.p.haw, caches.fl_pwc, caches.sl_pwc)


def resolve(host: HostIommu, caches: CacheSet, sid: int, pasid: int) -> ContextResult:
    """Root, context and PASID entries of (sid, pasid) through the reference caches."""
    refs = 0
    got = caches.ctxc.lookup(sid)
    if got is not None:
        ce = ContextEntry.decode(got[1], got[2])
    else:
        ce, fault, refs = host.sm.fetch_context(sid)
        if ce is None:
            return ContextResult(None, fault, refs)
        caches.ctxc.fill(sid, *ce.words())
    got = caches.pasidc.lookup(sid, pasid)
    if got is not None:
        entry = decode_pasid_entry(list(got[1:]))
        if isinstance(entry, FaultReason):
            return ContextResult(None, entry, refs, ce.fpd, ce.dte)
        return ContextResult(entry, FaultReason.NONE, refs, ce.fpd or entry.fpd, ce.dte)
    entry, fault, more, fpd = host.sm.fetch_pasid_entry(ce, pasid)
    if entry is not None:
        caches.pasidc.fill(sid, pasid, entry.did, entry.encode())
    return ContextResult(entry, fault, refs + more, fpd, ce.dte)


def translate(host: HostIommu, sid: np.ndarray, pasid: np.ndarray, addr: np.ndarray,
              access: np.ndarray, t_ns: np.ndarray | None = None) -> np.ndarray:
    """HostIommu.translate of a batch, one request at a time on the reference models."""
    caches: CacheSet = host.caches
    walker: ReferenceWalker = host.walker
    sids = [int(x) for x in np.asarray(sid).tolist()]
    pasids = [int(x) for x in np.asarray(pasid).tolist()]
    addrs = [int(x) & ((1 << 64) - 1) for x in np.asarray(addr).tolist()]
    accs = [int(x) for x in np.asarray(access).tolist()]
    n = len(sids)
    out = np.zeros(n, dtype=RESULT_DTYPE)
    if n == 0:
        return out
    hpa, fault, stage = [0] * n, [0] * n, [0] * n
    walk_refs, ctx_refs, order, perm = [0] * n, [0] * n, [0] * n, [0] * n
    iotlb_hit, devtlb_hit = [False] * n, [False] * n

    # 1. context resolution, once per distinct well-formed (sid, pasid)
    ctx: list[ContextResult | None] = [None] * n
    keys = {}
    for i in range(n):
        if not 0 <= sids[i] <= 0xFFFF:
            fault[i], stage[i] = FaultReason.ROOT_ENTRY_P, Stage.CONTEXT
        elif not 0 <= pasids[i] <= MAX_PASID:
            fault[i], stage[i] = FaultReason.PASID_DIR_ACCESS_ERR, Stage.CONTEXT
        else:
            keys.setdefault((sids[i], pasids[i]), i)
    resolved = {k: resolve(host, caches, *k) for k in sorted(keys)}
    for k, first in keys.items():
        ctx_refs[first] = resolved[k].ctx_refs
    for i in range(n):
        cr = resolved.get((sids[i], pasids[i])) if fault[i] == 0 else None
        if cr is not None and cr.fault:
            fault[i], stage[i] = int(cr.fault), Stage.CONTEXT
        ctx[i] = cr

    def need(i: int) -> int:
        return 2 if accs[i] == ACCESS_WRITE else 1

    # 2. device-TLB (ATS devices), 3. IOTLB: both as the batch found them
    ats = [fault[i] == 0 and ctx[i].dte for i in range(n)]
    for i in range(n):
        if ats[i]:
            h, a, p, o = caches.dtlb.lookup(sids[i], pasids[i], addrs[i])
            if h[0] and (int(p[0]) & need(i)) == need(i):
                devtlb_hit[i], hpa[i], order[i] = True, int(a[0]), int(o[0])
    misses = []
    for i in range(n):
        if fault[i] or devtlb_hit[i]:
            continue
        h, a, p, o, _g = caches.iotlb.lookup(ctx[i].entry.did, pasids[i], addrs[i])
        if h[0] and (int(p[0]) & need(i)) == need(i):
            iotlb_hit[i], hpa[i], order[i], perm[i] = True, int(a[0]), int(o[0]), int(p[0])
        else:
            misses.append(i)

    # 4. walk the first miss of each (did, pasid, page, access); the others follow it
    leader_of: dict[tuple[int, int, int, int], int] = {}
    leaders = []
    for i in misses:
        key = (ctx[i].entry.did, pasids[i], addrs[i] >> 12, accs[i])
        if key not in leader_of:
            leader_of[key] = i
            leaders.append(i)
    walked = {}
    ad_before = walker.ad_writes
    for i in leaders:
        e = ctx[i].entry
        r = walker.translate(RefRequest(addrs[i], accs[i], e.pgtt, e.did, pasids[i], e.flptr,
                                        e.fl_levels, e.slptr, e.sl_levels, e.ssade), i)
        walked[i] = r
        hpa[i], fault[i], stage[i] = r.hpa, r.fault, r.stage
        walk_refs[i], order[i], perm[i] = r.refs, r.order, r.perm
    walker.flush_fills()
    host.stats.ad_writes += walker.ad_writes - ad_before
    has_iotlb = caches.iotlb.cache.sets > 0
    followers = 0
    for i in misses:
        lead = leader_of[(ctx[i].entry.did, pasids[i], addrs[i] >> 12, accs[i])]
        if lead == i:
            continue
        followers += 1
        r = walked[lead]
        ok = r.fault == 0
        hpa[i] = ((r.hpa & ~(PAGE - 1)) | (addrs[i] & (PAGE - 1))) if ok else 0
        fault[i], stage[i], order[i], perm[i] = r.fault, r.stage, r.order, r.perm
        if has_iotlb:
            iotlb_hit[i] = ok          # answered by the leader's fill
        else:
            walk_refs[i] = r.refs      # no IOTLB: it walks (and misses) itself
    for i in leaders:                  # IOTLB fills, in request order
        r = walked[i]
        if r.fault == 0:
            size = 1 << (12 + 9 * r.order)
            caches.iotlb.fill(ctx[i].entry.did, pasids[i], addrs[i], r.order,
                              r.hpa & ~(size - 1), r.perm, ctx[i].entry.pgtt)
    for i in range(n):
        if fault[i]:
            hpa[i] = 0
    for i in range(n):                 # device-TLB fills: every ATS completion sent
        if ats[i] and not devtlb_hit[i] and fault[i] == 0:
            size = 1 << (12 + 9 * order[i])
            caches.dtlb.fill(sids[i], pasids[i], addrs[i], order[i], hpa[i] & ~(size - 1),
                             perm[i])

    out["hpa"], out["fault"], out["stage"] = hpa, fault, stage
    out["walk_refs"], out["ctx_refs"], out["page_order"] = walk_refs, ctx_refs, order
    out["iotlb_hit"] = [a or b for a, b in zip(iotlb_hit, devtlb_hit, strict=True)]
    st = host.stats
    st.translations += n
    st.devtlb_hits += sum(devtlb_hit)
    st.iotlb_hits += sum(iotlb_hit)
    st.iotlb_misses += len(misses) - (followers if has_iotlb else 0)
    st.walk_refs += sum(walk_refs)
    st.ctx_refs += sum(ctx_refs)
    faulted = [i for i in range(n) if fault[i]]
    st.faults += len(faulted)
    if faulted:
        f = np.array(faulted)
        tt = (np.zeros(f.size, np.int64) if t_ns is None
              else np.maximum(np.asarray(t_ns, dtype=np.int64)[f], 0))
        host.faults.record(
            tt, np.array([host.owner_of_sid.get(sids[i], 0) for i in faulted]),
            np.array([min(max(sids[i], 0), 0xFFFF) for i in faulted]),
            np.array([min(max(pasids[i], 0), 0xFFFF_FFFF) for i in faulted]),
            np.array([addrs[i] for i in faulted], np.uint64),
            np.array([ACCESS_WRITE if accs[i] == ACCESS_WRITE else ACCESS_READ
                      for i in faulted]),
            np.array([fault[i] for i in faulted]), np.array([stage[i] for i in faulted]),
            fpd=np.array([ctx[i] is not None and ctx[i].fpd for i in faulted]))
    host.last_devtlb_hit = np.array(devtlb_hit, dtype=bool)
    return out
