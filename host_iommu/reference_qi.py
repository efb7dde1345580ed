"""Reference model of the invalidation queue: a table of descriptor fields, one at a time.

The slow, obviously correct twin of host_iommu/qi.py's ``decode`` and ``InvalidationQueue``,
sharing no code with it. Tests compare decode results and submit results of the two.

Decoding follows VT-d spec 6.5.2.1-6.5.2.8 field by field: ``FIELDS`` lists, for each of the
eight descriptor types, every defined field as (name, qword, low bit, high bit); a bit that no
field names is reserved (spec 6.5.2.10: a descriptor with a reserved bit set is an invalidation
queue error). Where the spec defines a field QEMU (hw/i386/intel_iommu.c) refuses, the table
leaves it out: the wait descriptor's page-request drain bit (PD, bit 7) is reserved, as
VTD_INV_DESC_WAIT_RSVD_LO has it. The PFSID bits of the two device-TLB types are fields (the
spec defines them; QEMU, having no VFs, reserves them). Checks run in this order, the first
failing one naming the error: unknown type, reserved bits, granularity, address mask above
CAP.MAMV (IOTLB page-selective only: QEMU vtd_process_iotlb_desc), address not aligned to
2^AM pages, device-TLB size encoding with no 0 bit, wait with neither SW nor IF.

Processing follows the spec's queued invalidation model in time: software writes descriptors
at the tail (IQT) and hardware fetches them at the head (IQH) one at a time, each starting when
the previous one finished; an invalidation takes ``qi_desc_ns`` (``devtlb_inv_ns`` for a
device-TLB one), a wait ``qi_wait_ns``. A descriptor holds its queue slot until it has taken
effect, so the slots software may fill at time t are the queue size minus one (IQH == IQT
means empty) minus the descriptors whose effect lies after t, minus those held by an error.
A malformed descriptor stops the hardware with FSTS.IQE and IQH on it; a device-TLB
invalidation to an unresponsive device stops it with FSTS.ITE and drops the rest (spec
6.5.2.10). Every effect time is kept, so an answer depends on the time asked only, never on
which times were asked before.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from host_iommu.costs import CostModel
from host_iommu.defs import NO_PASID

U64 = (1 << 64) - 1
QWORDS = 4                                   # 256-bit descriptors (IQA.DW = 1)
PAGE_SHIFT = 12
MAMV = 18                                    # QEMU VTD_MAMV: CAP.MAMV
DESCS_PER_PAGE = 128                         # IQA.QS: 2^QS pages of 128 descriptors
MAX_QS = 7
REF_DESC_DTYPE = np.dtype([("qw0", "<u8"), ("qw1", "<u8"), ("qw2", "<u8"), ("qw3", "<u8")])

# Descriptor types and the counter names of the live model.
NAMES = {0x1: "context", 0x2: "iotlb", 0x3: "devtlb", 0x4: "iec", 0x5: "wait",
         0x6: "piotlb", 0x7: "pasid_cache", 0x8: "pasid_devtlb"}
WAIT = 0x5
DEVTLB = (0x3, 0x8)

_TYPE = [("type_lo", 0, 0, 3), ("type_hi", 0, 9, 11)]
# Spec 6.5.2.x: every defined field of each type, (name, qword, low bit, high bit).
FIELDS: dict[int, list[tuple[str, int, int, int]]] = {
    0x1: [*_TYPE, ("g", 0, 4, 5), ("did", 0, 16, 31), ("sid", 0, 32, 47), ("fm", 0, 48, 49)],
    0x2: [*_TYPE, ("g", 0, 4, 5), ("dw", 0, 6, 6), ("dr", 0, 7, 7), ("did", 0, 16, 31),
          ("am", 1, 0, 5), ("ih", 1, 6, 6), ("addr", 1, 12, 63)],
    0x3: [*_TYPE, ("pfsid_lo", 0, 12, 15), ("mip", 0, 16, 20), ("sid", 0, 32, 47),
          ("pfsid_hi", 0, 52, 63), ("s", 1, 0, 0), ("addr", 1, 12, 63)],
    0x4: [*_TYPE, ("g", 0, 4, 4), ("im", 0, 27, 31), ("iidx", 0, 32, 47)],
    0x5: [*_TYPE, ("if", 0, 4, 4), ("sw", 0, 5, 5), ("fn", 0, 6, 6),
          ("status_data", 0, 32, 63), ("status_addr", 1, 2, 63)],
    0x6: [*_TYPE, ("g", 0, 4, 5), ("did", 0, 16, 31), ("pasid", 0, 32, 51),
          ("am", 1, 0, 5), ("ih", 1, 6, 6), ("addr", 1, 12, 63)],
    0x7: [*_TYPE, ("g", 0, 4, 5), ("did", 0, 16, 31), ("pasid", 0, 32, 51)],
    0x8: [*_TYPE, ("mip", 0, 4, 8), ("pfsid_lo", 0, 12, 15), ("sid", 0, 16, 31),
          ("pasid", 0, 32, 51), ("pfsid_hi", 0, 52, 63), ("g", 1, 0, 0), ("s", 1, 11, 11),
          ("addr", 1, 12, 63)],
}
# Valid granularities (G) per type; a type not listed has no G field to check.
GRANULARITIES = {0x1: (1, 2, 3), 0x2: (1, 2, 3), 0x6: (2, 3), 0x7: (0, 1, 3)}


class QiError(ValueError):
    """The caller misused the reference queue (bad size, not an array of descriptors)."""


@dataclass(frozen=True)
class RefCommand:
    """A valid descriptor's meaning; fields a type does not use keep their defaults."""

    type: int
    gran: int = 0
    did: int = 0
    pasid: int = 0
    sid: int = 0
    fm: int = 0
    addr: int = 0
    am: int = 0
    ih: bool = False
    dr: bool = False
    dw: bool = False
    size_bytes: int = 0
    glob: bool = False
    pfsid: int = 0
    qdep: int = 0
    iidx: int = 0
    im: int = 0
    status_data: int = 0
    status_addr: int = 0
    interrupt: bool = False
    status_write: bool = False
    fence: bool = False

    @property
    def name(self) -> str:
        return NAMES[self.type]


