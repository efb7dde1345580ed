"""An NVMe drive and its driver: SQ/CQ rings, PRP1/PRP2 and PRP list pages, closed-loop I/O.

Follows NVMe Base Specification 1.4 (4.1 submission/completion queues, 4.3 Physical Region
Page entries and lists) and Linux drivers/nvme/host/pci.c (nvme_map_data,
nvme_pci_setup_prps: PRP2 is the second page when the data spans exactly two pages, else a PRP
list from a dma_pool; a full list page's last entry chains to the next list page).

Per queue ``q`` (driven by vCPU ``q % vcpus``) ``queue_depth`` commands stay outstanding. A
command moves through: submitted (buffer allocated, dma_map_sg, PRPs built, SQ entry
written, doorbell) -> fetched (device reads the 64-byte SQ entry and any PRP list pages) ->
transferred (reads: media latency then data written to memory; writes: data read from memory
then the write latency) page by page at ``bandwidth_gbps`` shared by the drive -> completed
(16-byte CQ entry, MSI-X) -> reaped on the vCPU (``_reap``: dma_unmap_sg, free,
``cpu_per_io_ns``, io_done) and replaced by a new command. A vCPU busy or stalled on the
host's invalidation queue past the epoch's end reaps later (GuestContext.stalled_until): the
completion waits in its CQ while the drive goes on with the commands it holds. With ``ios``
set, the drive stops taking new commands after that many submissions (fixed work for
comparing designs).

Buffer pages (blk-mq data from the page cache or user pages) are physically scattered: each
page follows the previous one in physical memory with probability ``page_contiguity``. The
scatter list keeps one entry per page, and, as Linux's iommu_map_sg (drivers/iommu/iommu.c)
merges physically contiguous entries into one iommu_map, the driver hands ``dma_map_sg`` one
segment per physically contiguous run (``merge_contiguous``), so a 64 KiB I/O makes 13-16
iommu:map events at the default, as a real Linux 6.12 guest does, not always 16.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE, Device, GuestContext, Workload
from workloads.nic import (
    SizeSampler,
    check_fraction,
    check_positive,
    check_sizes_weights,
    schedule_at,
)

SQE_BYTES = 64            # submission queue entry (NVMe 1.4, 4.2)
CQE_BYTES = 16            # completion queue entry (NVMe 1.4, 4.6)
PRP_ENTRY_BYTES = 8       # one PRP entry (NVMe 1.4, 4.3)
PRPS_PER_LIST_PAGE = PAGE_SIZE // PRP_ENTRY_BYTES   # 512 with a 4 KiB controller page
LBA_BYTES = 512           # I/O sizes are whole 512-byte blocks
MAX_IO_BYTES = 64 << 20   # far above any real MDTS


def prp_layout(npages: int) -> tuple[int, ...]:
    """Entries the device reads from each PRP list page for an I/O of ``npages`` pages.

    Empty when PRP1 (and PRP2 as a plain page pointer) suffice, i.e. for one or two pages.
    Otherwise PRP1 holds the first page and PRP2 points to a list of the other ``npages - 1``
    entries; a list page that overflows gives its last slot to a pointer to the next list page
    (so it holds 511 data entries + the chain pointer), as nvme_pci_setup_prps builds it.
    """
    if npages <= 2:
        return ()
    left = npages - 1
    counts: list[int] = []
    while left > PRPS_PER_LIST_PAGE:
        counts.append(PRPS_PER_LIST_PAGE)        # 511 data entries + 1 chain pointer
        left -= PRPS_PER_LIST_PAGE - 1
    counts.append(left)
    return tuple(counts)


def scattered_pages(gpa: int, nbytes: int, draws: Sequence[float],
                    contiguity: float) -> list[tuple[int, int]]:
    """A scatter list of one entry per page over the buffer at ``gpa`` (contiguous GPA),
    ordered so that page i+1 follows page i physically only where ``draws[i] < contiguity``.

    Runs of pages keep their order; the runs are listed last first, so the end of one never
    meets the start of the next. The entries cover the buffer's pages exactly once.
    """
    npages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
    runs: list[list[int]] = [[0]]
    for i in range(1, npages):
        if draws[i - 1] < contiguity:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [(gpa + (i << PAGE_SHIFT), min(PAGE_SIZE, nbytes - (i << PAGE_SHIFT)))
            for run in reversed(runs) for i in run]


def merge_contiguous(sg: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge scatter-list entries that continue each other physically (a page boundary
    in between), as iommu_map_sg does before each iommu_map: one segment per run."""
    out: list[tuple[int, int]] = []
    for gpa, length in sg:
        if out and out[-1][0] + out[-1][1] == gpa and gpa % PAGE_SIZE == 0:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((gpa, length))
    return out


