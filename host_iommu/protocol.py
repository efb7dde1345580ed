"""The guest<->host message protocol: what crosses the boundary between a VM and its host.

Bulk traffic is one numpy structured array of operations per VM per epoch (OP_DTYPE): the
guest's page-table stores, device DMA requests, and the VMM's VFIO / iommufd calls, each
stamped with virtual time and a per-VM sequence number. The host applies every VM's operations
of an epoch merged by (t_ns, vm, seq), never by arrival. Control messages of varied shape
(set-up, results) are frozen dataclasses packed with msgpack. Only this module touches msgpack.

Unpacking is the boundary: a frame that is not well-formed msgpack of the expected shape, an
operation with a field no valid operation carries (unknown kind, negative time, VM id below 1,
a PASID wider than 20 bits, a DMA that neither reads nor writes, an unmap retire run naming
no ids, too many or ids past 2^62), or a control message with a missing, unknown or
out-of-range field raises ProtocolError naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import numpy as np

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, MAX_PASID, PAGE_SIZE
from host_iommu.kernels.wire import ops_all_valid, ops_order

# Operation kinds (column "op").
OP_GUEST_WRITE = 1   # a0 = GPA, a1 = 64-bit value: a guest store into its own page table
OP_DMA = 2           # sid, pasid, a0 = IOVA, a1 = bytes (within one page), a2 = access
#                      | DMA_ROGUE, a3 = id of the unmap that last covered the page, or -1
OP_HWPT_INV = 3      # sid, pasid, a0 = addr, a1 = npages, a2 = flags, a3 = unmap id or -1
OP_VFIO_MAP = 4      # sid, a0 = IOVA, a1 = GPA, a2 = bytes, a3 = writable
OP_VFIO_UNMAP = 5    # sid, a0 = IOVA, a1 = bytes, a3 = unmap id or -1
OP_UNMAP_RET = 6     # a0 = unmap id, a1 = time the guest's unmap call returned, a2 = vCPU
OP_SL_UNMAP = 7      # a0 = GPA, a1 = pages: the VMM takes memory away (balloon, unplug)
OP_SL_MAP = 8        # a0 = GPA, a1 = pages: the VMM gives memory back
OP_UNMAP_RETIRE = 9  # a0 = first unmap id, a1 = count (1..MAX_RETIRE_RUN): ids no IOVA page
#                      carries any more; the host drops them after the epoch's other operations
OP_NAMES = {OP_GUEST_WRITE: "guest_write", OP_DMA: "dma", OP_HWPT_INV: "hwpt_invalidate",
            OP_VFIO_MAP: "vfio_map", OP_VFIO_UNMAP: "vfio_unmap", OP_UNMAP_RET: "unmap_ret",
            OP_SL_UNMAP: "sl_unmap", OP_SL_MAP: "sl_map", OP_UNMAP_RETIRE: "unmap_retire"}
MAX_RETIRE_RUN = 1 << 16   # unmap ids one OP_UNMAP_RETIRE may name
DMA_ROGUE = 1 << 8   # in a2 of OP_DMA: the device aimed at a stale IOVA on purpose
MODES = ("shadow", "nested", "passthrough")
FL_LEVELS = (4, 5)   # first-level paging: 4-level (48-bit) or 5-level (57-bit)


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol: what is wrong is named."""

OP_DTYPE = np.dtype([
    ("t_ns", np.int64), ("vm", np.int32), ("seq", np.int64), ("op", np.uint8),
    ("sid", np.uint16), ("pasid", np.uint32),
    ("a0", np.uint64), ("a1", np.uint64), ("a2", np.int64), ("a3", np.int64),
])


