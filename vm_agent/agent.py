"""VmAgent: one guest (vCPUs, memory, IOMMU driver, vIOMMU, VMM) running its workload.

The guest side of one VM as a plain object that knows nothing of Ray: it implements the
GuestContext that workloads drive (workloads/base.py), runs its discrete events up to the end of
each epoch of virtual time, and hands back the epoch's host operations (host_iommu/protocol.py)
as one numpy batch: one call per VM per epoch. Events are ordered by (time, sequence), so a run
is a pure function of the VM's config and seed.

vCPU time. A call on a vCPU starts at max(its event's time, the vCPU's busy time). A strict
unmap returns only when its wait descriptor completed on the host's shared invalidation
queue (Linux drivers/iommu/intel/dmar.c qi_submit_sync; QEMU hw/i386/intel_iommu.c
vtd_process_inv_desc, or the VFIO/iommufd path, completes it inside the VM exit): the host
reports how much later than the guest's modelled return that was, and ``receive`` stalls
the vCPU for it in full from the next epoch. A vCPU busy or stalled past an epoch's end
issues nothing more in that epoch: an event handler doing vCPU work asks
``stalled_until`` and, if so, schedules itself at the time the vCPU is free. So the guests
of an oversubscribed queue slow down to its rate (their devices' rings fill, packets drop,
commands wait), and no vCPU work starts in an epoch it does not belong to. Approximated: the
stall lands one epoch late (the host reports after the guest ran the epoch), and a call
that starts before an epoch's end runs whole (a NAPI poll of a full budget may run past it).
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from host_iommu.costs import CostModel
from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    MAX_PASID,
    NO_PASID,
    PAGE_SHIFT,
    PAGE_SIZE,
    sid_of,
)
from host_iommu.pgtable import PageTable
from host_iommu.protocol import (
    DMA_ROGUE,
    OP_DMA,
    OP_GUEST_WRITE,
    OP_SL_MAP,
    OP_SL_UNMAP,
    EpochReport,
    OpLog,
    VmSetup,
    pack_ops,
)
from vm_agent.dma import DmaApi, DmaError, IommuDomain, domain_key
from vm_agent.flushq import DEFAULT_HZ
from vm_agent.memory import GuestMemory, GuestTableStore
from vm_agent.viommu import VIommu
from vm_agent.vmm import VMMS
from workloads.base import Device, Workload

# A first-level entry's address field, bits 51:12 (x86-64 paging; VT-d spec 9.7).
TABLE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)

GUEST_COUNTERS = ("maps", "unmaps", "vm_exits", "vmm_map_calls", "vmm_unmap_calls",
                  "vmm_invalidate_calls", "inv_descriptors", "pte_writes",
                  "ios", "bytes", "io_latency_sum_ns", "cpu_busy_ns", "dma_requests",
                  "rogue_dma", "lazy_flushes", "iommu_map_events", "dma_api_errors",
                  "guest_faults_reported", "balloon_pages", "qi_errors", "dma_map_errors",
                  "unmap_qi_wait_ns")


def stall_per_vcpu(waits: list[tuple[int, int, int]], vcpus: int) -> list[int]:
    """The stall to charge each vCPU for an epoch's reported unmap waits (unmap id, vCPU,
    ns): the largest wait of its unmaps (VmAgent.receive says why not the sum)."""
    stall = [0] * vcpus
    for _unmap_id, cpu, wait_ns in waits:
        c = cpu % vcpus
        if wait_ns > stall[c]:
            stall[c] = wait_ns
    return stall


@dataclass(frozen=True, slots=True)
class PasidDevice(Device):
    """A device's requests tagged with one PASID (a PASID-tagged queue), with its own domain."""

    pasid: int = NO_PASID


