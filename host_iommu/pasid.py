"""Scalable-mode root, context, PASID-directory and PASID-table entries, bit-exact.

Follows the VT-d spec rev. 3.x chapter 9 ("Translation Structure Formats": 9.2 scalable-mode
root entry, 9.4 scalable-mode context entry, 9.5 PASID directory entry, 9.6 PASID table entry)
and Linux drivers/iommu/intel/pasid.[ch], whose pasid_set_* helpers name the same fields:
DID bits 79:64, SLPTPTR 63:12, AW 4:2, PGTT 8:6, FPD 1, SSADE 9, SRE 128, FLPM 131:130,
FLPTR 191:140. All structures live in host memory (HostMemory frames), so fetching them is a
counted memory reference like any page-table read.
"""

from __future__ import annotations

from dataclasses import dataclass

from host_iommu.defs import (
    MAX_PASID,
    PAGE_MASK,
    PAGE_SHIFT,
    PGTT_FL_ONLY,
    PGTT_NESTED,
    PGTT_PT,
    PGTT_SL_ONLY,
    SL_LEVELS_BY_WIDTH,
    SL_WIDTH_BY_LEVELS,
    FaultReason,
)
from host_iommu.memory import KIND_PAGETABLE, OWNER_HOST, HostMemory

# --- Scalable-mode root entry (128 bits, spec 9.2) -------------------------------------------
ROOT_ENTRY_BYTES = 16
RE_LP = 1 << 0             # bit 0: lower context table present (devfn 0-127)
RE_UP = 1 << 0             # bit 64 (bit 0 of the upper word): upper table present (128-255)
RE_CTP_MASK = PAGE_MASK    # bits 63:12 / 127:76: context table pointers

# --- Scalable-mode context entry (256 bits, spec 9.4) -----------------------------------------
SM_CONTEXT_ENTRY_BYTES = 32
CE_P = 1 << 0              # bit 0: present
CE_FPD = 1 << 1            # bit 1: fault processing disable
CE_DTE = 1 << 2            # bit 2: device-TLB enable (ATS)
CE_PASIDE = 1 << 3         # bit 3: PASID enable
CE_PDTS_SHIFT = 9          # bits 11:9: PASID directory size = 2^(PDTS + 7) entries
CE_PDTS_MASK = 0x7 << CE_PDTS_SHIFT
CE_PASIDDIRPTR_MASK = PAGE_MASK  # bits 63:12
CE_RID_PASID_MASK = (1 << 20) - 1  # bits 83:64: PASID used for requests without PASID
CE_RSVD_W0 = 0x1E0         # bits 8:5 reserved in this model (PRE etc. not emulated)

# --- PASID directory entry (64 bits, spec 9.5) -------------------------------------------------
PASID_PDE_SHIFT = 6        # directory index = pasid >> 6 (Linux PASID_PDE_SHIFT)
PASID_PTE_MASK = 0x3F      # table index = pasid & 0x3f (Linux PASID_PTE_MASK)
PDE_P = 1 << 0
PDE_FPD = 1 << 1
PDE_PTR_MASK = PAGE_MASK   # bits 63:12: PASID table pointer
PDE_RSVD = 0xFFC           # bits 11:2 reserved

# --- PASID table entry (512 bits = 8 words, spec 9.6) ------------------------------------------
PASID_ENTRY_BYTES = 64
PASID_ENTRY_WORDS = 8
PE_P = 1 << 0                       # w0 bit 0: present
PE_FPD = 1 << 1                     # w0 bit 1: fault processing disable
PE_AW_SHIFT = 2                     # w0 bits 4:2: second-level address width (AGAW)
PE_AW_MASK = 0x7 << PE_AW_SHIFT
PE_PGTT_SHIFT = 6                   # w0 bits 8:6: PASID-granular translation type
PE_PGTT_MASK = 0x7 << PE_PGTT_SHIFT
PE_SSADE = 1 << 9                   # w0 bit 9: second-stage access/dirty enable
PE_SLPTR_MASK = PAGE_MASK           # w0 bits 63:12: second-level page-table pointer
PE_DID_MASK = 0xFFFF                # w1 bits 15:0 (entry bits 79:64): domain id
PE_PGSNP = 1 << 24                  # w1 bit 24 (entry bit 88): page snoop
PE_SRE = 1 << 0                     # w2 bit 0 (entry bit 128): supervisor requests enable
PE_FLPM_SHIFT = 2                   # w2 bits 3:2 (entry bits 131:130): 0 = 4-level, 1 = 5-level
PE_FLPM_MASK = 0x3 << PE_FLPM_SHIFT
PE_WPE = 1 << 4                     # w2 bit 4 (entry bit 132): write protect enable
PE_FLPTR_MASK = PAGE_MASK           # w2 bits 63:12 (entry bits 191:140): first-level pointer
PE_W0_RSVD = 0xC00                  # w0 bits 11:10 reserved
PE_W2_RSVD = 0xF00                  # w2 bits 11:8 reserved in this model

