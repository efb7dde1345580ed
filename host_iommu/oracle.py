"""The security oracle: was a DMA allowed to reach the page it reached?

DESIGN.md section 3. Every DMA carries, from the guest, the id of the unmap that last covered
its target page (or -1 while the page is mapped). A DMA that the IOMMU let through after that
unmap *returned* is stale: the device used a translation the guest had already torn down (a
lazily flushed IOTLB entry, a device-TLB entry, or a missing invalidation). Its window is the
virtual time from the unmap's return to the DMA. The return time of a strict unmap is the later
of the guest's own return and the host's completion of the invalidation it caused (a VFIO
unmap or an IOMMU_HWPT_INVALIDATE blocks until then). Cross-VM DMA (reaching a frame the VM
does not own) is checked by the caller against the frame owner map.

State stays bounded when the guest retires unmap ids (``retire``): an id no page carries any
more (each page it covered was mapped again or covered by a later unmap) can never be asked
about again, so dropping it changes no result.
"""

from __future__ import annotations

import numpy as np


class Oracle:
    """Unmap return times per (vm, unmap id), and the stale check for a batch of DMAs."""

    def __init__(self) -> None:
        self.returned: dict[tuple[int, int], int] = {}

    def unmap_returned(self, vm: int, unmap_id: int, t_ns: int) -> None:
        if unmap_id < 0:
            return
        key = (vm, unmap_id)
        self.returned[key] = max(self.returned.get(key, 0), t_ns)

    def retire(self, vm: int, unmap_ids: np.ndarray | list[int]) -> int:
        """Forget the return times of ``unmap_ids`` of ``vm``; returns how many were held.

        The caller (the guest side, which alone knows which IOVA pages an id still tags)
        retires an id only once no page carries it and every DMA stamped with it has been
        checked: from then on no DMA can ask about it, so results are unchanged.
        """
        pop = self.returned.pop
        return sum(pop((vm, int(u)), None) is not None for u in np.atleast_1d(unmap_ids))

    def check(self, vm: np.ndarray, unmap_id: np.ndarray, t_ns: np.ndarray, ok: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(stale, window_ns) per DMA: translated successfully after its page's unmap returned.

        A DMA whose unmap has not been seen returning yet is in flight, never stale.
        """
        stale = np.zeros(t_ns.size, dtype=bool)
        window = np.zeros(t_ns.size, dtype=np.int64)
        idx = np.flatnonzero(ok & (unmap_id >= 0))
        if idx.size:
            get = self.returned.get
            ret = np.array([get((int(v), int(u)), -1) for v, u in
                            zip(vm[idx].tolist(), unmap_id[idx].tolist(), strict=True)],
                           dtype=np.int64)
            late = (ret >= 0) & (t_ns[idx] > ret)
            stale[idx[late]] = True
            window[idx[late]] = t_ns[idx][late] - ret[late]
        return stale, window
