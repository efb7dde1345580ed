"""Vectorized builder of a VM's whole second level: every GPA page mapped, one page size.

Writes the same VT-d second-level entries (spec 3.7, 9.8: R|W leaves, PS for 2-MiB/1-GiB
pages; R|W non-leaf entries as Linux domain_pfn_mapping/pfn_to_dma_pte) and allocates the same
table frames in the same order as mapping the VM one run at a time with the scalar
``PageTable.map``, but with numpy writes into the host memory slab: a few table allocations
and one slab assignment per level instead of a Python walk per page.

The scalar builder installs leaves in GPA order and allocates a missing table the first time
a leaf below it is installed, from the top level down; so table pages are allocated in
depth-first pre-order, each taking the lowest free frame at that moment. This module
reproduces that order exactly (tests/host_iommu/test_slbuild.py compares both builders word
by word, together with every frame's owner and kind).
"""

from __future__ import annotations

import numpy as np

from host_iommu.defs import LEVEL_STRIDE, PAGE_SHIFT, PTE_DTYPE, PTES_PER_TABLE
from host_iommu.pgtable import SL_PS, SL_R, SL_W, PageTable


def uniform_backing(hpa_of: np.ndarray, order: int) -> bool:
    """True when every GPA frame is backed and each page of ``order`` is one aligned,
    physically contiguous run: then every leaf is a page of exactly that order."""
    chunk = 1 << (LEVEL_STRIDE * order)
    if hpa_of.size == 0 or hpa_of.size % chunk or (hpa_of < 0).any():
        return False
    pages = hpa_of.reshape(-1, chunk)
    return bool((pages[:, 0] % chunk == 0).all()
                and (pages - pages[:, :1] == np.arange(chunk)).all())


def build_second_level(sl: PageTable, hpa_of: np.ndarray, order: int) -> int:
    """Map GPA frames 0..len(hpa_of) of the empty second level ``sl`` with leaves of ``order``.

    ``hpa_of`` is the HPA frame per GPA frame and must satisfy ``uniform_backing``. Tables are
    allocated through ``sl.store`` (lowest free frame first, as the scalar builder does) and
    their entries written straight into the slab. Returns the entry writes made (counted in
    ``HostMemory.pte_writes`` as the scalar path counts them).
    """
    if sl.fmt != "sl" or sl.table_pages != 1:
        raise ValueError("build_second_level needs an empty second-level table")
    if not uniform_backing(hpa_of, order):
        raise ValueError(f"GPA frames are not backed by aligned order-{order} pages")
    leaf_level = order + 1
    chunk = 1 << (LEVEL_STRIDE * order)
    n_leaves = hpa_of.size // chunk
    if n_leaves << (PAGE_SHIFT + LEVEL_STRIDE * order) > sl.limit:
        raise ValueError(f"{hpa_of.size} GPA frames exceed the {sl.width}-bit second level")
    mem = sl.store.mem
    # Entries per level, bottom up: level l holds counts[l] entries in ceil(counts[l]/512)
    # tables; the root (one table) sits at sl.levels.
    counts = {leaf_level: n_leaves}
    for level in range(leaf_level + 1, sl.levels + 1):
        counts[level] = -(-counts[level - 1] // PTES_PER_TABLE)
    # Tables below the root: (first leaf under it, -level, index at its level) sorts them in
    # the scalar builder's allocation order (pre-order: parents before children).
    order_keys = []
    for level in range(leaf_level, sl.levels):
        n_tables = counts[level + 1]
        leaves_per_table = PTES_PER_TABLE ** (level - leaf_level + 1)
        idx = np.arange(n_tables, dtype=np.int64)
        order_keys.append(np.stack([idx * leaves_per_table,
                                    np.full(n_tables, -level), idx, np.full(n_tables, level)]))
    keys = np.concatenate(order_keys, axis=1) if order_keys else np.zeros((4, 0), np.int64)
    alloc_order = np.lexsort((keys[1], keys[0]))
    frames_of = {level: np.zeros(counts[level + 1], dtype=np.int64)
                 for level in range(leaf_level, sl.levels)}
    for col in alloc_order.tolist():
        addr = sl._alloc()   # PageTable bookkeeping (_used) in the same insertion order
        frames_of[int(keys[3, col])][int(keys[2, col])] = addr >> PAGE_SHIFT
    frames_of[sl.levels] = np.array([sl.root >> PAGE_SHIFT], dtype=np.int64)

    # Leaf entries (sl_leaf(phys, order, True, True)); the obvious line would be
    # [sl_leaf(int(f) << 12, order, True, True) for f in hpa_of[::chunk]].
    leaf_bits = SL_R | SL_W | (SL_PS if order else 0)
    entries = {leaf_level: (hpa_of[::chunk].astype(PTE_DTYPE) << np.uint64(PAGE_SHIFT))
               | np.uint64(leaf_bits)}
    # Non-leaf entries (sl_table(addr) = addr | R | W) point at the next level's tables.
    for level in range(leaf_level + 1, sl.levels + 1):
        entries[level] = ((frames_of[level - 1].astype(PTE_DTYPE) << np.uint64(PAGE_SHIFT))
                          | np.uint64(SL_R | SL_W))
    writes = 0
    for level in range(leaf_level, sl.levels + 1):
        vals = entries[level]
        tables = frames_of[level]
        padded = np.zeros(tables.size * PTES_PER_TABLE, dtype=PTE_DTYPE)
        padded[:vals.size] = vals
        mem.slab[mem.slot_of[tables]] = padded.reshape(tables.size, PTES_PER_TABLE)
        used = np.minimum(vals.size - np.arange(tables.size) * PTES_PER_TABLE, PTES_PER_TABLE)
        for frame, n in zip(tables.tolist(), used.tolist(), strict=True):
            sl._used[frame << PAGE_SHIFT] = n
        writes += vals.size
    mem.pte_writes += writes
    return writes
