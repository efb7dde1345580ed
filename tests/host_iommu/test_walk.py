"""Tests of the batch page walker: reference counts per PGTT and page size, paging-structure
caches, and the batch walker against the one-request-at-a-time ReferenceWalker."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.defs import (
    ACCESS_WRITE,
    KIND_GUEST_TABLE,
    KIND_PAGETABLE,
    OWNER_HOST,
    PAGE_SIZE,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
)
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import FL_A, FL_D, SL_A, SL_D, HostTableStore, PageTable
from host_iommu.reference import ReferenceWalker, RefRequest
from host_iommu.reference_cache import RefPagingStructureCache
from host_iommu.walk import WalkBatch
from tests.host_iommu.conftest import DATA_GPA, IOVA, SID, GuestTableStore

U64 = np.uint64


# --- reference counts of one cold walk ----------------------------------------------------------
def test_nested_4_over_4_cold_walk_is_24_refs(env):
    """A cold 4-level first level over a 4-level second level reads (4+1)*(4+1)-1 = 24 entries."""
    r = env.translate(IOVA + 0x123)
    assert r["fault"] == 0
    assert r["walk_refs"] == 24
    assert r["hpa"] == env.gpa_hpa(DATA_GPA + 0x123)


def test_nested_5_over_4_cold_walk_is_29_refs(env_factory):
    """A 5-level first level over a 4-level second level reads 5*(4+1)+4 = 29 entries."""
    env = env_factory(fl_levels=5)
    r = env.translate(IOVA)
    assert (r["fault"], r["walk_refs"]) == (0, 29)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA)


def test_nested_over_1g_second_level_is_14_refs(env_factory):
    """With 1-GiB second-level pages each second-level walk reads 2 entries: 4*(2+1)+2 = 14."""
    env = env_factory(memory_mib=2048, vm_bytes=1 << 30, sl_page_order=2)
    r = env.translate(IOVA + 8)
    assert (r["fault"], r["walk_refs"]) == (0, 14)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA + 8)
    assert r["page_order"] == 0   # the first level maps 4 KiB: the smaller page wins


def test_nested_over_2m_second_level_is_19_refs(env_factory):
    """With 2-MiB second-level pages each second-level walk reads 3 entries: 4*(3+1)+3 = 19."""
    env = env_factory(sl_page_order=1)
    r = env.translate(IOVA)
    assert (r["fault"], r["walk_refs"]) == (0, 19)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA)


def test_second_level_only_walk_is_4_refs(env):
    """PGTT=2 (second level only, shadow-like): a 4-level walk of the GPA reads 4 entries."""
    h = env.h
    h.set_pasid_entry(SID, 1, PasidEntry(pgtt=PGTT_SL_ONLY, did=env.vm.did,
                                         slptr=env.vm.sl.root, sl_levels=4))
    r = env.translate(DATA_GPA + 0x40, ACCESS_WRITE, pasid=1)
    assert (r["fault"], r["walk_refs"]) == (0, 4)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA + 0x40)


def test_first_level_only_walk_is_4_refs(env):
    """PGTT=1 (first level only, tables in host memory, pointers are HPAs): 4 entries."""
    h = env.h
    fl = PageTable(HostTableStore(h.mem, OWNER_HOST), "fl", 4, h.p.haw)
    target = env.gpa_hpa(DATA_GPA)
    fl.map(IOVA, target, PAGE_SIZE)
    h.set_pasid_entry(SID, 2, PasidEntry(pgtt=PGTT_FL_ONLY, did=h.alloc_did(),
                                         flptr=fl.root, fl_levels=4))
    r = env.translate(IOVA + 0x10, pasid=2)
    assert (r["fault"], r["walk_refs"]) == (0, 4)
    assert r["hpa"] == target + 0x10


def test_pass_through_walk_is_0_refs(env):
    """PGTT=4 (pass-through): the address is the HPA and no table is read."""
    h = env.h
    h.set_pasid_entry(SID, 3, PasidEntry(pgtt=PGTT_PT, did=env.vm.did))
    hpa = env.gpa_hpa(DATA_GPA)
    r = env.translate(hpa + 4, pasid=3)
    assert (r["fault"], r["walk_refs"], r["hpa"]) == (0, 0, hpa + 4)


# --- paging-structure caches ---------------------------------------------------------------
def test_pwc_cuts_neighbour_walk_to_3_refs(env_factory):
    """PWCs on, IOTLB off: after a cold walk of X (24), X+4K costs 3 (SL leaf of the FL page
    table, the FL PTE, SL leaf of the data page), and X again also 3."""
    env = env_factory(pwc=True)
    assert env.translate(IOVA)["walk_refs"] == 24
    r = env.translate(IOVA + PAGE_SIZE)
    assert (r["fault"], r["walk_refs"], r["iotlb_hit"]) == (0, 3, False)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA + PAGE_SIZE)
    r = env.translate(IOVA)
    assert (r["fault"], r["walk_refs"], r["iotlb_hit"]) == (0, 3, False)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA)


def test_iotlb_hit_makes_no_walk(env_factory):
    """IOTLB on: the second translation of X hits and reads no page-table entry (24 -> 0)."""
    env = env_factory(pwc=True, iotlb_entries=1024)
    r = env.translate(IOVA)
    assert (r["walk_refs"], r["iotlb_hit"]) == (24, False)
    r = env.translate(IOVA + 0x20)
    assert (r["walk_refs"], r["iotlb_hit"]) == (0, True)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA + 0x20)


# --- differential: batch walker vs ReferenceWalker ------------------------------------------
@dataclass
class Ctx:
    """A PASID entry's walk inputs, and where its mappings are (to aim requests at)."""

    pgtt: int
    did: int
    pasid: int
    flptr: int
    fl_levels: int
    slptr: int
    sl_levels: int
    ssade: bool
    lo: int          # mapped input range [lo, hi)
    hi: int


