"""A host's epoch of merged operations, as far as one compiled call can take it exactly.

HostServer.apply_epoch (host_iommu/server.py) walks the merged operations in (t_ns, vm, seq)
order. ``run_ops`` does the same walk from operation ``i`` and applies, in that order and with
the same batch cuts, every operation it can apply exactly as the Python loop would:

- the host's due effects first (HostIommu.advance_to: the pending invalidations whose effect
  time has come, through kernels/qiq.py ``_advance``, VT-d spec 6.5.2 "Queued Invalidation");
- a run of guest first-level stores of one VM (HostIommu.guest_write), cut where a queued
  invalidation takes effect, into table pages the host already holds;
- a one-entry IOMMU_HWPT_INVALIDATE whose descriptors the caller resolved (Linux
  intel_nested_cache_invalidate_user; nested.one_entry_descs), submitted through the queue's
  tail-write kernel as the host driver's qi_submit_sync does (kernels/qiq.py ``_submit``);
- an unmap's return (OP_UNMAP_RET: the host's completion against the guest's return, the
  unmap wait reported, the oracle's return time) and the retire of unmap ids (kept for the
  end of the epoch), on the oracle's arrays (oracle.ArrayOracle: dense ranges and the spill
  table, host_iommu/kernels/oracle.py).

- a run of DMAs (HostServer._dma), cut where a queued invalidation takes effect: its
  context stage (HostIommu._contexts) on the context and PASID caches, the misses fetched
  from the root, context, PASID-directory and PASID-table entries in host memory and filled
  as HostIommu._resolve does, faults included (kernels/entrycache.py contexts_hit, then
  contexts_fetch; VT-d spec 9.2-9.6, 6.2.1-6.2.2), the translate kernel
  (kernels/translate.py), the isolation check against the frame owners, the oracle's stale
  check and the per-VM tally; a run that faulted returns at once, so that Python writes its
  fault records (HostIommu._record_faults) in order.

- a VFIO map or unmap of a shadow container (HostServer._control -> vfio.vfio_map /
  vfio_unmap) in the common case kernels/vfio.py takes: pins, the container's record and the
  shadow table's 4-KiB leaves in host memory; for an unmap, the domain's IOTLB (+ device-TLB)
  flush and its wait submitted as the host driver does (IH set: no table page freed), the
  queue's stamp order and the oracle's return time as for a HWPT invalidation.

It stops, changing nothing of the operation it stops at, at anything else: a DMA run whose
key has a cache line holding an entry with no numeric form (one Python put there), a VFIO
operation kernels/vfio.py leaves to Python, second-level operations, an effect the Python
caches apply (context/PASID cache), a table frame to free, a store to a frame with no
table page yet, a refused or unresolved HWPT invalidation, a queue that is not clean or has
no room, an oracle record to create or to grow. Python applies that one operation its own
way and calls again, so the Python loop stays the description and the reference
(tests/host_iommu/test_kernel_epoch.py runs both on the same operations).

Per-VM counters go to rows of ``cnt`` (C_*), unmap waits and retired runs to rows of
``waits``/``retires``; the scalar state goes in and out through ``st`` (ST_*).

The server's preparation of an epoch runs here too: admission (``admit``), the guest stores'
host frames (``resolve_stores``, ``store_frames``), the kept resolutions of one-entry HWPT
invalidations (``inv_lookup``, ``inv_insert``) and the first sight of one: ``inv_encode``
writes the descriptors nested.one_entry_words encodes itself (a page-selective PASID-based
IOTLB invalidation with Linux calculate_psi_aligned_address's range, then the wait of
qi_submit_sync; VT-d spec 6.5.2.4, 6.5.2.8), so that a many-VM host, which sees hundreds
of new IOVA ranges an epoch, does not encode them one at a time in Python.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.defs import PAGE_SHIFT
from host_iommu.kernels.entrycache import contexts_fetch, contexts_hit
from host_iommu.kernels.oracle import spill_find, spill_put, spill_room
from host_iommu.kernels.qiq import (
    DECODED_FIELDS,
    E_T,
    ERR_NONE,
    M_DRIVER,
    P_END,
    P_FIRST,
    Q_ENTRIES,
    Q_HELD,
    Q_HI,
    Q_IQE,
    Q_ITE,
    Q_MAMV,
    S_OK,
    _advance,
    _decode,
    _submit,
)
from host_iommu.kernels.translate import (
    R_CTX_REFS,
    S_AD,
    S_DEVTLB_HITS,
    S_FAULTS,
    S_IOTLB_HITS,
    S_IOTLB_MISSES,
    S_WALK_REFS,
    translate_batch,
)
from host_iommu.kernels.vfio import (
    D_VM,
    META_ON,
    flush_words,
    map_apply,
    map_check,
    unmap_apply,
    unmap_check,
)
from host_iommu.protocol import (
    DMA_ROGUE,
    OP_DMA,
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_UNMAP_RET,
    OP_UNMAP_RETIRE,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
)

NEVER = (1 << 63) - 1
NONE = -1            # oracle: no return time

# Rows of the operation matrix ``m`` (int64[M_ROWS, n]): OP_DTYPE's fields (a0, a1 as their
# bits), then the resolved column: a guest store's host frame (-1: not backed), or the first
# word of a HWPT invalidation's descriptors in ``words`` (-1: Python applies it).
M_T, M_VM, M_OP, M_SID, M_PASID, M_A0, M_A1, M_A2, M_A3, M_RES, M_NDESC = range(11)
M_ROWS = 11

# ``st``: scalar state in and out. ST_DMA: whether DMA runs are translated here (the
# caches have numeric context fields); ST_HIT_NS, ST_REF_NS: CostModel.iotlb_hit_ns,
# mem_ref_ns; ST_FAULTED_I/J: a DMA run [i, j) translated here that faulted (its fault
# records are Python's: FaultLog), -1 if none; ST_LAST_I/J: the last DMA run translated here;
# ST_FETCH: whether a run whose contexts miss the caches is resolved here too
# (kernels/entrycache.py contexts_fetch: the root/context/PASID fetches and fills).
(ST_NEXT_EFFECT, ST_FREE_AT, ST_STAMP_MAX, ST_NOW, ST_OUT_OF_ORDER, ST_PTE_WRITES, ST_WAITS,
 ST_RETIRES, ST_DMA, ST_HIT_NS, ST_REF_NS, ST_FAULTED_I, ST_FAULTED_J, ST_LAST_I,
 ST_LAST_J, ST_FETCH) = range(16)
ST_FIELDS = 16

# ``cnt`` columns: per-VM counter deltas (HostServer.counters by name, CNT_NAMES), the ones
# of a DMA as HostServer._tally_each counts them; stale_window_max_ns is a maximum.
(C_DROPPED, C_INV_DESCS, C_TRANSLATIONS, C_IOTLB_HITS, C_IOTLB_MISSES, C_DEVTLB_HITS,
 C_WALK_REFS, C_CTX_REFS, C_FAULTS, C_STALE, C_CROSS, C_WINDOW_MAX, C_TRANSLATE_NS,
 C_ROGUE_FAULTED, C_ROGUE_CROSS, C_ROGUE_STALE, C_ROGUE_IN_FLIGHT,
 C_ROGUE_MISDIRECTED) = range(18)
CNT_FIELDS = 18
CNT_NAMES = ("guest_writes_dropped", "host_inv_descriptors", "translations", "iotlb_hits",
             "iotlb_misses", "devtlb_hits", "walk_refs", "ctx_refs", "faults", "stale_dma",
             "cross_vm_dma", "stale_window_max_ns", "translate_ns", "rogue_faulted",
             "rogue_cross_vm", "rogue_stale", "rogue_in_flight", "rogue_misdirected")
# ``tst``: HostIommu.stats deltas (TranslateStats), in this order.
TST_NAMES = ("translations", "iotlb_hits", "iotlb_misses", "devtlb_hits", "walk_refs",
             "ctx_refs", "faults", "ad_writes")

# Oracle segment columns (oracle.SEG_*).
SEG_OFF, SEG_SIZE, SEG_CAP, SEG_BASE, SEG_SPILL = range(5)


@njit(cache=True)
def _ora_get(seg, data, spk, spv, vm, uid):
    """oracle._VmTimes.get of (vm, uid), NONE for a VM with no record (uid >= 0)."""
    if vm >= seg.shape[0] or seg[vm, SEG_OFF] < 0:
        return NONE
    i = uid - seg[vm, SEG_BASE]
    if 0 <= i < seg[vm, SEG_SIZE]:
        return data[seg[vm, SEG_OFF] + i]
    if seg[vm, SEG_SPILL] == 0:
        return NONE
    s = spill_find(spk, vm, uid)
    return NONE if s < 0 else spv[s]


@njit(cache=True)
def _ora_can_set(seg, spk, spm, vm, uid):
    """Whether _ora_set can record (vm, uid) here: the VM has a record, and the id is in
    its dense range, or in reach of it (_VmTimes.set_max grows the range by doubling) and
    the segment has the capacity, or goes to the spill table (which has room); a segment
    that must move is left to Python."""
    if vm >= seg.shape[0] or seg[vm, SEG_OFF] < 0:
        return False
    size = seg[vm, SEG_SIZE]
    i = uid - seg[vm, SEG_BASE]
    if 0 <= i < size:
        return True
    if size <= i < 2 * size + 4096:
        return max(2 * size, i + 1) <= seg[vm, SEG_CAP]
    return spill_find(spk, vm, uid) >= 0 or spill_room(spk, spm)


@njit(cache=True)
def _ora_set(seg, data, spk, spv, spm, vm, uid, t):
    """_VmTimes.set_max(uid, t) of ``vm`` where _ora_can_set allowed it."""
    i = uid - seg[vm, SEG_BASE]
    size = seg[vm, SEG_SIZE]
    if size <= i < 2 * size + 4096:       # grow the dense range in its segment
        grown = max(2 * size, i + 1)
        off = seg[vm, SEG_OFF]
        data[off + size:off + grown] = NONE
        seg[vm, SEG_SIZE] = grown
    if 0 <= i < seg[vm, SEG_SIZE]:
        at = seg[vm, SEG_OFF] + i
        data[at] = max(max(data[at], 0), t)
        return
    s = spill_find(spk, vm, uid)
    old = NONE if s < 0 else spv[s]
    spill_put(spk, spv, spm, seg, vm, uid, max(max(old, 0), t))


@njit(cache=True)
def _search_left(t, lo, hi, key):
    """``lo + np.searchsorted(t[lo:hi], key, side="left")``: numpy's bisection, step for
    step, so that it answers as numpy does even where a hostile batch is not sorted."""
    a, b = 0, hi - lo
    while a < b:
        mid = a + ((b - a) >> 1)
        if t[lo + mid] < key:
            a = mid + 1
        else:
            b = mid
    return lo + a


@njit(cache=True)
def _dma_run(i, j, m, addr, access, st, tr, seg, data, spk, spv, cnt, tst, outb, reqb, devb):
    """HostServer._dma of the DMA run [i, j): the context stage when every (sid, pasid)
    hits both caches (contexts_hit; else False, nothing changed), the translate kernel, the
    statistics of HostIommu._account, the isolation and oracle checks and the per-VM tally
    (_tally_each). The run's results stay in outb/reqb/devb[i:j] (fault records: Python)."""
    (cst, cval, pst, pval, iotlb, iotlb_counts, dtlb, dtlb_counts, slab, slot_of, haw, amask,
     fl_rsvd, sl_rsvd, use_fl, fl_pwc, fl_counts, use_sl, sl_pwc, sl_counts, owner,
     rtaddr) = tr
    sid = m[M_SID, i:j]
    pasid = m[M_PASID, i:j]
    nb = j - i
    req = reqb[i:j]
    ctx = np.empty((nb + 1, 6), np.uint64)
    rows = contexts_hit(sid, pasid, cst, cval, pst, pval, req, ctx)
    if rows < 0 and st[ST_FETCH] != 0:
        rows = contexts_fetch(sid, pasid, cst, cval, pst, pval, slab, slot_of, rtaddr, req,
                              ctx)
    if rows < 0:
        return False
    out = outb[i:j]
    stats, devtlb_hit = translate_batch(
        sid, pasid, addr[i:j], access[i:j], req, ctx[:rows + 1], iotlb, iotlb_counts, dtlb,
        dtlb_counts, slab, slot_of, haw, amask, fl_rsvd, sl_rsvd, use_fl, fl_pwc, fl_counts,
        use_sl, sl_pwc, sl_counts, out)
    ctx_refs = 0
    for q in range(nb):
        ctx_refs += req[q, R_CTX_REFS]
        devb[i + q] = devtlb_hit[q]
    # HostIommu.translate / _account: TST_NAMES
    tst[0] += nb
    tst[1] += stats[S_IOTLB_HITS]
    tst[2] += stats[S_IOTLB_MISSES]
    tst[3] += stats[S_DEVTLB_HITS]
    tst[4] += stats[S_WALK_REFS]
    tst[5] += ctx_refs
    tst[6] += stats[S_FAULTS]
    tst[7] += stats[S_AD]
    hit_ns, ref_ns = st[ST_HIT_NS], st[ST_REF_NS]
    for q in range(nb):
        r = i + q
        vm = m[M_VM, r]
        t = m[M_T, r]
        uid = m[M_A3, r]
        ok = out[q].fault == 0
        crossed = False
        if ok:
            frame = np.int64(out[q].hpa >> np.uint64(PAGE_SHIFT))
            if frame >= owner.shape[0]:
                raise IndexError("epoch kernel: a translation past host memory")
            crossed = owner[frame] != vm
        stale = False
        if ok and uid >= 0:
            ret = _ora_get(seg, data, spk, spv, vm, uid)
            if ret != NONE and t > ret:
                stale = True
                cnt[vm, C_STALE] += 1
                cnt[vm, C_WINDOW_MAX] = max(cnt[vm, C_WINDOW_MAX], t - ret)
        walk = np.int64(out[q].walk_refs)
        cref = np.int64(out[q].ctx_refs)
        cnt[vm, C_TRANSLATIONS] += 1
        if out[q].iotlb_hit:
            cnt[vm, C_IOTLB_HITS] += 1
            cnt[vm, C_TRANSLATE_NS] += hit_ns
        else:
            if walk > 0:
                cnt[vm, C_IOTLB_MISSES] += 1
            cnt[vm, C_TRANSLATE_NS] += (walk + cref) * ref_ns
        if devtlb_hit[q]:
            cnt[vm, C_DEVTLB_HITS] += 1
        cnt[vm, C_WALK_REFS] += walk
        cnt[vm, C_CTX_REFS] += cref
        if not ok:
            cnt[vm, C_FAULTS] += 1
        if crossed:
            cnt[vm, C_CROSS] += 1
        if m[M_A2, r] & DMA_ROGUE:
            if not ok:
                cnt[vm, C_ROGUE_FAULTED] += 1
            elif crossed:
                cnt[vm, C_ROGUE_CROSS] += 1
            elif stale:
                cnt[vm, C_ROGUE_STALE] += 1
            elif uid >= 0:
                cnt[vm, C_ROGUE_IN_FLIGHT] += 1
            else:
                cnt[vm, C_ROGUE_MISDIRECTED] += 1
    st[ST_LAST_I], st[ST_LAST_J] = i, j
    if stats[S_FAULTS]:
        st[ST_FAULTED_I], st[ST_FAULTED_J] = i, j
    return True


