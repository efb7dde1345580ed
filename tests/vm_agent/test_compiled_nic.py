"""The compiled NIC epoch loop (vm_agent/compiled.py, vm_agent/kernels/nic.py) against the
Python path (VmAgent + workloads/nic.py): whole runs give the same summary, metrics and
faults tables value for value, and the same op-log batches epoch by epoch; which configs
are eligible; a run stopped for room (arrays grown one step at a time, NAPI polls resumed
mid-poll) gives the same batches; pickled agents go on the same; errors are the same."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.config import parse_config
from cluster.runner import RunFailed, build
from host_iommu.protocol import EpochReport
from tests.system.golden import _exp, _nic, tables
from vm_agent import compiled
from vm_agent.agent import VmAgent
from vm_agent.kernels import dmaapi
from vm_agent.kernels import guest as kg
from vm_agent.kernels import nic as knic

NESTED = hasattr(dmaapi, "MODE_NESTED")
ALL_MODES = (("passthrough", "*"), ("nested", "strict"), ("nested", "lazy"))


@pytest.fixture
def all_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mode the compiled driver runs, whether or not MODES ships it yet."""
    if not NESTED:
        pytest.skip("dmaapi runs pass-through only")
    monkeypatch.setattr(compiled, "MODES", ALL_MODES)


def _sizes(**wl: Any) -> dict:
    return {"packet_sizes": [64, 1500, 9000], "packet_weights": [0.3, 0.5, 0.2],
            "buffer_bytes": 16384, **wl}


CONFIGS = {
    "pt": _exp("c-pt", {"a": _nic("passthrough"),
                        "b": {**_nic("passthrough", **_sizes()), "count": 2}}),
    "pt-rr-limit": _exp("c-ptrr", {"a": _nic("passthrough", request_response=True,
                                              packets=60)}),
    "pt-drops": _exp("c-ptd", {"a": {**_nic("passthrough", rx_ring=4, tx_ring=4,
                                            offered_gbps=20.0, napi_budget=2), "vcpus": 3}}),
    "ns": _exp("c-ns", {"a": _nic("nested"),
                        "b": {**_nic("nested", **_sizes(queues=3)), "count": 2}}),
    "nl": _exp("c-nl", {"a": _nic("nested", "lazy"),
                        "b": {**_nic("nested", "lazy", request_response=True), "count": 2,
                              "flush_queue": "single", "ats": True}}),
    "ns-rr-limit": _exp("c-nsrr", {"a": {**_nic("nested", request_response=True,
                                                packets=150, peer_turnaround_us=3.0),
                                         "vcpus": 1, "fl_levels": 5}}),
    "nl-drops": _exp("c-nld", {"a": {**_nic("nested", "lazy", rx_ring=4, tx_ring=4,
                                            offered_gbps=20.0, napi_budget=2,
                                            rx_fraction=0.7), "vcpus": 3, "hz": 100}}),
    "ns-tx-only": _exp("c-nstx", {"a": _nic("nested", rx_fraction=0.0, packets=400)}),
    # a saturated host queue (docs/architecture.md "Known simplifications", the QI items):
    # 8 VMs of 10 Gb/s strict unmaps on descriptors 4x slower than the default; the
    # vCPUs stall for their waits and their NAPI polls and sends wait for later epochs
    "ns-sat": {**_exp("c-nssat", {"a": {**_nic("nested", offered_gbps=10.0), "count": 8}},
                      duration_us=2000), "cost": {"qi_desc_ns": 800}},
    "ns-sat-rr": {**_exp("c-nssrr", {"a": {**_nic("nested", request_response=True,
                                                  peer_turnaround_us=2.0), "count": 6}},
                         duration_us=1500), "cost": {"qi_desc_ns": 3000}},
}


