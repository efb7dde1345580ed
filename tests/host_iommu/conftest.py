"""Fixtures for walk and HostIommu tests: a host, a VM, and guest first-level tables in VM memory.

Guest first-level tables live in the VM's own memory and are addressed by GPA (the nested
design of the RFC "Use 1st-level for DMA remapping in guest"; Linux pasid_pte_config_nestd):
``GuestTableStore`` is a TableStore whose addresses are GPAs, read through the VM's GPA->HPA
map and written with ``HostIommu.guest_write`` (guest CPU stores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from host_iommu.defs import ACCESS_READ, PAGE_SIZE, PGTT_NESTED, RESULT_DTYPE
from host_iommu.iommu import HostIommu, IommuParams, VmMemory
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import PageTable

VM = 1
SID = 0x100                    # 01:00.0
IOVA = 0x1000_0000             # first mapped IOVA of the default first level
DATA_GPA = 0x10_0000           # GPA the default first level maps IOVA to (1 MiB)
TABLE_GPA = 32 << 20           # guest table pages are allocated from here
MAPPED_PAGES = 64


class GuestTableStore:
    """A TableStore in a VM's memory: addresses are GPAs, pages come from a bump allocator."""

    def __init__(self, h: HostIommu, vm: int, base_gpa: int, limit_gpa: int) -> None:
        self.h, self.vm = h, vm
        self.next_gpa, self.limit_gpa = base_gpa, limit_gpa
        self.freed: list[int] = []

    def alloc_table(self) -> int:
        if self.next_gpa + PAGE_SIZE > self.limit_gpa:
            raise MemoryError(f"guest table region of VM {self.vm} exhausted")
        gpa = self.next_gpa
        self.next_gpa += PAGE_SIZE
        # A fresh table page must read as zeros even if the region was used before.
        self.h.guest_write(self.vm, np.arange(gpa, gpa + PAGE_SIZE, 8, dtype=np.uint64),
                           np.zeros(PAGE_SIZE // 8, dtype=np.uint64))
        return gpa

    def free_table(self, addr: int) -> None:
        self.freed.append(addr)

    def read(self, addr: int) -> int:
        hpa = self.h.gpa_to_hpa(self.vm, addr)
        return 0 if hpa is None else self.h.mem.read_u64(hpa)

    def write(self, addr: int, value: int) -> None:
        self.h.guest_write(self.vm, np.array([addr], np.uint64), np.array([value], np.uint64))

    def hpa(self, gpa: int) -> int:
        hpa = self.h.gpa_to_hpa(self.vm, gpa)
        assert hpa is not None, f"GPA {gpa:#x} not backed"
        return hpa


@dataclass
class Env:
    """One host with VM 1, device SID attached to it and PASID 0 bound nested to ``fl``."""

    h: HostIommu
    vm: VmMemory
    store: GuestTableStore
    fl: PageTable
    did: int
    sid: int = SID
    pasid: int = 0

    def translate(self, iova: int, access: int = ACCESS_READ, sid: int | None = None,
                  pasid: int | None = None) -> np.void:
        """Translate one request; returns its RESULT_DTYPE row."""
        r = self.h.translate(np.array([self.sid if sid is None else sid]),
                             np.array([self.pasid if pasid is None else pasid]),
                             np.array([iova], np.uint64), np.array([access]))
        assert r.dtype == RESULT_DTYPE
        return r[0]

    def gpa_hpa(self, gpa: int) -> int:
        return self.store.hpa(gpa)

    def new_fl(self, levels: int = 4) -> PageTable:
        return PageTable(self.store, "fl", levels, self.h.p.haw)

    def bind(self, sid: int, pasid: int, fl: PageTable, did: int | None = None) -> int:
        """Bind ``fl`` nested over the VM's second level at (sid, pasid); returns the DID."""
        if sid not in self.h.owner_of_sid:
            self.h.attach_device(sid, self.vm.vm)
        did = self.h.alloc_did() if did is None else did
        self.h.set_pasid_entry(sid, pasid, PasidEntry(
            pgtt=PGTT_NESTED, did=did, slptr=self.vm.sl.root, sl_levels=self.vm.sl.levels,
            flptr=fl.root, fl_levels=fl.levels))
        return did


def make_env(*, iotlb_entries: int = 0, pwc: bool = False, fl_levels: int = 4,
             sl_page_order: int = 0, memory_mib: int = 256, vm_bytes: int = 64 << 20,
             table_gpa: int = TABLE_GPA) -> Env:
    """A host and VM 1 with a nested binding of a ``fl_levels`` first level at (SID, 0).

    The first level maps MAPPED_PAGES 4-KiB pages: IOVA + i*4K -> DATA_GPA + i*4K.
    """
    h = HostIommu(IommuParams(memory_mib=memory_mib, iotlb_entries=iotlb_entries,
                              page_walk_cache=pwc, sl_page_order=sl_page_order))
    vm = h.create_vm(VM, vm_bytes, sl_page_order=sl_page_order)
    store = GuestTableStore(h, VM, table_gpa, vm_bytes)
    fl = PageTable(store, "fl", fl_levels, h.p.haw)
    fl.map(IOVA, DATA_GPA, MAPPED_PAGES * PAGE_SIZE, max_order=0)
    env = Env(h, vm, store, fl, did=0)
    env.did = env.bind(SID, 0, fl)
    return env


def assert_safe(env: Env, res: np.ndarray) -> None:
    """Hostile-input invariant: each request faulted, or its HPA is a frame of the VM."""
    ok = res["fault"] == 0
    frames = (res["hpa"][ok] >> np.uint64(12)).astype(np.int64)
    assert np.all(frames < env.h.mem.frames)
    assert np.all(env.h.mem.owner[frames] == env.vm.vm)
    assert np.all(res["hpa"][~ok] == 0)


@pytest.fixture
def env_factory() -> Callable[..., Env]:
    return make_env


@pytest.fixture
def env() -> Env:
    """Caches off (IOTLB 0 entries, no PWCs): every translation walks."""
    return make_env()
