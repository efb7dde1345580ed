"""Benchmark: start-up cost of the compiled kernels, cold and warm numba cache.

The kernels in host_iommu/kernels/ are numba ``@njit(cache=True)``: the first process on a
machine compiles them and writes the machine code to the cache (by default beside the
sources, in ``__pycache__``; here ``NUMBA_CACHE_DIR`` points at a fresh folder), and every
later process, Ray workers on the same node included, loads it instead of compiling. Each
measurement is one child process that imports the emulator, builds a one-VM nested NIC world
and runs it for ``RUN_US`` of virtual time, so every kernel on the live path is compiled (or
loaded) once: "cold" with an empty cache folder, then "warm" twice with the folder the cold
run filled. The figure is the child's wall time from start to exit, beside the time of the
same child with numba's JIT disabled where that is possible (``NUMBA_DISABLE_JIT=1``: the
kernels run as Python, so it shows what start-up costs without any compilation).
Results: benchmarks/results/jit.json.
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
OUT = ROOT / "benchmarks" / "results"
RUN_US = 300

CHILD = f"""
import time
t0 = time.perf_counter()
from cluster.config import parse_config
from cluster.engine import Engine, InProcTransport
from cluster.runner import build
from benchmarks.bench_e2e import config
cfg = parse_config(config("nested", "strict", "nic", 1, {RUN_US}))
host, agents, _ = build(cfg)
Engine(InProcTransport(host, agents), cfg.experiment.epoch_us * 1000).run({RUN_US} * 1000)
cfg = parse_config(config("shadow", "strict", "nvme", 1, {RUN_US}))
host, agents, _ = build(cfg)
Engine(InProcTransport(host, agents), cfg.experiment.epoch_us * 1000).run({RUN_US} * 1000)
print(time.perf_counter() - t0)
"""


def _child(env_extra: dict[str, str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", **env_extra)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"rc {out.returncode}"])[-1]}
    return {"process_s": round(wall, 3), "in_process_s": round(float(out.stdout.split()[-1]), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_jit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        rows = {"cold": _child({"NUMBA_CACHE_DIR": cache}),
                "warm": _child({"NUMBA_CACHE_DIR": cache}),
                "warm_again": _child({"NUMBA_CACHE_DIR": cache}),
                "no_jit": _child({"NUMBA_DISABLE_JIT": "1"})}
        cached = sum(1 for _ in Path(cache).rglob("*.nbi"))
    for name, r in rows.items():
        print(f"  {name:<11}" + (f"process {r['process_s']:.2f} s, import+build+run "
                                 f"{r['in_process_s']:.2f} s" if "error" not in r
                                 else f"error {r['error']}"))
    print(f"  cache entries (numba index files): {cached}")
    rec = {"runs": rows, "cache_index_files": cached, "run_us": RUN_US,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jit.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


if __name__ == "__main__":
    main()