def _both(raw: dict) -> tuple[dict, dict]:
    cfg = parse_config(raw)
    with tempfile.TemporaryDirectory() as td:
        compiled.ENABLED = True
        try:
            fast = tables(cfg, Path(td))
            compiled.ENABLED = False
            ref = tables(cfg, Path(td))
        finally:
            compiled.ENABLED = True
    return fast, ref


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("pt")])
def test_passthrough_tables_equal(name: str) -> None:
    fast, ref = _both(CONFIGS[name])
    assert fast["summary"] and fast["metrics"]
    assert fast == ref


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("pt")])
def test_nested_tables_equal(name: str, all_modes: None) -> None:
    fast, ref = _both(CONFIGS[name])
    assert fast["summary"] and fast["metrics"]
    assert fast == ref


def _agents(raw: dict, on: bool) -> tuple[Any, list[VmAgent]]:
    compiled.ENABLED = on
    try:
        host, agents, _ = build(parse_config(raw))
    finally:
        compiled.ENABLED = True
    return host, agents


def _epochs(host: Any, agents: list, n: int, epoch_ns: int = 100_000, t0: int = 0
            ) -> list[bytes]:
    """n epochs by hand: every batch's bytes and each agent's stats after it."""
    out = []
    for k in range(n):
        t_end = t0 + (k + 1) * epoch_ns
        batches = {a.vm: a.run_epoch(t_end) for a in agents}
        out.extend(b.tobytes() for b in batches.values())
        out.extend(repr(sorted(a.stats.items())).encode() for a in agents)
        from host_iommu.protocol import merge
        reports = host.apply_epoch(merge(list(batches.values())), t_end - epoch_ns)
        for a in agents:
            a.receive(reports[a.vm])
    return out


class TightAgent(compiled.CompiledNicAgent):
    """Arrays grown only to the room one step needs: the loop stops for room at nearly
    every step, NAPI polls resume mid-poll."""

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
        self.mid_poll = getattr(self, "mid_poll", 0) + int(self.nic.r[knic.R_ACTIVE])
        return g


@pytest.mark.parametrize("name", ["pt-drops", "nl-drops", "ns-rr-limit"])
def test_room_stops_resume_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches and stats epoch by epoch equal the Python path's with the arrays always
    short of room."""
    if not name.startswith("pt"):
        if not NESTED:
            pytest.skip("dmaapi runs pass-through only")
        monkeypatch.setattr(compiled, "MODES", ALL_MODES)
    monkeypatch.setattr(compiled, "CompiledNicAgent", TightAgent)
    import cluster.build as cb
    monkeypatch.setattr(cb, "CompiledNicAgent", TightAgent)
    h1, fast = _agents(CONFIGS[name], True)
    h2, ref = _agents(CONFIGS[name], False)
    assert all(isinstance(a, TightAgent) for a in fast)
    assert not any(isinstance(a, compiled.CompiledNicAgent) for a in ref)
    assert _epochs(h1, fast, 8) == _epochs(h2, ref, 8)
    assert sum(a.stops for a in fast) >= 2
    if name == "nl-drops":       # polls of a nested guest log rows: stopped mid-poll
        assert sum(a.mid_poll for a in fast) >= 1


def test_pickled_agent_goes_on_the_same() -> None:
    """An agent pickled after some epochs (Ray moves objects so) runs on as the original."""
    raw = CONFIGS["pt"]
    h1, fast = _agents(raw, True)
    h2, ref = _agents(raw, False)
    assert _epochs(h1, fast, 3) == _epochs(h2, ref, 3)
    fast = [pickle.loads(pickle.dumps(a)) for a in fast]
    assert _epochs(h1, fast, 4, t0=300_000) == _epochs(h2, ref, 4, t0=300_000)


def test_receive_charges_qi_waits_as_python() -> None:
    """receive() on the arrays: faults counted, each vCPU stalled by its largest QI wait in
    full, and the epochs after it (vCPU work deferred past the stall, several epochs long on
    vCPU 1) exactly as VmAgent's."""
    raw = CONFIGS["pt-drops"]
    _h1, (fast,) = _agents(raw, True)
    _h2, (ref,) = _agents(raw, False)
    for a in (fast, ref):
        a.run_epoch(100_000)
        a.receive(EpochReport(a.vm, {"x": 1}, [(1, 2, 3, 4, 5, 6)],
                              [(0, 0, 30_000), (1, 1, 500_000), (2, 5, 7), (3, 1, 90)]))
    assert fast.stats == ref.stats
    assert fast.g.busy.tolist() == ref.busy_until
    assert ref.busy_until[1] >= 600_000 and ref.stats["cpu_busy_ns"] > 530_000
    for k in range(2, 9):
        assert fast.run_epoch(k * 100_000).tobytes() == ref.run_epoch(k * 100_000).tobytes()
        assert fast.stats == ref.stats
        assert fast.g.busy.tolist() == ref.busy_until


