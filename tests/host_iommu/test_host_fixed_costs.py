"""The host's per-epoch preparation on kernels (host_iommu/server.py, kernels/epoch.py)
against the Python it replaces.

- ``inv_encode``, the first sight of a one-entry HWPT invalidation, writes exactly the words
  nested.one_entry_words gives (its direct encoding: a page-selective PASID-based IOTLB
  invalidation with Linux calculate_psi_aligned_address's range, then the wait) and leaves
  every other case (ATS, everything, no pages, other flags, an unaligned address, another
  VM's or no HWPT) to the Python loop;
- its table of nested domains is made again when a VM binds a new first level (the same
  (sid, pasid) refused before the bind, resolved after it), both ways equal;
- ``resolve_stores`` / ``store_frames`` give the frames the numpy look-up gives, for one VM
  and for many VMs' stores interleaved;
- a one-VM world, epoch by epoch, equal with the kernel off and on.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import server
from host_iommu.kernels import epoch as ek
from host_iommu.nested import NestedDomain, one_entry_words
from host_iommu.protocol import OP_DTYPE, OP_GUEST_WRITE, OP_HWPT_INV, OP_UNMAP_RET
from tests.host_iommu.test_kernel_epoch import (
    _record,
    assert_same,
    host_state,
)
from tests.host_iommu.test_one_entry_words import ATS_SID, M64, SID, _host, addrs, npages
from tests.system.conftest import Bench, experiment, nic


def _inv_matrix(rows: list[tuple[int, int, int, int, int, int]]) -> np.ndarray:
    """An operation matrix of HWPT invalidations (vm, sid, pasid, addr, npages, flags)."""
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    for i, (vm, sid, pasid, addr, n, flags) in enumerate(rows):
        ops[i] = (1000 + i, vm, i, OP_HWPT_INV, sid, pasid, addr, n, flags, i)
    return server.HostServer._op_matrix(None, ops)   # self is not used


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.tuples(addrs, npages, st.sampled_from([0, 1, 2, 3, -1]),
                                  st.sampled_from([(1, SID, 0), (1, SID, 5), (1, ATS_SID, 0),
                                                   (2, SID, 0), (1, 0x300, 0)])),
                        min_size=1, max_size=12),
       did=st.sampled_from([1, 7, 0xFFFF, 0x1_0000]),
       pasid=st.sampled_from([0, 5, (1 << 20) - 1, 1 << 20]))
def test_inv_encode_equals_one_entry_words(entries, did, pasid):
    """Every operation inv_encode resolves has one_entry_words' words; it leaves exactly
    those one_entry_words does not encode directly, or whose HWPT is not the VM's."""
    h = _host()
    doms = {(SID, 0): NestedDomain(1, did, SID, pasid, 0x1000, 4),
            (SID, 5): NestedDomain(1, 3, SID, 5, 0x1000, 4),
            (ATS_SID, 0): NestedDomain(1, 4, ATS_SID, 0, 0x1000, 4)}
    hs = server.HostServer.__new__(server.HostServer)
    hs.iommu, hs.nested, hs._doms_version = h, doms, 1
    hs._inv_dom_sig = None
    dk, dv = server.HostServer._inv_domains(hs)
    m = _inv_matrix([(vm, sid, p, a, n, f) for a, n, f, (vm, sid, p) in entries])
    idx = np.arange(len(entries), dtype=np.int64)
    words = np.zeros(8 * len(entries) + 8, dtype=np.uint64)
    left = np.empty(len(entries), dtype=np.int64)
    nl, end = ek.inv_encode(m, idx, dk, dv, server._WAIT_WORDS, words, 8, left)
    assert words[:8].tolist() == [0] * 8          # written from ``end`` on only
    left = set(left[:nl].tolist())
    at = 8
    for r, (a, n, f, (vm, sid, p)) in enumerate(entries):
        dom = doms.get((sid, p))
        own = dom is not None and dom.vm == vm
        direct = (own and sid not in h.ats_sids and f in (0, 1) and 0 < n < M64
                  and a % 4096 == 0 and 0 <= dom.did <= 0xFFFF and 0 <= dom.pasid < 1 << 20)
        assert (r not in left) == direct
        if direct:
            assert (m[ek.M_RES, r], m[ek.M_NDESC, r]) == (at, 2)
            assert words[at:at + 8].tolist() == one_entry_words(h, dom, a, n, f)
            at += 8
        else:
            assert (m[ek.M_RES, r], m[ek.M_NDESC, r]) == (-1, 0)
    assert end == at


