"""The epoch kernel (host_iommu/kernels/epoch.py) against the Python loop it shortcuts.

HostServer.apply_epoch with the kernel on and off (server.EPOCH_KERNEL) must give the same
reports (counters, faults, unmap waits) for every epoch and leave the same host behind:
caches, invalidation queue and pending effects, memory, fault log, oracle, the out-of-order
set and the retired runs. Two sources of operations: the merged epochs of whole worlds
(recorded from a run on the Python loop, replayed on fresh hosts both ways), and random,
hostile operation streams (hypothesis): foreign and unknown devices and VMs, refused and
unknown HWPT invalidations, unmap ids far from the dense range, stamps out of order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.engine import Engine, InProcTransport
from cluster.runner import build
from host_iommu import server
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PAGE_SIZE
from host_iommu.kernels import qiq as qk
from host_iommu.protocol import (
    DMA_ROGUE,
    OP_DMA,
    OP_DTYPE,
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_SL_MAP,
    OP_SL_UNMAP,
    OP_UNMAP_RET,
    OP_UNMAP_RETIRE,
)
from tests.system.conftest import Bench, experiment, nic, nvme


def host_state(s: server.HostServer) -> dict[str, Any]:
    """Everything of a host an epoch can change, as comparable values."""
    h = s.iommu
    c = h.caches
    out: dict[str, Any] = {
        "counters": s.counters, "host_counters": s.host_counters,
        "waits": s.unmap_waits, "stamp": s._qi_stamp_max, "ooo": s._qi_out_of_order,
        "retiring": s._retiring, "oracle": dict(s.oracle.returned),
        "next_effect": h._next_effect_ns, "now": h.now_ns, "pte_writes": h.mem.pte_writes,
        "deferred": h._deferred_free, "stats": vars(h.stats),
        "iotlb": c.iotlb.state, "iotlb_n": c.iotlb.counts, "dtlb": c.dtlb.state,
        "dtlb_n": c.dtlb.counts, "ctl": h.qi.ctl,
        "inflight": h.qi.inflight[h.qi.ctl[qk.Q_LO]:h.qi.ctl[qk.Q_HI]],
        "effects": h._effects[h._effects[0, 0]:h._effects[0, 1]],
        "slab": h.mem.slab, "slot_of": h.mem.slot_of, "owner": h.mem.owner,
        "faults": h.faults.columns(),
    }
    for name in ("fl_pwc", "sl_pwc"):
        p = getattr(c, name)
        if p is not None:
            out[name] = (p.state, p.counts)
    for name in ("ctxc", "pasidc"):
        out[name] = getattr(c, name).st
        out[name + "_lines"] = repr(getattr(c, name).lines)    # the decoded entries too
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert np.array_equal(np.asarray(a), np.asarray(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=repr) == sorted(b, key=repr), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and any(isinstance(x, np.ndarray) for x in a):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _record(cfg) -> tuple[list[tuple[int, np.ndarray, int | None]], list]:
    """A world's merged epochs (host, ops, t_start) on the Python loop, with its reports."""
    hosts, agents, _ = build(cfg)
    servers = hosts if isinstance(hosts, dict) else {0: hosts}
    epochs, reports = [], []
    for hid, hs in servers.items():
        def rec(ops, t_start=None, _f=hs.apply_epoch, _h=hid):
            epochs.append((_h, ops.copy(), t_start))
            r = _f(ops, t_start)
            reports.append(r)
            return r
        hs.apply_epoch = rec
    Engine(InProcTransport(hosts, agents), cfg.experiment.epoch_us * 1000).run(
        cfg.experiment.duration_us * 1000)
    return epochs, reports


