"""Isolation under a hostile guest: one regression test (at least) per finding, from its reproducer.

Each test drives the host the way a hostile guest or its VMM could (protocol operations,
iommufd / VFIO calls, raw table entries) and checks the boundary that must refuse the input:
a VT-d fault, a counted refusal, or a ProtocolError at unpack. None of them may let a DMA reach
another VM's frame, raise anything else, or run unbounded.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from host_iommu import qi
from host_iommu.costs import CostModel
from host_iommu.defs import (
    ACCESS_READ,
    ACCESS_WRITE,
    KIND_DATA,
    MAX_PASID,
    NO_PASID,
    OWNER_FREE,
    PAGE_SHIFT,
    PAGE_SIZE,
    FaultReason,
)
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.nested import (
    IommufdError,
    alloc_nested,
    attach_second_level,
    free_nested,
    sl_unmap,
)
from host_iommu.pasid import CE_PASIDDIRPTR_MASK, PasidError
from host_iommu.pgtable import PageTable, sl_leaf, sl_table
from host_iommu.protocol import (
    OP_DMA,
    OP_DTYPE,
    OP_HWPT_INV,
    OP_SL_MAP,
    OP_SL_UNMAP,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
    EpochReport,
    OpLog,
    ProtocolError,
    VmSetup,
    merge,
    pack,
    pack_ops,
    unpack,
    unpack_ops,
)
from host_iommu.server import HostServer
from host_iommu.vfio import vfio_map, vfio_unmap
from tests.host_iommu.conftest import DATA_GPA, IOVA, SID, GuestTableStore
from vm_agent.vmm import ShadowVmm

MIB = 1 << 20


def server(*modes: str, ats: bool = False, **params) -> HostServer:
    """A host with VM i+1 in modes[i], each owning sid 0x100 * (i + 1), 4 MiB of memory."""
    hs = HostServer(IommuParams(memory_mib=64, iotlb_entries=64, **params))
    for i, mode in enumerate(modes):
        hs.setup_vm(VmSetup(vm=i + 1, memory_bytes=4 * MIB, mode=mode,
                            sids=(0x100 * (i + 1),), ats=ats))
    return hs


def epoch(hs: HostServer, *rows: tuple) -> dict[int, EpochReport]:
    """Apply one epoch of (vm, t_ns, op, sid, pasid, a0, a1, a2, a3) rows, merged."""
    logs: dict[int, OpLog] = {}
    for vm, t, op, sid, pasid, a0, a1, a2, a3 in rows:
        logs.setdefault(vm, OpLog(vm)).add(t, op, sid, pasid, a0, a1, a2, a3)
    return hs.apply_epoch(merge([log.take() for log in logs.values()]))


def dma(vm: int, t: int, sid: int, iova: int, access: int = ACCESS_WRITE, pasid: int = 0
        ) -> tuple:
    return (vm, t, OP_DMA, sid, pasid, iova, 64, access, -1)


def nested_host(**params) -> tuple[HostIommu, PageTable]:
    """VM 1 with 8 MiB and a first level mapping IOVA -> DATA_GPA, not bound yet."""
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=64, **params))
    h.create_vm(1, 8 * MIB)
    fl = PageTable(GuestTableStore(h, 1, 4 * MIB, 8 * MIB), "fl", 4, h.p.haw)
    fl.map(IOVA, DATA_GPA, PAGE_SIZE, max_order=0)
    return h, fl


def translate(h: HostIommu, sid: int, pasid: int, addr: int, access: int = ACCESS_READ,
              t_ns: int = 0) -> np.void:
    return h.translate(np.array([sid]), np.array([pasid]), np.array([addr], np.uint64),
                       np.array([access]), np.array([t_ns]))[0]


# --- 1. a pinned page is never freed --------------------------------------------------------
def test_f1_sl_unmap_of_a_vfio_pinned_page_is_refused_and_counted():
    """OP_VFIO_MAP(0x5000 -> 0x20000), OP_SL_UNMAP(0x20000): the pinned page stays VM 1's, so
    VM 2's balloon churn cannot hand its frame to VM 2 and VM 1's DMA stays in VM 1."""
    hs = server("shadow", "shadow")
    v1 = hs.iommu.vms[1]
    frame = int(v1.hpa_of[0x20])
    epoch(hs, (1, 10, OP_VFIO_MAP, 0x100, 0, 0x5000, 0x20000, PAGE_SIZE, 1),
          (1, 20, OP_SL_UNMAP, 0, 0, 0x20000, 2, 0, -1),       # 0x20 pinned, 0x21 not
          (2, 30, OP_SL_UNMAP, 0, 0, 0, 8, 0, -1),
          (2, 40, OP_SL_MAP, 0, 0, 0, 8, 0, -1),
          dma(1, 50, 0x100, 0x5000))
    c1 = hs.counters[1]
    assert c1["sl_unmap_refused"] == 1
    assert int(v1.hpa_of[0x20]) == frame and hs.iommu.mem.owner[frame] == 1
    assert int(v1.hpa_of[0x21]) == -1                       # the unpinned page was freed
    assert c1["translations"] == 1 and c1["faults"] == 0 and c1["cross_vm_dma"] == 0
    # once VFIO unmapped it, the page can go
    epoch(hs, (1, 100, OP_VFIO_UNMAP, 0x100, 0, 0x5000, PAGE_SIZE, 0, -1),
          (1, 200, OP_SL_UNMAP, 0, 0, 0x20000, 1, 0, -1))
    assert int(v1.hpa_of[0x20]) == -1 and hs.iommu.mem.owner[frame] != 1
    assert c1["sl_unmap_refused"] == 1 and int(v1.pins.sum()) == 0


# --- 2. second-level change flushes the device-TLB of every PASID -----------------------------
def test_f2_second_level_change_flushes_devtlb_entries_at_pasid_5():
    h, fl = nested_host(devtlb_entries=64)
    alloc_nested(h, 1, SID, NO_PASID, fl.root, ats=True)
    alloc_nested(h, 1, SID, 5, fl.root, ats=True)
    for pasid in (NO_PASID, 5):
        assert translate(h, SID, pasid, IOVA)["fault"] == 0
        assert translate(h, SID, pasid, IOVA)["iotlb_hit"]
        assert h.last_devtlb_hit[0]                       # cached in the device-TLB
    before = dict(h.qi.counts)
    sl_unmap(h, 1, DATA_GPA, 1, 1000)
    assert h.qi.counts["pasid_devtlb"] - before["pasid_devtlb"] == 1   # 0x8 for PASID 5
    assert h.qi.counts["devtlb"] - before["devtlb"] == 1               # 0x3 without PASID
    for pasid in (NO_PASID, 5):
        r = translate(h, SID, pasid, IOVA, t_ns=2000)
        assert not h.last_devtlb_hit[0]
        assert r["fault"] == FaultReason.PAGING_ENTRY_INV and r["hpa"] == 0


# --- 3. the PASID directory is as large as PDTS says, and no larger -------------------------
def test_f3_bind_beyond_the_pasid_directory_is_refused_without_writing():
    h, fl = nested_host()
    alloc_nested(h, 1, SID, NO_PASID, fl.root)
    pdir = h.mem.read_u64(h.sm.context_entry_addr(SID)) & CE_PASIDDIRPTR_MASK
    past = pdir + (0x8000 >> 6) * 8                        # where PASID 0x8000's entry would be
    before = h.mem.read_u64(past), h.mem.slab.copy(), h.mem.pte_writes
    with pytest.raises(IommufdError, match="beyond its PASID directory"):
        alloc_nested(h, 1, SID, 0x8000, fl.root)
    with pytest.raises(PasidError):
        h.sm.write_raw_pasid_entry(SID, 0x8000, [1] * 8)
    assert h.mem.read_u64(past) == before[0]
    assert np.array_equal(h.mem.slab, before[1]) and h.mem.pte_writes == before[2]
    # the largest PASID the directory holds binds; one past it faults at translate time
    alloc_nested(h, 1, SID, 0x7FFF, fl.root)
    assert translate(h, SID, 0x7FFF, IOVA)["fault"] == 0
    assert translate(h, SID, 0x8000, IOVA)["fault"] == FaultReason.CONTEXT_PASID_MAX  # 0x46
    # the VMM's bind counts the refusal
    hs = server("passthrough")
    assert hs.bind_nested(1, 0x100, 0x8000, 0) is None and hs.counters[1]["vfio_errors"] == 1


# --- 4. a PASID never aliases into the source-id ----------------------------------------------
def test_f4_pasid_wider_than_20_bits_faults_and_never_reaches_another_device():
    """sid 0x208 with PASID 0x30000000 keyed as (0x208 << 20) | pasid was sid 0x508, PASID 0."""
    h = HostIommu(IommuParams(memory_mib=64))
    h.create_vm(1, 4 * MIB)
    h.create_vm(3, 4 * MIB)
    attach_second_level(h, 1, 0x208)
    attach_second_level(h, 3, 0x508)
    assert translate(h, 0x508, 0, 0x1000)["fault"] == 0   # VM 3's own device works
    r = translate(h, 0x208, 0x30000000, 0x1000)
    assert r["fault"] == FaultReason.PASID_DIR_ACCESS_ERR and r["hpa"] == 0
    log = h.faults.columns()
    assert log["vm"][-1] == 1 and log["pasid"][-1] == 0x30000000   # logged, as sent
    # the protocol refuses it at unpack; the server, called directly, refuses and counts it
    ops = np.zeros(1, OP_DTYPE)
    ops[0] = (0, 1, 0, OP_DMA, 0x100, MAX_PASID + 1, 0x1000, 64, ACCESS_READ, -1)
    with pytest.raises(ProtocolError, match="PASID wider than 20 bits"):
        unpack_ops(pack_ops(ops))
    hs = server("passthrough")
    hs.apply_epoch(ops)
    assert hs.counters[1]["ops_refused"] == 1 and hs.counters[1]["translations"] == 0


# --- 5. a VM's operations may only name its own devices ---------------------------------------
def test_f5_dma_through_another_vms_device_is_refused_and_not_charged_to_it():
    hs = server("passthrough", "passthrough", "shadow")
    reports = epoch(hs, dma(1, 10, 0x200, 0x1000),           # VM 2's device, mapped GPA
                    dma(1, 20, 0x200, 0x4000_0000),          # VM 2's device, would fault
                    (1, 30, OP_HWPT_INV, 0x200, 0, 0, 1, 0, -1),
                    (1, 40, OP_VFIO_MAP, 0x300, 0, 0x5000, 0x1000, PAGE_SIZE, 1),
                    (1, 50, OP_VFIO_UNMAP, 0x300, 0, 0x5000, PAGE_SIZE, 0, -1),
                    dma(1, 60, 0x100, 0x1000))               # its own device: fine
    c1, c2, c3 = hs.counters[1], hs.counters[2], hs.counters[3]
    assert c1["foreign_sid_refused"] == 5
    assert c1["translations"] == 1 and c1["faults"] == 0 and c1["cross_vm_dma"] == 0
    assert c2["translations"] == 0 and c2["faults"] == 0 and reports[2].faults == []
    assert c3["pinned_pages"] == 0 and c3["vfio_errors"] == 0
    assert hs.shadow[3].gpa_of_iova == {}


# --- 6. faults without an owner are the host's and never block the log ------------------------
def test_f6_unowned_faults_are_drained_and_pfo_never_sticks():
    hs = server("passthrough", fault_records=256)
    h = hs.iommu
    n = 300
    h.translate(np.full(n, 0x999), np.zeros(n, np.int64), np.zeros(n, np.uint64),
                np.full(n, ACCESS_READ))                     # sid 0x999: no VM owns it
    assert h.faults.pfo and h.faults.pending == 256
    epoch(hs)
    assert hs.host_counters["host_faults"] == 256
    assert not h.faults.pfo and h.faults.pending == 0
    reports = epoch(hs, dma(1, 10, 0x100, 0x4000_0000))     # beyond VM 1's memory
    assert len(reports[1].faults) == 1 and hs.counters[1]["faults"] == 1
    assert hs.host_counters["host_faults"] == 256


# --- 7. the host invalidation queue never overflows -------------------------------------------
def test_f7_second_level_change_of_200_ats_pasids_is_submitted_in_chunks():
    h, fl = nested_host(qi_entries=256, devtlb_entries=512, devtlb_ways=8)
    pasids = range(1, 201)
    for p in pasids:
        alloc_nested(h, 1, SID, p, fl.root, ats=True)
    for p in (1, 200):
        translate(h, SID, p, IOVA)
    t_done, nd = sl_unmap(h, 1, DATA_GPA, 1, 1000)[:2]
    assert nd > h.qi.entries and h.qi.counts["pasid_devtlb"] == 200
    assert h.qi.counts["wait"] >= 2                          # one wait per chunk
    for p in (1, 200):
        assert translate(h, SID, p, IOVA, t_ns=t_done)["fault"] != 0


def test_f7_rebinding_replaces_the_tag_and_free_drops_it():
    h, fl = nested_host()
    dom = None
    for _ in range(300):
        dom = alloc_nested(h, 1, SID, 5, fl.root, ats=True)
    assert [t for t in h.vms[1].tags if t[3] == 5] == [("nested", dom.did, SID, 5)]
    free_nested(h, dom)
    assert [t for t in h.vms[1].tags if t[3] == 5] == []
    assert translate(h, SID, 5, IOVA)["fault"] == FaultReason.PASID_ENTRY_P


# --- 8. nothing escapes as an exception -------------------------------------------------------
def test_f8_translate_takes_any_request_fields_without_raising():
    h, fl = nested_host()
    alloc_nested(h, 1, SID, NO_PASID, fl.root)
    sid = np.array([SID, SID, SID, 0x1_0000, -1])
    pasid = np.array([1 << 20, 0, 0, 0, 0])
    access = np.array([ACCESS_READ, 0, 3, ACCESS_READ, ACCESS_WRITE])
    addr = np.array([IOVA, 0x9000_0000, 0x9000_0000, IOVA, IOVA], np.uint64)
    r = h.translate(sid, pasid, addr, access, np.array([-5, 1, 2, 3, 4]))
    assert (r["fault"] != 0).all() and (r["hpa"] == 0).all()
    log = h.faults.columns()
    assert log["time_ns"].tolist()[:1] == [0] and set(log["access"].tolist()) <= {1, 2}
    assert r["fault"][3] == r["fault"][4] == FaultReason.ROOT_ENTRY_P


def test_f8_shadow_vmm_invalidation_above_2_48_is_a_no_op():
    h, _fl = nested_host()
    table = PageTable(GuestTableStore(h, 1, 4 * MIB, 8 * MIB), "sl", 4, h.p.haw)
    vmm = ShadowVmm(OpLog(1), h.costs, {"vmm_map_calls": 0, "vmm_unmap_calls": 0})
    cmd = qi.decode(qi.iotlb_desc(qi.QI_IOTLB_GRAN_PAGE, 1, 1 << 50, 4))
    assert vmm.handle([cmd], 0, SID, table) > 0
    assert vmm.log.take().size == 0


@pytest.mark.parametrize(("gpa", "npages"), [(0x20000, 0), (0, 1 << 40), (0x1234, 1),
                                             (1 << 63, 1)])
def test_f8_sl_unmap_and_map_of_bad_ranges_are_counted_refusals(gpa, npages):
    hs = server("passthrough")
    frames = hs.iommu.vms[1].hpa_of.copy()
    epoch(hs, (1, 10, OP_SL_UNMAP, 0, 0, gpa, npages, 0, -1),
          (1, 20, OP_SL_MAP, 0, 0, gpa, npages, 0, -1))
    assert hs.counters[1]["ops_refused"] == 2
    assert np.array_equal(hs.iommu.vms[1].hpa_of, frames)


def test_f8_alloc_nested_with_3_level_first_level_is_refused():
    h, fl = nested_host()
    with pytest.raises(IommufdError, match="levels"):
        alloc_nested(h, 1, SID, 0, fl.root, fl_levels=3)
    assert SID not in h.owner_of_sid
    hs = server("passthrough")
    assert hs.bind_nested(1, 0x100, 1, 0, fl_levels=3) is None
    assert hs.counters[1]["vfio_errors"] == 1


def test_f8_operations_from_an_unknown_vm_are_counted_for_the_host():
    hs = server("passthrough")
    epoch(hs, dma(7, 10, 0x100, 0x1000), (7, 20, OP_SL_UNMAP, 0, 0, 0, 1, 0, -1),
          dma(1, 30, 0x100, 0x1000))
    assert hs.host_counters["unknown_vm_ops"] == 2 and hs.counters[1]["translations"] == 1
    assert hs.bind_nested(7, 0x100, 0, 0) is None
    assert hs.host_counters["unknown_vm_ops"] == 3


def _ops_frame(**cols) -> bytes:
    ops = np.zeros(1, OP_DTYPE)
    ops[0] = (0, 1, 0, OP_DMA, 0x100, 0, 0x1000, 64, ACCESS_READ, -1)
    for k, v in cols.items():
        ops[k] = v
    return pack_ops(ops)


GOOD_OPS = _ops_frame()


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"\x93\x01\x02\x03", b"\x91" * 100_000 + b"\x90", GOOD_OPS[:-3],
    GOOD_OPS + b"\x00", "text", None,
    msgpack.packb({"dtype": "OP_DTYPE/1", "n": 2, "data": GOOD_OPS[-48:]}),
    msgpack.packb({"dtype": "OP_DTYPE/1", "n": "1", "data": b""}),
    msgpack.packb({"dtype": "OP_DTYPE/2", "n": 0, "data": b""}),
    msgpack.packb({"dtype": "OP_DTYPE/1", "n": 0}),
    msgpack.packb({"dtype": "OP_DTYPE/1", "n": 0, "data": b"", "x": 1}),
    _ops_frame(op=99), _ops_frame(t_ns=-1), _ops_frame(vm=0), _ops_frame(a2=0),
    _ops_frame(pasid=1 << 20),
])
def test_f8_malformed_operation_frames_raise_protocol_error(frame):
    with pytest.raises(ProtocolError):
        unpack_ops(frame)


def test_f8_a_good_operation_frame_round_trips():
    ops = unpack_ops(GOOD_OPS)
    assert ops.dtype == OP_DTYPE and ops["a0"].tolist() == [0x1000]


def _setup(**kw) -> bytes:
    d = {"type": "VmSetup", "vm": 1, "memory_bytes": 4 * MIB, "mode": "nested",
         "sids": [0x100], "ats": False, "fl_levels": 4, "fl_roots": [0x1000]}
    d.update(kw)
    return msgpack.packb({k: v for k, v in d.items() if v is not ...})


@pytest.mark.parametrize("frame", [
    _setup(mode="bogus"), _setup(fl_levels=3), _setup(sids=[0x10000]), _setup(sids=[1, 1]),
    _setup(fl_roots=[]), _setup(fl_roots=[0x1001]), _setup(memory_bytes=0), _setup(vm=0),
    _setup(vm=...), _setup(ats=1), _setup(extra=1), _setup(sids="ab"), _setup(fl_levels=True),
    msgpack.packb({"type": "EpochReport", "vm": 1, "counters": {"x": "y"}, "faults": []}),
    msgpack.packb({"type": "EpochReport", "vm": 1, "counters": {}, "faults": [[1, 2]]}),
    msgpack.packb({"type": "Other"}), msgpack.packb([1, 2]), b"\xc1",
])
def test_f8_malformed_control_messages_raise_protocol_error(frame):
    with pytest.raises(ProtocolError):
        unpack(frame)


def test_f8_valid_control_messages_round_trip():
    s = VmSetup(1, 4 * MIB, "nested", (0x100, 0x108), True, 5, (0x1000, 0x2000))
    assert unpack(pack(s)) == s
    r = EpochReport(2, {"faults": 1}, [(1, 2, 3, 4, 5, 6)])
    assert unpack(pack(r)) == r


# --- 9. work is bounded by what is mapped -----------------------------------------------------
class BoundedStore:
    """A guest table store in a dict that fails the test after ``budget`` reads."""

    def __init__(self, budget: int) -> None:
        self.pages: dict[int, dict[int, int]] = {}
        self.next = 0x10_0000
        self.reads, self.budget = 0, budget

    def alloc_table(self) -> int:
        self.next += PAGE_SIZE
        self.pages[self.next] = {}
        return self.next

    def free_table(self, addr: int) -> None:
        self.pages.pop(addr, None)

    def read(self, addr: int) -> int:
        self.reads += 1
        assert self.reads <= self.budget, "walk exceeded its budget: unbounded"
        return self.pages.get(addr & ~(PAGE_SIZE - 1), {}).get(addr & (PAGE_SIZE - 1), 0)

    def write(self, addr: int, value: int) -> None:
        self.pages[addr & ~(PAGE_SIZE - 1)][addr & (PAGE_SIZE - 1)] = value


def test_f9_shadow_walk_of_a_table_looping_to_its_root_is_bounded():
    """Every root entry points back at the root, and a lower table points back up: the
    domain-wide resync reads each table once and still shadows the one real 4-KiB leaf."""
    store = BoundedStore(budget=20_000)
    table = PageTable(store, "sl", 4, max_order=0)
    root = table.root
    l3, l2, l1 = store.alloc_table(), store.alloc_table(), store.alloc_table()
    for idx in range(512):                     # every entry of the root points back at it
        store.write(root + 8 * idx, sl_table(root))
    store.write(root + 8 * 3, sl_table(l3))    # ... but one leads down to a real leaf
    store.write(l3, sl_table(l2))
    store.write(l2, sl_table(l1))
    store.write(l2 + 8, sl_table(l3))          # a loop back up one level
    store.write(l1, sl_leaf(0x7000, 0, True, True))
    vmm = ShadowVmm(OpLog(1), CostModel(), {"vmm_map_calls": 0, "vmm_unmap_calls": 0})
    vmm.handle([qi.decode(qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, 1))], 0, SID, table)
    ops = vmm.log.take()
    assert store.reads <= 4 * 512
    assert ops["op"].tolist() == [OP_VFIO_MAP]
    assert (int(ops["a0"][0]), int(ops["a1"][0])) == (3 << 39, 0x7000)


class CountingDict(dict):
    """The container's IOVA record, failing the test after ``budget`` look-ups."""

    budget = 10_000
    calls = 0

    def _tick(self) -> None:
        self.calls += 1
        assert self.calls <= self.budget, "unmap walked the range, not the mappings"

    def pop(self, *a):
        self._tick()
        return super().pop(*a)

    def __contains__(self, k) -> bool:
        self._tick()
        return super().__contains__(k)


