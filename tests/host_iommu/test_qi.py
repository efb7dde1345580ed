"""Tests of the invalidation queue: descriptor bits, decoding errors, IQE, timing, dispatch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import MAX_PASID, NO_PASID
from host_iommu.qi import (
    DESC_DTYPE,
    DescError,
    InvalidationQueue,
    InvCommand,
    QiError,
    apply,
    cc_desc,
    decode,
    descs,
    dev_iotlb_desc,
    iec_desc,
    iotlb_desc,
    pasid_dev_iotlb_desc,
    pc_desc,
    piotlb_desc,
    wait_desc,
)

dids = st.integers(0, 0xFFFF)
sids = st.integers(0, 0xFFFF)
pasids = st.integers(0, MAX_PASID)
ams = st.integers(0, qi.QI_MAMV_DEFAULT)
pfns = st.integers(0, (1 << 40) - 1)


def raw(qw0: int, qw1: int = 0, qw2: int = 0, qw3: int = 0) -> np.void:
    rec = np.zeros(1, dtype=DESC_DTYPE)
    rec[0] = (qw0, qw1, qw2, qw3)
    return rec[0]


def ok(desc: np.void) -> InvCommand:
    cmd = decode(desc)
    assert isinstance(cmd, InvCommand), cmd
    return cmd


# --- bit positions against hand-computed values ------------------------------------------------
def test_piotlb_bits_by_hand():
    d = piotlb_desc(did=5, pasid=0x12345, gran=3, addr=0x7000, am=0)
    assert int(d["qw0"]) == 0x6 | (3 << 4) | (5 << 16) | (0x12345 << 32)
    assert int(d["qw1"]) == 0x7000
    assert int(d["qw2"]) == 0 and int(d["qw3"]) == 0


def test_iotlb_page_bits_by_hand():
    d = iotlb_desc(3, did=0x42, addr=0x10_0000, am=4, ih=True, dr=True, dw=True)
    assert int(d["qw0"]) == 0x2 | (3 << 4) | (1 << 6) | (1 << 7) | (0x42 << 16)
    assert int(d["qw1"]) == 0x10_0000 | (1 << 6) | 4


def test_cc_and_wait_bits_by_hand():
    assert int(cc_desc(3, did=7, sid=0x0108, fm=2)["qw0"]) == (
        0x1 | (3 << 4) | (7 << 16) | (0x0108 << 32) | (2 << 48))
    w = wait_desc(status_data=0xDEAD, status_addr=0x1000_0040, interrupt=True, fence=True)
    assert int(w["qw0"]) == 0x5 | (1 << 4) | (1 << 5) | (1 << 6) | (0xDEAD << 32)
    assert int(w["qw1"]) == 0x1000_0040


def test_dev_iotlb_bits_by_hand():
    # 64 KiB at 0x30000: S=1 and address bits 15:12 = 0111 (ATS range encoding).
    d = dev_iotlb_desc(sid=0x0210, pfsid=0xABCD, qdep=0x1F, addr=0x30000, size_bytes=0x10000)
    assert int(d["qw0"]) == (0x3 | (0xD << 12) | (0x1F << 16) | (0x0210 << 32)
                             | (0xABC << 52))
    assert int(d["qw1"]) == 0x30000 | 0x7000 | 1
    p = pasid_dev_iotlb_desc(sid=0x0210, pfsid=0x1, pasid=9, addr=0x2000, size_bytes=0x2000,
                             glob=True, qdep=3)
    assert int(p["qw0"]) == 0x8 | (3 << 4) | (0x1 << 12) | (0x0210 << 16) | (9 << 32)
    assert int(p["qw1"]) == 0x2000 | (1 << 11) | 1


def test_type_high_bits_are_decoded():
    # Type 0x12 (bits 11:9 = 001, bits 3:0 = 2) is no invalidation type.
    err = decode(raw(0x2 | (1 << 9) | (1 << 4)))
    assert isinstance(err, DescError) and err.code == "unknown_type" and err.dtype == 0x12


# --- round trips --------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(gran=st.sampled_from([1, 2, 3]), did=dids, sid=sids, fm=st.integers(0, 3))
def test_cc_round_trip(gran, did, sid, fm):
    cmd = ok(cc_desc(gran, did, sid, fm))
    assert (cmd.type, cmd.gran, cmd.did, cmd.sid, cmd.fm) == (qi.QI_CC_TYPE, gran, did, sid, fm)


@settings(max_examples=40, deadline=None)
@given(did=dids, pfn=pfns, am=ams, ih=st.booleans(), dr=st.booleans(), dw=st.booleans())
def test_iotlb_page_round_trip(did, pfn, am, ih, dr, dw):
    addr = (pfn >> am << am) << 12
    cmd = ok(iotlb_desc(3, did, addr, am, ih, dr, dw))
    assert (cmd.gran, cmd.did, cmd.addr, cmd.am, cmd.ih, cmd.dr, cmd.dw) == (
        3, did, addr, am, ih, dr, dw)


@settings(max_examples=20, deadline=None)
@given(gran=st.sampled_from([1, 2]), did=dids)
def test_iotlb_global_domain_round_trip(gran, did):
    cmd = ok(iotlb_desc(gran, did))
    assert (cmd.type, cmd.gran, cmd.did) == (qi.QI_IOTLB_TYPE, gran, did)


@settings(max_examples=40, deadline=None)
@given(did=dids, pasid=pasids, pfn=pfns, am=ams, ih=st.booleans(), gran=st.sampled_from([2, 3]))
def test_piotlb_round_trip(did, pasid, pfn, am, ih, gran):
    addr = (pfn >> am << am) << 12
    cmd = ok(piotlb_desc(did, pasid, gran, addr, am, ih))
    assert (cmd.type, cmd.gran, cmd.did, cmd.pasid) == (qi.QI_EIOTLB_TYPE, gran, did, pasid)
    if gran == 3:
        assert (cmd.addr, cmd.am, cmd.ih) == (addr, am, ih)


@settings(max_examples=30, deadline=None)
@given(gran=st.sampled_from([0, 1, 3]), did=dids, pasid=pasids)
def test_pc_round_trip(gran, did, pasid):
    cmd = ok(pc_desc(gran, did, pasid))
    assert (cmd.type, cmd.gran, cmd.did, cmd.pasid) == (qi.QI_PC_TYPE, gran, did, pasid)


@settings(max_examples=40, deadline=None)
@given(sid=sids, pfsid=sids, qdep=st.integers(0, 31), pfn=pfns, order=st.integers(0, 20),
       pasid=pasids, glob=st.booleans(), pasid_based=st.booleans())
def test_devtlb_round_trip(sid, pfsid, qdep, pfn, order, pasid, glob, pasid_based):
    size = 4096 << order
    addr = (pfn >> order << order) << 12
    if pasid_based:
        cmd = ok(pasid_dev_iotlb_desc(sid, pfsid, pasid, addr, size, glob, qdep))
        assert (cmd.type, cmd.pasid, cmd.glob) == (qi.QI_DEIOTLB_TYPE, pasid, glob)
    else:
        cmd = ok(dev_iotlb_desc(sid, pfsid, qdep, addr, size))
        assert (cmd.type, cmd.pasid) == (qi.QI_DIOTLB_TYPE, NO_PASID)
    assert (cmd.sid, cmd.pfsid, cmd.qdep, cmd.addr, cmd.size_bytes) == (
        sid, pfsid, qdep, addr, size)


@settings(max_examples=30, deadline=None)
@given(gran=st.integers(0, 1), iidx=st.integers(0, 0xFFFF), im=st.integers(0, 31))
def test_iec_round_trip(gran, iidx, im):
    cmd = ok(iec_desc(gran, iidx, im))
    assert (cmd.type, cmd.gran, cmd.iidx, cmd.im) == (qi.QI_IEC_TYPE, gran, iidx, im)


@settings(max_examples=30, deadline=None)
@given(data=st.integers(0, 0xFFFF_FFFF), addr=st.integers(0, (1 << 62) - 1),
       intr=st.booleans(), fence=st.booleans())
def test_wait_round_trip(data, addr, intr, fence):
    cmd = ok(wait_desc(data, addr << 2, intr, True, fence))
    assert (cmd.status_data, cmd.status_addr, cmd.interrupt, cmd.status_write, cmd.fence) == (
        data, addr << 2, intr, True, fence)


# --- malformed descriptors ----------------------------------------------------------------------
MALFORMED = [
    ("unknown_type", raw(0x0)),
    ("unknown_type", raw(0x9)),
    ("unknown_type", raw(0xF | (7 << 9))),
    ("reserved", raw(int(cc_desc(1)["qw0"]) | (1 << 8))),
    ("reserved", raw(int(cc_desc(1)["qw0"]), 1)),
    ("reserved", raw(int(iotlb_desc(1)["qw0"]) | (1 << 40))),
    ("reserved", raw(int(iotlb_desc(3)["qw0"]), 1 << 7)),
    ("reserved", raw(int(dev_iotlb_desc(1, 0, 0, 0, 4096)["qw0"]) | (1 << 25))),
    ("reserved", raw(int(dev_iotlb_desc(1, 0, 0, 0, 4096)["qw0"]), 1 << 3)),
    ("reserved", raw(int(iec_desc()["qw0"]) | (1 << 20))),
    ("reserved", raw(int(wait_desc()["qw0"]) | (1 << 8))),
    ("reserved", raw(int(wait_desc()["qw0"]), 0x1002)),
    ("reserved", raw(int(piotlb_desc(1, 1, 2)["qw0"]) | (1 << 60))),
    ("reserved", raw(int(pc_desc(0)["qw0"]) | (1 << 7))),
    ("reserved", raw(int(pasid_dev_iotlb_desc(1, 0, 1, 0, 4096)["qw0"]), 1 << 5)),
    ("reserved", raw(int(iotlb_desc(1)["qw0"]), 0, 1)),
    ("reserved", raw(int(piotlb_desc(1, 1, 2)["qw0"]), 0, 0, 1 << 63)),
    ("granularity", cc_desc(0)),
    ("granularity", iotlb_desc(0)),
    ("granularity", piotlb_desc(1, 1, 0)),
    ("granularity", piotlb_desc(1, 1, 1)),
    ("granularity", pc_desc(2)),
    ("am_too_large", iotlb_desc(3, 1, 0, qi.QI_MAMV_DEFAULT + 1)),
    ("misaligned", iotlb_desc(3, 1, 0x3000, 2)),
    ("misaligned", piotlb_desc(1, 1, 3, 0x1000, 1)),
    ("size_encoding", raw(qi.QI_DIOTLB_TYPE, qi.QI_ADDR_MASK | 1)),
    ("size_encoding", raw(qi.QI_DEIOTLB_TYPE, qi.QI_ADDR_MASK | (1 << 11))),
    ("wait_no_action", wait_desc(status_write=False, interrupt=False)),
]


@pytest.mark.parametrize(("code", "desc"), MALFORMED)
def test_malformed_gives_named_error(code, desc):
    err = decode(desc)
    assert isinstance(err, DescError)
    assert err.code == code and err.reason and err.type_name


@settings(max_examples=60, deadline=None)
@given(words=st.tuples(*[st.integers(0, (1 << 64) - 1)] * 4))
def test_random_words_never_crash(words):
    """Any 256 bits decode to a command or a named error, of the type the descriptor's type
    field (qw0 bits 3:0 and 11:9) gives; a command's fields fit their widths."""
    got = decode(raw(*words))
    assert isinstance(got, InvCommand | DescError)
    dtype = (words[0] & 0xF) | ((words[0] >> 9) & 0x7) << 4
    if isinstance(got, DescError):
        assert got.dtype == dtype and got.code and got.reason
    else:
        assert got.type == dtype
        assert got.did <= 0xFFFF and got.sid <= 0xFFFF and got.pasid <= MAX_PASID
        assert got.am <= 0x3F


