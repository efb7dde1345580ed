"""ArrayOracle (the oracle over one shared buffer and a spill table, host_iommu/oracle.py and
host_iommu/kernels/oracle.py) against the plain Oracle, and the epoch kernel's compiled
reads and records (kernels/epoch.py _ora_get, _ora_can_set, _ora_set) against both.

Every step of a random, hostile sequence (ids far past the dense range, past 2^63, retired
in runs and one by one, several VMs, times out of order) must give the same answers, and the
same mapping of return times, as Oracle does.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.kernels import epoch as ek
from host_iommu.oracle import ArrayOracle, Oracle

ids = st.one_of(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 1 << 41),
                st.integers((1 << 63) - 2, (1 << 64) - 1))
steps = st.lists(st.one_of(
    st.tuples(st.just("ret"), st.integers(1, 3), ids, st.integers(0, 1 << 40)),
    st.tuples(st.just("ask"), st.integers(1, 4), ids, st.integers(0, 1 << 40)),
    st.tuples(st.just("runs"), st.integers(1, 3), st.integers(0, 3000), st.integers(1, 700)),
    st.tuples(st.just("retire"), st.integers(1, 3), st.integers(0, 3000), st.integers(1, 40)),
    st.tuples(st.just("kernel"), st.integers(1, 4), ids, st.integers(0, 1 << 40)),
    st.tuples(st.just("check"), st.integers(1, 3), st.integers(0, 3000), st.integers(0, 1 << 40)),
), min_size=1, max_size=120)


def _same(plain: Oracle, arr: ArrayOracle) -> None:
    assert dict(plain.returned) == dict(arr.returned)
    assert len(plain.returned) == len(arr.returned)
    for vm, times in plain._vms.items():
        other = arr._vms[vm]
        assert (times.base, times.ret.size, len(times.spill)) == (
            other.base, other.ret.size, len(other.spill))
        assert np.array_equal(times.ret, other.ret)
        assert dict(times.spill) == dict(other.spill.items())


@settings(max_examples=200, deadline=None)
@given(steps)
def test_array_oracle_is_the_oracle(seq):
    plain, arr = Oracle(), ArrayOracle()
    for kind, vm, a, b in seq:
        if kind == "ret":
            plain.unmap_returned(vm, a, b)
            arr.unmap_returned(vm, a, b)
        elif kind == "ask":
            assert plain.returned_at(vm, a) == arr.returned_at(vm, a)
        elif kind == "runs":
            assert plain.retire_runs(vm, [(a, b), (a + 2 * b, 3)]) == arr.retire_runs(
                vm, [(a, b), (a + 2 * b, 3)])
        elif kind == "retire":
            u = list(range(a, a + b, 3))
            assert plain.retire(vm, u) == arr.retire(vm, u)
        elif kind == "check":
            uid = np.array([a, a + 1, -1, a + 5000], dtype=np.int64)
            t = np.full(4, b, dtype=np.int64)
            ok = np.array([True, True, True, False])
            vms = np.full(4, vm, dtype=np.int64)
            s0, w0 = plain.check(vms, uid, t, ok)
            s1, w1 = arr.check(vms, uid, t, ok)
            assert np.array_equal(s0, s1) and np.array_equal(w0, w1)
        else:   # the kernel's read and record, where it may record
            f = arr.flat
            key = a - (1 << 64) if a >= 1 << 63 else a
            if key < 0:
                continue     # the kernel leaves such ids to Python
            got = ek._ora_get(f.seg, f.data, f.spk, f.spv, vm, key)
            want = plain.returned_at(vm, a)
            assert got == (-1 if want is None else want)
            if ek._ora_can_set(f.seg, f.spk, f.spm, vm, key):
                ek._ora_set(f.seg, f.data, f.spk, f.spv, f.spm, vm, key, b)
                plain.unmap_returned(vm, a, b)
        _same(plain, arr)


def test_spill_table_grows_and_forgets():
    """Thousands of far ids spill, are asked about, and are retired: the table grows, and a
    VM's retired ids leave it (only live keys are refilled)."""
    plain, arr = Oracle(), ArrayOracle()
    far = [(1 << 40) + 7 * i for i in range(3000)]
    for i, u in enumerate(far):
        for o in (plain, arr):
            o.unmap_returned(1 + i % 2, u, 10 + i)
    assert arr.flat.spk.shape[0] >= 4096
    assert all(plain.returned_at(1 + i % 2, u) == arr.returned_at(1 + i % 2, u)
               for i, u in enumerate(far))
    for vm in (1, 2):
        assert plain.retire(vm, far) == arr.retire(vm, far)
    _same(plain, arr)
    assert len(arr.returned) == 0 and arr.flat.spm[1] == 0


def test_trim_moving_more_ids_than_the_spill_table_holds():
    """A retire whose trim moves more long-lived ids to the spill table than it has room
    for: the compiled retire leaves the trim to Python, which grows the table; the same
    state as Oracle's."""
    plain, arr = Oracle(), ArrayOracle()
    for o in (plain, arr):
        for u in range(8192):
            o.unmap_returned(1, u, 100 + u)
    keep = set(range(0, 4096, 41))             # 100 long-lived ids in the first half
    runs = [(u, 1) for u in range(8192) if u not in keep and u < 6000]
    assert plain.retire_runs(1, runs) == arr.retire_runs(1, runs)
    assert len(plain._vms[1].spill) == len(keep) > 48
    _same(plain, arr)