def scattered_segments(gpa: int, nbytes: int, draws: Sequence[float],
                       contiguity: float) -> list[tuple[int, int]]:
    """``merge_contiguous(scattered_pages(gpa, nbytes, draws, contiguity))`` in one step.

    With a page-aligned ``gpa`` every run of ``scattered_pages`` merges into one segment and
    no two runs merge (the runs are listed last first), so the segments are the runs: from
    page s up to page e (exclusive), ``(gpa + s * PAGE_SIZE, min(e * PAGE_SIZE, nbytes) -
    s * PAGE_SIZE)``, last run first. Any other ``gpa`` takes the two steps.
    """
    if gpa % PAGE_SIZE:
        return merge_contiguous(scattered_pages(gpa, nbytes, draws, contiguity))
    npages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
    if npages <= 1:
        return [(gpa, nbytes)]
    d = draws.tolist() if isinstance(draws, np.ndarray) else list(draws)
    cuts = [i for i in range(1, npages) if not d[i - 1] < contiguity]   # a run starts at i
    starts, ends = [0, *cuts], [*cuts, npages]
    return [(gpa + (s << PAGE_SHIFT), min(e << PAGE_SHIFT, nbytes) - (s << PAGE_SHIFT))
            for s, e in zip(reversed(starts), reversed(ends), strict=True)]


@dataclass
class _Command:
    q: int
    cid: int
    nbytes: int
    read: bool
    gpa: int
    segs: list[tuple[int, int]]
    pages: list[int]                    # DMA address of each data page (PRP1, then the list)
    prp_lists: list[tuple[int, int]]    # (gpa, iova) of PRP list pages
    prp_counts: tuple[int, ...]
    sqe_iova: int
    t_submit_ns: int


@dataclass
class _Queue:
    q: int
    cpu: int
    sq_iova: int = 0
    cq_iova: int = 0
    sq_tail: int = 0
    cq_head: int = 0
    outstanding: int = 0
    prp_pool: list[tuple[int, int]] = field(default_factory=list)   # free (gpa, iova)
    prp_pool_pages: int = 0


