"""Differential tests: vm_agent/iova.py against vm_agent/reference_iova.py, step by step.

Both allocators get the same calls; every return value, every refusal (IovaError in each) and
every public counter must agree after each step, and so must the allocated ranges (probed with
find_iova). Scripts are random (hypothesis) and adversarial: exhaustion of a small space, the
32-bit window (cached32_node, max32_alloc_size), sizes that are not powers of two, wrong-size
and double frees, frees of IOVAs sitting in a magazine, depot overflow and rcache flushes.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vm_agent import iova as live
from vm_agent import reference_iova as ref

LIMIT64 = (1 << 36) - 1          # a 48-bit IOVA space in 4 KiB pfns
LIMIT32 = (1 << 20) - 1          # the last pfn below 4 GiB
COUNTERS = ("rcache_hits", "rcache_misses", "depot_pushes", "depot_pops", "depot_overflows",
            "rcache_flushes")
ERR = "IovaError"


def test_reference_follows_linux_constants():
    """The reference's Linux constants are the live model's."""
    assert (ref.IOVA_MAG_SIZE, ref.MAX_GLOBAL_MAGS, ref.IOVA_RANGE_CACHE_MAX_SIZE) == (
        live.IOVA_MAG_SIZE, live.MAX_GLOBAL_MAGS, live.IOVA_RANGE_CACHE_MAX_SIZE)


class Pair:
    """A live and a reference allocator driven in lockstep."""

    def __init__(self, cpus: int = 2, granule: int = 4096, start_pfn: int = 1) -> None:
        self.ld = live.IovaDomain(granule, start_pfn)
        self.rd = ref.IovaDomain(granule, start_pfn)
        self.lr = live.IovaRcache(self.ld, cpus)
        self.rr = ref.IovaRcache(self.rd, cpus)
        self.cpus = cpus
        self.steps = 0

    def both(self, what: str, *args, **kw):
        """Call ``what`` (``dom.x`` or ``rc.x``) on both; the common outcome, ERR if refused."""
        outs = []
        for dom, rc, err in ((self.ld, self.lr, live.IovaError),
                             (self.rd, self.rr, ref.IovaError)):
            obj = dom if what.startswith("dom.") else rc
            try:
                outs.append(getattr(obj, what[3:].lstrip("."))(*args, **kw))
            except err:
                outs.append(ERR)
        assert outs[0] == outs[1], (what, args, kw, outs)
        self.steps += 1
        return outs[0]

    def check(self, probes: list[int] = ()) -> None:
        """Every public counter and the allocated ranges agree."""
        ld, rd, lr, rr = self.ld, self.rd, self.lr, self.rr
        assert len(ld) == len(rd)
        for k in ("tree_allocs", "tree_frees", "failures"):
            assert getattr(ld, k) == getattr(rd, k), k
        if hasattr(ld, "max32_alloc_size"):
            assert ld.max32_alloc_size == rd.max32_alloc_size
        for k in COUNTERS:
            assert getattr(lr, k) == getattr(rr, k), k
        assert lr.cached() == rr.cached()
        for order in range(live.IOVA_RANGE_CACHE_MAX_SIZE):
            assert lr.depot_size(1 << order) == rr.depot_size(1 << order)
        for lo, hi in rd.nodes[:-1]:
            assert ld.find_iova(lo) == (lo, hi) and ld.find_iova(hi) == (lo, hi)
        # the reference's own invariant: sorted, disjoint ranges, the anchor last
        assert all(a[1] < b[0] for a, b in zip(rd.nodes, rd.nodes[1:], strict=False))
        assert rd.nodes[-1] == (ref.IOVA_ANCHOR, ref.IOVA_ANCHOR)
        for p in probes:
            assert ld.find_iova(p) == rd.find_iova(p), p


# --- scripted random runs -------------------------------------------------------------------
LIMITS = st.sampled_from([40, 300, LIMIT32, LIMIT32 + 1, LIMIT32 + 60, LIMIT64])
SIZES = st.one_of(st.integers(1, 40), st.sampled_from([0, -1, 33, 64, 65]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 1), SIZES, LIMITS, st.booleans()),
    st.tuples(st.just("free"), st.integers(0, 1), st.integers(0, 1 << 16),
              st.sampled_from([0, 0, 0, 1, -1])),
    st.tuples(st.just("tree_alloc"), SIZES, LIMITS, st.booleans()),
    st.tuples(st.just("tree_free"), st.integers(0, 1 << 16)),
    st.tuples(st.just("again"), st.integers(0, 1), st.integers(0, 1 << 16)),
    st.tuples(st.just("flush_cpu"), st.integers(0, 1)),
    st.tuples(st.just("flush_global")),
    st.tuples(st.just("reserve"), st.integers(0, LIMIT32 + 100), st.integers(0, 50)),
    st.tuples(st.just("bad_cpu"), st.sampled_from([-1, 2, 99])),
), max_size=120)


def run_script(pair: Pair, ops) -> None:
    held: list[tuple[int, int, bool]] = []       # (pfn, size asked, via the rcache)
    gone: list[tuple[int, int]] = []             # freed (pfn, size): for double frees
    probes: list[int] = []
    for op in ops:
        kind = op[0]
        if kind == "alloc":
            _, cpu, size, limit, flush = op
            pfn = pair.both("rc.alloc_iova_fast", cpu, size, limit, flush_rcache=flush)
            if pfn not in (None, ERR):
                held.append((pfn, size, True))
        elif kind == "tree_alloc":
            _, size, limit, aligned = op
            pfn = pair.both("dom.alloc_iova", size, limit, aligned)
            if pfn not in (None, ERR):
                held.append((pfn, size, False))
        elif kind in ("free", "tree_free") and held:
            pfn, size, _via = held[op[-2 if kind == "free" else -1] % len(held)]
            if kind == "free":
                out = pair.both("rc.free_iova_fast", op[1], pfn, size + op[3])
            else:
                out = pair.both("dom.free_iova", pfn)
            if out != ERR:
                held.remove(next(h for h in held if h[0] == pfn))
                gone.append((pfn, size))
        elif kind == "again" and gone:
            pfn, size = gone[op[2] % len(gone)]
            pair.both("rc.free_iova_fast", op[1], pfn, size)
            pair.both("dom.free_iova", pfn)
            if pair.ld.find_iova(pfn) is None:
                held[:] = [h for h in held if h[0] != pfn]
        elif kind == "flush_cpu":
            pair.both("rc.free_cpu_cached_iovas", op[1])
        elif kind == "flush_global":
            pair.both("rc.free_global_cached_iovas")
        elif kind == "reserve":
            pair.both("dom.reserve_iova", op[1], op[1] + op[2])
            probes += [op[1], op[1] + op[2]]
        elif kind == "bad_cpu":
            assert pair.both("rc.alloc_iova_fast", op[1], 1, LIMIT64) == ERR
            if held:
                assert pair.both("rc.free_iova_fast", op[1], held[0][0], held[0][1]) == ERR
        pair.check(probes)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 64, 500]), OPS)
def test_random_scripts_agree(room32, ops):
    """Random calls; ``room32`` > 0 reserves all but that many pages below 4 GiB, so the
    32-bit window fills and the 64-bit fallback, max32_alloc_size and its reset are hit."""
    pair = Pair()
    if room32:
        pair.both("dom.reserve_iova", 1, LIMIT32 - room32)
    run_script(pair, ops)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9), st.integers(0, 1 << 16)),
                max_size=200), st.integers(12, 90))
def test_tree_only_exhaustion_and_holes(ops, limit):
    """The tree alone in a space of ``limit`` pages, aligned or not: every free makes a hole
    the cached-node search finds or misses exactly as Linux's does."""
    pair = Pair()
    held: list[int] = []
    for alloc, size, k in ops:
        if alloc or not held:
            pfn = pair.both("dom.alloc_iova", size, limit, bool(k & 1))
            if pfn is not None:
                held.append(pfn)
        else:
            pair.both("dom.free_iova", held.pop(k % len(held)))
        pair.check()


