"""Tests of vm_agent/flushq.py: lazy flush queues and the strict policy."""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vm_agent.flushq import (
    HZ_CHOICES,
    IOVA_DEFAULT_FQ_SIZE,
    IOVA_SINGLE_FQ_SIZE,
    FlushQueue,
    FlushQueueError,
    StrictPolicy,
    fq_timer_deadline_ns,
    fq_timer_max_ns,
)

MS = 1_000_000


def test_defaults_per_cpu_and_single():
    """Per-CPU rings: 256 slots, 10 ms; a single ring: 32768 slots, 1000 ms."""
    fq = FlushQueue(4)
    assert (fq.size, fq.timeout_ns) == (IOVA_DEFAULT_FQ_SIZE, 10 * MS)
    single = FlushQueue(4, per_cpu=False)
    assert (single.size, single.timeout_ns) == (IOVA_SINGLE_FQ_SIZE, 1000 * MS)


def test_timer_armed_once_in_jiffies():
    """The first queue arms the timer (HZ=250: 10 ms is 3 jiffies, and the wheel fires one
    jiffy after expiry: the 4th tick after the current one); later queues leave it alone."""
    fq = FlushQueue(2)
    assert fq.timer_deadline() is None
    assert fq.queue(0, 100, 1, 5).timer_deadline_ns == 16 * MS
    assert fq.queue(1, 101, 1, 7).timer_deadline_ns is None
    assert fq.timer_deadline() == 16 * MS
    late = FlushQueue(2)
    assert late.queue(0, 1, 1, 4 * MS - 1).timer_deadline_ns == 16 * MS   # same jiffy
    assert FlushQueue(2).queue(0, 1, 1, 4 * MS).timer_deadline_ns == 20 * MS
    # the single queue's 1000 ms are 250 jiffies: a level-1 timer, rounded up to 8 jiffies
    single = FlushQueue(2, per_cpu=False)
    assert single.queue(0, 1, 1, 0).timer_deadline_ns == 1024 * MS


