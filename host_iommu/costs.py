"""The cost model: modelled nanoseconds for every operation that advances virtual time.

Like gem5's DRAM timings, one named field per cost, each with its source. Counts in results
are exact; times are modelled from these numbers and reported as modelled. The calibration
point is Amit, Ben-Yehuda, Tsafrir, Schuster, "vIOMMU: Efficient IOMMU
Emulation", USENIX ATC 2011: about 6,900 cycles to map+unmap a page strictly on bare metal and
about 35,000 cycles under trap-and-emulate (at 3 GHz: 2.3 us and 11.7 us). The defaults below
split those totals into their parts so that the bare-metal strict (un)map and the shadow
(un)map land near the published figures (see tests/host_iommu/test_costs.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class CostModel:
    """Modelled costs in ns. Field names are the `[cost]` config keys."""

    # --- guest CPU work (bare-metal Linux intel-iommu / dma-iommu paths) -------------------
    # IOVA allocation from the per-CPU rcache (iova.c alloc_iova_fast hit): a few hundred cycles.
    iova_alloc_fast_ns: int = 60
    # IOVA allocation from the rbtree (rcache miss): ~1,000-3,000 cycles in Amit et al.'s profile.
    iova_alloc_slow_ns: int = 600
    iova_free_ns: int = 50
    # One page-table entry write by the guest driver (a cached store plus clflush when the
    # IOMMU is not coherent; Linux domain_flush_cache). Per PTE.
    pte_write_ns: int = 15
    # Fixed driver overhead per map or unmap call (iommu_map/iommu_unmap bookkeeping).
    dma_call_ns: int = 250
    # Building and writing one QI descriptor plus the tail-register MMIO write (qi_submit_sync).
    qi_submit_ns: int = 300
    # Hardware time to process one invalidation descriptor (IOTLB/PASID-cache invalidation);
    # part of the ~6,900-cycle strict (un)map on bare metal.
    qi_desc_ns: int = 700
    # Polling for the wait descriptor's status write once everything before it completed.
    qi_wait_ns: int = 200
    # Device-TLB (ATS) invalidation round trip: request to the device and its completion
    # message over PCIe (PCIe ATS spec; measured at a few microseconds on NICs).
    devtlb_inv_ns: int = 2_000

    # --- virtualization ----------------------------------------------------------------------
    # VM exit to the VMM in user space and back (KVM MMIO exit + QEMU dispatch + VM entry).
    vm_exit_ns: int = 4_500
    # VMM trap handling of one IOTLB invalidation: decode, walk the guest range (QEMU
    # vtd_iotlb_page_invalidate / vtd_page_walk), excluding the VFIO calls it makes.
    vmm_trap_ns: int = 1_500
    # VFIO_IOMMU_MAP_DMA: ioctl plus host IOMMU map, excluding pinning (drivers/vfio).
    vfio_map_ns: int = 2_000
    # Pinning one 4-KiB page (pin_user_pages_remote + accounting), per page.
    pin_page_ns: int = 250
    # VFIO_IOMMU_UNMAP_DMA: ioctl, host unmap, host IOTLB flush and unpin, per call.
    vfio_unmap_ns: int = 2_500
    # iommufd IOMMU_HWPT_INVALIDATE: ioctl plus host QI submission for one request array.
    hwpt_invalidate_ns: int = 1_200
    # Reading one guest page-table entry by the VMM while shadowing (a guest memory read).
    vmm_pte_read_ns: int = 20

    # --- translation (device side) -----------------------------------------------------------
    # IOTLB hit: added to a DMA's latency.
    iotlb_hit_ns: int = 5
    # One page-walk memory reference (a DRAM access, ~90 ns on current servers).
    mem_ref_ns: int = 90
    # Device-TLB hit: the device uses a translated address, no IOMMU look-up.
    devtlb_hit_ns: int = 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
