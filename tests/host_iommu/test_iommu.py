"""Tests of HostIommu.translate: context fetches, IOTLB isolation, invalidation with modelled
latency, and hostile input (guest-written tables, PASID entries, descriptors)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import qi
from host_iommu.defs import (
    ACCESS_WRITE,
    OWNER_HOST,
    PAGE_SIZE,
    PGTT_NESTED,
    PGTT_SL_ONLY,
    FaultReason,
    Stage,
)
from host_iommu.invalidate import ALL_PAGES, domain_flush_descs, pasid_flush_descs
from host_iommu.iommu import HostIommu, IommuParams, first_of_groups
from host_iommu.nested import IommufdError, alloc_nested, hwpt_invalidate, sl_unmap
from host_iommu.pasid import PE_AW_SHIFT, PE_P, PE_PGTT_SHIFT, PasidEntry, decode_pasid_entry
from host_iommu.pgtable import HostTableStore, PageTable, addr_mask, fl_index, fl_table
from tests.host_iommu.conftest import (
    DATA_GPA,
    IOVA,
    SID,
    Env,
    GuestTableStore,
    assert_safe,
    make_env,
)

SID_B = 0x200       # 02:00.0, a second device of the same VM
GPA_Q = 4 << 20     # data of PASID q
GPA_B = 8 << 20     # data of device b


def entry_addr(pt: PageTable, iova: int, level: int = 1) -> int:
    """Address (in ``pt``'s store) of the entry for ``iova`` at ``level``."""
    table = pt.root
    for lvl in range(pt.levels, level, -1):
        table = pt.store.read(table + 8 * int(fl_index(iova, lvl))) & addr_mask(pt.haw)
    return table + 8 * int(fl_index(iova, level))


def set_bits(pt: PageTable, iova: int, bits: int, level: int = 1) -> None:
    ea = entry_addr(pt, iova, level)
    pt.store.write(ea, pt.store.read(ea) | bits)


def three_contexts(env: Env) -> tuple[int, int]:
    """(DID a, PASID 0) is env's; add (a, PASID 1) and (DID b, PASID 0) on device SID_B,
    all mapping IOVA to different GPAs. Returns (a, b)."""
    fl_q = env.new_fl()
    fl_q.map(IOVA, GPA_Q, 2 * PAGE_SIZE)
    env.bind(SID, 1, fl_q, did=env.did)
    fl_b = env.new_fl()
    fl_b.map(IOVA, GPA_B, 2 * PAGE_SIZE)
    b = env.bind(SID_B, 0, fl_b)
    return env.did, b


# --- context and PASID fetches -----------------------------------------------------------------
def test_ctx_refs_cold_then_cached(env):
    """A cold context/PASID cache costs 4 fetches (root, context, PASID dir, PASID entry);
    the next translation of the same (sid, pasid) costs none."""
    r = env.translate(IOVA)
    assert (r["ctx_refs"], r["walk_refs"]) == (4, 24)
    r = env.translate(IOVA + PAGE_SIZE)
    assert (r["ctx_refs"], r["walk_refs"], r["fault"]) == (0, 24, 0)


# --- isolation -------------------------------------------------------------------------------
def test_iotlb_entries_are_isolated_by_did_and_pasid(env_factory):
    """An IOTLB entry of (DID a, PASID p) is never used for (a, q) or (b, p): each context
    misses on first access and gets its own HPA, then hits its own entry."""
    env = env_factory(iotlb_entries=1024, pwc=True)
    a, b = three_contexts(env)
    cases = [(SID, 0, DATA_GPA), (SID, 1, GPA_Q), (SID_B, 0, GPA_B)]
    for sid, pasid, gpa in cases:
        r = env.translate(IOVA + 0x80, sid=sid, pasid=pasid)
        assert (r["fault"], r["iotlb_hit"]) == (0, False)
        assert r["walk_refs"] > 0
        assert r["hpa"] == env.gpa_hpa(gpa + 0x80)
    for sid, pasid, gpa in cases:
        r = env.translate(IOVA + 0x100, sid=sid, pasid=pasid)
        assert (r["fault"], r["iotlb_hit"], r["walk_refs"]) == (0, True, 0)
        assert r["hpa"] == env.gpa_hpa(gpa + 0x100)
    tags = sorted((e[0], e[1]) for e in env.h.iotlb.cache.contents())
    assert tags == sorted([(a, 0), (a, 1), (b, 0)])


def test_one_batch_mixing_contexts_stays_isolated(env_factory):
    """In one batch, the same IOVA under three contexts gives three HPAs (no cross-coalescing)."""
    env = env_factory(iotlb_entries=1024)
    three_contexts(env)
    r = env.h.translate(np.array([SID, SID, SID_B, SID]), np.array([0, 1, 0, 0]),
                        np.full(4, IOVA, np.uint64), np.array([1, 1, 1, 1]))
    assert r["hpa"].tolist() == [env.gpa_hpa(DATA_GPA), env.gpa_hpa(GPA_Q),
                                 env.gpa_hpa(GPA_B), env.gpa_hpa(DATA_GPA)]
    assert r["iotlb_hit"].tolist() == [False, False, False, True]   # the 4th waited on the 1st


# --- invalidation ------------------------------------------------------------------------------
def hits(env: Env, reqs: list[tuple[int, int, int]]) -> list[bool]:
    return [bool(env.translate(iova, sid=s, pasid=p)["iotlb_hit"]) for s, p, iova in reqs]


def test_page_selective_invalidation_removes_exactly_its_page(env_factory):
    """A PASID page-selective invalidation drops (a, 0, X) only, at its effect time: before
    it the stale entry still hits; after it X walks again and the rest still hit."""
    env = env_factory(iotlb_entries=1024, pwc=True)
    a, _b = three_contexts(env)
    x, x1 = IOVA, IOVA + PAGE_SIZE
    others = [(SID, 0, x1), (SID, 1, x), (SID_B, 0, x)]
    assert hits(env, [(SID, 0, x), *others]) == [False] * 4
    h = env.h
    done, n = h.submit_qi(qi.descs(qi.piotlb_desc(a, 0, qi.QI_GRAN_PSI_PASID, addr=x, am=0),
                                   qi.wait_desc()), 1_000)
    effect = h.next_effect_ns()
    assert n == 2 and 1_000 < effect < done
    h.advance_to(effect - 1)
    assert hits(env, [(SID, 0, x)]) == [True]            # modelled latency: still stale
    h.advance_to(done)
    r = env.translate(x)
    assert (r["iotlb_hit"], r["fault"]) == (False, 0)
    assert r["walk_refs"] > 0
    assert hits(env, others) == [True, True, True]


def test_pasid_selective_invalidation_then_cleared_pte_faults(env_factory):
    """The guest clears X's PTE: X still hits until its PASID-wide invalidation takes effect;
    then X faults (0x71, first stage), other PASIDs/DIDs still hit, and no entry of
    (a, 0) is left in the IOTLB."""
    env = env_factory(iotlb_entries=1024, pwc=True)
    a, b = three_contexts(env)
    x, x2 = IOVA + 2 * PAGE_SIZE, IOVA + 3 * PAGE_SIZE
    others = [(SID, 1, IOVA), (SID_B, 0, IOVA)]
    assert hits(env, [(SID, 0, x), (SID, 0, x2), *others]) == [False] * 4
    env.fl.unmap(x, PAGE_SIZE)                          # guest CPU clears its PTE
    r = env.translate(x)
    assert (r["iotlb_hit"], r["fault"]) == (True, 0)    # stale until invalidated
    h = env.h
    done, _n = h.submit_qi(qi.descs(qi.piotlb_desc(a, 0, qi.QI_GRAN_NONG_PASID),
                                    qi.wait_desc()), 5_000)
    h.advance_to(h.next_effect_ns() - 1)
    assert env.translate(x)["iotlb_hit"]
    h.advance_to(done)
    assert {(e[0], e[1]) for e in h.iotlb.cache.contents()} == {(a, 1), (b, 0)}
    r = env.translate(x)
    assert (r["fault"], r["stage"], r["hpa"], r["iotlb_hit"]) == (
        FaultReason.FS_PAGING_ENTRY_P, Stage.FIRST, 0, False)
    assert hits(env, others) == [True, True]
    r = env.translate(x2)                              # PASID-wide: x2 walks again, maps
    assert (r["iotlb_hit"], r["fault"]) == (False, 0)
    assert r["hpa"] == env.gpa_hpa(DATA_GPA + 3 * PAGE_SIZE)


# --- hostile input -------------------------------------------------------------------------------
def translate_safe(env: Env, iova: int, **kw) -> np.void:
    r = env.h.translate(np.array([kw.get("sid", SID)]), np.array([kw.get("pasid", 0)]),
                        np.array([iova], np.uint64), np.array([kw.get("access", 1)]))
    assert_safe(env, r)
    return r[0]


def test_reserved_bit_in_first_level_entry_faults_0x72(env):
    """Bit 50 (beyond HAW) in a guest first-level PTE is reserved: fault 0x72, first stage."""
    set_bits(env.fl, IOVA, 1 << 50)
    r = translate_safe(env, IOVA)
    assert (r["fault"], r["stage"]) == (FaultReason.FS_PAGING_ENTRY_RSVD, Stage.FIRST)


def test_reserved_bit_in_second_level_entry_faults_0x0c(env):
    """Bit 62 in the second-level leaf of the data page is reserved: 0x0C, second stage."""
    set_bits(env.vm.sl, DATA_GPA, 1 << 62)
    r = translate_safe(env, IOVA)
    assert (r["fault"], r["stage"]) == (FaultReason.PAGING_ENTRY_RSVD, Stage.SECOND)


def test_non_canonical_iova_faults_0x80(env):
    """Bit 47 set with bits 63:48 clear is not canonical for 4-level paging: 0x80, no walk."""
    r = translate_safe(env, 0x0000_8000_0000_0000)
    assert (r["fault"], r["stage"], r["walk_refs"]) == (
        FaultReason.FS_NON_CANONICAL, Stage.FIRST, 0)


def test_iova_beyond_3_level_second_level_faults_0x04(env):
    """PGTT=2 over a 3-level (39-bit) second level: an address at 2^39 is beyond its width."""
    h = env.h
    sl3 = PageTable(HostTableStore(h.mem, OWNER_HOST), "sl", 3, h.p.haw)
    sl3.map(0, env.gpa_hpa(DATA_GPA), PAGE_SIZE)
    h.set_pasid_entry(SID, 4, PasidEntry(pgtt=PGTT_SL_ONLY, did=h.alloc_did(),
                                         slptr=sl3.root, sl_levels=3))
    r = translate_safe(env, 1 << 39, pasid=4)
    assert (r["fault"], r["stage"]) == (FaultReason.ADDR_BEYOND_MGAW, Stage.SECOND)
    r = translate_safe(env, 0x40, pasid=4)
    assert (r["fault"], r["hpa"]) == (0, env.gpa_hpa(DATA_GPA) + 0x40)


@pytest.mark.parametrize("flptr", [1 << 40, 1 << 60])
def test_flptr_outside_vm_gpa_space_faults_second_stage(env, flptr):
    """A first-level pointer the VM does not own faults in the second stage, with no HPA."""
    h = env.h
    h.set_pasid_entry(SID, 7, PasidEntry(pgtt=PGTT_NESTED, did=env.did, slptr=env.vm.sl.root,
                                         flptr=flptr & ~0xFFF, fl_levels=4))
    r = translate_safe(env, IOVA, pasid=7)
    assert r["stage"] == Stage.SECOND
    assert r["fault"] in (FaultReason.PAGING_ENTRY_INV, FaultReason.ADDR_BEYOND_MGAW)
    assert r["hpa"] == 0


def test_first_level_leaf_to_unbacked_gpa_faults_second_stage(env):
    """A guest PTE naming a GPA beyond its memory reaches no host frame: 0x79 (R and W of
    the second-level entry clear), second stage."""
    env.fl.map(IOVA + (1 << 30), 1 << 35, PAGE_SIZE)
    r = translate_safe(env, IOVA + (1 << 30), access=ACCESS_WRITE)
    assert (r["fault"], r["stage"]) == (FaultReason.PAGING_ENTRY_INV, Stage.SECOND)


@pytest.mark.parametrize(("words", "reason"), [
    ([PE_P | (5 << PE_PGTT_SHIFT) | (2 << PE_AW_SHIFT), 1, 0, 0, 0, 0, 0, 0], 0x5B),  # PGTT 5
    ([PE_P | (0 << PE_PGTT_SHIFT) | (2 << PE_AW_SHIFT), 1, 0, 0, 0, 0, 0, 0], 0x5B),  # PGTT 0
    ([PE_P | (3 << PE_PGTT_SHIFT) | (2 << PE_AW_SHIFT) | 0xC00, 1, 0, 0, 0, 0, 0, 0],
     0x5A),                                                                          # rsvd
    ([PE_P | (2 << PE_PGTT_SHIFT) | (7 << PE_AW_SHIFT), 1, 0, 0, 0, 0, 0, 0], 0x5B),  # bad AW
    ([PE_P | (3 << PE_PGTT_SHIFT) | (2 << PE_AW_SHIFT), 1, 0, 0, 0, 0, 0, 1], 0x5A),  # word 7
])
def test_garbage_pasid_entry_faults_0x5b(env, words, reason):
    """A PASID entry with an invalid PGTT or AW is invalid (0x5B); one with a reserved bit
    set faults 0x5A (scalable-mode fault reasons), both at the context stage."""
    env.h.sm.write_raw_pasid_entry(SID, 9, words)
    r = translate_safe(env, IOVA, pasid=9)
    assert (r["fault"], r["stage"]) == (reason, Stage.CONTEXT)


def test_non_present_pasid_entry_faults_0x59(env):
    """PASID 6 shares PASID 0's directory entry but has no table entry: 0x59."""
    r = translate_safe(env, IOVA, pasid=6)
    assert (r["fault"], r["stage"], r["ctx_refs"]) == (
        FaultReason.PASID_ENTRY_P, Stage.CONTEXT, 4)


@pytest.mark.parametrize(("sid", "reason"), [(0x0300, FaultReason.ROOT_ENTRY_P),
                                             (0x0108, FaultReason.CONTEXT_ENTRY_P)])
def test_device_without_context_faults(env, sid, reason):
    """An unattached device: no root entry for its bus (0x01) or no context entry (0x02)."""
    r = translate_safe(env, IOVA, sid=sid)
    assert (r["fault"], r["stage"]) == (reason, Stage.CONTEXT)
    assert env.h.stats.faults == 1


def test_self_referencing_first_level_terminates_inside_vm(env_factory):
    """A guest L4 entry pointing at its own table: the walk ends after 4 levels and what it
    returns (the table page itself, read as a 4-KiB leaf) is a frame of the VM."""
    env = env_factory(pwc=True)
    k = 5
    y = sum(k << (12 + 9 * i) for i in range(4))
    env.fl.store.write(env.fl.root + 8 * k, fl_table(env.fl.root))
    for access in (1, ACCESS_WRITE, 1):
        r = translate_safe(env, y + 0x18, access=access)
        assert r["fault"] == 0
        assert r["hpa"] == env.gpa_hpa(env.fl.root) + 0x18
        assert env.h.mem.owner[int(r["hpa"]) >> 12] == env.vm.vm


def test_first_level_pointing_outside_vm_faults(env):
    """A guest L4 entry pointing at a GPA the VM does not have: second-stage fault, no HPA."""
    y = 7 << 39
    env.fl.store.write(env.fl.root + 8 * 7, fl_table(1 << 40))
    r = translate_safe(env, y)
    assert (r["fault"], r["stage"]) == (FaultReason.PAGING_ENTRY_INV, Stage.SECOND)


def test_random_guest_table_garbage_is_safe(env):
    """Random words written over every guest first-level table page: every request of a
    batch faults or lands in the VM's own memory, never an exception."""
    rng = np.random.default_rng(11)
    pages = range(env.fl.root, env.store.next_gpa, PAGE_SIZE)
    for p in pages:
        vals = rng.integers(0, 1 << 63, 512, dtype=np.int64).astype(np.uint64)
        vals[rng.random(512) < 0.5] &= np.uint64(addr_mask(env.h.p.haw) | 0x7)  # plausible
        vals[rng.random(512) < 0.3] = np.uint64(0x0200_0000 | 0x27)  # table -> region start
        env.h.guest_write(1, np.arange(p, p + PAGE_SIZE, 8, dtype=np.uint64), vals)
    iova = rng.integers(0, 1 << 47, 2000, dtype=np.int64).astype(np.uint64) & ~np.uint64(7)
    r = env.h.translate(np.full(2000, SID), np.zeros(2000, np.int64), iova,
                        rng.integers(1, 3, 2000))
    assert_safe(env, r)


def test_malformed_qi_descriptor_sets_iqe_not_exception(env):
    """An unknown descriptor type submitted to the queue sets FSTS.IQE and is reported;
    later submissions are refused until IQE is cleared."""
    q = env.h.qi
    bad = np.zeros(1, dtype=qi.DESC_DTYPE)
    bad[0] = (0xF, 0, 0, 0)
    res = q.submit(qi.descs(qi.wait_desc(), bad[0]), 0)
    assert res.error is not None and res.error.code == "unknown_type"
    assert q.fsts_iqe and res.error_index == 1
    again = q.submit(qi.descs(qi.wait_desc()), 10)
    assert again.refused and again.error.code == "iqe_pending"
    q.clear_iqe()
    assert not q.submit(qi.descs(qi.wait_desc()), 20).error


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4))
def test_random_qi_descriptor_never_raises(words):
    """Any 256-bit descriptor is either processed or sets IQE; the queue never raises."""
    q = qi.InvalidationQueue(256)
    d = np.zeros(1, dtype=qi.DESC_DTYPE)
    d[0] = tuple(words)
    res = q.submit(d, 0)
    assert (res.error is None) == (res.processed == 1)
    assert q.fsts_iqe == (res.error is not None and res.error.code != "ite")


