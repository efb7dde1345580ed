"""The invalidation queue and the host's pending effects as compiled kernels over arrays.

VT-d spec 6.5.2 "Queued Invalidation": descriptor formats 6.5.2.1-6.5.2.8 and their errors
(6.5.2.10), decoded as QEMU hw/i386/intel_iommu.c (vtd_process_inv_desc and the
vtd_process_*_desc it calls) checks them, with the masks of host_iommu/qi.py (QI_RSVD, the
QI_* fields); processing in time as host_iommu/qi.py's InvalidationQueue describes it
(hardware fetches one descriptor after the other; a wait completes after everything before
it; a descriptor holds its slot until it took effect). ``_advance`` applies the effects that
are due to the caches, as host_iommu/iommu.py's CacheSet dispatches each descriptor (Linux
drivers/iommu/intel/cache.c: an IOTLB flush reaches the paging-structure caches too), by
calling the cache kernels (host_iommu/kernels/iotlb.py) directly.

State (all int64; the Python side, qi.InvalidationQueue and iommu.HostIommu, owns the arrays
and grows them when a kernel answers NEED_ROOM, before it changed anything):

- ``ctl[Q_*]``: the queue's registers (IQH, IQT, FSTS.IQE/ITE, ICS.IWC), its parameters
  (size, CAP.MAMV, costs), the busy time, counters, and the window [Q_LO, Q_HI) of
  ``inflight``;
- ``inflight[Q_LO:Q_HI]``: effect times of the processed descriptors, ascending (the
  hardware is serial), from the oldest one a caller may still ask about;
- ``pend[0, 0:2]``: the window [first, end) of effect rows; ``pend[r, E_*]`` for r >= 1 an
  invalidation waiting for its effect time, in (time, submission) order, which is time order
  since the hardware is serial.

Checked against host_iommu/reference_qi.py (decode and queue) and against the Python
dispatch (qi.apply on a CacheSet) by tests/host_iommu/test_kernel_qi.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from host_iommu.defs import PGTT_FL_ONLY, PGTT_NESTED
from host_iommu.kernels.iotlb import (
    C_INVALIDATED,
    F_DID,
    F_ORDER,
    F_PASID,
    F_PGTT,
    F_VALID,
    F_VPN,
    INV_DOMAIN,
    INV_GLOBAL,
    INV_PAGE,
    INV_PASID,
    INV_PASID_PAGE,
    MAX_PFN,
    _inv_range,
    _invalidate,
    _set_index,
)

U64_MAX = (1 << 64) - 1

# --- ctl: queue registers, parameters and counters ---------------------------------------------
(Q_ENTRIES, Q_HEAD, Q_TAIL, Q_IQE, Q_IQE_HEAD, Q_ITE, Q_IWC, Q_ERRORS, Q_REFUSED, Q_BUSY,
 Q_MAMV, Q_DESC_NS, Q_WAIT_NS, Q_DEVTLB_NS, Q_HELD, Q_LO, Q_HI) = range(17)
Q_COUNTS = 17            # ctl[Q_COUNTS + type] counts processed descriptors of type 1..8
CTL_SIZE = Q_COUNTS + 9

# --- pend: one effect per row (row 0: the window) -------------------------------------------------
P_FIRST, P_END = 0, 1    # pend[0, P_FIRST]: next row to apply; pend[0, P_END]: next free row
(E_T, E_TYPE, E_GRAN, E_DID, E_PASID, E_SID, E_FM, E_PFN, E_AM, E_IH, E_SIZE_LOG2,
 E_GLOB) = range(12)
EFFECT_FIELDS = 12

# --- decoded fields (_decode's ``out``) ---------------------------------------------------------
(D_TYPE, D_GRAN, D_DID, D_PASID, D_SID, D_FM, D_PFN, D_AM, D_IH, D_SIZE_LOG2, D_GLOB,
 D_IF) = range(12)
DECODED_FIELDS = 12

# Decode errors, named as qi.DescError.code.
ERR_NONE, ERR_UNKNOWN_TYPE, ERR_RESERVED, ERR_GRANULARITY, ERR_AM_TOO_LARGE, ERR_MISALIGNED, \
    ERR_SIZE_ENCODING, ERR_WAIT_NO_ACTION = range(8)
ERROR_CODES = ("", "unknown_type", "reserved", "granularity", "am_too_large", "misaligned",
               "size_encoding", "wait_no_action")

# What a submit kernel answers (its first result).
S_OK, S_NEED_ROOM, S_REFUSED_IQE, S_REFUSED_ITE, S_REFUSED_FULL, S_IQE, S_ITE, \
    S_NEVER_FITS = range(8)

# Who writes (_submit's ``mode``): software, the host driver (spinning for room), or the
# hardware resuming after IQE.
M_WRITE, M_DRIVER, M_RESUME = range(3)

# Descriptor types (qi.QI_*_TYPE; spec 6.5.2).
T_CC, T_IOTLB, T_DIOTLB, T_IEC, T_IWD, T_EIOTLB, T_PC, T_DEIOTLB = range(1, 9)

# Reserved bits of qw0 and qw1 by type (qi.QI_RSVD; QEMU VTD_INV_DESC_*_RSVD*); row 0 unused.
RSVD = np.array([
    [0, 0],
    [0xFFFC_0000_0000_F1C0, U64_MAX],         # 0x1 context-cache
    [0xFFFF_FFFF_0000_F100, 0xF80],           # 0x2 IOTLB
    [0x000F_0000_FFE0_01F0, 0xFFE],           # 0x3 device-TLB
    [0xFFFF_0000_07FF_F1E0, U64_MAX],         # 0x4 interrupt entry cache
    [0xFFFF_F180, 0x3],                       # 0x5 wait
    [0xFFF0_0000_0000_F1C0, 0xF80],           # 0x6 PASID-based IOTLB
    [0xFFF0_0000_0000_F1C0, U64_MAX],         # 0x7 PASID cache
    [0, 0x7FE],                               # 0x8 PASID-based device-TLB
], dtype=np.uint64)


@njit(cache=True)
def _decode(qw0, qw1, qw2, qw3, mamv, out):
    """Decode one descriptor (uint64 words) into ``out`` (int64[DECODED_FIELDS], D_*);
    returns ERR_NONE or the first failing check, in qi._decode_words' order: type, reserved
    bits, granularity, AM above ``mamv`` (0x2 page-selective only), address not aligned to
    2^AM pages, device-TLB size with no 0 bit, wait with neither SW nor IF."""
    t = int(((qw0 & np.uint64(0xE00)) >> np.uint64(5)) | (qw0 & np.uint64(0xF)))
    if t < T_CC or t > T_DEIOTLB:
        return ERR_UNKNOWN_TYPE
    if (qw0 & RSVD[t, 0]) != 0 or (qw1 & RSVD[t, 1]) != 0 or qw2 != 0 or qw3 != 0:
        return ERR_RESERVED
    for k in range(DECODED_FIELDS):
        out[k] = 0
    out[D_TYPE] = t
    gran = int((qw0 >> np.uint64(4)) & np.uint64(3))
    did = int((qw0 >> np.uint64(16)) & np.uint64(0xFFFF))
    pasid = int((qw0 >> np.uint64(32)) & np.uint64(0xFFFFF))
    addr = qw1 & np.uint64(0xFFFF_FFFF_FFFF_F000)
    if t == T_CC:
        if gran == 0:
            return ERR_GRANULARITY
        out[D_GRAN], out[D_DID] = gran, did
        out[D_SID] = int((qw0 >> np.uint64(32)) & np.uint64(0xFFFF))
        out[D_FM] = int((qw0 >> np.uint64(48)) & np.uint64(3))
        return ERR_NONE
    if t in (T_IOTLB, T_EIOTLB):
        if gran == 0 or (t == T_EIOTLB and gran == 1):
            return ERR_GRANULARITY
        out[D_GRAN], out[D_DID] = gran, did
        if t == T_EIOTLB:
            out[D_PASID] = pasid
        if gran == 3:                       # page-selective
            am = int(qw1 & np.uint64(0x3F))
            if t == T_IOTLB and am > mamv:  # the PASID-based one has no MAMV limit
                return ERR_AM_TOO_LARGE
            # addr & ((4096 << am) - 1): the mask covers all 64 bits from am = 52 on
            if am >= 52:
                if addr != 0:
                    return ERR_MISALIGNED
            elif addr & ((np.uint64(4096) << np.uint64(am)) - np.uint64(1)) != 0:
                return ERR_MISALIGNED
            out[D_PFN] = int(addr >> np.uint64(12))
            out[D_AM] = am
            out[D_IH] = int((qw1 >> np.uint64(6)) & np.uint64(1))
        return ERR_NONE
    if t == T_PC:
        if gran == 2:
            return ERR_GRANULARITY
        out[D_GRAN], out[D_DID], out[D_PASID] = gran, did, pasid
        return ERR_NONE
    if t in (T_DIOTLB, T_DEIOTLB):
        s_bit = np.uint64(1) if t == T_DIOTLB else np.uint64(1 << 11)
        log2 = 12
        if qw1 & s_bit:
            pfn = addr >> np.uint64(12)
            ones = 0
            while ones < 52 and (pfn >> np.uint64(ones)) & np.uint64(1):
                ones += 1
            if ones == 52:
                return ERR_SIZE_ENCODING
            log2 = 13 + ones
            if log2 >= 64:
                addr = np.uint64(0)
            else:
                addr &= ~((np.uint64(1) << np.uint64(log2)) - np.uint64(1))
        out[D_PFN] = int(addr >> np.uint64(12))
        out[D_SIZE_LOG2] = log2
        if t == T_DIOTLB:
            out[D_SID] = int((qw0 >> np.uint64(32)) & np.uint64(0xFFFF))   # pasid: NO_PASID
        else:
            out[D_SID] = int((qw0 >> np.uint64(16)) & np.uint64(0xFFFF))
            out[D_PASID] = pasid
            out[D_GLOB] = int(qw1 & np.uint64(1))
        return ERR_NONE
    if t == T_IEC:
        out[D_GRAN] = int((qw0 >> np.uint64(4)) & np.uint64(1))
        return ERR_NONE
    # T_IWD: QEMU refuses a wait that neither writes status nor interrupts.
    sw = (qw0 >> np.uint64(5)) & np.uint64(1)
    intr = (qw0 >> np.uint64(4)) & np.uint64(1)
    if sw == 0 and intr == 0:
        return ERR_WAIT_NO_ACTION
    out[D_IF] = int(intr)
    return ERR_NONE


@njit(cache=True)
def decode_batch(words, mamv, out, err):
    """Decode every row of ``words`` (uint64[n, 4]) into ``out`` (int64[n, DECODED_FIELDS]),
    its error code into ``err`` (int64[n]); the tests' entry point to ``_decode``."""
    for i in range(words.shape[0]):
        err[i] = _decode(words[i, 0], words[i, 1], words[i, 2], words[i, 3], mamv, out[i])


