"""Executing fuzz operations: one generated operation applied to a World, its Effect noted.

The other half of tests/fuzz/ops.py: each operation kind reaches its boundary the way a guest,
its VMM or its devices would (the DMA API, the vIOMMU's tail write and the VMM's trap
handling, the wire encoding, HostServer.apply_epoch, setup_vm, bind_nested). Refusals the
boundary is allowed to make (a named error of the model's own, a DMA API error) are noted in
the Effect, not raised; anything else escapes for the checker to report.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from host_iommu import protocol, qi
from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.nested import alloc_nested
from host_iommu.protocol import (
    OP_DMA,
    OP_DTYPE,
    OP_GUEST_WRITE,
    OP_SL_MAP,
    OP_SL_UNMAP,
    OP_VFIO_MAP,
    EpochReport,
    VmSetup,
)
from tests.fuzz.ops import U64, Op
from tests.fuzz.world import World, protocol_refusal
from workloads.base import DMA_BIDIRECTIONAL, DMA_TO_DEVICE

DMA_MAPPING_ERROR = U64              # include/linux/dma-mapping.h: ~(dma_addr_t)0
# A lazy unmap is flushed by dma-iommu.c's 10 ms flush-queue timer, armed in jiffies: at
# HZ=250 it fires within about 16 ms; the page must be unreachable 20 ms after the unmap.
LAZY_BOUND_NS = 20_000_000
MODEL_PACKAGES = ("host_iommu", "vm_agent", "workloads", "cluster")


def refusal_allowed(exc: BaseException) -> bool:
    """A named error class of the model itself (VfioError, PasidError, DmaError, ...)."""
    mod = type(exc).__module__
    return isinstance(exc, Exception) and mod.split(".")[0] in MODEL_PACKAGES


@dataclass
class Effect:
    """What executing one operation did, for the checker."""

    senders: set[int] = field(default_factory=set)   # VMs whose batches the host applied
    mixed: bool = False                              # several senders in one merged batch
    weight: int = 1                                  # operations it counts as
    refused: str = ""                                # a boundary's named refusal, if any
    unmapped: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    # (vm, sid, first page, pages, virtual time from which they must be unreachable)
    remapped: list[tuple[int, int, int, int]] = field(default_factory=list)  # (vm, sid, pg, n)
    forget: set[int] = field(default_factory=set)    # VMs whose mappings changed behind the
    #                                                  DMA API (raw VFIO maps, shadowed entries)
    taint: set[int] = field(default_factory=set)     # VMs whose host-side first level no longer
    #                                                  is the guest driver's view, for good
    reports: dict[int, EpochReport] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)   # what a refused request left behind
    host_ops: int = 0                                # host operations the guest op caused


def _dma_batch(w: World, vm: int, reqs: dict[str, list[int]]) -> np.ndarray:
    n = len(reqs["sid"])
    ops = np.zeros(n, dtype=OP_DTYPE)
    ops["t_ns"] = np.asarray(reqs["dt"], dtype=np.int64) + w.now
    ops["vm"] = vm
    ops["seq"] = np.arange(n)
    ops["op"] = OP_DMA
    ops["sid"] = np.asarray(reqs["sid"], dtype=np.int64).astype(np.uint16)
    ops["pasid"] = np.asarray(reqs["pasid"], dtype=np.int64).astype(np.uint32)
    ops["a0"] = np.asarray(reqs["addr"], dtype=np.uint64)
    ops["a1"] = 64
    ops["a2"] = np.asarray(reqs["access"], dtype=np.int64)
    ops["a3"] = -1
    return ops


def _raw_batch(w: World, vm: int, rows: list[list[int]]) -> np.ndarray:
    ops = np.zeros(len(rows), dtype=OP_DTYPE)
    for i, (k, sid, pasid, a0, a1, a2, a3, dt) in enumerate(rows):
        ops[i] = (w.now + dt, vm, i, k, sid & 0xFFFF, pasid & 0xFFFF_FFFF, a0, a1, a2, a3)
    return ops


def _send(w: World, eff: Effect, batches: dict[int, np.ndarray], wire: bool = True) -> None:
    eff.senders |= set(batches)
    eff.mixed = eff.mixed or len(batches) > 1
    try:
        reports, refused = w.apply(batches, wire)
    except Exception as exc:   # the host may refuse an unchecked batch by the protocol's rule
        if wire or not protocol_refusal(exc):
            raise
        eff.refused = f"{type(exc).__name__}: {exc}"
        return
    for vm, rep in reports.items():   # one operation may apply several batches
        old = eff.reports.get(vm)
        eff.reports[vm] = rep if old is None else EpochReport(vm, rep.counters,
                                                              old.faults + rep.faults)
    if refused:
        eff.refused = "; ".join(f"VM {vm}: {why}" for vm, why in refused.items())


def _refuse(eff: Effect, exc: BaseException) -> None:
    if not refusal_allowed(exc):
        raise exc
    eff.refused = f"{type(exc).__name__}: {exc}"


def execute(w: World, op: Op) -> Effect:
    """Apply one operation; exceptions other than the boundary's named refusals escape."""
    eff = Effect()
    k = op["k"]
    w.tick()
    if op.get("vm") in w.agents:   # the VM's due events (flush timers) first, as in an epoch
        _send(w, eff, {op["vm"]: w.collect(op["vm"])})
    if k == "dma":
        eff.weight = len(op["sid"])
        _send(w, eff, {op["vm"]: _dma_batch(w, op["vm"], op)}, op.get("wire", True))
    elif k == "mixdma":
        eff.mixed = True
        for vm in w.vms:   # every VM's due events (flush timers) first, as in an epoch
            _send(w, eff, {vm: w.collect(vm)})
        batches = {int(v): _dma_batch(w, int(v), r) for v, r in op["per_vm"].items()
                   if int(v) in w.agents}
        eff.weight = sum(b.size for b in batches.values())
        _send(w, eff, batches)
    elif k == "raw":
        eff.weight = len(op["rows"])
        _behind_api(eff, op["vm"], {row[0] for row in op["rows"]})
        _send(w, eff, {op["vm"]: _raw_batch(w, op["vm"], op["rows"])}, op.get("wire", True))
    elif k == "time":
        w.tick(op["ns"])
        eff.mixed = True
        for vm in w.vms:   # lazy flush timers fire; each VM's batch applied on its own
            _send(w, eff, {vm: w.collect(vm)})
    elif k == "balloon":
        rows = [[OP_SL_MAP if op["map"] else OP_SL_UNMAP, 0, 0, op["gpa"] & U64,
                 op["pages"] & U64, 0, -1, 0]]
        _send(w, eff, {op["vm"]: _raw_batch(w, op["vm"], rows)})
    elif k == "probe":   # DMA, balloon the page out (and maybe back), DMA again
        vm, reqs = op["vm"], {"sid": [op["sid"]], "pasid": [op["pasid"]],
                              "addr": [op["iova"]], "access": [1], "dt": [0]}
        rows = [[OP_SL_UNMAP, 0, 0, op["gpa"], 1, 0, -1, 0]]
        if op["back"]:
            rows.append([OP_SL_MAP, 0, 0, op["gpa"], 1, 0, -1, 1])
        eff.weight = 2 + len(rows)
        for batch in (_dma_batch(w, vm, reqs), _raw_batch(w, vm, rows), _dma_batch(w, vm, reqs)):
            _send(w, eff, {vm: batch})
            w.tick()
    elif k == "frame":
        _frame(w, op, eff)
    elif k == "setup":
        _setup(w, op, eff)
    else:
        _guest(w, op, eff)
    return eff


