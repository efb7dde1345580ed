"""The guest DMA API under a vIOMMU queue error (FSTS.IQE): calls fail, nothing is skipped."""

from __future__ import annotations

import numpy as np

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SIZE
from host_iommu.protocol import OP_HWPT_INV, OP_UNMAP_RET, OP_VFIO_MAP, OP_VFIO_UNMAP
from vm_agent.agent import VmAgent
from vm_agent.dma import DMA_MAPPING_ERROR
from vm_agent.viommu import VIommu
from workloads.base import DMA_FROM_DEVICE, Workload


class OneDevice(Workload):
    """A device and nothing else: the test drives the DMA API by hand."""

    kind = "one-device"

    def start(self, ctx) -> None:
        self.dev = ctx.add_device("dev0")


def make_agent(mode: str, policy: str = "strict") -> tuple[VmAgent, OneDevice]:
    wl = OneDevice(OneDevice.Params())
    a = VmAgent(1, mode=mode, policy=policy, flush_queue="percpu", vcpus=1,
                memory_bytes=64 << 20, fl_levels=4, ats=False, workload=wl, churn=None,
                costs=CostModel(), seed=0)
    a.setup()
    a.log.take()
    return a, wl


def malformed() -> np.void:
    """A descriptor of type 0xF, which no VT-d version defines."""
    d = np.zeros(1, dtype=qi.DESC_DTYPE)[0]
    d["qw0"] = 0xF
    return d


def ops_of(a: VmAgent, op: int) -> np.ndarray:
    ops = a.log.take()
    return ops[ops["op"] == op]


def test_viommu_error_stops_fetching_and_clear_resumes():
    """Descriptors written behind a malformed one wait in the queue and run once IQE clears."""
    v = VIommu(caching_mode=False)
    inv = qi.piotlb_desc(1, 0, qi.QI_GRAN_NONG_PASID)
    assert v.submit([inv, malformed(), inv]) and v.iqe and v.iqe_error.code == "unknown_type"
    assert v.submit([inv, qi.wait_desc()]) == [] and len(v.queued) == 4
    resumed = v.clear_iqe(qi.wait_desc())
    assert [c.type for c in resumed] == [qi.QI_IWD_TYPE, qi.QI_EIOTLB_TYPE, qi.QI_EIOTLB_TYPE,
                                         qi.QI_IWD_TYPE]
    assert not v.iqe and v.queued == [] and v.errors == 1 and v.fsts_writes == 1


def test_nested_strict_unmap_after_queue_error_still_reaches_the_host():
    """Issue reproducer: after one malformed descriptor, a strict unmap used to be dropped."""
    a, wl = make_agent("nested")
    a.viommu.submit([malformed()])
    assert a.viommu.iqe
    gpa = a.alloc_buffer(PAGE_SIZE)
    iova, t = a.dma_map(0, wl.dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, 0)
    exits = a.stats["vm_exits"]
    a.dma_unmap(0, wl.dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    ops = a.log.take()
    inv = ops[ops["op"] == OP_HWPT_INV]
    ret = ops[ops["op"] == OP_UNMAP_RET]
    assert len(inv) == 1 and int(inv["a0"][0]) == iova and int(inv["a3"][0]) == int(ret["a0"][0])
    assert a.stats["qi_errors"] == 1 and not a.viommu.iqe
    assert a.stats["vm_exits"] == exits + 2  # the tail write and the FSTS.IQE write
    # Later submissions work: the next unmap costs one trap and reaches the host.
    iova2, t = a.dma_map(0, wl.dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, t)
    a.dma_unmap(0, wl.dev, iova2, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert len(ops_of(a, OP_HWPT_INV)) == 1 and a.stats["qi_errors"] == 1
    assert a.stats["vm_exits"] == exits + 3


def test_shadow_map_hitting_a_queue_error_fails_and_leaves_nothing_mapped():
    """A caching-mode map whose sync hits IQE returns DMA_MAPPING_ERROR; the host is told
    about the map and about its undo, so nothing stays shadowed."""
    a, wl = make_agent("shadow")
    a.viommu.submit([malformed()])
    gpa = a.alloc_buffer(2 * PAGE_SIZE)
    iova, t = a.dma_map(0, wl.dev, gpa, 2 * PAGE_SIZE, DMA_FROM_DEVICE, 0)
    assert iova == DMA_MAPPING_ERROR
    assert a.stats["dma_map_errors"] == 1 and a.stats["qi_errors"] == 1
    ops = a.log.take()
    maps, unmaps = ops[ops["op"] == OP_VFIO_MAP], ops[ops["op"] == OP_VFIO_UNMAP]
    assert int(maps["a2"].sum()) == int(unmaps["a1"].sum()) == 2 * PAGE_SIZE
    dom = a.dma.domains[wl.dev.sid]
    assert dom.mappings == {} and list(dom.table.leaves()) == []
    assert a.vmm.shadowed[wl.dev.sid] == {}
    # The driver cleared the error: the next map succeeds and is shadowed.
    iova, t = a.dma_map(0, wl.dev, gpa, 2 * PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert iova != DMA_MAPPING_ERROR and len(ops_of(a, OP_VFIO_MAP)) == 2  # one per page
    assert a.stats["dma_map_errors"] == 1 and len(a.vmm.shadowed[wl.dev.sid]) == 2


def test_lazy_flush_after_queue_error_is_not_skipped():
    """A lazy flush that meets IQE still sends its PASID-wide invalidation."""
    a, wl = make_agent("nested", "lazy")
    gpa = a.alloc_buffer(PAGE_SIZE)
    iova, t = a.dma_map(0, wl.dev, gpa, PAGE_SIZE, DMA_FROM_DEVICE, 0)
    a.dma_unmap(0, wl.dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    a.viommu.submit([malformed()])
    ops = a.run_epoch(50_000_000)  # the flush-queue timer fires
    inv = ops[ops["op"] == OP_HWPT_INV]
    assert a.stats["lazy_flushes"] == 1 and a.stats["qi_errors"] == 1
    assert len(inv) == 1 and int(inv["a1"][0]) == (1 << 64) - 1  # everything
