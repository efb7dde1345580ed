"""The host's per-epoch buffers and its one preparation kernel (host_iommu/server.py
_epoch_buffers, _admit_compiled; kernels/epoch.py prepare) against the paths they replace.

The epoch kernel's per-operation buffers (results, requests, device-TLB hits, waits,
retires, access bytes, admission marks), its scalar state, statistics, per-VM counts and
refusal counts are kept across epochs: an epoch must never see what an earlier one left
there. Checked with the kernel on against the Python loop (server.EPOCH_KERNEL off), epoch
by epoch: epochs that grow the buffers past their first size and shrink again, faulting
and refused operations left in them, a VM set up between epochs (the per-VM rows grow),
and ``prepare`` against op_matrix + admit + the access column on random rows.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_iommu import server
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE
from host_iommu.iommu import IommuParams
from host_iommu.kernels import epoch as ek
from host_iommu.protocol import (
    MAX_RETIRE_RUN,
    OP_DMA,
    OP_DTYPE,
    OP_UNMAP_RETIRE,
    VmSetup,
)
from tests.host_iommu.test_kernel_epoch import _bench, _ops, assert_same, host_state, op_rows


def _both_ways(run):
    """run() -> (reports, state) with the kernel off, then on."""
    out = []
    for on in (False, True):
        saved = server.EPOCH_KERNEL
        server.EPOCH_KERNEL = on
        try:
            out.append(run())
        finally:
            server.EPOCH_KERNEL = saved
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(op_rows, st.integers(1, 6)), min_size=2, max_size=4))
def test_buffers_reused_across_growing_and_shrinking_epochs(epochs):
    """Epochs of random (hostile) rows repeated 1-6 times over: some pass the buffers'
    first size (256 operations) and make them grow, the next ones are small again."""
    def run():
        b = _bench()
        reports = []
        for rows, times in epochs:
            ops = _ops(rows * times)
            ops = ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]
            reports.append(b.server.apply_epoch(ops))
        return reports, host_state(b.server)

    (r0, s0), (r1, s1) = _both_ways(run)
    assert r0 == r1
    assert_same(s0, s1)


def _dma_epoch(t: int, rows) -> np.ndarray:
    """(vm, sid, gpa, access, op) rows as one epoch's operations, 10 ns apart."""
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    for i, (vm, sid, gpa, acc, op) in enumerate(rows):
        ops[i] = (t + 10 * i, vm, i, op, sid, 0, gpa, 64, acc, -1)
    return ops


def test_vm_set_up_between_epochs():
    """A pass-through VM set up after two epochs (the VM rows of the counts and refusals
    grow), then epochs where both VMs' DMAs, faults, foreign devices and unknown VMs mix."""
    def run():
        hs = server.HostServer(IommuParams(memory_mib=64, qi_entries=128,
                                           iotlb_entries=64, iotlb_ways=4))
        hs.setup_vm(VmSetup(1, 4 << 20, "passthrough", (0x100,)))
        reports = []
        for e in range(6):
            if e == 2:
                hs.setup_vm(VmSetup(7, 4 << 20, "passthrough", (0x700,), ats=True))
            rows = []
            for q in range(5 + 40 * (e % 2)):
                vm = 1 if q % 3 else 7
                sid = 0x100 if vm == 1 else 0x700
                if q % 11 == 5:
                    sid = 0x700 if vm == 1 else 0x100       # a foreign device
                gpa = (q % 9) << 12 if q % 13 else 64 << 20  # past the VM's memory
                acc = ACCESS_WRITE if q & 1 else ACCESS_READ
                rows.append((vm if q % 17 != 3 else 9, sid, gpa, acc, OP_DMA))   # 9: unknown
            reports.append(hs.apply_epoch(_dma_epoch(1000 + 100_000 * e, rows),
                                          1000 + 100_000 * e))
        return reports, host_state(hs), hs.host_counters

    (r0, s0, h0), (r1, s1, h1) = _both_ways(run)
    assert r0 == r1
    assert h0 == h1
    assert_same(s0, s1)


