"""The guest's DMA API and IOMMU driver as numba functions, for the whole-VM-epoch kernel.

What vm_agent/agent.py (VmAgent.dma_map / dma_unmap), vm_agent/dma.py (DmaApi), vm_agent/
viommu.py and vm_agent/vmm.py (PassthroughVmm, NestedVmm, ShadowVmm) do for a guest's one device
domain, compiled: Linux drivers/iommu/dma-iommu.c (iommu_dma_map_page: iommu_dma_alloc_iova
then iommu_map; __iommu_dma_unmap: iommu_unmap, then a strict invalidation with a wait, or
queue_iova onto the flush queue, whose fq_flush_iotlb is one PASID-wide invalidation and
fq_flush_timeout its timer) over drivers/iommu/intel/iommu.c's first-level tables, and QEMU's
nested intel-iommu: the guest's tail write traps (a VM exit) and each PASID-based IOTLB
invalidation it fetches (VT-d spec 6.5.2.4) is forwarded as one IOMMU_HWPT_INVALIDATE, an
OP_HWPT_INV row of the op log. Pass-through (no vIOMMU) is dma-direct: the DMA address is
the GPA. Shadow is caching mode (CAP.CM, VT-d spec 6.1) over second-level tables, strict
whatever the policy (Linux forces it): every map is followed by a page-selective IOTLB
invalidation of its range (iommu.c iotlb_sync_map) and every unmap by one with the IH hint
(a domain-selective one past CAP.MAMV), each trapping to the VMM, which syncs its shadow
over the range as QEMU's vtd_sync_shadow_page_table_range does (``_shadow_walk``: the
vtd_page_walk of PageTable.walk_range, each leaf or empty entry filtered through the shadow
as vtd_page_walk_one, one OP_VFIO_MAP / OP_VFIO_UNMAP row per VFIO ioctl).

The Python classes are the reference. These functions make the same calls in the same order
on array state: the IOVA allocator of vm_agent/kernels/iova.py, the first-level table slab
of vm_agent/kernels/pgtable.py, the flush queue of vm_agent/kernels/flushq.py, the guest's
page allocator and op log of vm_agent/kernels/guest.py (``g``), and ``DomainArrays`` (``d``)
for the rest of DmaApi's bookkeeping:

- ``pg``: an open-addressing hash table (linear probing, backward-shift deletion) keyed by
  IOVA page, holding what DmaApi keeps per page in four dicts and sets: mapped
  (``mapped_pages``), the unmap id that last covered it (``unmap_id_of``), the pages of the
  mapping starting there (``IommuDomain.mappings``) and when its IOVA was last freed
  (``freed_ns``); an entry with none of them is removed, as the dicts would drop the key;
- ``tg``: the same kind of table from unmap id to the pages it still tags (``pages_tagged``);
- ``retired``: the ids retired since the last ``end_epoch`` (``DmaApi.retired``);
- ``made``: VmAgent._made as (table page, store sequence number) pairs in insertion order;
- ``sh``, ``sr`` (shadow): ShadowVmm's iova_tree as a hash table of IOVA page -> (GPA page,
  writable), and its pages counted per 2-MiB region (an empty entry above level 1 removes a
  whole region); ``ws``: the walk's stack;
- ``ctl``: the scalars (D_*), ``costs``: the CostModel fields used (K_*).

So stats, op-log rows (their order, times and values), IOVAs, table stores and flush-queue
behaviour are the same value for value (tests/vm_agent/test_kernel_dmaapi.py runs both side
by side). What is rare and not modelled here is refused BEFORE anything changes, with
``g.ctl[C_ERR] = E_DMA`` and a reason R_* in ``C_ERR_ARG``: a mapping of more than
MAX_PAGES pages (whose unmap could free a table page), a CPU outside the rcache, an array
short of room (``room_ok`` / ``grown`` prevent it). IOVA exhaustion is E_IOVA, as DmaError.
A shadow walk that would meet an entry leading to a page that is no table, or shadow more
pages than a call's room, is refused (R_WALK) after the table stores: never, with the
tables the driver builds and the shadow that strict caching mode keeps equal to them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from host_iommu.defs import NO_PASID, PAGE_SHIFT, PAGE_SIZE
from host_iommu.nested import IOMMU_VTD_INV_FLAGS_LEAF
from host_iommu.pgtable import FL_A, FL_D, FL_P, FL_RW, FL_US, SL_R, SL_W
from host_iommu.protocol import (
    MAX_RETIRE_RUN,
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_UNMAP_RET,
    OP_UNMAP_RETIRE,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
)
from host_iommu.qi import QI_MAMV_DEFAULT
from vm_agent.iova import IOVA_ANCHOR
from vm_agent.kernels import flushq as kfq
from vm_agent.kernels import iova as kiova
from vm_agent.kernels import pgtable as kpg
from vm_agent.kernels.guest import (
    C_ERR,
    C_ERR_ARG,
    C_FRAMES,
    C_LOG_N,
    C_NEXT_FRAME,
    C_SEQ0,
    C_USED_PAGES,
    E_DMA,
    E_IOVA,
    E_MEM,
    L_A0,
    L_T_NS,
    S_CPU_BUSY_NS,
    S_DMA_API_ERRORS,
    S_INV_DESCRIPTORS,
    S_IOMMU_MAP_EVENTS,
    S_LAZY_FLUSHES,
    S_MAPS,
    S_PTE_WRITES,
    S_UNMAPS,
    S_VM_EXITS,
    S_VMM_INVALIDATE_CALLS,
    S_VMM_MAP_CALLS,
    S_VMM_UNMAP_CALLS,
    log_row,
)

DIRECT_CALL_NS = 40            # vm_agent/dma.py: dma-direct map/unmap
DMA_TO_DEVICE = 1              # workloads/base.py: the device reads guest memory
DMA_BIT_MASK_32_PFN = ((1 << 32) - 1) >> PAGE_SHIFT
TABLE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)   # a first-level entry's bits 51:12
MAX_AGAW_PFN_WIDTH = 64 - PAGE_SHIFT                   # host_iommu/invalidate.py

# --- d.ctl slots
D_MODE = 0            # MODE_PASSTHROUGH or MODE_NESTED
D_TIMER_NS = 1        # a flush-queue timer dma_unmap armed: its deadline (-1: none)
D_TIMER_CPU = 2       # ... and the vCPU whose unmap armed it
D_LAST_UNMAPPED = 3   # DmaApi.last_unmapped of the domain (-1: none yet)
D_NEXT_UNMAP_ID = 4   # DmaApi.next_unmap_id
D_STALE_BOUND = 5     # DmaApi.stale_bound_ns
D_PCI32 = 6           # IommuDomain.pci_32bit_workaround
D_LIMIT_PFN = 7       # IommuDomain.limit_pfn
D_SID = 8             # the device's requester id
D_PASID = 9           # the domain's PASID (NO_PASID: the device's PASID 0)
D_DID = 10            # the guest's domain id in its descriptors
D_ATS = 11            # 1: device-TLB invalidations follow each flush
D_LAZY = 12           # 1: the flush queue (fq) is used; 0: strict
D_PG_N = 13           # entries in pg
D_TG_N = 14           # entries in tg
D_RETIRED_N = 15      # ids in retired
D_MADE_N = 16         # pairs in made
D_FREE_ROWS_N = 17    # slab rows in rows_free (GuestTableStore._free_rows)
D_NEXT_ROW = 18       # GuestTableStore._next_row
D_LEVELS = 19         # the first-level table's levels
D_SH_N = 20           # (shadow) pages in sh: what the VMM shadowed
D_SR_N = 21           # (shadow) 2-MiB regions in sr
D_LEN = 22

MODE_PASSTHROUGH = 0
MODE_NESTED = 1
MODE_SHADOW = 2

# --- d.costs slots (host_iommu.costs.CostModel fields)
COST_FIELDS = ("dma_call_ns", "pte_write_ns", "iova_alloc_fast_ns", "iova_alloc_slow_ns",
               "iova_free_ns", "qi_submit_ns", "vm_exit_ns", "vmm_trap_ns",
               "hwpt_invalidate_ns", "qi_desc_ns", "qi_wait_ns", "vmm_pte_read_ns",
               "vfio_map_ns", "pin_page_ns", "vfio_unmap_ns")
(K_DMA_CALL, K_PTE_WRITE, K_ALLOC_FAST, K_ALLOC_SLOW, K_IOVA_FREE, K_QI_SUBMIT, K_VM_EXIT,
 K_VMM_TRAP, K_HWPT_INV, K_QI_DESC, K_QI_WAIT, K_PTE_READ, K_VFIO_MAP, K_PIN_PAGE,
 K_VFIO_UNMAP) = range(len(COST_FIELDS))

# --- pg columns (key -1: an empty slot)
P_KEY, P_MAPPED, P_TAG, P_MPAGES, P_FREED = range(5)
PG_COLS = 5
TG_COLS = 2           # unmap id, pages it tags
SH_COLS = 3           # (shadow) IOVA page, GPA page, writable: ShadowVmm's iova_tree
SR_COLS = 2           # (shadow) 2-MiB region (IOVA page >> 9), pages of sh inside it
WS_LEN = 8 * 5        # (shadow) the walk's stack: 8 words a level, 5 levels at most

# --- refusals (g.ctl[C_ERR_ARG] with C_ERR = E_DMA), nothing changed
R_PAGES = 1001        # a mapping of no page or of more than MAX_PAGES
R_CPU = 1002          # a CPU outside the rcache's (IovaError on the Python path)
R_ROOM = 1003         # an array of g or d is short of room: grow (``grown``) and call again
R_WALK = 1004         # the table kernel left a walk to PageTable's Python (never expected)

MAX_PAGES = 64        # pages one map or unmap may cover here (a table frees at 512)
MAX_MAP_ROWS = MAX_PAGES + 2 * 4 + 2     # leaves, tables linked on two 2-MiB runs (5 levels)
MAX_UNMAP_ROWS = MAX_PAGES + 3           # cleared leaves, HWPT range, HWPT all, UNMAP_RET
MAX_TIMER_ROWS = 1                       # fq_timer: one PASID-wide HWPT row
_SLACK = 4 * MAX_PAGES                   # room ``grown`` leaves in every array


class DomainArrays(NamedTuple):
    """One device's DMA domain and the DMA API's bookkeeping for it (module docstring)."""

    ctl: np.ndarray        # int64[D_LEN]
    costs: np.ndarray      # int64[len(COST_FIELDS)]
    tree: np.ndarray       # kernels/iova.py tree
    ist: np.ndarray        # kernels/iova.py st
    mag: np.ndarray        # kernels/iova.py magazines
    pt: np.ndarray         # kernels/pgtable.py state of the first-level table
    rows_free: np.ndarray  # int64[cap]: free slab rows, a stack
    fq: np.ndarray         # kernels/flushq.py st (lazy), else int64[1]
    pg: np.ndarray         # int64[cap, PG_COLS]: per IOVA page
    tg: np.ndarray         # int64[cap, TG_COLS]: per unmap id
    retired: np.ndarray    # int64[cap]
    made: np.ndarray       # int64[cap, 2]: (table page, sequence number)
    sh: np.ndarray         # int64[cap, SH_COLS]: (shadow) per shadowed IOVA page
    sr: np.ndarray         # int64[cap, SR_COLS]: (shadow) per 2-MiB region of sh
    ws: np.ndarray         # int64[WS_LEN]: (shadow) the walk's stack


# --- hash tables: linear probing, backward-shift deletion, keys >= 0 ----------------------
@njit(cache=True)
def _hash(key, mask):
    return ((key ^ (key >> 17)) * 0x9E3779B1) & mask


@njit(cache=True, inline="always")
def _h_find(tab, key):
    """The slot holding ``key``, or -1 - the empty slot where it would go."""
    mask = tab.shape[0] - 1
    i = _hash(key, mask)
    while True:
        k = tab[i, 0]
        if k == key:
            return i
        if k == -1:
            return -1 - i
        i = (i + 1) & mask


@njit(cache=True)
def _h_delete(tab, i):
    """Empty slot ``i``, moving later entries of its probe run back (no tombstones)."""
    mask = tab.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & mask
        k = tab[j, 0]
        if k == -1:
            break
        h = _hash(k, mask)
        # the entry at j may move to i unless its home lies cyclically in (i, j]
        if (i <= j and (h <= i or h > j)) or (i > j and h <= i and h > j):
            for c in range(tab.shape[1]):
                tab[i, c] = tab[j, c]
            i = j
    tab[i, 0] = -1


@njit(cache=True)
def _rehash(src, dst):
    """Every entry of table ``src`` inserted into the empty table ``dst`` (larger), in
    ``src``'s slot order: ``grown``'s copy, one compiled call rather than a call a key."""
    for i in range(src.shape[0]):
        if src[i, 0] >= 0:
            s = -1 - _h_find(dst, src[i, 0])
            for c in range(src.shape[1]):
                dst[s, c] = src[i, c]


@njit(cache=True, inline="always")
def _pg_slot(pg, ctl, page):
    """pg's slot of ``page``, made (nothing set) when missing."""
    s = _h_find(pg, page)
    if s >= 0:
        return s
    s = -1 - s
    pg[s, P_KEY] = page
    pg[s, P_MAPPED] = 0
    pg[s, P_TAG] = -1
    pg[s, P_MPAGES] = -1
    pg[s, P_FREED] = -1
    ctl[D_PG_N] += 1
    return s


