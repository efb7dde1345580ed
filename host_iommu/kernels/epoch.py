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

It stops, changing nothing of the operation it stops at, at anything else: a DMA run (the
translate kernel and the tally stay in Python), VFIO and second-level operations, an effect
the Python caches apply (context/PASID cache), a table frame to free, a store to a frame with
no table page yet, a refused or unresolved HWPT invalidation, a queue that is not clean or
has no room, an oracle record to create or to grow. Python applies that one operation its
own way and calls again, so the Python loop stays the description and the reference
(tests/host_iommu/test_kernel_epoch.py runs both on the same operations).

Per-VM counters go to rows of ``cnt`` (C_*), unmap waits and retired runs to rows of
``waits``/``retires``; the scalar state goes in and out through ``st`` (ST_*).
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
from host_iommu.protocol import OP_GUEST_WRITE, OP_HWPT_INV, OP_UNMAP_RET, OP_UNMAP_RETIRE

NEVER = (1 << 63) - 1
NONE = -1            # oracle: no return time

# Rows of the operation matrix ``m`` (int64[M_ROWS, n]): OP_DTYPE's fields (a0, a1 as their
# bits), then the resolved column: a guest store's host frame (-1: not backed), or the first
# word of a HWPT invalidation's descriptors in ``words`` (-1: Python applies it).
M_T, M_VM, M_OP, M_SID, M_PASID, M_A0, M_A1, M_A2, M_A3, M_RES, M_NDESC = range(11)
M_ROWS = 11

# ``st``: scalar state in and out.
(ST_NEXT_EFFECT, ST_FREE_AT, ST_STAMP_MAX, ST_NOW, ST_OUT_OF_ORDER, ST_PTE_WRITES, ST_WAITS,
 ST_RETIRES) = range(8)
ST_FIELDS = 8

# ``cnt`` columns: per-VM counter deltas.
C_DROPPED, C_INV_DESCS = range(2)
CNT_FIELDS = 2

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
    its dense range, or goes to the spill table (which has room); growing the dense range
    is left to Python (_VmTimes.set_max)."""
    if vm >= seg.shape[0] or seg[vm, SEG_OFF] < 0:
        return False
    size = seg[vm, SEG_SIZE]
    i = uid - seg[vm, SEG_BASE]
    if 0 <= i < size:
        return True
    if size <= i < 2 * size + 4096:
        return False
    return spill_find(spk, vm, uid) >= 0 or spill_room(spk, spm)


@njit(cache=True)
def _ora_set(seg, data, spk, spv, spm, vm, uid, t):
    """_VmTimes.set_max(uid, t) of ``vm`` where _ora_can_set allowed it."""
    i = uid - seg[vm, SEG_BASE]
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
def run_ops(i, m, val, words, st, slab, slot_of, qctl, inflight, unresponsive, pend, done,
            it_state, it_counts, fl_state, fl_counts, sl_state, sl_counts, dt_state,
            dt_counts, seg, data, spk, spv, spm, ooo, cnt, waits, retires):
    """Apply operations from ``i`` on, as HostServer.apply_epoch does; returns the index of
    the first operation not applied (``m.shape[1]`` when all were).

    m: int64[M_ROWS, n] (M_*); val: the stores' values (uint64[n]); words: the resolved
    HWPT invalidations' descriptors (uint64, 4 per descriptor); st: int64[ST_FIELDS];
    slab, slot_of: the host's table pages (memory.HostMemory); qctl, inflight, unresponsive,
    pend, done: the invalidation queue and the pending effects (kernels/qiq.py); the cache
    states for ``_advance``; seg, data, spk, spv, spm: the oracle (oracle.FlatTimes);
    ooo: int64[cap, 2] the (vm, unmap id) pairs of HostServer._qi_out_of_order,
    st[ST_OUT_OF_ORDER] of them (a set: no order); cnt: int64[vms, C_*];
    waits: int64[n, 4] (vm, unmap id, sid, wait ns); retires: int64[n, 3] (vm, first, count).
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
        cnt[vm, C_INV_DESCS] += processed
        if uid >= 0:
            _ora_set(seg, data, spk, spv, spm, vm, uid, t_done)
        i += 1
    return i