class OpLog:
    """Append-only builder of one VM's operations for one epoch.

    An operation is kept as ``ROW`` plain ints in one flat Python list, in the order
    ``t_ns, op, sid, pasid, a0, a1, a2, a3`` (``rows[ROW * i + T_NS]`` is operation i's time):
    appending them costs a tenth of storing one row of a numpy structured array, which the log
    did per operation before. ``take`` turns the epoch's rows into the OP_DTYPE batch with one
    column assignment per field; the VM id is the log's and ``seq`` counts on over the run.
    Callers on a hot path may extend ``rows`` themselves with exactly that tuple.
    """

    ROW = 8                                     # ints per operation in ``rows``
    T_NS, OP, SID, PASID, A0, A1, A2, A3 = range(ROW)
    _COLUMNS = ("t_ns", "op", "sid", "pasid", "a0", "a1", "a2", "a3")

    def __init__(self, vm: int, capacity: int = 4096) -> None:
        # ``capacity`` is accepted for compatibility; a Python list grows by itself.
        self.vm = vm
        self.rows: list[int] = []
        self.seq0 = 0   # sequence number of this epoch's first operation

    @property
    def n(self) -> int:
        """Operations logged this epoch."""
        return len(self.rows) // self.ROW

    @property
    def seq(self) -> int:
        """The sequence number the next operation gets."""
        return self.seq0 + self.n

    def add(self, t_ns: int, op: int, sid: int = 0, pasid: int = 0, a0: int = 0, a1: int = 0,
            a2: int = 0, a3: int = -1) -> None:
        self.rows.extend((t_ns, op, sid, pasid, a0, a1, a2, a3))

    def take(self) -> np.ndarray:
        """The epoch's operations as a new OP_DTYPE array; the log starts empty again."""
        rows, step = self.rows, self.ROW
        n = len(rows) // step
        out = np.empty(n, dtype=OP_DTYPE)
        if n:
            for k, name in enumerate(self._COLUMNS):
                out[name] = rows[k::step]
        out["vm"] = self.vm
        out["seq"] = np.arange(self.seq0, self.seq0 + n, dtype=np.int64)
        self.rows = []
        self.seq0 += n
        return out


def merge(batches: list[np.ndarray]) -> np.ndarray:
    """All VMs' operations of an epoch in protocol order: (t_ns, vm, seq).

    The same as ``ops = np.concatenate(batches); ops[np.lexsort((seq, vm, t_ns))]``, with
    the records moved as raw bytes: numpy's concatenate and fancy indexing of a structured
    dtype copy field by field, several times slower than a byte copy and ``np.take`` (and a
    structured array's ``view`` or dtype comparison costs a few us each: the batches'
    buffers are joined as they are when their dtype is OP_DTYPE itself).
    """
    if not batches:
        return np.zeros(0, dtype=OP_DTYPE)
    if not all(b.dtype is OP_DTYPE and b.ndim == 1 for b in batches) and any(
            b.dtype != OP_DTYPE or b.ndim != 1 for b in batches):
        ops = np.concatenate(batches)
        return ops[np.lexsort((ops["seq"], ops["vm"], ops["t_ns"]))]
    try:    # one copy of the bytes, writable
        ops = np.frombuffer(bytearray().join(batches), dtype=OP_DTYPE)
    except (BufferError, TypeError):     # a batch that is not C-contiguous
        ops = np.frombuffer(bytearray().join([np.ascontiguousarray(b) for b in batches]),
                            dtype=OP_DTYPE)
    order = ops_order(ops)
    if order == 2:   # already in protocol order: the stable sort would keep it
        return ops
    if order == 1:   # in (vm, seq) order: a stable sort by time alone gives protocol order
        return np.take(ops, np.argsort(ops["t_ns"], kind="stable"))
    return np.take(ops, np.lexsort((ops["seq"], ops["vm"], ops["t_ns"])))


def pack_ops(ops: np.ndarray) -> bytes:
    """One msgpack frame holding the raw column bytes (for transports that need bytes)."""
    if ops.size == 0:      # an idle VM's epoch: the frame is always the same
        return _EMPTY_FRAME
    return msgpack.packb({"dtype": "OP_DTYPE/1", "n": int(ops.size), "data": ops.tobytes()})


_EMPTY_FRAME = msgpack.packb({"dtype": "OP_DTYPE/1", "n": 0, "data": b""})


