"""The security oracle's return times as arrays that compiled code reads and records.

host_iommu/oracle.py's ``_VmTimes`` keeps, per VM, the return times of a dense range of unmap
ids in an array and the others in a ``spill`` dict. ``ArrayOracle`` runs that same code over
one shared buffer of dense segments (``seg``/``data``, oracle.FlatTimes) and, for the spill,
the open-addressing table of this module (keys (vm, unmap id), linear probing, tombstones),
so that the epoch kernel (host_iommu/kernels/epoch.py) can ask and record any VM's times:

- ``spk``: int64[cap, 2] keys, (vm, unmap id); vm SP_EMPTY for a free slot, SP_TOMB for a
  removed one (a probe goes on past it); ``cap`` a power of two;
- ``spv``: int64[cap] the time of each live key;
- ``spm``: int64[2] slots in use (live and removed) and live keys; ``seg[vm, SEG_SPILL]`` the
  live keys of each VM (``len(spill)``).

An unmap id is a Python int in [0, 2^64) (a guest's uint64 field); it is kept as the int64 of
the same bits. A table is refilled (OracleSpill.grow) before it holds more than 3/4 of ``cap``
slots in use, so every probe meets a free slot.
"""

from __future__ import annotations

import numpy as np
from numba import njit

SP_EMPTY, SP_TOMB = -1, -2
SPM_USED, SPM_LIVE = 0, 1
SEG_SPILL = 4          # oracle.FlatTimes.seg column: the VM's live spilled ids
_K1 = np.uint64(0x9E37_79B9_7F4A_7C15)
_K2 = np.uint64(0xC2B2_AE3D_27D4_EB4F)


@njit(cache=True)
def _home(cap, vm, uid):
    h = (np.uint64(vm) * _K1) ^ (np.uint64(uid) * _K2)
    h ^= h >> np.uint64(29)
    return np.int64(h & np.uint64(cap - 1))


@njit(cache=True)
def spill_find(spk, vm, uid):
    """Slot of key (vm, uid), or -1."""
    cap = spk.shape[0]
    s = _home(cap, vm, uid)
    for _ in range(cap):
        k = spk[s, 0]
        if k == SP_EMPTY:
            return -1
        if k == vm and spk[s, 1] == uid:
            return s
        s = (s + 1) & (cap - 1)
    return -1


@njit(cache=True)
def spill_room(spk, spm):
    """Whether one more key may take a free slot (the table stays at most 3/4 used)."""
    return 4 * (spm[SPM_USED] + 1) <= 3 * spk.shape[0]


@njit(cache=True)
def spill_put(spk, spv, spm, seg, vm, uid, value):
    """spill[uid] = value for ``vm``; the caller made sure of room (spill_room) when the
    key is new."""
    s = spill_find(spk, vm, uid)
    if s >= 0:
        spv[s] = value
        return
    cap = spk.shape[0]
    s = _home(cap, vm, uid)
    while spk[s, 0] >= 0:                 # a live key: the first free or removed slot
        s = (s + 1) & (cap - 1)
    if spk[s, 0] == SP_EMPTY:
        spm[SPM_USED] += 1
    spk[s, 0], spk[s, 1] = vm, uid
    spv[s] = value
    spm[SPM_LIVE] += 1
    seg[vm, SEG_SPILL] += 1


@njit(cache=True)
def spill_pop(spk, spv, spm, seg, vm, uid):
    """Remove key (vm, uid); returns whether it was held."""
    s = spill_find(spk, vm, uid)
    if s < 0:
        return False
    spk[s, 0] = SP_TOMB
    spm[SPM_LIVE] -= 1
    seg[vm, SEG_SPILL] -= 1
    return True


@njit(cache=True)
def spill_refill(spk, spv, new_k, new_v, new_m):
    """Every live key of (spk, spv) into an empty table (new_k, new_v, new_m)."""
    cap = new_k.shape[0]
    for s in range(spk.shape[0]):
        vm = spk[s, 0]
        if vm < 0:
            continue
        uid = spk[s, 1]
        d = _home(cap, vm, uid)
        while new_k[d, 0] != SP_EMPTY:
            d = (d + 1) & (cap - 1)
        new_k[d, 0], new_k[d, 1] = vm, uid
        new_v[d] = spv[s]
        new_m[SPM_USED] += 1
        new_m[SPM_LIVE] += 1


