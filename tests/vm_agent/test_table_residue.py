"""A reused page-table page is zeroed where the IOMMU can see it (Linux iommu_alloc_page,
__GFP_ZERO): an unmap that covers a whole leaf table frees it without clearing its entries,
so under nesting the host's copy of guest memory still holds them until the page is zeroed."""

from __future__ import annotations

from host_iommu.iommu import IommuParams
from host_iommu.protocol import merge
from host_iommu.server import HostServer
from tests.vm_agent.test_agent import agent
from workloads.base import DMA_TO_DEVICE

PAGE = 4096


def test_a_reused_table_page_holds_no_old_translation():
    a = agent("nested")
    s = HostServer(IommuParams(memory_mib=256))
    s.setup_vm(a.setup_msg)
    dev = a.workload.dev
    small = [a.alloc_buffer(PAGE) for _ in range(600)]   # taken before the tables are freed
    iova, t = a.dma_map(0, dev, a.alloc_buffer(1024 * PAGE), 1024 * PAGE, DMA_TO_DEVICE, 0)
    t = a.dma_unmap(0, dev, iova, 1024 * PAGE, DMA_TO_DEVICE, t)   # frees two leaf tables,
    # which still hold their entries in memory
    mapped = set()
    for b in small:                                             # new leaf tables reuse them
        i, t = a.dma_map(1, dev, b, PAGE, DMA_TO_DEVICE, t)
        mapped.add(i >> 12)
    s.apply_epoch(merge([a.log.take()]))
    probes = [p for p in range(iova >> 12, (iova >> 12) + 1024) if p not in mapped]
    assert len(probes) > 400
    for p in probes:
        a.device_dma(dev, t + 100, p << 12, 64, write=False)
    for p in sorted(mapped)[:50]:
        a.device_dma(dev, t + 100, p << 12, 64, write=False)
    s.apply_epoch(merge([a.log.take()]))
    c = s.counters[1]
    # every unmapped page faults, every mapped one translates; nothing reached an old buffer
    assert (c["translations"], c["faults"], c["stale_dma"]) == (len(probes) + 50, len(probes), 0)
    assert a.stats["pte_writes"] < 3000          # the zeroing is a memset, not driver PTE writes
