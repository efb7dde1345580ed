"""Benchmark: the Ray back-end at 16 and 64 VMs, on one and on two cores.

For each case a fresh subprocess pins itself (and so the local Ray it starts, whose processes
inherit the affinity) to N cores, starts Ray with ``num_cpus=N``, and runs the config through
``run_config``. Recorded: wall time of the epoch loop and of the whole run (Ray start-up
excluded), emulated I/Os per wall second, peak RSS per VM (every actor's peak, summed, over the
VM count), and the share of the loop's wall time spent outside emulation work (Ray calls,
serialisation, the driver's metrics: 1 - critical-path emulation time / loop time). That
share counts the run's one-time start of the loop (opening the metrics stream, the first
epoch's first calls); ``steady_overhead_share`` is the same share over epochs 1.. only, the
cost every further epoch adds. An inproc run of the same config gives the single-process
reference. Wall time is measured here only, never in a test. Goals (issue 10): overhead under
10% at 16 VMs; two cores at least 1.8x one core on a two-host 16-VM run; 256 VMs in 24 GiB
(``--vms 256``). Keys of an existing results file that a run does not write (hand-added
``extra_cases``, earlier figures kept for comparison) are kept.

``--baseline DIR`` runs every Ray case a second time from another source tree (an earlier
version of this project, e.g. a ``git worktree``) right after this tree's, so the comparison
is made in the same minutes on the same loaded machine; ``--repeat N`` runs each case N times.
``peak_rss_total_gib`` adds the driver's peak to the actors'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "ray.json"


def config(vms: int, hosts: int, duration_us: int):
    from cluster.config import parse_config

    return parse_config({
        "experiment": {"name": f"bench-{vms}vm-{hosts}h", "seed": 1,
                       "duration_us": duration_us, "epoch_us": 100},
        "host": {"count": hosts, "memory_mib": max(1024, 64 * vms // hosts + 256)},
        "vm": {"nic": {"mode": "nested", "count": vms // 2, "vcpus": 2, "memory_mib": 48,
                       "workload": {"kind": "nic", "offered_gbps": 2.0, "rx_ring": 64,
                                    "tx_ring": 64}},
               "nvme": {"mode": "shadow", "count": vms - vms // 2, "vcpus": 2,
                        "memory_mib": 48,
                        "workload": {"kind": "nvme", "queue_depth": 4,
                                     "io_sizes": [4096, 16384], "io_weights": [0.5, 0.5]}}},
    })


def one_case(vms: int, hosts: int, cores: int, backend: str, duration_us: int) -> dict:
    """Run in this process (called in a pinned subprocess); return the measurements."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from cluster.runner import run_config

    cfg = config(vms, hosts, duration_us)
    started = {}
    if backend == "ray":
        import ray

        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    epochs = []
    hook = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        outcome = run_config(cfg, out, backend,
                             on_epoch=lambda ep: epochs.append(
                                 (time.perf_counter(), getattr(hook.get("m"), "emulation_s", 0.0))),
                             machine_hook=lambda m: (hook.setdefault("m", m),
                                                     started.setdefault("t",
                                                                        time.perf_counter())))
        manifest = json.loads((outcome.path / "manifest.json").read_text())
    total = time.perf_counter() - t0
    loop = epochs[-1][0] - started["t"]
    ios = sum(outcome.summary["ios"].to_pylist())
    rec = {"vms": vms, "hosts": hosts, "cores": cores, "backend": backend,
           "virtual_us": duration_us, "ios": ios, "wall_s": round(total, 3),
           "loop_wall_s": round(loop, 3), "ios_per_wall_s": round(ios / loop, 1),
           "start_s": round(started["t"] - t0, 3)}  # building the machine (actors' start)
    if backend == "ray":
        m = hook["m"]
        rss = manifest["placement"]["peak_rss_bytes"]
        rec["actors"] = len(rss)
        rec["peak_rss_per_vm_mib"] = round(sum(rss.values()) / vms / 2**20, 1)
        rec["emulation_s"] = round(m.emulation_s, 3)
        rec["overhead_share"] = round(max(0.0, 1 - m.emulation_s / loop), 4)
        (t1, e1), (tn, en) = epochs[0], epochs[-1]
        if tn > t1:
            rec["steady_overhead_share"] = round(max(0.0, 1 - (en - e1) / (tn - t1)), 4)
        ray.shutdown()
        import resource

        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rec["peak_rss_total_gib"] = round((sum(rss.values()) + driver) / 2**30, 2)
    else:
        import resource

        rec["peak_rss_per_vm_mib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / vms, 1)
    return rec


def run_case(vms: int, hosts: int, cores: int, backend: str, duration_us: int,
             root: Path = ROOT) -> dict:
    """One case in a fresh subprocess, from the source tree ``root``."""
    code = ("import json, sys; from benchmarks.bench_ray import one_case; "
            f"print('RESULT', json.dumps(one_case({vms}, {hosts}, {cores}, {backend!r}, "
            f"{duration_us})))")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=3600)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case {vms} VMs / {hosts} hosts / {cores} cores / {backend} failed:\n"
                       f"{r.stderr[-3000:]}")


