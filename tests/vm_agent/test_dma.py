"""The guest DMA API (vm_agent/dma.py): which invalidations each call queues and what reaches
the host, per mode and policy, as Linux dma-iommu.c and the VT-d driver would do them."""

from __future__ import annotations

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.invalidate import ALL_PAGES
from host_iommu.protocol import OP_HWPT_INV, OP_UNMAP_RET, OP_VFIO_MAP, OP_VFIO_UNMAP
from tests.vm_agent.test_agent import agent
from vm_agent.flushq import (
    DEFAULT_HZ,
    IOVA_DEFAULT_FQ_TIMEOUT_NS,
    fq_timer_deadline_ns,
    fq_timer_max_ns,
)
from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE

C = CostModel()


def mapped(a, pages: int = 1, direction: int = DMA_FROM_DEVICE, t: int = 0):
    dev = a.workload.dev
    iova, t = a.dma_map(0, dev, a.alloc_buffer(pages * PAGE_SIZE), pages * PAGE_SIZE,
                        direction, t)
    return dev, iova, t


def ops_of(ops, kind: int):
    return ops[ops["op"] == kind]


# --- nested ------------------------------------------------------------------------------
def test_nested_map_needs_no_invalidation():
    """First-level tables: a map writes PTEs and returns, no descriptor and no exit."""
    a = agent("nested")
    mapped(a, 4)
    assert a.stats["maps"] == 1 and a.stats["pte_writes"] >= 4
    assert (a.stats["inv_descriptors"], a.stats["vm_exits"]) == (0, 0)
    assert a.viommu.tail_writes == 0


