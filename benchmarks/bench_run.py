"""Benchmark: emulated I/Os per wall second for the quickstart NIC VM, nested strict.

Goal (issue 4): 820,000 MTU packets per second per core (10 GbE in real time). The run is the
whole in-process stack: workload events, guest DMA API, protocol encoding, host translate and
oracle. Wall time is measured here only, never in a test.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cluster.config import load_config
from cluster.engine import Engine, InProcTransport
from cluster.runner import build

ROOT = Path(__file__).resolve().parent.parent
GOAL_PPS = 820_000


def main(argv: list[str] | None = None) -> dict:
    duration_us = 2000
    cfg = load_config(ROOT / "configs" / "quickstart.toml",
                      [f"experiment.duration_us={duration_us}"])
    cfg = replace(cfg, vms=tuple(g for g in cfg.vms if g.name == "nic-nested"))
    host, agents, _ = build(cfg)
    engine = Engine(InProcTransport(host, agents), cfg.experiment.epoch_us * 1000)
    t0 = time.perf_counter()
    engine.run(duration_us * 1000)
    wall = time.perf_counter() - t0
    ios = agents[0].stats["ios"]
    rate = ios / wall if wall > 0 else 0.0
    rec = {"name": "quickstart nic-nested strict", "ios": ios, "virtual_us": duration_us,
           "wall_s": round(wall, 4), "ios_per_wall_s": round(rate, 1), "goal": GOAL_PPS,
           "of_goal": round(rate / GOAL_PPS, 4), "python": platform.python_version(),
           "platform": platform.platform(),
           "date": datetime.now(UTC).isoformat(timespec="seconds")}
    print(f"{rec['name']}: {ios} I/Os in {wall:.2f} s wall = {rate:,.0f} I/Os/s "
          f"({100 * rec['of_goal']:.1f}% of the {GOAL_PPS:,} goal)")
    out = ROOT / "benchmarks" / "results" / "run.json"
    out.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


if __name__ == "__main__":
    main()