@njit(cache=True, inline="always")
def _pg_tidy(pg, ctl, s):
    """Drop pg's entry in slot ``s`` once it holds nothing (the dicts drop their keys)."""
    if (pg[s, P_MAPPED] == 0 and pg[s, P_TAG] == -1 and pg[s, P_MPAGES] == -1
            and pg[s, P_FREED] == -1):
        _h_delete(pg, s)
        ctl[D_PG_N] -= 1


# --- room ---------------------------------------------------------------------------------
# The functions below take arrays, not the GuestArrays / DomainArrays tuples: a function that
# hands a tuple on to another call, or reads its arrays on separate branches, counts
# references on the tuple's arrays when it is called (measured: about 250 ns for g and d,
# more than most of the work here). So the public functions take (g, d), take every array
# out of them first, and pass only arrays on.
@njit(cache=True)
def _fq_room(st):
    """Whether each flush-queue kernel one event may call finds room (none asks NEED_ROOM)."""
    rings = st[kfq.S_RINGS]
    for r in range(rings):
        if st[kfq.HEADER + rings + r] - st[kfq.HEADER + r] + 1 > st[kfq.S_RCAP]:
            return False
    if st[kfq.S_IN_TAIL] - st[kfq.S_IN_HEAD] + 1 > st[kfq.S_ICAP]:
        return False
    return st[kfq.S_FINISH_CNT] + 2 - st[kfq.S_FINISH_BASE] <= st[kfq.S_FCAP]


@njit(cache=True, inline="always")
def _room(gctl, log, ctl, pg, tg, retired, made, tree, ist, pt, fq, sh, sr):
    """room_ok over the arrays."""
    if ctl[D_MODE] == MODE_PASSTHROUGH:
        return True
    if gctl[C_LOG_N] + MAX_MAP_ROWS > log.shape[0]:
        return False
    if 2 * (ctl[D_PG_N] + MAX_PAGES + 1) > pg.shape[0]:
        return False
    if 2 * (ctl[D_TG_N] + 2) > tg.shape[0]:
        return False
    if ctl[D_RETIRED_N] + MAX_PAGES + 1 > retired.shape[0]:
        return False
    if ctl[D_MADE_N] + 2 * ctl[D_LEVELS] + 2 > made.shape[0]:
        return False
    if ist[kiova.S_NODES] + 2 > tree.shape[0]:
        return False
    if ctl[D_FREE_ROWS_N] + pt[kpg.H_ROWS] - ctl[D_NEXT_ROW] < 2 * ctl[D_LEVELS]:
        return False
    if ctl[D_MODE] == MODE_SHADOW:   # a call shadows at most MAX_PAGES pages (2 regions)
        if 2 * (ctl[D_SH_N] + MAX_PAGES + 1) > sh.shape[0]:
            return False
        if 2 * (ctl[D_SR_N] + 3) > sr.shape[0]:
            return False
    if ctl[D_LAZY] != 0:
        return _fq_room(fq)
    return True


@njit(cache=True, inline="always")
def room_ok(g, d):
    """Whether one call (map, unmap or timer) finds room in every array it may fill; when
    not, the caller grows ``d`` (``grown``) and ``g`` (guest.grown) first."""
    return _room(g.ctl, g.log, d.ctl, d.pg, d.tg, d.retired, d.made, d.tree, d.ist, d.pt,
                 d.fq, d.sh, d.sr)


@njit(cache=True)
def _refuse(gctl, reason):
    gctl[C_ERR] = E_DMA
    gctl[C_ERR_ARG] = reason


_log = log_row   # guest.log_add over the arrays: append one row; its index


# --- the op log's table stores (VmAgent._log_table_stores, _made_by) ---------------------
@njit(cache=True)
def _made_by(gctl, log, ctl, made, page, t):
    """VmAgent._made_by: move this epoch's creation stores of table ``page`` to ``t`` if
    later, and up the table path (with a stack: each store moves at most once per call,
    so the set moved does not depend on the order)."""
    n = ctl[D_MADE_N]
    seq0 = gctl[C_SEQ0]
    stack = np.empty(64, np.int64)
    stack[0] = page
    sp = 1
    while sp > 0:
        sp -= 1
        p = stack[sp]
        for i in range(n):
            if made[i, 0] != p:
                continue
            s = made[i, 1]
            if s < seq0:
                continue
            r = s - seq0
            if log[r, L_T_NS] > t:
                log[r, L_T_NS] = t
                parent = log[r, L_A0] & ~(PAGE_SIZE - 1)
                if parent != p and sp < 64:
                    stack[sp] = parent
                    sp += 1


@njit(cache=True)
def _log_stores(gctl, log, ctl, made, pt, n, now):
    """VmAgent._log_table_stores of the ``n`` stores a table kernel listed in ``out``
    (none under shadow: the host sees the guest's table only through the VMM's walks)."""
    if ctl[D_MODE] == MODE_SHADOW:
        return
    frames = pt[kpg.H_FRAMES]
    out = kpg.HEADER + frames + 2 * pt[kpg.H_ROWS]
    for i in range(n):
        gpa = pt[out + kpg.EVENT * i]
        value = pt[out + kpg.EVENT * i + 1]
        page = gpa & ~(PAGE_SIZE - 1)
        if ctl[D_MADE_N] > 0:
            _made_by(gctl, log, ctl, made, page, now)
        row = _log(gctl, log, now, OP_GUEST_WRITE, 0, 0, gpa, value, 0, -1)
        if value & 1:
            target = value & TABLE_ADDR_MASK
            f = target >> PAGE_SHIFT
            if target != page and f < frames and pt[kpg.HEADER + f] >= 0:
                m = ctl[D_MADE_N]
                made[m, 0] = target
                made[m, 1] = gctl[C_SEQ0] + row
                ctl[D_MADE_N] = m + 1