# AW encodings (spec 9.6, Linux agaw_to_width): 1 = 39-bit/3-level, 2 = 48/4, 3 = 57/5.
AW_BY_SL_LEVELS = {3: 1, 4: 2, 5: 3}
SL_LEVELS_BY_AW = {v: k for k, v in AW_BY_SL_LEVELS.items()}
FLPM_BY_FL_LEVELS = {4: 0, 5: 1}
FL_LEVELS_BY_FLPM = {v: k for k, v in FLPM_BY_FL_LEVELS.items()}
VALID_PGTT = (PGTT_FL_ONLY, PGTT_SL_ONLY, PGTT_NESTED, PGTT_PT)


class PasidError(ValueError):
    """A PASID the device's PASID directory cannot hold (beyond PDTS or beyond 20 bits)."""


@dataclass(frozen=True, slots=True)
class PasidEntry:
    """A decoded PASID table entry. Pointers are addresses (not frame numbers)."""

    present: bool = True
    fpd: bool = False
    pgtt: int = PGTT_SL_ONLY
    did: int = 0
    slptr: int = 0          # HPA of the second-level root
    sl_levels: int = 4      # from AW
    ssade: bool = False
    flptr: int = 0          # first-level root: a GPA under nesting, an HPA for PGTT=1
    fl_levels: int = 4      # from FLPM
    sre: bool = False
    pgsnp: bool = False

    def encode(self) -> list[int]:
        """The eight 64-bit words of the entry."""
        w = [0] * PASID_ENTRY_WORDS
        w[0] = ((PE_P if self.present else 0) | (PE_FPD if self.fpd else 0)
                | (AW_BY_SL_LEVELS[self.sl_levels] << PE_AW_SHIFT)
                | ((self.pgtt & 0x7) << PE_PGTT_SHIFT) | (PE_SSADE if self.ssade else 0)
                | (self.slptr & PE_SLPTR_MASK))
        w[1] = (self.did & PE_DID_MASK) | (PE_PGSNP if self.pgsnp else 0)
        w[2] = ((PE_SRE if self.sre else 0)
                | (FLPM_BY_FL_LEVELS[self.fl_levels] << PE_FLPM_SHIFT)
                | (self.flptr & PE_FLPTR_MASK))
        return w


def decode_pasid_entry(words: list[int] | tuple[int, ...]) -> PasidEntry | FaultReason:
    """Decode eight words; a non-present entry or an invalid one gives its fault reason."""
    w0, w1, w2 = int(words[0]), int(words[1]), int(words[2])
    if not w0 & PE_P:
        return FaultReason.PASID_ENTRY_P
    pgtt = (w0 & PE_PGTT_MASK) >> PE_PGTT_SHIFT
    aw = (w0 & PE_AW_MASK) >> PE_AW_SHIFT
    flpm = (w2 & PE_FLPM_MASK) >> PE_FLPM_SHIFT
    if w0 & PE_W0_RSVD or w2 & PE_W2_RSVD or any(int(x) for x in words[3:]):
        return FaultReason.PASID_ENTRY_RSVD
    if pgtt not in VALID_PGTT:
        return FaultReason.PASID_TABLE_ENTRY_INV
    if pgtt in (PGTT_SL_ONLY, PGTT_NESTED) and aw not in SL_LEVELS_BY_AW:
        return FaultReason.PASID_TABLE_ENTRY_INV
    if pgtt in (PGTT_FL_ONLY, PGTT_NESTED) and flpm not in FL_LEVELS_BY_FLPM:
        return FaultReason.PASID_TABLE_ENTRY_INV
    return PasidEntry(
        present=True, fpd=bool(w0 & PE_FPD), pgtt=pgtt, did=w1 & PE_DID_MASK,
        slptr=w0 & PE_SLPTR_MASK, sl_levels=SL_LEVELS_BY_AW.get(aw, 4),
        ssade=bool(w0 & PE_SSADE), flptr=w2 & PE_FLPTR_MASK,
        fl_levels=FL_LEVELS_BY_FLPM.get(flpm, 4), sre=bool(w2 & PE_SRE),
        pgsnp=bool(w1 & PE_PGSNP))