@njit(cache=True, inline="always")
def _note_stamp(st, ooo, late, vm, uid, t):
    """An invalidation stamped at t went on the queue: record its unmap id once among the
    out-of-order ones when it came late, and raise the epoch's stamp maximum."""
    if late:
        seen = False
        for q in range(st[ST_OUT_OF_ORDER]):
            if ooo[q, 0] == vm and ooo[q, 1] == uid:
                seen = True
        if not seen:
            q = st[ST_OUT_OF_ORDER]
            ooo[q, 0], ooo[q, 1] = vm, uid
            st[ST_OUT_OF_ORDER] = q + 1
    if t > st[ST_STAMP_MAX]:
        st[ST_STAMP_MAX] = t


@njit(cache=True, inline="always")
def _vfio_op(i, m, st, slab, slot_of, qctl, inflight, unresponsive, pend, done, seg, data,
             spk, spv, spm, ooo, cnt, vf):
    """Operation i, an OP_VFIO_MAP or OP_VFIO_UNMAP, as HostServer._control applies it, if
    kernels/vfio.py takes it and (an unmap) its flush goes on the queue as the HWPT
    invalidation's does; False, with nothing changed, otherwise."""
    if vf.meta[META_ON] == 0:
        return False
    vm = m[M_VM, i]
    d = vf.sid_dom[m[M_SID, i]]
    if d < 0 or vf.dom[d, D_VM] != vm:
        return False
    if m[M_OP, i] == OP_VFIO_MAP:
        n = map_check(vf, d, vm, m[M_A0, i], m[M_A1, i], m[M_A2, i], slab, slot_of)
        if n < 0:
            return False
        st[ST_PTE_WRITES] += map_apply(vf, d, vm, m[M_A0, i], m[M_A1, i], n, m[M_A3, i] != 0,
                                       slab, slot_of)
        return True
    t = m[M_T, i]
    iova = m[M_A0, i]
    n = unmap_check(vf, d, iova, m[M_A1, i], slab, slot_of)
    if n < 0:
        return False
    uid = m[M_A3, i]
    late = t < st[ST_STAMP_MAX] and uid >= 0     # _control: stamped before applied work
    if late and st[ST_OUT_OF_ORDER] == ooo.shape[0]:
        return False
    words = np.empty(12, np.uint64)
    nd = flush_words(vf, d, iova, n, words)
    if (qctl[Q_IQE] != 0 or qctl[Q_ITE] != 0 or unresponsive.shape[0] != 0
            or nd > qctl[Q_ENTRIES] - 1 - qctl[Q_HELD]
            or qctl[Q_HI] + nd > inflight.shape[0] or pend[0, P_END] + nd > pend.shape[0]
            or done.shape[0] < nd):
        return False
    f = np.zeros(DECODED_FIELDS, np.int64)
    for q in range(nd):
        b = 4 * q
        if _decode(words[b], words[b + 1], words[b + 2], words[b + 3], qctl[Q_MAMV],
                   f) != ERR_NONE:
            return False
    if uid >= 0 and not _ora_can_set(seg, spk, spm, vm, uid):
        return False
    # --- applied from here on: vfio_unmap's record, pins and stores, then its flush ---
    _note_stamp(st, ooo, late, vm, uid, t)
    st[ST_PTE_WRITES] += unmap_apply(vf, d, vm, iova, n, slab, slot_of)
    status, processed, _t_at, t_done, _err = _submit(
        qctl, inflight, unresponsive, words[:4 * nd], pend, done, t, M_DRIVER, True)
    if status != S_OK:       # cannot happen after the checks above
        raise RuntimeError("epoch kernel: host QI refused a checked VFIO flush")
    if st[ST_NEXT_EFFECT] == NEVER:
        first = pend[0, P_FIRST]
        if first < pend[0, P_END]:
            st[ST_NEXT_EFFECT] = pend[first, E_T]
    cnt[vm, C_INV_DESCS] += processed
    if uid >= 0:
        _ora_set(seg, data, spk, spv, spm, vm, uid, t_done)
    return True


