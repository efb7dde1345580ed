"""HostServer counts a run of DMAs alike one DMA at a time and as numpy columns.

apply_epoch checks and counts a short run of DMAs on plain ints (``_tally_each``) and a long
one with numpy columns (``_tally`` and Oracle.check); both take the isolation check from
``_reached``. Whole worlds with rogue DMAs (every
rogue class), stale lazy DMAs, faults, several VMs and ATS run once with every run on the
one path and once on the other; every host counter, fault and unmap wait must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine import Engine, InProcTransport
from cluster.runner import build
from host_iommu import server
from host_iommu.defs import PAGE_SHIFT, RESULT_DTYPE
from host_iommu.protocol import DMA_ROGUE, OP_DMA, OP_DTYPE, VmSetup
from tests.system.conftest import experiment, nic, nvme


def run(cfg, small: int) -> tuple[dict, list, list]:
    host, agents, _plans = build(cfg)
    reports: list = []
    orig = host.apply_epoch

    def apply(ops, t_start_ns=None):
        out = orig(ops, t_start_ns)
        reports.append({vm: (r.counters, r.faults, r.unmap_waits) for vm, r in out.items()})
        return out

    host.apply_epoch = apply
    old = server.DMA_SMALL_BATCH
    server.DMA_SMALL_BATCH = small
    try:
        Engine(InProcTransport(host, agents), cfg.experiment.epoch_us * 1000).run(
            cfg.experiment.duration_us * 1000)
    finally:
        server.DMA_SMALL_BATCH = old
    return host.counters, reports, [a.stats for a in agents]


WORLDS = {
    "nested-mix": {"a": nic("nested", "lazy", rogue=0.2, count=2),
                   "b": nvme("nested", "strict", rogue=0.3, ats=True)},
    "shadow-mix": {"a": nic("shadow", "strict", rogue=0.2),
                   "b": nvme("shadow", "strict", rogue=0.2, count=2)},
    "passthrough": {"a": nvme("passthrough", rogue=0.3)},
}


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_each_and_column_tallies_agree(name):
    cfg = experiment(WORLDS[name], duration_us=1200, host={"iotlb_entries": 64})
    each = run(cfg, 1 << 30)
    cols = run(cfg, 0)
    assert each[0] == cols[0]
    assert each[1] == cols[1]
    assert each[2] == cols[2]
    totals = {k: sum(c[k] for c in each[0].values()) for k in server.HOST_COUNTERS}
    assert totals["translations"] > 0
    assert all(type(v) is int for c in each[0].values() for v in c.values())


# --- the two tallies on synthetic translate results --------------------------------------------

FRAMES = 64
dma_rows = st.lists(st.tuples(
    st.integers(0, 3000),                   # t_ns
    st.sampled_from([1, 2]),                # vm
    st.integers(0, 2),                      # a3: unmap id, or -1 (mapped)
    st.booleans(),                          # rogue
    st.sampled_from([0, 0, 0, 6]),          # fault reason (0: translated)
    st.integers(0, FRAMES - 1),             # host frame reached
    st.booleans(), st.booleans(),           # IOTLB hit, device-TLB hit
    st.integers(0, 24), st.integers(0, 4),  # walk and context references
), min_size=1, max_size=40)


def fresh_server(owners: list[int], returns: list[tuple[int, int, int]]) -> server.HostServer:
    s = server.HostServer()
    for vm in (1, 2):
        s.setup_vm(VmSetup(vm=vm, mode="passthrough", memory_bytes=1 << 20, sids=(vm,)))
    s.iommu.mem.owner[:FRAMES] = owners
    for vm, uid, t in returns:
        s.oracle.unmap_returned(vm, uid, t)
    return s


@settings(max_examples=150, deadline=None)
@given(dma_rows, st.lists(st.sampled_from([0, 1, 2]), min_size=FRAMES, max_size=FRAMES),
       st.lists(st.tuples(st.sampled_from([1, 2]), st.integers(0, 2), st.integers(0, 3000)),
                max_size=6))
def test_tally_each_equals_tally_columns(rows, owners, returns):
    rows.sort()
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    res = np.zeros(len(rows), dtype=RESULT_DTYPE)
    dev = np.zeros(len(rows), dtype=bool)
    for i, (t, vm, uid, rogue, fault, frame, hit, dhit, walk, ctx) in enumerate(rows):
        ops[i] = (t, vm, i, OP_DMA, vm, 0, 0x1000 * i, 64, 2 | (DMA_ROGUE if rogue else 0),
                  uid - 1)
        ok = fault == 0
        res[i] = ((frame << PAGE_SHIFT) | 0x40 if ok else 0, fault, 0, walk, ctx,
                  (hit or dhit) and ok, 0)
        dev[i] = dhit and ok
    a, b = fresh_server(owners, returns), fresh_server(owners, returns)
    ok, cross = a._reached(ops, res)
    a._tally_each(ops, res, dev, cross)
    b._tally_columns(ops, res, dev, ok, cross)
    assert a.counters == b.counters
    assert all(type(v) is int for c in a.counters.values() for v in c.values())
