"""The IOVA allocator over array state (vm_agent/kernels/iova.py, through ArrayIovaDomain and
ArrayIovaRcache) against vm_agent/reference_iova.py, step by step.

Both get the same calls; every return value, refusal and counter must agree after each step,
and so must the whole state: the tree node for node, cached_node, cached32_node,
max32_alloc_size, and every magazine (loaded, prev, depot) pfn for pfn in array order. Scripts
are random (hypothesis) and adversarial: exhaustion, the 32-bit window and its failure, depot
full and empty, cross-CPU frees, reservations, bad frees. Trees start with room for one node,
so the grow-and-retry path runs on nearly every insert. A compiled caller drives the kernels
directly, as a guest-epoch kernel will, and whole runs with the array allocator plugged into
the DMA layer give the live path's tables.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from tests.system.conftest import experiment, nic, nvme
from tests.system.golden import tables
from tests.vm_agent.test_ref_iova import LIMIT32, LIMIT64, OPS, Pair, run_script
from vm_agent import dma
from vm_agent import iova as live
from vm_agent import reference_iova as ref
from vm_agent.kernels import iova as k


class ArrayPair(Pair):
    """The array allocator and the reference in lockstep, whole state compared at each check."""

    def __init__(self, cpus: int = 2, granule: int = 4096, start_pfn: int = 1,
                 cap: int = 1) -> None:
        super().__init__(cpus, granule, start_pfn)
        self.ld = live.ArrayIovaDomain(granule, start_pfn)
        self.ld._tree, self.ld._st = k.new_state(start_pfn, self.ld.dma_32bit_pfn, cap)
        self.lr = live.ArrayIovaRcache(self.ld, cpus)

    def check(self, probes=()) -> None:
        super().check(probes)
        ld, rd, lr, rr = self.ld, self.rd, self.lr, self.rr
        base = ld._st[k.S_BASE]
        tree = ld._tree[base:base + len(ld) + 1]         # the live rows, the anchor last
        assert [tuple(r) for r in tree[:-1, :2].tolist()] == rd.nodes[:-1]
        assert tree[-1, :2].tolist() == [k.ANCHOR, k.ANCHOR]
        assert (ld.cached_node, ld.cached32_node) == (rd.cached_node, rd.cached32_node)
        assert ld.max32_alloc_size == rd.max32_alloc_size
        mag = lr._mag
        cached = set()
        for cpu in range(self.cpus):
            for order in range(k.CLASSES):
                for slot, want in ((0, rr.loaded[cpu][order]), (1, rr.prev[cpu][order])):
                    row = k.mag_row(cpu, slot, order)
                    assert mag[row, 1:mag[row, 0] + 1].tolist() == want, (cpu, slot, order)
                    cached |= set(want)
        for order in range(k.CLASSES):
            assert ld._st[k.S_DEPOT + order] == len(rr.depot[order])
            for i, want in enumerate(rr.depot[order]):
                row = k.depot_row(self.cpus, order, i)
                assert mag[row, 1:mag[row, 0] + 1].tolist() == want
                cached |= set(want)
        marked = set(tree[tree[:, k.T_MAG] == 1, k.T_LO].tolist())
        assert set(tree[:, k.T_MAG].tolist()) <= {0, 1}
        assert marked == cached


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 64, 500]), OPS)
def test_random_scripts_agree(room32, ops):
    """Random calls, with the 32-bit window nearly full (``room32``) or not."""
    pair = ArrayPair()
    if room32:
        pair.both("dom.reserve_iova", 1, LIMIT32 - room32)
    run_script(pair, ops)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([512, 4096, 65536]), st.integers(0, 3), st.sampled_from([1, 3, 64]),
       OPS)
def test_other_granules_start_pfns_and_capacities(granule, start_pfn, cap, ops):
    """Other 32-bit boundaries, pfn 0 handed out, other initial tree capacities."""
    run_script(ArrayPair(granule=granule, start_pfn=start_pfn, cap=cap), ops)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9), st.integers(0, 1 << 16)),
                max_size=200), st.integers(12, 90))
def test_tree_exhaustion_and_holes(ops, limit):
    """The tree alone in a small space, aligned or not, filled and holed."""
    pair = ArrayPair()
    held: list[int] = []
    for alloc, size, r in ops:
        if alloc or not held:
            pfn = pair.both("dom.alloc_iova", size, limit, bool(r & 1))
            if pfn is not None:
                held.append(pfn)
        else:
            pair.both("dom.free_iova", held.pop(r % len(held)))
        pair.check()


def test_depot_full_overflow_cross_cpu_and_flush():
    """Frees on one CPU fill loaded, prev, the depot and overflow it; another CPU drains the
    depot empty and goes to the tree; a window below the cached IOVAs forces rcache flushes."""
    pair = ArrayPair(cpus=3)
    pfns = [pair.both("rc.alloc_iova_fast", 0, 1, LIMIT64) for _ in range(5000)]
    for pfn in pfns:
        pair.both("rc.free_iova_fast", 0, pfn, 1)
    pair.check()
    assert pair.lr.depot_overflows > 0 and pair.lr.depot_size(1) == live.MAX_GLOBAL_MAGS
    got = [pair.both("rc.alloc_iova_fast", 1, 1, LIMIT64)
           for _ in range((live.MAX_GLOBAL_MAGS + 1) * live.IOVA_MAG_SIZE)]
    pair.check()
    assert pair.lr.depot_size(1) == 0 and pair.lr.depot_pops == live.MAX_GLOBAL_MAGS
    for pfn in got[::3]:
        pair.both("rc.free_iova_fast", 2, pfn, 1)              # cross-CPU frees
    pair.check()
    for _ in range(70):
        pair.both("rc.alloc_iova_fast", 1, 2, 100)
    pair.check()
    assert pair.lr.rcache_flushes > 0


@pytest.mark.parametrize("seed", range(3))
def test_long_mixed_runs_with_32bit_workaround(seed):
    """Map/unmap-like traffic on three CPUs: a 32-bit first try without flushing (which fails
    once the window is full), then the whole space with flushing; occasional CPU flushes."""
    rnd = random.Random(seed)
    pair = ArrayPair(cpus=3)
    pair.both("dom.reserve_iova", 1, LIMIT32 - 2000)
    held: list[tuple[int, int]] = []
    for step in range(5000):
        cpu = rnd.randrange(3)
        r = rnd.random()
        if r < 0.53 or not held:
            size = rnd.choice([1, 1, 1, 2, 3, 4, 8, 16, 17, 32, 33, 48])
            pfn = pair.both("rc.alloc_iova_fast", cpu, size, LIMIT32, flush_rcache=False)
            if pfn is None:
                pfn = pair.both("rc.alloc_iova_fast", cpu, size, LIMIT64)
            if pfn is not None:
                held.append((pfn, size))
        elif r < 0.995:
            pfn, size = held.pop(rnd.randrange(len(held)))
            pair.both("rc.free_iova_fast", rnd.randrange(3), pfn, size)
        else:
            pair.both("rc.free_cpu_cached_iovas", cpu)
        if step % 500 == 0:
            pair.check()
    pair.check()


def test_nodes_at_the_4gib_boundary():
    """Nodes starting, ending and straddling at dma_32bit_pfn: which frees reset
    max32_alloc_size and which move cached32_node, against a lowered max32_alloc_size."""
    pair = ArrayPair()
    pair.both("dom.reserve_iova", 1, LIMIT32 - 8)
    for limit in (LIMIT32 + 1, LIMIT32, LIMIT32 + 2, LIMIT32 + 17):
        for size in (1, 2, 16):
            pfn = pair.both("dom.alloc_iova", size, limit, False)
            assert pair.both("dom.alloc_iova", 16, LIMIT32) is None   # max32 lowered
            if pfn is not None:
                pair.both("dom.free_iova", pfn)
            pair.check([LIMIT32, LIMIT32 + 1, LIMIT32 + 2])
            pair.both("dom.alloc_iova", 1, LIMIT32)
    pair.check()


def test_refusals_and_the_int64_bounds():
    """Bad frees, sizes, CPUs and reservations are refused alike; values beyond 2^62 pfns are
    refused (allocations, reservations) or found absent (find_iova), never wrapped."""
    pair = ArrayPair()
    a = pair.both("rc.alloc_iova_fast", 0, 3, LIMIT64)
    c = pair.both("rc.alloc_iova_fast", 0, 40, LIMIT64)
    for args in ((0, a, 2), (0, a, 5), (0, c, 33), (0, a + 1, 1), (0, ref.IOVA_ANCHOR, 1),
                 (0, c, 0), (0, c, -2), (0, c, 1 << 70), (1 << 70, c, 40), (0, -1, 1)):
        assert pair.both("rc.free_iova_fast", *args) == "IovaError", args
    pair.both("rc.free_iova_fast", 0, a, 4)
    assert pair.both("rc.free_iova_fast", 1, a, 4) == "IovaError"
    assert pair.both("dom.free_iova", a) == "IovaError"
    for pfn in (ref.IOVA_ANCHOR, -1, 1 << 70):
        assert pair.both("dom.free_iova", pfn) == "IovaError"
        assert pair.both("dom.find_iova", pfn) is None
    pair.check()
    big = k.PFN_LIMIT
    for call in (lambda: pair.ld.alloc_iova(1, big), lambda: pair.ld.alloc_iova(big, LIMIT64),
                 lambda: pair.lr.alloc_iova_fast(0, 1, 1 << 64),
                 lambda: pair.ld.reserve_iova(5, big)):
        with pytest.raises(live.IovaError):
            call()
    with pytest.raises(live.IovaError):
        live.ArrayIovaRcache(pair.ld, 2)          # one rcache per domain
    pair.check()


@njit(cache=True)
def _epoch(tree, st, mag, cpus, pfns, sizes, limit):
    """A compiled caller: alloc ``sizes`` round-robin over CPUs, then free every other one on
    the next CPU; the pfns into ``pfns``. Returns the first kernel code < -1 (or 0)."""
    n = sizes.shape[0]
    for i in range(n):
        pfns[i] = k.alloc_iova_fast(tree, st, mag, i % cpus, sizes[i], limit, True)
        if pfns[i] < np.int64(-1):
            return pfns[i]
    for i in range(0, n, 2):
        if pfns[i] >= 0:
            code = k.free_iova_fast(tree, st, mag, (i + 1) % cpus, pfns[i], sizes[i])
            if code != 0:
                return code
    return np.int64(0)


def test_kernels_called_from_compiled_code_agree():
    """The kernels called from another kernel give what the reference gives call by call."""
    rnd = random.Random(7)
    sizes = np.array([rnd.choice([1, 2, 3, 4, 8, 32, 40]) for _ in range(600)], np.int64)
    pair = ArrayPair(cpus=2, cap=4096)
    pfns = np.zeros(sizes.shape[0], np.int64)
    code = _epoch(pair.ld._tree, pair.ld._st, pair.lr._mag, 2, pfns, sizes, 5000)
    assert code == 0
    want = [pair.rr.alloc_iova_fast(i % 2, int(s), 5000) for i, s in enumerate(sizes)]
    assert pfns.tolist() == [-1 if p is None else p for p in want]
    assert None in want                              # the small space ran out
    for i in range(0, len(want), 2):
        if want[i] is not None:
            pair.rr.free_iova_fast((i + 1) % 2, want[i], int(sizes[i]))
    pair.check()


@pytest.mark.parametrize("vms", [
    {"a": nic("nested", rogue=0.05, gbps=4.0)},
    {"a": nvme("shadow", "strict", rogue=0.05, depth=8), "b": nic("nested", "lazy", gbps=8.0)},
], ids=["nested-strict-nic", "shadow-nvme-nested-lazy-nic"])
def test_whole_runs_with_the_array_allocator_give_the_same_tables(vms, tmp_path):
    """The DMA layer built on ArrayIovaDomain / ArrayIovaRcache: summary, metrics and faults
    equal the live allocator's, value for value."""
    cfg = experiment(vms, duration_us=3000, name="array-iova")
    want = tables(cfg, tmp_path / "live")
    made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dma, "IovaDomain", lambda *a: made.append(1) or live.ArrayIovaDomain(*a))
        mp.setattr(dma, "IovaRcache", live.ArrayIovaRcache)
        got = tables(cfg, tmp_path / "arrays")
    assert made, "the DMA layer no longer built its allocator"
    assert sum(r["unmaps"] for r in want["summary"]) > 100
    for table in ("summary", "metrics", "faults"):
        assert got[table] == want[table], table
