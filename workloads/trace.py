"""DMA traces: the msgpack trace format, Linux iommu:map/unmap ftrace import, and replay.

The format is documented in docs/trace-format.md. The ftrace import reads the text of the
map and unmap events of Linux include/trace/events/iommu.h as /sys/kernel/tracing/trace
prints them (fired by iommu_map/iommu_unmap in drivers/iommu/iommu.c: one map event per
physically contiguous piece, one unmap event per unmap call).
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from workloads.base import DMA_BIDIRECTIONAL, Device, GuestContext, Workload
from workloads.nic import check_fraction, check_positive, schedule_at

FORMAT_NAME = "iommu-emu-trace"
FORMAT_VERSION = 1

# Record operations (column "op").
OP_MAP = 0
OP_UNMAP = 1
OP_DMA_READ = 2      # the device reads memory
OP_DMA_WRITE = 3     # the device writes memory
OP_NAMES = {OP_MAP: "map", OP_UNMAP: "unmap", OP_DMA_READ: "dma_read",
            OP_DMA_WRITE: "dma_write"}

# Columns of a batch frame, in order, with the dtype read_trace returns.
TRACE_COLUMNS: dict[str, np.dtype] = {
    "t_ns": np.dtype(np.int64),
    "op": np.dtype(np.uint8),
    "dev": np.dtype(np.int32),
    "iova": np.dtype(np.uint64),
    "paddr": np.dtype(np.uint64),
    "size": np.dtype(np.uint64),
}
_COLUMN_MAX = {"t_ns": (1 << 63) - 1, "op": OP_DMA_WRITE, "iova": (1 << 64) - 1,
               "paddr": (1 << 64) - 1, "size": (1 << 64) - 1}
MAX_BATCH_RECORDS = 1 << 20     # write_trace splits larger batches; read_trace refuses them
IMPORT_BATCH_RECORDS = 4096
_READ_CHUNK_BYTES = 1 << 16


class TraceError(Exception):
    """A trace file (or ftrace text) that cannot be read: where, and what is wrong."""

    def __init__(self, path: str | os.PathLike[str], frame_index: int | None, what: str,
                 *, line: int | None = None) -> None:
        self.path = os.fspath(path)
        self.frame_index = frame_index
        self.line = line
        self.what = what
        where = f"line {line}" if line is not None else f"frame {frame_index}"
        super().__init__(f"{self.path}: {where}: {what}")


def _check_batch(path: str, index: int, frame: Any, ndev: int,
                 t_last: int) -> dict[str, np.ndarray]:
    """Validate one batch frame and return it as numpy columns (TRACE_COLUMNS dtypes)."""
    if not isinstance(frame, Mapping):
        raise TraceError(path, index, f"batch is a {type(frame).__name__}, not a map")
    keys = set(frame)
    missing = [c for c in TRACE_COLUMNS if c not in keys]
    extra = sorted(str(k) for k in keys - TRACE_COLUMNS.keys())
    if missing or extra:
        raise TraceError(path, index, f"columns missing {missing}, unknown {extra}")
    lengths = {c: len(frame[c]) if isinstance(frame[c], Sequence | np.ndarray) else -1
               for c in TRACE_COLUMNS}
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
        values = frame[name]
        if n == 0:
            out[name] = np.empty(0, dtype)
            continue
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            arr = values
        elif all(type(v) is int for v in values):   # msgpack ints, numpy objects excluded
            arr = np.array(list(values), dtype=object)
        else:
            raise TraceError(path, index, f"column {name!r} holds non-integers")
        lo, hi = int(arr.min()), int(arr.max())
        top = ndev - 1 if name == "dev" else _COLUMN_MAX[name]
        if lo < 0 or hi > top:
            raise TraceError(path, index, f"column {name!r} has values outside [0, {top}]: "
                             f"{lo}..{hi}")
        out[name] = arr.astype(dtype)
    if n:
        t = out["t_ns"]
        if int(t[0]) < t_last or bool(np.any(np.diff(t) < 0)):
            raise TraceError(path, index, "t_ns decreases")
        if bool(np.any((out["op"] != OP_MAP) & (out["paddr"] != 0))):
            raise TraceError(path, index, "paddr is non-zero on a record that is not a map")
    return out


class TraceReader:
    """Streams a trace file: ``devices`` from the header, then batches by iteration.

    Every problem (truncation, garbage, a wrong header, bad columns) raises ``TraceError``
    naming the frame; a file that ends without its end frame is truncated.
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
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            self.close()
            raise TraceError(self.path, self._index,
                             f"not msgpack ({type(e).__name__}: {e})") from None

    def _check_header(self, header: Any) -> list[str]:
        if not isinstance(header, Mapping) or header.get("format") != FORMAT_NAME:
            self.close()
            raise TraceError(self.path, 0, f"header is not a {FORMAT_NAME!r} map")
        if header.get("version") != FORMAT_VERSION:
            self.close()
            raise TraceError(self.path, 0, f"unsupported version {header.get('version')!r}")
        devices = header.get("devices")
        if (not isinstance(devices, list) or not devices
                or not all(isinstance(d, str) and d for d in devices)
                or len(set(devices)) != len(devices)):
            self.close()
            raise TraceError(self.path, 0, "devices must be a non-empty list of unique names")
        return devices

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        t_last = 0
        batches = records = 0
        try:
            while True:
                self._index += 1
                frame = self._next_frame()
                if frame is None:
                    raise TraceError(self.path, self._index, "truncated: no end frame")
                if isinstance(frame, Mapping) and "end" in frame:
                    break
                batch = _check_batch(self.path, self._index, frame, len(self.devices), t_last)
                n = len(batch["t_ns"])
                if n:
                    t_last = int(batch["t_ns"][-1])
                batches += 1
                records += n
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