@njit(cache=True)
def _forget_until(ctl, inflight, t_ns):
    """InvalidationQueue.forget_until: Q_LO moves past the effect times <= t_ns, by numpy's
    ``searchsorted(inflight[lo:hi], t_ns, "right")`` bisection, step for step."""
    lo = ctl[Q_LO]
    a, b = 0, ctl[Q_HI] - lo
    while a < b:
        mid = a + ((b - a) >> 1)
        if t_ns < inflight[lo + mid]:
            b = mid
        else:
            a = mid + 1
    ctl[Q_LO] = lo + a


@njit(cache=True)
def _room_at(ctl, inflight, t_ns, n):
    """Earliest time >= t_ns at which ``n`` descriptors fit (qi.InvalidationQueue.room_at);
    -1 when they never can."""
    allowed = ctl[Q_ENTRIES] - 1 - n - ctl[Q_HELD]
    if allowed < 0:
        return -1
    lo, hi = ctl[Q_LO], ctl[Q_HI]
    k = np.searchsorted(inflight[lo:hi], t_ns, side="right") + lo   # free at t_ns
    must_retire = hi - k - allowed
    if must_retire <= 0:
        return t_ns
    return max(t_ns, inflight[k + must_retire - 1])


@njit(cache=True)
def _free_slots(ctl, inflight, t_ns):
    lo, hi = ctl[Q_LO], ctl[Q_HI]
    held = hi - (np.searchsorted(inflight[lo:hi], t_ns, side="right") + lo)
    return ctl[Q_ENTRIES] - 1 - held - ctl[Q_HELD]


