"""Device-TLB (ATS translation cache) lookup, fill and invalidation on compiled kernels.

VT-d spec 6.2.7 and PCIe ATS: the device-TLBs of all ATS devices in one set-associative
store keyed (source-id, PASID, page number at the entry's size, size), as host_iommu/iotlb.py's
DeviceTLB. The IOTLB kernels (host_iommu/kernels/iotlb.py) do the work with the source-id in
the DID field; ``inv`` is descriptor 0x3 (the device's requests without PASID) or 0x8 (one
PASID, or every PASID with the global flag: pasid None) over a byte range. Checked against
host_iommu/reference_cache.py's RefDeviceTLB; HostIommu's live device-TLBs (iommu.py
CacheSet, host_iommu/kernels/translate.py).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from host_iommu.kernels.iotlb import (
    F_DID,
    F_HPA,
    F_ORDER,
    F_PASID,
    F_PERM,
    F_VPN,
    MAX_PFN,
    IotlbArrays,
    _inv_range,
    line_contents,
)


class DeviceTlbArrays(IotlbArrays):
    """Device-TLBs in arrays; the interface of RefDeviceTLB (lookup, fill, inv, inv_global).
    The IOTLB's lines with the source-id in the DID field and no PGTT."""

    def lookup(self, sid: ArrayLike, pasid: ArrayLike, addr: ArrayLike
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hit, hpa, perm, order) per request; zeros where it missed."""
        return super().lookup(sid, pasid, addr)[:4]

    def fill(self, sid: ArrayLike, pasid: ArrayLike, addr: ArrayLike, order: ArrayLike,
             hpa_page: ArrayLike, perm: ArrayLike, pgtt: ArrayLike = 0) -> None:
        """Cache translation completions the device received (hpa_page: the page's base)."""
        super().fill(sid, pasid, addr, order, hpa_page, perm, 0)

    def inv(self, sid: int, pasid: int | None, addr: int, size_bytes: int) -> int:
        """Drop entries of device ``sid`` (and ``pasid`` unless None) meeting the byte range."""
        if int(size_bytes) <= 0 or not 0 <= int(addr) < 1 << 64 or not 0 <= int(sid) <= 0xFFFF:
            raise ValueError(f"invalid device-TLB invalidation sid={sid!r} addr={addr!r} "
                             f"size_bytes={size_bytes!r}")
        lo = int(addr) >> 12
        hi = min((int(addr) + int(size_bytes) - 1) >> 12, MAX_PFN)
        return int(_inv_range(self.state, self.counts, False, np.uint64(sid), pasid is None,
                              np.uint64(pasid or 0), np.uint64(lo), np.uint64(hi),
                              np.uint64(0)))

    def inv_global(self) -> int:
        """Every entry of every device."""
        return super().inv_global()

    def contents(self, layout: bool = False) -> list[tuple[int, ...]]:
        """Valid lines as ((set, way, stamp,)? sid, pasid, vpn_at_order, order, hpa_page,
        perm), sorted: RefSetAssoc.contents' format for the device-TLB key."""
        return line_contents(self.state, (F_DID, F_PASID, F_VPN, F_ORDER, F_HPA, F_PERM),
                             layout)
