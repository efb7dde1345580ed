"""Differential tests: vm_agent/flushq.py against vm_agent/reference_flushq.py, step by step.

Both policies get the same calls; every QueueResult (what is freed, with its stale windows,
whether to flush now, the timer deadline armed), every flush_done result, every refusal and
every public counter must agree after each step. Scripts are random (hypothesis) and
adversarial: rings of 2 slots that fill on every other unmap, flushes left in flight while
more unmaps arrive, several flushes in flight at once, timer calls just before, at and after
the deadline, every CONFIG_HZ, a single queue, and misuse.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vm_agent.flushq_pair import ERR, Pair, run_script
from vm_agent import flushq as live
from vm_agent import reference_flushq as ref


def test_reference_follows_linux_constants():
    """Ring sizes, timeouts and the default HZ are the live model's."""
    assert (ref.IOVA_DEFAULT_FQ_SIZE, ref.IOVA_SINGLE_FQ_SIZE, ref.DEFAULT_HZ) == (
        live.IOVA_DEFAULT_FQ_SIZE, live.IOVA_SINGLE_FQ_SIZE, live.DEFAULT_HZ)
    assert ref.IOVA_DEFAULT_FQ_TIMEOUT_MS * 1_000_000 == live.IOVA_DEFAULT_FQ_TIMEOUT_NS
    assert ref.IOVA_SINGLE_FQ_TIMEOUT_MS * 1_000_000 == live.IOVA_SINGLE_FQ_TIMEOUT_NS


# One step of a script: unmap (cpu, pages, dt), finish the oldest flush (dt), run the timer
# at its deadline plus an offset, start an outside flush, or ask ``due``.
STEPS = st.lists(st.one_of(
    st.tuples(st.just("unmap"), st.integers(-1, 3), st.integers(1, 4),
              st.sampled_from([0, 1, 1000, 4_000_000, 30_000_000])),
    st.tuples(st.just("done"), st.sampled_from([0, 1, 700, 5_000_000])),
    st.tuples(st.just("timer"), st.sampled_from([-1, 0, 0, 1, 3_000_000])),
    st.tuples(st.just("outside")),
    st.tuples(st.just("due"), st.sampled_from([-1, 0, 1])),
), max_size=150)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.sampled_from([2, 4, 8, 256]), st.integers(1, 3),
       st.sampled_from(live.HZ_CHOICES), st.booleans(), STEPS)
def test_random_scripts_agree(per_cpu, size, cpus, hz, eager, steps):
    pair = Pair(cpus=cpus, per_cpu=per_cpu, size=size, hz=hz)
    run_script(pair, steps, eager)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.booleans(), STEPS)
def test_strict_scripts_agree(cpus, eager, steps):
    pair = Pair(strict=True, cpus=cpus)
    run_script(pair, steps, eager)


@settings(max_examples=40, deadline=None)
@given(st.booleans(), STEPS)
def test_default_sizes_and_timeouts_agree(per_cpu, steps):
    """The Linux defaults: 256-slot per-CPU rings and 10 ms, or the single 32768 / 1 s."""
    run_script(Pair(cpus=2, per_cpu=per_cpu), steps, True)


@pytest.mark.parametrize("hz", live.HZ_CHOICES)
@pytest.mark.parametrize("timeout_ns", [1, 999_999, 1_000_000, 3_333_333, 10_000_000,
                                        250_000_000, 1_000_000_000, 5_000_000_000])