# --- adversarial, deterministic ---------------------------------------------------------------
def test_magazines_depot_overflow_and_rcache_flush():
    """5,000 single pages freed on one CPU fill loaded, prev, the whole depot and overflow;
    another CPU drains the depot; exhaustion of a small window flushes every cache."""
    pair = Pair(cpus=2)
    pfns = [pair.both("rc.alloc_iova_fast", 0, 1, LIMIT64) for _ in range(5000)]
    for pfn in pfns:
        pair.both("rc.free_iova_fast", 0, pfn, 1)
    pair.check()
    assert pair.lr.depot_overflows > 0 and pair.lr.depot_size(1) == live.MAX_GLOBAL_MAGS
    for _ in range(3 * live.IOVA_MAG_SIZE):
        pair.both("rc.alloc_iova_fast", 1, 1, LIMIT64)
    pair.check()
    assert pair.lr.depot_pops >= 2
    # a window below everything cached: magazine pops fail the limit, the tree fills, the
    # flush frees every cached IOVA and the retry succeeds or fails as in the reference
    for _ in range(70):
        pair.both("rc.alloc_iova_fast", 1, 2, 100)
    pair.check()
    assert pair.lr.rcache_flushes > 0


@pytest.mark.parametrize("seed", range(4))
def test_long_mixed_runs_agree(seed):
    """Long random runs (Python's random, fixed seeds) of map/unmap-like traffic: sizes
    mostly small, two CPUs, a 32-bit first try as dma-iommu makes while the 32-bit
    workaround holds, and occasional cache flushes."""
    rnd = random.Random(seed)
    pair = Pair(cpus=2)
    pair.both("dom.reserve_iova", 1, LIMIT32 - 3000)
    held: list[tuple[int, int]] = []
    for step in range(6000):
        cpu = rnd.randrange(2)
        r = rnd.random()
        if r < 0.52 or not held:
            size = rnd.choice([1, 1, 1, 2, 3, 4, 8, 16, 17, 32, 33, 48])
            pfn = pair.both("rc.alloc_iova_fast", cpu, size, LIMIT32, flush_rcache=False)
            if pfn is None:
                pfn = pair.both("rc.alloc_iova_fast", cpu, size, LIMIT64)
            if pfn is not None:
                held.append((pfn, size))
        elif r < 0.995:
            pfn, size = held.pop(rnd.randrange(len(held)))
            pair.both("rc.free_iova_fast", cpu, pfn, size)
        else:
            pair.both("rc.free_cpu_cached_iovas", cpu)
        if step % 250 == 0:
            pair.check()
    pair.check()