@functools.cache
def build_world(pwc: bool) -> tuple[HostIommu, list[Ctx]]:
    """Two VMs (4-KiB and 2-MiB second levels) and contexts of every PGTT over them.

    Built once per PWC setting; callers deep-copy it before walking (walks set A/D bits)."""
    h = HostIommu(IommuParams(memory_mib=192, iotlb_entries=0, page_walk_cache=pwc,
                              pwc_entries=4096, pwc_ways=8))
    vm1 = h.create_vm(1, 32 << 20)
    vm2 = h.create_vm(2, 16 << 20, sl_page_order=1)
    rng = np.random.default_rng(7)
    ctxs: list[Ctx] = []
    for vm, fl_levels, pasid in ((vm1, 4, 1), (vm1, 5, 2), (vm2, 4, 1)):
        store = GuestTableStore(h, vm.vm, 12 << 20, 16 << 20) if pasid == 1 else \
            GuestTableStore(h, vm.vm, 16 << 20, 20 << 20)
        fl = PageTable(store, "fl", fl_levels, h.p.haw)
        data = rng.permutation(np.arange(16, 2048))[:96].tolist()    # scattered 4-KiB GPAs
        for i, f in enumerate(data):
            fl.map(IOVA + i * PAGE_SIZE, f << 12, PAGE_SIZE, write=bool(i % 3))
        fl.map(IOVA + (2 << 20), 2 << 20, 4 << 20, max_order=1)      # two 2-MiB FL pages
        did = h.alloc_did()
        ctxs.append(Ctx(PGTT_NESTED, did, pasid, fl.root, fl_levels, vm.sl.root, 4,
                        bool(pasid == 2), IOVA, IOVA + (6 << 20)))
    hfl = PageTable(HostTableStore(h.mem, OWNER_HOST), "fl", 4, h.p.haw)
    base = int(vm1.hpa_of[100]) << 12
    hfl.map(IOVA, base, 64 * PAGE_SIZE)
    ctxs.append(Ctx(PGTT_FL_ONLY, h.alloc_did(), 3, hfl.root, 4, 0, 4, False,
                    IOVA, IOVA + 64 * PAGE_SIZE))
    ctxs.append(Ctx(PGTT_SL_ONLY, vm1.did, 0, 0, 4, vm1.sl.root, 4, True, 0, 32 << 20))
    ctxs.append(Ctx(PGTT_SL_ONLY, vm2.did, 0, 0, 4, vm2.sl.root, 4, False, 0, 16 << 20))
    ctxs.append(Ctx(PGTT_PT, 9, 0, 0, 4, 0, 4, False, 0, h.mem.frames << 12))
    return h, ctxs


