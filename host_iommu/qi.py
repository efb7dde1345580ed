"""The invalidation queue: 256-bit descriptors, their decoding, and queued processing in time.

Follows VT-d spec 6.5.2 "Queued Invalidation" (descriptor formats 6.5.2.1-6.5.2.8, errors
6.5.2.10) and 10.4.22-10.4.24 (IQH, IQT, IQA registers); QEMU hw/i386/intel_iommu.c
(vtd_process_inv_desc, vtd_fetch_inv_desc) with the VTD_INV_DESC_* masks of
intel_iommu_internal.h; Linux drivers/iommu/intel/dmar.c (qi_submit_sync, qi_check_fault) with
the QI_* macros of drivers/iommu/intel/iommu.h.

Unlike QEMU, which completes every descriptor inside the tail-register write, each descriptor
here takes effect at a modelled time: software writes descriptors and moves the tail; hardware
processes them serially, and a wait descriptor completes only after everything before it took
effect. A malformed descriptor is a modelled queue error (FSTS.IQE), never an exception.
The queue's state is in arrays and a tail write runs in a compiled kernel
(host_iommu/kernels/qiq.py, which decodes with the same masks); ``decode_words`` stays the
readable decoder the results are built with. About 850 lines: the eight descriptor layouts,
their encoders, decoder and queue belong together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from host_iommu.costs import CostModel
from host_iommu.defs import MAX_PASID, NO_PASID, PAGE_SHIFT, PAGE_SIZE
from host_iommu.kernels import qiq as qk

# --- Descriptor (spec 6.5.2: 256-bit with IQA.DW=1, scalable mode; Linux struct qi_desc) -----
DESC_DTYPE = np.dtype([("qw0", "<u8"), ("qw1", "<u8"), ("qw2", "<u8"), ("qw3", "<u8")])
U64 = (1 << 64) - 1

# --- Descriptor types (qw0 bits 3:0 low, bits 11:9 high; QEMU VTD_INV_DESC_TYPE) -------------
QI_CC_TYPE = 0x1        # context-cache invalidate (6.5.2.1)
QI_IOTLB_TYPE = 0x2     # IOTLB invalidate (6.5.2.3)
QI_DIOTLB_TYPE = 0x3    # device-TLB invalidate (6.5.2.5)
QI_IEC_TYPE = 0x4       # interrupt entry cache invalidate (6.5.2.7)
QI_IWD_TYPE = 0x5       # invalidation wait (6.5.2.8)
QI_EIOTLB_TYPE = 0x6    # PASID-based IOTLB invalidate (6.5.2.4)
QI_PC_TYPE = 0x7        # PASID-cache invalidate (6.5.2.2)
QI_DEIOTLB_TYPE = 0x8   # PASID-based device-TLB invalidate (6.5.2.6)
QI_TYPE_LO_MASK = 0xF           # qw0 bits 3:0: type[3:0]
QI_TYPE_HI_SHIFT = 9            # qw0 bits 11:9: type[6:4]
QI_TYPE_HI_MASK = 0x7 << QI_TYPE_HI_SHIFT

# Counter keys (InvalidationQueue.counts) by type.
TYPE_NAMES = {
    QI_CC_TYPE: "context", QI_IOTLB_TYPE: "iotlb", QI_DIOTLB_TYPE: "devtlb",
    QI_IEC_TYPE: "iec", QI_IWD_TYPE: "wait", QI_EIOTLB_TYPE: "piotlb",
    QI_PC_TYPE: "pasid_cache", QI_DEIOTLB_TYPE: "pasid_devtlb",
}
DEVTLB_TYPES = (QI_DIOTLB_TYPE, QI_DEIOTLB_TYPE)

# --- Common qw0 fields --------------------------------------------------------------------
QI_GRAN_SHIFT = 4               # qw0 bits 5:4: granularity (CC, IOTLB, PASID-IOTLB, PC)
QI_GRAN_MASK = 0x3
QI_DID_SHIFT = 16               # qw0 bits 31:16: domain id (CC, IOTLB, PASID-IOTLB, PC)
QI_DID_MASK = 0xFFFF
QI_PASID_SHIFT = 32             # qw0 bits 51:32: PASID (PASID-IOTLB, PC, PASID-devTLB)
QI_PASID_MASK = MAX_PASID

# --- Context-cache invalidate (6.5.2.1; Linux QI_CC_*) -------------------------------------
QI_CC_GRAN_GLOBAL = 1           # G=01b global
QI_CC_GRAN_DOMAIN = 2           # G=10b domain-selective
QI_CC_GRAN_DEVICE = 3           # G=11b device-selective
QI_CC_SID_SHIFT = 32            # qw0 bits 47:32: source-id
QI_CC_FM_SHIFT = 48             # qw0 bits 49:48: function mask
QI_CC_FM_MASK = 0x3

# --- IOTLB invalidate (6.5.2.3; Linux QI_IOTLB_*) -------------------------------------------
QI_IOTLB_GRAN_GLOBAL = 1
QI_IOTLB_GRAN_DOMAIN = 2
QI_IOTLB_GRAN_PAGE = 3
QI_IOTLB_DW = 1 << 6            # qw0 bit 6: drain writes
QI_IOTLB_DR = 1 << 7            # qw0 bit 7: drain reads
QI_AM_MASK = 0x3F               # qw1 bits 5:0: address mask (2^AM pages)
QI_IH = 1 << 6                  # qw1 bit 6: invalidation hint (leaf only)
QI_ADDR_MASK = ~(PAGE_SIZE - 1) & U64  # qw1 bits 63:12: address

# --- Device-TLB invalidate (6.5.2.5; Linux QI_DEV_IOTLB_*) ----------------------------------
QI_DEV_IOTLB_QDEP_SHIFT = 16    # qw0 bits 20:16: max invalidations pending (MIP)
QI_DEV_IOTLB_SID_SHIFT = 32     # qw0 bits 47:32: source-id
QI_DEV_IOTLB_SIZE = 1           # qw1 bit 0: S (size field is in the address)
QI_QDEP_MASK = 0x1F
QI_PFSID_LO_SHIFT = 12          # qw0 bits 15:12: PFSID[3:0] (both device-TLB types)
QI_PFSID_HI_SHIFT = 52          # qw0 bits 63:52: PFSID[15:4]

# --- PASID-based device-TLB invalidate (6.5.2.6; Linux QI_DEV_EIOTLB_*) ---------------------
QI_DEV_EIOTLB_QDEP_SHIFT = 4    # qw0 bits 8:4: MIP
QI_DEV_EIOTLB_SID_SHIFT = 16    # qw0 bits 31:16: source-id
QI_DEV_EIOTLB_GLOB = 1          # qw1 bit 0: G, all PASIDs
QI_DEV_EIOTLB_SIZE = 1 << 11    # qw1 bit 11: S

# --- Interrupt entry cache invalidate (6.5.2.7; Linux QI_IEC_*) -----------------------------
QI_IEC_GRAN_GLOBAL = 0
QI_IEC_GRAN_INDEX = 1
QI_IEC_SELECTIVE = 1 << 4       # qw0 bit 4: G (index-selective)
QI_IEC_IM_SHIFT = 27            # qw0 bits 31:27: index mask
QI_IEC_IM_MASK = 0x1F
QI_IEC_IIDX_SHIFT = 32          # qw0 bits 47:32: interrupt index
QI_IEC_IIDX_MASK = 0xFFFF

# --- Invalidation wait (6.5.2.8; Linux QI_IWD_*) --------------------------------------------
QI_IWD_IF = 1 << 4              # qw0 bit 4: interrupt flag (sets ICS.IWC)
QI_IWD_STATUS_WRITE = 1 << 5    # qw0 bit 5: SW, write status data to status address
QI_IWD_FENCE = 1 << 6           # qw0 bit 6: FN, later descriptors wait for this one
QI_IWD_STATUS_DATA_SHIFT = 32   # qw0 bits 63:32: status data
QI_IWD_STATUS_ADDR_MASK = ~0x3 & U64  # qw1 bits 63:2: status address (dword aligned)

# --- PASID-based IOTLB (6.5.2.4; Linux QI_EIOTLB_*, QI_GRAN_*) ------------------------------
QI_GRAN_NONG_PASID = 2          # G=10b: all entries of the PASID (non-global)
QI_GRAN_PSI_PASID = 3           # G=11b: page-selective within the PASID

# --- PASID cache (6.5.2.2; Linux QI_PC_*) ---------------------------------------------------
QI_PC_ALL_PASIDS = 0            # G=00b: domain-selective
QI_PC_PASID_SEL = 1             # G=01b: PASID-selective within the domain
QI_PC_GLOBAL = 3                # G=11b: global

# --- Reserved bits per type: (qw0, qw1); qw2 and qw3 are reserved for every type -------------
# QEMU VTD_INV_DESC_*_RSVD*. Device-TLB types: QEMU treats PFSID bits as reserved (it has no
# VFs); the spec defines PFSID there, so those bits are allowed here.
QI_RSVD = {
    QI_CC_TYPE: (0xFFFC_0000_0000_F1C0, U64),
    QI_IOTLB_TYPE: (0xFFFF_FFFF_0000_F100, 0xF80),
    QI_DIOTLB_TYPE: (0x000F_0000_FFE0_01F0, 0xFFE),
    QI_IEC_TYPE: (0xFFFF_0000_07FF_F1E0, U64),
    QI_IWD_TYPE: (0xFFFF_F180, 0x3),
    QI_EIOTLB_TYPE: (0xFFF0_0000_0000_F1C0, 0xF80),
    QI_PC_TYPE: (0xFFF0_0000_0000_F1C0, U64),
    QI_DEIOTLB_TYPE: (0, 0x7FE),
}
# Largest address mask value (CAP.MAMV, 10.4.2) of a page-selective IOTLB invalidation (0x2).
# QEMU advertises VTD_MAMV = 18 and refuses a larger AM in vtd_process_iotlb_desc; the
# PASID-based page-selective invalidation (0x6) has no such limit (vtd_process_piotlb_desc).
QI_MAMV_DEFAULT = 18
# IQA.QS (10.4.24): the queue is 2^QS 4-KiB pages; 128 256-bit descriptors per page.
QI_DESCS_PER_PAGE = 128
QI_MAX_QS = 7

# Device-TLB invalidation without PASID applies to the device's requests without PASID, which
# this emulator tags with NO_PASID. ALL_PASIDS (None) is the G bit of the PASID-based type.
ALL_PASIDS = None


class QiError(ValueError):
    """The emulator's caller misused the queue (bad field width, wrong dtype, bad size)."""


