"""The host side of the protocol: applies every VM's operations of an epoch to one HostIommu.

This is what the host actor wraps. It owns the VMs' host-side domains (shadow containers,
nested HWPTs, pass-through attachments), applies the merged operation stream of an epoch in
(t_ns, vm, seq) order, batches each run of DMA requests into one ``HostIommu.translate`` call
(split wherever a queued invalidation takes effect), and runs the security oracle on every
DMA (host_iommu/oracle.py).
"""

from __future__ import annotations

import numpy as np

from host_iommu.costs import CostModel
from host_iommu.defs import NO_PASID, PAGE_SHIFT
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.nested import (
    NestedDomain,
    alloc_nested,
    attach_second_level,
    hwpt_invalidate,
    sl_map,
    sl_unmap,
)
from host_iommu.oracle import Oracle
from host_iommu.protocol import (
    OP_DMA,
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_SL_MAP,
    OP_SL_UNMAP,
    OP_UNMAP_RET,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
    EpochReport,
    VmSetup,
)
from host_iommu.vfio import ShadowDomain, VfioError, vfio_attach, vfio_map, vfio_unmap

HOST_COUNTERS = ("translations", "iotlb_hits", "iotlb_misses", "devtlb_hits", "walk_refs",
                 "ctx_refs", "faults", "stale_dma", "cross_vm_dma", "stale_window_max_ns",
                 "host_inv_descriptors", "pinned_pages", "translate_ns", "vfio_errors",
                 "guest_writes_dropped")


class HostServer:
    """One host: a HostIommu plus the per-VM domains the VMMs created on it."""

    def __init__(self, params: IommuParams | None = None, costs: CostModel | None = None,
                 host: int = 0) -> None:
        self.iommu = HostIommu(params, costs, host)
        self.costs = self.iommu.costs
        self.shadow: dict[int, ShadowDomain] = {}
        self.nested: dict[tuple[int, int], NestedDomain] = {}
        self.oracle = Oracle()
        self.counters: dict[int, dict[str, int]] = {}

    # --- set-up ---------------------------------------------------------------------------
    def setup_vm(self, s: VmSetup) -> None:
        h = self.iommu
        h.create_vm(s.vm, s.memory_bytes)
        self.counters[s.vm] = dict.fromkeys(HOST_COUNTERS, 0)
        if s.mode == "shadow":
            self.shadow[s.vm] = vfio_attach(h, s.vm, list(s.sids), ats=s.ats)
        elif s.mode == "nested":
            for sid, root in zip(s.sids, s.fl_roots, strict=True):
                self.nested[(sid, NO_PASID)] = alloc_nested(h, s.vm, sid, NO_PASID, root,
                                                            s.fl_levels, ats=s.ats)
        elif s.mode == "passthrough":
            for sid in s.sids:
                attach_second_level(h, s.vm, sid, ats=s.ats)
        else:
            raise ValueError(f"unknown mode {s.mode!r}")

    # --- one epoch ------------------------------------------------------------------------
    def apply_epoch(self, ops: np.ndarray) -> dict[int, EpochReport]:
        """Apply merged operations (sorted by t_ns, vm, seq); report per VM."""
        h = self.iommu
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
        reports = {}
        for vm in sorted(self.counters):
            f = h.faults.take_for_vm(vm)
            faults = list(zip(f["time_ns"].tolist(), f["sid"].tolist(), f["pasid"].tolist(),
                              f["addr"].tolist(), f["reason"].tolist(), f["stage"].tolist(),
                              strict=True))
            reports[vm] = EpochReport(vm, dict(self.counters[vm]), faults)
        return reports

    def _control(self, op: np.void) -> None:
        h = self.iommu
        k, vm, t = int(op["op"]), int(op["vm"]), int(op["t_ns"])
        c = self.counters[vm]
        if k == OP_HWPT_INV:
            dom = self.nested.get((int(op["sid"]), int(op["pasid"])))
            if dom is None or dom.vm != vm:
                c["vfio_errors"] += 1  # iommufd refuses a HWPT the VM does not own
                return
            t_done, nd = hwpt_invalidate(h, dom, [(int(op["a0"]), int(op["a1"]),
                                                   int(op["a2"]))], t)
            c["host_inv_descriptors"] += nd
            self.oracle.unmap_returned(vm, int(op["a3"]), t_done)
        elif k == OP_VFIO_MAP:
            try:
                c["pinned_pages"] += vfio_map(h, self.shadow[vm], int(op["a0"]), int(op["a1"]),
                                              int(op["a2"]), bool(op["a3"]))
            except (VfioError, KeyError, ValueError):
                c["vfio_errors"] += 1
        elif k == OP_VFIO_UNMAP:
            try:
                t_done, nd = vfio_unmap(h, self.shadow[vm], int(op["a0"]), int(op["a1"]), t)
            except (VfioError, KeyError, ValueError):
                c["vfio_errors"] += 1
                return
            c["host_inv_descriptors"] += nd
            self.oracle.unmap_returned(vm, int(op["a3"]), t_done)
        elif k == OP_UNMAP_RET:
            self.oracle.unmap_returned(vm, int(op["a0"]), int(op["a1"]))
        elif k == OP_SL_UNMAP:
            _t, nd, _freed = sl_unmap(h, vm, int(op["a0"]), int(op["a1"]), t)
            c["host_inv_descriptors"] += nd
        elif k == OP_SL_MAP:
            sl_map(h, vm, int(op["a0"]), int(op["a1"]))
        else:
            raise ValueError(f"unknown operation kind {k}")

    def _dma(self, ops: np.ndarray) -> None:
        h = self.iommu
        access = (ops["a2"] & 0xFF).astype(np.uint8)
        res = h.translate(ops["sid"], ops["pasid"], ops["a0"], access, ops["t_ns"])
        ok = res["fault"] == 0
        owner = h.mem.owner[(res["hpa"] >> np.uint64(PAGE_SHIFT)).astype(np.int64)]
        vm = ops["vm"]
        cross = ok & (owner != vm)
        stale, window = self.oracle.check(vm, ops["a3"], ops["t_ns"], ok)
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

    # --- results --------------------------------------------------------------------------
    def fault_columns(self) -> dict[str, np.ndarray]:
        return self.iommu.faults.columns()