def test_f9_vfio_unmap_of_2_40_bytes_follows_the_mappings():
    hs = server("shadow")
    h, dom = hs.iommu, hs.shadow[1]
    vfio_map(h, dom, 0x5000, 0x20000, 2 * PAGE_SIZE)
    dom.gpa_of_iova = CountingDict(dom.gpa_of_iova)
    t_done, nd = vfio_unmap(h, dom, 0, 1 << 40, 100)
    assert nd == 2 and t_done > 100                # domain-selective flush + wait
    assert dict(dom.gpa_of_iova) == {} and int(h.vms[1].pins.sum()) == 0
    assert list(dom.table.leaves()) == []


def test_f9_vfio_map_is_checked_whole_before_anything_is_pinned():
    hs = server("shadow")
    h, dom = hs.iommu, hs.shadow[1]
    v = h.vms[1]
    for iova, gpa, size in [(0x5000, v.gpa_frames * PAGE_SIZE - PAGE_SIZE, 2 * PAGE_SIZE),
                            (1 << 48, 0, PAGE_SIZE), (0x5000, 0, 1 << 40)]:
        with pytest.raises(Exception, match="VFIO"):
            vfio_map(h, dom, iova, gpa, size)
    vfio_map(h, dom, 0x5000, 0, PAGE_SIZE)
    with pytest.raises(Exception, match="overlaps"):
        vfio_map(h, dom, 0x4000, 0x1000, 2 * PAGE_SIZE)   # -EEXIST
    assert int(v.pins.sum()) == 1 and len(dom.gpa_of_iova) == 1
    assert h.mem.kind[int(v.hpa_of[0])] == KIND_DATA


