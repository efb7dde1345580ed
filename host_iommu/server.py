"""The host side of the protocol: applies every VM's operations of an epoch to one HostIommu.

This is what the host actor wraps. It owns the VMs' host-side domains (shadow containers,
nested HWPTs, pass-through attachments), applies the merged operation stream of an epoch in
(t_ns, vm, seq) order, batches each run of DMA requests into one ``HostIommu.translate`` call
(split wherever a queued invalidation takes effect), and runs the security oracle on every
DMA (host_iommu/oracle.py); unmap ids a guest retires (OP_UNMAP_RETIRE: no IOVA page carries
them any more) leave the oracle at the end of the epoch, so its state stays bounded.

It is also the boundary a hostile guest meets: an operation from an unknown VM, with a field
no valid operation carries, or naming a device the sending VM was not assigned (the VMM's
device assignment, ``HostIommu.owner_of_sid``, is the authority) is refused and counted, never
applied; refused VFIO / iommufd / memory requests are counted too. At the end of each epoch
the host driver drains the fault recording registers (Linux dmar_fault): each VM receives its
devices' faults, faults of devices no VM owns are counted as host faults.

The epoch runs on a compiled kernel (host_iommu/kernels/epoch.py) that takes the operations
it can apply exactly as the loop would (guest stores, DMA runs whose contexts are cached,
one-entry HWPT invalidations, unmap returns and retires, with the due effects between them)
and returns the others to the Python loop, one at a time; ``EPOCH_KERNEL`` (environment
IOMMU_EMU_HOST_KERNEL=0) switches it off. The oracle is ``oracle.ArrayOracle``, the oracle's
own code over arrays the kernel shares.
"""

from __future__ import annotations

import itertools
import operator
import os

import numba
import numpy as np

from host_iommu.costs import CostModel
from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    MAX_PASID,
    NO_PASID,
    PAGE_SHIFT,
    RESULT_DTYPE,
)
from host_iommu.fault import FaultLog
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.kernels import epoch as ek
from host_iommu.kernels import vfio as vk
from host_iommu.memory import HostMemoryError
from host_iommu.nested import (
    IommufdError,
    NestedDomain,
    alloc_nested,
    attach_second_level,
    hwpt_invalidate_one,
    one_entry_words,
    sl_map,
    sl_unmap,
)
from host_iommu.oracle import ArrayOracle
from host_iommu.pgtable import HostTableStore, PageTable
from host_iommu.protocol import (
    DMA_ROGUE,
    MAX_RETIRE_RUN,
    OP_DMA,
    OP_DTYPE,
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_NAMES,
    OP_SL_MAP,
    OP_SL_UNMAP,
    OP_UNMAP_RET,
    OP_UNMAP_RETIRE,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
    EpochReport,
    ProtocolError,
    VmSetup,
    bad_retire,
    check_setup,
)
from host_iommu.qi import QI_DID_MASK, QI_PASID_MASK, WAIT_WORDS
from host_iommu.vfio import (
    DomainRecord,
    ShadowDomain,
    VfioError,
    VfioRecord,
    vfio_attach,
    vfio_map,
    vfio_unmap,
)
from host_iommu.walk import NO_PWC

# What became of each rogue DMA (DMA_ROGUE: aimed at the device's last unmapped IOVA), one
# class each, in this order of precedence, so the classes sum to the guest's rogue_dma:
# faulted (the IOMMU refused it), reached another VM's frame, reached the old buffer after
# its unmap returned (stale), reached it while the unmap was still in flight, or landed on
# whatever the guest mapped at that IOVA since (misdirected: a reused IOVA's new buffer).
ROGUE_CLASSES = ("rogue_faulted", "rogue_cross_vm", "rogue_stale", "rogue_in_flight",
                 "rogue_misdirected")
HOST_COUNTERS = ("translations", "iotlb_hits", "iotlb_misses", "devtlb_hits", "walk_refs",
                 "ctx_refs", "faults", "stale_dma", "cross_vm_dma", "stale_window_max_ns",
                 "host_inv_descriptors", "pinned_pages", "translate_ns", "vfio_errors",
                 "guest_writes_dropped", "sl_unmap_refused", "foreign_sid_refused",
                 "ops_refused", *ROGUE_CLASSES)
# Counters of the host itself (HostServer.host_counters), not of any VM.
HOST_ONLY_COUNTERS = ("host_faults", "unknown_vm_ops")
# Operations that name a device (sid): accepted only from the VM the device is assigned to.
SID_OPS = (OP_DMA, OP_HWPT_INV, OP_VFIO_MAP, OP_VFIO_UNMAP)
# A run of at most this many DMAs is checked and counted one DMA at a time on plain ints
# (HostServer._tally_each), a longer one with numpy columns (_tally): the same counts.
DMA_SMALL_BATCH = 16
# apply_epoch runs on the epoch kernel (host_iommu/kernels/epoch.py) unless this is False
# (environment IOMMU_EMU_HOST_KERNEL=0): the Python loop, the same results, op by op.
# (Off with numba's JIT off, NUMBA_DISABLE_JIT=1: as plain Python the kernel is no faster.)
EPOCH_KERNEL = (os.environ.get("IOMMU_EMU_HOST_KERNEL", "1") != "0"
                and not numba.config.DISABLE_JIT)
# ... and translates DMA runs itself unless this is False (the rest of it still runs),
# resolving the contexts that miss the context and PASID caches too unless this is False
# (then a run with a miss goes to HostIommu.translate's Python context stage).
EPOCH_KERNEL_DMA = True
EPOCH_KERNEL_FETCH = True
# ... and applies VFIO maps and unmaps of shadow containers itself (kernels/vfio.py) unless
# this is False (then each goes to _control: vfio.vfio_map / vfio_unmap).
EPOCH_KERNEL_VFIO = True
# ... and encodes the first sight of a one-entry HWPT invalidation itself where
# nested.one_entry_words would encode it directly (kernels/epoch.py inv_encode) unless False.
EPOCH_INV_ENCODE = True
# ... and finds a many-VM host's guest stores' host frames in one call over every VM's map
# (kernels/epoch.py store_frames_flat) unless False (then a call per VM: store_frames).
STORES_FLAT = True
_UNRESOLVED = (-1, 0)   # a HWPT invalidation the epoch kernel leaves to _control
_WAIT_WORDS = np.array(WAIT_WORDS, dtype=np.uint64)   # the wait each invalidation ends with
# Invalidations whose descriptor words a server keeps, and the slots of the compiled table
# of resolved invalidations: room for every IOVA range 64 NIC VMs of one host keep in use
# (a few hundred each), so that a many-VM host does not start afresh every few epochs and
# resolve its invalidations in Python again (at most about 13 MB of words, 16 MB of table).
_INV_AT_MAX = 1 << 17
_INV_WORDS_MAX = 8 * _INV_AT_MAX
_INV_TABLE_MAX = 1 << 18
# Look-up tables indexed by the uint8 "op" column: a known kind, a kind that names a device.
_KNOWN_OP = np.zeros(256, dtype=bool)
_KNOWN_OP[list(OP_NAMES)] = True
_SID_OP = np.zeros(256, dtype=bool)
_SID_OP[list(SID_OPS)] = True


