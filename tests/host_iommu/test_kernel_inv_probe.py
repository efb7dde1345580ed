"""The IOTLB invalidation kernel (kernels/iotlb.py _invalidate: a page-selective 0x2 visits only
the sets of the range's keys while no line is irregular) against the full scan it replaced
(_invalidate_scan): the same lines dropped, the same counters, every plane (stamps included)
bit for bit, and C_IRREG never below the irregular lines left."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import PGTT_FL_ONLY, PGTT_NESTED, PGTT_PT, PGTT_SL_ONLY
from host_iommu.kernels.iotlb import (
    C_INVALIDATED,
    C_IRREG,
    COUNTERS,
    F_PASID,
    F_PGTT,
    F_VALID,
    INV_DOMAIN,
    INV_GLOBAL,
    INV_PAGE,
    INV_PASID,
    INV_PASID_PAGE,
    LINE_FIELDS,
    MAX_PFN,
    _fill_keyed,
    _invalidate,
    _invalidate_scan,
)

U64 = np.uint64
# Lines near page BASE (4 KiB tags around BASE, 2 MiB and 1 GiB tags around BASE's), so that
# ranges meet, straddle and just miss lines of every size.
BASE = (5 << 18) + (3 << 9) + 7
REGULAR = (0, PGTT_SL_ONLY, PGTT_PT)             # pgtt values a probe can handle (PASID 0)
line = st.tuples(st.integers(0, 2),               # did
                 st.integers(0, 2),               # order
                 st.integers(-3, 3),              # tag offset from BASE's tag at that order
                 st.sampled_from((*REGULAR, PGTT_FL_ONLY, PGTT_NESTED)),
                 st.sampled_from([0, 0, 0, 0, 5]))  # pasid
regular_line = st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(-3, 3),
                         st.sampled_from(REGULAR), st.just(0))
# (kind, did, pasid, lo offset from BASE, am): 1 page to huge, the whole space.
inv = st.tuples(st.sampled_from([INV_PAGE] * 6 + [INV_GLOBAL, INV_DOMAIN, INV_PASID,
                                                  INV_PASID_PAGE]),
                st.integers(0, 2), st.sampled_from([0, 5]),
                st.integers(-1100, 1100), st.sampled_from([0, 0, 0, 1, 2, 5, 9, 10, 18, 30, 52]))
geometry = st.sampled_from([(0, 1), (1, 1), (4, 2), (8, 4), (16, 1), (128, 8), (3, 2)])


def _fill(state, counts, lines, clock0):
    did, order, off, pgtt, pasid = (np.array(c, dtype=np.int64) for c in zip(*lines,
                                                                          strict=True))
    tag = np.array([(BASE >> (9 * o)) + d for o, d in zip(order.tolist(), off.tolist(),
                                                          strict=True)], dtype=np.int64)
    tag = np.maximum(tag, 0)
    hpa = np.arange(len(lines), dtype=np.int64) + clock0
    cols = [c.astype(U64) for c in (did, pasid, tag, order, hpa, np.full_like(did, 3), pgtt)]
    _fill_keyed(state, counts, *cols)


def _range(off: int, am: int) -> tuple[int, int]:
    pfn = max(BASE + off, 0)
    lo = (pfn >> am) << am
    return lo, min(lo + (1 << am) - 1, MAX_PFN)


def _irregular_lines(state) -> int:
    v = state[F_VALID] == 1
    g = state[F_PGTT]
    return int(np.count_nonzero(v & ((state[F_PASID] != 0) | (g == PGTT_FL_ONLY)
                                     | (g == PGTT_NESTED))))


def _run(geom, script):
    sets, ways = geom
    new = np.zeros((len(LINE_FIELDS), sets, ways), dtype=U64)
    ref = new.copy()
    cn, cr = np.zeros(COUNTERS, np.int64), np.zeros(COUNTERS, np.int64)
    probed = 0
    for step in script:
        if isinstance(step, list):
            if step:
                _fill(new, cn, step, int(cn[0]))
                _fill(ref, cr, step, int(cr[0]))
            continue
        kind, did, pasid, off, am = step
        lo, hi = _range(off, am)
        probed += kind == INV_PAGE and cn[C_IRREG] == 0
        a = _invalidate(new, cn, kind, U64(did), U64(pasid), U64(lo), U64(hi))
        b = _invalidate_scan(ref, cr, kind, U64(did), U64(pasid), U64(lo), U64(hi))
        assert a == b
        assert np.array_equal(new, ref)            # same lines dropped, stamps untouched
        assert np.array_equal(cn[:C_IRREG], cr[:C_IRREG])
        assert cn[C_IRREG] >= _irregular_lines(new)
    assert np.array_equal(new, ref)
    return probed


@settings(max_examples=250, deadline=None)
@given(geometry, st.lists(st.one_of(st.lists(line, max_size=12), inv), max_size=16))
def test_invalidate_matches_scan_mixed(geom, script):
    _run(geom, script)


@settings(max_examples=250, deadline=None)
@given(geometry, st.lists(st.one_of(st.lists(regular_line, max_size=16), inv), max_size=16))
def test_invalidate_matches_scan_regular(geom, script):
    """Second-level, pass-through and PGTT-0 lines of PASID 0 only: the probe path runs."""
    _run(geom, script)


def test_probe_path_taken_and_counted():
    """One page in a full cache: the probe drops exactly the scan's lines; C_IRREG 0 stays 0;
    a first-level fill makes it 1, a full scan (that fill still there) keeps it exact."""
    rng = np.random.default_rng(7)
    lines = [(int(rng.integers(0, 3)), int(rng.integers(0, 3)), int(rng.integers(-3, 4)),
              int(rng.choice(REGULAR)), 0) for _ in range(400)]
    script = [lines] + [(INV_PAGE, d, 0, o, 0) for d in range(3) for o in range(-4, 5)]
    assert _run((128, 8), script) == len(script) - 1
    st_, cn = np.zeros((len(LINE_FIELDS), 16, 4), U64), np.zeros(COUNTERS, np.int64)
    _fill(st_, cn, lines[:20], 0)
    assert cn[C_IRREG] == 0
    _fill(st_, cn, [(1, 0, 0, PGTT_FL_ONLY, 0)], 20)
    assert cn[C_IRREG] == 1
    before = int(cn[C_INVALIDATED])
    n = _invalidate(st_, cn, INV_PAGE, U64(1), U64(0), U64(BASE), U64(BASE))
    assert n >= 1 and cn[C_INVALIDATED] == before + n and cn[C_IRREG] == 0
    _fill(st_, cn, [(2, 0, 0, PGTT_NESTED, 5)], 30)
    _invalidate(st_, cn, INV_PAGE, U64(1), U64(0), U64(BASE), U64(BASE))
    assert cn[C_IRREG] == 1 == _irregular_lines(st_)


def test_first_level_and_nested_lines_of_pasid_0_block_the_probe():
    """A first-level or nested line (PASID 0) far from the range: INV_PAGE drops it anyway,
    so its fill must mark the cache irregular; likewise a second-level line of PASID 5."""
    for irregular in ((1, 0, 3, PGTT_FL_ONLY, 0), (1, 0, 3, PGTT_NESTED, 0),
                      (1, 0, 0, PGTT_SL_ONLY, 5), (1, 1, 0, PGTT_PT, 5)):
        regular = [(1, 0, k, PGTT_SL_ONLY, 0) for k in (-2, -1)]
        _run((128, 8), [[*regular, irregular], (INV_PAGE, 1, 0, -2, 0),
                        (INV_PAGE, 1, 0, -1, 0), (INV_PAGE, 1, 0, 0, 0)])


def test_short_counter_vector_scans():
    """A 6-counter vector (no C_IRREG slot, as walk.py's NO_PWC) takes the scan, unharmed."""
    a = np.zeros((len(LINE_FIELDS), 8, 2), U64)
    b = a.copy()
    ca, cb = np.zeros(6, np.int64), np.zeros(6, np.int64)
    lines = [(0, 0, k, PGTT_SL_ONLY, 0) for k in range(-3, 4)]
    _fill(a, ca, lines, 0)
    _fill(b, cb, lines, 0)
    assert (_invalidate(a, ca, INV_PAGE, U64(0), U64(0), U64(BASE), U64(BASE + 1))
            == _invalidate_scan(b, cb, INV_PAGE, U64(0), U64(0), U64(BASE), U64(BASE + 1)))
    assert np.array_equal(a, b) and np.array_equal(ca, cb)