@dataclass(frozen=True)
class RefDescError:
    """Why a descriptor or a submission was refused (dtype -1 for the queue's own refusals)."""

    dtype: int
    type_name: str
    code: str
    reason: str


def _bits(word: int, lo: int, hi: int) -> int:
    return (word >> lo) & ((1 << (hi - lo + 1)) - 1)


def _words(desc) -> tuple[int, int, int, int]:
    words = tuple(int(w) for w in (desc.tolist() if hasattr(desc, "tolist") else desc))
    if len(words) != QWORDS:
        raise QiError(f"a descriptor has {QWORDS} qwords, not {len(words)}")
    return words


def descriptor_type(qw0: int) -> int:
    """Type[3:0] in qw0 bits 3:0, type[6:4] in bits 11:9."""
    return _bits(qw0, 0, 3) | _bits(qw0, 9, 11) << 4


def reserved_mask(t: int, qword: int) -> int:
    """Bits of ``qword`` that no field of type ``t`` defines."""
    defined = 0
    for _name, q, lo, hi in FIELDS[t]:
        if q == qword:
            defined |= ((1 << (hi - lo + 1)) - 1) << lo
    return U64 & ~defined


def _error(t: int, code: str, reason: str) -> RefDescError:
    return RefDescError(t, NAMES.get(t, f"type {t:#x}"), code, reason)


