"""CompiledNicAgent: a VmAgent whose NIC epochs run as one compiled call.

Issue 9's "one call runs a whole VM-epoch of a workload through the guest DMA API": for the
configs where it is exact (``eligible``), the agent sets up in Python exactly as VmAgent
does (workloads/nic.py NicWorkload.start: the device, dma_alloc_coherent of the rings, the
RX buffers posted, the first events scheduled), then moves the guest's hot state into
arrays (vm_agent/kernels/guest.py GuestArrays, the DMA domain through
vm_agent/kernels/dmaapi.py ``freeze``, the NIC's queues through vm_agent/kernels/nic.py)
and runs every epoch with ``kernels.nic.run``: the same events in the same (time,
sequence) order making the same DMA API calls (Linux dma-iommu.c over the VT-d driver, as
vm_agent/dma.py models them) and the same random draws. VmAgent stays the reference: the
result tables of a whole run are the same value for value
(tests/vm_agent/test_compiled_nic.py, tests/system/golden.py).

Eligible: the NIC workload with no rogue DMA and no PASID-tagged queues (one device), no
host churn, buffers of at most dmaapi.MAX_PAGES pages, in a mode the compiled DMA API
runs (pass-through; nested strict and lazy; shadow, which is strict whatever
the policy: Linux forces strict under caching mode).
``ENABLED = False`` here, or ``IOMMU_EMU_GUEST_KERNEL=0`` in the environment, keeps every
VM on the Python path.
"""

from __future__ import annotations

import os
from typing import Any

import numba
import numpy as np

try:    # numba's typeof-cache key of a value (C); private, so optional
    from numba._dispatcher import compute_fingerprint as _compute_fingerprint
except ImportError:   # pragma: no cover - another numba
    _compute_fingerprint = None

from host_iommu.defs import PAGE_SIZE
from host_iommu.protocol import EpochReport
from vm_agent.agent import GUEST_COUNTERS, VmAgent, stall_per_vcpu
from vm_agent.dma import DmaApi
from vm_agent.iova import IovaDomain, IovaRcache
from vm_agent.kernels import dmaapi
from vm_agent.kernels import guest as kg
from vm_agent.kernels import nic as knic
from workloads.nic import NicWorkload

ENABLED = True          # the module switch; IOMMU_EMU_GUEST_KERNEL=0 turns it off too
ENV = "IOMMU_EMU_GUEST_KERNEL"


# (mode, policy) pairs whose compiled runs were checked equal to the Python path's
# (tests/vm_agent/test_compiled_nic.py, test_compiled_shadow.py); "*": any policy
# (pass-through ignores it; shadow is strict under either)
MODES: tuple[tuple[str, str], ...] = (("passthrough", "*"), ("nested", "strict"),
                                      ("nested", "lazy"), ("shadow", "*"))


def enabled() -> bool:
    """The module switch and the environment's; off with numba's JIT off
    (NUMBA_DISABLE_JIT=1), where the loop would be plain Python far slower than the agent's
    own path and has no compiled entry points."""
    return ENABLED and os.environ.get(ENV, "1") != "0" and not numba.config.DISABLE_JIT


