"""Scalable-mode fault reasons: every request here is translated in scalable mode, so a fault
carries the codes of the VT-d spec's "Scalable-Mode Fault Reasons" table, as Linux
drivers/iommu/intel/dmar.c dma_remap_sm_fault_reasons prints them, from the batch walker and
from the independent reference walker alike."""

from __future__ import annotations

import numpy as np
import pytest

from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    PAGE_SIZE,
    PGTT_NESTED,
    PGTT_SL_ONLY,
    FaultReason,
    Stage,
)
from host_iommu.nested import attach_second_level
from host_iommu.pasid import PE_AW_SHIFT, PE_P, PE_PGTT_SHIFT
from host_iommu.pgtable import sl_table
from host_iommu.reference import ReferenceWalker, RefRequest
from tests.host_iommu.conftest import DATA_GPA, IOVA, SID, make_env

# dmar.c dma_remap_sm_fault_reasons, index + 0x30, for the codes the model raises.
DMAR_SM = {
    0x39: "SM: Present bit in Root Entry is clear",
    0x41: "SM: Present bit in Context Entry is clear",
    0x42: "SM: Non-zero reserved field set in the Context Entry",
    0x43: "SM: Invalid Context Entry",
    0x45: "SM: PASID Enable field in Context Entry is clear",
    0x46: "SM: PASID is larger than the max in Context Entry",
    0x50: "SM: Error attempting to access the PASID Directory Entry",
    0x51: "SM: Present bit in Directory Entry is clear",
    0x52: "SM: Non-zero reserved field set in PASID Directory Entry",
    0x58: "SM: Error attempting to access PASID Table Entry",
    0x59: "SM: Present bit in PASID Table Entry is clear",
    0x5A: "SM: Non-zero reserved field set in PASID Table Entry",
    0x5B: "SM: Invalid Scalable-Mode PASID Table Entry",
    0x70: "SM: Error attempting to access first-level paging entry",
    0x71: "SM: Present bit in first-level paging entry is clear",
    0x72: "SM: Non-zero reserved field set in first-level paging entry",
    0x73: "SM: Error attempting to access FL-PML4 entry",
    0x78: "SM: Error attempting to access second-level paging entry",
    0x79: "SM: Read/Write permission error in second-level paging entry",
    0x7A: "SM: Non-zero reserved field set in second-level paging entry",
    0x80: "SM: Address in first-level translation is not canonical",
    0x81: "SM: U/S set 0 for first-level translation with user privilege",
    0x83: "SM: Address beyond the DMA hardware max",
    0x85: "SM: No write permission for Write/AtomicOp request",
    0x86: "SM: No read permission for Read/AtomicOp request",
}


def test_every_fault_reason_is_a_scalable_mode_code():
    """Each FaultReason but NONE is one of the scalable-mode codes dmar.c names."""
    codes = {int(r) for r in FaultReason} - {0}
    assert codes <= set(DMAR_SM)
    assert (FaultReason.ROOT_ENTRY_P, FaultReason.PAGING_ENTRY_INV, FaultReason.WRITE,
            FaultReason.READ) == (0x39, 0x79, 0x85, 0x86)
    assert FaultReason(0x85).name == "WRITE"     # what the faults table's reason_name shows


def reference_of(env, iova: int, access: int, pgtt: int = PGTT_NESTED) -> int:
    ref = ReferenceWalker(env.h.mem, env.h.p.haw)
    return ref.translate(RefRequest(iova, access, pgtt, env.did, 0, env.fl.root,
                                    env.fl.levels, env.vm.sl.root, env.vm.sl.levels)).fault


def check(env, iova: int, access: int, reason: int, stage: Stage) -> None:
    r = env.translate(iova, access)
    assert (int(r["fault"]), int(r["stage"])) == (reason, stage)
    assert reference_of(env, iova, access) == reason     # the reference's own table agrees