def test_guest_memory_exhausted_fails_the_same() -> None:
    """Guest memory running out mid-run stops both paths at the same time, same text."""
    raw = _exp("c-oom", {"a": {**_nic("passthrough", buffer_bytes=65536,
                                      packet_sizes=[60000], rx_ring=64, tx_ring=256,
                                      rx_fraction=0.2, offered_gbps=40.0),
                               "memory_mib": 8}}, duration_us=3000)
    msgs = []
    for on in (True, False):
        compiled.ENABLED = on
        try:
            with tempfile.TemporaryDirectory() as td, pytest.raises(RunFailed) as e:
                tables(parse_config(raw), Path(td))
        finally:
            compiled.ENABLED = True
        msgs.append(str(e.value))
    assert "guest memory exhausted" in msgs[0]
    assert msgs[0] == msgs[1]


def _group(raw: dict, name: str = "a") -> Any:
    return next(g for g in parse_config(raw).vms if g.name == name)


def test_eligible(monkeypatch: pytest.MonkeyPatch) -> None:
    pt = _exp("e", {"a": _nic("passthrough")})
    assert compiled.eligible(_group(pt))
    for wl in ({"rogue_fraction": 0.01}, {"buffer_bytes": 1 << 20}):
        assert not compiled.eligible(_group(_exp("e", {"a": _nic("passthrough", **wl)})))
    assert not compiled.eligible(_group(_exp("e", {"a": {
        **_nic("nested"), "workload": {"kind": "nic", "pasid_queues": 1}}})))
    assert compiled.eligible(_group(_exp("e", {"a": _nic("shadow")})))
    assert not compiled.eligible(_group(_exp("e", {"a": {
        "mode": "passthrough", "vcpus": 1, "memory_mib": 64,
        "workload": {"kind": "nvme"}}})))
    assert not compiled.eligible(_group(_exp("e", {"a": {
        **_nic("nested", "lazy"), "churn": {"kind": "balloon", "interval_us": 100,
                                            "pages": 8}}})))
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.eligible(_group(pt))
    monkeypatch.delenv(compiled.ENV)
    monkeypatch.setattr(compiled, "ENABLED", False)
    assert not compiled.eligible(_group(pt))


def test_warm_up_runs() -> None:
    """warm_up (for host_iommu/kernels/warm.py) compiles or loads the loop on a tiny VM."""
    compiled.warm_up()


def test_other_allocator_stays_on_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DMA layer built on another IOVA allocator (tests/vm_agent/test_kernel_iova.py
    plugs the array one in) is not frozen: the agent runs VmAgent's epochs."""
    from vm_agent import dma
    from vm_agent import iova as live
    monkeypatch.setattr(dma, "IovaDomain", live.ArrayIovaDomain)
    monkeypatch.setattr(dma, "IovaRcache", live.ArrayIovaRcache)
    _h, (a,) = _agents(CONFIGS["pt-rr-limit"], True)
    assert isinstance(a, compiled.CompiledNicAgent) and not a.compiled
    assert a.run_epoch(100_000).size
