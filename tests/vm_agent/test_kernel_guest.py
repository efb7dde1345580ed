"""The guest-state foundation of the whole-VM-epoch kernels (vm_agent/kernels/guest.py)
against the Python objects it stands in for: the page allocator against GuestMemory
(random alloc/free sequences with exhaustion), the op log against OpLog (rows, take,
sequence numbers), the event heap against heapq on (time, sequence)."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from host_iommu.protocol import OP_DMA, OP_GUEST_WRITE, OpLog
from vm_agent.agent import GUEST_COUNTERS
from vm_agent.kernels import guest as kg
from vm_agent.memory import GuestMemory, GuestMemoryError


def test_stats_slots_follow_guest_counters() -> None:
    assert len(GUEST_COUNTERS) == kg.NSTATS
    for i, name in enumerate(GUEST_COUNTERS):
        assert getattr(kg, f"S_{name.upper()}") == i


@njit(cache=True)
def _alloc_free_script(g, ops, out):
    """Run (kind, npages, index) ops: kind 0 allocs npages, 1 frees live buffer ``index``;
    out[i] = the GPA (or -1 at an error, which ends the script)."""
    live_gpa = np.zeros(ops.shape[0], np.int64)
    live_np = np.zeros(ops.shape[0], np.int64)
    nlive = 0
    for i in range(ops.shape[0]):
        if ops[i, 0] == 0 or nlive == 0:
            gpa = kg.mem_alloc(g, ops[i, 1])
            out[i] = gpa
            if gpa < 0:
                return i
            live_gpa[nlive] = gpa
            live_np[nlive] = ops[i, 1]
            nlive += 1
        else:
            j = ops[i, 2] % nlive
            kg.mem_free(g, live_gpa[j], live_np[j])
            out[i] = live_gpa[j]
            nlive -= 1
            live_gpa[j] = live_gpa[nlive]
            live_np[j] = live_np[nlive]
    return ops.shape[0]


def _python_script(mem: GuestMemory, ops: np.ndarray) -> tuple[list[int], int]:
    live: list[tuple[int, int]] = []
    out: list[int] = []
    for i, (kind, npages, index) in enumerate(ops.tolist()):
        if kind == 0 or not live:
            try:
                gpa = mem.alloc(npages)
            except GuestMemoryError:
                out.append(-1)
                return out, i
            out.append(gpa)
            live.append((gpa, npages))
        else:
            j = index % len(live)
            gpa, n = live[j]
            mem.free(gpa, n)
            out.append(gpa)
            live[j] = live[-1]
            live.pop()
    return out, len(ops)


@settings(max_examples=150, deadline=None)
@given(frames=st.integers(20, 400),
       ops=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 40), st.integers(0, 1000)),
                    min_size=1, max_size=120),
       preload=st.booleans())
def test_mem_alloc_free_equal_guest_memory(frames: int, ops: list, preload: bool) -> None:
    """Same GPAs, same free lists, same bump pointer and used pages, and exhaustion at the
    same step (with GuestMemoryError's text) for any alloc/free sequence."""
    arr = np.array(ops, dtype=np.int64).reshape(-1, 3)
    mem = GuestMemory(frames)
    ref = GuestMemory(frames)
    if preload:    # state carried in from Python (set-up), then loaded
        for m in (mem, ref):
            a = m.alloc(2)
            m.alloc(1)
            m.free(a, 2)
    g = kg.new_arrays(1, 2, frames)
    kg.load_memory(g, mem)
    out = np.zeros(len(arr), np.int64)
    stop = _alloc_free_script(g, arr, out)
    want, want_stop = _python_script(ref, arr)
    assert stop == want_stop
    assert out[:len(want)].tolist() == want
    if stop < len(arr):
        assert g.ctl[kg.C_ERR] == kg.E_MEM
        with pytest.raises(GuestMemoryError) as got:
            kg.raise_error(g)
        with pytest.raises(GuestMemoryError) as exp:
            GuestMemory(frames).alloc(int(arr[stop, 1]) + frames)
        assert str(got.value).split("(")[1] == str(exp.value).split("(")[1]
        assert f"allocating {int(arr[stop, 1])} pages" in str(got.value)
    else:
        assert g.ctl[kg.C_ERR] == 0
    back = GuestMemory(frames)
    back.free_lists = {k: list(v) for k, v in mem.free_lists.items()}
    kg.store_memory(g, back)
    assert back.next_frame == ref.next_frame
    assert back.used_pages == ref.used_pages
    assert {k: v for k, v in back.free_lists.items() if v} == \
        {k: v for k, v in ref.free_lists.items() if v}


def test_order_matches_python() -> None:
    for n in [*range(70), 1 << 20, (1 << 20) + 1]:
        assert kg._order(n) == GuestMemory._order(n)


@njit(cache=True)
def _log_rows(g, rows):
    bad = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        k = kg.log_add(g, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
        if k != g.ctl[kg.C_LOG_N] - 1:
            bad += 1
    return bad


@settings(max_examples=60, deadline=None)
@given(epochs=st.lists(st.lists(st.tuples(
    st.integers(0, 1 << 40), st.sampled_from([OP_DMA, OP_GUEST_WRITE]),
    st.integers(0, 0xFFFF), st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1), st.integers(-(1 << 40), 1 << 40),
    st.integers(-1, 1 << 40)), max_size=30), min_size=1, max_size=4),
    vm=st.integers(1, 100), carried=st.integers(0, 5))
def test_log_add_take_equal_oplog(epochs: list, vm: int, carried: int) -> None:
    """Epoch after epoch, take_log's batch equals OpLog.take's byte for byte (64-bit a0/a1
    patterns, vm and seq columns), including rows carried in from an OpLog (load_log)."""
    ref = OpLog(vm)
    src = OpLog(vm)
    for i in range(carried):
        for lg in (ref, src):
            lg.add(i, OP_DMA, 1, 0, (1 << 64) - 1 - i, i, 3, -1)
    g = kg.new_arrays(vm, 1, 64, log_rows=4)
    g = kg.load_log(g, src)
    assert src.rows == [] and src.seq0 == carried
    for rows in epochs:
        for r in rows:
            ref.add(*r)
        arr = np.array([[x & ((1 << 64) - 1) for x in r] for r in rows],
                       dtype=np.uint64).view(np.int64).reshape(-1, 8)
        g.ctl[kg.C_LOG_SLACK] = len(rows)
        if not kg.has_room(g):
            g = kg.grown(g)
        assert kg.has_room(g)
        assert _log_rows(g, arr) == 0     # each row's index returned
        got = kg.take_log(g)
        want = ref.take()
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()
        assert int(g.ctl[kg.C_SEQ0]) == ref.seq0


@njit(cache=True)
def _heap_script(g, ops, out):
    """ops rows (push?, t, arg): push (t, kind=arg) or pop; out: popped (t, seq, kind)."""
    k = 0
    for i in range(ops.shape[0]):
        if ops[i, 0] == 1 or g.ctl[kg.C_HEAP_N] == 0:
            kg.heap_push(g, ops[i, 1], ops[i, 2], i, 0, 0, 0, 0, 0, 0, 0, i)
        else:
            t0 = kg.heap_top_t(g)
            kind = kg.heap_pop(g)
            out[k, 0] = g.ev[0] if t0 == g.ev[0] else -1
            out[k, 1] = g.ev[1]
            out[k, 2] = kind
            out[k, 3] = g.ev[kg.H_A0] if g.ev[kg.H_A0 + 8] == g.ev[kg.H_A0] else -1
            k += 1
    while g.ctl[kg.C_HEAP_N]:
        kind = kg.heap_pop(g)
        out[k, 0] = g.ev[0]
        out[k, 1] = g.ev[1]
        out[k, 2] = kind
        out[k, 3] = g.ev[kg.H_A0]
        k += 1
    return k


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 50), st.integers(0, 9)),
                    min_size=1, max_size=200))
