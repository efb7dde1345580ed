"""The protocol's fast paths (host_iommu/protocol.py) against their plain forms: ``pack``
with its field names cached and EpochReport spelled out gives asdict's bytes; ``unpack``'s
whole-collection type checks of an EpochReport accept and refuse exactly what the per-item
checks did; ``merge`` joining the batches' bytes gives the lexsort of their concatenation
(non-contiguous batches and equal-but-not-identical dtypes included); batches come back
writable."""

from __future__ import annotations

from dataclasses import asdict

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import ACCESS_READ
from host_iommu.protocol import (
    OP_DMA,
    OP_DTYPE,
    EpochReport,
    ProtocolError,
    VmSetup,
    merge,
    pack,
    pack_ops,
    unpack,
    unpack_ops,
)


def _reference_report(d: dict) -> EpochReport:
    """unpack's EpochReport branch before the fast paths (the plain per-item checks)."""
    vm = d.get("vm")
    if not isinstance(vm, int) or isinstance(vm, bool) or not 0 <= vm <= 2**31 - 1:
        raise ProtocolError("vm")
    counters = d.get("counters", {})
    if not isinstance(counters, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in counters.items()):
        raise ProtocolError("counters")
    faults = d.get("faults", [])
    if not isinstance(faults, list) or not all(
            isinstance(f, list | tuple) and len(f) == 6
            and all(isinstance(x, int) for x in f) for f in faults):
        raise ProtocolError("faults")
    waits = d.get("unmap_waits", [])
    if not isinstance(waits, list) or not all(
            isinstance(w, list | tuple) and len(w) == 3
            and all(isinstance(x, int) and x >= 0 for x in w) for w in waits):
        raise ProtocolError("unmap_waits")
    return EpochReport(vm, counters, [tuple(f) for f in faults], [tuple(w) for w in waits])


scalars = st.one_of(st.integers(-3, 2**40), st.booleans(), st.just(1.5), st.just("x"),
                    st.none())


def rows(width: int):
    return st.lists(st.one_of(
        st.lists(st.integers(-2, 2**62), min_size=width, max_size=width),
        st.lists(scalars, min_size=width - 1, max_size=width + 1),
        scalars), max_size=4)


reports = st.fixed_dictionaries(
    {"vm": st.integers(0, 9)},
    optional={"counters": st.one_of(
        st.dictionaries(st.text(max_size=3), st.integers(0, 2**63 - 1) | st.booleans(),
                        max_size=6),
        st.dictionaries(st.text(max_size=3) | st.binary(max_size=2), scalars, max_size=4),
        st.lists(st.integers(-9, 9), max_size=2)),
        "faults": st.one_of(rows(6), scalars),
        "unmap_waits": st.one_of(rows(3), scalars)})


@settings(max_examples=400, deadline=None)
@given(reports)
def test_report_unpack_checks_as_the_plain_form(d: dict) -> None:
    """Whatever a frame holds, unpack accepts (with the same report) or refuses it exactly
    as the per-item checks do."""
    frame = msgpack.packb({"type": "EpochReport", **d})
    try:
        want = _reference_report(msgpack.unpackb(frame))
    except ProtocolError:
        with pytest.raises(ProtocolError):
            unpack(frame)
        return
    got = unpack(frame)
    assert got == want
    assert all(type(f) is tuple for f in got.faults + got.unmap_waits)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1),
       st.dictionaries(st.text(max_size=4), st.integers(-2**63, 2**63 - 1), max_size=5),
       st.lists(st.tuples(*[st.integers(0, 2**40)] * 6), max_size=3),
       st.lists(st.tuples(*[st.integers(0, 2**40)] * 3), max_size=3))
def test_pack_is_asdicts_bytes(vm, counters, faults, waits) -> None:
    r = EpochReport(vm, counters, faults, waits)
    assert pack(r) == msgpack.packb({"type": "EpochReport", **asdict(r)})
    assert unpack(pack(r)) == r
    s = VmSetup(max(vm, 1), 1 << 20, "nested", (1, 2), True, 5, (0x1000, 0x2000), (1, 3, 0x3000))
    assert pack(s) == msgpack.packb({"type": "VmSetup", **asdict(s)})
    assert unpack(pack(s)) == s


def _batch(rng: np.random.Generator, vm: int, n: int) -> np.ndarray:
    b = np.zeros(n, OP_DTYPE)
    b["vm"] = vm
    b["seq"] = np.arange(n) if rng.random() < 0.7 else rng.permutation(n)
    b["t_ns"] = rng.integers(0, 12, n)
    b["op"] = OP_DMA
    b["a0"] = rng.integers(0, 1 << 62, n)
    b["a2"] = ACCESS_READ
    b["a3"] = rng.integers(-5, 5, n)
    return b


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_merge_is_the_lexsort_of_the_concatenation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batches = []
    for vm in rng.permutation(6)[: rng.integers(1, 6)]:
        b = _batch(rng, int(vm) + 1, int(rng.integers(0, 25)))
        k = rng.integers(0, 4)
        if k == 1:                   # not C-contiguous
            b = np.repeat(b, 2)[::2]
        elif k == 2:                 # through the wire: OP_DTYPE's own object
            b = unpack_ops(pack_ops(b))
        elif k == 3:                 # an equal dtype that is another object
            b = b.astype(np.dtype(OP_DTYPE.descr))
        batches.append(b)
    ops = np.concatenate([b.astype(OP_DTYPE) for b in batches])
    want = ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]
    got = merge(batches)
    assert got.dtype == OP_DTYPE and got.tobytes() == want.tobytes()
    assert got.flags.writeable


def test_unpacked_batches_are_writable_copies() -> None:
    b = _batch(np.random.default_rng(0), 3, 5)
    frame = pack_ops(b)
    back = unpack_ops(frame)
    assert back.flags.writeable and back.dtype == OP_DTYPE and np.array_equal(back, b)
    back["t_ns"][0] = 99
    assert np.array_equal(unpack_ops(frame), b)
    assert unpack_ops(pack_ops(b[:0])).flags.writeable
