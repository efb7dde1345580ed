"""Many PASIDs per device: a NIC with PASID-tagged queues (``pasid_queues``). Each tagged
queue's DMAs carry its PASID and go through its own first-level table, bound nested over the
VM's one second level; a PASID-selective invalidation of one queue leaves the IOTLB entries
of the others alone (VT-d spec 6.5.2.4, PASID-based IOTLB invalidation; Linux
iommu_attach_device_pasid with a domain per PASID)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import ConfigError
from host_iommu.invalidate import ALL_PAGES
from host_iommu.nested import hwpt_invalidate
from host_iommu.protocol import OP_DMA, ProtocolError, VmSetup, check_setup
from tests.system.conftest import experiment, nic, simulate
from tests.vm_agent.test_agent import agent
from vm_agent.dma import DmaError
from workloads.nic import NicWorkload


def pasid_nic(mode: str = "nested", n: int = 2, **kw) -> dict:
    g = nic(mode, **kw)
    g["workload"]["pasid_queues"] = n
    return g


def iotlb_pasids(h, did_of: dict[int, int]) -> dict[int, int]:
    """IOTLB entries per PASID among the given (pasid -> DID) domains."""
    rows = h.iotlb.cache.contents()
    return {p: sum(1 for r in rows if r[0] == did and r[1] == p) for p, did in did_of.items()}


@pytest.fixture(scope="module")
def world():
    return simulate(experiment({"a": pasid_nic()}, duration_us=1000))


def test_each_tagged_queue_has_its_own_first_level_over_one_second_level(world):
    """Queues 0 and 1 of the NIC (2 vCPUs) carry PASIDs 1 and 2: three bindings of the one
    device (PASID 0 plus two), three DIDs, one shared second level; every DMA translated."""
    h = world.host
    sid = world.agents[0].devices[0].sid
    doms = {p: world.host.nested[(sid, p)] for p in (0, 1, 2)}
    assert len({d.did for d in doms.values()}) == 3
    assert len({d.flptr_gpa for d in doms.values()}) == 3
    assert {d.did for d in doms.values()} <= {t[1] for t in h.iommu.vms[1].tags}
    a = world["a"]
    assert a["ios"] > 0 and a["faults"] == 0 and a["translations"] == a["dma_requests"]


def test_dmas_of_tagged_queues_carry_their_pasid():
    a = agent("nested", workload=NicWorkload(NicWorkload.Params(
        offered_gbps=2.0, rx_ring=16, tx_ring=16, pasid_queues=2)))
    ops = np.concatenate([a.run_epoch(t) for t in (100_000, 200_000, 300_000)])
    assert set(ops["pasid"][ops["op"] == OP_DMA].tolist()) == {1, 2}
    assert len(a.setup_msg.pasid_roots) == 6 and a.setup_msg.pasid_roots[1::3] == (1, 2)


def test_a_pasid_selective_flush_leaves_the_other_pasids_entries(world):
    """The IOTLB holds entries of both PASIDs; flushing everything of PASID 1 (a lazy
    flush's PASID-wide 0x6) drops PASID 1's and keeps every entry of PASID 2."""
    hs = world.host
    h = hs.iommu
    sid = world.agents[0].devices[0].sid
    did_of = {p: hs.nested[(sid, p)].did for p in (1, 2)}
    before = iotlb_pasids(h, did_of)
    assert before[1] > 0 and before[2] > 0
    t_done, _ = hwpt_invalidate(h, hs.nested[(sid, 1)], [(0, ALL_PAGES, 0)], h.now_ns)
    h.advance_to(t_done)
    assert iotlb_pasids(h, did_of) == {1: 0, 2: before[2]}


@pytest.mark.parametrize("mode", ["shadow", "passthrough"])
def test_tagged_queues_need_the_nested_vIOMMU(mode):
    """Shadow and pass-through DMA carries no PASID: the config names the key; the guest API
    refuses a PASID outside nesting too."""
    with pytest.raises(ConfigError, match="pasid_queues"):
        experiment({"a": pasid_nic(mode)}, duration_us=100)
    a = agent(mode)
    with pytest.raises(DmaError, match="nested"):
        a.add_pasid(a.workload.dev, 1)


def test_more_tagged_queues_than_queues_is_a_config_error():
    with pytest.raises(ConfigError, match="pasid_queues"):
        experiment({"a": pasid_nic(n=3)}, duration_us=100)


def test_setup_message_checks_pasid_roots():
    ok = VmSetup(1, 1 << 20, "nested", (0x100,), fl_roots=(0x1000,),
                 pasid_roots=(0x100, 1, 0x2000))
    assert check_setup(ok) is ok
    for bad in ((0x200, 1, 0x2000), (0x100, 0, 0x2000), (0x100, 1, 0x2001),
                (0x100, 1, 0x2000, 0x100, 1, 0x3000), (0x100, 1)):
        with pytest.raises(ProtocolError, match="pasid_roots"):
            check_setup(VmSetup(1, 1 << 20, "nested", (0x100,), fl_roots=(0x1000,),
                                pasid_roots=bad))
