"""Causality across vCPUs: what one vCPU's map returned must be visible to the device at the
time it returned, whatever another vCPU was doing (the host applies guest stores in virtual
time, so a store must not be stamped later than a store that depends on it)."""

from __future__ import annotations

from host_iommu.iommu import IommuParams
from host_iommu.protocol import merge
from host_iommu.server import HostServer
from tests.vm_agent.test_agent import agent
from workloads.base import DMA_TO_DEVICE

PAGE = 4096


def two_maps(second_cpu: int) -> HostServer:
    """vCPU 0 is busy until 1 ms and maps a page (the first map: it creates the table path);
    then vCPU ``second_cpu`` maps a page at 10 ns, next to it in the same leaf table. The
    device reads each page 100 ns after its map returned."""
    a = agent("nested")
    s = HostServer(IommuParams(memory_mib=256))
    s.setup_vm(a.setup_msg)
    dev = a.workload.dev
    a.busy_until[0] = 1_000_000
    i0, t0 = a.dma_map(0, dev, a.alloc_buffer(PAGE), PAGE, DMA_TO_DEVICE, 0)
    i1, t1 = a.dma_map(second_cpu, dev, a.alloc_buffer(PAGE), PAGE, DMA_TO_DEVICE, 10)
    assert abs(i1 - i0) < 2 << 20                       # the same leaf table
    a.device_dma(dev, t1 + 100, i1, 64, write=False)
    a.device_dma(dev, t0 + 100, i0, 64, write=False)
    s.apply_epoch(merge([a.log.take()]))
    return s


def test_maps_on_one_vcpu_are_visible_when_they_return():
    s = two_maps(second_cpu=0)
    assert (s.counters[1]["translations"], s.counters[1]["faults"]) == (2, 0)


def test_map_on_another_vcpu_is_visible_when_it_returns():
    """vCPU 1's map returned at ~1 us: the device's read after that must translate, even
    though vCPU 0, busy until 1 ms, created the table the map wrote into."""
    s = two_maps(second_cpu=1)
    assert (s.counters[1]["translations"], s.counters[1]["faults"]) == (2, 0)
