"""Safety experiments that aim where they must: rogue DMAs that reach unmapped pages, lazy
runs over several flush periods, and the behaviour (not the label) of shadow's forced strict.

Each test here kills a realistic system-level bug (docs/testing.md lists which).
"""

from __future__ import annotations

import pytest

from tests.system.conftest import experiment, nic, nvme, simulate
from vm_agent.flushq import DEFAULT_HZ, IOVA_DEFAULT_FQ_TIMEOUT_NS, fq_timer_max_ns

MS = 1_000_000
# Host counters of requests it refused: a well-behaved guest and VMM never see one.
REFUSALS = ("vfio_errors", "ops_refused", "foreign_sid_refused", "sl_unmap_refused")


def refused(row: dict[str, int]) -> dict[str, int]:
    return {k: row.get(k, 0) for k in REFUSALS if row.get(k, 0)}


@pytest.fixture(scope="module", params=["nested", "shadow"])
def strict_nvme(request):
    """Two strict NVMe VMs of one mode; VM group "a" has a rogue device (10% of DMAs)."""
    mode = request.param
    return mode, simulate(experiment({"a": nvme(mode, rogue=0.1), "b": nvme(mode)},
                                     duration_us=1500))


def test_strict_rogue_dmas_reach_unmapped_pages_and_fault(strict_nvme):
    """Strict NVMe: a rogue DMA aims at the IOVA the guest unmapped last; NVMe does not
    reuse it at once, so it reaches an unmapped page and must fault, never go stale."""
    mode, w = strict_nvme
    a = w["a"]
    assert a["rogue_dma"] > 0
    assert 0 < a["faults"] <= a["rogue_dma"], mode      # only rogue DMAs fault
    assert a["stale_dma"] == 0 and a["stale_window_max_ns"] == 0
    assert a["cross_vm_dma"] == 0
    assert a["guest_faults_reported"] == a["faults"]    # every fault reached the guest
    assert refused(a) == {}                             # a rogue device is not a bad VMM


def test_strict_neighbour_is_untouched(strict_nvme):
    """The VM without a rogue device sees no fault, no stale and no cross-VM DMA, and the
    host refused none of its VMM's requests (every VFIO map/unmap and invalidation applied)."""
    mode, w = strict_nvme
    b = w["b"]
    assert b["ios"] > 0 and b["translations"] == b["dma_requests"], mode
    assert (b["faults"], b["stale_dma"], b["cross_vm_dma"]) == (0, 0, 0)
    assert refused(b) == {}


def test_strict_unmaps_reach_the_host(strict_nvme):
    """Every strict unmap crossed the boundary: shadow as VFIO unmaps, nested as HWPT
    invalidations, each turned into host descriptors."""
    mode, w = strict_nvme
    a = w["a"]
    assert a["unmaps"] > 0
    if mode == "shadow":
        assert a["vmm_unmap_calls"] >= a["unmaps"]
        assert a["pinned_pages"] > 0
    else:
        assert a["vmm_invalidate_calls"] == a["unmaps"]
    assert a["host_inv_descriptors"] >= 2 * a["unmaps"]   # an invalidation and a wait each


@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_strict_with_ats_flushes_the_device_tlb_too(mode):
    """Strict NVMe with an ATS device: translations are served from its device-TLB, and a
    rogue DMA to an unmapped page still faults, so every unmap also reached the device-TLB."""
    w = simulate(experiment({"a": nvme(mode, rogue=0.1, ats=True)}, duration_us=1500))
    a = w["a"]
    assert a["devtlb_hits"] > a["dma_requests"] // 4
    assert a["rogue_dma"] > 0 and a["faults"] > 0
    assert a["stale_dma"] == 0 and a["cross_vm_dma"] == 0


def test_passthrough_offers_no_protection():
    """Pass-through has no vIOMMU: the rogue device's DMAs reach guest memory (no fault),
    yet never another VM's; every DMA is one translation of the VM's second level."""
    w = simulate(experiment({"a": nvme("passthrough", rogue=0.1)}, duration_us=800))
    a = w["a"]
    assert a["rogue_dma"] > 0
    assert a["translations"] == a["dma_requests"] > 0
    assert a["faults"] == 0 and a["cross_vm_dma"] == 0
    assert a["vm_exits"] == 0 and a["host_inv_descriptors"] == 0


@pytest.fixture(scope="module")
def lazy_long():
    """Lazy nested NIC (per-CPU flush queues, 10 ms timer firing on HZ=250 ticks, about
    every 16 ms) for 60 ms at a load that never fills a 256-entry ring in one timer period:
    only the timer flushes."""
    return simulate(experiment({"l": nic("nested", "lazy", gbps=0.2, rogue=0.05)},
                               duration_us=60_000, epoch_us=1000))


def test_lazy_timer_flushes_every_period(lazy_long):
    """The flush timer fires once per armed period: at least 3 flushes in 60 ms."""
    r = lazy_long["l"]
    assert r["unmaps"] > 100
    assert r["lazy_flushes"] >= 3
    assert r["vmm_invalidate_calls"] == r["lazy_flushes"]   # one PASID-wide each


def test_lazy_stale_window_is_nonzero_and_bounded(lazy_long):
    """Lazy is measurably stale, and no IOVA waits longer than the timeout plus one flush:
    both the oracle's window and the guest's own unmap-to-flush bound stay under the timer's
    longest period (16 ms at HZ=250)."""
    r = lazy_long["l"]
    bound = fq_timer_max_ns(IOVA_DEFAULT_FQ_TIMEOUT_NS, DEFAULT_HZ) + MS // 10
    assert r["stale_dma"] > 0
    assert 0 < r["stale_window_max_ns"] <= bound
    assert MS < r["lazy_stale_bound_ns"] <= bound       # entries really waited for the timer
    assert r["cross_vm_dma"] == 0


@pytest.fixture(scope="module")
def shadow_pair():
    """The same shadow NIC asked lazy and asked strict, each on a host of its own (on one
    host their strict unmaps would queue behind each other's on the shared QI)."""
    return {p: simulate(experiment({p: nic("shadow", p, rogue=0.05)}, duration_us=1000))[p]
            for p in ("lazy", "strict")}


def test_shadow_forces_strict_in_behaviour(shadow_pair):
    """Asked lazy, shadow behaves strict: no lazy flush, one exit per map and per unmap,
    VFIO unmaps for every unmap, and the same counts as the strict twin (times differ a
    little: the two VMs share the host's invalidation queue)."""
    lazy, strict = shadow_pair["lazy"], shadow_pair["strict"]
    assert lazy["unmaps"] > 0 and lazy["lazy_flushes"] == 0
    assert lazy["vm_exits"] == lazy["maps"] + lazy["unmaps"]
    assert lazy["vmm_unmap_calls"] >= lazy["unmaps"]
    assert lazy["stale_dma"] == 0

    def counts(row: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in row.items() if not k.endswith("_ns")}
    assert counts(lazy) == counts(strict)