@settings(max_examples=25, deadline=None)
@given(words=st.lists(st.integers(0, 2**64 - 1), min_size=8, max_size=8),
       iova=st.integers(0, 2**64 - 1))
def test_random_pasid_entry_never_raises(words, iova):
    """Any PASID-entry contents: translate returns a record; a fault carries no HPA; an entry
    the PASID-entry decoder rejects faults at the context stage with the reason it names."""
    env = _shared_env()
    env.h.sm.write_raw_pasid_entry(SID, 10, words)
    env.h.caches.pasidc.inv_global()
    r = env.h.translate(np.array([SID]), np.array([10]), np.array([iova], np.uint64),
                        np.array([1]))
    assert r["fault"][0] == 0 or r["hpa"][0] == 0
    why = decode_pasid_entry(words)
    if isinstance(why, FaultReason):
        assert (r["fault"][0], r["stage"][0]) == (int(why), int(Stage.CONTEXT))


_ENV: list[Env] = []


def _shared_env() -> Env:
    """One env for all hypothesis examples (building one per example is slow)."""
    if not _ENV:
        _ENV.append(make_env())
    return _ENV[0]


def test_guest_write_to_new_table_page_when_slab_full():
    """A guest store that makes the 65th table page (slab growth) lands in memory."""
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=0))
    h.create_vm(1, 8 << 20)
    free = len(h.mem._free_slots)
    gpas = np.arange(1, free + 2, dtype=np.uint64) << np.uint64(12)   # one more than free
    assert h.guest_write(1, gpas, np.full(gpas.size, 0x27, np.uint64)) == 0
    assert all(h.mem.read_u64(h.gpa_to_hpa(1, int(g))) == 0x27 for g in gpas)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
