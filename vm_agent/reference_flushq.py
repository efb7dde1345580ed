"""Reference model of the guest's unmap policies: lazy flush queues and strict flushing.

The slow, obviously correct twin of vm_agent/flushq.py, written from Linux
drivers/iommu/dma-iommu.c (struct iova_fq, queue_iova, fq_ring_free_locked, fq_flush_iotlb,
fq_flush_timeout) and kernel/time/timer.c (mod_timer, calc_wheel_index, calc_index) and
sharing no code with the live model. Tests drive both with the same calls and compare every
result and counter.

What the emulator changes from Linux, as vm_agent/flushq.py documents it: a flush is not
synchronous. fq_flush_iotlb's start-counter increment happens when a flush is asked for
(ring full, timer, or ``start_flush``) and its finish-counter increment when the caller,
having invalidated, calls ``flush_done``; flushes finish in the order they started. The ring
free that follows the flush in Linux (fq_ring_free_locked of the full ring after a full-ring
flush, of every ring after the timer's) happens in ``flush_done``. So a ring is a FIFO list
rather than the C array with head/tail: while a ring-full flush is in flight the entry that
asked for it is already queued, one more than the C ring could hold.

Every finished flush's completion time is kept (a list that only grows), so an entry's stale
window is simply ``finish_ns[counter + 1] - t_queued``: entry counter ``c`` means the flush
that covers it is the (c+1)-th to start, hence the (c+1)-th to finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

NS_PER_SEC = 1_000_000_000
IOVA_DEFAULT_FQ_SIZE = 256                    # dma-iommu.c
IOVA_DEFAULT_FQ_TIMEOUT_MS = 10               # dma-iommu.c
IOVA_SINGLE_FQ_SIZE = 32768                   # dma-iommu.c
IOVA_SINGLE_FQ_TIMEOUT_MS = 1000              # dma-iommu.c
DEFAULT_HZ = 250                              # Kconfig.hz: CONFIG_HZ_250
# kernel/time/timer.c
LVL_CLK_SHIFT = 3
LVL_BITS = 6
LVL_SIZE = 1 << LVL_BITS


class FlushQueueError(Exception):
    """Bad use of the reference flush queue (the misuses vm_agent/flushq.py refuses)."""


# --- The timer wheel (kernel/time/timer.c), in jiffies ------------------------------------------
def jiffies(t_ns: int, hz: int) -> int:
    """jiffies at ``t_ns``: one tick every 1/hz s, jiffies 0 at time 0."""
    return (t_ns * hz) // NS_PER_SEC


def tick_ns(k: int, hz: int) -> int:
    """The first ns at which jiffies reads ``k``."""
    t = (k * NS_PER_SEC) // hz
    return t if jiffies(t, hz) >= k else t + 1


def msecs_to_jiffies(timeout_ns: int, hz: int) -> int:
    """msecs_to_jiffies (rounds up), for a timeout given in ns."""
    j = (timeout_ns * hz) // NS_PER_SEC
    return j if j * NS_PER_SEC >= timeout_ns * hz else j + 1


def lvl_depth(hz: int) -> int:
    """LVL_DEPTH: 9 levels when HZ > 100, else 8."""
    return 9 if hz > 100 else 8


def lvl_start(n: int) -> int:
    """LVL_START(n): the smallest delta that lands in level n."""
    return (LVL_SIZE - 1) << ((n - 1) * LVL_CLK_SHIFT)


def calc_wheel_bucket_expiry(expires: int, clk: int, hz: int) -> int:
    """calc_wheel_index's bucket_expiry: the tick at which the timer runs.

    The level is the first whose LVL_START(level + 1) exceeds the delta; calc_index rounds
    the expiry up to the next multiple of the level granularity (never early). A delta past
    the wheel's capacity (WHEEL_TIMEOUT_CUTOFF) is clamped to WHEEL_TIMEOUT_MAX.
    """
    depth = lvl_depth(hz)
    delta = expires - clk
    lvl = 0
    while lvl < depth - 1 and delta >= lvl_start(lvl + 1):
        lvl += 1
    if lvl == depth - 1:
        cutoff = lvl_start(depth)
        if delta >= cutoff:
            expires = clk + cutoff - (1 << ((depth - 1) * LVL_CLK_SHIFT))
    shift = lvl * LVL_CLK_SHIFT
    return ((expires >> shift) + 1) << shift


def timer_fire_ns(t_ns: int, timeout_ns: int, hz: int) -> int:
    """mod_timer(jiffies + msecs_to_jiffies(timeout)) at ``t_ns``: when the timer runs."""
    now = jiffies(t_ns, hz)
    return tick_ns(calc_wheel_bucket_expiry(now + msecs_to_jiffies(timeout_ns, hz), now, hz),
                   hz)


def timer_max_ns(timeout_ns: int, hz: int) -> int:
    """The longest a timer armed at any time takes to run.

    Within one tick the firing tick is fixed, so the worst arming time is a tick's first ns.
    Over ticks, tick lengths repeat every hz / gcd(hz, 10^9) ticks and the level rounding
    every granule (a power of two), so their product covers every case.
    """
    n = msecs_to_jiffies(timeout_ns, hz)
    # the granule of the level a delta of n lands in
    depth = lvl_depth(hz)
    lvl = 0
    while lvl < depth - 1 and n >= lvl_start(lvl + 1):
        lvl += 1
    period = (hz // gcd(hz, NS_PER_SEC)) << (lvl * LVL_CLK_SHIFT)
    return max(timer_fire_ns(tick_ns(k, hz), timeout_ns, hz) - tick_ns(k, hz)
               for k in range(period))


# --- Results ------------------------------------------------------------------------------
class Reusable(list):
    """(pfn, pages) now reusable, their stale windows (``stale_ns``) and the largest."""

    def __init__(self) -> None:
        super().__init__()
        self.stale_ns: list[int] = []
        self.max_stale_ns = 0

    def add(self, pfn: int, pages: int, window_ns: int) -> None:
        self.append((pfn, pages))
        self.stale_ns.append(window_ns)
        self.max_stale_ns = max(self.max_stale_ns, window_ns)


@dataclass
class QueueResult:
    """What the caller must do after queueing one range (see vm_agent/flushq.py)."""

    freed: Reusable
    flush_now: bool
    timer_deadline_ns: int | None


@dataclass
class Entry:
    """struct iova_fq_entry: an unmapped range and the start count when it was queued."""

    pfn: int
    pages: int
    counter: int
    t_queued_ns: int


# --- Lazy: the flush queue ------------------------------------------------------------------
class FlushQueue:
    """dma-iommu.c's flush queue: per-CPU rings (or one), flushed when full or by a timer."""

    lazy = True

    def __init__(self, cpus: int, per_cpu: bool = True, size: int | None = None,
                 timeout_ns: int | None = None, hz: int = DEFAULT_HZ) -> None:
        if cpus <= 0:
            raise FlushQueueError(f"flush queue for {cpus} CPUs")
        if size is None:
            size = IOVA_DEFAULT_FQ_SIZE if per_cpu else IOVA_SINGLE_FQ_SIZE
        if timeout_ns is None:
            timeout_ms = IOVA_DEFAULT_FQ_TIMEOUT_MS if per_cpu else IOVA_SINGLE_FQ_TIMEOUT_MS
            timeout_ns = timeout_ms * 1_000_000
        if size < 2 or bin(size).count("1") != 1:
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
        self.timer_max_ns = timer_max_ns(timeout_ns, hz)
        self.rings: list[list[Entry]] = [[] for _ in range(cpus if per_cpu else 1)]
        self.fq_flush_start_cnt = 0
        self.fq_flush_finish_cnt = 0
        self.finish_ns: list[int] = [0]      # [k]: completion time of the k-th finished flush
        self.started: list[int | None] = []  # ring to free per in-flight flush (None: all)
        self.fq_timer_on = False
        self.timer_expires_ns: int | None = None
        self.flushes = 0
        self.flushes_full = 0
        self.flushes_timer = 0
        self.max_pending = 0

    # queue_iova
    def queue(self, cpu: int, pfn: int, pages: int, t_ns: int) -> QueueResult:
        """queue_iova: free what finished flushes cover, flush if full, add, arm the timer."""
        if self.per_cpu:
            if cpu < 0 or cpu >= self.cpus:
                raise FlushQueueError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
            ring = cpu
        else:
            ring = 0
        freed = Reusable()
        self._fq_ring_free(ring, freed)
        flush_now = False
        if len(self.rings[ring]) >= self.size - 1:
            # fq_full ((tail + 1) & mod_mask == head: a ring holds size - 1 entries); the
            # flush finishes in flush_done, so a caller that has not finished it yet may
            # find the ring fuller still
            self._flush_start(ring)
            self.flushes_full += 1
            flush_now = True
        self.rings[ring].append(Entry(pfn, pages, self.fq_flush_start_cnt, t_ns))
        self.max_pending = max(self.max_pending, self.pending())
        armed = None
        if not self.fq_timer_on:
            self.fq_timer_on = True
            self.timer_expires_ns = timer_fire_ns(t_ns, self.timeout_ns, self.hz)
            armed = self.timer_expires_ns
        return QueueResult(freed, flush_now, armed)

    def due(self, t_ns: int) -> bool:
        """The timer is pending and has expired at ``t_ns``."""
        return self.fq_timer_on and t_ns >= self.timer_expires_ns

    def timer_deadline(self) -> int | None:
        """When the pending timer runs; None when it is not pending."""
        return self.timer_expires_ns if self.fq_timer_on else None

    def on_timer(self, t_ns: int) -> bool:
        """fq_flush_timeout, if the timer is due: clear fq_timer_on, start a flush of all."""
        if not self.due(t_ns):
            return False
        self.fq_timer_on = False
        self.timer_expires_ns = None
        self._flush_start(None)
        self.flushes_timer += 1
        return True

    def start_flush(self) -> int:
        """A flush started from outside; it frees every ring. Returns the start count."""
        self._flush_start(None)
        return self.fq_flush_start_cnt

    def flush_done(self, t_ns: int) -> Reusable:
        """The oldest started flush finished at ``t_ns``: free the ring(s) it covers."""
        if not self.started:
            raise FlushQueueError("flush_done with no flush started")
        ring = self.started.pop(0)
        self.fq_flush_finish_cnt += 1
        self.finish_ns.append(t_ns)
        freed = Reusable()
        for r in range(len(self.rings)) if ring is None else [ring]:
            self._fq_ring_free(r, freed)
        return freed

    def pending(self) -> int:
        """Entries awaiting a flush, all rings."""
        return sum(len(r) for r in self.rings)

    def inflight(self) -> int:
        """Flushes started, not finished."""
        return len(self.started)

    def _flush_start(self, ring: int | None) -> None:
        """fq_flush_iotlb's first half: atomic64_inc(&fq_flush_start_cnt)."""
        self.fq_flush_start_cnt += 1
        self.flushes += 1
        self.started.append(ring)

    def _fq_ring_free(self, ring: int, freed: Reusable) -> None:
        """fq_ring_free_locked: from the head, free entries a finished flush covers."""
        entries = self.rings[ring]
        while entries and entries[0].counter < self.fq_flush_finish_cnt:
            e = entries.pop(0)
            freed.add(e.pfn, e.pages, self.finish_ns[e.counter + 1] - e.t_queued_ns)


