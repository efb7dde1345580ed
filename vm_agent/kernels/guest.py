"""One guest's hot state as arrays, for a whole-VM-epoch compiled kernel: the foundation.

A VmAgent (vm_agent/agent.py) keeps its guest state in Python objects; a compiled event
loop (vm_agent/kernels/nic.py) and the compiled IOMMU driver it calls
(vm_agent/kernels/dmaapi.py) work instead on the arrays of one ``GuestArrays``:

- ``ctl``: scalars at the C_* offsets (the op log's fill and first sequence number, the
  vCPU count, the current event time, an error code and its argument, the event heap's fill
  and sequence counter, the page allocator's bump pointer and frame count ...);
- ``stats``: one slot per vm_agent.agent.GUEST_COUNTERS name, in that order (S_*);
- ``busy``: each vCPU's busy-until time (VmAgent.busy_until);
- ``log``: the epoch's host operations, one row of OpLog's eight ints each (t_ns, op, sid,
  pasid, a0, a1, a2, a3; a0/a1 as their 64-bit patterns); ``take_log`` turns the used rows
  into OpLog.take's OP_DTYPE batch;
- the guest page allocator (vm_agent/memory.py GuestMemory: a power-of-two free list per
  order, popped from its end, over a bump pointer) as one flat array ``fl`` with a segment
  of ``(frames >> k) + 1`` slots per order ``k`` (distinct free blocks of order k are at
  most that many: they are aligned and disjoint), offsets ``fl_off`` and fills ``fl_n``;
- the event heap (VmAgent.schedule / run_epoch: heapq ordered by (time, sequence)) as rows
  ``heap[i] = (t, seq, kind, a0..a8)``, a binary min-heap on (t, seq); ``ev`` holds the
  row ``heap_pop`` took.

Capacities: no kernel here grows an array. The event loop checks before each event that
``log`` and ``heap`` have at least ``ctl[C_LOG_SLACK]`` / ``ctl[C_HEAP_SLACK]`` rows free
and otherwise returns ST_ROOM; Python grows them (``grown``) and calls again. An error the
Python path would raise (GuestMemoryError, DmaError) sets ``ctl[C_ERR]`` and its argument;
the loop returns ST_ERR and ``raise_error`` raises the same exception with the same text.

Checked against GuestMemory and OpLog by tests/vm_agent/test_kernel_guest.py.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from host_iommu.defs import PAGE_SHIFT
from host_iommu.protocol import OP_DTYPE, OpLog

# --- ctl offsets
C_LOG_N = 0         # rows of ``log`` used this epoch
C_SEQ0 = 1          # OpLog.seq0: the sequence number of row 0
C_VCPUS = 2         # vCPUs
C_NOW = 3           # the current event time (VmAgent.now)
C_ERR = 4           # 0, or an E_* code: the exception Python raises
C_ERR_ARG = 5       # its argument (pages asked for, the device's sid ...)
C_HEAP_N = 6        # rows of ``heap`` in use
C_EV_SEQ = 7        # the next event's sequence number (VmAgent._event_seq)
C_NEXT_FRAME = 8    # GuestMemory.next_frame
C_FRAMES = 9        # GuestMemory.frames
C_USED_PAGES = 10   # GuestMemory.used_pages
C_LOG_SLACK = 11    # log rows that must be free before an event runs
C_HEAP_SLACK = 12   # heap rows that must be free before an event runs
C_VM = 13           # the VM id (the batch's vm column)
C_EPOCH_NS = 14     # VmAgent.epoch_ns: the length of the last epoch run
C_SPARE = 15        # first of the slots left for the driver kernels
NCTL = 32

# --- stats slots: vm_agent.agent.GUEST_COUNTERS, in order (checked by the test)
(S_MAPS, S_UNMAPS, S_VM_EXITS, S_VMM_MAP_CALLS, S_VMM_UNMAP_CALLS, S_VMM_INVALIDATE_CALLS,
 S_INV_DESCRIPTORS, S_PTE_WRITES, S_IOS, S_BYTES, S_IO_LATENCY_SUM_NS, S_CPU_BUSY_NS,
 S_DMA_REQUESTS, S_ROGUE_DMA, S_LAZY_FLUSHES, S_IOMMU_MAP_EVENTS, S_DMA_API_ERRORS,
 S_GUEST_FAULTS_REPORTED, S_BALLOON_PAGES, S_QI_ERRORS, S_DMA_MAP_ERRORS,
 S_UNMAP_QI_WAIT_NS) = range(22)
NSTATS = 22

# --- log columns (OpLog's row)
L_T_NS, L_OP, L_SID, L_PASID, L_A0, L_A1, L_A2, L_A3 = range(OpLog.ROW)
LOG_COLUMNS = OpLog.ROW

# --- heap columns
H_T, H_SEQ, H_KIND, H_A0 = 0, 1, 2, 3
H_ARGS = 9           # a0..a8
HEAP_COLUMNS = H_A0 + H_ARGS

# --- what an event loop returns
ST_DONE = 0          # every event before t_end ran
ST_ROOM = 1          # stopped before an event: grow log / heap and call again
ST_ERR = 2           # stopped at an error (ctl[C_ERR]): raise_error
ST_ENDED = 4         # ST_DONE, and the epoch ended in the same call (kernels/nic.py end_here)

# --- error codes (ctl[C_ERR])
E_OK = 0
E_MEM = 1            # GuestMemoryError: guest memory exhausted (arg: pages asked for)
E_IOVA = 2           # DmaError: IOVA space exhausted (arg: the domain's sid)
E_DMA = 3            # DmaError of another kind (arg: the driver's own detail)

ORDERS = 64          # free-list orders kept (an int64 frame count has at most 63 bits)


class GuestArrays(NamedTuple):
    """One guest's hot state (see the module docstring); numba takes it as one argument."""

    ctl: np.ndarray      # int64[NCTL]
    stats: np.ndarray    # int64[NSTATS]
    busy: np.ndarray     # int64[vcpus]
    log: np.ndarray      # int64[cap, 8]
    fl: np.ndarray       # int64[sum of segments]: the free lists' frames
    fl_off: np.ndarray   # int64[ORDERS + 1]: segment k is fl[fl_off[k]:fl_off[k + 1]]
    fl_n: np.ndarray     # int64[ORDERS]: frames in free list k
    heap: np.ndarray     # int64[cap, HEAP_COLUMNS]
    ev: np.ndarray       # int64[HEAP_COLUMNS]: the row heap_pop took