@settings(max_examples=60, deadline=None)
def test_first_of_groups_matches_first_occurrence(pairs):
    """Miss coalescing groups equal keys under their first occurrence, in request order."""
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    firsts, group = first_of_groups(a, b)
    first_seen: dict[tuple[int, int], int] = {}
    for i, p in enumerate(pairs):
        first_seen.setdefault(p, i)
    assert firsts.tolist() == sorted(first_seen.values())
    assert [int(firsts[g]) for g in group] == [first_seen[p] for p in pairs]


# --- Linux 6.12 / QEMU 10 fidelity of host flushes (each test fails on the older model) ------
def nested_ats(**params) -> tuple[HostIommu, PageTable]:
    """VM 1 (8 MiB) with a first level mapping IOVA -> DATA_GPA bound nested at (SID, 0)
    and (SID, 5) of an ATS device, as the VMM's alloc_nested does (cache tags included)."""
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=64, **params))
    h.create_vm(1, 8 << 20)
    fl = PageTable(GuestTableStore(h, 1, 4 << 20, 8 << 20), "fl", 4, h.p.haw)
    fl.map(IOVA, DATA_GPA, PAGE_SIZE, max_order=0)
    for pasid in (0, 5):
        alloc_nested(h, 1, SID, pasid, fl.root, ats=True)
    return h, fl