@njit(cache=True)
def _mem_alloc_page(gctl, fl, fl_off, fl_n):
    """guest.mem_alloc(g, 1) over the arrays (GuestMemory.alloc of one page): the last page
    freed, else the bump pointer; -1 with C_ERR = E_MEM where GuestMemory raises."""
    n = fl_n[0]
    if n:
        frame = fl[fl_off[0] + n - 1]
        fl_n[0] = n - 1
    else:
        frame = gctl[C_NEXT_FRAME]
        if frame + 1 > gctl[C_FRAMES]:
            gctl[C_ERR] = E_MEM
            gctl[C_ERR_ARG] = 1
            return -1
        gctl[C_NEXT_FRAME] = frame + 1
    gctl[C_USED_PAGES] += 1
    return frame << PAGE_SHIFT


@njit(cache=True)
def _alloc_table(gctl, fl, fl_off, fl_n, ctl, pt, rows_free):
    """GuestTableStore.alloc_table: a page from the guest allocator, a slab row for it
    (the last freed row first), zeroed; -1 when the allocator failed (C_ERR set)."""
    gpa = _mem_alloc_page(gctl, fl, fl_off, fl_n)
    if gpa < 0:
        return -1
    n = ctl[D_FREE_ROWS_N]
    if n > 0:
        row = rows_free[n - 1]
        ctl[D_FREE_ROWS_N] = n - 1
    else:
        row = ctl[D_NEXT_ROW]
    if row == ctl[D_NEXT_ROW]:
        ctl[D_NEXT_ROW] = row + 1
    frames = pt[kpg.H_FRAMES]
    rows = pt[kpg.H_ROWS]
    pt[kpg.HEADER + (gpa >> PAGE_SHIFT)] = row
    pt[kpg.HEADER + frames + row] = 0                       # used[row]
    slab = kpg.HEADER + frames + 2 * rows + kpg.EVENT * pt[kpg.H_EVENTS]
    for k in range(kpg.SLOTS):
        pt[slab + row * kpg.SLOTS + k] = 0
    return gpa


@njit(cache=True)
def _map_table(gctl, log, fl, fl_off, fl_n, ctl, made, pt, rows_free, iova, phys, end, bits,
               now):
    """PageTable._map_kernel over d.pt: 4-KiB leaves over [iova, end), a missing table
    allocated where the kernel stops for one; the stores made (logged), or -1 (C_ERR).
    (Called once a table is missing; dma_map runs the first kernel call itself.)"""
    total = 0
    new_table = _alloc_table(gctl, fl, fl_off, fl_n, ctl, pt, rows_free)
    if new_table < 0:
        return -1
    while True:
        code, pos, n = kpg.map_4k(pt, iova, end, phys, bits, new_table)
        _log_stores(gctl, log, ctl, made, pt, n, now)
        total += n
        new_table = -1
        if code == kpg.DONE:
            return total
        phys += pos - iova
        iova = pos
        if code == kpg.NEED_TABLE:
            new_table = _alloc_table(gctl, fl, fl_off, fl_n, ctl, pt, rows_free)
            if new_table < 0:
                return -1
        elif code != kpg.MORE:
            _refuse(gctl, R_WALK)
            return -1


# --- invalidations (DmaApi._invalidate, _trap, NestedVmm.handle) -------------------------
@njit(cache=True)
def _psi(addr, npages):
    """invalidate.psi_aligned(addr, npages, mamv=None): (aligned addr, am)."""
    start = addr >> PAGE_SHIFT
    end = start + npages - 1
    am = 0
    x = npages - 1
    while x > 0:
        x >>= 1
        am += 1
    x = start ^ end
    b = 0
    while x > 0:
        x >>= 1
        b += 1
    if b > am:
        am = b
    if am > MAX_AGAW_PFN_WIDTH:
        am = MAX_AGAW_PFN_WIDTH
    return ((start >> am) << am) << PAGE_SHIFT, am


@njit(cache=True)
def _invalidate(stats, gctl, log, ctl, c, t, everything, addr, npages, leaf, unmap_id):
    """One strict flush as the DMA layer submits it: the PASID-based IOTLB invalidation
    (range, or the whole PASID), a device-TLB one under ATS, the wait; the tail write traps
    and the VMM forwards the IOTLB one as IOMMU_HWPT_INVALIDATE. The time after the VM entry."""
    stats[S_INV_DESCRIPTORS] += 2 + ctl[D_ATS]
    t += c[K_QI_SUBMIT]
    stats[S_VM_EXITS] += 1
    half = c[K_VM_EXIT] // 2
    t += half + c[K_VMM_TRAP]
    if everything:
        _log(gctl, log, t, OP_HWPT_INV, ctl[D_SID], ctl[D_PASID], 0, -1, 0, unmap_id)
    else:
        a, am = _psi(addr, npages)
        flags = IOMMU_VTD_INV_FLAGS_LEAF if leaf else 0
        _log(gctl, log, t, OP_HWPT_INV, ctl[D_SID], ctl[D_PASID], a, np.int64(1) << am,
             flags, unmap_id)
    stats[S_VMM_INVALIDATE_CALLS] += 1
    t += c[K_HWPT_INV] + c[K_QI_DESC] + c[K_QI_WAIT]
    return t + c[K_VM_EXIT] - half


# --- shadow: caching mode (DmaApi._invalidate, _trap, ShadowVmm.handle) ---------------------
# ShadowVmm's iova_tree (IOVA page -> (GPA page, writable)) is ``sh``, a hash table as pg;
# ``sr`` counts its pages per 2-MiB region, so that the walk's empty entries above level 1
# (IovaTree.remove_range over 2 MiB, 1 GiB or 512 GiB) cost a look-up, not a scan of pages.
@njit(cache=True, inline="always")
def _sr_add(sr, ctl, region, delta):
    """Count ``delta`` more pages of sh in ``region``; the entry goes when it reaches 0."""
    j = _h_find(sr, region)
    if j < 0:
        j = -1 - j
        sr[j, 0] = region
        sr[j, 1] = 0
        ctl[D_SR_N] += 1
    sr[j, 1] += delta
    if sr[j, 1] == 0:
        _h_delete(sr, j)
        ctl[D_SR_N] -= 1


@njit(cache=True)
def _sh_drop_region(sh, sr, ctl, region):
    """IovaTree.remove_range of one whole 2-MiB region: the pages it held."""
    j = _h_find(sr, region)
    if j < 0:
        return 0
    n = sr[j, 1]
    found = 0
    p = region << 9
    while found < n:
        i = _h_find(sh, p)
        if i >= 0:
            _h_delete(sh, i)
            found += 1
        p += 1
    _h_delete(sr, _h_find(sr, region))
    ctl[D_SR_N] -= 1
    ctl[D_SH_N] -= n
    return n


@njit(cache=True, inline="always")
def _sh_range(sh, sr, ctl, page, pages, drop):
    """The pages of sh in [page, page + pages) (a walk's region: one page, or 2-MiB
    aligned), removed when ``drop`` (IovaTree.remove_range)."""
    if pages == 1:
        i = _h_find(sh, page)
        if i < 0:
            return 0
        if drop:
            _h_delete(sh, i)
            ctl[D_SH_N] -= 1
            _sr_add(sr, ctl, page >> 9, -1)
        return 1
    if ctl[D_SH_N] == 0:
        return 0
    lo = page >> 9
    hi = (page + pages) >> 9
    if hi - lo == 1:
        if drop:
            return _sh_drop_region(sh, sr, ctl, lo)
        j = _h_find(sr, lo)
        return sr[j, 1] if j >= 0 else 0
    regions = np.empty(ctl[D_SR_N], np.int64)
    k = 0
    n = 0
    for j in range(sr.shape[0]):
        r = sr[j, 0]
        if r >= lo and r < hi:
            regions[k] = r
            n += sr[j, 1]
            k += 1
    if drop:
        for j in range(k):
            _sh_drop_region(sh, sr, ctl, regions[j])
    return n