@dataclass(frozen=True, slots=True)
class ContextEntry:
    """A decoded scalable-mode context entry."""

    fpd: bool
    dte: bool
    pasid_dir: int      # HPA of the PASID directory
    pdts: int           # directory holds 2^(pdts + 7) entries
    rid_pasid: int

    @property
    def dir_entries(self) -> int:
        return 1 << (self.pdts + 7)

    def words(self) -> tuple[int, int]:
        """The entry's two low words (w0, w1), present and PASID-enabled."""
        w0 = (self.pasid_dir | (self.pdts << CE_PDTS_SHIFT) | CE_PASIDE
              | (CE_DTE if self.dte else 0) | (CE_FPD if self.fpd else 0) | CE_P)
        return w0, self.rid_pasid & CE_RID_PASID_MASK

    @classmethod
    def decode(cls, w0: int, w1: int) -> ContextEntry:
        """Fields of a present, valid entry (the caller checked P, PASIDE and reserved bits)."""
        return cls(fpd=bool(w0 & CE_FPD), dte=bool(w0 & CE_DTE),
                   pasid_dir=w0 & CE_PASIDDIRPTR_MASK,
                   pdts=(w0 & CE_PDTS_MASK) >> CE_PDTS_SHIFT, rid_pasid=w1 & CE_RID_PASID_MASK)


@dataclass(frozen=True, slots=True)
class ContextResult:
    """Outcome of resolving (sid, pasid) to a PASID entry, with the references it cost."""

    entry: PasidEntry | None
    fault: FaultReason
    ctx_refs: int
    fpd: bool = False
    dte: bool = False