@njit(cache=True)
def _submit(ctl, inflight, unresponsive, words, pend, done, t_ns, mode, record):
    """One tail write of ``words`` (uint64[4 n]: qw0..qw3 of each descriptor, in queue order;
    a DESC_DTYPE array's own memory) at t_ns, processed by the hardware.

    ctl, inflight: the queue (Q_*); unresponsive: int64[] source-ids whose device-TLB
    invalidations time out (ITE); pend: int64[rows, EFFECT_FIELDS], where the effects go when
    ``record``; done: int64[>= n], each processed descriptor's effect or completion time.
    ``mode``: M_WRITE, a software tail write (refused while IQE or ITE is set, or when it does
    not fit: queue_full); M_DRIVER, the same after the driver spun until n descriptors fit
    (room_at); M_RESUME, hardware goes on with what IQE held (written already: no checks).
    Returns (status S_*, descriptors processed, the time the write was made at, the time the
    last one took effect or completed (S_OK; else the time written), decode error ERR_* or 0):
    S_IQE leaves the descriptor at ``processed`` unprocessed, S_ITE names the one
    at ``processed - 1``; S_NEED_ROOM asks for larger ``inflight`` or ``pend`` (nothing
    changed).
    """
    n = words.shape[0] // 4
    if ctl[Q_HI] + n > inflight.shape[0] or (record and pend[0, P_END] + n > pend.shape[0]):
        return S_NEED_ROOM, 0, t_ns, t_ns, 0
    if mode == M_DRIVER:
        at = _room_at(ctl, inflight, t_ns, n)
        if at < 0:
            return S_NEVER_FITS, 0, t_ns, t_ns, 0
        t_ns = at
    entries = ctl[Q_ENTRIES]
    if mode != M_RESUME:
        if ctl[Q_IQE] != 0:
            ctl[Q_REFUSED] += 1
            return S_REFUSED_IQE, 0, t_ns, t_ns, 0
        if ctl[Q_ITE] != 0:
            ctl[Q_REFUSED] += 1
            return S_REFUSED_ITE, 0, t_ns, t_ns, 0
        if n > _free_slots(ctl, inflight, t_ns):
            ctl[Q_REFUSED] += 1
            return S_REFUSED_FULL, 0, t_ns, t_ns, 0
        ctl[Q_TAIL] = (ctl[Q_TAIL] + n) % entries
    if n == 0:              # an empty tail write fetches nothing: the hardware stays idle
        return S_OK, 0, t_ns, t_ns, 0
    cursor = max(t_ns, ctl[Q_BUSY])
    mamv = ctl[Q_MAMV]
    f = np.zeros(DECODED_FIELDS, np.int64)
    hi = ctl[Q_HI]
    row = pend[0, P_END]
    for i in range(n):
        k = 4 * i
        code = _decode(words[k], words[k + 1], words[k + 2], words[k + 3], mamv, f)
        if code != ERR_NONE:
            ctl[Q_IQE] = 1
            ctl[Q_IQE_HEAD] = ctl[Q_HEAD]
            ctl[Q_HELD] = n - i
            ctl[Q_ERRORS] += 1
            ctl[Q_BUSY] = cursor
            ctl[Q_HI] = hi
            if record:
                pend[0, P_END] = row
            return S_IQE, i, t_ns, t_ns, code
        t = f[D_TYPE]
        ctl[Q_COUNTS + t] += 1
        ctl[Q_HEAD] = (ctl[Q_HEAD] + 1) % entries
        if t == T_IWD:
            cursor += ctl[Q_WAIT_NS]
            if f[D_IF] != 0:
                ctl[Q_IWC] = 1
        else:
            dev = t in (T_DIOTLB, T_DEIOTLB)
            if dev:
                for s in unresponsive:
                    if s == f[D_SID]:      # spec 6.5.2.10: ITE; the rest is dropped
                        ctl[Q_ITE] = 1
                        ctl[Q_HEAD] = ctl[Q_TAIL]
                        ctl[Q_BUSY] = cursor
                        ctl[Q_HI] = hi
                        if record:
                            pend[0, P_END] = row
                        return S_ITE, i + 1, t_ns, t_ns, 0
            cursor += ctl[Q_DEVTLB_NS] if dev else ctl[Q_DESC_NS]
            if record:
                pend[row, E_T] = cursor
                pend[row, E_TYPE] = t
                pend[row, E_GRAN] = f[D_GRAN]
                pend[row, E_DID] = f[D_DID]
                pend[row, E_PASID] = f[D_PASID]
                pend[row, E_SID] = f[D_SID]
                pend[row, E_FM] = f[D_FM]
                pend[row, E_PFN] = f[D_PFN]
                pend[row, E_AM] = f[D_AM]
                pend[row, E_IH] = f[D_IH]
                pend[row, E_SIZE_LOG2] = f[D_SIZE_LOG2]
                pend[row, E_GLOB] = f[D_GLOB]
                row += 1
        done[i] = cursor
        inflight[hi] = cursor
        hi += 1
    ctl[Q_HI] = hi
    ctl[Q_BUSY] = cursor
    if record:
        pend[0, P_END] = row
    return S_OK, n, t_ns, cursor, 0


