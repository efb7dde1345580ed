"""The NVMe workload's event loop as one compiled call per VM-epoch.

workloads/nvme.py (an NVMe drive and its driver: NVMe Base Specification 1.4 submission and
completion queues, PRP1/PRP2 and PRP list pages; Linux drivers/nvme/host/pci.c nvme_map_data
and nvme_pci_setup_prps, the PRP list pages from a per-queue dma_pool) driven by
VmAgent.run_epoch (vm_agent/agent.py) through the guest DMA API, on arrays: the guest's
state in a GuestArrays (vm_agent/kernels/guest.py), the DMA domain in the compiled driver's
DomainArrays (vm_agent/kernels/dmaapi.py: ``map_sg`` / ``unmap_sg`` as Linux
iommu_dma_map_sg / iommu_dma_unmap_sg, one IOVA range per scatter list), and the drive's
own state in an ``NvmeArrays``: scalar parameters and counters, one row per queue, each
queue's dma_pool of PRP list pages as a stack, and the commands in flight as slots.

Every handler below is the NvmeWorkload method of the same name for the configs
vm_agent/compiled_nvme.py admits (no rogue DMA, one device), with the same guest calls in
the same order: the same random draws from the agent's own np.random.Generator (the size
draw as bisect_right over the same float64 CDF, the read draw, one draw per page boundary
for the scatter list), Python's round() as np.rint (both round half to even), and events
ordered by (time, sequence) with sequence numbers taken in scheduling order. So the op log,
the stats and the workload's counters are the Python path's value for value
(tests/vm_agent/test_compiled_nvme.py runs whole configs both ways and compares the result
tables).

A submission makes several DMA API calls (dma_map_sg, then a dma_alloc_coherent for each
PRP list page its pool lacks), so it runs as steps of at most one call each, its state in
``r``: each step runs only with room for it, else the loop returns ST_ROOM and the call
after the arrays grew goes on from that step (nothing of it done).

The vCPU's start (``vcpu_start``) is the one place where a handler turns an event's time
into the time its vCPU work begins (submission, and the reaping half of a completion).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from vm_agent.kernels import dmaapi
from vm_agent.kernels import guest as kg
from vm_agent.kernels import nic as knic
from vm_agent.kernels.guest import RNG_WORDS, generator_of, rng_words  # noqa: F401 (here before)
from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE
from workloads.nvme import CQE_BYTES, PRP_ENTRY_BYTES, PRPS_PER_LIST_PAGE, SQE_BYTES

# --- event kinds (the NvmeWorkload method, VmAgent.device_dma, or DmaApi._on_timer)
K_SUBMIT = 1         # a0 = q
K_FETCH = 2          # a0 = command slot
K_TRANSFER = 3       # a0 = command slot
K_DMA = 4            # a0 = command slot, a1 = page: the transfer's DMA of that page
K_COMPLETE = 5       # a0 = command slot
K_FQ_TIMER = 6       # a0 = cpu
K_REAP = 7           # a0 = command slot: its reaping, waiting for a stalled vCPU
KIND_OF = {"_submit": K_SUBMIT, "_fetch": K_FETCH, "_transfer": K_TRANSFER,
           "device_dma": K_DMA, "_complete": K_COMPLETE, "_on_timer": K_FQ_TIMER,
           "_reap": K_REAP}

# --- p: int64 parameters and per-run constants
(P_NQ, P_QD, P_IOS, P_READ_NS, P_WRITE_NS, P_PAGE_NS, P_CPU_PER_IO, P_SID, P_PASID,
 P_MAX_PAGES, P_MAX_LISTS) = range(11)
NP = 11
# --- f: float64 parameters
F_READ_FRACTION, F_CONTIGUITY, F_BW = range(3)
NF = 3
# --- w: the workload's counters and scalars (NvmeWorkload's attributes of the same name)
(W_SUBMITTED, W_COMPLETED, W_PRP_LIST_COMMANDS, W_PRP_LIST_PAGES_USED, W_MAX_OUTSTANDING,
 W_MEDIA_FREE_NS, W_CID) = range(7)
W_NAMES = ("submitted", "completed", "prp_list_commands", "prp_list_pages_used",
           "max_outstanding", "_media_free_ns", "_cid")
NW = 7
# --- q: one row per queue (_Queue's fields; the pool's fill)
(Q_CPU, Q_SQ_IOVA, Q_CQ_IOVA, Q_SQ_TAIL, Q_CQ_HEAD, Q_OUTSTANDING, Q_POOL_N,
 Q_POOL_PAGES) = range(8)
NQF = 8
Q_NAMES = ("cpu", "sq_iova", "cq_iova", "sq_tail", "cq_head", "outstanding")
# --- c: one row per command slot (_Command's scalars)
(C_Q, C_CID, C_NBYTES, C_READ, C_GPA, C_SQE, C_T_SUBMIT, C_NSEGS, C_NPAGES,
 C_NLISTS) = range(10)
NCF = 10
# --- r: a submission under way (its step, queue, times, slot, next list page) and the
# free command slots
R_STEP, R_Q, R_T, R_T_START, R_SLOT, R_K, R_FREE_N = range(7)
NR = 7
STEP_NONE, STEP_SUBMIT, STEP_PRP = range(3)

ST_DONE, ST_ROOM, ST_ERR, ST_ENDED = kg.ST_DONE, kg.ST_ROOM, kg.ST_ERR, kg.ST_ENDED
HOT = kg.H_A0 + 2    # heap columns an NVMe event uses: t, seq, kind, a0, a1
E_SLOTS = -2         # C_ERR_ARG with E_DMA: no free command slot (never expected)

# The driver's per-call functions inlined into this loop (see vm_agent/kernels/nic.py: a
# call between compiled functions counts references on every array it is passed).
_map_sg = njit(inline="always")(getattr(dmaapi.map_sg, "py_func", dmaapi.map_sg))
_dma_unmap = njit(inline="always")(getattr(dmaapi.dma_unmap, "py_func", dmaapi.dma_unmap))
_room_ok = njit(inline="always")(getattr(dmaapi.room_ok, "py_func", dmaapi.room_ok))
_device_dma = knic._device_dma     # VmAgent.device_dma (not rogue)
_io_done = knic._io_done           # VmAgent.io_done


class NvmeArrays(NamedTuple):
    """The NVMe workload's state (see the module docstring)."""

    p: np.ndarray         # int64[NP]
    f: np.ndarray         # float64[NF]
    cdf: np.ndarray       # float64[sizes]: SizeSampler.cdf
    sizes: np.ndarray     # int64[sizes + 1]: the sizes, the last once more (clip)
    w: np.ndarray         # int64[NW]
    busy: np.ndarray      # int64[vcpus]: NvmeWorkload._busy_until
    q: np.ndarray         # int64[queues, NQF]
    pool: np.ndarray      # int64[queues, pool_cap, 2]: free PRP list pages (gpa, iova)
    c: np.ndarray         # int64[slots, NCF]
    segs: np.ndarray      # int64[slots, max_pages, 2]: (DMA address, len) per segment
    pages: np.ndarray     # int64[slots, max_pages]: DMA address of each data page
    lists: np.ndarray     # int64[slots, max_lists, 3]: PRP list pages (gpa, iova, entries)
    free: np.ndarray      # int64[slots]: free command slots, a stack (r[R_FREE_N] of them)
    sg: np.ndarray        # int64[max_pages, 2]: the scatter list being built (gpa, len)
    tmp: np.ndarray       # int64[max_pages + 1]: run starts while building it
    out1: np.ndarray      # int64[1, 2]: a coherent page's mapping
    rngp: np.ndarray      # int64[RNG_WORDS]: the agent's Generator's bit generator (rng_words)
    r: np.ndarray         # int64[NR]


