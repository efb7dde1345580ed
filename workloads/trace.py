"""DMA traces: the msgpack trace format, streaming reader and writer, and replay.

The format is documented in docs/trace-format.md; workloads/ftrace.py imports Linux ftrace
text into it. The replay drives the guest DMA API as the traced kernel did: one map call per
traced call (dma_map_page / dma_map_sg in kernel/dma/mapping.c), whose iommu:map events fire
once per physically contiguous piece (iommu_map in drivers/iommu/iommu.c), and one unmap call
per iommu:unmap event.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from workloads.base import DMA_BIDIRECTIONAL, Device, GuestContext, Workload
from workloads.nic import check_fraction, check_positive, schedule_at

FORMAT_NAME = "iommu-emu-trace"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)      # version 1: no "call" column, ops 0-3 only

# Record operations (column "op").
OP_MAP = 0
OP_UNMAP = 1
OP_DMA_READ = 2      # the device reads memory
OP_DMA_WRITE = 3     # the device writes memory
OP_LIVE = 4          # a mapping made before the trace began (all come first)
OP_LOST = 5          # the tracer lost ``size`` events here
OP_NAMES = {OP_MAP: "map", OP_UNMAP: "unmap", OP_DMA_READ: "dma_read",
            OP_DMA_WRITE: "dma_write", OP_LIVE: "live", OP_LOST: "lost"}
_OPS_BY_VERSION = {1: OP_DMA_WRITE, 2: OP_LOST}

# Columns of a batch frame, in order, with the dtype read_trace returns.
TRACE_COLUMNS: dict[str, np.dtype] = {
    "t_ns": np.dtype(np.int64),
    "op": np.dtype(np.uint8),
    "dev": np.dtype(np.int32),
    "iova": np.dtype(np.uint64),
    "paddr": np.dtype(np.uint64),
    "size": np.dtype(np.uint64),
    "call": np.dtype(np.uint64),     # the DMA API call a record belongs to; 0: not known
}
_V1_COLUMNS = tuple(c for c in TRACE_COLUMNS if c != "call")
_COLUMN_MAX = {"t_ns": (1 << 63) - 1, "iova": (1 << 64) - 1, "paddr": (1 << 64) - 1,
               "size": (1 << 64) - 1, "call": (1 << 64) - 1}
MAX_BATCH_RECORDS = 1 << 20     # write_trace splits larger batches; read_trace refuses them
IMPORT_BATCH_RECORDS = 4096
_READ_CHUNK_BYTES = 1 << 16


class TraceError(Exception):
    """A trace file (or ftrace text) that cannot be read or written: where, what is wrong."""

    def __init__(self, path: str | os.PathLike[str], frame_index: int | None, what: str,
                 *, line: int | None = None) -> None:
        self.path = os.fspath(path)
        self.frame_index = frame_index
        self.line = line
        self.what = what
        where = (f"line {line}: " if line is not None
                 else f"frame {frame_index}: " if frame_index is not None else "")
        super().__init__(f"{self.path}: {where}{what}")


@dataclass
class _Order:
    """What a batch check carries from one batch to the next."""

    t_last: int = 0
    past_live: bool = False         # a record other than OP_LIVE was seen


def _check_batch(path: str, index: int, frame: Any, ndev: int, order: _Order,
                 version: int = FORMAT_VERSION) -> dict[str, np.ndarray]:
    """Validate one batch frame and return it as numpy columns (TRACE_COLUMNS dtypes)."""
    if not isinstance(frame, Mapping):
        raise TraceError(path, index, f"batch is a {type(frame).__name__}, not a map")
    names = tuple(TRACE_COLUMNS) if version >= 2 else _V1_COLUMNS
    keys = set(frame)
    missing = [c for c in names if c not in keys]
    extra = sorted(str(k) for k in keys - set(names))
    if missing or extra:
        raise TraceError(path, index, f"columns missing {missing}, unknown {extra}")
    lengths = {c: len(frame[c]) if isinstance(frame[c], Sequence | np.ndarray) else -1
               for c in names}
    if any(n < 0 for n in lengths.values()):
        bad = [c for c, n in lengths.items() if n < 0]
        raise TraceError(path, index, f"columns {bad} are not arrays")
    if len(set(lengths.values())) != 1:
        raise TraceError(path, index, f"column lengths differ: {lengths}")
    n = lengths["t_ns"]
    if n > MAX_BATCH_RECORDS:
        raise TraceError(path, index, f"{n} records exceed {MAX_BATCH_RECORDS} per batch")
    out: dict[str, np.ndarray] = {}
    for name, dtype in TRACE_COLUMNS.items():
        if name not in names or n == 0:
            out[name] = np.zeros(n, dtype)
            continue
        values = frame[name]
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            arr = values
        elif all(type(v) is int for v in values):   # msgpack ints, numpy objects excluded
            arr = np.array(list(values), dtype=object)
        else:
            raise TraceError(path, index, f"column {name!r} holds non-integers")
        lo, hi = int(arr.min()), int(arr.max())
        top = (ndev - 1 if name == "dev" else _OPS_BY_VERSION[version] if name == "op"
               else _COLUMN_MAX[name])
        if lo < 0 or hi > top:
            raise TraceError(path, index, f"column {name!r} has values outside [0, {top}]: "
                             f"{lo}..{hi}")
        out[name] = arr.astype(dtype)
    if n:
        t, op = out["t_ns"], out["op"]
        if int(t[0]) < order.t_last or bool(np.any(np.diff(t) < 0)):
            raise TraceError(path, index, "t_ns decreases")
        if bool(np.any((op != OP_MAP) & (op != OP_LIVE) & (out["paddr"] != 0))):
            raise TraceError(path, index, "paddr is non-zero on a record that is not a map")
        live = op == OP_LIVE
        first_other = int(np.argmin(live)) if not bool(live.all()) else n
        if bool(live[first_other:].any()) or (order.past_live and bool(live.any())):
            raise TraceError(path, index, "a live record follows other records "
                             "(live mappings are declared at the start)")
        order.t_last = int(t[-1])
        order.past_live = order.past_live or first_other < n
    return out


class TraceReader:
    """Streams a trace file: ``devices`` from the header, then batches by iteration.

    Every problem (truncation, garbage, a wrong header, bad columns, nesting too deep, an
    array too long) raises ``TraceError`` naming the file and frame; a file that ends without
    its end frame is truncated.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed when iteration ends
        except OSError as e:
            raise TraceError(self.path, 0, f"cannot open: {e.strerror}") from None
        self._size = os.fstat(self._file.fileno()).st_size
        self._unpacker = msgpack.Unpacker(
            self._file, raw=False, read_size=_READ_CHUNK_BYTES,
            max_buffer_size=64 << 20, max_array_len=MAX_BATCH_RECORDS, max_map_len=64,
            max_str_len=1 << 16, max_bin_len=1 << 16, max_ext_len=0)
        self._index = 0
        header = self._next_frame()
        if header is None:
            self.close()
            raise TraceError(self.path, 0, "empty file: no header")
        self.devices = self._check_header(header)

    def close(self) -> None:
        self._file.close()

    def _next_frame(self) -> Any:
        """The next frame, or None at a clean end of the data."""
        try:
            return next(self._unpacker)
        except StopIteration:
            if self._unpacker.tell() < self._size:
                self.close()
                raise TraceError(self.path, self._index,
                                 f"truncated inside a frame at byte {self._unpacker.tell()}"
                                 f" of {self._size}") from None
            return None
        except (msgpack.UnpackException, ValueError, TypeError, RecursionError,
                MemoryError) as e:
            self.close()
            deep = isinstance(e, msgpack.exceptions.StackError | RecursionError)
            what = "nested too deeply" if deep else f"{type(e).__name__}: {e}"
            raise TraceError(self.path, self._index,
                             f"not a valid msgpack frame ({what})") from None
        except OSError as e:
            self.close()
            raise TraceError(self.path, self._index, f"cannot read: {e.strerror}") from None

    def _check_header(self, header: Any) -> list[str]:
        if not isinstance(header, Mapping) or header.get("format") != FORMAT_NAME:
            self.close()
            raise TraceError(self.path, 0, f"header is not a {FORMAT_NAME!r} map")
        if header.get("version") not in READ_VERSIONS:
            self.close()
            raise TraceError(self.path, 0, f"unsupported version {header.get('version')!r}")
        self.version = int(header["version"])
        devices = header.get("devices")
        if (not isinstance(devices, list) or not devices
                or not all(isinstance(d, str) and d for d in devices)
                or len(set(devices)) != len(devices)):
            self.close()
            raise TraceError(self.path, 0, "devices must be a non-empty list of unique names")
        return devices

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        order = _Order()
        batches = records = 0
        try:
            while True:
                self._index += 1
                frame = self._next_frame()
                if frame is None:
                    raise TraceError(self.path, self._index, "truncated: no end frame")
                if isinstance(frame, Mapping) and "end" in frame:
                    break
                batch = _check_batch(self.path, self._index, frame, len(self.devices), order,
                                     self.version)
                batches += 1
                records += len(batch["t_ns"])
                yield batch
            if frame.get("batches") != batches or frame.get("records") != records:
                raise TraceError(self.path, self._index,
                                 f"end frame counts {dict(frame)} do not match "
                                 f"{batches} batches, {records} records read")
            self._index += 1
            if self._next_frame() is not None:
                raise TraceError(self.path, self._index, "data after the end frame")
        finally:
            self.close()