def _frame(w: World, op: Op, eff: Effect) -> None:
    data = bytes.fromhex(op["hex"])
    try:
        decoded = protocol.unpack_ops(data) if op["kind"] == "ops" else protocol.unpack(data)
    except Exception as exc:
        if not protocol_refusal(exc):
            raise
        eff.refused = f"{type(exc).__name__}: {exc}"
        return
    if op["kind"] == "ops":
        eff.weight = max(1, decoded.size)
        _behind_api(eff, op["vm"], set(decoded["op"].tolist()))
        _send(w, eff, {op["vm"]: decoded})


def _setup(w: World, op: Op, eff: Effect) -> None:
    """The set-up message crosses the wire, then the host creates the VM and binds devices."""
    msg = VmSetup(op["vm"], op["memory"], op["mode"], tuple(op["sids"]), op["ats"],
                  op["fl_levels"], tuple(op["roots"]) if op["mode"] == "nested" else ())
    try:
        setup = protocol.unpack(protocol.pack(msg))
    except Exception as exc:
        if not protocol_refusal(exc):
            raise
        eff.refused = f"{type(exc).__name__}: {exc}"
        return
    eff.senders.add(op["vm"])
    eff.taint.add(op["vm"])
    srv = w.server
    existed = op["vm"] in srv.iommu.vms
    free = srv.iommu.mem.free_frames
    try:
        srv.setup_vm(setup)
    except Exception as exc:
        _refuse(eff, exc)
        if not existed and (op["vm"] in srv.iommu.vms or op["vm"] in srv.counters):
            eff.leaks.append(f"a refused set-up of VM {op['vm']} left the VM behind "
                             f"({free - srv.iommu.mem.free_frames} host frames)")


