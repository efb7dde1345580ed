"""VmAgent (vm_agent/agent.py): one guest's set-up message, its epoch batches, the device side
of DMA (one request per page, tagged for the oracle), churn operations, and its seed."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu.costs import CostModel
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PAGE_SIZE
from host_iommu.protocol import (
    DMA_ROGUE,
    OP_DMA,
    OP_GUEST_WRITE,
    OP_SL_MAP,
    OP_SL_UNMAP,
    EpochReport,
)
from vm_agent.agent import VmAgent
from workloads.base import DMA_FROM_DEVICE, Workload
from workloads.nic import NicWorkload


class Bare(Workload):
    """One device and nothing else: the test drives the agent by hand."""

    kind = "bare"

    def start(self, ctx) -> None:
        self.dev = ctx.add_device("dev0")


def agent(mode: str = "nested", policy: str = "strict", *, workload: Workload | None = None,
          seed: int = 0, vm: int = 1, ats: bool = False) -> VmAgent:
    a = VmAgent(vm, mode=mode, policy=policy, flush_queue="percpu", vcpus=2,
                memory_bytes=64 << 20, fl_levels=4, ats=ats,
                workload=workload if workload is not None else Bare(Bare.Params()),
                churn=None, costs=CostModel(), seed=seed)
    a.setup_msg = a.setup()
    return a


def nic_ops(seed: int, vm: int = 1) -> np.ndarray:
    a = agent(workload=NicWorkload(NicWorkload.Params(offered_gbps=2.0, rx_ring=32,
                                                      tx_ring=32, rogue_fraction=0.1)),
              seed=seed, vm=vm)
    return np.concatenate([a.run_epoch(t) for t in (100_000, 200_000, 300_000)])


# --- set-up ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nested", "shadow", "passthrough"])
def test_setup_message_describes_the_devices(mode):
    """VmSetup names the VM, its memory, mode and devices (bus = VM id); nested also gives
    the first-level root GPA of each device's table."""
    a = agent(mode, vm=3, ats=True)
    s = a.setup_msg
    assert (s.vm, s.memory_bytes, s.mode, s.sids, s.ats) == (3, 64 << 20, mode, (0x300,), True)
    if mode == "nested":
        assert s.fl_roots == (a.dma.domains[0x300].table.root,)
        assert s.fl_roots[0] % PAGE_SIZE == 0 and s.fl_roots[0] < 64 << 20
    else:
        assert s.fl_roots == ()


# --- epochs ------------------------------------------------------------------------------
def test_run_epoch_runs_events_before_the_end_only():
    """Events at t < t_end run; an event at t_end waits for the next epoch."""
    a = agent()
    seen: list[int] = []
    for t in (10, 99, 100, 150):
        a.schedule(t, seen.append, t)
    a.run_epoch(100)
    assert seen == [10, 99] and a.now == 100
    a.run_epoch(200)
    assert seen == [10, 99, 100, 150]


def test_nested_table_stores_and_dma_reach_the_batch():
    """Nested: a map logs the first-level stores (OP_GUEST_WRITE, never a trap); a device
    DMA is one OP_DMA per 4-KiB page, tagged -1 while mapped; sequence numbers count up."""
    a = agent()
    a.log.take()
    dev = a.workload.dev
    gpa = a.alloc_buffer(2 * PAGE_SIZE)
    iova, _t = a.dma_map(0, dev, gpa, 2 * PAGE_SIZE, DMA_FROM_DEVICE, 0)
    a.device_dma(dev, 5000, iova + PAGE_SIZE - 32, 64, write=True)
    ops = a.run_epoch(10_000)
    assert a.stats["vm_exits"] == 0
    writes = ops[ops["op"] == OP_GUEST_WRITE]
    assert writes.size >= 4                            # a new path of tables plus the PTEs
    dmas = ops[ops["op"] == OP_DMA]
    assert dmas["a0"].tolist() == [iova + PAGE_SIZE - 32, iova + PAGE_SIZE]
    assert dmas["a1"].tolist() == [32, 32]
    assert dmas["a2"].tolist() == [ACCESS_WRITE, ACCESS_WRITE]
    assert dmas["a3"].tolist() == [-1, -1]
    assert np.all(np.diff(ops["seq"]) == 1) and np.all(ops["vm"] == 1)
    assert a.stats["dma_requests"] == 2


def test_dma_after_unmap_carries_the_unmap_id_and_rogue_flag():
    """After an unmap, a DMA to that page carries the unmap's id (the oracle's key); a page
    never mapped carries -2; a rogue DMA sets DMA_ROGUE in the access column."""
    a = agent()
    dev = a.workload.dev
    iova, t = a.dma_map(0, dev, a.alloc_buffer(PAGE_SIZE), PAGE_SIZE, DMA_FROM_DEVICE, 0)
    a.dma_unmap(0, dev, iova, PAGE_SIZE, DMA_FROM_DEVICE, t)
    a.log.take()
    a.device_dma(dev, t + 10, iova, 8, write=False, rogue=True)
    a.device_dma(dev, t + 20, 0x7_0000_0000, 8, write=False)
    dmas = a.log.take()
    dmas = dmas[dmas["op"] == OP_DMA]
    assert dmas["a3"].tolist() == [0, -2]
    assert dmas["a2"].tolist() == [ACCESS_READ | DMA_ROGUE, ACCESS_READ]
    assert a.stats["rogue_dma"] == 1


def test_balloon_operations_per_page():
    """Inflate sends one OP_SL_UNMAP per page given up; deflate one OP_SL_MAP per page back."""
    a = agent()
    a.log.take()
    assert a.balloon_inflate(100, 3) == 3
    assert a.balloon_deflate(200, 2) == 2
    ops = a.log.take()
    assert ops["op"].tolist() == [OP_SL_UNMAP] * 3 + [OP_SL_MAP] * 2
    assert set(ops["a1"].tolist()) == {1}
    assert set(ops["a0"][3:].tolist()) <= set(ops["a0"][:3].tolist())
    assert a.stats["balloon_pages"] == 3


def test_receive_takes_counters_and_faults():
    a = agent()
    a.receive(EpochReport(1, {"faults": 2}, [(1, 0x100, 0, 0x5000, 6, 1)] * 2))
    assert a.host_counters == {"faults": 2}
    assert a.stats["guest_faults_reported"] == 2 and len(a.epoch_faults) == 2


# --- the seed ------------------------------------------------------------------------------
def test_same_seed_same_batches():
    assert np.array_equal(nic_ops(5), nic_ops(5))


def test_another_seed_other_arrivals():
    """The seed reaches the workload's random stream: seed 6 differs from seed 5."""
    a, b = nic_ops(5), nic_ops(6)
    assert a.size > 50 and b.size > 50
    assert a.size != b.size or not np.array_equal(a, b)
    assert a[a["op"] == OP_DMA]["t_ns"].tolist() != b[b["op"] == OP_DMA]["t_ns"].tolist()
