"""The compiled NVMe epoch loop (vm_agent/compiled_nvme.py, vm_agent/kernels/nvme.py)
against the Python path (VmAgent + workloads/nvme.py): whole runs give the same summary,
metrics and faults tables value for value (pass-through, nested strict and lazy; one and
several VMs, vCPUs and queues; multi-page and PRP-list I/Os, reads and writes, ``ios``
limits); the same op-log batches epoch by epoch, also when the arrays are always short of
room (submissions stopped between their DMA API calls and resumed); pickled agents go on
the same; errors are the same; which configs are eligible."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.config import parse_config
from cluster.runner import RunFailed, build
from host_iommu.protocol import EpochReport, merge
from tests.system.golden import _exp, _nvme, tables
from vm_agent import compiled, compiled_nvme
from vm_agent.agent import VmAgent
from vm_agent.kernels import guest as kg
from vm_agent.kernels import nvme as knvme

# sizes of 1 page, 2 pages (PRP2), a partial last page, a PRP list, the largest (64 pages)
MIXED = {"io_sizes": [512, 4096, 8192, 9216, 65536, 262144],
         "io_weights": [0.1, 0.3, 0.2, 0.1, 0.2, 0.1]}

CONFIGS = {
    "pt": _exp("n-pt", {"a": _nvme("passthrough"),
                        "b": {**_nvme("passthrough", **MIXED), "count": 2, "vcpus": 3}}),
    "pt-ios": _exp("n-ptios", {"a": {**_nvme("passthrough", ios=40, queues=3), "vcpus": 2}}),
    "ns": _exp("n-ns", {"a": _nvme("nested"),
                        "b": {**_nvme("nested", queues=3, read_fraction=0.3, **MIXED),
                              "count": 2}}),
    "ns-ios-l5": _exp("n-nsios", {"a": {**_nvme("nested", ios=50, page_contiguity=0.6,
                                                **MIXED), "vcpus": 1, "fl_levels": 5}}),
    "nl": _exp("n-nl", {"a": _nvme("nested", "lazy", **MIXED),
                        "b": {**_nvme("nested", "lazy", read_fraction=0.0,
                                      cpu_per_io_ns=500), "count": 2,
                              "flush_queue": "single", "ats": True}}),
    # a shared QI of slow descriptors: the strict unmaps' waits stall the vCPUs
    "ns-throttled": {**_exp("n-nsq", {"a": {**_nvme("nested", queues=2, **MIXED),
                                            "count": 4}}), "cost": {"qi_desc_ns": 4000}},
    "nl-hz": _exp("n-nlhz", {"a": {**_nvme("nested", "lazy", queue_depth=32, **MIXED),
                                   "vcpus": 3, "hz": 100}}, duration_us=2500),
}


def _both(raw: dict) -> tuple[dict, dict]:
    cfg = parse_config(raw)
    with tempfile.TemporaryDirectory() as td:
        compiled_nvme.ENABLED = True
        try:
            fast = tables(cfg, Path(td))
            compiled_nvme.ENABLED = False
            ref = tables(cfg, Path(td))
        finally:
            compiled_nvme.ENABLED = True
    return fast, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tables_equal(name: str) -> None:
    fast, ref = _both(CONFIGS[name])
    assert fast["summary"] and fast["metrics"]
    assert fast == ref
    if name == "ns-throttled":
        assert sum(r["unmap_qi_wait_ns"] for r in fast["summary"]) > 1_000_000


def _agents(raw: dict, on: bool) -> tuple[Any, list[VmAgent]]:
    compiled_nvme.ENABLED = on
    try:
        host, agents, _ = build(parse_config(raw))
    finally:
        compiled_nvme.ENABLED = True
    return host, agents


def _epochs(host: Any, agents: list, n: int, epoch_ns: int = 100_000, t0: int = 0
            ) -> list[bytes]:
    """n epochs by hand: every batch's bytes and each agent's stats and workload counters
    after it."""
    out = []
    for k in range(n):
        t_end = t0 + (k + 1) * epoch_ns
        batches = {a.vm: a.run_epoch(t_end) for a in agents}
        out.extend(b.tobytes() for b in batches.values())
        for a in agents:
            out.append(repr(sorted(a.stats.items())).encode())
            out.append(repr([getattr(a.workload, n) for n in knvme.W_NAMES]).encode())
        reports = host.apply_epoch(merge(list(batches.values())), t_end - epoch_ns)
        for a in agents:
            a.receive(reports[a.vm])
    return out


def test_compiled_agents_are_used() -> None:
    """The eligible groups get a CompiledNvmeAgent that froze (not the Python path)."""
    _h, agents = _agents(CONFIGS["ns"], True)
    assert all(type(a) is compiled_nvme.CompiledNvmeAgent and a.compiled for a in agents)
    _h, agents = _agents(CONFIGS["ns"], False)
    assert not any(isinstance(a, compiled.CompiledNicAgent) for a in agents)


class TightAgent(compiled_nvme.CompiledNvmeAgent):
    """Arrays grown only to the room one step needs: the loop stops for room at nearly
    every step, submissions resume between their DMA API calls."""

    LOG_ROWS = 1
    HEAP_ROWS = 1

    def _grown_guest(self, g: kg.GuestArrays) -> kg.GuestArrays:
        ctl = g.ctl
        need = int(ctl[kg.C_LOG_N] + ctl[kg.C_LOG_SLACK])
        if need > g.log.shape[0]:
            log = np.zeros((need, kg.LOG_COLUMNS), np.int64)
            log[:int(ctl[kg.C_LOG_N])] = g.log[:int(ctl[kg.C_LOG_N])]
            g = g._replace(log=log)
        need = int(ctl[kg.C_HEAP_N] + ctl[kg.C_HEAP_SLACK])
        if need > g.heap.shape[0]:
            heap = np.zeros((need, kg.HEAP_COLUMNS), np.int64)
            heap[:int(ctl[kg.C_HEAP_N])] = g.heap[:int(ctl[kg.C_HEAP_N])]
            g = g._replace(heap=heap)
        self.stops = getattr(self, "stops", 0) + 1
        self.mid_submit = getattr(self, "mid_submit", 0) + int(
            self.nic.r[knvme.R_STEP] == knvme.STEP_PRP)
        return g


@pytest.mark.parametrize("name", ["pt", "ns", "nl", "ns-throttled"])
def test_room_stops_resume_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches, stats and counters epoch by epoch equal the Python path's with the arrays
    always short of room."""
    import cluster.build as cb
    monkeypatch.setattr(cb, "CompiledNvmeAgent", TightAgent)
    h1, fast = _agents(CONFIGS[name], True)
    h2, ref = _agents(CONFIGS[name], False)
    assert all(isinstance(a, TightAgent) for a in fast)
    assert _epochs(h1, fast, 8) == _epochs(h2, ref, 8)
    assert sum(a.stops for a in fast) >= 2
    if name != "pt":       # a new PRP list page (a coherent map) found no room
        assert sum(a.mid_submit for a in fast) >= 1