@dataclass(frozen=True, slots=True)
class DescError:
    """Why a descriptor (or a submission) was rejected: a modelled error, not an exception.

    ``code`` is one of: unknown_type, reserved, granularity, am_too_large, misaligned,
    size_encoding, wait_no_action (decode); iqe_pending, ite_pending, queue_full (queue);
    ite (device-TLB invalidation time-out).
    """

    dtype: int          # descriptor type, -1 for a queue-level refusal
    type_name: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class InvCommand:
    """One decoded, valid descriptor. Fields a type does not use stay at their defaults."""

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
        return TYPE_NAMES[self.type]


# --- Encoders (software side, as Linux builds struct qi_desc) ---------------------------------
def _check(name: str, value: int, limit: int) -> int:
    value = int(value)
    if not 0 <= value <= limit:
        raise QiError(f"{name}={value:#x} outside 0..{limit:#x}")
    return value


# A descriptor's four 64-bit words as plain ints (qw0, qw1, qw2, qw3): what the *_words
# encoders return and decode_words reads, so a caller that builds many descriptors needs no
# numpy record per descriptor (as_desc / as_descs make records and arrays of them).
Words = tuple[int, int, int, int]


def as_desc(words: Words) -> np.void:
    """One DESC_DTYPE record holding ``words`` (each taken modulo 2^64)."""
    qw0, qw1, qw2, qw3 = words
    return np.void((qw0 & U64, qw1 & U64, qw2 & U64, qw3 & U64), dtype=DESC_DTYPE)


