"""Compile (or load from numba's cache) every live kernel once, on a tiny host.

The kernels under host_iommu/kernels/ compile at their first call: about 20 s of CPU with a
cold cache (then a second or two to load). ``warm_up`` makes that first call on purpose, so
that a caller with a time budget (a test that signals a CLI run after its first epochs,
tests/conftest.py) does not spend it compiling. It translates a few requests of an ATS device
bound nested (through the translate, walk, IOTLB, PWC and device-TLB kernels) and applies one
invalidation of each kind the caches take; then the guest's flush-queue and page-table
kernels, the boundary's batch checks, the host's epoch kernel, the guest's compiled DMA API
and its whole-VM-epoch NIC and NVMe loops.
"""

from __future__ import annotations

import numpy as np

from host_iommu import qi
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PGTT_NESTED
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OP_DMA, OP_DTYPE, merge, pack_ops, unpack_ops
from host_iommu.server import warm_up_epoch
from host_iommu.vfio import DomainRecord, VfioRecord
from host_iommu.walk import WalkBatch
from vm_agent.compiled import warm_up as warm_nic_loop
from vm_agent.compiled_nvme import warm_up as warm_nvme_loop
from vm_agent.kernels.dmaapi import warm_up as warm_dma_api
from vm_agent.kernels.flushq import warm_up as warm_flush_queues
from vm_agent.memory import GuestMemory, GuestTableStore


def warm_up() -> None:
    """Run every live kernel once (results discarded)."""
    h = HostIommu(IommuParams(memory_mib=64, iotlb_entries=64, pwc_entries=16))
    vm = h.create_vm(1, 4 << 20)
    sid = 0x100
    h.attach_device(sid, 1, ats=True)
    did = h.alloc_did()
    h.set_pasid_entry(sid, 0, PasidEntry(pgtt=PGTT_NESTED, did=did, slptr=vm.sl.root,
                                         sl_levels=vm.sl.levels, flptr=0x1000, fl_levels=4))
    n = 4
    h.translate(np.full(n, sid), np.zeros(n, np.int64), np.arange(n, dtype=np.uint64) << 12,
                np.array([ACCESS_READ, ACCESS_WRITE] * (n // 2), np.uint8))
    b = WalkBatch(addr=np.zeros(1, np.uint64), access=np.ones(1, np.uint8),
                  pgtt=np.full(1, PGTT_NESTED, np.uint8), did=np.full(1, did, np.int64),
                  pasid=np.zeros(1, np.int64), flptr=np.full(1, 0x1000, np.uint64),
                  fl_levels=np.full(1, 4, np.uint8), slptr=np.full(1, vm.sl.root, np.uint64),
                  sl_levels=np.full(1, vm.sl.levels, np.uint8), ssade=np.zeros(1, bool))
    h.walker.walk(b)
    c = h.caches
    c.iotlb_global()
    c.iotlb_page(did, 0, 0, False)
    c.piotlb_page(did, 0, 0, 0, False)
    c.devtlb(sid, 0, 0, 4096)
    # the queue's tail write and the pending effects (kernels/qiq.py)
    h.submit_qi(qi.as_descs([qi.piotlb_words(did, 0, qi.QI_GRAN_PSI_PASID),
                             qi.pc_words(qi.QI_PC_PASID_SEL, did), qi.WAIT_WORDS]), 0)
    h.drain()
    q = qi.InvalidationQueue(128)
    q.submit(qi.as_descs([qi.WAIT_WORDS]), q.room_at(0, 1))
    # the guest's compiled page tables (vm_agent/kernels/pgtable.py): map_4k, unmap_range
    pt = PageTable(GuestTableStore(GuestMemory(64)), "fl", 4, max_order=0)
    pt.map(0x1000, 0x2000, 0x3000)
    pt.unmap(0, 1 << 21)
    warm_flush_queues()  # the guest's lazy-mode flush queues (vm_agent/kernels/flushq.py)
    # the boundary's batch checks (kernels/wire.py): unpack_ops' validity pass, merge's order
    ops = np.zeros(2, dtype=OP_DTYPE)
    ops["vm"], ops["op"], ops["a2"], ops["seq"] = 1, OP_DMA, ACCESS_READ, (0, 1)
    merge([unpack_ops(pack_ops(ops))])
    # the host's epoch kernel and the array oracle (kernels/epoch.py, kernels/oracle.py)
    warm_up_epoch()
    # a VFIO container's record probed by range (kernels/vfio.py rec_put_run, rec_any_in,
    # rec_pages_in), as vfio_map and vfio_unmap use it
    rec = DomainRecord(VfioRecord(8), 1)
    rec.put_run(0, 0, 2)
    rec.any_in(0, 4)
    rec.pages_in(0, 64)
    # the guest's compiled IOMMU driver and the whole-VM-epoch NIC and NVMe loops
    # (vm_agent/kernels/dmaapi.py, nic.py, nvme.py): about two minutes of CPU on a cold
    # cache, a second or two to load
    warm_dma_api()
    warm_nic_loop()
    warm_nvme_loop()