class ScalableModeTables:
    """The root table, context tables, PASID directories and PASID tables of one IOMMU.

    Software side (what the host driver, Linux intel/pasid.c, programs) and hardware side
    (``resolve``: the fetches a translation makes, each one counted) over the same memory.
    """

    def __init__(self, mem: HostMemory, *, pdts: int = 7) -> None:
        self.mem = mem
        self.pdts = pdts  # 2^(7+7) = 16384 directory entries: PASIDs up to 2^20
        self.root_table = mem.alloc_table(OWNER_HOST, KIND_PAGETABLE)
        self.rtaddr = self.root_table << PAGE_SHIFT

    # --- programming (host driver) ------------------------------------------------------------
    def _context_table(self, bus: int, upper: bool, create: bool) -> int | None:
        word = self.rtaddr + bus * ROOT_ENTRY_BYTES + (8 if upper else 0)
        value = self.mem.read_u64(word)
        if value & RE_LP:
            return value & RE_CTP_MASK
        if not create:
            return None
        frame = self.mem.alloc_table(OWNER_HOST, KIND_PAGETABLE)
        self.mem.write_u64(word, (frame << PAGE_SHIFT) | RE_LP)
        return frame << PAGE_SHIFT

    def context_entry_addr(self, sid: int, create: bool = False) -> int | None:
        bus, devfn = sid >> 8, sid & 0xFF
        table = self._context_table(bus, devfn >= 128, create)
        if table is None:
            return None
        return table + (devfn & 0x7F) * SM_CONTEXT_ENTRY_BYTES

    def attach_device(self, sid: int, *, fpd: bool = False, dte: bool = False,
                      rid_pasid: int = 0) -> int:
        """Give ``sid`` a context entry and a PASID directory; returns the directory HPA."""
        addr = self.context_entry_addr(sid, create=True)
        assert addr is not None
        w0 = self.mem.read_u64(addr)
        if w0 & CE_P:
            return w0 & CE_PASIDDIRPTR_MASK
        pdir = self.mem.alloc_table(OWNER_HOST, KIND_PAGETABLE) << PAGE_SHIFT
        # One directory page of 512 entries (PDTS = 2: PASIDs below 2^15), as Linux sizes
        # the table for a device whose PASID capability reports 15 bits.
        pdts = min(self.pdts, 2)
        self.mem.write_u64(addr + 8, rid_pasid & CE_RID_PASID_MASK)
        self.mem.write_u64(addr, pdir | (pdts << CE_PDTS_SHIFT) | CE_PASIDE
                           | (CE_DTE if dte else 0) | (CE_FPD if fpd else 0) | CE_P)
        return pdir

    def max_pasids(self, sid: int) -> int:
        """PASIDs the device's directory holds: from its context entry's PDTS, or the size
        ``attach_device`` would give it."""
        addr = self.context_entry_addr(sid)
        w0 = 0 if addr is None else self.mem.read_u64(addr)
        pdts = (w0 & CE_PDTS_MASK) >> CE_PDTS_SHIFT if w0 & CE_P else min(self.pdts, 2)
        return 1 << (pdts + 7 + PASID_PDE_SHIFT)

    def pasid_entry_addr(self, sid: int, pasid: int, create: bool = False) -> int | None:
        """HPA of the PASID-table entry of (sid, pasid); None if absent and not created.

        The directory holds 2^(PDTS + 7) entries, as the context entry declares (spec 9.4);
        a PASID beyond it has no entry (the hardware faults it), so creating one raises
        PasidError rather than writing past the directory.
        """
        ce_addr = self.context_entry_addr(sid)
        if ce_addr is None:
            return None
        w0 = self.mem.read_u64(ce_addr)
        if not w0 & CE_P:
            return None
        dir_entries = 1 << (((w0 & CE_PDTS_MASK) >> CE_PDTS_SHIFT) + 7)
        if not 0 <= pasid <= MAX_PASID or (pasid >> PASID_PDE_SHIFT) >= dir_entries:
            if create:
                raise PasidError(f"PASID {pasid:#x} of device {sid:#06x} is beyond its PASID "
                                 f"directory ({dir_entries} entries: PASIDs below "
                                 f"{dir_entries << PASID_PDE_SHIFT:#x})")
            return None
        pdir = w0 & CE_PASIDDIRPTR_MASK
        pde_addr = pdir + (pasid >> PASID_PDE_SHIFT) * 8
        pde = self.mem.read_u64(pde_addr)
        if not pde & PDE_P:
            if not create:
                return None
            table = self.mem.alloc_table(OWNER_HOST, KIND_PAGETABLE) << PAGE_SHIFT
            self.mem.write_u64(pde_addr, table | PDE_P)
            pde = table | PDE_P
        return (pde & PDE_PTR_MASK) + (pasid & PASID_PTE_MASK) * PASID_ENTRY_BYTES

    def set_pasid_entry(self, sid: int, pasid: int, entry: PasidEntry) -> None:
        """Write a PASID entry (device must be attached). Linux intel_pasid_setup_*()."""
        addr = self.pasid_entry_addr(sid, pasid, create=True)
        if addr is None:
            raise ValueError(f"device {sid:#06x} has no context entry")
        words = entry.encode()
        # Write everything but w0 first, then w0 with P: the hardware never sees a half entry.
        for i in range(1, PASID_ENTRY_WORDS):
            self.mem.write_u64(addr + 8 * i, words[i])
        self.mem.write_u64(addr, words[0])

    def clear_pasid_entry(self, sid: int, pasid: int) -> None:
        """Tear down a PASID entry (intel_pasid_tear_down_entry: clear P first)."""
        addr = self.pasid_entry_addr(sid, pasid)
        if addr is None:
            return
        self.mem.write_u64(addr, 0)
        for i in range(1, PASID_ENTRY_WORDS):
            self.mem.write_u64(addr + 8 * i, 0)

    def write_raw_pasid_entry(self, sid: int, pasid: int, words: list[int]) -> None:
        """Write arbitrary words (for hostile-input tests and guest-supplied garbage)."""
        addr = self.pasid_entry_addr(sid, pasid, create=True)
        if addr is None:
            raise ValueError(f"device {sid:#06x} has no context entry")
        for i, w in enumerate(words):
            self.mem.write_u64(addr + 8 * i, w & 0xFFFF_FFFF_FFFF_FFFF)

    # --- hardware fetches ---------------------------------------------------------------------
    def fetch_context(self, sid: int) -> tuple[ContextEntry | None, FaultReason, int]:
        """Root + context entry fetch: (entry, fault, references made)."""
        bus, devfn = sid >> 8, sid & 0xFF
        re = self.mem.read_u64(self.rtaddr + bus * ROOT_ENTRY_BYTES + (8 if devfn >= 128 else 0))
        if not re & RE_LP:
            return None, FaultReason.ROOT_ENTRY_P, 1
        ce_addr = (re & RE_CTP_MASK) + (devfn & 0x7F) * SM_CONTEXT_ENTRY_BYTES
        w0 = self.mem.read_u64(ce_addr)
        if not w0 & CE_P:
            return None, FaultReason.CONTEXT_ENTRY_P, 2
        if w0 & CE_RSVD_W0:
            return None, FaultReason.CONTEXT_ENTRY_RSVD, 2
        if not w0 & CE_PASIDE:
            return None, FaultReason.CONTEXT_PASIDE, 2
        return ContextEntry.decode(w0, self.mem.read_u64(ce_addr + 8)), FaultReason.NONE, 2

    def fetch_pasid_entry(self, ce: ContextEntry, pasid: int
                          ) -> tuple[PasidEntry | None, FaultReason, int, bool]:
        """PASID directory + table entry fetch: (entry, fault, references, fpd)."""
        if (pasid >> PASID_PDE_SHIFT) >= ce.dir_entries:
            return None, FaultReason.CONTEXT_PASID_MAX, 0, ce.fpd
        pde = self.mem.read_u64(ce.pasid_dir + (pasid >> PASID_PDE_SHIFT) * 8)
        if not pde & PDE_P:
            return None, FaultReason.PASID_DIR_ENTRY_P, 1, ce.fpd
        fpd = ce.fpd or bool(pde & PDE_FPD)
        if pde & PDE_RSVD:
            return None, FaultReason.PASID_DIR_ENTRY_RSVD, 1, fpd
        pte_addr = (pde & PDE_PTR_MASK) + (pasid & PASID_PTE_MASK) * PASID_ENTRY_BYTES
        if (pte_addr >> PAGE_SHIFT) >= self.mem.frames:
            return None, FaultReason.PASID_TABLE_ACCESS_ERR, 1, fpd
        words = [self.mem.read_u64(pte_addr + 8 * i) for i in range(PASID_ENTRY_WORDS)]
        decoded = decode_pasid_entry(words)
        if isinstance(decoded, FaultReason):
            return None, decoded, 2, fpd or bool(words[0] & PE_FPD)
        return decoded, FaultReason.NONE, 2, fpd or decoded.fpd

    def resolve(self, sid: int, pasid: int) -> ContextResult:
        """Everything from the root table to the PASID entry, uncached."""
        ce, fault, refs = self.fetch_context(sid)
        if ce is None:
            return ContextResult(None, fault, refs)
        entry, fault, more, fpd = self.fetch_pasid_entry(ce, pasid)
        return ContextResult(entry, fault, refs + more, fpd, ce.dte)


def sl_levels_for_width(width: int) -> int:
    return SL_LEVELS_BY_WIDTH[width]


def sl_width(levels: int) -> int:
    return SL_WIDTH_BY_LEVELS[levels]


__all__ = [
    "ContextEntry",
    "ContextResult",
    "PasidEntry",
    "PasidError",
    "ScalableModeTables",
    "decode_pasid_entry",
]
