"""The guest's first-level stores logged a compiled run at a time (VmAgent._log_table_stores
over GuestTableStore.on_writes) give the op log, row for row and sequence for sequence, that
logging them one by one (``on_write`` -> VmAgent._log_table_store) gives: the same times,
values, and creation stores moved back to the earlier vCPU's stamp (Linux pfn_to_dma_pte's
cmpxchg: the first vCPU to need a table installs it)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.costs import CostModel
from host_iommu.protocol import OP_GUEST_WRITE
from vm_agent.agent import VmAgent
from workloads.base import DMA_FROM_DEVICE, Workload
from workloads.nic import NicWorkload


class Bare(Workload):
    """One device and nothing else: the test drives the agent by hand."""

    kind = "bare"

    def start(self, ctx) -> None:
        self.dev = ctx.add_device("dev0")


def _agent(batched: bool, policy: str = "strict", workload: Workload | None = None,
           vcpus: int = 3) -> VmAgent:
    a = VmAgent(1, mode="nested", policy=policy, flush_queue="percpu", vcpus=vcpus,
                memory_bytes=256 << 20, fl_levels=4, ats=False,
                workload=workload if workload is not None else Bare(Bare.Params()),
                churn=None, costs=CostModel(), seed=7)
    a.setup()
    if not batched:
        for dom in a.dma.domains.values():
            dom.table.store.on_writes = None   # every store through on_write, one by one
    return a


# (cpu, time step, pages to map or -1 to unmap the oldest mapping)
_OPS = st.lists(st.tuples(st.integers(0, 2), st.integers(-30_000, 30_000),
                          st.one_of(st.integers(1, 40), st.integers(500, 1100),
                                    st.just(-1))),
                min_size=1, max_size=40)


def _drive(a: VmAgent, ops: list[tuple[int, int, int]]) -> np.ndarray:
    dev = a.workload.dev
    live: list[tuple[int, int, int]] = []
    t = 100_000
    out = []
    for k, (cpu, step, pages) in enumerate(ops):
        t = max(0, t + step)
        if pages < 0:
            if live:
                _cpu, iova, size = live.pop(0)
                a.dma_unmap(cpu, dev, iova, size, DMA_FROM_DEVICE, t)
        else:
            size = pages * 4096
            iova, _t1 = a.dma_map(cpu, dev, a.alloc_buffer(size), size, DMA_FROM_DEVICE, t)
            live.append((cpu, iova, size))
        if k % 7 == 6:          # an epoch boundary now and then
            out.append(a.run_epoch(t + 1))
    out.append(a.run_epoch(t + 1_000_000))
    return np.concatenate(out)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, policy=st.sampled_from(["strict", "lazy"]))
def test_batched_store_logging_gives_the_same_op_log(ops, policy):
    one = _drive(_agent(False, policy), ops)
    batch = _drive(_agent(True, policy), ops)
    assert np.array_equal(one, batch)


def test_table_creation_on_a_busy_vcpu_is_moved_back_in_both():
    """A table made by a busy vCPU's map and used by an idle one's earlier-stamped map: its
    creation stores take the earlier stamp (the case _made_by exists for), batched or not."""
    ops = [(0, 500_000, 600), (1, -499_000, 600), (2, 0, 3), (0, 0, -1), (1, 10, 700)]
    one = _drive(_agent(False), ops)
    batch = _drive(_agent(True), ops)
    assert np.array_equal(one, batch)
    writes = batch[batch["op"] == OP_GUEST_WRITE]
    assert len(writes) > 1000
    assert (np.diff(writes["seq"]) > 0).all()
    assert (np.diff(writes["t_ns"]) < 0).any()    # some store was moved back in time


def test_a_nic_run_logs_the_same_batched_or_not():
    def run(batched: bool) -> np.ndarray:
        a = _agent(batched, workload=NicWorkload(NicWorkload.Params(
            offered_gbps=4.0, rx_ring=64, tx_ring=64, rogue_fraction=0.05)), vcpus=2)
        if not batched:
            for dom in a.dma.domains.values():
                dom.table.store.on_writes = None
        return np.concatenate([a.run_epoch(t) for t in range(50_000, 400_001, 50_000)])

    one, batch = run(False), run(True)
    assert (one["op"] == OP_GUEST_WRITE).sum() > 100
    assert np.array_equal(one, batch)
