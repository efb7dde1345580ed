"""Context-cache and PASID-cache look-up, fill and invalidation: numba kernels on one array.

VT-d spec 6.2.1 (context-cache: scalable-mode context entries keyed by source-id) and 6.2.2
(PASID-cache: PASID-table entries keyed (source-id, PASID), tagged with the entry's DID);
invalidation as 6.5.2.1 (descriptor 0x1, device-selective with QEMU
vtd_context_device_invalidate's function mask) and 6.5.2.5 (0x7 global, domain- and
PASID-selective). Placement, LRU and counters as host_iommu/reference_cache.py's RefSetAssoc
for a key without a page field: the set is the key fields mixed with SET_MIX modulo the
sets; a look-up stamps the clock on a hit and advances the clock by one; a fill replaces the
line of the same key, else takes the lowest free way, else evicts the oldest stamp (the first
of equals). The kernels keep only keys, DIDs and stamps; the decoded entry a hit gives is a
Python object the wrapper (host_iommu/entrycache.py) holds per line, indexed by the line
number the kernels return. Tested against the plain-int caches they replaced and RefSetAssoc
(tests/host_iommu/test_kernel_entrycache.py, test_entrycache.py).

State: one int64 array, a header then five planes of ``sets * ways`` lines (line = set *
ways + way), so each call passes a single array:

    st[H_CLOCK .. H_INVALIDATED]   clock, hits, misses, fills, evictions, invalidated
    st[H_SETS], st[H_WAYS]         geometry
    st[H_NKEYS]                    key fields: 1 (sid) or 2 (sid, pasid)
    st[HDR + P * lines + line]     plane P (P_VALID, P_SID, P_PASID, P_DID, P_STAMP)

Keys and DIDs are int64 (source-id 16 bits, PASID 20 bits, DID 16 bits in use); the set hash
mixes their 64-bit patterns as uint64, as RefSetAssoc does on Python ints.

Beside ``st`` each cache keeps ``vals`` int64[lines, NVALS]: the decoded entry's fields as
numbers, written by the wrapper at fill (V_OK 0: the entry has no numeric form, so a hit on
it is left to Python). ``contexts_hit`` runs a translate batch's context stage on them when
every distinct (sid, pasid) hits both caches (HostIommu._resolve on hits only: no fetch);
otherwise it changes nothing and the caller resolves the batch in Python. The host's epoch
kernel then calls ``contexts_fetch``: HostIommu._resolve whole, the misses fetched from host
memory (ScalableModeTables.fetch_context / fetch_pasid_entry: VT-d spec 9.2 root entry, 9.4
scalable-mode context entry, 9.5 PASID directory entry, 9.6 PASID table entry, with their
fault reasons and FPD) and filled into both caches look-up for look-up, fill for fill. It
declines (changing nothing) only for a key whose cached line holds an entry Python put there
with no numeric form.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu import pasid
from host_iommu.defs import (
    MAX_PASID,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
    FaultReason,
)
from host_iommu.iotlb import SET_MIX
from host_iommu.kernels.translate import (
    C_FL_LEVELS,
    C_FLPTR,
    C_PGTT,
    C_SL_LEVELS,
    C_SLPTR,
    C_SSADE,
    R_CTX,
    R_CTX_REFS,
    R_DID,
    R_DTE,
    R_FAULT,
    R_FPD,
)

H_CLOCK, H_HITS, H_MISSES, H_FILLS, H_EVICTIONS, H_INVALIDATED, H_SETS, H_WAYS, H_NKEYS = (
    range(9))
HDR = 9
P_VALID, P_SID, P_PASID, P_DID, P_STAMP = range(5)
PLANES = 5
# Invalidation kinds (_invalidate's ``kind``): every line; every line of a DID; lines of a
# (DID, PASID); lines whose source-id matches under a mask; the line of one (sid, pasid).
INV_ALL, INV_DID, INV_DID_PASID, INV_SID, INV_SID_PASID = range(5)
# Decoded-entry fields per line (``vals`` columns). Context-cache: V_OK, V_FPD, V_DTE and the
# rest of pasid.ContextEntry (V_PDIR, V_PDTS, V_RID_PASID). PASID cache: V_OK, V_FAULT (the
# decoded fault reason, 0 for an entry), V_FPD (0 for a fault), and for an entry its walk
# inputs V_PGTT .. V_SSADE, V_DID and the rest of pasid.PasidEntry (V_SRE, V_PGSNP).
# Pointers (V_FLPTR, V_SLPTR, V_PDIR) are the address's 64-bit pattern as int64. V_KFILL: the
# line was filled by ``contexts_fetch``; the wrapper builds its decoded entry from these
# fields when Python first asks for it (host_iommu/entrycache.py).
(V_OK, V_FAULT, V_FPD, V_DTE, V_PGTT, V_DID, V_FLPTR, V_FL_LEVELS, V_SLPTR, V_SL_LEVELS,
 V_SSADE, V_PDIR, V_PDTS, V_RID_PASID, V_SRE, V_PGSNP, V_KFILL) = range(17)
NVALS = 17
MAX_KEYS = 64   # contexts_hit declines a batch of more distinct (sid, pasid) than this
F_ROOT_ENTRY_P = int(FaultReason.ROOT_ENTRY_P)
F_PASID_DIR_ACCESS_ERR = int(FaultReason.PASID_DIR_ACCESS_ERR)
F_CONTEXT_ENTRY_P = int(FaultReason.CONTEXT_ENTRY_P)
F_CONTEXT_ENTRY_RSVD = int(FaultReason.CONTEXT_ENTRY_RSVD)
F_CONTEXT_PASIDE = int(FaultReason.CONTEXT_PASIDE)
F_CONTEXT_PASID_MAX = int(FaultReason.CONTEXT_PASID_MAX)
F_PASID_DIR_ENTRY_P = int(FaultReason.PASID_DIR_ENTRY_P)
F_PASID_DIR_ENTRY_RSVD = int(FaultReason.PASID_DIR_ENTRY_RSVD)
F_PASID_TABLE_ACCESS_ERR = int(FaultReason.PASID_TABLE_ACCESS_ERR)
F_PASID_ENTRY_P = int(FaultReason.PASID_ENTRY_P)
F_PASID_ENTRY_RSVD = int(FaultReason.PASID_ENTRY_RSVD)
F_PASID_TABLE_ENTRY_INV = int(FaultReason.PASID_TABLE_ENTRY_INV)
# Entry fields as host_iommu/pasid.py names them (VT-d spec 9.2, 9.4-9.6), as int64 bit
# patterns: a pointer field keeps bits 63:12 (PTR_MASK); frames are pointer >> 12.
PTR_MASK = -4096                     # bits 63:12 (pasid.PAGE_MASK as int64)
RE_LP = pasid.RE_LP                  # root entry: context table present (either half)
CE_P, CE_FPD, CE_DTE, CE_PASIDE = pasid.CE_P, pasid.CE_FPD, pasid.CE_DTE, pasid.CE_PASIDE
CE_PDTS_SHIFT = pasid.CE_PDTS_SHIFT
CE_RSVD_W0, CE_RID_PASID_MASK = pasid.CE_RSVD_W0, pasid.CE_RID_PASID_MASK
PDE_P, PDE_FPD, PDE_RSVD = pasid.PDE_P, pasid.PDE_FPD, pasid.PDE_RSVD
PASID_PDE_SHIFT, PASID_PTE_MASK = pasid.PASID_PDE_SHIFT, pasid.PASID_PTE_MASK
PE_P, PE_FPD, PE_SSADE = pasid.PE_P, pasid.PE_FPD, pasid.PE_SSADE
PE_AW_SHIFT, PE_PGTT_SHIFT, PE_FLPM_SHIFT = pasid.PE_AW_SHIFT, pasid.PE_PGTT_SHIFT, (
    pasid.PE_FLPM_SHIFT)
PE_DID_MASK, PE_PGSNP, PE_SRE = pasid.PE_DID_MASK, pasid.PE_PGSNP, pasid.PE_SRE
PE_W0_RSVD, PE_W2_RSVD = pasid.PE_W0_RSVD, pasid.PE_W2_RSVD


def new_state(entries: int, ways: int, nkeys: int) -> np.ndarray:
    """A zeroed state (header and planes) for ``entries`` lines of ``ways`` ways."""
    if entries < 0 or ways < 1 or entries % ways:
        raise ValueError(f"entries={entries} must be a non-negative multiple of ways={ways}")
    st = np.zeros(HDR + PLANES * entries, dtype=np.int64)
    st[H_SETS], st[H_WAYS], st[H_NKEYS] = entries // ways, ways, nkeys
    return st


@njit(cache=True)
def _set_of(st, sid, pasid):
    """Set of the key: h = ((h ^ k) * SET_MIX) mod 2^64, h ^= h >> 32 per key field."""
    mix = np.uint64(SET_MIX)
    sh = np.uint64(32)
    h = (np.uint64(0) ^ np.uint64(sid)) * mix
    h ^= h >> sh
    if st[H_NKEYS] == 2:
        h = (h ^ np.uint64(pasid)) * mix
        h ^= h >> sh
    return int(h % np.uint64(st[H_SETS]))


@njit(cache=True)
def _find(st, s, sid, pasid):
    """Line of set ``s`` holding the key (sid, pasid), or -1."""
    ways = st[H_WAYS]
    lines = st[H_SETS] * ways
    for line in range(s * ways, s * ways + ways):
        if (st[HDR + P_VALID * lines + line] == 1 and st[HDR + P_SID * lines + line] == sid
                and st[HDR + P_PASID * lines + line] == pasid):
            return line
    return -1


@njit(cache=True)
def _lookup(st, sid, pasid):
    """Look one key up: the line that holds it (its stamp set to the clock) or -1.

    st: the state (module docstring); sid, pasid: the key (pasid 0 for the context-cache).
    Counts a hit or a miss and advances the clock by one either way.
    """
    clock = st[H_CLOCK]
    st[H_CLOCK] = clock + 1
    if st[H_SETS] > 0:
        line = _find(st, _set_of(st, sid, pasid), sid, pasid)
        if line >= 0:
            st[HDR + P_STAMP * (st[H_SETS] * st[H_WAYS]) + line] = clock
            st[H_HITS] += 1
            return line
    st[H_MISSES] += 1
    return -1


@njit(cache=True)
def _fill(st, sid, pasid, did):
    """Insert or replace the line of (sid, pasid) with ``did``; returns the line, or -1 when
    the cache has no sets (then nothing is counted). Advances the clock by one.

    The line of the same key is replaced; otherwise the lowest-numbered free way, otherwise
    the way with the oldest stamp (the first of equals) is evicted.
    """
    clock = st[H_CLOCK]
    st[H_CLOCK] = clock + 1
    sets = st[H_SETS]
    if sets == 0:
        return -1
    st[H_FILLS] += 1
    ways = st[H_WAYS]
    lines = sets * ways
    s = _set_of(st, sid, pasid)
    line = _find(st, s, sid, pasid)
    if line < 0:
        for cand in range(s * ways, s * ways + ways):
            if st[HDR + P_VALID * lines + cand] == 0:
                line = cand
                break
    if line < 0:
        line = s * ways
        stamp = HDR + P_STAMP * lines
        for cand in range(s * ways + 1, s * ways + ways):
            if st[stamp + cand] < st[stamp + line]:
                line = cand
        st[H_EVICTIONS] += 1
    st[HDR + P_VALID * lines + line] = 1
    st[HDR + P_SID * lines + line] = sid
    st[HDR + P_PASID * lines + line] = pasid
    st[HDR + P_DID * lines + line] = did
    st[HDR + P_STAMP * lines + line] = clock
    return line


@njit(cache=True)
def _invalidate(st, kind, sid, sid_keep, pasid, did):
    """Drop the lines one invalidation selects; returns how many.

    kind: INV_*; sid, pasid, did: the descriptor's fields (those the kind names); sid_keep:
    the source-id bits compared by INV_SID (all ones, or the function mask's complement for
    a context-cache device-selective invalidation).
    """
    lines = st[H_SETS] * st[H_WAYS]
    want = sid & sid_keep
    dropped = 0
    for line in range(lines):
        if st[HDR + P_VALID * lines + line] == 0:
            continue
        if kind == INV_ALL:
            drop = True
        elif kind == INV_DID:
            drop = st[HDR + P_DID * lines + line] == did
        elif kind == INV_DID_PASID:
            drop = (st[HDR + P_DID * lines + line] == did
                    and st[HDR + P_PASID * lines + line] == pasid)
        elif kind == INV_SID:
            drop = (st[HDR + P_SID * lines + line] & sid_keep) == want
        else:
            drop = (st[HDR + P_SID * lines + line] == sid
                    and st[HDR + P_PASID * lines + line] == pasid)
        if drop:
            st[HDR + P_VALID * lines + line] = 0
            dropped += 1
    st[H_INVALIDATED] += dropped
    return dropped


@njit(cache=True, inline="always")
def _scatter(req, keys, n, uk, fault, did, dte, fpd, refs, nu, fetched):
    """Each request's context-stage result from its key's (``keys[i]``, sorted; < 0: no
    root entry (-2) or no PASID directory) row ``u`` of the distinct keys ``uk``: fault,
    DID, device-TLB enable, context row (``nu``: none), FPD, and the structure references
    it paid (``fetched``: the first request of a key pays its fetches, ``refs[u]``; else
    every request pays 0)."""
    u = 0
    prev = np.int64(-3)
    for i in range(n):
        k = keys[i]
        if k < 0:
            req[i, R_FAULT] = F_ROOT_ENTRY_P if k == -2 else F_PASID_DIR_ACCESS_ERR
            req[i, R_DID] = 0
            req[i, R_DTE] = 0
            req[i, R_CTX] = nu
            req[i, R_CTX_REFS] = 0
            req[i, R_FPD] = 0
        else:
            if k != prev:
                u = np.searchsorted(uk, k)
                prev = k
            req[i, R_FAULT] = fault[u]
            req[i, R_DID] = did[u]
            req[i, R_DTE] = dte[u]
            req[i, R_CTX] = u
            if fetched:
                req[i, R_CTX_REFS] = refs[u]
                refs[u] = 0
            else:
                req[i, R_CTX_REFS] = 0
            req[i, R_FPD] = fpd[u]


@njit(cache=True)
def contexts_hit(sid, pasid, cst, cval, pst, pval, req, ctx):
    """The context stage of a batch whose every distinct (sid, pasid) hits both caches.

    sid, pasid: int64[n] (C-contiguous); cst/cval, pst/pval: the context- and PASID-cache
    states and their ``vals``; req int64[n, 6], ctx uint64[n + 1, 6]: outputs
    (host_iommu/kernels/translate.py R_* and C_*). Returns the number of resolved rows
    (row ``nu`` holds the defaults malformed requests point to), or -1 when some distinct
    key misses a cache (or hits a line without numeric fields), or the batch has more than
    MAX_KEYS distinct keys: then no state has changed.

    As HostIommu._contexts: malformed ids (sid outside 16 bits: ROOT_ENTRY_P; PASID outside
    20 bits: PASID_DIR_ACCESS_ERR) resolve nothing; the others are resolved once per
    distinct (sid, pasid) in ascending (sid << 20 | pasid) order, each a context-cache then
    a PASID-cache look-up (both hits: no structure fetch, so every request pays 0 refs).
    """
    n = sid.size
    keys = np.empty(n, np.int64)
    # the distinct valid keys, ascending: insertion into a short sorted array (a batch has
    # few; a run of equal keys costs one comparison)
    room = np.empty(MAX_KEYS, np.int64)
    nu = 0
    prev = np.int64(-3)
    for i in range(n):
        s = sid[i]
        p = pasid[i]
        if s < 0 or s > 0xFFFF:
            keys[i] = -2
            continue
        if p < 0 or p > MAX_PASID:
            keys[i] = -1
            continue
        k = (s << 20) | p
        keys[i] = k
        if k == prev:
            continue
        prev = k
        at = np.searchsorted(room[:nu], k)
        if at < nu and room[at] == k:
            continue
        if nu == room.size:
            return -1       # many distinct keys (misses likely): Python resolves them
        for j in range(nu, at, -1):
            room[j] = room[j - 1]
        room[at] = k
        nu += 1
    uk = room[:nu]
    # probe first, without stamps or counters: a miss anywhere leaves it all to Python
    for u in range(nu):
        s = uk[u] >> 20
        p = uk[u] & MAX_PASID
        if cst[H_SETS] == 0 or pst[H_SETS] == 0:
            return -1
        c = _find(cst, _set_of(cst, s, 0), s, 0)
        if c < 0 or cval[c, V_OK] == 0:
            return -1
        q = _find(pst, _set_of(pst, s, p), s, p)
        if q < 0 or pval[q, V_OK] == 0:
            return -1
    fault = np.empty(nu, np.int64)
    did = np.empty(nu, np.int64)
    dte = np.empty(nu, np.int64)
    fpd = np.empty(nu, np.int64)
    for u in range(nu):
        s = uk[u] >> 20
        p = uk[u] & MAX_PASID
        c = _lookup(cst, s, 0)
        q = _lookup(pst, s, p)
        f = pval[q, V_FAULT]
        fault[u] = f
        dte[u] = 1 if cval[c, V_DTE] != 0 and f == 0 else 0
        fpd[u] = 1 if cval[c, V_FPD] != 0 or pval[q, V_FPD] != 0 else 0
        if f == 0:
            did[u] = pval[q, V_DID]
            ctx[u, C_PGTT] = pval[q, V_PGTT]
            ctx[u, C_FLPTR] = np.uint64(pval[q, V_FLPTR])
            ctx[u, C_FL_LEVELS] = pval[q, V_FL_LEVELS]
            ctx[u, C_SLPTR] = np.uint64(pval[q, V_SLPTR])
            ctx[u, C_SL_LEVELS] = pval[q, V_SL_LEVELS]
            ctx[u, C_SSADE] = pval[q, V_SSADE]
        else:
            did[u] = 0
            ctx[u, C_PGTT] = 0
            ctx[u, C_FLPTR] = 0
            ctx[u, C_FL_LEVELS] = 4
            ctx[u, C_SLPTR] = 0
            ctx[u, C_SL_LEVELS] = 4
            ctx[u, C_SSADE] = 0
    ctx[nu, C_PGTT] = 0
    ctx[nu, C_FLPTR] = 0
    ctx[nu, C_FL_LEVELS] = 4
    ctx[nu, C_SLPTR] = 0
    ctx[nu, C_SL_LEVELS] = 4
    ctx[nu, C_SSADE] = 0
    _scatter(req, keys, n, uk, fault, did, dte, fpd, fpd, nu, False)   # refs: none read
    return nu


@njit(cache=True)
def _read(slab, slot_of, frame, idx):
    """HostMemory.read_u64 of entry ``idx`` of ``frame`` as int64 bits: 0 for a frame outside
    memory (a pointer with bit 63 set gives a negative frame) or holding no table."""
    if frame < 0 or frame >= slot_of.shape[0]:
        return np.int64(0)
    slot = slot_of[frame]
    if slot < 0:
        return np.int64(0)
    return np.int64(slab[slot, idx])


@njit(cache=True)
def _fetch_context(slab, slot_of, rtaddr, sid, out):
    """ScalableModeTables.fetch_context of ``sid``: the fault reason (0: none) and the
    references made; a present entry's fields go to out[V_FPD, V_DTE, V_PDIR, V_PDTS,
    V_RID_PASID] (spec 9.2 root entry, 9.4 scalable-mode context entry)."""
    bus, devfn = sid >> 8, sid & 0xFF
    re = _read(slab, slot_of, rtaddr >> 12, ((rtaddr >> 3) & 511) + 2 * bus
               + (1 if devfn >= 128 else 0))
    if not re & RE_LP:
        return F_ROOT_ENTRY_P, 1
    frame = (re & PTR_MASK) >> 12
    w0 = _read(slab, slot_of, frame, (devfn & 0x7F) * 4)
    if not w0 & CE_P:
        return F_CONTEXT_ENTRY_P, 2
    if w0 & CE_RSVD_W0:
        return F_CONTEXT_ENTRY_RSVD, 2
    if not w0 & CE_PASIDE:
        return F_CONTEXT_PASIDE, 2
    w1 = _read(slab, slot_of, frame, (devfn & 0x7F) * 4 + 1)
    out[V_FPD] = 1 if w0 & CE_FPD else 0
    out[V_DTE] = 1 if w0 & CE_DTE else 0
    out[V_PDIR] = w0 & PTR_MASK
    out[V_PDTS] = (w0 >> CE_PDTS_SHIFT) & 7
    out[V_RID_PASID] = w1 & CE_RID_PASID_MASK
    return 0, 2


@njit(cache=True)
def _fetch_pasid(slab, slot_of, pdir, pdts, cfpd, pasid_, out):
    """ScalableModeTables.fetch_pasid_entry through a context entry (PASID directory
    ``pdir``, PDTS, FPD) and decode_pasid_entry (spec 9.5, 9.6): (fault reason, 0 for an
    entry; references; FPD). An entry's fields go to out[V_FPD .. V_PGSNP] (V_FAULT 0)."""
    d = pasid_ >> PASID_PDE_SHIFT
    if d >= (1 << (pdts + 7)):
        return F_CONTEXT_PASID_MAX, 0, cfpd
    dframe = (pdir >> 12) + (d >> 9) if pdir >= 0 else np.int64(-1)
    pde = _read(slab, slot_of, dframe, d & 511)
    if not pde & PDE_P:
        return F_PASID_DIR_ENTRY_P, 1, cfpd
    fpd = 1 if cfpd or pde & PDE_FPD else 0
    if pde & PDE_RSVD:
        return F_PASID_DIR_ENTRY_RSVD, 1, fpd
    tframe = (pde & PTR_MASK) >> 12
    if tframe < 0 or tframe >= slot_of.shape[0]:
        return F_PASID_TABLE_ACCESS_ERR, 1, fpd
    base = (pasid_ & PASID_PTE_MASK) * 8
    w0 = _read(slab, slot_of, tframe, base)
    w1 = _read(slab, slot_of, tframe, base + 1)
    w2 = _read(slab, slot_of, tframe, base + 2)
    if not w0 & PE_P:
        return F_PASID_ENTRY_P, 2, 1 if fpd or w0 & PE_FPD else 0
    pgtt = (w0 >> PE_PGTT_SHIFT) & 7
    aw = (w0 >> PE_AW_SHIFT) & 7
    flpm = (w2 >> PE_FLPM_SHIFT) & 3
    rest = 0
    for k in range(3, 8):
        rest |= _read(slab, slot_of, tframe, base + k)
    uses_sl = pgtt in (PGTT_SL_ONLY, PGTT_NESTED)
    uses_fl = pgtt in (PGTT_FL_ONLY, PGTT_NESTED)
    f = 0
    if w0 & PE_W0_RSVD or w2 & PE_W2_RSVD or rest != 0:
        f = F_PASID_ENTRY_RSVD
    elif (pgtt not in (PGTT_FL_ONLY, PGTT_SL_ONLY, PGTT_NESTED, PGTT_PT)
          or (uses_sl and not 1 <= aw <= 3) or (uses_fl and flpm > 1)):
        f = F_PASID_TABLE_ENTRY_INV     # PGTT, AW or FLPM without a meaning (spec 9.6)
    if f:
        return f, 2, 1 if fpd or w0 & PE_FPD else 0
    out[V_FAULT] = 0
    out[V_FPD] = 1 if w0 & PE_FPD else 0
    out[V_PGTT] = pgtt
    out[V_DID] = w1 & PE_DID_MASK
    out[V_SLPTR] = w0 & PTR_MASK
    out[V_SL_LEVELS] = aw + 2 if 1 <= aw <= 3 else 4        # pasid.SL_LEVELS_BY_AW
    out[V_SSADE] = 1 if w0 & PE_SSADE else 0
    out[V_FLPTR] = w2 & PTR_MASK
    out[V_FL_LEVELS] = 5 if flpm == 1 else 4                 # pasid.FL_LEVELS_BY_FLPM
    out[V_SRE] = 1 if w2 & PE_SRE else 0
    out[V_PGSNP] = 1 if w1 & PE_PGSNP else 0
    return 0, 2, 1 if fpd or w0 & PE_FPD else 0


