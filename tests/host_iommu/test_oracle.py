"""The stale-DMA oracle (host_iommu/oracle.py): a DMA that translated after the unmap that
covered its page returned is stale; its window is the time since that return."""

from __future__ import annotations

import numpy as np

from host_iommu.oracle import Oracle


def check(o: Oracle, rows: list[tuple[int, int, int, bool]]):
    vm, uid, t, ok = (np.array(c) for c in zip(*rows, strict=True))
    stale, window = o.check(vm.astype(np.int32), uid.astype(np.int64), t.astype(np.int64),
                            ok.astype(bool))
    return stale.tolist(), window.tolist()


def test_after_return_is_stale_with_its_window():
    o = Oracle()
    o.unmap_returned(1, 4, 1000)
    assert check(o, [(1, 4, 1500, True), (1, 4, 1000, True), (1, 4, 999, True)]) == (
        [True, False, False], [500, 0, 0])


def test_faulted_mapped_and_never_mapped_are_never_stale():
    """Only a successful translation can be stale; -1 (mapped) and -2 (never mapped) tags
    have no unmap to be late for."""
    o = Oracle()
    o.unmap_returned(1, 0, 10)
    assert check(o, [(1, 0, 50, False), (1, -1, 50, True), (1, -2, 50, True)]) == (
        [False] * 3, [0] * 3)


def test_unmap_not_seen_returning_is_in_flight():
    o = Oracle()
    assert check(o, [(1, 3, 10**9, True)]) == ([False], [0])


def test_return_is_the_latest_of_guest_and_host():
    """A strict unmap returns when both the guest's call and the host's flush have: the
    oracle keeps the later time whatever order they are reported in."""
    o = Oracle()
    o.unmap_returned(1, 2, 5000)      # host completion
    o.unmap_returned(1, 2, 3000)      # guest return, earlier
    assert check(o, [(1, 2, 4000, True), (1, 2, 6000, True)]) == ([False, True], [0, 1000])


def test_vms_have_separate_unmap_ids():
    o = Oracle()
    o.unmap_returned(1, 0, 100)
    assert check(o, [(2, 0, 500, True), (1, 0, 500, True)]) == ([False, True], [0, 400])


def test_lazy_flush_without_id_records_nothing():
    o = Oracle()
    o.unmap_returned(1, -1, 100)
    assert o.returned == {}
