"""DomainRecord's range queries (host_iommu/vfio.py any_in, pages_in, put_run: kernels/vfio.py
rec_any_in, rec_pages_in, rec_put_run) against the iteration forms vfio_map / vfio_unmap used
before (any() over every key, sorted() of the keys in range, one __setitem__ per page), on
records shared by several containers, across growth, for ranges shorter and longer than
the record (probe and scan)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.vfio import DomainRecord, VfioRecord

op = st.tuples(st.sampled_from(["put", "put", "del", "query"]),
               st.integers(0, 2),                   # container
               st.integers(0, 300),                 # first page
               st.sampled_from([1, 1, 2, 3, 7, 16, 64, 200, 600, 5000]))  # pages


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([8, 16, 64, 1024]), st.lists(op, max_size=40))
def test_range_queries_match_iteration(cap, ops):
    rec = VfioRecord(cap)
    doms = [DomainRecord(rec, did) for did in (3, 4, 9)]
    refs: list[dict[int, int]] = [{}, {}, {}]
    twin = VfioRecord(cap)                 # the same puts one __setitem__ at a time
    twins = [DomainRecord(twin, did) for did in (3, 4, 9)]
    for kind, c, p0, n in ops:
        d, ref, t = doms[c], refs[c], twins[c]
        assert d.any_in(p0, n) == any(p0 <= p < p0 + n for p in ref)
        assert d.pages_in(p0, n) == sorted(p for p in ref if p0 <= p < p0 + n)
        if kind == "put":
            n = min(n, 64)
            if not any(p0 <= p < p0 + n for p in ref):       # vfio_map: only free ranges
                d.put_run(p0, 1000 + p0, n)
                t.update(zip(range(p0, p0 + n), range(1000 + p0, 1000 + p0 + n),
                             strict=True))
                ref.update(zip(range(p0, p0 + n), range(1000 + p0, 1000 + p0 + n),
                               strict=True))
        elif kind == "del":
            for p in d.pages_in(p0, n):
                assert d.pop(p) == ref.pop(p)
                del t[p]
        for x, r, y in zip(doms, refs, twins, strict=True):
            assert len(x) == len(r) == len(y)
        assert rec.keys.size == twin.keys.size and int(rec.held[0]) == int(twin.held[0])
        assert np.array_equal(rec.count, twin.count)
    for x, r, y in zip(doms, refs, twins, strict=True):
        assert dict(x) == r == dict(y) and list(x) == sorted(r)


def test_range_edges_probe_and_scan():
    """Keys just outside and just inside [p0, p0 + n), for n below and above the capacity."""
    for n in (5, 20, 100, 1000):
        rec = VfioRecord(8)
        d, other = DomainRecord(rec, 2), DomainRecord(rec, 3)
        p0 = 50
        other.put_run(p0, 0, 3)                     # another container's keys in range
        for p in (p0 - 1, p0 + n):
            d.put_run(p, 7, 1)
        assert (n <= rec.keys.size) == (n == 5)     # probe; else scan the record
        assert not d.any_in(p0, n) and d.pages_in(p0, n) == []
        d.put_run(p0 + n - 1, 8, 1)
        assert d.any_in(p0, n) and d.pages_in(p0, n) == [p0 + n - 1]
        d.put_run(p0, 9, 1)
        assert d.pages_in(p0, n) == [p0, p0 + n - 1]
        assert d.pages_in(p0 - 1, n + 2) == [p0 - 1, p0, p0 + n - 1, p0 + n]


def test_empty_and_out_of_key_space():
    rec = VfioRecord(8)
    d = DomainRecord(rec, 5)
    assert not d.any_in(0, 1 << 50) and d.pages_in(0, 1 << 50) == []
    d.put_run(10, 20, 3)
    assert d.any_in(12, 1) and not d.any_in(13, 1 << 50 - 13)
    assert d.any_in(0, 1 << 50) and d.pages_in(0, 1 << 50) == [10, 11, 12]
    assert d.pages_in(11, 1 << 46) == [11, 12]
    assert not d.any_in(13, 0) and d.pages_in(9, 0) == []
    assert dict(d) == {10: 20, 11: 21, 12: 22}
