"""Differential tests: host_iommu/qi.py against host_iommu/reference_qi.py.

Decoding: every descriptor, valid or not, decodes to the same command (field by field) or to
the same error (type, name and code) in both; descriptors come from the live encoders, from
the reference's field table with random field values, and with random bits flipped.
The queue: scripts of tail writes, room queries, IQE recovery with and without a replacement,
ITE from unresponsive devices and register clears give the same SubmitResult (effect and
completion times, commands, waits, processed count, error and its index, refusal) and the
same registers and counters after every step.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import qi
from host_iommu import reference_qi as rq
from host_iommu.costs import CostModel

U64 = (1 << 64) - 1


def outcome(x) -> tuple:
    """A decode result as plain values (commands by field, errors by type, name and code)."""
    if isinstance(x, (qi.DescError, rq.RefDescError)):
        return ("error", x.dtype, x.type_name, x.code)
    return ("cmd", asdict(x))


def same_decode(words, mamv: int = qi.QI_MAMV_DEFAULT) -> tuple:
    words = [w & U64 for w in words]
    rec = np.array([tuple(words)], dtype=qi.DESC_DTYPE)[0]
    a, b = outcome(qi.decode(rec, mamv)), outcome(rq.ref_decode(rec, mamv))
    assert a == b, ([hex(w) for w in words], a, b)
    if hasattr(qi, "decode_words"):      # the queue's cached decoder: cold, then cached
        for _ in range(2):
            assert outcome(qi.decode_words(*words, mamv=mamv)) == b
    return a


def test_reference_table_matches_the_spec_constants():
    """The reserved bits the field table leaves are the live model's masks, type by type."""
    assert rq.REF_DESC_DTYPE == qi.DESC_DTYPE
    assert rq.NAMES == qi.TYPE_NAMES
    for t, (rsvd0, rsvd1) in qi.QI_RSVD.items():
        assert (rq.reserved_mask(t, 0), rq.reserved_mask(t, 1)) == (rsvd0, rsvd1), hex(t)
        assert rq.reserved_mask(t, 2) == rq.reserved_mask(t, 3) == U64