class HostServer:
    """One host: a HostIommu plus the per-VM domains the VMMs created on it."""

    def __init__(self, params: IommuParams | None = None, costs: CostModel | None = None,
                 host: int = 0) -> None:
        self.iommu = HostIommu(params, costs, host)
        self.costs = self.iommu.costs
        # One VFIO container per device: QEMU gives each vIOMMU address space (a device's
        # IOVA space) its own container (hw/vfio/common.c vfio_connect_container).
        self.shadow_of_sid: dict[int, ShadowDomain] = {}
        self.shadow: dict[int, ShadowDomain] = {}   # vm -> the container of its first device
        self.nested: dict[tuple[int, int], NestedDomain] = {}
        self.oracle = ArrayOracle()
        self.unmap_waits: dict[int, list[tuple[int, int, int]]] = {}   # vm -> this epoch's
        self._qi_stamp_max = 0                  # latest time stamp that submitted to the QI
        self._qi_out_of_order: set[tuple[int, int]] = set()   # (vm, unmap id)
        self._retiring: dict[int, list[tuple[int, int]]] = {}   # vm -> retired id runs
        self.counters: dict[int, dict[str, int]] = {}
        self._owner = np.zeros(1 << 16, dtype=np.int64)   # sid -> owning VM, 0 for none
        self._owner_of_sid: dict[int, int] = {}           # owner_of_sid that _owner holds
        self.host_counters: dict[str, int] = dict.fromkeys(HOST_ONLY_COUNTERS, 0)
        # descriptor words of one-entry HWPT invalidations, kept for the epoch kernel
        self._inv_words = np.zeros(1024, dtype=np.uint64)
        self._inv_end = 0
        self._inv_at: dict[tuple[int, int, int, int, int, bool], tuple[int, int]] = {}
        self._inv_ik = np.full((1024, ek.K_FIELDS), -1, dtype=np.int64)
        self._inv_iv = np.zeros((1024, 2), dtype=np.int64)
        self._inv_im = np.zeros(1, dtype=np.int64)
        self._inv_sig: tuple[int, int, int] | None = None
        self._inv_dom: tuple[np.ndarray, np.ndarray] = (np.zeros(0, dtype=np.int64),
                                                        np.zeros((0, 4), dtype=np.int64))
        self._inv_dom_sig: tuple[int, int, int] | None = None
        self._doms_version = 0    # bumped whenever a VM's domains may change
        self._known = np.zeros(1, dtype=bool)    # _admit_compiled: VM id -> known
        self._known_ver: tuple[int, int] | None = None
        self._kinds = np.zeros(256, dtype=np.int64)   # kept operations by kind (this epoch)
        # The epoch kernel's buffers, kept across epochs (_epoch_buffers): room for ``_cap``
        # operations (outb, reqb, devb, waits, retires, access, keep), the scalar state, the
        # statistics, the per-VM counts (a row per VM id), the out-of-order pairs.
        self._cap = 0
        self._bufs: tuple = ()
        self._st = np.zeros(ek.ST_FIELDS, dtype=np.int64)
        self._tst = np.zeros(len(ek.TST_NAMES), dtype=np.int64)
        self._cnt = np.zeros((1, ek.CNT_FIELDS), dtype=np.int64)
        self._ooo = np.zeros((64, 2), dtype=np.int64)
        self._smaps: tuple[np.ndarray, np.ndarray, int] | None = None   # _store_maps
        # The VFIO containers as kernels/vfio.py's arrays (_vfio_arrays), made again when
        # the domains may have changed: the containers' records, the VMs' pins and GPA map
        # in flat buffers (each VmMemory's ``pins`` and ``hpa_of`` a view into them).
        self._vfio_rec = VfioRecord()
        self._vfio: vk.VfioArrays | None = None
        self._vfio_none: vk.VfioArrays | None = None
        self._vfio_doms: list[ShadowDomain] = []
        self._vfio_sig: tuple[int, int, int] | None = None

    # --- set-up ---------------------------------------------------------------------------
    def setup_vm(self, s: VmSetup) -> None:
        """Create a VM's memory and bind its devices, as its VMM asks (a VmSetup).

        Checked whole before anything is created, so a refused set-up changes nothing:
        invalid fields raise ProtocolError; a VM id in use, a device assigned to another VM,
        or memory the host cannot back raise IommufdError.
        """
        check_setup(s)
        h = self.iommu
        self._doms_version += 1
        if s.vm in h.vms or s.vm in self.counters:
            raise IommufdError(f"VM {s.vm} already exists on host {h.host}")
        taken = [sid for sid in s.sids if sid in h.owner_of_sid]
        if taken:
            raise IommufdError(f"devices {[hex(x) for x in taken]} are assigned to VMs "
                               f"{[h.owner_of_sid[x] for x in taken]}")
        try:
            h.create_vm(s.vm, s.memory_bytes)
        except HostMemoryError as exc:
            raise IommufdError(f"VM {s.vm}: {exc}") from None
        self.counters[s.vm] = dict.fromkeys(HOST_COUNTERS, 0)
        if s.mode == "shadow":
            for sid in s.sids:
                self.shadow_of_sid[sid] = vfio_attach(h, s.vm, [sid], ats=s.ats)
                self.shadow.setdefault(s.vm, self.shadow_of_sid[sid])
        elif s.mode == "nested":
            for sid, root in zip(s.sids, s.fl_roots, strict=True):
                self.nested[(sid, NO_PASID)] = alloc_nested(h, s.vm, sid, NO_PASID, root,
                                                            s.fl_levels, ats=s.ats)
            # more PASIDs of a device, each its own first level over the same second level
            for i in range(0, len(s.pasid_roots), 3):
                sid, pasid, root = s.pasid_roots[i:i + 3]
                self.nested[(sid, pasid)] = alloc_nested(h, s.vm, sid, pasid, root,
                                                         s.fl_levels, ats=s.ats)
        elif s.mode == "passthrough":
            for sid in s.sids:
                attach_second_level(h, s.vm, sid, ats=s.ats)
        else:
            raise ValueError(f"unknown mode {s.mode!r}")

    def bind_nested(self, vm: int, sid: int, pasid: int, flptr_gpa: int, fl_levels: int = 4,
                    t_ns: int | None = None) -> NestedDomain | None:
        """The VMM binds a guest first level at (sid, pasid); a refusal is counted.

        Returns the domain, or None when iommufd refused the binding (counted in the VM's
        ``vfio_errors``; an unknown VM in ``unknown_vm_ops``).
        """
        c = self.counters.get(vm)
        if c is None:
            self.host_counters["unknown_vm_ops"] += 1
            return None
        self._doms_version += 1
        try:
            dom = alloc_nested(self.iommu, vm, sid, pasid, flptr_gpa, fl_levels,
                               ats=sid in self.iommu.ats_sids, t_ns=t_ns)
        except IommufdError:
            c["vfio_errors"] += 1
            return None
        self.nested[(sid, pasid)] = dom
        return dom

    def _owner_table(self) -> np.ndarray:
        """The VMM's device assignment as an array indexed by sid (0: no owner); rebuilt
        only when ``HostIommu.owner_of_sid`` changed since the last epoch."""
        owners = self.iommu.owner_of_sid
        if self._owner_of_sid != owners:
            table = np.zeros(1 << 16, dtype=np.int64)
            for sid, v in owners.items():
                table[sid] = v
            self._owner, self._owner_of_sid = table, dict(owners)
        return self._owner

    def _admit(self, ops: np.ndarray) -> np.ndarray:
        """The operations the host applies; every other one is refused and counted.

        Refused: an unknown VM (host ``unknown_vm_ops``); a field no valid operation carries
        (unknown kind, negative time, a PASID wider than 20 bits, a DMA that neither reads nor
        writes: ``ops_refused``); a device operation whose sid is not assigned to the sending
        VM (``foreign_sid_refused``), so nothing is translated or charged to another VM.
        """
        vm = ops["vm"]
        ids = np.zeros(max(self.counters, default=0) + 1, dtype=bool)   # VM id -> known
        ids[list(self.counters)] = True
        inside = (vm >= 0) & (vm < ids.size)
        known = inside & ids[np.where(inside, vm, 0)]
        # The next line is equivalent and left for reference:
        #     known = np.isin(vm, np.array(sorted(self.counters), dtype=np.int64))
        self.host_counters["unknown_vm_ops"] += known.size - int(np.count_nonzero(known))
        kind = ops["op"]
        access = ops["a2"] & 0xFF
        malformed = (~_KNOWN_OP[kind] | (ops["t_ns"] < 0) | (ops["pasid"] > MAX_PASID)
                     | ((kind == OP_DMA) & (access != ACCESS_READ) & (access != ACCESS_WRITE)))
        if (kind == OP_UNMAP_RETIRE).any():
            malformed |= bad_retire(ops)
        foreign = ~malformed & _SID_OP[kind] & (self._owner_table()[ops["sid"]] != vm)
        refused = known & (malformed | foreign)
        if refused.any():
            for v in np.unique(vm[refused]).tolist():
                c = self.counters[v]
                c["ops_refused"] += int((malformed & (vm == v)).sum())
                c["foreign_sid_refused"] += int((foreign & (vm == v)).sum())
        keep = known & ~malformed & ~foreign
        return ops if keep.all() else ops[keep]

    # --- one epoch ------------------------------------------------------------------------
    def apply_epoch(self, ops: np.ndarray, t_start_ns: int | None = None
                    ) -> dict[int, EpochReport]:
        """Apply merged operations (sorted by t_ns, vm, seq); report per VM.

        ``t_start_ns`` is the epoch's start, when the caller knows it: no operation of this
        epoch or a later one is stamped earlier (a guest stamps its operations at or after the
        event that made them), so the invalidation queue may forget the slots released by
        then (InvalidationQueue.forget_until). Without it the queue keeps them.

        The Python loop below is the description: it reads the kind, time and VM columns as
        Python lists (no numpy scalar per operation), and the control operations as rows of
        ints, all at once, when the first is met (the loop meets each once, in order). On the
        live path (``_compiled``) the epoch kernel walks the same operations instead and
        hands back to this loop, one operation or run at a time, whatever it does not take
        (``_apply_compiled``); the results are the same, value for value.
        """
        if not isinstance(ops, np.ndarray) or ops.dtype != OP_DTYPE or ops.ndim != 1:
            raise ProtocolError("apply_epoch takes a 1-D numpy array of OP_DTYPE")
        h = self.iommu
        if t_start_ns is not None:
            h.qi.forget_until(int(t_start_ns))
        if self._compiled():
            ops, m, access = self._admit_compiled(ops)
            if ops.size:
                self._apply_compiled(ops, m, access)
        else:
            ops = self._admit(ops)
            n = ops.size
            t = ops["t_ns"].tolist()
            kind = ops["op"].tolist()
            vms = ops["vm"].tolist()
            rows = None                           # the control operations' rows, in order
            i = 0
            while i < n:
                h.advance_to(t[i])
                k = kind[i]
                if k in (OP_DMA, OP_GUEST_WRITE):
                    i = self._run(ops, i, t, kind, vms)
                    continue
                if rows is None:
                    kc = ops["op"]
                    rows = iter(ops[(kc != OP_DMA) & (kc != OP_GUEST_WRITE)].tolist())
                self._control(next(rows))
                i += 1
        # Retired unmap ids are dropped only now, after every DMA of the epoch was checked
        # (a DMA stamped with an id may sort after the retire in time order).
        for vm in sorted(self._retiring):
            self.oracle.retire_runs(vm, self._retiring[vm])
        self._retiring.clear()
        # The host driver's fault handler reads every record and clears PFO (dmar_fault).
        log = h.faults
        if log.pending or type(log) is not FaultLog:
            f = log.take_all()
            any_faults = f["vm"].size > 0
        else:      # FaultLog.take_all with no record pending: it only clears PFO
            log.pfo = False
            any_faults = False
        by_vm: dict[int, list[tuple[int, ...]]] = {}
        if any_faults:
            owned = np.isin(f["vm"], np.array(sorted(self.counters), dtype=np.int64))
            self.host_counters["host_faults"] += int((~owned).sum())
            for v, *rec in zip(f["vm"].tolist(), f["time_ns"].tolist(), f["sid"].tolist(),
                               f["pasid"].tolist(), f["addr"].tolist(), f["reason"].tolist(),
                               f["stage"].tolist(), strict=True):
                by_vm.setdefault(v, []).append(tuple(rec))    # each VM's, in record order
        reports = {}
        counters, waits = self.counters, self.unmap_waits
        for vm in sorted(counters):
            reports[vm] = EpochReport(vm, counters[vm].copy(), by_vm.get(vm, []),
                                      waits.pop(vm, []))
        return reports

    def _run(self, ops: np.ndarray, i: int, t: list[int], kind: list[int], vms: list[int]
             ) -> int:
        """Apply the run of DMAs, or of one VM's guest stores, that starts at operation i
        (after advance_to(t[i])), cut where a queued invalidation takes effect; returns
        where the next operation starts."""
        h = self.iommu
        n = len(t)
        k = kind[i]
        j = i + 1
        if k == OP_DMA:
            while j < n and kind[j] == k:
                j += 1
        else:
            v = vms[i]
            while j < n and kind[j] == k and vms[j] == v:
                j += 1
        nxt = h.next_effect_ns()
        if nxt is not None and nxt <= t[j - 1]:
            j = max(i + 1, int(np.searchsorted(ops["t_ns"][i:j], nxt, side="left")) + i)
        if k == OP_DMA:
            self._dma(ops[i:j])
        else:
            vm = vms[i]
            dropped = h.guest_write(vm, ops["a0"][i:j], ops["a1"][i:j])
            self.counters[vm]["guest_writes_dropped"] += dropped
        return j

    # --- the compiled epoch -------------------------------------------------------------------
    def _compiled(self) -> bool:
        """Whether this epoch runs on kernels/epoch.py: the switch is on, and the host keeps
        its effects in arrays (the fast engine, the live queue, CacheSet's own methods) and
        its oracle in arrays, and no method the kernel stands in for was replaced (a test's
        spy or injected bug must run: tests/fuzz wraps HostIommu.translate); otherwise
        everything stays on the Python loop."""
        h = self.iommu
        return (EPOCH_KERNEL and h._array_effects and type(self.oracle) is ArrayOracle
                and _intact(h, _IOMMU_HOOKS) and _intact(self, _SERVER_HOOKS)
                and hwpt_invalidate_one is _HWPT_ONE)

    def _op_matrix(self, ops: np.ndarray) -> np.ndarray:
        """The operations as kernels/epoch.py's int64[M_ROWS, n] (M_*), resolved columns
        unset (-1)."""
        m = np.empty((ek.M_ROWS, ops.size), dtype=np.int64)
        if ops.size:      # one compiled pass over the rows (C-contiguous: one signature)
            ek.op_matrix(ops if ops.flags.c_contiguous else np.ascontiguousarray(ops), m)
        # The next lines are equivalent and left for reference:
        #     m[ek.M_T], m[ek.M_VM], m[ek.M_OP] = ops["t_ns"], ops["vm"], ops["op"]
        #     m[ek.M_SID], m[ek.M_PASID] = ops["sid"], ops["pasid"]
        #     m[ek.M_A0], m[ek.M_A1] = ops["a0"].astype(np.int64), ops["a1"].astype(np.int64)
        #     m[ek.M_A2], m[ek.M_A3], m[ek.M_RES], m[ek.M_NDESC] = ops["a2"], ops["a3"], -1, 0
        return m

    def _resolve_stores(self, ops: np.ndarray, m: np.ndarray, start: int) -> None:
        """m[M_RES] of the guest stores from ``start`` on: the host frame each store reaches
        through its VM's memory map now (-1 when the GPA is not backed), as guest_write
        finds it; redone after an operation that changes a memory map (OP_SL_*)."""
        vms = self.iommu.vms
        if len(vms) == 1:      # one VM: every store is its own (kernels/epoch.py)
            vm, mem = next(iter(vms.items()))
            if ek.resolve_stores(m, start, vm, mem.hpa_of, mem.gpa_frames) == 0:
                return
        if STORES_FLAT:      # every VM's stores in one call, the maps in one buffer
            hpa, vmrow = self._store_maps()
            ek.store_frames_flat(m, start, hpa, vmrow)
            return
        gw = np.flatnonzero(m[ek.M_OP, start:] == OP_GUEST_WRITE) + start
        if gw.size == 0:
            return
        vm = m[ek.M_VM, gw]
        order = np.argsort(vm, kind="stable")      # each VM's stores together
        gw, vm = gw[order], vm[order]
        cuts = [0, *(np.flatnonzero(vm[1:] != vm[:-1]) + 1).tolist(), gw.size]
        for lo, hi in itertools.pairwise(cuts):
            mem = vms[int(vm[lo])]
            ek.store_frames(m, gw[lo:hi], mem.hpa_of, mem.gpa_frames)

    def _store_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Every VM's memory map (VmMemory.hpa_of) as one flat buffer and int64[vms, 2]
        rows (offset, GPA frames) by VM id, for kernels/epoch.py store_frames_flat. The
        maps are moved into one buffer (each VmMemory keeps its view, as _vfio_build does;
        a buffer _vfio_build made serves as well) the first time, and again only when a
        VM's map is not a view of the buffer the rows were made for."""
        vms = self.iommu.vms
        kept = self._smaps
        if kept is not None and kept[2] == len(vms):
            base = kept[0]
            if all(v.hpa_of.base is base for v in vms.values()):
                return base, kept[1]
        vals = list(vms.values())
        base = vals[0].hpa_of.base if vals else None
        shared = (base is not None and base.ndim == 1 and base.dtype == np.int64
                  and base.flags.c_contiguous
                  and all(v.hpa_of.base is base and v.hpa_of.flags.c_contiguous
                          for v in vals))
        if not shared:
            base = np.concatenate([v.hpa_of for v in vals]).astype(np.int64, copy=False)
            off = 0
            for v in vals:
                k = v.hpa_of.size
                v.hpa_of = base[off:off + k]
                off += k
        vmrow = np.full((max(vms, default=0) + 1, 2), -1, dtype=np.int64)
        p0 = base.__array_interface__["data"][0]
        for vm, v in vms.items():
            vmrow[vm] = (v.hpa_of.__array_interface__["data"][0] - p0) // 8, v.gpa_frames
        self._smaps = (base, vmrow, len(vms))
        return base, vmrow

    def _resolve_invalidations(self, ops: np.ndarray, m: np.ndarray) -> np.ndarray:
        """m[M_RES], m[M_NDESC] of the one-entry HWPT invalidations a VM may send (its own
        HWPT, an entry iommufd accepts): where their descriptors start in the returned words
        (nested.one_entry_words: one_entry_descs, as hwpt_invalidate_one submits them) and
        how many; -1 for the others (applied by _control).

        The words are kept across epochs in one buffer by one_entry_descs' own key (DID,
        PASID, addr, npages, flags, ATS), a pure function of it, bounded as its cache is; the
        resolution of an operation's own fields (vm, sid, pasid, addr, npages, flags) in a
        compiled table (kernels/epoch.py inv_lookup), dropped whenever a VM's domains or the
        ATS devices may have changed.
        """
        idx = np.flatnonzero(m[ek.M_OP] == OP_HWPT_INV)
        if idx.size == 0:
            return self._inv_words
        h = self.iommu
        sig = (self._doms_version, len(self.nested), len(h.ats_sids))
        if (len(self._inv_at) >= _INV_AT_MAX
                or self._inv_end + 8 * idx.size > _INV_WORDS_MAX):
            self._inv_at.clear()
            self._inv_end = 0
            sig = None
        if sig != self._inv_sig:
            self._inv_ik[:, 0] = -1
            self._inv_im[0] = 0
            self._inv_sig = sig
        miss = np.empty(idx.size, dtype=np.int64)
        nm = ek.inv_lookup(self._inv_ik, self._inv_iv, m, idx, miss)
        if not nm:
            return self._inv_words
        todo = rest = idx[miss[:nm]]
        if EPOCH_INV_ENCODE:     # first sights one_entry_words encodes itself: compiled
            dk, dv = self._inv_domains()
            self._inv_room(8 * todo.size)
            left = np.empty(todo.size, dtype=np.int64)
            nl, end = ek.inv_encode(m, todo, dk, dv, _WAIT_WORDS, self._inv_words,
                                    self._inv_end, left)
            self._inv_end = int(end)
            rest = todo[left[:nl]]
        nested, ats, at = self.nested, h.ats_sids, self._inv_at
        for i, (vm, sid, pasid, a0, a1, a2) in zip(rest.tolist(), ops[rest][
                ["vm", "sid", "pasid", "a0", "a1", "a2"]].tolist(), strict=True):
            dom = nested.get((sid, pasid))
            hit = _UNRESOLVED
            if dom is not None and dom.vm == vm:
                key = (dom.did, dom.pasid, a0, a1, a2, dom.sid in ats)
                hit = at.get(key)
                if hit is None:
                    try:
                        words = one_entry_words(h, dom, a0, a1, a2)
                    except IommufdError:
                        words = None
                    hit = at[key] = (_UNRESOLVED if words is None
                                     else self._keep_words(words))
            m[ek.M_RES, i], m[ek.M_NDESC, i] = hit
        # kept under their keys, in order (one compiled call while the table has room)
        while todo.size:
            done = ek.inv_insert_all(self._inv_ik, self._inv_iv, self._inv_im, m, todo)
            if done == todo.size:
                break
            cap = 2 * self._inv_ik.shape[0]
            grow = cap <= _INV_TABLE_MAX     # else start afresh at the bound
            cap = cap if grow else self._inv_ik.shape[0]
            ik = np.full((cap, ek.K_FIELDS), -1, dtype=np.int64)
            iv = np.zeros((cap, 2), dtype=np.int64)
            self._inv_im[0] = 0
            if grow:
                ek.inv_rehash(self._inv_ik, self._inv_iv, ik, iv, self._inv_im)
            self._inv_ik, self._inv_iv = ik, iv
            ek.inv_insert(ik, iv, self._inv_im, m, int(todo[done]))
            todo = todo[done + 1:]
        return self._inv_words

    def _inv_room(self, n: int) -> None:
        """Grow the kept words' buffer so that ``n`` more words fit."""
        end = self._inv_end
        if end + n > self._inv_words.size:
            grown = np.zeros(2 * (end + n), dtype=np.uint64)
            grown[:end] = self._inv_words[:end]
            self._inv_words = grown

    def _inv_domains(self) -> tuple[np.ndarray, np.ndarray]:
        """kernels/epoch.py inv_encode's table of the nested domains (dk: sid << 32 | pasid,
        sorted; dv: vm, DID, PASID, encodable), made again whenever a VM's domains or the
        ATS devices may have changed (the signature the table of resolutions is kept by)."""
        h = self.iommu
        sig = (self._doms_version, len(self.nested), len(h.ats_sids))
        if self._inv_dom_sig != sig:
            keys = sorted(self.nested)
            dk = np.array([sid << 32 | pasid for sid, pasid in keys], dtype=np.int64)
            dv = np.zeros((len(keys), 4), dtype=np.int64)
            for r, key in enumerate(keys):
                dom = self.nested[key]
                fast = (dom.sid not in h.ats_sids and 0 <= dom.did <= QI_DID_MASK
                        and 0 <= dom.pasid <= QI_PASID_MASK)
                dv[r] = dom.vm, dom.did if fast else 0, dom.pasid if fast else 0, fast
            self._inv_dom, self._inv_dom_sig = (dk, dv), sig
        return self._inv_dom

    def _keep_words(self, words: list[int]) -> tuple[int, int]:
        """Append descriptor words to the kept buffer: (first word, descriptors)."""
        n = len(words)
        self._inv_room(n)
        end = self._inv_end
        self._inv_words[end:end + n] = words
        self._inv_end = end + n
        return end, n >> 2

    def _epoch_buffers(self, n: int) -> tuple:
        """The epoch kernel's per-operation buffers with room for ``n`` operations, kept
        across epochs (made again, twice as large, when an epoch has more): (outb, reqb,
        devb, waits, retires, access, keep). The kernel writes every row it reads back."""
        if n > self._cap:
            cap = max(n, 2 * self._cap, 256)
            self._bufs = (np.zeros(cap, dtype=RESULT_DTYPE), np.zeros((cap, 6), dtype=np.int64),
                          np.zeros(cap, dtype=bool), np.zeros((cap, 4), dtype=np.int64),
                          np.zeros((cap, 3), dtype=np.int64), np.zeros(cap, dtype=np.uint8),
                          np.zeros(cap, dtype=bool))
            self._cap = cap
        return self._bufs

    def _admit_compiled(self, ops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """_admit on the operation matrix (kernels/epoch.py prepare: op_matrix, then admit):
        the same operations kept, the same refusals counted; returns them with their matrix
        and their access bytes (a2 & 0xFF, uint8)."""
        n = ops.size
        if n == 0:
            return ops, self._op_matrix(ops), np.zeros(0, dtype=np.uint8)
        ver = (self._doms_version, len(self.counters))
        if self._known_ver != ver:      # the VM ids, made again after a set-up
            top = max(self.counters, default=0) + 1
            known = np.zeros(top, dtype=bool)
            known[list(self.counters)] = True
            self._known, self._known_ver = known, ver
            self._cnt = np.zeros((top, ek.CNT_FIELDS), dtype=np.int64)
            self._refused = np.zeros((top, 2), dtype=np.int64)
        known, refused = self._known, self._refused
        bufs = self._epoch_buffers(n)
        access, keep = bufs[5][:n], bufs[6][:n]
        m = np.empty((ek.M_ROWS, n), dtype=np.int64)
        kinds = self._kinds
        kinds[:] = 0
        # The next lines are equivalent and left for reference:
        #     m = self._op_matrix(ops)
        #     unknown = ek.admit(m, known, ..., refused, keep, kinds)
        #     access = (m[ek.M_A2] & 0xFF).astype(np.uint8)
        unknown = ek.prepare(ops if ops.flags.c_contiguous else np.ascontiguousarray(ops), m,
                             access, known, _KNOWN_OP, _SID_OP, self._owner_table(), MAX_PASID,
                             OP_DMA, ACCESS_READ, ACCESS_WRITE, OP_UNMAP_RETIRE,
                             MAX_RETIRE_RUN, refused, keep, kinds)
        if unknown == 0 and int(kinds.sum()) == n:     # every one kept
            return ops, m, access
        self.host_counters["unknown_vm_ops"] += unknown
        for v in np.flatnonzero(refused.any(axis=1)).tolist():
            c = self.counters[v]
            c["ops_refused"] += int(refused[v, 0])
            c["foreign_sid_refused"] += int(refused[v, 1])
        refused[:] = 0
        return ops[keep], np.ascontiguousarray(m[:, keep]), access[keep]

    def _apply_compiled(self, ops: np.ndarray, m: np.ndarray, access: np.ndarray) -> None:
        """apply_epoch's loop on kernels/epoch.py: the kernel applies what it can from i on;
        the operation it stops at is applied here, the Python way, then the kernel goes on.
        State crosses in ``st`` (ST_*); per-VM counts, unmap waits and retired runs come back
        as rows folded in the order the Python loop would have made them."""
        h = self.iommu
        n = ops.size
        t = kind = vms = None        # the Python loop's lists, made at its first operation
        kinds = self._kinds      # _admit_compiled's count of this epoch's kinds
        if kinds[OP_GUEST_WRITE]:
            self._resolve_stores(ops, m, 0)
        words = self._resolve_invalidations(ops, m) if kinds[OP_HWPT_INV] else self._inv_words
        val = m[ek.M_A1].view(np.uint64)       # ops["a1"], ops["a0"]: the matrix's bits
        addr = m[ek.M_A0].view(np.uint64)
        outb, reqb, devb, waits, retires = self._epoch_buffers(n)[:5]
        tst, st, cnt = self._tst, self._st, self._cnt     # VM id -> row of cnt
        tst[:] = 0
        st[:] = 0
        cnt[:] = 0
        st[ek.ST_DMA] = EPOCH_KERNEL_DMA and hasattr(h.caches.ctxc, "vals") and hasattr(
            h.caches.pasidc, "vals")
        st[ek.ST_HIT_NS], st[ek.ST_REF_NS] = self.costs.iotlb_hit_ns, self.costs.mem_ref_ns
        st[ek.ST_FETCH] = EPOCH_KERNEL_FETCH and h.sm.mem is h.mem
        ooo = self._ooo
        c = h.caches
        fl = h._no_pwc if c.fl_pwc is None else (c.fl_pwc.state, c.fl_pwc.counts)
        sl = h._no_pwc if c.sl_pwc is None else (c.sl_pwc.state, c.sl_pwc.counts)
        q, mem, flat = h.qi, h.mem, self.oracle.flat
        vf = self._vfio_arrays(n, m)
        i = 0
        while True:
            late = self._qi_out_of_order
            if len(late) + n > ooo.shape[0]:
                ooo = self._ooo = np.zeros((2 * (len(late) + n), 2), dtype=np.int64)
            if late:
                ooo[:len(late)] = list(late)
            # ST_NEXT_EFFECT, ST_FREE_AT, ST_STAMP_MAX, ST_NOW, ST_OUT_OF_ORDER, ST_PTE_WRITES,
            # ST_WAITS, ST_RETIRES in one assignment (0-7), then ST_FAULTED_I, ST_LAST_I
            st[:8] = (h._next_effect_ns,
                      h._deferred_free[0][0] if h._deferred_free else ek.NEVER,
                      self._qi_stamp_max, h.now_ns, len(late), 0, 0, 0)
            st[ek.ST_FAULTED_I] = st[ek.ST_LAST_I] = -1
            i = ek.run_ops(i, m, val, words, st,
                           (mem.slab, mem.slot_of, q.ctl, q.inflight, q._unresponsive,
                            h._effects, q._done, c.iotlb.state, c.iotlb.counts, fl[0], fl[1],
                            sl[0], sl[1], c.dtlb.state, c.dtlb.counts),
                           (flat.seg, flat.data, flat.spk, flat.spv, flat.spm),
                           (ooo, cnt, waits, retires, addr, access, tst, outb, reqb, devb),
                           self._translation_state(), vf)
            so = st.tolist()        # what came back, as ints (no numpy scalar each)
            h._next_effect_ns = so[ek.ST_NEXT_EFFECT]
            h.now_ns = so[ek.ST_NOW]
            self._qi_stamp_max = so[ek.ST_STAMP_MAX]
            if so[ek.ST_PTE_WRITES]:
                mem.pte_writes += so[ek.ST_PTE_WRITES]
            if late or so[ek.ST_OUT_OF_ORDER]:
                self._qi_out_of_order = set(map(tuple, ooo[:so[ek.ST_OUT_OF_ORDER]].tolist()))
            if so[ek.ST_WAITS]:
                for vm, uid, sid, wait in waits[:so[ek.ST_WAITS]].tolist():
                    self.unmap_waits.setdefault(vm, []).append((uid, sid, wait))
            if so[ek.ST_RETIRES]:
                for vm, first, count in retires[:so[ek.ST_RETIRES]].tolist():
                    self._retiring.setdefault(vm, []).append((first, count))
            if so[ek.ST_LAST_I] >= 0:
                h.last_devtlb_hit = devb[so[ek.ST_LAST_I]:so[ek.ST_LAST_J]].copy()
            if so[ek.ST_FAULTED_I] >= 0:   # a run the kernel translated faulted
                a, b = so[ek.ST_FAULTED_I], so[ek.ST_FAULTED_J]
                h._record_faults(outb[a:b], m[ek.M_SID, a:b], m[ek.M_PASID, a:b], addr[a:b],
                                 access[a:b], ops["t_ns"][a:b], reqb[a:b])
                continue
            if i >= n:
                break
            if t is None:
                t, kind, vms = ops["t_ns"].tolist(), ops["op"].tolist(), ops["vm"].tolist()
            if vf.meta[vk.META_OPS] and kind[i] in (OP_VFIO_MAP, OP_VFIO_UNMAP):
                self._vfio_fold(vf)      # vfio.py reads and writes what the kernel changed
            h.advance_to(t[i])
            k = kind[i]
            if k in (OP_DMA, OP_GUEST_WRITE):
                i = self._run(ops, i, t, kind, vms)
                continue
            self._control(ops[i:i + 1].tolist()[0])
            i += 1
            if k in (OP_SL_UNMAP, OP_SL_MAP):   # a memory map changed
                self._resolve_stores(ops, m, i)
            elif k == OP_VFIO_MAP and vf.meta[vk.META_ON]:   # the record may have grown
                rec = self._vfio_rec
                if vf.rk is not rec.keys:
                    vf = vf._replace(rk=rec.keys, rv=rec.vals)
        if vf.meta[vk.META_OPS]:
            self._vfio_fold(vf)
        self._fold_counts(cnt, tst)

    def _fold_counts(self, cnt: np.ndarray, tst: np.ndarray) -> None:
        """Add the epoch kernel's per-VM counts (cnt: int64[vms, C_*]) to the VMs' counters
        and its statistics (tst: TST_NAMES) to HostIommu.stats: the columns some VM used,
        for the VMs with a count; stale_window_max_ns as a maximum."""
        counters = self.counters
        if len(counters) == 1:      # one VM: its row holds every count
            vm = next(iter(counters))
            ctr = counters[vm]
            for c, x in enumerate(cnt[vm].tolist()):
                if x:
                    name = ek.CNT_NAMES[c]
                    ctr[name] = max(ctr[name], x) if c == ek.C_WINDOW_MAX else ctr[name] + x
            cols = []
        else:
            cols = np.flatnonzero(cnt.any(axis=0)).tolist()
        if cols:
            window = ek.C_WINDOW_MAX in cols
            if window:
                cols.remove(ek.C_WINDOW_MAX)
            names = [ek.CNT_NAMES[c] for c in cols]
            vms = np.flatnonzero(cnt.any(axis=1)).tolist()
            rows = cnt[np.ix_(vms, cols)].tolist() if cols else ()
            for vm, row in zip(vms, rows, strict=False):
                ctr = counters[vm]
                for name, x in zip(names, row, strict=True):
                    ctr[name] += x
            if window:
                name = ek.CNT_NAMES[ek.C_WINDOW_MAX]
                for vm in vms:
                    ctr = counters[vm]
                    ctr[name] = max(ctr[name], int(cnt[vm, ek.C_WINDOW_MAX]))
        vals = tst.tolist()
        if any(vals):
            hs = self.iommu.stats
            for name, x in zip(ek.TST_NAMES, vals, strict=True):
                if x:
                    setattr(hs, name, getattr(hs, name) + x)

    def _vfio_arrays(self, n: int, m: np.ndarray) -> vk.VfioArrays:
        """The VFIO containers for the epoch kernel (kernels/vfio.py VfioArrays): META_ON
        when there are VFIO operations among the epoch's ``n`` (operation matrix ``m``) and
        the kernel may apply them. The record gets room for the pages the epoch's maps ask
        for (a longer map than MAX_MAP_PAGES, or one without room, goes to Python). Made
        again when the domains may have changed, or when something replaced what the arrays
        stand for (a record, a VM's pins or GPA map); else the same arrays, the record's
        current ones in them."""
        h = self.iommu
        kinds = self._kinds      # _admit_compiled's count of this epoch's kinds
        if not (EPOCH_KERNEL_VFIO and self.shadow_of_sid and vfio_map is _VFIO_MAP
                and vfio_unmap is _VFIO_UNMAP and (kinds[OP_VFIO_MAP] or kinds[OP_VFIO_UNMAP])):
            if self._vfio_none is None:
                self._vfio_none = self._vfio_off()
            return self._vfio_none
        sig = (self._doms_version, len(h.vms), len(h.ats_sids))
        if sig != self._vfio_sig or not self._vfio_intact():
            self._vfio_build()
            self._vfio_sig = sig
        vf = self._vfio
        rec = self._vfio_rec
        if kinds[OP_VFIO_MAP]:
            maps = m[ek.M_OP, :n] == OP_VFIO_MAP
            pages = np.minimum(np.maximum(m[ek.M_A2, :n][maps], 0) >> 12, vk.MAX_MAP_PAGES)
            rec.reserve(int(pages.sum()))
        if vf.log.shape[0] < 4 * n + 64:
            vf = vf._replace(log=np.zeros((8 * n + 64, 3), dtype=np.int64))
        if vf.rk is not rec.keys or vf.owner is not h.mem.owner:
            vf = vf._replace(rk=rec.keys, rv=rec.vals, owner=h.mem.owner)
        self._vfio = vf
        return vf

    def _vfio_off(self) -> vk.VfioArrays:
        """VfioArrays that leave every VFIO operation to _control (META_ON 0)."""
        def e() -> np.ndarray:
            return np.zeros(1, dtype=np.int64)

        return vk.VfioArrays(np.full(1, -1, dtype=np.int64),
                             np.zeros((1, vk.D_FIELDS), np.int64), e(), e(), e(), e(),
                             np.zeros(1, dtype=np.int32), e(),
                             np.zeros((1, vk.V_FIELDS), np.int64), np.zeros((1, 3), np.int64),
                             np.zeros(vk.META_FIELDS, np.int64),
                             np.zeros(1, dtype=self.iommu.mem.owner.dtype))

    def _vfio_intact(self) -> bool:
        """Whether every container's record and every VM's pins and GPA map are still the
        ones the arrays hold."""
        vf, rec = self._vfio, self._vfio_rec
        for dom in self._vfio_doms:
            r = dom.gpa_of_iova
            if type(r) is not DomainRecord or r.rec is not rec or r.did != dom.did:
                return False
        for v in self.iommu.vms.values():
            if v.pins.base is not vf.pins or v.hpa_of.base is not vf.hpa:
                return False
        return True

    def _vfio_build(self) -> None:
        """Make the VFIO arrays: each VM's pins and GPA map moved into flat buffers (its
        VmMemory keeps views), each plain-dict record moved into the VfioRecord, one row
        per container the kernel may use (a 4-KiB-only second-level shadow table in host
        memory, its record ours, at most one ATS device); the others' sids stay -1."""
        h = self.iommu
        vms = h.vms
        top = max(vms, default=0) + 1
        vmrow = np.zeros((top, vk.V_FIELDS), dtype=np.int64)
        vmrow[:, vk.V_OFF] = -1
        total = sum(v.gpa_frames for v in vms.values())
        pins = np.zeros(total, dtype=np.int32)
        hpa = np.zeros(total, dtype=np.int64)
        off = 0
        for vm in sorted(vms):
            v = vms[vm]
            k = v.gpa_frames
            pins[off:off + k] = v.pins
            hpa[off:off + k] = v.hpa_of
            v.pins, v.hpa_of = pins[off:off + k], hpa[off:off + k]
            vmrow[vm, vk.V_OFF], vmrow[vm, vk.V_FRAMES] = off, k
            off += k
        rec = self._vfio_rec
        doms: list[ShadowDomain] = []
        rows = []
        sid_dom = np.full(1 << 16, -1, dtype=np.int64)
        for dom in {id(x): x for x in self.shadow_of_sid.values()}.values():
            if type(dom.gpa_of_iova) is dict:
                items = dom.gpa_of_iova
                dom.gpa_of_iova = DomainRecord(rec, dom.did)
                rec.reserve(len(items))
                dom.gpa_of_iova.update(items)
            t = dom.table
            ats = [sid for sid in dom.sids if sid in h.ats_sids]
            r = dom.gpa_of_iova
            ok = (type(r) is DomainRecord and r.rec is rec and r.did == dom.did
                  and type(t) is PageTable and t.fmt == "sl" and t.max_order == 0 and t._live
                  and not t._kernel and not t._l1_on and type(t.store) is HostTableStore
                  and t.store.mem is h.mem and not t.store.freed and dom.vm in vms
                  and len(ats) <= 1)
            if not ok:
                continue
            row = len(doms)
            doms.append(dom)
            rows.append((dom.vm, dom.did, t.root, t.levels, t.limit, t.haw,
                         ats[0] if ats else -1, 0, 0, 0))
            for sid in dom.sids:
                if self.shadow_of_sid.get(sid) is dom:
                    sid_dom[sid] = row
        dom_arr = np.array(rows, dtype=np.int64).reshape(len(rows), vk.D_FIELDS)
        meta = np.zeros(vk.META_FIELDS, dtype=np.int64)
        meta[vk.META_ON] = 1
        meta[vk.META_MAMV] = -1 if h.p.mamv is None else h.p.mamv
        meta[vk.META_WAIT0], meta[vk.META_WAIT1] = WAIT_WORDS[0], WAIT_WORDS[1]
        self._vfio_doms = doms
        self._vfio = vk.VfioArrays(sid_dom, dom_arr, rec.keys, rec.vals, rec.held, rec.count,
                                   pins, hpa, vmrow, np.zeros((64, 3), dtype=np.int64), meta,
                                   h.mem.owner)

    def _vfio_fold(self, vf: vk.VfioArrays) -> None:
        """What the kernel's VFIO operations changed outside the arrays, back into the
        Python objects: each shadow table's count of non-zero entries per table page
        (PageTable._used), its ``freed_tables`` (0 after an unmap that freed none), the
        containers' and VMs' counts of entry writes and pins. Made before Python applies a
        VFIO operation (the only code that reads or writes these mid-epoch) and at the
        epoch's end; the records and pins are the arrays themselves."""
        doms = self._vfio_doms
        nlog = int(vf.meta[vk.META_LOG])
        log = vf.log[:nlog]
        if nlog > _FOLD_SUM_MIN:   # many VMs' operations interleaved: a sum per (dom, table)
            key = (log[:, 0] << 40) | (log[:, 1] >> PAGE_SHIFT)
            uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
            sums = np.zeros(uniq.size, dtype=np.int64)
            np.add.at(sums, inv, log[:, 2])
            log = np.column_stack((log[first, 0], log[first, 1], sums))
        for d, table, delta in log.tolist():
            doms[d].table._used[table] += delta
        dom = vf.dom
        for d in np.flatnonzero(dom[:, vk.D_PTE_WRITES] | dom[:, vk.D_PINNED]
                                | dom[:, vk.D_UNMAPS]).tolist():
            sd = doms[d]
            sd.pte_writes += int(dom[d, vk.D_PTE_WRITES])
            sd.pinned_pages += int(dom[d, vk.D_PINNED])
            if dom[d, vk.D_UNMAPS]:
                sd.table.freed_tables = 0
        dom[:, vk.D_PTE_WRITES:] = 0
        pinned = vf.vmrow[:, vk.V_PINNED]
        for v in np.flatnonzero(pinned).tolist():
            self.counters[v]["pinned_pages"] += int(pinned[v])
        pinned[:] = 0
        vf.meta[vk.META_LOG] = vf.meta[vk.META_OPS] = 0

    def _translation_state(self) -> tuple:
        """HostIommu.translate's arguments to the context stage and the translate kernel
        (the caches, memory, the walker's masks) and the frame owners, for the epoch kernel:
        taken afresh at each call (Python may have grown an array in between)."""
        h = self.iommu
        c, mem, w = h.caches, h.mem, h.walker
        fl, sl = h.fl_pwc, h.sl_pwc
        return (c.ctxc.st, c.ctxc.vals, c.pasidc.st, c.pasidc.vals, h.iotlb.state,
                h.iotlb.counts, c.dtlb.state, c.dtlb.counts, mem.slab, mem.slot_of, w.haw,
                w.amask, w.fl_rsvd, w.sl_rsvd, fl is not None,
                NO_PWC[0] if fl is None else fl.state, NO_PWC[1] if fl is None else fl.counts,
                sl is not None, NO_PWC[0] if sl is None else sl.state,
                NO_PWC[1] if sl is None else sl.counts, mem.owner, h.sm.rtaddr)

    def _control(self, row: tuple[int, ...]) -> None:
        """One operation that is neither a DMA nor a guest table store: an OP_DTYPE row as
        ints (a row of ``ops.tolist()``: t_ns, vm, seq, op, sid, pasid, a0, a1, a2, a3)."""
        h = self.iommu
        t, vm, _seq, k, sid, pasid, a0, a1, a2, a3 = row
        if k == OP_UNMAP_RET:
            # A strict unmap returns only when its wait descriptor completed on this host's
            # queue, which every VM shares: report how much later than the guest's modelled
            # return that was (the VFIO unmap or HWPT invalidate came first in merge order).
            uid, t_ret = a0, a1
            oracle = self.oracle
            host_done = oracle.returned_at(vm, uid)
            causal = True
            if self._qi_out_of_order:
                causal = (vm, uid) not in self._qi_out_of_order
                self._qi_out_of_order.discard((vm, uid))
            if host_done is not None and host_done > t_ret and causal:
                self.unmap_waits.setdefault(vm, []).append((uid, a2 & 0xFFFF, host_done - t_ret))
            oracle.unmap_returned(vm, uid, t_ret)
            return
        c = self.counters[vm]
        if k in (OP_HWPT_INV, OP_VFIO_UNMAP, OP_SL_UNMAP):   # these submit to the shared QI
            # An operation stamped earlier than one already applied (a VM's calls can run
            # past an epoch's end) finds the queue holding work from its future: its wait is
            # not reported to the guest, only used by the oracle.
            if t < self._qi_stamp_max and k != OP_SL_UNMAP and a3 >= 0:
                self._qi_out_of_order.add((vm, a3))
            if t > self._qi_stamp_max:
                self._qi_stamp_max = t
        if k == OP_HWPT_INV:
            dom = self.nested.get((sid, pasid))
            if dom is None or dom.vm != vm:
                c["vfio_errors"] += 1  # iommufd refuses a HWPT the VM does not own
                return
            try:
                t_done, nd = hwpt_invalidate_one(h, dom, a0, a1, a2, t)
            except IommufdError:
                c["vfio_errors"] += 1  # refused entries are never applied
                return
            c["host_inv_descriptors"] += nd
            self.oracle.unmap_returned(vm, a3, t_done)
        elif k in (OP_VFIO_MAP, OP_VFIO_UNMAP):
            dom = self.shadow_of_sid.get(sid)
            try:
                if dom is None or dom.vm != vm:
                    raise VfioError(f"device {sid:#06x} of VM {vm} has no VFIO container")
                if k == OP_VFIO_MAP:
                    c["pinned_pages"] += vfio_map(h, dom, a0, a1, a2, bool(a3))
                    return
                t_done, nd = vfio_unmap(h, dom, a0, a1, t)
            except VfioError:
                c["vfio_errors"] += 1
                return
            c["host_inv_descriptors"] += nd
            self.oracle.unmap_returned(vm, a3, t_done)
        elif k == OP_SL_UNMAP:
            try:
                _t, nd, _freed, refused = sl_unmap(h, vm, a0, a1, t)
            except IommufdError:
                c["ops_refused"] += 1
                return
            c["host_inv_descriptors"] += nd
            c["sl_unmap_refused"] += refused
        elif k == OP_SL_MAP:
            try:
                sl_map(h, vm, a0, a1)
            except IommufdError:
                c["ops_refused"] += 1
        elif k == OP_UNMAP_RETIRE:
            self._retiring.setdefault(vm, []).append((a0, a1))

    def _dma(self, ops: np.ndarray) -> None:
        """Translate a run of DMAs in one batch, run the oracle, count per VM."""
        h = self.iommu
        res = h.translate(ops["sid"], ops["pasid"], ops["a0"],
                          (ops["a2"] & 0xFF).astype(np.uint8), ops["t_ns"])
        ok, cross = self._reached(ops, res)
        if ops.size <= DMA_SMALL_BATCH:
            self._tally_each(ops, res, h.last_devtlb_hit, cross)
        else:
            self._tally_columns(ops, res, h.last_devtlb_hit, ok, cross)

    def _reached(self, ops: np.ndarray, res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(translated, reached a frame its VM does not own) per DMA: the isolation check
        against the host's frame owner map."""
        ok = res["fault"] == 0
        owner = self.iommu.mem.owner[(res["hpa"] >> np.uint64(PAGE_SHIFT)).astype(np.int64)]
        vm = ops["vm"]
        cross = ok & (owner != vm)
        return ok, cross

    def _tally_columns(self, ops: np.ndarray, res: np.ndarray, devtlb_hit: np.ndarray,
                       ok: np.ndarray, cross: np.ndarray) -> None:
        """_dma's oracle and counting for a batch of DMAs (OP_DTYPE rows, the translate
        results as RESULT_DTYPE, and _reached's columns), as numpy columns."""
        a2 = ops["a2"]
        t_ns, uid, vm = ops["t_ns"], ops["a3"], ops["vm"]
        stale, window = self.oracle.check(vm, uid, t_ns, ok)
        hit, walk, ctx = res["iotlb_hit"], res["walk_refs"], res["ctx_refs"]
        cols = (hit, devtlb_hit, walk, ctx, ok, cross, stale, window,
                (a2 & DMA_ROGUE) != 0, uid >= 0)
        v0 = int(vm[0])
        if vm.size == 1 or not (vm != v0).any():
            self._tally(self.counters[v0], *cols)
            return
        for v in np.unique(vm).tolist():
            m = vm == v
            self._tally(self.counters[v], *(x[m] for x in cols))

    def _tally_each(self, ops: np.ndarray, res: np.ndarray, devtlb_hit: np.ndarray,
                    cross: np.ndarray) -> None:
        """_dma's oracle and counting for a few DMAs, one at a time on plain ints.

        The same counts as the column path (_tally, Oracle.check) gives, without a numpy
        operation per counter: a batch cut short by a guest write or an invalidation taking
        effect is often only one or two DMAs long.
        """
        returned_at = self.oracle.returned_at
        hit_ns, mem_ref_ns = self.costs.iotlb_hit_ns, self.costs.mem_ref_ns
        counters = self.counters
        for (t, vm, _s, _k, _sid, _p, _a0, _a1, a2, uid), hit, dev, fault, crossed, walk, ctx \
                in zip(ops.tolist(), res["iotlb_hit"].tolist(), devtlb_hit.tolist(),
                       res["fault"].tolist(), cross.tolist(), res["walk_refs"].tolist(),
                       res["ctx_refs"].tolist(), strict=True):
            c = counters[vm]
            ok = fault == 0
            stale = False
            if ok and uid >= 0:
                ret = returned_at(vm, uid)    # a DMA after its page's unmap returned
                if ret is not None and t > ret:
                    stale = True
                    c["stale_dma"] += 1
                    c["stale_window_max_ns"] = max(c["stale_window_max_ns"], t - ret)
            c["translations"] += 1
            if hit:
                c["iotlb_hits"] += 1
                c["translate_ns"] += hit_ns
            else:
                if walk > 0:
                    c["iotlb_misses"] += 1
                c["translate_ns"] += (walk + ctx) * mem_ref_ns
            if dev:
                c["devtlb_hits"] += 1
            c["walk_refs"] += walk
            c["ctx_refs"] += ctx
            if not ok:
                c["faults"] += 1
            if crossed:
                c["cross_vm_dma"] += 1
            if a2 & DMA_ROGUE:
                c[("rogue_faulted" if not ok else "rogue_cross_vm" if crossed
                   else "rogue_stale" if stale else "rogue_in_flight" if uid >= 0
                   else "rogue_misdirected")] += 1

    def _tally(self, c: dict[str, int], hit: np.ndarray, devtlb_hit: np.ndarray,
               walk: np.ndarray, ctx: np.ndarray, ok: np.ndarray, cross: np.ndarray,
               stale: np.ndarray, window: np.ndarray, rogue: np.ndarray, tagged: np.ndarray
               ) -> None:
        """Add one VM's translations of a batch to its counters.

        ``translate_ns`` charges an IOTLB (or device-TLB) hit ``iotlb_hit_ns``, any other
        translation a memory reference per walk and context reference. Rogue DMAs (aimed at
        the last unmapped IOVA) fall in one class each, see ROGUE_CLASSES.
        """
        def count(x: np.ndarray) -> int:
            return int(np.count_nonzero(x))

        n = hit.size
        n_ok = count(ok)
        c["translations"] += n
        c["iotlb_hits"] += count(hit)
        c["devtlb_hits"] += count(devtlb_hit)
        c["iotlb_misses"] += count(~hit & (walk > 0))
        walk_sum, ctx_sum = int(walk.sum()), int(ctx.sum())
        c["walk_refs"] += walk_sum
        c["ctx_refs"] += ctx_sum
        c["faults"] += n - n_ok
        n_cross = count(cross)
        c["cross_vm_dma"] += n_cross
        n_stale = count(stale)
        if n_stale:
            c["stale_dma"] += n_stale
            c["stale_window_max_ns"] = max(c["stale_window_max_ns"], int(window[stale].max()))
        cost = self.costs
        n_hit = count(hit)
        if n_hit:   # hits cost iotlb_hit_ns; the others their references
            refs = int(walk[~hit].sum()) + int(ctx[~hit].sum())
        else:
            refs = walk_sum + ctx_sum
        c["translate_ns"] += n_hit * cost.iotlb_hit_ns + refs * cost.mem_ref_ns
        # The next lines are equivalent and left for reference:
        #     tns = np.where(hit, cost.iotlb_hit_ns,
        #                    walk.astype(np.int64) * cost.mem_ref_ns
        #                    + ctx.astype(np.int64) * cost.mem_ref_ns)
        #     c["translate_ns"] += int(tns.sum())
        if rogue.any():
            clean = ok & ~cross
            c["rogue_faulted"] += count(rogue & ~ok)
            c["rogue_cross_vm"] += count(rogue & cross)
            c["rogue_stale"] += count(rogue & clean & stale)
            c["rogue_in_flight"] += count(rogue & clean & ~stale & tagged)
            c["rogue_misdirected"] += count(rogue & clean & ~tagged)

    # --- results --------------------------------------------------------------------------
    def fault_columns(self) -> dict[str, np.ndarray]:
        return self.iommu.faults.columns()



# What the epoch kernel stands in for: with any of these replaced (on the class or the
# instance), apply_epoch takes the Python loop, which calls them.
_IOMMU_HOOKS = {name: getattr(HostIommu, name) for name in (
    "translate", "guest_write", "submit_qi", "advance_to", "_apply_effects", "next_effect_ns",
    "_account", "_record_faults", "_contexts")}
_SERVER_HOOKS = {name: getattr(HostServer, name) for name in (
    "_dma", "_reached", "_tally_each", "_tally_columns", "_tally", "_control", "_admit")}
_HWPT_ONE = hwpt_invalidate_one
_VFIO_MAP, _VFIO_UNMAP = vfio_map, vfio_unmap
# _vfio_fold sums a longer log by (container, table page) before it adds to PageTable._used
_FOLD_SUM_MIN = 32


_HOOK_GET = {id(hooks): (operator.attrgetter(*hooks), tuple(hooks.values()))
             for hooks in (_IOMMU_HOOKS, _SERVER_HOOKS)}


def _intact(obj: object, hooks: dict) -> bool:
    """No hook replaced on obj's class (one attrgetter; functions compare by identity) or
    set on obj itself."""
    get, funcs = _HOOK_GET[id(hooks)]
    return get(type(obj)) == funcs and vars(obj).keys().isdisjoint(hooks)


def warm_up_epoch() -> None:
    """Compile (or load) the epoch kernel and its callees once: a tiny nested host applies
    epochs of every operation kind the kernel takes (kernels/epoch.py), and an ArrayOracle
    spills, finds and retires far ids (kernels/oracle.py). Results are discarded."""
    from host_iommu.oracle import ArrayOracle as _Oracle

    hs = HostServer(IommuParams(memory_mib=16, qi_entries=128, iotlb_entries=64,
                                iotlb_ways=4))
    sid, root = 0x100, 0x10_0000
    hs.setup_vm(VmSetup(1, 2 << 20, "nested", (sid,), True, 4, (root,)))
    for e in range(3):
        t = 1000 + 100_000 * e
        ops = np.zeros(7, dtype=OP_DTYPE)
        for i, (k, a0, a1, a2, a3) in enumerate((
                (OP_GUEST_WRITE, root, 0x20_0003, 0, 0), (OP_DMA, 0x1000, 64, ACCESS_READ, -1),
                (OP_HWPT_INV, 0x1000, 1, 0, e), (OP_UNMAP_RET, e, t + 3, 0, 0),
                (OP_UNMAP_RETIRE, e, 1, 0, 0), (OP_GUEST_WRITE, root + 8, 0, 0, 0),
                (OP_DMA, 0x2000, 64, ACCESS_WRITE, e))):
            ops[i] = (t + i, 1, 7 * e + i, k, sid, 0, a0, a1, a2, a3)
        hs.apply_epoch(ops, t)
    o = _Oracle()
    for u in range(1 << 40, (1 << 40) + 64):
        o.unmap_returned(1, u, 5)
    o.returned_at(1, 1 << 40)
    o.retire_runs(1, [(1 << 40, 2)])
    o.retire(1, np.arange(1 << 40, (1 << 40) + 64, dtype=np.int64))
    ek.inv_rehash(hs._inv_ik, hs._inv_iv, np.full((2048, ek.K_FIELDS), -1, dtype=np.int64),
                  np.zeros((2048, 2), dtype=np.int64), np.zeros(1, dtype=np.int64))
    ek.inv_insert(hs._inv_ik, hs._inv_iv, hs._inv_im, hs._op_matrix(ops), 2)   # after a grow
    mem = hs.iommu.vms[1]        # a many-VM host's stores, by VM (HostServer._resolve_stores)
    ek.store_frames(hs._op_matrix(ops), np.flatnonzero(ops["op"] == OP_GUEST_WRITE),
                    mem.hpa_of, mem.gpa_frames)
    hpa, vmrow = hs._store_maps()      # ... and all of them in one call (STORES_FLAT)
    ek.store_frames_flat(hs._op_matrix(ops), 0, hpa, vmrow)
    warm_up_vfio()


def warm_up_vfio() -> None:
    """Compile (or load) the epoch kernel's VFIO path (kernels/vfio.py): a tiny shadow host
    applies maps and unmaps in the kernel and in Python (a table to allocate, one to free),
    and a container's record grows, is read, iterated and emptied. Results are discarded."""
    hs = HostServer(IommuParams(memory_mib=16, qi_entries=128, iotlb_entries=64,
                                iotlb_ways=4))
    sid = 0x100
    hs.setup_vm(VmSetup(1, 2 << 20, "shadow", (sid,), True))
    for e in range(2):
        t = 1000 + 100_000 * e
        rows = ((OP_VFIO_MAP, 0x40_0000, 0x1000, 2 << PAGE_SHIFT, 1),
                (OP_DMA, 0x40_0000, 64, ACCESS_READ, -1),
                (OP_VFIO_UNMAP, 0x40_0000, 2 << PAGE_SHIFT, 0, e),
                (OP_UNMAP_RET, e, t + 3, 0, 0),
                (OP_VFIO_MAP, 0x40_0000, 0x3000, 1 << PAGE_SHIFT, 0),
                (OP_VFIO_UNMAP, 0x40_0000, 2 << 20, 0, -1))
        ops = np.zeros(len(rows), dtype=OP_DTYPE)
        for i, (k, a0, a1, a2, a3) in enumerate(rows):
            ops[i] = (t + i, 1, 7 * e + i, k, sid, 0, a0, a1, a2, a3)
        hs.apply_epoch(ops, t)
    rec = DomainRecord(VfioRecord(8), 1)
    for p in range(16):
        rec[p] = p
    _ = (3 in rec, rec[3], list(rec), repr(rec))
    for p in range(16):
        del rec[p]
