"""The epoch kernel's VFIO maps and unmaps (host_iommu/kernels/vfio.py) against vfio.py.

HostServer.apply_epoch with the kernel applying VFIO operations itself, with the kernel on
but every VFIO operation left to _control (server.EPOCH_KERNEL_VFIO off), and on the Python
loop (server.EPOCH_KERNEL off): the same reports, epoch by epoch, and the same host behind,
the containers' records, pins, shadow tables (entries and PageTable's bookkeeping) and
counts included. Streams (hypothesis): maps and unmaps overlapping, of unmapped and partly
mapped ranges, many pages, across 2-MiB boundaries and covering whole 2-MiB regions (a table
page freed: Python), the same GPA pinned through two IOVAs, foreign and unknown devices, ATS,
read-only maps, unbacked GPAs, stamps out of order, with DMAs and unmap returns between.
Whole worlds (shadow NIC and NVMe, one and several VMs) are replayed both ways too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_iommu import server
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PAGE_SIZE
from host_iommu.iommu import IommuParams
from host_iommu.protocol import (
    OP_DMA,
    OP_DTYPE,
    OP_UNMAP_RET,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
    VmSetup,
)
from host_iommu.vfio import DomainRecord, VfioRecord
from tests.host_iommu.test_kernel_epoch import _record, assert_same, host_state
from tests.system.conftest import experiment, nic, nvme

MIB = 1 << 20
L2 = 1 << 21
SIDS = (0x100, 0x108, 0x200, 0x300)   # VM 1's two devices, VM 2's (ATS), nobody's


def vfio_state(s: server.HostServer) -> dict[str, Any]:
    """The containers and the VMs' pins as comparable values."""
    out: dict[str, Any] = {}
    for sid, dom in sorted(s.shadow_of_sid.items()):
        t = dom.table
        out[f"dom{sid:#x}"] = {
            "record": dict(dom.gpa_of_iova), "pinned": dom.pinned_pages,
            "pte_writes": dom.pte_writes, "used": dict(t._used),
            "freed_tables": t.freed_tables, "leaves": list(t.leaves()),
            "freed": list(t.store.freed)}
    for vm, v in sorted(s.iommu.vms.items()):
        out[f"pins{vm}"] = v.pins.copy()
        out[f"hpa{vm}"] = v.hpa_of.copy()
    out["free_frames"] = s.iommu.mem.free_frames
    return out


def make_host(ats: bool) -> server.HostServer:
    hs = server.HostServer(IommuParams(memory_mib=64, qi_entries=128, iotlb_entries=64,
                                       iotlb_ways=4))
    hs.setup_vm(VmSetup(1, 8 * MIB, "shadow", SIDS[:2]))
    hs.setup_vm(VmSetup(2, 4 * MIB, "shadow", SIDS[2:3], ats))
    return hs


KINDS = (OP_VFIO_MAP, OP_VFIO_MAP, OP_VFIO_MAP, OP_VFIO_UNMAP, OP_VFIO_UNMAP, OP_DMA,
         OP_UNMAP_RET)
# IOVA bases: inside one 2-MiB region, just below a 2-MiB boundary, far up, a 4-KiB odd one
BASES = (0x40_0000, L2 * 3 - 3 * PAGE_SIZE, 1 << 40, 0x40_0000 + 0x800)

op_rows = st.lists(st.tuples(
    st.integers(0, 300),                        # time step
    st.sampled_from((1, 1, 1, 2, 3)),           # VM (3: unknown)
    st.sampled_from(KINDS),
    st.sampled_from(SIDS),
    st.sampled_from(BASES), st.integers(0, 12),  # IOVA base, page offset
    st.sampled_from((1, 1, 2, 3, 8, 600)),      # pages (600: past a 2-MiB region)
    st.integers(0, 40),                         # GPA frame (some shared by two IOVAs)
    st.integers(-2, 30),                        # unmap id / writable
    st.booleans(),                              # odd: out of order, unbacked, whole 2 MiB
), min_size=1, max_size=50)


