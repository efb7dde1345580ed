"""The guest's DMA API and IOMMU driver as numba functions, for the whole-VM-epoch kernel.

What vm_agent/agent.py (VmAgent.dma_map / dma_unmap), vm_agent/dma.py (DmaApi) and
vm_agent/vmm.py (PassthroughVmm, NestedVmm) do for one device's domain, compiled: Linux
drivers/iommu/dma-iommu.c (iommu_dma_map_page, __iommu_dma_unmap, queue_iova) over
drivers/iommu/intel/iommu.c's first-level tables and QEMU's nested intel-iommu, whose
trapped PASID-based invalidations (VT-d spec 6.5.2.4) become IOMMU_HWPT_INVALIDATE rows of
the op log. Pass-through is dma-direct (the DMA address is the GPA).

The Python classes stay the reference; these functions make the same calls in the same
order on array state, so stats, op-log rows (and their order and times), IOVAs, page-table
stores and flush-queue behaviour are the same value for value
(tests/vm_agent/test_kernel_dmaapi.py runs both side by side).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from vm_agent.agent import GUEST_COUNTERS

DIRECT_CALL_NS = 40            # vm_agent/dma.py: dma-direct map/unmap

# --- stats slots: vm_agent.agent.GUEST_COUNTERS in order (the contract with guest.py)
S_MAPS = GUEST_COUNTERS.index("maps")
S_UNMAPS = GUEST_COUNTERS.index("unmaps")
S_CPU_BUSY_NS = GUEST_COUNTERS.index("cpu_busy_ns")

# --- d.ctl slots
D_MODE = 0            # MODE_PASSTHROUGH or MODE_NESTED
D_TIMER_NS = 1        # a flush-queue timer dma_unmap armed: its deadline (-1: none)
D_TIMER_CPU = 2       # ... and the vCPU whose unmap armed it
D_LAST_UNMAPPED = 3   # DmaApi.last_unmapped of the domain (-1: none yet)
D_LEN = 4

MODE_PASSTHROUGH = 0
MODE_NESTED = 1

# --- d.costs slots (host_iommu.costs.CostModel fields)
COST_FIELDS = ("dma_call_ns",)
K_DMA_CALL = 0

MAX_MAP_ROWS = 0      # op-log rows one dma_map may append (pass-through: none)
MAX_UNMAP_ROWS = 0    # op-log rows one dma_unmap may append


class DomainArrays(NamedTuple):
    """One device's DMA domain and the DMA API's bookkeeping for it, as arrays."""

    ctl: np.ndarray      # int64[D_LEN]: D_* scalars
    costs: np.ndarray    # int64[len(COST_FIELDS)]


@njit(cache=True)
def dma_map(g, d, cpu, gpa, size, direction, t):
    """VmAgent.dma_map: (iova, t1); the vCPU is busy from max(t, its busy time) to t1."""
    busy = g.busy
    c = cpu % busy.shape[0]
    t0 = max(t, busy[c])
    g.stats[S_MAPS] += 1
    t1 = t0 + d.costs[K_DMA_CALL] + DIRECT_CALL_NS
    busy[c] = t1
    g.stats[S_CPU_BUSY_NS] += t1 - t0
    return gpa, t1


@njit(cache=True)
def dma_unmap(g, d, cpu, iova, size, direction, t):
    """VmAgent.dma_unmap: t1; the vCPU is busy from max(t, its busy time) to t1."""
    busy = g.busy
    c = cpu % busy.shape[0]
    t0 = max(t, busy[c])
    g.stats[S_UNMAPS] += 1
    d.ctl[D_LAST_UNMAPPED] = iova
    t1 = t0 + d.costs[K_DMA_CALL] + DIRECT_CALL_NS
    busy[c] = t1
    g.stats[S_CPU_BUSY_NS] += t1 - t0
    return t1


@njit(cache=True)
def fq_timer(g, d, cpu):
    """DmaApi._on_timer (pass-through has no flush queue)."""
    return


@njit(cache=True)
def unmap_tag(g, d, page):
    """DmaApi.unmap_tag: -1 while the page is mapped (always, under pass-through)."""
    return -1


@njit(cache=True)
def end_epoch(g, d, t_end):
    """VmAgent.run_epoch's end: ``_made.clear()`` and ``dma.log_retired(t_end)``."""
    return


def freeze(agent) -> DomainArrays:
    """The DomainArrays of ``agent``'s one domain (after setup())."""
    if agent.mode != "passthrough":
        raise ValueError(f"compiled DMA API: mode {agent.mode!r} not supported yet")
    last = agent.dma.last_unmapped
    if len(last) > 1:
        raise ValueError("compiled DMA API: one device only")
    ctl = np.zeros(D_LEN, np.int64)
    ctl[D_MODE] = MODE_PASSTHROUGH
    ctl[D_TIMER_NS] = -1
    ctl[D_LAST_UNMAPPED] = next(iter(last.values())) if last else -1
    costs = np.array([getattr(agent.costs, f) for f in COST_FIELDS], np.int64)
    return DomainArrays(ctl, costs)


def stale_bound_ns(d: DomainArrays) -> int:
    """DmaApi.stale_bound_ns."""
    return 0
