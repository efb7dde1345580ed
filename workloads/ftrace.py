"""Import of Linux ftrace text (iommu:* and dma:* events) into the iommu-emu trace format.

Reads /sys/kernel/tracing/trace as Linux prints it (kernel/trace/trace_output.c) with the
events of include/trace/events/iommu.h (map, unmap: fired by iommu_map / iommu_unmap in
drivers/iommu/iommu.c, one map event per physically contiguous piece, one unmap event per
unmap call) and, when enabled, include/trace/events/dma.h (dma_map_page, dma_map_sg,
dma_unmap_*, dma_alloc, dma_free: fired in kernel/dma/mapping.c). iommu:map lines carry no
device; the dma:* event of the same call names it. In Linux 6.12 dma_map_page, dma_map_sg and
dma_alloc fire after their iommu:map lines, dma_unmap_sg and dma_free before their iommu:unmap
line, dma_unmap_page and dma_unmap_resource after it. Lines of one call run on one CPU in one
context (process, softirq, hardirq, NMI: the flags column), so pieces are claimed per
(CPU, context); an unmap is claimed by the dma:* event whose dma_addr it covers.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from workloads.trace import (
    IMPORT_BATCH_RECORDS,
    OP_LIVE,
    OP_LOST,
    OP_MAP,
    OP_UNMAP,
    TRACE_COLUMNS,
    TraceError,
    write_trace,
)

# "<task>-<pid> [(<tgid>)] [<cpu>] [<flags>] <sec>.<usec>: <event>: <message>"
_FTRACE_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*(?:\d+|-+)\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s:]+)\s+)?(?P<sec>\d+)\.(?P<frac>\d{1,9}):\s+(?:\w+:)?(?P<event>\w+):"
    r"\s?(?P<msg>.*)$")
# trace_output.c / ring_buffer: "CPU:%d [LOST %lu EVENTS]" before the CPU's next event
_FTRACE_LOST = re.compile(r"^\s*CPU:(?P<cpu>\d+) \[LOST (?P<n>\d+) EVENTS\]\s*$")
_HEX = r"0x([0-9a-fA-F]{1,16})"
_FTRACE_MAP = re.compile(rf"^IOMMU: iova={_HEX} - {_HEX} paddr={_HEX} size=(\d+)\s*$")
_FTRACE_UNMAP = re.compile(rf"^IOMMU: iova={_HEX} - {_HEX} size=(\d+) unmapped_size=(\d+)\s*$")
_DMA_DEVICE = re.compile(r"^(?P<dev>\S+)\s")
_DMA_ADDR = re.compile(r"\bdma_addr=(?:0x)?([0-9a-fA-F]{1,16})\b")

# dma:* events (include/trace/events/dma.h) by how they pair with the iommu:* lines.
DMA_MAP_EVENTS = frozenset({"dma_map_page", "dma_map_sg", "dma_map_resource", "dma_alloc",
                            "dma_alloc_pages", "dma_alloc_sgt"})
DMA_UNMAP_EVENTS = frozenset({"dma_unmap_page", "dma_unmap_sg", "dma_unmap_resource",
                              "dma_free", "dma_free_pages", "dma_free_sgt"})
# the pending-line limit: older unclaimed lines are given up as unattributed
_MAX_PENDING_LINES = 1 << 16
_U64 = (1 << 64) - 1


@dataclass
class _Slot:
    """One output position: a map call (its pieces), an unmap line, or a LOST marker."""

    t_ns: int
    op: int
    key: tuple[int, str]
    rows: list[tuple[int, int, int]]        # (iova, paddr, size)
    dev: str | None = None
    call: int = 0
    done: bool = False


@dataclass
class _Expect:
    """A dma:* unmap event waiting for the iommu:unmap line it causes."""

    dev: str
    addr: int | None                        # dma_addr, or None (dma_unmap_sg names none)
    call: int


@dataclass
class _Attributor:
    """Pairs iommu:map/unmap lines with the dma:* events of their calls, in line order.

    ``push_*`` feed parsed lines; ``take`` yields finished slots in line order. Without
    dma:* events in the file (``legacy``) every line goes to ``legacy_dev`` at once.
    """

    legacy: bool
    legacy_dev: str
    counts: dict[str, int]
    slots: deque[_Slot] = field(default_factory=deque)
    pending_maps: dict[tuple[int, str], list[_Slot]] = field(default_factory=dict)
    pending_unmaps: dict[tuple[int, str], list[_Slot]] = field(default_factory=dict)
    expects: dict[tuple[int, str], list[_Expect]] = field(default_factory=dict)
    next_call: int = 1

    def _new_call(self) -> int:
        self.next_call += 1
        return self.next_call - 1

    def push_map(self, t_ns: int, key: tuple[int, str], iova: int, paddr: int,
                 size: int) -> None:
        slot = _Slot(t_ns, OP_MAP, key, [(iova, paddr, size)])
        self.slots.append(slot)
        if self.legacy:
            slot.dev, slot.done = self.legacy_dev, True
        else:
            self.pending_maps.setdefault(key, []).append(slot)

    def push_unmap(self, t_ns: int, key: tuple[int, str], iova: int, size: int) -> None:
        slot = _Slot(t_ns, OP_UNMAP, key, [(iova, 0, size)])
        self.slots.append(slot)
        if self.legacy:
            slot.dev, slot.done = self.legacy_dev, True
            return
        waiting = self.expects.get(key, [])
        for i, e in enumerate(waiting):
            if e.addr is None or iova <= e.addr < iova + size:
                slot.dev, slot.call, slot.done = e.dev, e.call, True
                del waiting[i]
                return
        self.pending_unmaps.setdefault(key, []).append(slot)

    def push_dma(self, key: tuple[int, str], event: str, dev: str, addr: int | None) -> None:
        call = self._new_call()
        if event in DMA_MAP_EVENTS:
            self.expects.pop(key, None)
            pieces = self.pending_maps.pop(key, [])
            if pieces:      # the call's pieces become one slot, at the first piece's place
                first = pieces[0]
                for p in pieces[1:]:
                    first.rows.extend(p.rows)
                    p.rows, p.done = [], True
                first.dev, first.call, first.done = dev, call, True
            else:
                self.counts["dma_without_iommu"] += 1
            self._give_up(self.pending_unmaps.pop(key, []))
            return
        # an unmap-type event: claim the pending unmap line covering dma_addr, else expect it
        self._give_up(self.pending_maps.pop(key, []))
        self.expects.pop(key, None)
        pending = self.pending_unmaps.pop(key, [])
        claimed = None
        if addr is not None:
            for s in pending:
                iova, _, size = s.rows[0]
                if iova <= addr < iova + size:
                    claimed = s
                    break
        if claimed is not None:
            claimed.dev, claimed.call, claimed.done = dev, call, True
            pending.remove(claimed)
        else:
            self.expects[key] = [_Expect(dev, addr, call)]
        self._give_up(pending)

    def push_lost(self, t_ns: int, cpu: int, n: int) -> None:
        """Events of ``cpu`` were lost: lines waiting on that CPU lost their partners."""
        for table in (self.pending_maps, self.pending_unmaps, self.expects):
            for key in sorted(k for k in table if k[0] == cpu):
                got = table.pop(key)
                if table is not self.expects:
                    self._give_up(got)
        self.slots.append(_Slot(t_ns, OP_LOST, (cpu, ""), [(0, 0, n)], dev="", done=True))

    def _give_up(self, slots: list[_Slot]) -> None:
        for s in slots:
            s.done = True       # dev stays None: unattributed

    def finish(self) -> None:
        for table in (self.pending_maps, self.pending_unmaps):
            for key in sorted(table):
                self._give_up(table[key])
            table.clear()
        self.expects.clear()

    def take(self) -> Iterator[_Slot]:
        """Finished slots from the front, in line order."""
        slots = self.slots
        while slots and (slots[0].done or len(slots) > _MAX_PENDING_LINES):
            s = slots.popleft()
            if s.rows:
                yield s


def _events(text_path: str, counts: dict[str, int]) -> Iterator[tuple]:
    """Parse the text: ("map", t, key, iova, paddr, size), ("unmap", t, key, iova, size),
    ("dma", t, key, event, dev, addr), ("lost", t, cpu, n). Other events are counted."""
    t_last = 0
    try:
        f = open(text_path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        raise TraceError(text_path, None, f"cannot read: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            lost = _FTRACE_LOST.match(line)
            if lost is not None:
                yield ("lost", t_last, int(lost["cpu"]), int(lost["n"]))
                continue
            m = _FTRACE_LINE.match(line)
            if m is None:
                raise TraceError(text_path, None, f"not an ftrace event line: {line[:80]!r}",
                                 line=lineno)
            event, msg = m["event"], m["msg"]
            flags = m["flags"] or ""
            key = (int(m["cpu"]), flags[2] if len(flags) >= 3 else "")
            t_ns = int(m["sec"]) * 1_000_000_000 + int(m["frac"].ljust(9, "0"))
            if t_ns < t_last:
                raise TraceError(text_path, None, "timestamp goes backwards", line=lineno)
            t_last = t_ns
            if event == "map":
                e = _FTRACE_MAP.match(msg)
                if e is None:
                    raise TraceError(text_path, None, f"bad map event: {msg[:80]!r}",
                                     line=lineno)
                iova, end, paddr, size = int(e[1], 16), int(e[2], 16), int(e[3], 16), int(e[4])
            elif event == "unmap":
                e = _FTRACE_UNMAP.match(msg)
                if e is None:
                    raise TraceError(text_path, None, f"bad unmap event: {msg[:80]!r}",
                                     line=lineno)
                iova, end, size, unmapped = int(e[1], 16), int(e[2], 16), int(e[3]), int(e[4])
            elif event in DMA_MAP_EVENTS or event in DMA_UNMAP_EVENTS:
                d = _DMA_DEVICE.match(msg)
                if d is None:
                    raise TraceError(text_path, None, f"bad {event} event: {msg[:80]!r}",
                                     line=lineno)
                a = _DMA_ADDR.search(msg)
                yield ("dma", t_ns, key, event, d["dev"], int(a[1], 16) if a else None)
                continue
            else:
                counts["skipped"] += 1
                continue
            if end != (iova + size) & _U64 or size == 0 or size > _U64:
                raise TraceError(text_path, None,
                                 f"iova range {iova:#x} - {end:#x} does not match size {size}",
                                 line=lineno)
            if event == "map":
                yield ("map", t_ns, key, iova, paddr, size)
            else:                   # what was actually unmapped
                yield ("unmap", t_ns, key, iova, min(unmapped, _U64) or size)


@dataclass
class _Window:
    """What the first pass learns: devices named, whether dma:* events exist, live maps."""

    has_dma: bool = False
    devices: set[str] = field(default_factory=set)
    live: list[tuple[str, int, int]] = field(default_factory=list)   # (dev, iova, size)
    t_first: int | None = None


def _slots(text_path: str, counts: dict[str, int], legacy: bool,
           legacy_dev: str) -> Iterator[_Slot]:
    """Every finished slot of the file, in line order."""
    att = _Attributor(legacy, legacy_dev, counts)
    for ev in _events(text_path, counts):
        kind = ev[0]
        if kind == "map":
            att.push_map(*ev[1:])
        elif kind == "unmap":
            att.push_unmap(*ev[1:])
        elif kind == "dma":
            att.push_dma(ev[2], ev[3], ev[4], ev[5])
        else:
            att.push_lost(ev[1], ev[2], ev[3])
        yield from att.take()
    att.finish()
    yield from att.take()


def _first_pass(text_path: str, device: str | None) -> _Window:
    win = _Window()
    scratch = dict.fromkeys(("skipped", "dma_without_iommu"), 0)
    for ev in _events(text_path, scratch):
        if ev[0] == "dma":
            win.has_dma = True
            win.devices.add(ev[4])
    legacy_dev = device or "dev0"
    mapped: dict[str, dict[int, int]] = {}      # dev -> live traced iova -> size
    seen: dict[str, set[int]] = {}              # dev -> iovas mapped or unmapped so far
    for s in _slots(text_path, scratch, not win.has_dma, legacy_dev):
        dev = s.dev
        if not dev or (device is not None and dev != device and win.has_dma):
            continue
        if win.t_first is None:
            win.t_first = s.t_ns
        live, touched = mapped.setdefault(dev, {}), seen.setdefault(dev, set())
        if s.op == OP_MAP:
            for iova, _paddr, size in s.rows:
                live[iova] = size
                touched.add(iova)
        elif s.op == OP_UNMAP:
            iova, _, size = s.rows[0]
            if iova in live:
                for a in [a for a in live if iova <= a < iova + size]:
                    del live[a]
            elif iova not in touched:
                win.live.append((dev, iova, size))
            touched.add(iova)
    return win


def import_ftrace(text_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  device: str | None = None, live: bool = True) -> dict[str, int]:
    """Convert ftrace text with iommu:map/unmap (and dma:*) events into a trace file.

    With dma:* events in the text, records are attributed to the PCI devices they name and
    pieces are grouped into their calls; ``device`` keeps only that device's records. Without
    them every record goes to one device named ``device`` (default "dev0") and calls are not
    known (call 0). With ``live``, unmaps of IOVAs the window never saw mapped become live
    mappings declared at the start. Returns counts: map, unmap, map_calls, live, lost_events,
    lost_lines, unattributed, other_devices, skipped, dma_without_iommu, records.
    A malformed line raises TraceError naming the text file and line; a file that cannot be
    written raises TraceError naming ``out_path``; no output file is left behind.
    """
    text_path, out_path = os.fspath(text_path), os.fspath(out_path)
    win = _first_pass(text_path, device)
    if win.has_dma:
        if device is not None and device not in win.devices:
            raise TraceError(text_path, None,
                             f"no dma:* event names device {device!r} (devices: "
                             f"{', '.join(sorted(win.devices)) or 'none'})")
        devices = [device] if device is not None else sorted(win.devices)
    else:
        devices = [device or "dev0"]
    index = {d: i for i, d in enumerate(devices)}
    counts = dict.fromkeys(("map", "unmap", "map_calls", "live", "lost_events", "lost_lines",
                            "unattributed", "other_devices", "skipped",
                            "dma_without_iommu"), 0)
    lives = win.live if live else []
    counts["live"] = len(lives)

    def batches() -> Iterator[dict[str, list[int]]]:
        cols: dict[str, list[int]] = {c: [] for c in TRACE_COLUMNS}

        def add(t: int, op: int, dev: int, iova: int, paddr: int, size: int,
                call: int) -> None:
            for name, v in zip(TRACE_COLUMNS, (t, op, dev, iova, paddr, size, call),
                               strict=True):
                cols[name].append(v)

        t0 = win.t_first or 0
        for k, (dev, iova, size) in enumerate(lives):
            add(t0, OP_LIVE, index[dev], iova, 0, size, k + 1)
        for s in _slots(text_path, counts, not win.has_dma, devices[0]):
            if s.op == OP_LOST:
                counts["lost_lines"] += 1
                counts["lost_events"] += s.rows[0][2]
                add(s.t_ns, OP_LOST, 0, 0, 0, s.rows[0][2], 0)
            elif s.dev is None:
                counts["unattributed"] += len(s.rows)
                continue
            elif s.dev not in index:
                counts["other_devices"] += len(s.rows)
                continue
            elif s.op == OP_MAP:
                counts["map"] += len(s.rows)
                counts["map_calls"] += 1
                for iova, paddr, size in s.rows:
                    add(s.t_ns, OP_MAP, index[s.dev], iova, paddr, size, s.call)
            else:
                counts["unmap"] += 1
                iova, _, size = s.rows[0]
                add(s.t_ns, OP_UNMAP, index[s.dev], iova, 0, size, s.call)
            if len(cols["t_ns"]) >= IMPORT_BATCH_RECORDS:   # never inside a call's pieces
                yield cols
                cols = {c: [] for c in TRACE_COLUMNS}
        if cols["t_ns"]:
            yield cols

    try:
        counts["records"] = write_trace(out_path, devices, batches())
    except OSError as e:
        raise TraceError(out_path, None,
                         f"cannot write: {e.strerror or e}") from None
    return counts
