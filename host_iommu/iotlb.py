"""Translation caches: the numbers their implementations share, and their error.

VT-d spec chapter 6 "Caching Translation Information". The live caches are compiled kernels
over array state (host_iommu/kernels/iotlb.py, pwc.py, devtlb.py) and the context and PASID
caches (host_iommu/entrycache.py); host_iommu/reference_cache.py is their slow, obvious
model. They share no code, only the pure numbers below: the set-placement hash multiplier
(placement is a pure function of the key, so the fast caches and the references put a key in
the same set) and the context-cache function mask of descriptor 0x1.
"""

from __future__ import annotations

# --- Set-index hashing (a fixed constant: placement is a pure function of the key) ----------
# The non-page key fields are mixed in key order, h = ((h ^ k) * SET_MIX) mod 2^64, then
# h ^= h >> 32; the page field (if any) is XORed in last and the set is h modulo the sets, so
# consecutive pages of one context fall in consecutive sets.
SET_MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier

# Context-cache device-selective invalidation, function mask FM (VT-d spec 6.5.2.1; QEMU
# vtd_context_device_invalidate): FM 0 masks no SID bit, 1 bit 2, 2 bits 2:1, 3 bits 2:0.
CC_FM_SID_MASK = {0: 0x0, 1: 0x4, 2: 0x6, 3: 0x7}


class CacheError(ValueError):
    """A cache was built or called with invalid arguments (a bug in the caller)."""
