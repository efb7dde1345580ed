"""Tests of vm_agent/iova.py (the top-down tree allocator, the per-CPU rcache) and of how the
DMA API uses it (aperture, the 32-bit window, coherent allocations)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.protocol import OP_GUEST_WRITE
from vm_agent.agent import VmAgent
from vm_agent.iova import (
    IOVA_MAG_SIZE,
    MAX_GLOBAL_MAGS,
    IovaDomain,
    IovaError,
    IovaRcache,
)
from workloads.base import DMA_FROM_DEVICE, Workload

LIMIT64 = (1 << 36) - 1   # a 48-bit IOVA space in 4 KiB pfns
LIMIT32 = (1 << 20) - 1


# --- IovaDomain ---------------------------------------------------------------------------

def test_fresh_domain_allocates_top_down():
    """Successive allocations descend from the limit, each right below the previous one."""
    d = IovaDomain()
    assert d.alloc_iova(1, LIMIT32) == LIMIT32
    assert d.alloc_iova(1, LIMIT32) == LIMIT32 - 1
    assert d.alloc_iova(4, LIMIT32) == LIMIT32 - 7      # 0xffff8: aligned down to 4
    assert d.tree_allocs == 3


def test_size_aligned_allocations_are_aligned():
    """With size_aligned the start is a multiple of the size rounded up to a power of two."""
    d = IovaDomain()
    for size in (1, 3, 5, 8, 17, 100):
        pfn = d.alloc_iova(size, LIMIT64)
        align = 1 << (size - 1).bit_length()
        assert pfn % align == 0
        assert d.find_iova(pfn) == (pfn, pfn + size - 1)


def test_unaligned_allocation_packs_tightly():
    """Without size_aligned a range ends right below the previous one."""
    d = IovaDomain()
    a = d.alloc_iova(3, 1000, size_aligned=False)
    b = d.alloc_iova(5, 1000, size_aligned=False)
    assert (a, b) == (998, 993)


def test_limit_pfn_respected():
    """No allocation ends above limit_pfn, whatever is free above it."""
    d = IovaDomain()
    d.alloc_iova(1, LIMIT64)
    for limit in (LIMIT32, 5000, 77):
        pfn = d.alloc_iova(8, limit)
        assert pfn is not None and pfn + 7 <= limit


def test_exhaustion_returns_none_then_free_allows_again():
    """A full space fails (counted); freeing a range lets the same request succeed."""
    d = IovaDomain(start_pfn=1)
    got = [d.alloc_iova(1, 16) for _ in range(16)]
    assert sorted(got) == list(range(1, 17))
    assert d.alloc_iova(1, 16) is None
    assert d.failures == 1
    assert d.free_iova(7) == 1
    assert d.alloc_iova(1, 16) == 7
    assert d.tree_frees == 1


def test_freed_hole_above_cached_node_is_reused():
    """After a free above the search start, the next allocation fills that hole (top-down)."""
    d = IovaDomain()
    pfns = [d.alloc_iova(1, LIMIT64) for _ in range(10)]
    d.free_iova(pfns[2])
    assert d.alloc_iova(1, LIMIT64) == pfns[2]


def test_search_resumes_below_cached_node_then_retries_above():
    """As Linux: a hole above the cached node is skipped until the space below runs out."""
    d = IovaDomain(start_pfn=1)
    assert d.alloc_iova(1, 64) == 64
    assert d.alloc_iova(1, 63) == 63
    assert d.alloc_iova(8, 64) == 48        # alignment leaves the hole 56..62 above it
    assert d.alloc_iova(1, 64) == 47        # search continues below the cached node
    assert d.alloc_iova(46, 64, size_aligned=False) == 1
    assert d.alloc_iova(1, 64) == 62        # nothing below: the retry pass finds the hole
    assert d.failures == 0


def test_bad_frees_raise_named_error():
    """Freeing an unallocated pfn or the middle of a range is an IovaError."""
    d = IovaDomain()
    pfn = d.alloc_iova(4, LIMIT64)
    with pytest.raises(IovaError):
        d.free_iova(pfn + 1)
    with pytest.raises(IovaError):
        d.free_iova(12345)
    with pytest.raises(IovaError):
        d.alloc_iova(0, LIMIT64)
    assert d.free_iova(pfn) == 4
    with pytest.raises(IovaError):
        d.free_iova(pfn)


def test_reserve_iova_is_never_handed_out():
    """A reserved window (the MSI range) is skipped by allocations that would cover it."""
    d = IovaDomain()
    d.reserve_iova(0xFEE00, 0xFEEFF)
    pfns = [d.alloc_iova(256, LIMIT32) for _ in range(3)]
    for p in pfns:
        assert p + 255 < 0xFEE00 or p > 0xFEEFF
    with pytest.raises(IovaError):
        d.reserve_iova(0xFEE80, 0xFEF00)


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 255),
       st.lists(st.tuples(st.booleans(), st.integers(1, 9), st.integers(0, 60)), max_size=80))
def test_tree_matches_free_space(limit, ops):
    """Ranges never overlap, respect the limit and alignment; a failure means no fit exists.

    One limit per run: Linux's max32_alloc_size shortcut is exact only for a fixed 32-bit limit.
    """
    d = IovaDomain(start_pfn=1)
    live: dict[int, int] = {}
    for is_alloc, size, pick in ops:
        if is_alloc or not live:
            pfn = d.alloc_iova(size, limit)
            used = set()
            for p, s in live.items():
                used.update(range(p, p + s))
            align = 1 << (size - 1).bit_length()
            fits = [p for p in range(1, limit - size + 2)
                    if p % align == 0 and not used.intersection(range(p, p + size))]
            if pfn is None:
                assert not fits
            else:
                assert pfn in fits
                live[pfn] = size
        else:
            victim = sorted(live)[pick % len(live)]
            assert d.free_iova(victim) == live.pop(victim)
    assert len(d) == len(live)


def test_max32_alloc_size_shortcut_as_linux():
    """A 32-bit failure makes same-or-larger 32-bit requests fail fast until a free below 4G."""
    d = IovaDomain(start_pfn=1)
    assert d.alloc_iova(8, 10) is None
    assert d.alloc_iova(8, LIMIT32) is None        # Linux's shortcut: fails without a search
    assert d.alloc_iova(4, LIMIT32) is not None    # smaller sizes still search
    assert d.alloc_iova(8, LIMIT64) is not None    # above 4G the shortcut does not apply
    d.free_iova(d.alloc_iova(1, LIMIT32))
    assert d.alloc_iova(8, LIMIT32) is not None


# --- IovaRcache ---------------------------------------------------------------------------

def test_rcache_lifo_same_cpu():
    """Free then alloc of the same size on the same CPU returns the same pfn."""
    r = IovaRcache(IovaDomain(), cpus=2)
    a = r.alloc_iova_fast(0, 1, LIMIT64)
    b = r.alloc_iova_fast(0, 1, LIMIT64)
    r.free_iova_fast(0, a, 1)
    r.free_iova_fast(0, b, 1)
    assert r.alloc_iova_fast(0, 1, LIMIT64) == b
    assert r.alloc_iova_fast(0, 1, LIMIT64) == a
    assert r.rcache_hits == 2
    assert r.domain.tree_frees == 0


def test_size_rounding():
    """Sizes below 32 round up to a power of two; 3 and 4 share a class; 33 is not rounded."""
    r = IovaRcache(IovaDomain(), cpus=1)
    pfn = r.alloc_iova_fast(0, 3, LIMIT64)
    assert r.domain.find_iova(pfn) == (pfn, pfn + 3)
    r.free_iova_fast(0, pfn, 3)
    assert r.alloc_iova_fast(0, 4, LIMIT64) == pfn
    big = r.alloc_iova_fast(0, 33, LIMIT64)
    assert r.domain.find_iova(big) == (big, big + 32)
    r.free_iova_fast(0, big, 33)                 # uncached: straight to the tree
    assert r.domain.find_iova(big) is None
    r17 = r.alloc_iova_fast(0, 17, LIMIT64)
    assert r.domain.find_iova(r17)[1] - r17 + 1 == 32


def test_free_with_wrong_size_or_twice_raises():
    """A size of another class, a double free or a bad CPU is an IovaError."""
    r = IovaRcache(IovaDomain(), cpus=1)
    pfn = r.alloc_iova_fast(0, 4, LIMIT64)
    with pytest.raises(IovaError):
        r.free_iova_fast(0, pfn, 8)
    r.free_iova_fast(0, pfn, 4)
    with pytest.raises(IovaError):
        r.free_iova_fast(0, pfn, 4)
    with pytest.raises(IovaError):
        r.domain.free_iova(pfn)                  # it sits in a magazine
    with pytest.raises(IovaError):
        r.alloc_iova_fast(1, 1, LIMIT64)


def test_cached_pfn_must_fit_the_limit():
    """A cached pfn above the limit is skipped; a lower one in the magazine is used."""
    r = IovaRcache(IovaDomain(), cpus=1)
    low = r.alloc_iova_fast(0, 1, LIMIT32)
    high = r.alloc_iova_fast(0, 1, LIMIT64)
    r.free_iova_fast(0, low, 1)
    r.free_iova_fast(0, high, 1)                 # top of the magazine
    assert r.alloc_iova_fast(0, 1, LIMIT32) == low
    assert r.alloc_iova_fast(0, 1, LIMIT64) == high


def test_magazine_swap_and_depot_push_pop():
    """Frees fill loaded, swap with prev, then push a full magazine; allocs pop it back."""
    r = IovaRcache(IovaDomain(), cpus=2)
    pfns = [r.alloc_iova_fast(0, 1, LIMIT64) for _ in range(2 * IOVA_MAG_SIZE + 1)]
    for p in pfns[:2 * IOVA_MAG_SIZE]:
        r.free_iova_fast(0, p, 1)
    assert r.depot_pushes == 0
    r.free_iova_fast(0, pfns[-1], 1)
    assert r.depot_pushes == 1 and r.depot_size(1) == 1
    # CPU 1 has empty magazines: it takes the depot's magazine (the second 127), LIFO.
    assert r.alloc_iova_fast(1, 1, LIMIT64) == pfns[2 * IOVA_MAG_SIZE - 1]
    assert r.depot_pops == 1 and r.depot_size(1) == 0


def test_cross_cpu_reuse_only_through_depot():
    """An IOVA freed on CPU0 is not reused by CPU1 until its magazine reaches the depot."""
    r = IovaRcache(IovaDomain(), cpus=2)
    mine = [r.alloc_iova_fast(0, 2, LIMIT64) for _ in range(10)]
    for p in mine:
        r.free_iova_fast(0, p, 2)
    other = [r.alloc_iova_fast(1, 2, LIMIT64) for _ in range(10)]
    assert not set(other) & set(mine)
    assert r.rcache_hits == 0 and r.rcache_misses == 20


def test_depot_overflow_frees_to_tree():
    """With the depot full, a further full magazine's IOVAs go back to the tree."""
    r = IovaRcache(IovaDomain(), cpus=1)
    n = (MAX_GLOBAL_MAGS + 2) * IOVA_MAG_SIZE + 1
    pfns = [r.alloc_iova_fast(0, 1, LIMIT64) for _ in range(n)]
    for p in pfns:
        r.free_iova_fast(0, p, 1)
    assert r.depot_pushes == MAX_GLOBAL_MAGS
    assert r.depot_overflows == 1
    assert r.domain.tree_frees == IOVA_MAG_SIZE
    assert r.cached() == n - IOVA_MAG_SIZE