def _inv_epoch(t: int, pasid: int, uid: int) -> np.ndarray:
    ops = np.zeros(2, dtype=OP_DTYPE)
    ops[0] = (t, 1, 2 * uid, OP_HWPT_INV, SID, pasid, 0x4000 * (uid + 1), 1, 0, uid)
    ops[1] = (t + 5000, 1, 2 * uid + 1, OP_UNMAP_RET, SID, 0, uid, t + 10, 0, 0)
    return ops


@pytest.mark.parametrize("encode", [True, False])
def test_bind_after_first_sight_both_ways(monkeypatch, encode):
    """A HWPT invalidation at (sid, 5) before VM 1 binds a first level there is refused
    (vfio_errors); after bind_nested the same operation, and a new address, resolve:
    the kernel's domain table and its kept resolutions are made again, and every report
    equals the Python loop's."""
    monkeypatch.setattr(server, "EPOCH_INV_ENCODE", encode)
    got = []
    for on in (False, True):
        monkeypatch.setattr(server, "EPOCH_KERNEL", on)
        b = Bench(memory_mib=64, qi_entries=256)
        b.nested_vm(1, SID)
        hs = b.server
        reports = [hs.apply_epoch(_inv_epoch(1000, 5, 0))]
        reports.append(hs.apply_epoch(_inv_epoch(20_000, 0, 1)))
        hs.bind_nested(1, SID, 5, b.fl[1].root, t_ns=40_000)
        reports.append(hs.apply_epoch(_inv_epoch(50_000, 5, 0)))
        reports.append(hs.apply_epoch(_inv_epoch(80_000, 5, 2)))
        got.append((reports, host_state(hs)))
    (r0, s0), (r1, s1) = got
    assert r0 == r1
    assert r1[0][1].counters["vfio_errors"] == 1
    assert r1[2][1].counters["vfio_errors"] == 1          # no new refusal after the bind
    assert r1[3][1].counters["host_inv_descriptors"] > r1[1][1].counters[
        "host_inv_descriptors"]
    assert_same(s0, s1)


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from(
    [OP_GUEST_WRITE, OP_GUEST_WRITE, OP_HWPT_INV]), st.integers(0, (1 << 16) - 1),
    st.sampled_from([0, 1 << 63, M64 & ~0xFFF])), min_size=0, max_size=40),
    start=st.integers(0, 5))
def test_store_frames_equal_numpy(rows, start):
    """The kernels' frames of guest stores from ``start`` on equal numpy's look-up through
    each VM's map (-1 where not backed or past the map); other operations keep M_RES."""
    rng = np.random.default_rng(len(rows))
    maps = {v: np.where(rng.random(1 << 12) < 0.2, -1, rng.integers(0, 1 << 20, 1 << 12))
            for v in (1, 2, 3)}
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    for i, (vm, k, frame, high) in enumerate(rows):
        ops[i] = (i, vm, i, k, SID, 0, np.uint64(high | frame << 12 | 8 * (i % 512)), 0, 0, 0)
    m = server.HostServer._op_matrix(None, ops)
    m[ek.M_RES] = 77
    want = m[ek.M_RES].copy()
    for i, (vm, k, _f, _h) in enumerate(rows):
        if k == OP_GUEST_WRITE and i >= start:
            f = int(ops["a0"][i]) >> 12
            want[i] = maps[vm][f] if f < maps[vm].size else -1
    one = m.copy()
    other = ek.resolve_stores(one, start, 1, maps[1], maps[1].size)
    assert other == sum(1 for i, (vm, k, _f, _h) in enumerate(rows)
                        if i >= start and k == OP_GUEST_WRITE and vm != 1)
    gw = np.flatnonzero(ops["op"] == OP_GUEST_WRITE)
    gw = gw[gw >= start]
    for v in (1, 2, 3):
        sel = gw[ops["vm"][gw] == v].astype(np.int64)
        ek.store_frames(m, sel, maps[v], maps[v].size)
        mine = (ops["vm"] == v) & (np.arange(len(rows)) >= start) & (
            ops["op"] == OP_GUEST_WRITE)
        if v == 1:
            assert np.array_equal(one[ek.M_RES][mine], want[mine])
    assert np.array_equal(m[ek.M_RES], want)