@njit(cache=True)
def run_ops(i, m, val, words, st, hq, ora, bufs, tr, vf):
    """_run_ops with its arguments in four tuples (a shorter signature; the call costs the
    same, about 16-19 µs of unboxing for its 67 arrays either way, measured): hq the queue
    and caches (slab, slot_of, qctl, inflight,
    unresponsive, pend, done, it_state, it_counts, fl_state, fl_counts, sl_state, sl_counts,
    dt_state, dt_counts), ora the oracle (seg, data, spk, spv, spm), bufs the epoch's
    buffers (ooo, cnt, waits, retires, addr, access, tst, outb, reqb, devb)."""
    (slab, slot_of, qctl, inflight, unresponsive, pend, done, it_state, it_counts, fl_state,
     fl_counts, sl_state, sl_counts, dt_state, dt_counts) = hq
    seg, data, spk, spv, spm = ora
    ooo, cnt, waits, retires, addr, access, tst, outb, reqb, devb = bufs
    return _run_ops(i, m, val, words, st, slab, slot_of, qctl, inflight, unresponsive, pend,
                    done, it_state, it_counts, fl_state, fl_counts, sl_state, sl_counts,
                    dt_state, dt_counts, seg, data, spk, spv, spm, ooo, cnt, waits, retires,
                    addr, access, tr, tst, outb, reqb, devb, vf)


