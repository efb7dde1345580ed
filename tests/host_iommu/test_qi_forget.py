"""InvalidationQueue slot accounting over time: answers depend only on the time asked,
``forget_until`` drops only what no later question can see, and a whole run keeps the
queue's record bounded (HostServer.apply_epoch forgets up to each epoch's start)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import parse_config
from cluster.engine import Engine, InProcTransport
from cluster.runner import build
from host_iommu import qi

PSI = qi.iotlb_desc(qi.QI_IOTLB_GRAN_PAGE, did=1, addr=0x1000)
WAIT = qi.wait_desc()


def _queue(script: list[tuple[int, int]]) -> qi.InvalidationQueue:
    q = qi.InvalidationQueue(128)
    for t, n in sorted(script):
        batch = qi.descs(*([PSI] * n), WAIT)
        q.submit(batch, q.room_at(t, len(batch)))
    return q


@settings(max_examples=60, deadline=None)
@given(script=st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 60)), max_size=12),
       cut=st.integers(0, 300_000), asks=st.lists(st.integers(0, 400_000), max_size=20))
def test_forget_until_changes_no_answer_from_then_on(script, cut, asks):
    kept, cut_q = _queue(script), _queue(script)
    cut_q.forget_until(cut)
    assert all(t > cut for t in cut_q._inflight_ns)
    for t in sorted(asks, reverse=True):      # later questions first, then earlier ones
        if t >= cut:
            assert cut_q.free_slots(t) == kept.free_slots(t)
            for n in (1, 17, 100):
                assert cut_q.room_at(t, n) == kept.room_at(t, n)


def _run(duration_us: int) -> int:
    cfg = parse_config({
        "experiment": {"name": "qi-bounded", "seed": 2, "duration_us": duration_us,
                       "epoch_us": 100},
        "host": {"memory_mib": 512, "qi_entries": 128},
        "vm": {"n": {"count": 1, "mode": "nested", "policy": "strict", "vcpus": 2,
                     "memory_mib": 64, "workload": {"kind": "nic", "offered_gbps": 1.0,
                                                    "rx_ring": 64, "tx_ring": 64}}}})
    host, agents, _ = build(cfg)
    Engine(InProcTransport(host, agents), 100_000).run(duration_us * 1000)
    q = host.iommu.qi
    # The queue keeps up with this load (an overloaded queue's backlog of future effect
    # times is state, and grows with the overload): it ends within one epoch of the run.
    assert q._busy_until_ns < duration_us * 1000 + 100_000
    return len(q._inflight_ns), sum(q.counts.values())


def test_a_long_run_keeps_the_queue_record_bounded():
    """Four times the emulated time, about the same record: only effect times after the
    current epoch's start are kept (one epoch's descriptors at most, not the run's)."""
    (short, _), (long, submitted) = _run(1000), _run(4000)
    assert long <= 2 * short + 64
    assert submitted > 10 * long    # the record is not the run's descriptors
