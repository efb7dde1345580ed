"""The vectorized second-level builder writes what the scalar PageTable.map path writes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import host_iommu.iommu as iommu_mod
from host_iommu.defs import KIND_DATA, OWNER_FREE, PAGE_SHIFT
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.memory import HostMemory, HostMemoryError
from host_iommu.pgtable import HostTableStore, PageTable
from host_iommu.slbuild import build_second_level, uniform_backing

MIB = 1 << 20


def _hosts(monkeypatch, memory_mib: int, levels: int, order: int, sizes: list[int],
           free_first: int = 0) -> tuple[HostIommu, HostIommu]:
    """Two identical hosts given the same VMs: one by the bulk builder, one by the scalar."""
    out = []
    for bulk in (True, False):
        with monkeypatch.context() as m:
            if not bulk:
                m.setattr(iommu_mod, "uniform_backing", lambda *_: False)
            h = HostIommu(IommuParams(memory_mib=memory_mib, sl_levels=levels,
                                      sl_page_order=order))
            if free_first:   # a fragmented host: a hole of every other frame
                taken = h.mem.alloc_frames(2 * free_first, 99)
                h.mem.free(taken[::2])
            for vm, size in enumerate(sizes, start=1):
                h.create_vm(vm, size)
        out.append(h)
    return out[0], out[1]


def _assert_same(a: HostIommu, b: HostIommu) -> None:
    assert np.array_equal(a.mem.owner, b.mem.owner)
    assert np.array_equal(a.mem.kind, b.mem.kind)
    tables = np.flatnonzero(a.mem.slot_of >= 0)
    assert np.array_equal(tables, np.flatnonzero(b.mem.slot_of >= 0))
    for f in tables.tolist():
        assert np.array_equal(a.mem.table(f), b.mem.table(f)), f"table frame {f:#x}"
    assert a.mem.pte_writes == b.mem.pte_writes
    assert a.mem.free_frames == b.mem.free_frames
    for vm in a.vms:
        sa, sb = a.vms[vm].sl, b.vms[vm].sl
        assert sa.root == sb.root
        assert list(sa._used.items()) == list(sb._used.items())
        assert np.array_equal(a.vms[vm].hpa_of, b.vms[vm].hpa_of)


@pytest.mark.parametrize(("levels", "order", "sizes"), [
    (4, 0, [8 * MIB]),
    (4, 0, [2 * MIB + 4096, 3 * MIB, 12 * 4096]),   # partial leaf tables, several VMs
    (3, 0, [4 * MIB]),
    (5, 0, [6 * MIB]),
    (4, 1, [6 * MIB, 2 * MIB]),                       # 2-MiB leaves
    (3, 1, [4 * MIB + 1]),                            # rounded up to whole 2-MiB pages
])
def test_bulk_builder_matches_scalar_map_word_for_word(monkeypatch, levels, order, sizes):
    a, b = _hosts(monkeypatch, 64, levels, order, sizes)
    _assert_same(a, b)
    vm = a.vms[1]
    assert vm.sl.lookup(5 << PAGE_SHIFT)[0] == int(vm.hpa_of[5]) << PAGE_SHIFT


def test_bulk_builder_matches_on_a_fragmented_host(monkeypatch):
    """Data frames interleave with holes: the table frames still come out identical."""
    a, b = _hosts(monkeypatch, 64, 4, 0, [3 * MIB, MIB], free_first=700)
    _assert_same(a, b)
    assert not uniform_backing(np.array([0, 5, 6, 7]), 1)   # not whole 2-MiB pages


def test_bulk_builder_matches_with_1g_leaves(monkeypatch):
    a, b = _hosts(monkeypatch, 3072, 4, 2, [1024 * MIB])
    _assert_same(a, b)
    assert a.vms[1].sl.table_pages == 2   # root and one level-3 table holding the 1-GiB leaf


def test_bulk_builder_then_scalar_unmap_and_map_keep_working(monkeypatch):
    """The PageTable a bulk build leaves is usable by the scalar writer (its page counts)."""
    a, b = _hosts(monkeypatch, 64, 4, 0, [4 * MIB])
    for h in (a, b):
        sl = h.vms[1].sl
        sl.unmap(0, 2 * MIB)
        sl.map(0, int(h.vms[1].hpa_of[0]) << PAGE_SHIFT, 4096)
    _assert_same(a, b)


def test_bulk_builder_refuses_what_it_cannot_build():
    mem = HostMemory(4096)
    sl = PageTable(HostTableStore(mem, 0), "sl", 4)
    with pytest.raises(ValueError, match="order-1"):
        build_second_level(sl, np.arange(100, 612, dtype=np.int64), 1)   # not 2-MiB aligned
    with pytest.raises(ValueError, match="order-0"):
        build_second_level(sl, np.array([3, -1]), 0)                       # unbacked frame
    sl.map(0, 1 << 20, 4096)
    with pytest.raises(ValueError, match="empty"):
        build_second_level(sl, np.arange(8, dtype=np.int64), 0)


# --- frame allocation: lowest free first, against a plain list reference ----------------------
class _RefFrames:
    """Free frames as a sorted Python list: alloc takes from the front."""

    def __init__(self, frames: int) -> None:
        self.free = list(range(1, frames))

    def alloc(self, n: int) -> list[int]:
        got, self.free = self.free[:n], self.free[n:]
        return got

    def contiguous(self, n: int, align: int) -> int | None:
        free = set(self.free)
        for start in range(0, max(self.free, default=0) + 1, align):
            if all(f in free for f in range(start, start + n)):
                self.free = [f for f in self.free if not start <= f < start + n]
                return start
        return None

    def release(self, frames: list[int]) -> None:
        self.free = sorted(self.free + frames)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "contig", "free"]),
                          st.integers(1, 40), st.sampled_from([1, 2, 8, 16])),
                max_size=30))
def test_frame_allocation_is_lowest_free_first(script):
    mem, ref = HostMemory(300), _RefFrames(300)
    held: list[int] = []
    for op, n, align in script:
        if op == "alloc":
            if n > len(ref.free):
                with pytest.raises(HostMemoryError):
                    mem.alloc_frames(n, 3)
                continue
            got = mem.alloc_frames(n, 3).tolist()
            assert got == ref.alloc(n)
            held += got
        elif op == "contig":
            want = ref.contiguous(n, align)
            if want is None:
                with pytest.raises(HostMemoryError):
                    mem.alloc_contiguous(n, 3, align)
                continue
            assert mem.alloc_contiguous(n, 3, align) == want
            held += list(range(want, want + n))
        elif held:
            give, held = held[::2], held[1::2]
            mem.free(give)
            ref.release(give)
        assert mem.free_frames == len(ref.free)
        assert np.flatnonzero(mem.owner == OWNER_FREE).tolist() == ref.free
    assert (mem.kind[held] == KIND_DATA).all()


def test_double_free_in_one_call_is_refused():
    mem = HostMemory(64)
    f = mem.alloc_frames(2, 3)
    with pytest.raises(HostMemoryError, match="double free"):
        mem.free([int(f[0]), int(f[0])])
    assert mem.free_frames == 63 - 2