def write_trace(path: str | os.PathLike[str], devices: Sequence[str],
                columns_iter: Iterable[Mapping[str, Any]]) -> int:
    """Write a trace: header, one frame per batch of columns, end frame. Returns records.

    Batches are validated as read_trace would; a bad one raises TraceError and leaves no file.
    """
    path = os.fspath(path)
    devices = list(devices)
    if not devices or not all(isinstance(d, str) and d for d in devices) \
            or len(set(devices)) != len(devices):
        raise TraceError(path, 0, "devices must be a non-empty list of unique names")
    tmp = path + ".tmp"
    packer = msgpack.Packer()
    batches = records = 0
    t_last = 0
    try:
        with open(tmp, "wb") as f:
            f.write(packer.pack({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                 "devices": devices}))
            for columns in columns_iter:
                if not isinstance(columns, Mapping) or set(columns) != TRACE_COLUMNS.keys() \
                        or not all(isinstance(columns[c], Sequence | np.ndarray)
                                   for c in TRACE_COLUMNS):
                    _check_batch(path, batches + 1, columns, len(devices), t_last)
                # lists stay lists: numpy would turn mixed large ints into float64
                cols = {c: columns[c] for c in TRACE_COLUMNS}
                n = len(cols["t_ns"])
                for lo in range(0, max(n, 1), MAX_BATCH_RECORDS):
                    part = {c: v[lo:lo + MAX_BATCH_RECORDS] for c, v in cols.items()}
                    checked = _check_batch(path, batches + 1, part, len(devices), t_last)
                    if n:
                        t_last = int(checked["t_ns"][-1])
                    f.write(packer.pack({c: v.tolist() for c, v in checked.items()}))
                    batches += 1
                    records += len(checked["t_ns"])
            f.write(packer.pack({"end": True, "batches": batches, "records": records}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return records


# --- Linux ftrace import -----------------------------------------------------------------
# "<task>-<pid> [(<tgid>)] [<cpu>] [<flags>] <sec>.<usec>: <event>: <message>"
_FTRACE_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*(?:\d+|-+)\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:[^\s:]+\s+)?(?P<sec>\d+)\.(?P<frac>\d{1,9}):\s+(?:iommu:)?(?P<event>\w+):\s?"
    r"(?P<msg>.*)$")
_HEX = r"0x([0-9a-fA-F]{1,16})"
_FTRACE_MAP = re.compile(rf"^IOMMU: iova={_HEX} - {_HEX} paddr={_HEX} size=(\d+)\s*$")
_FTRACE_UNMAP = re.compile(rf"^IOMMU: iova={_HEX} - {_HEX} size=(\d+) unmapped_size=(\d+)\s*$")