def test_pickled_agent_goes_on_the_same() -> None:
    """An agent pickled after some epochs (Ray moves objects so) runs on as the original."""
    raw = CONFIGS["nl"]
    h1, fast = _agents(raw, True)
    h2, ref = _agents(raw, False)
    assert _epochs(h1, fast, 3) == _epochs(h2, ref, 3)
    fast = [pickle.loads(pickle.dumps(a)) for a in fast]
    assert _epochs(h1, fast, 4, t0=300_000) == _epochs(h2, ref, 4, t0=300_000)


def test_receive_charges_qi_waits_as_python() -> None:
    """receive() (CompiledNicAgent's) on an NVMe agent: the QI waits charged as VmAgent's,
    and the epoch after it runs the same."""
    raw = CONFIGS["ns-ios-l5"]
    _h1, (fast,) = _agents(raw, True)
    _h2, (ref,) = _agents(raw, False)
    for a in (fast, ref):
        a.run_epoch(100_000)
        a.receive(EpochReport(a.vm, {"x": 1}, [(1, 2, 3, 4, 5, 6)],
                              [(0, 0, 30_000), (1, 0, 500_000)]))
    assert fast.stats == ref.stats
    assert fast.g.busy.tolist() == ref.busy_until
    for k in range(2, 9):      # the 500 us stall: completions reaped after it, the same
        assert fast.run_epoch(k * 100_000).tobytes() == ref.run_epoch(k * 100_000).tobytes()
        assert fast.stats == ref.stats


def test_guest_memory_exhausted_fails_the_same() -> None:
    """Guest memory running out mid-run stops both paths at the same time, same text."""
    raw = _exp("n-oom", {"a": {**_nvme("nested", queue_depth=64, io_sizes=[262144],
                                       io_weights=[1.0]), "memory_mib": 8}})
    msgs = []
    for on in (True, False):
        compiled_nvme.ENABLED = on
        try:
            with tempfile.TemporaryDirectory() as td, pytest.raises(RunFailed) as e:
                tables(parse_config(raw), Path(td))
        finally:
            compiled_nvme.ENABLED = True
        msgs.append(str(e.value))
    assert "guest memory exhausted" in msgs[0]
    assert msgs[0] == msgs[1]


def _group(raw: dict, name: str = "a") -> Any:
    return next(g for g in parse_config(raw).vms if g.name == name)


def test_eligible(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = _exp("e", {"a": _nvme("nested", "lazy")})
    assert compiled_nvme.eligible(_group(ok))
    assert compiled_nvme.eligible(_group(_exp("e", {"a": _nvme("passthrough")})))
    for wl in ({"rogue_fraction": 0.01}, {"io_sizes": [4096, 270336]}):
        assert not compiled_nvme.eligible(_group(_exp("e", {"a": _nvme("nested", **wl)})))
    assert compiled_nvme.eligible(_group(_exp("e", {"a": _nvme("shadow")})))
    assert not compiled_nvme.eligible(_group(_exp("e", {"a": {
        **_nvme("nested"), "churn": {"kind": "balloon", "interval_us": 100, "pages": 8}}})))
    assert not compiled_nvme.eligible(_group(_exp("e", {"a": {
        "mode": "nested", "vcpus": 1, "memory_mib": 64,
        "workload": [{"kind": "nic"}, {"kind": "nvme"}]}})))
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled_nvme.eligible(_group(ok))
    monkeypatch.delenv(compiled.ENV)
    monkeypatch.setattr(compiled_nvme, "ENABLED", False)
    assert not compiled_nvme.eligible(_group(ok))


def test_warm_up_runs() -> None:
    """warm_up (for host_iommu/kernels/warm.py) compiles or loads the loop on a tiny VM."""
    compiled_nvme.warm_up()