@njit(cache=True)
def _page_range(pfn, am):
    """First and last 4-KiB page of 2^am pages at ``pfn`` (iotlb.py IotlbArrays._inv)."""
    lo = (np.uint64(pfn) >> np.uint64(am)) << np.uint64(am)
    hi = lo + ((np.uint64(1) << np.uint64(am)) - np.uint64(1))
    return lo, min(hi, np.uint64(MAX_PFN))


@njit(cache=True)
def _probe_range(state, counters, did, pasid, lo, hi, span_base, m_first, m_last,
                 first_level):
    """Drop the lines of (did, pasid) whose pages meet [lo, hi], visiting only the sets their
    keys hash to; returns the count, or -1 (nothing done) when that would visit at least as
    many sets as the cache has (the caller then scans every line).

    The same lines, and the same counter, as iotlb.py's scans select: _invalidate's
    INV_PASID_PAGE (``first_level``: PGTT first-level or nested only; span_base 0, orders
    m 0..2) and _inv_range of one DID and one PASID (span_base 0 for device-TLB lines, 1 and
    levels 2..5 for paging-structure lines). Every fill places a line in the set of its key
    (_set_index(did, pasid, tag, m), iotlb.py _fill_keyed), and a line of ``m`` meets the
    range only if its tag is in [lo >> 9 (m - span_base), hi >> 9 (m - span_base)], so those
    sets hold every line a scan would drop. did, pasid, lo, hi: uint64; span_base, m_first,
    m_last: int64; first_level: bool. The next lines are the scan, left for reference:
        for s in range(sets): for w in range(ways): (the predicate below)
    """
    sets = state.shape[1]
    if sets == 0:
        return 0
    nine = np.uint64(9)
    one = np.uint64(1)
    base = np.uint64(span_base)
    probes = 0
    for m in range(m_first, m_last + 1):
        sh = nine * np.uint64(m - span_base)
        probes += int((hi >> sh) - (lo >> sh)) + 1
        if probes >= sets:
            return -1
    dropped = 0
    for m in range(m_first, m_last + 1):
        um = np.uint64(m)
        sh = nine * np.uint64(m - span_base)
        for tag in range(int(lo >> sh), int(hi >> sh) + 1):
            s = _set_index(did, pasid, np.uint64(tag), um, sets)
            for w in range(state.shape[2]):
                if (state[F_VALID, s, w] == 0 or state[F_DID, s, w] != did
                        or state[F_PASID, s, w] != pasid):
                    continue
                if first_level and state[F_PGTT, s, w] not in (PGTT_FL_ONLY, PGTT_NESTED):
                    continue
                span = nine * (state[F_ORDER, s, w] - base)
                first = state[F_VPN, s, w] << span
                last = first + ((one << span) - one)
                if first <= hi and last >= lo:
                    state[F_VALID, s, w] = 0
                    dropped += 1
    counters[C_INVALIDATED] += dropped
    return dropped