def one(h: HostIommu, pasid: int, addr: int = IOVA) -> np.void:
    return h.translate(np.array([SID]), np.array([pasid]), np.array([addr], np.uint64),
                       np.array([1]))[0]


def captured(h: HostIommu) -> list[qi.InvCommand]:
    """Record every descriptor the host driver submits from now on, decoded."""
    seen: list[qi.InvCommand] = []
    submit = h.submit_qi

    def spy(descs, t_ns):
        seen.extend(qi.decode(d) for d in descs)
        return submit(descs, t_ns)
    h.submit_qi = spy
    return seen


def test_mamv_is_a_host_parameter_and_only_0x2_falls_back():
    """cache.c cache_tag_flush_range: a 0x2 page-selective flush falls back to
    domain-selective only when its mask exceeds cap_max_amask_val (QEMU VTD_MAMV = 18); the
    first-level path (qi_flush_piotlb) never falls back. 1024 pages need AM 10."""
    [psi] = domain_flush_descs(1, 0, 1024, ats_sids=[])
    assert qi.decode(psi).gran == qi.QI_IOTLB_GRAN_PAGE and qi.decode(psi).am == 10
    [dsi] = domain_flush_descs(1, 0, 1024, ats_sids=[], mamv=9)
    assert qi.decode(dsi).gran == qi.QI_IOTLB_GRAN_DOMAIN
    [p] = pasid_flush_descs(1, 5, 0x1000, 1 << 20, leaf=False, ats_sids=[])
    assert (qi.decode(p).gran, qi.decode(p).am) == (qi.QI_GRAN_PSI_PASID, 21)
    h = HostIommu(IommuParams(memory_mib=64, mamv=9))
    assert h.qi.mamv == 9
    assert isinstance(qi.decode(psi, h.qi.mamv), qi.DescError)


