"""Emulated time does not grow the emulator's state: retired unmap ids leave guest and oracle.

A run 4x longer holds no more entries in the structures that used to grow with it (the
oracle's unmap return times, the guest's unmap-id bookkeeping, its mappings and IOVA caches),
while the unmap count grows 4x; and pruning changes no result: the summary and faults tables
equal those of the same run with ``Oracle.retire`` disabled, rogue (stale) DMAs included.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.runner import run_config
from host_iommu.oracle import Oracle
from host_iommu.protocol import (
    MAX_RETIRE_RUN,
    OP_DTYPE,
    OP_UNMAP_RETIRE,
    ProtocolError,
    pack_ops,
    unpack_ops,
)
from tests.system.conftest import experiment, nic, nvme
from vm_agent.flushq import FlushQueue

# The lazy NIC runs fast enough to fill its per-CPU flush queues (256 slots each) in the short
# run already: before its first flush no IOVA is reused, so every unmap id is still live.
VMS = {"strict": nic("nested", rogue=0.05), "lazy": nic("nested", "lazy", rogue=0.05, gbps=8.0),
       "shadow": nvme("shadow", rogue=0.05)}
SHORT_US = 1000


def _run(tmp_path, duration_us: int, name: str, pruned: bool = True
         ) -> tuple[dict, dict[str, list]]:
    """Run ``VMS`` for ``duration_us``: (entry counts of the grown structures, result tables)."""
    held = {}
    cfg = experiment(VMS, duration_us=duration_us, name="mem")
    out = run_config(cfg, tmp_path / name, machine_hook=lambda m: held.update(m=m))
    m = held["m"]
    (host,) = m.hosts.values()
    sizes: dict[str, int] = {"unmaps": 0}
    for vm, a in sorted(m.agents.items()):
        d = a.dma
        times = host.oracle._vms.get(vm)
        live = set(d.pages_tagged)
        # every id the oracle still holds is one some IOVA page carries
        assert not pruned or {uid for v, uid in host.oracle.returned if v == vm} <= live
        counts = {"oracle_ids": sum(v == vm for v, _u in host.oracle.returned),
                  "oracle_slots": 0 if times is None else times.ret.size + len(times.spill),
                  "unmap_id_of": len(d.unmap_id_of), "pages_tagged": len(live),
                  "mapped_pages": len(d.mapped_pages), "retired": len(d.retired),
                  "mappings": sum(len(x.mappings) for x in d.domains.values()),
                  "freed_ns": sum(len(x.freed_ns) for x in d.domains.values())}
        for k, v in counts.items():
            sizes[f"{vm}.{k}"] = v
        sizes["unmaps"] += a.stats["unmaps"]
    tables = {"summary": out.summary.to_pylist(),
              "faults": pq.read_table(out.tables["faults"]).to_pylist()}
    return sizes, tables


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    short, _ = _run(tmp, SHORT_US, "short")
    long, tables = _run(tmp, 4 * SHORT_US, "long")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Oracle, "retire", lambda self, vm, ids: 0)
        unpruned, unpruned_tables = _run(tmp, 4 * SHORT_US, "unpruned", pruned=False)
    return short, long, tables, unpruned, unpruned_tables


def test_state_does_not_grow_with_emulated_time(runs):
    short, long, _t, unpruned, _u = runs
    assert long["unmaps"] > 3 * short["unmaps"] > 0
    for k, n in short.items():
        if k.endswith("slots"):   # the dense array grows by doubling and is cut only once a
            # retired prefix spans 1024 ids: one doubling of slack, or 4096 slots
            assert long[k] <= max(2 * n, 4096), (k, n, long[k])
        elif k != "unmaps":
            assert long[k] <= 1.25 * n + 64, (k, n, long[k])
    # without retirement the oracle holds, and its array spans, every unmap of the run
    for what in ("oracle_ids", "oracle_slots"):
        assert sum(v for k, v in unpruned.items() if k.endswith(what)) >= long["unmaps"]


def test_pruning_changes_no_result(runs):
    _s, _l, tables, _u, unpruned_tables = runs
    assert tables == unpruned_tables
    summary = tables["summary"]
    assert sum(r["stale_dma"] for r in summary) > 0   # stale DMAs are still being judged


@pytest.mark.parametrize(("first", "count", "ok"), [
    (0, 1, True), (5, MAX_RETIRE_RUN, True), (0, 0, False), (0, MAX_RETIRE_RUN + 1, False),
    (1 << 62, 1, False)])
def test_retire_runs_are_checked_at_the_boundary(first, count, ok):
    """A retire run names 1..MAX_RETIRE_RUN ids below 2^62; anything else is refused."""
    ops = np.zeros(1, dtype=OP_DTYPE)
    ops[0] = (10, 1, 0, OP_UNMAP_RETIRE, 0, 0, first, count, 0, -1)
    if ok:
        assert unpack_ops(pack_ops(ops))["a1"][0] == count
    else:
        with pytest.raises(ProtocolError, match="unmap retire run out of range"):
            unpack_ops(pack_ops(ops))


def test_flush_queue_keeps_only_completion_times_still_asked_for():
    """Hundreds of ring-full flushes, one ring four times busier than the other: each freed
    entry's stale window still ends at the completion of the first flush started after it
    was queued, and the queue holds the completion times of the last few flushes only."""
    fq = FlushQueue(2, size=4)
    queued_at: dict[int, int] = {}
    starts: list[int] = []          # start time of each flush; each completes 7 ns later
    freed: list[tuple[int, int]] = []   # (pfn, window)

    def take(r) -> None:
        freed.extend((pfn, w) for (pfn, _n), w in zip(r, r.stale_ns, strict=True))

    for pfn in range(4000):
        t = 10 * (pfn + 1)
        r = fq.queue(0 if pfn % 5 == 0 else 1, pfn, 1, t)
        queued_at[pfn] = t
        take(r.freed)
        if r.flush_now:
            starts.append(t)
            take(fq.flush_done(t + 7))
        assert len(fq._finish_ns) <= 4
    assert fq.flushes > 600 and len(freed) > 3900
    for pfn, window in freed:
        t_q = queued_at[pfn]
        first = starts[int(np.searchsorted(starts, t_q, side="right"))]
        assert window == first + 7 - t_q, pfn


def test_retire_runs_drop_only_what_they_name():
    """Runs are clipped to the ids held: long runs of ids nobody holds are cheap, a spilled
    (far) id goes only when a run names it."""
    o = Oracle()
    for uid in (3, 5, 9):
        o.unmap_returned(1, uid, 100 + uid)
    o.unmap_returned(1, 1 << 40, 7)           # far outside the dense range: spilled
    o.unmap_returned(2, 5, 50)
    assert o.retire_runs(1, [(4, 2)] + [(1 << 20, MAX_RETIRE_RUN)] * 1000) == 1
    assert dict(o.returned) == {(1, 3): 103, (1, 9): 109, (1, 1 << 40): 7, (2, 5): 50}
    assert o.retire_runs(1, [((1 << 40) - 2, 3), (0, 4)]) == 2
    assert dict(o.returned) == {(1, 9): 109, (2, 5): 50}
    assert o.retire_runs(3, [(0, 10)]) == 0