def make_requests(rng: np.random.Generator, ctxs: list[Ctx], n: int) -> WalkBatch:
    """Requests aimed in, near and far outside each context's mapped range."""
    c = rng.integers(0, len(ctxs), n)
    kind = rng.integers(0, 8, n)
    lo = np.array([x.lo for x in ctxs], dtype=np.int64)[c]
    hi = np.array([x.hi for x in ctxs], dtype=np.int64)[c]
    inside = lo + (rng.random(n) * (hi - lo)).astype(np.int64)
    near = np.maximum(lo - (8 << 20) + rng.integers(0, 16 << 20, n) + (hi - lo), 0)
    far48 = rng.integers(0, 1 << 48, n, dtype=np.int64)
    any64 = rng.integers(0, 1 << 63, n, dtype=np.int64).astype(U64) << U64(1)
    addr = np.where(kind < 5, inside.astype(U64),
                    np.where(kind == 5, near.astype(U64),
                             np.where(kind == 6, far48.astype(U64), any64)))
    addr &= ~U64(7)

    def col(name: str, dtype) -> np.ndarray:
        return np.array([getattr(x, name) for x in ctxs], dtype=dtype)[c]

    return WalkBatch(addr=addr, access=rng.integers(1, 3, n).astype(np.uint8),
                     pgtt=col("pgtt", np.uint8), did=col("did", np.int64),
                     pasid=col("pasid", np.int64), flptr=col("flptr", U64),
                     fl_levels=col("fl_levels", np.uint8), slptr=col("slptr", U64),
                     sl_levels=col("sl_levels", np.uint8), ssade=col("ssade", bool))


def corruptions(h: HostIommu, rng: np.random.Generator, k: int) -> list[tuple[int, int, int]]:
    """k random (frame, entry, bit) flips in table pages (guest first levels, host tables);
    half of them hit live (non-zero) entries, the rest any entry."""
    frames = np.flatnonzero((h.mem.slot_of >= 0) & np.isin(h.mem.kind, (KIND_GUEST_TABLE,
                                                                        KIND_PAGETABLE)))
    f = rng.choice(frames, k)
    idx = rng.integers(0, 512, k)
    live_f, live_i = np.nonzero(h.mem.slab[h.mem.slot_of[frames]] != 0)
    if live_f.size:
        pick = rng.integers(0, live_f.size, k)
        use = rng.random(k) < 0.5
        f = np.where(use, frames[live_f[pick]], f)
        idx = np.where(use, live_i[pick], idx)
    return list(zip(f.tolist(), idx.tolist(), rng.integers(0, 64, k).tolist(), strict=True))


def apply_flips(h: HostIommu, flips: list[tuple[int, int, int]]) -> None:
    for frame, idx, bit in flips:
        h.mem.table(frame)[idx] ^= U64(1 << bit)


AD_BITS = U64(FL_A | FL_D | SL_A | SL_D)


def pwc_contents(pwc) -> list[tuple[int, ...]]:
    """Cached PWC entries with A/D bits masked: within a batch the walker's gathers do not
    see each other's A/D writes, the sequential reference does (see the module note)."""
    if pwc is None:
        return []
    rows = pwc.cache.contents()
    return sorted((*r[:-1], r[-1] & ~int(AD_BITS)) for r in rows)