# --- decode ------------------------------------------------------------------------------------
@st.composite
def table_words(draw) -> list[int]:
    """Four qwords: a type (valid or not) with random values in every field of the table,
    then perhaps a few random bits flipped anywhere."""
    t = draw(st.sampled_from([*rq.FIELDS, *rq.FIELDS, 0x0, 0x9, 0xF, 0x11, 0x15, 0x7F]))
    words = [0, 0, 0, 0]
    for name, q, lo, hi in rq.FIELDS.get(t, []):
        if name.startswith("type"):
            continue
        width = hi - lo + 1
        v = draw(st.one_of(st.integers(0, (1 << width) - 1),
                           st.sampled_from([0, 1, (1 << width) - 1])))
        words[q] |= v << lo
    words[0] |= (t & 0xF) | ((t >> 4) & 0x7) << 9
    for bit in draw(st.lists(st.integers(0, 255), max_size=2)):
        words[bit // 64] ^= 1 << (bit % 64)
    return words


@settings(max_examples=1500, deadline=None)
@given(table_words(), st.sampled_from([qi.QI_MAMV_DEFAULT, 0, 5, 63]))
def test_decode_agrees_on_table_built_descriptors(words, mamv):
    same_decode(words, mamv)


@settings(max_examples=500, deadline=None)
@given(st.tuples(*[st.integers(0, U64)] * 4))
def test_decode_agrees_on_random_words(words):
    same_decode(list(words))


def _words(rec) -> list[int]:
    return [int(w) for w in rec.tolist()]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_decode_agrees_on_encoder_output(data):
    """Every live encoder's output decodes alike (the common case, valid descriptors)."""
    d = data.draw
    did, pasid, sid = d(st.integers(0, 0xFFFF)), d(st.integers(0, qi.MAX_PASID)), \
        d(st.integers(0, 0xFFFF))
    am = d(st.integers(0, 63))
    addr = (d(st.integers(0, (1 << 52) - 1)) << 12) & ~((1 << (12 + am)) - 1) & U64
    order = d(st.integers(0, 30))
    dev_addr = (d(st.integers(0, (1 << 40) - 1)) << (12 + order)) & U64
    recs = [
        qi.cc_desc(d(st.integers(0, 3)), did, sid, d(st.integers(0, 3))),
        qi.iotlb_desc(d(st.integers(0, 3)), did, addr, am, d(st.booleans()), d(st.booleans()),
                      d(st.booleans())),
        qi.piotlb_desc(did, pasid, d(st.integers(0, 3)), addr, am, d(st.booleans())),
        qi.pc_desc(d(st.integers(0, 3)), did, pasid),
        qi.iec_desc(d(st.integers(0, 1)), d(st.integers(0, 0xFFFF)), d(st.integers(0, 31))),
        qi.wait_desc(d(st.integers(0, 0xFFFF_FFFF)), d(st.integers(0, (1 << 62) - 1)) << 2,
                     d(st.booleans()), d(st.booleans()), d(st.booleans())),
        qi.dev_iotlb_desc(sid, d(st.integers(0, 0xFFFF)), d(st.integers(0, 31)), dev_addr,
                          4096 << order),
        qi.pasid_dev_iotlb_desc(sid, d(st.integers(0, 0xFFFF)), pasid, dev_addr, 4096 << order,
                                d(st.booleans()), d(st.integers(0, 31))),
    ]
    for rec in recs:
        same_decode(_words(rec), d(st.sampled_from([qi.QI_MAMV_DEFAULT, 0, 63])))


@pytest.mark.parametrize("words", [
    [0x2 | 3 << 4, (1 << 12 + 18) | 18, 0, 0],            # AM = MAMV, aligned
    [0x2 | 3 << 4, (1 << 12 + 19) | 19, 0, 0],            # AM = MAMV + 1
    [0x2 | 3 << 4, (1 << 12) | 1, 0, 0],                  # misaligned for AM = 1
    [0x6 | 3 << 4, (1 << 12 + 40) | 40, 0, 0],            # PASID-based: no MAMV
    [0x6 | 3 << 4, (U64 & ~0xFFF) | 63, 0, 0],            # AM = 63, address set: misaligned
    [0x6 | 3 << 4, 63, 0, 0],                             # AM = 63 at 0
    [0x3, (U64 & ~0xFFF) | 1, 0, 0],                      # S with no 0 bit
    [0x3, (U64 & ~0xFFF & ~(1 << 63)) | 1, 0, 0],         # S, only the top bit 0
    [0x8 | 1 << 52, ((1 << 64) - (1 << 12)) | 1 << 11 | 1, 0, 0],
    [0x5, 0, 0, 0],                                       # wait, neither SW nor IF
    [0x5 | 1 << 7 | 1 << 5, 0, 0, 0],                     # wait with PD: reserved here
    [0x5 | 1 << 4, 3, 0, 0],                              # status address low bits
    [0x2 | 1 << 4, 0, 0, 1],                              # qw3 reserved
    [0x2 | 1 << 4, 0, 1 << 63, 0],                        # qw2 reserved
    [0x2 | 0 << 4, 0, 0, 0], [0x6 | 1 << 4, 0, 0, 0], [0x7 | 2 << 4, 0, 0, 0],
    [0x1 | 0 << 4, 0, 0, 0],                              # reserved granularities
    [0x1 | 1 << 9, 0, 0, 0], [0x0, 0, 0, 0], [0xF | 7 << 9, 0, 0, 0],   # unknown types
    [0x4 | 1 << 4 | 0x1F << 27 | 0xFFFF << 32, 0, 0, 0],
])
def test_decode_agrees_on_edges(words):
    same_decode(words)


# --- the queue -----------------------------------------------------------------------------
UNRESPONSIVE = frozenset({0x66})


def _desc_pool() -> list[np.void]:
    """Valid descriptors of every type, device-TLB ones to a good and a dead device, waits
    with and without interrupt, and malformed ones."""
    good = [
        qi.iotlb_desc(qi.QI_IOTLB_GRAN_PAGE, 1, 0x5000, 0, ih=True),
        qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, 2),
        qi.piotlb_desc(1, 3, qi.QI_GRAN_PSI_PASID, 0x8000, 1),
        qi.piotlb_desc(1, 3, qi.QI_GRAN_NONG_PASID),
        qi.cc_desc(qi.QI_CC_GRAN_DEVICE, 1, 0x10),
        qi.pc_desc(qi.QI_PC_PASID_SEL, 1, 3),
        qi.iec_desc(),
        qi.dev_iotlb_desc(0x10, 0, 0, 0x4000, 4096),
        qi.pasid_dev_iotlb_desc(0x10, 0, 3, 0x8000, 8192),
        qi.dev_iotlb_desc(0x66, 0, 0, 0x4000, 4096),             # times out: ITE
        qi.wait_desc(),
        qi.wait_desc(interrupt=True, status_write=False),
    ]
    bad = [
        qi._record(0x2 | 3 << 4, (1 << 12) | 1),                  # misaligned
        qi._record(0x5),                                          # wait without action
        qi._record(0x9),                                          # unknown type
        qi._record(0x2 | 1 << 4, 0, 0, 1),                        # reserved qw3
    ]
    return good + bad


