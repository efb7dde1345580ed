"""Shared sizes, widths, numpy dtypes and fault encodings of the emulated VT-d IOMMU.

Follows the Intel VT-d specification rev. 3.x (chapter 3 "DMA Remapping", chapter 7
"Handling Errors"); fault reason values are those of the spec's appendix "Non-Recoverable
Fault Reason Encodings" as QEMU's hw/i386/intel_iommu_internal.h names them (VTD_FR_*).
Every other module takes its constants from here, so each dtype and code is named once.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

# --- Pages and tables (VT-d spec 3.6, 3.7: 4-KiB tables of 512 64-bit entries) -----------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
PTES_PER_TABLE = 512
LEVEL_STRIDE = 9  # address bits resolved per paging level

# Page-size orders: the leaf's level minus one. Page shift = 12 + 9 * order.
ORDER_4K = 0
ORDER_2M = 1
ORDER_1G = 2
PAGE_ORDERS = (ORDER_4K, ORDER_2M, ORDER_1G)
ORDER_NAMES = {ORDER_4K: "4k", ORDER_2M: "2m", ORDER_1G: "1g"}
ORDER_BY_NAME = {v: k for k, v in ORDER_NAMES.items()}


def order_shift(order: int) -> int:
    """Address shift of a page of the given order (12, 21 or 30)."""
    return PAGE_SHIFT + LEVEL_STRIDE * order


def order_size(order: int) -> int:
    """Bytes in a page of the given order."""
    return 1 << order_shift(order)


# --- Address widths ----------------------------------------------------------------------
# First level (x86-64 paging): 4-level = 48-bit, 5-level = 57-bit canonical addresses.
FL_WIDTH_BY_LEVELS = {4: 48, 5: 57}
# Second level: adjusted guest address width (AGAW) by levels (spec 3.7, CAP.SAGAW).
SL_WIDTH_BY_LEVELS = {3: 39, 4: 48, 5: 57}
SL_LEVELS_BY_WIDTH = {v: k for k, v in SL_WIDTH_BY_LEVELS.items()}
# Host address width (CAP.MGAW / HAW): address bits an entry may carry.
DEFAULT_HAW = 52

# --- Access type of a translation request ------------------------------------------------
ACCESS_READ = 1
ACCESS_WRITE = 2

# --- PGTT: PASID-granular translation type (spec 9.6, Linux pasid.h PASID_ENTRY_PGTT_*) -----
PGTT_FL_ONLY = 1
PGTT_SL_ONLY = 2
PGTT_NESTED = 3
PGTT_PT = 4
PGTT_NAMES = {PGTT_FL_ONLY: "first-level", PGTT_SL_ONLY: "second-level",
              PGTT_NESTED: "nested", PGTT_PT: "pass-through"}

# Linux reserves PASID 0 (IOMMU_NO_PASID) for requests without PASID (RID_PASID).
NO_PASID = 0
PASID_BITS = 20
MAX_PASID = (1 << PASID_BITS) - 1


class Stage(IntEnum):
    """Which part of a translation failed (recorded with every fault)."""

    NONE = 0
    CONTEXT = 1  # root, context, PASID directory or PASID table entry
    FIRST = 2    # first-level (x86-64 paging) walk
    SECOND = 3   # second-level walk (including first-level table pointers under nesting)
    DEVICE = 4   # device-side (ATS) checks


class FaultReason(IntEnum):
    """Non-recoverable fault reasons of a request translated in scalable mode.

    Every translation here runs in scalable mode (root/context/PASID structures, PGTT), so
    the codes are the scalable-mode ones: VT-d spec table "Scalable-Mode Fault Reasons" as
    Linux drivers/iommu/intel/dmar.c dma_remap_sm_fault_reasons lists them (0x30-0x90).
    """

    NONE = 0x00
    # root, context, PASID-directory and PASID-table entries
    ROOT_ENTRY_P = 0x39           # SM: Present bit in Root Entry is clear
    CONTEXT_ENTRY_P = 0x41        # SM: Present bit in Context Entry is clear
    CONTEXT_ENTRY_RSVD = 0x42     # SM: Non-zero reserved field set in the Context Entry
    CONTEXT_ENTRY_INV = 0x43      # SM: Invalid Context Entry
    CONTEXT_PASIDE = 0x45         # SM: PASID Enable field in Context Entry is clear
    CONTEXT_PASID_MAX = 0x46      # SM: PASID is larger than the max in Context Entry (PDTS)
    PASID_DIR_ACCESS_ERR = 0x50   # SM: Error attempting to access the PASID Directory Entry
    PASID_DIR_ENTRY_P = 0x51      # SM: Present bit in Directory Entry is clear
    PASID_DIR_ENTRY_RSVD = 0x52   # SM: Non-zero reserved field set in PASID Directory Entry
    PASID_TABLE_ACCESS_ERR = 0x58  # SM: Error attempting to access PASID Table Entry
    PASID_ENTRY_P = 0x59          # SM: Present bit in PASID Table Entry is clear
    PASID_ENTRY_RSVD = 0x5A       # SM: Non-zero reserved field set in PASID Table Entry
    PASID_TABLE_ENTRY_INV = 0x5B  # SM: Invalid Scalable-Mode PASID Table Entry (PGTT, AW)
    # first-level paging entries
    FS_PAGING_ENTRY_INV = 0x70    # SM: Error attempting to access first-level paging entry
    FS_PAGING_ENTRY_P = 0x71      # SM: Present bit in first-level paging entry is clear
    FS_PAGING_ENTRY_RSVD = 0x72   # SM: Non-zero reserved field set in first-level entry
    PASID_ENTRY_FSPTPTR_INV = 0x73  # SM: Error attempting to access FL-PML4 entry
    # second-level paging entries
    SL_PAGING_ENTRY_ACCESS = 0x78  # SM: Error attempting to access second-level paging entry
    PAGING_ENTRY_INV = 0x79       # SM: Read/Write permission error in second-level entry
    PAGING_ENTRY_RSVD = 0x7A      # SM: Non-zero reserved field set in second-level entry
    # the request as a whole
    FS_NON_CANONICAL = 0x80       # SM: Address in first-level translation is not canonical
    FS_PAGING_ENTRY_US = 0x81     # SM: U/S set 0 for first-level translation (user request)
    ADDR_BEYOND_MGAW = 0x83       # SM: Address beyond the DMA hardware max (AGAW, HAW)
    WRITE = 0x85                  # SM: No write permission for Write/AtomicOp request
    READ = 0x86                   # SM: No read permission for Read/AtomicOp request
    SM_WRITE = 0x85               # the first-level write violation: the same code as WRITE


# --- numpy dtypes, each named once -------------------------------------------------------
PTE_DTYPE = np.dtype(np.uint64)      # one page-table / structure entry
ADDR_DTYPE = np.dtype(np.uint64)     # an address (IOVA, GPA, HPA)
FRAME_DTYPE = np.dtype(np.int64)     # a host frame number
OWNER_DTYPE = np.dtype(np.int32)     # a frame's owner: OWNER_FREE, OWNER_HOST or a VM id >= 1
COUNT_DTYPE = np.dtype(np.int64)

OWNER_FREE = -1
OWNER_HOST = 0

# Frame kinds (the oracle checks every DMA target against these).
KIND_FREE = 0
KIND_DATA = 1
KIND_PAGETABLE = 2   # host-owned IOMMU structures and second-level tables
KIND_GUEST_TABLE = 3  # guest memory the guest uses as first-level/shadowed tables

# One translation request, as the batch path takes it (column names match Parquet).
REQUEST_DTYPE = np.dtype([
    ("sid", np.uint16),     # source-id: PCI bus/dev/fn of the requester
    ("pasid", np.uint32),
    ("addr", np.uint64),    # IOVA (or GPA under pass-through / second-level only)
    ("size", np.uint32),    # bytes, within one 4-KiB page for one request
    ("access", np.uint8),   # ACCESS_READ or ACCESS_WRITE
])

# The result of translating one request.
RESULT_DTYPE = np.dtype([
    ("hpa", np.uint64),
    ("fault", np.uint8),     # FaultReason
    ("stage", np.uint8),     # Stage of the fault
    ("walk_refs", np.uint16),  # page-table entry reads (both stages)
    ("ctx_refs", np.uint16),   # root/context/PASID-directory/PASID-entry fetches
    ("iotlb_hit", np.bool_),
    ("page_order", np.uint8),  # size of the translation used (ORDER_*)
])


def sid_of(bus: int, dev: int, fn: int) -> int:
    """PCI requester id (source-id) of bus:dev.fn."""
    return (bus << 8) | (dev << 3) | fn
