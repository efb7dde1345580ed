"""A fake guest for workload tests: an event heap, a bump IOVA allocator, fixed costs, records."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from workloads.base import Device

PAGE = 4096
MAP_NS = 300       # fixed cost of one dma_map / dma_map_sg call
UNMAP_NS = 200
IOVA_BASE = 1 << 32
GPA_BASE = 1 << 30


@dataclass
class Dma:
    t_ns: int
    dev: str
    iova: int
    size: int
    write: bool
    rogue: bool
    mapped: bool       # every byte was inside a live mapping (streaming or coherent)
    coherent: bool     # the target is a coherent allocation (ring, PRP list)


@dataclass
class FakeGuestContext:
    """Implements workloads.base.GuestContext; ``run_until`` runs the event heap.

    ``schedule(t, fn, *args)`` calls ``fn(*args)`` at ``t``; ties run in scheduling order.
    Errors a real guest would record (unmapping what is not mapped, scheduling in the past,
    freeing twice) are collected in ``errors``.
    """

    vcpus: int = 2
    seed: int = 1
    vm: int = 1
    now: int = 0
    maps: list[tuple[int, int, int, int]] = field(default_factory=list)   # t, iova, size, dir
    unmaps: list[tuple[int, int, int]] = field(default_factory=list)      # t, iova, size
    map_sgs: list[list[tuple[int, int]]] = field(default_factory=list)
    unmap_sgs: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    dmas: list[Dma] = field(default_factory=list)
    ios: list[tuple[int, int, int]] = field(default_factory=list)         # t, bytes, latency
    churn: list[tuple[str, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._heap: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._busy = [0] * self.vcpus
        self._devices: dict[str, Device] = {}
        self._next_gpa = GPA_BASE
        self._next_iova = IOVA_BASE
        self._buffers: dict[int, int] = {}                # gpa -> size
        self._live: dict[tuple[str, int], int] = {}       # (dev, iova) -> size
        self._live_pages: dict[str, set[int]] = {}        # dev -> streaming-mapped pages
        self._coherent_pages: dict[str, set[int]] = {}
        self._last_unmapped: dict[str, int] = {}
        self.ballooned = 0

    # --- events ------------------------------------------------------------------------
    def schedule(self, t_ns: int, fn: Callable[..., None], *args: Any) -> None:
        if t_ns < self.now:
            self.errors.append(f"scheduled at {t_ns} < now {self.now}")
        heapq.heappush(self._heap, (t_ns, self._seq, fn, args))
        self._seq += 1

    def run_until(self, t_ns: int, epoch: bool = False) -> None:
        """Run the events at or before ``t_ns``; with ``epoch``, as an epoch ending at
        ``t_ns + 1`` (vCPU work that cannot start before then waits: ``stalled_until``)."""
        self.t_end = t_ns + 1 if epoch else 1 << 62
        while self._heap and self._heap[0][0] <= t_ns:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)
        self.now = t_ns

    def stalled_until(self, cpu: int, t_ns: int) -> int:
        """VmAgent.stalled_until: the vCPU's start if at or after the epoch's end, else 0."""
        start = max(t_ns, self._busy[cpu])
        return start if start >= getattr(self, "t_end", 1 << 62) else 0

    def pending_events(self) -> int:
        return len(self._heap)

    def cpu_free_at(self, cpu: int) -> int:
        return self._busy[cpu]

    def add_device(self, name: str, ats: bool = False) -> Device:
        dev = Device(sid=len(self._devices) + 1, name=name, ats=ats)
        self._devices[name] = dev
        self._live_pages[name] = set()
        self._coherent_pages[name] = set()
        return dev

    # --- memory ------------------------------------------------------------------------
    def alloc_buffer(self, size: int) -> int:
        gpa = self._next_gpa
        self._next_gpa += -(-size // PAGE) * PAGE
        self._buffers[gpa] = size
        return gpa

    def free_buffer(self, gpa: int, size: int) -> None:
        if self._buffers.pop(gpa, None) is None:
            self.errors.append(f"free of unknown buffer {gpa:#x}")

    def live_buffers(self) -> int:
        return len(self._buffers)

    # --- DMA API -------------------------------------------------------------------------
    def _alloc_iova(self, size: int) -> int:
        iova = self._next_iova
        self._next_iova += -(-size // PAGE) * PAGE + PAGE    # a guard page between ranges
        return iova

    def _start(self, cpu: int, t_ns: int) -> int:
        return max(t_ns, self._busy[cpu], self.now)

    def dma_alloc_coherent(self, dev: Device, size: int) -> tuple[int, int]:
        gpa = self.alloc_buffer(size)
        iova = self._alloc_iova(size)
        self._coherent_pages[dev.name].update(range(iova // PAGE, -(-(iova + size) // PAGE)))
        return gpa, iova

    def _map(self, dev: Device, gpa: int, size: int) -> int:
        iova = self._alloc_iova(size + (gpa % PAGE)) + gpa % PAGE
        self._live[(dev.name, iova)] = size
        self._live_pages[dev.name].update(range(iova // PAGE, -(-(iova + size) // PAGE)))
        return iova

    def _unmap(self, dev: Device, iova: int, size: int) -> None:
        got = self._live.pop((dev.name, iova), None)
        if got is None or got != size:
            self.errors.append(f"unmap of {iova:#x}+{size} not mapped as such ({got})")
            return
        self._live_pages[dev.name].difference_update(
            range(iova // PAGE, -(-(iova + size) // PAGE)))
        self._last_unmapped[dev.name] = iova

    def dma_map(self, cpu: int, dev: Device, gpa: int, size: int, direction: int,
                t_ns: int) -> tuple[int, int]:
        t = self._start(cpu, t_ns) + MAP_NS
        self._busy[cpu] = t
        iova = self._map(dev, gpa, size)
        self.maps.append((t, iova, size, direction))
        return iova, t

    def dma_unmap(self, cpu: int, dev: Device, iova: int, size: int, direction: int,
                  t_ns: int) -> int:
        t = self._start(cpu, t_ns) + UNMAP_NS
        self._busy[cpu] = t
        self._unmap(dev, iova, size)
        self.unmaps.append((t, iova, size))
        return t

    def dma_map_sg(self, cpu: int, dev: Device, sg: list[tuple[int, int]], direction: int,
                   t_ns: int) -> tuple[list[tuple[int, int]], int]:
        t = self._start(cpu, t_ns) + MAP_NS
        self._busy[cpu] = t
        segs = [(self._map(dev, gpa, length), length) for gpa, length in sg]
        self.map_sgs.append(segs)
        return segs, t

    def dma_unmap_sg(self, cpu: int, dev: Device, segs: list[tuple[int, int]],
                     direction: int, t_ns: int) -> int:
        t = self._start(cpu, t_ns) + UNMAP_NS
        self._busy[cpu] = t
        for iova, length in segs:
            self._unmap(dev, iova, length)
        self.unmap_sgs.append((t, list(segs)))
        return t

    def live_mappings(self) -> int:
        return len(self._live)

    # --- device side ---------------------------------------------------------------------
    def device_dma(self, dev: Device, t_ns: int, iova: int, size: int, write: bool,
                   rogue: bool = False) -> None:
        if t_ns < self.now:
            self.errors.append(f"device DMA at {t_ns} < now {self.now}")
        pages = range(iova // PAGE, -(-(iova + size) // PAGE))
        coherent = all(p in self._coherent_pages[dev.name] for p in pages)
        mapped = coherent or all(p in self._live_pages[dev.name] for p in pages)
        self.dmas.append(Dma(t_ns, dev.name, iova, size, write, rogue, mapped, coherent))

    def last_unmapped(self, dev: Device) -> int | None:
        return self._last_unmapped.get(dev.name)

    def io_done(self, t_ns: int, nbytes: int, latency_ns: int) -> None:
        self.ios.append((t_ns, nbytes, latency_ns))

    # --- host churn ----------------------------------------------------------------------
    def balloon_inflate(self, t_ns: int, npages: int) -> int:
        self.ballooned += npages
        self.churn.append(("inflate", t_ns, npages))
        return npages

    def balloon_deflate(self, t_ns: int, npages: int) -> int:
        got = min(npages, self.ballooned)
        self.ballooned -= got
        self.churn.append(("deflate", t_ns, npages))
        return got

    def unplug(self, t_ns: int, npages: int) -> int:
        self.churn.append(("unplug", t_ns, npages))
        return npages


@pytest.fixture
def make_ctx() -> Callable[..., FakeGuestContext]:
    """``make_ctx(vcpus=2, seed=1)``: a fresh fake guest."""
    return FakeGuestContext
