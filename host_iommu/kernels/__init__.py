"""Compiled (numba) kernels over array state, one per hardware step; see docs/performance.md.

Each kernel has a plain-Python wrapper that prepares arrays, and a differential test against
the one-request-at-a-time reference model it must match (host_iommu/reference_cache.py,
host_iommu/reference.py): ``iotlb.py`` (IOTLB), ``pwc.py`` (paging-structure caches),
``devtlb.py`` (device-TLBs), ``walk.py`` (first-level, second-level and nested walks) and
``translate.py`` (a batch of DMA translations after the context stage), ``entrycache.py``
(context and PASID caches) and ``qiq.py`` (the invalidation queue's tail write and the host's
pending invalidation effects, applied through the cache kernels; against
host_iommu/reference_qi.py). All are on HostIommu's live path;
``IommuParams.with_engine("reference")`` runs the references instead.

Compiled code is cached (``cache=True``) in this folder's __pycache__. numba checks only the
file that defines a cached function, not the kernels it calls from other files: after editing
a kernel in iotlb.py, pwc.py or devtlb.py, delete host_iommu/kernels/__pycache__, or the
cached code of walk.py, translate.py and qiq.py keeps the old callee. Calls between kernels
pass no literal constants (``np.int64(5)``, not ``5``): numba compiles a callee once per
literal value.
"""
