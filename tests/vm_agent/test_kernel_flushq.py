"""Differential tests: the flush-queue kernels (vm_agent/kernels/flushq.py, through
vm_agent/flushq.py's FlushQueue, and called directly) against vm_agent/reference_flushq.py.

Every QueueResult, flush_done result (ranges, stale windows, the largest), refusal, counter,
pending and in-flight count and timer deadline must agree after each step, and the array
state must stay consistent (pending equals what the rings hold; the completion-time history
stays as short as the entries queued need). Scripts are random (hypothesis) and adversarial:
rings of 2 slots, flushes left in flight until the arrays must grow, per-CPU and single
queues, up to 64 CPUs, timer calls one ns before, at and after a deadline on a jiffy edge,
long idle gaps, every CONFIG_HZ.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from tests.vm_agent import flushq_pair
from tests.vm_agent.flushq_pair import run_script
from vm_agent import flushq as live
from vm_agent import reference_flushq as ref
from vm_agent.kernels import flushq as K

MS = 1_000_000


class Pair(flushq_pair.Pair):
    """The array-state queue and the reference in lockstep, the arrays checked too."""

    def check_state(self, after_flush: bool) -> None:
        lq, rq = self.lq, self.rq
        # the arrays: each ring holds what the reference's ring holds, in order
        s, ring = lq._st, lq._ring
        rings = int(s[K.S_RINGS])
        mask = int(s[K.S_RCAP]) - 1
        for r, entries in enumerate(rq.rings):
            head, tail = int(s[K.HEADER + r]), int(s[K.HEADER + rings + r])
            held = [tuple(int(v) for v in ring[r, k & mask]) for k in range(head, tail)]
            assert held == [(e.pfn, e.pages, e.counter, e.t_queued_ns) for e in entries]
        # the history keeps the completion times from the oldest one still asked for (as of
        # the last flush_done: an entry queued under start count c asks for flush c + 1)
        kept = lq._finish_ns
        assert kept == rq.finish_ns[len(rq.finish_ns) - len(kept):]
        if after_flush:
            heads = [e[0].counter for e in rq.rings if e]
            asked = min(min(heads, default=rq.fq_flush_start_cnt) + 1, rq.fq_flush_finish_cnt)
            assert len(kept) == rq.fq_flush_finish_cnt - asked + 1


def steps(cpus: int) -> st.SearchStrategy:
    gaps = st.sampled_from([0, 1, 999, 4_000_000, 30_000_000, 2_000_000_000])
    return st.lists(st.one_of(
        st.tuples(st.just("unmap"), st.integers(-1, cpus), st.integers(1, 9), gaps),
        st.tuples(st.just("done"), gaps),
        st.tuples(st.just("timer"), st.sampled_from([-1, 0, 1, 4_000_000])),
        st.tuples(st.just("outside")),
        st.tuples(st.just("due"), st.sampled_from([-1, 0, 1])),
    ), max_size=200)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(1, 64), st.booleans(), st.sampled_from([2, 4, 8, 16, 256]),
       st.sampled_from(live.HZ_CHOICES), st.booleans())
def test_random_scripts_agree(data, cpus, per_cpu, size, hz, eager):
    """Random unmaps on up to 64 CPUs (and out-of-range ones), flushes finished at once or
    late, timer calls around the deadline, outside flushes, long idle gaps."""
    pair = Pair(cpus=cpus, per_cpu=per_cpu, size=size, hz=hz)
    run_script(pair, data.draw(steps(cpus)), eager)


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.integers(1, 4), steps(4))
def test_linux_default_sizes_agree(per_cpu, cpus, script):
    """256-slot per-CPU rings with the 10 ms timer, or the single 32768-slot / 1 s queue."""
    run_script(Pair(cpus=cpus, per_cpu=per_cpu), script, True)


@pytest.mark.parametrize("per_cpu", [True, False])
def test_flushes_left_in_flight_grow_every_array(per_cpu):
    """Rings of 2 slots, flushes asked for and not finished: the rings, the in-flight FIFO
    and (with one quiet ring holding an old entry) the completion-time history outgrow their
    first capacities; finishing everything then frees exactly what each flush covers."""
    pair = Pair(cpus=3, per_cpu=per_cpu, size=2)
    t = 0
    pair.both("queue", 2, 0x10, 1, t)            # a quiet ring's entry, held while others flush
    for i in range(200):
        t += 100
        pair.both("queue", i % 2, 0x100 + i, 1, t)
    s = pair.lq._st
    assert pair.lq.inflight() > 100 and int(s[K.S_RCAP]) >= 64 and int(s[K.S_ICAP]) >= 128
    while pair.lq.inflight() > 1:
        t += 7
        pair.both("flush_done", t)
    for i in range(100):                          # one busy ring, full flushes finished at once
        t += 100
        if pair.both("queue", 0, 0x400 + i, 1, t)[1]:
            pair.both("flush_done", t + 5)
    assert per_cpu is False or int(pair.lq._st[K.S_FCAP]) > 16
    pair.both("flush_done", t + 10)
    pair.both("on_timer", pair.lq.timer_deadline())
    pair.both("flush_done", t + 10**9)
    assert pair.lq.pending() == 0


@pytest.mark.parametrize("hz", live.HZ_CHOICES)
def test_timer_at_jiffy_edges(hz):
    """Unmaps on the last ns of a tick, its first and its second, each followed by the timer
    asked one ns early, on time and late: the same flushes and windows as the reference."""
    pair = Pair(cpus=2, per_cpu=True, size=8, hz=hz)
    for k in range(1, 40, 3):
        edge = ref.tick_ns(k * 7, hz)
        for t in (edge - 1, edge, edge + 1):
            if pair.lq.timer_deadline() is not None and t >= pair.lq.timer_deadline():
                continue
            pair.both("queue", k & 1, 0x1000 + k, 1, t)
        d = pair.lq.timer_deadline()
        pair.both("on_timer", d - 1)
        pair.both("due", d)
        pair.both("on_timer", d)
        pair.both("flush_done", d + 1)
        pair.both("on_timer", d + 1)


@given(st.integers(0, 2**62), st.sampled_from(live.HZ_CHOICES),
       st.sampled_from([1, 999_999, 10 * MS, 250 * MS, 1000 * MS, 5_000_000_000,
                        20 * 24 * 3600 * 10**9]))
def test_kernel_timer_follows_the_live_wheel_without_overflow(t_ns, hz, timeout_ns):
    """The kernel's jiffies and deadline arithmetic equals the Python big-int formulas at
    any time up to 2^62 ns (where t * hz would overflow int64) and any timeout."""
    assert K.jiffies_at(t_ns, hz) == live.jiffies_at(t_ns, hz)
    assert K.jiffy_ns(live.jiffies_at(t_ns, hz), hz) == live.jiffy_ns(live.jiffies_at(t_ns, hz),
                                                                     hz)
    timeout_j = live.timeout_jiffies(timeout_ns, hz)
    assert K.timer_deadline_ns(t_ns, timeout_j, hz) == live.fq_timer_deadline_ns(
        t_ns, timeout_ns, hz)


@pytest.mark.parametrize("hz", live.HZ_CHOICES)
@pytest.mark.parametrize("timeout_ns", [1, 3_333_333, 10 * MS, 1000 * MS])
def test_kernel_timer_matches_the_reference_wheel(hz, timeout_ns):
    """At every ns around a few ticks the kernel's deadline is timer.c's (the reference)."""
    tick = 10**9 // hz
    timeout_j = ref.msecs_to_jiffies(timeout_ns, hz)
    for k in (0, 1, 2, 7, 1000, 123457, 10**9):
        for t in (k * tick - 1, k * tick, k * tick + 1, (k + 1) * tick - 1):
            if t >= 0:
                assert K.timer_deadline_ns(t, timeout_j, hz) == ref.timer_fire_ns(
                    t, timeout_ns, hz), (t, timeout_ns, hz)


def test_kernels_called_directly_on_the_arrays():
    """The kernels as a guest epoch kernel would call them, on a queue's arrays: what they
    answer and free is the reference's, and they refuse (changing nothing) a CPU out of
    range, a flush_done with none in flight and a ring without room."""
    fq = live.FlushQueue(2, size=4)
    rq = ref.FlushQueue(2, size=4)
    s = fq._st
    assert K.fq_flush_done(s, 5) == K.NO_FLUSH
    assert K.fq_queue(s, 2, 1, 1, 0)[0] == K.BAD_CPU
    before = s.copy()
    for i in range(4):
        n, flush_now, armed = K.fq_queue(s, 0, 0x50 + i, 1, 10 * i)
        r = rq.queue(0, 0x50 + i, 1, 10 * i)
        assert (n, flush_now, armed) == (0, r.flush_now, r.timer_deadline_ns is not None)
    assert int(s[K.S_DEADLINE_NS]) == rq.timer_deadline()
    assert not np.array_equal(before, s)
    n = K.fq_flush_done(s, 100)
    got = rq.flush_done(100)
    assert n == len(got) == 3
    assert K.out_view(s)[:, :n].T.tolist() == [[p, g, w] for (p, g), w in zip(got, got.stale_ns,
                                                                     strict=True)]
    # fill ring 1 past its 4 slots with no flush finished: the kernel asks for room
    for i in range(3):
        K.fq_queue(s, 1, 0x90 + i, 1, 200)
    assert K.fq_queue(s, 1, 0x93, 1, 200)[1]        # full: a flush starts
    held = s.copy()
    assert K.fq_queue(s, 1, 0x94, 1, 200)[0] == K.NEED_ROOM
    assert np.array_equal(held, s)
    assert K.fq_start_flush(s) == int(s[K.S_START_CNT]) == 3
    assert K.fq_on_timer(s, int(s[K.S_DEADLINE_NS]) - 1) == 0
    assert K.fq_on_timer(s, int(s[K.S_DEADLINE_NS])) == 1


@njit
def _guest_loop(state, ops, log):
    """What a guest epoch kernel does with the queue, compiled: per op row (cpu, pfn, pages,
    t_ns), run the timer if due (flush finished 700 ns later), queue the range, finish a
    flush it asks for 700 ns later; append every freed (pfn, pages, stale_ns) to ``log``.
    Returns the rows logged, or -1 when the queue asks for room (the test sizes it)."""
    n_log = 0
    for i in range(ops.shape[0]):
        t = ops[i, 3]
        if K.fq_on_timer(state, t) == 1:
            n = K.fq_flush_done(state, t + 700)
            if n < 0:
                return -1
            n_log = _copy_out(state, n, log, n_log)
        n, flush_now, _armed = K.fq_queue(state, ops[i, 0], ops[i, 1], ops[i, 2], t)
        if n < 0:
            return -1
        n_log = _copy_out(state, n, log, n_log)
        if flush_now:
            n = K.fq_flush_done(state, t + 700)
            if n < 0:
                return -1
            n_log = _copy_out(state, n, log, n_log)
    return n_log


@njit
def _copy_out(state, n, log, n_log):
    slots = state[K.S_RINGS] * state[K.S_RCAP]
    off = state[K.S_OUT_OFF]
    for j in range(n):
        log[n_log, 0] = state[off + j]
        log[n_log, 1] = state[off + slots + j]
        log[n_log, 2] = state[off + 2 * slots + j]
        n_log += 1
    return n_log


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.booleans(), st.sampled_from([2, 8, 64]),
       st.lists(st.tuples(st.integers(0, 7), st.integers(1, 4),
                          st.sampled_from([0, 10, 3_000_000, 20_000_000])), max_size=300))
def test_kernels_called_from_a_compiled_loop(cpus, per_cpu, size, script):
    """The kernels called from another compiled function, as the guest epoch kernel will:
    the same frees, in the same order, with the same windows, as the reference driven by
    the DMA layer's protocol."""
    fq = live.FlushQueue(cpus, per_cpu=per_cpu, size=size, hz=250)
    fq._st = K.regrow(fq._st, 512, 64, 1024)     # room for the whole script
    rq = ref.FlushQueue(cpus, per_cpu=per_cpu, size=size, hz=250)
    ops = np.zeros((len(script), 4), np.int64)
    t = 0
    want = []
    for i, (cpu, pages, dt) in enumerate(script):
        t += dt
        ops[i] = (cpu % cpus, 0x1000 + 8 * i, pages, t)
        if rq.on_timer(t):
            want += _rows(rq.flush_done(t + 700))
        r = rq.queue(cpu % cpus, 0x1000 + 8 * i, pages, t)
        want += _rows(r.freed)
        if r.flush_now:
            want += _rows(rq.flush_done(t + 700))
    log = np.zeros((len(script) + 1, 3), np.int64)
    n = _guest_loop(fq._st, ops, log)
    assert log[:n].tolist() == want
    assert (fq.pending(), fq.flushes, fq.flushes_timer, fq.max_pending) == (
        rq.pending(), rq.flushes, rq.flushes_timer, rq.max_pending)


def _rows(freed) -> list[list[int]]:
    return [[p, g, w] for (p, g), w in zip(freed, freed.stale_ns, strict=True)]


def test_warm_up_compiles_every_kernel():
    """warm_up calls each kernel the wrapper calls, with the wrapper's argument types."""
    K.warm_up()
    for kernel in (K.fq_queue, K.fq_flush_done, K.fq_on_timer, K.fq_start_flush):
        assert kernel.signatures, kernel