@njit(cache=True, inline="always")
def _shadow_walk(pt, ws, sh, sr, ctl, gctl, log, stats, c, start, end, t, unmap_id):
    """ShadowVmm.handle of one IOTLB invalidation over [start, end): PageTable.walk_range
    (QEMU vtd_page_walk: each entry meeting the range read in IOVA order at each level, a
    valid non-leaf entry walked into, every other entry one event over its region) with
    each event filtered through sh as vtd_page_walk_one does: OP_VFIO_MAP / OP_VFIO_UNMAP
    rows from ``t`` on, sh updated, the VFIO calls' costs. (entries read, the time after
    the last call); the rows' times and that time leave out the reads, which ShadowVmm
    charges before the first call (the caller adds them). -1 entries read (R_WALK) when the
    walk meets an entry leading to a page that is no table (PageTable would read it as
    zeros), or when a row or a shadowed page would find no room: never, with the tables the
    driver builds and the shadow strict caching mode keeps equal to them. A table reached
    twice reads as nothing, as walk_range's ``seen`` (the stamps of kpg.unmap_range mark
    the tables reached)."""
    frames = pt[kpg.H_FRAMES]
    nrows = pt[kpg.H_ROWS]
    mark = kpg.HEADER + frames + nrows
    slab = mark + nrows + kpg.EVENT * pt[kpg.H_EVENTS]
    ps, amask, levels = pt[kpg.H_PS], pt[kpg.H_AMASK], pt[kpg.H_LEVELS]
    limit = np.int64(1) << (PAGE_SHIFT + 9 * levels)   # sl widths 39, 48, 57: PageTable.limit
    hi = min(end, limit)
    lo = max(start, 0)
    reads = 0
    if lo >= hi:
        return reads, t
    sid = ctl[D_SID]
    cap = log.shape[0] - 2            # a row, or an unmap and a map, must find room
    stamp = pt[kpg.H_STAMP] + 1
    pt[kpg.H_STAMP] = stamp
    row = pt[kpg.HEADER + (pt[kpg.H_ROOT] >> PAGE_SHIFT)]
    pt[mark + row] = stamp
    # a level's frame in ws: row, level, base, start, end, perms, next index, last index
    shift = PAGE_SHIFT + 9 * (levels - 1)
    ws[0], ws[1], ws[2], ws[3], ws[4], ws[5] = row, levels, 0, lo, hi, 3
    ws[6], ws[7] = lo >> shift, min(511, (hi - 1) >> shift)
    reads += ws[7] + 1 - ws[6]
    sp = 0
    while sp >= 0:
        f = 8 * sp
        idx = ws[f + 6]
        if idx > ws[f + 7]:
            sp -= 1
            continue
        ws[f + 6] = idx + 1
        level = ws[f + 1]
        shift = PAGE_SHIFT + 9 * (level - 1)
        span = np.int64(1) << shift
        entry = pt[slab + ws[f] * kpg.SLOTS + idx]
        region = ws[f + 2] + (idx << shift)
        p = ws[f + 5] & entry & 3          # sl R, W are ACCESS_READ, ACCESS_WRITE
        if p and (level == 1 or entry & ps):
            if level > 1:
                continue                   # a large leaf: reserved without SLLPS, skipped
            page = region >> PAGE_SHIFT
            phys = (entry & amask & ~(span - 1)) >> PAGE_SHIFT
            w = 1 if p & 2 else 0
            i = _h_find(sh, page)
            if i >= 0 and sh[i, 1] == phys and sh[i, 2] == w:
                continue                   # the same translation: skipped
            if gctl[C_LOG_N] > cap:
                return -1, t
            if i >= 0:                     # changed: an emulated UNMAP first
                _log(gctl, log, t, OP_VFIO_UNMAP, sid, 0, page << PAGE_SHIFT, PAGE_SIZE, 0,
                     unmap_id)
                stats[S_VMM_UNMAP_CALLS] += 1
                t += c[K_VFIO_UNMAP] + c[K_QI_DESC] + c[K_QI_WAIT]
            else:
                if 2 * (ctl[D_SH_N] + 1) > sh.shape[0] or 2 * (ctl[D_SR_N] + 1) > sr.shape[0]:
                    return -1, t
                i = -1 - i
                sh[i, 0] = page
                ctl[D_SH_N] += 1
                _sr_add(sr, ctl, page >> 9, 1)
            sh[i, 1] = phys
            sh[i, 2] = w
            _log(gctl, log, t, OP_VFIO_MAP, sid, 0, region, phys << PAGE_SHIFT, PAGE_SIZE, w)
            stats[S_VMM_MAP_CALLS] += 1
            t += c[K_VFIO_MAP] + c[K_PIN_PAGE]
            continue
        if p:
            cf = (entry & amask) >> PAGE_SHIFT       # kpg._row of the table it leads to
            crow = pt[kpg.HEADER + cf] if cf < frames else -1
            if crow < 0:
                return -1, t
            if pt[mark + crow] != stamp:   # not reached before: walk into it
                pt[mark + crow] = stamp
                s = max(ws[f + 3], region)
                e = min(ws[f + 4], region + span)
                sp += 1
                g = 8 * sp
                cshift = shift - 9
                ws[g], ws[g + 1], ws[g + 2], ws[g + 3], ws[g + 4], ws[g + 5] = (
                    crow, level - 1, region, s, e, p)
                ws[g + 6] = (s - region) >> cshift
                ws[g + 7] = min(511, (e - 1 - region) >> cshift)
                reads += ws[g + 7] + 1 - ws[g + 6]
                continue
        # an entry that maps nothing: one VFIO unmap of its region if something is shadowed
        if gctl[C_LOG_N] > cap:
            return -1, t
        if _sh_range(sh, sr, ctl, region >> PAGE_SHIFT, span >> PAGE_SHIFT, True) > 0:
            _log(gctl, log, t, OP_VFIO_UNMAP, sid, 0, region, span, 0, unmap_id)
            stats[S_VMM_UNMAP_CALLS] += 1
            t += c[K_VFIO_UNMAP] + c[K_QI_DESC] + c[K_QI_WAIT]
    return reads, t


@njit(cache=True)
def _shadow_flush(stats, gctl, log, ctl, c, pt, ws, sh, sr, t, addr, npages, descs,
                  unmap_id):
    """One strict flush under caching mode: ``descs`` descriptors (the page-selective
    IOTLB invalidation, a device-TLB one under ATS, the wait; domain-selective when the
    range's mask exceeds CAP.MAMV), the tail write traps, and the VMM syncs its shadow over
    the range (ShadowVmm.handle: ``vmm_pte_read_ns`` per entry its walk read, then each
    VFIO call). The time after the VM entry; refused (R_WALK, C_ERR) as ``_shadow_walk``
    says (never expected)."""
    stats[S_INV_DESCRIPTORS] += descs
    t += c[K_QI_SUBMIT]
    stats[S_VM_EXITS] += 1
    half = c[K_VM_EXIT] // 2
    t += half + c[K_VMM_TRAP]
    a, am = _psi(addr, npages)
    if am > QI_MAMV_DEFAULT:           # vtd_sync_shadow_page_table: the whole domain
        start, end = np.int64(0), np.int64(1) << 62
    else:
        start, end = a, a + (np.int64(PAGE_SIZE) << am)
    n0 = gctl[C_LOG_N]
    reads, t = _shadow_walk(pt, ws, sh, sr, ctl, gctl, log, stats, c, start, end, t,
                            unmap_id)
    if reads < 0:
        _refuse(gctl, R_WALK)
        return t
    late = c[K_PTE_READ] * reads       # the reads come first: every call that much later
    for r in range(n0, gctl[C_LOG_N]):
        log[r, L_T_NS] += late
    return t + late + c[K_VM_EXIT] - half

# --- IOVAs ----------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _free_iova(tree, ist, mag, pg, ctl, cpu, pfn, pages, t):
    """DmaApi._free_iova: free_iova_fast, and the time of the free kept for its next map."""
    kiova.free_iova_fast(tree, ist, mag, cpu, pfn, pages)
    s = _pg_slot(pg, ctl, pfn)
    pg[s, P_FREED] = t


@njit(cache=True)
def _give_back(fq, tree, ist, mag, pg, ctl, cpu, n, t):
    """DmaApi._give_back of the ``n`` entries a flush-queue kernel freed into its ``out``."""
    at = fq[kfq.S_OUT_OFF]
    slots = fq[kfq.S_RINGS] * fq[kfq.S_RCAP]
    worst = fq[at + 2 * slots] if n > 0 else 0
    for i in range(n):
        _free_iova(tree, ist, mag, pg, ctl, cpu, fq[at + i], fq[at + slots + i], t)
        if fq[at + 2 * slots + i] > worst:
            worst = fq[at + 2 * slots + i]
    if n > 0 and worst > ctl[D_STALE_BOUND]:
        ctl[D_STALE_BOUND] = worst


@njit(cache=True)
def _flush_all(stats, gctl, log, ctl, costs, fq, tree, ist, mag, pg, cpu, t):
    """DmaApi._flush_all: one PASID-wide invalidation, then free what it covered."""
    stats[S_LAZY_FLUSHES] += 1
    t = _invalidate(stats, gctl, log, ctl, costs, t, True, 0, 0, False, -1)
    t += costs[K_QI_WAIT]
    n = kfq.fq_flush_done(fq, t)
    _give_back(fq, tree, ist, mag, pg, ctl, cpu, n, t)
    return t


@njit(cache=True, inline="always")
def _untag(pg, tg, retired, ctl, s):
    """DmaApi._untag of the page in pg slot ``s`` (which holds a tag)."""
    uid = pg[s, P_TAG]
    pg[s, P_TAG] = -1
    j = _h_find(tg, uid)
    left = tg[j, 1] - 1
    if left:
        tg[j, 1] = left
    else:
        _h_delete(tg, j)
        ctl[D_TG_N] -= 1
        r = ctl[D_RETIRED_N]
        retired[r] = uid
        ctl[D_RETIRED_N] = r + 1


# --- the DMA API ----------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _leaf_bits(ctl, direction):
    """PageTable._leaf_bits of a mapping (read, and write unless DMA_TO_DEVICE): a
    first-level leaf's P|US|A (+RW|D), or under shadow a second-level leaf's R (+W)."""
    write = direction != DMA_TO_DEVICE
    if ctl[D_MODE] == MODE_SHADOW:
        return SL_R | (SL_W if write else 0)
    return FL_P | FL_US | FL_A | ((FL_RW | FL_D) if write else 0)


