"""Shared host QI contention reaches the guests: a strict unmap returns only when its wait
descriptor completed on the host's queue, charged to the unmapping vCPU one epoch later."""

from __future__ import annotations

import pytest

from cluster.config import parse_config
from host_iommu.protocol import EpochReport, ProtocolError, pack, unpack
from tests.system.conftest import nvme, simulate
from tests.vm_agent.test_dma_errors import make_agent


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
    # every reported wait is spent by a vCPU or still due (a saturated queue's backlog)
    for a in world.agents:
        assert a.stats["unmap_qi_wait_ns"] > 0
        assert a.stats["cpu_busy_ns"] >= a.stats["unmap_qi_wait_ns"] - sum(a.qi_wait_due)
    assert crowd["stale_dma"] == 0 and crowd["faults"] == 0


def test_receive_charges_the_wait_to_the_unmapping_vcpu_within_the_next_epoch():
    """The wait lands on the vCPU that unmapped, from the next epoch's start; what does not
    fit in that epoch carries over, so no vCPU runs ahead of the coming epoch's end."""
    a, _wl = make_agent("nested")
    a.vcpus, a.busy_until, a.qi_wait_due = 2, [0, 0], [0, 0]
    a.run_epoch(100_000)                    # now = 100 us, epochs of 100 us
    a.receive(EpochReport(1, {}, [], [(0, 1, 5_000), (1, 1, 2_000)]))
    assert a.busy_until == [0, 107_000] and a.stats["unmap_qi_wait_ns"] == 7_000
    assert a.stats["cpu_busy_ns"] == 7_000
    a.receive(EpochReport(1, {}, [], [(2, 0, 250_000)]))       # longer than an epoch
    assert a.busy_until[0] == 200_000 and a.qi_wait_due == [150_000, 0]
    a.run_epoch(200_000)
    a.receive(EpochReport(1, {}, [], []))
    assert a.busy_until[0] == 300_000 and a.qi_wait_due == [50_000, 0]
    assert a.stats["unmap_qi_wait_ns"] == 257_000


def test_unmap_waits_cross_the_wire_and_are_checked():
    rep = EpochReport(2, {"faults": 0}, [], [(4, 0, 123)])
    assert unpack(pack(rep)) == rep
    bad = pack(EpochReport(2, {}, [], [(4, 0, -1)]))
    with pytest.raises(ProtocolError, match="unmap_waits"):
        unpack(bad)
