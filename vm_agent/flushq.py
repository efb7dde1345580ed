"""The guest's unmap invalidation policies: lazy flush queues and strict flushing.

Follows Linux drivers/iommu/dma-iommu.c (struct iova_fq, queue_iova, fq_ring_add,
fq_ring_free, fq_flush_iotlb, fq_flush_timeout; IOVA_DEFAULT_FQ_SIZE / _TIMEOUT,
IOVA_SINGLE_FQ_SIZE / _TIMEOUT). No clock and no IOMMU here: callers pass times in ns and
perform the invalidations themselves.

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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

IOVA_DEFAULT_FQ_SIZE = 256                    # dma-iommu.c: per-CPU ring slots
IOVA_DEFAULT_FQ_TIMEOUT_NS = 10_000_000       # dma-iommu.c: 10 ms
IOVA_SINGLE_FQ_SIZE = 32768                   # dma-iommu.c: single-queue ring slots
IOVA_SINGLE_FQ_TIMEOUT_NS = 1_000_000_000     # dma-iommu.c: 1000 ms

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

    def __init__(self) -> None:
        super().__init__()
        self.stale_ns: list[int] = []
        self.max_stale_ns = 0


_NOTHING_FREED = Reusable()   # shared by every QueueResult that frees nothing: do not mutate


@dataclass(slots=True)
class QueueResult:
    """What the DMA layer must do after queueing one unmapped IOVA range."""

    freed: Reusable             # (pfn, pages) reusable now: give back; read-only (may be shared)
    flush_now: bool             # invalidate now, then call flush_done
    timer_deadline_ns: int | None   # set only when this call armed the timer


class FlushQueue:
    """Lazy (deferred) invalidation: per-CPU rings, or one ring, flushed when full or on timer.

    A ring of ``size`` slots holds ``size - 1`` entries, as Linux's (fq_full: tail + 1 ==
    head), so the ``size``-th queue into a ring with nothing freed asks for a flush. A full
    ring's flush frees that ring at completion; other rings' covered entries are freed at
    their next ``queue`` (queue_iova's first fq_ring_free) or by a timer flush, which frees
    every ring. One timer serves all rings; ``queue`` arms it when unarmed.
    """

    lazy = True

    def __init__(self, cpus: int, per_cpu: bool = True, size: int | None = None,
                 timeout_ns: int | None = None) -> None:
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
        self.cpus = cpus
        self.per_cpu = per_cpu
        self.size = size
        self.timeout_ns = timeout_ns
        self._cap = size - 1
        # Entries: (pfn, pages, flush-start counter when queued, t_queued_ns).
        self._fqs: list[deque[tuple[int, int, int, int]]] = [
            deque() for _ in range(cpus if per_cpu else 1)]
        self._start_cnt = 0            # fq_flush_start_cnt
        self._finish_cnt = 0           # fq_flush_finish_cnt
        self._finish_ns: list[int] = [0]    # [k]: completion time of the k-th finished flush
        self._inflight: deque[tuple[int, int]] = deque()   # (reason, ring) per started flush
        self._deadline_ns: int | None = None
        self._pending = 0
        self.flushes = 0
        self.flushes_full = 0
        self.flushes_timer = 0
        self.max_pending = 0

    def queue(self, cpu: int, pfn: int, pages: int, t_ns: int) -> QueueResult:
        """Queue an unmapped range (queue_iova): free covered entries, flush if full, add."""
        if self.per_cpu:
            if not 0 <= cpu < self.cpus:
                raise FlushQueueError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
            ring = cpu
        else:
            ring = 0
        fq = self._fqs[ring]
        freed = _NOTHING_FREED
        if fq and fq[0][2] < self._finish_cnt:
            freed = Reusable()
            self._ring_free(fq, freed)
        flush_now = False
        if len(fq) >= self._cap:
            self._start(FLUSH_FULL, ring)
            self.flushes_full += 1
            flush_now = True
        fq.append((pfn, pages, self._start_cnt, t_ns))
        self._pending += 1
        if self._pending > self.max_pending:
            self.max_pending = self._pending
        armed = None
        if self._deadline_ns is None:
            armed = self._deadline_ns = t_ns + self.timeout_ns
        return QueueResult(freed, flush_now, armed)

    def due(self, t_ns: int) -> bool:
        """Whether the timer is armed and has expired at ``t_ns``."""
        return self._deadline_ns is not None and t_ns >= self._deadline_ns

    def timer_deadline(self) -> int | None:
        """When the armed timer fires, or None when unarmed."""
        return self._deadline_ns

    def on_timer(self, t_ns: int) -> bool:
        """fq_flush_timeout: if due, disarm and start a flush of everything; True when the
        caller must now invalidate domain-wide and then call ``flush_done``."""
        if not self.due(t_ns):
            return False
        self._deadline_ns = None
        self._start(FLUSH_TIMER, -1)
        self.flushes_timer += 1
        return True

    def start_flush(self) -> int:
        """Start a flush from outside the queue's own triggers; returns its start count."""
        self._start(FLUSH_OTHER, -1)
        return self._start_cnt

    def flush_done(self, t_ns: int) -> Reusable:
        """Finish the oldest started flush at ``t_ns``; returns the (pfn, pages) it frees."""
        if not self._inflight:
            raise FlushQueueError("flush_done with no flush started")
        reason, ring = self._inflight.popleft()
        self._finish_cnt += 1
        self._finish_ns.append(t_ns)
        freed = Reusable()
        if reason == FLUSH_FULL:
            self._ring_free(self._fqs[ring], freed)
        else:
            for fq in self._fqs:
                self._ring_free(fq, freed)
        return freed

    def pending(self) -> int:
        """Entries awaiting flush in all rings."""
        return self._pending

    def inflight(self) -> int:
        """Flushes started and not yet finished."""
        return len(self._inflight)

    def _start(self, reason: int, ring: int) -> None:
        self._start_cnt += 1
        self.flushes += 1
        self._inflight.append((reason, ring))

    def _ring_free(self, fq: deque[tuple[int, int, int, int]], freed: Reusable) -> None:
        """fq_ring_free: pop entries from the head while a finished flush covers them."""
        finish = self._finish_cnt
        finish_ns = self._finish_ns
        stale = freed.stale_ns
        worst = freed.max_stale_ns
        n = 0
        while fq and fq[0][2] < finish:
            pfn, pages, counter, t_q = fq.popleft()
            freed.append((pfn, pages))
            window = finish_ns[counter + 1] - t_q
            stale.append(window)
            if window > worst:
                worst = window
            n += 1
        freed.max_stale_ns = worst
        self._pending -= n


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
