"""Shadow mode (caching mode) on the compiled NIC and NVMe loops against the Python path.

vm_agent/kernels/dmaapi.py runs the guest's caching-mode path compiled: the second-level
table writes, the page-selective invalidation after every map (iotlb_sync_map) and unmap,
the trap, and the VMM's shadow walk (QEMU vtd_sync_shadow_page_table_range over
PageTable.walk_range, as vm_agent/vmm.py ShadowVmm does) with its VFIO map / unmap ops.
Here: whole runs give the same summary, metrics and faults tables value for value (NIC and
NVMe, 1 and several VMs, several vCPUs, multi-page I/Os, lazy asked for (strict under
caching mode), ATS, a saturated shared queue); op-log batches equal epoch by epoch with the
arrays always short of room; and the walk itself (dmaapi._shadow_flush) equals ShadowVmm's
on random tables and shadows, with domain-wide walks and empty entries at every level.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import parse_config
from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.invalidate import domain_flush_words
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OpLog
from tests.system.golden import _exp, _nic, _nvme, tables
from tests.vm_agent.test_compiled_nic import TightAgent, _agents, _epochs, _group
from vm_agent import compiled, compiled_nvme
from vm_agent.agent import GUEST_COUNTERS
from vm_agent.kernels import dmaapi as K
from vm_agent.kernels import guest as kg
from vm_agent.memory import GuestMemory, GuestTableStore
from vm_agent.vmm import ShadowVmm

MIXED = {"io_sizes": [512, 4096, 8192, 9216, 65536, 262144],
         "io_weights": [0.1, 0.3, 0.2, 0.1, 0.2, 0.1]}
SIZES = {"packet_sizes": [64, 1500, 9000], "packet_weights": [0.3, 0.5, 0.2],
         "buffer_bytes": 16384}

NIC = {
    "s": _exp("sh-nic", {"a": _nic("shadow"),
                         "b": {**_nic("shadow", **SIZES, queues=3), "count": 2,
                               "vcpus": 3}}),
    "s-lazy-ats": _exp("sh-nicl", {"a": {**_nic("shadow", "lazy", request_response=True),
                                         "ats": True, "vcpus": 1}}),
    "s-drops": _exp("sh-nicd", {"a": {**_nic("shadow", rx_ring=4, tx_ring=4,
                                             offered_gbps=20.0, napi_budget=2), "vcpus": 3}}),
    # a saturated host queue: the strict unmaps' waits stall the vCPUs
    "s-sat": {**_exp("sh-nics", {"a": {**_nic("shadow", offered_gbps=10.0), "count": 6}},
                     duration_us=1500), "cost": {"qi_desc_ns": 2000}},
}
NVME = {
    "s": _exp("sh-nvme", {"a": _nvme("shadow"),
                          "b": {**_nvme("shadow", queues=3, read_fraction=0.3, **MIXED),
                                "count": 2, "vcpus": 3}}),
    "s-ios-lazy": _exp("sh-nvmei", {"a": {**_nvme("shadow", "lazy", ios=40,
                                                  page_contiguity=0.6, **MIXED),
                                          "vcpus": 1, "ats": True}}),
    "s-throttled": {**_exp("sh-nvmeq", {"a": {**_nvme("shadow", queues=2, **MIXED),
                                              "count": 4}}), "cost": {"qi_desc_ns": 4000}},
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


def test_shadow_eligible() -> None:
    """Shadow runs compiled under either policy; rogue DMA keeps it on Python."""
    for policy in ("strict", "lazy"):
        assert compiled.eligible(_group(_exp("e", {"a": _nic("shadow", policy)})))
        assert compiled_nvme.eligible(_group(_exp("e", {"a": _nvme("shadow", policy)})))
    assert not compiled.eligible(_group(_exp("e", {"a": _nic("shadow", rogue_fraction=0.1)})))
    assert not compiled_nvme.eligible(_group(_exp("e", {"a": _nvme("shadow",
                                                                   rogue_fraction=0.1)})))


@pytest.mark.parametrize("name", sorted(NIC))
def test_nic_tables_equal(name: str) -> None:
    fast, ref = _both(NIC[name])
    assert fast["summary"] and fast["metrics"]
    assert fast == ref


@pytest.mark.parametrize("name", sorted(NVME))
def test_nvme_tables_equal(name: str) -> None:
    fast, ref = _both(NVME[name])
    assert fast["summary"] and fast["metrics"]
    assert fast == ref


def test_agents_compiled_and_shadowing() -> None:
    """The shadow VMs do run on the arrays, and shadow as the Python VMM does."""
    host, agents = _agents(NIC["s"], True)
    _h2, ref = _agents(NIC["s"], False)
    assert all(isinstance(a, compiled.CompiledNicAgent) and a.compiled for a in agents)
    assert _epochs(host, agents, 12) == _epochs(_h2, ref, 12)
    for a, r in zip(agents, ref, strict=True):
        assert K.shadowed(a.d) == dict(r.vmm.shadowed[r.devices[0].sid])
        assert a.stats["vmm_map_calls"] > 0 and a.stats["vmm_unmap_calls"] > 0


def test_room_stops_resume_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches and stats epoch by epoch equal the Python path's with the arrays always
    short of room (and the shadow's arrays frozen without slack, grown as they fill)."""
    monkeypatch.setattr(compiled, "CompiledNicAgent", TightAgent)
    import cluster.build as cb
    monkeypatch.setattr(cb, "CompiledNicAgent", TightAgent)
    real = K.freeze
    monkeypatch.setattr(K, "freeze", lambda agent, slack=0: real(agent, 0))
    raw = NIC["s-drops"]
    h1, fast = _agents(raw, True)
    h2, ref = _agents(raw, False)
    assert all(isinstance(a, TightAgent) for a in fast)
    assert _epochs(h1, fast, 8) == _epochs(h2, ref, 8)
    assert sum(a.stops for a in fast) >= 2


