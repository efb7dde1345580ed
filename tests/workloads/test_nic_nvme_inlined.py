"""The NIC and NVMe models' inlined per-packet / per-command paths against the plain methods
they replace (tests/workloads/nic_nvme_plain.py): over random parameters and seeds, the same
guest calls with the same arguments in the same order, the same event times and scheduling
order, the same random stream (rogue DMA on and off) and the same counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.workloads.conftest import FakeGuestContext
from tests.workloads.nic_nvme_plain import PlainNic, PlainNvme
from workloads.base import Device
from workloads.nic import NicWorkload
from workloads.nvme import NvmeWorkload

MS = 1_000_000


class CallLog(FakeGuestContext):
    """A fake guest that also logs every call a workload makes on it, in order."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calls: list[tuple[Any, ...]] = []

    def schedule(self, t_ns: int, fn: Callable[..., None], *args: Any) -> None:
        self.calls.append(("schedule", t_ns, self.now))
        super().schedule(t_ns, fn, *args)

    def cpu_free_at(self, cpu: int) -> int:
        self.calls.append(("cpu_free_at", cpu))
        return super().cpu_free_at(cpu)

    def alloc_buffer(self, size: int) -> int:
        self.calls.append(("alloc", size))
        return super().alloc_buffer(size)

    def free_buffer(self, gpa: int, size: int) -> None:
        self.calls.append(("free", gpa, size))
        super().free_buffer(gpa, size)

    def dma_map(self, cpu: int, dev: Device, gpa: int, size: int, direction: int,
                t_ns: int) -> tuple[int, int]:
        self.calls.append(("map", cpu, dev.name, gpa, size, direction, t_ns))
        return super().dma_map(cpu, dev, gpa, size, direction, t_ns)

    def dma_unmap(self, cpu: int, dev: Device, iova: int, size: int, direction: int,
                  t_ns: int) -> int:
        self.calls.append(("unmap", cpu, dev.name, iova, size, direction, t_ns))
        return super().dma_unmap(cpu, dev, iova, size, direction, t_ns)

    def dma_map_sg(self, cpu: int, dev: Device, sg: list[tuple[int, int]], direction: int,
                   t_ns: int) -> tuple[list[tuple[int, int]], int]:
        self.calls.append(("map_sg", cpu, dev.name, list(sg), direction, t_ns))
        return super().dma_map_sg(cpu, dev, sg, direction, t_ns)

    def dma_unmap_sg(self, cpu: int, dev: Device, segs: list[tuple[int, int]], direction: int,
                     t_ns: int) -> int:
        self.calls.append(("unmap_sg", cpu, dev.name, list(segs), direction, t_ns))
        return super().dma_unmap_sg(cpu, dev, segs, direction, t_ns)

    def device_dma(self, dev: Device, t_ns: int, iova: int, size: int, write: bool,
                   rogue: bool = False) -> None:
        self.calls.append(("dma", dev.name, t_ns, self.now, iova, size, write, rogue))
        super().device_dma(dev, t_ns, iova, size, write, rogue)

    def io_done(self, t_ns: int, nbytes: int, latency_ns: int) -> None:
        self.calls.append(("io", t_ns, nbytes, latency_ns))
        super().io_done(t_ns, nbytes, latency_ns)


def run_both(fast: Any, plain: Any, vcpus: int, seed: int, t_ns: int) -> CallLog:
    """Run each model on its own logging guest; everything observable must be equal."""
    ctxs = []
    for wl in (fast, plain):
        ctx = CallLog(vcpus=vcpus, seed=seed)
        wl.start(ctx)
        for k in range(1, 9):          # eight epochs: vCPU work past an end waits for the next
            ctx.run_until(k * t_ns // 8, epoch=True)
        ctxs.append(ctx)
    a, b = ctxs
    assert len(a.calls) > 0
    assert a.calls == b.calls
    assert a.errors == b.errors == []
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    assert [(t, s) for t, s, _, _ in sorted(a._heap)] == [(t, s) for t, s, _, _ in
                                                          sorted(b._heap)]
    return a


counters_nic = ("rx_packets", "rx_drops", "tx_packets", "tx_drops", "polls",
                "max_poll_packets", "offered", "round_trips", "rtt_sum_ns", "_tx_wire_free_ns",
                "_busy_until")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vcpus=st.integers(1, 3), queues=st.integers(0, 3),
       rx_ring=st.sampled_from([2, 8, 64]), tx_ring=st.sampled_from([1, 4, 64]),
       sizes=st.sampled_from([((1500,), (1.0,)), ((64, 576, 1500), (0.5, 0.2, 0.3)),
                              ((60, 2048), (1.0, 3.0))]),
       rx_fraction=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       offered=st.sampled_from([0.5, 9.0, 40.0]), budget=st.sampled_from([1, 4, 64]),
       coalesce=st.sampled_from([0.0, 5.0, 50.0]), rogue=st.sampled_from([0.0, 0.0, 0.2]),
       packets=st.sampled_from([0, 0, 7, 300]), rr=st.booleans())
def test_nic_inlined_equals_plain(seed, vcpus, queues, rx_ring, tx_ring, sizes, rx_fraction,
                                  offered, budget, coalesce, rogue, packets, rr):
    p = NicWorkload.Params(
        queues=queues, rx_ring=rx_ring, tx_ring=tx_ring, packet_sizes=sizes[0],
        packet_weights=sizes[1], rx_fraction=rx_fraction, offered_gbps=offered,
        napi_budget=budget, irq_coalesce_us=coalesce, rogue_fraction=rogue, packets=packets,
        request_response=rr, peer_turnaround_us=3.0)
    fast, plain = NicWorkload(p), PlainNic(p)
    run_both(fast, plain, vcpus, seed, MS // 2)
    for name in counters_nic:
        assert getattr(fast, name) == getattr(plain, name), name
    if rogue == 0.0:
        assert fast.rx_packets + fast.tx_packets + fast.round_trips > 0 or packets == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vcpus=st.integers(1, 3), queues=st.integers(0, 3),
       depth=st.sampled_from([1, 4, 32]),
       sizes=st.sampled_from([((4096,), (1.0,)), ((512, 4096, 8192, 65536), (1, 2, 1, 1)),
                              ((1536, 3 << 20), (3.0, 1.0))]),
       read_fraction=st.sampled_from([0.0, 0.7, 1.0]), rogue=st.sampled_from([0.0, 0.0, 0.2]),
       ios=st.sampled_from([0, 0, 5, 200]), contiguity=st.sampled_from([0.0, 0.1, 0.9]),
       bw=st.sampled_from([3.0, 25.0]))
def test_nvme_inlined_equals_plain(seed, vcpus, queues, depth, sizes, read_fraction, rogue,
                                   ios, contiguity, bw):
    p = NvmeWorkload.Params(
        queues=queues, queue_depth=depth, io_sizes=sizes[0], io_weights=sizes[1],
        read_fraction=read_fraction, rogue_fraction=rogue, ios=ios,
        page_contiguity=contiguity, bandwidth_gbps=bw, read_latency_us=7.0)
    fast, plain = NvmeWorkload(p), PlainNvme(p)
    run_both(fast, plain, vcpus, seed, MS // 2)
    for name in ("submitted", "completed", "prp_list_commands", "prp_list_pages_used",
                 "max_outstanding", "_media_free_ns", "_cid", "_busy_until"):
        assert getattr(fast, name) == getattr(plain, name), name
    assert [q.prp_pool for q in fast.queues] == [q.prp_pool for q in plain.queues]
    assert fast.submitted > 0