@njit(cache=True)
def _run_ops(i, m, val, words, st, slab, slot_of, qctl, inflight, unresponsive, pend, done,
             it_state, it_counts, fl_state, fl_counts, sl_state, sl_counts, dt_state,
             dt_counts, seg, data, spk, spv, spm, ooo, cnt, waits, retires, addr, access,
             tr, tst, outb, reqb, devb, vf):
    """Apply operations from ``i`` on, as HostServer.apply_epoch does; returns the index of
    the first operation not applied (``m.shape[1]`` when all were).

    m: int64[M_ROWS, n] (M_*); val: the stores' values (uint64[n]); words: the resolved
    HWPT invalidations' descriptors (uint64, 4 per descriptor); st: int64[ST_FIELDS];
    slab, slot_of: the host's table pages (memory.HostMemory); qctl, inflight, unresponsive,
    pend, done: the invalidation queue and the pending effects (kernels/qiq.py); the cache
    states for ``_advance``; seg, data, spk, spv, spm: the oracle (oracle.FlatTimes);
    ooo: int64[cap, 2] the (vm, unmap id) pairs of HostServer._qi_out_of_order,
    st[ST_OUT_OF_ORDER] of them (a set: no order); cnt: int64[vms, C_*];
    waits: int64[n, 4] (vm, unmap id, sid, wait ns); retires: int64[n, 3] (vm, first, count);
    for DMA runs (_dma_run): addr uint64[n], access uint8[n] (a0, a2 & 0xFF), tr the
    translation state (caches, memory, walker masks, frame owners), tst int64[8] (TST_NAMES),
    outb RESULT_DTYPE[n], reqb int64[n, 6], devb bool[n]: each run's results at its rows;
    vf: the VFIO containers (kernels/vfio.py VfioArrays).
    """
    n = m.shape[1]
    f = np.zeros(DECODED_FIELDS, np.int64)
    while i < n:
        t = m[M_T, i]
        # --- HostIommu.advance_to(t) ---
        if st[ST_NEXT_EFFECT] <= t:
            row, t_next = _advance(pend, t, it_state, it_counts, fl_state, fl_counts,
                                   sl_state, sl_counts, dt_state, dt_counts)
            if row >= 0:        # a context/PASID cache effect: Python applies it
                st[ST_NEXT_EFFECT] = pend[row, E_T]
                return i
            st[ST_NEXT_EFFECT] = NEVER if t_next < 0 else t_next
        if st[ST_FREE_AT] <= t:
            return i
        if t > st[ST_NOW]:
            st[ST_NOW] = t
        k = m[M_OP, i]
        vm = m[M_VM, i]
        if k == OP_DMA:
            if st[ST_DMA] == 0:
                return i
            j = i + 1
            while j < n and m[M_OP, j] == k:
                j += 1
            nxt = st[ST_NEXT_EFFECT]
            if nxt <= m[M_T, j - 1]:      # cut where a queued invalidation takes effect
                j = max(i + 1, _search_left(m[M_T], i, j, nxt))
            if not _dma_run(i, j, m, addr, access, st, tr, seg, data, spk, spv, cnt, tst,
                            outb, reqb, devb):
                return i
            i = j
            if st[ST_FAULTED_I] >= 0:     # Python records the faults, then calls again
                return i
            continue
        if k == OP_GUEST_WRITE:
            j = i + 1
            while j < n and m[M_OP, j] == k and m[M_VM, j] == vm:
                j += 1
            nxt = st[ST_NEXT_EFFECT]
            if nxt <= m[M_T, j - 1]:      # cut where a queued invalidation takes effect
                j = max(i + 1, _search_left(m[M_T], i, j, nxt))
            for q in range(i, j):
                hf = m[M_RES, q]
                if hf >= 0 and slot_of[hf] < 0:
                    return i            # a new table page: Python allocates it
            stored = 0
            for q in range(i, j):
                hf = m[M_RES, q]
                if hf >= 0:
                    g = np.uint64(m[M_A0, q])
                    slab[slot_of[hf], np.int64((g >> np.uint64(3)) & np.uint64(511))] = val[q]
                    stored += 1
            st[ST_PTE_WRITES] += stored
            cnt[vm, C_DROPPED] += (j - i) - stored
            i = j
            continue
        if k == OP_UNMAP_RET:
            uid, t_ret = m[M_A0, i], m[M_A1, i]
            if uid < 0 or t_ret < 0:
                return i
            if not _ora_can_set(seg, spk, spm, vm, uid):
                return i                 # Python asks and records it (growing the arrays)
            host_done = _ora_get(seg, data, spk, spv, vm, uid)
            causal = True
            for q in range(st[ST_OUT_OF_ORDER]):   # HostServer._qi_out_of_order
                if ooo[q, 0] == vm and ooo[q, 1] == uid:
                    causal = False
                    last = st[ST_OUT_OF_ORDER] - 1
                    ooo[q, 0], ooo[q, 1] = ooo[last, 0], ooo[last, 1]
                    st[ST_OUT_OF_ORDER] = last
                    break
            if host_done != NONE and host_done > t_ret and causal:
                w = st[ST_WAITS]
                waits[w, 0], waits[w, 1] = vm, uid
                waits[w, 2], waits[w, 3] = m[M_A2, i] & 0xFFFF, host_done - t_ret
                st[ST_WAITS] = w + 1
            _ora_set(seg, data, spk, spv, spm, vm, uid, t_ret)
            i += 1
            continue
        if k == OP_UNMAP_RETIRE:
            if m[M_A0, i] < 0 or m[M_A1, i] < 0:
                return i
            r = st[ST_RETIRES]
            retires[r, 0], retires[r, 1], retires[r, 2] = vm, m[M_A0, i], m[M_A1, i]
            st[ST_RETIRES] = r + 1
            i += 1
            continue
        if k in (OP_VFIO_MAP, OP_VFIO_UNMAP):
            if not _vfio_op(i, m, st, slab, slot_of, qctl, inflight, unresponsive, pend, done,
                            seg, data, spk, spv, spm, ooo, cnt, vf):
                return i
            i += 1
            continue
        if k != OP_HWPT_INV or m[M_RES, i] < 0:
            return i
        late = t < st[ST_STAMP_MAX] and m[M_A3, i] >= 0   # stamped before applied work
        if late and st[ST_OUT_OF_ORDER] == ooo.shape[0]:
            return i
        # --- a one-entry IOMMU_HWPT_INVALIDATE: HostIommu.submit_qi of its descriptors ---
        w0 = m[M_RES, i]
        nd = m[M_NDESC, i]
        if (qctl[Q_IQE] != 0 or qctl[Q_ITE] != 0 or unresponsive.shape[0] != 0
                or nd > qctl[Q_ENTRIES] - 1 - qctl[Q_HELD]
                or qctl[Q_HI] + nd > inflight.shape[0] or pend[0, P_END] + nd > pend.shape[0]
                or done.shape[0] < nd):
            return i
        for q in range(nd):
            b = w0 + 4 * q
            if _decode(words[b], words[b + 1], words[b + 2], words[b + 3], qctl[Q_MAMV],
                       f) != ERR_NONE:
                return i
        uid = m[M_A3, i]
        if uid >= 0 and not _ora_can_set(seg, spk, spm, vm, uid):
            return i
        status, processed, _t_at, t_done, _err = _submit(
            qctl, inflight, unresponsive, words[w0:w0 + 4 * nd], pend, done, t, M_DRIVER,
            True)
        if status != S_OK:       # cannot happen after the checks above
            raise RuntimeError("epoch kernel: host QI refused a checked submission")
        if st[ST_NEXT_EFFECT] == NEVER:
            first = pend[0, P_FIRST]
            if first < pend[0, P_END]:
                st[ST_NEXT_EFFECT] = pend[first, E_T]
        _note_stamp(st, ooo, late, vm, uid, t)
        cnt[vm, C_INV_DESCS] += processed
        if uid >= 0:
            _ora_set(seg, data, spk, spv, spm, vm, uid, t_done)
        i += 1
    return i