def test_second_level_permission_faults_are_0x85_and_0x86():
    """A read-only second-level page: a write faults 0x85 ("no write permission"), a read
    passes; with neither R nor W the entry is not present: 0x79."""
    env = make_env()
    hpa = env.gpa_hpa(DATA_GPA)
    env.vm.sl.map(DATA_GPA, hpa, PAGE_SIZE, write=False, max_order=0)
    check(env, IOVA, ACCESS_WRITE, 0x85, Stage.SECOND)
    assert int(env.translate(IOVA, ACCESS_READ)["fault"]) == 0
    env.vm.sl.unmap(DATA_GPA, PAGE_SIZE)
    check(env, IOVA, ACCESS_READ, 0x79, Stage.SECOND)


def test_second_level_table_beyond_memory_is_0x78_and_reserved_bit_0x7a():
    """A second-level entry pointing at a table outside memory: the walk cannot fetch the
    next entry (0x78); bit 62 set in a second-level entry is reserved (0x7A)."""
    env = make_env()
    gpa = 1 << 40                                    # second-level root entry 2
    env.fl.map(IOVA + (1 << 30), gpa, PAGE_SIZE)
    beyond = env.h.mem.frames << 12
    env.h.mem.write_u64(env.vm.sl.root + 8 * 2, sl_table(beyond))
    check(env, IOVA + (1 << 30), ACCESS_READ, 0x78, Stage.SECOND)
    env.h.mem.write_u64(env.vm.sl.root + 8 * 2, sl_table(env.vm.sl.root) | (1 << 62))
    check(env, IOVA + (1 << 30), ACCESS_READ, 0x7A, Stage.SECOND)


def test_second_level_only_input_beyond_the_width_is_0x83():
    """A second-level-only request above the 48-bit AGAW: address beyond the hardware max."""
    env = make_env()
    attach_second_level(env.h, env.vm.vm, 0x0108)
    r = translate_pasid(env, 0x0108, 0, 1 << 50)
    assert (int(r["fault"]), int(r["stage"])) == (0x83, Stage.SECOND)
    assert reference_of(env, 1 << 50, ACCESS_READ, PGTT_SL_ONLY) == 0x83


def test_first_level_faults_keep_their_scalable_mode_codes():
    """Not present 0x71, non-canonical 0x80, a write through a read-only first level 0x85."""
    env = make_env()
    check(env, IOVA + (64 << 20), ACCESS_READ, 0x71, Stage.FIRST)
    check(env, 1 << 47, ACCESS_READ, 0x80, Stage.FIRST)
    env.fl.map(IOVA, DATA_GPA, PAGE_SIZE, write=False, max_order=0)
    check(env, IOVA, ACCESS_WRITE, 0x85, Stage.FIRST)


def translate_pasid(env, sid: int, pasid: int, addr: int = IOVA) -> np.void:
    return env.h.translate(np.array([sid]), np.array([pasid]), np.array([addr], np.uint64),
                           np.array([ACCESS_READ]))[0]


@pytest.mark.parametrize(("case", "reason"), [
    ("unknown device", 0x39), ("PASID past the directory", 0x46),
    ("reserved PASID entry bit", 0x5A), ("PGTT 5", 0x5B), ("no PASID entry", 0x59)])
def test_context_stage_faults(case, reason):
    env = make_env()
    sid, pasid = SID, 0
    if case == "unknown device":
        sid = 0x0708
    elif case == "PASID past the directory":
        pasid = env.h.sm.max_pasids(SID)
    elif case == "no PASID entry":
        pasid = 6
    else:
        pasid = 9
        w0 = PE_P | (2 << PE_AW_SHIFT) | ((3 if case.startswith("reserved") else 5)
                                          << PE_PGTT_SHIFT)
        env.h.sm.write_raw_pasid_entry(SID, 9, [w0 | (0xC00 if case.startswith("reserved")
                                                      else 0), 1, 0, 0, 0, 0, 0, 0])
    r = translate_pasid(env, sid, pasid)
    assert (int(r["fault"]), int(r["stage"])) == (reason, Stage.CONTEXT)