@njit(cache=True)
def _advance(pend, t_ns, it_state, it_counts, fl_state, fl_counts, sl_state, sl_counts,
             dt_state, dt_counts):
    """Apply every pending effect with time <= t_ns, in order, to the caches.

    pend: as in _submit; the IOTLB, first- and second-level paging-structure caches and the
    device-TLBs as (state, counts) of host_iommu/kernels/iotlb.py's layout (a cache that is
    off: zero sets). Stops at a context-cache or PASID-cache invalidation (Python caches):
    returns (its row, its time) for the caller to apply and resume after; else (-1, the next
    effect's time, or -1 when none is left). The dispatch is iommu.CacheSet's, descriptor by
    descriptor.
    """
    r = pend[0, P_FIRST]
    end = pend[0, P_END]
    zero = np.uint64(0)
    one = np.uint64(1)
    whole = np.uint64(MAX_PFN)
    # _probe_range's span bases and key ranges: IOTLB and device-TLB page orders 0..2 (base
    # 0), paging-structure levels 2..5 (base 1); int64 values, not literals (see __init__)
    base0, base1 = np.int64(0), np.int64(1)
    m0, m2, m5 = np.int64(0), np.int64(2), np.int64(5)
    while r < end and pend[r, E_T] <= t_ns:
        t = pend[r, E_TYPE]
        if t in (T_CC, T_PC):
            pend[0, P_FIRST] = r
            return r, pend[r, E_T]
        did = np.uint64(pend[r, E_DID])
        pasid = np.uint64(pend[r, E_PASID])
        gran = pend[r, E_GRAN]
        leaf = pend[r, E_IH] != 0
        every = gran >= 0          # a non-literal True
        if t == T_IOTLB:
            if gran == 1:
                _invalidate(it_state, it_counts, np.int64(INV_GLOBAL), zero, zero, zero, zero)
                _inv_range(fl_state, fl_counts, every, zero, every, zero, zero, whole, one)
                _inv_range(sl_state, sl_counts, every, zero, every, zero, zero, whole, one)
            elif gran == 2:
                _invalidate(it_state, it_counts, np.int64(INV_DOMAIN), did, zero, zero, zero)
                _inv_range(fl_state, fl_counts, not every, did, every, zero, zero, whole, one)
                _inv_range(sl_state, sl_counts, not every, did, every, zero, zero, whole, one)
            else:
                lo, hi = _page_range(pend[r, E_PFN], pend[r, E_AM])
                _invalidate(it_state, it_counts, np.int64(INV_PAGE), did, zero, lo, hi)
                if not leaf:
                    _inv_range(sl_state, sl_counts, not every, did, every, zero, lo, hi, one)
                    _inv_range(fl_state, fl_counts, not every, did, every, zero, zero, whole,
                               one)
        elif t == T_EIOTLB:
            if gran == 2:
                _invalidate(it_state, it_counts, np.int64(INV_PASID), did, pasid, zero, zero)
                _inv_range(fl_state, fl_counts, not every, did, not every, pasid, zero, whole,
                           one)
            else:
                lo, hi = _page_range(pend[r, E_PFN], pend[r, E_AM])
                if _probe_range(it_state, it_counts, did, pasid, lo, hi, base0, m0, m2,
                                every) < 0:
                    _invalidate(it_state, it_counts, np.int64(INV_PASID_PAGE), did, pasid,
                                lo, hi)
                if not leaf and _probe_range(fl_state, fl_counts, did, pasid, lo, hi, base1,
                                             m2, m5, not every) < 0:
                    _inv_range(fl_state, fl_counts, not every, did, not every, pasid, lo, hi,
                               one)
        elif t in (T_DIOTLB, T_DEIOTLB):
            lo = np.uint64(pend[r, E_PFN])
            hi = min(lo + ((one << np.uint64(pend[r, E_SIZE_LOG2] - 12)) - one), whole)
            sid = np.uint64(pend[r, E_SID])
            glob = pend[r, E_GLOB] != 0
            if glob or _probe_range(dt_state, dt_counts, sid, pasid, lo, hi, base0, m0, m2,
                                    not every) < 0:
                _inv_range(dt_state, dt_counts, not every, sid, glob, pasid, lo, hi, zero)
        # T_IEC: interrupt remapping is not emulated (CacheSet.iec does nothing)
        r += 1
    if r == end:               # empty: start again from row 1
        pend[0, P_FIRST] = 1
        pend[0, P_END] = 1
        return -1, -1
    pend[0, P_FIRST] = r
    return -1, pend[r, E_T]
