"""VFIO type1 map/unmap of a shadow container, compiled for the epoch kernel.

What host_iommu/vfio.py's vfio_map / vfio_unmap do for QEMU's caching-mode vIOMMU
(hw/vfio/common.c vfio_iommu_map_notify -> VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA; Linux
drivers/vfio/vfio_iommu_type1.c vfio_dma_do_map / vfio_dma_do_unmap), in the common, well-formed
case, over arrays: the pins and the GPA -> HPA map of every VM (one flat buffer each, the VMs'
``VmMemory.pins`` / ``hpa_of`` being views into them), the containers' records of what is
mapped (one open-addressing table keyed by (DID, IOVA page), which every container's
``gpa_of_iova`` reads through: host_iommu/vfio.py VfioRecord), and the second-level-only
shadow tables in host memory (the slab of host_iommu/memory.py, VT-d spec 9.8 entries: R/W
leaves, R|W links, Linux drivers/iommu/intel/iommu.c __domain_mapping / dma_pte_clear_level).

The functions here never change anything before every check passed: ``map_check`` /
``unmap_check`` say whether the operation is one they take (the domain is one the kernel may
handle, the range aligned and inside the table, the GPA range backed, no IOVA page taken, every
table on the walk present, no large leaf on the way, no table page an unmap would free, room in
the record and the log); ``map_apply`` / ``unmap_apply`` then make exactly the stores
PageTable.map / PageTable.unmap make (kernels/epoch.py run_ops orchestrates; the flush goes on
the queue there). Anything else is left to the Python functions, which stay the reference.

State (``VfioArrays``):
- ``sid_dom``: int64[65536] sid -> row of ``dom`` (-1: no container the kernel may use);
- ``dom``: int64[rows, D_FIELDS] (D_*): the container's VM, DID, root table, levels, IOVA
  limit, HAW, ATS sid (-1 for none), and deltas the server folds back after each call (the
  entry writes, the pages pinned, whether an unmap ran);
- ``rk``, ``rv``, ``rm``, ``rcount``: the record (keys ``did << 46 | IOVA page``, -1 free;
  GPA frames; rm[0] the keys held; rcount[did] the keys of each container);
- ``pins`` (int32), ``hpa`` (int64), ``vmrow`` int64[vms, V_FIELDS]: (offset of the VM in
  the flat buffers or -1, its GPA frames, pages pinned here this call);
- ``log`` int64[rows, 3] (dom row, table address, change of its non-zero entries), ``meta``
  int64[META_FIELDS] (META_*): the log's rows, whether VFIO operations run here at all, the
  flush's parameters; ``owner``: the host frames' owners (memory.HostMemory.owner).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

PAGE_SHIFT = 12
L2_SHIFT = 21
SL_R, SL_W, SL_PS = 1, 2, 1 << 7
SL_PRESENT = SL_R | SL_W
KEY_SHIFT = 46          # a key: did << 46 | IOVA page (pages below 2^45: a 57-bit space)
EMPTY = -1
MAX_MAP_PAGES = 1 << 12    # a longer map goes to Python (its checks and walks are long)
OWNER_FREE = -1

# ``dom`` columns
(D_VM, D_DID, D_ROOT, D_LEVELS, D_LIMIT, D_HAW, D_ATS, D_PTE_WRITES, D_PINNED,
 D_UNMAPS) = range(10)
D_FIELDS = 10
# ``vmrow`` columns
V_OFF, V_FRAMES, V_PINNED = range(3)
V_FIELDS = 3
# ``meta``
# (META_MAMV: CAP.MAMV as domain_flush_words is given it, -1 for None: never domain-wide;
# META_WAIT0/1: qi.WAIT_WORDS, the wait qi_submit_sync appends;
# META_OPS: the operations applied here since the server last folded the deltas back)
META_LOG, META_ON, META_MAMV, META_WAIT0, META_WAIT1, META_OPS = range(6)
META_FIELDS = 6

VfioArrays = namedtuple("VfioArrays", ("sid_dom", "dom", "rk", "rv", "rm", "rcount", "pins",
                                       "hpa", "vmrow", "log", "meta", "owner"))


# --- the record: open addressing, linear probing, backward-shift deletion -------------------
@njit(cache=True, inline="always")
def rec_home(cap, key):
    h = np.uint64(key) * np.uint64(0x9E37_79B9_7F4A_7C15)
    h ^= h >> np.uint64(29)
    return np.int64(h & np.uint64(cap - 1))


@njit(cache=True, inline="always")
def rec_find(rk, key):
    """The slot holding ``key``, or -1."""
    cap = rk.shape[0]
    s = rec_home(cap, key)
    while rk[s] != EMPTY:
        if rk[s] == key:
            return s
        s = (s + 1) & (cap - 1)
    return -1


@njit(cache=True, inline="always")
def rec_put(rk, rv, rm, rcount, key, val):
    """Set key -> val (the caller made sure there is room: at most half full after)."""
    cap = rk.shape[0]
    s = rec_home(cap, key)
    while rk[s] != EMPTY:
        if rk[s] == key:
            rv[s] = val
            return
        s = (s + 1) & (cap - 1)
    rk[s] = key
    rv[s] = val
    rm[0] += 1
    rcount[key >> KEY_SHIFT] += 1


@njit(cache=True, inline="always")
def rec_del(rk, rv, rm, rcount, s):
    """Remove the key at slot ``s``: the keys after it in its probe run move back."""
    cap = rk.shape[0]
    mask = cap - 1
    rcount[rk[s] >> KEY_SHIFT] -= 1
    rm[0] -= 1
    j = s
    while True:
        j = (j + 1) & mask
        if rk[j] == EMPTY:
            break
        h = rec_home(cap, rk[j])
        # rk[j] stays where it is when its home lies cyclically in (s, j]
        stays = (s < h <= j) if s < j else (h > s or h <= j)
        if not stays:
            rk[s] = rk[j]
            rv[s] = rv[j]
            s = j
    rk[s] = EMPTY
    rv[s] = 0


@njit(cache=True)
def rec_rehash(rk, rv, nk, nv, rm, rcount):
    """Every key of (rk, rv) into the empty, larger (nk, nv); the counts are rebuilt."""
    rm[0] = 0
    rcount[:] = 0
    for s in range(rk.shape[0]):
        if rk[s] != EMPTY:
            rec_put(nk, nv, rm, rcount, rk[s], rv[s])


@njit(cache=True)
def rec_pages(rk, rv, did, out_p, out_g):
    """The (IOVA page, GPA frame) pairs of container ``did``, in slot order; returns how
    many (out_* hold rcount[did] at least)."""
    n = 0
    for s in range(rk.shape[0]):
        k = rk[s]
        if k != EMPTY and (k >> KEY_SHIFT) == did:
            out_p[n] = k & ((np.int64(1) << KEY_SHIFT) - 1)
            out_g[n] = rv[s]
            n += 1
    return n


@njit(cache=True)
def rec_pages_in(rk, rv, did, p0, n, out_p):
    """The IOVA pages of container ``did`` in [p0, p0 + n), ascending, into ``out_p``;
    returns how many. Probes each page of the range when it is shorter than the record,
    else scans the record (then sorts): O(min(n, capacity)), not a scan per call."""
    cap = rk.shape[0]
    hi = did << KEY_SHIFT
    k = 0
    if n <= cap:
        for p in range(p0, p0 + n):
            if rec_find(rk, hi | p) >= 0:
                out_p[k] = p
                k += 1
        return k
    mask = (np.int64(1) << KEY_SHIFT) - 1
    for s in range(cap):
        key = rk[s]
        if key != EMPTY and (key >> KEY_SHIFT) == did and p0 <= (key & mask) < p0 + n:
            out_p[k] = key & mask
            k += 1
    out_p[:k].sort()
    return k


@njit(cache=True)
def rec_any_in(rk, did, p0, n):
    """Whether container ``did`` maps any IOVA page in [p0, p0 + n): rec_pages_in's probe
    or scan, stopping at the first."""
    cap = rk.shape[0]
    hi = did << KEY_SHIFT
    if n <= cap:
        for p in range(p0, p0 + n):  # noqa: SIM110 (a compiled loop, not a generator)
            if rec_find(rk, hi | p) >= 0:
                return True
        return False
    mask = (np.int64(1) << KEY_SHIFT) - 1
    for s in range(cap):
        key = rk[s]
        if key != EMPTY and (key >> KEY_SHIFT) == did and p0 <= (key & mask) < p0 + n:
            return True
    return False


@njit(cache=True)
def rec_put_run(rk, rv, rm, rcount, did, p0, f0, n):
    """Keys did << 46 | (p0 + i) -> f0 + i for i in 0..n-1, in that order (rec_put each; the
    caller made room for n more)."""
    hi = did << KEY_SHIFT
    for i in range(n):
        rec_put(rk, rv, rm, rcount, hi | (p0 + i), f0 + i)


# --- host memory as memory.HostMemory.read_u64 reads it ------------------------------------
@njit(cache=True, inline="always")
def _read(slab, slot_of, addr):
    frame = addr >> PAGE_SHIFT
    if frame < 0 or frame >= slot_of.shape[0]:
        return np.int64(0)
    slot = slot_of[frame]
    if slot < 0:
        return np.int64(0)
    return np.int64(slab[slot, (addr >> 3) & 511])


@njit(cache=True, inline="always")
def _level1(vf, d, iova, slab, slot_of):
    """The level-1 table on ``iova``'s walk: its address; 0 when an entry on the way is not
    present (nothing mapped there); -1 when a large leaf is on the way (a split: Python)."""
    table = vf.dom[d, D_ROOT]
    amask = ((np.int64(1) << vf.dom[d, D_HAW]) - 1) & ~np.int64(4095)
    for level in range(vf.dom[d, D_LEVELS], 1, -1):
        shift = PAGE_SHIFT + 9 * (level - 1)
        entry = _read(slab, slot_of, table + 8 * ((iova >> shift) & 511))
        if entry & SL_PRESENT == 0:
            return np.int64(0)
        if entry & SL_PS:
            return np.int64(-1)
        table = entry & amask
    return table


@njit(cache=True, inline="always")
def _writable_table(table, slot_of, owner):
    """Whether a store into ``table`` goes where HostMemory.write_u64 puts it with no new
    slot made: an allocated frame holding a table page."""
    frame = table >> PAGE_SHIFT
    return (0 <= frame < slot_of.shape[0] and owner[frame] != OWNER_FREE
            and slot_of[frame] >= 0)


# --- VFIO_IOMMU_MAP_DMA --------------------------------------------------------------------
@njit(cache=True, inline="always")
def map_check(vf, d, vm, iova, gpa, size, slab, slot_of):
    """The pages vfio_map would pin for this map, if the kernel may make it here: the
    checks vfio_map makes (raising nothing), PageTable.map's (the host frames inside the
    HAW), every level-1 table of the range present (no table to allocate, no large leaf to
    split), room in the record and the log. -1 otherwise (Python maps it)."""
    dom = vf.dom
    if iova < 0 or gpa < 0 or size <= 0 or (iova | gpa | size) & 4095:
        return -1
    if iova >= dom[d, D_LIMIT] or size > dom[d, D_LIMIT] - iova:
        return -1
    n = size >> PAGE_SHIFT
    if n > MAX_MAP_PAGES:
        return -1
    off, frames = vf.vmrow[vm, V_OFF], vf.vmrow[vm, V_FRAMES]
    f0 = gpa >> PAGE_SHIFT
    if off < 0 or f0 + n > frames:
        return -1
    top = np.int64(1) << (dom[d, D_HAW] - PAGE_SHIFT)
    for q in range(n):
        hf = vf.hpa[off + f0 + q]
        if hf < 0 or hf >= top:
            return -1
    did = dom[d, D_DID]
    p0 = iova >> PAGE_SHIFT
    for q in range(n):
        if rec_find(vf.rk, (did << KEY_SHIFT) | (p0 + q)) >= 0:
            return -1                     # -EEXIST: Python raises and counts it
    if 2 * (vf.rm[0] + n) > vf.rk.shape[0]:
        return -1
    regions = ((iova + size - 1) >> L2_SHIFT) - (iova >> L2_SHIFT) + 1
    if vf.meta[META_LOG] + regions > vf.log.shape[0]:
        return -1
    a = iova
    end = iova + size
    while a < end:
        table = _level1(vf, d, a, slab, slot_of)
        if table <= 0 or not _writable_table(table, slot_of, vf.owner):
            return -1
        a = ((a >> L2_SHIFT) + 1) << L2_SHIFT
    return n


@njit(cache=True, inline="always")
def map_apply(vf, d, vm, iova, gpa, n, write, slab, slot_of):
    """vfio_map after map_check passed: pin, record, install the leaves as
    PageTable._install_4k_run does (R, W if writable), log each level-1 table's change of
    non-zero entries. Returns the entry writes (``n``)."""
    dom = vf.dom
    off = vf.vmrow[vm, V_OFF]
    f0 = gpa >> PAGE_SHIFT
    did = dom[d, D_DID]
    p0 = iova >> PAGE_SHIFT
    for q in range(n):
        vf.pins[off + f0 + q] += 1
        rec_put(vf.rk, vf.rv, vf.rm, vf.rcount, (did << KEY_SHIFT) | (p0 + q), f0 + q)
    bits = SL_R | (SL_W if write else 0)
    q = 0
    while q < n:
        a = iova + (q << PAGE_SHIFT)
        table = _level1(vf, d, a, slab, slot_of)
        slot = slot_of[table >> PAGE_SHIFT]
        idx = (a >> PAGE_SHIFT) & 511
        delta = 0
        while q < n and idx < 512:
            old = slab[slot, idx]
            slab[slot, idx] = np.uint64((vf.hpa[off + f0 + q] << PAGE_SHIFT) | bits)
            if old == 0:
                delta += 1
            idx += 1
            q += 1
        _log(vf, d, table, delta)
    dom[d, D_PTE_WRITES] += n
    dom[d, D_PINNED] += n
    vf.vmrow[vm, V_PINNED] += n
    vf.meta[META_OPS] += 1
    return n


@njit(cache=True, inline="always")
def _log(vf, d, table, delta):
    r = vf.meta[META_LOG]
    if r > 0 and vf.log[r - 1, 0] == d and vf.log[r - 1, 1] == table:
        vf.log[r - 1, 2] += delta
        return
    vf.log[r, 0], vf.log[r, 1], vf.log[r, 2] = d, table, delta
    vf.meta[META_LOG] = r + 1


# --- VFIO_IOMMU_UNMAP_DMA ------------------------------------------------------------------
@njit(cache=True, inline="always")
def unmap_check(vf, d, iova, size, slab, slot_of):
    """The pages of the range, if the kernel may unmap it here: vfio_unmap's checks, a
    range that covers no whole 2-MiB region (so PageTable.unmap frees no table page and
    descends only: no entry above level 1 changes), no large leaf on the walk, the level-1
    tables it clears writable, room in the log. -1 otherwise (Python unmaps it)."""
    dom = vf.dom
    if iova < 0 or size <= 0 or (iova | size) & 4095:
        return -1
    if iova >= dom[d, D_LIMIT] or size > dom[d, D_LIMIT] - iova:
        return -1
    end = iova + size
    first_block = ((iova + (1 << L2_SHIFT) - 1) >> L2_SHIFT) << L2_SHIFT
    if first_block + (1 << L2_SHIFT) <= end:
        return -1
    if vf.meta[META_LOG] + 2 > vf.log.shape[0]:
        return -1
    a = iova
    while a < end:
        table = _level1(vf, d, a, slab, slot_of)
        if table < 0:
            return -1
        if table > 0:
            r_end = min(end, ((a >> L2_SHIFT) + 1) << L2_SHIFT)
            slot = -1
            frame = table >> PAGE_SHIFT
            if 0 <= frame < slot_of.shape[0]:
                slot = slot_of[frame]
            if slot >= 0:
                for idx in range((a >> PAGE_SHIFT) & 511,
                                 (((r_end - 1) >> PAGE_SHIFT) & 511) + 1):
                    if slab[slot, idx] & np.uint64(SL_PRESENT):
                        if not _writable_table(table, slot_of, vf.owner):
                            return -1
                        break
        a = ((a >> L2_SHIFT) + 1) << L2_SHIFT
    return size >> PAGE_SHIFT


@njit(cache=True, inline="always")
def unmap_apply(vf, d, vm, iova, n, slab, slot_of):
    """vfio_unmap's record, pins and table stores after unmap_check passed: every mapped
    IOVA page of the range leaves the record and unpins its GPA frame; the present level-1
    entries of the range are cleared, in IOVA order (PageTable._unmap_4k_run / _unmap).
    Returns the entry writes."""
    dom = vf.dom
    did = dom[d, D_DID]
    off = vf.vmrow[vm, V_OFF]
    p0 = iova >> PAGE_SHIFT
    if vf.rcount[did] > 0:
        for q in range(n):
            s = rec_find(vf.rk, (did << KEY_SHIFT) | (p0 + q))
            if s >= 0:
                g = vf.rv[s]
                rec_del(vf.rk, vf.rv, vf.rm, vf.rcount, s)
                vf.pins[off + g] -= 1
    writes = 0
    end = iova + (n << PAGE_SHIFT)
    a = iova
    while a < end:
        r_end = min(end, ((a >> L2_SHIFT) + 1) << L2_SHIFT)
        table = _level1(vf, d, a, slab, slot_of)
        if table > 0:
            frame = table >> PAGE_SHIFT
            slot = -1
            if 0 <= frame < slot_of.shape[0]:
                slot = slot_of[frame]
            if slot >= 0:
                cleared = 0
                for idx in range((a >> PAGE_SHIFT) & 511,
                                 (((r_end - 1) >> PAGE_SHIFT) & 511) + 1):
                    if slab[slot, idx] & np.uint64(SL_PRESENT):
                        slab[slot, idx] = 0
                        cleared += 1
                if cleared:
                    _log(vf, d, table, -cleared)
                    writes += cleared
        a = r_end
    dom[d, D_PTE_WRITES] += writes
    dom[d, D_UNMAPS] += 1
    vf.meta[META_OPS] += 1
    return writes


# --- the flush vfio_unmap queues (invalidate.py domain_flush_words, then qi.wait_words) ----
QI_IOTLB_TYPE, QI_DIOTLB_TYPE, QI_IWD_TYPE = 0x2, 0x3, 0x5
QI_GRAN_SHIFT, QI_DID_SHIFT = 4, 16
QI_IOTLB_GRAN_DOMAIN, QI_IOTLB_GRAN_PAGE = 2, 3
QI_IH = 1 << 6
QI_DEV_IOTLB_SID_SHIFT = 32
QI_PFSID_LO_SHIFT, QI_PFSID_HI_SHIFT = 12, 52
QI_DEV_IOTLB_SIZE = 1
MAX_AGAW_PFN_WIDTH = 52


@njit(cache=True, inline="always")
def _bit_length(x):
    b = 0
    while x > 0:
        x >>= 1
        b += 1
    return b


@njit(cache=True, inline="always")
def _psi_am(start, npages):
    """invalidate.psi_aligned's mask for pages [start, start + npages), start >= 0."""
    end = start + npages - 1
    am = max(_bit_length(npages - 1), _bit_length(start ^ end))
    return min(am, MAX_AGAW_PFN_WIDTH)


