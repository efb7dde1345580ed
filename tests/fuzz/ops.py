"""Hostile guest operations: generated from a world's state, executed as plain data.

Every boundary a guest (or its VMM acting for it) controls is reached: device DMAs with any
source id, PASID, address, access and time (OP_DMA batches); the DMA API (map / strict or
lazy unmap); arbitrary first-level entries (nested: OP_GUEST_WRITE) and shadowed
second-level entries (shadow: written into the guest's table, then trapped through the
vIOMMU's queue); invalidation descriptors of every type 0x1-0x8, valid and malformed, through
the vIOMMU's tail write and the VMM; PASID binds with bogus roots, levels and PASIDs
(iommufd IOMMU_HWPT_ALLOC, host_iommu/nested.py alloc_nested); raw protocol operations with
hostile arguments; balloons (OP_SL_UNMAP / OP_SL_MAP); corrupted msgpack frames.

An operation is a JSON-able dict generated with concrete values (``generate``), so a list of
them replays exactly and shrinks by deletion; tests/fuzz/execute.py applies one to a World.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from host_iommu import protocol, qi
from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE
from host_iommu.protocol import (
    OP_DMA,
    OP_DTYPE,
    OP_GUEST_WRITE,
    OP_HWPT_INV,
    OP_SL_MAP,
    OP_SL_UNMAP,
    OP_UNMAP_RET,
    OP_UNMAP_RETIRE,
    OP_VFIO_MAP,
    OP_VFIO_UNMAP,
    EpochReport,
    VmSetup,
)
from tests.fuzz.world import World

Op = dict[str, Any]
U64 = (1 << 64) - 1
ENTRY_ADDR = 0x000F_FFFF_FFFF_F000   # address bits 51:12 of a table entry (both formats)
FL_PRESENT_RW_US = 0x7               # first level: P | R/W | U/S
SL_READ_WRITE = 0x3                  # second level: R | W
PS = 1 << 7                          # page size, both formats

# Operation kinds and how often each is drawn.
WEIGHTS = {"dma": 26, "mixdma": 5, "map": 16, "unmap": 12, "table": 9, "qi": 6, "bind": 3,
           "raw": 6, "balloon": 6, "frame": 4, "clear_iqe": 3, "time": 6, "setup": 2,
           "probe": 3}
WIDE_U64 = (0, 1, 0xFFF, 0x1000, 0x20000, 1 << 32, 1 << 40, 1 << 47, 1 << 48, 1 << 52,
            1 << 57, 1 << 63, U64, U64 - 0xFFF)


# --- generation -----------------------------------------------------------------------------
def generate(w: World, rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> Op:
    """One random hostile operation for the world as it is now (no kind in ``exclude``)."""
    names = [n for n in WEIGHTS if n not in exclude]
    p = np.array([WEIGHTS[n] for n in names], dtype=float)
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    vm = int(rng.choice(w.vms))
    mode = w.mode[vm]
    if kind in ("table", "qi", "clear_iqe") and mode == "passthrough":
        kind = "dma"
    if kind == "bind" and mode != "nested":
        kind = "raw"
    return GENERATORS[kind](w, rng, vm)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _live_pages(w: World, vm: int) -> list[tuple[int, int]]:
    """(sid, iova) of every page the fuzzer mapped through the DMA API and did not unmap."""
    out = []
    for (sid, iova), (pages, _bufs) in w.mappings[vm].items():
        out += [(sid, iova + (i << PAGE_SHIFT)) for i in range(min(pages, 8))]
    return out


def _dma_reqs(w: World, rng: np.random.Generator, vm: int, k: int, hostile: bool,
              malformed: bool = False) -> dict[str, list[int]]:
    """k DMA requests of one VM: mostly at pages it mapped, unmapped or aimed its tables at."""
    own = np.array([d.sid for d in w.devices[vm]], np.int64)
    others = np.array([s for s in w.sid_owner if s not in own], np.int64)
    live = _live_pages(w, vm)
    dead = [(sid, iova + (i << PAGE_SHIFT)) for sid, iova, n in w.recent_unmaps[vm]
            for i in range(min(n, 4))]
    tgt = [(int(own[0]), a) for a in w.targets[vm]]
    pool = np.array([*live, *live, *live, *dead, *tgt] or [(int(own[0]), 0)], np.uint64)
    idx = rng.integers(0, len(pool), k)
    sid, addr = pool[idx, 0].astype(np.int64), pool[idx, 1]
    addr = addr + (rng.integers(0, PAGE_SIZE, k) & ~0x3F).astype(np.uint64)
    pasid = np.zeros(k, np.int64)
    access = rng.integers(1, 3, k)
    dt = rng.integers(0, 2_000, k)
    if hostile:
        wild = rng.random(k) < (0.15 if live or dead or tgt else 1.0)
        sid[wild] = own[rng.integers(0, own.size, int(wild.sum()))]
        choices = np.array([0, 0xFFF, 1 << 32, 1 << 40, 1 << 47, 1 << 48, 1 << 52, 1 << 57,
                            1 << 63, (1 << 64) - 0x1000], np.uint64)
        addr[wild] = np.where(rng.random(int(wild.sum())) < 0.7,
                              rng.integers(0, 1 << 32, int(wild.sum())).astype(np.uint64),
                              choices[rng.integers(0, choices.size, int(wild.sum()))])
        r = rng.random(k)
        if others.size:
            m = r < 0.05
            sid[m] = others[rng.integers(0, others.size, int(m.sum()))]
        m = (r >= 0.05) & (r < 0.07)
        sid[m] = rng.integers(0, 1 << 16, int(m.sum()))
        r = rng.random(k)
        mine = np.array(w.pasids[vm], np.int64)
        m = r < (0.25 if mine.size > 1 else 0.08)
        pasid[m] = mine[rng.integers(0, mine.size, int(m.sum()))]
        m = (r >= 0.08) & (r < 0.11)
        pasid[m] = rng.integers(1, 1 << 20, int(m.sum()))
        dt[r > 0.998] = 1 << 40   # far in the future: the host clock jumps ahead
        if malformed and others.size:   # a PASID whose high bits spell another device
            m = (r >= 0.11) & (r < 0.13)
            pasid[m] = (others[rng.integers(0, others.size, int(m.sum()))] << 20) | 1
        if malformed:    # fields no valid operation carries
            r = rng.random(k)
            m = r < 0.03
            pasid[m] = rng.integers(1 << 20, 1 << 32, int(m.sum()))
            m = (r >= 0.03) & (r < 0.05)
            access[m] = rng.integers(0, 256, int(m.sum()))
            dt[(r >= 0.05) & (r < 0.06)] = -(1 << 40)
    return {"sid": sid.tolist(), "pasid": pasid.tolist(), "addr": addr.tolist(),
            "access": access.tolist(), "dt": dt.tolist()}


def _gen_dma(w: World, rng: np.random.Generator, vm: int) -> Op:
    k = int(rng.choice([1, 8, 64, 256, 512, 1024], p=[0.1, 0.2, 0.3, 0.2, 0.15, 0.05]))
    malformed = bool(rng.random() < 0.15)
    wire = not malformed or bool(rng.random() < 0.5)
    return {"k": "dma", "vm": vm, "wire": wire,
            **_dma_reqs(w, rng, vm, k, hostile=True, malformed=malformed)}


def _gen_mixdma(w: World, rng: np.random.Generator, vm: int) -> Op:
    per = {str(v): _dma_reqs(w, rng, v, int(rng.integers(1, 128)), hostile=False)
           for v in w.vms}
    return {"k": "mixdma", "per_vm": per}


def _gen_map(w: World, rng: np.random.Generator, vm: int) -> Op:
    pages = int(rng.choice([1, 1, 1, 2, 3, 8, 16, 64]))
    # a scatter list (dma_map_sg: one IOVA range, one sync) now and then
    sg = ([int(rng.choice([1, 1, 2, 4])) for _ in range(int(rng.integers(2, 6)))]
          if w.mode[vm] != "passthrough" and rng.random() < 0.25 else [pages])
    return {"k": "map", "vm": vm, "dev": int(rng.integers(len(w.devices[vm]))),
            "pages": sum(sg), "sg": sg, "write": bool(rng.random() < 0.7),
            "cpu": int(rng.integers(2))}


def _gen_unmap(w: World, rng: np.random.Generator, vm: int) -> Op:
    live = sorted(w.mappings[vm])
    sid, iova = (_pick(rng, live) if live else
                 (w.devices[vm][0].sid, int(rng.integers(0, 1 << 32)) & ~0xFFF))
    return {"k": "unmap", "vm": vm, "sid": int(sid), "iova": int(iova),
            "cpu": int(rng.integers(2))}


def _table_pages(w: World, vm: int, dev: int) -> tuple[Any, list[int]]:
    table = w.agents[vm].dma.domains[w.devices[vm][dev].sid].table
    return table, sorted(table.store.pages)


def _path(table, iova: int) -> list[tuple[int, int]]:
    """(level, table GPA) along the guest's own table for ``iova``, read from guest memory."""
    out = []
    addr = table.root
    for level in range(table.levels, 0, -1):
        out.append((level, addr))
        entry = table.store.read(addr + 8 * ((iova >> (PAGE_SHIFT + 9 * (level - 1))) & 511))
        if level == 1 or not entry & 1 or entry & PS:
            break
        addr = entry & ENTRY_ADDR
    return out