def _line(rec: dict, tag: str = "") -> str:
    extra = (f", overhead {100 * rec['overhead_share']:.1f}% "
             f"(steady {100 * rec.get('steady_overhead_share', 0):.1f}%), "
             f"{rec['actors']} actors" if rec["backend"] == "ray" else "")
    return (f"{tag}{rec['vms']:4d} VMs {rec['hosts']} host(s) {rec['cores']} core(s) "
            f"{rec['backend']:6s}: {rec['loop_wall_s']:7.2f} s loop ({rec['wall_s']:.2f} s "
            f"run), {rec['ios_per_wall_s']:9,.0f} I/Os/s, "
            f"{rec['peak_rss_per_vm_mib']:.0f} MiB/VM{extra}")


def _speedups(records: list[dict]) -> dict[str, list[float]]:
    """Loop wall time on one core over two cores, per (VMs, hosts), for each repeat."""
    out: dict[str, list[float]] = {}
    for vms, hosts in sorted({(r["vms"], r["hosts"]) for r in records
                              if r["backend"] == "ray"}):
        one = [r["loop_wall_s"] for r in records
               if (r["vms"], r["hosts"], r["cores"], r["backend"]) == (vms, hosts, 1, "ray")]
        two = [r["loop_wall_s"] for r in records
               if (r["vms"], r["hosts"], r["cores"], r["backend"]) == (vms, hosts, 2, "ray")]
        if one and two:
            out[f"{vms}vm-{hosts}host"] = [round(a / b, 2) for a, b in zip(one, two,
                                                                           strict=False)]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench_ray")
    ap.add_argument("--vms", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--hosts", type=int, nargs="*", default=None,
                    help="host counts per VM count (default: the fewest that hold the VMs, "
                         "and two hosts for 16 VMs)")
    ap.add_argument("--cores", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--duration-us", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-inproc", action="store_true", help="Ray cases only")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="source tree of an earlier version: each Ray case runs there too")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    cases = []
    for vms in args.vms:
        fewest = -(-vms // 255)  # a host holds at most 255 VMs
        hosts_list = args.hosts or ([fewest, 2] if vms == 16 else [fewest])
        for hosts in hosts_list:
            if hosts < fewest:
                continue
            if not args.no_inproc:
                cases.append((vms, hosts, 1, "inproc"))
            cases += [(vms, hosts, cores, "ray") for cores in args.cores]
    records, baseline = [], []
    for _ in range(args.repeat):
        for vms, hosts, cores, backend in cases:
            rec = run_case(vms, hosts, cores, backend, args.duration_us)
            records.append(rec)
            print(_line(rec), flush=True)
            if args.baseline is not None and backend == "ray":
                old = run_case(vms, hosts, cores, backend, args.duration_us, args.baseline)
                baseline.append(old)
                print(_line(old, "  baseline "), flush=True)
    speedup = _speedups(records)
    print(f"two cores vs one: {speedup}")
    result: dict = {"cases": records, "speedup_2_vs_1_core": speedup,
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if baseline:
        result["baseline"] = {"tree": str(args.baseline), "cases": baseline,
                              "speedup_2_vs_1_core": _speedups(baseline)}
        print(f"baseline two cores vs one: {result['baseline']['speedup_2_vs_1_core']}")
    if args.out.exists():
        kept = json.loads(args.out.read_text())
        result.update({k: v for k, v in kept.items() if k not in result})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