# --- fuzz findings (tests/fuzz) -------------------------------------------------------------
def test_fuzz_f1_each_shadow_device_has_its_own_container():
    """Device A's strict unmap of IOVA x holds after device B maps its own IOVA x: each
    device's IOVA space is its own VFIO container (QEMU: one per vIOMMU address space)."""
    hs = HostServer(IommuParams(memory_mib=64, iotlb_entries=64))
    hs.setup_vm(VmSetup(vm=1, memory_bytes=4 * MIB, mode="shadow", sids=(0x100, 0x108)))
    a, b = hs.shadow_of_sid[0x100], hs.shadow_of_sid[0x108]
    assert a.did != b.did and a.table.root != b.table.root
    epoch(hs, (1, 10, OP_VFIO_MAP, 0x100, 0, 0x5000, 0x20000, PAGE_SIZE, 1),
          (1, 20, OP_VFIO_UNMAP, 0x100, 0, 0x5000, PAGE_SIZE, 0, -1),
          (1, 30, OP_VFIO_MAP, 0x108, 0, 0x5000, 0x30000, PAGE_SIZE, 1),
          dma(1, 40, 0x100, 0x5000), dma(1, 50, 0x108, 0x5000))
    c = hs.counters[1]
    assert c["translations"] == 2 and c["faults"] == 1       # A faults, B reaches its page
    assert a.gpa_of_iova == {} and b.gpa_of_iova == {5: 0x30}


