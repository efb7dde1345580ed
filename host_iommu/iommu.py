"""HostIommu: one host's memory, VT-d remapping hardware and the host driver state around it.

Ties together what the hardware holds (root/context/PASID structures in memory, the IOTLB,
paging-structure caches, PASID and context caches, device-TLBs, the invalidation queue, the
fault log) and what the host kernel keeps per VM (its memory map and second-level table).
``translate`` is the hardware's DMA-remapping path for a batch of requests (VT-d spec 3.x
chapter 3, QEMU vtd_do_iommu_translate); invalidations apply at their modelled effect time
(``advance_to``), unlike QEMU which completes each descriptor inside the tail write.
The VMM-facing interfaces (VFIO-style shadow map/unmap, iommufd-style nested allocation and
invalidation) live in host_iommu/vfio.py and host_iommu/nested.py.

Batch semantics: a batch is one run of DMA requests with no table change or invalidation
between them. Every request looks up the caches as they were when the batch started; misses
for the same (DID, PASID, 4-KiB page, access) are coalesced into one walk (the first walks,
the others wait for it and count as IOTLB hits; with the IOTLB disabled they are misses that
walk themselves), and fills apply afterwards in request order.

The live path runs array state through compiled kernels (host_iommu/kernels/); with
``IommuParams.with_engine("reference")`` a host translates on the reference models instead
(host_iommu/refengine.py). Pending invalidations live in an array queue that the invalidation
queue's kernel appends to and one kernel applies (host_iommu/kernels/qiq.py); the reference
engine, or a reference queue put in place of qi.InvalidationQueue, keeps them as commands in
a heap applied by qi.apply, the description the kernel is tested against
(tests/host_iommu/test_kernel_qi.py). Module length (~860 lines): ``translate_numpy`` keeps
the batch steps spelled out in numpy beside the kernel call, as the description the kernel is
tested against (tests/host_iommu/test_kernel_translate.py), and both effect paths stay.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from host_iommu import qi, refengine
from host_iommu.costs import CostModel
from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    KIND_DATA,
    KIND_GUEST_TABLE,
    MAX_PASID,
    PAGE_SHIFT,
    PAGE_SIZE,
    RESULT_DTYPE,
    FaultReason,
    Stage,
)
from host_iommu.entrycache import ContextEntryCache, PasidEntryCache
from host_iommu.fault import FaultLog
from host_iommu.kernels import qiq as qk
from host_iommu.kernels.devtlb import DeviceTlbArrays
from host_iommu.kernels.entrycache import contexts_hit
from host_iommu.kernels.iotlb import LINE_FIELDS, IotlbArrays
from host_iommu.kernels.pwc import PwcArrays
from host_iommu.kernels.translate import (
    C_FL_LEVELS,
    C_FLPTR,
    C_PGTT,
    C_SL_LEVELS,
    C_SLPTR,
    C_SSADE,
    R_CTX,
    R_CTX_REFS,
    R_DID,
    R_DTE,
    R_FAULT,
    R_FPD,
    translate_batch,
)
from host_iommu.memory import HostMemory, HostMemoryError
from host_iommu.pasid import (
    ContextEntry,
    ContextResult,
    PasidEntry,
    ScalableModeTables,
    decode_pasid_entry,
)
from host_iommu.pgtable import HostTableStore, PageTable
from host_iommu.qi import InvalidationQueue, InvCommand, apply
from host_iommu.slbuild import build_second_level, uniform_backing
from host_iommu.walk import NO_PWC, WalkBatch, Walker

U64 = np.uint64
M64 = (1 << 64) - 1
GUEST_WRITE_LOOP_MAX = 32   # stores per call below which guest_write loops on ints
CONTEXT_LOOP_MAX = 256      # requests per batch below which the context stage loops on ints
NEVER = (1 << 63) - 1       # the effect time of "no pending effect"


@dataclass(frozen=True)
class IommuParams:
    """Hardware and host-driver parameters of one host (the `[host]` config table)."""

    memory_mib: int = 8192
    haw: int = 46
    iotlb_entries: int = 1024
    iotlb_ways: int = 8
    page_walk_cache: bool = True
    pwc_entries: int = 256
    pwc_ways: int = 4
    pasid_cache_entries: int = 64
    context_cache_entries: int = 64
    devtlb_entries: int = 64
    devtlb_ways: int = 4
    sl_page_order: int = 0
    sl_levels: int = 4
    fault_records: int = 256
    qi_entries: int = 256
    mamv: int = qi.QI_MAMV_DEFAULT  # CAP.MAMV: largest AM of a page-selective 0x2 (QEMU: 18)
    # The translate engine, not a config key: "fast" (compiled kernels over array state) or
    # "reference" (host_iommu/refengine.py: reference.py's walker and reference_cache.py's
    # caches, request by request). A class attribute, not a field, so that parameters built
    # field by field from the [host] table stay valid; ``with_engine`` switches it.
    engine: ClassVar[str] = "fast"

    def with_engine(self, engine: str) -> IommuParams:
        """The same parameters translating on ``engine`` ("fast" or "reference")."""
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: expected one of {ENGINES}")
        cls = ReferenceIommuParams if engine == "reference" else IommuParams
        return cls(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class ReferenceIommuParams(IommuParams):
    """IommuParams whose HostIommu translates on the reference engine."""

    engine: ClassVar[str] = "reference"


ENGINES = ("fast", "reference")


@dataclass
class VmMemory:
    """A VM's memory as the host sees it: GPA frame -> HPA frame, and its second level."""

    vm: int
    gpa_frames: int
    hpa_of: np.ndarray          # int64 per GPA frame, -1 where not backed (ballooned/unplugged)
    sl: PageTable               # GPA -> HPA, in host memory
    did: int                    # DID of the VM's second-level (pass-through) domain
    tags: list[tuple[str, int, int, int]] = field(default_factory=list)
    # cache tags derived from this second level: (kind, did, sid, pasid); kind "sl", "nested"
    # or "shadow"; one per (sid, pasid) binding, removed when the binding goes away
    pins: np.ndarray | None = None  # int32 per GPA frame: VFIO pins (vfio_map) held on it

    def __post_init__(self) -> None:
        if self.pins is None:
            self.pins = np.zeros(self.gpa_frames, dtype=np.int32)