def _gen_table(w: World, rng: np.random.Generator, vm: int) -> Op:
    """A hostile entry in the guest's own table: self-references, reserved bits, wild GPAs."""
    dev = int(rng.integers(len(w.devices[vm])))
    table, pages = _table_pages(w, vm, dev)
    mode = w.mode[vm]
    live = [a for s, a in _live_pages(w, vm) if s == w.devices[vm][dev].sid]
    iova = int(_pick(rng, live) if live else int(rng.integers(0, 1 << 32)) & ~0xFFF)
    path = _path(table, iova)
    level, tgpa = _pick(rng, path) if rng.random() < 0.8 else (1, _pick(rng, pages))
    shift = PAGE_SHIFT + 9 * (level - 1)
    idx = (iova >> shift) & 511 if rng.random() < 0.6 else int(rng.integers(512))
    target = (iova & ~((1 << (shift + 9)) - 1)) | (idx << shift)
    perm = FL_PRESENT_RW_US if mode == "nested" else SL_READ_WRITE
    mem_bytes = w.agents[vm].memory_bytes
    r = rng.random()
    if r < 0.25:      # a pointer back up the tree: the root, this table, another table
        value = _pick(rng, [table.root, tgpa, _pick(rng, pages)]) | perm
    elif r < 0.55:    # a leaf (or large leaf) onto some GPA of the VM's own memory
        gpa = int(rng.integers(0, mem_bytes >> PAGE_SHIFT)) << PAGE_SHIFT
        value = gpa | perm | (PS if level in (2, 3) and rng.random() < 0.3 else 0)
    elif r < 0.7:     # a GPA beyond the VM's memory or beyond any width
        value = (_pick(rng, [mem_bytes, 1 << 32, 1 << 46, 1 << 51]) & ENTRY_ADDR) | perm
    elif r < 0.85:    # reserved bits
        value = (_pick(rng, pages) | perm | _pick(rng, [1 << 51, 1 << 62, 0x800, PS, 1 << 8,
                                                        0xF00, 1 << 52]))
    elif r < 0.93:
        value = int(rng.integers(0, 1 << 63)) | int(rng.integers(2)) << 63
    else:
        value = 0
    op = {"k": "table", "vm": vm, "dev": dev, "gpa": tgpa + 8 * idx, "value": value & U64,
          "target": target}
    if mode == "shadow":
        gran = int(rng.choice([qi.QI_IOTLB_GRAN_PAGE, qi.QI_IOTLB_GRAN_DOMAIN,
                               qi.QI_IOTLB_GRAN_GLOBAL], p=[0.7, 0.2, 0.1]))
        am = int(rng.choice([0, 0, 1, 9, 18]))
        op["inv"] = [gran, (target >> (PAGE_SHIFT + am)) << (PAGE_SHIFT + am), am]
    return op


