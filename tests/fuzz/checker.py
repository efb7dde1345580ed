"""The fuzzer's invariant checker: isolation properties judged after every batch.

It shares no logic with the model's own oracle (host_iommu/oracle.py, HostServer's counters):
it reads what the IOMMU returned for every translation (World.seen) and the VMs' memory maps
(GPA frame -> host frame, what KVM and VFIO treat as the VM's memory), and keeps its own
record of which pages the fuzzer unmapped strictly. After each operation:

- isolation: a successful translation lands in a frame that backs the requesting VM's memory
  (never a host table, a free frame or another VM's frame); the requesting VM is the one that
  sent the batch, whatever source id its requests carry;
- stale: a page whose strict unmap returned (or whose lazy unmap returned LAZY_BOUND_NS ago,
  the flush-queue timer's bound) is not translated again (for its device, without PASID)
  until the fuzzer maps it again or maps pages behind the DMA API (raw VFIO maps,
  shadowed hostile entries); a nested VM whose first level the fuzzer rewrote behind its
  driver (table stores, binds) is no longer judged; a DMA is judged only STALE_GRACE_NS of
  virtual time after the unmap returned and when no host invalidation is still queued (the
  guest's return does not wait for host queue contention: a modelled simplification);
- ledger: every frame that backs a VM's memory is owned by that VM in the host allocator;
- counters: a VM that sent nothing in a batch sees no counter move and gets no fault report;
  VMs share hardware capacity (caches, the invalidation queue, fault recording registers) on
  purpose, which shows only in counters of the VM's own later requests;
- writes: no host operation of one VM changes table pages held in another VM's memory;
- leak: a refused request leaves nothing behind (a VM half set up);
- oracle: the server's own cross-VM counter stays still when every translation stayed home;
- faults: a VM whose DMAs fault while the fault recording registers are free is told of
  them, and no record stays pending once every VM took its own;
- exception / hang / unbounded: nothing escapes the model (beyond the boundary's named
  refusals), no step runs past its wall-clock budget, no batch explodes in size.
"""

from __future__ import annotations

import hashlib
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from host_iommu.defs import PAGE_SHIFT
from tests.fuzz.execute import Effect, execute
from tests.fuzz.ops import Op
from tests.fuzz.world import World, WorldSpec

STALE_GRACE_NS = 2_000_000      # virtual time a strict unmap's host flush may still take
STEP_BUDGET_S = 10.0            # wall clock one operation may take before it counts as a hang
MAX_BATCH_OPS = 1 << 20         # host operations one guest operation may cause


class StepTimeout(BaseException):
    """Raised by the wall-clock alarm inside a step (BaseException: no model catches it)."""


@dataclass
class Violation:
    category: str      # isolation, stale, ledger, counters, writes, leak, oracle, faults,
    #                    exception, hang, unbounded
    detail: str
    key: str           # what makes two violations "the same" when shrinking
    step: int = -1
    op: Op | None = None

    @property
    def signature(self) -> str:
        return f"{self.category}:{self.key}"

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "detail": self.detail, "key": self.key,
                "step": self.step}