@njit(cache=True, inline="always")
def flush_words(vf, d, iova, n, out):
    """The descriptors vfio_unmap submits for an unmap that freed no table page (IH set):
    domain_flush_words(did, iova, n, ats_sids, mamv, ih=True) and the wait, as uint64
    words into ``out``; returns how many descriptors."""
    did = vf.dom[d, D_DID]
    start = iova >> PAGE_SHIFT
    am = _psi_am(start, n)
    mamv = vf.meta[META_MAMV]
    if mamv >= 0 and am > mamv:
        out[0] = np.uint64(QI_IOTLB_TYPE | (QI_IOTLB_GRAN_DOMAIN << QI_GRAN_SHIFT)
                           | (did << QI_DID_SHIFT))
        out[1] = np.uint64(0)
    else:
        out[0] = np.uint64(QI_IOTLB_TYPE | (QI_IOTLB_GRAN_PAGE << QI_GRAN_SHIFT)
                           | (did << QI_DID_SHIFT))
        out[1] = np.uint64((((start >> am) << am) << PAGE_SHIFT) | QI_IH | am)
    out[2] = np.uint64(0)
    out[3] = np.uint64(0)
    nd = 1
    sid = vf.dom[d, D_ATS]
    if sid >= 0:     # devtlb_flush_words(sid, NO_PASID, iova, n): no MAMV for a device-TLB
        am = _psi_am(start, n)
        a = ((start >> am) << am) << PAGE_SHIFT
        qw0 = (np.uint64(QI_DIOTLB_TYPE) | (np.uint64(sid) << np.uint64(QI_DEV_IOTLB_SID_SHIFT))
               | (np.uint64(sid & 0xF) << np.uint64(QI_PFSID_LO_SHIFT))
               | (np.uint64(sid >> 4) << np.uint64(QI_PFSID_HI_SHIFT)))
        if am == 0:
            qw1 = np.uint64(a)
        else:
            size = np.uint64(1) << np.uint64(am + PAGE_SHIFT)
            qw1 = ((np.uint64(a) | ((size >> np.uint64(1)) - np.uint64(1)))
                   & ~np.uint64(4095)) | np.uint64(QI_DEV_IOTLB_SIZE)
        out[4], out[5], out[6], out[7] = qw0, qw1, np.uint64(0), np.uint64(0)
        nd = 2
    b = 4 * nd
    out[b], out[b + 1] = np.uint64(vf.meta[META_WAIT0]), np.uint64(vf.meta[META_WAIT1])
    out[b + 2], out[b + 3] = np.uint64(0), np.uint64(0)
    return nd + 1