WORLDS = {
    "nested-strict-nic": lambda: experiment(
        {"a": nic("nested", rogue=0.05), "b": {**nic("nested"), "count": 2}}, duration_us=1500),
    "nested-lazy-nvme-ats": lambda: experiment(
        {"a": {**nvme("nested", "lazy", rogue=0.05), "ats": True, "count": 2}},
        duration_us=1500, host={"qi_entries": 128, "iotlb_entries": 64, "iotlb_ways": 4}),
    "shadow-passthrough": lambda: experiment(
        {"s": nic("shadow", rogue=0.05), "p": nvme("passthrough", rogue=0.05)},
        duration_us=1000),
    # 13 VMs on a context cache of 4 lines and a PASID cache of 8: misses and evictions
    "many-vms-small-caches": lambda: experiment(
        {"a": {**nic("nested", "lazy", rogue=0.05), "count": 10},
         "b": {**nvme("nested", rogue=0.05), "ats": True, "count": 3}},
        duration_us=600, host={"memory_mib": 1024, "context_cache_entries": 4,
                              "pasid_cache_entries": 8}),
    "churn": lambda: experiment(
        {"a": {**nic("nested", "lazy", rogue=0.03), "count": 2,
               "churn": {"kind": "balloon", "interval_us": 100, "pages": 64}}},
        duration_us=1500),
}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_world_epochs_equal_both_ways(world, monkeypatch):
    """Every merged epoch of a world, replayed on fresh hosts with the kernel on and off:
    the same reports, epoch by epoch, and the same host state at the end."""
    monkeypatch.setattr(server, "EPOCH_KERNEL", False)
    cfg = WORLDS[world]()
    epochs, _reports = _record(cfg)
    assert epochs
    states = []
    for on in (False, True):
        monkeypatch.setattr(server, "EPOCH_KERNEL", on)
        hosts, _agents, _ = build(cfg)
        servers = hosts if isinstance(hosts, dict) else {0: hosts}
        got = [servers[hid].apply_epoch(ops.copy(), t0) for hid, ops, t0 in epochs]
        states.append((got, {hid: host_state(s) for hid, s in servers.items()}))
    (r_off, s_off), (r_on, s_on) = states
    assert r_off == r_on
    assert_same(s_off, s_on, world)


# --- random, hostile operation streams --------------------------------------------------------
SIDS = (0x100, 0x200, 0x300)      # VM 1's, VM 2's, nobody's
KINDS = (OP_GUEST_WRITE, OP_GUEST_WRITE, OP_GUEST_WRITE, OP_HWPT_INV, OP_UNMAP_RET,
         OP_UNMAP_RETIRE, OP_DMA, OP_DMA, OP_SL_UNMAP, OP_SL_MAP)

op_rows = st.lists(st.tuples(
    st.integers(0, 400),                       # time step (may go back: see below)
    st.sampled_from((1, 1, 2, 3)),            # VM (3: unknown)
    st.sampled_from(KINDS),
    st.sampled_from(SIDS), st.sampled_from((0, 0, 0, 5)),
    st.integers(0, 40), st.integers(0, 6),     # a small address / id, a count
    st.integers(-3, 60),                       # unmap id (-1: none) / flags
    st.booleans(),                             # a far id / a stamp out of order
), min_size=1, max_size=60)


def _bench(**params) -> Bench:
    b = Bench(memory_mib=64, qi_entries=256, iotlb_entries=64, iotlb_ways=4, **params)
    b.nested_vm(1, SIDS[0], memory_mib=8)
    b.nested_vm(2, SIDS[1], memory_mib=8, ats=True)
    # page tables the guests' stores may land in (and leave table pages to land on)
    for vm in (1, 2):
        fl = b.fl[vm]
        fl.store.now = 0
        for p in range(4):
            fl.map(0x10_0000 * p, (16 + p) << 12, PAGE_SIZE)
    b.apply()
    return b