@njit(cache=True)
def spill_pop_many(spk, spv, spm, seg, vm, uids):
    """spill_pop of every id of ``uids``; returns how many were held."""
    held = 0
    for u in uids:
        if spill_pop(spk, spv, spm, seg, vm, u):
            held += 1
    return held


@njit(cache=True)
def spill_in_runs(spk, seg, vm, first, count):
    """The spilled ids of ``vm`` in any run [first[r], first[r] + count[r]): each id of a
    run probed when the run is no longer than the VM's spilled ids, else one scan of the
    table for the run (as Oracle.retire_runs picks); an id may come more than once."""
    out = np.empty(0, np.int64)
    n_out = 0
    for r in range(first.shape[0]):
        lo, hi = first[r], first[r] + count[r]
        if count[r] <= seg[vm, SEG_SPILL]:
            for u in range(lo, hi):
                if spill_find(spk, vm, u) >= 0:
                    if n_out == out.shape[0]:
                        out = _grown(out)
                    out[n_out] = u
                    n_out += 1
        else:
            for s in range(spk.shape[0]):
                u = spk[s, 1]
                if spk[s, 0] == vm and lo <= u < hi:
                    if n_out == out.shape[0]:
                        out = _grown(out)
                    out[n_out] = u
                    n_out += 1
    return out[:n_out].copy()


@njit(cache=True)
def _grown(a):
    b = np.empty(max(16, 2 * a.shape[0]), np.int64)
    b[:a.shape[0]] = a
    return b


# Oracle segment columns (oracle.SEG_*).
SEG_OFF, SEG_SIZE, SEG_BASE = 0, 1, 3
NONE = -1


@njit(cache=True)
def retire_runs(seg, data, spk, spv, spm, vm, first, count, min_trim):
    """Oracle.retire_runs(vm, runs) of a VM that has a record, on FlatTimes' arrays: the
    runs' ids dropped (each once: the dense ones in its range, the spilled ones outside it)
    and then ``_VmTimes.trim``. Returns (ids that were held, whether the trim was done here;
    when not, for want of room in the spill table, the caller trims)."""
    off, size, base = seg[vm, SEG_OFF], seg[vm, SEG_SIZE], seg[vm, SEG_BASE]
    lo, hi = base, base + size
    held = 0
    touched = seg[vm, SEG_SPILL] != 0 and first.shape[0] > 0
    for r in range(first.shape[0]):
        a, b = max(first[r], lo), min(first[r] + count[r], hi)
        if a < b:
            touched = True
        for u in range(a, b):
            if data[off + u - base] != NONE:
                data[off + u - base] = NONE
                held += 1
    if seg[vm, SEG_SPILL]:
        far = spill_in_runs(spk, seg, vm, first, count)
        for u in far:
            if (u < lo or u >= hi) and spill_pop(spk, spv, spm, seg, vm, u):
                held += 1
    if not touched:          # Oracle.retire_runs: no id to retire, no retire (no trim)
        return held, True
    # _VmTimes.trim
    k = 0
    while k < size and data[off + k] == NONE:
        k += 1
    if k < min_trim or 2 * k < size:
        half = size // 2
        if half < min_trim:
            return held, True
        few = 0
        for i in range(half):
            if data[off + i] != NONE:
                few += 1
        if 16 * few > half:
            return held, True
        if 4 * (spm[SPM_USED] + few) > 3 * spk.shape[0]:
            return held, False
        for i in range(half):
            if data[off + i] != NONE:
                spill_put(spk, spv, spm, seg, vm, base + i, data[off + i])
        k = half
    for i in range(size - k):
        data[off + i] = data[off + k + i]
    seg[vm, SEG_SIZE] = size - k
    seg[vm, SEG_BASE] = base + k
    return held, True