def test_mamv_is_a_parameter():
    d = iotlb_desc(3, 1, 0, 10)
    assert isinstance(decode(d), InvCommand)
    assert decode(d, mamv=9).code == "am_too_large"


def test_pasid_based_psi_has_no_mamv_limit():
    """QEMU vtd_process_piotlb_desc takes any AM (Linux's first-level path never falls back
    to a PASID-wide flush); only the 0x2 IOTLB PSI is bounded by CAP.MAMV."""
    cmd = decode(piotlb_desc(1, 1, 3, 0, 52), mamv=9)
    assert isinstance(cmd, InvCommand) and cmd.am == 52


def test_devtlb_all_but_top_bit_is_whole_space():
    cmd = ok(raw(qi.QI_DIOTLB_TYPE, (qi.QI_ADDR_MASK >> 1) & qi.QI_ADDR_MASK | 1))
    assert (cmd.addr, cmd.size_bytes) == (0, 1 << 64)


def test_encoders_reject_bad_fields():
    with pytest.raises(QiError):
        iotlb_desc(3, did=0x10000)
    with pytest.raises(QiError):
        piotlb_desc(1, MAX_PASID + 1, 2)
    with pytest.raises(QiError):
        iotlb_desc(3, addr=0x1234)
    with pytest.raises(QiError):
        dev_iotlb_desc(1, 0, 0, 0x1000, 0x3000)
    with pytest.raises(QiError):
        dev_iotlb_desc(1, 0, 0, 0x1000, 0x2000)
    with pytest.raises(QiError):
        wait_desc(status_addr=2)


