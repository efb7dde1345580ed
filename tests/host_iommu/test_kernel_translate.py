"""The compiled translate kernel (host_iommu/kernels/translate.py) against the numpy steps.

HostIommu.translate (context stage in Python, the rest one kernel call) and
HostIommu.translate_numpy (the same steps spelled out with numpy, the previous live path)
run the same random batches on two copies of one host: several devices (one with ATS),
PASIDs bound nested, second-level-only and pass-through, unbound PASIDs, unattached and
malformed ids, duplicate pages (coalesced walks), reads and writes, small caches, and
invalidations between batches. Results, device-TLB hits, statistics, the fault log, every
cache line with its LRU stamp and counters, and memory must be equal.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import MAX_PASID, PAGE_SIZE, PGTT_PT, PGTT_SL_ONLY
from host_iommu.pasid import PasidEntry
from tests.host_iommu.conftest import DATA_GPA, IOVA, SID, make_env

ATS_SID = 0x108
SIDS = [SID, ATS_SID, 0x110, 0x1_0000 + 3]     # 0x110: never attached; the last: malformed


def make_host(iotlb_entries: int, pwc: bool):
    env = make_env(iotlb_entries=iotlb_entries, pwc=pwc)
    h = env.h
    env.bind(SID, 1, env.new_fl())          # an empty first level: every walk faults
    h.attach_device(ATS_SID, env.vm.vm, ats=True)
    ro = env.new_fl()        # the ATS device's pages: read-only and writable halves
    ro.map(IOVA, DATA_GPA, 24 * PAGE_SIZE, write=False)
    ro.map(IOVA + 24 * PAGE_SIZE, DATA_GPA + 24 * PAGE_SIZE, 24 * PAGE_SIZE)
    env.bind(ATS_SID, 0, ro)
    h.set_pasid_entry(SID, 2, PasidEntry(pgtt=PGTT_SL_ONLY, did=env.vm.did,
                                         slptr=env.vm.sl.root, sl_levels=env.vm.sl.levels))
    h.set_pasid_entry(SID, 3, PasidEntry(pgtt=PGTT_PT, did=h.alloc_did()))
    return h


def batch(rng: np.random.Generator, n: int):
    sid = np.array(SIDS, np.int64)[rng.choice(len(SIDS), n, p=[0.5, 0.3, 0.1, 0.1])]
    pasid = rng.choice(np.array([0, 0, 0, 0, 0, 1, 2, 3, 5, MAX_PASID + 1], np.int64), n)
    page = rng.integers(0, 48, n)                     # few pages: duplicates and hits
    base = np.where(pasid == 2, DATA_GPA, IOVA).astype(np.uint64)
    addr = base + (page.astype(np.uint64) * np.uint64(PAGE_SIZE)) + \
        rng.integers(0, PAGE_SIZE // 8, n).astype(np.uint64) * np.uint64(8)
    far = rng.random(n) < 0.05
    addr[far] = rng.integers(0, 1 << 62, int(far.sum())).astype(np.uint64)
    access = rng.integers(1, 3, n).astype(np.uint8)
    return sid, pasid, addr, access, np.arange(n, dtype=np.int64) * 10


def caches_state(h) -> list:
    c = h.caches
    out = [c.iotlb.state.copy(), c.iotlb.counts.copy(), c.dtlb.state.copy(),
           c.dtlb.counts.copy()]
    for pwc in (c.fl_pwc, c.sl_pwc):
        if pwc is not None:
            out += [pwc.state.copy(), pwc.counts.copy()]
    for ec in (c.pasidc.cache, c.ctxc.cache):
        out.append(repr((ec.lines, ec.clock, ec.counters())))
    return out


def compare(a, b) -> None:
    for x, y in zip(caches_state(a), caches_state(b), strict=True):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y
    assert vars(a.stats) == vars(b.stats)
    fa, fb = a.faults.columns(), b.faults.columns()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k
    assert np.array_equal(a.mem.slab, b.mem.slab)


def run(seed: int, iotlb_entries: int, pwc: bool, sizes: list[int]) -> int:
    a = make_host(iotlb_entries, pwc)
    b = copy.deepcopy(a)
    rng = np.random.default_rng(seed)
    faulted = 0
    for n in sizes:
        req = batch(rng, n)
        ra = a.translate(*req)
        rb = b.translate_numpy(*req)
        assert np.array_equal(ra, rb)
        assert np.array_equal(a.last_devtlb_hit, b.last_devtlb_hit)
        compare(a, b)
        faulted += int((ra["fault"] != 0).sum())
        kind, page, am = (int(x) for x in rng.integers(0, [4, 48, 4]))
        did = a.iotlb.contents()[0][0] if a.iotlb.occupancy() else 1
        for h in (a, b):      # an invalidation between batches, the same on both
            if kind == 1:
                h.caches.piotlb_page(did, 0, IOVA + page * PAGE_SIZE, am, False)
            elif kind == 2:
                h.caches.devtlb(ATS_SID, 0, IOVA, 16 * PAGE_SIZE)
            elif kind == 3:
                h.caches.pasid_cache(0, 0, 0)   # 0x7 domain-selective of DID 0: nothing
        rng = np.random.default_rng(int(rng.integers(0, 1 << 32)))
    return faulted


def test_kernel_equals_numpy_steps():
    """Batches of 1 to 700 requests through a small IOTLB and PWCs."""
    assert run(1, 32, True, [1, 3, 40, 700, 2, 150, 64]) > 0


def test_kernel_equals_numpy_without_iotlb_or_pwc():
    """No IOTLB (followers walk themselves) and no PWC."""
    run(2, 0, False, [5, 200, 31])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), iotlb=st.sampled_from([0, 8, 32, 1024]),
       pwc=st.booleans(), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5))
def test_kernel_vs_numpy_random(seed, iotlb, pwc, sizes):
    """Hypothesis: random geometries and batch sizes never separate the two."""
    run(seed, iotlb, pwc, sizes)