def test_tree_failure_flushes_caches_and_retries():
    """When the tree is exhausted, cached IOVAs of other sizes/CPUs are freed and reused."""
    d = IovaDomain(start_pfn=1)
    r = IovaRcache(d, cpus=2)
    ones = [r.alloc_iova_fast(0, 1, 16) for _ in range(16)]
    for p in ones:
        r.free_iova_fast(0, p, 1)
    assert len(d) == 16                          # all still allocated, in CPU0's magazine
    pfn = r.alloc_iova_fast(1, 4, 16)
    assert pfn is not None and pfn % 4 == 0
    assert r.rcache_flushes >= 1
    assert r.cached() == 0


def test_rcache_deterministic():
    """The same operation sequence gives the same pfns."""
    def run() -> list[int | None]:
        r = IovaRcache(IovaDomain(), cpus=3)
        out = []
        live: list[tuple[int, int, int]] = []
        for i in range(600):
            cpu, size = i % 3, 1 + (i * 7) % 40
            if i % 5 == 4 and live:
                c, p, s = live.pop((i * 13) % len(live))
                r.free_iova_fast(c, p, s)
            else:
                p = r.alloc_iova_fast(cpu, size, LIMIT64)
                out.append(p)
                live.append((cpu, p, size))
        return out
    assert run() == run()