def as_descs(words: list[Words]) -> np.ndarray:
    """A DESC_DTYPE array of descriptors given as words (each in 0..2^64-1), in queue order."""
    return np.array(words, dtype=DESC_DTYPE)


def _record(qw0: int, qw1: int = 0, qw2: int = 0, qw3: int = 0) -> np.void:
    return as_desc((qw0, qw1, qw2, qw3))


def _page_addr(addr: int) -> int:
    addr = _check("addr", addr, U64)
    if addr & (PAGE_SIZE - 1):
        raise QiError(f"addr={addr:#x} is not 4-KiB aligned")
    return addr


def _pfsid_bits(pfsid: int) -> int:
    pfsid = _check("pfsid", pfsid, 0xFFFF)
    return ((pfsid & 0xF) << QI_PFSID_LO_SHIFT) | ((pfsid >> 4) << QI_PFSID_HI_SHIFT)


def _devtlb_addr(addr: int, size_bytes: int) -> int:
    """ATS range encoding (PCIe ATS 2.3.2; Linux qi_flush_dev_iotlb): S and address bits."""
    size_bytes = int(size_bytes)
    if size_bytes < PAGE_SIZE or size_bytes > 1 << 64 or size_bytes & (size_bytes - 1):
        raise QiError(f"size_bytes={size_bytes} is not a power of two in 4 KiB..2^64")
    addr = _page_addr(addr)
    if addr & (size_bytes - 1):
        raise QiError(f"addr={addr:#x} is not aligned to size_bytes={size_bytes:#x}")
    if size_bytes == PAGE_SIZE:
        return addr
    # Bits 12 .. log2(size)-2 set, bit log2(size)-1 clear: the lowest 0 bit gives the size.
    return (addr | ((size_bytes >> 1) - 1)) & QI_ADDR_MASK


def cc_words(gran: int, did: int = 0, sid: int = 0, fm: int = 0) -> Words:
    """Context-cache invalidate (type 0x1), as words."""
    return (QI_CC_TYPE | _check("gran", gran, QI_GRAN_MASK) << QI_GRAN_SHIFT
            | _check("did", did, QI_DID_MASK) << QI_DID_SHIFT
            | _check("sid", sid, 0xFFFF) << QI_CC_SID_SHIFT
            | _check("fm", fm, QI_CC_FM_MASK) << QI_CC_FM_SHIFT, 0, 0, 0)


def cc_desc(gran: int, did: int = 0, sid: int = 0, fm: int = 0) -> np.void:
    """Context-cache invalidate (type 0x1)."""
    return as_desc(cc_words(gran, did, sid, fm))


def iotlb_words(gran: int, did: int = 0, addr: int = 0, am: int = 0, ih: bool = False,
                dr: bool = False, dw: bool = False) -> Words:
    """IOTLB invalidate (type 0x2), as words; see iotlb_desc."""
    qw0 = (QI_IOTLB_TYPE | _check("gran", gran, QI_GRAN_MASK) << QI_GRAN_SHIFT
           | _check("did", did, QI_DID_MASK) << QI_DID_SHIFT
           | (QI_IOTLB_DR if dr else 0) | (QI_IOTLB_DW if dw else 0))
    qw1 = _page_addr(addr) | (QI_IH if ih else 0) | _check("am", am, QI_AM_MASK)
    return (qw0, qw1, 0, 0)


def iotlb_desc(gran: int, did: int = 0, addr: int = 0, am: int = 0, ih: bool = False,
               dr: bool = False, dw: bool = False) -> np.void:
    """IOTLB invalidate (type 0x2); addr/am/ih matter for page-selective (G=3) only."""
    return as_desc(iotlb_words(gran, did, addr, am, ih, dr, dw))


def dev_iotlb_words(sid: int, pfsid: int, qdep: int, addr: int, size_bytes: int) -> Words:
    """Device-TLB invalidate (type 0x3), as words; see dev_iotlb_desc."""
    qw0 = (QI_DIOTLB_TYPE | _check("sid", sid, 0xFFFF) << QI_DEV_IOTLB_SID_SHIFT
           | _check("qdep", qdep, QI_QDEP_MASK) << QI_DEV_IOTLB_QDEP_SHIFT | _pfsid_bits(pfsid))
    qw1 = _devtlb_addr(addr, size_bytes)
    if int(size_bytes) > PAGE_SIZE:
        qw1 |= QI_DEV_IOTLB_SIZE
    return (qw0, qw1, 0, 0)


def dev_iotlb_desc(sid: int, pfsid: int, qdep: int, addr: int, size_bytes: int) -> np.void:
    """Device-TLB invalidate (type 0x3) of [addr, addr+size_bytes) for requests without PASID."""
    return as_desc(dev_iotlb_words(sid, pfsid, qdep, addr, size_bytes))


def iec_desc(gran: int = QI_IEC_GRAN_GLOBAL, iidx: int = 0, im: int = 0) -> np.void:
    """Interrupt entry cache invalidate (type 0x4): global, or 2^im entries from iidx."""
    return _record(QI_IEC_TYPE | _check("gran", gran, 1) << 4
                   | _check("im", im, QI_IEC_IM_MASK) << QI_IEC_IM_SHIFT
                   | _check("iidx", iidx, QI_IEC_IIDX_MASK) << QI_IEC_IIDX_SHIFT)


def wait_words(status_data: int = 1, status_addr: int = 0, interrupt: bool = False,
               status_write: bool = True, fence: bool = False) -> Words:
    """Invalidation wait (type 0x5), as words; see wait_desc."""
    status_addr = _check("status_addr", status_addr, U64)
    if status_addr & 0x3:
        raise QiError(f"status_addr={status_addr:#x} is not dword aligned")
    qw0 = (QI_IWD_TYPE | (QI_IWD_IF if interrupt else 0)
           | (QI_IWD_STATUS_WRITE if status_write else 0) | (QI_IWD_FENCE if fence else 0)
           | _check("status_data", status_data, 0xFFFF_FFFF) << QI_IWD_STATUS_DATA_SHIFT)
    return (qw0, status_addr, 0, 0)


# The wait every qi_submit_sync appends (status write of 1, no interrupt): wait_words().
WAIT_WORDS = wait_words()


