"""CompiledNvmeAgent: a VmAgent whose NVMe epochs run as one compiled call.

Issue 9's "one call runs a whole VM-epoch of a workload through the guest DMA API", for the
NVMe workload as vm_agent/compiled.py does it for the NIC: the agent sets up in Python
exactly as VmAgent does (workloads/nvme.py NvmeWorkload.start: the device, the SQ/CQ rings
by dma_alloc_coherent, the first submissions scheduled), then moves the guest's hot state
into arrays (vm_agent/kernels/guest.py GuestArrays, the DMA domain through
vm_agent/kernels/dmaapi.py ``freeze``, the drive's queues, PRP list pools and commands
through vm_agent/kernels/nvme.py) and runs every epoch with ``kernels.nvme.run``: the same
events in the same (time, sequence) order making the same DMA API calls (Linux
dma-iommu.c's iommu_dma_map_sg / iommu_dma_unmap_sg over the VT-d driver, as
vm_agent/dma.py models them) and the same random draws. VmAgent stays the reference: the
result tables of a whole run are the same value for value
(tests/vm_agent/test_compiled_nvme.py, tests/system/golden.py).

Eligible: the NVMe workload with no rogue DMA, no host churn, I/Os of at most
dmaapi.MAX_PAGES pages, in a mode the compiled DMA API runs (pass-through; nested strict and
lazy; shadow, strict whatever the policy, as Linux forces it under caching mode).
CompiledNicAgent's switches hold here too (compiled.ENABLED, IOMMU_EMU_GUEST_KERNEL=0,
NUMBA_DISABLE_JIT=1), and ``ENABLED = False``
here keeps NVMe VMs alone on the Python path. Everything but the set-up of the arrays and
the loop it calls is CompiledNicAgent's (epochs, growing, receive, pickling).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from host_iommu.defs import PAGE_SIZE
from vm_agent import compiled
from vm_agent.kernels import dmaapi
from vm_agent.kernels import nvme as knvme
from workloads.nvme import NvmeWorkload

ENABLED = True          # this module's own switch (compiled.enabled() must hold too)

# (mode, policy) pairs whose compiled runs were checked equal to the Python path's
# (tests/vm_agent/test_compiled_nvme.py, test_compiled_shadow.py); "*": any policy
# (pass-through ignores it; shadow is strict under either)
MODES: tuple[tuple[str, str], ...] = (("passthrough", "*"), ("nested", "strict"),
                                      ("nested", "lazy"), ("shadow", "*"))


def _max_pages(p: NvmeWorkload.Params) -> int:
    return max(1, -(-max(p.io_sizes) // PAGE_SIZE))


def eligible(group: Any) -> bool:
    """Whether a ``[vm.<group>]`` (cluster.config.VmGroupConfig) runs on the compiled NVMe
    loop: the NVMe workload, rogue_fraction 0, no churn, I/Os of at most dmaapi.MAX_PAGES
    pages, a mode and policy in MODES, the switches on."""
    if (not ENABLED or not compiled.enabled() or group.workload.kind != NvmeWorkload.kind
            or group.churn is not None):
        return False
    p = group.workload.params
    if p.rogue_fraction != 0 or _max_pages(p) > dmaapi.MAX_PAGES:
        return False
    return any(m == group.mode and pol in ("*", group.policy) for m, pol in MODES)


def nvme_arrays(wl: NvmeWorkload, vcpus: int, rng: np.random.Generator
                ) -> knvme.NvmeArrays:
    """A started NvmeWorkload's state as NvmeArrays (its queues' pools as stacks; commands
    in flight are not taken: set-up leaves none), drawing from ``rng``."""
    p = wl.params
    nq = len(wl.queues)
    max_pages = _max_pages(p)
    max_lists = max(1, knvme.prp_lists(max_pages))
    ip = np.zeros(knvme.NP, np.int64)
    ip[knvme.P_NQ] = nq
    ip[knvme.P_QD] = p.queue_depth
    ip[knvme.P_IOS] = p.ios
    ip[knvme.P_READ_NS] = wl._read_ns
    ip[knvme.P_WRITE_NS] = wl._write_ns
    ip[knvme.P_PAGE_NS] = wl._page_ns
    ip[knvme.P_CPU_PER_IO] = p.cpu_per_io_ns
    ip[knvme.P_SID] = wl.dev.sid
    ip[knvme.P_PASID] = 0
    ip[knvme.P_MAX_PAGES] = max_pages
    ip[knvme.P_MAX_LISTS] = max_lists
    fp = np.zeros(knvme.NF, np.float64)
    fp[knvme.F_READ_FRACTION] = p.read_fraction
    fp[knvme.F_CONTIGUITY] = p.page_contiguity
    fp[knvme.F_BW] = p.bandwidth_gbps
    w = np.array([getattr(wl, n) for n in knvme.W_NAMES], np.int64)
    q = np.zeros((nq, knvme.NQF), np.int64)
    pool_cap = p.queue_depth * max_lists + max((len(qu.prp_pool) for qu in wl.queues),
                                               default=0)
    pool = np.zeros((nq, pool_cap, 2), np.int64)
    for i, qu in enumerate(wl.queues):
        if qu.outstanding:
            raise ValueError(f"queue {i}: {qu.outstanding} commands in flight")
        row = q[i]
        for col, name in enumerate(knvme.Q_NAMES):
            row[col] = getattr(qu, name)
        row[knvme.Q_POOL_N] = len(qu.prp_pool)
        row[knvme.Q_POOL_PAGES] = qu.prp_pool_pages
        for k, e in enumerate(qu.prp_pool):
            pool[i, k] = e
    slots = nq * p.queue_depth
    r = np.zeros(knvme.NR, np.int64)
    r[knvme.R_FREE_N] = slots
    return knvme.NvmeArrays(
        ip, fp, np.ascontiguousarray(wl._sizes.cdf, np.float64),
        np.array(wl._sizes._sizes, np.int64), w, np.array(wl._busy_until, np.int64), q, pool,
        np.zeros((slots, knvme.NCF), np.int64), np.zeros((slots, max_pages, 2), np.int64),
        np.zeros((slots, max_pages), np.int64), np.zeros((slots, max_lists, 3), np.int64),
        np.arange(slots - 1, -1, -1, dtype=np.int64), np.zeros((max_pages, 2), np.int64),
        np.zeros(max_pages + 1, np.int64), np.zeros((1, 2), np.int64), knvme.rng_words(rng),
        r)


def _slack(nv: knvme.NvmeArrays) -> tuple[int, int]:
    """(log rows, heap rows) one step of the loop may add at most: one DMA API call's rows
    (or a flush-queue timer's) and the device accesses of one event (the SQ entry and the
    PRP list pages read, a CQ entry or a data page written: each within a page); a step
    schedules at most a transfer's events (one per page and the completion) and a timer."""
    per_call = max(dmaapi.MAX_MAP_ROWS, dmaapi.MAX_UNMAP_ROWS,
                   getattr(dmaapi, "MAX_TIMER_ROWS", 0))
    return per_call + int(nv.p[knvme.P_MAX_LISTS]) + 3, int(nv.p[knvme.P_MAX_PAGES]) + 2