def test_second_level_change_flushes_nesting_dids_page_selective_by_gpa():
    """cache_tag_flush_range on the parent: a 0x2 PSI with the GPA range on each nesting DID
    (which drops every nested entry of the DID) plus a whole-space device-TLB flush per tag;
    no domain-selective flush."""
    h, _fl = nested_ats(devtlb_entries=64)
    for pasid in (0, 5):
        assert one(h, pasid)["fault"] == 0
    seen = captured(h)
    sl_unmap(h, 1, DATA_GPA, 1, 1000)
    iotlb = [c for c in seen if c.type == qi.QI_IOTLB_TYPE]
    assert {(c.gran, c.addr, c.am) for c in iotlb} == {(qi.QI_IOTLB_GRAN_PAGE, DATA_GPA, 0)}
    dev = sorted((c.type, c.pasid, c.addr, c.size_bytes) for c in seen
                 if c.type in qi.DEVTLB_TYPES)
    assert dev == [(qi.QI_DIOTLB_TYPE, 0, 0, 1 << 64), (qi.QI_DEIOTLB_TYPE, 5, 0, 1 << 64)]
    for pasid in (0, 5):
        r = one(h, pasid)
        assert not r["iotlb_hit"] and r["fault"] == FaultReason.PAGING_ENTRY_INV


