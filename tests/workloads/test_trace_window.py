"""A Linux 6.12 ftrace window cut mid-run replays exactly, per device, in a shadow guest.

The window (tests/workloads/linux_ftrace.py writes it as a caching-mode guest prints it) starts
with buffers mapped before it, interleaves two e1000e NICs and an NVMe drive on two CPUs, has
two independent calls on adjacent IOVAs and a LOST line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from linux_ftrace import Ftrace

from cluster.config import parse_config
from cluster.runner import run_config
from workloads import ftrace
from workloads.trace import OP_LIVE, OP_LOST, OP_MAP, TraceError, TraceWorkload, read_trace

NIC_A, NIC_B, NVME = "0000:00:02.0", "0000:00:03.0", "0000:00:01.0"
SG_BEFORE = [0x6BED000, 0x6BD5000, 0x6BD6000, 0x6BFE000]     # mapped before the window
SG_ONE = [0x3E63D000 + 0x1000 * i for i in range(3)] + [0x6BAF000, 0x3E63B000,
                                                           0x3E634000, 0x3E635000, 0x6BB5000]
SG_TWO = [0x6BE8000, 0x6BF1000, 0x6BC0000, 0x6BC1000, 0x3E633000, 0x6BFA000, 0x6BF7000,
          0x6BEF000]
SG_THREE = [0x6C00000, 0x3E700000, 0x6C10000, 0x3E710000]


def window() -> Ftrace:
    """The window and its ground truth (``calls``, lost ones marked not visible)."""
    f = Ftrace()
    f.header()
    # buffers of both NICs (same IOVA: one domain each) and an NVMe read mapped before it
    f.emit(f.call("unmap_page", NIC_A, 4, 1, 0xFFFF8000, 4096, offset=0x40),
           f.call("unmap_page", NIC_B, 5, 0, 0xFFFF8000, 4096, offset=0x40))
    f.emit(f.call("map_page", NIC_A, 4, 1, "s", 0xFFFF8000, 0x675A000, 4096, offset=0x840),
           f.call("map_sg", NVME, 3, 0, 0xFFF90000, SG_ONE))
    f.emit(f.call("unmap_sg", NVME, 3, 0, 0xFFFA0000, SG_BEFORE),
           f.call("unmap_page", NIC_A, 4, 1, 0xFFFF7000, 4096, offset=0x40))
    f.emit(f.call("map_page", NIC_B, 5, 0, "s", 0xFFFF8000, 0x6470000, 4096, offset=0x40),
           f.call("map_page", NIC_A, 4, 1, "s", 0xFFFF6000, 0x62D6000, 4096))
    # the next call's IOVA continues the last one's: still two calls
    f.emit(f.call("map_page", NIC_A, 4, 1, "s", 0xFFFF7000, 0x62D7000, 4096))
    # the ring buffer overflowed on CPU 1: a whole map/unmap pair of NIC A is missing
    f.emit(f.call("map_page", NIC_A, 4, 1, "s", 0xFFFF5000, 0x62D8000, 4096, print_it=False),
           f.call("unmap_page", NIC_A, 4, 1, 0xFFFF5000, 4096, print_it=False))
    f.lost(1, 37)
    f.emit(f.call("unmap_page", NIC_A, 4, 1, 0xFFFF8000, 4096, offset=0x840),
           f.call("map_sg", NVME, 3, 0, 0xFFF80000, SG_TWO))
    f.emit(f.call("unmap_page", NIC_A, 4, 1, 0xFFFF6000, 4096),
           f.call("unmap_sg", NVME, 3, 0, 0xFFF90000, SG_ONE))
    f.emit(f.call("unmap_page", NIC_A, 4, 1, 0xFFFF7000, 4096),
           f.call("unmap_page", NIC_B, 5, 0, 0xFFFF8000, 4096, offset=0x40))
    f.emit(f.call("map_page", NIC_A, 4, 1, "s", 0xFFFF8000, 0x675A000, 4096))
    # one CPU, two contexts: NIC B's softirq refill lands inside the NVMe's process-context
    # scatter list, line by line
    f.emit(f.call("map_sg", NVME, 3, 0, 0xFFF70000, SG_THREE),
           f.call("map_page", NIC_B, 5, 0, "s", 0xFFFF9000, 0x6471000, 4096, offset=0x40))
    return f


def truth(f: Ftrace, dev: str) -> dict[str, int]:
    """What the window shows of ``dev``: map calls, map events, unmaps, and live mappings
    (unmaps of an IOVA the window had not mapped or unmapped before)."""
    maps = [c for c in f.calls if c.dev == dev and c.kind == "map" and c.visible]
    unmaps = [c for c in f.calls if c.dev == dev and c.kind == "unmap" and c.visible]
    seen: set[int] = set()
    live = 0
    for c in (c for c in f.calls if c.dev == dev and c.visible):
        iova = c.pieces[0][0]
        if c.kind == "unmap" and not any(c.pieces[0][0] <= a < c.pieces[0][0] + c.pieces[0][2]
                                         for a in seen):
            live += 1
        seen.update(p[0] for p in c.pieces)
        seen.add(iova)
    return {"map_calls": len(maps), "map_events": sum(len(c.pieces) for c in maps),
            "unmaps": len(unmaps), "live": live}


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "window.txt"
    path.write_text(window().text())
    return path


@pytest.mark.parametrize("dev", [NIC_A, NIC_B, NVME])
def test_import_attributes_each_device(tmp_path, text, dev):
    """--device keeps one device's events, attributed by the dma:* event of each call; the
    LOST line is counted, not fatal; pieces are grouped into the calls of the trace."""
    want = truth(window(), dev)
    counts = ftrace.import_ftrace(text, tmp_path / "w.trace", device=dev)
    assert (counts["map_calls"], counts["map"], counts["unmap"], counts["live"]) == (
        want["map_calls"], want["map_events"], want["unmaps"], want["live"])
    assert counts["lost_events"] == 37 and counts["lost_lines"] == 1
    assert counts["unattributed"] == 0
    (b,) = read_trace(tmp_path / "w.trace")
    assert int((b["op"] == OP_LIVE).sum()) == want["live"]
    assert b["size"][b["op"] == OP_LOST].tolist() == [37]
    calls = b["call"][b["op"] == OP_MAP]
    assert len(np.unique(calls)) == want["map_calls"] and (calls > 0).all()


def test_import_names_all_devices(tmp_path, text):
    """Without --device every device named by a dma:* event gets its own index."""
    counts = ftrace.import_ftrace(text, tmp_path / "w.trace")
    from workloads.trace import TraceReader

    r = TraceReader(tmp_path / "w.trace")
    assert r.devices == sorted([NIC_A, NIC_B, NVME])
    r.close()
    f = window()
    assert counts["map_calls"] == sum(truth(f, d)["map_calls"] for d in (NIC_A, NIC_B, NVME))
    with pytest.raises(TraceError, match=r"no dma:\* event names device '0000:00:09\.0'"):
        ftrace.import_ftrace(text, tmp_path / "x.trace", device="0000:00:09.0")


def test_adjacent_calls_stay_two_calls(tmp_path, text, make_ctx):
    """Two independent maps on adjacent IOVAs replay as two dma_map calls, and each NVMe
    scatter list as one dma_map_sg of its physically contiguous pieces."""
    ftrace.import_ftrace(text, tmp_path / "a.trace", device=NIC_A)
    ctx = make_ctx()
    w = TraceWorkload(TraceWorkload.Params(path=str(tmp_path / "a.trace")))
    w.start(ctx)
    ctx.run_until(10**10)
    want = truth(window(), NIC_A)
    assert ctx.map_sgs == [] and len(ctx.maps) == want["map_calls"] + want["live"]
    assert w.unmap_calls == want["unmaps"] and w.unmatched_unmaps == 0 and ctx.errors == []
    ftrace.import_ftrace(text, tmp_path / "n.trace", device=NVME)
    ctx = make_ctx()
    w = TraceWorkload(TraceWorkload.Params(path=str(tmp_path / "n.trace")))
    w.start(ctx)
    ctx.run_until(10**10)
    # SG_ONE: 3 contiguous + 1 + 2 contiguous + 2 singles = 5 pieces; SG_TWO: 7; SG_THREE: 4
    assert [len(s) for s in ctx.map_sgs] == [5, 7, 4]
    assert len(ctx.maps) == 1 and ctx.maps[0][2] == 4 * 4096      # the live read
    assert len(ctx.unmap_sgs) == 1 and len(ctx.unmaps) == 1 and ctx.errors == []


def test_scatterlist_never_split_at_a_batch_boundary(tmp_path, text, monkeypatch):
    """With tiny import batches, every call's pieces still sit in one batch."""
    monkeypatch.setattr(ftrace, "IMPORT_BATCH_RECORDS", 3)
    ftrace.import_ftrace(text, tmp_path / "n.trace", device=NVME)
    batches = list(read_trace(tmp_path / "n.trace"))
    assert len(batches) > 2
    where: dict[int, set[int]] = {}
    for i, b in enumerate(batches):
        for c in b["call"][b["op"] == OP_MAP].tolist():
            where.setdefault(c, set()).add(i)
    assert where and all(len(v) == 1 for v in where.values())