def test_heap_pops_as_heapq(ops: list) -> None:
    """Pops come in heapq's (time, sequence) order, ties in time by scheduling order."""
    arr = np.array(ops, dtype=np.int64).reshape(-1, 3)
    g = kg.new_arrays(1, 1, 64, heap_rows=len(ops) + 1)
    out = np.zeros((len(ops), 4), np.int64)
    n = _heap_script(g, arr, out)
    h: list = []
    seq = itertools.count()
    want = []
    for i, (push, t, kind) in enumerate(ops):
        if push == 1 or not h:
            heapq.heappush(h, (t, next(seq), kind, i))
        else:
            want.append(heapq.heappop(h))
    while h:
        want.append(heapq.heappop(h))
    assert n == len(want)
    assert [tuple(r) for r in out[:n].tolist()] == want


def test_grown_keeps_rows_and_slack() -> None:
    g = kg.new_arrays(3, 1, 64, log_rows=2, heap_rows=2)
    g.log[:2] = 7
    g.ctl[kg.C_LOG_N] = 2
    g.heap[:1] = 5
    g.ctl[kg.C_HEAP_N] = 1
    g.ctl[kg.C_LOG_SLACK] = 9
    g.ctl[kg.C_HEAP_SLACK] = 3
    assert not kg.has_room(g)
    g2 = kg.grown(g)
    assert kg.has_room(g2)
    assert (g2.log[:2] == 7).all() and (g2.heap[:1] == 5).all()
    assert g2.log.flags.c_contiguous and g2.log.dtype == np.int64
