"""Compiled (numba) guest-side kernels over array state; see docs/performance.md.

The guest's hot state (IOVA allocator, flush queues, page tables) held in numpy arrays and
worked on by ``@njit(cache=True)`` functions that a whole-VM-epoch kernel can call directly.
Each has a plain-Python wrapper with the interface of the object it stands in for, and a
differential test against the one-call-at-a-time reference (vm_agent/reference_iova.py,
vm_agent/reference_flushq.py, host_iommu/pgtable.py).
"""