POOL = _desc_pool()
N_GOOD = 12

STEPS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3_000),
              st.lists(st.integers(0, N_GOOD - 1), max_size=40),
              st.lists(st.tuples(st.integers(0, 40), st.integers(0, len(POOL) - 1)),
                       max_size=1)),
    st.tuples(st.just("room"), st.integers(0, 2_000), st.integers(0, 140)),
    st.tuples(st.just("free"), st.integers(0, 20_000)),
    st.tuples(st.just("clear_iqe"), st.integers(0, 2_000), st.integers(-1, len(POOL) - 1)),
    st.tuples(st.just("clear_ite")),
    st.tuples(st.just("clear_iwc")),
), max_size=60)


def result(r) -> tuple:
    """A SubmitResult as plain values."""
    return ([(t, asdict(c)) for t, c in r.commands], [(t, asdict(c)) for t, c in r.waits],
            list(r.wait_done_ns), r.processed,
            None if r.error is None else outcome(r.error), r.error_index, r.refused)


class Pair:
    def __init__(self, entries: int = 128, **kw) -> None:
        costs = CostModel()
        self.lq = qi.InvalidationQueue(entries, costs, **kw)
        self.rq = rq.InvalidationQueue(entries, costs, **kw)

    def both(self, what: str, *args):
        outs = []
        for q, err in ((self.lq, qi.QiError), (self.rq, rq.QiError)):
            try:
                out = getattr(q, what)(*args)
            except err:
                out = "QiError"
            if what in ("submit", "clear_iqe") and out != "QiError":
                out = result(out)
            outs.append(out)
        assert outs[0] == outs[1], (what, args, outs)
        self.check()
        return outs[0]

    def check(self) -> None:
        for k in ("head", "tail", "fsts_iqe", "iqe_head", "fsts_ite", "ics_iwc", "counts",
                  "errors", "refused", "entries", "qs"):
            assert getattr(self.lq, k) == getattr(self.rq, k), k


def run_script(pair: Pair, steps) -> None:
    t = 0
    for step in steps:
        kind = step[0]
        if kind == "submit":
            _, dt, picks, bad = step
            t += dt
            batch = [POOL[i] for i in picks]
            for pos, i in bad:
                batch.insert(min(pos, len(batch)), POOL[i])
            pair.both("submit", np.array(batch, dtype=qi.DESC_DTYPE), t)
        elif kind == "room":
            t += step[1]
            at = pair.both("room_at", t, step[2])
            if at != "QiError":       # the driver spins until then (times never go back)
                if at > t:
                    assert pair.both("free_slots", at - 1) < step[2]
                assert pair.both("free_slots", at) >= step[2]
                t = at
        elif kind == "free":
            t += step[1]
            pair.both("free_slots", t)
        elif kind == "clear_iqe":
            t += step[1]
            pair.both("clear_iqe", t, None if step[2] < 0 else POOL[step[2]])
        else:
            pair.both(kind)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([128, 256]), STEPS)
