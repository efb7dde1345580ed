"""Compiled checks of an operation batch at the guest/host boundary (host_iommu/protocol.py).

Two whole-batch questions the protocol asks of every VM's batch, every epoch, answered in one
pass over the OP_DTYPE records instead of a dozen numpy reductions over strided columns:

- ``ops_all_valid``: does every operation carry only fields a valid operation has (a known
  kind, time >= 0, VM id >= 1, a 20-bit PASID, a DMA that reads or writes, an unmap retire
  run of 1..MAX_RETIRE_RUN ids below 2^62)? The rules are protocol.check_ops's; when the
  answer is no, check_ops finds and names the offending operation the plain numpy way.
- ``ops_order``: are the operations already in protocol order, (t_ns, vm, seq) strictly
  increasing, or at least in (vm, seq) order, as the engine's concatenation of its VMs'
  batches in VM id order is? ``merge`` then needs no sort, or a stable sort by time alone.

Both only read; neither decides anything the numpy forms do not (tests/host_iommu/
test_wire_kernels.py compares them on random and adversarial batches).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def ops_all_valid(ops: np.ndarray, known_op: np.ndarray, max_pasid: int, op_dma: int,
                  access_read: int, access_write: int, op_retire: int, max_retire_run: int
                  ) -> bool:
    """True when no operation of ``ops`` (OP_DTYPE records) breaks a rule of check_ops."""
    for i in range(ops.size):
        r = ops[i]
        k = r["op"]
        if not known_op[k] or r["t_ns"] < 0 or r["vm"] < 1 or r["pasid"] > max_pasid:
            return False
        if k == op_dma:
            access = r["a2"] & 0xFF
            if access != access_read and access != access_write:
                return False
        elif k == op_retire and (r["a1"] == 0 or r["a1"] > np.uint64(max_retire_run)
                                 or r["a0"] >= np.uint64(1 << 62)):
            return False
    return True


@njit(cache=True)
def ops_order(ops: np.ndarray) -> int:
    """How far ``ops`` is from protocol order: 2 when (t_ns, vm, seq) strictly increases
    along it (nothing to sort); 1 when (vm, seq) does, so that a stable sort by t_ns alone
    gives protocol order (ties in time keep index order, which is (vm, seq) order); else 0."""
    by_key = True     # (vm, seq) strictly increasing so far
    by_time = True    # (t_ns, vm, seq) strictly increasing so far
    for i in range(1, ops.size):
        a = ops[i - 1]
        b = ops[i]
        key_up = a["vm"] < b["vm"] or (a["vm"] == b["vm"] and a["seq"] < b["seq"])
        by_key = by_key and key_up
        by_time = by_time and (a["t_ns"] < b["t_ns"] or (a["t_ns"] == b["t_ns"] and key_up))
        if not by_key and not by_time:
            return 0
    if by_time:
        return 2
    return 1 if by_key else 0
