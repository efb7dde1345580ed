"""The guest's unmap invalidation policies: lazy flush queues and strict flushing.

Follows Linux drivers/iommu/dma-iommu.c (struct iova_fq, queue_iova, fq_ring_add,
fq_ring_free, fq_flush_iotlb, fq_flush_timeout; IOVA_DEFAULT_FQ_SIZE / _TIMEOUT,
IOVA_SINGLE_FQ_SIZE / _TIMEOUT) and, for the timer, kernel/time/timer.c. No clock and no
IOMMU here: callers pass times in ns and perform the invalidations themselves.

The single queue (IOMMU_DMA_OPTS_SINGLE_QUEUE, 32768 entries, 1000 ms) is what dma-iommu.c
gives a driver that asks for it through shadow_on_flush, which only s390's IOMMU driver does;
a VT-d guest always gets the per-CPU queues. It is kept for comparison.

The timer counts jiffies. queue_iova arms it only when it is not pending, with
``mod_timer(jiffies + msecs_to_jiffies(timeout))``, and the timer wheel never fires early: it
runs a timer one bucket granule after its expiry (timer.c calc_index), one jiffy for the 10 ms
timer. So at HZ=250 (4 ms jiffies) a timer armed at t fires at the first jiffy boundary after
t + 12 ms, between 12 and 16 ms later, and about 16 ms under steady traffic, which re-arms
right after each tick.

An IOVA's life after the DMA layer unmaps it:

    mapped -> unmapped, awaiting flush -> reusable

"Awaiting flush" is an entry in a flush queue, tagged with the flush-start counter at the time
it was queued. It becomes reusable (returned to the IOVA allocator) only after a flush that
STARTED after it was queued has FINISHED: fq_flush_iotlb increments a start counter before the
domain-wide invalidation and a finish counter after, and an entry tagged ``c`` is freed once the
finish counter exceeds ``c``. Until then the device may still hold a stale IOTLB translation:
the time from unmap to that flush's completion is the entry's stale window (``stale_ns``).

The caller's protocol, the same for both policies:

    r = policy.queue(cpu, pfn, pages, t_ns)     # at unmap
    give r.freed back to the allocator
    if r.flush_now: invalidate (domain-wide if policy.lazy, else the range), wait, then
        give policy.flush_done(t_done_ns) back to the allocator
    if r.timer_deadline_ns is not None: schedule policy.on_timer at that time; when it
        returns True, invalidate domain-wide, wait, and give back flush_done(t_done_ns).

FlushQueue keeps its state in one numpy array worked on by the compiled kernels of
vm_agent/kernels/flushq.py, which a whole-VM-epoch kernel can call directly; the functions
below (jiffies, the wheel's rounding, ``fq_timer_max_ns``) stay in plain Python for callers
and tests. vm_agent/reference_flushq.py is the reference both are tested against.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vm_agent.kernels import flushq as K
from vm_agent.kernels.flushq import TIMER_LVL_BITS, TIMER_LVL_CLK_SHIFT, TIMER_LVL_DEPTH

IOVA_DEFAULT_FQ_SIZE = 256                    # dma-iommu.c: per-CPU ring slots
IOVA_DEFAULT_FQ_TIMEOUT_NS = 10_000_000       # dma-iommu.c: 10 ms
IOVA_SINGLE_FQ_SIZE = 32768                   # dma-iommu.c: single-queue ring slots
IOVA_SINGLE_FQ_TIMEOUT_NS = 1_000_000_000     # dma-iommu.c: 1000 ms
HZ_CHOICES = (100, 250, 300, 1000)            # Kconfig.hz: the CONFIG_HZ a kernel may have
DEFAULT_HZ = 250                              # Kconfig.hz default (CONFIG_HZ_250)
NS_PER_SEC = 1_000_000_000
# The timer wheel's TIMER_LVL_* (kernel/time/timer.c) are defined with the kernels.
# First capacities of the arrays (each doubles when a kernel asks for room): ring slots (up
# to the ring's size), in-flight flushes, kept completion times.
_INITIAL_RING_SLOTS = 1024
_INITIAL_INFLIGHT = 4
_INITIAL_HISTORY = 16
_fq_queue = K.fq_queue              # the two kernels of every unmap, bound once
_fq_flush_done = K.fq_flush_done


def jiffies_at(t_ns: int, hz: int) -> int:
    """The jiffies count at virtual time ``t_ns`` (ticks at k * 10^9 / hz ns, jiffies 0 at 0)."""
    return t_ns * hz // NS_PER_SEC


def jiffy_ns(k: int, hz: int) -> int:
    """The virtual time of tick ``k``: the first ns at which jiffies reads ``k``."""
    return -(-k * NS_PER_SEC // hz)


def timeout_jiffies(timeout_ns: int, hz: int) -> int:
    """msecs_to_jiffies for a timeout in ns: rounded up to whole jiffies."""
    return -(-timeout_ns * hz // NS_PER_SEC)


def _granule_shift(delta: int) -> int:
    """log2 of the bucket granule (jiffies) of the wheel level a timer ``delta`` ticks away
    lands in (timer.c calc_wheel_index: level n starts at LVL_START(n))."""
    lvl = 0
    while lvl < TIMER_LVL_DEPTH - 1 and delta >= (
            ((1 << TIMER_LVL_BITS) - 1) << (lvl * TIMER_LVL_CLK_SHIFT)):
        lvl += 1
    return lvl * TIMER_LVL_CLK_SHIFT


def timer_fire_jiffy(expires: int, clk: int) -> int:
    """The tick at which a timer armed at tick ``clk`` for ``expires`` runs: calc_index rounds
    the expiry up to the next bucket of its level (one jiffy at level 0), never early."""
    shift = _granule_shift(expires - clk)
    return ((expires >> shift) + 1) << shift


def fq_timer_deadline_ns(t_ns: int, timeout_ns: int, hz: int) -> int:
    """When the flush-queue timer armed at ``t_ns`` fires (queue_iova's mod_timer)."""
    now = jiffies_at(t_ns, hz)
    return jiffy_ns(timer_fire_jiffy(now + timeout_jiffies(timeout_ns, hz), now), hz)


def fq_timer_max_ns(timeout_ns: int, hz: int) -> int:
    """The longest the timer can take to fire after it was armed: armed right on a tick,
    with the expiry just past a bucket boundary (the max over every alignment)."""
    n = timeout_jiffies(timeout_ns, hz)
    span = 3 << _granule_shift(n)    # every alignment to the granule and to HZ's ns rounding
    return max(jiffy_ns(timer_fire_jiffy(k + n, k), hz) - jiffy_ns(k, hz) for k in range(span))


# Why a flush was started (kept per in-flight flush, finished in start order).
FLUSH_FULL = 0       # queue_iova found the ring full: frees that ring at completion
FLUSH_TIMER = 1      # fq_flush_timeout: frees every ring at completion
FLUSH_OTHER = 2      # start_flush from outside (and strict flushes): frees every ring


class FlushQueueError(Exception):
    """Bad use of a flush queue: a CPU out of range, or flush_done with no flush started."""


class Reusable(list):
    """A list of (pfn, pages) now reusable, with each one's stale window in ``stale_ns``
    (unmap time to completion of the first flush that covered it) and their maximum."""

    __slots__ = ("max_stale_ns", "stale_ns")

    def __init__(self, ranges: Iterable[tuple[int, int]] = (),
                 stale_ns: list[int] | None = None, max_stale_ns: int = 0) -> None:
        super().__init__(ranges)
        self.stale_ns: list[int] = [] if stale_ns is None else stale_ns
        self.max_stale_ns = max_stale_ns


_NOTHING_FREED = Reusable()   # shared by every QueueResult that frees nothing: do not mutate


@dataclass(frozen=True, slots=True)
class QueueResult:
    """What the DMA layer must do after queueing one unmapped IOVA range."""

    freed: Reusable             # (pfn, pages) reusable now: give back; read-only (may be shared)
    flush_now: bool             # invalidate now, then call flush_done
    timer_deadline_ns: int | None   # set only when this call armed the timer


# What most queue calls answer (nothing freed, no flush, timer already armed): one shared
# instance, so the common call builds no object.
_NOTHING_TO_DO = QueueResult(_NOTHING_FREED, False, None)


class FlushQueue:
    """Lazy (deferred) invalidation: per-CPU rings, or one ring, flushed when full or on timer.

    A ring of ``size`` slots holds ``size - 1`` entries, as Linux's (fq_full: tail + 1 ==
    head), so the ``size``-th queue into a ring with nothing freed asks for a flush. A full
    ring's flush frees that ring at completion; other rings' covered entries are freed at
    their next ``queue`` (queue_iova's first fq_ring_free) or by a timer flush, which frees
    every ring. One timer serves all rings; ``queue`` arms it when unarmed, to fire at a tick
    of a ``hz`` clock (``fq_timer_deadline_ns``); ``timer_max_ns`` is the longest it can take.

    The state is one int64 array, ``_st``, worked on by the compiled kernels of
    vm_agent/kernels/flushq.py, which documents its layout: counters, timer, ring heads and
    tails, in-flight flushes, completion times, the rings (``_ring``, a [rings, slots,
    fields] view) and what the last call freed (``_out``). This class checks arguments,
    grows the array when a kernel asks for room, and turns what a kernel freed into a
    ``Reusable``.
    """

    lazy = True

    def __init__(self, cpus: int, per_cpu: bool = True, size: int | None = None,
                 timeout_ns: int | None = None, hz: int = DEFAULT_HZ) -> None:
        if cpus <= 0:
            raise FlushQueueError(f"flush queue for {cpus} CPUs")
        if size is None:
            size = IOVA_DEFAULT_FQ_SIZE if per_cpu else IOVA_SINGLE_FQ_SIZE
        if timeout_ns is None:
            timeout_ns = IOVA_DEFAULT_FQ_TIMEOUT_NS if per_cpu else IOVA_SINGLE_FQ_TIMEOUT_NS
        if size < 2 or size & (size - 1):
            raise FlushQueueError(f"ring size {size} is not a power of two >= 2")
        if timeout_ns <= 0:
            raise FlushQueueError(f"timeout {timeout_ns} ns is not positive")
        if hz <= 0:
            raise FlushQueueError(f"HZ {hz} is not positive")
        self.cpus = cpus
        self.per_cpu = per_cpu
        self.size = size
        self.timeout_ns = timeout_ns
        self.hz = hz
        self.timer_max_ns = fq_timer_max_ns(timeout_ns, hz)
        self._st = K.new_state(cpus if per_cpu else 1, size - 1, per_cpu,
                               timeout_jiffies(timeout_ns, hz), hz,
                               min(size, _INITIAL_RING_SLOTS), _INITIAL_INFLIGHT,
                               _INITIAL_HISTORY)

    # --- the guest's calls (the caller's protocol in the module docstring)
    def queue(self, cpu: int, pfn: int, pages: int, t_ns: int) -> QueueResult:
        """Queue an unmapped range (queue_iova): free covered entries, flush if full, add."""
        n, flush_now, armed = _fq_queue(self._st, cpu, pfn, pages, t_ns)
        if n <= 0:
            if n == 0:
                if not (flush_now or armed):
                    return _NOTHING_TO_DO
                freed = _NOTHING_FREED
            elif n == K.BAD_CPU:
                raise FlushQueueError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
            else:   # NEED_ROOM: nothing was done
                self._grow()
                return self.queue(cpu, pfn, pages, t_ns)
        else:
            freed = self._freed(n)
        return QueueResult(freed, flush_now, int(self._st[K.S_DEADLINE_NS]) if armed else None)

    def due(self, t_ns: int) -> bool:
        """Whether the timer is armed and has expired at ``t_ns``."""
        st = self._st
        return bool(st[K.S_ARMED]) and t_ns >= int(st[K.S_DEADLINE_NS])

    def timer_deadline(self) -> int | None:
        """When the armed timer fires, or None when unarmed."""
        st = self._st
        return int(st[K.S_DEADLINE_NS]) if st[K.S_ARMED] else None

    def on_timer(self, t_ns: int) -> bool:
        """fq_flush_timeout: if due, disarm and start a flush of everything; True when the
        caller must now invalidate domain-wide and then call ``flush_done``."""
        started = K.fq_on_timer(self._st, t_ns)
        if started == K.NEED_ROOM:
            self._grow()
            return self.on_timer(t_ns)
        return started == 1

    def start_flush(self) -> int:
        """Start a flush from outside the queue's own triggers; returns its start count."""
        cnt = K.fq_start_flush(self._st)
        if cnt == K.NEED_ROOM:
            self._grow()
            return self.start_flush()
        return cnt

    def flush_done(self, t_ns: int) -> Reusable:
        """Finish the oldest started flush at ``t_ns``; returns the (pfn, pages) it frees."""
        n = _fq_flush_done(self._st, t_ns)
        if n < 0:
            if n == K.NO_FLUSH:
                raise FlushQueueError("flush_done with no flush started")
            self._grow()
            return self.flush_done(t_ns)
        return self._freed(n) if n else Reusable()

    # --- what the counters and tests read
    def pending(self) -> int:
        """Entries awaiting flush in all rings."""
        return int(self._st[K.S_PENDING])

    def inflight(self) -> int:
        """Flushes started and not yet finished."""
        st = self._st
        return int(st[K.S_IN_TAIL] - st[K.S_IN_HEAD])

    @property
    def flushes(self) -> int:
        """Flushes started (ring full, timer and outside)."""
        return int(self._st[K.S_FLUSHES])

    @property
    def flushes_full(self) -> int:
        """Flushes started because a ring was full."""
        return int(self._st[K.S_FLUSHES_FULL])

    @property
    def flushes_timer(self) -> int:
        """Flushes started by the timer."""
        return int(self._st[K.S_FLUSHES_TIMER])

    @property
    def max_pending(self) -> int:
        """The most entries ever awaiting flush at once."""
        return int(self._st[K.S_MAX_PENDING])

    @property
    def _finish_ns(self) -> list[int]:
        """Completion times still kept: flushes finish_base..finish_cnt, oldest first."""
        st = self._st
        hist, mask = int(st[K.S_HIST_OFF]), int(st[K.S_FCAP]) - 1
        return [int(st[hist + (k & mask)])
                for k in range(int(st[K.S_FINISH_BASE]), int(st[K.S_FINISH_CNT]) + 1)]

    @property
    def _ring(self) -> np.ndarray:
        """The ring slots, [rings, slots, (pfn, pages, counter, t_queued_ns)] (a view)."""
        return K.ring_view(self._st)

    @property
    def _out(self) -> np.ndarray:
        """What the last kernel call freed, [(pfn, pages, stale_ns), slots] (a view)."""
        return K.out_view(self._st)

    def _freed(self, n: int) -> Reusable:
        """The first ``n`` entries the last kernel call freed, as a Reusable."""
        st = self._st
        at_pfn = int(st[K.S_OUT_OFF])                  # out[0, 0]
        slots = int(st[K.S_RINGS] * st[K.S_RCAP])
        at_pages, at_stale = at_pfn + slots, at_pfn + 2 * slots
        stale = st[at_stale:at_stale + n].tolist()
        worst = max(stale)
        return Reusable(zip(st[at_pfn:at_pfn + n].tolist(), st[at_pages:at_pages + n].tolist(),
                            strict=True), stale, worst if worst > 0 else 0)

    def _grow(self) -> None:
        """Double whatever a kernel found full: a ring's slots, the in-flight FIFO or the
        completion-time history."""
        st = self._st
        rings = int(st[K.S_RINGS])
        rcap, icap, fcap = int(st[K.S_RCAP]), int(st[K.S_ICAP]), int(st[K.S_FCAP])
        held = max(int(st[K.HEADER + rings + r] - st[K.HEADER + r]) for r in range(rings))
        if held >= rcap:
            rcap *= 2
        if int(st[K.S_IN_TAIL] - st[K.S_IN_HEAD]) >= icap:
            icap *= 2
        if int(st[K.S_FINISH_CNT] - st[K.S_FINISH_BASE]) + 2 > fcap:
            fcap *= 2
        if (rcap, icap, fcap) == (int(st[K.S_RCAP]), int(st[K.S_ICAP]), int(st[K.S_FCAP])):
            raise FlushQueueError("a flush-queue kernel asked for room that is not short")
        self._st = K.regrow(st, rcap, icap, fcap)


class StrictPolicy:
    """Strict invalidation: every unmap is flushed (its range, then a wait) before the IOVA is
    freed, as iommu_dma_unmap + iommu_iotlb_sync. Same shape as FlushQueue: ``queue`` always
    answers flush_now, and ``flush_done`` returns the range it covered. Nothing waits longer
    than its own flush; there is no timer."""

    lazy = False

    def __init__(self, cpus: int = 1) -> None:
        self.cpus = cpus
        self._held: deque[tuple[int, int, int]] = deque()   # (pfn, pages, t_queued_ns)
        self.flushes = 0
        self.flushes_full = 0
        self.flushes_timer = 0
        self.max_pending = 0

    def queue(self, cpu: int, pfn: int, pages: int, t_ns: int) -> QueueResult:
        """Hold the range until its flush completes; always asks for that flush now."""
        self._held.append((pfn, pages, t_ns))
        self.flushes += 1
        if len(self._held) > self.max_pending:
            self.max_pending = len(self._held)
        return QueueResult(_NOTHING_FREED, True, None)

    def due(self, t_ns: int) -> bool:
        """Never: strict has no timer."""
        return False

    def timer_deadline(self) -> int | None:
        """Always None: strict has no timer."""
        return None

    def on_timer(self, t_ns: int) -> bool:
        """Never starts a flush."""
        return False

    def start_flush(self) -> int:
        """Strict flushes are started by ``queue``; this only reports the count so far."""
        return self.flushes

    def flush_done(self, t_ns: int) -> Reusable:
        """Finish the oldest unmap's flush; returns its (pfn, pages)."""
        if not self._held:
            raise FlushQueueError("flush_done with no flush started")
        pfn, pages, t_q = self._held.popleft()
        freed = Reusable()
        freed.append((pfn, pages))
        freed.stale_ns.append(t_ns - t_q)
        freed.max_stale_ns = t_ns - t_q
        return freed

    def pending(self) -> int:
        """Unmapped ranges whose flush has not completed."""
        return len(self._held)

    def inflight(self) -> int:
        """Flushes started and not yet finished (one per held range)."""
        return len(self._held)
