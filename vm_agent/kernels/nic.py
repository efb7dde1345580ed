"""The NIC workload's event loop as one compiled call per VM-epoch.

workloads/nic.py (a multi-queue NIC and its driver in the shape of Linux's ixgbe/mlx5:
RX/TX descriptor rings, MSI-X interrupt moderation, napi_poll with a budget, RX refill)
driven by VmAgent.run_epoch (vm_agent/agent.py) through the guest DMA API, on arrays: the
guest's state in a GuestArrays (vm_agent/kernels/guest.py), the DMA domain in the compiled
driver's DomainArrays (vm_agent/kernels/dmaapi.py), and the NIC's own state in a
``NicArrays``: scalar parameters and counters, one row of scalars per queue, and the
queues' deques (posted RX buffers, received packets awaiting NAPI, sent TX packets awaiting
clean-up, request/response requests awaiting their answer) as ring arrays.

Every event handler below is the method of the same name in workloads/nic.py for the configs
vm_agent/compiled.py admits (no rogue DMA, no PASID queues, one device), with the same guest
calls in the same order: the same random draws from the agent's own np.random.Generator
(numba's Generator.random and .exponential draw the same stream as numpy's; the loop reads
it through its bit generator's pointers, ``NicArrays.rngp``, guest.rng_words), Python's
round() as np.rint (both round half to even), the size draw as bisect_right over the same
float64 CDF, and events ordered by (time, sequence) with sequence numbers taken in
scheduling order; a NAPI poll or a send whose vCPU cannot start before the epoch's end
(``stalled_until``, VmAgent.stalled_until) is scheduled again for when it can, with the next
sequence number, as the Python handlers do. So the op log, the stats and the workload's
counters are the Python path's value for value (tests/vm_agent/test_compiled_nic.py runs
whole configs both ways and compares the result tables).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
from numba import njit

from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PAGE_SHIFT, PAGE_SIZE
from host_iommu.protocol import OP_DMA
from vm_agent.kernels import dmaapi
from vm_agent.kernels import guest as kg
from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE
from workloads.nic import DESC_BYTES, IRQ_ARMED, IRQ_IDLE, IRQ_NAPI

# --- event kinds (the NicWorkload method, or DmaApi._on_timer)
K_RX_ARRIVAL = 1     # a0 = q
K_IRQ = 2            # a0 = q
K_NAPI_POLL = 3      # a0 = q
K_TX_GENERATE = 4    # a0 = q
K_TX_FETCH = 5       # q, desc, gpa, iova, nbytes, t_queued, wire_ns
K_TX_COMPLETE = 6    # q, desc, gpa, iova, nbytes, t_queued
K_FQ_TIMER = 7       # a0 = cpu
KIND_OF = {"_rx_arrival": K_RX_ARRIVAL, "_irq": K_IRQ, "_napi_poll": K_NAPI_POLL,
           "_tx_generate": K_TX_GENERATE, "_tx_fetch": K_TX_FETCH,
           "_tx_complete": K_TX_COMPLETE, "_on_timer": K_FQ_TIMER}

# --- p: int64 parameters and per-run constants
(P_NQ, P_RX_RING, P_TX_RING, P_BUDGET, P_STACK_NS, P_BUFFER, P_PACKETS, P_RR, P_IRQ_DELAY,
 P_TURNAROUND, P_SID, P_PASID, P_RX_ON, P_TX_ON) = range(14)
NP = 14
# --- f: float64 parameters
F_RX_GAP, F_TX_GAP, F_LINE_GBPS = range(3)
NF = 3
# --- w: the workload's counters and scalars (NicWorkload's attributes of the same name)
(W_RX_PACKETS, W_RX_DROPS, W_TX_PACKETS, W_TX_DROPS, W_POLLS, W_MAX_POLL_PACKETS,
 W_OFFERED, W_ROUND_TRIPS, W_RTT_SUM_NS, W_TX_WIRE_FREE_NS) = range(10)
W_NAMES = ("rx_packets", "rx_drops", "tx_packets", "tx_drops", "polls", "max_poll_packets",
           "offered", "round_trips", "rtt_sum_ns", "_tx_wire_free_ns")
NW = 10
# --- q: one row of scalars per queue (_Queue's fields); deques as (head, count) pairs
(Q_CPU, Q_RX_RING_IOVA, Q_TX_RING_IOVA, Q_RX_NEXT_DESC, Q_TX_NEXT_DESC, Q_TX_IN_FLIGHT,
 Q_IRQ_STATE, Q_POSTED_HEAD, Q_POSTED_N, Q_PENDING_HEAD, Q_PENDING_N, Q_DONE_HEAD,
 Q_DONE_N, Q_RR_HEAD, Q_RR_N) = range(15)
NQF = 15
# --- r: a NAPI poll under way (stopped for room): its queue, time, packets done, next step
# and the RX packet between its steps
R_ACTIVE, R_Q, R_T, R_DONE, R_STEP, R_GPA, R_NBYTES, R_T_ARRIVE, R_SEND_NBYTES = range(9)
NR = 9
STEP_TX, STEP_RX, STEP_REFILL, STEP_ANSWER = range(4)

ST_DONE, ST_ROOM, ST_ERR, ST_ENDED = kg.ST_DONE, kg.ST_ROOM, kg.ST_ERR, kg.ST_ENDED
ST_SEND = 3          # napi_steps: send the answer in r[R_SEND_NBYTES], then go on

# The driver's per-call functions inlined into this loop (numba IR inlining of the same
# Python functions): a call between compiled functions increfs and decrefs every array
# of the namedtuples it is passed (an atomic operation each; ~0.3 us per call with g and
# d), more than the work of a pass-through map. A cached ``run`` then holds their code:
# ``_stamp_with`` below makes its cache stale when those files change.
# (With NUMBA_DISABLE_JIT=1 ``njit`` returns the plain function, which has no py_func.)
_dma_map = njit(inline="always")(getattr(dmaapi.dma_map, "py_func", dmaapi.dma_map))
_dma_unmap = njit(inline="always")(getattr(dmaapi.dma_unmap, "py_func", dmaapi.dma_unmap))
_room_ok = njit(inline="always")(getattr(dmaapi.room_ok, "py_func", dmaapi.room_ok))
_unmap_tag = njit(inline="always")(getattr(dmaapi.unmap_tag, "py_func", dmaapi.unmap_tag))
_end_epoch = njit(inline="always")(getattr(dmaapi.end_epoch, "py_func", dmaapi.end_epoch))


class NicArrays(NamedTuple):
    """The NIC workload's state (see the module docstring)."""

    p: np.ndarray         # int64[NP]
    f: np.ndarray         # float64[NF]
    cdf: np.ndarray       # float64[sizes]: SizeSampler.cdf
    sizes: np.ndarray     # int64[sizes + 1]: the sizes, the last once more (clip)
    w: np.ndarray         # int64[NW]
    busy: np.ndarray      # int64[vcpus]: NicWorkload._busy_until
    q: np.ndarray         # int64[queues, NQF]
    posted: np.ndarray    # int64[queues, rx_ring, 3]: (gpa, iova, t_posted)
    pending: np.ndarray   # int64[queues, rx_ring, 4]: (gpa, iova, nbytes, t_arrive)
    done: np.ndarray      # int64[queues, tx_ring, 4]: (gpa, iova, nbytes, t_queued)
    rr: np.ndarray        # int64[queues, rr_cap, 2]: (t_request, nbytes)
    r: np.ndarray         # int64[NR]: a poll under way
    rngp: np.ndarray      # int64[RNG_WORDS]: the agent's Generator (guest.rng_words)