def wait_desc(status_data: int = 1, status_addr: int = 0, interrupt: bool = False,
              status_write: bool = True, fence: bool = False) -> np.void:
    """Invalidation wait (type 0x5): a status write and/or a completion interrupt."""
    return as_desc(wait_words(status_data, status_addr, interrupt, status_write, fence))


def piotlb_words(did: int, pasid: int, gran: int, addr: int = 0, am: int = 0,
                 ih: bool = False) -> Words:
    """PASID-based IOTLB invalidate (type 0x6), as words; see piotlb_desc."""
    qw0 = (QI_EIOTLB_TYPE | _check("gran", gran, QI_GRAN_MASK) << QI_GRAN_SHIFT
           | _check("did", did, QI_DID_MASK) << QI_DID_SHIFT
           | _check("pasid", pasid, QI_PASID_MASK) << QI_PASID_SHIFT)
    qw1 = _page_addr(addr) | (QI_IH if ih else 0) | _check("am", am, QI_AM_MASK)
    return (qw0, qw1, 0, 0)


def piotlb_desc(did: int, pasid: int, gran: int, addr: int = 0, am: int = 0,
                ih: bool = False) -> np.void:
    """PASID-based IOTLB invalidate (type 0x6): all of a PASID (G=2) or pages in it (G=3)."""
    return as_desc(piotlb_words(did, pasid, gran, addr, am, ih))


def pc_words(gran: int, did: int = 0, pasid: int = 0) -> Words:
    """PASID-cache invalidate (type 0x7), as words; see pc_desc."""
    return (QI_PC_TYPE | _check("gran", gran, QI_GRAN_MASK) << QI_GRAN_SHIFT
            | _check("did", did, QI_DID_MASK) << QI_DID_SHIFT
            | _check("pasid", pasid, QI_PASID_MASK) << QI_PASID_SHIFT, 0, 0, 0)


def pc_desc(gran: int, did: int = 0, pasid: int = 0) -> np.void:
    """PASID-cache invalidate (type 0x7): domain (G=0), PASID (G=1) or global (G=3)."""
    return as_desc(pc_words(gran, did, pasid))


def pasid_dev_iotlb_words(sid: int, pfsid: int, pasid: int, addr: int, size_bytes: int,
                          glob: bool = False, qdep: int = 0) -> Words:
    """PASID-based device-TLB invalidate (type 0x8), as words; see pasid_dev_iotlb_desc."""
    qw0 = (QI_DEIOTLB_TYPE | _check("sid", sid, 0xFFFF) << QI_DEV_EIOTLB_SID_SHIFT
           | _check("qdep", qdep, QI_QDEP_MASK) << QI_DEV_EIOTLB_QDEP_SHIFT
           | _check("pasid", pasid, QI_PASID_MASK) << QI_PASID_SHIFT | _pfsid_bits(pfsid))
    qw1 = _devtlb_addr(addr, size_bytes) | (QI_DEV_EIOTLB_GLOB if glob else 0)
    if int(size_bytes) > PAGE_SIZE:
        qw1 |= QI_DEV_EIOTLB_SIZE
    return (qw0, qw1, 0, 0)


def pasid_dev_iotlb_desc(sid: int, pfsid: int, pasid: int, addr: int, size_bytes: int,
                         glob: bool = False, qdep: int = 0) -> np.void:
    """PASID-based device-TLB invalidate (type 0x8); glob=True covers all PASIDs (G bit)."""
    return as_desc(pasid_dev_iotlb_words(sid, pfsid, pasid, addr, size_bytes, glob, qdep))


def descs(*records: np.void) -> np.ndarray:
    """An array of DESC_DTYPE from encoded records, in queue order."""
    return np.array(list(records), dtype=DESC_DTYPE)


# --- Decoding (hardware side, as QEMU's vtd_process_*_desc) ------------------------------------
def desc_type(qw0: int) -> int:
    """Descriptor type: qw0 bits 3:0, with bits 11:9 as type bits 6:4."""
    return ((qw0 & QI_TYPE_HI_MASK) >> (QI_TYPE_HI_SHIFT - 4)) | (qw0 & QI_TYPE_LO_MASK)


def _err(t: int, code: str, reason: str) -> DescError:
    return DescError(t, TYPE_NAMES.get(t, f"type {t:#x}"), code, reason)


def _decode_devtlb_range(t: int, qw1: int, s_bit: int) -> tuple[int, int] | DescError:
    """(base addr, size_bytes) from the ATS encoding (QEMU do_invalidate_device_tlb)."""
    addr = qw1 & QI_ADDR_MASK
    if not qw1 & s_bit:
        return addr, PAGE_SIZE
    pfn = addr >> PAGE_SHIFT
    ones = 0
    while ones < 64 - PAGE_SHIFT and (pfn >> ones) & 1:
        ones += 1
    if ones == 64 - PAGE_SHIFT:
        return _err(t, "size_encoding", "S=1 but address bits 63:12 hold no 0 bit")
    size = (PAGE_SIZE * 2) << ones
    return addr & ~(size - 1) & U64, size


def _decode_page(t: int, qw1: int, mamv: int | None) -> tuple[int, int, bool] | DescError:
    addr, am, ih = qw1 & QI_ADDR_MASK, qw1 & QI_AM_MASK, bool(qw1 & QI_IH)
    if mamv is not None and am > mamv:
        return _err(t, "am_too_large", f"AM={am} exceeds MAMV={mamv}")
    if addr & ((PAGE_SIZE << am) - 1):
        return _err(t, "misaligned", f"addr {addr:#x} not aligned to 2^{am} pages (AM)")
    return addr, am, ih


def decode(desc: np.void, mamv: int = QI_MAMV_DEFAULT) -> InvCommand | DescError:
    """Decode one descriptor; a malformed one gives a DescError naming its type and the reason."""
    if isinstance(desc, np.void) and desc.dtype == DESC_DTYPE:
        qw0, qw1, qw2, qw3 = desc.item()
    else:
        qw0, qw1, qw2, qw3 = (int(desc[f]) for f in DESC_DTYPE.names)
    return decode_words(qw0, qw1, qw2, qw3, mamv)