def prp_lists(npages: int) -> int:
    """len(workloads.nvme.prp_layout(npages)): the PRP list pages an I/O needs."""
    if npages <= 2:
        return 0
    left = npages - 1
    n = 1
    while left > PRPS_PER_LIST_PAGE:
        n += 1
        left -= PRPS_PER_LIST_PAGE - 1
    return n


# --- guest services ------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _pages(size):
    """VmAgent.alloc_buffer / free_buffer's page count: max(1, ceil(size / PAGE_SIZE))."""
    return max(1, -(-size // PAGE_SIZE))


@njit(cache=True, inline="always")
def vcpu_start(g, nv, cpu, t_ns):
    """When the vCPU work of an event at ``t_ns`` begins: max(t_ns, cpu_free_at(cpu),
    _busy_until[cpu]), as NvmeWorkload._submit and _complete compute it."""
    return max(t_ns, g.busy[cpu % g.busy.shape[0]], nv.busy[cpu])


@njit(cache=True, inline="always")
def _draw_size(nv, rng):
    """SizeSampler.draw: sizes[bisect_right(cdf, rng.random())], clipped to the last."""
    u = rng.random()
    cdf = nv.cdf
    i = 0
    while i < cdf.shape[0] and cdf[i] <= u:   # bisect_right on a non-decreasing CDF
        i += 1
    return nv.sizes[i]


@njit(cache=True, inline="always")
def _scatter(nv, rng, gpa, nbytes):
    """scattered_segments(gpa, nbytes, rng.random(npages - 1), page_contiguity) for a
    page-aligned ``gpa`` into ``nv.sg``: a run of pages ends where a draw is not below the
    contiguity, the runs listed last first; the number of segments."""
    npages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
    sg = nv.sg
    if npages <= 1:                    # rng.random(0) draws nothing
        sg[0, 0] = gpa
        sg[0, 1] = nbytes
        return 1
    contiguity = nv.f[F_CONTIGUITY]
    starts = nv.tmp
    runs = 1
    starts[0] = 0
    for i in range(1, npages):
        if not rng.random() < contiguity:   # a run starts at page i
            starts[runs] = i
            runs += 1
    end = npages
    for k in range(runs):
        s = starts[runs - 1 - k]
        sg[k, 0] = gpa + (s << PAGE_SHIFT)
        sg[k, 1] = min(end << PAGE_SHIFT, nbytes) - (s << PAGE_SHIFT)
        end = s
    return runs


@njit(cache=True, inline="always")
def room_call(g, d):
    """Whether the next step (at most one DMA API call, the device accesses of one event,
    the events it schedules) finds room: the log and heap slack, and the driver's arrays."""
    ctl = g.ctl
    return (ctl[kg.C_LOG_N] + ctl[kg.C_LOG_SLACK] <= g.log.shape[0]
            and ctl[kg.C_HEAP_N] + ctl[kg.C_HEAP_SLACK] <= g.heap.shape[0]
            and _room_ok(g, d))


# --- the handlers (NvmeWorkload's methods) -------------------------------------------------
@njit(cache=True, inline="always")
def submit_begin(nv, t_ns, q):
    """NvmeWorkload._submit is called at ``t_ns`` for queue ``q``: ``submit_steps`` runs it."""
    r = nv.r
    r[R_STEP] = STEP_SUBMIT
    r[R_Q] = q
    r[R_T] = t_ns


@njit(cache=True, inline="always")
def submit_steps(g, d, nv, rng):
    """NvmeWorkload._submit from the step in ``nv.r``: the draws, the buffer, dma_map_sg and
    the command (one step), then each PRP list page from the pool or a new coherent one
    (a step each), then the SQ entry and the doorbell. ST_ROOM before a step without room
    for it (nothing of it done), ST_ERR at an error, ST_DONE once submitted (or not, past
    the ``ios`` limit)."""
    p = nv.p
    w = nv.w
    r = nv.r
    q = r[R_Q]
    qrow = nv.q[q]
    cpu = qrow[Q_CPU]
    if r[R_STEP] == STEP_SUBMIT:
        if p[P_IOS] and w[W_SUBMITTED] >= p[P_IOS]:
            r[R_STEP] = STEP_NONE
            return ST_DONE
        if not room_call(g, d):
            return ST_ROOM
        n_free = r[R_FREE_N]
        if n_free == 0:
            g.ctl[kg.C_ERR] = kg.E_DMA
            g.ctl[kg.C_ERR_ARG] = E_SLOTS
            return ST_ERR
        t = vcpu_start(g, nv, cpu, r[R_T])
        t_start = t
        nbytes = _draw_size(nv, rng)
        read = rng.random() < nv.f[F_READ_FRACTION]
        gpa = kg.mem_alloc(g, _pages(nbytes))
        if gpa < 0:
            return ST_ERR
        nseg = _scatter(nv, rng, gpa, nbytes)
        slot = nv.free[n_free - 1]
        segs = nv.segs[slot]
        _iova, t = _map_sg(g, d, cpu, nv.sg, nseg, DMA_FROM_DEVICE if read else DMA_TO_DEVICE,
                           t, segs, 1)
        if g.ctl[kg.C_ERR]:
            return ST_ERR
        r[R_FREE_N] = n_free - 1
        pages = nv.pages[slot]
        npages = 0
        for i in range(nseg):
            a = segs[i, 0]
            end = a + segs[i, 1]
            while a < end:
                pages[npages] = a
                npages += 1
                a += PAGE_SIZE
        crow = nv.c[slot]
        crow[C_Q] = q
        crow[C_NBYTES] = nbytes
        crow[C_READ] = read
        crow[C_GPA] = gpa
        crow[C_T_SUBMIT] = t_start
        crow[C_NSEGS] = nseg
        crow[C_NPAGES] = npages
        # prp_layout(npages): the entries the device reads from each list page
        nlists = 0
        if npages > 2:
            left = npages - 1
            lists = nv.lists[slot]
            while left > PRPS_PER_LIST_PAGE:
                lists[nlists, 2] = PRPS_PER_LIST_PAGE
                nlists += 1
                left -= PRPS_PER_LIST_PAGE - 1
            lists[nlists, 2] = left
            nlists += 1
        crow[C_NLISTS] = nlists
        r[R_T] = t
        r[R_T_START] = t_start
        r[R_SLOT] = slot
        r[R_K] = 0
        r[R_STEP] = STEP_PRP
    slot = r[R_SLOT]
    crow = nv.c[slot]
    lists = nv.lists[slot]
    pool = nv.pool[q]
    while r[R_K] < crow[C_NLISTS]:       # _prp_page for each list page
        k = r[R_K]
        n = qrow[Q_POOL_N]
        if n:
            lists[k, 0] = pool[n - 1, 0]
            lists[k, 1] = pool[n - 1, 1]
            qrow[Q_POOL_N] = n - 1
        else:                            # dma_alloc_coherent(dev, PAGE_SIZE) at now
            if not room_call(g, d):
                return ST_ROOM
            qrow[Q_POOL_PAGES] += 1
            gpa = kg.mem_alloc(g, 1)
            if gpa < 0:
                return ST_ERR
            sg = nv.sg
            sg[0, 0] = gpa
            sg[0, 1] = PAGE_SIZE
            iova, _t = _map_sg(g, d, 0, sg, 1, 0, g.ctl[kg.C_NOW], nv.out1, 0)
            if g.ctl[kg.C_ERR]:
                return ST_ERR
            lists[k, 0] = gpa
            lists[k, 1] = iova
        r[R_K] = k + 1
    if crow[C_NLISTS]:
        w[W_PRP_LIST_COMMANDS] += 1
        w[W_PRP_LIST_PAGES_USED] += crow[C_NLISTS]
    crow[C_SQE] = qrow[Q_SQ_IOVA] + (qrow[Q_SQ_TAIL] % (p[P_QD] + 1)) * SQE_BYTES
    qrow[Q_SQ_TAIL] += 1
    w[W_CID] += 1
    crow[C_CID] = w[W_CID]
    qrow[Q_OUTSTANDING] += 1
    w[W_SUBMITTED] += 1
    if qrow[Q_OUTSTANDING] > w[W_MAX_OUTSTANDING]:
        w[W_MAX_OUTSTANDING] = qrow[Q_OUTSTANDING]
    t = r[R_T]
    if t > nv.busy[cpu]:
        nv.busy[cpu] = t
    push(g, t, K_FETCH, slot, 0)   # SQ tail doorbell
    r[R_STEP] = STEP_NONE
    return ST_DONE


@njit(cache=True, inline="always")
def _page_ns(nv, size):
    """The time the drive takes for a page of ``size`` bytes at its bandwidth."""
    if size == PAGE_SIZE:
        return nv.p[P_PAGE_NS]
    return max(1, np.int64(np.rint(size * 8 / nv.f[F_BW])))


@njit(cache=True, inline="always")
def push_seq(g, t, seq, kind, a0, a1):
    """guest.heap_push of an event with a sequence number taken earlier (``seq``) and at
    most two arguments (every NVMe event's): the heap's first HOT columns only, sifted up
    by moving parents down into the hole rather than by swapping whole rows."""
    ctl = g.ctl
    h = g.heap
    i = ctl[kg.C_HEAP_N]
    ctl[kg.C_HEAP_N] = i + 1
    while i > 0:
        p = (i - 1) >> 1
        if h[p, 0] < t or (h[p, 0] == t and h[p, 1] < seq):
            break
        for c in range(HOT):
            h[i, c] = h[p, c]
        i = p
    h[i, 0] = t
    h[i, 1] = seq
    h[i, 2] = kind
    h[i, 3] = a0
    h[i, 4] = a1


@njit(cache=True, inline="always")
def push(g, t, kind, a0, a1):
    """guest.heap_push (VmAgent.schedule) of an event with at most two arguments."""
    seq = g.ctl[kg.C_EV_SEQ]
    g.ctl[kg.C_EV_SEQ] = seq + 1
    push_seq(g, t, seq, kind, a0, a1)


@njit(cache=True, inline="always")
def pop(g):
    """guest.heap_pop of the earliest (t, seq) event into ``g.ev`` (its first HOT
    columns), the last row sifted down into the hole; its kind."""
    ctl = g.ctl
    h = g.heap
    ev = g.ev
    for c in range(HOT):
        ev[c] = h[0, c]
    n = ctl[kg.C_HEAP_N] - 1
    ctl[kg.C_HEAP_N] = n
    if n:
        t = h[n, 0]
        seq = h[n, 1]
        i = 0
        while True:
            m = 2 * i + 1
            if m >= n:
                break
            if m + 1 < n and (h[m + 1, 0] < h[m, 0]
                              or (h[m + 1, 0] == h[m, 0] and h[m + 1, 1] < h[m, 1])):
                m += 1
            if t < h[m, 0] or (t == h[m, 0] and seq < h[m, 1]):
                break
            for c in range(HOT):
                h[i, c] = h[m, c]
            i = m
        if i != n:
            for c in range(HOT):
                h[i, c] = h[n, c]
    return ev[2]


@njit(cache=True, inline="always")
def transfer(g, nv, t_ns, slot):
    """NvmeWorkload._transfer: one device DMA event per data page, back to back at the
    drive's bandwidth, then the completion. The page events take their sequence numbers
    here, in order, but only the first enters the heap: each page's event schedules the
    next one when it runs (``page_dmas``), which comes after it in (time, sequence) order,
    so the order of events is the same."""
    crow = nv.c[slot]
    t = max(t_ns, nv.w[W_MEDIA_FREE_NS])
    t0 = t
    nbytes = crow[C_NBYTES]
    read = crow[C_READ]
    npages = crow[C_NPAGES]
    for i in range(npages):
        t += _page_ns(nv, min(PAGE_SIZE, nbytes - (i << PAGE_SHIFT)))
    nv.w[W_MEDIA_FREE_NS] = t
    if not read:
        t += nv.p[P_WRITE_NS]
    ctl = g.ctl
    seq = ctl[kg.C_EV_SEQ]
    ctl[kg.C_EV_SEQ] = seq + npages + 1
    if npages:
        push_seq(g, t0, seq, K_DMA, slot, 0)
    push_seq(g, t, seq + npages, K_COMPLETE, slot, 0)


@njit(cache=True, inline="always")
def page_dmas(g, d, nv, t, seq, slot, i, t_end):
    """The event of page ``i`` of a transfer (VmAgent.device_dma of that page), then each
    next page's at once while it would be the next event of the epoch anyway (before
    ``t_end``, ahead of the heap's top in (time, sequence) order) and the log has room;
    else the next page's event goes into the heap."""
    p = nv.p
    crow = nv.c[slot]
    nbytes = crow[C_NBYTES]
    read = crow[C_READ] != 0
    npages = crow[C_NPAGES]
    pages = nv.pages[slot]
    sid = p[P_SID]
    pasid = p[P_PASID]
    ctl = g.ctl
    h = g.heap
    while True:
        size = min(PAGE_SIZE, nbytes - (i << PAGE_SHIFT))
        _device_dma(g, d, sid, pasid, t, pages[i], size, read)
        i += 1
        if i >= npages:
            return
        t += _page_ns(nv, size)
        seq += 1
        if (t >= t_end or ctl[kg.C_LOG_N] + ctl[kg.C_LOG_SLACK] > g.log.shape[0]
                or (ctl[kg.C_HEAP_N] and (h[0, 0] < t or (h[0, 0] == t and h[0, 1] < seq)))):
            push_seq(g, t, seq, K_DMA, slot, i)
            return
        ctl[kg.C_NOW] = t


@njit(cache=True, inline="always")
def fetch(g, d, nv, t, slot):
    """NvmeWorkload._fetch: the SQ entry and the PRP list pages read, then the media."""
    p = nv.p
    crow = nv.c[slot]
    sid = p[P_SID]
    pasid = p[P_PASID]
    _device_dma(g, d, sid, pasid, t, crow[C_SQE], SQE_BYTES, False)
    lists = nv.lists[slot]
    for k in range(crow[C_NLISTS]):
        _device_dma(g, d, sid, pasid, t, lists[k, 1], lists[k, 2] * PRP_ENTRY_BYTES, False)
    if crow[C_READ]:
        push(g, t + p[P_READ_NS], K_TRANSFER, slot, 0)
    else:
        transfer(g, nv, t, slot)


@njit(cache=True, inline="always")
def complete(g, d, nv, t_ns, slot, t_end):
    """NvmeWorkload._complete up to its _submit: the CQ entry written, then ``reap`` at
    once, or, with the queue's vCPU stalled past the epoch's end (VmAgent.stalled_until),
    a K_REAP event for when it can start (-2: nothing to submit now)."""
    p = nv.p
    qrow = nv.q[nv.c[slot, C_Q]]
    cqe = qrow[Q_CQ_IOVA] + (qrow[Q_CQ_HEAD] % (p[P_QD] + 1)) * CQE_BYTES
    qrow[Q_CQ_HEAD] += 1
    _device_dma(g, d, p[P_SID], p[P_PASID], t_ns, cqe, CQE_BYTES, True)
    cpu = qrow[Q_CPU]
    late = knic.stalled_until(g, cpu, max(t_ns, nv.busy[cpu]), t_end)
    if late:
        push(g, late, K_REAP, slot, 0)
        return -2
    return reap(g, d, nv, t_ns, slot)


@njit(cache=True, inline="always")
def reap(g, d, nv, t_ns, slot):
    """NvmeWorkload._reap up to its _submit: on the queue's vCPU dma_unmap_sg (the
    flush-queue timer it armed scheduled, as DmaApi.unmap_range does), the buffer freed,
    the list pages back to the pool, io_done. The time the vCPU is done (the
    resubmission's time), or -1 at an error."""
    p = nv.p
    w = nv.w
    crow = nv.c[slot]
    q = crow[C_Q]
    qrow = nv.q[q]
    cpu = qrow[Q_CPU]
    t = vcpu_start(g, nv, cpu, t_ns)
    read = crow[C_READ]
    t = _dma_unmap(g, d, cpu, nv.segs[slot, 0, 0], 0,
                   DMA_FROM_DEVICE if read else DMA_TO_DEVICE, t)
    if g.ctl[kg.C_ERR]:
        return -1
    if d.ctl[dmaapi.D_TIMER_NS] >= 0:
        push(g, d.ctl[dmaapi.D_TIMER_NS], K_FQ_TIMER, d.ctl[dmaapi.D_TIMER_CPU], 0)
        d.ctl[dmaapi.D_TIMER_NS] = -1
    nbytes = crow[C_NBYTES]
    kg.mem_free(g, crow[C_GPA], _pages(nbytes))
    lists = nv.lists[slot]
    pool = nv.pool[q]
    for k in range(crow[C_NLISTS]):     # prp_pool.extend(cmd.prp_lists)
        n = qrow[Q_POOL_N]
        pool[n, 0] = lists[k, 0]
        pool[n, 1] = lists[k, 1]
        qrow[Q_POOL_N] = n + 1
    t += p[P_CPU_PER_IO]
    _io_done(g, nbytes, t - crow[C_T_SUBMIT])
    qrow[Q_OUTSTANDING] -= 1
    w[W_COMPLETED] += 1
    if t > nv.busy[cpu]:
        nv.busy[cpu] = t
    r = nv.r
    nv.free[r[R_FREE_N]] = slot
    r[R_FREE_N] += 1
    return t


# --- the loop ------------------------------------------------------------------------------
@njit(cache=True)
def run(g, d, nv, t_end):
    """VmAgent.run_epoch's loop: every event before ``t_end`` in (time, sequence) order.

    Each event, and each step of a submission (at most one DMA API call), runs only with
    room for it; else ST_ROOM, nothing of it done: the caller grows the arrays
    (guest.grown, dmaapi.grown) and calls again, which goes on where this stopped. ST_ERR
    if an event raised (ctl[C_ERR]). Once the next event is at ``t_end`` or later,
    nic.end_here: ST_ENDED (the epoch ended), or ST_DONE (the caller ends it)."""
    g = kg.borrowed(g)                     # no reference counting inside the loop
    d = kg.borrowed(d)
    nv = kg.borrowed(nv)
    rng = generator_of(nv.rngp)            # the agent's Generator (rng_words)
    ctl = g.ctl
    ev = g.ev
    r = nv.r
    while True:
        if r[R_STEP] != STEP_NONE:         # a submission under way (begun, or stopped)
            st = submit_steps(g, d, nv, rng)
            if st != ST_DONE:
                return st
        if ctl[kg.C_HEAP_N] == 0 or g.heap[0, 0] >= t_end:
            break
        if not room_call(g, d):
            return ST_ROOM
        kind = pop(g)
        t = ev[kg.H_T]
        ctl[kg.C_NOW] = t
        a = kg.H_A0
        if kind == K_DMA:
            page_dmas(g, d, nv, t, ev[kg.H_SEQ], ev[a], ev[a + 1], t_end)
        elif kind in (K_COMPLETE, K_REAP):
            slot = ev[a]
            q = nv.c[slot, C_Q]
            if kind == K_COMPLETE:
                t1 = complete(g, d, nv, t, slot, t_end)
            else:
                t1 = reap(g, d, nv, t, slot)
            if t1 >= 0:
                submit_begin(nv, t1, q)    # _reap calls _submit at once
        elif kind == K_FETCH:
            fetch(g, d, nv, t, ev[a])
        elif kind == K_TRANSFER:
            transfer(g, nv, t, ev[a])
        elif kind == K_SUBMIT:
            submit_begin(nv, t, ev[a])     # its steps run at the top of the loop
        elif kind == K_FQ_TIMER:
            dmaapi.fq_timer(g, d, ev[a])
        else:
            ctl[kg.C_ERR] = kg.E_DMA
            ctl[kg.C_ERR_ARG] = kind
        if ctl[kg.C_ERR]:
            return ST_ERR
    return knic.end_here(g, d, t_end)


knic._stamp_with(run, dmaapi, kg, knic, dmaapi.kfq, dmaapi.kiova, dmaapi.kpg)


@njit(cache=True)
def epoch(g, d, nv, t_end, out):
    """``run``, then, where the epoch ended in that call (ST_ENDED) and its frame fits in
    ``out``, the epoch's batch taken as protocol.pack_ops's frame into ``out``
    (guest.frame_log): minus the frame's length; else run's status, the log not taken.
    One call per VM-epoch for the agent's ``run_epoch_frame``."""
    st = run(g, d, nv, t_end)
    if st == kg.ST_ENDED:
        nb = kg.frame_log(g.ctl, g.log, out)
        if nb:
            return -nb
    return st