# --- the kept one-entry HWPT invalidations (HostServer._resolve_invalidations) ---------------
# ``ik``: int64[cap, 6] keys (vm, sid, pasid, addr, npages, flags) as the operation carries
# them (vm -1: a free slot); ``iv``: int64[cap, 2] (first word, descriptors) or (-1, 0) for
# one left to Python; ``im``: int64[1] keys held. Open addressing, linear probing, at most
# half full; no removal (the server drops the whole table).
K_FIELDS = 6


@njit(cache=True)
def _inv_home(cap, key):
    h = np.uint64(0x9E37_79B9_7F4A_7C15)
    for q in range(K_FIELDS):
        h = (h ^ np.uint64(key[q])) * np.uint64(0xBF58_476D_1CE4_E5B9)
        h ^= h >> np.uint64(31)
    return np.int64(h & np.uint64(cap - 1))


@njit(cache=True)
def _inv_find(ik, key):
    cap = ik.shape[0]
    s = _inv_home(cap, key)
    while ik[s, 0] != -1:
        same = True
        for q in range(K_FIELDS):
            if ik[s, q] != key[q]:
                same = False
                break
        if same:
            return s
        s = (s + 1) & (cap - 1)
    return -1


@njit(cache=True)
def inv_lookup(ik, iv, m, idx, miss):
    """m[M_RES], m[M_NDESC] of the operations ``idx`` whose key the table holds; the others'
    positions in ``idx`` go to ``miss``: returns how many."""
    key = np.empty(K_FIELDS, np.int64)
    nm = 0
    for r in range(idx.shape[0]):
        i = idx[r]
        key[0], key[1], key[2] = m[M_VM, i], m[M_SID, i], m[M_PASID, i]
        key[3], key[4], key[5] = m[M_A0, i], m[M_A1, i], m[M_A2, i]
        s = _inv_find(ik, key)
        if s < 0:
            miss[nm] = r
            nm += 1
        else:
            m[M_RES, i], m[M_NDESC, i] = iv[s, 0], iv[s, 1]
    return nm


