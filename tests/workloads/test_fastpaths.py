"""Fast paths of the workload models and the op log against the plain code they replace:
``scattered_segments`` against ``merge_contiguous(scattered_pages(...))``, ``SizeSampler``
against numpy's searchsorted, and ``OpLog`` against a structured-row store per operation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.protocol import OP_DTYPE, OpLog
from workloads.nic import SizeSampler
from workloads.nvme import merge_contiguous, scattered_pages, scattered_segments

PAGE = 4096


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 20), st.integers(1, 40 * PAGE),
       st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=40, max_size=40),
       st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), st.booleans())
def test_scattered_segments_equal_pages_then_merge(gpa_page, nbytes, draws, contiguity,
                                                   aligned):
    """Page-aligned or not, any size and any draws: the same segments, in the same order."""
    gpa = gpa_page * PAGE + (0 if aligned else 512)
    arr = np.array(draws)
    want = merge_contiguous(scattered_pages(gpa, nbytes, arr, contiguity))
    assert scattered_segments(gpa, nbytes, arr, contiguity) == want
    assert scattered_segments(gpa, nbytes, draws, contiguity) == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(60, 9000), min_size=1, max_size=5),
       st.lists(st.floats(0.0, 10.0), min_size=5, max_size=5), st.integers(0, 2**32))
def test_size_sampler_draws_as_searchsorted(sizes, weights, seed):
    """Each draw is sizes[searchsorted(cdf, u, 'right')], clipped, from one rng.random()."""
    weights = weights[:len(sizes)]
    if sum(weights) <= 0.0:
        weights = [1.0] * len(sizes)
    s = SizeSampler(sizes, weights)
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(50):
        i = int(np.searchsorted(s.cdf, b.random(), side="right"))
        assert s.draw(a) == int(s.sizes[min(i, len(s.sizes) - 1)])
    assert a.random() == b.random()                 # the same stream consumed


def _row_store(vm: int, seq0: int, rows: list[tuple]) -> np.ndarray:
    """The log as it was: one structured-row store per operation."""
    buf = np.zeros(len(rows), dtype=OP_DTYPE)
    for i, (t, op, sid, pasid, a0, a1, a2, a3) in enumerate(rows):
        buf[i] = (t, vm, seq0 + i, op, sid, pasid, a0, a1, a2, a3)
    return buf


u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
row = st.tuples(st.integers(0, 2**62), st.integers(1, 9), st.integers(0, 0xFFFF),
                st.integers(0, 2**20 - 1), u64, u64, i64, i64)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(row, max_size=12), min_size=1, max_size=4), st.integers(1, 99))
def test_oplog_columns_equal_row_stores(epochs, vm):
    """Over several epochs (take between them), every field of every operation, full 64-bit
    ranges included, equals what per-row stores into OP_DTYPE give."""
    log = OpLog(vm)
    seq0 = 0
    for rows in epochs:
        for r in rows:
            log.add(*r)
        assert log.n == len(rows) and log.seq == seq0 + len(rows)
        got = log.take()
        assert got.dtype == OP_DTYPE
        assert got.tobytes() == _row_store(vm, seq0, rows).tobytes()
        seq0 += len(rows)


def test_pack_bytes_equal_asdict():
    """pack() writes the bytes msgpack gives for {"type", **asdict(msg)}."""
    import dataclasses

    import msgpack

    from host_iommu.protocol import EpochReport, VmSetup, pack

    msgs = [VmSetup(3, 1 << 26, "nested", (0x300, 0x301), True, 5, (0x1000, 0x2000),
                    (0x300, 1, 0x3000)),
            EpochReport(3, {"iotlb_hits": 7, "faults": 0}, [(1, 2, 3, 4, 5, 6)], [(9, 1, 70)]),
            EpochReport(1)]
    for m in msgs:
        assert pack(m) == msgpack.packb({"type": type(m).__name__, **dataclasses.asdict(m)})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(-3, 3), st.integers(-1, 2),
                          st.integers(0, 2**21), st.integers(0, 0x3FF),
                          st.integers(0, 2**17), st.integers(0, 2**63)), max_size=6))
def test_check_ops_names_what_isin_named(rows):
    """check_ops refuses the same batches, with the same message, as its np.isin form."""
    import pytest

    from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, MAX_PASID
    from host_iommu.protocol import OP_DMA, OP_NAMES, ProtocolError, bad_retire, check_ops

    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    for i, (op, t, vm, pasid, a2, a1, a0) in enumerate(rows):
        ops[i] = (t, vm, i, op, 0, pasid, a0, a1, a2, -1)
    bad = {
        "unknown operation kind": ~np.isin(ops["op"], np.array(sorted(OP_NAMES))),
        "negative time": ops["t_ns"] < 0,
        "VM id below 1": ops["vm"] < 1,
        "PASID wider than 20 bits": ops["pasid"] > MAX_PASID,
        "DMA access neither read nor write": (ops["op"] == OP_DMA) & ~np.isin(
            ops["a2"] & 0xFF, (ACCESS_READ, ACCESS_WRITE)),
        "unmap retire run out of range": bad_retire(ops),
    }
    first = next(((w, int(np.argmax(m))) for w, m in bad.items() if m.any()), None)
    if first is None:
        assert check_ops(ops) is ops
    else:
        with pytest.raises(ProtocolError, match=f"operation {first[1]} of the batch: "
                                                f"{first[0]}"):
            check_ops(ops)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 4), st.integers(0, 50)),
                         max_size=10), max_size=5))
def test_merge_equals_concatenate_lexsort(batches_rows):
    """merge() gives, byte for byte, concatenate + lexsort((seq, vm, t_ns)) + fancy index,
    whatever the batches hold (repeated keys, several VMs in one batch, empty batches)."""
    from host_iommu.protocol import merge

    batches = []
    for rows in batches_rows:
        b = np.zeros(len(rows), dtype=OP_DTYPE)
        for i, (t, vm, seq) in enumerate(rows):
            b[i] = (t, vm, seq, 2, 1, 0, i, 8, 1, -1)
        batches.append(b)
    if not batches:
        assert merge(batches).size == 0
        return
    ops = np.concatenate(batches)
    want = ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]
    got = merge(batches)
    assert got.dtype == OP_DTYPE and got.tobytes() == want.tobytes()
    assert merge([b[::2] for b in batches]).tobytes() == merge(
        [b[::2].copy() for b in batches]).tobytes()        # strided views too