def test_nested_strict_unmap_is_one_psi_and_a_wait():
    """Strict: iommu_unmap then one PASID-based PSI over the range and a wait, in one tail
    write (one exit); the VMM forwards one HWPT invalidate with the unmap id; the guest then
    reports its return time with the same id."""
    a = agent("nested")
    dev, iova, t = mapped(a, 2)
    a.log.take()
    t_ret = a.dma_unmap(0, dev, iova, 2 * PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert a.viommu.counts == {"piotlb": 1, "wait": 1}
    assert (a.stats["inv_descriptors"], a.stats["vm_exits"], a.viommu.tail_writes) == (2, 1, 1)
    ops = a.log.take()
    [inv] = ops_of(ops, OP_HWPT_INV)
    assert (int(inv["a0"]), int(inv["a1"]), int(inv["a3"])) == (iova, 2, 0)
    [ret] = ops_of(ops, OP_UNMAP_RET)
    assert (int(ret["a0"]), int(ret["a1"])) == (0, t_ret)
    assert t_ret >= t + C.vm_exit_ns + C.vmm_trap_ns + C.hwpt_invalidate_ns + C.qi_wait_ns


def test_nested_strict_with_ats_adds_a_devtlb_descriptor():
    """With ATS the strict flush also invalidates the device-TLB over the same range."""
    a = agent("nested", ats=True)
    dev, iova, t = mapped(a)
    a.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert a.stats["inv_descriptors"] == 3
    # the domain sits at RID_PASID: its requests carry no PASID, so Linux cache.c flushes the
    # device-TLB with 0x3 (qi_flush_dev_iotlb), not 0x8
    assert a.viommu.counts == {"piotlb": 1, qi.TYPE_NAMES[qi.QI_DIOTLB_TYPE]: 1, "wait": 1}


def test_unmap_ids_count_up_and_tags_follow_pages():
    """Each unmap gets the next id; unmap_tag gives -1 while mapped, the id after, -2 never."""
    a = agent("nested")
    dev, i1, t = mapped(a)
    _, i2, t = mapped(a, t=t)
    sid = dev.sid
    assert a.dma.unmap_tag(sid, i1 >> PAGE_SHIFT) == -1
    t = a.dma_unmap(0, dev, i2, PAGE_SIZE, DMA_FROM_DEVICE, t)
    t = a.dma_unmap(0, dev, i1, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert a.dma.unmap_tag(sid, i2 >> PAGE_SHIFT) == 0
    assert a.dma.unmap_tag(sid, i1 >> PAGE_SHIFT) == 1
    assert a.dma.unmap_tag(sid, 0x7_0000) == -2


def test_unmap_of_what_was_never_mapped_is_counted_not_sent():
    a = agent("nested")
    dev, _iova, t = mapped(a)
    a.log.take()
    a.dma_unmap(0, dev, 0x7_0000_0000, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert a.stats["dma_api_errors"] == 1 and a.stats["vm_exits"] == 0
    assert ops_of(a.log.take(), OP_HWPT_INV).size == 0


# --- lazy ----------------------------------------------------------------------------------
def test_lazy_unmap_defers_and_the_timer_flushes_pasid_wide():
    """Lazy: the unmap queues its IOVA and arms the 10 ms timer (no exit); when the timer
    fires the guest flushes the whole PASID once (addr 0, npages all-ones, no unmap id)."""
    a = agent("nested", "lazy")
    dev, iova, t = mapped(a)
    a.log.take()
    t_ret = a.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    assert a.stats["vm_exits"] == 0 and a.stats["lazy_flushes"] == 0
    ops = a.log.take()
    assert ops_of(ops, OP_HWPT_INV).size == 0 and ops_of(ops, OP_UNMAP_RET).size == 1
    deadline = a._events[0][0]
    # armed during the call, to fire at a jiffy tick (HZ=250: 12-16 ms after arming)
    arm = [fq_timer_deadline_ns(x, IOVA_DEFAULT_FQ_TIMEOUT_NS, DEFAULT_HZ) for x in (t, t_ret)]
    assert arm[0] <= deadline <= arm[1]
    ops = a.run_epoch(deadline + 1)
    assert a.stats["lazy_flushes"] == 1 and a.stats["vm_exits"] == 1
    [inv] = ops_of(ops, OP_HWPT_INV)
    assert (int(inv["a0"]), int(inv["a1"]), int(inv["a3"])) == (0, ALL_PAGES, -1)
    # the entry waited from its unmap to the timer flush's completion
    assert IOVA_DEFAULT_FQ_TIMEOUT_NS <= a.dma.stale_bound_ns \
        <= fq_timer_max_ns(IOVA_DEFAULT_FQ_TIMEOUT_NS, DEFAULT_HZ) \
        + C.vm_exit_ns + C.vmm_trap_ns + C.hwpt_invalidate_ns + C.qi_desc_ns + C.qi_submit_ns \
        + 2 * C.qi_wait_ns


def test_lazy_timer_frees_for_reuse_after_the_flush():
    """An IOVA queued lazily is reused only after the timer's flush completed."""
    a = agent("nested", "lazy")
    dev, iova, t = mapped(a)
    t = a.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    _, again, t = mapped(a, t=t)
    assert again != iova                        # still awaiting its flush
    a.run_epoch(a._events[0][0] + 1)
    assert a.stats["lazy_flushes"] == 1
    _, reused, _t = mapped(a, t=a.now)          # from the CPU's rcache magazine
    assert reused == iova


# --- shadow ---------------------------------------------------------------------------------
def test_shadow_map_syncs_and_unmap_is_strict():
    """Caching mode: every map is followed by a PSI 0x2 + wait (one exit, one VFIO map per
    page: QEMU notifies each leaf); an unmap by another (one exit, one VFIO unmap per cleared
    4-KiB entry, as the level-1 table stays, with the unmap id); never lazy."""
    a = agent("shadow", "lazy")
    a.log.take()
    dev, iova, t = mapped(a, 2, DMA_TO_DEVICE)
    maps = ops_of(a.log.take(), OP_VFIO_MAP)
    assert [(int(m["a0"]), int(m["a2"]), int(m["a3"])) for m in maps] == [
        (iova, PAGE_SIZE, 0), (iova + PAGE_SIZE, PAGE_SIZE, 0)]
    a.dma_unmap(0, dev, iova, 2 * PAGE_SIZE, DMA_TO_DEVICE, t)
    unmaps = ops_of(a.log.take(), OP_VFIO_UNMAP)
    assert [(int(u["a0"]), int(u["a1"]), int(u["a3"])) for u in unmaps] == [
        (iova, PAGE_SIZE, 0), (iova + PAGE_SIZE, PAGE_SIZE, 0)]
    assert a.stats["vm_exits"] == 2 and a.stats["lazy_flushes"] == 0
    assert a.viommu.counts == {qi.TYPE_NAMES[qi.QI_IOTLB_TYPE]: 2, "wait": 2}


# --- pass-through ---------------------------------------------------------------------------
def test_passthrough_is_dma_direct():
    """No vIOMMU: the DMA address is the GPA, nothing is written, queued or trapped, and every
    DMA is untagged (the oracle has nothing to check)."""
    a = agent("passthrough")
    gpa = a.alloc_buffer(PAGE_SIZE)
    dev = a.workload.dev
    addr, t = a.dma_map(0, dev, gpa + 0x10, 64, DMA_FROM_DEVICE, 0)
    assert addr == gpa + 0x10
    a.dma_unmap(0, dev, addr, 64, DMA_FROM_DEVICE, t)
    assert (a.stats["vm_exits"], a.stats["inv_descriptors"], a.stats["pte_writes"]) == (0, 0, 0)
    assert a.dma.unmap_tag(dev.sid, addr >> PAGE_SHIFT) == -1