# --- the queue ----------------------------------------------------------------------------------
COSTS = CostModel()


def test_effect_times_and_wait_after_everything():
    q = InvalidationQueue(costs=COSTS)
    batch = descs(iotlb_desc(2, 1), dev_iotlb_desc(3, 0, 0, 0, 4096),
                  piotlb_desc(1, 2, 2), wait_desc())
    res = q.submit(batch, t_ns=1000)
    assert res.error is None and res.processed == 4
    times = [t for t, _ in res.commands]
    d, dev = COSTS.qi_desc_ns, COSTS.devtlb_inv_ns
    assert times == [1000 + d, 1000 + d + dev, 1000 + 2 * d + dev]
    assert res.wait_done_ns == [max(times) + COSTS.qi_wait_ns]
    assert [c.name for _, c in res.commands] == ["iotlb", "devtlb", "piotlb"]
    assert q.counts["wait"] == 1 and q.counts["devtlb"] == 1 and q.head == q.tail == 4


@settings(max_examples=25, deadline=None)
@given(kinds=st.lists(st.sampled_from(["iotlb", "dev", "pdev", "wait", "pc"]),
                      min_size=1, max_size=30),
       t0=st.integers(0, 10**9), gap=st.integers(0, 20_000))
def test_wait_never_before_earlier_effects(kinds, t0, gap):
    make = {"iotlb": lambda: iotlb_desc(3, 1, 0x1000), "pc": lambda: pc_desc(1, 1, 1),
            "dev": lambda: dev_iotlb_desc(1, 0, 0, 0, 8192),
            "pdev": lambda: pasid_dev_iotlb_desc(1, 0, 1, 0, 4096), "wait": wait_desc}
    q = InvalidationQueue(costs=COSTS)
    effects: list[int] = []
    for t in (t0, t0 + gap):  # two submits: the second may start while the first runs
        res = q.submit(descs(*(make[k]() for k in kinds)), t)
        assert res.error is None
        events = sorted([(tt, 0) for tt, _ in res.commands] + [(tt, 1) for tt in
                                                               res.wait_done_ns])
        for tt, is_wait in events:
            if is_wait:
                assert all(tt >= e for e in effects)
            else:
                effects.append(tt)
        assert all(tt >= t for tt, _ in res.commands)


