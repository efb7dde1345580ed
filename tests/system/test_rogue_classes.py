"""What became of each rogue DMA (host_iommu/server.py ROGUE_CLASSES): faulted, reached
another VM, reached the old buffer after its unmap returned (stale) or while the unmap was in
flight, or landed on the reused IOVA's new buffer (misdirected). The classes sum to
``rogue_dma``; under strict, LIFO IOVA reuse (Linux iova.c rcache magazines) makes a NIC's
late DMAs misdirected, not faults."""

from __future__ import annotations

import pytest

from host_iommu.defs import ACCESS_WRITE, PAGE_SIZE
from host_iommu.protocol import DMA_ROGUE, OP_DMA, OP_UNMAP_RET, OP_VFIO_MAP
from host_iommu.server import ROGUE_CLASSES
from tests.host_iommu.test_isolation import epoch, server
from tests.system.conftest import experiment, nic, nvme, simulate

SID1, SID2 = 0x100, 0x200


def rogue(vm: int, t: int, sid: int, iova: int, tag: int) -> tuple:
    return (vm, t, OP_DMA, sid, 0, iova, 64, ACCESS_WRITE | DMA_ROGUE, tag)


def test_each_class_is_counted_once_on_the_host():
    """One rogue DMA of each kind on a shadow VM, plus a plain DMA that counts in none."""
    hs = server("shadow", "shadow")
    victim = hs.iommu.gpa_to_hpa(2, 0x20000)
    hs.shadow[1].table.map(0x9000, victim, PAGE_SIZE)        # a broken entry into VM 2
    epoch(hs, (1, 10, OP_VFIO_MAP, SID1, 0, 0x5000, 0x20000, PAGE_SIZE, 1),
          (1, 10, OP_VFIO_MAP, SID1, 0, 0xA000, 0x21000, PAGE_SIZE, 1),
          (1, 10, OP_VFIO_MAP, SID1, 0, 0xB000, 0x22000, PAGE_SIZE, 1),
          (1, 50, OP_UNMAP_RET, 0, 0, 4, 50, 0, -1),     # returned, no VFIO unmap followed
          rogue(1, 100, SID1, 0x9000, -1),               # cross-VM
          rogue(1, 110, SID1, 0x7000, 3),                # nothing mapped: faults
          rogue(1, 120, SID1, 0x5000, -1),               # mapped again: misdirected
          rogue(1, 130, SID1, 0xA000, 4),                # after its unmap returned: stale
          rogue(1, 140, SID1, 0xB000, 6),                # its unmap has not returned yet
          (1, 150, OP_DMA, SID1, 0, 0x5000, 64, ACCESS_WRITE, -1))
    c = hs.counters[1]
    assert {k: c[k] for k in ROGUE_CLASSES} == {
        "rogue_faulted": 1, "rogue_cross_vm": 1, "rogue_stale": 1, "rogue_in_flight": 1,
        "rogue_misdirected": 1}
    assert (c["faults"], c["cross_vm_dma"], c["stale_dma"]) == (1, 1, 1)


def classes(row: dict[str, int]) -> dict[str, int]:
    return {k: row[k] for k in ROGUE_CLASSES}


@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_strict_nic_late_dmas_are_misdirected_not_faults(mode):
    """A strict NIC unmaps a packet buffer and maps the next one at once: the rcache hands
    back the IOVA just freed (LIFO), so a DMA aimed at it lands on the new buffer. Not
    always: these small worlds keep their vCPUs busy past epoch ends (shadow and nested
    strict cost a few us per packet), and a send that cannot start before an epoch's end
    now waits for the vCPU (VmAgent.stalled_until) instead of mapping at once: an IOVA freed
    by the TX clean-up stays unmapped meanwhile, and a late DMA to it faults (1 of 22
    nested, 1 of 6 shadow; none with the deferral switched off)."""
    a = simulate(experiment({"a": nic(mode, rogue=0.1)}, duration_us=1500))["a"]
    assert a["rogue_dma"] > 0 and a["faults"] == classes(a)["rogue_faulted"]
    assert classes(a)["rogue_misdirected"] >= 0.75 * a["rogue_dma"]
    assert sum(classes(a).values()) == a["rogue_dma"]


@pytest.mark.parametrize(("group", "check"), [
    (nvme("nested", rogue=0.1), "faulted"), (nvme("shadow", rogue=0.1), "faulted"),
    (nic("nested", "lazy", rogue=0.1), "stale"), (nic("passthrough", rogue=0.1), "none")])
def test_classes_sum_to_rogue_dma(group, check):
    """NVMe (strict) leaves some unmapped IOVAs unused for a while: those rogue DMAs fault,
    and every fault is a rogue one; a lazy NIC's late DMAs go stale until the flush, and the
    oracle's stale DMAs are exactly the rogue stale ones; pass-through faults nothing."""
    a = simulate(experiment({"a": group}, duration_us=1500))["a"]
    got = classes(a)
    assert a["rogue_dma"] > 0 and sum(got.values()) == a["rogue_dma"]
    assert got["rogue_cross_vm"] == a["cross_vm_dma"] == 0
    assert got["rogue_faulted"] == a["faults"]
    assert got["rogue_stale"] == a["stale_dma"]
    if check == "faulted":
        assert got["rogue_faulted"] > 0
    elif check == "stale":
        assert got["rogue_stale"] > 0
    else:
        assert got["rogue_misdirected"] == a["rogue_dma"]