@dataclass
class TranslateStats:
    translations: int = 0
    iotlb_hits: int = 0
    iotlb_misses: int = 0
    devtlb_hits: int = 0
    walk_refs: int = 0
    ctx_refs: int = 0
    faults: int = 0
    ad_writes: int = 0


def first_of_groups(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal key tuples: (position of each group's first member, ascending; the group
    index of every element). Vectorised: one lexsort, no Python loop over elements."""
    n = keys[0].size
    pos = np.arange(n)
    order = np.lexsort((pos, *reversed(keys)))
    new = np.zeros(n, dtype=bool)
    new[:1] = True
    for k in keys:
        ks = k[order]
        new[1:] |= ks[1:] != ks[:-1]
    start = np.maximum.accumulate(np.where(new, pos, 0))
    leader = np.empty(n, dtype=np.int64)
    leader[order] = order[start]
    firsts = np.flatnonzero(leader == pos)
    return firsts, np.searchsorted(firsts, leader)


@dataclass
class _Contexts:
    """A batch's context stage (columns: host_iommu/kernels/translate.py R_* and C_*).

    ``req`` int64[n, 6]: per request the context stage's fault (0 if none), its DID, whether
    its device caches translations (ATS, context fine), the row of its context, the structure
    fetches it pays, FPD. ``ctx`` uint64[rows, 6]: per resolved context the walk inputs of its
    PASID entry (PGTT, FLPTR, first-level levels, SLPTR, second-level levels, SSADE)."""

    req: np.ndarray
    ctx: np.ndarray


class CacheSet:
    """Every translation cache of one IOMMU, and what each invalidation drops from them.

    The qi.InvalidationTarget that qi.apply dispatches to. Keeping "who caches what" in one
    place (Linux cache.c keeps cache tags for the same reason) makes it visible that every
    descriptor reaches every cache that could hold something derived from what it names.
    """

    # The live caches: array state driven by compiled kernels (host_iommu/kernels/), with
    # the references' placement, LRU and batch semantics; context and PASID caches on
    # compiled kernels too, with the decoded entry beside each line (host_iommu/entrycache.py).
    # Order: IOTLB, paging-structure cache, PASID cache, context cache, device-TLB
    # (refengine.CACHE_KINDS gives the references).
    FAST_KINDS: ClassVar[tuple[type, ...]] = (IotlbArrays, PwcArrays, PasidEntryCache,
                                              ContextEntryCache, DeviceTlbArrays)

    def __init__(self, p: IommuParams, kinds: tuple[type, ...] | None = None) -> None:
        iotlb, pwc, pasidc, ctxc, dtlb = kinds or self.FAST_KINDS
        self.iotlb = iotlb(p.iotlb_entries, p.iotlb_ways)
        use_pwc = p.page_walk_cache and p.pwc_entries > 0
        self.fl_pwc = pwc(p.pwc_entries, p.pwc_ways, "fl") if use_pwc else None
        self.sl_pwc = pwc(p.pwc_entries, p.pwc_ways, "sl") if use_pwc else None
        self.pasidc = pasidc(p.pasid_cache_entries, min(4, p.pasid_cache_entries) or 1)
        self.ctxc = ctxc(p.context_cache_entries, min(4, p.context_cache_entries) or 1)
        self.dtlb = dtlb(p.devtlb_entries, p.devtlb_ways)

    def _pwcs(self):
        return [c for c in (self.fl_pwc, self.sl_pwc) if c is not None]

    def iotlb_global(self) -> None:
        self.iotlb.inv_global()
        for pwc in self._pwcs():
            pwc.inv_global()

    def iotlb_domain(self, did: int) -> None:
        self.iotlb.inv_domain(did)
        for pwc in self._pwcs():
            pwc.inv_domain(did)

    def iotlb_page(self, did: int, addr: int, am: int, ih: bool) -> None:
        self.iotlb.inv_page(did, addr, am, int(ih))
        if not ih and self.sl_pwc is not None:
            self.sl_pwc.inv_range(did, None, addr, am)
        if not ih and self.fl_pwc is not None:
            # first-level structures of nested translations over this second level
            self.fl_pwc.inv_domain(did)

    def piotlb_pasid(self, did: int, pasid: int) -> None:
        self.iotlb.inv_pasid(did, pasid)
        if self.fl_pwc is not None:
            self.fl_pwc.inv_pasid(did, pasid)

    def piotlb_page(self, did: int, pasid: int, addr: int, am: int, ih: bool) -> None:
        self.iotlb.inv_pasid_page(did, pasid, addr, am, int(ih))
        if not ih and self.fl_pwc is not None:
            self.fl_pwc.inv_range(did, pasid, addr, am)

    def pasid_cache(self, gran: int, did: int, pasid: int) -> None:
        if gran == qi.QI_PC_GLOBAL:
            self.pasidc.inv_global()
        elif gran == qi.QI_PC_PASID_SEL:
            self.pasidc.inv_pasid(did, pasid)
        else:
            self.pasidc.inv_domain(did)

    def context_cache(self, gran: int, did: int, sid: int, fm: int) -> None:
        if gran == qi.QI_CC_GRAN_DEVICE:
            self.ctxc.inv_device(sid, fm)
            self.pasidc.inv_sid(sid)
        else:  # scalable-mode context entries carry no DID: domain-selective drops all
            self.ctxc.inv_global()
            self.pasidc.inv_global()

    def devtlb(self, sid: int, pasid: int | None, addr: int, size_bytes: int) -> None:
        self.dtlb.inv(sid, pasid, addr, size_bytes)

    def iec(self, gran: int, iidx: int, im: int) -> None:
        """Interrupt entry cache: interrupt remapping is not emulated."""


# The invalidations the effect kernel (kernels/qiq.py _advance) dispatches itself, as these
# CacheSet methods do. A host whose CacheSet has any of them replaced (a test injecting a bug,
# as tests/fuzz/test_checker.py does) applies its effects through qi.apply instead, so that
# the replacement is what runs.
KERNEL_DISPATCH = {name: CacheSet.__dict__[name] for name in (
    "iotlb_global", "iotlb_domain", "iotlb_page", "piotlb_pasid", "piotlb_page", "devtlb",
    "iec")}


class HostIommu:
    """One host: memory, VMs' second levels, remapping hardware. Knows nothing of Ray."""

    def __init__(self, params: IommuParams | None = None, costs: CostModel | None = None,
                 host: int = 0) -> None:
        self.p = params or IommuParams()
        self.costs = costs or CostModel()
        self.host = host
        frames = (self.p.memory_mib << 20) >> PAGE_SHIFT
        self.mem = HostMemory(frames)
        self.sm = ScalableModeTables(self.mem)
        p = self.p
        self.caches = CacheSet(p, refengine.CACHE_KINDS if p.engine == "reference" else None)
        c = self.caches
        self.iotlb, self.fl_pwc, self.sl_pwc = c.iotlb, c.fl_pwc, c.sl_pwc
        if p.engine == "reference":
            self.walker = refengine.make_walker(self, c)
        else:
            self.walker = Walker(self.mem, p.haw, self.fl_pwc, self.sl_pwc)
        self.qi = InvalidationQueue(p.qi_entries, self.costs, mamv=p.mamv)
        self.faults = FaultLog(p.fault_records)
        self.vms: dict[int, VmMemory] = {}
        self.owner_of_sid: dict[int, int] = {}
        self.ats_sids: set[int] = set()
        self.stats = TranslateStats()
        # Invalidations waiting for their effect time. Live: rows of an array queue
        # (kernels/qiq.py's pend) that the queue's kernel appends to and _advance applies.
        # On the reference engine, or with a queue other than qi.InvalidationQueue (the
        # reference queue of tests/system/test_qi_reference_run.py), or with CacheSet methods
        # replaced (KERNEL_DISPATCH): a heap of (effect time, seq, command) applied by
        # qi.apply.
        self._array_effects = (p.engine == "fast" and type(self.qi) is qi.InvalidationQueue
                               and all(getattr(type(self.caches), name) is f
                                       for name, f in KERNEL_DISPATCH.items()))
        self._effects = qi.new_effects()
        self._pending: list[tuple[int, int, InvCommand]] = []
        self._pending_seq = 0
        self._next_effect_ns = NEVER      # the earliest pending effect time, NEVER if none
        self._no_pwc = (np.zeros((len(LINE_FIELDS), 0, 1), U64), np.zeros(6, np.int64))
        self._deferred_free: list[tuple[int, int, list[int]]] = []  # (t, seq, table frames)
        self._next_did = 1
        self.now_ns = 0

    # --- domains and VMs ------------------------------------------------------------------
    def alloc_did(self) -> int:
        did = self._next_did
        self._next_did += 1
        if did > 0xFFFF:
            raise RuntimeError("domain ids exhausted (16-bit DID)")
        return did

    def create_vm(self, vm: int, memory_bytes: int, sl_levels: int | None = None,
                  sl_page_order: int | None = None) -> VmMemory:
        """Give VM ``vm`` its memory and a second level mapping all of it (GPA 0..size)."""
        if vm in self.vms or vm < 1:
            raise ValueError(f"VM id {vm} is taken or invalid (ids start at 1)")
        order = self.p.sl_page_order if sl_page_order is None else sl_page_order
        levels = self.p.sl_levels if sl_levels is None else sl_levels
        chunk = 1 << (9 * order)                       # frames per second-level page
        gpa_frames = -(-(memory_bytes >> PAGE_SHIFT) // chunk) * chunk
        # data frames plus the second level's tables (a leaf table per 512 pages, a few more)
        need = gpa_frames + gpa_frames // 256 + 4 * levels
        if gpa_frames <= 0 or need > self.mem.free_frames:
            raise HostMemoryError(f"VM {vm}: {memory_bytes} bytes of memory, host has "
                                  f"{self.mem.free_frames} free 4-KiB frames")
        hpa_of = np.full(gpa_frames, -1, dtype=np.int64)
        store = HostTableStore(self.mem, 0, defer_free=True)
        sl = PageTable(store, "sl", levels, self.p.haw, max_order=order)
        try:
            if chunk == 1:
                hpa_of[:] = self.mem.alloc_frames(gpa_frames, vm, KIND_DATA)
            else:
                for i in range(0, gpa_frames, chunk):
                    base = self.mem.alloc_contiguous(chunk, vm, align=chunk, kind=KIND_DATA)
                    hpa_of[i:i + chunk] = np.arange(base, base + chunk)
            if uniform_backing(hpa_of, order):
                build_second_level(sl, hpa_of, order)   # same tables, numpy writes
            else:
                self._map_sl_runs(sl, hpa_of, 0, gpa_frames, order)
        except HostMemoryError:  # e.g. no contiguous run left: give back what was taken
            sl.destroy()
            self.mem.free(store.take_freed())   # never used by a translation: free at once
            self.mem.free(hpa_of[hpa_of >= 0])
            raise
        vmm = VmMemory(vm, gpa_frames, hpa_of, sl, self.alloc_did())
        self.vms[vm] = vmm
        return vmm

    @staticmethod
    def _map_sl_runs(sl: PageTable, hpa_of: np.ndarray, start: int, end: int,
                     order: int) -> int:
        """Map GPA frames [start, end) by runs of physically contiguous frames."""
        writes = 0
        frames = hpa_of[start:end]
        if frames.size == 0:
            return 0
        breaks = np.flatnonzero((np.diff(frames) != 1) | (frames[1:] < 0) | (frames[:-1] < 0))
        bounds = [0, *(breaks + 1).tolist(), frames.size]
        for a, b in itertools.pairwise(bounds):
            if frames[a] < 0:
                continue
            f = start + a
            writes += sl.map(f << PAGE_SHIFT, int(frames[a]) << PAGE_SHIFT,
                             (b - a) << PAGE_SHIFT, max_order=order)
        return writes

    def attach_device(self, sid: int, vm: int, *, ats: bool = False, fpd: bool = False) -> None:
        """Assign device ``sid`` to ``vm`` (VFIO device open): context entry + PASID dir."""
        self.sm.attach_device(sid, fpd=fpd, dte=ats)
        self.owner_of_sid[sid] = vm
        if ats:
            self.ats_sids.add(sid)

    def set_pasid_entry(self, sid: int, pasid: int, entry: PasidEntry) -> None:
        self.sm.set_pasid_entry(sid, pasid, entry)
        # the driver's PASID-cache flush after programming (Linux pasid_flush_caches); a
        # re-programmed entry may have been cached under its old DID
        self.caches.pasidc.inv_entry(sid, pasid)

    def gpa_to_hpa(self, vm: int, gpa: int) -> int | None:
        """The VMM's (and KVM's) view of guest memory: None if not backed."""
        v = self.vms[vm]
        f = gpa >> PAGE_SHIFT
        if f < 0 or f >= v.gpa_frames or v.hpa_of[f] < 0:
            return None
        return (int(v.hpa_of[f]) << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1))

    # --- guest memory writes (the guest's own page tables) ---------------------------------
    def guest_write(self, vm: int, gpa: np.ndarray, value: np.ndarray) -> int:
        """Guest CPU stores of 64-bit values at GPAs (its first-level table entries).

        Returns how many were dropped because the GPA is not backed (a guest bug: the store
        goes nowhere, as a store to unbacked memory would fault the vCPU, not the IOMMU).
        """
        v = self.vms[vm]
        n = len(gpa)
        if n > GUEST_WRITE_LOOP_MAX:
            return self._guest_write_batch(v, gpa, value)
        # A few stores (the usual case: one PTE per map): plain ints, no numpy per store.
        frames, hpa_of = v.gpa_frames, v.hpa_of
        stores = []
        for g, val in zip(np.asarray(gpa).tolist(), np.asarray(value).tolist(), strict=True):
            g &= M64                      # as the uint64 cast of the batch path
            f = g >> PAGE_SHIFT
            if f < frames:
                hf = int(hpa_of[f])
                if hf >= 0:
                    stores.append((hf, (g >> 3) & 511, val & M64))
        mem = self.mem
        slot_of = mem.slot_of
        for frame in sorted({hf for hf, _, _ in stores}):   # np.unique's order
            if slot_of[frame] < 0:
                mem.table(frame)
                mem.kind[frame] = KIND_GUEST_TABLE
        slab = mem.slab   # after any growth above
        for hf, idx, val in stores:
            slab[slot_of[hf], idx] = val
        mem.pte_writes += len(stores)
        return n - len(stores)

    def _guest_write_batch(self, v: VmMemory, gpa: np.ndarray, value: np.ndarray) -> int:
        """guest_write of many stores at once, with numpy."""
        f = (np.asarray(gpa, dtype=U64) >> U64(PAGE_SHIFT)).astype(np.int64)
        ok = (f < v.gpa_frames)
        ok[ok] &= v.hpa_of[f[ok]] >= 0
        hf = v.hpa_of[np.where(ok, f, 0)]
        for frame in np.unique(hf[ok]).tolist():
            if not self.mem.has_table(frame):
                self.mem.table(frame)
                self.mem.kind[frame] = KIND_GUEST_TABLE
        slots = self.mem.slot_of[hf[ok]]
        idx = ((np.asarray(gpa, dtype=U64)[ok] >> U64(3)) & U64(511)).astype(np.int64)
        self.mem.slab[slots, idx] = np.asarray(value, dtype=U64)[ok]
        self.mem.pte_writes += int(ok.sum())
        return int((~ok).sum())

    # --- invalidation timing ----------------------------------------------------------------
    def submit_qi(self, descs: np.ndarray, t_ns: int) -> tuple[int, int]:
        """Host driver submits descriptors (qi_submit_sync): schedules their effects.

        A submission larger than the queue goes in chunks that fit, each ending with its own
        wait and submitted once the previous one completed (qi_submit_sync is synchronous, and
        cache.c's qi_batch flushes a full batch the same way); before each chunk the driver
        spins until enough slots are free. Returns (completion time of the last wait or of
        the last descriptor, descriptors processed). ``descs``: DESC_DTYPE[n] (or, on the
        live queue, uint64[n, 4]).
        """
        if not self._array_effects:
            return self._submit_qi_commands(descs, t_ns)
        processed = 0
        q = self.qi
        for chunk in self._qi_chunks(descs):
            status, n, t_at, t_done, _code, self._effects = q.submit_effects(
                chunk, t_ns, self._effects)
            if status != qk.S_OK:  # the host driver's own descriptors are well-formed
                err = q.error_result(chunk, status, n, t_at)
                self._sync_next_effect()
                q.clear_iqe()
                raise RuntimeError(f"host QI rejected its own descriptor: {err}")
            t_ns = t_done
            processed += n
        if self._next_effect_ns == NEVER:  # else the earliest effect is still the same one
            self._sync_next_effect()
        return t_ns, processed

    def _submit_qi_commands(self, descs: np.ndarray, t_ns: int) -> tuple[int, int]:
        """submit_qi with the queue's SubmitResult: commands kept in the heap."""
        processed = 0
        for chunk in self._qi_chunks(descs):
            t_ns = self.qi.room_at(t_ns, len(chunk))
            res = self.qi.submit(chunk, t_ns)
            for t_eff, cmd in res.commands:
                heapq.heappush(self._pending, (t_eff, self._pending_seq, cmd))
                self._pending_seq += 1
            if res.error is not None:  # the host driver's own descriptors are well-formed
                self._sync_next_effect()
                self.qi.clear_iqe()
                raise RuntimeError(f"host QI rejected its own descriptor: {res.error}")
            t_ns = max([t_ns, *res.wait_done_ns, *(t for t, _ in res.commands)])
            processed += res.processed
        self._sync_next_effect()
        return t_ns, processed

    def _sync_next_effect(self) -> None:
        if not self._array_effects:
            self._next_effect_ns = self._pending[0][0] if self._pending else NEVER
            return
        e = self._effects
        first = e[0, qk.P_FIRST]
        self._next_effect_ns = int(e[first, qk.E_T]) if first < e[0, qk.P_END] else NEVER

    def _qi_chunks(self, descs: np.ndarray) -> list[np.ndarray]:
        """Split a submission into pieces the queue can hold, each ending with a wait."""
        room = self.qi.entries - 1
        if len(descs) <= room:
            return [descs]
        is_wait = np.array([qi.desc_type(int(w)) == qi.QI_IWD_TYPE for w in descs["qw0"]],
                           dtype=bool)
        body = descs[~is_wait]
        wait = qi.descs(qi.wait_desc())
        return [np.concatenate([body[i:i + room - 1], wait])
                for i in range(0, len(body), room - 1)]

    def free_after(self, frames: list[int], t_ns: int) -> None:
        """Give table frames back to the allocator once the flush completing at t_ns took
        effect (their page-structure cache entries are gone by then)."""
        if frames:
            heapq.heappush(self._deferred_free, (t_ns, self._pending_seq, list(frames)))
            self._pending_seq += 1

    def advance_to(self, t_ns: int) -> None:
        """Apply every invalidation whose effect time is <= t_ns, in time order; then free
        the table frames whose flush has completed by t_ns."""
        if self._next_effect_ns <= t_ns:
            self._apply_effects(t_ns)
        while self._deferred_free and self._deferred_free[0][0] <= t_ns:
            self.mem.free(heapq.heappop(self._deferred_free)[2])
        self.now_ns = max(self.now_ns, t_ns)

    def _apply_effects(self, t_ns: int) -> None:
        """The pending invalidations with effect time <= t_ns, in (time, submission) order:
        live, by the compiled kernel (kernels/qiq.py _advance), which hands the context- and
        PASID-cache ones (Python caches) back one at a time; else by qi.apply."""
        if not self._array_effects:
            while self._pending and self._pending[0][0] <= t_ns:
                apply(heapq.heappop(self._pending)[2], self.caches)
            self._sync_next_effect()
            return
        c = self.caches
        fl = self._no_pwc if c.fl_pwc is None else (c.fl_pwc.state, c.fl_pwc.counts)
        sl = self._no_pwc if c.sl_pwc is None else (c.sl_pwc.state, c.sl_pwc.counts)
        t_ns = min(int(t_ns), NEVER)
        while True:
            e = self._effects
            row, t_next = qk._advance(e, t_ns, c.iotlb.state, c.iotlb.counts, fl[0], fl[1],
                                      sl[0], sl[1], c.dtlb.state, c.dtlb.counts)
            if row < 0:
                break
            gran, did, pasid = int(e[row, qk.E_GRAN]), int(e[row, qk.E_DID]), int(
                e[row, qk.E_PASID])
            if e[row, qk.E_TYPE] == qi.QI_PC_TYPE:
                c.pasid_cache(gran, did, pasid)
            else:
                c.context_cache(gran, did, int(e[row, qk.E_SID]), int(e[row, qk.E_FM]))
            e[0, qk.P_FIRST] = row + 1
        self._next_effect_ns = NEVER if t_next < 0 else int(t_next)

    def next_effect_ns(self) -> int | None:
        return None if self._next_effect_ns == NEVER else self._next_effect_ns

    def drain(self) -> None:
        """Apply all pending invalidations now (end of run / tests), then free what waited."""
        self._apply_effects(NEVER)
        while self._deferred_free:
            self.mem.free(heapq.heappop(self._deferred_free)[2])

    # --- translation ------------------------------------------------------------------------
    def _resolve(self, sid: int, pasid: int) -> ContextResult:
        """Root, context and PASID entries of one (sid, pasid), through the caches."""
        refs = 0
        caches = self.caches
        ce = caches.ctxc.lookup(sid)
        if ce is None:
            ce, fault, refs = self.sm.fetch_context(sid)
            if ce is None:
                return ContextResult(None, fault, refs)
            # the cache holds the entry's words; a hit decodes them (done once, here)
            caches.ctxc.fill(sid, ContextEntry.decode(*ce.words()))
        decoded = caches.pasidc.lookup(sid, pasid)
        if decoded is not None:
            if isinstance(decoded, FaultReason):
                return ContextResult(None, decoded, refs, ce.fpd, ce.dte)
            return ContextResult(decoded, FaultReason.NONE, refs, ce.fpd or decoded.fpd, ce.dte)
        entry, fault, more, fpd = self.sm.fetch_pasid_entry(ce, pasid)
        if entry is not None:
            caches.pasidc.fill(sid, pasid, entry.did, decode_pasid_entry(entry.encode()))
        return ContextResult(entry, fault, refs + more, fpd, ce.dte)

    def translate(self, sid: np.ndarray, pasid: np.ndarray, addr: np.ndarray,
                  access: np.ndarray, t_ns: np.ndarray | None = None) -> np.ndarray:
        """Translate a batch of DMA requests (each within one 4-KiB page).

        Returns a RESULT_DTYPE array. Faults are recorded in the fault log (unless FPD).
        The context stage runs here; the rest of the batch (device-TLB, IOTLB, coalesced
        walks, fills) is one compiled kernel (host_iommu/kernels/translate.py) doing what
        ``translate_numpy`` spells out step by step. On the reference engine,
        host_iommu/refengine.py translates the batch instead.
        """
        if self.p.engine == "reference":
            return refengine.translate(self, sid, pasid, addr, access, t_ns)
        # contiguous: the kernel is compiled (and cached) for C-layout arrays; a strided
        # column (a field of an op batch) would compile a second specialisation mid-run
        sid = np.ascontiguousarray(sid, dtype=np.int64)
        pasid = np.ascontiguousarray(pasid, dtype=np.int64)
        addr = np.ascontiguousarray(addr, dtype=U64)
        access = np.ascontiguousarray(access, dtype=np.uint8)
        n = sid.size
        out = np.zeros(n, dtype=RESULT_DTYPE)
        if n == 0:
            return out
        cx = self._contexts(sid, pasid)
        fl, sl = self.fl_pwc, self.sl_pwc
        mem, w = self.mem, self.walker
        res, devtlb_hit = translate_batch(
            sid, pasid, addr, access, cx.req, cx.ctx, self.iotlb.state, self.iotlb.counts,
            self.caches.dtlb.state, self.caches.dtlb.counts, mem.slab, mem.slot_of, w.haw,
            w.amask, w.fl_rsvd, w.sl_rsvd, fl is not None, NO_PWC[0] if fl is None else fl.state,
            NO_PWC[1] if fl is None else fl.counts, sl is not None,
            NO_PWC[0] if sl is None else sl.state, NO_PWC[1] if sl is None else sl.counts, out)
        misses, ad, devtlb_hits, iotlb_hits, refs, faults = res.tolist()
        self.stats.ad_writes += ad
        self._account(out, sid, pasid, addr, access, t_ns, cx.req, (
            devtlb_hits, iotlb_hits, misses, refs, int(cx.req[:, R_CTX_REFS].sum()), faults))
        self.last_devtlb_hit = devtlb_hit
        return out

    def _contexts(self, sid: np.ndarray, pasid: np.ndarray) -> _Contexts:
        """Step 0-1 of a batch: malformed ids, then one resolution per distinct (sid, pasid)
        in ascending order, through the context and PASID caches; the first request of each
        pays its structure fetches. When every distinct (sid, pasid) hits both caches (the
        steady state) this is one kernel over the caches' numeric fields
        (kernels.entrycache.contexts_hit); otherwise it runs in Python, untouched."""
        n = sid.size
        c = self.caches
        if hasattr(c.ctxc, "vals") and hasattr(c.pasidc, "vals"):
            sid = np.ascontiguousarray(sid, dtype=np.int64)
            pasid = np.ascontiguousarray(pasid, dtype=np.int64)
            req = np.empty((n, 6), np.int64)
            ctx = np.empty((n + 1, 6), U64)
            rows = contexts_hit(sid, pasid, c.ctxc.st, c.ctxc.vals, c.pasidc.st, c.pasidc.vals,
                                req, ctx)
            if rows >= 0:
                return _Contexts(req, ctx[:rows + 1])
        if n > CONTEXT_LOOP_MAX:
            return self._contexts_numpy(sid, pasid)
        # A small batch: the same on plain ints (numpy's per-call cost dominated here).
        keys = []
        for s, p in zip(sid.tolist(), pasid.tolist(), strict=True):
            if not 0 <= s <= 0xFFFF:
                keys.append(-2)                       # ROOT_ENTRY_P
            elif not 0 <= p <= MAX_PASID:
                keys.append(-1)                       # PASID_DIR_ACCESS_ERR
            else:
                keys.append((s << 20) | p)
        row: dict[int, int] = {}
        ctx_rows = []
        for k in sorted({k for k in keys if k >= 0}):
            cr = self._resolve(k >> 20, k & MAX_PASID)
            e = cr.entry
            row[k] = len(ctx_rows)
            ctx_rows.append((cr, (0, 0, 4, 0, 4, 0) if e is None else (
                e.pgtt, e.flptr, e.fl_levels, e.slptr, e.sl_levels, int(e.ssade))))
        bad_row = len(ctx_rows)   # a row of defaults for malformed requests (never walked)
        req = []
        paid = set()
        for k in keys:
            if k < 0:
                req.append((FaultReason.ROOT_ENTRY_P if k == -2
                            else FaultReason.PASID_DIR_ACCESS_ERR, 0, 0, bad_row, 0, 0))
                continue
            u = row[k]
            cr = ctx_rows[u][0]
            req.append((cr.fault, 0 if cr.entry is None else cr.entry.did,
                        int(bool(cr.dte) and cr.fault == 0), u,
                        0 if k in paid else cr.ctx_refs, int(bool(cr.fpd))))
            paid.add(k)
        ctx = [c for _, c in ctx_rows]
        ctx.append((0, 0, 4, 0, 4, 0))
        return _Contexts(np.array(req, np.int64).reshape(n, 6),
                         np.array(ctx, U64).reshape(len(ctx), 6))

    def _contexts_numpy(self, sid: np.ndarray, pasid: np.ndarray) -> _Contexts:
        """``_contexts`` of a large batch, with numpy."""
        n = sid.size
        # 0. fields no request can carry: a source-id is 16 bits and a PASID 20 bits (the
        # PCIe PASID prefix). Such a request faults at the context stage; it never aliases
        # another (sid, pasid) through the resolution key.
        bad_sid = (sid < 0) | (sid > 0xFFFF)
        bad_pasid = ~bad_sid & ((pasid < 0) | (pasid > MAX_PASID))
        bad = bad_sid | bad_pasid
        # 1. context: one resolution per distinct (sid, pasid), first occurrence pays.
        key = np.where(bad, -1, (sid << 20) | pasid)
        uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
        nu = uniq.size
        pgtt = np.zeros(nu, np.uint8)
        did = np.zeros(nu, np.int64)
        flptr = np.zeros(nu, U64)
        fl_levels = np.full(nu, 4, np.uint8)
        slptr = np.zeros(nu, U64)
        sl_levels = np.full(nu, 4, np.uint8)
        ssade = np.zeros(nu, bool)
        cfault = np.zeros(nu, np.uint8)
        fpd = np.zeros(nu, bool)
        dte = np.zeros(nu, bool)
        crefs = np.zeros(nu, np.int64)
        for u in range(nu):
            if uniq[u] < 0:
                continue  # malformed requests: their faults are set below
            cr = self._resolve(int(uniq[u]) >> 20, int(uniq[u]) & MAX_PASID)
            crefs[u], cfault[u], fpd[u], dte[u] = cr.ctx_refs, cr.fault, cr.fpd, cr.dte
            e = cr.entry
            if e is not None:
                pgtt[u], did[u], flptr[u], fl_levels[u] = e.pgtt, e.did, e.flptr, e.fl_levels
                slptr[u], sl_levels[u], ssade[u] = e.slptr, e.sl_levels, e.ssade
        ctx_refs = np.zeros(n, np.int64)
        ctx_refs[first] = crefs
        r_fault = cfault[inv]
        r_fault[bad_sid] = FaultReason.ROOT_ENTRY_P
        r_fault[bad_pasid] = FaultReason.PASID_DIR_ACCESS_ERR
        req = np.empty((n, 6), np.int64)
        req[:, R_FAULT], req[:, R_DID], req[:, R_DTE] = r_fault, did[inv], dte[inv] & (
            r_fault == 0)
        req[:, R_CTX], req[:, R_CTX_REFS], req[:, R_FPD] = inv, ctx_refs, fpd[inv]
        ctx = np.empty((nu, 6), U64)
        ctx[:, C_PGTT], ctx[:, C_FLPTR], ctx[:, C_FL_LEVELS] = pgtt, flptr, fl_levels
        ctx[:, C_SLPTR], ctx[:, C_SL_LEVELS], ctx[:, C_SSADE] = slptr, sl_levels, ssade
        return _Contexts(req, ctx)

    def translate_numpy(self, sid: np.ndarray, pasid: np.ndarray, addr: np.ndarray,
                        access: np.ndarray, t_ns: np.ndarray | None = None) -> np.ndarray:
        """``translate`` with numpy, step by step (what the compiled kernel does)."""
        sid = np.asarray(sid, dtype=np.int64)
        pasid = np.asarray(pasid, dtype=np.int64)
        addr = np.asarray(addr, dtype=U64)
        access = np.asarray(access, dtype=np.uint8)
        n = sid.size
        out = np.zeros(n, dtype=RESULT_DTYPE)
        if n == 0:
            return out
        cx = self._contexts(sid, pasid)
        req, ctx = cx.req, cx.ctx
        inv = req[:, R_CTX]
        pgtt, flptr = ctx[:, C_PGTT].astype(np.uint8), ctx[:, C_FLPTR]
        fl_levels, slptr = ctx[:, C_FL_LEVELS].astype(np.uint8), ctx[:, C_SLPTR]
        sl_levels, ssade = ctx[:, C_SL_LEVELS].astype(np.uint8), ctx[:, C_SSADE] != 0
        out["ctx_refs"] = req[:, R_CTX_REFS]
        r_fault = req[:, R_FAULT].astype(np.uint8)
        out["fault"] = r_fault
        out["stage"] = np.where(r_fault != 0, Stage.CONTEXT, 0)
        r_did = req[:, R_DID]
        live = r_fault == 0

        # 2. device-TLB for ATS devices: a hit needs no IOMMU look-up at all.
        r_dte = req[:, R_DTE] != 0
        devtlb_hit = np.zeros(n, bool)
        if r_dte.any():
            ix = np.flatnonzero(r_dte)
            h, hpa, perm, order = self.caches.dtlb.lookup(sid[ix], pasid[ix], addr[ix])
            need = np.where(access[ix] == ACCESS_WRITE, 2, 1).astype(np.uint8)
            h &= (perm & need) == need
            hx = ix[h]
            devtlb_hit[hx] = True
            out["hpa"][hx] = hpa[h]
            out["page_order"][hx] = order[h]
            live &= ~devtlb_hit

        # 3. IOTLB.
        ix = np.flatnonzero(live)
        hit, hpa, perm, order, _pg = self.iotlb.lookup(r_did[ix], pasid[ix], addr[ix])
        need = np.where(access[ix] == ACCESS_WRITE, 2, 1).astype(np.uint8)
        hit &= (perm & need) == need
        r_perm = np.zeros(n, np.uint8)  # permission of the translation each request got
        r_perm[ix[hit]] = perm[hit]
        out["hpa"][ix[hit]] = hpa[hit]
        out["page_order"][ix[hit]] = order[hit]
        out["iotlb_hit"][ix[hit]] = True
        miss = ix[~hit]

        # 4. walk the misses, coalesced by (did, pasid, page, access).
        followers = miss[:0]
        if miss.size:
            lead_pos, group = first_of_groups(
                r_did[miss], pasid[miss], addr[miss] >> U64(PAGE_SHIFT), access[miss])
            leaders = miss[lead_pos]
            u = inv[leaders]
            wb = WalkBatch(addr=addr[leaders], access=access[leaders], pgtt=pgtt[u],
                           did=r_did[leaders], pasid=pasid[leaders], flptr=flptr[u],
                           fl_levels=fl_levels[u], slptr=slptr[u], sl_levels=sl_levels[u],
                           ssade=ssade[u])
            wr = self.walker.walk(wb)
            self.stats.ad_writes += wr.ad_writes
            # results for leaders
            out["hpa"][leaders] = wr.hpa
            out["fault"][leaders] = wr.fault
            out["stage"][leaders] = wr.stage
            out["walk_refs"][leaders] = wr.walk_refs
            out["page_order"][leaders] = wr.order
            r_perm[leaders] = wr.perm
            # followers take the leader's outcome, offset within the page
            followers = np.flatnonzero(lead_pos[group] != np.arange(miss.size))
            if followers.size:
                fr = miss[followers]
                src = group[followers]
                ok = wr.fault[src] == 0
                base = wr.hpa[src] & ~U64(PAGE_SIZE - 1)
                out["hpa"][fr] = np.where(ok, base | (addr[fr] & U64(PAGE_SIZE - 1)), 0)
                out["fault"][fr] = wr.fault[src]
                out["stage"][fr] = wr.stage[src]
                out["page_order"][fr] = wr.order[src]
                if self.iotlb.cache.sets:
                    out["iotlb_hit"][fr] = ok   # answered by the leader's fill
                else:  # no IOTLB to hold that fill: each request walks (and misses) itself
                    out["walk_refs"][fr] = wr.walk_refs[src]
                r_perm[fr] = wr.perm[src]
            # IOTLB fills for successful walks, in request order
            okw = wr.fault == 0
            if okw.any():
                o = wr.order[okw].astype(np.int64)
                shift = (PAGE_SHIFT + 9 * o).astype(U64)
                page_base = (wr.hpa[okw] >> shift) << shift
                self.iotlb.fill(wb.did[okw], wb.pasid[okw], wb.addr[okw], o, page_base,
                                wr.perm[okw], wb.pgtt[okw])
        out["hpa"][out["fault"] != 0] = 0
        # device-TLB fills: every ATS translation completion the device received, whether
        # the IOTLB or a walk answered it (PCIe ATS: the device caches what it is sent)
        dfill = np.flatnonzero(r_dte & ~devtlb_hit & (out["fault"] == 0))
        if dfill.size:
            o = out["page_order"][dfill].astype(np.int64)
            shift = (PAGE_SHIFT + 9 * o).astype(U64)
            self.caches.dtlb.fill(sid[dfill], pasid[dfill], addr[dfill], o,
                                  (out["hpa"][dfill] >> shift) << shift, r_perm[dfill])

        # 5. statistics and fault records
        self._account(out, sid, pasid, addr, access, t_ns, req, (
            int(devtlb_hit.sum()), int(out["iotlb_hit"].sum()),
            int(miss.size - (followers.size if self.iotlb.cache.sets else 0)),
            int(out["walk_refs"].sum()), int(out["ctx_refs"].sum()),
            int(np.count_nonzero(out["fault"]))))
        out["iotlb_hit"] |= devtlb_hit
        self.last_devtlb_hit = devtlb_hit
        return out

    def _account(self, out: np.ndarray, sid: np.ndarray, pasid: np.ndarray, addr: np.ndarray,
                 access: np.ndarray, t_ns: np.ndarray | None, req: np.ndarray,
                 counts: tuple[int, int, int, int, int, int]) -> None:
        """Step 5 of a batch: statistics (``counts``: device-TLB hits, IOTLB hits, IOTLB
        misses, walk and context references, faults) and the fault records."""
        st = self.stats
        st.translations += out.size
        devtlb_hits, iotlb_hits, misses, walk_refs, ctx_refs, faults = counts
        st.devtlb_hits += devtlb_hits
        st.iotlb_hits += iotlb_hits
        st.iotlb_misses += misses
        st.walk_refs += walk_refs
        st.ctx_refs += ctx_refs
        st.faults += faults
        if faults:
            self._record_faults(out, sid, pasid, addr, access, t_ns, req)

    def _record_faults(self, out: np.ndarray, sid: np.ndarray, pasid: np.ndarray,
                       addr: np.ndarray, access: np.ndarray, t_ns: np.ndarray | None,
                       req: np.ndarray) -> None:
        """The fault records of a translated batch (``_account``'s second half; the epoch
        kernel, host_iommu/kernels/epoch.py, counts the statistics itself)."""
        faulted = np.flatnonzero(out["fault"])
        # A fault of a device no VM owns is the host's (VM 0); the host driver drains
        # those (HostServer), so they never hold the recording registers.
        vm_of = np.array([self.owner_of_sid.get(int(s), 0) for s in sid[faulted]])
        tt = (np.zeros(faulted.size, np.int64) if t_ns is None
              else np.maximum(np.asarray(t_ns, dtype=np.int64)[faulted], 0))
        # The record holds what the request carried, within the register's fields: any
        # request that does not write is a read, out-of-range ids are clipped (the
        # translation itself already faulted them without aliasing).
        rec_access = np.where(access[faulted] == ACCESS_WRITE, ACCESS_WRITE, ACCESS_READ)
        self.faults.record(tt, vm_of, np.clip(sid[faulted], 0, 0xFFFF),
                           np.clip(pasid[faulted], 0, 0xFFFF_FFFF), addr[faulted],
                           rec_access, out["fault"][faulted], out["stage"][faulted],
                           fpd=req[faulted, R_FPD] != 0)
