"""HostServer.apply_epoch reads an epoch's control operations (neither DMA nor guest table
store) as rows of ints, all at once: an epoch that interleaves guest stores, DMAs, HWPT
invalidations and unmap returns must give what applying the same operations one epoch
each gives (every row meets the operation it belongs to)."""

from __future__ import annotations

from host_iommu.defs import PAGE_SIZE
from host_iommu.protocol import OP_HWPT_INV, OP_UNMAP_RET, merge
from tests.system.conftest import Bench

SID = 0x100
IOVA, GPA = 0x4000_0000, 0x20000
OTHER = 0x8000_0000


def _run(one_epoch: bool, ats: bool) -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    b = Bench()
    fl = b.nested_vm(1, SID, ats=ats)
    store = fl.store
    t = 1000
    for uid in range(3):
        iova, gpa = IOVA + uid * PAGE_SIZE, GPA + uid * PAGE_SIZE
        store.now = t
        fl.map(iova, gpa, PAGE_SIZE)                                        # guest stores
        b.dma(1, t + 10, SID, iova, write=True)
        store.now = t + 30
        fl.unmap(iova, PAGE_SIZE)                                           # guest stores
        b.op(1, t + 40, OP_HWPT_INV, sid=SID, pasid=0, a0=iova, a1=1, a2=uid & 1, a3=uid)
        b.op(1, t + 41, OP_UNMAP_RET, a0=uid, a1=t + 41, a2=7 + uid)
        b.dma(1, t + 50, SID, iova, tag=uid)                               # in flight
        store.now = t + 60
        fl.map(OTHER + uid * PAGE_SIZE, gpa, PAGE_SIZE)                    # guest stores
        b.dma(1, t + 90_000, SID, iova, tag=uid)                           # faults
        t += 100_000
    ops = merge([b.logs[1].take()])
    waits: list[tuple[int, int, int]] = []
    for part in [ops] if one_epoch else [ops[i:i + 1] for i in range(ops.size)]:
        waits += b.server.apply_epoch(part)[1].unmap_waits
    return dict(b.counters(1)), waits


def test_one_epoch_is_one_operation_per_epoch():
    for ats in (False, True):
        counters, waits = _run(True, ats)
        assert (counters, waits) == _run(False, ats)
        assert counters["host_inv_descriptors"] == 3 * (3 if ats else 2)
        assert (counters["translations"], counters["faults"]) == (9, 3)
        assert [(uid, vcpu) for uid, vcpu, _late in waits] == [(0, 7), (1, 8), (2, 9)]
        assert all(late > 0 for _u, _v, late in waits)