@pytest.mark.parametrize("dev", [NIC_A, NVME])
def test_shadow_replay_of_the_window_is_exact(tmp_path, text, dev):
    """Replayed in a caching-mode (shadow) guest: the trace's map calls, map events and
    unmaps of the device, plus the live mappings made first, and one trap per map call and
    per unmap."""
    trace = tmp_path / "w.trace"
    counts = ftrace.import_ftrace(text, trace, device=dev)
    want = truth(window(), dev)
    cfg = parse_config({
        "experiment": {"name": "window", "seed": 1, "duration_us": 3000, "epoch_us": 100},
        "host": {"memory_mib": 256},
        "vm": {"g": {"mode": "shadow", "memory_mib": 64,
                     "workload": {"kind": "trace", "path": str(trace)}}}})
    (row,) = run_config(cfg, tmp_path / "out").summary.to_pylist()
    live_calls = want["live"]
    live_events = counts["live"]          # a live mapping is one piece
    assert row["trace_live_maps"] == live_events == live_calls
    assert row["maps"] - live_calls == want["map_calls"]
    assert row["iommu_map_events"] - live_events == want["map_events"]
    assert row["unmaps"] == want["unmaps"]
    assert row["vm_exits"] == row["maps"] + row["unmaps"]
    assert row["trace_lost_events"] == 37 and row["trace_unmatched_unmaps"] == 0
    assert row["faults"] == 0


