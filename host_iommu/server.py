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
"""

from __future__ import annotations

import numpy as np

from host_iommu.costs import CostModel
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, MAX_PASID, NO_PASID, PAGE_SHIFT
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.memory import HostMemoryError
from host_iommu.nested import (
    IommufdError,
    NestedDomain,
    alloc_nested,
    attach_second_level,
    hwpt_invalidate,
    sl_map,
    sl_unmap,
)
from host_iommu.oracle import Oracle
from host_iommu.protocol import (
    DMA_ROGUE,
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
from host_iommu.vfio import ShadowDomain, VfioError, vfio_attach, vfio_map, vfio_unmap

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
        self.oracle = Oracle()
        self.unmap_waits: dict[int, list[tuple[int, int, int]]] = {}   # vm -> this epoch's
        self._qi_stamp_max = 0                  # latest time stamp that submitted to the QI
        self._qi_out_of_order: set[tuple[int, int]] = set()   # (vm, unmap id)
        self._retiring: dict[int, list[tuple[int, int]]] = {}   # vm -> retired id runs
        self.counters: dict[int, dict[str, int]] = {}
        self.host_counters: dict[str, int] = dict.fromkeys(HOST_ONLY_COUNTERS, 0)

    # --- set-up ---------------------------------------------------------------------------
    def setup_vm(self, s: VmSetup) -> None:
        """Create a VM's memory and bind its devices, as its VMM asks (a VmSetup).

        Checked whole before anything is created, so a refused set-up changes nothing:
        invalid fields raise ProtocolError; a VM id in use, a device assigned to another VM,
        or memory the host cannot back raise IommufdError.
        """
        check_setup(s)
        h = self.iommu
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
        try:
            dom = alloc_nested(self.iommu, vm, sid, pasid, flptr_gpa, fl_levels,
                               ats=sid in self.iommu.ats_sids, t_ns=t_ns)
        except IommufdError:
            c["vfio_errors"] += 1
            return None
        self.nested[(sid, pasid)] = dom
        return dom

    def _admit(self, ops: np.ndarray) -> np.ndarray:
        """The operations the host applies; every other one is refused and counted.

        Refused: an unknown VM (host ``unknown_vm_ops``); a field no valid operation carries
        (unknown kind, negative time, a PASID wider than 20 bits, a DMA that neither reads nor
        writes: ``ops_refused``); a device operation whose sid is not assigned to the sending
        VM (``foreign_sid_refused``), so nothing is translated or charged to another VM.
        """
        vm = ops["vm"]
        known = np.isin(vm, np.array(sorted(self.counters), dtype=np.int64))
        self.host_counters["unknown_vm_ops"] += int((~known).sum())
        kind = ops["op"]
        malformed = (~np.isin(kind, np.array(sorted(OP_NAMES))) | (ops["t_ns"] < 0)
                     | (ops["pasid"] > MAX_PASID) | bad_retire(ops)
                     | ((kind == OP_DMA)
                        & ~np.isin(ops["a2"] & 0xFF, (ACCESS_READ, ACCESS_WRITE))))
        owner = np.zeros(1 << 16, dtype=np.int64)
        for sid, v in self.iommu.owner_of_sid.items():
            owner[sid] = v
        foreign = ~malformed & np.isin(kind, SID_OPS) & (owner[ops["sid"]] != vm)
        for v in np.unique(vm[known & (malformed | foreign)]).tolist():
            c = self.counters[v]
            c["ops_refused"] += int((malformed & (vm == v)).sum())
            c["foreign_sid_refused"] += int((foreign & (vm == v)).sum())
        keep = known & ~malformed & ~foreign
        return ops if keep.all() else ops[keep]

    # --- one epoch ------------------------------------------------------------------------
    def apply_epoch(self, ops: np.ndarray) -> dict[int, EpochReport]:
        """Apply merged operations (sorted by t_ns, vm, seq); report per VM."""
        if not isinstance(ops, np.ndarray) or ops.dtype != OP_DTYPE or ops.ndim != 1:
            raise ProtocolError("apply_epoch takes a 1-D numpy array of OP_DTYPE")
        h = self.iommu
        ops = self._admit(ops)
        n = ops.size
        t = ops["t_ns"]
        kind = ops["op"]
        i = 0
        while i < n:
            h.advance_to(int(t[i]))
            k = kind[i]
            if k in (OP_DMA, OP_GUEST_WRITE):
                j = i + 1
                while j < n and kind[j] == k and (k == OP_DMA or ops["vm"][j] == ops["vm"][i]):
                    j += 1
                nxt = h.next_effect_ns()
                if nxt is not None and nxt <= t[j - 1]:
                    j = max(i + 1, int(np.searchsorted(t[i:j], nxt, side="left")) + i)
                if k == OP_DMA:
                    self._dma(ops[i:j])
                else:
                    vm = int(ops["vm"][i])
                    dropped = h.guest_write(vm, ops["a0"][i:j], ops["a1"][i:j])
                    self.counters[vm]["guest_writes_dropped"] += dropped
                i = j
                continue
            self._control(ops[i])
            i += 1
        # Retired unmap ids are dropped only now, after every DMA of the epoch was checked
        # (a DMA stamped with an id may sort after the retire in time order).
        for vm in sorted(self._retiring):
            self.oracle.retire_runs(vm, self._retiring[vm])
        self._retiring.clear()
        # The host driver's fault handler reads every record and clears PFO (dmar_fault).
        f = h.faults.take_all()
        owned = np.isin(f["vm"], np.array(sorted(self.counters), dtype=np.int64))
        self.host_counters["host_faults"] += int((~owned).sum())
        reports = {}
        for vm in sorted(self.counters):
            m = f["vm"] == vm
            faults = list(zip(f["time_ns"][m].tolist(), f["sid"][m].tolist(),
                              f["pasid"][m].tolist(), f["addr"][m].tolist(),
                              f["reason"][m].tolist(), f["stage"][m].tolist(), strict=True))
            reports[vm] = EpochReport(vm, dict(self.counters[vm]), faults,
                                      self.unmap_waits.pop(vm, []))
        return reports

    def _control(self, op: np.void) -> None:
        h = self.iommu
        k, vm, t = int(op["op"]), int(op["vm"]), int(op["t_ns"])
        c = self.counters[vm]
        if k in (OP_HWPT_INV, OP_VFIO_UNMAP, OP_SL_UNMAP):   # these submit to the shared QI
            # An operation stamped earlier than one already applied (a VM's calls can run
            # past an epoch's end) finds the queue holding work from its future: its wait is
            # not reported to the guest, only used by the oracle.
            if t < self._qi_stamp_max and k != OP_SL_UNMAP and int(op["a3"]) >= 0:
                self._qi_out_of_order.add((vm, int(op["a3"])))
            self._qi_stamp_max = max(self._qi_stamp_max, t)
        if k == OP_HWPT_INV:
            dom = self.nested.get((int(op["sid"]), int(op["pasid"])))
            if dom is None or dom.vm != vm:
                c["vfio_errors"] += 1  # iommufd refuses a HWPT the VM does not own
                return
            try:
                t_done, nd = hwpt_invalidate(h, dom, [(int(op["a0"]), int(op["a1"]),
                                                       int(op["a2"]))], t)
            except IommufdError:
                c["vfio_errors"] += 1  # refused entries are never applied
                return
            c["host_inv_descriptors"] += nd
            self.oracle.unmap_returned(vm, int(op["a3"]), t_done)
        elif k in (OP_VFIO_MAP, OP_VFIO_UNMAP):
            dom = self.shadow_of_sid.get(int(op["sid"]))
            try:
                if dom is None or dom.vm != vm:
                    raise VfioError(f"device {int(op['sid']):#06x} of VM {vm} has no VFIO "
                                    "container")
                if k == OP_VFIO_MAP:
                    c["pinned_pages"] += vfio_map(h, dom, int(op["a0"]), int(op["a1"]),
                                                  int(op["a2"]), bool(op["a3"]))
                    return
                t_done, nd = vfio_unmap(h, dom, int(op["a0"]), int(op["a1"]), t)
            except VfioError:
                c["vfio_errors"] += 1
                return
            c["host_inv_descriptors"] += nd
            self.oracle.unmap_returned(vm, int(op["a3"]), t_done)
        elif k == OP_UNMAP_RET:
            # A strict unmap returns only when its wait descriptor completed on this host's
            # queue, which every VM shares: report how much later than the guest's modelled
            # return that was (the VFIO unmap or HWPT invalidate came first in merge order).
            uid, t_ret = int(op["a0"]), int(op["a1"])
            host_done = self.oracle.returned.get((vm, uid))
            causal = (vm, uid) not in self._qi_out_of_order
            self._qi_out_of_order.discard((vm, uid))
            if host_done is not None and host_done > t_ret and causal:
                self.unmap_waits.setdefault(vm, []).append(
                    (uid, int(op["a2"]) & 0xFFFF, host_done - t_ret))
            self.oracle.unmap_returned(vm, uid, t_ret)
        elif k == OP_SL_UNMAP:
            try:
                _t, nd, _freed, refused = sl_unmap(h, vm, int(op["a0"]), int(op["a1"]), t)
            except IommufdError:
                c["ops_refused"] += 1
                return
            c["host_inv_descriptors"] += nd
            c["sl_unmap_refused"] += refused
        elif k == OP_SL_MAP:
            try:
                sl_map(h, vm, int(op["a0"]), int(op["a1"]))
            except IommufdError:
                c["ops_refused"] += 1
        elif k == OP_UNMAP_RETIRE:
            self._retiring.setdefault(vm, []).append((int(op["a0"]), int(op["a1"])))

    def _dma(self, ops: np.ndarray) -> None:
        h = self.iommu
        access = (ops["a2"] & 0xFF).astype(np.uint8)
        res = h.translate(ops["sid"], ops["pasid"], ops["a0"], access, ops["t_ns"])
        ok = res["fault"] == 0
        owner = h.mem.owner[(res["hpa"] >> np.uint64(PAGE_SHIFT)).astype(np.int64)]
        vm = ops["vm"]
        cross = ok & (owner != vm)
        stale, window = self.oracle.check(vm, ops["a3"], ops["t_ns"], ok)
        rogue = (ops["a2"] & DMA_ROGUE) != 0
        tagged = ops["a3"] >= 0     # the page was unmapped when the device aimed at it
        classes = {"rogue_faulted": rogue & ~ok, "rogue_cross_vm": rogue & cross,
                   "rogue_stale": rogue & ok & ~cross & stale,
                   "rogue_in_flight": rogue & ok & ~cross & ~stale & tagged,
                   "rogue_misdirected": rogue & ok & ~cross & ~tagged}
        cost = self.costs
        tns = np.where(res["iotlb_hit"], cost.iotlb_hit_ns,
                       res["walk_refs"].astype(np.int64) * cost.mem_ref_ns
                       + res["ctx_refs"].astype(np.int64) * cost.mem_ref_ns)
        for v in np.unique(vm).tolist():
            m = vm == v
            c = self.counters[v]
            c["translations"] += int(m.sum())
            c["iotlb_hits"] += int((res["iotlb_hit"][m]).sum())
            c["devtlb_hits"] += int(h.last_devtlb_hit[m].sum())
            c["iotlb_misses"] += int((~res["iotlb_hit"][m] & (res["walk_refs"][m] > 0)).sum())
            c["walk_refs"] += int(res["walk_refs"][m].sum())
            c["ctx_refs"] += int(res["ctx_refs"][m].sum())
            c["faults"] += int((~ok[m]).sum())
            c["cross_vm_dma"] += int(cross[m].sum())
            c["stale_dma"] += int(stale[m].sum())
            if stale[m].any():
                c["stale_window_max_ns"] = max(c["stale_window_max_ns"],
                                               int(window[m][stale[m]].max()))
            c["translate_ns"] += int(tns[m].sum())
            for name, hit in classes.items():
                c[name] += int(hit[m].sum())

    # --- results --------------------------------------------------------------------------
    def fault_columns(self) -> dict[str, np.ndarray]:
        return self.iommu.faults.columns()