def test_fuzz_f2_f3_a_refused_setup_changes_nothing():
    hs = server("passthrough")
    free = hs.iommu.mem.free_frames
    for bad in (VmSetup(1, 4 * MIB, "passthrough", (0x200,)),      # VM id in use
                VmSetup(2, 4 * MIB, "passthrough", (0x100,)),      # VM 1's device
                VmSetup(2, 1 << 40, "shadow", (0x200,))):          # more than the host has
        with pytest.raises(IommufdError):
            hs.setup_vm(bad)
    with pytest.raises(ProtocolError):
        hs.setup_vm(VmSetup(2, 4 * MIB, "nested", (0x200,), fl_levels=3, fl_roots=(0,)))
    assert sorted(hs.iommu.vms) == [1] and sorted(hs.counters) == [1]
    assert hs.iommu.mem.free_frames == free and hs.iommu.owner_of_sid == {0x100: 1}


def test_f9_shadow_walk_skips_large_guest_leaves():
    """A 1-GiB leaf would make the VMM expand 262,144 pages from one entry: the vIOMMU
    advertises no second-level large pages, so the walk skips it; a 4-KiB leaf is shadowed."""
    store = BoundedStore(budget=10_000)
    table = PageTable(store, "sl", 4, max_order=2)
    table.map(0, 0, 1 << 30, max_order=2)                 # one 1-GiB leaf
    table.map(1 << 31, 0x7000, PAGE_SIZE, max_order=0)    # one 4-KiB leaf
    vmm = ShadowVmm(OpLog(1), CostModel(), {"vmm_map_calls": 0, "vmm_unmap_calls": 0})
    vmm.handle([qi.decode(qi.iotlb_desc(qi.QI_IOTLB_GRAN_DOMAIN, 1))], 0, SID, table)
    ops = vmm.log.take()
    assert ops["op"].tolist() == [OP_VFIO_MAP]
    assert (int(ops["a0"][0]), int(ops["a1"][0]), int(ops["a2"][0])) == (1 << 31, 0x7000,
                                                                         PAGE_SIZE)


def test_f1_emptied_table_pages_are_freed_only_after_the_flush():
    """vfio_unmap empties the shadow table's lower tables: they stay allocated until the
    flush that drops them from the paging-structure caches took effect (Linux frees
    page-table pages after the IOTLB flush), so no stale PWC entry leads into a frame that
    another VM's balloon deflate or tables were given meanwhile. The unmap covers the
    whole 512 GiB below the root entry, so all three lower tables are freed (Linux frees a
    table page only when the unmap covers its whole range)."""
    hs = server("shadow", "shadow")
    h, dom = hs.iommu, hs.shadow[1]
    vfio_map(h, dom, 0x4000_0000, 0x20000, PAGE_SIZE)
    tables = set(dom.table._used) - {dom.table.root}
    assert len(tables) == 3
    frames = [t >> PAGE_SHIFT for t in tables]
    t_done, _nd = vfio_unmap(h, dom, 0, 1 << 39, 100)
    assert t_done > 100 and not (h.mem.owner[frames] == OWNER_FREE).any()
    h.advance_to(t_done - 1)
    assert not (h.mem.owner[frames] == OWNER_FREE).any()
    h.advance_to(t_done)
    assert (h.mem.owner[frames] == OWNER_FREE).all()