@njit(cache=True)
def inv_insert(ik, iv, im, m, i):
    """Keep operation i's resolution (m[M_RES, i], m[M_NDESC, i]) under its key; False when
    the table would be more than half full (the caller grows it and inserts again)."""
    if 2 * (im[0] + 1) > ik.shape[0]:
        return False
    key = np.empty(K_FIELDS, np.int64)
    key[0], key[1], key[2] = m[M_VM, i], m[M_SID, i], m[M_PASID, i]
    key[3], key[4], key[5] = m[M_A0, i], m[M_A1, i], m[M_A2, i]
    if _inv_find(ik, key) >= 0:
        return True
    cap = ik.shape[0]
    s = _inv_home(cap, key)
    while ik[s, 0] != -1:
        s = (s + 1) & (cap - 1)
    for q in range(K_FIELDS):
        ik[s, q] = key[q]
    iv[s, 0], iv[s, 1] = m[M_RES, i], m[M_NDESC, i]
    im[0] += 1
    return True


@njit(cache=True)
def inv_insert_all(ik, iv, im, m, idx):
    """inv_insert of the operations ``idx`` in order; returns how many went in before one
    found the table too full (the caller grows it and goes on from there)."""
    for r in range(idx.shape[0]):
        if not inv_insert(ik, iv, im, m, idx[r]):
            return r
    return idx.shape[0]


