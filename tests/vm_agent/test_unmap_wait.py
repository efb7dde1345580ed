"""Shared host QI contention reaches the guests: a strict unmap returns only when its wait
descriptor completed on the host's queue, charged to the unmapping vCPU one epoch later, in
full; vCPU work that cannot start before an epoch's end waits for a later epoch."""

from __future__ import annotations

import pytest

from cluster.config import parse_config
from host_iommu.costs import CostModel
from host_iommu.protocol import EpochReport, ProtocolError, pack, unpack
from tests.system.conftest import nvme, simulate
from tests.vm_agent.test_dma_errors import make_agent
from vm_agent.agent import VmAgent
from workloads.nic import NicWorkload


def run(vms: int):
    """``vms`` strict nested NVMe VMs on one host whose QI descriptors are slow (4 us)."""
    cfg = parse_config({"experiment": {"name": "qi", "seed": 5, "duration_us": 600,
                                       "epoch_us": 100},
                        "host": {"memory_mib": 512}, "cost": {"qi_desc_ns": 4000},
                        "vm": {"v": nvme("nested", count=vms, depth=8)}})
    return simulate(cfg)


def test_unmap_wait_rises_once_the_host_queue_saturates():
    """One VM's unmaps find the queue nearly idle; three VMs' queue behind each other, and
    each guest's vCPUs spend that waiting time."""
    world = run(3)
    alone, crowd = run(1)["v"], world["v"]
    assert alone["unmaps"] > 50 and crowd["unmaps"] > 100
    per_unmap_alone = alone["unmap_qi_wait_ns"] / alone["unmaps"]
    per_unmap_crowd = crowd["unmap_qi_wait_ns"] / crowd["unmaps"]
    assert per_unmap_alone < 1_000 < 10_000 < per_unmap_crowd
    # each vCPU is stalled by the largest wait of its epoch's unmaps (> 10 us here)
    for a in world.agents:
        assert a.stats["unmap_qi_wait_ns"] > 0
        assert a.stats["cpu_busy_ns"] > 10_000
    assert crowd["stale_dma"] == 0 and crowd["faults"] == 0


def test_receive_charges_the_largest_wait_to_the_unmapping_vcpu_in_full():
    """The wait lands on the vCPU that unmapped, from the next epoch's start (or its busy
    time), in full: the largest of its unmaps' waits (each later unmap was submitted that
    much later, queued behind the same backlog), however many epochs it spans."""
    a, _wl = make_agent("nested")
    a.vcpus, a.busy_until = 2, [0, 0]
    a.run_epoch(100_000)                    # now = 100 us, epochs of 100 us
    a.receive(EpochReport(1, {}, [], [(0, 1, 5_000), (1, 1, 2_000)]))
    assert a.busy_until == [0, 105_000] and a.stats["unmap_qi_wait_ns"] == 7_000
    assert a.stats["cpu_busy_ns"] == 5_000
    a.receive(EpochReport(1, {}, [], [(2, 0, 250_000), (3, 3, 1_000)]))   # vCPU 3 = 1
    assert a.busy_until == [350_000, 106_000]
    assert a.stats["unmap_qi_wait_ns"] == 258_000 and a.stats["cpu_busy_ns"] == 256_000
    a.t_end = 200_000
    assert a.stalled_until(0, 120_000) == 350_000 and a.stalled_until(1, 120_000) == 0
    assert a.stalled_until(1, 199_999) == 0 and a.stalled_until(1, 200_000) == 200_000


def test_stalled_vcpu_issues_nothing_until_its_stall_ends():
    """A NIC guest whose vCPUs are stalled for 1 ms by the host issues no DMA API call
    (its NAPI polls and sends wait in later epochs), while its device goes on receiving
    (and dropping once the RX ring is empty); after the stall it runs again."""
    wl = NicWorkload(NicWorkload.Params(rx_ring=16, tx_ring=16, offered_gbps=10.0))
    a = VmAgent(1, mode="nested", policy="strict", flush_queue="percpu", vcpus=2,
                memory_bytes=64 << 20, fl_levels=4, ats=False, workload=wl, churn=None,
                costs=CostModel(), seed=0)
    a.setup()
    epoch = 100_000
    a.run_epoch(epoch)
    calls = a.stats["maps"] + a.stats["unmaps"]
    assert calls > 0
    a.receive(EpochReport(a.vm, {}, [], [(0, c, 1_000_000) for c in range(a.vcpus)]))
    stalled = [a.stats["maps"] + a.stats["unmaps"]]
    for k in range(2, 11):                              # epochs [100 us, 1 ms)
        a.run_epoch(k * epoch)
        stalled.append(a.stats["maps"] + a.stats["unmaps"])
    assert stalled == [calls] * 10
    drops = wl.rx_drops
    for k in range(11, 14):
        a.run_epoch(k * epoch)
    assert a.stats["maps"] + a.stats["unmaps"] > calls
    assert wl.rx_drops >= drops


def test_unmap_waits_cross_the_wire_and_are_checked():
    rep = EpochReport(2, {"faults": 0}, [], [(4, 0, 123)])
    assert unpack(pack(rep)) == rep
    bad = pack(EpochReport(2, {}, [], [(4, 0, -1)]))
    with pytest.raises(ProtocolError, match="unmap_waits"):
        unpack(bad)
