"""The security oracle: was a DMA allowed to reach the page it reached?

Every DMA carries, from the guest, the id of the unmap that last covered
its target page (or -1 while the page is mapped). A DMA that the IOMMU let through after that
unmap *returned* is stale: the device used a translation the guest had already torn down (a
lazily flushed IOTLB entry, a device-TLB entry, or a missing invalidation). Its window is the
virtual time from the unmap's return to the DMA. The return time of a strict unmap is the later
of the guest's own return and the host's completion of the invalidation it caused (a VFIO
unmap or an IOMMU_HWPT_INVALIDATE blocks until then). Cross-VM DMA (reaching a frame the VM
does not own) is checked by the caller against the frame owner map.

Return times are held per VM in a numpy array indexed by unmap id (a guest numbers its
unmaps 0, 1, 2, ...): 8 bytes per unmap, and the check is one gather per VM. Ids far outside
that dense range (a hostile guest's) go to a small dict, so no id can make the array grow
beyond twice the unmaps seen. State stays bounded when the guest retires unmap ids
(``retire``): an id no page carries any more (each page it covered was mapped again or
covered by a later unmap) can never be asked about again, so dropping it changes no result;
a retired prefix of the array is cut off.

``ArrayOracle`` is the same oracle, method for method (it runs ``_VmTimes``' own code), with
every VM's dense array held as a segment of one shared int64 buffer and every spilled id in
one open-addressing table (``FlatTimes``; host_iommu/kernels/oracle.py), so that
a compiled kernel (host_iommu/kernels/epoch.py) can read and record return times of any VM;
``Oracle`` stays the plain form it is tested against (tests/host_iommu/test_oracle_arrays.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from host_iommu.kernels import oracle as ko

_NONE = -1          # no return time recorded
_MIN_TRIM = 1024    # cut a retired prefix once it is at least this long and half the array


class _VmTimes:
    """One VM's return times: ``ret[i]`` for unmap id ``base + i``; others in ``spill``."""

    __slots__ = ("base", "ret", "spill")

    def __init__(self) -> None:
        self.base = 0
        self.ret = np.full(0, _NONE, dtype=np.int64)
        self.spill: dict[int, int] = {}

    def get(self, uid: int) -> int:
        i = uid - self.base
        if 0 <= i < self.ret.size:
            return int(self.ret[i])
        return self.spill.get(uid, _NONE)

    def set_max(self, uid: int, t_ns: int) -> None:
        i = uid - self.base
        if self.ret.size <= i < 2 * self.ret.size + 4096:   # the dense range grows by doubling
            grown = np.full(max(2 * self.ret.size, i + 1), _NONE, dtype=np.int64)
            grown[:self.ret.size] = self.ret
            self.ret = grown
        if 0 <= i < self.ret.size:
            self.ret[i] = max(max(int(self.ret[i]), 0), t_ns)
        else:
            self.spill[uid] = max(max(self.spill.get(uid, _NONE), 0), t_ns)

    def drop_many(self, uids: np.ndarray) -> int:
        """``drop`` for every id of ``uids`` (int64, each at most once); how many were held."""
        i = uids - self.base
        inside = (i >= 0) & (i < self.ret.size)
        j = i[inside]
        held = int((self.ret[j] != _NONE).sum())
        self.ret[j] = _NONE
        if self.spill:
            held += sum(self.spill.pop(int(u), None) is not None for u in uids[~inside])
        return held

    def trim(self) -> None:
        """Cut the leading ids that hold nothing (a later time for one goes to ``spill``).

        A few long-lived ids (an IOVA page no map reuses for long) must not pin the prefix:
        once the first half of the array holds at most 1/16 of its slots, those entries move
        to ``spill`` and the half is cut, so the array spans O(held ids), not the run.
        """
        held = np.flatnonzero(self.ret != _NONE)
        k = int(held[0]) if held.size else self.ret.size
        if k < _MIN_TRIM or 2 * k < self.ret.size:
            half = self.ret.size // 2
            few = held[:np.searchsorted(held, half)]
            if half < _MIN_TRIM or 16 * few.size > half:
                return
            for i in few.tolist():
                self.spill[self.base + i] = int(self.ret[i])
            k = half
        self.ret = self.ret[k:].copy()
        self.base += k

    def lookup(self, uid: np.ndarray) -> np.ndarray:
        i = uid - self.base
        inside = (i >= 0) & (i < self.ret.size)
        out = np.full(uid.size, _NONE, dtype=np.int64)
        out[inside] = self.ret[i[inside]]
        if self.spill:
            for j in np.flatnonzero(~inside).tolist():
                out[j] = self.spill.get(int(uid[j]), _NONE)
        return out

    def entries(self) -> Iterator[tuple[int, int]]:
        for i in np.flatnonzero(self.ret != _NONE).tolist():
            yield self.base + i, int(self.ret[i])
        yield from self.spill.items()