# Decoded descriptors by (qw0, qw1, qw2, qw3, mamv). Decoding is a pure function of these, and
# InvCommand / DescError are frozen, so a cached result is exactly what decoding again would
# give. The same few descriptors recur (every strict unmap's wait, an IOVA the rcache hands
# out again), and each is decoded by the guest's vIOMMU and by the host. Bounded: cleared
# when full.
_DECODED: dict[tuple[int, int, int, int, int], InvCommand | DescError] = {}
_DECODED_MAX = 1 << 14   # about 8 MB at most


def decode_words(qw0: int, qw1: int, qw2: int = 0, qw3: int = 0,
                 mamv: int = QI_MAMV_DEFAULT) -> InvCommand | DescError:
    """``decode`` of a descriptor given as its four words (ints in 0..2^64-1)."""
    key = (qw0, qw1, qw2, qw3, mamv)
    cmd = _DECODED.get(key)
    if cmd is None:
        cmd = _decode_words(int(qw0), int(qw1), int(qw2), int(qw3), mamv)
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED[key] = cmd
    return cmd


def _decode_words(qw0: int, qw1: int, qw2: int, qw3: int, mamv: int
                  ) -> InvCommand | DescError:
    """VT-d spec 6.5.2.1-6.5.2.8 field by field, as QEMU's vtd_process_*_desc check them."""
    t = desc_type(qw0)
    if t not in QI_RSVD:
        return _err(t, "unknown_type", f"descriptor type {t:#x} is not an invalidation type")
    rsvd0, rsvd1 = QI_RSVD[t]
    for word, value, mask in (("qw0", qw0, rsvd0), ("qw1", qw1, rsvd1), ("qw2", qw2, U64),
                              ("qw3", qw3, U64)):
        if value & mask:
            return _err(t, "reserved", f"reserved bits {value & mask:#x} set in {word}")
    gran = (qw0 >> QI_GRAN_SHIFT) & QI_GRAN_MASK
    did = (qw0 >> QI_DID_SHIFT) & QI_DID_MASK
    pasid = (qw0 >> QI_PASID_SHIFT) & QI_PASID_MASK
    pfsid = ((qw0 >> QI_PFSID_LO_SHIFT) & 0xF) | ((qw0 >> QI_PFSID_HI_SHIFT) << 4)

    if t == QI_CC_TYPE:
        if gran not in (QI_CC_GRAN_GLOBAL, QI_CC_GRAN_DOMAIN, QI_CC_GRAN_DEVICE):
            return _err(t, "granularity", f"context-cache G={gran} is reserved")
        return InvCommand(t, gran=gran, did=did, sid=(qw0 >> QI_CC_SID_SHIFT) & 0xFFFF,
                          fm=(qw0 >> QI_CC_FM_SHIFT) & QI_CC_FM_MASK)
    if t == QI_IOTLB_TYPE:
        if gran not in (QI_IOTLB_GRAN_GLOBAL, QI_IOTLB_GRAN_DOMAIN, QI_IOTLB_GRAN_PAGE):
            return _err(t, "granularity", f"IOTLB G={gran} is reserved")
        page = (0, 0, False)
        if gran == QI_IOTLB_GRAN_PAGE:
            page = _decode_page(t, qw1, mamv)
            if isinstance(page, DescError):
                return page
        return InvCommand(t, gran=gran, did=did, addr=page[0], am=page[1], ih=page[2],
                          dr=bool(qw0 & QI_IOTLB_DR), dw=bool(qw0 & QI_IOTLB_DW))
    if t == QI_EIOTLB_TYPE:
        if gran not in (QI_GRAN_NONG_PASID, QI_GRAN_PSI_PASID):
            return _err(t, "granularity", f"PASID-based IOTLB G={gran} is reserved")
        page = (0, 0, False)
        if gran == QI_GRAN_PSI_PASID:  # no MAMV limit (QEMU vtd_process_piotlb_desc)
            page = _decode_page(t, qw1, None)
            if isinstance(page, DescError):
                return page
        return InvCommand(t, gran=gran, did=did, pasid=pasid, addr=page[0], am=page[1],
                          ih=page[2])
    if t == QI_PC_TYPE:
        if gran not in (QI_PC_ALL_PASIDS, QI_PC_PASID_SEL, QI_PC_GLOBAL):
            return _err(t, "granularity", f"PASID-cache G={gran} is reserved")
        return InvCommand(t, gran=gran, did=did, pasid=pasid)
    if t == QI_DIOTLB_TYPE:
        rng = _decode_devtlb_range(t, qw1, QI_DEV_IOTLB_SIZE)
        if isinstance(rng, DescError):
            return rng
        return InvCommand(t, sid=(qw0 >> QI_DEV_IOTLB_SID_SHIFT) & 0xFFFF, pasid=NO_PASID,
                          addr=rng[0], size_bytes=rng[1], pfsid=pfsid,
                          qdep=(qw0 >> QI_DEV_IOTLB_QDEP_SHIFT) & QI_QDEP_MASK)
    if t == QI_DEIOTLB_TYPE:
        rng = _decode_devtlb_range(t, qw1, QI_DEV_EIOTLB_SIZE)
        if isinstance(rng, DescError):
            return rng
        return InvCommand(t, sid=(qw0 >> QI_DEV_EIOTLB_SID_SHIFT) & 0xFFFF, pasid=pasid,
                          addr=rng[0], size_bytes=rng[1], glob=bool(qw1 & QI_DEV_EIOTLB_GLOB),
                          pfsid=pfsid, qdep=(qw0 >> QI_DEV_EIOTLB_QDEP_SHIFT) & QI_QDEP_MASK)
    if t == QI_IEC_TYPE:
        return InvCommand(t, gran=int(bool(qw0 & QI_IEC_SELECTIVE)),
                          iidx=(qw0 >> QI_IEC_IIDX_SHIFT) & QI_IEC_IIDX_MASK,
                          im=(qw0 >> QI_IEC_IM_SHIFT) & QI_IEC_IM_MASK)
    # QI_IWD_TYPE. QEMU rejects a wait that neither writes status nor interrupts.
    sw, intr = bool(qw0 & QI_IWD_STATUS_WRITE), bool(qw0 & QI_IWD_IF)
    if not (sw or intr):
        return _err(t, "wait_no_action", "wait descriptor with neither SW nor IF set")
    return InvCommand(t, status_data=qw0 >> QI_IWD_STATUS_DATA_SHIFT,
                      status_addr=qw1 & QI_IWD_STATUS_ADDR_MASK, interrupt=intr,
                      status_write=sw, fence=bool(qw0 & QI_IWD_FENCE))