class VmAgent:
    """One guest. ``setup()`` once, then ``run_epoch(t_end)`` / ``receive(report)`` per epoch."""

    def __init__(self, vm: int, *, mode: str, policy: str, flush_queue: str, vcpus: int,
                 memory_bytes: int, fl_levels: int, ats: bool, workload: Workload,
                 churn: Any | None, costs: CostModel, seed: int, bus: int | None = None,
                 stream: int | None = None, hz: int = DEFAULT_HZ) -> None:
        self.vm = vm
        self.mode = mode
        self.policy = policy
        self.vcpus = vcpus
        self.memory_bytes = memory_bytes
        self.fl_levels = fl_levels
        self.ats = ats
        self.workload = workload
        self.churn = churn
        self.costs = costs
        self.flush_queue_per_cpu = flush_queue == "percpu"
        self.hz = hz                  # the guest kernel's CONFIG_HZ: the flush-queue timer ticks
        # Random stream per (seed, index in group): VM k of every group sees the same arrivals,
        # so designs are compared on common random numbers.
        self.rng = np.random.default_rng([seed, vm if stream is None else stream])
        self.bus = vm if bus is None else bus
        self.log = OpLog(vm)
        self.stats: dict[str, int] = dict.fromkeys(GUEST_COUNTERS, 0)
        self.mem = GuestMemory(memory_bytes >> PAGE_SHIFT)
        self.viommu = VIommu(caching_mode=(mode == "shadow"))
        self.vmm = VMMS[mode](self.log, costs, self.stats)
        self.dma = DmaApi(mode=mode, costs=costs, log=self.log, vmm=self.vmm, viommu=self.viommu,
                          stats=self.stats, schedule=self.schedule, ats=ats)
        self.devices: list[Device] = []
        self.pasid_devices: list[PasidDevice] = []   # PASIDs besides 0, in creation order
        self.busy_until = [0] * vcpus
        self._events: list[tuple[int, int, Callable[..., None], tuple]] = []
        self._event_seq = itertools.count()   # ties in time run in scheduling order
        self.now = 0
        self.host_counters: dict[str, int] = {}
        self.epoch_faults: list[tuple] = []
        self.epoch_ns = 0                    # length of the last epoch run
        self.t_end = 1 << 62                 # end of the epoch being run (set-up: none)
        self._made: dict[int, list[int]] = {}  # table GPA -> seqs of its creation stores

    # --- set-up --------------------------------------------------------------------------
    def setup(self) -> VmSetup:
        """Start the workload (creating devices and rings); the host-side set-up message."""
        self.workload.start(self)
        if self.churn is not None:
            self.churn.start(self)
        roots = tuple(self.dma.domains[d.sid].table.root for d in self.devices) \
            if self.mode == "nested" else ()
        more = tuple(x for d in self.pasid_devices
                     for x in (d.sid, d.pasid, self.dma.domains[domain_key(d)].table.root))
        return VmSetup(self.vm, self.memory_bytes, self.mode, tuple(d.sid for d in self.devices),
                       self.ats, self.fl_levels, roots, more)

    def add_device(self, name: str, ats: bool = False) -> Device:
        dev = Device(sid_of(self.bus, len(self.devices), 0), name, ats or self.ats)
        self.devices.append(dev)
        self._add_domain(dev)
        return dev

    def add_pasid(self, dev: Device, pasid: int) -> PasidDevice:
        """A PASID of ``dev`` with its own DMA domain and first-level table (nested only).

        As a guest driver with PASID-tagged queues attaches a domain per PASID
        (iommu_attach_device_pasid; Linux intel_pasid_setup_first_level for each): the
        requests it tags carry the PASID, and the VMM binds each first level over the VM's
        one second level. Needs scalable mode with a first level: DmaError otherwise.
        """
        if self.mode != "nested":
            raise DmaError(f"PASID {pasid} of {dev.name}: PASID-tagged DMA needs the nested "
                           f"(scalable-mode first level) vIOMMU, not {self.mode}")
        if not 0 < pasid <= MAX_PASID or any(
                d.sid == dev.sid and d.pasid == pasid for d in self.pasid_devices):
            raise DmaError(f"PASID {pasid} of {dev.name} is taken or outside 1..{MAX_PASID}")
        pdev = PasidDevice(dev.sid, f"{dev.name}.pasid{pasid}", dev.ats, pasid)
        self.pasid_devices.append(pdev)
        self._add_domain(pdev)
        return pdev

    def _add_domain(self, dev: Device) -> None:
        table = None
        if self.mode != "passthrough":
            store = GuestTableStore(self.mem)
            if self.mode == "nested":
                store.on_write = functools.partial(self._log_table_store, store)
                store.on_writes = functools.partial(self._log_table_stores, store)
            fmt, levels = ("fl", self.fl_levels) if self.mode == "nested" else ("sl", 4)
            table = PageTable(store, fmt, levels, max_order=0)
        lazy = self.policy == "lazy" and self.mode == "nested"
        dom = IommuDomain(dev.sid, self.mode, table, self.vcpus, lazy,
                          per_cpu_fq=self.flush_queue_per_cpu, hz=self.hz)
        dom.pasid = getattr(dev, "pasid", NO_PASID)
        self.dma.add_domain(dom)

    def _log_table_store(self, store: GuestTableStore, gpa: int, value: int) -> None:
        """Nested: the guest's first-level stores reach the host's copy of its memory.

        Causality across vCPUs: a call on a busy vCPU runs (here) before a later call on an
        idle vCPU but is stamped at its busy time. If the idle vCPU then stores into a table
        page the busy one created, that page's creation (its zeroing and the store linking
        it into its parent) must reach the host no later than the store that depends on it:
        on Linux the first vCPU to need the table installs it (pfn_to_dma_pte's cmpxchg).
        So those creation stores take the earlier time stamp, up the table path.
        """
        page = gpa & ~(PAGE_SIZE - 1)
        self._made_by(page, store.now)
        self.log.add(store.now, OP_GUEST_WRITE, a0=gpa, a1=value)
        row = self.log.seq - 1      # the store's sequence number
        target = value & TABLE_ADDR_MASK
        if store.zeroing == page:
            self._made.setdefault(page, []).append(row)
        elif value & 1 and target != page and target in store.pages:
            self._made.setdefault(target, []).append(row)

    def _log_table_stores(self, store: GuestTableStore, pairs: list[int]) -> None:
        """``_log_table_store`` of each store of a compiled run (``pairs``: flat gpa, value,
        in store order), in one call: the same rows, sequence numbers and creation marks."""
        log = self.log
        rows = log.rows
        now = store.now
        made = self._made
        zeroing = store.zeroing
        pages = store.pages
        for i in range(0, len(pairs), 2):
            gpa = pairs[i]
            value = pairs[i + 1]
            page = gpa & ~(PAGE_SIZE - 1)
            if made and made.get(page):
                self._made_by(page, now)
            rows.extend((now, OP_GUEST_WRITE, 0, 0, gpa, value, 0, -1))   # log.add's row
            if zeroing == page:
                made.setdefault(page, []).append(log.seq0 + len(rows) // log.ROW - 1)
            elif value & 1:
                target = value & TABLE_ADDR_MASK
                if target != page and target in pages:
                    made.setdefault(target, []).append(log.seq0 + len(rows) // log.ROW - 1)

    def _made_by(self, page: int, t_ns: int) -> None:
        """Move the creation stores of table ``page`` (this epoch's) to ``t_ns`` if later.

        ``_made`` holds the stores' sequence numbers; a store the log has handed over
        already (before its sequence number ``seq0``) is left as sent.
        """
        seqs = self._made.get(page)
        if not seqs:
            return
        log = self.log
        ops, step, seq0 = log.rows, log.ROW, log.seq0
        late = [step * (s - seq0) for s in seqs
                if s >= seq0 and ops[step * (s - seq0) + log.T_NS] > t_ns]
        for i in late:
            ops[i + log.T_NS] = t_ns
        for i in late:
            parent = int(ops[i + log.A0]) & ~(PAGE_SIZE - 1)
            if parent != page:
                self._made_by(parent, t_ns)

    # --- events and vCPUs ----------------------------------------------------------------
    def schedule(self, t_ns: int, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (int(t_ns), next(self._event_seq), fn, args))

    def cpu_free_at(self, cpu: int) -> int:
        return self.busy_until[cpu % self.vcpus]

    def stalled_until(self, cpu: int, t_ns: int) -> int:
        """0 when vCPU ``cpu`` can start work at ``t_ns`` within the epoch being run; else
        the time it can (``max(t_ns, its busy time)``, at or after the epoch's end): the
        caller schedules the work then and does nothing now (workloads/base.py
        GuestContext.stalled_until)."""
        start = max(t_ns, self.busy_until[cpu % self.vcpus])
        return start if start >= self.t_end else 0

    def _start(self, cpu: int, t_ns: int) -> int:
        return max(int(t_ns), self.busy_until[cpu % self.vcpus])

    def _finish(self, cpu: int, t0: int, t1: int) -> int:
        self.busy_until[cpu % self.vcpus] = t1
        self.stats["cpu_busy_ns"] += t1 - t0
        return t1

    def run_epoch(self, t_end_ns: int) -> np.ndarray:
        """Run every event before ``t_end_ns``; return the epoch's host operations."""
        ev = self._events
        self.epoch_ns = t_end_ns - self.now
        self.t_end = t_end_ns
        while ev and ev[0][0] < t_end_ns:
            t, _s, fn, args = heapq.heappop(ev)
            self.now = t
            fn(*args)
        self.now = t_end_ns
        self._made.clear()  # creation stores already sent are ordered by the epoch
        self.dma.log_retired(t_end_ns)
        return self.log.take()

    def run_epoch_frame(self, t_end_ns: int) -> bytes:
        """``run_epoch``'s batch as the frame a transport sends (protocol.pack_ops)."""
        return pack_ops(self.run_epoch(t_end_ns))

    def receive(self, report: EpochReport) -> None:
        """Host counters, the faults reported to this guest's vIOMMU, and how much longer its
        strict unmaps' wait descriptors took on the host's shared queue, for the epoch.

        A strict unmap returns only when its wait descriptor completed (Linux dmar.c
        qi_submit_sync spins; under a vIOMMU the vCPU stays in the VM exit meanwhile), so
        the vCPU's later work is shifted by that excess. With shift D before an unmap of
        excess w, the unmap is submitted D later; on a backlogged queue it still completes
        at the same time, so the vCPU returns max(D, w) late: D' = max(D, w). The stall
        charged to a vCPU for the epoch is therefore the largest excess among its unmaps,
        not their sum (a saturated queue would otherwise be counted once per unmap queued
        behind the same backlog). It is charged in full, from the start of the next epoch
        (or the vCPU's busy time if later): the vCPU issues nothing meanwhile, since its
        work that cannot start before an epoch's end waits for a later epoch
        (``stalled_until``). The oracle uses the host's real completion regardless.
        """
        self.host_counters = report.counters
        self.stats["guest_faults_reported"] += len(report.faults)
        self.epoch_faults = report.faults
        stall = stall_per_vcpu(report.unmap_waits, self.vcpus)
        self.stats["unmap_qi_wait_ns"] += sum(w for _u, _c, w in report.unmap_waits)
        for cpu, d in enumerate(stall):
            if d:
                t0 = max(self.busy_until[cpu], self.now)
                self._finish(cpu, t0, t0 + d)

    # --- guest memory ---------------------------------------------------------------------
    def alloc_buffer(self, size: int) -> int:
        return self.mem.alloc(max(1, -(-size // PAGE_SIZE)))

    def free_buffer(self, gpa: int, size: int) -> None:
        self.mem.free(gpa, max(1, -(-size // PAGE_SIZE)))

    # --- DMA API --------------------------------------------------------------------------
    def dma_alloc_coherent(self, dev: Device, size: int) -> tuple[int, int]:
        """Allocate and map a coherent buffer (vCPU 0's rcache) at the current event time."""
        gpa = self.alloc_buffer(size)
        segs, _t = self.dma.map_segments(0, domain_key(dev), [(gpa, size)], 0, self.now)
        return gpa, segs[0][0]

    def dma_map(self, cpu: int, dev: Device, gpa: int, size: int, direction: int,
                t_ns: int) -> tuple[int, int]:
        # _start and _finish, inlined (a call per packet)
        c = cpu % self.vcpus
        t0 = max(int(t_ns), self.busy_until[c])
        segs, t1 = self.dma.map_segments(cpu, domain_key(dev), [(gpa, size)], direction, t0)
        self.busy_until[c] = t1
        self.stats["cpu_busy_ns"] += t1 - t0
        return segs[0][0], t1

    def dma_unmap(self, cpu: int, dev: Device, iova: int, size: int, direction: int,
                  t_ns: int) -> int:
        c = cpu % self.vcpus
        t0 = max(int(t_ns), self.busy_until[c])
        t1 = self.dma.unmap_range(cpu, domain_key(dev), iova, t0)
        self.busy_until[c] = t1
        self.stats["cpu_busy_ns"] += t1 - t0
        return t1

    def dma_map_sg(self, cpu: int, dev: Device, sg: list[tuple[int, int]], direction: int,
                   t_ns: int) -> tuple[list[tuple[int, int]], int]:
        t0 = self._start(cpu, t_ns)
        segs, t1 = self.dma.map_segments(cpu, domain_key(dev), sg, direction, t0)
        return segs, self._finish(cpu, t0, t1)

    def dma_unmap_sg(self, cpu: int, dev: Device, segs: list[tuple[int, int]], direction: int,
                     t_ns: int) -> int:
        t0 = self._start(cpu, t_ns)
        return self._finish(cpu, t0, self.dma.unmap_range(cpu, domain_key(dev), segs[0][0],
                                                          t0))

    # --- the device side -----------------------------------------------------------------
    def device_dma(self, dev: Device, t_ns: int, iova: int, size: int, write: bool,
                   rogue: bool = False) -> None:
        """One OP_DMA request per page the access touches, each tagged with the unmap that
        last covered its page (the oracle's window; -1 while mapped)."""
        flags = (ACCESS_WRITE if write else ACCESS_READ) | (DMA_ROGUE if rogue else 0)
        pasid = getattr(dev, "pasid", NO_PASID)
        key = domain_key(dev)
        unmap_tag = self.dma.unmap_tag
        rows = self.log.rows       # OpLog's flat rows: t_ns, op, sid, pasid, a0, a1, a2, a3
        t = int(t_ns)
        end = iova + max(1, size)
        if iova >> PAGE_SHIFT == (end - 1) >> PAGE_SHIFT:     # within one page: one request
            rows.extend((t, OP_DMA, dev.sid, pasid, iova & 0xFFFF_FFFF_FFFF_FFFF, end - iova,
                         flags, unmap_tag(key, iova >> PAGE_SHIFT)))
            pages = 1
        else:
            addr = iova
            pages = 0
            while addr < end:
                nxt = min(end, (addr | (PAGE_SIZE - 1)) + 1)
                rows.extend((t, OP_DMA, dev.sid, pasid, addr & 0xFFFF_FFFF_FFFF_FFFF,
                             nxt - addr, flags, unmap_tag(key, addr >> PAGE_SHIFT)))
                pages += 1
                addr = nxt
        stats = self.stats
        stats["dma_requests"] += pages
        if rogue:
            stats["rogue_dma"] += pages   # per page request, as the host classifies them

    def last_unmapped(self, dev: Device) -> int | None:
        return self.dma.last_unmapped.get(domain_key(dev))

    def io_done(self, t_ns: int, nbytes: int, latency_ns: int) -> None:
        self.stats["ios"] += 1
        self.stats["bytes"] += int(nbytes)
        self.stats["io_latency_sum_ns"] += int(latency_ns)

    # --- host second-level churn ------------------------------------------------------------
    def balloon_inflate(self, t_ns: int, npages: int) -> int:
        frames = self.mem.balloon_take(npages)
        for f in frames:
            self.log.add(int(t_ns), OP_SL_UNMAP, a0=f << PAGE_SHIFT, a1=1)
        self.stats["balloon_pages"] += len(frames)
        return len(frames)

    def balloon_deflate(self, t_ns: int, npages: int) -> int:
        frames = self.mem.balloon_return(npages)
        for f in frames:
            self.log.add(int(t_ns), OP_SL_MAP, a0=f << PAGE_SHIFT, a1=1)
        return len(frames)

    def unplug(self, t_ns: int, npages: int) -> int:
        return self.balloon_inflate(t_ns, npages)