def ref_decode(desc, mamv: int = MAMV) -> RefCommand | RefDescError:
    """Decode one descriptor (a DESC record or four qwords) by the field table."""
    words = _words(desc)
    t = descriptor_type(words[0])
    if t not in FIELDS:
        return _error(t, "unknown_type", f"type {t:#x} is no invalidation descriptor")
    for q in range(QWORDS):
        if words[q] & reserved_mask(t, q):
            return _error(t, "reserved", f"reserved bits set in qw{q}")
    f = {name: _bits(words[q], lo, hi) for name, q, lo, hi in FIELDS[t]}
    if t in GRANULARITIES and f["g"] not in GRANULARITIES[t]:
        return _error(t, "granularity", f"G={f['g']} is reserved for type {t:#x}")

    if t == 0x1:
        return RefCommand(t, gran=f["g"], did=f["did"], sid=f["sid"], fm=f["fm"])
    if t in (0x2, 0x6):
        page_selective = f["g"] == 3
        addr, am, ih = 0, 0, False
        if page_selective:
            addr, am, ih = f["addr"] << PAGE_SHIFT, f["am"], bool(f["ih"])
            if t == 0x2 and am > mamv:
                return _error(t, "am_too_large", f"AM={am} above MAMV={mamv}")
            if addr % (1 << (PAGE_SHIFT + am)) != 0:
                return _error(t, "misaligned", f"address not aligned to 2^{am} pages")
        if t == 0x2:
            return RefCommand(t, gran=f["g"], did=f["did"], addr=addr, am=am, ih=ih,
                              dr=bool(f["dr"]), dw=bool(f["dw"]))
        return RefCommand(t, gran=f["g"], did=f["did"], pasid=f["pasid"], addr=addr, am=am,
                          ih=ih)
    if t == 0x7:
        return RefCommand(t, gran=f["g"], did=f["did"], pasid=f["pasid"])
    if t in DEVTLB:
        # PCIe ATS invalidation: with S=1 the lowest 0 bit of address bits 63:12, at
        # position b above bit 12, makes the range 2^(b+1) pages, aligned to its size.
        pfn = f["addr"]
        size = 1 << PAGE_SHIFT
        if f["s"]:
            b = 0
            while b < 64 - PAGE_SHIFT and (pfn >> b) & 1 == 1:
                b += 1
            if b == 64 - PAGE_SHIFT:
                return _error(t, "size_encoding", "S=1 and no 0 bit in the address")
            size = 1 << (PAGE_SHIFT + b + 1)
        addr = (pfn << PAGE_SHIFT) // size * size
        pfsid = f["pfsid_lo"] | f["pfsid_hi"] << 4
        if t == 0x3:
            return RefCommand(t, sid=f["sid"], pasid=NO_PASID, addr=addr, size_bytes=size,
                              pfsid=pfsid, qdep=f["mip"])
        return RefCommand(t, sid=f["sid"], pasid=f["pasid"], addr=addr, size_bytes=size,
                          glob=bool(f["g"]), pfsid=pfsid, qdep=f["mip"])
    if t == 0x4:
        return RefCommand(t, gran=f["g"], iidx=f["iidx"], im=f["im"])
    # 0x5, wait: QEMU refuses one that neither writes status nor interrupts
    if not f["sw"] and not f["if"]:
        return _error(t, "wait_no_action", "a wait with neither SW nor IF")
    return RefCommand(t, status_data=f["status_data"], status_addr=f["status_addr"] << 2,
                      interrupt=bool(f["if"]), status_write=bool(f["sw"]), fence=bool(f["fn"]))


@dataclass
class RefSubmitResult:
    """What one tail write (or an IQE recovery) caused; the same fields as qi.SubmitResult."""

    commands: list[tuple[int, RefCommand]] = field(default_factory=list)
    waits: list[tuple[int, RefCommand]] = field(default_factory=list)
    wait_done_ns: list[int] = field(default_factory=list)
    processed: int = 0
    error: RefDescError | None = None
    error_index: int | None = None
    refused: bool = False