def test_timer_deadlines_agree_at_every_alignment(hz, timeout_ns):
    """Arming at every ns around a few ticks, the deadline agrees, and so does the maximum
    over every alignment (timer_max_ns)."""
    lq = live.FlushQueue(1, size=2, timeout_ns=timeout_ns, hz=hz)
    rq = ref.FlushQueue(1, size=2, timeout_ns=timeout_ns, hz=hz)
    assert lq.timer_max_ns == rq.timer_max_ns
    tick = 10**9 // hz
    for k in (0, 1, 2, 3, 7, 1000, 123457):
        for t in (k * tick - 1, k * tick, k * tick + 1, k * tick + tick // 2, (k + 1) * tick - 1):
            if t >= 0:
                assert live.fq_timer_deadline_ns(t, timeout_ns, hz) == ref.timer_fire_ns(
                    t, timeout_ns, hz), (t, timeout_ns, hz)


@pytest.mark.parametrize("seed", range(12))
def test_long_uneven_runs_agree(seed):
    """Long seeded runs: one ring several times busier than the others, small rings, outside
    flushes and flushes finished late, so entries of quiet rings stay covered but unfreed
    across many later flushes (their stale windows end at the first covering flush)."""
    rnd = random.Random(seed)
    cpus = rnd.choice([2, 3, 4])
    pair = Pair(cpus=cpus, per_cpu=rnd.random() < 0.8, size=rnd.choice([2, 4, 8]),
                hz=rnd.choice(live.HZ_CHOICES))
    weights = [8] + [1] * (cpus - 1)
    steps = []
    for _ in range(400):
        r = rnd.random()
        if r < 0.7:
            steps.append(("unmap", rnd.choices(range(cpus), weights)[0], rnd.randint(1, 3),
                          rnd.choice([0, 10, 1000, 2_000_000])))
        elif r < 0.85:
            steps.append(("done", rnd.choice([0, 300, 6_000_000])))
        elif r < 0.92:
            steps.append(("outside",))
        else:
            steps.append(("timer", rnd.choice([0, 1, -1])))
    run_script(pair, steps, eager=rnd.random() < 0.5)


def test_outside_flush_frees_every_ring():
    """A flush started from outside covers and, when done, frees the entries of every ring."""
    pair = Pair(cpus=3, per_cpu=True, size=8)
    for i in range(9):
        pair.both("queue", i % 3, 0x40 + i, 1, 10 * i)
    pair.both("start_flush")
    pair.both("queue", 0, 0x80, 1, 200)
    assert len(pair.both("flush_done", 300)[0]) == 9


def test_ring_of_two_with_flushes_left_in_flight():
    """A 2-slot ring asks for a flush at every other unmap; none is finished for a while, so
    several are in flight; finishing them in order frees exactly what each covers."""
    pair = Pair(cpus=2, per_cpu=True, size=2)
    t = 0
    for i in range(12):
        t += 100
        pair.both("queue", i % 2, 0x100 + i, 1, t)
    assert pair.lq.inflight() > 3
    while pair.lq.inflight():
        t += 50
        pair.both("flush_done", t)
    for i in range(4):
        t += 100
        pair.both("queue", i % 2, 0x200 + i, 2, t)
    pair.both("on_timer", pair.lq.timer_deadline())
    pair.both("flush_done", pair.lq.timer_deadline() or t + 10**8)


def test_misuse_is_refused_alike():
    """Bad constructor arguments, CPUs out of range, flush_done with none started."""
    for kw in ({"cpus": 0}, {"cpus": 1, "size": 3}, {"cpus": 1, "size": 1},
               {"cpus": 1, "size": 0}, {"cpus": 1, "timeout_ns": 0},
               {"cpus": 1, "timeout_ns": -5}, {"cpus": 1, "hz": 0}):
        with pytest.raises(live.FlushQueueError):
            live.FlushQueue(**kw)
        with pytest.raises(ref.FlushQueueError):
            ref.FlushQueue(**kw)
    pair = Pair(cpus=2, per_cpu=True, size=4)
    assert pair.both("flush_done", 5) == ERR
    assert pair.both("queue", 2, 1, 1, 0) == ERR
    assert pair.both("queue", -1, 1, 1, 0) == ERR
    single = Pair(cpus=2, per_cpu=False, size=4)
    single.both("queue", 7, 1, 1, 0)          # a single queue ignores the CPU
    strict = Pair(strict=True)
    assert strict.both("flush_done", 5) == ERR


@pytest.mark.xfail(strict=True, reason=(
    "vm_agent/flushq.py takes LVL_DEPTH = 9 at every HZ and never clamps to "
    "WHEEL_TIMEOUT_MAX; timer.c has LVL_DEPTH 8 when HZ <= 100 and clamps a delta past "
    "WHEEL_TIMEOUT_CUTOFF, so a timeout of more than ~15 days at HZ=100 fires at another "
    "tick. No config can set such a timeout (flush-queue timeouts are Linux's 10 ms / 1 s)."))
def test_huge_timeouts_follow_the_wheel_capacity():
    timeout_ns = 20 * 24 * 3600 * 10**9          # 20 days
    assert live.fq_timer_deadline_ns(0, timeout_ns, 100) == ref.timer_fire_ns(
        0, timeout_ns, 100)