# --- the operation matrix (HostServer._op_matrix) ---------------------------------------------
@njit(cache=True)
def op_matrix(ops, m):
    """m[:, i] of each OP_DTYPE row: its fields (a0, a1 as their bits: numpy's astype),
    the resolved columns unset (M_RES -1, M_NDESC 0)."""
    for i in range(ops.shape[0]):
        r = ops[i]
        m[M_T, i] = r.t_ns
        m[M_VM, i] = r.vm
        m[M_OP, i] = r.op
        m[M_SID, i] = r.sid
        m[M_PASID, i] = r.pasid
        m[M_A0, i] = np.int64(r.a0)
        m[M_A1, i] = np.int64(r.a1)
        m[M_A2, i] = r.a2
        m[M_A3, i] = r.a3
        m[M_RES, i] = -1
        m[M_NDESC, i] = 0


# --- admission (HostServer._admit) -------------------------------------------------------------
@njit(cache=True)
def prepare(ops, m, access, known_vm, known_op, sid_op, owner, max_pasid, op_dma, acc_read,
            acc_write, op_retire, max_run, refused, keep, kinds):
    """op_matrix, then admit, in one call; access[:n] the DMAs' access bytes (a2 & 0xFF as
    uint8). Returns admit's count of operations from unknown VMs."""
    op_matrix(ops, m)
    for i in range(ops.shape[0]):
        access[i] = np.uint8(m[M_A2, i] & 0xFF)
    return admit(m, known_vm, known_op, sid_op, owner, max_pasid, op_dma, acc_read,
                 acc_write, op_retire, max_run, refused, keep, kinds)


@njit(cache=True)
def admit(m, known_vm, known_op, sid_op, owner, max_pasid, op_dma, acc_read, acc_write,
          op_retire, max_run, refused, keep, kinds):
    """HostServer._admit over the operation matrix: keep[i] for the operations applied;
    refused[vm, 0/1] += the VM's malformed / foreign-device operations; kinds[k] += the
    operations of kind k kept; returns the number of operations from unknown VMs.
    known_vm: bool[vms] (a VM id the host has); known_op, sid_op: bool[256] by kind
    (_KNOWN_OP, _SID_OP); owner: int64[65536] sid -> VM."""
    n = m.shape[1]
    unknown = 0
    for i in range(n):
        vm = m[M_VM, i]
        k = m[M_OP, i]
        known = 0 <= vm < known_vm.shape[0] and known_vm[vm]
        if not known:
            unknown += 1
        acc = m[M_A2, i] & 0xFF
        a0, a1 = m[M_A0, i], m[M_A1, i]       # uint64 bits
        bad = (not known_op[k] or m[M_T, i] < 0 or m[M_PASID, i] > max_pasid
               or (k == op_dma and acc != acc_read and acc != acc_write)
               or (k == op_retire and (a1 == 0 or a1 < 0 or a1 > max_run
                                       or a0 < 0 or a0 >= (1 << 62))))
        foreign = not bad and sid_op[k] and owner[m[M_SID, i]] != vm
        if known and bad:
            refused[vm, 0] += 1
        if known and foreign:
            refused[vm, 1] += 1
        keep[i] = known and not bad and not foreign
        if keep[i]:
            kinds[k] += 1
    return unknown


@njit(cache=True)
def inv_rehash(ik, iv, nk, nv, im):
    """Every key of (ik, iv) into the empty, larger table (nk, nv); im: its count."""
    cap = nk.shape[0]
    im[0] = 0
    for s in range(ik.shape[0]):
        if ik[s, 0] == -1:
            continue
        d = _inv_home(cap, ik[s])
        while nk[d, 0] != -1:
            d = (d + 1) & (cap - 1)
        nk[d] = ik[s]
        nv[d] = iv[s]
        im[0] += 1


# --- the first sight of a one-entry HWPT invalidation (HostServer._resolve_invalidations) ----
# ``dk``: int64[d] the nested domains' keys, sid << 32 | pasid, sorted; ``dv``: int64[d, 4]
# (vm, DID, PASID, encodable) of each: encodable where nested.one_entry_words encodes the
# domain's one-entry invalidations itself (no ATS, DID and PASID within their fields).
DV_VM, DV_DID, DV_PASID, DV_FAST = range(4)
_PSI_QW0 = 0x6 | 3 << 4            # nested._PIOTLB_PSI_QW0: PASID-based IOTLB, G=11b (PSI)
_QW0_DID_SHIFT, _QW0_PASID_SHIFT, _QW1_IH = 16, 32, 1 << 6
_MAX_PFN_WIDTH = 64 - PAGE_SHIFT
_PAGE_MASK = (1 << PAGE_SHIFT) - 1


