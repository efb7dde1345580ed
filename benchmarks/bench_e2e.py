"""Benchmark: end-to-end emulated I/Os per wall second, per mode x policy x workload x VMs.

Each cell runs in its own single-threaded child process (so its peak RSS is its own) on one
host in process: workload events, guest DMA API, wire encoding, host translate and oracle. It
records set-up time per VM, emulated I/Os per wall second, peak RSS per VM and RSS growth per
emulated second, and, measured in the same process just before the run, the rate of a numpy
random gather of GATHER_ELEMENTS int64 elements: the machine's speed for the memory-bound
work the emulator does, so figures from different machines can be compared by their ratio.
Virtual durations are short so that `make bench` stays within minutes; they are printed.
Wall time is measured here only, never in a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
GATHER_ELEMENTS = 10_000_000
VM_MEMORY_MIB = 128
EPOCH_US = 100
# Virtual run time per VM count (the same for all, so per-I/O cost compares across counts):
# 20 ms. Shorter runs measure mostly start-up on the compiled paths (the first sight of each
# distinct invalidation is resolved in Python; NIC nested strict, one VM: 17.6 us per I/O over
# 5 ms, 9.8 over 20 ms, now that a vCPU-bound guest does ~20 I/Os per 100-us epoch). A shadow
# NIC guest spends its first ~2.5 ms filling the RX ring (one trapped map per buffer).
DURATION_US = {1: 20000, 16: 20000, 64: 20000}
SHADOW_NIC_DURATION_US = 20000


def duration_us(mode: str, workload: str, vms: int) -> int:
    return SHADOW_NIC_DURATION_US if (mode, workload) == ("shadow", "nic") else DURATION_US[vms]
# (mode, policy): shadow tables are always strict; passthrough has no vIOMMU policy.
MODES = (("shadow", "strict"), ("nested", "strict"), ("nested", "lazy"),
         ("passthrough", "strict"))
WORKLOADS = {
    "nic": {"kind": "nic", "offered_gbps": 10.0, "packet_sizes": [1500]},
    "nvme": {"kind": "nvme", "queue_depth": 32, "io_sizes": [4096, 131072],
             "io_weights": [0.8, 0.2]},
}


def _rss_kib(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident set in KiB from /proc; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux clear_refs 5), so the gather's arrays
    do not count as the emulator's peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def gather_rate(n: int = GATHER_ELEMENTS, seed: int = 0) -> float:
    """Elements per second of ``table[idx]`` with ``n`` random int64 indices into ``n``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    table = np.arange(n, dtype=np.int64)
    idx = rng.integers(0, n, n)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        table[idx].sum()
        best = min(best, time.perf_counter() - t0)
    return n / best


def config(mode: str, policy: str, workload: str, vms: int, run_us: int) -> dict:
    return {
        "experiment": {"name": f"bench-{mode}-{policy}-{workload}-{vms}", "seed": 1,
                       "duration_us": run_us, "epoch_us": EPOCH_US},
        "host": {"memory_mib": max(2048, VM_MEMORY_MIB * vms + 1024), "iotlb_entries": 1024,
                 "iotlb_ways": 8, "page_walk_cache": True, "sl_page_size": "4k",
                 "qi_entries": 2048},
        "vm": {"bench": {"count": vms, "mode": mode, "policy": policy, "vcpus": 2,
                         "memory_mib": VM_MEMORY_MIB, "workload": dict(WORKLOADS[workload])}},
    }


