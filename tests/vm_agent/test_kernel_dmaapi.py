"""The compiled DMA API (vm_agent/kernels/dmaapi.py) against VmAgent's Python one, call by
call: the same random sequences of map, unmap and timer calls on a VmAgent and on the arrays
``freeze`` made of it give the same returns, stats, op-log rows, tables and IOVA state."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.costs import CostModel
from vm_agent.agent import GUEST_COUNTERS, VmAgent
from vm_agent.kernels import dmaapi as K
from workloads.base import Workload


class Bare(Workload):
    """One device and nothing else: the test drives the agent by hand."""

    kind = "bare"

    def start(self, ctx) -> None:
        self.dev = ctx.add_device("dev0")


class Guest(NamedTuple):
    """The guest arrays the DMA API reads and writes (ctl, stats, busy, log)."""

    ctl: np.ndarray
    stats: np.ndarray
    busy: np.ndarray
    log: np.ndarray


def make_agent(mode: str, policy: str = "strict", vcpus: int = 2, ats: bool = False
               ) -> VmAgent:
    a = VmAgent(1, mode=mode, policy=policy, flush_queue="percpu", vcpus=vcpus,
                memory_bytes=64 << 20, fl_levels=4, ats=ats, workload=Bare(Bare.Params()),
                churn=None, costs=CostModel(), seed=0)
    a.setup()
    return a


def guest_of(a: VmAgent) -> Guest:
    return Guest(np.zeros(8, np.int64), np.array([a.stats[n] for n in GUEST_COUNTERS],
                                                 np.int64),
                 np.array(a.busy_until, np.int64), np.zeros((4096, 8), np.int64))


def stats_of(g: Guest) -> dict[str, int]:
    return dict(zip(GUEST_COUNTERS, g.stats.tolist(), strict=True))


ops = st.lists(st.tuples(st.sampled_from(["map", "unmap"]), st.integers(0, 3),
                         st.integers(1, 3 * 4096), st.integers(0, 20_000)), max_size=40)


@settings(max_examples=30, deadline=None)
@given(ops)
def test_passthrough_equals_python(seq):
    """Pass-through: dma-direct maps and unmaps, busy times and counters equal."""
    a = make_agent("passthrough")
    g = guest_of(a)
    d = K.freeze(a)
    dev = a.workload.dev
    live: list[int] = []
    t = 0
    for op, cpu, size, dt in seq:
        t += dt
        if op == "map" or not live:
            gpa = a.alloc_buffer(size)
            want = a.dma_map(cpu, dev, gpa, size, 0, t)
            got = K.dma_map(g, d, cpu, gpa, size, 0, t)
            live.append(want[0])
        else:
            iova = live.pop(cpu % len(live))
            want = a.dma_unmap(cpu, dev, iova, size, 0, t)
            got = K.dma_unmap(g, d, cpu, iova, size, 0, t)
            assert d.ctl[K.D_LAST_UNMAPPED] == a.dma.last_unmapped[dev.sid]
        assert got == want
        assert stats_of(g) == a.stats
        assert g.busy.tolist() == a.busy_until
        assert K.unmap_tag(g, d, 5) == a.dma.unmap_tag(dev.sid, 5)
