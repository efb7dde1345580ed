"""Compiled (numba) kernels over array state, one per hardware step; see docs/performance.md.

Each kernel has a plain-Python wrapper that prepares arrays, and a differential test against
the one-request-at-a-time reference model it must match (host_iommu/reference_cache.py, ...).
"""
