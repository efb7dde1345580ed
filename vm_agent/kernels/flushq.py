"""The guest's lazy flush queues on compiled kernels: per-CPU (or single) rings in arrays.

Follows Linux drivers/iommu/dma-iommu.c (struct iova_fq with head/tail and mod_mask,
queue_iova, fq_ring_add, fq_ring_free_locked, fq_flush_iotlb, fq_flush_timeout) and, for
the timer, kernel/time/timer.c (mod_timer, calc_wheel_index, calc_index). The same model
as vm_agent/flushq.py describes (flushes start when asked for and finish at ``flush_done``,
in start order; a finished flush frees the entries queued before it started), which is
that module's FlushQueue's state and work: the class there is a thin wrapper over these
arrays and kernels, and a whole-VM-epoch kernel can call the kernels directly. Checked step
by step against vm_agent/reference_flushq.py (tests/vm_agent/test_kernel_flushq.py).

State: one int64 array ``st`` per queue, so that a call passes one array (numba's
dispatch costs about 40 ns per array argument, as much as the work of a queue call). At
fixed offsets a header of scalars (S_*); then, at offsets the header holds:

- ``heads[rings]``, ``tails[rings]``: ring ``r`` holds its entries ``head..tail-1`` (counts
  that only grow) at slot ``k & (rcap - 1)``, as the C ring's ``& mod_mask``;
- the in-flight flushes in start order (the ring each frees when done, or ALL_RINGS), a FIFO
  of ``icap`` slots indexed by the same kind of counts;
- the completion time of flush ``k`` at slot ``k & (fcap - 1)`` of the finish history, kept
  for ``k`` in ``finish_base..finish_cnt``;
- ``ring[rings, rcap, E_FIELDS]``: the slots (pfn, pages, flush-start counter when queued,
  time queued), row-major (``ring_view``). ``rcap`` is a power of two that the wrapper
  doubles when a ring needs more slots: Linux's ring holds ``size - 1`` entries, but here
  the entry that asks for a flush is queued before that flush finishes, and flushes may be
  left in flight;
- ``out[3, rings * rcap]``: pfn, pages and stale window (ns) of the entries the last call
  freed, in order (``out_view``).

A kernel that would run out of room (a ring's slots, the in-flight FIFO or the finish
history) changes nothing and returns NEED_ROOM; the wrapper grows the arrays and calls again.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# kernel/time/timer.c: each wheel level has 2^LVL_BITS buckets, 2^LVL_CLK_SHIFT times coarser
# than the level below; LVL_DEPTH levels (9 when HZ > 100: vm_agent/flushq.py takes 9 always).
TIMER_LVL_CLK_SHIFT = 3
TIMER_LVL_BITS = 6
TIMER_LVL_DEPTH = 9
NS_PER_SEC = 1_000_000_000

# --- ring slot fields: struct iova_fq_entry (pfn, pages, counter) and the time it was queued
E_PFN, E_PAGES, E_COUNTER, E_T_NS = range(4)
E_FIELDS = 4

# --- st header offsets
S_RINGS = 0           # rings: cpus when per-CPU, else 1
S_RCAP = 1            # slots per ring (a power of two)
S_CAP = 2             # entries a ring holds before queue_iova asks for a flush (size - 1)
S_PER_CPU = 3         # 1: ring = cpu (checked); 0: one ring, the cpu ignored
S_TIMEOUT_J = 4       # msecs_to_jiffies(timeout)
S_HZ = 5              # CONFIG_HZ
S_START_CNT = 6       # fq_flush_start_cnt
S_FINISH_CNT = 7      # fq_flush_finish_cnt
S_FINISH_BASE = 8     # oldest flush whose completion time is kept
S_ARMED = 9           # fq_timer_on
S_DEADLINE_NS = 10    # when the armed timer runs
S_PENDING = 11        # entries in all rings
S_FLUSHES = 12        # flushes started
S_FLUSHES_FULL = 13   # ... by a full ring
S_FLUSHES_TIMER = 14  # ... by the timer
S_MAX_PENDING = 15    # the most entries ever queued at once
S_IN_HEAD = 16        # in-flight FIFO: flushes finished (count)
S_IN_TAIL = 17        # in-flight FIFO: flushes started (count)
S_ICAP = 18           # in-flight FIFO slots (a power of two)
S_FCAP = 19           # finish-history slots (a power of two)
S_FIFO_OFF = 20       # offset of the in-flight FIFO
S_HIST_OFF = 21       # offset of the finish history
S_RING_OFF = 22       # offset of ring[rings, rcap, E_FIELDS]
S_OUT_OFF = 23        # offset of out[3, rings * rcap]
HEADER = 24           # heads[rings] start here, then tails[rings]

# --- what the kernels return besides counts
NEED_ROOM = -1        # nothing changed: grow the arrays and call again
NO_FLUSH = -2         # flush_done with no flush in flight
BAD_CPU = -3          # a per-CPU queue given a CPU out of range
ALL_RINGS = -1        # an in-flight flush that frees every ring (timer, outside)


def layout(rings: int, rcap: int, icap: int, fcap: int) -> tuple[int, int, int, int, int]:
    """(FIFO, history, ring and out offsets, total length) of ``st`` for these capacities."""
    fifo = HEADER + 2 * rings
    hist = fifo + icap
    ring = hist + fcap
    out = ring + rings * rcap * E_FIELDS
    return fifo, hist, ring, out, out + 3 * rings * rcap


def ring_view(st: np.ndarray) -> np.ndarray:
    """``ring[rings, rcap, E_FIELDS]``: a view of the ring slots in ``st``."""
    rings, rcap, off = int(st[S_RINGS]), int(st[S_RCAP]), int(st[S_RING_OFF])
    return st[off:off + rings * rcap * E_FIELDS].reshape(rings, rcap, E_FIELDS)


def out_view(st: np.ndarray) -> np.ndarray:
    """``out[3, rings * rcap]``: a view of what the last call freed (pfn, pages, stale_ns)."""
    n, off = int(st[S_RINGS]) * int(st[S_RCAP]), int(st[S_OUT_OFF])
    return st[off:off + 3 * n].reshape(3, n)


@njit(cache=True)
def jiffies_at(t_ns, hz):
    """jiffies at ``t_ns`` (floor(t * hz / 10^9), without overflowing int64)."""
    sec = t_ns // NS_PER_SEC
    # = t_ns * hz // NS_PER_SEC
    return sec * hz + (t_ns - sec * NS_PER_SEC) * hz // NS_PER_SEC


@njit(cache=True)
def jiffy_ns(k, hz):
    """The first ns at which jiffies reads ``k`` (ceil(k * 10^9 / hz), without overflow)."""
    q = k // hz
    # = -(-k * NS_PER_SEC // hz)
    return q * NS_PER_SEC - (-(k - q * hz) * NS_PER_SEC // hz)


@njit(cache=True)
def timer_deadline_ns(t_ns, timeout_j, hz):
    """mod_timer(jiffies + timeout_j) at ``t_ns``: the time of the tick the timer runs at.

    calc_wheel_index puts a timer ``delta`` ticks away on the first level n whose
    LVL_START(n + 1) exceeds delta; calc_index rounds the expiry up to the next bucket of
    that level (2^(3n) jiffies), never early.
    """
    now = jiffies_at(t_ns, hz)
    expires = now + timeout_j
    delta = timeout_j
    lvl = 0
    while lvl < TIMER_LVL_DEPTH - 1 and delta >= (
            ((1 << TIMER_LVL_BITS) - 1) << (lvl * TIMER_LVL_CLK_SHIFT)):
        lvl += 1
    shift = lvl * TIMER_LVL_CLK_SHIFT
    return jiffy_ns(((expires >> shift) + 1) << shift, hz)


@njit(cache=True)
def _start(st, r):
    """fq_flush_iotlb's first half (atomic64_inc(&fq_flush_start_cnt)); the flush, once
    finished, frees ring ``r`` (or every ring: ALL_RINGS). The caller checked the room."""
    st[S_START_CNT] += 1
    st[S_FLUSHES] += 1
    tail = st[S_IN_TAIL]
    st[st[S_FIFO_OFF] + (tail & (st[S_ICAP] - 1))] = r
    st[S_IN_TAIL] = tail + 1


@njit(cache=True)
def _ring_free(st, r, n):
    """fq_ring_free_locked: pop ring ``r``'s entries from the head while a finished flush
    covers them (counter < fq_flush_finish_cnt), writing them to ``out`` from column ``n``.

    The stale window of an entry queued under start count c ends at the completion of flush
    c + 1, the first to start after it. Returns ``n`` plus the number freed.
    """
    rings = st[S_RINGS]
    rcap = st[S_RCAP]
    mask = rcap - 1
    finish = st[S_FINISH_CNT]
    hist = st[S_HIST_OFF]
    fmask = st[S_FCAP] - 1
    base = st[S_RING_OFF] + r * rcap * E_FIELDS     # ring[r, 0, 0]
    out = st[S_OUT_OFF]                             # out[0, 0]; out[f, j] at out + f*ocap + j
    ocap = rings * rcap
    head = st[HEADER + r]
    tail = st[HEADER + rings + r]
    n0 = n
    while head < tail:
        e = base + (head & mask) * E_FIELDS         # ring[r, head & mask, :]
        counter = st[e + E_COUNTER]
        if counter >= finish:
            break
        st[out + n] = st[e + E_PFN]
        st[out + ocap + n] = st[e + E_PAGES]
        st[out + 2 * ocap + n] = st[hist + ((counter + 1) & fmask)] - st[e + E_T_NS]
        n += 1
        head += 1
    st[HEADER + r] = head
    st[S_PENDING] -= n - n0
    return n


@njit(cache=True)
def fq_queue(st, cpu, pfn, pages, t_ns):
    """queue_iova: free what finished flushes cover in the CPU's ring, start a flush if the
    ring is full (fq_full), add the entry (fq_ring_add), arm the timer if unarmed.

    st: the state (module docstring). cpu: the unmapping CPU (its ring when per-CPU);
    pfn, pages: the unmapped IOVA range; t_ns: the time of the unmap.
    Returns (n, flush_now, armed): n entries freed into ``out`` (or NEED_ROOM / BAD_CPU,
    having changed nothing); flush_now: a flush started that the caller must now perform
    and finish; armed: this call armed the timer, to run at st[S_DEADLINE_NS].
    """
    rings = st[S_RINGS]
    if st[S_PER_CPU] != 0:
        if cpu < 0 or cpu >= rings:
            return BAD_CPU, False, False
        r = cpu
    else:
        r = 0
    rcap = st[S_RCAP]
    head = st[HEADER + r]
    tail = st[HEADER + rings + r]
    cap = st[S_CAP]
    if tail - head >= rcap or (tail - head >= cap
                               and st[S_IN_TAIL] - st[S_IN_HEAD] >= st[S_ICAP]):
        return NEED_ROOM, False, False
    base = st[S_RING_OFF] + r * rcap * E_FIELDS
    n = 0
    if head < tail and st[base + (head & (rcap - 1)) * E_FIELDS + E_COUNTER] < st[S_FINISH_CNT]:
        n = _ring_free(st, r, 0)
        head = st[HEADER + r]
    flush_now = False
    if tail - head >= cap:
        _start(st, r)
        st[S_FLUSHES_FULL] += 1
        flush_now = True
    e = base + (tail & (rcap - 1)) * E_FIELDS
    st[e + E_PFN] = pfn
    st[e + E_PAGES] = pages
    st[e + E_COUNTER] = st[S_START_CNT]
    st[e + E_T_NS] = t_ns
    st[HEADER + rings + r] = tail + 1
    pending = st[S_PENDING] + 1
    st[S_PENDING] = pending
    if pending > st[S_MAX_PENDING]:
        st[S_MAX_PENDING] = pending
    armed = False
    if st[S_ARMED] == 0:
        st[S_ARMED] = 1
        st[S_DEADLINE_NS] = timer_deadline_ns(t_ns, st[S_TIMEOUT_J], st[S_HZ])
        armed = True
    return n, flush_now, armed


@njit(cache=True)
def fq_flush_done(st, t_ns):
    """fq_flush_iotlb's second half (atomic64_inc(&fq_flush_finish_cnt)) for the oldest
    in-flight flush, finished at ``t_ns``, then the ring free that follows it: the full
    ring it was started for, or every ring.

    Returns the number of entries freed into ``out`` (or NO_FLUSH / NEED_ROOM, having
    changed nothing). Then forgets the completion times no queued entry can still ask for.
    """
    rings = st[S_RINGS]
    in_head = st[S_IN_HEAD]
    if in_head == st[S_IN_TAIL]:
        return NO_FLUSH
    finish = st[S_FINISH_CNT] + 1
    fcap = st[S_FCAP]
    if finish - st[S_FINISH_BASE] + 1 > fcap:
        return NEED_ROOM
    r = st[st[S_FIFO_OFF] + (in_head & (st[S_ICAP] - 1))]
    st[S_IN_HEAD] = in_head + 1
    st[S_FINISH_CNT] = finish
    st[st[S_HIST_OFF] + (finish & (fcap - 1))] = t_ns
    n = 0
    if r != ALL_RINGS:
        n = _ring_free(st, r, n)
    else:
        for rr in range(rings):
            n = _ring_free(st, rr, n)
    # An entry queued under start count c asks for flush c + 1; later ones for more.
    oldest = st[S_START_CNT]
    rcap = st[S_RCAP]
    for rr in range(rings):
        head = st[HEADER + rr]
        if head < st[HEADER + rings + rr]:
            c = st[st[S_RING_OFF] + (rr * rcap + (head & (rcap - 1))) * E_FIELDS + E_COUNTER]
            if c < oldest:
                oldest = c
    keep = min(oldest + 1, finish)
    if st[S_FINISH_BASE] < keep:
        st[S_FINISH_BASE] = keep
    return n


@njit(cache=True)
def fq_on_timer(st, t_ns):
    """fq_flush_timeout, if the timer is armed and due at ``t_ns``: disarm and start a flush
    that frees every ring. Returns 1 when started (the caller performs and finishes it), 0
    when not due, NEED_ROOM (nothing changed) when the in-flight FIFO is full."""
    if st[S_ARMED] == 0 or t_ns < st[S_DEADLINE_NS]:
        return 0
    if st[S_IN_TAIL] - st[S_IN_HEAD] >= st[S_ICAP]:
        return NEED_ROOM
    st[S_ARMED] = 0
    _start(st, ALL_RINGS)
    st[S_FLUSHES_TIMER] += 1
    return 1


@njit(cache=True)
def fq_start_flush(st):
    """A flush started from outside the queue's triggers, freeing every ring when done.
    Returns the start count after it, or NEED_ROOM (nothing changed)."""
    if st[S_IN_TAIL] - st[S_IN_HEAD] >= st[S_ICAP]:
        return NEED_ROOM
    _start(st, ALL_RINGS)
    return st[S_START_CNT]


def new_state(rings: int, cap: int, per_cpu: bool, timeout_j: int, hz: int, rcap: int,
              icap: int, fcap: int) -> np.ndarray:
    """An empty queue's ``st``: ``rings`` rings asking for a flush at ``cap`` entries, the
    timer ``timeout_j`` jiffies of a ``hz`` clock, the given capacities (powers of two)."""
    fifo, hist, ring, out, size = layout(rings, rcap, icap, fcap)
    st = np.zeros(size, np.int64)
    st[S_RINGS], st[S_RCAP], st[S_CAP], st[S_PER_CPU] = rings, rcap, cap, int(per_cpu)
    st[S_TIMEOUT_J], st[S_HZ], st[S_ICAP], st[S_FCAP] = timeout_j, hz, icap, fcap
    st[S_FIFO_OFF], st[S_HIST_OFF], st[S_RING_OFF], st[S_OUT_OFF] = fifo, hist, ring, out
    return st


def regrow(st: np.ndarray, rcap: int, icap: int, fcap: int) -> np.ndarray:
    """A new ``st`` with the given capacities (powers of two, none smaller than what is
    held): the same scalars, entries, in-flight flushes and kept completion times, each at
    its slot for the new capacity."""
    rings = int(st[S_RINGS])
    old_rcap, old_icap, old_fcap = int(st[S_RCAP]), int(st[S_ICAP]), int(st[S_FCAP])
    fifo, hist, _ring, out, size = layout(rings, rcap, icap, fcap)
    new = np.zeros(size, np.int64)
    new[:HEADER + 2 * rings] = st[:HEADER + 2 * rings]
    new[S_RCAP], new[S_ICAP], new[S_FCAP] = rcap, icap, fcap
    new[S_FIFO_OFF], new[S_HIST_OFF], new[S_RING_OFF], new[S_OUT_OFF] = fifo, hist, _ring, out
    old_ring, new_ring = ring_view(st), ring_view(new)
    for r in range(rings):
        k = np.arange(st[HEADER + r], st[HEADER + rings + r], dtype=np.int64)
        new_ring[r, k & (rcap - 1)] = old_ring[r, k & (old_rcap - 1)]
    k = np.arange(st[S_IN_HEAD], st[S_IN_TAIL], dtype=np.int64)
    new[fifo + (k & (icap - 1))] = st[int(st[S_FIFO_OFF]) + (k & (old_icap - 1))]
    k = np.arange(st[S_FINISH_BASE], st[S_FINISH_CNT] + 1, dtype=np.int64)
    new[hist + (k & (fcap - 1))] = st[int(st[S_HIST_OFF]) + (k & (old_fcap - 1))]
    return new


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel above once, on a tiny queue: a
    ring of 2 slots filled, flushed, flushed from outside and by the timer."""
    st = new_state(1, 1, True, 1, 250, 2, 4, 4)
    fq_queue(st, 0, 1, 1, 0)
    fq_queue(st, 0, 2, 1, 1)            # the ring is full: a flush starts
    fq_flush_done(st, 2)
    fq_start_flush(st)
    fq_flush_done(st, 3)
    fq_on_timer(st, int(st[S_DEADLINE_NS]))
    fq_flush_done(st, int(st[S_DEADLINE_NS]))