# --- the agent's random stream -------------------------------------------------------------
RNG_WORDS = 6    # numba's BitGenerator model: state address, state, next_uint64/32/double, self


def rng_words(rng: np.random.Generator) -> np.ndarray:
    """What numba reads of ``rng`` when it is passed to a compiled function (its bit
    generator's ctypes interface: state and function pointers), read once here: passing
    the Generator itself costs ~6 us a call (numba casts its three function pointers
    through ctypes each time), more than the rest of the call. Valid while ``rng`` lives;
    read again after unpickling."""
    ct = rng.bit_generator.ctypes

    def ptr(f) -> int:
        return ctypes.cast(f, ctypes.c_void_p).value or 0
    words = [ct.state_address, ct.state.value or 0, ptr(ct.next_uint64),
             ptr(ct.next_uint32), ptr(ct.next_double), ct.bit_generator.value or 0]
    return np.array(words, np.uint64).view(np.int64)


@intrinsic
def generator_of(typingctx, words):
    """The np.random.Generator (numba's value of it: the same draws from the same state)
    over the bit generator ``rng_words`` read, with no Python object behind it (never
    returned to Python) and no reference counted."""
    if not (isinstance(words, types.Array) and words.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, value=args[0])

        def word(i):
            at = builder.gep(arr.data, [context.get_constant(types.intp, i)])
            return builder.load(at)     # int64 and uintp: the same 64-bit word
        bg = cgutils.create_struct_proxy(types.NumPyRandomBitGeneratorType("bit_generator"))(
            context, builder)
        for i, name in enumerate(("state_address", "state", "fnptr_next_uint64",
                                  "fnptr_next_uint32", "fnptr_next_double", "bit_generator")):
            setattr(bg, name, word(i))
        gen = cgutils.create_struct_proxy(sig.return_type)(context, builder)
        gen.bit_generator = bg._getvalue()
        return gen._getvalue()
    return types.npy_rng(words), codegen


def _segments(frames: int) -> np.ndarray:
    sizes = np.array([(frames >> k) + 1 for k in range(ORDERS)], dtype=np.int64)
    off = np.zeros(ORDERS + 1, dtype=np.int64)
    np.cumsum(sizes, out=off[1:])
    return off