# --- the walk alone: dmaapi._shadow_flush against ShadowVmm.handle -------------------------
def _table() -> tuple[PageTable, GuestMemory]:
    mem = GuestMemory((256 << 20) >> 12)
    return PageTable(GuestTableStore(mem), "sl", 4, max_order=0), mem


# IOVA pages near the boundaries of every level (2 MiB, 1 GiB, 512 GiB) and in the 4-GiB
# window a guest's allocator uses
_PAGE = st.one_of(st.integers(0, 3 << 10), st.integers((1 << 18) - 600, (1 << 18) + 600),
                  st.integers((1 << 27) - 40, (1 << 27) + 40),
                  st.integers((1 << 20) - 3000, (1 << 20) - 1))
_OP = st.tuples(st.sampled_from(["map", "unmap", "flush", "free"]), _PAGE, st.integers(1, 64),
                st.integers(0, 1 << 20), st.booleans())


@settings(max_examples=80, deadline=None)
@given(st.lists(_OP, min_size=1, max_size=30), st.booleans())
def test_walk_equals_shadow_vmm(ops: list, ats: bool) -> None:
    """Random maps and unmaps of the guest's table, each followed by a flush of its range
    or not (a flush of another range, or of the domain, catches up later): the VMM's
    shadow, its ops (times included), stats and the time after the trap equal ShadowVmm's,
    flush by flush. Ranges crossing 2-MiB, 1-GiB and 512-GiB boundaries (empty entries at
    levels 2 to 4, a domain-wide walk past CAP.MAMV), remapped pages (changed
    translations: an unmap then a map), whole 2-MiB and 1-GiB regions unmapped (tables
    freed: one VFIO unmap of a shadowed region above level 1)."""
    costs = CostModel()
    table, mem = _table()
    stats = dict.fromkeys(GUEST_COUNTERS, 0)
    log = OpLog(0)
    vmm = ShadowVmm(log, costs, stats)
    sid = 0x10
    g = kg.new_arrays(0, 1, mem.frames, log_rows=1 << 16)
    d = None
    t = 1000
    for kind, page, pages, phys, write in ops:
        if kind == "free":     # an unmap of a whole 2-MiB or 1-GiB region: its tables freed
            pages = 512 if write else 1 << 18
            page &= ~(pages - 1)
        iova = page << 12
        if kind == "map":
            table.map(iova, (phys % ((64 << 20) >> 12)) << 12, pages << 12, write=write)
        elif kind in ("unmap", "free"):
            table.unmap(iova, pages << 12)
        if kind == "flush" and write:    # a flush of the whole domain
            words = domain_flush_words(1, None, 0, ats_sids=[])
            addr, npages = 0, 1 << 60
        else:
            words = domain_flush_words(1, iova, pages, ats_sids=[sid] if ats else [])
            addr, npages = iova, pages
        cmds = [qi.decode_words(*w) for w in words] + [qi.decode_words(*qi.WAIT_WORDS)]
        # the arrays: the table as it is now, the shadow carried over from the last flush
        d0 = _arrays(table, vmm, sid, costs, d)
        unmap_id = len(log.rows)
        c = costs
        t_py = vmm.handle(cmds, t + c.qi_submit_ns + c.vm_exit_ns // 2, sid, table, unmap_id)
        t_py += c.vm_exit_ns - c.vm_exit_ns // 2
        n0 = int(g.ctl[kg.C_LOG_N])
        t_k = K._shadow_flush(g.stats, g.ctl, g.log, d0.ctl, d0.costs, d0.pt, d0.ws, d0.sh,
                              d0.sr, t, addr, npages, len(cmds), unmap_id)
        assert g.ctl[kg.C_ERR] == 0
        assert t_k == t_py
        rows = np.array([x & (2**64 - 1) for x in log.rows], np.uint64).view(np.int64)
        assert g.log[n0:int(g.ctl[kg.C_LOG_N])].ravel().tolist() == rows.tolist()
        log.rows = []
        assert K.shadowed(d0) == dict(vmm.shadowed[sid])
        for name in ("vmm_map_calls", "vmm_unmap_calls"):
            assert g.stats[GUEST_COUNTERS.index(name)] == stats[name]
        d = d0
        t = t_py + 100


def _arrays(table: PageTable, vmm: ShadowVmm, sid: int, costs: CostModel,
            last: Any) -> Any:
    """DomainArrays over the table now, with the shadow the kernel kept (or the VMM's,
    the first time)."""
    from vm_agent.kernels import pgtable as kpg
    state = table.store.state
    frames, rows, events = (int(x) for x in state[:kpg.H_STAMP])
    pt = kpg.grown(state, frames, rows, events)
    ctl = np.zeros(K.D_LEN, np.int64)
    ctl[K.D_MODE] = K.MODE_SHADOW
    ctl[K.D_SID] = sid
    ctl[K.D_LEVELS] = 4
    if last is None:
        sh = np.full((1 << 12, K.SH_COLS), -1, np.int64)
        sr = np.full((1 << 10, K.SR_COLS), -1, np.int64)
    else:
        sh, sr = last.sh, last.sr
        ctl[K.D_SH_N], ctl[K.D_SR_N] = last.ctl[K.D_SH_N], last.ctl[K.D_SR_N]
    costs_a = np.array([getattr(costs, f) for f in K.COST_FIELDS], np.int64)
    z1 = np.zeros(1, np.int64)
    z2 = np.zeros((1, 2), np.int64)
    return K.DomainArrays(ctl, costs_a, z2, z1, z2, pt, z1, z1, z2, z2, z1, z2, sh, sr,
                          np.zeros(K.WS_LEN, np.int64))