def run_differential(pwc: bool, seed: int, n: int, batches: int, flips: int
                     ) -> tuple[int, int]:
    """Walk the same batches on two deep copies; returns (requests that faulted, hits in the
    reference's paging-structure caches).

    The reference gets its own paging-structure caches (the plain-list model of
    reference_cache.py), so walker and reference share no cache code either."""
    pristine, ctxs = build_world(pwc)
    h0 = copy.deepcopy(pristine)
    rng = np.random.default_rng(seed)
    apply_flips(h0, corruptions(h0, rng, flips))
    hb, hr = copy.deepcopy(h0), copy.deepcopy(h0)
    p = hr.p
    ref_pwcs = [RefPagingStructureCache(p.pwc_entries, p.pwc_ways, stage) if pwc else None
                for stage in ("fl", "sl")]
    ref = ReferenceWalker(hr.mem, p.haw, *ref_pwcs)
    faulted = 0
    for _ in range(batches):
        b = make_requests(rng, ctxs, n)
        got = hb.walker.walk(b)
        for i in range(n):
            want = ref.translate(RefRequest(
                int(b.addr[i]), int(b.access[i]), int(b.pgtt[i]), int(b.did[i]),
                int(b.pasid[i]), int(b.flptr[i]), int(b.fl_levels[i]), int(b.slptr[i]),
                int(b.sl_levels[i]), bool(b.ssade[i])), i)
            # perm is only defined for a translation (the walker leaves stage defaults on
            # a fault, the reference 0): compare it where the request did not fault.
            ok = want.fault == 0
            assert (int(got.hpa[i]), int(got.fault[i]), int(got.stage[i]),
                    int(got.walk_refs[i]), int(got.order[i]), int(got.perm[i]) if ok else 0) == (
                want.hpa, want.fault, want.stage, want.refs, want.order, want.perm if ok else 0), (
                f"request {i}: addr={int(b.addr[i]):#x} pgtt={int(b.pgtt[i])}")
        ref.flush_fills()
        faulted += int((got.fault != 0).sum())
        # same memory afterwards (A/D bits included), same cached structures
        assert np.array_equal(hb.mem.slot_of, hr.mem.slot_of)
        assert np.array_equal(hb.mem.slab, hr.mem.slab)
        assert pwc_contents(hb.fl_pwc) == pwc_contents(ref_pwcs[0])
        assert pwc_contents(hb.sl_pwc) == pwc_contents(ref_pwcs[1])
        more = corruptions(hb, rng, max(1, flips // 4))
        apply_flips(hb, more)
        apply_flips(hr, more)
    hits = sum(c.cache.hits for c in ref_pwcs if c is not None)
    return faulted, hits


def test_differential_caches_off():
    """Without PWCs the batch walker equals the reference on 3,000 mixed requests per batch
    (PGTT 1-4, in/near/far/non-canonical addresses, reads and writes, corrupted tables)."""
    faulted, _ = run_differential(pwc=False, seed=1, n=3000, batches=2, flips=40)
    assert 0 < faulted < 6000        # both outcomes were exercised


def test_differential_pwc_on_over_batches():
    """With PWCs the batch walker equals the reference over consecutive batches: same
    results, same PWC contents (fill order of walk.py) and same memory after each batch."""
    faulted, pwc_hits = run_differential(pwc=True, seed=2, n=1000, batches=3, flips=40)
    assert 0 < faulted < 3000
    assert pwc_hits > 100            # walks really started from cached entries


def probe_batch(ctxs: list[Ctx]) -> WalkBatch:
    """One write and one read per context at a writable page of its mapped range (pass-through:
    left out, it reads no entry)."""
    walked = [c for c in ctxs if c.pgtt != PGTT_PT]
    rows = [(c, a) for c in walked for a in (ACCESS_WRITE, 1)]

    def col(name: str, dtype) -> np.ndarray:
        return np.array([getattr(c, name) for c, _ in rows], dtype=dtype)

    return WalkBatch(addr=np.array([c.lo + PAGE_SIZE + 0x5A8 for c, _ in rows], U64),
                     access=np.array([a for _, a in rows], np.uint8),
                     pgtt=col("pgtt", np.uint8), did=col("did", np.int64),
                     pasid=col("pasid", np.int64), flptr=col("flptr", U64),
                     fl_levels=col("fl_levels", np.uint8), slptr=col("slptr", U64),
                     sl_levels=col("sl_levels", np.uint8), ssade=col("ssade", bool))


def ref_walk(ref: ReferenceWalker, b: WalkBatch) -> list[tuple[int, ...]]:
    out = []
    for i in range(b.addr.size):
        r = ref.translate(RefRequest(
            int(b.addr[i]), int(b.access[i]), int(b.pgtt[i]), int(b.did[i]), int(b.pasid[i]),
            int(b.flptr[i]), int(b.fl_levels[i]), int(b.slptr[i]), int(b.sl_levels[i]),
            bool(b.ssade[i])), i)
        ok = r.fault == 0        # page order and permissions are defined for translations
        out.append((r.hpa, r.fault, r.stage, r.refs, r.order if ok else 0, r.perm if ok else 0))
    return out


def flip_bits(haw: int) -> list[int]:
    """Every flag bit (11:0), the address bits at each page-size and reserved-field edge
    (12, 13, 20, 21, 29, 30, HAW-1, HAW), and the high bits (51, 52, 61, 62, 63)."""
    return sorted({*range(12), 12, 13, 20, 21, 29, 30, haw - 1, haw, 51, 52, 61, 62, 63})


def test_every_flag_of_every_entry_a_walk_reads():
    """Single-bit corruption of each entry the probe walks read (first and second level, 4-
    and 5-level, 4-KiB and 2-MiB pages), at every bit with a meaning: the walker and the
    reference agree on the outcome (reserved bits, permissions, addresses, fault reasons),
    each written independently from the spec's entry formats."""
    pristine, ctxs = build_world(False)
    hb, hr = copy.deepcopy(pristine), copy.deepcopy(pristine)
    b = probe_batch(ctxs)
    ref = ReferenceWalker(hr.mem, hr.p.haw)
    read: set[int] = set()
    hr.mem.read_u64 = lambda ea, _r=hr.mem.read_u64: read.add(ea) or _r(ea)
    assert all(r[1] == 0 for r in ref_walk(ref, b))              # healthy: all translate
    del hr.mem.read_u64
    assert len(read) > 30
    hb.walker.walk(b)
    faults = 0
    for ea in sorted(read):
        for bit in flip_bits(hr.p.haw):
            flip = [(ea >> 12, (ea >> 3) & 511, bit)]
            apply_flips(hb, flip)
            apply_flips(hr, flip)
            got = hb.walker.walk(b)
            want = ref_walk(ref, b)
            for i, w in enumerate(want):
                ok = w[1] == 0
                assert (int(got.hpa[i]), int(got.fault[i]), int(got.stage[i]),
                        int(got.walk_refs[i]), int(got.order[i]) if ok else 0,
                        int(got.perm[i]) if ok else 0) == w, (
                    f"entry {ea:#x} bit {bit}, request {i} (pgtt {int(b.pgtt[i])})")
            faults += int((got.fault != 0).sum())
            apply_flips(hb, flip)
            apply_flips(hr, flip)
    assert faults > 0
    assert np.array_equal(hb.mem.slab, hr.mem.slab)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pwc=st.booleans(), flips=st.integers(0, 300),
       n=st.integers(1, 120))
def test_differential_adversarial(seed, pwc, flips, n):
    """Hypothesis: heavy corruption and small batches never separate walker and reference."""
    run_differential(pwc=pwc, seed=seed, n=n, batches=2, flips=flips)