def new_arrays(vm: int, vcpus: int, frames: int, *, log_rows: int = 1024,
               heap_rows: int = 256) -> GuestArrays:
    """Empty state: no operation logged, no event, every frame above the bump pointer."""
    off = _segments(frames)
    g = GuestArrays(ctl=np.zeros(NCTL, np.int64), stats=np.zeros(NSTATS, np.int64),
                    busy=np.zeros(vcpus, np.int64),
                    log=np.zeros((log_rows, LOG_COLUMNS), np.int64),
                    fl=np.zeros(int(off[-1]), np.int64), fl_off=off,
                    fl_n=np.zeros(ORDERS, np.int64),
                    heap=np.zeros((heap_rows, HEAP_COLUMNS), np.int64),
                    ev=np.zeros(HEAP_COLUMNS, np.int64))
    g.ctl[C_VCPUS] = vcpus
    g.ctl[C_FRAMES] = frames
    g.ctl[C_VM] = vm
    return g


def grown(g: GuestArrays) -> GuestArrays:
    """``g`` with ``log`` and ``heap`` grown (doubled, or more) until each has its slack
    free; the same dtypes and C order, so no kernel compiles again."""
    ctl = g.ctl
    log, heap = g.log, g.heap
    need = int(ctl[C_LOG_N] + ctl[C_LOG_SLACK])
    if need > log.shape[0]:
        log = np.zeros((max(need, 2 * log.shape[0]), LOG_COLUMNS), np.int64)
        n = int(ctl[C_LOG_N])
        log[:n] = g.log[:n]
    need = int(ctl[C_HEAP_N] + ctl[C_HEAP_SLACK])
    if need > heap.shape[0]:
        heap = np.zeros((max(need, 2 * heap.shape[0]), HEAP_COLUMNS), np.int64)
        n = int(ctl[C_HEAP_N])
        heap[:n] = g.heap[:n]
    return g._replace(log=log, heap=heap)


def has_room(g: GuestArrays) -> bool:
    """Whether ``log`` and ``heap`` have their slack free (what the loop checks)."""
    ctl = g.ctl
    return bool(ctl[C_LOG_N] + ctl[C_LOG_SLACK] <= g.log.shape[0]
                and ctl[C_HEAP_N] + ctl[C_HEAP_SLACK] <= g.heap.shape[0])


# --- borrowed arrays ----------------------------------------------------------------------
@intrinsic
def borrowed(typingctx, tup):
    """The same namedtuple (or tuple) of arrays, each array without its reference count:
    the same data, shape and strides, no meminfo.

    Every compiled call that is passed a tuple of arrays, and every read of one of its
    fields, increfs and later decrefs each array it holds: an atomic operation each
    (about 280 ns for a call with a 12-array tuple, 90% of a whole-epoch loop's time).
    A borrowed array's references are no-ops. The caller keeps the real arrays alive for
    the call (the loop never reallocates them: it stops for room and Python grows them)."""
    if not isinstance(tup, types.BaseTuple) or not all(
            isinstance(t, types.Array) for t in tup.types):
        return None

    def codegen(context, builder, sig, args):
        out = context.get_constant_undef(sig.return_type)
        for i, ty in enumerate(sig.args[0].types):
            src = context.make_array(ty)(context, builder, value=builder.extract_value(
                args[0], i))
            dst = context.make_array(ty)(context, builder)
            context.populate_array(dst, data=src.data, shape=src.shape, strides=src.strides,
                                   itemsize=src.itemsize, meminfo=None)
            out = builder.insert_value(out, dst._getvalue(), i)
        return out
    return tup(tup), codegen


# --- the op log ---------------------------------------------------------------------------
@njit(cache=True, inline="always")
def log_row(ctl, log, t, op, sid, pasid, a0, a1, a2, a3):
    """log_add over the arrays themselves (``g.ctl``, ``g.log``), for kernels that are
    handed arrays rather than the namedtuple."""
    i = ctl[C_LOG_N]
    row = log[i]
    row[0] = t
    row[1] = op
    row[2] = sid
    row[3] = pasid
    row[4] = a0
    row[5] = a1
    row[6] = a2
    row[7] = a3
    ctl[C_LOG_N] = i + 1
    return i


@njit(cache=True, inline="always")
def log_add(g, t, op, sid, pasid, a0, a1, a2, a3):
    """OpLog.add: append one row; its index (sequence number ctl[C_SEQ0] + index). The
    caller's slack guarantees the room."""
    return log_row(g.ctl, g.log, t, op, sid, pasid, a0, a1, a2, a3)