@njit(cache=True, inline="always")
def _alloc_iova(gctl, ctl, cost, tree, ist, mag, pg, cpu, pages, t1):
    """dma-iommu.c iommu_dma_alloc_iova of ``pages`` for ``cpu`` (below 4 GiB first for a
    PCI device while that works), then the wait for the range's last deferred free
    (dom.freed_ns.pop) and the allocation's cost: (pfn, t1), or (-1, t1) with E_IOVA set
    when the IOVA space is exhausted."""
    hits = ist[kiova.S_HITS]
    pfn = np.int64(kiova.NONE)
    if ctl[D_LIMIT_PFN] > DMA_BIT_MASK_32_PFN and ctl[D_PCI32]:
        pfn = kiova.alloc_iova_fast(tree, ist, mag, cpu, pages, DMA_BIT_MASK_32_PFN, False)
        if pfn == kiova.NONE:
            ctl[D_PCI32] = 0
    if pfn == kiova.NONE:
        pfn = kiova.alloc_iova_fast(tree, ist, mag, cpu, pages, ctl[D_LIMIT_PFN], True)
    if pfn < 0:
        gctl[C_ERR] = E_IOVA
        gctl[C_ERR_ARG] = ctl[D_SID]
        return np.int64(-1), t1
    fast = ist[kiova.S_HITS] > hits
    s = _h_find(pg, pfn)
    if s >= 0 and pg[s, P_FREED] >= 0:      # dom.freed_ns.pop(pfn, 0)
        if pg[s, P_FREED] > t1:
            t1 = pg[s, P_FREED]
        pg[s, P_FREED] = -1
        _pg_tidy(pg, ctl, s)
    t1 += cost[K_ALLOC_FAST] if fast else cost[K_ALLOC_SLOW]
    return pfn, t1


@njit(cache=True, inline="always")
def _map_run(gctl, log, fl, fl_off, fl_n, ctl, made, pt, rows_free, iova, end, phys, bits,
             t1):
    """One iommu_map of [iova, end) at ``phys`` (PageTable._map_kernel: the 4-KiB kernel
    first, a missing table through _map_table), its stores logged at ``t1``: the number of
    stores, or -1 when refused or out of guest memory (gctl[C_ERR] set)."""
    code, pos, n = kpg.map_4k(pt, iova, end, phys, bits, -1)
    _log_stores(gctl, log, ctl, made, pt, n, t1)
    if code != kpg.DONE:
        if code != kpg.NEED_TABLE:
            _refuse(gctl, R_WALK)
            return -1
        more = _map_table(gctl, log, fl, fl_off, fl_n, ctl, made, pt, rows_free, pos,
                          phys + (pos - iova), end, bits, t1)
        if more < 0:
            return -1
        n += more
    return n


@njit(cache=True)
def dma_map(g, d, cpu, gpa, size, direction, t):
    """VmAgent.dma_map: (iova, t1); the vCPU is busy from max(t, its busy time) to t1.
    (-1, t) when refused (g.ctl[C_ERR] set, nothing changed) or when the IOVA space is
    exhausted (E_IOVA: DmaError on the Python path)."""
    # every array taken out of the tuples here, before any branch (see above)
    busy, stats, gctl, log, fl, fl_off, fl_n = g.busy, g.stats, g.ctl, g.log, g.fl, g.fl_off, g.fl_n
    ctl, cost, tree, ist, mag, pt, pg = d.ctl, d.costs, d.tree, d.ist, d.mag, d.pt, d.pg
    tg, retired, made, fq, rows_free = d.tg, d.retired, d.made, d.fq, d.rows_free
    sh, sr, ws = d.sh, d.sr, d.ws
    c = cpu % busy.shape[0]
    t0 = max(t, busy[c])
    if ctl[D_MODE] == MODE_PASSTHROUGH:
        stats[S_MAPS] += 1
        t1 = t0 + cost[K_DMA_CALL] + DIRECT_CALL_NS
        busy[c] = t1
        stats[S_CPU_BUSY_NS] += t1 - t0
        return gpa, t1
    pages = ((gpa & (PAGE_SIZE - 1)) + size + PAGE_SIZE - 1) >> PAGE_SHIFT
    if pages <= 0 or pages > MAX_PAGES:
        _refuse(gctl, R_PAGES)
        return -1, t
    if cpu < 0 or cpu >= ist[kiova.S_CPUS]:
        _refuse(gctl, R_CPU)
        return -1, t
    if not _room(gctl, log, ctl, pg, tg, retired, made, tree, ist, pt, fq, sh, sr):
        _refuse(gctl, R_ROOM)
        return -1, t
    t1 = t0 + cost[K_DMA_CALL]
    stats[S_MAPS] += 1
    pfn, t1 = _alloc_iova(gctl, ctl, cost, tree, ist, mag, pg, cpu, pages, t1)
    if pfn < 0:
        return -1, t
    bits = _leaf_bits(ctl, direction)
    iova = pfn << PAGE_SHIFT
    end = iova + (pages << PAGE_SHIFT)
    phys = gpa & ~(PAGE_SIZE - 1)
    # PageTable._map_kernel (_map_run)
    n = _map_run(gctl, log, fl, fl_off, fl_n, ctl, made, pt, rows_free, iova, end, phys,
                 bits, t1)
    if n < 0:
        return -1, t
    stats[S_IOMMU_MAP_EVENTS] += 1
    stats[S_PTE_WRITES] += n
    t1 += n * cost[K_PTE_WRITE]
    if ctl[D_MODE] == MODE_SHADOW:     # caching mode: iotlb_sync_map flushes the new range
        t1 = _shadow_flush(stats, gctl, log, ctl, cost, pt, ws, sh, sr, t1, iova, pages, 2,
                           -1)
        if gctl[C_ERR]:
            return -1, t
        t1 += cost[K_QI_WAIT]
    s = _pg_slot(pg, ctl, pfn)
    pg[s, P_MPAGES] = pages
    for p in range(pfn, pfn + pages):
        s = _pg_slot(pg, ctl, p)
        pg[s, P_MAPPED] = 1
        if pg[s, P_TAG] != -1:
            _untag(pg, tg, retired, ctl, s)
    busy[c] = t1
    stats[S_CPU_BUSY_NS] += t1 - t0
    return iova | (gpa & (PAGE_SIZE - 1)), t1


@njit(cache=True)
def map_sg(g, d, cpu, sg, n, direction, t, out, charge):
    """DmaApi.map_segments of the scatter list ``sg[:n]`` (rows (gpa, len)) as
    VmAgent.dma_map_sg calls it (``charge`` 1: from max(t, the vCPU's busy time), the vCPU
    busy to the end) or as VmAgent.dma_alloc_coherent does (``charge`` 0: at ``t`` itself,
    the vCPU's busy time and cpu_busy_ns untouched). Linux iommu_dma_map_sg: one IOVA range
    for the whole list (iommu_dma_alloc_iova of the pages of all segments), each segment
    mapped at the next pages of it (its own iommu_map: one iommu:map event each), the
    stores at one time stamp, one mapping for the unmap (``unmap_sg``). Pass-through is
    dma-direct: each segment's DMA address is its GPA.

    ``out[:n]`` gets the (DMA address, len) of each segment; returns (the first segment's
    DMA address, t1), or (-1, t) when refused (g.ctl[C_ERR] = E_DMA, nothing changed: no
    segment, a segment of no page, more than MAX_PAGES pages in all, a CPU outside the
    rcache, no room) or when the IOVA space is exhausted (E_IOVA)."""
    # every array taken out of the tuples here, before any branch (see above)
    busy, stats, gctl, log, fl, fl_off, fl_n = g.busy, g.stats, g.ctl, g.log, g.fl, g.fl_off, g.fl_n
    ctl, cost, tree, ist, mag, pt, pg = d.ctl, d.costs, d.tree, d.ist, d.mag, d.pt, d.pg
    tg, retired, made, fq, rows_free = d.tg, d.retired, d.made, d.fq, d.rows_free
    sh, sr, ws = d.sh, d.sr, d.ws
    c = cpu % busy.shape[0]
    t0 = max(t, busy[c]) if charge else t
    if n <= 0:
        _refuse(gctl, R_PAGES)
        return -1, t
    if ctl[D_MODE] == MODE_PASSTHROUGH:
        stats[S_MAPS] += 1
        for i in range(n):
            out[i, 0] = sg[i, 0]
            out[i, 1] = sg[i, 1]
        t1 = t0 + cost[K_DMA_CALL] + DIRECT_CALL_NS
        if charge:
            busy[c] = t1
            stats[S_CPU_BUSY_NS] += t1 - t0
        return sg[0, 0], t1
    pages = 0
    for i in range(n):
        k = ((sg[i, 0] & (PAGE_SIZE - 1)) + sg[i, 1] + PAGE_SIZE - 1) >> PAGE_SHIFT
        if k <= 0:
            _refuse(gctl, R_PAGES)
            return -1, t
        pages += k
    if pages > MAX_PAGES:
        _refuse(gctl, R_PAGES)
        return -1, t
    if cpu < 0 or cpu >= ist[kiova.S_CPUS]:
        _refuse(gctl, R_CPU)
        return -1, t
    if not _room(gctl, log, ctl, pg, tg, retired, made, tree, ist, pt, fq, sh, sr):
        _refuse(gctl, R_ROOM)
        return -1, t
    t1 = t0 + cost[K_DMA_CALL]
    stats[S_MAPS] += 1
    pfn, t1 = _alloc_iova(gctl, ctl, cost, tree, ist, mag, pg, cpu, pages, t1)
    if pfn < 0:
        return -1, t
    bits = _leaf_bits(ctl, direction)
    stores = 0
    page = pfn
    for i in range(n):        # each segment its own table.map at the next pages
        gpa = sg[i, 0]
        k = ((gpa & (PAGE_SIZE - 1)) + sg[i, 1] + PAGE_SIZE - 1) >> PAGE_SHIFT
        iova = page << PAGE_SHIFT
        end = iova + (k << PAGE_SHIFT)
        phys = gpa & ~(PAGE_SIZE - 1)
        m = _map_run(gctl, log, fl, fl_off, fl_n, ctl, made, pt, rows_free, iova, end, phys,
                     bits, t1)
        if m < 0:
            return -1, t
        stores += m
        out[i, 0] = iova | (gpa & (PAGE_SIZE - 1))
        out[i, 1] = sg[i, 1]
        stats[S_IOMMU_MAP_EVENTS] += 1
        page += k
    stats[S_PTE_WRITES] += stores
    t1 += stores * cost[K_PTE_WRITE]
    if ctl[D_MODE] == MODE_SHADOW:     # caching mode: iotlb_sync_map flushes the new range
        t1 = _shadow_flush(stats, gctl, log, ctl, cost, pt, ws, sh, sr, t1, pfn << PAGE_SHIFT,
                           pages, 2, -1)
        if gctl[C_ERR]:
            return -1, t
        t1 += cost[K_QI_WAIT]
    s = _pg_slot(pg, ctl, pfn)
    pg[s, P_MPAGES] = pages
    for p in range(pfn, pfn + pages):
        s = _pg_slot(pg, ctl, p)
        pg[s, P_MAPPED] = 1
        if pg[s, P_TAG] != -1:
            _untag(pg, tg, retired, ctl, s)
    if charge:
        busy[c] = t1
        stats[S_CPU_BUSY_NS] += t1 - t0
    return out[0, 0], t1


