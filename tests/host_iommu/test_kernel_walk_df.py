"""The walk kernel's depth-first path against its level-synchronous path (kernels/walk.py).

walk_batch walks each PGTT group depth-first (_group_df: one request after the other, nested
table pages memoized within the batch) unless some entry needs an A/D write, and then
level-synchronously, as walk.py's batch semantics are written. Both run here on deep copies
of the same world (test_walk.py's: every PGTT, 4-KiB and 2-MiB second levels, 4- and
5-level first levels, SSADE) and must leave the same results, A/D write counts, memory and
paging-structure caches (every line with its set, way and LRU stamp, and the counters):

- clean tables (the guest's first-level entries carry A and D as Linux writes them), where
  the depth-first path completes: checked by calling _group_df on a third copy;
- adversarial tables (random bit flips: not-present, reserved, permission and A/D bits),
  tiny PWCs with evictions, batches with and without fills, and none at all;
- batches that repeat one table page many times (the memo's hits), and groups that abort on
  an A/D write midway (the undo).
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import ACCESS_WRITE, PGTT_FL_ONLY, PGTT_NESTED, PGTT_SL_ONLY
from host_iommu.kernels.pwc import PwcArrays
from host_iommu.kernels.walk import MEMO_MIN_BATCH, _group_df, walk_batch_mode
from host_iommu.walk import NO_PWC, WalkBatch, WalkResult
from tests.host_iommu.test_walk import apply_flips, build_world, corruptions, make_requests


def walk_mode(h, b: WalkBatch, fill: bool, depth_first: bool) -> WalkResult:
    """Walker.walk_compiled's call, through walk_batch_mode."""
    n = b.addr.size
    out = (np.zeros(n, np.uint64), np.zeros(n, np.uint8), np.zeros(n, np.uint8),
           np.zeros(n, np.int64), np.zeros(n, np.uint8), np.zeros(n, np.uint8))
    w, fl, sl = h.walker, h.walker.fl_pwc, h.walker.sl_pwc
    ad = walk_batch_mode(
        h.mem.slab, h.mem.slot_of, w.haw, w.amask, w.fl_rsvd, w.sl_rsvd, *_cols(b),
        fl is not None, NO_PWC[0] if fl is None else fl.state,
        NO_PWC[1] if fl is None else fl.counts, sl is not None,
        NO_PWC[0] if sl is None else sl.state, NO_PWC[1] if sl is None else sl.counts,
        fill, *out, depth_first)
    return WalkResult(*out[:3], out[3], out[4], out[5], int(ad))


def _cols(b: WalkBatch) -> tuple[np.ndarray, ...]:
    c = np.ascontiguousarray
    return (c(b.addr, np.uint64), c(b.access, np.uint8), c(b.pgtt, np.uint8),
            c(b.did, np.int64), c(b.pasid, np.int64), c(b.flptr, np.uint64),
            c(b.fl_levels, np.uint8), c(b.slptr, np.uint64), c(b.sl_levels, np.uint8),
            c(b.ssade, np.bool_))


def group_completes(h, b: WalkBatch, fill: bool) -> dict[int, bool]:
    """Per PGTT group of ``b``: does _group_df complete on a copy of ``h`` (no A/D write)?
    Groups run in walk_batch's order on the same copy."""
    h = copy.deepcopy(h)
    w, fl, sl = h.walker, h.walker.fl_pwc, h.walker.sl_pwc
    n = b.addr.size
    out = (np.zeros(n, np.uint64), np.zeros(n, np.uint8), np.zeros(n, np.uint8),
           np.zeros(n, np.int64), np.zeros(n, np.uint8), np.zeros(n, np.uint8))
    ctx = np.zeros(3, np.int64)
    ffl = np.empty((5, n * 4 + 1), np.int64)
    fsl = np.empty((5, n * 24 + 1), np.int64)
    done = {}
    for g in (PGTT_SL_ONLY, PGTT_FL_ONLY, PGTT_NESTED):
        ix = np.flatnonzero(b.pgtt == g).astype(np.int64)
        if ix.size:
            done[g] = bool(_group_df(
                h.mem.slab, h.mem.slot_of, w.amask, w.fl_rsvd, w.sl_rsvd, ix, np.int64(g),
                *_cols(b)[:2], *_cols(b)[3:7], _cols(b)[8], _cols(b)[7], _cols(b)[9],
                fl is not None, NO_PWC[0] if fl is None else fl.state,
                NO_PWC[1] if fl is None else fl.counts, sl is not None,
                NO_PWC[0] if sl is None else sl.state, NO_PWC[1] if sl is None else sl.counts,
                fill and fl is not None, fill and sl is not None, ffl, fsl, ctx, *out))
    return done


def assert_same(a, b, ra: WalkResult, rb: WalkResult) -> None:
    for name in ("hpa", "fault", "stage", "walk_refs", "order", "perm"):
        assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
    assert ra.ad_writes == rb.ad_writes
    assert np.array_equal(a.mem.slab, b.mem.slab)
    for pa, pb in ((a.walker.fl_pwc, b.walker.fl_pwc), (a.walker.sl_pwc, b.walker.sl_pwc)):
        if pa is None:
            assert pb is None
            continue
        assert np.array_equal(pa.state, pb.state)
        assert np.array_equal(pa.counts, pb.counts)