def test_unmap_is_claimed_by_the_address_it_covers(tmp_path):
    """An iommu:unmap outside the DMA API (no dma:* event) waiting on the same CPU and
    context is not taken for the next call's unmap: dma_unmap_page claims the line that
    covers its dma_addr, and the stray line is unattributed."""
    f = Ftrace()
    f.header()
    f.emit(f.call("map_page", NIC_A, 4, 1, "s", 0xFFFF8000, 0x675A000, 4096))
    stray = ("<idle>", 1, "d.h1.", "unmap", "IOMMU: iova=0x00000000ffff0000 - "
             "0x00000000ffff1000 size=4096 unmapped_size=4096")
    f.emit([stray, *f.call("unmap_page", NIC_A, 4, 1, 0xFFFF8000, 4096, offset=0x40)])
    text = tmp_path / "t.txt"
    text.write_text(f.text())
    counts = ftrace.import_ftrace(text, tmp_path / "t.trace", device=NIC_A)
    assert (counts["unmap"], counts["unattributed"], counts["live"]) == (1, 1, 0)
    (b,) = read_trace(tmp_path / "t.trace")
    assert b["iova"][b["op"] == 1].tolist() == [0xFFFF8000]


def test_after_a_warmup_the_window_is_exactly_the_trace(tmp_path, text):
    """Live mappings made during a warm-up, traced events replayed after it: the measured
    window holds exactly the trace's map calls, map events and unmaps of the device, and in
    a caching-mode guest one trap per map call and per unmap."""
    trace = tmp_path / "w.trace"
    ftrace.import_ftrace(text, trace, device=NVME)
    want = truth(window(), NVME)
    cfg = parse_config({
        "experiment": {"name": "window", "seed": 1, "duration_us": 2000, "epoch_us": 100,
                       "warmup_us": 500},
        "host": {"memory_mib": 256},
        "vm": {"g": {"mode": "shadow", "memory_mib": 64,
                     "workload": {"kind": "trace", "path": str(trace), "start_us": 500.0}}}})
    (row,) = run_config(cfg, tmp_path / "out").summary.to_pylist()
    assert (row["maps"], row["iommu_map_events"], row["unmaps"]) == (
        want["map_calls"], want["map_events"], want["unmaps"])
    assert row["vm_exits"] == want["map_calls"] + want["unmaps"]
    assert row["trace_live_maps"] == 0 and row["window_ns"] == 2_000_000