def read_trace(path: str | os.PathLike[str]) -> Iterator[dict[str, np.ndarray]]:
    """Stream a trace's batches (dicts of numpy columns, TRACE_COLUMNS dtypes)."""
    return iter(TraceReader(path))


@dataclass(frozen=True)
class TraceScan:
    """A trace read through once: its devices, counts and content digest."""

    devices: tuple[str, ...]
    batches: int
    records: int
    digest: str          # sha256 of the file's bytes


_SCANS: dict[tuple[str, int, int], TraceScan] = {}


def scan_trace(path: str | os.PathLike[str]) -> TraceScan:
    """Read a whole trace (streaming) and hash its bytes; TraceError on the first bad frame.

    Cached by (path, mtime, size), so validating a config twice reads the file once.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise TraceError(path, 0, f"cannot open: {e.strerror}") from None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key in _SCANS:
        return _SCANS[key]
    reader = TraceReader(path)
    batches = records = 0
    for b in reader:
        batches += 1
        records += len(b["t_ns"])
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise TraceError(path, None, f"cannot read: {e.strerror}") from None
    scan = TraceScan(tuple(reader.devices), batches, records, h.hexdigest())
    _SCANS[key] = scan
    return scan


def trace_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a trace file's content (run ids cover the trace, not only its name)."""
    return scan_trace(path).digest


