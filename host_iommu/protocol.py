"""The guest<->host message protocol: what crosses the boundary between a VM and its host.

Bulk traffic is one numpy structured array of operations per VM per epoch (OP_DTYPE): the
guest's page-table stores, device DMA requests, and the VMM's VFIO / iommufd calls, each
stamped with virtual time and a per-VM sequence number. The host applies every VM's operations
of an epoch merged by (t_ns, vm, seq), never by arrival. Control messages of varied shape
(set-up, results) are frozen dataclasses packed with msgpack. Only this module touches msgpack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgpack
import numpy as np

# Operation kinds (column "op").
OP_GUEST_WRITE = 1   # a0 = GPA, a1 = 64-bit value: a guest store into its own page table
OP_DMA = 2           # sid, pasid, a0 = IOVA, a1 = bytes (within one page), a2 = access
#                      | DMA_ROGUE, a3 = id of the unmap that last covered the page, or -1
OP_HWPT_INV = 3      # sid, pasid, a0 = addr, a1 = npages, a2 = flags, a3 = unmap id or -1
OP_VFIO_MAP = 4      # sid, a0 = IOVA, a1 = GPA, a2 = bytes, a3 = writable
OP_VFIO_UNMAP = 5    # sid, a0 = IOVA, a1 = bytes, a3 = unmap id or -1
OP_UNMAP_RET = 6     # a0 = unmap id, a1 = time the guest's unmap call returned
OP_SL_UNMAP = 7      # a0 = GPA, a1 = pages: the VMM takes memory away (balloon, unplug)
OP_SL_MAP = 8        # a0 = GPA, a1 = pages: the VMM gives memory back
OP_NAMES = {OP_GUEST_WRITE: "guest_write", OP_DMA: "dma", OP_HWPT_INV: "hwpt_invalidate",
            OP_VFIO_MAP: "vfio_map", OP_VFIO_UNMAP: "vfio_unmap", OP_UNMAP_RET: "unmap_ret",
            OP_SL_UNMAP: "sl_unmap", OP_SL_MAP: "sl_map"}
DMA_ROGUE = 1 << 8   # in a2 of OP_DMA: the device aimed at a stale IOVA on purpose

OP_DTYPE = np.dtype([
    ("t_ns", np.int64), ("vm", np.int32), ("seq", np.int64), ("op", np.uint8),
    ("sid", np.uint16), ("pasid", np.uint32),
    ("a0", np.uint64), ("a1", np.uint64), ("a2", np.int64), ("a3", np.int64),
])


class OpLog:
    """Append-only builder of one VM's operations for one epoch (columns grow in chunks)."""

    def __init__(self, vm: int, capacity: int = 4096) -> None:
        self.vm = vm
        self.buf = np.zeros(capacity, dtype=OP_DTYPE)
        self.n = 0
        self.seq = 0

    def add(self, t_ns: int, op: int, sid: int = 0, pasid: int = 0, a0: int = 0, a1: int = 0,
            a2: int = 0, a3: int = -1) -> None:
        if self.n == self.buf.size:
            self.buf = np.concatenate([self.buf, np.zeros_like(self.buf)])
        self.buf[self.n] = (t_ns, self.vm, self.seq, op, sid, pasid, a0, a1, a2, a3)
        self.n += 1
        self.seq += 1

    def take(self) -> np.ndarray:
        """The epoch's operations (a copy); the log starts empty again."""
        out = self.buf[:self.n].copy()
        self.n = 0
        return out


def merge(batches: list[np.ndarray]) -> np.ndarray:
    """All VMs' operations of an epoch in protocol order: (t_ns, vm, seq)."""
    if not batches:
        return np.zeros(0, dtype=OP_DTYPE)
    ops = np.concatenate(batches)
    return ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]


def pack_ops(ops: np.ndarray) -> bytes:
    """One msgpack frame holding the raw column bytes (for transports that need bytes)."""
    return msgpack.packb({"dtype": "OP_DTYPE/1", "n": int(ops.size), "data": ops.tobytes()})


def unpack_ops(frame: bytes) -> np.ndarray:
    msg = msgpack.unpackb(frame)
    if msg.get("dtype") != "OP_DTYPE/1":
        raise ValueError(f"unknown operation batch format {msg.get('dtype')!r}")
    ops = np.frombuffer(msg["data"], dtype=OP_DTYPE)
    if ops.size != msg["n"]:
        raise ValueError("operation batch length does not match its header")
    return ops.copy()


@dataclass(frozen=True, slots=True)
class VmSetup:
    """Control message: create a VM's memory and bind its devices."""

    vm: int
    memory_bytes: int
    mode: str                      # "shadow" | "nested" | "passthrough"
    sids: tuple[int, ...]
    ats: bool = False
    fl_levels: int = 4
    fl_roots: tuple[int, ...] = ()  # nested: first-level root GPA per sid (PASID 0)


@dataclass(slots=True)
class EpochReport:
    """Control message back to a VM: its host-side counters and faults for one epoch."""

    vm: int
    counters: dict[str, int] = field(default_factory=dict)
    faults: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    # (time_ns, sid, pasid, addr, reason, stage)


def pack(msg: VmSetup | EpochReport) -> bytes:
    return msgpack.packb({"type": type(msg).__name__, **asdict(msg)})


def unpack(frame: bytes) -> VmSetup | EpochReport:
    d = msgpack.unpackb(frame)
    kind = d.pop("type", None)
    if kind == "VmSetup":
        d["sids"], d["fl_roots"] = tuple(d["sids"]), tuple(d["fl_roots"])
        return VmSetup(**d)
    if kind == "EpochReport":
        d["faults"] = [tuple(f) for f in d["faults"]]
        return EpochReport(**d)
    raise ValueError(f"unknown control message {kind!r}")
