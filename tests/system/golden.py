"""Whole-run result tables of a fixed set of worlds, written once and compared later.

A development tool for work that must not change behaviour (speed work, refactors): write the
summary, metrics and faults tables of every world below with the code before the change, then
check the code after it against them, value for value.

    python -m tests.system.golden --write DIR     # before the change
    python -m tests.system.golden --check DIR     # after it: exit 1 and name the first difference
    python -m tests.system.golden --check DIR --only quickstart nested-nic-rogue

The worlds cover every mode, policy and workload, rogue DMAs, churn, several devices and
PASID queues, trace replay, single flush queue and a small shared QI; each runs in process
(``cluster.runner.run_config``, backend inproc).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from cluster.config import load_config, parse_config
from cluster.runner import run_config

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("summary", "metrics", "faults")
# Columns that depend on the code's identity or the wall clock, not on the emulated machine.
VOLATILE = frozenset({"run", "code_version", "version", "wall_s", "created"})


def _nic(mode: str, policy: str = "strict", **wl: Any) -> dict:
    return {"mode": mode, "policy": policy, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nic", "offered_gbps": 4.0, "rx_ring": 64, "tx_ring": 64,
                         **wl}}


def _nvme(mode: str, policy: str = "strict", **wl: Any) -> dict:
    return {"mode": mode, "policy": policy, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nvme", "queue_depth": 8, "io_sizes": [4096, 65536],
                         "io_weights": [0.7, 0.3], **wl}}


def _exp(name: str, vms: dict, *, duration_us: int = 1500, host: dict | None = None,
         seed: int = 5, **exp: Any) -> dict:
    return {"experiment": {"name": name, "seed": seed, "duration_us": duration_us,
                           "epoch_us": 100, **exp},
            "host": {"memory_mib": 768, **(host or {})}, "vm": vms}


def worlds(tmp: Path) -> dict[str, Any]:
    """name -> a parsed Config."""
    out: dict[str, Any] = {}
    for p in sorted((ROOT / "configs").glob("*.toml")):
        out[p.stem] = load_config(p)
    raw: dict[str, dict] = {}
    for mode, policy in (("shadow", "strict"), ("nested", "strict"), ("nested", "lazy"),
                         ("passthrough", "strict")):
        raw[f"{mode}-{policy}-nic-rogue"] = _exp(
            f"g-{mode}-{policy}-nic", {"a": _nic(mode, policy, rogue_fraction=0.05),
                                       "b": {**_nic(mode, policy), "count": 2}})
        raw[f"{mode}-{policy}-nvme-rogue"] = _exp(
            f"g-{mode}-{policy}-nvme", {"a": _nvme(mode, policy, rogue_fraction=0.05),
                                        "b": {**_nvme(mode, policy), "count": 2}})
    raw["nested-lazy-single-fq-ats"] = _exp(
        "g-fq", {"a": {**_nic("nested", "lazy", rogue_fraction=0.02), "count": 3,
                       "flush_queue": "single", "ats": True}},
        host={"iotlb_entries": 64, "iotlb_ways": 4, "qi_entries": 128})
    raw["churn-rogue"] = _exp(
        "g-churn", {"a": {**_nic("nested", "lazy", rogue_fraction=0.03), "count": 2,
                          "churn": {"kind": "balloon", "interval_us": 100, "pages": 64}},
                    "s": {**_nvme("shadow", rogue_fraction=0.03),
                          "churn": {"kind": "balloon", "interval_us": 150, "pages": 32}}})
    raw["multi-pasid"] = _exp(
        "g-multi", {"m": {"mode": "nested", "policy": "strict", "vcpus": 2, "memory_mib": 64,
                          "workload": [
                              {"kind": "nic", "offered_gbps": 2.0, "pasid_queues": 2},
                              {"kind": "nvme", "queue_depth": 4}]}})
    raw["two-hosts"] = _exp(
        "g-hosts", {"a": {**_nic("nested", "strict"), "count": 2},
                    "b": {**_nvme("shadow"), "count": 2}},
        host={"count": 2})
    raw["warmup-2m"] = _exp(
        "g-2m", {"a": _nic("nested", "strict"), "b": _nvme("nested", "lazy")},
        host={"sl_page_size": "2m", "page_walk_cache": False}, warmup_us=500)
    trace = tmp / "golden.trace"
    from workloads.trace import import_ftrace
    import_ftrace(ROOT / "tests" / "workloads" / "data" / "iommu_map_unmap.trace.txt", trace)
    for mode in ("shadow", "nested"):
        raw[f"trace-{mode}"] = _exp(
            f"g-trace-{mode}", {"t": {"mode": mode, "policy": "strict", "vcpus": 2,
                                      "memory_mib": 64,
                                      "workload": {"kind": "trace", "path": str(trace)}}})
    for name, r in raw.items():
        out[name] = parse_config(r)
    return out


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    t = ds.dataset(path, format="parquet").to_table()
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in t.to_pylist()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def tables(cfg: Any, tmp: Path) -> dict[str, list[dict]]:
    outcome = run_config(cfg, tmp / "out", "inproc", overwrite=True)
    return {t: _rows(outcome.tables[t]) if t in outcome.tables else []
            for t in TABLES}


def _first_diff(a: list[dict], b: list[dict]) -> str | None:
    if len(a) != len(b):
        return f"{len(a)} rows expected, {len(b)} got"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            return f"row {i}: " + ", ".join(f"{k}: {x.get(k)!r} != {y.get(k)!r}"
                                            for k in keys[:8])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.system.golden", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="DIR")
    g.add_argument("--check", metavar="DIR")
    ap.add_argument("--only", nargs="*", help="world names (default: all)")
    args = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        ws = worlds(tmp)
        names = args.only or list(ws)
        for name in names:
            t0 = time.perf_counter()
            got = tables(ws[name], tmp)
            wall = time.perf_counter() - t0
            if args.write:
                Path(args.write).mkdir(parents=True, exist_ok=True)
                (Path(args.write) / f"{name}.json").write_text(
                    json.dumps(got, sort_keys=True, default=str))
                print(f"{name:<28} written ({wall:.1f} s)", flush=True)
                continue
            want = json.loads((Path(args.check) / f"{name}.json").read_text())
            got = json.loads(json.dumps(got, sort_keys=True, default=str))
            diffs = [(t, d) for t in TABLES if (d := _first_diff(want[t], got[t]))]
            bad += bool(diffs)
            print(f"{name:<28} {'DIFFERS' if diffs else 'equal'} ({wall:.1f} s)", flush=True)
            for t, d in diffs:
                print(f"    {t}: {d}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