def _ops(rows) -> np.ndarray:
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    t = 1000
    for i, (dt, vm, k, sid, pasid, x, cnt, uid, odd) in enumerate(rows):
        t += dt
        r = ops[i]
        r["t_ns"] = t - 5000 if (odd and k == OP_HWPT_INV) else t
        r["vm"], r["op"], r["seq"], r["sid"], r["pasid"] = vm, k, i, sid, pasid
        far = 1 << 40 if odd else 0
        if k == OP_GUEST_WRITE:
            r["a0"] = ((1024 + 16 + x % 8) << 12) + 8 * cnt if not odd else (x << 30)
            r["a1"] = (x << 12) | 0x7 | (cnt << 52)
        elif k == OP_HWPT_INV:
            r["a0"] = (x << 12) | (0x800 if cnt == 6 else 0)
            r["a1"] = cnt if cnt < 5 else (1 << 64) - 1
            r["a2"], r["a3"] = uid % 3, uid if not far else far + uid
        elif k == OP_UNMAP_RET:
            r["a0"], r["a1"], r["a2"] = (uid % 50) + far, t - 50 * cnt, x
        elif k == OP_UNMAP_RETIRE:
            r["a0"], r["a1"] = x, cnt + 1 if cnt < 6 else 0                # 0: refused
        elif k == OP_DMA:      # odd: an address past the host's width (0 references)
            r["a0"], r["a1"] = (x << 12) | (far << 20), 64
            r["a2"] = (ACCESS_WRITE if cnt & 1 else ACCESS_READ) if cnt < 6 else 3   # 3: bad
            r["a3"] = uid
        else:                                   # balloon: a page of the VM's memory
            r["a0"], r["a1"] = (16 + x % 8) << 12, 1 + cnt % 2
    return ops


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_rows, min_size=1, max_size=3), st.booleans(),
       st.lists(st.sampled_from((1, 1, 2, 0)), min_size=8, max_size=8))
def test_random_streams_equal_both_ways(epochs, stable, owners):
    """Random epochs on two fresh hosts, kernel off and on: same reports and state. Some
    of VM 1's data frames are handed to VM 2 or the host, so that DMAs reach frames their
    VM does not own (the isolation check)."""
    results = []
    for on in (False, True):
        saved = server.EPOCH_KERNEL
        server.EPOCH_KERNEL = on
        try:
            b = _bench()
            b.h.mem.owner[b.h.vms[1].hpa_of[16:24]] = owners   # the frames DMAs reach
            reports = []
            for rows in epochs:
                ops = _ops(rows)
                if stable:    # merged order (t, vm, seq), as the engine delivers it
                    ops = ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]
                reports.append(b.server.apply_epoch(ops))
            results.append((reports, host_state(b.server)))
        finally:
            server.EPOCH_KERNEL = saved
    (r0, s0), (r1, s1) = results
    assert r0 == r1
    assert_same(s0, s1)


def _tamper(h, kind: int) -> None:
    """A change of the host's tables or context caches between epochs, as a hostile or
    buggy host driver might leave them: entries torn down (with or without the cache
    invalidation), a context entry with a reserved bit, a garbage PASID entry, a PASID
    directory entry with reserved bits, caches flushed."""
    sm, c, w = h.sm, h.caches, h.mem.write_u64
    if kind == 1:
        sm.clear_pasid_entry(SIDS[0], 0)                      # caches keep it (stale)
    elif kind == 2:
        sm.clear_pasid_entry(SIDS[1], 0)
        c.pasidc.inv_entry(SIDS[1], 0)
    elif kind == 3:
        a = sm.context_entry_addr(SIDS[1])
        w(a, h.mem.read_u64(a) | 0x40)
        c.ctxc.inv_device(SIDS[1], 0)
    elif kind == 4:
        c.ctxc.inv_global()
        c.pasidc.inv_global()
    elif kind == 5:
        sm.write_raw_pasid_entry(SIDS[0], 5, [0x1 | (6 << 6), 3, 0, 0, 0, 0, 0, 1])
        c.pasidc.inv_entry(SIDS[0], 5)
    elif kind == 6:
        a = sm.pasid_entry_addr(SIDS[0], 0)
        w0 = h.mem.read_u64(sm.context_entry_addr(SIDS[0]))
        w(w0 & ~0xFFF, h.mem.read_u64(w0 & ~0xFFF) | 0x8)   # PDE of PASIDs 0-63: reserved
        c.pasidc.inv_sid(SIDS[0])
        assert a is not None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_rows, min_size=1, max_size=3),
       st.lists(st.integers(0, 6), min_size=3, max_size=3),
       st.sampled_from([(1, 1), (2, 2), (4, 4)]))