_FRAME_TYPES = (bytes, bytearray, memoryview)   # a tuple: ``bytes | ...`` is built per call


def _unpackb(frame: object) -> Any:
    if not isinstance(frame, _FRAME_TYPES):
        raise ProtocolError(f"a frame is bytes, not {type(frame).__name__}")
    try:
        return msgpack.unpackb(frame)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}"
                            ) from None


def bad_retire(ops: np.ndarray) -> np.ndarray:
    """OP_UNMAP_RETIRE rows naming no ids, more than MAX_RETIRE_RUN, or ids past 2^62."""
    a0, a1 = ops["a0"], ops["a1"]
    return (ops["op"] == OP_UNMAP_RETIRE) & ((a1 == 0) | (a1 > MAX_RETIRE_RUN)
                                            | (a0 >= np.uint64(1 << 62)))


_KNOWN_OP = np.zeros(256, dtype=bool)   # indexed by the uint8 "op" column
_KNOWN_OP[list(OP_NAMES)] = True


def _all_valid(ops: np.ndarray) -> bool:
    """True when no operation breaks a rule check_ops names: one compiled pass over the
    records (kernels/wire.py), the same answer as ``_all_valid_numpy``."""
    return ops_all_valid(ops, _KNOWN_OP, MAX_PASID, OP_DMA, ACCESS_READ, ACCESS_WRITE,
                         OP_UNMAP_RETIRE, MAX_RETIRE_RUN)


def _all_valid_numpy(ops: np.ndarray) -> bool:
    """``_all_valid`` as whole-column reductions (the common case needs no per-rule masks):
    the plain form the kernel is tested against."""
    op = ops["op"]
    if (not _KNOWN_OP[op].all() or ops["t_ns"].min() < 0 or ops["vm"].min() < 1
            or ops["pasid"].max() > MAX_PASID):
        return False
    access = ops["a2"] & 0xFF
    if not ((op != OP_DMA) | (access == ACCESS_READ) | (access == ACCESS_WRITE)).all():
        return False
    return not (op == OP_UNMAP_RETIRE).any() or not bad_retire(ops).any()


def check_ops(ops: np.ndarray) -> np.ndarray:
    """Raise ProtocolError unless every operation's fields are ones a valid operation has."""
    if ops.size == 0 or _all_valid(ops):
        return ops
    op = ops["op"]
    access = ops["a2"] & 0xFF
    bad = {
        # ~np.isin(op, sorted(OP_NAMES)), as a table look-up
        "unknown operation kind": ~_KNOWN_OP[op],
        "negative time": ops["t_ns"] < 0,
        "VM id below 1": ops["vm"] < 1,
        "PASID wider than 20 bits": ops["pasid"] > MAX_PASID,
        # (op == OP_DMA) & ~np.isin(access, (ACCESS_READ, ACCESS_WRITE))
        "DMA access neither read nor write": (op == OP_DMA) & (access != ACCESS_READ)
        & (access != ACCESS_WRITE),
        "unmap retire run out of range": bad_retire(ops),
    }
    for what, mask in bad.items():
        if mask.any():
            i = int(np.argmax(mask))
            raise ProtocolError(f"operation {i} of the batch: {what} "
                                f"(op={int(ops['op'][i])}, vm={int(ops['vm'][i])})")
    return ops