def _valid_desc(rng: np.random.Generator, w: World, vm: int) -> np.void:
    own = [d.sid for d in w.devices[vm]]
    sid = _pick(rng, own) if rng.random() < 0.8 else int(rng.integers(1 << 16))
    did = 1 if rng.random() < 0.7 else int(rng.integers(1 << 16))
    pasid = _pick(rng, w.pasids[vm]) if rng.random() < 0.7 else int(rng.integers(1 << 20))
    am = int(rng.choice([0, 0, 1, 5, 9, 18]))
    live = sorted(iova for _sid, iova in w.mappings[vm])
    base = _pick(rng, live) if live and rng.random() < 0.7 else int(rng.integers(0, 1 << 48))
    addr = (base >> (PAGE_SHIFT + am)) << (PAGE_SHIFT + am)
    size = 1 << int(rng.integers(PAGE_SHIFT, 40))
    t = int(rng.integers(1, 9))
    if t == qi.QI_CC_TYPE:
        return qi.cc_desc(int(rng.integers(1, 4)), did, sid, int(rng.integers(4)))
    if t == qi.QI_IOTLB_TYPE:
        return qi.iotlb_desc(int(rng.integers(1, 4)), did, addr, am, bool(rng.integers(2)))
    if t == qi.QI_DIOTLB_TYPE:
        return qi.dev_iotlb_desc(sid, sid, 0, (addr // size) * size, size)
    if t == qi.QI_IEC_TYPE:
        return qi.iec_desc(int(rng.integers(2)), int(rng.integers(1 << 16)), int(rng.integers(32)))
    if t == qi.QI_IWD_TYPE:
        return qi.wait_desc(int(rng.integers(1 << 32)), int(rng.integers(0, 1 << 40)) & ~3,
                            bool(rng.integers(2)), bool(rng.integers(2)) or True,
                            bool(rng.integers(2)))
    if t == qi.QI_EIOTLB_TYPE:
        return qi.piotlb_desc(did, pasid, int(rng.integers(2, 4)), addr, am,
                              bool(rng.integers(2)))
    if t == qi.QI_PC_TYPE:
        return qi.pc_desc(int(rng.choice([0, 1, 3])), did, pasid)
    return qi.pasid_dev_iotlb_desc(sid, sid, pasid, (addr // size) * size, size,
                                   bool(rng.integers(2)))


def _gen_qi(w: World, rng: np.random.Generator, vm: int) -> Op:
    descs = []
    for _ in range(int(rng.integers(1, 6))):
        d = [int(x) for x in _valid_desc(rng, w, vm).tolist()]
        r = rng.random()
        if r < 0.15:      # a reserved bit
            word = int(rng.integers(4))
            d[word] |= 1 << int(rng.integers(64))
        elif r < 0.22:    # an unknown or reserved type
            d[0] = (d[0] & ~0xE0F) | int(rng.choice([0, 9, 0xF])) | int(rng.integers(8)) << 9
        elif r < 0.27:
            d = [int(rng.integers(0, 1 << 63)) for _ in range(4)]
        descs.append(d)
    if rng.random() < 0.7:
        descs.append([int(x) for x in qi.wait_desc().tolist()])
    return {"k": "qi", "vm": vm, "dev": int(rng.integers(len(w.devices[vm]))), "descs": descs}


def _gen_bind(w: World, rng: np.random.Generator, vm: int) -> Op:
    dev = int(rng.integers(len(w.devices[vm])))
    table, pages = _table_pages(w, vm, dev)
    pasid = int(rng.choice([0, int(rng.integers(1, 64)), 0x7FFF, 0x8000, 0xFFFFF, 1 << 20,
                            int(rng.integers(0, 1 << 32)), (1 << 32) - 1]))
    root = int(rng.choice([table.root, _pick(rng, pages), int(rng.integers(0, 1 << 22)) & ~0xFFF,
                           _pick(rng, WIDE_U64), int(rng.integers(0, 1 << 22))]))
    levels = int(rng.choice([4, 4, 5, 3, 0, 6]))
    count = 1 if rng.random() < 0.85 else int(rng.choice([16, 200]))   # a storm of PASIDs
    if rng.random() < 0.5:
        # a binding that works (its own table at a small PASID): DMAs with that PASID then
        # fill the IOTLB and device-TLB, which second-level changes must flush
        pasid, root, levels = int(rng.integers(1, 64)), table.root, table.levels
    return {"k": "bind", "vm": vm, "dev": dev, "pasid": pasid, "root": root, "levels": levels,
            "count": count}


def _raw_values(rng: np.random.Generator, w: World, vm: int) -> list[int]:
    live = sorted(iova for _sid, iova in w.mappings[vm])
    gpas = [g for _n, bufs in w.mappings[vm].values() for g, _p in bufs]
    mem = w.agents[vm].memory_bytes
    pool = [*WIDE_U64, mem, mem - PAGE_SIZE, *live[:4], *gpas[:4]]
    return [_pick(rng, pool) if rng.random() < 0.6 else int(rng.integers(0, 1 << 63))
            for _ in range(4)]


def _gen_raw(w: World, rng: np.random.Generator, vm: int) -> Op:
    kinds = [OP_DMA, OP_GUEST_WRITE, OP_HWPT_INV, OP_VFIO_MAP, OP_VFIO_UNMAP, OP_UNMAP_RET,
             OP_SL_UNMAP, OP_SL_MAP, OP_UNMAP_RETIRE, 0, 10, 255]
    own = [d.sid for d in w.devices[vm]]
    rows = []
    for _ in range(int(rng.integers(1, 9))):
        a0, a1, a2, a3 = _raw_values(rng, w, vm)
        if rng.random() < 0.5:   # small page counts and sizes are the interesting ones
            a1 = int(rng.choice([0, 1, 2, PAGE_SIZE, 2 * PAGE_SIZE, 1 << 40]))
        sid = _pick(rng, own) if rng.random() < 0.8 else int(rng.integers(1 << 16))
        pasid = 0 if rng.random() < 0.7 else int(rng.integers(0, 1 << 32))
        rows.append([int(_pick(rng, kinds)), sid, pasid, a0 & U64, a1 & U64,
                     a2 - (1 << 63) if a2 >= 1 << 63 else a2, a3 - (1 << 63) if a3 >= 1 << 63
                     else (a3 if rng.random() < 0.5 else -1), int(rng.integers(0, 1000))])
    sender = vm if rng.random() < 0.97 else 99   # an unknown VM now and then
    return {"k": "raw", "vm": sender, "rows": rows, "wire": bool(rng.random() < 0.7)}


def _gen_balloon(w: World, rng: np.random.Generator, vm: int) -> Op:
    gpas = [g for _n, bufs in w.mappings[vm].values() for g, _p in bufs]
    mem = w.agents[vm].memory_bytes
    r = rng.random()
    if r < 0.5 and gpas:
        gpa = _pick(rng, gpas)             # a page the device still maps (pinned)
    elif r < 0.9:
        gpa = int(rng.integers(16, mem >> PAGE_SHIFT)) << PAGE_SHIFT
    else:
        gpa = _pick(rng, WIDE_U64)
    pages = int(rng.choice([1, 1, 2, 4, 16, 0, 1 << 40, U64]))
    # inflate in one VM, deflate in another: the freed frame goes to whoever asks next
    return {"k": "balloon", "vm": vm, "gpa": gpa, "pages": pages,
            "map": bool(rng.random() < 0.4)}


def _corrupt(rng: np.random.Generator, frame: bytes) -> bytes:
    b = bytearray(frame)
    r = rng.random()
    if r < 0.4 and b:
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
    elif r < 0.6 and b:
        del b[int(rng.integers(len(b))):]
    elif r < 0.7:
        b += bytes(rng.integers(0, 256, int(rng.integers(1, 16))).astype(np.uint8))
    return bytes(b)


def _gen_frame(w: World, rng: np.random.Generator, vm: int) -> Op:
    r = rng.random()
    if r < 0.45:
        kind = "ops"
        rows = np.zeros(int(rng.integers(0, 4)), dtype=OP_DTYPE)
        rows["op"] = rng.integers(0, 10, rows.size)
        rows["sid"] = w.devices[vm][0].sid
        rows["a0"] = rng.integers(0, 1 << 40, rows.size)
        rows["a1"] = rng.integers(0, 16, rows.size)
        rows["t_ns"] = w.now
        frame = _corrupt(rng, protocol.pack_ops(rows))
    elif r < 0.7:
        kind = "ctrl"
        msg = (VmSetup(vm, 1 << 20, "nested", (1,), False, 4, (0x1000,)) if rng.random() < 0.5
               else EpochReport(vm, {"faults": 1}, [(1, 2, 3, 4, 5, 6)]))
        frame = _corrupt(rng, protocol.pack(msg))
    else:             # well-formed msgpack, hostile shapes
        kind = "ops" if rng.random() < 0.5 else "ctrl"
        bad = [None, -1, 1 << 62, "x", b"\x00" * 7, [], {}, [[[[[]]]]], 3.5, True]
        if kind == "ops":
            body = {"dtype": _pick(rng, ["OP_DTYPE/1", "OP_DTYPE/2", None, 7]),
                    "n": _pick(rng, [0, 1, -1, 1 << 40, None, "1"]),
                    "data": _pick(rng, [b"", b"\x01" * int(rng.integers(1, 200)), None, [1],
                                        "data"])}
        else:
            body = {"type": _pick(rng, ["VmSetup", "EpochReport", "Nope", None, 3]),
                    "vm": _pick(rng, [*bad, 1]), "sids": _pick(rng, bad),
                    "fl_roots": _pick(rng, bad), "faults": _pick(rng, bad),
                    "counters": _pick(rng, bad), "mode": _pick(rng, [*bad, "nested"])}
            if rng.random() < 0.3:
                body = _pick(rng, bad)
        nest: Any = body
        for _ in range(int(rng.choice([0, 0, 0, 200]))):
            nest = [nest]
        frame = msgpack.packb(nest)
    return {"k": "frame", "vm": vm, "kind": kind, "hex": frame.hex()}


def _gen_clear_iqe(w: World, rng: np.random.Generator, vm: int) -> Op:
    return {"k": "clear_iqe", "vm": vm, "dev": int(rng.integers(len(w.devices[vm]))),
            "replace": bool(rng.random() < 0.5)}


def _gen_time(w: World, rng: np.random.Generator, vm: int) -> Op:
    return {"k": "time", "ns": int(rng.choice([50_000, 1_000_000, 5_000_000, 20_000_000]))}


def _gen_setup(w: World, rng: np.random.Generator, vm: int) -> Op:
    """A VMM's set-up message for a VM that exists or not, naming devices it may not own."""
    sids = [*w.sid_owner, 0x900, 0x901, int(rng.integers(1 << 16))]
    n = int(rng.integers(0, 3))
    target = _pick(rng, [vm, max(w.vms) + 1, max(w.vms) + 2])
    return {"k": "setup", "vm": int(target), "mode": _pick(rng, ["shadow", "nested",
                                                              "passthrough"]),
            "memory": int(rng.choice([1 << 20, 4 << 20, 1 << 30, 1 << 40, 1 << 52])),
            "sids": [int(_pick(rng, sids)) for _ in range(n)], "ats": bool(rng.integers(2)),
            "fl_levels": int(rng.choice([4, 5])),
            "roots": [int(_pick(rng, WIDE_U64)) & ~0xFFF for _ in range(n)]}


def _gen_probe(w: World, rng: np.random.Generator, vm: int) -> Op:
    """Use after balloon: DMA to a mapped page, balloon its GPA out, DMA to it again."""
    maps = sorted(w.mappings[vm].items())
    if not maps:
        return _gen_map(w, rng, vm)
    (sid, iova), (pages, bufs) = _pick(rng, maps)
    j = int(rng.integers(pages))
    page = j
    for base, n in bufs:   # the buffer page behind IOVA page j
        gpa = base + (page << PAGE_SHIFT)
        if page < n:
            break
        page -= n
    return {"k": "probe", "vm": vm, "sid": sid, "pasid": int(_pick(rng, w.pasids[vm])),
            "iova": iova + (j << PAGE_SHIFT), "gpa": gpa,
            "back": bool(rng.random() < 0.5)}


GENERATORS = {"dma": _gen_dma, "mixdma": _gen_mixdma, "map": _gen_map, "unmap": _gen_unmap,
              "table": _gen_table, "qi": _gen_qi, "bind": _gen_bind, "raw": _gen_raw,
              "balloon": _gen_balloon, "frame": _gen_frame, "clear_iqe": _gen_clear_iqe,
              "time": _gen_time, "setup": _gen_setup, "probe": _gen_probe}