def test_alloc_without_flush_rcache_leaves_magazines_alone():
    """alloc_iova_fast(..., flush_rcache=False) fails instead of freeing cached IOVAs."""
    r = IovaRcache(IovaDomain(), 1)
    pfns = [r.alloc_iova_fast(0, 1, 15) for _ in range(15)]       # pfns 1..15: all of it
    r.free_iova_fast(0, pfns[0], 1)
    assert r.alloc_iova_fast(0, 2, 15, flush_rcache=False) is None
    assert r.rcache_flushes == 0 and r.cached() == 1
    assert r.alloc_iova_fast(0, 2, 15) is None and r.rcache_flushes == 1 and r.cached() == 0


# --- The DMA API's use of the allocator (dma-iommu.c iommu_dma_alloc_iova) ------------------
class _Dev(Workload):
    kind = "iova-test"

    def start(self, ctx) -> None:
        self.dev = ctx.add_device("dev0")


@pytest.fixture
def guest():
    """A guest with one device; returns (agent, device) after building with ``mode``."""
    def build(mode: str, fl_levels: int = 4) -> tuple[VmAgent, object]:
        wl = _Dev(_Dev.Params())
        agent = VmAgent(1, mode=mode, policy="strict", flush_queue="percpu", vcpus=1,
                        memory_bytes=32 << 20, fl_levels=fl_levels, ats=False, workload=wl,
                        churn=None, costs=CostModel(), seed=1)
        agent.setup()
        return agent, wl.dev
    return build