def _free(agent, bufs) -> None:
    for gpa, n in bufs:
        agent.free_buffer(gpa, n << PAGE_SHIFT)


def _caused(eff: Effect, ops: np.ndarray) -> np.ndarray:
    """Note how many host operations one guest operation made its VMM emit."""
    eff.host_ops = max(eff.host_ops, ops.size)
    return ops


def _behind_api(eff: Effect, vm: int, kinds: set[int]) -> None:
    """Raw operations that change what the VM's devices reach without its DMA API."""
    if OP_GUEST_WRITE in kinds:
        eff.taint.add(vm)
    if OP_VFIO_MAP in kinds:
        eff.forget.add(vm)


def _guest(w: World, op: Op, eff: Effect) -> None:
    """Operations through the guest: DMA API, its tables, its vIOMMU queue, its VMM."""
    vm = op["vm"]
    agent = w.agents[vm]
    k = op["k"]
    if k == "clear_iqe":   # software clears FSTS.IQE; the queue resumes behind the error
        dev = w.devices[vm][op.get("dev", 0) % len(w.devices[vm])]
        takes_replacement = bool(inspect.signature(agent.viommu.clear_iqe).parameters)
        cmds = (agent.viommu.clear_iqe(qi.wait_desc()) if op.get("replace") and takes_replacement
                else agent.viommu.clear_iqe())
        if cmds:
            agent.vmm.handle(list(cmds), w.now, dev.sid, agent.dma.domains[dev.sid].table, -1)
        _send(w, eff, {vm: _caused(eff, w.collect(vm))})
        return
    if k == "map":
        dev = w.devices[vm][op["dev"] % len(w.devices[vm])]
        sg = op.get("sg", [op["pages"]])
        bufs: list[tuple[int, int]] = []
        try:
            for n in sg:
                bufs.append((agent.alloc_buffer(n << PAGE_SHIFT), n))
        except Exception as exc:
            _free(agent, bufs)
            _refuse(eff, exc)
            return
        direction = DMA_BIDIRECTIONAL if op["write"] else DMA_TO_DEVICE
        errors = agent.stats["dma_api_errors"]
        try:
            if len(sg) == 1:
                iova, _t = agent.dma_map(op["cpu"], dev, bufs[0][0], sg[0] << PAGE_SHIFT,
                                         direction, w.now)
                segs = [(iova, 0)]
            else:
                segs, _t = agent.dma_map_sg(op["cpu"], dev, [(g, n << PAGE_SHIFT)
                                                             for g, n in bufs],
                                            direction, w.now)
        except Exception as exc:
            _free(agent, bufs)
            _refuse(eff, exc)
            return
        iova = int(segs[0][0])
        if (any(int(a) == DMA_MAPPING_ERROR for a, _l in segs)
                or agent.stats["dma_api_errors"] != errors):
            _free(agent, bufs)   # the DMA API failed the call (a vIOMMU error)
            eff.refused = "DMA_MAPPING_ERROR"
        else:
            w.mappings[vm][(dev.sid, iova)] = (sum(sg), tuple(bufs))
            eff.remapped.append((vm, dev.sid, iova >> PAGE_SHIFT, sum(sg)))
    elif k == "unmap":
        sid = op["sid"]
        if (sid, op["iova"]) not in w.mappings[vm]:
            return
        pages, bufs = w.mappings[vm].pop((sid, op["iova"]))
        dev = next(d for d in w.devices[vm] if d.sid == sid)
        errors = agent.stats["dma_api_errors"]
        try:
            t_ret = agent.dma_unmap(op["cpu"], dev, op["iova"], pages << PAGE_SHIFT,
                                    DMA_BIDIRECTIONAL, w.now)
        except Exception as exc:
            _refuse(eff, exc)
            t_ret = None
        _free(agent, bufs)
        w.recent_unmaps[vm] = [*w.recent_unmaps[vm][-15:], (sid, op["iova"], pages)]
        lazy = w.mode[vm] == "nested" and agent.policy == "lazy"
        if (t_ret is not None and w.mode[vm] != "passthrough"
                and agent.stats["dma_api_errors"] == errors):
            dead = int(t_ret) + (LAZY_BOUND_NS if lazy else 0)
            eff.unmapped.append((vm, sid, op["iova"] >> PAGE_SHIFT, pages, dead))
    elif k == "table":     # nested: the host's copy diverges from the driver's for good
        (eff.taint if w.mode[vm] == "nested" else eff.forget).add(vm)
        w.targets[vm] = [*w.targets[vm][-31:], op["target"]]
        dev = w.devices[vm][op["dev"] % len(w.devices[vm])]
        if w.mode[vm] == "nested":   # a store into its own memory: the host sees it
            agent.log.add(w.now, OP_GUEST_WRITE, a0=op["gpa"], a1=op["value"])
        else:                        # shadow: the table only the guest holds, then a trap
            table = agent.dma.domains[dev.sid].table
            page = table.store.pages.get(op["gpa"] & ~(PAGE_SIZE - 1))
            idx = (op["gpa"] >> 3) & 511
            old = None if page is None else int(page[idx])
            if page is not None:
                page[idx] = op["value"]
            gran, addr, am = op["inv"]
            try:
                _trap(w, agent, dev.sid, [qi.iotlb_desc(gran, 1, addr, am), qi.wait_desc()])
            finally:   # and back, without a flush: the VMM's shadow keeps what it saw
                if page is not None:
                    page[idx] = old
    elif k == "qi":        # invalidations only drop cached state: nothing is remapped
        dev = w.devices[vm][op["dev"] % len(w.devices[vm])]
        descs = np.array([tuple(d) for d in op["descs"]], dtype=qi.DESC_DTYPE)
        _trap(w, agent, dev.sid, list(descs))
    elif k == "bind":      # PASID 0 may now walk another root than the driver's own
        eff.taint.add(vm)
        dev = w.devices[vm][op["dev"] % len(w.devices[vm])]
        for pasid in range(op["pasid"], op["pasid"] + op.get("count", 1)):
            _bind(w, eff, vm, dev, pasid, op["root"], op["levels"])
    _send(w, eff, {vm: _caused(eff, w.collect(vm))})


def _bind(w: World, eff: Effect, vm: int, dev, pasid: int, root: int, levels: int) -> None:
    """The VMM binds a guest first level (iommufd IOMMU_HWPT_ALLOC + attach to a PASID)."""
    srv = w.server
    try:
        if hasattr(srv, "bind_nested"):   # the server's entry point; refusals counted
            dom = srv.bind_nested(vm, dev.sid, pasid, root, levels)
        else:
            dom = alloc_nested(srv.iommu, vm, dev.sid, pasid, root, levels, ats=dev.ats)
            srv.nested[(dev.sid, pasid)] = dom
    except Exception as exc:
        _refuse(eff, exc)
        dom = None
    if dom is not None and pasid not in w.pasids[vm]:
        w.pasids[vm] = [*w.pasids[vm][-7:], pasid]


def _trap(w: World, agent, sid: int, descs: list[np.void]) -> None:
    """The guest's tail write: the vIOMMU decodes (IQE on a bad one), the VMM emulates."""
    cmds = agent.viommu.submit(descs)
    table = agent.dma.domains[sid].table
    agent.vmm.handle(cmds, w.now, sid, table, -1)