# --- Applying a command to the caches ---------------------------------------------------------
class InvalidationTarget(Protocol):
    """What applying invalidation commands needs: the caches (IOTLB, PASID cache, dev-TLB...).

    devtlb's pasid is NO_PASID for a device-TLB invalidation without PASID (type 0x3), the PASID
    for a PASID-based one (0x8), and ALL_PASIDS (None) when the 0x8 descriptor's G bit is set.
    """

    def iotlb_global(self) -> None: ...
    def iotlb_domain(self, did: int) -> None: ...
    def iotlb_page(self, did: int, addr: int, am: int, ih: bool) -> None: ...
    def piotlb_pasid(self, did: int, pasid: int) -> None: ...
    def piotlb_page(self, did: int, pasid: int, addr: int, am: int, ih: bool) -> None: ...
    def pasid_cache(self, gran: int, did: int, pasid: int) -> None: ...
    def context_cache(self, gran: int, did: int, sid: int, fm: int) -> None: ...
    def devtlb(self, sid: int, pasid: int | None, addr: int, size_bytes: int) -> None: ...
    def iec(self, gran: int, iidx: int, im: int) -> None: ...


def apply(cmd: InvCommand, target: InvalidationTarget) -> None:
    """Dispatch one decoded command to the cache it invalidates (wait commands do nothing)."""
    t = cmd.type
    if t == QI_IOTLB_TYPE:
        if cmd.gran == QI_IOTLB_GRAN_GLOBAL:
            target.iotlb_global()
        elif cmd.gran == QI_IOTLB_GRAN_DOMAIN:
            target.iotlb_domain(cmd.did)
        else:
            target.iotlb_page(cmd.did, cmd.addr, cmd.am, cmd.ih)
    elif t == QI_EIOTLB_TYPE:
        if cmd.gran == QI_GRAN_NONG_PASID:
            target.piotlb_pasid(cmd.did, cmd.pasid)
        else:
            target.piotlb_page(cmd.did, cmd.pasid, cmd.addr, cmd.am, cmd.ih)
    elif t == QI_PC_TYPE:
        target.pasid_cache(cmd.gran, cmd.did, cmd.pasid)
    elif t == QI_CC_TYPE:
        target.context_cache(cmd.gran, cmd.did, cmd.sid, cmd.fm)
    elif t == QI_DIOTLB_TYPE:
        target.devtlb(cmd.sid, NO_PASID, cmd.addr, cmd.size_bytes)
    elif t == QI_DEIOTLB_TYPE:
        target.devtlb(cmd.sid, ALL_PASIDS if cmd.glob else cmd.pasid, cmd.addr, cmd.size_bytes)
    elif t == QI_IEC_TYPE:
        target.iec(cmd.gran, cmd.iidx, cmd.im)