# OP_DTYPE's packed layout, which _pack writes byte by byte (checked at import)
_OP_LAYOUT = (("t_ns", 0, 8), ("vm", 8, 4), ("seq", 12, 8), ("op", 20, 1), ("sid", 21, 2),
              ("pasid", 23, 4), ("a0", 27, 8), ("a1", 35, 8), ("a2", 43, 8), ("a3", 51, 8))
assert OP_DTYPE.itemsize == 59 and all(
    OP_DTYPE.fields[n][1] == at and OP_DTYPE.fields[n][0].itemsize == nb
    and OP_DTYPE.fields[n][0].byteorder in "<|=" for n, at, nb in _OP_LAYOUT), OP_DTYPE


@njit(cache=True)
def _put(out, at, v, nbytes):
    """The low ``nbytes`` bytes of ``v`` at out[at:], little-endian (numpy's cast to a
    field of that width keeps the same bytes)."""
    for k in range(nbytes):
        out[at + k] = (v >> (8 * k)) & 0xFF


@njit(cache=True)
def _pack(log, n, vm, seq0, out):
    """OP_DTYPE records (``out``: their bytes) of log rows 0..n-1, sequence numbers from
    ``seq0``."""
    for i in range(n):
        b = i * 59
        _put(out, b, log[i, L_T_NS], 8)
        _put(out, b + 8, vm, 4)
        _put(out, b + 12, seq0 + i, 8)
        out[b + 20] = log[i, L_OP] & 0xFF
        _put(out, b + 21, log[i, L_SID], 2)
        _put(out, b + 23, log[i, L_PASID], 4)
        _put(out, b + 27, log[i, L_A0], 8)
        _put(out, b + 35, log[i, L_A1], 8)
        _put(out, b + 43, log[i, L_A2], 8)
        _put(out, b + 51, log[i, L_A3], 8)


def take_log(g: GuestArrays) -> np.ndarray:
    """OpLog.take: the epoch's rows as a new OP_DTYPE batch; the log starts empty again."""
    ctl = g.ctl
    n = int(ctl[C_LOG_N])
    seq0 = int(ctl[C_SEQ0])
    buf = np.empty(n * OP_DTYPE.itemsize, np.uint8)   # the records' bytes: a structured
    if n:                                              # array's .view(np.uint8) costs ~1 us
        _pack(g.log, n, int(ctl[C_VM]), seq0, buf)
    ctl[C_LOG_N] = 0
    ctl[C_SEQ0] = seq0 + n
    return np.frombuffer(buf, dtype=OP_DTYPE)


# --- the epoch's batch as its wire frame ------------------------------------------------
# protocol.pack_ops's msgpack frame, {"dtype": "OP_DTYPE/1", "n": n, "data": records}: a map
# of three, the fixstr keys and format, n as msgpack's smallest unsigned int, the records as
# bin 8/16/32 (checked against msgpack at import and by tests/vm_agent/test_guest_fixed_frame.py)
FRAME_PREFIX = b"\x83\xa5dtype\xaaOP_DTYPE/1\xa1n"
FRAME_DATA_KEY = b"\xa4data"
FRAME_HEAD_MAX = len(FRAME_PREFIX) + 9 + len(FRAME_DATA_KEY) + 5   # the longest header
_PREFIX = np.frombuffer(FRAME_PREFIX, np.uint8).copy()
_DATA_KEY = np.frombuffer(FRAME_DATA_KEY, np.uint8).copy()


@njit(cache=True, inline="always")
def _put_be(out, at, v, nbytes):
    """The low ``nbytes`` bytes of ``v`` at out[at:], big-endian (msgpack's order)."""
    for k in range(nbytes):
        out[at + k] = (v >> (8 * (nbytes - 1 - k))) & 0xFF
    return at + nbytes


@njit(cache=True, inline="always")
def _put_uint(out, at, v, small, tag8, tag16, tag32, tag64):
    """msgpack's shortest form of the unsigned ``v``: itself below ``small`` (a fixint; 0
    for none), else a tag byte and 1, 2, 4 or 8 big-endian bytes (tag64 -1: none)."""
    if v < small:
        out[at] = v
        return at + 1
    if v < 0x100:
        out[at] = tag8
        return _put_be(out, at + 1, v, 1)
    if v < 0x10000:
        out[at] = tag16
        return _put_be(out, at + 1, v, 2)
    if v < 0x1_0000_0000 or tag64 < 0:
        out[at] = tag32
        return _put_be(out, at + 1, v, 4)
    out[at] = tag64
    return _put_be(out, at + 1, v, 8)


