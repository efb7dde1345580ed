"""The boundary's compiled batch checks (host_iommu/kernels/wire.py) against their numpy forms:
``ops_all_valid`` against protocol._all_valid_numpy, ``ops_sorted`` against a lexsort, and
``merge`` with the sorted shortcut against the plain concatenate-and-lexsort."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, MAX_PASID
from host_iommu.protocol import (
    MAX_RETIRE_RUN,
    OP_DMA,
    OP_DTYPE,
    OP_NAMES,
    OP_UNMAP_RETIRE,
    ProtocolError,
    _all_valid,
    _all_valid_numpy,
    check_ops,
    merge,
)

# Field values around every rule's edge, and plain valid ones.
KINDS = [0, 10, 255, *sorted(OP_NAMES)]
TIMES = [-1, 0, 5, 5, 7, 1 << 40]
VMS = [-3, 0, 1, 2, 2, 3]
PASIDS = [0, 1, MAX_PASID, MAX_PASID + 1, (1 << 32) - 1]
A0 = [0, 4096, (1 << 62) - 1, 1 << 62, (1 << 64) - 1]
A1 = [0, 1, MAX_RETIRE_RUN, MAX_RETIRE_RUN + 1, (1 << 64) - 1]
A2 = [ACCESS_READ, ACCESS_WRITE, ACCESS_READ | ACCESS_WRITE, 0, 0x100 | ACCESS_READ, -1]


def _row(draw: st.DrawFn) -> tuple:
    return (draw(st.sampled_from(TIMES)), draw(st.sampled_from(VMS)),
            draw(st.integers(0, 6)), draw(st.sampled_from(KINDS)), 0,
            draw(st.sampled_from(PASIDS)), draw(st.sampled_from(A0)),
            draw(st.sampled_from(A1)), draw(st.sampled_from(A2)), -1)


@st.composite
def batches(draw: st.DrawFn, valid_bias: bool = False) -> np.ndarray:
    n = draw(st.integers(0, 12))
    rows = [_row(draw) for _ in range(n)]
    if valid_bias:   # mostly valid rows, so the "all valid" answer is exercised too
        rows = [(abs(t), max(1, v), s, OP_DMA if k not in OP_NAMES else k, 0,
                 min(p, MAX_PASID), a0, a1, a2 if k != OP_DMA else ACCESS_READ, -1)
                for t, v, s, k, _sid, p, a0, a1, a2, _a3 in rows]
    return np.array(rows, dtype=OP_DTYPE)


@settings(max_examples=400, deadline=None)
@given(st.one_of(batches(), batches(valid_bias=True)))
def test_all_valid_kernel_matches_numpy(ops: np.ndarray) -> None:
    if ops.size == 0:
        return
    want = bool(_all_valid_numpy(ops))
    assert _all_valid(ops) == want
    if want:
        assert check_ops(ops) is ops
    else:
        try:
            check_ops(ops)
        except ProtocolError:
            pass
        else:
            raise AssertionError("check_ops accepted a batch the numpy rules refuse")


def test_each_rule_is_checked() -> None:
    """One broken field at a time in an otherwise valid batch: the kernel says no."""
    base = np.array([(1, 1, 0, OP_DMA, 0, 0, 4096, 64, ACCESS_READ, -1),
                     (2, 1, 1, OP_UNMAP_RETIRE, 0, 0, 3, 2, 0, -1)], dtype=OP_DTYPE)
    assert _all_valid(base)
    for i, field, value in [(0, "op", 0), (0, "op", 200), (0, "t_ns", -1), (1, "vm", 0),
                            (0, "pasid", MAX_PASID + 1), (0, "a2", 0), (0, "a2", 3),
                            (1, "a1", 0), (1, "a1", MAX_RETIRE_RUN + 1), (1, "a0", 1 << 62)]:
        bad = base.copy()
        bad[field][i] = value
        assert not _all_valid(bad), (field, value)
        assert not _all_valid_numpy(bad), (field, value)


def _plain_merge(parts: list[np.ndarray]) -> np.ndarray:
    ops = np.concatenate(parts)
    return ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 3), st.integers(0, 3)),
                         max_size=8), min_size=1, max_size=3))
def test_merge_matches_lexsort(parts: list[list[tuple[int, int, int]]]) -> None:
    """Sorted or not, with ties and repeated keys: merge gives the lexsort's order, bytes
    for bytes (the sorted shortcut returns the concatenation, which the stable sort keeps)."""
    arrays = []
    for k, rows in enumerate(parts):
        a = np.zeros(len(rows), dtype=OP_DTYPE)
        for i, (t, vm, seq) in enumerate(rows):
            a[i] = (t, vm, seq, OP_DMA, 0, 0, k, i, ACCESS_READ, -1)
        arrays.append(a)
    got = merge(arrays)
    want = _plain_merge(arrays)
    assert got.tobytes() == want.tobytes()