def _ops(rows) -> np.ndarray:
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    t = 1000
    for i, (dt, vm, k, sid, base, off, pages, gf, uid, odd) in enumerate(rows):
        t += dt
        r = ops[i]
        r["t_ns"] = t - 4000 if (odd and k == OP_VFIO_UNMAP) else t
        r["vm"], r["op"], r["seq"], r["sid"] = vm, k, i, sid
        iova = base + off * PAGE_SIZE
        if k == OP_VFIO_MAP:
            r["a0"], r["a2"], r["a3"] = iova, pages * PAGE_SIZE, uid & 1
            r["a1"] = (1 << 40) if (odd and pages == 1) else gf * PAGE_SIZE   # unbacked
        elif k == OP_VFIO_UNMAP:
            size = pages * PAGE_SIZE if not (odd and pages == 1) else 2 * L2
            r["a0"], r["a1"], r["a3"] = iova if size != 2 * L2 else base & ~(L2 - 1), size, uid
        elif k == OP_DMA:
            r["a0"], r["a1"] = iova, 64
            r["a2"], r["a3"] = (ACCESS_WRITE if uid & 1 else ACCESS_READ), uid
        else:
            r["a0"], r["a1"], r["a2"] = max(uid, 0), t - 40 * (off % 3), sid
    return ops


def _run(epochs: list[np.ndarray], ats: bool, kernel: bool, vfio: bool, monkeypatch
         ) -> tuple[list, dict, dict]:
    monkeypatch.setattr(server, "EPOCH_KERNEL", kernel)
    monkeypatch.setattr(server, "EPOCH_KERNEL_VFIO", vfio)
    hs = make_host(ats)
    reports = [hs.apply_epoch(ops.copy(), int(ops["t_ns"].min()) if ops.size else None)
               for ops in epochs]
    return reports, host_state(hs), vfio_state(hs)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(epochs=st.lists(op_rows, min_size=1, max_size=4), ats=st.booleans())
def test_random_vfio_streams_equal_three_ways(epochs, ats, monkeypatch):
    """Python loop, kernel with VFIO in Python, kernel with VFIO compiled: all the same."""
    eps = [_ops(rows) for rows in epochs]
    got = [_run(eps, ats, k, v, monkeypatch) for k, v in ((False, False), (True, False),
                                                           (True, True))]
    ref = got[0]
    for other in got[1:]:
        assert ref[0] == other[0]
        assert_same(ref[1], other[1], "host")
        assert_same(ref[2], other[2], "vfio")


def test_common_ops_take_the_kernel(monkeypatch):
    """Well-formed maps and unmaps (one page and many, across a 2-MiB boundary) never reach
    _control once the tables exist; an unmap covering a whole 2-MiB region does."""
    hs = make_host(False)
    calls = []
    real = server.vfio_map, server.vfio_unmap

    def spy_map(*a, **k):
        calls.append("map")
        return real[0](*a, **k)

    def spy_unmap(*a, **k):
        calls.append("unmap")
        return real[1](*a, **k)

    def epoch(rows, t0):
        ops = np.zeros(len(rows), dtype=OP_DTYPE)
        for i, (k, a0, a1, a2, a3) in enumerate(rows):
            ops[i] = (t0 + 10 * i, 1, i, k, SIDS[0], 0, a0, a1, a2, a3)
        return hs.apply_epoch(ops, t0)

    base = L2 * 3 - 3 * PAGE_SIZE
    epoch([(OP_VFIO_MAP, base, 0, 8 * PAGE_SIZE, 1),       # tables made in Python
           (OP_VFIO_UNMAP, base, 8 * PAGE_SIZE, 0, 1)], 1000)
    monkeypatch.setattr(server, "vfio_map", spy_map)
    monkeypatch.setattr(server, "vfio_unmap", spy_unmap)
    monkeypatch.setattr(server, "_VFIO_MAP", spy_map)
    monkeypatch.setattr(server, "_VFIO_UNMAP", spy_unmap)
    rep = epoch([(OP_VFIO_MAP, base, 0x5000, 8 * PAGE_SIZE, 1),
                 (OP_VFIO_MAP, base + 8 * PAGE_SIZE, 0x5000, PAGE_SIZE, 0),
                 (OP_VFIO_UNMAP, base + 2 * PAGE_SIZE, 4 * PAGE_SIZE, 0, 2),
                 (OP_VFIO_UNMAP, base, 16 * PAGE_SIZE, 0, 3)], 100_000)
    assert calls == []
    c = rep[1].counters
    assert c["pinned_pages"] == 8 + 8 + 1 and c["vfio_errors"] == 0   # since the start
    assert c["host_inv_descriptors"] == 3 * 2                       # IOTLB + wait each
    dom = hs.shadow_of_sid[SIDS[0]]
    assert isinstance(dom.gpa_of_iova, DomainRecord) and dict(dom.gpa_of_iova) == {}
    assert int(hs.iommu.vms[1].pins.sum()) == 0
    epoch([(OP_VFIO_MAP, 0x40_0000, 0, PAGE_SIZE, 1),
           (OP_VFIO_UNMAP, 0x40_0000, L2, 0, 4)], 200_000)   # frees a table: Python
    assert calls == ["unmap"]