def test_32bit_boundary_and_cached32_node():
    """Allocations straddling and hugging the 4 GiB boundary, frees below and above it, and
    a retry above the cached32 node after max32_alloc_size was lowered."""
    pair = Pair()
    pair.both("dom.reserve_iova", 1, LIMIT32 - 40)
    got = [pair.both("dom.alloc_iova", s, LIMIT32) for s in (8, 8, 4, 16, 8, 2, 1, 1)]
    pair.both("dom.alloc_iova", 64, LIMIT32 + 32)          # straddles 4 GiB
    pair.both("dom.alloc_iova", 3, LIMIT32, False)
    for pfn in got[1::2]:
        if pfn is not None:
            pair.both("dom.free_iova", pfn)
            pair.both("dom.alloc_iova", 16, LIMIT32)            # fails, max32 lowered
            pair.both("dom.alloc_iova", 1, LIMIT32)
            pair.check()
    for size in (1, 2, 4, 8, 16, 32):
        pair.both("dom.alloc_iova", size, LIMIT32)
        pair.both("dom.alloc_iova", size, LIMIT32 + 1)
    pair.check([LIMIT32 - 41, LIMIT32 - 40, LIMIT32, LIMIT32 + 1, LIMIT32 + 32])
    # a range ending exactly at the 4 GiB page is a cached_node (not cached32_node) insert:
    # the next 64-bit search starts below it
    fresh = Pair()
    for limit in (LIMIT32 + 1, LIMIT64, LIMIT32 + 1, LIMIT32, LIMIT64, LIMIT32 + 2):
        fresh.both("dom.alloc_iova", 1, limit)
    fresh.check()


def test_refusals_agree():
    """Misuse is refused alike: bad sizes, bad CPUs, wrong-size, double and cached frees,
    overlapping or impossible reservations, bad constructor arguments."""
    pair = Pair()
    a = pair.both("rc.alloc_iova_fast", 0, 3, LIMIT64)       # rounded to 4
    b = pair.both("dom.alloc_iova", 3, LIMIT64)               # exactly 3
    c = pair.both("rc.alloc_iova_fast", 0, 40, LIMIT64)       # uncacheable, exact
    for args in ((0, a, 2), (0, a, 5), (0, b, 3), (0, b, 4), (0, c, 33), (0, c, 64),
                 (0, a + 1, 1), (0, 0, 1), (0, ref.IOVA_ANCHOR, 1), (0, c, 0), (0, c, -2)):
        assert pair.both("rc.free_iova_fast", *args) == ERR, args
    pair.both("rc.free_iova_fast", 0, a, 4)
    assert pair.both("rc.free_iova_fast", 1, a, 4) == ERR     # sits in cpu 0's magazine
    assert pair.both("dom.free_iova", a) == ERR
    pair.both("rc.free_iova_fast", 0, c, 40)
    assert pair.both("rc.free_iova_fast", 0, c, 40) == ERR    # double free of a tree IOVA
    assert pair.both("dom.free_iova", ref.IOVA_ANCHOR) == ERR
    for lo, hi in ((b, b), (b - 5, b + 1), (10, 5), (-1, 3), (5, ref.IOVA_ANCHOR)):
        assert pair.both("dom.reserve_iova", lo, hi) == ERR, (lo, hi)
    for size in (0, -3):
        assert pair.both("dom.alloc_iova", size, LIMIT64) == ERR
        assert pair.both("rc.alloc_iova_fast", 0, size, LIMIT64) == ERR
    pair.check()
    for args in ((3000,), (0,), (4096, -1)):
        with pytest.raises(live.IovaError):
            live.IovaDomain(*args)
        with pytest.raises(ref.IovaError):
            ref.IovaDomain(*args)
    with pytest.raises(live.IovaError):
        live.IovaRcache(live.IovaDomain(), 0)
    with pytest.raises(ref.IovaError):
        ref.IovaRcache(ref.IovaDomain(), 0)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([512, 4096, 65536]), st.integers(0, 3), OPS)
def test_other_granules_and_start_pfns(granule, start_pfn, ops):
    """A 64 KiB granule moves the 32-bit boundary; a start_pfn of 0 lets pfn 0 be handed
    out; both models agree on every call."""
    pair = Pair(granule=granule, start_pfn=start_pfn)
    run_script(pair, ops)