def _parse_ftrace(text_path: str, counts: dict[str, int]) -> Iterator[dict[str, list[int]]]:
    cols: dict[str, list[int]] = {c: [] for c in TRACE_COLUMNS}
    t_last = 0
    with open(text_path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _FTRACE_LINE.match(line)
            if m is None:
                raise TraceError(text_path, None, f"not an ftrace event line: {line[:80]!r}",
                                 line=lineno)
            event = m["event"]
            if event not in ("map", "unmap"):
                counts["skipped"] += 1
                continue
            t_ns = int(m["sec"]) * 1_000_000_000 + int(m["frac"].ljust(9, "0"))
            if t_ns < t_last:
                raise TraceError(text_path, None, "timestamp goes backwards", line=lineno)
            t_last = t_ns
            if event == "map":
                e = _FTRACE_MAP.match(m["msg"])
                if e is None:
                    raise TraceError(text_path, None, f"bad map event: {m['msg'][:80]!r}",
                                     line=lineno)
                iova, end, paddr, size = (int(e[1], 16), int(e[2], 16), int(e[3], 16),
                                          int(e[4]))
                op = OP_MAP
            else:
                e = _FTRACE_UNMAP.match(m["msg"])
                if e is None:
                    raise TraceError(text_path, None, f"bad unmap event: {m['msg'][:80]!r}",
                                     line=lineno)
                iova, end, size, unmapped = (int(e[1], 16), int(e[2], 16), int(e[3]),
                                             int(e[4]))
                paddr, op = 0, OP_UNMAP
            if end != (iova + size) & ((1 << 64) - 1) or size == 0 or size >= 1 << 64:
                raise TraceError(text_path, None,
                                 f"iova range {iova:#x} - {end:#x} does not match size {size}",
                                 line=lineno)
            if op == OP_UNMAP:
                size = unmapped            # what was actually unmapped
            counts[event] += 1
            for name, v in (("t_ns", t_ns), ("op", op), ("dev", 0), ("iova", iova),
                            ("paddr", paddr), ("size", size)):
                cols[name].append(v)
            if len(cols["t_ns"]) >= IMPORT_BATCH_RECORDS:
                yield cols
                cols = {c: [] for c in TRACE_COLUMNS}
    if cols["t_ns"]:
        yield cols


def import_ftrace(text_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  device: str = "dev0") -> dict[str, int]:
    """Convert iommu:map / iommu:unmap ftrace text into a trace file for ``device``.

    Returns counts: map, unmap, skipped (other events), records. Unmap records carry the
    event's unmapped_size as their size. A malformed line raises TraceError with its number.
    """
    counts = {"map": 0, "unmap": 0, "skipped": 0}
    try:
        records = write_trace(out_path, [device], _parse_ftrace(os.fspath(text_path), counts))
    except OSError as e:
        raise TraceError(text_path, None, f"cannot read: {e.strerror}") from None
    counts["records"] = records
    return counts


# --- replay ------------------------------------------------------------------------------
@dataclass
class _Piece:
    """One replayed mapping: traced IOVA range -> emulated IOVA."""

    traced_iova: int
    size: int
    iova: int
    t_map_ns: int
    sg: list[tuple[int, int]] | None = None  # the whole scatter list's DMA segments
    sg_traced: tuple[int, ...] = ()          # traced IOVAs of the scatter list's pieces


class TraceWorkload(Workload):
    """Replays a trace file's maps, unmaps and device DMAs through the guest DMA API.

    A map maps a guest buffer standing in for the traced physical range (one buffer per
    distinct page range, reused when the trace maps it again); an unmap unmaps the emulated
    IOVA of the traced one; DMAs go to the emulated IOVA plus the same offset. A DMA or unmap
    of a traced IOVA that is not mapped is replayed at that raw address (and will fault).

    Linux's iommu:map fires once per physically contiguous piece, iommu:unmap once per unmap
    call. Consecutive map records of one device whose traced IOVAs continue each other are the
    pieces of one dma_map_sg call, and replay as one (so an unmap record covering them all is
    one dma_unmap_sg): the replay then makes as many map pieces and unmap calls as the trace.
    """

    kind = "trace"

    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        path: str = ""
        loop: bool = False          # start over at the end of the file
        time_scale: float = 1.0     # emulated ns per traced ns

        def validate(self) -> list[tuple[str, str]]:
            errors = check_fraction(self.rogue_fraction, "rogue_fraction")
            errors += check_positive(self.time_scale, "time_scale")
            if not isinstance(self.loop, bool):
                errors.append(("loop", f"{self.loop!r} is not a boolean"))
            if not isinstance(self.path, str) or not self.path:
                errors.append(("path", "a trace file is required"))
            elif not os.path.isfile(self.path):
                errors.append(("path", f"no such file: {self.path}"))
            else:
                try:
                    TraceReader(self.path).close()
                except TraceError as e:
                    errors.append(("path", str(e)))
            return errors

    def __init__(self, params: TraceWorkload.Params | None = None) -> None:
        super().__init__(params if params is not None else self.Params())
        self.maps = 0               # trace map records replayed
        self.unmaps = 0             # trace unmap records replayed
        self.dmas = 0
        self.unmap_calls = 0        # dma_unmap calls (an unmap may span several map pieces)
        self.unknown_unmaps = 0
        self.unknown_dmas = 0
        self.remaps = 0             # a traced IOVA mapped again while mapped
        self.passes = 0
        self.devs: list[Device] = []
        self._buffers: dict[tuple[int, int], int] = {}     # (paddr page, pages) -> gpa
        self._pieces: list[dict[int, _Piece]] = []          # per dev: traced iova -> piece
        self._starts: list[list[int]] = []                  # per dev: sorted traced iovas

    def start(self, ctx: GuestContext) -> None:
        self._ctx_vcpus = ctx.vcpus
        reader = TraceReader(self.params.path)
        self.devs = [ctx.add_device(name) for name in reader.devices]
        self._pieces = [{} for _ in self.devs]
        self._starts = [[] for _ in self.devs]
        self._base_ns = 0
        self._begin_pass(ctx, reader)

    def _begin_pass(self, ctx: GuestContext, reader: TraceReader) -> None:
        self.passes += 1
        self._batches = iter(reader)
        self._batch: dict[str, np.ndarray] | None = None
        self._i = 0
        self._t_first: int | None = None
        self._schedule_next(ctx)

    def _schedule_next(self, ctx: GuestContext) -> None:
        while self._batch is None or self._i >= len(self._batch["t_ns"]):
            self._batch = next(self._batches, None)
            self._i = 0
            if self._batch is None:
                if self.params.loop and self._t_first is not None:
                    self._base_ns = self._last_ns + 1
                    self._begin_pass(ctx, TraceReader(self.params.path))
                return
        t_rec = int(self._batch["t_ns"][self._i])
        if self._t_first is None:
            self._t_first = t_rec
        t = self._base_ns + round((t_rec - self._t_first) * self.params.time_scale)
        self._last_ns = t
        schedule_at(ctx, t, self._replay)

    def _replay(self, ctx: GuestContext, t_ns: int) -> None:
        b, i = self._batch, self._i
        self._i += 1
        op, d = int(b["op"][i]), int(b["dev"][i])
        iova, paddr, size = int(b["iova"][i]), int(b["paddr"][i]), int(b["size"][i])
        dev, cpu = self.devs[d], d % self._ctx_vcpus
        if op == OP_MAP:
            group = [(iova, paddr, size)]
            while (self._i < len(b["t_ns"]) and int(b["op"][self._i]) == OP_MAP
                   and int(b["dev"][self._i]) == d
                   and int(b["iova"][self._i]) == group[-1][0] + group[-1][2]):
                j = self._i
                group.append((int(b["iova"][j]), int(b["paddr"][j]), int(b["size"][j])))
                self._i += 1
            self._schedule_next(ctx)
            self._map(ctx, t_ns, d, cpu, group)
            return
        self._schedule_next(ctx)
        if op == OP_UNMAP:
            self._unmap(ctx, t_ns, d, cpu, iova, size)
        else:
            self.dmas += 1
            piece = self._find(d, iova)
            if piece is None:
                self.unknown_dmas += 1
                ctx.device_dma(dev, t_ns, iova, size, op == OP_DMA_WRITE)
            else:
                self.device_dma(ctx, dev, t_ns, piece.iova + iova - piece.traced_iova, size,
                                op == OP_DMA_WRITE)

    def _map(self, ctx: GuestContext, t_ns: int, d: int, cpu: int,
             group: list[tuple[int, int, int]]) -> None:
        """Map one traced map call: a single piece, or the pieces of a scatter list."""
        self.maps += len(group)
        sg = []
        for _iova, paddr, size in group:
            off = paddr & (PAGE_SIZE - 1)
            npages = (off + size + PAGE_SIZE - 1) >> PAGE_SHIFT
            key = (paddr >> PAGE_SHIFT, npages)
            gpa = self._buffers.get(key)
            if gpa is None:
                gpa = self._buffers[key] = ctx.alloc_buffer(npages << PAGE_SHIFT)
            sg.append((gpa + off, size))
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
            self.unknown_unmaps += 1
            self.unmap_calls += 1
            ctx.dma_unmap(cpu, self.devs[d], iova, max(size, 1), DMA_BIDIRECTIONAL, t_ns)
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