def test_record_is_a_dict():
    """DomainRecord (containers sharing one VfioRecord, growing) behaves as a dict."""
    rec = VfioRecord(8)
    a, b = DomainRecord(rec, 3), DomainRecord(rec, 4)
    da: dict[int, int] = {}
    db: dict[int, int] = {}
    rng = np.random.default_rng(5)
    for i in range(4000):
        x = int(rng.integers(0, 80))
        d, ref = (a, da) if rng.random() < 0.5 else (b, db)
        u = rng.random()
        if u < 0.5:
            d[x] = ref[x] = i
        elif u < 0.8:
            assert (x in d) == (x in ref)
            if x in ref:
                assert d.pop(x) == ref.pop(x)
        else:
            assert d.get(x) == ref.get(x)
        assert len(a) == len(da) and len(b) == len(db)
    assert a == da and b == db and list(a) == sorted(da)
    assert "x" not in a and -1 not in a


WORLDS = {
    "shadow-nic": lambda: experiment({"a": nic("shadow", rogue=0.05)}, duration_us=1500),
    "shadow-nvme": lambda: experiment({"a": nvme("shadow", rogue=0.05)}, duration_us=1500),
    "shadow-many": lambda: experiment(
        {"a": {**nic("shadow", rogue=0.05), "count": 3},
         "b": {**nvme("shadow", "strict", rogue=0.05), "count": 2, "ats": True}},
        duration_us=800, host={"qi_entries": 128, "iotlb_entries": 64, "iotlb_ways": 4}),
}


@pytest.mark.parametrize(("world", "fold_sum"), [(w, 32) for w in sorted(WORLDS)]
                         + [("shadow-many", 0)])
def test_shadow_worlds_equal_both_ways(world, fold_sum, monkeypatch):
    """Every merged epoch of a shadow world, replayed on fresh hosts on the Python loop and
    on the kernel with VFIO compiled: the same reports and host state at the end (the
    kernel's table counts folded back row by row, or summed by table page)."""
    monkeypatch.setattr(server, "_FOLD_SUM_MIN", fold_sum)
    monkeypatch.setattr(server, "EPOCH_KERNEL", False)
    cfg = WORLDS[world]()
    epochs, _reports = _record(cfg)
    assert epochs
    states = []
    for on in (False, True):
        monkeypatch.setattr(server, "EPOCH_KERNEL", on)
        from cluster.runner import build
        hosts, _agents, _ = build(cfg)
        servers = hosts if isinstance(hosts, dict) else {0: hosts}
        got = [servers[hid].apply_epoch(ops.copy(), t0) for hid, ops, t0 in epochs]
        states.append((got, {hid: {"host": host_state(s), "vfio": vfio_state(s)}
                             for hid, s in servers.items()}))
    (r_off, s_off), (r_on, s_on) = states
    assert r_off == r_on
    assert_same(s_off, s_on, world)