def test_devtlb_is_filled_by_a_completion_the_iotlb_answered():
    """PCIe ATS: the device caches every translation completion, also one the IOTLB served.
    A device-TLB flush alone (0x3, as qi_flush_dev_iotlb for RID_PASID) leaves the IOTLB
    entry; the next request hits the IOTLB and refills the device-TLB."""
    h, _fl = nested_ats(devtlb_entries=64)
    assert one(h, 0)["fault"] == 0
    h.submit_qi(qi.descs(qi.dev_iotlb_desc(SID, SID, 0, 0, 1 << 64), qi.wait_desc()), 0)
    h.drain()
    assert one(h, 0)["iotlb_hit"] and not h.last_devtlb_hit[0]
    assert one(h, 0)["iotlb_hit"] and h.last_devtlb_hit[0]


def test_hwpt_invalidate_refuses_entries_as_linux_does():
    """intel_nested_cache_invalidate_user: a flag other than LEAF (-EOPNOTSUPP), an unaligned
    address, a nonzero address with npages all-ones (-EINVAL): refused, never applied."""
    h, fl = nested_ats()
    dom = alloc_nested(h, 1, SID, 7, fl.root)
    before = dict(h.qi.counts)
    for entry in [(0x1000, 1, 2), (0x1800, 1, 0), (0x1000, ALL_PAGES, 0), (0, 1, -1)]:
        with pytest.raises(IommufdError):
            hwpt_invalidate(h, dom, [(0, ALL_PAGES, 0), entry], 0)
    assert h.qi.counts == before
    _t, n = hwpt_invalidate(h, dom, [(0, ALL_PAGES, 0), (0x1000, 1, 1)], 0)
    assert n == 5   # two 0x6, each with its 0x8 (an ATS device), and the wait