rows = st.lists(st.tuples(
    st.integers(-2, 1 << 40), st.integers(-1, 5), st.integers(0, 255),
    st.sampled_from((0x100, 0x200, 0x300, 0)), st.sampled_from((0, 3, (1 << 20) + 1)),
    st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
    st.integers(-(1 << 31), (1 << 31) - 1), st.integers(-5, 1 << 62)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(rows, st.booleans())
def test_prepare_equals_op_matrix_admit_and_access(rows, strided):
    """kernels/epoch.py prepare (one call) against _op_matrix, admit and the access column
    as numpy computes them, on random rows (any kind, VM, sid, PASID, field), strided or
    not; its buffers hold another epoch's values first."""
    ops = np.zeros(2 * len(rows), dtype=OP_DTYPE)
    for i, (t, vm, op, sid, pasid, a0, a1, a2, a3) in enumerate(rows):
        ops[2 * i] = (t, vm, i, op, sid, pasid, a0, a1, a2, a3)
    ops = ops[::2] if strided else np.ascontiguousarray(ops[::2])
    n = ops.size
    known = np.array([False, True, True, False, True], dtype=bool)
    owner = np.zeros(1 << 16, dtype=np.int64)
    owner[0x100], owner[0x200] = 1, 2
    args = (known, server._KNOWN_OP, server._SID_OP, owner, server.MAX_PASID, OP_DMA,
            ACCESS_READ, ACCESS_WRITE, OP_UNMAP_RETIRE, MAX_RETIRE_RUN)
    m0 = server.HostServer._op_matrix(None, ops)
    ref0, keep0, kinds0 = (np.zeros((5, 2), np.int64), np.zeros(n, bool),
                           np.zeros(256, np.int64))
    unknown0 = ek.admit(m0, *args, ref0, keep0, kinds0)
    m1 = np.full((ek.M_ROWS, n), 77, dtype=np.int64)
    acc1 = np.full(n + 3, 9, dtype=np.uint8)
    ref1, keep1, kinds1 = (np.zeros((5, 2), np.int64), np.ones(n, bool),
                           np.zeros(256, np.int64))
    unknown1 = ek.prepare(np.ascontiguousarray(ops), m1, acc1, *args, ref1, keep1, kinds1)
    assert unknown0 == unknown1
    assert np.array_equal(m0, m1)
    assert np.array_equal(acc1[:n], (ops["a2"] & 0xFF).astype(np.uint8))
    assert np.array_equal(ref0, ref1) and np.array_equal(keep0, keep1)
    assert np.array_equal(kinds0, kinds1)


# --- every VM's guest stores in one call (kernels/epoch.py store_frames_flat) ----------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 60), st.booleans()), max_size=40),
       st.integers(0, 5))
def test_store_frames_flat_equals_a_call_per_vm(sizes, stores, start):
    """store_frames_flat over maps in one buffer against store_frames with each VM's own
    map (its view), on random stores (GPAs past a map's end included) from ``start`` on."""
    rng = np.random.default_rng(len(stores))
    base = rng.integers(-1, 1 << 20, size=sum(sizes) + 3).astype(np.int64)
    vmrow = np.full((len(sizes) + 2, 2), -1, dtype=np.int64)
    maps, off = {}, 1
    for v, k in enumerate(sizes):
        vmrow[v + 1] = off, k
        maps[v + 1] = base[off:off + k]
        off += k
    m = np.full((ek.M_ROWS, len(stores)), 5, dtype=np.int64)
    for i, (v, frame, store) in enumerate(stores):
        m[ek.M_OP, i] = server.OP_GUEST_WRITE if store else OP_DMA
        m[ek.M_VM, i] = 1 + v % len(sizes)
        m[ek.M_A0, i] = (frame << 12) | 8 * v
    want = m.copy()
    for v, hpa_of in maps.items():
        idx = np.flatnonzero((want[ek.M_OP] == server.OP_GUEST_WRITE) & (want[ek.M_VM] == v))
        idx = idx[idx >= start]
        ek.store_frames(want, idx, hpa_of, hpa_of.size)
    ek.store_frames_flat(m, start, base, vmrow)
    assert np.array_equal(m, want)


def test_nested_and_shadow_stores_both_ways():
    """A host with nested VMs (guest stores every epoch) and a shadow VM (whose VFIO
    arrays move every VM's map into their own buffer): the stores' frames found through
    the shared buffer, the kernel on and off, STORES_FLAT on and off: the same."""
    from tests.host_iommu.test_kernel_epoch import _record
    from tests.system.conftest import experiment, nic

    saved = server.EPOCH_KERNEL
    server.EPOCH_KERNEL = False
    try:
        cfg = experiment({"a": {**nic("nested", rogue=0.05), "count": 3},
                          "s": nic("shadow", rogue=0.05)}, duration_us=800)
        epochs, _ = _record(cfg)
    finally:
        server.EPOCH_KERNEL = saved
    from cluster.runner import build

    results = []
    for on, flat in ((False, False), (True, False), (True, True)):
        saved = server.EPOCH_KERNEL, server.STORES_FLAT
        server.EPOCH_KERNEL, server.STORES_FLAT = on, flat
        try:
            hosts, _agents, _ = build(cfg)
            got = [hosts.apply_epoch(ops.copy(), t0) for _h, ops, t0 in epochs]
            results.append((got, host_state(hosts)))
        finally:
            server.EPOCH_KERNEL, server.STORES_FLAT = saved
    for r, s in results[1:]:
        assert r == results[0][0]
        assert_same(s, results[0][1])


def test_store_maps_resolve_as_each_vms_own_map():
    """HostServer._resolve_stores on a four-VM host (maps of different sizes, one VM's
    memory with holes), STORES_FLAT on against off: the same host frame for every store,
    also after the maps were moved into one buffer and after a VM's map was replaced."""
    hs = server.HostServer(IommuParams(memory_mib=64, qi_entries=128, iotlb_entries=64,
                                       iotlb_ways=4))
    for vm, mib in ((1, 4), (2, 2), (5, 8), (3, 1)):
        hs.setup_vm(VmSetup(vm, mib << 20, "passthrough", (0x100 * vm,)))
    hs.iommu.vms[5].hpa_of[7:40:3] = -1
    rng = np.random.default_rng(7)
    n = 300
    ops = np.zeros(n, dtype=OP_DTYPE)
    ops["op"] = np.where(rng.random(n) < 0.8, server.OP_GUEST_WRITE, OP_DMA)
    ops["vm"] = rng.choice([1, 2, 3, 5], size=n)
    ops["a0"] = (rng.integers(0, 3000, size=n) << 12) | 8 * rng.integers(0, 512, size=n)
    for step in range(3):
        if step == 2:
            hs.iommu.vms[2].hpa_of = hs.iommu.vms[2].hpa_of.copy()
        got = []
        for flat in (False, True):
            saved = server.STORES_FLAT
            server.STORES_FLAT = flat
            try:
                m = server.HostServer._op_matrix(None, ops)
                hs._resolve_stores(ops, m, 5)
                got.append(m)
            finally:
                server.STORES_FLAT = saved
        assert np.array_equal(got[0], got[1])
        assert (got[1][ek.M_RES, 5:][ops["op"][5:] == server.OP_GUEST_WRITE] >= 0).any()