def test_hostile_tables_and_small_caches_equal_both_ways(epochs, tamper, geom):
    """Random epochs, kernel off and on, on hosts with tiny context and PASID caches
    (misses and evictions every run) whose tables change between epochs (_tamper): the
    same reports, fault records, cache lines and LRU state."""
    results = []
    for on in (False, True):
        saved = server.EPOCH_KERNEL
        server.EPOCH_KERNEL = on
        try:
            b = _bench(context_cache_entries=geom[0], pasid_cache_entries=geom[1])
            reports = []
            for rows, kind in zip(epochs, tamper, strict=False):
                _tamper(b.h, kind)
                ops = _ops(rows)
                ops = ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]
                reports.append(b.server.apply_epoch(ops))
            results.append((reports, host_state(b.server)))
        finally:
            server.EPOCH_KERNEL = saved
    (r0, s0), (r1, s1) = results
    assert r0 == r1
    assert_same(s0, s1)


def test_kernel_is_used():
    """The switch really selects the kernel (a stream of its operations runs compiled)."""
    b = _bench()
    assert b.server._compiled() == server.EPOCH_KERNEL


@pytest.mark.parametrize("fetch", [True, False])
def test_dma_runs_take_the_kernel(monkeypatch, fetch):
    """A DMA run is the kernel's (the Python run is never called), the first one too, whose
    contexts miss the cold caches (with server.EPOCH_KERNEL_FETCH off, that one is
    Python's): good, faulting (a non-canonical address: no reference) and rogue DMAs, with
    the same counters, statistics and fault records as the Python loop gives."""
    def epochs(b: Bench) -> list:
        b.server.oracle.unmap_returned(1, 0, 1)      # unmap 0 returned long ago
        out = []
        for e, addrs in enumerate(([0], [0, 1 << 60, 0x1000, 0x10_0000, 0])):
            t = 10_000 * (e + 1)
            for i, a in enumerate(addrs):
                b.dma(1, t + i, SIDS[0], a, write=bool(i & 1), tag=0 if i == 4 else -1)
            ops = b.logs[1].take()
            ops["a2"][[i for i in (1, 3, 4) if i < ops.size]] |= DMA_ROGUE
            out.append(b.server.apply_epoch(ops))
        return out
    monkeypatch.setattr(server, "EPOCH_KERNEL", False)
    b0 = _bench()
    want = epochs(b0)
    monkeypatch.setattr(server, "EPOCH_KERNEL", True)
    monkeypatch.setattr(server, "EPOCH_KERNEL_FETCH", fetch)
    b1 = _bench()
    calls = []
    real = server.HostServer._run
    monkeypatch.setattr(server.HostServer, "_run",
                        lambda self, ops, i, *a: calls.append(i) or real(self, ops, i, *a))
    got = epochs(b1)
    assert calls == ([] if fetch else [0])   # without fetches: the cold run was Python's
    assert got == want
    c = want[1][1].counters
    assert c["faults"] >= 1 and want[1][1].faults and c["stale_dma"] == 1
    assert (c["rogue_faulted"], c["rogue_stale"], c["rogue_misdirected"]) == (1, 1, 1)
    assert_same(host_state(b0.server), host_state(b1.server))


def test_invalidation_table_grows_and_keeps_its_keys(monkeypatch):
    """The compiled table of resolved HWPT invalidations, started tiny, grows (rehashing
    what it held) over epochs of many distinct invalidations: the same results both ways."""
    def run(b: Bench) -> list:
        out = []
        for e in range(3):
            for u in range(40):
                t = 100_000 * (e + 1) + 10 * u
                addr = ((u * 7) % 24) << 12
                b.op(1, t, OP_HWPT_INV, sid=SIDS[0], pasid=0, a0=addr, a1=1 + u % 3,
                     a2=u & 1, a3=40 * e + u)
                b.op(1, t + 5, OP_UNMAP_RET, a0=40 * e + u, a1=t + 1, a2=u)
            out.append(b.server.apply_epoch(b.logs[1].take()))
        return out
    monkeypatch.setattr(server, "EPOCH_KERNEL", False)
    b0 = _bench()
    want = run(b0)
    monkeypatch.setattr(server, "EPOCH_KERNEL", True)
    b1 = _bench()
    b1.server._inv_ik = np.full((8, 6), -1, dtype=np.int64)
    b1.server._inv_iv = np.zeros((8, 2), dtype=np.int64)
    assert run(b1) == want
    assert b1.server._inv_ik.shape[0] >= 64 and b1.server._inv_im[0] == 24
    assert_same(host_state(b0.server), host_state(b1.server))