def warmed(pwc: bool):
    """The world after one level-synchronous walk of every context's mapped range (A and D
    bits set where the walks set them, as a guest's first DMAs would)."""
    h, ctxs = build_world(pwc)
    h = copy.deepcopy(h)        # build_world's world is shared (cached): never walk it
    rng = np.random.default_rng(1)
    for _ in range(2):
        req = make_requests(rng, ctxs, 800)
        req.access[:] = ACCESS_WRITE
        walk_mode(h, req, True, False)
    return h, ctxs


def run(seed: int, n: int, batches: int, flips: int, pwc: bool, size: tuple[int, int],
        fill: bool, repeat: bool = False, twice: bool = False) -> dict[int, int]:
    """Walk ``batches`` batches both ways (each twice if ``twice``: the first sets the A/D
    bits SSADE contexts need); returns per group how often depth-first completed (on the
    batch's last walk)."""
    pristine, ctxs = warmed(pwc)
    rng = np.random.default_rng(seed)
    a = copy.deepcopy(pristine)
    apply_flips(a, corruptions(a, rng, flips))
    if pwc:
        a.walker.fl_pwc = PwcArrays(size[0], size[1], "fl")
        a.walker.sl_pwc = PwcArrays(size[0], size[1], "sl")
    b = copy.deepcopy(a)
    completed = {g: 0 for g in (PGTT_SL_ONLY, PGTT_FL_ONLY, PGTT_NESTED)}
    for _ in range(batches):
        req = make_requests(rng, ctxs, n)
        if repeat:      # few distinct pages, many requests each (memo hits, coalesced)
            pick = rng.integers(0, max(1, n // 8), n)
            req = WalkBatch(**{f: getattr(req, f)[pick] for f in req.__dataclass_fields__})
        if twice:
            assert_same(a, b, walk_mode(a, req, fill, True), walk_mode(b, req, fill, False))
        for g, ok in group_completes(a, req, fill).items():
            completed[g] += ok
        assert_same(a, b, walk_mode(a, req, fill, True), walk_mode(b, req, fill, False))
        more = corruptions(a, rng, max(1, flips // 4)) if flips else []
        apply_flips(a, more)
        apply_flips(b, more)
    return completed


def test_clean_tables_complete_depth_first():
    """Warmed tables: every group walks depth-first, equal to the level-synchronous walk."""
    for pwc in (False, True):
        for fill in (True, False):
            done = run(seed=3, n=300, batches=3, flips=0, pwc=pwc, size=(64, 8), fill=fill,
                       twice=True)
            assert all(v == 3 for v in done.values()), (pwc, fill, done)


def test_repeated_pages_memo():
    """Many requests per page: the nested memo replays walks (fills and PWC hits included)."""
    for pwc in (False, True):
        done = run(seed=4, n=400, batches=3, flips=0, pwc=pwc, size=(16, 4), fill=True,
                   repeat=True, twice=True)
        assert done[PGTT_NESTED] == 3
    assert MEMO_MIN_BATCH <= 400


def test_flipped_tables_and_aborts():
    """Flipped bits (A/D among them): groups abort midway and walk level-synchronously."""
    done = run(seed=5, n=200, batches=4, flips=60, pwc=True, size=(16, 4), fill=True)
    assert sum(done.values()) < 12      # some group aborted
    run(seed=6, n=40, batches=4, flips=20, pwc=False, size=(0, 1), fill=False)


def test_single_requests():
    """Batches of one request (no memo) and one repeated request (memo, coalesced pages)."""
    pristine, ctxs = warmed(True)
    rng = np.random.default_rng(9)
    a, b = copy.deepcopy(pristine), copy.deepcopy(pristine)
    req = make_requests(rng, ctxs, 60)
    for k in range(60):
        one = WalkBatch(**{f: getattr(req, f)[k:k + 1] for f in req.__dataclass_fields__})
        assert_same(a, b, walk_mode(a, one, True, True), walk_mode(b, one, True, False))
    same = WalkBatch(**{f: np.repeat(getattr(req, f)[:1], 40) for f in req.__dataclass_fields__})
    assert_same(a, b, walk_mode(a, same, True, True), walk_mode(b, same, True, False))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pwc=st.booleans(), flips=st.integers(0, 40),
       n=st.integers(1, 120), fill=st.booleans(), repeat=st.booleans(), twice=st.booleans(),
       size=st.sampled_from([(4, 4), (8, 2), (16, 4), (64, 8), (12, 3)]))
def test_depth_first_vs_level_sync_hypothesis(seed, pwc, flips, n, fill, repeat, twice, size):
    """Hypothesis: corruption, batch sizes around the memo's threshold, PWC geometries."""
    run(seed, n, 3, flips, pwc, size, fill, repeat, twice)