@njit(cache=True, inline="always")
def frame_log(ctl, log, out):
    """take_log then protocol.pack_ops, into ``out`` (uint8): the frame's length; 0 when it
    does not fit in ``out``, nothing taken then."""
    n = ctl[C_LOG_N]
    nb = n * 59
    if FRAME_HEAD_MAX + nb > out.size:
        return 0
    at = 0
    for k in range(_PREFIX.size):
        out[at] = _PREFIX[k]
        at += 1
    at = _put_uint(out, at, n, 0x80, 0xCC, 0xCD, 0xCE, 0xCF)
    for k in range(_DATA_KEY.size):
        out[at] = _DATA_KEY[k]
        at += 1
    at = _put_uint(out, at, nb, 0, 0xC4, 0xC5, 0xC6, -1)
    seq0 = ctl[C_SEQ0]
    if n:
        _pack(log, n, ctl[C_VM], seq0, out[at:])
    ctl[C_LOG_N] = 0
    ctl[C_SEQ0] = seq0 + n
    return at + nb


@njit(cache=True)
def take_frame(ctl, log, out):
    """``frame_log`` as its own call (the epoch kernels inline it)."""
    return frame_log(ctl, log, out)


def frame_bytes(n: int) -> int:
    """The bytes ``frame_log`` needs in ``out`` for ``n`` rows."""
    return FRAME_HEAD_MAX + 59 * n


def load_log(g: GuestArrays, log: OpLog) -> GuestArrays:
    """The rows an OpLog holds (set-up's, not yet taken) moved into ``g``; the OpLog is left
    empty with its seq0 advanced past them (it logs no more). Returns ``g``, grown to fit."""
    rows = log.rows
    n = len(rows) // OpLog.ROW
    ctl = g.ctl
    ctl[C_SEQ0] = log.seq0
    ctl[C_LOG_N] = 0
    if n > g.log.shape[0]:
        g = g._replace(log=np.zeros((n, LOG_COLUMNS), np.int64))
    if n:
        a = np.array([x & 0xFFFF_FFFF_FFFF_FFFF for x in rows], dtype=np.uint64)
        g.log[:n] = a.view(np.int64).reshape(n, LOG_COLUMNS)
    ctl[C_LOG_N] = n
    log.rows = []
    log.seq0 += n
    return g


# --- the guest page allocator (GuestMemory.alloc / free) ---------------------------------
@njit(cache=True, inline="always")
def _order(npages):
    """GuestMemory._order: max(0, (npages - 1).bit_length())."""
    x = npages - 1
    if x < 0:
        x = -x            # int.bit_length() of a negative number counts |x|'s bits
    k = 0
    while x:
        x >>= 1
        k += 1
    return k