def test_iqe_stops_at_bad_descriptor_and_refuses_until_cleared():
    q = InvalidationQueue(costs=COSTS)
    good = iotlb_desc(2, 7)
    batch = descs(good, piotlb_desc(1, 1, 3), cc_desc(0), iotlb_desc(1), wait_desc())
    res = q.submit(batch, 0)
    assert res.processed == 2 and res.error_index == 2 and res.error.code == "granularity"
    assert [c.type for _, c in res.commands] == [qi.QI_IOTLB_TYPE, qi.QI_EIOTLB_TYPE]
    assert q.fsts_iqe and q.iqe_head == 2 and q.head == 2 and q.tail == 5 and q.errors == 1
    later = q.submit(descs(good), 10_000)
    assert later.refused and later.processed == 0 and later.error.code == "iqe_pending"
    assert later.commands == [] and q.counts["iotlb"] == 1
    # Linux qi_check_fault: replace the bad descriptor with a wait and clear IQE.
    resumed = q.clear_iqe(20_000, replacement=wait_desc())
    assert not q.fsts_iqe and resumed.error is None and resumed.processed == 3
    assert [c.gran for _, c in resumed.commands] == [1] and len(resumed.wait_done_ns) == 2
    assert q.head == q.tail == 5
    assert q.submit(descs(good), 30_000).error is None