class NvmeWorkloadOnArrays(NvmeWorkload):
    """An NvmeWorkload whose counters (kernels/nvme.py W_NAMES) live in the compiled loop's
    array ``_w`` (compiled.counters_in_array): a CompiledNvmeAgent's workload once frozen."""


compiled.counters_in_array(NvmeWorkloadOnArrays, knvme.W_NAMES)


class CompiledNvmeAgent(compiled.CompiledNicAgent):
    """A VmAgent (same constructor, interface and results) whose NVMe epochs run compiled.

    ``setup()``, ``run_epoch``, ``receive`` and the growing of the arrays are
    CompiledNicAgent's; ``freeze`` here builds the arrays of the NVMe workload, which sit
    where CompiledNicAgent's loop keeps its workload's (``self.nic``: NvmeArrays here), and
    ``_loop`` names the NVMe loop.
    """

    _loop = staticmethod(knvme.run)
    _epoch = staticmethod(knvme.epoch)
    _workload_on_arrays = NvmeWorkloadOnArrays

    def freeze(self) -> None:
        """Move the guest's state after set-up into arrays (the Python objects are left
        as they are and no longer used)."""
        wl = self.workload
        for _t, _seq, fn, _args in self._events:
            if fn.__name__ not in ("_submit", "_on_timer") or getattr(
                    fn, "__self__", None) not in (wl, self.dma):
                raise ValueError(f"compiled NVMe loop: no event kind for {fn!r}")
        nv = nvme_arrays(wl, self.vcpus, self.rng)   # both copy and check (ValueError): nothing
        self.d = dmaapi.freeze(self)           # of the agent changed before this line
        self.nic = nv
        self._freeze_guest(_slack(nv), knvme.KIND_OF, knvme.K_FQ_TIMER)


def warm_up() -> None:
    """Compile (or load from numba's cache) the compiled NVMe loop once: a tiny nested lazy
    NVMe VM with PRP-list I/Os run for two epochs (the array types are the same in every
    mode, so the one signature serves pass-through and nested strict too)."""
    from host_iommu.costs import CostModel
    from host_iommu.protocol import EpochReport

    wl = NvmeWorkload(NvmeWorkload.Params(queue_depth=2, io_sizes=(4096, 65536),
                                          io_weights=(0.5, 0.5), read_latency_us=1.0))
    a = CompiledNvmeAgent(0, mode="nested", policy="lazy", flush_queue="percpu", vcpus=1,
                          memory_bytes=16 << 20, fl_levels=4, ats=False, workload=wl,
                          churn=None, costs=CostModel(), seed=0)
    a.setup()
    a.run_epoch(20_000)
    a.receive(EpochReport(0, {}, [], [(0, 0, 1)]))
    a.run_epoch_frame(40_000)              # the NVMe loop with the frame (_epoch)