def _reference_deadline_ns(t_ns: int, timeout_ms: int, hz: int) -> int:
    """A level-0 timer by hand: jiffies = floor(t / J); n = ceil(timeout / J); the callback
    runs on tick jiffies + n + 1, whose time is the first ns at or after (that tick) * J."""
    jiffy = Fraction(10**9, hz)
    now = int(Fraction(t_ns) / jiffy)
    n = -(-timeout_ms * hz // 1000)
    tick = (now + n + 1) * jiffy
    return -(-tick.numerator // tick.denominator)


@pytest.mark.parametrize("hz", HZ_CHOICES)
@given(t_ns=st.integers(0, 10**12))
def test_timer_deadline_matches_a_hand_computed_tick(hz, t_ns):
    """The 10 ms timer fires at a tick, more than 10 ms and at most timer_max_ns after."""
    deadline = fq_timer_deadline_ns(t_ns, 10 * MS, hz)
    assert deadline == _reference_deadline_ns(t_ns, 10, hz)
    assert 10 * MS < deadline - t_ns <= fq_timer_max_ns(10 * MS, hz)


def test_steady_traffic_flushes_every_16_ms_at_hz_250():
    """Unmaps every 100 us: the timer re-arms right after each flush, so flushes come every
    4 jiffies (16 ms), as a real HZ=250 guest shows, and every 11 ms at HZ=1000."""
    for hz, period in ((250, 16 * MS), (1000, 11 * MS)):
        fq = FlushQueue(2, hz=hz)
        flushes = []
        for k in range(1000):
            t = k * MS // 10
            if fq.on_timer(t):
                flushes.append(t)
                fq.flush_done(t)
            fq.queue(0, k, 1, t)
        gaps = {b - a for a, b in pairwise(flushes)}
        assert gaps == {period}, (hz, gaps)


def test_ring_full_requests_flush_exactly_at_size():
    """A ring of size slots holds size - 1 entries; the size-th queue asks for a flush."""
    fq = FlushQueue(1, size=8)
    results = [fq.queue(0, pfn, 1, pfn) for pfn in range(8)]
    assert [r.flush_now for r in results] == [False] * 7 + [True]
    assert fq.pending() == 8
    freed = fq.flush_done(100)
    assert freed == [(pfn, 1) for pfn in range(7)]      # not the entry queued after the start
    assert freed.stale_ns == [100 - pfn for pfn in range(7)]
    assert freed.max_stale_ns == 100
    assert fq.pending() == 1
    assert (fq.flushes, fq.flushes_full, fq.flushes_timer) == (1, 1, 0)
    assert fq.max_pending == 8


def test_timer_flush_frees_every_ring():
    """on_timer fires only when due, disarms, and its completion frees all rings."""
    fq = FlushQueue(2, hz=1000)
    fq.queue(0, 10, 1, 0)
    fq.queue(1, 20, 2, 3 * MS)
    assert not fq.due(11 * MS - 1)
    assert not fq.on_timer(11 * MS - 1)
    assert fq.on_timer(11 * MS)
    assert fq.timer_deadline() is None
    freed = fq.flush_done(11 * MS + 500)
    assert sorted(freed) == [(10, 1), (20, 2)]
    assert freed.max_stale_ns == 11 * MS + 500
    assert fq.pending() == 0 and fq.flushes_timer == 1
    assert fq.queue(0, 11, 1, 20 * MS).timer_deadline_ns == 31 * MS   # re-armed


def test_per_cpu_rings_are_independent():
    """Filling CPU0's ring flushes only it; CPU1's covered entries come back at its next queue."""
    fq = FlushQueue(2, size=4)
    fq.queue(1, 100, 1, 0)
    for pfn in range(3):
        assert not fq.queue(0, pfn, 1, 1).flush_now
    assert not fq.queue(1, 101, 1, 2).flush_now      # CPU1 has room of its own
    assert fq.queue(0, 3, 1, 3).flush_now
    freed = fq.flush_done(50)
    assert freed == [(0, 1), (1, 1), (2, 1)]
    nxt = fq.queue(1, 102, 1, 60)
    assert nxt.freed == [(100, 1), (101, 1)]
    assert nxt.freed.stale_ns == [50, 48]           # window ends at the flush's completion


def test_single_queue_ignores_cpu():
    """With per_cpu=False all CPUs share one ring."""
    fq = FlushQueue(4, per_cpu=False, size=4)
    assert not fq.queue(0, 1, 1, 0).flush_now
    assert not fq.queue(3, 2, 1, 0).flush_now
    assert not fq.queue(99, 3, 1, 0).flush_now
    assert fq.queue(2, 4, 1, 0).flush_now
    assert fq.flush_done(9) == [(1, 1), (2, 1), (3, 1)]


def test_entry_queued_during_a_flush_waits_for_the_next():
    """A flush started before an entry was queued does not free it."""
    fq = FlushQueue(1)
    fq.start_flush()
    fq.queue(0, 7, 1, 10)
    assert fq.flush_done(20) == []
    fq.start_flush()
    done = fq.flush_done(30)
    assert done == [(7, 1)] and done.stale_ns == [20]


def test_bad_use_raises_named_error():
    """flush_done without a flush, a bad CPU or a bad ring size are FlushQueueErrors."""
    fq = FlushQueue(2)
    with pytest.raises(FlushQueueError):
        fq.flush_done(0)
    with pytest.raises(FlushQueueError):
        fq.queue(2, 1, 1, 0)
    with pytest.raises(FlushQueueError):
        FlushQueue(1, size=100)
    with pytest.raises(FlushQueueError):
        FlushQueue(1, hz=0)
    with pytest.raises(FlushQueueError):
        StrictPolicy().flush_done(0)


def test_strict_policy_flushes_every_unmap():
    """Strict: every queue asks for a flush; flush_done returns that range and its window."""
    sp = StrictPolicy()
    assert not sp.lazy and FlushQueue(1).lazy
    r = sp.queue(0, 42, 4, 100)
    assert r.flush_now and r.freed == [] and r.timer_deadline_ns is None
    assert sp.pending() == 1
    done = sp.flush_done(350)
    assert done == [(42, 4)] and done.stale_ns == [250] and done.max_stale_ns == 250
    assert sp.pending() == 0 and sp.flushes == 1
    assert not sp.due(10**12) and sp.timer_deadline() is None and not sp.on_timer(10**12)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), st.integers(0, 2), st.integers(0, 3 * MS)),
        st.tuples(st.just("done"), st.just(0), st.integers(0, 3 * MS)),
        st.tuples(st.just("timer"), st.just(0), st.integers(0, 12 * MS)),
        st.tuples(st.just("start"), st.just(0), st.integers(0, MS)),
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.sampled_from([2, 4, 8]), _OPS)
def test_never_reusable_before_a_later_flush_finishes(per_cpu, size, ops):
    """An IOVA comes back only after a flush that started after its queueing has finished;
    its stale window ends at that flush's completion; each comes back once; all drain."""
    fq = FlushQueue(3, per_cpu=per_cpu, size=size)
    t = 0
    seq = 0                      # event order
    queued: dict[int, tuple[int, int]] = {}     # pfn -> (queue seq, queue time)
    starts: list[int] = []       # seq of each flush start, in start order
    finishes: list[tuple[int, int]] = []        # (seq, t) of finished flushes, in order
    returned: set[int] = set()
    next_pfn = 0

    def check(freed) -> None:
        for (pfn, pages), stale in zip(freed, freed.stale_ns, strict=True):
            assert pages == 1 and pfn not in returned
            q_seq, q_t = queued[pfn]
            later = [k for k, s in enumerate(starts) if s > q_seq and k < len(finishes)]
            assert later, "returned before any later-started flush finished"
            assert stale == finishes[later[0]][1] - q_t >= 0
            returned.add(pfn)

    def finish() -> None:
        nonlocal seq
        seq += 1
        finishes.append((seq, t))
        check(fq.flush_done(t))

    for op, cpu, dt in ops:
        t += dt
        seq += 1
        if op == "queue":
            pending_before = fq.inflight()
            r = fq.queue(cpu, next_pfn, 1, t)
            check(r.freed)
            if r.flush_now:
                assert fq.inflight() == pending_before + 1
                starts.append(seq)
                seq += 1
            queued[next_pfn] = (seq, t)
            next_pfn += 1
        elif op == "done" and fq.inflight():
            finish()
        elif op == "timer":
            if fq.on_timer(t):
                starts.append(seq)
        elif op == "start":
            fq.start_flush()
            starts.append(seq)
    while fq.inflight():
        finish()
    seq += 1
    fq.start_flush()
    starts.append(seq)
    finish()
    assert fq.pending() == 0
    assert returned == set(queued)
    assert fq.flushes == len(starts)