def write_trace(path: str | os.PathLike[str], devices: Sequence[str],
                columns_iter: Iterable[Mapping[str, Any]]) -> int:
    """Write a trace: header, one frame per batch of columns, end frame. Returns records.

    Batches are validated as read_trace would; a bad one raises TraceError and leaves no file.
    A batch may leave out ``call`` (all 0: calls not known).
    """
    path = os.fspath(path)
    devices = list(devices)
    if not devices or not all(isinstance(d, str) and d for d in devices) \
            or len(set(devices)) != len(devices):
        raise TraceError(path, 0, "devices must be a non-empty list of unique names")
    tmp = path + ".tmp"
    packer = msgpack.Packer()
    batches = records = 0
    order = _Order()
    try:
        with open(tmp, "wb") as f:
            f.write(packer.pack({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                 "devices": devices}))
            for columns in columns_iter:
                if isinstance(columns, Mapping) and "call" not in columns \
                        and set(columns) == set(_V1_COLUMNS) \
                        and isinstance(columns.get("t_ns"), Sequence | np.ndarray):
                    columns = {**columns, "call": [0] * len(columns["t_ns"])}
                if not isinstance(columns, Mapping) or set(columns) != TRACE_COLUMNS.keys() \
                        or not all(isinstance(columns[c], Sequence | np.ndarray)
                                   for c in TRACE_COLUMNS):
                    _check_batch(path, batches + 1, columns, len(devices), _Order())
                # lists stay lists: numpy would turn mixed large ints into float64
                cols = {c: columns[c] for c in TRACE_COLUMNS}
                n = len(cols["t_ns"])
                for lo in range(0, max(n, 1), MAX_BATCH_RECORDS):
                    part = {c: v[lo:lo + MAX_BATCH_RECORDS] for c, v in cols.items()}
                    checked = _check_batch(path, batches + 1, part, len(devices), order)
                    f.write(packer.pack({c: v.tolist() for c, v in checked.items()}))
                    batches += 1
                    records += len(checked["t_ns"])
            f.write(packer.pack({"end": True, "batches": batches, "records": records}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return records


def import_ftrace(text_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  device: str | None = None, live: bool = True) -> dict[str, int]:
    """workloads.ftrace.import_ftrace, kept here for callers of this module."""
    from workloads.ftrace import import_ftrace as _import

    return _import(text_path, out_path, device=device, live=live)


# --- replay ------------------------------------------------------------------------------
Row = tuple[int, int, int, int, int, int, int]     # t_ns, op, dev, iova, paddr, size, call


class _Records:
    """The trace's records one by one across batch boundaries, with one record of look-ahead
    (a call's pieces are grouped wherever the file's batches end)."""

    def __init__(self, reader: TraceReader) -> None:
        self._batches = iter(reader)
        self._rows: list[Row] = []
        self._i = 0

    def peek(self) -> Row | None:
        while self._i >= len(self._rows):
            b = next(self._batches, None)
            if b is None:
                return None
            self._rows = list(zip(*(b[c].tolist() for c in TRACE_COLUMNS), strict=True))
            self._i = 0
        return self._rows[self._i]

    def pop(self) -> Row | None:
        row = self.peek()
        if row is not None:
            self._i += 1
        return row


@dataclass
class _Piece:
    """One replayed mapping piece: traced IOVA range -> emulated IOVA."""

    traced_iova: int
    size: int
    iova: int
    t_map_ns: int
    sg: list[tuple[int, int]] | None = None  # the whole scatter list's DMA segments
    sg_traced: tuple[int, ...] = ()          # traced IOVAs of the scatter list's pieces


class TraceWorkload(Workload):
    """Replays a trace file's maps, unmaps and device DMAs through the guest DMA API.

    A map call maps guest buffers standing in for the traced physical ranges (one buffer per
    distinct page range, reused when the trace maps it again): one piece with ``dma_map``,
    several with one ``dma_map_sg``. The pieces of a call are the consecutive map records of
    one device with the same nonzero ``call``; with ``call`` 0 (not known, version 1 files or
    ftrace without dma:* events) consecutive pieces whose traced IOVAs continue each other
    are taken as one call. An unmap record unmaps the call whose first traced IOVA it names
    (one ``dma_unmap`` / ``dma_unmap_sg``). Live records are mapped at the start, before the
    first traced event. An unmap or DMA of a traced IOVA that is not mapped is counted
    (``unmatched_unmaps``, ``unmatched_dmas``) and not replayed: an emulated IOVA is not the
    traced one, so replaying it raw could hit an unrelated live mapping.
    """

    kind = "trace"
    SUMMARY_COLUMNS = ("trace_live_maps", "trace_unmatched_unmaps", "trace_unmatched_dmas",
                       "trace_lost_events")

    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        path: str = ""
        loop: bool = False          # start over at the end of the file
        time_scale: float = 1.0     # emulated ns per traced ns
        start_us: float = 0.0       # when the first traced event replays (live maps: at 0)

        def validate(self) -> list[tuple[str, str]]:
            errors = check_fraction(self.rogue_fraction, "rogue_fraction")
            errors += check_positive(self.time_scale, "time_scale")
            errors += check_positive(self.start_us, "start_us", zero_ok=True)
            if not isinstance(self.loop, bool):
                errors.append(("loop", f"{self.loop!r} is not a boolean"))
            if not isinstance(self.path, str) or not self.path:
                errors.append(("path", "a trace file is required"))
            elif not os.path.isfile(self.path):
                errors.append(("path", f"no such file: {self.path}"))
            else:
                try:
                    scan_trace(self.path)      # every frame: a run never meets a bad batch
                except TraceError as e:
                    errors.append(("path", str(e)))
            return errors

    def __init__(self, params: TraceWorkload.Params | None = None) -> None:
        super().__init__(params if params is not None else self.Params())
        self.maps = 0               # trace map records (pieces) replayed
        self.map_calls = 0          # map calls replayed (excluding live ones)
        self.unmaps = 0             # trace unmap records replayed
        self.dmas = 0
        self.unmap_calls = 0        # dma_unmap calls (an unmap may span several map pieces)
        self.unmatched_unmaps = 0   # unmaps of nothing mapped: counted, not replayed
        self.unmatched_dmas = 0
        self.live_maps = 0          # live mapping records mapped at the start
        self.lost_events = 0        # events the tracer lost (OP_LOST sizes)
        self.remaps = 0             # a traced IOVA mapped again while mapped
        self.passes = 0
        self.devs: list[Device] = []
        self._buffers: dict[tuple[int, int], int] = {}     # (paddr page, pages) -> gpa
        self._pieces: list[dict[int, _Piece]] = []          # per dev: traced iova -> piece
        self._starts: list[list[int]] = []                  # per dev: sorted traced iovas

    def summary_counters(self) -> dict[str, int]:
        return {"trace_live_maps": self.live_maps,
                "trace_unmatched_unmaps": self.unmatched_unmaps,
                "trace_unmatched_dmas": self.unmatched_dmas,
                "trace_lost_events": self.lost_events}

    def start(self, ctx: GuestContext) -> None:
        self._ctx_vcpus = ctx.vcpus
        reader = TraceReader(self.params.path)
        self.devs = [ctx.add_device(name) for name in reader.devices]
        self._pieces = [{} for _ in self.devs]
        self._starts = [[] for _ in self.devs]
        self._base_ns = 0
        self._begin_pass(ctx, reader, first_ns=round(self.params.start_us * 1000.0))

    def _begin_pass(self, ctx: GuestContext, reader: TraceReader,
                    first_ns: int | None = None) -> None:
        """Map the live records at the pass's base time, then schedule the first event (at
        ``first_ns`` when given: set-up such as a warm-up window comes before it)."""
        self.passes += 1
        self._records = _Records(reader)
        self._t_first: int | None = None
        row = self._records.peek()
        while row is not None and row[1] == OP_LIVE:
            group = self._take_call()
            d = group[0][2]
            pieces = [(r[3], r[4], r[5]) for r in group if r[3] not in self._pieces[d]]
            if pieces:
                self.live_maps += len(pieces)
                self._map(ctx, self._base_ns, d, d % self._ctx_vcpus, pieces, live=True)
            row = self._records.peek()
        if first_ns is not None:
            self._base_ns = max(self._base_ns, first_ns)
        self._schedule_next(ctx)

    def _take_call(self) -> list[Row]:
        """Pop the next record and, for a map or live record, the other pieces of its call."""
        first = self._records.pop()
        assert first is not None
        group = [first]
        op, d, call = first[1], first[2], first[6]
        if op not in (OP_MAP, OP_LIVE):
            return group
        while True:
            nxt = self._records.peek()
            if nxt is None or nxt[1] != op or nxt[2] != d:
                return group
            last = group[-1]
            same = nxt[6] == call if call else (nxt[6] == 0 and nxt[3] == last[3] + last[5])
            if not same or (op == OP_LIVE and not call):
                return group
            group.append(self._records.pop())

    def _schedule_next(self, ctx: GuestContext) -> None:
        row = self._records.peek()
        if row is None:
            if self.params.loop and self._t_first is not None:
                self._base_ns = self._last_ns + 1
                self._begin_pass(ctx, TraceReader(self.params.path))
            return
        if self._t_first is None:
            self._t_first = row[0]
        t = self._base_ns + round((row[0] - self._t_first) * self.params.time_scale)
        self._last_ns = t
        schedule_at(ctx, t, self._replay)

    def _replay(self, ctx: GuestContext, t_ns: int) -> None:
        row = self._records.peek()
        if row is not None and row[1] in (OP_MAP, OP_UNMAP):
            late = ctx.stalled_until(row[2] % self._ctx_vcpus, t_ns)
            if late:          # the call's vCPU is stalled: the replay's clock slips with it
                self._base_ns += late - t_ns
                self._last_ns += late - t_ns
                schedule_at(ctx, late, self._replay)
                return
        group = self._take_call()
        self._schedule_next(ctx)
        _t, op, d, iova, _paddr, size, _call = group[0]
        if op == OP_MAP:
            self.map_calls += 1
            self._map(ctx, t_ns, d, d % self._ctx_vcpus, [(r[3], r[4], r[5]) for r in group])
        elif op == OP_UNMAP:
            self._unmap(ctx, t_ns, d, d % self._ctx_vcpus, iova, size)
        elif op == OP_LOST:
            self.lost_events += size
        elif op in (OP_DMA_READ, OP_DMA_WRITE):
            self.dmas += 1
            piece = self._find(d, iova)
            if piece is None:
                self.unmatched_dmas += 1
            else:
                self.device_dma(ctx, self.devs[d], t_ns, piece.iova + iova - piece.traced_iova,
                                size, op == OP_DMA_WRITE)
        # a live record after the start cannot be read: TraceReader refuses it

    def _buffer(self, ctx: GuestContext, paddr: int, size: int) -> int:
        """The guest buffer standing in for traced physical memory (paddr 0: unknown, fresh)."""
        off = paddr & (PAGE_SIZE - 1)
        npages = (off + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if paddr == 0:
            return ctx.alloc_buffer(npages << PAGE_SHIFT)
        key = (paddr >> PAGE_SHIFT, npages)
        gpa = self._buffers.get(key)
        if gpa is None:
            gpa = self._buffers[key] = ctx.alloc_buffer(npages << PAGE_SHIFT)
        return gpa + off

    def _map(self, ctx: GuestContext, t_ns: int, d: int, cpu: int,
             group: list[tuple[int, int, int]], live: bool = False) -> None:
        """Map one traced map call: a single piece, or the pieces of a scatter list."""
        if not live:
            self.maps += len(group)
        sg = [(self._buffer(ctx, paddr, size), size) for _iova, paddr, size in group]
        if len(group) == 1:
            emu_iova, _ = ctx.dma_map(cpu, self.devs[d], sg[0][0], sg[0][1], DMA_BIDIRECTIONAL,
                                      t_ns)
            segs, whole = [(emu_iova, sg[0][1])], None
        else:
            segs, _ = ctx.dma_map_sg(cpu, self.devs[d], sg, DMA_BIDIRECTIONAL, t_ns)
            whole = segs
        traced = tuple(g[0] for g in group)
        pieces = self._pieces[d]
        for (iova, _paddr, size), (emu_iova, _len) in zip(group, segs, strict=True):
            if iova in pieces:
                self.remaps += 1        # the old emulated mapping stays, as in the trace
            else:
                bisect.insort(self._starts[d], iova)
            pieces[iova] = _Piece(iova, size, emu_iova, t_ns, whole, traced)

    def _unmap(self, ctx: GuestContext, t_ns: int, d: int, cpu: int, iova: int,
               size: int) -> None:
        self.unmaps += 1
        pieces = self._pieces[d]
        if iova not in pieces:
            self.unmatched_unmaps += 1      # never mapped in this replay: touch nothing
            return
        first = pieces[iova]
        if first.sg is not None:        # a scatter list: one dma_unmap_sg for all its pieces
            for traced in first.sg_traced:
                if pieces.get(traced) is not None and pieces[traced].sg is first.sg:
                    pieces.pop(traced)
                    self._starts[d].pop(bisect.bisect_left(self._starts[d], traced))
            t = ctx.dma_unmap_sg(cpu, self.devs[d], first.sg, DMA_BIDIRECTIONAL, t_ns)
            self.unmap_calls += 1
            ctx.io_done(t, sum(n for _, n in first.sg), t - first.t_map_ns)
            return
        # an unmap record covering several separately mapped pieces: one call per piece
        t, at, head = t_ns, iova, True
        while at in pieces and pieces[at].sg is None and (head or at < iova + size):
            piece = pieces.pop(at)
            self._starts[d].pop(bisect.bisect_left(self._starts[d], at))
            t = ctx.dma_unmap(cpu, self.devs[d], piece.iova, piece.size, DMA_BIDIRECTIONAL, t)
            self.unmap_calls += 1
            ctx.io_done(t, piece.size, t - piece.t_map_ns)
            at += piece.size
            head = False

    def _find(self, d: int, iova: int) -> _Piece | None:
        starts = self._starts[d]
        k = bisect.bisect_right(starts, iova) - 1
        if k < 0:
            return None
        piece = self._pieces[d][starts[k]]
        return piece if iova < piece.traced_iova + piece.size else None