def test_random_queue_scripts_agree(entries, steps):
    run_script(Pair(entries, unresponsive_sids=UNRESPONSIVE), steps)


@settings(max_examples=60, deadline=None)
@given(STEPS, st.sampled_from([0, 18]))
def test_queue_scripts_agree_with_other_mamv(steps, mamv):
    run_script(Pair(128, mamv=mamv), steps)


def test_full_queue_waits_for_room_then_fits():
    """A 128-entry queue filled in one burst refuses the next write until the room query's
    time, and takes it then; both models give the same times."""
    pair = Pair(128)
    burst = np.array([POOL[0]] * 120 + [POOL[10]], dtype=qi.DESC_DTYPE)
    pair.both("submit", burst, 0)
    small = np.array([POOL[2]] * 20, dtype=qi.DESC_DTYPE)
    assert pair.both("submit", small, 10)[-1] is True
    at = pair.both("room_at", 10, 20)
    assert at > 10
    assert pair.both("submit", small, at - 1)[-1] is True
    assert pair.both("submit", small, at)[-1] is False
    assert pair.both("room_at", at, 100) > at
    assert pair.both("room_at", at, 128) == "QiError"  # one slot always stays empty


def test_iqe_recovery_and_ite_agree():
    """An error mid-batch holds the rest; a replacement resumes from it, no replacement
    drops it; a dead device's device-TLB invalidation stops the queue until ITE is cleared."""
    pair = Pair(128, unresponsive_sids=UNRESPONSIVE)
    batch = np.array([POOL[0], POOL[1], POOL[12], POOL[2], POOL[10]], dtype=qi.DESC_DTYPE)
    pair.both("submit", batch, 100)
    pair.both("submit", batch, 200)                   # refused: IQE pending
    pair.both("free_slots", 300)
    pair.both("clear_iqe", 0, POOL[13])               # the replacement is bad too
    pair.both("clear_iqe", 400, POOL[11])
    pair.both("submit", batch, 500)
    pair.both("clear_iqe", 600, None)
    dead = np.array([POOL[7], POOL[9], POOL[10]], dtype=qi.DESC_DTYPE)
    pair.both("submit", dead, 700)
    pair.both("submit", dead, 800)                    # refused: ITE pending
    pair.both("clear_ite")
    pair.both("clear_iwc")
    pair.both("submit", np.array([POOL[11]], dtype=qi.DESC_DTYPE), 900)
    pair.both("clear_iqe", 1000)                      # no error: nothing happens


def test_bad_arguments_refused_alike():
    for entries in (0, 100, 127, 129, 1 << 15, 1 << 20):
        with pytest.raises(qi.QiError):
            qi.InvalidationQueue(entries)
        with pytest.raises(rq.QiError):
            rq.InvalidationQueue(entries)
    pair = Pair(128)
    for bad in (np.zeros(2, dtype=np.uint64), [POOL[0]],
                np.array([[POOL[0]]], dtype=qi.DESC_DTYPE)):
        assert pair.both("submit", bad, 0) == "QiError"


def test_free_slots_does_not_depend_on_earlier_questions():
    """A question about a later time leaves the answer for an earlier one unchanged (the
    queue once dropped effect times as it was asked; the host asks back in time)."""
    answers = []
    for ask_later_first in (False, True):
        q = qi.InvalidationQueue(128)
        q.submit(np.array([POOL[0]] * 100, dtype=qi.DESC_DTYPE), 0)
        if ask_later_first:
            q.free_slots(50_000)
        answers.append(q.free_slots(10))
    assert answers[0] == answers[1]


def test_empty_submission_leaves_the_hardware_idle():
    """An empty tail write does not move the busy time: a later submission stamped earlier
    starts when it was written, as on the reference."""
    pair = Pair(128)
    pair.both("submit", np.array([POOL[1]], dtype=qi.DESC_DTYPE), 0)
    pair.both("submit", np.array([], dtype=qi.DESC_DTYPE), 5000)
    pair.both("submit", np.array([POOL[1]], dtype=qi.DESC_DTYPE), 1000)