def unpack_ops(frame: bytes) -> np.ndarray:
    """The operations of one packed batch, checked (ProtocolError on anything malformed)."""
    if type(frame) is bytes and frame == _EMPTY_FRAME:
        return np.empty(0, dtype=OP_DTYPE)   # what the general path decodes it to
    msg = _unpackb(frame)
    if not isinstance(msg, dict) or set(msg) != {"dtype", "n", "data"}:
        raise ProtocolError("an operation batch is a map of dtype, n and data")
    if msg["dtype"] != "OP_DTYPE/1":
        raise ProtocolError(f"unknown operation batch format {msg['dtype']!r}")
    n, data = msg["n"], msg["data"]
    if not isinstance(n, int) or isinstance(n, bool) or not isinstance(data, bytes):
        raise ProtocolError("operation batch: n must be an int and data bytes")
    if n < 0 or len(data) != n * OP_DTYPE.itemsize:
        raise ProtocolError(f"operation batch length does not match its header: n={n}, "
                            f"{len(data)} bytes of {OP_DTYPE.itemsize}-byte records")
    # a writable copy: copied as bytes (a structured .copy() goes field by field, and a
    # structured .view() costs more than the copy of an epoch's batch)
    return check_ops(np.frombuffer(bytearray(data), dtype=OP_DTYPE))


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
    # nested: more first levels, flattened (sid, pasid, root GPA) triples, one per PASID a
    # device carries besides PASID 0 (PASID-tagged queues)
    pasid_roots: tuple[int, ...] = ()


@dataclass(slots=True)
class EpochReport:
    """Control message back to a VM: its host-side counters and faults for one epoch."""

    vm: int
    counters: dict[str, int] = field(default_factory=dict)
    faults: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    # (time_ns, sid, pasid, addr, reason, stage)
    unmap_waits: list[tuple[int, int, int]] = field(default_factory=list)
    # (unmap id, vCPU, ns): strict unmaps whose wait descriptor completed on the shared host
    # QI that much later than the guest's modelled return (the guest charges it next epoch)


_NAMES: dict[type, tuple[str, ...]] = {}   # a message class -> its field names, in order


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def pack(msg: VmSetup | EpochReport) -> bytes:
    # The same bytes as msgpack.packb({"type": ..., **asdict(msg)}): the fields hold only
    # ints, strings, bools and lists/tuples/dicts of them, which asdict would deep-copy as is.
    # (The field names are looked up once per class: dataclasses.fields costs ~1 us a call.)
    if type(msg) is EpochReport:   # once per VM and epoch: the fields spelled out
        return msgpack.packb({"type": "EpochReport", "vm": msg.vm, "counters": msg.counters,
                              "faults": msg.faults, "unmap_waits": msg.unmap_waits})
    return msgpack.packb({"type": type(msg).__name__,
                          **{n: getattr(msg, n) for n in _names(type(msg))}})