class NvmeWorkload(Workload):
    """An NVMe SSD driven closed-loop at a fixed queue depth per queue."""

    kind = "nvme"

    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        queues: int = 0                 # 0: one I/O queue pair per vCPU (as Linux)
        queue_depth: int = 32           # commands outstanding per queue
        io_sizes: tuple[int, ...] = (4096,)
        io_weights: tuple[float, ...] = (1.0,)
        read_fraction: float = 0.7
        read_latency_us: float = 80.0   # media read latency (TLC NAND class)
        write_latency_us: float = 20.0  # write into the drive's cache
        bandwidth_gbps: float = 25.0    # PCIe Gen3 x4 payload rate, about 3.2 GB/s
        cpu_per_io_ns: int = 2000       # block layer + driver completion work
        ios: int = 0                    # commands submitted in all, then stop; 0: no limit
        page_contiguity: float = 0.1    # P(a buffer page follows the previous physically)

        def validate(self) -> list[tuple[str, str]]:
            errors = check_fraction(self.rogue_fraction, "rogue_fraction")
            errors += check_fraction(self.read_fraction, "read_fraction")
            errors += check_positive(self.queues, "queues", zero_ok=True)
            errors += check_positive(self.queue_depth, "queue_depth")
            errors += check_positive(self.read_latency_us, "read_latency_us", zero_ok=True)
            errors += check_positive(self.write_latency_us, "write_latency_us", zero_ok=True)
            errors += check_positive(self.bandwidth_gbps, "bandwidth_gbps")
            errors += check_positive(self.cpu_per_io_ns, "cpu_per_io_ns", zero_ok=True)
            errors += check_positive(self.ios, "ios", zero_ok=True)
            errors += check_fraction(self.page_contiguity, "page_contiguity")
            errors += check_sizes_weights(self.io_sizes, self.io_weights, "io_sizes",
                                          "io_weights", LBA_BYTES, MAX_IO_BYTES)
            errors += [("io_sizes", f"size {s} is not a multiple of {LBA_BYTES}")
                       for s in self.io_sizes
                       if isinstance(s, int) and s > 0 and s % LBA_BYTES]
            return errors

    def __init__(self, params: NvmeWorkload.Params | None = None) -> None:
        super().__init__(params if params is not None else self.Params())
        self.queues: list[_Queue] = []
        self.dev: Device | None = None
        self.submitted = 0
        self.completed = 0
        self.prp_list_commands = 0      # commands that needed a PRP list
        self.prp_list_pages_used = 0    # list pages over all commands
        self.max_outstanding = 0
        self._busy_until: list[int] = []
        self._media_free_ns = 0         # the drive's data path is shared by all queues
        self._cid = 0

    def start(self, ctx: GuestContext) -> None:
        p = self.params
        self._sizes = SizeSampler(p.io_sizes, p.io_weights)
        self._rogue = p.rogue_fraction > 0.0     # else Workload.device_dma draws nothing
        self._read_ns = round(p.read_latency_us * 1000.0)
        self._write_ns = round(p.write_latency_us * 1000.0)
        self._page_ns = max(1, round(PAGE_SIZE * 8 / p.bandwidth_gbps))
        self.dev = ctx.add_device("nvme0")
        self._busy_until = [0] * ctx.vcpus
        # NVMe 1.4 4.1.3: a queue of N entries is full with N-1, so depth + 1 entries.
        entries = p.queue_depth + 1
        for q in range(p.queues or ctx.vcpus):
            qu = _Queue(q=q, cpu=q % ctx.vcpus)
            _, qu.sq_iova = ctx.dma_alloc_coherent(self.dev, entries * SQE_BYTES)
            _, qu.cq_iova = ctx.dma_alloc_coherent(self.dev, entries * CQE_BYTES)
            self.queues.append(qu)
        for qu in self.queues:
            for _ in range(p.queue_depth):
                schedule_at(ctx, 0, self._submit, qu.q)

    # --- host side ---------------------------------------------------------------------
    # The per-command methods inline ``schedule_at`` (``ctx.schedule(t, fn, ctx, t, ...)``)
    # and ``SizeSampler.draw``, and schedule ``ctx.device_dma`` directly when
    # ``rogue_fraction`` is 0 (``Workload.device_dma`` then draws nothing): the same guest
    # calls, random draws, event times and scheduling order as the plain versions
    # (tests/workloads/nic_nvme_plain.py, checked by test_nic_nvme_inlined.py).
    def _prp_page(self, ctx: GuestContext, qu: _Queue) -> tuple[int, int]:
        """A PRP list page from the queue's dma_pool (grown on demand, never unmapped)."""
        if qu.prp_pool:
            return qu.prp_pool.pop()
        qu.prp_pool_pages += 1
        return ctx.dma_alloc_coherent(self.dev, PAGE_SIZE)

    def _submit(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        p = self.params
        if p.ios and self.submitted >= p.ios:
            return
        qu = self.queues[q]
        cpu = qu.cpu
        busy_until = self._busy_until
        t = t_start = max(t_ns, ctx.cpu_free_at(cpu), busy_until[cpu])
        rng = ctx.rng
        sizes = self._sizes
        nbytes = sizes._sizes[bisect_right(sizes._cdf, rng.random())]   # SizeSampler.draw
        read = bool(rng.random() < p.read_fraction)
        gpa = ctx.alloc_buffer(nbytes)
        npages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        if npages > 1 or gpa % PAGE_SIZE:
            sg = scattered_segments(gpa, nbytes, rng.random(max(npages - 1, 0)),
                                    p.page_contiguity)   # merge_contiguous(scattered_pages(..))
        else:          # one page: the same [(gpa, nbytes)], rng.random(0) draws nothing
            sg = [(gpa, nbytes)]
        segs, t = ctx.dma_map_sg(cpu, self.dev, sg, DMA_FROM_DEVICE if read else DMA_TO_DEVICE,
                                 t)
        if len(segs) == 1 and segs[0][1] <= PAGE_SIZE:
            pages = [segs[0][0]]
        else:
            pages = [a for iova, length in segs
                     for a in range(iova, iova + length, PAGE_SIZE)]
        counts = prp_layout(len(pages))
        if counts:
            lists = [self._prp_page(ctx, qu) for _ in counts]
            self.prp_list_commands += 1
            self.prp_list_pages_used += len(counts)
        else:
            lists = []
        sqe = qu.sq_iova + (qu.sq_tail % (p.queue_depth + 1)) * SQE_BYTES
        qu.sq_tail += 1
        self._cid += 1
        cmd = _Command(q, self._cid, nbytes, read, gpa, segs, pages, lists, counts, sqe,
                       t_start)
        qu.outstanding += 1
        self.submitted += 1
        if qu.outstanding > self.max_outstanding:
            self.max_outstanding = qu.outstanding
        if t > busy_until[cpu]:
            busy_until[cpu] = t
        ctx.schedule(t, self._fetch, ctx, t, cmd)   # SQ tail doorbell (MMIO, no DMA)

    # --- device side -------------------------------------------------------------------
    def _fetch(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        device_dma, dev = ctx.device_dma, self.dev
        device_dma(dev, t_ns, cmd.sqe_iova, SQE_BYTES, False)
        if cmd.prp_counts:
            for (_, iova), n in zip(cmd.prp_lists, cmd.prp_counts, strict=True):
                device_dma(dev, t_ns, iova, n * PRP_ENTRY_BYTES, False)
        if cmd.read:
            t_media = t_ns + self._read_ns
            ctx.schedule(t_media, self._transfer, ctx, t_media, cmd)
        else:
            self._transfer(ctx, t_ns, cmd)

    def _transfer(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        """One device DMA event per data page, back to back at the drive's bandwidth."""
        bw = self.params.bandwidth_gbps
        t = max(t_ns, self._media_free_ns)
        page_ns = self._page_ns
        dev, read, nbytes, schedule = self.dev, cmd.read, cmd.nbytes, ctx.schedule
        if self._rogue:
            for i, addr in enumerate(cmd.pages):
                size = min(PAGE_SIZE, nbytes - (i << PAGE_SHIFT))
                # the event runs self.device_dma(ctx, dev, t, addr, size, read) at t
                schedule(t, self.device_dma, ctx, dev, t, addr, size, read)
                t += page_ns if size == PAGE_SIZE else max(1, round(size * 8 / bw))
        else:
            device_dma = ctx.device_dma
            for i, addr in enumerate(cmd.pages):
                size = min(PAGE_SIZE, nbytes - (i << PAGE_SHIFT))
                # Workload.device_dma without rogue DMA: ctx.device_dma(dev, t, addr, size, read)
                schedule(t, device_dma, dev, t, addr, size, read)
                t += page_ns if size == PAGE_SIZE else max(1, round(size * 8 / bw))
        self._media_free_ns = t
        if not read:
            t += self._write_ns
        ctx.schedule(t, self._complete, ctx, t, cmd)

    def _complete(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        p = self.params
        qu = self.queues[cmd.q]
        cqe = qu.cq_iova + (qu.cq_head % (p.queue_depth + 1)) * CQE_BYTES
        qu.cq_head += 1
        ctx.device_dma(self.dev, t_ns, cqe, CQE_BYTES, True)
        # MSI-X interrupt -> nvme_irq on the queue's vCPU: reap the completion (once the
        # vCPU can start it in this epoch; else then, in a later one)
        late = ctx.stalled_until(qu.cpu, max(t_ns, self._busy_until[qu.cpu]))
        if late:
            ctx.schedule(late, self._reap, ctx, late, cmd)
            return
        self._reap(ctx, t_ns, cmd)

    def _reap(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        """nvme_irq's handling of one completion on the queue's vCPU: unmap, free, account,
        and submit the next command (a closed loop of ``queue_depth`` per queue)."""
        p = self.params
        qu = self.queues[cmd.q]
        cpu = qu.cpu
        busy_until = self._busy_until
        t = max(t_ns, ctx.cpu_free_at(cpu), busy_until[cpu])
        direction = DMA_FROM_DEVICE if cmd.read else DMA_TO_DEVICE
        t = ctx.dma_unmap_sg(cpu, self.dev, cmd.segs, direction, t)
        ctx.free_buffer(cmd.gpa, cmd.nbytes)
        if cmd.prp_lists:
            qu.prp_pool.extend(cmd.prp_lists)
        t += p.cpu_per_io_ns
        ctx.io_done(t, cmd.nbytes, t - cmd.t_submit_ns)
        qu.outstanding -= 1
        self.completed += 1
        if t > busy_until[cpu]:
            busy_until[cpu] = t
        self._submit(ctx, t, cmd.q)
