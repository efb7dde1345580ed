"""Waiting for invalidation-queue room: closed form, against a scan and the old stepping loop."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.iommu import HostIommu, IommuParams

COSTS = CostModel()
KINDS = {
    "iotlb": lambda: qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, did=1),
    "devtlb": lambda: qi.dev_iotlb_desc(0x10, 0x10, 0, 0, 4096),
    "wait": lambda: qi.wait_desc(),
}


def _fill(q: qi.InvalidationQueue, batches) -> list[int]:
    """Submit the batches; return the effect time of every processed descriptor, read from
    the SubmitResults (not from the queue's own bookkeeping)."""
    held: list[int] = []
    for t_ns, kinds in batches:
        if len(kinds) > q.free_slots(t_ns):
            continue
        res = q.submit(qi.descs(*(KINDS[k]() for k in kinds)), t_ns)
        held += [t for t, _ in res.commands] + list(res.wait_done_ns)
    return sorted(held)


def _room_by_scan(held: list[int], entries: int, t_ns: int, n: int) -> int:
    """The first candidate time (t_ns or a slot release after it) where n descriptors fit."""
    for c in [t_ns, *sorted(x for x in held if x > t_ns)]:
        if sum(x > c for x in held) <= entries - 1 - n:
            return c
    raise AssertionError("unreachable: the last release frees every slot")


def _room_by_stepping(q: qi.InvalidationQueue, t_ns: int, n: int) -> int:
    """The loop HostIommu.submit_qi used before: one descriptor time per iteration (its
    65,536-iteration cap left out, so it always terminates here)."""
    while q.free_slots(t_ns) < n:
        t_ns += COSTS.qi_desc_ns
    return t_ns


batch = st.tuples(st.integers(0, 400_000),
                  st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=60))


@settings(max_examples=80, deadline=None)
@given(st.lists(batch, max_size=12), st.integers(0, 600_000), st.integers(1, 127))
def test_room_at_is_the_earliest_time_the_stepping_loop_could_stop(batches, t_ns, n):
    q = qi.InvalidationQueue(128, COSTS)
    batches = sorted(batches, key=lambda b: b[0])
    held = _fill(q, batches)
    t_ns += batches[-1][0] if batches else 0   # software's clock only moves forward
    before = copy.deepcopy(q)
    room = q.room_at(t_ns, n)
    assert room == _room_by_scan(held, q.entries, t_ns, n)
    assert copy.deepcopy(before).free_slots(room) >= n
    if room > t_ns:
        assert copy.deepcopy(before).free_slots(room - 1) < n
    # The stepping loop stops at the first point of its 700-ns grid at or after that time.
    stepped = _room_by_stepping(before, t_ns, n)
    assert stepped == t_ns + -(-(room - t_ns) // COSTS.qi_desc_ns) * COSTS.qi_desc_ns


def test_submit_qi_waits_far_beyond_the_old_iteration_cap():
    """127 one-second device-TLB invalidations fill the queue: the next submission waits two
    seconds of virtual time (2.9 million descriptor times) for room, with no error."""
    costs = CostModel(devtlb_inv_ns=1_000_000_000)
    h = HostIommu(IommuParams(memory_mib=64, qi_entries=128), costs)
    full = qi.descs(*(KINDS["devtlb"]() for _ in range(126)), qi.wait_desc())
    done1, n1 = h.submit_qi(full, 0)
    assert (done1, n1) == (126 * 10**9 + costs.qi_wait_ns, 127)
    assert h.qi.room_at(0, 2) == 2 * 10**9          # two slots free after two releases
    assert (2 * 10**9) // costs.qi_desc_ns > 1 << 16
    done2, n2 = h.submit_qi(qi.descs(KINDS["iotlb"](), qi.wait_desc()), 0)
    assert n2 == 2
    assert done2 == done1 + costs.qi_desc_ns + costs.qi_wait_ns   # processed after the first


def test_room_at_refuses_a_batch_that_can_never_fit():
    q = qi.InvalidationQueue(128, COSTS)
    try:
        q.room_at(0, 128)
    except qi.QiError as exc:
        assert "never fit" in str(exc)
    else:
        raise AssertionError("room_at accepted 128 descriptors in a 128-entry queue")
    assert q.room_at(5, 127) == 5
