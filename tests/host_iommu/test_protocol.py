"""The guest<->host protocol (host_iommu/protocol.py): operation logs, the merge order that
makes a run independent of arrival order, and the wire encodings of batches and messages."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.protocol import (
    OP_DMA,
    OP_DTYPE,
    OP_GUEST_WRITE,
    OP_NAMES,
    OP_UNMAP_RET,
    EpochReport,
    OpLog,
    ProtocolError,
    VmSetup,
    merge,
    pack,
    pack_ops,
    unpack,
    unpack_ops,
)


def log_of(vm: int, times: list[int]) -> OpLog:
    log = OpLog(vm, capacity=2)
    for t in times:
        log.add(t, OP_DMA, sid=0x100, a0=0x1000 + t, a1=8, a2=1)
    return log


def test_oplog_stamps_vm_and_sequence_and_grows():
    """Each operation gets the VM id and the next sequence number; the log grows past its
    initial capacity without losing anything."""
    ops = log_of(3, [5, 1, 9, 9, 2]).take()
    assert ops.dtype == OP_DTYPE
    assert ops["vm"].tolist() == [3] * 5
    assert ops["seq"].tolist() == [0, 1, 2, 3, 4]
    assert ops["t_ns"].tolist() == [5, 1, 9, 9, 2]
    assert ops["a3"].tolist() == [-1] * 5               # default: no unmap id


def test_oplog_take_empties_but_sequence_continues():
    """take() hands over a copy and starts an empty epoch; sequence numbers keep counting, so
    (t_ns, vm, seq) stays unique over the whole run."""
    log = log_of(1, [1, 2])
    first = log.take()
    log.add(3, OP_UNMAP_RET, a0=0, a1=3)
    second = log.take()
    assert first.size == 2 and second.size == 1
    assert second["seq"].tolist() == [2]
    first["t_ns"][0] = 99                               # a copy: the log is not aliased
    assert log.take().size == 0


def test_merge_orders_by_time_then_vm_then_seq():
    a = log_of(2, [5, 1, 5]).take()
    b = log_of(1, [5, 3]).take()
    m = merge([a, b])
    assert list(zip(m["t_ns"].tolist(), m["vm"].tolist(), m["seq"].tolist(), strict=True)) == [
        (1, 2, 1), (3, 1, 1), (5, 1, 0), (5, 2, 0), (5, 2, 2)]
    assert merge([]).dtype == OP_DTYPE and merge([]).size == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20), max_size=8), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_merge_ignores_arrival_order(times, rnd):
    """Whatever order the VMs' batches arrive in, the merged stream is the same."""
    batches = [log_of(vm + 1, ts).take() for vm, ts in enumerate(times)]
    shuffled = batches[:]
    rnd.shuffle(shuffled)
    assert np.array_equal(merge(batches), merge(shuffled))


def test_batch_round_trips_through_the_wire():
    ops = log_of(7, [4, 2, 8]).take()
    ops["a1"][0] = (1 << 64) - 1                        # full-width unsigned column
    ops["a3"][1] = -2
    back = unpack_ops(pack_ops(ops))
    assert back.dtype == OP_DTYPE and np.array_equal(back, ops)
    assert unpack_ops(pack_ops(ops[:0])).size == 0


@pytest.mark.parametrize("frame", [
    msgpack.packb({"dtype": "OP_DTYPE/0", "n": 0, "data": b""}),       # another format
    msgpack.packb({"dtype": "OP_DTYPE/1", "n": 2, "data": bytes(OP_DTYPE.itemsize)}),
])
def test_malformed_batch_is_a_named_error(frame):
    """A batch of another format or whose length disagrees with its header is refused with a
    ProtocolError naming what is wrong, never decoded into wrong operations."""
    with pytest.raises(ProtocolError, match=r"format|length"):
        unpack_ops(frame)


def test_control_messages_round_trip():
    s = VmSetup(2, 64 << 20, "nested", (0x200, 0x208), True, 5, (0x10000, 0x11000))
    assert unpack(pack(s)) == s
    r = EpochReport(2, {"faults": 1, "translations": 9}, [(10, 0x200, 0, 0x5000, 6, 1)])
    back = unpack(pack(r))
    assert (back.vm, back.counters, back.faults) == (r.vm, r.counters, r.faults)


def test_unknown_control_message_is_a_named_error():
    with pytest.raises(ProtocolError, match="control message"):
        unpack(msgpack.packb({"type": "Reboot"}))


def test_operation_names_cover_the_kinds():
    assert OP_NAMES[OP_DMA] == "dma" and OP_NAMES[OP_GUEST_WRITE] == "guest_write"
    assert len(set(OP_NAMES.values())) == len(OP_NAMES) == 9
