"""Host second-level churn: a ballooned frame is given to another VM only after every
translation derived from it has been flushed."""

from __future__ import annotations

import pytest

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.protocol import OP_SL_MAP, OP_SL_UNMAP
from tests.system.conftest import Bench, experiment, nic, simulate

SID1, SID2 = 0x100, 0x200
IOVA = 0x4000_0000


def balloon_race(ats: bool) -> tuple[Bench, int, int]:
    """Nested VM 1 maps IOVA -> GPA and DMAs (its IOTLB, and device-TLB with ATS, cache the
    translation); the balloon then takes that GPA page and VM 2 plugs a page, which gets the
    freed host frame. Returns (bench, GPA, the frame)."""
    b = Bench()
    fl = b.nested_vm(1, SID1, ats=ats)
    b.nested_vm(2, SID2)
    gpa = 0x30_0000
    fl.map(IOVA, gpa, PAGE_SIZE)
    b.dma(1, 1000, SID1, IOVA)
    b.apply()
    assert b.counters(1)["translations"] == 1 and b.counters(1)["faults"] == 0
    frame = b.h.gpa_to_hpa(1, gpa) >> PAGE_SHIFT
    b.op(1, 2000, OP_SL_UNMAP, a0=gpa, a1=1)                 # balloon inflate in VM 1
    b.op(2, 3000, OP_SL_UNMAP, a0=0x10_0000, a1=1)           # VM 2 gives a page back ...
    b.op(2, 3100, OP_SL_MAP, a0=0x10_0000, a1=1)             # ... and plugs one
    b.apply()
    return b, gpa, frame


@pytest.mark.parametrize("ats", [False, True])
def test_ballooned_frame_is_unreachable_once_reused(ats):
    """After the balloon, VM 1's device cannot reach the frame VM 2 now owns: its DMA faults
    (the IOTLB/device-TLB entry was flushed before the frame was freed), never cross-VM."""
    b, gpa, frame = balloon_race(ats)
    assert b.h.gpa_to_hpa(1, gpa) is None
    assert b.h.gpa_to_hpa(2, 0x10_0000) >> PAGE_SHIFT == frame      # the frame was reused
    assert b.counters(1)["host_inv_descriptors"] >= 2                 # flush + wait
    b.dma(1, 10_000, SID1, IOVA, write=True)
    b.apply()
    c = b.counters(1)
    assert (c["translations"], c["faults"], c["cross_vm_dma"]) == (2, 1, 0)


def test_balloon_churn_under_lazy_guests_never_crosses_vms():
    """Whole run: two lazy nested NIC VMs with rogue devices and 100 us balloon churn. Their
    DMAs keep flowing and none reaches the other VM (churn really ran: pages moved)."""
    churn = {"kind": "balloon", "interval_us": 100.0, "pages": 64}
    w = simulate(experiment({"a": nic("nested", "lazy", rogue=0.05, churn=churn),
                             "b": nic("nested", "lazy", rogue=0.05, churn=churn)},
                            duration_us=1500))
    for g in ("a", "b"):
        assert w[g]["ios"] > 0 and w[g]["balloon_pages"] > 0
        assert w[g]["host_inv_descriptors"] > 0
        assert w[g]["cross_vm_dma"] == 0