# --- Strict ---------------------------------------------------------------------------------
class StrictPolicy:
    """Strict: each unmap's own invalidation and wait, then the IOVA is freed (iommu_dma_unmap
    with iommu_iotlb_sync). Same calls as FlushQueue; no timer."""

    lazy = False

    def __init__(self, cpus: int = 1) -> None:
        self.cpus = cpus
        self.held: list[Entry] = []
        self.flushes = 0
        self.flushes_full = 0
        self.flushes_timer = 0
        self.max_pending = 0

    def queue(self, cpu: int, pfn: int, pages: int, t_ns: int) -> QueueResult:
        """Hold the range; its flush is asked for now."""
        self.held.append(Entry(pfn, pages, 0, t_ns))
        self.flushes += 1
        self.max_pending = max(self.max_pending, len(self.held))
        return QueueResult(Reusable(), True, None)

    def due(self, t_ns: int) -> bool:
        return False

    def timer_deadline(self) -> int | None:
        return None

    def on_timer(self, t_ns: int) -> bool:
        return False

    def start_flush(self) -> int:
        return self.flushes

    def flush_done(self, t_ns: int) -> Reusable:
        """The oldest held range's flush finished: it is reusable."""
        if not self.held:
            raise FlushQueueError("flush_done with no flush started")
        e = self.held.pop(0)
        freed = Reusable()
        freed.add(e.pfn, e.pages, t_ns - e.t_queued_ns)
        return freed

    def pending(self) -> int:
        return len(self.held)

    def inflight(self) -> int:
        return len(self.held)