# --- ring deques -------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _push_slot(qrow, head_col, n_col, cap):
    """The slot a deque's append fills (its count grown), or -1 when it is full."""
    n = qrow[n_col]
    if n >= cap:
        return -1
    qrow[n_col] = n + 1
    return (qrow[head_col] + n) % cap


@njit(cache=True, inline="always")
def _pop_slot(qrow, head_col, n_col, cap):
    """The slot a deque's popleft takes (its head moved on)."""
    h = qrow[head_col]
    qrow[head_col] = (h + 1) % cap
    qrow[n_col] -= 1
    return h


# --- guest services ------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _pages(size):
    """VmAgent.alloc_buffer / free_buffer's page count: max(1, ceil(size / PAGE_SIZE))."""
    return max(1, -(-size // PAGE_SIZE))


@njit(cache=True, inline="always")
def _io_done(g, nbytes, latency_ns):
    """VmAgent.io_done."""
    s = g.stats
    s[kg.S_IOS] += 1
    s[kg.S_BYTES] += nbytes
    s[kg.S_IO_LATENCY_SUM_NS] += latency_ns


@njit(cache=True, inline="always")
def _device_dma(g, d, sid, pasid, t, iova, size, write):
    """VmAgent.device_dma (not rogue): one OP_DMA row per page the access touches, each
    tagged with the unmap that last covered its page."""
    flags = ACCESS_WRITE if write else ACCESS_READ
    end = iova + max(1, size)
    if iova >> PAGE_SHIFT == (end - 1) >> PAGE_SHIFT:
        kg.log_add(g, t, OP_DMA, sid, pasid, iova, end - iova, flags,
                   _unmap_tag(g, d, iova >> PAGE_SHIFT))
        pages = 1
    else:
        addr = iova
        pages = 0
        while addr < end:
            nxt = min(end, (addr | (PAGE_SIZE - 1)) + 1)
            kg.log_add(g, t, OP_DMA, sid, pasid, addr, nxt - addr, flags,
                       _unmap_tag(g, d, addr >> PAGE_SHIFT))
            pages += 1
            addr = nxt
    g.stats[kg.S_DMA_REQUESTS] += pages


@njit(cache=True, inline="always")
def _unmap(g, d, cpu, iova, size, direction, t):
    """VmAgent.dma_unmap, then the flush-queue timer the unmap armed scheduled, as
    DmaApi.unmap_range schedules it (no other event comes between)."""
    t1 = _dma_unmap(g, d, cpu, iova, size, direction, t)
    if d.ctl[dmaapi.D_TIMER_NS] >= 0:
        kg.heap_push(g, d.ctl[dmaapi.D_TIMER_NS], K_FQ_TIMER, d.ctl[dmaapi.D_TIMER_CPU],
                     0, 0, 0, 0, 0, 0, 0, 0)
        d.ctl[dmaapi.D_TIMER_NS] = -1
    return t1


@njit(cache=True, inline="always")
def _draw_size(nic, rng):
    """SizeSampler.draw: sizes[bisect_right(cdf, rng.random())], clipped to the last."""
    u = rng.random()
    cdf = nic.cdf
    i = 0
    while i < cdf.shape[0] and cdf[i] <= u:   # bisect_right on a non-decreasing CDF
        i += 1
    return nic.sizes[i]


@njit(cache=True, inline="always")
def _gap(rng, mean_ns):
    """max(1, round(rng.exponential(mean_ns))), round half to even."""
    return max(1, np.int64(np.rint(rng.exponential(mean_ns))))


@njit(cache=True, inline="always")
def _raise_irq(g, nic, q, t):
    qrow = nic.q[q]
    if qrow[Q_IRQ_STATE] == IRQ_IDLE:
        qrow[Q_IRQ_STATE] = IRQ_ARMED
        kg.heap_push(g, t + nic.p[P_IRQ_DELAY], K_IRQ, q, 0, 0, 0, 0, 0, 0, 0, 0)


# --- the handlers (NicWorkload's methods) --------------------------------------------------
@njit(cache=True, inline="always")
def rx_arrival(g, d, nic, rng, t, q, t_end):
    """A packet arrives on queue ``q`` at ``t`` (NicWorkload._rx_arrival). A run of drops
    (no RX buffer posted by then) is taken here in one go: where this arrival is dropped
    and the next one, which it schedules, would be both the loop's very next event (before
    ``t_end`` and every other event, no poll under way) and dropped too, that one is run
    here at once instead of going through the heap, its sequence number taken all the
    same: the same draws, counters and sequence numbers as event by event."""
    p = nic.p
    w = nic.w
    ctl = g.ctl
    rr = p[P_RR] != 0
    limit = p[P_PACKETS]
    qrow = nic.q[q]
    while True:
        if limit and w[W_OFFERED] >= limit:
            return
        w[W_OFFERED] += 1
        if rr:
            if limit and w[W_OFFERED] >= limit:
                return
            w[W_OFFERED] += 1
        nbytes = _draw_size(nic, rng)
        drop = qrow[Q_POSTED_N] == 0 or nic.posted[q, qrow[Q_POSTED_HEAD], 2] > t
        if not rr:
            t_next = t + _gap(rng, nic.f[F_RX_GAP])
            if (drop and t_next < t_end and nic.r[R_ACTIVE] == 0
                    and (qrow[Q_POSTED_N] == 0 or nic.posted[q, qrow[Q_POSTED_HEAD], 2] > t_next)
                    and (ctl[kg.C_HEAP_N] == 0 or t_next < g.heap[0, kg.H_T])):
                w[W_RX_DROPS] += 1
                ctl[kg.C_EV_SEQ] += 1          # the next arrival's, as heap_push takes it
                t = t_next
                ctl[kg.C_NOW] = t
                continue
            kg.heap_push(g, t_next, K_RX_ARRIVAL, q, 0, 0, 0, 0, 0, 0, 0, 0)
        break
    rx_ring = p[P_RX_RING]
    if drop:   # no buffer posted by now
        w[W_RX_DROPS] += 1
        return
    s = _pop_slot(qrow, Q_POSTED_HEAD, Q_POSTED_N, rx_ring)
    gpa = nic.posted[q, s, 0]
    iova = nic.posted[q, s, 1]
    desc = qrow[Q_RX_RING_IOVA] + (qrow[Q_RX_NEXT_DESC] % rx_ring) * DESC_BYTES
    qrow[Q_RX_NEXT_DESC] += 1
    sid = p[P_SID]
    pasid = p[P_PASID]
    _device_dma(g, d, sid, pasid, t, desc, DESC_BYTES, False)
    _device_dma(g, d, sid, pasid, t, iova, nbytes, True)
    _device_dma(g, d, sid, pasid, t, desc, DESC_BYTES, True)
    s = _push_slot(qrow, Q_PENDING_HEAD, Q_PENDING_N, rx_ring)
    pend = nic.pending[q, s]
    pend[0] = gpa
    pend[1] = iova
    pend[2] = nbytes
    pend[3] = t
    _raise_irq(g, nic, q, t)


@njit(cache=True, inline="always")
def irq(g, nic, t, q):
    nic.q[q, Q_IRQ_STATE] = IRQ_NAPI
    kg.heap_push(g, t, K_NAPI_POLL, q, 0, 0, 0, 0, 0, 0, 0, 0)


@njit(cache=True, inline="always")
def room_call(g, d):
    """Whether the next step (at most one DMA API call, its device accesses, and the
    events it schedules) finds room: the log and heap slack, and the driver's arrays
    (dmaapi.room_ok)."""
    ctl = g.ctl
    return (ctl[kg.C_LOG_N] + ctl[kg.C_LOG_SLACK] <= g.log.shape[0]
            and ctl[kg.C_HEAP_N] + ctl[kg.C_HEAP_SLACK] <= g.heap.shape[0]
            and _room_ok(g, d))


@njit(cache=True, inline="always")
def stalled_until(g, cpu, t_ns, t_end):
    """VmAgent.stalled_until: 0 when vCPU ``cpu`` can start at ``t_ns`` before ``t_end``,
    else the time it can."""
    start = max(t_ns, g.busy[cpu % g.busy.shape[0]])
    return start if start >= t_end else 0


@njit(cache=True, inline="always")
def napi_poll(g, nic, t_ns, q, t_end):
    """NicWorkload._napi_poll's start (``run`` then runs its body, ``napi_steps``), or,
    with the vCPU stalled past the epoch's end, the poll scheduled for when it is free."""
    qrow = nic.q[q]
    cpu = qrow[Q_CPU]
    late = stalled_until(g, cpu, max(t_ns, nic.busy[cpu]), t_end)
    if late:
        kg.heap_push(g, late, K_NAPI_POLL, q, 0, 0, 0, 0, 0, 0, 0, 0)
        return
    r = nic.r
    r[R_ACTIVE] = 1
    r[R_Q] = q
    r[R_T] = max(t_ns, g.busy[cpu % g.busy.shape[0]], nic.busy[cpu])
    r[R_DONE] = 0
    r[R_STEP] = STEP_TX
    nic.w[W_POLLS] += 1


@njit(cache=True, inline="always")
def napi_steps(g, d, nic, rng):
    """The poll in ``nic.r`` from where it stopped: the TX clean-up (one unmap a step),
    then up to a budget of RX packets (unmap; refill map; in request/response the answer's
    map), each step run only with room for it (else ST_ROOM, its state kept in ``nic.r``
    for the call after the arrays grew). ST_DONE when the poll is over, ST_ERR at an error.
    The same guest calls in the same order as the Python method's loops."""
    p = nic.p
    w = nic.w
    r = nic.r
    q = r[R_Q]
    qrow = nic.q[q]
    cpu = qrow[Q_CPU]
    t = r[R_T]
    done = r[R_DONE]
    step = r[R_STEP]
    rr = p[P_RR] != 0
    tx_ring = p[P_TX_RING]
    rx_ring = p[P_RX_RING]
    size = p[P_BUFFER]
    while True:
        if step == STEP_TX:                # TX clean-up first, as ixgbe_poll does
            if qrow[Q_DONE_N] == 0:
                step = STEP_RX
                continue
        elif step == STEP_RX and (qrow[Q_PENDING_N] == 0 or done >= p[P_BUDGET]):
            break
        if not room_call(g, d):
            r[R_T] = t
            r[R_DONE] = done
            r[R_STEP] = step
            return ST_ROOM
        if step in (STEP_TX, STEP_RX):     # an unmap (one call site for both)
            if step == STEP_TX:
                s = _pop_slot(qrow, Q_DONE_HEAD, Q_DONE_N, tx_ring)
                e = nic.done[q, s]
                unmap_size = e[2]
                direction = DMA_TO_DEVICE
            else:
                s = _pop_slot(qrow, Q_PENDING_HEAD, Q_PENDING_N, rx_ring)
                e = nic.pending[q, s]
                unmap_size = size
                direction = DMA_FROM_DEVICE
            gpa = e[0]
            nbytes = e[2]
            t_then = e[3]                  # t_queued (TX), t_arrive (RX)
            t = _unmap(g, d, cpu, e[1], unmap_size, direction, t)
            if g.ctl[kg.C_ERR]:
                return ST_ERR
            if step == STEP_TX:
                kg.mem_free(g, gpa, _pages(nbytes))
                qrow[Q_TX_IN_FLIGHT] -= 1
                w[W_TX_PACKETS] += 1
                if not rr:                 # a round trip is counted when its response left
                    _io_done(g, nbytes, t - t_then)
            else:                          # the packet's stack work
                r[R_GPA] = gpa
                r[R_NBYTES] = nbytes
                r[R_T_ARRIVE] = t_then
                t += p[P_STACK_NS]
                if not rr:
                    _io_done(g, nbytes, t - t_then)
                w[W_RX_PACKETS] += 1
                step = STEP_REFILL
        elif step == STEP_REFILL:          # _post_rx_buffer: refill the ring, free the old
            new_gpa = kg.mem_alloc(g, _pages(size))
            if new_gpa < 0:
                return ST_ERR
            new_iova, t = _dma_map(g, d, cpu, new_gpa, size, DMA_FROM_DEVICE, t)
            if g.ctl[kg.C_ERR]:
                return ST_ERR
            s = _push_slot(qrow, Q_POSTED_HEAD, Q_POSTED_N, rx_ring)
            nic.posted[q, s, 0] = new_gpa
            nic.posted[q, s, 1] = new_iova
            nic.posted[q, s, 2] = t
            kg.mem_free(g, r[R_GPA], _pages(size))
            done += 1
            step = STEP_ANSWER if rr else STEP_RX
        else:                              # STEP_ANSWER: the application answers at once
            s = _push_slot(qrow, Q_RR_HEAD, Q_RR_N, nic.rr.shape[1])
            if s < 0:
                g.ctl[kg.C_ERR] = kg.E_DMA
                g.ctl[kg.C_ERR_ARG] = -1
                return ST_ERR
            nic.rr[q, s, 0] = r[R_T_ARRIVE]
            nic.rr[q, s, 1] = r[R_NBYTES]
            r[R_SEND_NBYTES] = _draw_size(nic, rng)
            r[R_T] = t                     # run sends it (tx_send) and sets R_T to its end
            r[R_DONE] = done
            r[R_STEP] = STEP_RX
            return ST_SEND
    r[R_ACTIVE] = 0
    wbusy = nic.busy
    if t > wbusy[cpu]:
        wbusy[cpu] = t
    if done > w[W_MAX_POLL_PACKETS]:
        w[W_MAX_POLL_PACKETS] = done
    if qrow[Q_PENDING_N]:                  # budget spent: poll again, irqs stay masked
        kg.heap_push(g, t, K_NAPI_POLL, q, 0, 0, 0, 0, 0, 0, 0, 0)
    else:                                  # napi_complete_done: re-enable the interrupt
        qrow[Q_IRQ_STATE] = IRQ_IDLE
    return ST_DONE


@njit(cache=True, inline="always")
def tx_generate(g, nic, rng, t, q, t_end):
    """NicWorkload._tx_generate up to its _tx_send: the packet's size for ``run`` to send,
    or -1 once the packet limit is reached or with the vCPU stalled past the epoch's end
    (then the generator is scheduled for when it is free)."""
    cpu = nic.q[q, Q_CPU]
    late = stalled_until(g, cpu, max(t, nic.busy[cpu]), t_end)
    if late:
        kg.heap_push(g, late, K_TX_GENERATE, q, 0, 0, 0, 0, 0, 0, 0, 0)
        return -1
    limit = nic.p[P_PACKETS]
    w = nic.w
    if limit and w[W_OFFERED] >= limit:
        return -1
    w[W_OFFERED] += 1
    nbytes = _draw_size(nic, rng)
    t_next = t + _gap(rng, nic.f[F_TX_GAP])
    kg.heap_push(g, t_next, K_TX_GENERATE, q, 0, 0, 0, 0, 0, 0, 0, 0)
    return nbytes


@njit(cache=True, inline="always")
def tx_send(g, d, nic, q, t_ns, nbytes):
    """Map one packet and post it to the TX ring; the time the vCPU is done."""
    p = nic.p
    qrow = nic.q[q]
    tx_ring = p[P_TX_RING]
    if qrow[Q_TX_IN_FLIGHT] >= tx_ring:
        nic.w[W_TX_DROPS] += 1
        return t_ns
    cpu = qrow[Q_CPU]
    wbusy = nic.busy
    t = max(t_ns, g.busy[cpu % g.busy.shape[0]], wbusy[cpu])
    gpa = kg.mem_alloc(g, _pages(nbytes))
    if gpa < 0:
        return t
    iova, t = _dma_map(g, d, cpu, gpa, nbytes, DMA_TO_DEVICE, t)
    if g.ctl[kg.C_ERR]:
        return t
    if t > wbusy[cpu]:
        wbusy[cpu] = t
    desc = qrow[Q_TX_RING_IOVA] + (qrow[Q_TX_NEXT_DESC] % tx_ring) * DESC_BYTES
    qrow[Q_TX_NEXT_DESC] += 1
    qrow[Q_TX_IN_FLIGHT] += 1
    # the doorbell write is at t; the port sends packets one after another at line rate
    t_start = max(t, nic.w[W_TX_WIRE_FREE_NS])
    wire_ns = max(1, np.int64(np.rint(nbytes * 8 / nic.f[F_LINE_GBPS])))
    nic.w[W_TX_WIRE_FREE_NS] = t_start + wire_ns
    kg.heap_push(g, t_start, K_TX_FETCH, q, desc, gpa, iova, nbytes, t_ns, wire_ns, 0, 0)
    return t


@njit(cache=True, inline="always")
def tx_fetch(g, d, nic, t, q, desc, gpa, iova, nbytes, t_queued, wire_ns):
    sid = nic.p[P_SID]
    pasid = nic.p[P_PASID]
    _device_dma(g, d, sid, pasid, t, desc, DESC_BYTES, False)
    _device_dma(g, d, sid, pasid, t, iova, nbytes, False)
    kg.heap_push(g, t + wire_ns, K_TX_COMPLETE, q, desc, gpa, iova, nbytes, t_queued,
                 0, 0, 0)


@njit(cache=True, inline="always")
def tx_complete(g, d, nic, t, q, desc, gpa, iova, nbytes, t_queued):
    p = nic.p
    qrow = nic.q[q]
    _device_dma(g, d, p[P_SID], p[P_PASID], t, desc, DESC_BYTES, True)
    s = _push_slot(qrow, Q_DONE_HEAD, Q_DONE_N, p[P_TX_RING])
    e = nic.done[q, s]
    e[0] = gpa
    e[1] = iova
    e[2] = nbytes
    e[3] = t_queued
    _raise_irq(g, nic, q, t)
    if p[P_RR] and qrow[Q_RR_N]:
        s = _pop_slot(qrow, Q_RR_HEAD, Q_RR_N, nic.rr.shape[1])
        t_request = nic.rr[q, s, 0]
        req_bytes = nic.rr[q, s, 1]
        turnaround_ns = p[P_TURNAROUND]
        rtt_ns = t - t_request + turnaround_ns
        w = nic.w
        w[W_ROUND_TRIPS] += 1
        w[W_RTT_SUM_NS] += rtt_ns
        _io_done(g, req_bytes + nbytes, rtt_ns)
        kg.heap_push(g, t + turnaround_ns, K_RX_ARRIVAL, q, 0, 0, 0, 0, 0, 0, 0, 0)


# --- the loop ------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def end_here(g, d, t_end):
    """What the caller does after ST_DONE, in the loop's own call (one compiled call an
    epoch instead of two): the time at ``t_end``, then dmaapi.end_epoch when the log has
    its rows free (ST_ENDED); else ST_DONE, and the caller makes room and ends the epoch."""
    g.ctl[kg.C_NOW] = t_end
    if g.ctl[kg.C_LOG_N] + d.ctl[dmaapi.D_RETIRED_N] > g.log.shape[0]:
        return ST_DONE
    _end_epoch(g, d, t_end)
    return ST_ENDED


@njit(cache=True)
def run(g, d, nic, t_end):
    """VmAgent.run_epoch's loop: every event before ``t_end`` in (time, sequence) order.

    Each event, and each step of a NAPI poll (at most one DMA API call), runs only with
    room for it (``room_call``); else ST_ROOM, nothing of it done: the caller grows the
    arrays (guest.grown, dmaapi.grown) and calls again, which goes on where this stopped.
    ST_ERR if an event raised (ctl[C_ERR]). Once the next event is at ``t_end`` or later,
    ``end_here``: ST_ENDED (the epoch ended), or ST_DONE (the caller ends it)."""
    g = kg.borrowed(g)                     # no reference counting inside the loop
    d = kg.borrowed(d)
    nic = kg.borrowed(nic)
    rng = kg.generator_of(nic.rngp)        # the agent's Generator, not an argument (~4 us)
    ctl = g.ctl
    ev = g.ev
    r = nic.r
    while True:
        send_q = -1                        # a packet to send (one tx_send call site)
        send_t = 0
        send_n = 0
        if r[R_ACTIVE]:                    # a poll under way (begun, or stopped for room)
            st = napi_steps(g, d, nic, rng)
            if st == ST_SEND:
                send_q = r[R_Q]
                send_t = r[R_T]
                send_n = r[R_SEND_NBYTES]
            elif st != ST_DONE:
                return st
        if send_q < 0:
            if ctl[kg.C_HEAP_N] == 0 or g.heap[0, 0] >= t_end:
                break
            if not room_call(g, d):
                return ST_ROOM
            kind = kg.heap_pop(g)
            t = ev[kg.H_T]
            ctl[kg.C_NOW] = t
            a = kg.H_A0
            if kind == K_RX_ARRIVAL:
                rx_arrival(g, d, nic, rng, t, ev[a], t_end)
            elif kind == K_NAPI_POLL:
                napi_poll(g, nic, t, ev[a], t_end)   # its body runs at the top of the loop
            elif kind == K_TX_FETCH:
                tx_fetch(g, d, nic, t, ev[a], ev[a + 1], ev[a + 2], ev[a + 3], ev[a + 4],
                         ev[a + 5], ev[a + 6])
            elif kind == K_TX_COMPLETE:
                tx_complete(g, d, nic, t, ev[a], ev[a + 1], ev[a + 2], ev[a + 3],
                            ev[a + 4], ev[a + 5])
            elif kind == K_IRQ:
                irq(g, nic, t, ev[a])
            elif kind == K_TX_GENERATE:
                n = tx_generate(g, nic, rng, t, ev[a], t_end)
                if n >= 0:
                    send_q = ev[a]
                    send_t = t
                    send_n = n
            elif kind == K_FQ_TIMER:
                dmaapi.fq_timer(g, d, ev[a])
            else:
                ctl[kg.C_ERR] = kg.E_DMA
                ctl[kg.C_ERR_ARG] = kind
        if send_q >= 0:
            t1 = tx_send(g, d, nic, send_q, send_t, send_n)
            if r[R_ACTIVE]:                # the poll's answer: it goes on from t1
                r[R_T] = t1
        if ctl[kg.C_ERR]:
            return ST_ERR
    return end_here(g, d, t_end)


def _stamp_with(dispatcher, *modules) -> None:
    """Make ``dispatcher``'s cache stale when any of ``modules``' files changes, not only
    its own (numba stamps a cache with the function's own file alone, but ``run`` holds
    the code of the driver and guest kernels it calls). Falls back to numba's own stamp,
    and to deleting vm_agent/kernels/__pycache__ by hand, if numba's cache changes shape."""
    try:
        cf = dispatcher._cache._cache_file
        stamps = [cf._source_stamp]
        for m in modules:
            with open(m.__file__, "rb") as f:
                stamps.append(hashlib.sha256(f.read()).digest())
        cf._source_stamp = tuple(stamps)
    except (AttributeError, OSError):
        pass


_stamp_with(run, dmaapi, kg, dmaapi.kfq, dmaapi.kiova, dmaapi.kpg)


@njit(cache=True)
def epoch(g, d, nic, t_end, out):
    """``run``, then, where the epoch ended in that call (ST_ENDED) and its frame fits in
    ``out``, the epoch's batch taken as protocol.pack_ops's frame into ``out``
    (guest.frame_log): minus the frame's length; else run's status, the log not taken.
    One call per VM-epoch for the agent's ``run_epoch_frame``."""
    st = run(g, d, nic, t_end)
    if st == kg.ST_ENDED:
        nb = kg.frame_log(g.ctl, g.log, out)
        if nb:
            return -nb
    return st