@njit(cache=True, inline="always")
def unmap_sg(g, d, cpu, iova, direction, t):
    """VmAgent.dma_unmap_sg: DmaApi.unmap_range of the mapping ``map_sg`` made, by its
    first segment's DMA address ``iova`` (Linux iommu_dma_unmap_sg: one __iommu_dma_unmap
    of the whole IOVA range); ``dma_unmap``'s returns, refusals and timer."""
    return dma_unmap(g, d, cpu, iova, 0, direction, t)


@njit(cache=True)
def dma_unmap(g, d, cpu, iova, size, direction, t):
    """VmAgent.dma_unmap: t1; the vCPU is busy from max(t, its busy time) to t1. A flush-
    queue timer the unmap armed is left in ctl[D_TIMER_NS] / [D_TIMER_CPU] for the caller
    to schedule. When refused (g.ctl[C_ERR] set) nothing changed and ``t`` comes back."""
    # every array taken out of the tuples here, before any branch (see above)
    busy, stats, gctl, log = g.busy, g.stats, g.ctl, g.log
    ctl, cost, tree, ist, mag, pt, pg = d.ctl, d.costs, d.tree, d.ist, d.mag, d.pt, d.pg
    tg, retired, made, fq = d.tg, d.retired, d.made, d.fq
    sh, sr, ws = d.sh, d.sr, d.ws
    c = cpu % busy.shape[0]
    t0 = max(t, busy[c])
    if ctl[D_MODE] == MODE_PASSTHROUGH:
        stats[S_UNMAPS] += 1
        ctl[D_LAST_UNMAPPED] = iova
        t1 = t0 + cost[K_DMA_CALL] + DIRECT_CALL_NS
        busy[c] = t1
        stats[S_CPU_BUSY_NS] += t1 - t0
        return t1
    pfn = iova >> PAGE_SHIFT
    ms = _h_find(pg, pfn)
    pages = pg[ms, P_MPAGES] if ms >= 0 else -1
    if pages >= 0:
        if pages > MAX_PAGES:
            _refuse(gctl, R_PAGES)
            return t
        if cpu < 0 or cpu >= ist[kiova.S_CPUS]:
            _refuse(gctl, R_CPU)
            return t
        if not _room(gctl, log, ctl, pg, tg, retired, made, tree, ist, pt, fq, sh, sr):
            _refuse(gctl, R_ROOM)
            return t
    t1 = t0 + cost[K_DMA_CALL]
    stats[S_UNMAPS] += 1
    ctl[D_LAST_UNMAPPED] = iova
    if pages < 0:       # unmap of something never mapped: WARN
        stats[S_DMA_API_ERRORS] += 1
        busy[c] = t1
        stats[S_CPU_BUSY_NS] += t1 - t0
        return t1
    pg[ms, P_MPAGES] = -1
    _pg_tidy(pg, ctl, ms)
    unmap_id = ctl[D_NEXT_UNMAP_ID]
    ctl[D_NEXT_UNMAP_ID] = unmap_id + 1
    # _clear_ptes: fewer than 512 pages free no table page
    stores = _clear_4k(pt, pfn << PAGE_SHIFT, (pfn + pages) << PAGE_SHIFT)
    if stores < 0:
        code, stores, frees = kpg.unmap_range(pt, pfn << PAGE_SHIFT, (pfn + pages) << PAGE_SHIFT)
        if code != kpg.DONE or frees:
            _refuse(gctl, R_WALK)
            return t
    _log_stores(gctl, log, ctl, made, pt, stores, t1)
    stats[S_PTE_WRITES] += stores
    t1 += stores * cost[K_PTE_WRITE]
    for p in range(pfn, pfn + pages):
        s = _pg_slot(pg, ctl, p)
        pg[s, P_MAPPED] = 0
        if pg[s, P_TAG] != -1:
            _untag(pg, tg, retired, ctl, s)
        pg[s, P_TAG] = unmap_id
    j = -1 - _h_find(tg, unmap_id)
    tg[j, 0] = unmap_id
    tg[j, 1] = pages
    ctl[D_TG_N] += 1
    if ctl[D_LAZY] == 0:    # strict: invalidate and wait now, then free the IOVA
        if ctl[D_MODE] == MODE_SHADOW:
            t1 = _shadow_flush(stats, gctl, log, ctl, cost, pt, ws, sh, sr, t1,
                               pfn << PAGE_SHIFT, pages, 2 + ctl[D_ATS], unmap_id)
            if gctl[C_ERR]:
                return t
        else:
            t1 = _invalidate(stats, gctl, log, ctl, cost, t1, False, pfn << PAGE_SHIFT,
                             pages, True, unmap_id)
        t1 += cost[K_QI_WAIT] + cost[K_IOVA_FREE]
        _free_iova(tree, ist, mag, pg, ctl, cpu, pfn, pages, t1)
    else:
        n, flush_now, armed = kfq.fq_queue(fq, cpu, pfn, pages, t1)
        if n > 0:
            _give_back(fq, tree, ist, mag, pg, ctl, cpu, n, t1)
        if flush_now:
            t1 = _flush_all(stats, gctl, log, ctl, cost, fq, tree, ist, mag, pg, cpu, t1)
        if armed:
            ctl[D_TIMER_NS] = fq[kfq.S_DEADLINE_NS]
            ctl[D_TIMER_CPU] = cpu
        t1 += cost[K_IOVA_FREE]
    _log(gctl, log, t1, OP_UNMAP_RET, 0, 0, unmap_id, t1, cpu, -1)
    busy[c] = t1
    stats[S_CPU_BUSY_NS] += t1 - t0
    return t1


@njit(cache=True)
def _clear_4k(pt, start, end):
    """kpg.unmap_range of a range inside one level-1 table's 2 MiB and smaller than it (no
    entry above level 1 is covered whole: no table freed), without its bookkeeping arrays:
    the walk down, then each present leaf cleared in IOVA order, listed in ``out`` as the
    kernel lists it. The stores made; -1 (nothing done) for any other shape, a large leaf
    or an entry leading to no table: kpg.unmap_range then does it all."""
    if start >> 21 != (end - 1) >> 21 or end - start >= 1 << 21:
        return -1
    frames = pt[kpg.H_FRAMES]
    rows = pt[kpg.H_ROWS]
    used = kpg.HEADER + frames
    out = used + 2 * rows
    slab = out + kpg.EVENT * pt[kpg.H_EVENTS]
    present, ps, amask = pt[kpg.H_PRESENT], pt[kpg.H_PS], pt[kpg.H_AMASK]
    table = pt[kpg.H_ROOT]
    row = pt[kpg.HEADER + (table >> PAGE_SHIFT)]
    for level in range(pt[kpg.H_LEVELS], 1, -1):
        entry = pt[slab + row * kpg.SLOTS + ((start >> (PAGE_SHIFT + 9 * (level - 1))) & 511)]
        if not entry & present:
            return 0
        if entry & ps:
            return -1
        table = entry & amask
        f = table >> PAGE_SHIFT
        if f >= frames:
            return -1
        row = pt[kpg.HEADER + f]
        if row < 0:
            return -1
    n = 0
    idx = (start >> PAGE_SHIFT) & 511
    at = slab + row * kpg.SLOTS + idx
    for k in range((end - start) >> PAGE_SHIFT):
        if pt[at + k] & present:
            pt[at + k] = 0
            pt[used + row] -= 1
            pt[out + kpg.EVENT * n] = table + 8 * (idx + k)
            pt[out + kpg.EVENT * n + 1] = 0
            n += 1
    return n