@dataclass
class Checker:
    """Invariants over one world; ``before`` and ``after`` bracket every operation."""

    w: World
    dead: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict)
    # (vm, sid) -> IOVA page -> virtual time from which it must be unreachable
    tainted: set[int] = field(default_factory=set)  # VMs no longer judged for stale pages
    translated: int = 0   # successful translations judged
    faulted: int = 0      # translations the IOMMU faulted
    _step_faulted: int = 0

    def before(self) -> dict[str, Any]:
        srv = self.w.server
        return {"counters": {vm: dict(c) for vm, c in srv.counters.items()},
                "tables": self._foreign_tables(), "pending": srv.iommu.faults.pending}

    def _foreign_tables(self) -> dict[int, str]:
        """A digest of the table pages (and which frames have them) of each VM's memory."""
        mem = self.w.server.iommu.mem
        out = {}
        for vm, v in self.w.server.iommu.vms.items():
            frames = v.hpa_of[v.hpa_of >= 0]
            slots = mem.slot_of[frames]
            has = slots >= 0
            h = hashlib.blake2b(frames[has].tobytes(), digest_size=16)
            h.update(mem.slab[slots[has]].tobytes())
            out[vm] = h.hexdigest()
        return out

    def after(self, op: Op, eff: Effect, snap: dict[str, Any]) -> list[Violation]:
        out: list[Violation] = []
        for vm, sid, pg, n in eff.remapped:
            d = self.dead.get((vm, sid))
            if d:
                for p in range(pg, pg + n):
                    d.pop(p, None)
        self.tainted |= eff.taint
        for vm in eff.forget | eff.taint:
            for key in [k for k in self.dead if k[0] == vm]:
                del self.dead[key]
        found = self._translations(eff)
        out += found
        out += self._oracle(eff, snap, any(v.category == "isolation" for v in found))
        for vm, sid, pg, n, t in eff.unmapped:
            if vm in self.tainted:
                continue
            d = self.dead.setdefault((vm, sid), {})
            for p in range(pg, pg + n):
                d[p] = t
        out += [Violation("leak", text, "setup") for text in eff.leaks]
        out += self._ledger()
        out += self._quiet(eff, snap)
        out += self._reported(eff, snap)
        return out

    # --- isolation and stale translations --------------------------------------------------
    def _translations(self, eff: Effect) -> list[Violation]:
        w = self.w
        seen, w.seen = w.seen, []
        self._step_faulted = 0
        if not seen:
            return []
        cols = [np.concatenate(c) for c in zip(*seen, strict=True)]
        sid, pasid, addr, _acc, t, res, backer, owner, kind = cols
        ok = res["fault"] == 0
        self.translated += int(ok.sum())
        self.faulted += int((~ok).sum())
        self._step_faulted = int((~ok).sum())
        if not ok.any():
            return []
        sid, pasid, addr, t, hpa = sid[ok], pasid[ok], addr[ok], t[ok], res["hpa"][ok]
        backer, owner, kind = backer[ok], owner[ok], kind[ok]
        if eff.mixed:   # legitimate multi-VM batches use only their own devices
            req = np.array([w.sid_owner.get(int(s), -1) for s in sid], np.int64)
        else:
            (sender,) = eff.senders
            req = np.full(sid.size, sender, np.int64)
        out = []
        good = backer == req   # the frame backed the requesting VM's memory when reached
        if not good.all():
            i = int(np.flatnonzero(~good)[0])
            o = int(owner[i])
            what = ("beyond host memory" if o == -2 else "a free frame" if o == -1
                    else "a host frame" if o == 0 else
                    "its own frame not backing its memory" if o == req[i]
                    else "another VM's frame")
            out.append(Violation(
                "isolation",
                f"VM {req[i]} DMA sid={int(sid[i]):#06x} pasid={int(pasid[i]):#x} "
                f"addr={int(addr[i]):#x} reached HPA {int(hpa[i]):#x}: {what} "
                f"(owner {o}, kind {int(kind[i])}); {int((~good).sum())} such translation(s)",
                what))
        # A flush still queued on the host may be the one that ends a page's life: judge
        # stale pages only once every queued invalidation has taken effect.
        idle = w.server.iommu.next_effect_ns() is None
        for (vm, s), d in self.dead.items():
            if not d or not idle:
                continue
            m = (req == vm) & (sid == s) & (pasid == 0)
            if not m.any():
                continue
            pages = (addr[m] >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            t_dead = np.array([d.get(int(p), 1 << 62) for p in pages], np.int64)
            late = t[m] > t_dead + STALE_GRACE_NS
            if late.any():
                j = int(np.flatnonzero(late)[0])
                out.append(Violation(
                    "stale",
                    f"VM {vm} sid={s:#06x} translated IOVA page {int(pages[j]) << PAGE_SHIFT:#x} "
                    f"at t={int(t[m][j])} ns, {int(t[m][j] - t_dead[j])} ns after its unmap "
                    f"had to take effect; {int(late.sum())} such translation(s)", "stale"))
        return out

    def _oracle(self, eff: Effect, snap: dict[str, Any], crossed: bool) -> list[Violation]:
        """The model's own cross-VM oracle agrees: it counts nothing when nothing crossed."""
        if crossed:
            return []
        counters = self.w.server.counters
        moved = {vm: counters[vm].get("cross_vm_dma", 0) - c.get("cross_vm_dma", 0)
                 for vm, c in snap["counters"].items() if vm in counters}
        moved = {vm: n for vm, n in moved.items() if n}
        if not moved:
            return []
        return [Violation("oracle", f"the server counted cross-VM DMAs {moved} where every "
                          "translation stayed in its VM's memory", "cross_vm_dma")]

    # --- fault reporting -------------------------------------------------------------------
    def _reported(self, eff: Effect, snap: dict[str, Any]) -> list[Violation]:
        """Faults reach the VM whose DMA faulted while registers were free; none stay stuck."""
        log = self.w.server.iommu.faults
        out = []
        if log.pending:
            out.append(Violation("faults", f"{log.pending} fault record(s) still pending after "
                                 "every VM took its own: the recording registers stay full",
                                 "pending"))
        if eff.mixed or len(eff.senders) != 1 or snap["pending"] or not self._step_faulted:
            return out
        (vm,) = eff.senders
        rep = eff.reports.get(vm)
        got = 0 if rep is None else len(rep.faults)
        want = min(self._step_faulted, log.records)
        if got < want:
            out.append(Violation("faults", f"VM {vm}'s DMAs faulted {self._step_faulted} "
                                 f"time(s) with free recording registers, but it was told of "
                                 f"{got}", "unreported"))
        return out

    # --- host memory and other VMs ---------------------------------------------------------
    def _ledger(self) -> list[Violation]:
        mem = self.w.server.iommu.mem
        for vm, v in self.w.server.iommu.vms.items():
            frames = v.hpa_of[v.hpa_of >= 0]
            bad = frames[mem.owner[frames] != vm]
            if bad.size:
                return [Violation("ledger", f"frame {int(bad[0]):#x} backs VM {vm}'s memory but "
                                  f"the host allocator says owner {int(mem.owner[bad[0]])}",
                                  "owner")]
        return []

    def _quiet(self, eff: Effect, snap: dict[str, Any]) -> list[Violation]:
        out = []
        srv = self.w.server
        for vm, before in snap["counters"].items():
            if vm in eff.senders:
                continue
            now = srv.counters.get(vm, {})
            moved = {k: now.get(k, 0) - v for k, v in before.items() if now.get(k, 0) != v}
            if moved:
                out.append(Violation("counters", f"VM {vm} sent nothing but its counters moved: "
                                     f"{moved} (senders {sorted(eff.senders)})",
                                     ",".join(sorted(moved))))
            rep = eff.reports.get(vm)
            if rep is not None and rep.faults:
                out.append(Violation("counters", f"VM {vm} sent nothing but was told of "
                                     f"{len(rep.faults)} fault(s), e.g. {rep.faults[0]}",
                                     "faults"))
        tables = self._foreign_tables()
        for vm, digest in snap["tables"].items():
            if vm not in eff.senders and tables.get(vm) != digest:
                out.append(Violation("writes", f"table pages in VM {vm}'s memory changed during "
                                     f"an operation of VM(s) {sorted(eff.senders)}", "tables"))
        return out


def _exc_key(exc: BaseException) -> str:
    """Exception type plus the innermost frame inside the model: one bug, one key."""
    where = ""
    for fs in traceback.extract_tb(exc.__traceback__):
        if "/tests/" not in fs.filename and "/site-packages/" not in fs.filename:
            where = f"{fs.filename.rsplit('/', 2)[-2]}/{fs.name}"
    return f"{type(exc).__name__}@{where}"


def _alarm(_signum, _frame):
    raise StepTimeout


class Session:
    """One world and its checker; ``step`` runs one operation under a wall-clock budget."""

    def __init__(self, spec: WorldSpec, budget_s: float = STEP_BUDGET_S) -> None:
        self.spec = spec
        self.budget_s = budget_s
        self.broken = False
        self.steps = 0
        self.world: World | None = None
        self.last: Effect | None = None   # what the last operation did
        self.checker: Checker | None = None
        self.build_error: Violation | None = None
        try:
            self.world = self._timed(World, spec, budget_s=max(budget_s, 60.0))
            self.checker = Checker(self.world)
        except StepTimeout:
            self.build_error = Violation("hang", "building the world ran past its budget",
                                         "build")
        except Exception as exc:
            self.build_error = Violation("exception", "building the world raised "
                                         + "".join(traceback.format_exception_only(exc)).strip(),
                                         _exc_key(exc))
        self.broken = self.build_error is not None

    def _timed(self, fn, *args, budget_s: float | None = None):
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, budget_s or self.budget_s)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def step(self, op: Op) -> tuple[list[Violation], int]:
        """Run one operation and check it: (violations, operations it counted as)."""
        if self.broken:
            return [], 0
        assert self.world is not None and self.checker is not None
        step = self.steps
        self.steps += 1
        t0 = time.perf_counter()
        viols: list[Violation] = []
        weight = 1
        try:
            def run():
                snap = self.checker.before()
                eff = execute(self.world, op)
                return eff, self.checker.after(op, eff, snap)
            eff, viols = self._timed(run)
            self.last = eff
            weight = eff.weight
            if max(eff.weight, eff.host_ops) > MAX_BATCH_OPS:
                viols.append(Violation("unbounded", f"one operation caused "
                                       f"{max(eff.weight, eff.host_ops)} host operations",
                                       op["k"]))
        except StepTimeout:
            self.broken = True
            viols = [Violation("hang", f"operation {op['k']} ran past {self.budget_s} s of wall "
                               f"clock (started {time.perf_counter() - t0:.1f} s ago)", op["k"])]
        except Exception as exc:
            self.broken = True
            text = "".join(traceback.format_exception(exc)[-3:]).strip()
            viols = [Violation("exception", f"operation {op['k']} raised: {text}",
                               _exc_key(exc))]
        for v in viols:
            v.step, v.op = step, op
        return viols, weight
