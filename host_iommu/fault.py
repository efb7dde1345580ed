"""The primary fault log: fault-recording registers, overflow, FPD suppression, per-VM reporting.

Follows VT-d spec 7.1-7.2 (primary fault logging: fault recording registers, FSTS.PFO) and
QEMU hw/i386/intel_iommu.c (vtd_report_fault, vtd_record_frcd); Linux dmar.c dmar_fault drains
the records and then clears FSTS.PFO.

Every logged fault stays in the full log (for results). Of those, the first ``records`` not yet
read by software occupy fault-recording registers and are reported to the VM owning the device
(``take_for_vm``); a fault arriving while every register is occupied, or while PFO is set, sets
FSTS.PFO and is only counted as overflowed (spec 7.2.1: no new faults are recorded while PFO is
set). A fault whose context/PASID entry has FPD (fault processing disable) set is counted as
suppressed and not logged at all.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, FaultReason, Stage

# Column name -> dtype of the fault log (the Parquet "faults" table).
FAULT_COLUMNS: dict[str, np.dtype] = {
    "time_ns": np.dtype(np.int64),
    "vm": np.dtype(np.int32),
    "sid": np.dtype(np.uint16),
    "pasid": np.dtype(np.uint32),
    "addr": np.dtype(np.uint64),
    "access": np.dtype(np.uint8),    # ACCESS_READ or ACCESS_WRITE
    "reason": np.dtype(np.uint8),    # FaultReason
    "stage": np.dtype(np.uint8),     # Stage
    "overflowed": np.dtype(np.bool_),  # not recorded in a register (FSTS.PFO)
}
# The log keeps the PASID a request carried even beyond the 20 bits a valid one has (such a
# request faulted without aliasing a valid PASID); the column holds 32 bits.
PASID_FIELD_MAX = 0xFFFF_FFFF
_REASONS = np.array(sorted(int(r) for r in FaultReason), dtype=np.int64)
_STAGES = np.array(sorted(int(s) for s in Stage), dtype=np.int64)


class FaultLogError(ValueError):
    """A fault batch the log cannot take (mismatched lengths, out-of-range fields)."""


class FaultLog:
    """Faults in growing numpy column buffers, in the order of record() calls.

    Invariant: ``pending`` (recorded in a register, not yet read) <= ``records``; PFO is set
    whenever a fault overflowed and stays set until software clears it (clear_pfo, or a
    take_for_vm that leaves no record pending, as Linux dmar_fault clears PFO after draining).
    """

    def __init__(self, records: int = 256, capacity: int = 1024) -> None:
        if records < 1:
            raise FaultLogError(f"records={records!r}: need at least one fault register")
        self.records = records
        self._cols = {k: np.zeros(max(capacity, 16), dtype=d) for k, d in FAULT_COLUMNS.items()}
        self._pending = np.zeros(max(capacity, 16), dtype=np.bool_)
        self._n = 0
        self.pfo = False
        self.suppressed = 0
        self.overflowed = 0
        self.pending = 0

    @property
    def count(self) -> int:
        """Faults logged (suppressed ones excluded, overflowed ones included)."""
        return self._n

    def _grow(self, need: int) -> None:
        cap = len(self._pending)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for k, col in self._cols.items():
            new = np.zeros(cap, dtype=col.dtype)
            new[: self._n] = col[: self._n]
            self._cols[k] = new
        pend = np.zeros(cap, dtype=np.bool_)
        pend[: self._n] = self._pending[: self._n]
        self._pending = pend

    def record(self, time_ns: ArrayLike, vm: ArrayLike, sid: ArrayLike, pasid: ArrayLike,
               addr: ArrayLike, access: ArrayLike, reason: ArrayLike, stage: ArrayLike,
               fpd: ArrayLike | None = None) -> int:
        """Log a batch of faults (numpy arrays or scalars, broadcast together).

        Returns the number logged (not FPD-suppressed). Raises FaultLogError on bad input.
        """
        try:
            arrs = np.broadcast_arrays(*(np.asarray(x) for x in (
                time_ns, vm, sid, pasid, addr, access, reason, stage,
                False if fpd is None else fpd)))
        except ValueError as exc:
            raise FaultLogError(f"fault columns do not broadcast together: {exc}") from None
        t, v, s, p, a, acc, r, st, f = (np.atleast_1d(x) for x in arrs)
        checks = (("time_ns", t, 0, 2**63 - 1), ("sid", s, 0, 0xFFFF),
                  ("pasid", p, 0, PASID_FIELD_MAX), ("vm", v, 0, 2**31 - 1),
                  ("addr", a, 0, 2**64 - 1))
        for name, col, lo, hi in checks:
            if col.dtype.kind not in "iu" and col.size:
                raise FaultLogError(f"{name} must be integers, got {col.dtype}")
            if col.size and (int(col.min()) < lo or int(col.max()) > hi):
                raise FaultLogError(f"{name} outside {lo}..{hi:#x}")
        if acc.size and not np.isin(acc, (ACCESS_READ, ACCESS_WRITE)).all():
            raise FaultLogError("access must be ACCESS_READ or ACCESS_WRITE")
        if r.size and not np.isin(r, _REASONS).all():
            raise FaultLogError("reason is not a FaultReason")
        if st.size and not np.isin(st, _STAGES).all():
            raise FaultLogError("stage is not a Stage")
        keep = ~f.astype(np.bool_)
        n = int(keep.sum())
        self.suppressed += int(f.size - n)
        if n == 0:
            return 0
        free = 0 if self.pfo else self.records - self.pending
        in_reg = np.arange(n) < free
        n_reg = int(in_reg.sum())
        if n_reg < n:
            self.pfo = True
            self.overflowed += n - n_reg
        self.pending += n_reg
        lo, hi = self._n, self._n + n
        self._grow(hi)
        for name, col in zip(("time_ns", "vm", "sid", "pasid", "addr", "access", "reason",
                              "stage"), (t, v, s, p, a, acc, r, st), strict=True):
            self._cols[name][lo:hi] = col[keep]
        self._cols["overflowed"][lo:hi] = ~in_reg
        self._pending[lo:hi] = in_reg
        self._n = hi
        return n

    def take_for_vm(self, vm: int) -> dict[str, np.ndarray]:
        """Return and mark read the pending (registered, unread) faults of one VM's devices."""
        idx = np.flatnonzero(self._pending[: self._n] & (self._cols["vm"][: self._n] == vm))
        self._pending[idx] = False
        self.pending -= len(idx)
        if self.pending == 0:
            self.pfo = False
        return {k: col[idx].copy() for k, col in self._cols.items()}

    def take_all(self) -> dict[str, np.ndarray]:
        """The host driver's fault handler: read every pending record, then clear PFO.

        Linux dmar_fault reads each fault recording register, clears its F bit, and then
        writes FSTS.PFO back to clear it, so recording resumes whoever the faults belonged
        to. Returns the records read (with their ``vm`` column) in record order.
        """
        idx = np.flatnonzero(self._pending[: self._n])
        self._pending[idx] = False
        self.pending = 0
        self.pfo = False
        return {k: col[idx].copy() for k, col in self._cols.items()}

    def clear_pfo(self) -> None:
        """Software writes 1 to FSTS.PFO: new faults may be recorded in free registers again."""
        self.pfo = False

    def columns(self) -> dict[str, np.ndarray]:
        """The whole log as columns (copies), in record order."""
        return {k: col[: self._n].copy() for k, col in self._cols.items()}

    def counts_by_reason(self) -> dict[str, int]:
        """Logged faults per FaultReason name, in reason-code order (zero counts omitted)."""
        codes, counts = np.unique(self._cols["reason"][: self._n], return_counts=True)
        return {FaultReason(int(c)).name: int(k) for c, k in zip(codes, counts, strict=True)}
