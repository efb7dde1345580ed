"""The compiled walk kernel (host_iommu/kernels/walk.py) against the references.

Two comparisons on random and adversarial batches (every PGTT, in/near/far/non-canonical
addresses, reads and writes, corrupted tables; host_iommu/tests' world of test_walk.py):

- against ``reference.py``'s one-request-at-a-time walker with its own plain-list PWCs
  (results, memory with A/D bits, cached structures), as test_walk.py does for ``walk``;
- against walk.py's numpy batch walker (the semantics it replaced), exactly: results, A/D
  write counts, memory, and every PWC line with its set, way and LRU stamp and the counters,
  with small paging-structure caches so that lines are evicted.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.kernels.pwc import PwcArrays
from host_iommu.walk import WalkBatch
from tests.host_iommu.test_walk import (
    apply_flips,
    build_world,
    corruptions,
    make_requests,
    run_differential,
)


def test_live_walker_is_the_kernel():
    """HostIommu's walker runs the compiled kernel (its PWCs are array state)."""
    h, _ = build_world(True)
    assert isinstance(h.walker.fl_pwc, PwcArrays) and isinstance(h.walker.sl_pwc, PwcArrays)


def test_kernel_equals_reference_with_pwcs():
    """Several batches through warm PWCs: the kernel equals reference.py request by request."""
    faulted, hits = run_differential(pwc=True, seed=11, n=400, batches=4, flips=30)
    assert faulted > 0 and hits > 50


def small_pwcs(h, entries: int, ways: int) -> None:
    h.walker.fl_pwc = PwcArrays(entries, ways, "fl")
    h.walker.sl_pwc = PwcArrays(entries, ways, "sl")


def assert_same(a, b, ra, rb) -> None:
    for name in ("hpa", "fault", "stage", "walk_refs", "order"):
        assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
    ok = ra.fault == 0
    assert np.array_equal(ra.perm[ok], rb.perm[ok])
    assert ra.ad_writes == rb.ad_writes
    assert np.array_equal(a.mem.slab[a.mem.slot_of[a.mem.slot_of >= 0]],
                          b.mem.slab[b.mem.slot_of[b.mem.slot_of >= 0]])
    for pa, pb in ((a.walker.fl_pwc, b.walker.fl_pwc), (a.walker.sl_pwc, b.walker.sl_pwc)):
        if pa is None:
            assert pb is None
            continue
        assert pa.contents(layout=True) == pb.contents(layout=True)
        assert np.array_equal(pa.counts, pb.counts)


def kernel_vs_numpy(seed: int, n: int, batches: int, flips: int, pwc: bool,
                    entries: int, ways: int, fill: bool = True) -> int:
    """Walk the same batches with walk_compiled and walk_numpy on two copies; returns how
    many requests faulted."""
    pristine, ctxs = build_world(pwc)
    rng = np.random.default_rng(seed)
    a = copy.deepcopy(pristine)
    apply_flips(a, corruptions(a, rng, flips))
    if pwc:
        small_pwcs(a, entries, ways)
    b = copy.deepcopy(a)
    faulted = 0
    for _ in range(batches):
        req = make_requests(rng, ctxs, n)
        ra = a.walker.walk_compiled(req, fill_pwc=fill)
        rb = b.walker.walk_numpy(req, fill_pwc=fill)
        assert_same(a, b, ra, rb)
        faulted += int((ra.fault != 0).sum())
        more = corruptions(a, rng, max(1, flips // 4))
        apply_flips(a, more)
        apply_flips(b, more)
    return faulted


def test_kernel_equals_numpy_walker_small_pwcs():
    """Tiny PWCs (evictions every batch): the same lines, stamps and counters as numpy."""
    faulted = kernel_vs_numpy(seed=5, n=600, batches=4, flips=40, pwc=True, entries=16, ways=4)
    assert faulted > 0


def test_kernel_equals_numpy_walker_no_fill_and_no_pwc():
    """Look-ups without fills (the bench's mode) and no PWC at all."""
    kernel_vs_numpy(seed=6, n=300, batches=2, flips=20, pwc=True, entries=64, ways=4,
                    fill=False)
    kernel_vs_numpy(seed=7, n=300, batches=2, flips=20, pwc=False, entries=0, ways=1)


def test_empty_and_single_batches():
    """Batches of 0 and 1 requests, and a batch of one context repeated (shared entries set
    A bits once per request of the level, as one gather per level does)."""
    pristine, ctxs = build_world(True)
    a, b = copy.deepcopy(pristine), copy.deepcopy(pristine)
    rng = np.random.default_rng(3)
    req = make_requests(rng, ctxs, 40)
    for sl in (slice(0, 0), slice(0, 1)):
        sub = WalkBatch(**{f: getattr(req, f)[sl] for f in req.__dataclass_fields__})
        assert_same(a, b, a.walker.walk_compiled(sub), b.walker.walk_numpy(sub))
    same = WalkBatch(**{f: np.repeat(getattr(req, f)[:1], 30) for f in req.__dataclass_fields__})
    assert_same(a, b, a.walker.walk_compiled(same), b.walker.walk_numpy(same))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pwc=st.booleans(), flips=st.integers(0, 300),
       n=st.integers(1, 150), size=st.sampled_from([(4, 4), (8, 2), (16, 4), (64, 8), (12, 3)]))
def test_kernel_vs_numpy_adversarial(seed, pwc, flips, n, size):
    """Hypothesis: heavy corruption, small batches and odd PWC geometries never separate the
    kernel from the numpy walker."""
    kernel_vs_numpy(seed, n, 3, flips, pwc, *size)
