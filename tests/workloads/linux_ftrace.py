"""Writes ftrace text as a Linux 6.12 guest prints it, with the ground truth of every call.

Line layout and event messages follow kernel/trace/trace_output.c ("%16s-%-7d [%03d] %s
%5lu.%06lu: %s: ") and include/trace/events/{iommu,dma,intel_iommu}.h; the order of the lines
of one call follows kernel/dma/mapping.c of Linux 6.12 (dma_map_page / dma_map_sg after their
iommu:map lines, dma_unmap_sg before its iommu:unmap line, dma_unmap_page after it) and the
caching-mode driver (a cache_tag flush and a qi_submit after each map call and each unmap).
The test models share no code with workloads/ftrace.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Call:
    """One DMA API call of one device: what a correct import must reproduce."""

    dev: str
    kind: str                               # "map" or "unmap"
    pieces: list[tuple[int, int, int]]      # (iova, paddr, size) of its iommu events
    visible: bool = True                    # False: lost by the tracer


@dataclass
class Ftrace:
    """Text lines plus the calls they show, in time order."""

    lines: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    t_us: int = 7_000_000

    _out: list[tuple[str, int, str, str, str]] = field(default_factory=list)

    def _line(self, task: str, cpu: int, flags: str, event: str, msg: str) -> None:
        self._out.append((task, cpu, flags, event, msg))

    def emit(self, *groups: list[tuple[str, int, str, str, str]]) -> None:
        """Print the lines of several calls running at once (on different CPUs or
        contexts), interleaved line by line, each with the next timestamp."""
        groups = [list(g) for g in groups]
        while any(groups):
            for g in groups:
                if g:
                    task, cpu, flags, event, msg = g.pop(0)
                    self.t_us += 3
                    sec, usec = divmod(self.t_us, 1_000_000)
                    self.lines.append(f"{task:>16}-{cpu * 100 + 12:<7} [{cpu:03d}] {flags} "
                                      f"{sec:5d}.{usec:06d}: {event}: {msg}")

    def call(self, method: str, *args: object, **kwargs: object
             ) -> list[tuple[str, int, str, str, str]]:
        """The lines of one call, not yet printed (pass them to ``emit``)."""
        getattr(self, method)(*args, **kwargs)
        out, self._out = self._out, []
        return out

    def header(self) -> None:
        self.lines += ["# tracer: nop", "#",
                       "# entries-in-buffer/entries-written: 4096/5210   #P:2", "#",
                       "#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION",
                       "#              | |         |   |||||     |         |"]

    def lost(self, cpu: int, n: int) -> None:
        self.lines.append(f"CPU:{cpu} [LOST {n} EVENTS]")

    def map_page(self, dev: str, did: int, cpu: int, ctx: str, iova: int, paddr: int,
                 size: int, offset: int = 0, direction: str = "FROM_DEVICE",
                 print_it: bool = True) -> None:
        """dma_map_page of one page-aligned piece (dma_addr carries the buffer's offset)."""
        self.calls.append(Call(dev, "map", [(iova, paddr, size)], print_it))
        if not print_it:
            return
        task, fl = ("<idle>", "..s1.") if ctx == "s" else ("kworker/u8:0", ".....")
        self._line(task, cpu, fl, "map", f"IOMMU: iova=0x{iova:016x} - 0x{iova + size:016x} "
                   f"paddr=0x{paddr:016x} size={size}")
        self._line(task, cpu, "d." + fl[2] + "2.", "cache_tag_flush_range_np",
                   f"dmar0 dmar0[0] type iotlb did {did} [0x{iova:x}-0x{iova + size - 1:x}] "
                   f"addr 0x{iova:x} pages 0x{size >> 12:x} mask 0x0")
        self._line(task, cpu, "d." + fl[2] + "3.", "qi_submit",
                   f"iotlb_inv dmar0: 0x{did:x}00f2 0x{iova:x} 0x0 0x0")
        self._line(task, cpu, fl, "dma_map_page",
                   f"{dev} dir={direction} dma_addr={iova + offset:x} size={size - offset} "
                   f"phys_addr={paddr + offset:x} attrs=")

    def unmap_page(self, dev: str, did: int, cpu: int, iova: int, size: int,
                   offset: int = 0, direction: str = "FROM_DEVICE",
                   print_it: bool = True) -> None:
        """dma_unmap_page from a hardirq: iommu:unmap, the flush, then dma_unmap_page."""
        self.calls.append(Call(dev, "unmap", [(iova, 0, size)], print_it))
        if not print_it:
            return
        self._line("<idle>", cpu, "d.h1.", "unmap", f"IOMMU: iova=0x{iova:016x} - "
                   f"0x{iova + size:016x} size={size} unmapped_size={size}")
        self._line("<idle>", cpu, "d.h2.", "cache_tag_flush_range",
                   f"dmar0 dmar0[0] type iotlb did {did} [0x{iova:x}-0x{iova + size - 1:x}] "
                   f"addr 0x{iova:x} pages 0x{size >> 12:x} mask 0x0")
        self._line("<idle>", cpu, "d.h3.", "qi_submit",
                   f"iotlb_inv dmar0: 0x{did:x}00f2 0x{iova | 0x40:x} 0x0 0x0")
        self._line("<idle>", cpu, "d.h1.", "dma_unmap_page",
                   f"{dev} dir={direction} dma_addr={iova + offset:x} size={size - offset} "
                   f"attrs=")

    def map_sg(self, dev: str, did: int, cpu: int, iova: int, paddrs: list[int]) -> None:
        """dma_map_sg of 4 KiB pages: one iommu:map per physically contiguous run."""
        runs: list[list[int]] = []
        for p in paddrs:
            if runs and runs[-1][-1] + 4096 == p:
                runs[-1].append(p)
            else:
                runs.append([p])
        pieces, at = [], iova
        for run in runs:
            pieces.append((at, run[0], 4096 * len(run)))
            at += 4096 * len(run)
        self.calls.append(Call(dev, "map", pieces))
        for a, p, n in pieces:
            self._line("dd", cpu, ".....", "map",
                       f"IOMMU: iova=0x{a:016x} - 0x{a + n:016x} paddr=0x{p:016x} size={n}")
        total = 4096 * len(paddrs)
        self._line("dd", cpu, "d..1.", "cache_tag_flush_range_np",
                   f"dmar0 dmar0[0] type iotlb did {did} [0x{iova:x}-0x{iova + total - 1:x}] "
                   f"addr 0x{iova:x} pages 0x{total >> 12:x} mask 0x4")
        self._line("dd", cpu, "d..2.", "qi_submit",
                   f"iotlb_inv dmar0: 0x{did:x}00f2 0x{iova | 4:x} 0x0 0x0")
        phys = ",".join(f"0x{p:x}" for p in paddrs)
        self._line("dd", cpu, ".....", "dma_map_sg",
                   f"{dev} dir=FROM_DEVICE nents={len(paddrs)}/{len(paddrs)} ents=1/1 "
                   f"dma_addrs={{0x{iova:x}}} sizes={{0x{total:x}}} phys_addrs={{{phys}}} "
                   f"attrs=NO_WARN")

    def unmap_sg(self, dev: str, did: int, cpu: int, iova: int, paddrs: list[int]) -> None:
        """dma_unmap_sg from the completion interrupt: the dma:* line first, then one
        iommu:unmap for the whole range."""
        total = 4096 * len(paddrs)
        self.calls.append(Call(dev, "unmap", [(iova, 0, total)]))
        phys = ",".join(f"0x{p:x}" for p in paddrs)
        self._line("<idle>", cpu, "d.h1.", "dma_unmap_sg",
                   f"{dev} dir=FROM_DEVICE phys_addrs={{{phys}}} attrs=")
        self._line("<idle>", cpu, "d.h1.", "unmap", f"IOMMU: iova=0x{iova:016x} - "
                   f"0x{iova + total:016x} size={total} unmapped_size={total}")
        self._line("<idle>", cpu, "d.h2.", "cache_tag_flush_range",
                   f"dmar0 dmar0[0] type iotlb did {did} [0x{iova:x}-0x{iova + total - 1:x}] "
                   f"addr 0x{iova:x} pages 0x{total >> 12:x} mask 0x4")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
