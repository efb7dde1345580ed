"""Host-driver invalidation helpers (host_iommu/invalidate.py): the exact descriptors Linux's
cache.c would queue for a range, and what each of them drops from the caches (VT-d spec
6.5.2.3 IOTLB, 6.5.2.4 PASID-based IOTLB, 6.5.2.5/6 device-TLB)."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu import qi
from host_iommu.defs import ACCESS_READ, PAGE_SIZE
from host_iommu.invalidate import (
    ALL_PAGES,
    domain_flush_descs,
    pasid_flush_descs,
    psi_aligned,
)
from tests.host_iommu.conftest import IOVA, SID, make_env


def decoded(descs: list[np.void]) -> list[qi.InvCommand]:
    out = [qi.decode(d) for d in descs]
    assert not any(isinstance(c, qi.DescError) for c in out), out
    return out


# --- psi_aligned: calculate_psi_aligned_address ---------------------------------------------
@pytest.mark.parametrize(("addr", "npages", "want"), [
    (0x5000, 1, (0x5000, 0)),        # one page: AM 0
    (0x4000, 4, (0x4000, 2)),        # aligned power of two
    (0x5000, 2, (0x4000, 2)),        # pages 5-6 straddle an order-1 boundary: 4 pages
    (0x7000, 2, (0x0, 4)),           # pages 7-8: the smallest aligned block is 16 pages
    (0x3000, 3, (0x0, 3)),           # pages 3-5 need pages 0-7
    (0x20_0000, 512, (0x20_0000, 9)),  # 2 MiB aligned: AM 9
])
def test_psi_aligned_covers_the_range_with_the_smallest_aligned_block(addr, npages, want):
    """The result is 2^AM-page aligned, covers every requested page, and is the smallest."""
    assert psi_aligned(addr, npages) == want
    a, am = want
    first, last = addr >> 12, (addr >> 12) + npages - 1
    assert a >> 12 <= first and last < (a >> 12) + (1 << am)
    assert a % (PAGE_SIZE << am) == 0


@pytest.mark.parametrize(("addr", "npages"), [(0, 513), (0x1000, 512), (0, 0), (0, -3)])
def test_psi_aligned_falls_back_when_too_wide_or_empty(addr, npages):
    """Wider than 2^mamv pages (or no pages): None, the caller flushes domain-wide."""
    assert psi_aligned(addr, npages, mamv=9) is None


# --- the descriptors ---------------------------------------------------------------------------
def test_pasid_psi_descriptor_bits_follow_the_spec():
    """PASID-based IOTLB PSI (6.5.2.4): qw0 = type 6 | G=11b<<4 | DID<<16 | PASID<<32;
    qw1 = addr | IH<<6 | AM. Built from the spec's bit positions, not the encoder's."""
    [d] = pasid_flush_descs(5, 0x12, 0x4000_0000, 4, leaf=True, ats_sids=[])
    assert int(d["qw0"]) == 0x6 | (3 << 4) | (5 << 16) | (0x12 << 32)
    assert int(d["qw1"]) == 0x4000_0000 | (1 << 6) | 2


def test_iotlb_psi_descriptor_bits_follow_the_spec():
    """IOTLB PSI (6.5.2.3): qw0 = type 2 | G=11b<<4 | DID<<16; qw1 = addr | AM."""
    [d] = domain_flush_descs(9, 0x8000, 2, ats_sids=[])
    assert int(d["qw0"]) == 0x2 | (3 << 4) | (9 << 16)
    assert int(d["qw1"]) == 0x8000 | 1


def test_pasid_range_with_ats_is_psi_then_pasid_devtlb():
    """A strict nested unmap with ATS: one 0x6 PSI, then one 0x8 per ATS device over the same
    aligned range (the guest's driver and the host's queue the same pair)."""
    cmds = decoded(pasid_flush_descs(3, 7, 0x5000, 2, leaf=False, ats_sids=[0x100, 0x108]))
    assert [c.type for c in cmds] == [qi.QI_EIOTLB_TYPE, qi.QI_DEIOTLB_TYPE,
                                      qi.QI_DEIOTLB_TYPE]
    p = cmds[0]
    assert (p.gran, p.did, p.pasid, p.addr, p.am, p.ih) == (
        qi.QI_GRAN_PSI_PASID, 3, 7, 0x4000, 2, False)
    assert [(c.sid, c.pasid, c.addr, c.size_bytes) for c in cmds[1:]] == [
        (0x100, 7, 0x4000, 4 * PAGE_SIZE), (0x108, 7, 0x4000, 4 * PAGE_SIZE)]


def test_pasid_everything_is_one_non_global_pasid_flush():
    """addr 0 with npages all-ones (iommufd's "everything") is one PASID-selective (G=10b)
    descriptor; the leaf hint is dropped with the range. (A wide range stays page-selective:
    the first-level path never falls back.)"""
    for addr, npages in ((0, ALL_PAGES),):
        [c] = decoded(pasid_flush_descs(3, 7, addr, npages, leaf=True, ats_sids=[]))
        assert (c.type, c.gran, c.did, c.pasid, c.ih) == (
            qi.QI_EIOTLB_TYPE, qi.QI_GRAN_NONG_PASID, 3, 7, False)


def test_domain_flush_range_and_domain_wide():
    """0x2: page-selective over a range (+0x3 per ATS device), domain-selective without one."""
    cmds = decoded(domain_flush_descs(4, 0x10_0000, 1, ats_sids=[0x200]))
    assert [(c.type, c.gran, c.did, c.addr, c.am) for c in cmds[:1]] == [
        (qi.QI_IOTLB_TYPE, qi.QI_IOTLB_GRAN_PAGE, 4, 0x10_0000, 0)]
    assert [(c.type, c.sid, c.addr, c.size_bytes) for c in cmds[1:]] == [
        (qi.QI_DIOTLB_TYPE, 0x200, 0x10_0000, PAGE_SIZE)]
    [c] = decoded(domain_flush_descs(4, None, 0, ats_sids=[]))
    assert (c.type, c.gran, c.did) == (qi.QI_IOTLB_TYPE, qi.QI_IOTLB_GRAN_DOMAIN, 4)


# --- what each descriptor drops ---------------------------------------------------------------
@pytest.fixture
def two_pasids():
    """One nested first level bound at PASIDs 0 and 1 of the same DID (IOTLB and PWCs on),
    both translated once: the IOTLB and the first-level PWC hold entries of both PASIDs."""
    env = make_env(pwc=True, iotlb_entries=1024)
    env.bind(SID, 1, env.fl, did=env.did)
    for pasid in (0, 1):
        assert env.translate(IOVA, pasid=pasid)["fault"] == 0
    return env


def submit(env, *descs: np.void) -> None:
    env.h.submit_qi(qi.descs(*descs, qi.wait_desc()), 0)
    env.h.drain()


def pwc_pasids(pwc) -> set[int]:
    return {row[1] for row in pwc.cache.contents()}


def test_pasid_selective_drops_only_that_pasid(two_pasids):
    """A PASID-selective 0x6 (G=10b) for PASID 0 drops PASID 0's IOTLB and first-level PWC
    entries only: PASID 1 of the same DID still hits, and second-level PWC entries (not
    tagged by PASID) stay."""
    env = two_pasids
    h = env.h
    sl_before = h.sl_pwc.cache.contents()
    assert pwc_pasids(h.fl_pwc) == {0, 1}
    submit(env, qi.piotlb_desc(env.did, 0, qi.QI_GRAN_NONG_PASID))
    assert pwc_pasids(h.fl_pwc) == {1}
    assert h.sl_pwc.cache.contents() == sl_before
    assert env.translate(IOVA, pasid=1)["iotlb_hit"]
    assert not env.translate(IOVA, pasid=0)["iotlb_hit"]


def test_pasid_page_selective_drops_the_page_and_its_pwc_path(two_pasids):
    """A PSI 0x6 of IOVA's page in PASID 0 (IH=0) drops that leaf and PASID 0's PWC entries
    covering it; a neighbour's IOTLB entry and PASID 1 stay. With IH=1 the PWC stays."""
    env = two_pasids
    h = env.h
    assert env.translate(IOVA + PAGE_SIZE, pasid=0)["fault"] == 0
    submit(env, qi.piotlb_desc(env.did, 0, qi.QI_GRAN_PSI_PASID, IOVA, 0, ih=True))
    assert pwc_pasids(h.fl_pwc) == {0, 1}
    assert not env.translate(IOVA, pasid=0)["iotlb_hit"]
    submit(env, qi.piotlb_desc(env.did, 0, qi.QI_GRAN_PSI_PASID, IOVA, 0))
    assert pwc_pasids(h.fl_pwc) == {1}
    assert env.translate(IOVA + PAGE_SIZE, pasid=0)["iotlb_hit"]
    assert env.translate(IOVA, pasid=1)["iotlb_hit"]


def test_domain_selective_iotlb_drops_every_pasid_of_the_domain(two_pasids):
    """A domain-selective 0x2 drops all of the DID: both PASIDs walk again."""
    env = two_pasids
    submit(env, qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, env.did))
    assert pwc_pasids(env.h.fl_pwc) == set()
    r = env.translate(IOVA, ACCESS_READ, pasid=1)
    assert not r["iotlb_hit"] and r["walk_refs"] > 0


def test_other_domain_untouched(two_pasids):
    """Invalidations name a DID: another DID's flush leaves this domain's entries alone."""
    env = two_pasids
    submit(env, qi.piotlb_desc(env.did + 7, 0, qi.QI_GRAN_NONG_PASID),
           qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, env.did + 7))
    assert pwc_pasids(env.h.fl_pwc) == {0, 1}
    assert env.translate(IOVA, pasid=0)["iotlb_hit"]