@njit(cache=True, inline="always")
def _bit_length(x):
    n = 0
    while x:
        x >>= 1
        n += 1
    return n


@njit(cache=True)
def inv_encode(m, idx, dk, dv, wait, words, end, left):
    """nested.one_entry_words of the operations ``idx`` (their domain's key from m, checked
    as HostServer._resolve_invalidations does: the VM's own HWPT at (sid, pasid)) wherever it
    encodes them itself: a range (0 < npages < 2**64 - 1) at a 4-KiB aligned address, flags
    0 or IOMMU_VTD_INV_FLAGS_LEAF, on an encodable domain (dv[DV_FAST]): one page-selective
    PASID-based IOTLB descriptor with Linux calculate_psi_aligned_address's aligned range,
    then the wait (``wait``: qi.WAIT_WORDS as uint64[4]), written at words[end:]
    (room for 8 words each) and resolved in m[M_RES], m[M_NDESC]. The others' positions in
    ``idx`` go to ``left`` (the Python loop's). Returns (how many left, the new end)."""
    nl = 0
    nd = dk.shape[0]
    for r in range(idx.shape[0]):
        i = idx[r]
        key = m[M_SID, i] << 32 | m[M_PASID, i]
        d = np.searchsorted(dk, key)
        addr = np.uint64(m[M_A0, i])
        npages = np.uint64(m[M_A1, i])
        flags = m[M_A2, i]
        if (d >= nd or dk[d] != key or dv[d, DV_VM] != m[M_VM, i] or dv[d, DV_FAST] == 0
                or (flags != 0 and flags != 1) or npages == np.uint64(0)
                or npages == ~np.uint64(0) or addr & np.uint64(_PAGE_MASK) != np.uint64(0)):
            left[nl] = r
            nl += 1
            continue
        start = addr >> np.uint64(PAGE_SHIFT)
        span = npages - np.uint64(1)
        if span >= np.uint64(1 << _MAX_PFN_WIDTH):
            am = _MAX_PFN_WIDTH
        else:        # start + span < 2**53: no wrap
            am = min(max(_bit_length(span), _bit_length(start ^ (start + span))),
                     _MAX_PFN_WIDTH)
        ua = np.uint64(am)
        w = words[end:end + 8]
        w[0] = np.uint64(_PSI_QW0 | dv[d, DV_DID] << _QW0_DID_SHIFT
                         | dv[d, DV_PASID] << _QW0_PASID_SHIFT)
        w[1] = (((start >> ua) << ua) << np.uint64(PAGE_SHIFT)
                | np.uint64(_QW1_IH if flags else 0) | ua)
        w[2] = np.uint64(0)
        w[3] = np.uint64(0)
        for q in range(4):
            w[4 + q] = wait[q]
        m[M_RES, i], m[M_NDESC, i] = end, 2
        end += 8
    return nl, end


# --- guest stores' host frames (HostServer._resolve_stores) ------------------------------
@njit(cache=True)
def resolve_stores(m, start, vm, hpa_of, frames):
    """m[M_RES] of the guest stores of ``vm`` from operation ``start`` on: the host frame
    its memory map (hpa_of: int64 per GPA frame, -1 where not backed; ``frames`` GPA frames)
    gives the store's GPA, -1 past the map (HostIommu.guest_write's look-up). Returns how
    many stores of other VMs it left (the caller resolves them with their own VM's map)."""
    other = 0
    for i in range(start, m.shape[1]):
        if m[M_OP, i] != OP_GUEST_WRITE:
            continue
        if m[M_VM, i] != vm:
            other += 1
            continue
        f = np.uint64(m[M_A0, i]) >> np.uint64(PAGE_SHIFT)
        m[M_RES, i] = hpa_of[np.int64(f)] if f < np.uint64(frames) else -1
    return other


@njit(cache=True)
def store_frames(m, idx, hpa_of, frames):
    """resolve_stores of the operations ``idx``, guest stores of one VM (its map)."""
    for r in range(idx.shape[0]):
        i = idx[r]
        f = np.uint64(m[M_A0, i]) >> np.uint64(PAGE_SHIFT)
        m[M_RES, i] = hpa_of[np.int64(f)] if f < np.uint64(frames) else -1


@njit(cache=True)
def store_frames_flat(m, start, hpa, vmrow):
    """resolve_stores of every VM's guest stores from operation ``start`` on, in one call:
    the VMs' memory maps in one flat buffer ``hpa``, VM ``v``'s from vmrow[v, 0] on,
    vmrow[v, 1] frames long (HostServer._store_maps)."""
    for i in range(start, m.shape[1]):
        if m[M_OP, i] != OP_GUEST_WRITE:
            continue
        vm = m[M_VM, i]
        if vm < 0 or vm >= vmrow.shape[0] or vmrow[vm, 0] < 0:
            raise KeyError("epoch kernel: a guest store of a VM without memory")
        f = np.uint64(m[M_A0, i]) >> np.uint64(PAGE_SHIFT)
        m[M_RES, i] = (hpa[vmrow[vm, 0] + np.int64(f)] if f < np.uint64(vmrow[vm, 1])
                       else -1)