class InvalidationQueue:
    """One IOMMU's invalidation queue: registers, and hardware one descriptor at a time."""

    def __init__(self, entries: int = 256, costs: CostModel | None = None, *,
                 mamv: int = MAMV, unresponsive_sids: frozenset[int] = frozenset()) -> None:
        sizes = [DESCS_PER_PAGE * 2 ** qs for qs in range(MAX_QS + 1)]
        if entries not in sizes:
            raise QiError(f"entries={entries}: IQA.QS allows {sizes}")
        self.entries = entries
        self.qs = sizes.index(entries)
        self.costs = costs if costs is not None else CostModel()
        self.mamv = mamv
        self.unresponsive_sids = frozenset(unresponsive_sids)
        self.head = 0                       # IQH
        self.tail = 0                       # IQT
        self.fsts_iqe = False
        self.iqe_head: int | None = None
        self.fsts_ite = False
        self.ics_iwc = False
        self.counts = {name: 0 for name in NAMES.values()}
        self.errors = 0
        self.refused = 0
        self.effect_ns: list[int] = []      # every processed descriptor's effect time
        self.held: list[tuple[int, ...]] = []   # written, unprocessed: stopped by IQE
        self.hw_free_ns = 0                 # when the hardware may fetch its next descriptor

    # --- room --------------------------------------------------------------------------
    def forget_until(self, t_ns: int) -> None:
        """The live queue drops effect times no later question can see; the reference keeps
        every one (its answers never depend on what it was told to forget)."""

    def free_slots(self, t_ns: int) -> int:
        """Slots software may fill at ``t_ns``.

        ``effect_ns`` is in processing order, and the hardware is serial, so it is sorted:
        the descriptors still holding a slot at t_ns are those after bisect_right.
        """
        busy = len(self.effect_ns) - bisect_right(self.effect_ns, t_ns)
        return self.entries - 1 - busy - len(self.held)

    def room_at(self, t_ns: int, n: int) -> int:
        """The first time >= ``t_ns`` at which ``n`` descriptors fit: t_ns itself, or the
        effect time of one of the descriptors holding a slot then (slots free only then)."""
        if n > self.entries - 1 - len(self.held):
            raise QiError(f"{n} descriptors never fit a queue of {self.entries}")
        later = self.effect_ns[bisect_right(self.effect_ns, t_ns):]
        for t in [t_ns, *later]:
            if self.free_slots(t) >= n:
                return t
        raise AssertionError("once everything took effect, n descriptors fit")

    # --- software writes ----------------------------------------------------------------
    def submit(self, descs: np.ndarray, t_ns: int) -> RefSubmitResult:
        """Write ``descs`` at the tail at ``t_ns``; hardware processes them in order."""
        if not isinstance(descs, np.ndarray) or descs.dtype != REF_DESC_DTYPE or descs.ndim != 1:
            raise QiError("submit takes a 1-D array of 256-bit descriptors")
        if self.fsts_iqe:
            return self._refuse("iqe_pending", "FSTS.IQE is set")
        if self.fsts_ite:
            return self._refuse("ite_pending", "FSTS.ITE is set")
        if len(descs) > self.free_slots(t_ns):
            return self._refuse("queue_full", f"{len(descs)} descriptors do not fit")
        self.tail = (self.tail + len(descs)) % self.entries
        return self._hardware([_words(d) for d in descs], t_ns)

    def clear_iqe(self, t_ns: int = 0, replacement=None) -> RefSubmitResult:
        """Software clears FSTS.IQE: with a replacement for the bad descriptor the hardware
        goes on from it; without one, what was held is dropped (IQH = IQT)."""
        if not self.fsts_iqe:
            return RefSubmitResult()
        held, self.held = self.held, []
        self.fsts_iqe = False
        self.iqe_head = None
        if replacement is None:
            self.head = self.tail
            return RefSubmitResult()
        held[0] = _words(replacement)
        return self._hardware(held, t_ns)

    def clear_ite(self) -> None:
        self.fsts_ite = False

    def clear_iwc(self) -> None:
        self.ics_iwc = False

    def _refuse(self, code: str, reason: str) -> RefSubmitResult:
        self.refused += 1
        return RefSubmitResult(error=RefDescError(-1, "queue", code, reason), refused=True)

    # --- hardware ------------------------------------------------------------------------
    def _hardware(self, batch: list[tuple[int, ...]], t_ns: int) -> RefSubmitResult:
        """Fetch at IQH one descriptor at a time, each after the previous one finished."""
        res = RefSubmitResult()
        for i, words in enumerate(batch):
            start = max(t_ns, self.hw_free_ns)
            cmd = ref_decode(words, self.mamv)
            if isinstance(cmd, RefDescError):
                self.fsts_iqe = True
                self.iqe_head = self.head
                self.held = batch[i:]
                self.errors += 1
                self.hw_free_ns = start
                res.processed, res.error, res.error_index = i, cmd, i
                return res
            self.counts[cmd.name] += 1
            self.head = (self.head + 1) % self.entries
            if cmd.type in DEVTLB and cmd.sid in self.unresponsive_sids:
                self.fsts_ite = True
                self.head = self.tail
                self.hw_free_ns = start
                res.processed = i + 1
                res.error = _error(cmd.type, "ite", f"device-TLB invalidation to "
                                   f"sid {cmd.sid:#x} timed out")
                res.error_index = i
                return res
            if cmd.type == WAIT:
                done = start + self.costs.qi_wait_ns
                res.waits.append((done, cmd))
                res.wait_done_ns.append(done)
                if cmd.interrupt:
                    self.ics_iwc = True
            else:
                done = start + (self.costs.devtlb_inv_ns if cmd.type in DEVTLB
                                else self.costs.qi_desc_ns)
                res.commands.append((done, cmd))
            assert not self.effect_ns or done >= self.effect_ns[-1], "the hardware is serial"
            self.effect_ns.append(done)
            self.hw_free_ns = done
        res.processed = len(batch)
        return res
