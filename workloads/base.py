"""The abstract device workload and the guest services it drives.

A workload models one kind of DMA-capable device and the guest driver code around it (a NIC
with its rings and NAPI loop, an NVMe drive with its queues and PRPs, a trace replayer). It is a
discrete-event model: ``start`` sets up rings and schedules the first events on the guest's
clock; every event callback may call the guest DMA API (which costs vCPU time and may trap to
the VMM) and emit device DMAs at virtual times. The guest (vm_agent) provides the services
below as a ``GuestContext``; workloads never see the host, the VMM or the IOMMU, exactly as a
Linux driver only sees dma_map_*/dma_unmap_* (include/linux/dma-mapping.h).

Subclasses provide ``kind`` (the name in ``[vm.<group>.workload] kind``), a frozen ``Params``
dataclass (every field is a config key: its type and default are validated and documented from
it), and ``start``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

# DMA directions, as Linux's enum dma_data_direction.
DMA_BIDIRECTIONAL = 0
DMA_TO_DEVICE = 1      # device reads guest memory (TX, NVMe write)
DMA_FROM_DEVICE = 2    # device writes guest memory (RX, NVMe read)


@dataclass(frozen=True, slots=True)
class Device:
    """A PCI function assigned to the guest."""

    sid: int            # requester id (bus << 8 | dev << 3 | fn), unique per host
    name: str           # "nic0", "nvme0", ...
    ats: bool = False   # has a device-TLB (PCIe ATS)


class GuestContext(Protocol):
    """What a guest offers its device drivers. Times are virtual ns.

    Calls that run on a vCPU (``dma_map``, ``dma_unmap`` ...) start at ``max(t_ns, the vCPU's
    busy-until time)`` and return when they finish; the vCPU is busy until then. An event
    handler doing vCPU work first asks ``stalled_until`` whether it may start in this epoch.
    """

    vm: int
    rng: np.random.Generator
    vcpus: int

    def add_device(self, name: str, ats: bool = False) -> Device: ...
    def schedule(self, t_ns: int, fn: Callable[..., None], *args: Any) -> None: ...
    def cpu_free_at(self, cpu: int) -> int: ...
    def stalled_until(self, cpu: int, t_ns: int) -> int:
        """0 when vCPU ``cpu`` can start work at ``t_ns`` (the caller's own start, its busy
        time included) before the end of the epoch being run; else the time it can, at or
        after that end (the vCPU is busy, or spins on the host's invalidation queue, until
        then). An event handler that runs on a vCPU (an interrupt handler's work, a NAPI
        poll, the application's send, NVMe completion handling) then schedules itself at
        that time and does nothing now: a stalled vCPU issues nothing, and no vCPU work is
        stamped in an epoch it does not start in. Device-side events (the wire, device DMA,
        media) never wait for it."""
        ...

    # guest memory (GPA) for I/O buffers: page-aligned, sizes rounded up to pages
    def alloc_buffer(self, size: int) -> int: ...
    def free_buffer(self, gpa: int, size: int) -> None: ...

    # DMA API (Linux dma-iommu.c semantics): each returns the time the call completed
    def dma_alloc_coherent(self, dev: Device, size: int) -> tuple[int, int]:
        """(gpa, iova) of a zeroed, mapped, never-unmapped buffer (rings, PRP lists)."""
        ...
    def dma_map(self, cpu: int, dev: Device, gpa: int, size: int, direction: int,
                t_ns: int) -> tuple[int, int]:
        """Map one buffer: (iova, t_done_ns)."""
        ...
    def dma_unmap(self, cpu: int, dev: Device, iova: int, size: int, direction: int,
                  t_ns: int) -> int: ...
    def dma_map_sg(self, cpu: int, dev: Device, sg: list[tuple[int, int]], direction: int,
                   t_ns: int) -> tuple[list[tuple[int, int]], int]:
        """Map a scatter list of (gpa, length): the DMA segments (iova, length), t_done."""
        ...
    def dma_unmap_sg(self, cpu: int, dev: Device, segs: list[tuple[int, int]],
                     direction: int, t_ns: int) -> int: ...

    # the device side
    def device_dma(self, dev: Device, t_ns: int, iova: int, size: int, write: bool,
                   rogue: bool = False) -> None:
        """The device reads (write=False) or writes guest memory at ``iova``."""
        ...
    def last_unmapped(self, dev: Device) -> int | None:
        """IOVA the guest unmapped most recently for this device (for rogue DMA)."""
        ...
    def io_done(self, t_ns: int, nbytes: int, latency_ns: int) -> None:
        """Account one completed I/O (a packet, an NVMe command)."""
        ...

    # host second-level churn (the VMM changes the VM's GPA->HPA map)
    def balloon_inflate(self, t_ns: int, npages: int) -> int:
        """The guest gives ``npages`` free pages back to the host; returns pages given."""
        ...
    def balloon_deflate(self, t_ns: int, npages: int) -> int:
        """The host returns up to ``npages`` ballooned pages; returns pages returned."""
        ...
    def unplug(self, t_ns: int, npages: int) -> int:
        """The VMM unplugs ``npages`` of guest memory (the guest stops using them first)."""
        ...


class Workload(ABC):
    """A device and its driver loop. Subclasses set ``kind``, ``Params`` and ``start``."""

    kind: ClassVar[str]
    # summary columns this kind adds (``summary_counters``); other kinds report them as 0.
    # They are counts (never means or maxima), so a measured window is end minus start.
    SUMMARY_COLUMNS: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0

    def __init__(self, params: Any) -> None:
        self.params = params

    def summary_counters(self) -> dict[str, int]:
        """This workload's own summary columns (named in ``SUMMARY_COLUMNS``)."""
        return {}

    @abstractmethod
    def start(self, ctx: GuestContext) -> None:
        """Create devices and rings, map what stays mapped, schedule the first events."""

    def device_dma(self, ctx: GuestContext, dev: Device, t_ns: int, iova: int, size: int,
                   write: bool) -> None:
        """Emit a device DMA; a ``rogue_fraction`` share goes to the last unmapped IOVA."""
        frac = getattr(self.params, "rogue_fraction", 0.0)
        if frac > 0.0 and ctx.rng.random() < frac:
            stale = ctx.last_unmapped(dev)
            if stale is not None:
                ctx.device_dma(dev, t_ns, stale, min(size, 64), write, rogue=True)
                return
        ctx.device_dma(dev, t_ns, iova, size, write)
