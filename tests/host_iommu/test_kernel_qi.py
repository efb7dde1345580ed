"""Differential tests of the compiled invalidation queue (host_iommu/kernels/qiq.py).

Three claims, each against a model sharing no code with the kernels:

1. Decoding: every descriptor, valid or not, decodes in the kernel to the fields
   host_iommu/reference_qi.py's table-driven decoder gives, or to the same error code.
2. The host driver's tail write (InvalidationQueue.submit_effects: room wait, refusals,
   IQE, ITE, per-descriptor processing times, effect rows) matches the reference queue's
   room_at + submit, register for register.
3. A host on the live queue (effects in arrays, applied by the ``_advance`` kernel calling the
   cache kernels, context and PASID caches handed back to Python) ends every step with the
   same caches, counters and times as a host on the reference queue whose commands go
   through qi.apply and CacheSet, one at a time.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import iommu, qi
from host_iommu import reference_qi as rq
from host_iommu.costs import CostModel
from host_iommu.kernels import qiq as qk

U64 = (1 << 64) - 1


# --- 1. decoding ---------------------------------------------------------------------------------
def kernel_decode(rows: list[tuple[int, int, int, int]], mamv: int) -> list[tuple]:
    words = np.array(rows, dtype=np.uint64).reshape(-1, 4)
    out = np.zeros((len(rows), qk.DECODED_FIELDS), dtype=np.int64)
    err = np.zeros(len(rows), dtype=np.int64)
    qk.decode_batch(words, np.int64(mamv), out, err)
    return [("error", qk.ERROR_CODES[e]) if e else ("cmd", *o)
            for e, o in zip(err.tolist(), out.tolist(), strict=True)]


def reference_decode(row: tuple[int, int, int, int], mamv: int) -> tuple:
    got = rq.ref_decode(np.array([row], dtype=qi.DESC_DTYPE)[0], mamv)
    if isinstance(got, rq.RefDescError):
        return ("error", got.code)
    size = got.size_bytes.bit_length() - 1 if got.size_bytes else 0
    return ("cmd", got.type, got.gran, got.did, got.pasid, got.sid, got.fm, got.addr >> 12,
            got.am, int(got.ih), size, int(got.glob), int(got.interrupt))


def same(rows: list[tuple[int, int, int, int]], mamv: int = qi.QI_MAMV_DEFAULT) -> None:
    rows = [tuple(w & U64 for w in r) for r in rows]
    got = kernel_decode(rows, mamv)
    for row, k in zip(rows, got, strict=True):
        assert k == reference_decode(row, mamv), [hex(w) for w in row]


def _valid_words(data) -> tuple[int, int, int, int]:
    """A descriptor from the live encoders, with random fields."""
    d = st.integers
    kind = data.draw(st.sampled_from(["cc", "iotlb", "dev", "iec", "wait", "piotlb", "pc",
                                      "pdev"]))
    pfn = data.draw(d(0, (1 << 52) - 1))
    if kind == "cc":
        return qi.cc_words(data.draw(d(1, 3)), data.draw(d(0, 0xFFFF)),
                           data.draw(d(0, 0xFFFF)), data.draw(d(0, 3)))
    if kind in ("iotlb", "piotlb"):
        am = data.draw(d(0, 63))
        addr = (pfn >> am << am) << 12 if am < 52 else 0
        gran = data.draw(d(1, 3) if kind == "iotlb" else d(2, 3))
        if kind == "iotlb":
            return qi.iotlb_words(gran, data.draw(d(0, 0xFFFF)), addr, am,
                                  data.draw(st.booleans()), data.draw(st.booleans()),
                                  data.draw(st.booleans()))
        return qi.piotlb_words(data.draw(d(0, 0xFFFF)), data.draw(d(0, qi.QI_PASID_MASK)),
                               gran, addr, am, data.draw(st.booleans()))
    if kind in ("dev", "pdev"):
        log2 = data.draw(d(12, 64))
        addr = ((pfn << 12) >> log2 << log2) if log2 < 64 else 0
        if kind == "dev":
            return qi.dev_iotlb_words(data.draw(d(0, 0xFFFF)), data.draw(d(0, 0xFFFF)),
                                      data.draw(d(0, 31)), addr, 1 << log2)
        return qi.pasid_dev_iotlb_words(data.draw(d(0, 0xFFFF)), data.draw(d(0, 0xFFFF)),
                                        data.draw(d(0, qi.QI_PASID_MASK)), addr, 1 << log2,
                                        data.draw(st.booleans()), data.draw(d(0, 31)))
    if kind == "iec":
        return tuple(int(w) for w in qi.iec_desc(data.draw(d(0, 1)), data.draw(d(0, 0xFFFF)),
                                                 data.draw(d(0, 31))).item())
    if kind == "wait":
        sw, intr = data.draw(st.sampled_from([(True, False), (False, True), (True, True)]))
        return qi.wait_words(data.draw(d(0, 0xFFFF_FFFF)), data.draw(d(0, U64 >> 2)) << 2,
                             intr, sw, data.draw(st.booleans()))
    return qi.pc_words(data.draw(st.sampled_from([0, 1, 3])), data.draw(d(0, 0xFFFF)),
                       data.draw(d(0, qi.QI_PASID_MASK)))


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from([0, 5, 18, 63]))
def test_decode_valid_and_bit_flipped(data, mamv):
    """Encoder output, then the same with 1-3 random bits flipped (reserved bits, bad types,
    granularities, masks and size encodings appear this way)."""
    row = list(_valid_words(data))
    rows = [tuple(row)]
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 255))
        row[bit // 64] ^= 1 << (bit % 64)
        rows.append(tuple(row))
    same(rows, mamv)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, U64)] * 4), min_size=1, max_size=8),
       st.sampled_from([0, 18]))
def test_decode_random_words(rows, mamv):
    same(rows, mamv)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 127), st.integers(0, U64), st.integers(0, U64),
       st.sampled_from([0, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_F000, 0xFFF]))
def test_decode_each_type_with_random_fields(t, qw0, qw1, qw1_mask):
    """Every type value (bits 3:0 and 11:9), random fields, qw1 masked toward the edges."""
    qw0 = (qw0 & ~0xE0F) | (t & 0xF) | ((t >> 4) << 9)
    same([(qw0, qw1 & qw1_mask, 0, 0), (qw0 & 0xFFFF_FFFF_0000_0FFF, qw1 & qw1_mask, 0, 0)])


def test_decode_edges():
    """Hand-picked edges: AM at and above MAMV, 2^52+ page masks, device-TLB sizes up to
    2^64 and the all-ones size word, waits without action, reserved qw2/qw3."""
    rows = [
        qi.iotlb_words(3, 1, 0, 18), qi.iotlb_words(3, 1, 0, 19), qi.piotlb_words(1, 1, 3, 0, 63),
        (0x6 | 3 << 4, (1 << 63) | 52, 0, 0), (0x6 | 3 << 4, (1 << 63) | 51, 0, 0),
        qi.dev_iotlb_words(1, 0, 0, 0, 1 << 64), (0x3, U64 & ~0xFFE, 0, 0),
        (0x3, (U64 >> 1) & ~0xFFE, 0, 0), (0x8, U64 & ~0x7FE, 0, 0),
        (0x5, 0, 0, 0), (0x5 | 1 << 4, 3, 0, 0), (0x2 | 1 << 4, 0, 1, 0), (0x2 | 1 << 4, 0, 0, 1),
        (0x2 | 2 << 9, 0, 0, 0), (0x9, 0, 0, 0), (0, 0, 0, 0), (0x7 | 2 << 4, 0, 0, 0),
        (0x6 | 1 << 4, 0, 0, 0), (0x1, 0, 0, 0), (0x4 | 1 << 4 | 0xFFFF << 32, 0, 0, 0),
    ]
    same(rows, 18)
    same(rows, 0)


# --- 2. the host driver's tail write ---------------------------------------------------------
UNRESPONSIVE = frozenset({0x66})
POOL = [
    qi.iotlb_words(qi.QI_IOTLB_GRAN_PAGE, 1, 0x5000, 0, ih=True),
    qi.iotlb_words(qi.QI_IOTLB_GRAN_DOMAIN, 2),
    qi.piotlb_words(1, 3, qi.QI_GRAN_PSI_PASID, 0x8000, 1),
    qi.piotlb_words(1, 3, qi.QI_GRAN_NONG_PASID),
    qi.cc_words(qi.QI_CC_GRAN_DEVICE, 1, 0x10),
    qi.pc_words(qi.QI_PC_PASID_SEL, 1, 3),
    qi.dev_iotlb_words(0x10, 0, 0, 0x4000, 4096),
    qi.pasid_dev_iotlb_words(0x10, 0, 3, 0x8000, 8192, glob=True),
    qi.wait_words(),
    qi.wait_words(interrupt=True, status_write=False, fence=True),
]
DEAD = qi.dev_iotlb_words(0x66, 0, 0, 0x4000, 4096)                 # times out: ITE
BAD = [(0x2 | 3 << 4, (1 << 12) | 1, 0, 0), (0x5, 0, 0, 0), (0x9, 0, 0, 0)]

STEPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 4_000),
              st.lists(st.integers(0, len(POOL) - 1), max_size=60),
              st.lists(st.tuples(st.integers(0, 60), st.sampled_from([DEAD, *BAD])),
                       max_size=1)),
    st.tuples(st.just("forget"), st.integers(0, 3_000)),
    st.tuples(st.just("clear_iqe"), st.booleans()),
    st.tuples(st.just("clear_ite")),
), max_size=40)

STATUS_CODE = {qk.S_REFUSED_IQE: "iqe_pending", qk.S_REFUSED_ITE: "ite_pending",
               qk.S_REFUSED_FULL: "queue_full", qk.S_ITE: "ite"}


def effect_rows(effects: np.ndarray, since: int) -> list[tuple[int, ...]]:
    return [tuple(r) for r in effects[since:effects[0, qk.P_END]].tolist()]


def reference_rows(commands) -> list[tuple[int, ...]]:
    rows = []
    for t, c in commands:
        size = c.size_bytes.bit_length() - 1 if c.size_bytes else 0
        rows.append((t, c.type, c.gran, c.did, c.pasid, c.sid, c.fm, c.addr >> 12, c.am,
                     int(c.ih), size, int(c.glob)))
    return rows


REGISTERS = ("head", "tail", "fsts_iqe", "iqe_head", "fsts_ite", "ics_iwc", "counts",
             "errors", "refused")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([128, 256]), STEPS)
def test_driver_writes_match_the_reference_queue(entries, steps):
    costs = CostModel()
    live = qi.InvalidationQueue(entries, costs, unresponsive_sids=UNRESPONSIVE)
    ref = rq.InvalidationQueue(entries, costs, unresponsive_sids=UNRESPONSIVE)
    effects = qi.new_effects(4)
    t = 0
    for step in steps:
        if step[0] == "write":
            t += step[1]
            rows = [POOL[i] for i in step[2]]
            for pos, w in step[3]:
                rows.insert(min(pos, len(rows)), w)
            descs = qi.as_descs(rows)
            try:
                at = ref.room_at(t, len(rows))
            except rq.QiError:
                with pytest.raises(qi.QiError):
                    live.submit_effects(descs, t, effects)
                continue
            want = ref.submit(descs, at)
            before = int(effects[0, qk.P_END])
            status, n, t_at, t_done, code, effects = live.submit_effects(descs, t, effects)
            assert t_at == at and n == want.processed
            if status == qk.S_OK:
                assert want.error is None
                assert t_done == max([at, *want.wait_done_ns, *(x for x, _ in want.commands)])
            elif status == qk.S_IQE:
                assert qk.ERROR_CODES[code] == want.error.code
                assert live.error_result(descs, status, n, t_at).code == want.error.code
            else:
                assert STATUS_CODE[status] == want.error.code
                assert live.error_result(descs, status, n, t_at).code == want.error.code
            assert effect_rows(effects, before) == reference_rows(want.commands)
            t = max(t, at)
        elif step[0] == "forget":
            t += step[1]
            live.forget_until(t)
            ref.forget_until(t)
        elif step[0] == "clear_iqe":
            rep = qi.as_desc(POOL[0]) if step[1] else None
            a, b = live.clear_iqe(t, rep), ref.clear_iqe(t, rep)
            assert [(x, asdict(c)) for x, c in a.commands] == [
                (x, asdict(c)) for x, c in b.commands]
        else:
            live.clear_ite()
            ref.clear_ite()
        for k in REGISTERS:
            assert getattr(live, k) == getattr(ref, k), k
        for probe in (t, t + 700, t + 5_000):
            assert live.free_slots(probe) == ref.free_slots(probe)


# --- 3. a host's pending effects, applied --------------------------------------------------------
SIDS = (0x10, 0x11, 0x66)


def _host_pool() -> list[tuple[int, int, int, int]]:
    """Valid descriptors of every type over a few DIDs, PASIDs, devices and pages."""
    w = []
    for did in (1, 2):
        w += [qi.iotlb_words(1), qi.iotlb_words(2, did)]
        for am, ih in ((0, False), (0, True), (2, False), (9, True), (10, False)):
            w.append(qi.iotlb_words(3, did, (8 << 12) >> (12 + am) << (12 + am), am, ih))
        for pasid in (0, 1):
            w.append(qi.piotlb_words(did, pasid, 2))
            for am, ih in ((0, False), (1, True), (10, False)):
                w.append(qi.piotlb_words(did, pasid, 3, 0, am, ih))
            w.append(qi.pc_words(1, did, pasid))
        w.append(qi.pc_words(0, did))
    w += [qi.pc_words(3), qi.cc_words(1), qi.cc_words(2, 1), qi.cc_words(3, 0, 0x10, 0),
          qi.cc_words(3, 0, 0x11, 1)]
    for sid in SIDS[:2]:
        w += [qi.dev_iotlb_words(sid, 0, 0, 0x3000, 4096),
              qi.dev_iotlb_words(sid, 0, 0, 0, 1 << 21),
              qi.pasid_dev_iotlb_words(sid, 0, 1, 0, 1 << 64),
              qi.pasid_dev_iotlb_words(sid, 0, 1, 0x2000, 8192, glob=True)]
    w += [tuple(int(x) for x in qi.iec_desc().item()), qi.wait_words(),
          qi.wait_words(interrupt=True, status_write=False, fence=True)]
    return w


HOST_POOL = _host_pool()

HOST_STEPS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3_000),
              st.lists(st.integers(0, len(HOST_POOL) - 1), min_size=1, max_size=40),
              st.integers(1, 3)),
    st.tuples(st.just("advance"), st.integers(-2_000, 6_000)),
    st.tuples(st.just("fill"), st.integers(0, 2**32)),
    st.tuples(st.just("forget"),),
), max_size=30)


# Pages of the lines filled: near 0, across the first 2-MiB and 4-MiB boundaries, at 1 GiB.
PAGES = np.concatenate([np.arange(16), np.arange(500, 530), np.arange(1020, 1030),
                        np.arange(1 << 18, (1 << 18) + 4)])


def _fill(h: iommu.HostIommu, seed: int) -> None:
    """Random lines in every cache (the same on both hosts for a seed)."""
    rng = np.random.default_rng(seed)
    n = 24
    did, pasid = rng.integers(1, 3, n), rng.integers(0, 2, n)
    addr = rng.choice(PAGES, n).astype(np.uint64) << np.uint64(12)
    order = rng.integers(0, 3, n)
    c = h.caches
    c.iotlb.fill(did, pasid, addr, order, np.zeros(n, np.uint64), rng.integers(1, 4, n),
                 rng.integers(1, 5, n))
    c.fl_pwc.fill(did, pasid, addr, rng.integers(2, 5, n), rng.integers(0, 99, n))
    c.sl_pwc.fill(did, 0, addr, rng.integers(2, 5, n), rng.integers(0, 99, n))
    sid = rng.choice(np.array(SIDS[:2]), n)
    c.dtlb.fill(sid, pasid, addr, order, np.zeros(n, np.uint64), rng.integers(1, 4, n))
    for i in range(4):
        c.pasidc.fill(int(sid[i]), int(pasid[i]), int(did[i]), ("entry", i))
        c.ctxc.fill(int(sid[i]) + i % 2, ("context", i))


def cache_state(h: iommu.HostIommu) -> tuple:
    c = h.caches
    small = [[(ln[0], ln[1], ln[3]) if ln else None for s in x.cache.lines for ln in s]
             for x in (c.pasidc, c.ctxc)]
    return (c.iotlb.contents(layout=True), c.iotlb.counters(), c.fl_pwc.contents(True),
            c.fl_pwc.counters(), c.sl_pwc.contents(True), c.sl_pwc.counters(),
            c.dtlb.contents(True), c.dtlb.counters(), small,
            [x.cache.counters() for x in (c.pasidc, c.ctxc)])


def _hosts() -> tuple[iommu.HostIommu, iommu.HostIommu]:
    p = iommu.IommuParams(memory_mib=16, qi_entries=128, iotlb_entries=32, iotlb_ways=4,
                          pwc_entries=16, devtlb_entries=16, pasid_cache_entries=8,
                          context_cache_entries=8)
    live = iommu.HostIommu(p)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(iommu, "InvalidationQueue", rq.InvalidationQueue)
        ref = iommu.HostIommu(p)
    assert live._array_effects and not ref._array_effects
    return live, ref


@settings(max_examples=150, deadline=None)
@given(HOST_STEPS)
def test_host_effects_match_the_command_heap(steps):
    live, ref = _hosts()
    t = 0
    for step in steps:
        if step[0] == "submit":
            t += step[1]
            rows = [HOST_POOL[i] for i in step[2]] * step[3]   # x3: more than 127, chunked
            descs = qi.as_descs([*rows, qi.WAIT_WORDS])
            assert live.submit_qi(descs, t) == ref.submit_qi(descs, t)
        elif step[0] == "advance":
            t = max(0, t + step[1])
            live.advance_to(t)
            ref.advance_to(t)
        elif step[0] == "fill":
            _fill(live, step[1])
            _fill(ref, step[1])
        else:
            live.qi.forget_until(t)
            ref.qi.forget_until(t)
        assert live.next_effect_ns() == ref.next_effect_ns()
        assert cache_state(live) == cache_state(ref)
        assert live.now_ns == ref.now_ns
    live.drain()
    ref.drain()
    assert live.next_effect_ns() is None and ref.next_effect_ns() is None
    assert cache_state(live) == cache_state(ref)
    assert live.qi.counts == ref.qi.counts


def test_effect_queue_grows_and_keeps_order():
    """Many submissions before any effect is applied: the array queue grows past its first
    size, and applying at one time gives the caches the heap gives."""
    live, ref = _hosts()
    for h in (live, ref):
        _fill(h, 7)
        for i in range(40):
            h.submit_qi(qi.as_descs([HOST_POOL[i % len(HOST_POOL)]] * 5 + [qi.WAIT_WORDS]),
                        i * 100)
    assert live._effects.shape[0] > qi.new_effects().shape[0]
    live.advance_to(60_000)
    ref.advance_to(60_000)
    assert cache_state(live) == cache_state(ref)
    assert live.next_effect_ns() == ref.next_effect_ns()


def test_host_refuses_its_own_bad_descriptor_and_recovers():
    """A malformed descriptor from the host driver raises, leaves no IQE behind, and the
    effects of what came before it still apply."""
    live = iommu.HostIommu(iommu.IommuParams(memory_mib=16, qi_entries=128))
    with pytest.raises(RuntimeError, match="host QI rejected"):
        live.submit_qi(qi.as_descs([qi.iotlb_words(1), BAD[0], qi.WAIT_WORDS]), 0)
    assert not live.qi.fsts_iqe and live.next_effect_ns() == CostModel().qi_desc_ns
    t_done, n = live.submit_qi(qi.as_descs([qi.iotlb_words(1), qi.WAIT_WORDS]), 0)
    assert n == 2 and t_done > CostModel().qi_desc_ns


def test_kernel_masks_are_the_queue_masks():
    """The kernel's reserved-bit table is qi.QI_RSVD, type by type."""
    assert {t: tuple(int(x) for x in qk.RSVD[t]) for t in range(1, 9)} == qi.QI_RSVD


def test_replaced_cache_methods_take_the_command_path(monkeypatch):
    """A CacheSet method replaced (a deliberately broken model, tests/fuzz) is what runs: the
    host then applies its effects with qi.apply, and the broken flush really drops nothing."""
    calls = []
    monkeypatch.setattr(iommu.CacheSet, "piotlb_page", lambda self, *a: calls.append(a))
    h = iommu.HostIommu(iommu.IommuParams(memory_mib=16, qi_entries=128))
    assert not h._array_effects
    t, _n = h.submit_qi(qi.as_descs([qi.piotlb_words(1, 2, 3, 0x4000, 0, True),
                                     qi.WAIT_WORDS]), 0)
    h.advance_to(t)
    assert calls == [(1, 2, 0x4000, 0, True)]