WORLDS = {
    "one-vm-nested-strict": lambda: experiment({"a": nic("nested", rogue=0.05)},
                                               duration_us=3000),
}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_world_epochs_equal_both_ways(world, monkeypatch):
    """A one-VM host (the stores' one-VM kernel path; test_kernel_epoch's worlds have many
    VMs), replayed with the kernel off and on."""
    monkeypatch.setattr(server, "EPOCH_KERNEL", False)
    from cluster.runner import build

    cfg = WORLDS[world]()
    epochs, _reports = _record(cfg)
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


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.integers(-5, 60), max_size=30), lo=st.integers(0, 30),
       hi=st.integers(0, 30), t=st.integers(-10, 70), ordered=st.booleans())
def test_forget_until_equals_numpy(times, lo, hi, t, ordered):
    """qiq._forget_until moves Q_LO as numpy's searchsorted(inflight[lo:hi], t, "right")
    does (the reference InvalidationQueue.forget_until had), sorted or not."""
    from host_iommu.kernels import qiq as qk

    inflight = np.array(sorted(times) if ordered else times, dtype=np.int64)
    hi = min(hi, inflight.size)
    lo = min(lo, hi)
    ctl = np.zeros(qk.Q_HI + 1, dtype=np.int64)
    ctl[qk.Q_LO], ctl[qk.Q_HI] = lo, hi
    qk._forget_until(ctl, inflight, t)
    assert ctl[qk.Q_LO] == lo + int(np.searchsorted(inflight[lo:hi], t, "right"))
    assert ctl[qk.Q_HI] == hi


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-(1 << 63), (1 << 63) - 1),
                               st.integers(-(1 << 31), (1 << 31) - 1), st.integers(0, 255),
                               st.integers(0, 0xFFFF), st.integers(0, (1 << 32) - 1),
                               st.integers(0, M64), st.integers(0, M64),
                               st.integers(-(1 << 63), (1 << 63) - 1)), max_size=20),
       strided=st.booleans())
def test_op_matrix_equals_numpy(rows, strided):
    """The compiled operation matrix equals the numpy columns (a0, a1 as int64 bits), for
    contiguous and strided batches."""
    ops = np.zeros(2 * len(rows), dtype=OP_DTYPE)
    for i, (t, vm, k, sid, pasid, a0, a1, a) in enumerate(rows):
        ops[2 * i] = (t, vm, i, k, sid, pasid, a0, a1, a, ~a)
    ops = ops[::2] if strided else ops[:len(rows)]
    m = server.HostServer._op_matrix(None, ops)
    want = np.stack([ops["t_ns"], ops["vm"].astype(np.int64), ops["op"].astype(np.int64),
                     ops["sid"].astype(np.int64), ops["pasid"].astype(np.int64),
                     ops["a0"].astype(np.int64), ops["a1"].astype(np.int64), ops["a2"],
                     ops["a3"], np.full(len(rows), -1), np.zeros(len(rows), np.int64)])
    assert m.shape == (ek.M_ROWS, len(rows))
    assert np.array_equal(m, want.reshape(ek.M_ROWS, len(rows)))
