"""VFIO type1 shadowing (host_iommu/vfio.py): attach binds each device second-level only to
the container's shadow table; map pins and maps GIOVA -> HPA; unmap clears, flushes with a
page-selective IOTLB invalidation (+ device-TLB with ATS) and a wait, and the cached
translation lasts until that flush's modelled completion."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PAGE_SIZE, PGTT_SL_ONLY
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.nested import sl_unmap
from host_iommu.vfio import VfioError, vfio_attach, vfio_map, vfio_unmap

SID = 0x100
IOVA, GPA = 0x5000, 0x20000


@pytest.fixture
def host() -> HostIommu:
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=256))
    h.create_vm(1, 8 << 20)
    h.create_vm(2, 8 << 20)
    return h


def dma(h: HostIommu, iova: int, access: int = ACCESS_READ, t: int = 0, sid: int = SID):
    return h.translate(np.array([sid]), np.array([0]), np.array([iova], np.uint64),
                       np.array([access]), np.array([t]))[0]


def test_attach_binds_every_device_second_level_only(host):
    """Both devices share the container's table: a cold DMA is a 4-level second-level walk
    (PGTT=2, 4 entry reads) of GIOVA straight to HPA, cached under the container's DID, so
    the other device of the container hits that IOTLB entry."""
    dom = vfio_attach(host, 1, [SID, SID + 8])
    assert dom.sids == [SID, SID + 8]
    assert dom.did != host.vms[1].did                  # the container's own domain
    assert dma(host, IOVA)["fault"] != 0               # nothing mapped yet
    vfio_map(host, dom, IOVA, GPA, PAGE_SIZE)
    for sid, refs in ((SID, 4), (SID + 8, 0)):
        assert host.owner_of_sid[sid] == 1
        r = dma(host, IOVA + 8 * sid, sid=sid)
        assert (r["fault"], r["walk_refs"], bool(r["iotlb_hit"])) == (0, refs, refs == 0)
        assert r["hpa"] == host.gpa_to_hpa(1, GPA + 8 * sid)
    assert PGTT_SL_ONLY == 2


def test_map_pins_and_translates_to_the_vms_frame(host):
    """VFIO_IOMMU_MAP_DMA of 2 pages: 2 pins; the device reaches the VM's own frames."""
    dom = vfio_attach(host, 1, [SID])
    assert vfio_map(host, dom, IOVA, GPA, 2 * PAGE_SIZE) == 2
    for off in (0x10, PAGE_SIZE + 0x20):
        r = dma(host, IOVA + off, ACCESS_WRITE)
        assert r["fault"] == 0 and r["hpa"] == host.gpa_to_hpa(1, GPA + off)


def test_read_only_map_faults_a_write(host):
    dom = vfio_attach(host, 1, [SID])
    vfio_map(host, dom, IOVA, GPA, PAGE_SIZE, write=False)
    assert dma(host, IOVA, ACCESS_READ)["fault"] == 0
    assert dma(host, IOVA, ACCESS_WRITE)["fault"] != 0


@pytest.mark.parametrize(("iova", "gpa", "size"), [
    (IOVA + 8, GPA, PAGE_SIZE), (IOVA, GPA + 8, PAGE_SIZE), (IOVA, GPA, 100), (IOVA, GPA, 0),
    (IOVA, 8 << 20, PAGE_SIZE),                        # beyond the VM's memory: unbacked
])
def test_bad_map_is_refused_by_name(host, iova, gpa, size):
    dom = vfio_attach(host, 1, [SID])
    with pytest.raises(VfioError):
        vfio_map(host, dom, iova, gpa, size)
    assert dma(host, IOVA)["fault"] != 0


@pytest.mark.parametrize(("ats", "descs"), [(False, 2), (True, 3)])
def test_unmap_flushes_and_the_entry_lives_until_completion(host, ats, descs):
    """Unmap queues a PSI 0x2 (+0x3 with ATS) and a wait; until the IOMMU processes the
    first descriptor the cached translation still works, once the wait completed it faults."""
    dom = vfio_attach(host, 1, [SID], ats=ats)
    vfio_map(host, dom, IOVA, GPA, PAGE_SIZE)
    assert dma(host, IOVA, t=100)["fault"] == 0        # cached now
    t_done, nd = vfio_unmap(host, dom, IOVA, PAGE_SIZE, 1000)
    assert nd == descs
    effect = host.next_effect_ns()
    assert 1000 < effect <= t_done
    host.advance_to(effect - 1)
    assert dma(host, IOVA, t=effect - 1)["fault"] == 0
    host.advance_to(t_done)
    assert dma(host, IOVA, t=t_done)["fault"] != 0


def test_unmap_leaves_other_pages_mapped(host):
    dom = vfio_attach(host, 1, [SID])
    vfio_map(host, dom, IOVA, GPA, 4 * PAGE_SIZE)
    for p in range(4):
        dma(host, IOVA + p * PAGE_SIZE)
    t_done, _ = vfio_unmap(host, dom, IOVA + PAGE_SIZE, PAGE_SIZE, 0)
    host.advance_to(t_done)
    faulted = [dma(host, IOVA + p * PAGE_SIZE, t=t_done)["fault"] != 0 for p in range(4)]
    assert faulted == [False, True, False, False]


def test_two_containers_are_isolated(host):
    """VM 2's container maps the same IOVA to its own memory; each device reaches its VM."""
    d1, d2 = vfio_attach(host, 1, [SID]), vfio_attach(host, 2, [0x200])
    vfio_map(host, d1, IOVA, GPA, PAGE_SIZE)
    vfio_map(host, d2, IOVA, GPA, PAGE_SIZE)
    assert d1.did != d2.did
    assert dma(host, IOVA)["hpa"] == host.gpa_to_hpa(1, GPA)
    assert dma(host, IOVA, sid=0x200)["hpa"] == host.gpa_to_hpa(2, GPA)
    assert host.mem.owner[host.gpa_to_hpa(2, GPA) >> 12] == 2


def test_pinned_pages_cannot_be_ballooned_until_every_mapping_is_gone(host):
    """type1 pins a page once per mapping of it; while any pin is held the host refuses to
    take the page from the VM (QEMU refuses to discard RAM a VFIO device may DMA to)."""
    dom = vfio_attach(host, 1, [SID])
    vfio_map(host, dom, IOVA, GPA, PAGE_SIZE)
    vfio_map(host, dom, 0x9000, GPA, PAGE_SIZE)          # the same page, mapped twice
    frame = host.gpa_to_hpa(1, GPA)
    t = 0
    for iova in (IOVA, 0x9000):
        t, _nd, freed, refused = sl_unmap(host, 1, GPA, 1, t)
        assert (freed, refused) == (0, 1) and host.gpa_to_hpa(1, GPA) == frame
        t, _nd = vfio_unmap(host, dom, iova, PAGE_SIZE, t)
        host.advance_to(t)
    _t, _nd, freed, refused = sl_unmap(host, 1, GPA, 1, t)
    assert (freed, refused) == (1, 0) and host.gpa_to_hpa(1, GPA) is None