def eligible(group: Any) -> bool:
    """Whether a ``[vm.<group>]`` (cluster.config.VmGroupConfig) runs on the compiled NIC
    loop: the NIC workload, rogue_fraction 0, no PASID queues, no churn, buffers and
    packets of at most dmaapi.MAX_PAGES pages, a mode and policy in MODES, the switch on."""
    if not enabled() or group.workload.kind != NicWorkload.kind or group.churn is not None:
        return False
    p = group.workload.params
    if p.rogue_fraction != 0 or p.pasid_queues != 0:
        return False
    if -(-max(p.buffer_bytes, *p.packet_sizes) // PAGE_SIZE) > dmaapi.MAX_PAGES:
        return False
    return any(m == group.mode and pol in ("*", group.policy) for m, pol in MODES)


def nic_arrays(wl: NicWorkload, vcpus: int, rng: np.random.Generator) -> knic.NicArrays:
    """A started NicWorkload's state as NicArrays (its queues' deques as rings), drawing
    from ``rng``."""
    p = wl.params
    nq = len(wl.queues)
    ip = np.zeros(knic.NP, np.int64)
    ip[knic.P_NQ] = nq
    ip[knic.P_RX_RING] = p.rx_ring
    ip[knic.P_TX_RING] = p.tx_ring
    ip[knic.P_BUDGET] = p.napi_budget
    ip[knic.P_STACK_NS] = p.cpu_per_packet_ns
    ip[knic.P_BUFFER] = p.buffer_bytes
    ip[knic.P_PACKETS] = p.packets
    ip[knic.P_RR] = int(p.request_response)
    ip[knic.P_IRQ_DELAY] = wl._irq_delay_ns
    ip[knic.P_TURNAROUND] = wl._turnaround_ns
    ip[knic.P_SID] = wl.dev.sid
    ip[knic.P_PASID] = 0
    fp = np.zeros(knic.NF, np.float64)
    fp[knic.F_RX_GAP] = wl._rx_gap_ns
    fp[knic.F_TX_GAP] = wl._tx_gap_ns
    fp[knic.F_LINE_GBPS] = p.line_gbps
    w = np.array([getattr(wl, n) for n in knic.W_NAMES], np.int64)
    rr_cap = p.rx_ring + 2
    q = np.zeros((nq, knic.NQF), np.int64)
    posted = np.zeros((nq, p.rx_ring, 3), np.int64)
    pending = np.zeros((nq, p.rx_ring, 4), np.int64)
    done = np.zeros((nq, p.tx_ring, 4), np.int64)
    rr = np.zeros((nq, rr_cap, 2), np.int64)
    for i, qu in enumerate(wl.queues):
        row = q[i]
        row[knic.Q_CPU] = qu.cpu
        row[knic.Q_RX_RING_IOVA] = qu.rx_ring_iova
        row[knic.Q_TX_RING_IOVA] = qu.tx_ring_iova
        row[knic.Q_RX_NEXT_DESC] = qu.rx_next_desc
        row[knic.Q_TX_NEXT_DESC] = qu.tx_next_desc
        row[knic.Q_TX_IN_FLIGHT] = qu.tx_in_flight
        row[knic.Q_IRQ_STATE] = qu.irq_state
        for dq, arr, n_col in ((qu.rx_posted, posted, knic.Q_POSTED_N),
                               (qu.rx_pending, pending, knic.Q_PENDING_N),
                               (qu.tx_done, done, knic.Q_DONE_N),
                               (qu.rr_requests, rr, knic.Q_RR_N)):
            if len(dq) > arr.shape[1]:
                raise ValueError(f"queue {i}: {len(dq)} entries over {arr.shape[1]}")
            for k, e in enumerate(dq):
                arr[i, k] = e
            row[n_col] = len(dq)
    return knic.NicArrays(ip, fp, np.ascontiguousarray(wl._sizes.cdf, np.float64),
                          np.array(wl._size_of, np.int64), w,
                          np.array(wl._busy_until, np.int64), q, posted, pending, done, rr,
                          np.zeros(knic.NR, np.int64), kg.rng_words(rng))


def _slack(p: NicWorkload.Params) -> tuple[int, int]:
    """(log rows, heap rows) one step of the loop may add at most: one DMA API call's rows
    (or a flush-queue timer's) and the device accesses of one event (a descriptor and a
    packet read, written back: the packet's pages and two descriptors); a step schedules
    at most two events (a timer, a TX fetch) and a poll's end one more."""
    per_call = max(dmaapi.MAX_MAP_ROWS, dmaapi.MAX_UNMAP_ROWS,
                   getattr(dmaapi, "MAX_TIMER_ROWS", 0))
    dma_rows = max(p.packet_sizes) // PAGE_SIZE + 4
    return per_call + dma_rows, 4


def counters_in_array(cls: type, names: tuple[str, ...]) -> None:
    """Make each of ``names`` on ``cls`` (a subclass of a workload class) a property over
    slot i of the instance's ``_w`` int64 array, its value a Python int: the compiled
    agent hands its workload the loop's counter array (``nic.w``) instead of copying it
    into the workload's attributes after every epoch (~2 us a VM-epoch). A property is a
    data descriptor: it, not the instance's now stale attribute, answers."""
    def slot(i: int) -> property:
        def get(self: Any) -> int:
            return int(self._w[i])

        def put(self: Any, v: int) -> None:
            self._w[i] = v
        return property(get, put)
    for i, name in enumerate(names):
        setattr(cls, name, slot(i))


class NicWorkloadOnArrays(NicWorkload):
    """A NicWorkload whose counters (kernels/nic.py W_NAMES) live in the compiled loop's
    array ``_w``: what a CompiledNicAgent's workload becomes once frozen."""


counters_in_array(NicWorkloadOnArrays, knic.W_NAMES)


_ENTRIES: dict[tuple, tuple[Any, Any]] = {}   # (loop, fingerprints) -> entry points


def _fingerprint(loop: Any, args: tuple) -> tuple | None:
    """A key for the entry points of ``loop`` over ``args`` (namedtuples of arrays): numba's
    dispatcher fingerprint of each (the class and field names, each array's dtype, number
    of dimensions, layout and writability: what its numba type is made of); None where
    numba has no such function or cannot fingerprint a value (then nothing is shared)."""
    if _compute_fingerprint is None:
        return None
    try:
        return (loop, *(_compute_fingerprint(x) for x in args))
    except (TypeError, ValueError, NotImplementedError):
        return None


class CompiledNicAgent(VmAgent):
    """A VmAgent (same constructor, interface and results) whose epochs run compiled.

    ``setup()`` runs VmAgent's, then ``freeze``; from then on the arrays hold the guest's
    state: ``g`` (GuestArrays), ``d`` (the DMA domain) and ``nic`` (NicArrays). ``stats``,
    the workload's counters and ``dma.stale_bound_ns`` are brought up to date after each
    epoch and report, where the runner and the actors read them.
    """

    LOG_ROWS = 4096      # op-log rows and event-heap rows to start with (both grow)
    HEAP_ROWS = 64

    compiled = False     # True once frozen: the epochs run on the arrays

    def setup(self):
        """VmAgent.setup, then ``freeze`` where the compiled DMA API takes this guest's
        domain as built (the plain IOVA allocator and DMA layer; freeze's own checks):
        otherwise the agent stays on the Python path, the same results either way."""
        vs = super().setup()
        if all(type(dom.iovad) is IovaDomain and type(dom.rcache) is IovaRcache
               for dom in self.dma.domains.values()) and type(self.dma) is DmaApi:
            try:
                self.freeze()
            except ValueError:
                return vs
            self.compiled = True
            self._counters_on_arrays()
        return vs

    _workload_on_arrays: type = NicWorkloadOnArrays

    def _counters_on_arrays(self) -> None:
        """The workload's counters read from the loop's array from now on (its class
        becomes ``_workload_on_arrays``, which adds only those properties): the values
        are the same (nic_arrays copied them in), and ``_sync`` need not copy them back."""
        wl = self.workload
        wl._w = self.nic.w
        wl.__class__ = self._workload_on_arrays

    def freeze(self) -> None:
        """Move the guest's state after set-up into arrays (the Python objects are left
        as they are and no longer used)."""
        wl = self.workload
        for _t, _seq, fn, _args in self._events:
            if knic.KIND_OF.get(fn.__name__) is None or getattr(fn, "__self__", None) not in (
                    wl, self.dma):
                raise ValueError(f"compiled NIC loop: no event kind for {fn!r}")
        self.d = dmaapi.freeze(self)           # both copy and check (ValueError): nothing
        self.nic = nic_arrays(wl, self.vcpus, self.rng)  # of the agent changed before this line
        self._freeze_guest(_slack(wl.params), knic.KIND_OF, knic.K_FQ_TIMER)

    def _freeze_guest(self, slack: tuple[int, int], kind_of: dict[str, int],
                      fq_timer: int) -> None:
        """The guest's own state as GuestArrays (self.g): memory, vCPU busy times,
        counters, the op log, and the pending events on the heap in (time, sequence) order,
        each as its kind in ``kind_of`` (by handler name) and its arguments (the flush-queue
        timer, kind ``fq_timer``, keeps its CPU; a workload handler its arguments after
        (ctx, t))."""
        g = kg.new_arrays(self.vm, self.vcpus, self.mem.frames, log_rows=self.LOG_ROWS,
                          heap_rows=self.HEAP_ROWS + 2 * len(self._events))
        kg.load_memory(g, self.mem)
        g.busy[:] = self.busy_until
        g.stats[:] = [self.stats[n] for n in GUEST_COUNTERS]
        g = kg.load_log(g, self.log)
        ctl = g.ctl
        ctl[kg.C_NOW] = self.now
        ctl[kg.C_LOG_SLACK], ctl[kg.C_HEAP_SLACK] = slack
        for t, seq, fn, args in sorted(self._events, key=lambda e: (e[0], e[1])):
            kind = kind_of[fn.__name__]
            a = [args[1]] if kind == fq_timer else list(args[2:])
            a += [0] * (kg.H_ARGS - len(a))
            ctl[kg.C_EV_SEQ] = seq
            kg.heap_push(g, t, kind, *a)
        self._events = []
        ctl[kg.C_EV_SEQ] = next(self._event_seq)
        self.g = g
        if not kg.has_room(self.g):
            self.g = self._grown_guest(self.g)

    # --- per epoch -----------------------------------------------------------------------
    def run_epoch(self, t_end_ns: int) -> np.ndarray:
        """VmAgent.run_epoch on the arrays: every event before ``t_end_ns``, then the
        epoch's end (the DMA API's retired unmap ids: in the loop's own call, ST_ENDED,
        unless the log must grow for them first); the epoch's host operations."""
        if not self.compiled:
            return super().run_epoch(t_end_ns)
        self._finish(t_end_ns, None)
        return kg.take_log(self.g)

    def run_epoch_frame(self, t_end_ns: int) -> bytes:
        """``pack_ops(run_epoch(t_end_ns))``, the same bytes, in one compiled call where it
        can (the ``_epoch`` kernel): the loop and, the epoch ended in it, its batch taken
        as protocol.pack_ops's frame into a buffer kept from epoch to epoch, whose bytes
        are copied out. Otherwise (the loop stopped for room or left the epoch's end to
        Python, or the frame did not fit) ``run_epoch``'s way goes on from there."""
        if not self.compiled:
            return super().run_epoch_frame(t_end_ns)
        k = self.__dict__.get("_entry") or self._kernels()
        out = self.__dict__.get("_out")
        if out is None:
            out = self._out = np.zeros(kg.frame_bytes(256), np.uint8)
        self.epoch_ns = t_end_ns - self.now
        self.t_end = t_end_ns
        st = k[2](self.g, self.d, self.nic, t_end_ns, out)
        if st < 0:                    # ended and framed: the common case
            self.now = t_end_ns
            self._sync()
            return out[:-st].tobytes()
        self._finish(t_end_ns, st)
        g = self.g
        need = kg.frame_bytes(int(g.ctl[kg.C_LOG_N]))
        if need > out.size:
            out = self._out = np.zeros(max(need, 2 * out.size), np.uint8)
        return out[:kg.take_frame(g.ctl, g.log, out)].tobytes()

    def _finish(self, t_end_ns: int, st: int | None) -> None:
        """The epoch run to its end from a loop call's status ``st`` (None: none made
        yet): the arrays grown and the loop called again for room, the epoch's end where
        the loop left it to Python, an error raised; then the clock and ``_sync``."""
        self.epoch_ns = t_end_ns - self.now
        self.t_end = t_end_ns
        run, end, _epoch = self._kernels()
        g, d, nic = self.g, self.d, self.nic
        while True:
            if st is None:
                st = run(g, d, nic, t_end_ns)
            if st == kg.ST_ENDED:
                break
            if st == kg.ST_DONE:
                g = self._end(end, t_end_ns)
                break
            if st == kg.ST_ROOM:
                g, d = self._grow(g, d)
                st = None
                continue
            self._sync()
            kg.raise_error(g)
        self.now = t_end_ns
        self._sync()

    def _end(self, end: Any, t_end_ns: int) -> kg.GuestArrays:
        """The epoch's end where the loop left it to Python (no room in the log for the
        retired ids' rows): the log grown, then dmaapi.end_epoch."""
        g, d = self.g, self.d
        g.ctl[kg.C_NOW] = t_end_ns
        rows = dmaapi.end_epoch_rows(d)                 # rows end_epoch may append
        if g.ctl[kg.C_LOG_N] + rows > g.log.shape[0]:
            g = self._room_for(rows)
        end(g, d, t_end_ns)
        if g.ctl[kg.C_ERR]:
            kg.raise_error(g)
        return g

    _loop = staticmethod(knic.run)   # the workload's compiled loop: (g, d, nic, t_end) -> ST_*
    _epoch = staticmethod(knic.epoch)  # the loop and the frame: (g, d, nic, t_end, out)

    def _kernels(self) -> tuple[Any, Any, Any]:
        """The compiled entry points of the loop, of the epoch's end and of the loop with
        the frame (``_epoch``: its ``out`` a C-contiguous uint8 array) for this agent's
        argument types (compiled, or loaded from numba's cache, on first use): a call
        through the dispatcher types its namedtuples first, ~17 us of an epoch's ~25.
        Arrays only ever grow into arrays of the same types, so the types hold. The loop
        takes the agent's Generator as ``rng_words`` in its arrays (``nic.rngp``, read
        again here, so after unpickling), not as an argument: numba casts a Generator's
        three function pointers through ctypes on every call, ~4 us. The entry points are
        shared by every agent whose arrays have the same numba fingerprint (numba's own
        key for a value's type): typing them and looking the signature up costs ~300 us,
        once per agent before, 20 ms at the start of a 64-VM run."""
        k = self.__dict__.get("_entry")
        if k is None:
            self.nic.rngp[:] = kg.rng_words(self.rng)
            args = (self.g, self.d, self.nic)
            key = _fingerprint(self._loop, args)
            k = _ENTRIES.get(key) if key is not None else None
            if k is None:
                ty = [numba.typeof(x) for x in args]
                i64 = numba.types.int64
                k = (self._loop.compile((*ty, i64)),
                     dmaapi.end_epoch.compile((ty[0], ty[1], i64)),
                     self._epoch.compile((*ty, i64, numba.types.uint8[::1])))
                if key is not None:
                    _ENTRIES[key] = k
            self._entry = k
        return k

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_entry", None)      # compiled entry points: found again after unpickling
        state.pop("_out", None)        # the frame buffer: made again on first use
        return state

    def _grow(self, g: kg.GuestArrays, d: Any) -> tuple[kg.GuestArrays, Any]:
        """The guest's and the driver's arrays grown for the step that found no room."""
        g2 = g if kg.has_room(g) else self._grown_guest(g)
        d2 = dmaapi.grown(d)
        if g2 is g and d2 is d:
            raise RuntimeError("compiled NIC loop: no room, and nothing to grow")
        self.g, self.d = g2, d2
        return g2, d2

    def _grown_guest(self, g: kg.GuestArrays) -> kg.GuestArrays:
        return kg.grown(g)

    def _room_for(self, rows: int) -> kg.GuestArrays:
        g = self.g
        n = int(g.ctl[kg.C_LOG_N])
        log = np.zeros((max(2 * g.log.shape[0], n + rows), kg.LOG_COLUMNS), np.int64)
        log[:n] = g.log[:n]
        self.g = g._replace(log=log)
        return self.g

    def _sync(self) -> None:
        """The stale bound from the arrays (dmaapi.stale_bound_ns; the workload's counters
        are read from them: ``_counters_on_arrays``); ``stats`` is built again on its next
        read (a new dict: the Python DMA layer's reference to the old one is no longer
        used)."""
        self._stats = None
        self.dma.stale_bound_ns = int(self.d.ctl[dmaapi.D_STALE_BOUND])

    @property
    def stats(self) -> dict[str, int]:
        """VmAgent.stats. Once compiled, a dict of the arrays' counters made on the first
        read after an epoch or a report changed them (the runner reads it once an epoch,
        the benchmarks at the end), not on every change."""
        s = self.__dict__.get("_stats")
        if s is None:
            s = self._stats = dict(zip(GUEST_COUNTERS, self.g.stats.tolist(), strict=True))
        return s

    @stats.setter
    def stats(self, value: dict[str, int]) -> None:
        self._stats = value

    def receive(self, report: EpochReport) -> None:
        """VmAgent.receive on the arrays (the vCPUs' busy times and the stats)."""
        if not self.compiled:
            return super().receive(report)
        self.host_counters = report.counters
        self.epoch_faults = faults = report.faults
        waits = report.unmap_waits
        if not (faults or waits):   # nothing to count or charge (most epochs of most VMs)
            return
        s = self.g.stats
        busy = self.g.busy
        s[kg.S_GUEST_FAULTS_REPORTED] += len(faults)
        s[kg.S_UNMAP_QI_WAIT_NS] += sum(w for _u, _c, w in waits)
        now = self.now
        for cpu, stall in enumerate(stall_per_vcpu(waits, self.vcpus)):
            if stall:
                t0 = max(int(busy[cpu]), now)
                busy[cpu] = t0 + stall
                s[kg.S_CPU_BUSY_NS] += stall
        self._stats = None


def warm_up() -> None:
    """Compile (or load from numba's cache) the compiled NIC loop once: a tiny nested lazy
    NIC VM run for two epochs, by run_epoch and run_epoch_frame (the array types are the
    same in every mode, so the one signature serves pass-through and nested strict too).
    About 80 s of CPU with a cold cache, well under a second to load."""
    from host_iommu.costs import CostModel

    wl = NicWorkload(NicWorkload.Params(rx_ring=4, tx_ring=4, offered_gbps=20.0,
                                        request_response=False))
    a = CompiledNicAgent(0, mode="nested", policy="lazy", flush_queue="percpu", vcpus=1,
                         memory_bytes=16 << 20, fl_levels=4, ats=False, workload=wl,
                         churn=None, costs=CostModel(), seed=0)
    a.setup()
    a.run_epoch(20_000)
    a.receive(EpochReport(0, {}, [], [(0, 0, 1)]))
    a.run_epoch_frame(40_000)              # the loop with the frame (_epoch) and the
    kg.take_frame(a.g.ctl, a.g.log, np.zeros(kg.frame_bytes(0), np.uint8))   # frame alone