# --- The queue -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What one tail write (or an IQE recovery) caused, in processing order.

    ``commands`` are (effect time, command) of the invalidations, for the caller to apply in
    time order; ``waits`` are (completion time, wait command), ``wait_done_ns`` their times.
    ``error_index`` indexes the submitted batch (or the resumed remainder after clear_iqe).
    """

    commands: list[tuple[int, InvCommand]] = field(default_factory=list)
    waits: list[tuple[int, InvCommand]] = field(default_factory=list)
    wait_done_ns: list[int] = field(default_factory=list)
    processed: int = 0
    error: DescError | None = None
    error_index: int | None = None
    refused: bool = False


def _refusal(code: str, reason: str) -> SubmitResult:
    return SubmitResult(error=DescError(-1, "queue", code, reason), refused=True)


class InvalidationQueue:
    """The registers and processing of one IOMMU's invalidation queue.

    Registers: IQA (``entries`` = 128 * 2^QS descriptors), IQH (``head``), IQT (``tail``),
    FSTS.IQE with the faulting head (``fsts_iqe``, ``iqe_head``), FSTS.ITE (``fsts_ite``, when
    a device listed as unresponsive times out), ICS.IWC (``ics_iwc``, set by a wait with IF).

    States: idle/processing -> (malformed descriptor) IQE: head stays at the bad descriptor, later
    ones stay unprocessed and every submit is refused -> clear_iqe() resumes (bad descriptor
    replaced, as Linux qi_check_fault does) or drops the rest. Hardware processes serially:
    a descriptor starts when the previous one finished, a submit while busy queues behind it,
    and a descriptor holds its slot until it took effect.

    The state is in arrays (``ctl``: registers, parameters and counters; ``inflight``: the
    effect times still holding or able to hold a slot) and a tail write is processed by a
    compiled kernel (host_iommu/kernels/qiq.py); ``submit`` turns its outcome into a
    SubmitResult of decoded commands, ``submit_effects`` (HostIommu) appends the effects to
    an array queue instead.
    """

    def __init__(self, entries: int = 256, costs: CostModel | None = None, *,
                 mamv: int = QI_MAMV_DEFAULT,
                 unresponsive_sids: frozenset[int] = frozenset()) -> None:
        valid = [QI_DESCS_PER_PAGE << qs for qs in range(QI_MAX_QS + 1)]
        if entries not in valid:
            raise QiError(f"entries={entries!r}: IQA.QS allows {valid}")
        self.entries = entries
        self.qs = valid.index(entries)
        self.costs = costs if costs is not None else CostModel()
        self.mamv = mamv
        self.unresponsive_sids = frozenset(unresponsive_sids)
        self._unresponsive = np.array(sorted(self.unresponsive_sids), dtype=np.int64)
        ctl = np.zeros(qk.CTL_SIZE, dtype=np.int64)
        ctl[qk.Q_ENTRIES] = entries
        ctl[qk.Q_MAMV] = mamv
        ctl[qk.Q_DESC_NS] = self.costs.qi_desc_ns
        ctl[qk.Q_WAIT_NS] = self.costs.qi_wait_ns
        ctl[qk.Q_DEVTLB_NS] = self.costs.devtlb_inv_ns
        self.ctl = ctl
        # Effect times of the processed descriptors, ascending (hardware is serial), in
        # inflight[ctl[Q_LO]:ctl[Q_HI]]: one holds its slot at t while its effect time is > t.
        # Times no caller can ask about any more are dropped by forget_until, never by a
        # question, so an answer depends only on the time asked.
        self.inflight = np.zeros(2 * entries, dtype=np.int64)
        self._done = np.zeros(entries, dtype=np.int64)
        self._no_effects = np.zeros((1, qk.EFFECT_FIELDS), dtype=np.int64)
        self._pending: np.ndarray | None = None  # unprocessed descriptors under IQE

    # --- registers and counters, read from ctl ----------------------------------------------
    head = property(lambda self: int(self.ctl[qk.Q_HEAD]))
    tail = property(lambda self: int(self.ctl[qk.Q_TAIL]))
    fsts_iqe = property(lambda self: bool(self.ctl[qk.Q_IQE]))
    fsts_ite = property(lambda self: bool(self.ctl[qk.Q_ITE]))
    ics_iwc = property(lambda self: bool(self.ctl[qk.Q_IWC]))
    errors = property(lambda self: int(self.ctl[qk.Q_ERRORS]))
    refused = property(lambda self: int(self.ctl[qk.Q_REFUSED]))

    @property
    def iqe_head(self) -> int | None:
        return int(self.ctl[qk.Q_IQE_HEAD]) if self.ctl[qk.Q_IQE] else None

    @property
    def counts(self) -> dict[str, int]:
        """Processed descriptors by type name (TYPE_NAMES)."""
        c = self.ctl[qk.Q_COUNTS:].tolist()
        return {name: c[t] for t, name in TYPE_NAMES.items()}

    @property
    def _inflight_ns(self) -> list[int]:
        return self.inflight[self.ctl[qk.Q_LO]:self.ctl[qk.Q_HI]].tolist()

    @property
    def _busy_until_ns(self) -> int:
        return int(self.ctl[qk.Q_BUSY])

    # --- room -----------------------------------------------------------------------------
    def free_slots(self, t_ns: int) -> int:
        """Slots software may fill at t_ns (one stays empty: head == tail means empty)."""
        return int(qk._free_slots(self.ctl, self.inflight, int(t_ns)))

    def forget_until(self, t_ns: int) -> None:
        """The caller will ask about no time before ``t_ns`` again (HostServer: the start of
        the epoch it applies): drop the effect times <= t_ns, which hold no slot then."""
        qk._forget_until(self.ctl, self.inflight, int(t_ns))
        # The next lines are equivalent and left for reference:
        #     lo, hi = int(ctl[qk.Q_LO]), int(ctl[qk.Q_HI])
        #     ctl[qk.Q_LO] = lo + int(np.searchsorted(self.inflight[lo:hi], t_ns, "right"))

    def room_at(self, t_ns: int, n: int) -> int:
        """Earliest time >= t_ns at which ``n`` descriptors fit (software spins until then).

        Slots free in effect-time order, since hardware processes serially. Raises QiError
        when ``n`` can never fit (more than the queue holds beside what IQE left pending).
        """
        at = int(qk._room_at(self.ctl, self.inflight, int(t_ns), int(n)))
        if at < 0:
            raise QiError(f"{n} descriptors can never fit a queue of {self.entries} entries")
        return at

    def _make_room(self, n: int, effects: np.ndarray | None = None) -> np.ndarray | None:
        """Drop the forgotten effect times (moving the kept ones to the front) and grow
        ``inflight`` so that n more fit; grow ``effects`` likewise (returned, maybe anew)."""
        ctl = self.ctl
        lo, hi = int(ctl[qk.Q_LO]), int(ctl[qk.Q_HI])
        kept = self.inflight[lo:hi]
        size = max(self.inflight.size, 2 * (kept.size + n))
        if size != self.inflight.size or lo:
            grown = np.zeros(size, dtype=np.int64)
            grown[:kept.size] = kept
            self.inflight = grown
            ctl[qk.Q_LO], ctl[qk.Q_HI] = 0, kept.size
        if effects is not None:
            effects = grow_effects(effects, n)
        return effects

    # --- software writes --------------------------------------------------------------------
    def submit(self, descs: np.ndarray, t_ns: int) -> SubmitResult:
        """Write descriptors at the tail at t_ns and let hardware process them in order."""
        if not isinstance(descs, np.ndarray) or descs.dtype != DESC_DTYPE or descs.ndim != 1:
            raise QiError("submit takes a 1-D numpy array of DESC_DTYPE")
        return self._run(descs, int(t_ns), False)

    def submit_effects(self, descs: np.ndarray, t_ns: int, effects: np.ndarray
                       ) -> tuple[int, int, int, int, int, np.ndarray]:
        """The host driver's tail write (qi_submit_sync): spin until ``descs`` fit
        (room_at), write them and let hardware process them, appending each invalidation's
        effect to ``effects`` (kernels/qiq.py's pend layout) instead of building commands.

        ``descs`` is DESC_DTYPE[n] or uint64[n, 4]. Returns (status S_*, descriptors
        processed, the time written, the completion time of the last one processed (or the
        time written), decode error ERR_*, ``effects`` or its grown copy). A refusal or an
        error leaves the registers as ``submit`` would; ``error_result`` describes it.
        """
        if descs.dtype == DESC_DTYPE and descs.ndim == 1 and descs.flags.c_contiguous:
            flat = descs.view(np.uint64)
        else:
            flat = _as_words(descs).reshape(-1)
        n = flat.size >> 2
        if n > self._done.size:
            self._done = np.zeros(n, dtype=np.int64)
        while True:
            status, processed, t_at, t_done, err = qk._submit(
                self.ctl, self.inflight, self._unresponsive, flat, effects, self._done,
                int(t_ns), qk.M_DRIVER, True)
            if status != qk.S_NEED_ROOM:
                break
            effects = self._make_room(n, effects)
        if status == qk.S_NEVER_FITS:
            self.room_at(t_ns, n)     # raises QiError
        if status == qk.S_IQE:
            self._pending = flat[4 * processed:].copy().view(DESC_DTYPE)
        return status, processed, t_at, t_done, err, effects

    def error_result(self, descs: np.ndarray, status: int, processed: int, t_ns: int
                     ) -> DescError:
        """The DescError of a submit_effects at ``t_ns`` that did not end S_OK."""
        if status == qk.S_REFUSED_IQE:
            return _refusal("iqe_pending", f"FSTS.IQE set at head {self.iqe_head}").error
        if status == qk.S_REFUSED_ITE:
            return _refusal("ite_pending", "FSTS.ITE set (device-TLB invalidation "
                            "time-out)").error
        if status == qk.S_REFUSED_FULL:
            return _refusal("queue_full", f"{len(descs)} descriptors, "
                            f"{self.free_slots(t_ns)} free slots").error
        words = _as_words(descs)
        if status == qk.S_ITE:
            cmd = decode_words(*words[processed - 1].tolist(), self.mamv)
            return _err(cmd.type, "ite", f"device-TLB invalidation to sid {cmd.sid:#x} "
                        "timed out")
        return decode_words(*words[processed].tolist(), self.mamv)

    def clear_iqe(self, t_ns: int = 0, replacement: np.void | None = None) -> SubmitResult:
        """Software clears FSTS.IQE. With a replacement for the bad descriptor, hardware
        resumes from the head at t_ns; without one, the unprocessed rest is dropped."""
        if not self.fsts_iqe:
            return SubmitResult()
        pending, self._pending = self._pending, None
        self.ctl[qk.Q_IQE] = 0
        self.ctl[qk.Q_HELD] = 0
        if replacement is None or pending is None:
            self.ctl[qk.Q_HEAD] = self.ctl[qk.Q_TAIL]
            return SubmitResult()
        pending[0] = replacement
        return self._run(pending, int(t_ns), True)

    def clear_ite(self) -> None:
        """Software clears FSTS.ITE (Linux then resubmits what was aborted)."""
        self.ctl[qk.Q_ITE] = 0

    def clear_iwc(self) -> None:
        self.ctl[qk.Q_IWC] = 0

    def _run(self, batch: np.ndarray, t_ns: int, resume: bool) -> SubmitResult:
        """The kernel processes ``batch`` (a tail write, or after clear_iqe what IQE held,
        already written: no checks, no tail move); the result is built from its words, each
        decoded with decode_words (cached), and the times the kernel gave them."""
        words = _as_words(batch)
        n = words.shape[0]
        if n > self._done.size:
            self._done = np.zeros(n, dtype=np.int64)
        while True:
            status, processed, _t, _t_done, _code = qk._submit(
                self.ctl, self.inflight, self._unresponsive, words.reshape(-1), self._no_effects,
                self._done, t_ns, qk.M_RESUME if resume else qk.M_WRITE, False)
            if status != qk.S_NEED_ROOM:
                break
            self._make_room(n)
        if status == qk.S_REFUSED_IQE:
            return _refusal("iqe_pending", f"FSTS.IQE set at head {self.iqe_head}")
        if status == qk.S_REFUSED_ITE:
            return _refusal("ite_pending", "FSTS.ITE set (device-TLB invalidation time-out)")
        if status == qk.S_REFUSED_FULL:
            return _refusal("queue_full", f"{n} descriptors, {self.free_slots(t_ns)} free "
                            "slots")
        commands: list[tuple[int, InvCommand]] = []
        waits: list[tuple[int, InvCommand]] = []
        wait_done_ns: list[int] = []
        mamv = self.mamv
        rows = words[:processed].tolist()
        done = self._done[:processed].tolist()
        last = processed - (status == qk.S_ITE)
        for i in range(last):
            cmd = decode_words(*rows[i], mamv)
            if cmd.type == QI_IWD_TYPE:
                waits.append((done[i], cmd))
                wait_done_ns.append(done[i])
            else:
                commands.append((done[i], cmd))
        if status == qk.S_IQE:
            self._pending = batch[processed:].copy()
            err = decode_words(*words[processed].tolist(), mamv)
            return SubmitResult(commands, waits, wait_done_ns, processed, err, processed)
        if status == qk.S_ITE:
            cmd = decode_words(*rows[last], mamv)
            err = _err(cmd.type, "ite", f"device-TLB invalidation to sid {cmd.sid:#x} "
                       "timed out")
            return SubmitResult(commands, waits, wait_done_ns, processed, err, last)
        return SubmitResult(commands, waits, wait_done_ns, processed)


def _as_words(descs: np.ndarray) -> np.ndarray:
    """Descriptors as uint64[n, 4] (DESC_DTYPE[n] viewed, or uint64[n, 4] as given)."""
    if descs.dtype == DESC_DTYPE:
        if not descs.flags.c_contiguous:
            descs = np.ascontiguousarray(descs)
        return descs.view(np.uint64).reshape(-1, 4)
    descs = np.ascontiguousarray(descs)
    if descs.dtype != np.uint64 or descs.ndim != 2 or descs.shape[1] != 4:
        raise QiError("descriptors are DESC_DTYPE[n] or uint64[n, 4]")
    return descs


def new_effects(rows: int = 64) -> np.ndarray:
    """An empty effect queue (kernels/qiq.py's pend: row 0 holds its window)."""
    effects = np.zeros((rows, qk.EFFECT_FIELDS), dtype=np.int64)
    effects[0, qk.P_FIRST] = effects[0, qk.P_END] = 1
    return effects


def grow_effects(effects: np.ndarray, n: int) -> np.ndarray:
    """The effect queue with its applied rows dropped and room for n more."""
    first, end = int(effects[0, qk.P_FIRST]), int(effects[0, qk.P_END])
    live = end - first
    grown = new_effects(max(effects.shape[0], 2 * (live + n + 1)))
    grown[1:1 + live] = effects[first:end]
    grown[0, qk.P_END] = 1 + live
    return grown