def run_cell(mode: str, policy: str, workload: str, vms: int) -> dict:
    """One cell, in this process: build, run, measure."""
    from cluster.config import parse_config
    from cluster.engine import Engine, InProcTransport
    from cluster.runner import build
    from host_iommu.kernels.warm import warm_up

    run_us = duration_us(mode, workload, vms)
    warm_up()   # compile or load the kernels now: bench_jit measures that start-up
    gather = gather_rate()
    cfg = parse_config(config(mode, policy, workload, vms, run_us))
    _reset_peak_rss()
    rss0 = _rss_kib()
    t0 = time.perf_counter()
    host, agents, _ = build(cfg)
    setup_s = time.perf_counter() - t0
    engine = Engine(InProcTransport(host, agents), cfg.experiment.epoch_us * 1000)
    # RSS growth is taken over the second half only: the first includes warm-up allocations.
    t0 = time.perf_counter()
    engine.run(run_us * 500)
    rss_mid = _rss_kib()
    engine.run(run_us * 1000)
    wall = time.perf_counter() - t0
    rss2 = _rss_kib()
    peak = _rss_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ios = sum(a.stats["ios"] for a in agents)
    return {"mode": mode, "policy": policy, "workload": workload, "vms": vms,
            "virtual_us": run_us, "ios": ios, "wall_s": round(wall, 3),
            "ios_per_wall_s": round(ios / wall, 1) if wall > 0 else 0.0,
            "wall_us_per_io": round(1e6 * wall / ios, 1) if ios else None,
            "setup_s_per_vm": round(setup_s / vms, 4),
            "peak_rss_mib_per_vm": round((peak - rss0) / 1024 / vms, 2),
            "rss_growth_mib_per_emulated_s": round((rss2 - rss_mid) / 1024 / (run_us / 2e6),
                                                   1),
            "gather_per_s": round(gather),
            "ios_per_1e6_gathers": round(1e6 * ios / wall / gather, 2) if wall > 0 else 0.0}


def _child(cell: tuple[str, str, str, int]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--cell", json.dumps(cell)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"mode": cell[0], "policy": cell[1], "workload": cell[2], "vms": cell[3],
                "error": out.stderr.strip().splitlines()[-1:] or [f"rc {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    head = ("| mode | policy | workload | VMs | virtual µs | I/Os | I/Os per wall s | "
            "wall µs/I/O | set-up s/VM | peak RSS MiB/VM | RSS growth MiB/emulated s | "
            "gather elem/s | I/Os per 1e6 gathers |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['policy']} | {r['workload']} | {r['vms']} | "
                         f"error: {r['error']} |")
            continue
        lines.append(" | ".join(["", r["mode"], r["policy"], r["workload"], str(r["vms"]),
                                 str(r["virtual_us"]), str(r["ios"]),
                                 f"{r['ios_per_wall_s']:,.0f}", str(r["wall_us_per_io"]),
                                 str(r["setup_s_per_vm"]), str(r["peak_rss_mib_per_vm"]),
                                 str(r["rss_growth_mib_per_emulated_s"]),
                                 f"{r['gather_per_s']:.3g}", str(r["ios_per_1e6_gathers"]),
                                 ""]).strip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__)
    ap.add_argument("--vms64", action="store_true",
                    help="add 64 VMs to a --vms list (the default list has them)")
    ap.add_argument("--vms", type=int, nargs="*", help="VM counts (default 1 16 64)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        rec = run_cell(*json.loads(args.cell))
        print(json.dumps(rec))
        return rec
    counts = args.vms or [1, 16, 64]
    if args.vms64 and 64 not in counts:
        counts.append(64)
    print("virtual time per run (shortened to keep make bench short): "
          + ", ".join(f"{v} VM(s): {DURATION_US[v]} us" for v in counts)
          + f" (shadow NIC: {SHADOW_NIC_DURATION_US} us)")
    rows = []
    for vms in counts:
        for mode, policy in MODES:
            for workload in WORKLOADS:
                rows.append(_child((mode, policy, workload, vms)))
                r = rows[-1]
                print(f"  {mode:<11} {policy:<6} {workload:<4} x{vms:<2}: "
                      + (f"{r['ios_per_wall_s']:>9,.0f} I/Os per wall s" if "error" not in r
                         else f"error {r['error']}"), flush=True)
    table = _table(rows)
    print(table)
    rec = {"cells": rows, "duration_us": {str(v): DURATION_US[v] for v in counts},
           "gather_elements": GATHER_ELEMENTS, "python": platform.python_version(),
           "platform": platform.platform(), "cpus": os.cpu_count(),
           "date": datetime.now(UTC).isoformat(timespec="seconds")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "e2e.json").write_text(json.dumps(rec, indent=2) + "\n")
    (OUT / "e2e.md").write_text(
        "# End-to-end emulated I/Os per wall second (make bench)\n\n"
        f"{rec['date']}, Python {rec['python']}, {rec['platform']}; each cell one process, "
        "one thread. Virtual time per run: "
        + ", ".join(f"{v} VM(s) {DURATION_US[v]} us" for v in counts)
        + f" (shadow NIC {SHADOW_NIC_DURATION_US} us: its first ~2.5 ms fill the RX ring).\n\n"
        + table + "\n")
    return rec


if __name__ == "__main__":
    main()
