"""Tests of the primary fault log: batches, FPD suppression, register overflow, per-VM take."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, FaultReason, Stage
from host_iommu.fault import FAULT_COLUMNS, FaultLog, FaultLogError


def log_batch(log: FaultLog, vm, n: int, *, t0: int = 0, fpd=None,
              reason=FaultReason.PAGING_ENTRY_INV) -> int:
    return log.record(np.arange(t0, t0 + n), vm, 0x0100, 0, np.arange(n) << 12,
                      ACCESS_WRITE, reason, Stage.SECOND, fpd=fpd)


def test_batch_and_scalar_record_in_call_order():
    log = FaultLog()
    assert log.record(5, 1, 0x10, 3, 0xDEAD000, ACCESS_READ, FaultReason.READ, Stage.SECOND) == 1
    assert log_batch(log, vm=np.array([2, 1, 2]), n=3, t0=10) == 3
    cols = log.columns()
    assert set(cols) == set(FAULT_COLUMNS)
    assert cols["time_ns"].tolist() == [5, 10, 11, 12]
    assert cols["vm"].tolist() == [1, 2, 1, 2]
    assert cols["addr"].tolist() == [0xDEAD000, 0, 0x1000, 0x2000]
    assert cols["reason"][0] == FaultReason.READ and cols["stage"][0] == Stage.SECOND
    assert all(cols[k].dtype == d for k, d in FAULT_COLUMNS.items())
    assert log.count == 4 and not cols["overflowed"].any()


def test_fpd_entries_are_suppressed_not_logged():
    log = FaultLog()
    fpd = np.array([True, False, True, False])
    assert log_batch(log, vm=1, n=4, fpd=fpd) == 2
    assert log.suppressed == 2 and log.count == 2 and log.pending == 2
    assert log.columns()["time_ns"].tolist() == [1, 3]
    assert log_batch(log, vm=1, n=3, fpd=True) == 0 and log.suppressed == 5


def test_overflow_sets_pfo_and_keeps_full_log():
    log = FaultLog(records=4)
    log_batch(log, vm=1, n=3)
    assert not log.pfo
    log_batch(log, vm=2, n=3, t0=3)
    assert log.pfo and log.overflowed == 2 and log.pending == 4 and log.count == 6
    assert log.columns()["overflowed"].tolist() == [False] * 4 + [True] * 2
    # While PFO is set no new fault is recorded, even after registers free up.
    log.take_for_vm(1)
    assert log.pending == 1 and log.pfo
    log_batch(log, vm=1, n=1, t0=6)
    assert log.overflowed == 3 and log.take_for_vm(1)["time_ns"].size == 0
    log.clear_pfo()
    log_batch(log, vm=1, n=1, t0=7)
    assert log.take_for_vm(1)["time_ns"].tolist() == [7]


def test_take_for_vm_returns_only_that_vms_pending_once():
    log = FaultLog()
    log_batch(log, vm=np.array([1, 2, 1, 3, 1]), n=5)
    got = log.take_for_vm(1)
    assert got["time_ns"].tolist() == [0, 2, 4] and set(got) == set(FAULT_COLUMNS)
    assert (got["vm"] == 1).all() and log.pending == 2
    assert log.take_for_vm(1)["time_ns"].size == 0
    assert log.take_for_vm(3)["time_ns"].tolist() == [3]
    assert log.count == 5  # the full log keeps what was read


def test_draining_all_pending_clears_pfo():
    log = FaultLog(records=2)
    log_batch(log, vm=1, n=3)
    assert log.pfo
    assert log.take_for_vm(1)["time_ns"].tolist() == [0, 1]
    assert not log.pfo and log.pending == 0


def test_growth_beyond_initial_capacity():
    log = FaultLog(records=8, capacity=16)
    for i in range(10):
        log_batch(log, vm=1 + i % 2, n=7, t0=7 * i)
    cols = log.columns()
    assert log.count == 70 and cols["time_ns"].tolist() == list(range(70))
    assert int((~cols["overflowed"]).sum()) == 8 and log.overflowed == 62


def test_counts_by_reason():
    log = FaultLog()
    log_batch(log, vm=1, n=2, reason=FaultReason.WRITE)
    log_batch(log, vm=1, n=3, reason=FaultReason.FS_PAGING_ENTRY_P)
    log_batch(log, vm=1, n=1, reason=FaultReason.WRITE, fpd=True)
    assert log.counts_by_reason() == {"WRITE": 2, "FS_PAGING_ENTRY_P": 3}


@pytest.mark.parametrize("bad", [
    {"access": 3}, {"reason": 0x0D}, {"stage": 9}, {"sid": 0x10000}, {"pasid": -1},
    {"vm": np.array([1, 2, 3])}, {"addr": 1.5}, {"time_ns": -1},
])
def test_bad_input_is_a_named_error(bad):
    args = {"time_ns": np.arange(2), "vm": 1, "sid": 1, "pasid": 0, "addr": 0,
            "access": ACCESS_READ, "reason": FaultReason.READ, "stage": Stage.SECOND}
    args.update(bad)
    log = FaultLog()
    with pytest.raises(FaultLogError):
        log.record(**args)
    assert log.count == 0 and log.pending == 0