@njit(cache=True)
def contexts_fetch(sid, pasid, cst, cval, pst, pval, slab, slot_of, rtaddr, req, ctx):
    """The context stage of any batch, misses included: HostIommu._contexts with
    HostIommu._resolve per distinct (sid, pasid), fetching root, context, PASID-directory
    and PASID-table entries from host memory (``slab``, ``slot_of``; root table at
    ``rtaddr``) and filling both caches as the Python stage does, look-up for look-up and
    fill for fill (so clocks, stamps, counters and evictions are its own).

    Arguments as contexts_hit's, and the memory. Returns the number of resolved rows, or
    -1, with no state changed, when some distinct key has a line whose entry has no numeric
    form (V_OK 0: an object Python put there), which Python must resolve. A line filled
    here has V_KFILL set: its decoded entry is built from ``vals`` when Python asks.
    """
    n = sid.size
    keys = np.empty(n, np.int64)
    nv = 0
    for i in range(n):
        s = sid[i]
        p = pasid[i]
        if s < 0 or s > 0xFFFF:
            keys[i] = -2
        elif p < 0 or p > MAX_PASID:
            keys[i] = -1
        else:
            keys[i] = (s << 20) | p
            nv += 1
    srt = np.empty(nv, np.int64)
    j = 0
    for i in range(n):
        if keys[i] >= 0:
            srt[j] = keys[i]
            j += 1
    srt.sort()
    nu = 0
    for i in range(nv):
        if nu == 0 or srt[i] != srt[nu - 1]:
            srt[nu] = srt[i]
            nu += 1
    uk = srt[:nu]
    # probe first: a line of a key that Python filled with a non-numeric entry stays Python's
    for u in range(nu):
        s = uk[u] >> 20
        p = uk[u] & MAX_PASID
        if cst[H_SETS] > 0:
            c = _find(cst, _set_of(cst, s, 0), s, 0)
            if c >= 0 and cval[c, V_OK] == 0:
                return -1
        if pst[H_SETS] > 0:
            q = _find(pst, _set_of(pst, s, p), s, p)
            if q >= 0 and pval[q, V_OK] == 0:
                return -1
    fault = np.zeros(nu, np.int64)
    did = np.zeros(nu, np.int64)
    dte = np.zeros(nu, np.int64)
    fpd = np.zeros(nu, np.int64)
    refs = np.zeros(nu, np.int64)
    ce = np.zeros(NVALS, np.int64)
    pe = np.zeros(NVALS, np.int64)
    for u in range(nu + 1):
        ctx[u, C_PGTT] = 0
        ctx[u, C_FLPTR] = 0
        ctx[u, C_FL_LEVELS] = 4
        ctx[u, C_SLPTR] = 0
        ctx[u, C_SL_LEVELS] = 4
        ctx[u, C_SSADE] = 0
    for u in range(nu):
        s = uk[u] >> 20
        p = uk[u] & MAX_PASID
        # --- the context entry: context-cache, else root and context fetch (then a fill)
        c = _lookup(cst, s, 0)
        if c >= 0:
            ce[:] = cval[c]
        else:
            ce[:] = 0
            f, r = _fetch_context(slab, slot_of, rtaddr, s, ce)
            refs[u] = r
            if f:
                fault[u] = f
                continue
            line = _fill(cst, s, 0, 0)
            if line >= 0:
                ce[V_OK] = 1
                ce[V_KFILL] = 1
                cval[line] = ce
        # --- the PASID entry: PASID-cache, else directory and table fetch (then a fill)
        cdte = ce[V_DTE]
        q = _lookup(pst, s, p)
        if q >= 0:
            pe[:] = pval[q]
            f = pe[V_FAULT]
            fp = 1 if ce[V_FPD] != 0 or pe[V_FPD] != 0 else 0
        else:
            pe[:] = 0
            f, r, fp = _fetch_pasid(slab, slot_of, ce[V_PDIR], ce[V_PDTS], ce[V_FPD], p, pe)
            refs[u] += r
            if f == 0:
                line = _fill(pst, s, p, pe[V_DID])
                if line >= 0:
                    pe[V_OK] = 1
                    pe[V_KFILL] = 1
                    pval[line] = pe
        fault[u] = f
        fpd[u] = fp
        if f == 0:
            dte[u] = 1 if cdte != 0 else 0
            did[u] = pe[V_DID]
            ctx[u, C_PGTT] = pe[V_PGTT]
            ctx[u, C_FLPTR] = np.uint64(pe[V_FLPTR])
            ctx[u, C_FL_LEVELS] = pe[V_FL_LEVELS]
            ctx[u, C_SLPTR] = np.uint64(pe[V_SLPTR])
            ctx[u, C_SL_LEVELS] = pe[V_SL_LEVELS]
            ctx[u, C_SSADE] = pe[V_SSADE]
    _scatter(req, keys, n, uk, fault, did, dte, fpd, refs, nu, True)
    return nu