@njit(cache=True, inline="always")
def mem_alloc(g, npages):
    """GuestMemory.alloc: the GPA of 2^order aligned pages; -1 with C_ERR = E_MEM (arg
    ``npages``) where GuestMemory raises GuestMemoryError, changing nothing."""
    ctl = g.ctl
    order = _order(npages)
    n = g.fl_n[order]
    if n:
        frame = g.fl[g.fl_off[order] + n - 1]
        g.fl_n[order] = n - 1
    else:
        size = np.int64(1) << order
        frame = -(-ctl[C_NEXT_FRAME] // size) * size
        if frame + size > ctl[C_FRAMES]:
            ctl[C_ERR] = E_MEM
            ctl[C_ERR_ARG] = npages
            return -1
        ctl[C_NEXT_FRAME] = frame + size
    ctl[C_USED_PAGES] += np.int64(1) << order
    return frame << PAGE_SHIFT


@njit(cache=True, inline="always")
def mem_free(g, gpa, npages):
    """GuestMemory.free: push the frame on its order's free list."""
    order = _order(npages)
    n = g.fl_n[order]
    g.fl[g.fl_off[order] + n] = gpa >> PAGE_SHIFT
    g.fl_n[order] = n + 1
    g.ctl[C_USED_PAGES] -= np.int64(1) << order


def load_memory(g: GuestArrays, mem) -> None:
    """GuestMemory ``mem``'s allocator state copied into ``g`` (frames must match)."""
    ctl = g.ctl
    if int(ctl[C_FRAMES]) != mem.frames:
        raise ValueError(f"arrays for {int(ctl[C_FRAMES])} frames, memory of {mem.frames}")
    ctl[C_NEXT_FRAME] = mem.next_frame
    ctl[C_USED_PAGES] = mem.used_pages
    g.fl_n[:] = 0
    for order, frames in mem.free_lists.items():
        cap = int(g.fl_off[order + 1] - g.fl_off[order])
        if len(frames) > cap:
            raise ValueError(f"free list of order {order} holds {len(frames)} > {cap}")
        g.fl[g.fl_off[order]:g.fl_off[order] + len(frames)] = frames
        g.fl_n[order] = len(frames)


def store_memory(g: GuestArrays, mem) -> None:
    """``g``'s allocator state written back into GuestMemory ``mem`` (lists per order that
    ``mem`` had, or that are non-empty now)."""
    mem.next_frame = int(g.ctl[C_NEXT_FRAME])
    mem.used_pages = int(g.ctl[C_USED_PAGES])
    for order in range(ORDERS):
        n = int(g.fl_n[order])
        if n or order in mem.free_lists:
            mem.free_lists[order] = g.fl[g.fl_off[order]:g.fl_off[order] + n].tolist()


# --- the event heap (VmAgent.schedule / run_epoch) ----------------------------------------
@njit(cache=True, inline="always")
def _less(h, i, j):
    return h[i, 0] < h[j, 0] or (h[i, 0] == h[j, 0] and h[i, 1] < h[j, 1])


@njit(cache=True, inline="always")
def _swap(h, i, j):
    for c in range(h.shape[1]):
        x = h[i, c]
        h[i, c] = h[j, c]
        h[j, c] = x


@njit(cache=True, inline="always")
def heap_push(g, t, kind, a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """VmAgent.schedule: push event ``kind`` at ``t`` with the next sequence number."""
    ctl = g.ctl
    h = g.heap
    i = ctl[C_HEAP_N]
    h[i, 0] = t
    h[i, 1] = ctl[C_EV_SEQ]
    h[i, 2] = kind
    h[i, 3] = a0
    h[i, 4] = a1
    h[i, 5] = a2
    h[i, 6] = a3
    h[i, 7] = a4
    h[i, 8] = a5
    h[i, 9] = a6
    h[i, 10] = a7
    h[i, 11] = a8
    ctl[C_EV_SEQ] += 1
    ctl[C_HEAP_N] = i + 1
    while i > 0:
        p = (i - 1) >> 1
        if _less(h, i, p):
            _swap(h, i, p)
            i = p
        else:
            break


@njit(cache=True)
def heap_top_t(g):
    """The earliest event's time, or the largest int64 with none."""
    if g.ctl[C_HEAP_N] == 0:
        return np.iinfo(np.int64).max
    return g.heap[0, 0]


@njit(cache=True, inline="always")
def heap_pop(g):
    """Pop the earliest (t, seq) event into ``g.ev``; its kind."""
    ctl = g.ctl
    h = g.heap
    ev = g.ev
    for c in range(h.shape[1]):
        ev[c] = h[0, c]
    n = ctl[C_HEAP_N] - 1
    ctl[C_HEAP_N] = n
    if n:
        for c in range(h.shape[1]):
            h[0, c] = h[n, c]
        i = 0
        while True:
            lo = 2 * i + 1
            if lo >= n:
                break
            m = lo
            if lo + 1 < n and _less(h, lo + 1, lo):
                m = lo + 1
            if _less(h, m, i):
                _swap(h, m, i)
                i = m
            else:
                break
    return ev[2]


# --- errors -------------------------------------------------------------------------------
def raise_error(g: GuestArrays) -> None:
    """Raise what the Python path raises for ``ctl[C_ERR]`` (nothing when it is 0)."""
    code, arg = int(g.ctl[C_ERR]), int(g.ctl[C_ERR_ARG])
    if code == E_OK:
        return
    if code == E_MEM:
        from vm_agent.memory import GuestMemoryError
        raise GuestMemoryError(f"guest memory exhausted allocating {arg} pages "
                               f"({int(g.ctl[C_FRAMES])} frames): raise vm.memory_mib")
    from vm_agent.dma import DmaError
    if code == E_IOVA:
        raise DmaError(f"IOVA space exhausted for device {arg:#06x}")
    raise DmaError(f"DMA API error {code} ({arg})")
