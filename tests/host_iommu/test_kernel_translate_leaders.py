"""translate.py's _leaders (the coalescing of a batch's IOTLB misses) against a dict.

The leader of a request is the first request, by position, with its (DID, PASID, 4-KiB page,
access); _leaders finds it with an open-addressing table (host_iommu/kernels/translate.py).
Checked on hypothesis batches of narrow key ranges (many groups, long probe chains, keys
that differ in one field only) and on the bench's shape (every page distinct).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.kernels.translate import _leaders


def reference(did, pasid, page, access) -> np.ndarray:
    first: dict[tuple[int, int, int, int], int] = {}
    out = []
    for k, key in enumerate(zip(did.tolist(), pasid.tolist(), page.tolist(), access.tolist(),
                                strict=True)):
        out.append(first.setdefault(key, k))
    return np.array(out, dtype=np.int64)


def check(did, pasid, page, access) -> None:
    cols = [np.ascontiguousarray(c, dtype=np.int64) for c in (did, pasid, page, access)]
    assert np.array_equal(_leaders(*cols), reference(*cols))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 400),
       spans=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 64),
                       st.integers(1, 2)))
def test_leaders_match_first_positions(seed, n, spans):
    rng = np.random.default_rng(seed)
    did, pasid, page, access = (rng.integers(0, s, n) for s in spans)
    check(did + 1, pasid << 19, page + (1 << 39), access + 1)


def test_leaders_distinct_and_colliding_keys():
    n = 5000
    rng = np.random.default_rng(2)
    check(np.full(n, 7), np.zeros(n), rng.permutation(n) + (1 << 18), np.ones(n))
    # keys equal but for one field, the fields' bits overlapping in the hash's key
    page = np.repeat(np.arange(50), 8)
    did = np.tile([1, 1, 2, 2, 1 << 12, 1 << 12, 3, 3], 50)
    pasid = np.tile([0, 1 << 20, 0, 1, 0, 1 << 8, 0, 0], 50)
    access = np.tile([1, 1, 1, 1, 1, 1, 1, 2], 50)
    check(did, pasid, page, access)
    check(did[::-1], pasid[::-1], page[::-1], access[::-1])