def test_clear_iqe_without_replacement_drops_rest():
    q = InvalidationQueue()
    q.submit(descs(raw(0), iotlb_desc(1)), 0)
    assert q.clear_iqe().processed == 0 and q.head == q.tail and q.counts["iotlb"] == 0
    assert q.submit(descs(iotlb_desc(1)), 0).processed == 1


def test_queue_full_and_free_slots():
    q = InvalidationQueue(entries=128, costs=COSTS)
    res = q.submit(descs(*[iotlb_desc(1)] * 128), 0)
    assert res.refused and res.error.code == "queue_full" and q.tail == 0
    assert q.submit(descs(*[iotlb_desc(1)] * 100), 0).processed == 100
    # All 100 still in flight at t=0: only 27 slots are left.
    assert q.free_slots(0) == 27 and q.submit(descs(*[iotlb_desc(1)] * 28), 0).refused
    assert q.free_slots(10**9) == 127


def test_bad_queue_size_and_dtype():
    with pytest.raises(QiError):
        InvalidationQueue(entries=100)
    with pytest.raises(QiError):
        InvalidationQueue().submit(np.zeros(2, dtype=np.uint64), 0)


def test_ite_on_unresponsive_device():
    q = InvalidationQueue(unresponsive_sids=frozenset({0x10}))
    res = q.submit(descs(iotlb_desc(1), dev_iotlb_desc(0x10, 0, 0, 0, 4096), wait_desc()), 0)
    assert q.fsts_ite and res.error.code == "ite" and res.error_index == 1
    assert res.wait_done_ns == [] and len(res.commands) == 1
    assert q.submit(descs(iotlb_desc(1)), 0).error.code == "ite_pending"
    q.clear_ite()
    assert q.submit(descs(iotlb_desc(1)), 0).error is None


def test_wait_interrupt_sets_iwc():
    q = InvalidationQueue()
    q.submit(descs(wait_desc(status_write=False, interrupt=True)), 0)
    assert q.ics_iwc
    q.clear_iwc()
    assert not q.ics_iwc


# --- dispatch -----------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


@pytest.mark.parametrize(("desc", "call"), [
    (iotlb_desc(1), ("iotlb_global",)),
    (iotlb_desc(2, 9), ("iotlb_domain", 9)),
    (iotlb_desc(3, 9, 0x8000, 3, True), ("iotlb_page", 9, 0x8000, 3, True)),
    (piotlb_desc(4, 77, 2), ("piotlb_pasid", 4, 77)),
    (piotlb_desc(4, 77, 3, 0x4000, 2, False), ("piotlb_page", 4, 77, 0x4000, 2, False)),
    (pc_desc(1, 4, 77), ("pasid_cache", 1, 4, 77)),
    (cc_desc(3, 4, 0x100, 1), ("context_cache", 3, 4, 0x100, 1)),
    (dev_iotlb_desc(0x100, 0, 0, 0x10000, 0x4000), ("devtlb", 0x100, NO_PASID, 0x10000, 0x4000)),
    (pasid_dev_iotlb_desc(0x100, 0, 77, 0, 4096), ("devtlb", 0x100, 77, 0, 4096)),
    (pasid_dev_iotlb_desc(0x100, 0, 77, 0, 4096, glob=True), ("devtlb", 0x100, None, 0, 4096)),
    (iec_desc(1, 0x20, 3), ("iec", 1, 0x20, 3)),
])
def test_apply_dispatches(desc, call):
    rec = Recorder()
    apply(ok(desc), rec)
    assert rec.calls == [call]


def test_apply_wait_is_noop():
    rec = Recorder()
    apply(ok(wait_desc()), rec)
    assert rec.calls == []