@njit(cache=True)
def fq_timer(g, d, cpu):
    """DmaApi._on_timer: at the armed deadline, a PASID-wide flush of every queue. Refused
    (C_ERR) without change when short of room."""
    stats, gctl, log = g.stats, g.ctl, g.log
    ctl, costs, st, tree, ist, mag, pg = d.ctl, d.costs, d.fq, d.tree, d.ist, d.mag, d.pg
    tg, retired, made, pt, sh, sr = d.tg, d.retired, d.made, d.pt, d.sh, d.sr
    if ctl[D_LAZY] == 0 or st[kfq.S_ARMED] == 0:
        return
    if not _room(gctl, log, ctl, pg, tg, retired, made, tree, ist, pt, st, sh, sr):
        _refuse(gctl, R_ROOM)
        return
    t = st[kfq.S_DEADLINE_NS]
    if kfq.fq_on_timer(st, t) == 1:
        _flush_all(stats, gctl, log, ctl, costs, st, tree, ist, mag, pg, cpu, t)


@njit(cache=True, inline="always")
def _tag(ctl, pg, page):
    if ctl[D_MODE] == MODE_PASSTHROUGH:
        return -1
    s = _h_find(pg, page)
    if s < 0:
        return -2
    if pg[s, P_MAPPED]:
        return -1
    tag = pg[s, P_TAG]
    return tag if tag != -1 else -2


@njit(cache=True, inline="always")
def unmap_tag(g, d, page):
    """DmaApi.unmap_tag: -1 while the IOVA page is mapped (always, under pass-through),
    else the id of the unmap that last covered it, or -2. (A loop calling it per request
    may call ``tag_of(d.ctl, d.pg, page)`` instead: the same, without the tuples.)"""
    return _tag(d.ctl, d.pg, page)


tag_of = _tag


@njit(cache=True)
def end_epoch(g, d, t_end):
    """VmAgent.run_epoch's end: ``_made.clear()``, then DmaApi.log_retired(t_end): the ids
    retired since the last call, sorted, as OP_UNMAP_RETIRE rows of consecutive runs. Needs
    ``end_epoch_rows(d)`` rows free in g.log (refused, C_ERR, otherwise)."""
    ctl, gctl, log, retired = d.ctl, g.ctl, g.log, d.retired
    n = ctl[D_RETIRED_N]
    if gctl[C_LOG_N] + n > log.shape[0]:
        _refuse(gctl, R_ROOM)
        return
    ctl[D_MADE_N] = 0
    ids = np.sort(retired[:n])
    i = 0
    while i < n:
        j = i + 1
        while j < n and ids[j] == ids[j - 1] + 1 and j - i < MAX_RETIRE_RUN:
            j += 1
        _log(gctl, log, t_end, OP_UNMAP_RETIRE, 0, 0, ids[i], j - i, 0, -1)
        i = j
    ctl[D_RETIRED_N] = 0


# --- Python: freeze, room, reading back -----------------------------------------------------
def end_epoch_rows(d: DomainArrays) -> int:
    """The most op-log rows ``end_epoch`` appends now."""
    return int(d.ctl[D_RETIRED_N])


def stale_bound_ns(d: DomainArrays) -> int:
    """DmaApi.stale_bound_ns."""
    return int(d.ctl[D_STALE_BOUND])


def last_unmapped(d: DomainArrays) -> int | None:
    """DmaApi.last_unmapped of the domain's device (VmAgent.last_unmapped)."""
    v = int(d.ctl[D_LAST_UNMAPPED])
    return None if v < 0 else v


def _pow2(n: int) -> int:
    return 1 << max(4, (int(n) - 1).bit_length())