@pytest.mark.parametrize(("mode", "fl_levels", "aperture_bits"), [
    ("nested", 4, 47), ("nested", 5, 56), ("shadow", 4, 48)])
def test_domain_aperture(guest, mode, fl_levels, aperture_bits):
    """A first-level domain keeps to the canonical lower half: 2^(gaw-1) (iommu.c)."""
    agent, dev = guest(mode, fl_levels)
    assert agent.dma.domains[dev.sid].limit_pfn == (1 << (aperture_bits - PAGE_SHIFT)) - 1


@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_full_32bit_window_is_abandoned_once_and_maps_go_on(guest, mode):
    """Issue reproducer: once the 32-bit space filled, maps went to 2^48 - 4 KiB and the
    first-level table refused them (ValueError). Now the window is dropped after its first
    failure, the allocation succeeds inside the aperture, and it is never tried again."""
    agent, dev = guest(mode)
    dom = agent.dma.domains[dev.sid]
    dom.iovad.reserve_iova(1, LIMIT32 - 4)      # leave 4 pages below 4 GiB
    gpa = agent.alloc_buffer(PAGE_SIZE)
    low = [agent.dma_map(0, dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, 0)[0] for _ in range(4)]
    assert all(iova < 1 << 32 for iova in low) and dom.pci_32bit_workaround
    high = [agent.dma_map(0, dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, 0)[0] for _ in range(3)]
    assert not dom.pci_32bit_workaround
    assert all(1 << 32 <= iova <= dom.limit_pfn << PAGE_SHIFT for iova in high)
    assert dom.iovad.failures == 1 and dom.rcache.rcache_flushes == 0
    agent.dma_unmap(0, dev, low[0], PAGE_SIZE, DMA_FROM_DEVICE, 0)   # a 32-bit IOVA comes back
    agent.dma.domains[dev.sid].rcache.free_cpu_cached_iovas(0)
    assert agent.dma_map(0, dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, 0)[0] >= 1 << 32
    assert dom.iovad.failures == 1


def test_coherent_allocations_share_the_rcache_path(guest):
    """dma_alloc_coherent takes IOVAs like dma_map (iommu_dma_alloc -> __iommu_dma_map): a
    just-freed IOVA in the CPU's magazine is handed out again."""
    agent, dev = guest("nested")
    gpa = agent.alloc_buffer(PAGE_SIZE)
    iova, t = agent.dma_map(0, dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, 0)
    t_unmapped = agent.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    agent.log.take()
    hits = agent.dma.domains[dev.sid].rcache.rcache_hits
    _gpa, ring = agent.dma_alloc_coherent(dev, PAGE_SIZE)   # at agent.now = 0
    assert ring == iova and agent.dma.domains[dev.sid].rcache.rcache_hits == hits + 1
    # The reused IOVA is mapped after its unmap finished, though the event time is earlier.
    writes = agent.log.take()
    assert len(writes) and (writes["op"] == OP_GUEST_WRITE).all()
    assert writes["t_ns"].min() >= t_unmapped > agent.now