def _int(name: str, v: object, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{name}={v!r}: an integer in {lo}..{hi:#x} is required")
    return v


def _ints(name: str, v: object, lo: int, hi: int) -> tuple[int, ...]:
    if not isinstance(v, list | tuple):
        raise ProtocolError(f"{name} must be a list, not {type(v).__name__}")
    return tuple(_int(f"{name}[{i}]", x, lo, hi) for i, x in enumerate(v))


def check_setup(s: VmSetup) -> VmSetup:
    """Raise ProtocolError unless a VmSetup's fields are valid (what setup_vm needs)."""
    _int("vm", s.vm, 1, 2**31 - 1)
    _int("memory_bytes", s.memory_bytes, PAGE_SIZE, 2**52)
    if s.mode not in MODES:
        raise ProtocolError(f"mode={s.mode!r}: one of {MODES}")
    sids = _ints("sids", s.sids, 0, 0xFFFF)
    if len(set(sids)) != len(sids):
        raise ProtocolError(f"sids={list(sids)} repeat a device")
    if not isinstance(s.ats, bool):
        raise ProtocolError(f"ats={s.ats!r}: a bool is required")
    if s.fl_levels not in FL_LEVELS or isinstance(s.fl_levels, bool):
        raise ProtocolError(f"fl_levels={s.fl_levels!r}: one of {FL_LEVELS}")
    roots = _ints("fl_roots", s.fl_roots, 0, 2**64 - 1)
    if any(r % PAGE_SIZE for r in roots):
        raise ProtocolError("fl_roots must be 4-KiB aligned GPAs")
    if s.mode == "nested" and len(roots) != len(sids):
        raise ProtocolError(f"nested: {len(roots)} fl_roots for {len(sids)} sids")
    extra = _ints("pasid_roots", s.pasid_roots, 0, 2**64 - 1)
    triples = [extra[i:i + 3] for i in range(0, len(extra), 3)]
    if extra and (s.mode != "nested" or len(extra) % 3
                  or any(sid not in sids or not 0 < pasid <= MAX_PASID or root % PAGE_SIZE
                         for sid, pasid, root in triples)
                  or len({t[:2] for t in triples}) != len(triples)):
        raise ProtocolError("pasid_roots: (sid, pasid, root) triples of a nested VM's own "
                            "devices, PASIDs 1..2^20-1 once each, 4-KiB aligned roots")
    return s


_NAME_SETS: dict[type, frozenset] = {}   # a message class -> its field names, as a set


def _fields_of(cls: type, d: dict) -> dict:
    names = _NAME_SETS.get(cls)
    if names is None:
        names = _NAME_SETS[cls] = frozenset(_names(cls))
    if d.keys() <= names:     # the common case: no unknown field to name
        return d
    extra = sorted(map(str, set(d) - names))
    if extra:
        raise ProtocolError(f"{cls.__name__}: unknown fields {extra}")
    return d


_STR = frozenset((str,))
_INT = frozenset((int, bool))   # the types msgpack decodes an integer (or a bool) to


def _str_to_int(counters: dict) -> bool:
    """Whether every key is a str and every value an int: whole-collection type sets first
    (what msgpack decodes is of exactly these types), the per-item isinstance otherwise."""
    if set(map(type, counters)) <= _STR and set(map(type, counters.values())) <= _INT:
        return True
    return all(isinstance(k, str) and isinstance(v, int) for k, v in counters.items())


def _records(rows: list, width: int, lo: int | None) -> bool:
    """Whether every row is a list or tuple of ``width`` ints (each >= ``lo`` unless
    None). Rows that are all exactly lists of int (msgpack's decoding) are checked as one
    flat list; anything else item by item."""
    if not rows:
        return True
    if all(type(r) is list and len(r) == width for r in rows):
        flat = [x for r in rows for x in r]
        if set(map(type, flat)) <= _INT:
            return lo is None or min(flat) >= lo
    return all(isinstance(r, list | tuple) and len(r) == width
               and all(isinstance(x, int) and (lo is None or x >= lo) for x in r)
               for r in rows)


def unpack(frame: bytes) -> VmSetup | EpochReport:
    """A control message, checked (ProtocolError on anything malformed)."""
    d = _unpackb(frame)
    if not isinstance(d, dict):
        raise ProtocolError("a control message is a map")
    kind = d.pop("type", None)
    if kind == "VmSetup":
        _fields_of(VmSetup, d)
        try:
            s = VmSetup(**{**d, "sids": _ints("sids", d.get("sids"), 0, 0xFFFF),
                           "fl_roots": _ints("fl_roots", d.get("fl_roots", ()), 0,
                                             2**64 - 1),
                           "pasid_roots": _ints("pasid_roots", d.get("pasid_roots", ()), 0,
                                                2**64 - 1)})
        except TypeError as exc:
            raise ProtocolError(f"VmSetup: {exc}") from None
        return check_setup(s)
    if kind == "EpochReport":
        _fields_of(EpochReport, d)
        vm = _int("vm", d.get("vm"), 0, 2**31 - 1)
        counters = d.get("counters", {})
        if not isinstance(counters, dict) or not _str_to_int(counters):
            raise ProtocolError("EpochReport.counters must map names to integers")
        faults = d.get("faults", [])
        if not isinstance(faults, list) or not _records(faults, 6, None):
            raise ProtocolError("EpochReport.faults must be a list of 6-integer records")
        waits = d.get("unmap_waits", [])
        if not isinstance(waits, list) or not _records(waits, 3, 0):
            raise ProtocolError("EpochReport.unmap_waits must be a list of 3 integers >= 0")
        return EpochReport(vm, counters, list(map(tuple, faults)), list(map(tuple, waits)))
    raise ProtocolError(f"unknown control message {kind!r}")
