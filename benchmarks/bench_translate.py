"""Throughput of HostIommu.translate: cold nested walks and IOTLB-hit translations per second.

Models a device's DMA stream through host_iommu/iommu.py (VT-d spec 3.8 nested translation):
(a) cold 4-level/4-level nested walks with every cache off (24 entry reads each), (b)
translations that hit a warm IOTLB; beside each, a raw numpy random gather (np.take of the
same element count) measured in the same run, as the floor a vectorized path can approach.
Run: ``python -m benchmarks.bench_translate [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from host_iommu.defs import PAGE_SHIFT, PAGE_SIZE, PGTT_NESTED
from host_iommu.iommu import HostIommu, IommuParams
from host_iommu.pasid import PasidEntry
from host_iommu.pgtable import FL_A, FL_D, FL_P, FL_RW, FL_US
from host_iommu.walk import WalkBatch

RESULTS = Path(__file__).parent / "results" / "translate.json"
GOALS = {"cold_nested_walks_per_s": 1_000_000, "iotlb_hit_translations_per_s": 10_000_000}
SID = 0x100
IOVA = 1 << 30                  # 1-GiB aligned: one PML4 and PDPT entry cover the buffer
FL_TABLE = FL_P | FL_RW | FL_US | FL_A
FL_LEAF = FL_TABLE | FL_D
GATHER_ELEMS = 1 << 24          # 128 MiB of uint64: beyond the caches, like table memory


def build_fl(h: HostIommu, vm: int, table_gpa: int, data_gpa: int, pages: int) -> int:
    """Write a 4-level first level mapping IOVA + i*4K -> data_gpa + i*4K in the VM's memory
    (vectorized: one guest_write); returns its root GPA. Needs pages <= 512*512."""
    if pages > 512 * 512:
        raise ValueError("one page directory maps at most 512*512 pages")
    pts = -(-pages // 512)
    pml4, pdpt, pd = table_gpa, table_gpa + PAGE_SIZE, table_gpa + 2 * PAGE_SIZE
    pt0 = table_gpa + 3 * PAGE_SIZE
    i = np.arange(pages, dtype=np.uint64)
    gpa = [np.array([pml4 + 8 * ((IOVA >> 39) & 511), pdpt + 8 * ((IOVA >> 30) & 511)],
                    np.uint64),
           pd + 8 * np.arange(pts, dtype=np.uint64),
           pt0 + 8 * i]
    val = [np.array([pdpt | FL_TABLE, pd | FL_TABLE], np.uint64),
           (pt0 + PAGE_SIZE * np.arange(pts, dtype=np.uint64)) | np.uint64(FL_TABLE),
           (np.uint64(data_gpa) + (i << np.uint64(PAGE_SHIFT))) | np.uint64(FL_LEAF)]
    # Work-around for HostMemory.table() (memory.py): ``self.slab[self._slot(frame)]`` indexes
    # the slab from before _slot grew it, so the growing call raises IndexError. Giving the
    # table frames their slots first keeps guest_write off that path.
    for f in range(table_gpa >> PAGE_SHIFT, ((pt0 >> PAGE_SHIFT) + pts)):
        h.mem._slot(int(h.vms[vm].hpa_of[f]))
    dropped = h.guest_write(vm, np.concatenate(gpa), np.concatenate(val))
    if dropped:
        raise RuntimeError(f"{dropped} table writes fell outside VM {vm}")
    return pml4


def make_host(pages: int, iotlb_entries: int, pwc: bool) -> HostIommu:
    """One VM whose first level maps ``pages`` data pages, bound nested at (SID, PASID 0)."""
    tables = -(-pages // 512) + 3
    vm_bytes = (pages + tables + 16) * PAGE_SIZE
    memory_mib = (vm_bytes >> 20) + 64
    h = HostIommu(IommuParams(memory_mib=memory_mib, iotlb_entries=iotlb_entries,
                              iotlb_ways=8, page_walk_cache=pwc))
    vm = h.create_vm(1, vm_bytes)
    root = build_fl(h, 1, pages * PAGE_SIZE, 0, pages)
    h.attach_device(SID, 1)
    h.set_pasid_entry(SID, 0, PasidEntry(pgtt=PGTT_NESTED, did=h.alloc_did(),
                                         slptr=vm.sl.root, sl_levels=4, flptr=root,
                                         fl_levels=4))
    return h


def requests(pages: np.ndarray) -> tuple[np.ndarray, ...]:
    n = pages.size
    addr = np.uint64(IOVA) + (pages.astype(np.uint64) << np.uint64(PAGE_SHIFT)) + np.uint64(64)
    return np.full(n, SID, np.int64), np.zeros(n, np.int64), addr, np.ones(n, np.uint8)


def best_of(fn: Callable[[], object], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gather_s(n: int, reps: int, rng: np.random.Generator) -> float:
    """Raw baseline: np.take of n random elements from a large uint64 array."""
    big = np.arange(GATHER_ELEMS, dtype=np.uint64)
    idx = rng.integers(0, GATHER_ELEMS, n)
    return best_of(lambda: np.take(big, idx), reps)


def bench_cold(n: int, reps: int, rng: np.random.Generator) -> list[dict]:
    """Caches off: every request is a full 24-reference nested walk of a distinct page."""
    h = make_host(n, iotlb_entries=0, pwc=False)
    sid, pasid, addr, access = requests(rng.permutation(n))
    check = h.translate(sid[:1000], pasid[:1000], addr[:1000], access[:1000])
    assert (check["fault"] == 0).all() and (check["walk_refs"] == 24).all()
    t_translate = best_of(lambda: h.translate(sid, pasid, addr, access), reps)
    e = h.sm.resolve(SID, 0).entry
    wb = WalkBatch(addr=addr, access=access, pgtt=np.full(n, PGTT_NESTED, np.uint8),
                   did=np.full(n, e.did, np.int64), pasid=pasid,
                   flptr=np.full(n, e.flptr, np.uint64), fl_levels=np.full(n, 4, np.uint8),
                   slptr=np.full(n, e.slptr, np.uint64), sl_levels=np.full(n, 4, np.uint8),
                   ssade=np.zeros(n, bool))
    t_walk = best_of(lambda: h.walker.walk(wb, fill_pwc=False), reps)
    t_gather = gather_s(n, reps, rng)
    return [row("cold nested walk (translate)", n, t_translate, t_gather),
            row("cold nested walk (Walker.walk)", n, t_walk, t_gather),
            row("  numpy gather baseline", n, t_gather, t_gather)]


def bench_hit(n: int, warm_pages: int, reps: int, rng: np.random.Generator) -> list[dict]:
    """IOTLB large enough for the working set, warmed, then n requests that all hit."""
    h = make_host(warm_pages, iotlb_entries=8 * warm_pages, pwc=True)
    h.translate(*requests(np.arange(warm_pages)))
    sid, pasid, addr, access = requests(rng.integers(0, warm_pages, n))
    check = h.translate(sid[:10000], pasid[:10000], addr[:10000], access[:10000])
    assert check["iotlb_hit"].all() and (check["walk_refs"] == 0).all()
    t_translate = best_of(lambda: h.translate(sid, pasid, addr, access), reps)
    did = np.full(n, h.sm.resolve(SID, 0).entry.did, np.int64)
    t_lookup = best_of(lambda: h.iotlb.lookup(did, pasid, addr), reps)
    t_gather = gather_s(n, reps, rng)
    return [row("IOTLB-hit translate", n, t_translate, t_gather),
            row("IOTLB.lookup only", n, t_lookup, t_gather),
            row("  numpy gather baseline", n, t_gather, t_gather)]


def profile_paths(n_cold: int, n_hit: int, warm: int, rng: np.random.Generator) -> None:
    """cProfile one timed translate call of each path (setup excluded); print the top."""
    cold = make_host(n_cold, iotlb_entries=0, pwc=False)
    hot = make_host(warm, iotlb_entries=8 * warm, pwc=True)
    hot.translate(*requests(np.arange(warm)))
    for label, h, reqs in (("cold nested walks", cold, requests(rng.permutation(n_cold))),
                           ("IOTLB hits", hot, requests(rng.integers(0, warm, n_hit)))):
        prof = cProfile.Profile()
        prof.runcall(h.translate, *reqs)
        print(f"== cProfile: {label} ==")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def row(name: str, ops: int, seconds: float, gather_seconds: float) -> dict:
    return {"name": name, "ops": ops, "seconds": seconds, "ops_per_s": ops / seconds,
            "vs_gather": seconds / gather_seconds}


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": sys.version.split()[0], "numpy": np.__version__,
            "platform": platform.platform(), "cpu_model": cpu, "cores": os.cpu_count()}


def print_table(rows: list[dict]) -> None:
    print(f"{'name':34} {'ops':>10} {'seconds':>9} {'ops/s':>13} {'vs gather':>10}")
    for r in rows:
        print(f"{r['name']:34} {r['ops']:>10,} {r['seconds']:>9.4f} {r['ops_per_s']:>13,.0f} "
              f"{r['vs_gather']:>9.1f}x")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench_translate", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--profile", action="store_true", help="cProfile both paths, print top")
    args = ap.parse_args(argv)
    n_cold, n_hit, warm, reps = ((20_000, 100_000, 1024, 1) if args.quick
                                 else (200_000, 1_000_000, 4096, 3))
    rng = np.random.default_rng(0)
    if args.profile:
        profile_paths(n_cold, n_hit, warm, rng)
        return {}
    rows = bench_cold(n_cold, reps, rng) + bench_hit(n_hit, warm, reps, rng)
    print_table(rows)
    from benchmarks.bench_e2e import GATHER_ELEMENTS, gather_rate
    big_gather = gather_rate()
    print(f"numpy random gather of {GATHER_ELEMENTS:,} int64 elements, same run: "
          f"{big_gather:,.0f} elements/s; cold walks {rows[0]['ops_per_s'] / big_gather:.4f} "
          f"and IOTLB hits {rows[3]['ops_per_s'] / big_gather:.4f} per gathered element")
    cold, hit = rows[0]["ops_per_s"], rows[3]["ops_per_s"]
    goals = {"cold_nested_walks_per_s": cold, "iotlb_hit_translations_per_s": hit}
    for k, goal in GOALS.items():
        print(f"goal {k}: {goals[k]:,.0f} of {goal:,} ({goals[k] / goal:.1%})")
    record = {"bench": "translate", "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "quick": args.quick, "rows": rows, "goals": GOALS, "measured": goals,
              "gather_1e7_per_s": big_gather,
              **machine()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