def _iova_arrays(dom, slack: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kernels/iova.py's (tree, st, mag) of a plain IovaDomain + IovaRcache."""
    iovad, rc = dom.iovad, dom.rcache
    los = iovad._los
    n = len(los)
    cap = _pow2(2 * (n + slack))
    tree = np.zeros((cap, kiova.TREE_COLS), np.int64)
    base = (cap - n) // 2
    anchor = kiova.ANCHOR
    for k, lo in enumerate(los):
        hi = iovad._hi[lo]
        tree[base + k] = (anchor if lo == IOVA_ANCHOR else lo,
                          anchor if hi == IOVA_ANCHOR else hi, int(lo in iovad._rcached))
    st = np.zeros(kiova.ST_LEN, np.int64)

    def unanchor(x: int) -> int:
        return anchor if x == IOVA_ANCHOR else x
    st[kiova.S_NODES], st[kiova.S_BASE] = n, base
    st[kiova.S_CACHED], st[kiova.S_CACHED32] = (unanchor(iovad.cached_node),
                                                unanchor(iovad.cached32_node))
    st[kiova.S_MAX32], st[kiova.S_START_PFN] = iovad.max32_alloc_size, iovad.start_pfn
    st[kiova.S_DMA32] = iovad.dma_32bit_pfn
    st[kiova.S_TREE_ALLOCS], st[kiova.S_TREE_FREES] = iovad.tree_allocs, iovad.tree_frees
    st[kiova.S_FAILURES], st[kiova.S_HITS] = iovad.failures, rc.rcache_hits
    st[kiova.S_MISSES], st[kiova.S_DEPOT_PUSHES] = rc.rcache_misses, rc.depot_pushes
    st[kiova.S_DEPOT_POPS], st[kiova.S_DEPOT_OVERFLOWS] = rc.depot_pops, rc.depot_overflows
    st[kiova.S_FLUSHES], st[kiova.S_CACHED_IOVAS] = rc.rcache_flushes, len(iovad._rcached)
    mag = kiova.new_magazines(st, rc.cpus)

    def put(row: int, pfns: list[int]) -> None:
        mag[row, 0] = len(pfns)
        mag[row, 1:1 + len(pfns)] = pfns
    for cpu in range(rc.cpus):
        for order in range(kiova.CLASSES):
            put(kiova.mag_row(cpu, 0, order), rc._loaded[cpu][order])
            put(kiova.mag_row(cpu, 1, order), rc._prev[cpu][order])
    for order in range(kiova.CLASSES):
        depot = rc._depot[order]
        st[kiova.S_DEPOT + order] = len(depot)
        for k, m in enumerate(depot):
            put(kiova.depot_row(rc.cpus, order, k), m)
    return tree, st, mag


def freeze(agent, slack: int = _SLACK) -> DomainArrays:
    """The DomainArrays of ``agent``'s one domain (a VmAgent after setup(); its own state is
    copied, not shared), with room for about ``slack`` more pages, ids and tables in each
    array. Pass-through, nested or shadow, one device, no PASID besides 0; under shadow the
    VMM's shadow of the device (ShadowVmm.shadowed) is copied too."""
    dma = agent.dma
    if agent.mode not in ("passthrough", "nested", "shadow"):
        raise ValueError(f"compiled DMA API: mode {agent.mode!r} stays on the Python path")
    if len(agent.devices) != 1 or agent.pasid_devices:
        raise ValueError("compiled DMA API: one device and its PASID 0 only")
    sid = agent.devices[0].sid
    ctl = np.zeros(D_LEN, np.int64)
    ctl[D_TIMER_NS] = -1
    ctl[D_TIMER_CPU] = -1
    last = dma.last_unmapped.get(sid)
    ctl[D_LAST_UNMAPPED] = -1 if last is None else last
    ctl[D_NEXT_UNMAP_ID] = dma.next_unmap_id
    ctl[D_STALE_BOUND] = dma.stale_bound_ns
    ctl[D_SID] = sid
    ctl[D_ATS] = int(bool(dma.ats))
    costs = np.array([getattr(agent.costs, f) for f in COST_FIELDS], np.int64)
    z1 = np.zeros(1, np.int64)
    z2 = np.zeros((1, 2), np.int64)
    if agent.mode == "passthrough":
        ctl[D_MODE] = MODE_PASSTHROUGH
        return DomainArrays(ctl, costs, np.zeros((1, kiova.TREE_COLS), np.int64), z1,
                            np.zeros((1, kiova.MAG_COLS), np.int64), z1, z1, z1,
                            np.zeros((1, PG_COLS), np.int64), z2, z1, z2, *_no_shadow())
    dom = dma.domains[sid]
    if agent.mode == "shadow":
        ctl[D_MODE] = MODE_SHADOW
        sh, sr = _shadow_arrays(agent, dom, slack)
    else:
        ctl[D_MODE] = MODE_NESTED
        sh, sr, _ws = _no_shadow()
    store = dom.table.store
    if agent.mem.table_residue or store.zeroing is not None:
        raise ValueError("compiled DMA API: a freed table page awaits its zeroing stores")
    if dom.pasid != NO_PASID:
        raise ValueError("compiled DMA API: the device's PASID 0 domain only")
    ctl[D_PCI32] = int(dom.pci_32bit_workaround)
    ctl[D_LIMIT_PFN] = dom.limit_pfn
    ctl[D_PASID] = dom.pasid
    ctl[D_DID] = dom.did
    ctl[D_LEVELS] = dom.table.levels
    if dom.fq is not None:
        ctl[D_LAZY] = 1
        fq = dom.fq._st.copy()
    else:
        fq = z1.copy()
    tree, ist, mag = _iova_arrays(dom, slack)
    # the table slab, with a row per guest frame and spare rows
    state = store.state
    frames, rows, events = (int(x) for x in state[:kpg.H_STAMP])
    pt = kpg.grown(state, max(frames, agent.mem.frames), rows + slack, events)
    rows_free = np.zeros(len(store._free_rows) + slack, np.int64)
    rows_free[:len(store._free_rows)] = store._free_rows
    ctl[D_FREE_ROWS_N] = len(store._free_rows)
    ctl[D_NEXT_ROW] = store._next_row
    # per-page bookkeeping
    pages: dict[int, list[int]] = {}

    def entry(p: int) -> list[int]:
        e = pages.get(p)
        if e is None:
            e = pages[p] = [p, 0, -1, -1, -1]
        return e
    for (key, p) in dma.mapped_pages:
        if key == sid:
            entry(p)[P_MAPPED] = 1
    for (key, p), uid in dma.unmap_id_of.items():
        if key == sid:
            entry(p)[P_TAG] = uid
    for p, m in dom.mappings.items():
        entry(p)[P_MPAGES] = m.pages
    for p, t in dom.freed_ns.items():
        entry(p)[P_FREED] = t
    pg = np.full((_pow2(4 * (len(pages) + slack)), PG_COLS), -1, np.int64)
    for e in pages.values():
        s = _h_find(pg, e[0])
        pg[-1 - s] = e
    ctl[D_PG_N] = len(pages)
    tg = np.full((_pow2(4 * (len(dma.pages_tagged) + slack)), TG_COLS), -1, np.int64)
    for uid, n in dma.pages_tagged.items():
        tg[-1 - _h_find(tg, uid)] = (uid, n)
    ctl[D_TG_N] = len(dma.pages_tagged)
    retired = np.zeros(len(dma.retired) + 16 * slack, np.int64)
    retired[:len(dma.retired)] = dma.retired
    ctl[D_RETIRED_N] = len(dma.retired)
    pairs = [(p, s) for p, seqs in agent._made.items() for s in seqs]
    made = np.zeros((len(pairs) + slack, 2), np.int64)
    if pairs:
        made[:len(pairs)] = pairs
    ctl[D_MADE_N] = len(pairs)
    ctl[D_SH_N], ctl[D_SR_N] = _shadow_counts(sh, sr)
    return DomainArrays(ctl, costs, tree, ist, mag, pt, rows_free, fq, pg, tg, retired, made,
                        sh, sr, np.zeros(WS_LEN, np.int64))


def _no_shadow() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sh, sr, ws) of a domain without a shadow: empty, never used."""
    return (np.full((1, SH_COLS), -1, np.int64), np.full((1, SR_COLS), -1, np.int64),
            np.zeros(1, np.int64))


def _shadow_counts(sh: np.ndarray, sr: np.ndarray) -> tuple[int, int]:
    return int((sh[:, 0] >= 0).sum()), int((sr[:, 0] >= 0).sum())


def _shadow_arrays(agent, dom, slack: int) -> tuple[np.ndarray, np.ndarray]:
    """(sh, sr) of the VMM's shadow of ``dom``'s device: ShadowVmm as built (its walk over
    a 4-KiB-only second-level table in the plain store, the vIOMMU fetching), else
    ValueError."""
    from host_iommu.pgtable import SL_PS
    from vm_agent.vmm import ShadowVmm
    table = dom.table
    if type(agent.vmm) is not ShadowVmm or not agent.viommu.caching_mode:
        raise ValueError("compiled DMA API: shadow needs the plain ShadowVmm, caching mode")
    if agent.viommu.iqe or agent.viommu.queued:
        raise ValueError("compiled DMA API: the vIOMMU's queue is in error or holds work")
    if (table.fmt != "sl" or table.max_order != 0 or not table._kernel
            or int(table.store.state[kpg.H_PS]) != SL_PS or table.limit != 1 << (
                PAGE_SHIFT + 9 * table.levels)):
        raise ValueError("compiled DMA API: shadow of a 4-KiB second-level table only")
    tree = agent.vmm.shadowed.get(dom.sid, {})
    regions: dict[int, int] = {}
    for p in tree:
        regions[p >> 9] = regions.get(p >> 9, 0) + 1
    sh = np.full((_pow2(4 * (len(tree) + slack)), SH_COLS), -1, np.int64)
    for p, (phys, write) in tree.items():
        sh[-1 - _h_find(sh, p)] = (p, phys, int(write))
    sr = np.full((_pow2(4 * (len(regions) + slack)), SR_COLS), -1, np.int64)
    for r, n in regions.items():
        sr[-1 - _h_find(sr, r)] = (r, n)
    return sh, sr


def shadowed(d: DomainArrays) -> dict[int, tuple[int, bool]]:
    """What the VMM shadowed of the device (ShadowVmm.shadowed[sid]'s items), read back."""
    return {int(p): (int(ph), bool(w)) for p, ph, w in d.sh.tolist() if p >= 0}


def _grow_hash(rep: dict, name: str, table: np.ndarray, n: int, extra: int,
               slack: int) -> None:
    """``rep[name]``: an open-addressing table of n entries rehashed into a larger one when
    n + extra more would fill it past half."""
    if 2 * (n + extra) > table.shape[0]:
        new = np.full((_pow2(max(4 * (n + slack), 2 * (n + extra))), table.shape[1]), -1,
                      np.int64)
        _rehash(table, new)
        rep[name] = new


def grown(d: DomainArrays, slack: int = _SLACK) -> DomainArrays:
    """``d`` with every array ``room_ok`` checks grown to leave room for one call and about
    ``slack`` more (same dtypes and C order, so no kernel compiles again); ``d`` itself when
    nothing was short."""
    ctl = d.ctl
    if ctl[D_MODE] == MODE_PASSTHROUGH:
        return d
    rep = {}
    _grow_hash(rep, "pg", d.pg, int(ctl[D_PG_N]), MAX_PAGES + 1, slack)
    _grow_hash(rep, "tg", d.tg, int(ctl[D_TG_N]), 2, slack)
    n = int(ctl[D_RETIRED_N])
    if n + MAX_PAGES + 1 > d.retired.shape[0]:
        r = np.zeros(max(2 * d.retired.shape[0], n + MAX_PAGES + 1) + slack, np.int64)
        r[:n] = d.retired[:n]
        rep["retired"] = r
    n = int(ctl[D_MADE_N])
    if n + 2 * int(ctl[D_LEVELS]) + 2 > d.made.shape[0]:
        m = np.zeros((max(2 * d.made.shape[0], n + 2 * int(ctl[D_LEVELS]) + 2) + slack, 2),
                     np.int64)
        m[:n] = d.made[:n]
        rep["made"] = m
    n, base = int(d.ist[kiova.S_NODES]), int(d.ist[kiova.S_BASE])
    if n + 2 > d.tree.shape[0]:
        tree = np.zeros((_pow2(2 * (n + slack) + 2), kiova.TREE_COLS), np.int64)
        nb = (tree.shape[0] - n) // 2
        tree[nb:nb + n] = d.tree[base:base + n]
        d.ist[kiova.S_BASE] = nb
        rep["tree"] = tree
    rows = int(d.pt[kpg.H_ROWS])
    if int(ctl[D_FREE_ROWS_N]) + rows - int(ctl[D_NEXT_ROW]) < 2 * int(ctl[D_LEVELS]):
        frames, events = int(d.pt[kpg.H_FRAMES]), int(d.pt[kpg.H_EVENTS])
        rep["pt"] = kpg.grown(d.pt, frames, 2 * rows + 2 * int(ctl[D_LEVELS]) + slack, events)
    if ctl[D_MODE] == MODE_SHADOW:
        _grow_hash(rep, "sh", d.sh, int(ctl[D_SH_N]), MAX_PAGES + 1, slack)
        _grow_hash(rep, "sr", d.sr, int(ctl[D_SR_N]), 3, slack)
    if ctl[D_LAZY] and not _fq_room(d.fq):
        st = d.fq
        rings = int(st[kfq.S_RINGS])
        rcap, icap, fcap = int(st[kfq.S_RCAP]), int(st[kfq.S_ICAP]), int(st[kfq.S_FCAP])
        held = max(int(st[kfq.HEADER + rings + r] - st[kfq.HEADER + r]) for r in range(rings))
        while held + 1 > rcap:
            rcap *= 2
        while int(st[kfq.S_IN_TAIL] - st[kfq.S_IN_HEAD]) + 1 > icap:
            icap *= 2
        while int(st[kfq.S_FINISH_CNT]) + 2 - int(st[kfq.S_FINISH_BASE]) > fcap:
            fcap *= 2
        rep["fq"] = kfq.regrow(st, rcap, icap, fcap)
    return d._replace(**rep) if rep else d


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel above once, on a tiny nested lazy
    domain: the types are the same in every mode, so one signature serves them all."""
    from host_iommu.costs import CostModel
    from vm_agent.agent import VmAgent
    from vm_agent.kernels import guest as kg
    from workloads.base import Workload

    class _OneDevice(Workload):
        kind = "dmaapi_warm_up"

        def start(self, ctx) -> None:
            ctx.add_device("dev0")

    a = VmAgent(0, mode="nested", policy="lazy", flush_queue="percpu", vcpus=1,
                memory_bytes=16 << 20, fl_levels=4, ats=False,
                workload=_OneDevice(_OneDevice.Params()), churn=None, costs=CostModel(),
                seed=0)
    a.setup()
    g = kg.new_arrays(0, 1, a.mem.frames)
    kg.load_memory(g, a.mem)
    d = freeze(a)
    room_ok(g, d)
    gpa = int(g.ctl[kg.C_NEXT_FRAME]) << PAGE_SHIFT
    iova, t = dma_map(g, d, 0, gpa, PAGE_SIZE, 0, 0)
    unmap_tag(g, d, iova >> PAGE_SHIFT)
    t = dma_unmap(g, d, 0, iova, PAGE_SIZE, 0, t)
    fq_timer(g, d, 0)
    end_epoch(g, d, t)
    _rehash(d.pg, np.full((2 * d.pg.shape[0], PG_COLS), -1, np.int64))   # grown's