class ReturnTimes(Mapping):
    """Read-only view of the recorded return times as a mapping (vm, unmap id) -> t_ns."""

    def __init__(self, vms: dict[int, _VmTimes]) -> None:
        self._vms = vms

    def __getitem__(self, key: tuple[int, int]) -> int:
        vm, uid = key
        times = self._vms.get(vm)
        t = _NONE if times is None or uid < 0 else times.get(uid)
        if t == _NONE:
            raise KeyError(key)
        return t

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for vm in sorted(self._vms):
            for uid, _t in self._vms[vm].entries():
                yield vm, uid

    def __len__(self) -> int:
        return sum(int((v.ret != _NONE).sum()) + len(v.spill) for v in self._vms.values())


class Oracle:
    """Unmap return times per (vm, unmap id), and the stale check for a batch of DMAs."""

    def __init__(self) -> None:
        self._vms: dict[int, _VmTimes] = {}
        self.returned = ReturnTimes(self._vms)

    def returned_at(self, vm: int, unmap_id: int) -> int | None:
        """``returned.get((vm, unmap_id))``: the recorded return time, or None."""
        times = self._vms.get(vm)
        if times is None or unmap_id < 0:
            return None
        t = times.get(unmap_id)
        return None if t == _NONE else t

    def unmap_returned(self, vm: int, unmap_id: int, t_ns: int) -> None:
        if unmap_id < 0:
            return
        times = self._vms.get(vm)
        if times is None:
            times = self._vms[vm] = self._new_times(vm)
        times.set_max(int(unmap_id), int(t_ns))

    def _new_times(self, vm: int) -> _VmTimes:
        """A VM's first return time: its record (ArrayOracle keeps it in a shared buffer)."""
        return _VmTimes()

    def retire(self, vm: int, unmap_ids: np.ndarray | list[int]) -> int:
        """Forget the return times of ``unmap_ids`` of ``vm``; returns how many were held.

        The caller (the guest side, which alone knows which IOVA pages an id still tags)
        retires an id only once no page carries it and every DMA stamped with it has been
        checked: from then on no DMA can ask about it, so results are unchanged.
        """
        times = self._vms.get(vm)
        if times is None:
            return 0
        uids = np.unique(np.asarray(unmap_ids, dtype=np.int64).ravel())
        dropped = times.drop_many(uids[uids >= 0])
        times.trim()
        return dropped

    def retire_runs(self, vm: int, runs: list[tuple[int, int]]) -> int:
        """``retire`` for runs of consecutive ids (first, count), as the guest sends them.

        Each run is clipped to the ids held, so a run naming many ids nobody holds costs no
        memory (the work per run is at most its length or the number of spilled ids).
        """
        times = self._vms.get(vm)
        if times is None:
            return 0
        lo, hi = times.base, times.base + times.ret.size
        parts = []
        for first, count in runs:
            a, b = max(first, lo), min(first + count, hi)
            if a < b:
                parts.append(np.arange(a, b, dtype=np.int64))
            if times.spill:
                far = (range(first, first + count) if count <= len(times.spill)
                       else [u for u in times.spill if first <= u < first + count])
                parts.append(np.array([u for u in far if u in times.spill], dtype=np.int64))
        if not parts:
            return 0
        return self.retire(vm, np.concatenate(parts))

    def check(self, vm: np.ndarray, unmap_id: np.ndarray, t_ns: np.ndarray, ok: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(stale, window_ns) per DMA: translated successfully after its page's unmap returned.

        A DMA whose unmap has not been seen returning yet is in flight, never stale.
        """
        stale = np.zeros(t_ns.size, dtype=bool)
        window = np.zeros(t_ns.size, dtype=np.int64)
        idx = np.flatnonzero(ok & (unmap_id >= 0))
        if idx.size:
            ret = np.full(idx.size, _NONE, dtype=np.int64)
            vms = np.asarray(vm)[idx]
            uids = np.asarray(unmap_id, dtype=np.int64)[idx]
            for v in np.unique(vms).tolist():
                times = self._vms.get(v)
                if times is not None:
                    m = vms == v
                    ret[m] = times.lookup(uids[m])
            t = np.asarray(t_ns, dtype=np.int64)[idx]
            late = (ret >= 0) & (t > ret)
            stale[idx[late]] = True
            window[idx[late]] = t[late] - ret[late]
        return stale, window


_RETIRE = Oracle.retire   # what ArrayOracle.retire_runs does in one compiled call

# FlatTimes.seg columns: a VM's segment of ``data`` (offset, ids held densely, capacity),
# the unmap id of its first slot, and how many ids it holds in the spill table; a VM with no
# record has offset -1.
SEG_OFF, SEG_SIZE, SEG_CAP, SEG_BASE, SEG_SPILL = range(5)
SEG_FIELDS = 5
_U64 = 1 << 64


class FlatTimes:
    """Every VM's return times in arrays: ``data[off:off + size]`` holds the times of unmap
    ids ``base .. base + size - 1`` of the VM of row ``seg[vm]`` (its dense range), and the
    spill table (``spk``, ``spv``, ``spm``; host_iommu/kernels/oracle.py) its other ids.

    A segment is rewritten in place while it fits its capacity; one that outgrows it moves to
    the end of the buffer, which is compacted (live segments only) when it is full.
    """

    def __init__(self) -> None:
        self.data = np.full(1024, _NONE, dtype=np.int64)
        self.end = 0
        self.seg = np.full((8, SEG_FIELDS), 0, dtype=np.int64)
        self.seg[:, SEG_OFF] = -1
        self.spk = np.full((64, 2), ko.SP_EMPTY, dtype=np.int64)
        self.spv = np.zeros(64, dtype=np.int64)
        self.spm = np.zeros(2, dtype=np.int64)

    def add(self, vm: int) -> None:
        if vm >= self.seg.shape[0]:
            grown = np.zeros((max(2 * self.seg.shape[0], vm + 1), SEG_FIELDS), np.int64)
            grown[:, SEG_OFF] = -1
            grown[:self.seg.shape[0]] = self.seg
            self.seg = grown
        self.seg[vm] = (self.end, 0, 0, 0, 0)

    def grow_spill(self) -> None:
        """Refill the spill table into one with room (twice the size when it is more than a
        quarter full of live keys; removed keys are dropped)."""
        cap = self.spk.shape[0]
        live = int(self.spm[ko.SPM_LIVE])
        while 8 * (live + 1) > 3 * cap:
            cap *= 2
        spk = np.full((cap, 2), ko.SP_EMPTY, dtype=np.int64)
        spv = np.zeros(cap, dtype=np.int64)
        spm = np.zeros(2, dtype=np.int64)
        ko.spill_refill(self.spk, self.spv, spk, spv, spm)
        self.spk, self.spv, self.spm = spk, spv, spm

    def view(self, vm: int) -> np.ndarray:
        off, size = self.seg[vm, SEG_OFF], self.seg[vm, SEG_SIZE]
        return self.data[off:off + size]

    def put(self, vm: int, values: np.ndarray) -> None:
        """Make ``values`` the VM's dense array (copied)."""
        n = values.size
        row = self.seg[vm]
        if n > row[SEG_CAP]:
            cap = max(64, 1 << (n - 1).bit_length())
            if self.end + cap > self.data.size:
                self._compact(vm, cap)
            row = self.seg[vm]
            row[SEG_OFF], row[SEG_CAP] = self.end, cap
            self.end += cap
        off = int(row[SEG_OFF])
        self.data[off:off + n] = values
        row[SEG_SIZE] = n

    def _compact(self, moving: int, cap: int) -> None:
        """Copy the live segments (all but ``moving``'s, which is rewritten next) to the
        front of a buffer with room for ``cap`` more slots."""
        live = [v for v in np.flatnonzero(self.seg[:, SEG_OFF] >= 0).tolist() if v != moving]
        need = sum(int(self.seg[v, SEG_CAP]) for v in live) + cap
        data = np.full(max(self.data.size, 2 * need), _NONE, dtype=np.int64)
        end = 0
        for v in live:
            off, size, c = (int(x) for x in self.seg[v, :SEG_BASE])
            data[end:end + size] = self.data[off:off + size]
            self.seg[v, SEG_OFF] = end
            end += c
        self.data, self.end = data, end
        self.seg[moving, SEG_CAP] = 0


def _key(uid: int) -> int:
    """An unmap id (a Python int in [0, 2^64)) as the int64 of its bits."""
    return uid - _U64 if uid >= 1 << 63 else uid


class _SpillView:
    """One VM's part of the FlatTimes spill table, as the dict ``_VmTimes.spill`` uses it
    (get, set, pop, len, in, iteration; iteration order is the table's, which no caller
    depends on)."""

    __slots__ = ("_flat", "_vm")

    def __init__(self, flat: FlatTimes, vm: int) -> None:
        self._flat, self._vm = flat, vm

    def __len__(self) -> int:
        return int(self._flat.seg[self._vm, SEG_SPILL])

    def __bool__(self) -> bool:
        return bool(self._flat.seg[self._vm, SEG_SPILL])

    def get(self, uid: int, default: int | None = None) -> int | None:
        f = self._flat
        s = ko.spill_find(f.spk, self._vm, _key(int(uid)))
        return default if s < 0 else int(f.spv[s])

    def __contains__(self, uid: int) -> bool:
        return ko.spill_find(self._flat.spk, self._vm, _key(int(uid))) >= 0

    def __setitem__(self, uid: int, value: int) -> None:
        f, k = self._flat, _key(int(uid))
        v = np.int64(value)      # a time past int64 raises, as the dense array does
        if ko.spill_find(f.spk, self._vm, k) < 0 and not ko.spill_room(f.spk, f.spm):
            f.grow_spill()
        ko.spill_put(f.spk, f.spv, f.spm, f.seg, self._vm, k, v)

    def pop(self, uid: int, default: int | None = None) -> int | None:
        f, k = self._flat, _key(int(uid))
        s = ko.spill_find(f.spk, self._vm, k)
        if s < 0:
            return default
        v = int(f.spv[s])
        ko.spill_pop(f.spk, f.spv, f.spm, f.seg, self._vm, k)
        return v

    def _slots(self) -> np.ndarray:
        return np.flatnonzero(self._flat.spk[:, 0] == self._vm)

    def __iter__(self) -> Iterator[int]:
        for k in self._flat.spk[self._slots(), 1].tolist():
            yield k + _U64 if k < 0 else k

    def items(self) -> Iterator[tuple[int, int]]:
        s = self._slots()
        for k, v in zip(self._flat.spk[s, 1].tolist(), self._flat.spv[s].tolist(),
                        strict=True):
            yield (k + _U64 if k < 0 else k), v


class _FlatVmTimes(_VmTimes):
    """``_VmTimes`` whose ``ret`` and ``base`` live in a FlatTimes row (same code, same
    states: ``ret`` reads as the segment's view, an assignment copies into the segment)."""

    __slots__ = ("_flat", "_vm")

    def __init__(self, flat: FlatTimes, vm: int) -> None:
        self._flat, self._vm = flat, vm
        flat.add(vm)
        super().__init__()

    @property
    def base(self) -> int:
        return int(self._flat.seg[self._vm, SEG_BASE])

    @base.setter
    def base(self, value: int) -> None:
        self._flat.seg[self._vm, SEG_BASE] = value

    @property
    def ret(self) -> np.ndarray:
        return self._flat.view(self._vm)

    @property
    def spill(self) -> _SpillView:
        return _SpillView(self._flat, self._vm)

    @spill.setter
    def spill(self, value: dict[int, int]) -> None:
        if value:            # only _VmTimes.__init__ assigns it (empty)
            raise ValueError("a spill table is filled key by key")

    def drop_many(self, uids: np.ndarray) -> int:
        """_VmTimes.drop_many with the spilled ids popped in one compiled call."""
        i = uids - self.base
        ret = self.ret
        inside = (i >= 0) & (i < ret.size)
        j = i[inside]
        held = int((ret[j] != _NONE).sum())
        ret[j] = _NONE
        f = self._flat
        if f.seg[self._vm, SEG_SPILL]:
            far = np.ascontiguousarray(uids[~inside], dtype=np.int64)
            held += int(ko.spill_pop_many(f.spk, f.spv, f.spm, f.seg, self._vm, far))
        return held

    @ret.setter
    def ret(self, values: np.ndarray) -> None:
        self._flat.put(self._vm, values)


class ArrayOracle(Oracle):
    """``Oracle`` over one shared buffer (``flat``), for compiled callers. A VM id is a row
    of ``flat.seg``, so ids are small non-negative ints (HostServer's VM ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = FlatTimes()

    def _new_times(self, vm: int) -> _VmTimes:
        return _FlatVmTimes(self.flat, vm)

    def retire_runs(self, vm: int, runs: list[tuple[int, int]]) -> int:
        """Oracle.retire_runs in one compiled call (kernels/oracle.py retire_runs): the same
        ids retired (the runs clipped to the dense range, and the spilled ids in the runs),
        then the same trim (here, when the spill table lacks room for what trim moves)."""
        if type(self).retire is not _RETIRE:     # replaced (a test disables pruning)
            return super().retire_runs(vm, runs)
        times = self._vms.get(vm)
        if times is None or not runs:
            return 0
        f = self.flat
        r = np.array(runs, dtype=np.int64).reshape(-1, 2)
        held, trimmed = ko.retire_runs(f.seg, f.data, f.spk, f.spv, f.spm, vm,
                                       np.ascontiguousarray(r[:, 0]),
                                       np.ascontiguousarray(r[:, 1]), _MIN_TRIM)
        if not trimmed:
            times.trim()
        return int(held)
