"""Whole experiments, in process: the behaviour a user reads off the summary table."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from cluster.config import parse_config
from cluster.runner import run_config
from workloads.trace import import_ftrace

DATA = Path(__file__).parent.parent / "workloads" / "data"


def nic_group(mode: str, policy: str = "strict", rogue: float = 0.0, gbps: float = 4.0,
              **extra) -> dict:
    return {"mode": mode, "policy": policy, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nic", "offered_gbps": gbps, "rx_ring": 64, "tx_ring": 64,
                         "rogue_fraction": rogue}, **extra}


def run(tmp_path: Path, vms: dict, host: dict | None = None, duration_us: int = 1500,
        seed: int = 3, name: str = "t") -> dict[str, dict]:
    cfg = parse_config({"experiment": {"name": name, "seed": seed, "duration_us": duration_us,
                                       "epoch_us": 100},
                        "host": {"memory_mib": 1024, **(host or {})}, "vm": vms})
    out = run_config(cfg, tmp_path, overwrite=True)
    return {r["group"]: r for r in out.summary.to_pylist()}, out, cfg


def test_nested_maps_never_exit_and_shadow_exits_on_every_map(tmp_path):
    """Strict NIC, the same 150 packets in every mode: shadow's exits exceed nested's by at
    least its map calls (every shadow map and unmap exits, nested maps never do: its exits are
    its unmaps); pass-through never exits."""
    def fixed(mode: str) -> dict:
        g = nic_group(mode, gbps=2.0)
        g["workload"]["packets"] = 150
        return g

    rows, _, _ = run(tmp_path, {"nested": fixed("nested"), "shadow": fixed("shadow"),
                                "pt": fixed("passthrough")}, duration_us=4000)
    nested, shadow, pt = rows["nested"], rows["shadow"], rows["pt"]
    assert nested["ios"] == shadow["ios"] == pt["ios"] == 150
    assert shadow["vm_exits"] - nested["vm_exits"] >= shadow["maps"] > 0
    assert nested["vm_exits"] == nested["unmaps"]
    assert shadow["vm_exits"] == shadow["maps"] + shadow["unmaps"]
    assert pt["vm_exits"] == 0
    assert shadow["vmm_map_calls"] > 0 and nested["vmm_map_calls"] == 0


def test_cold_walk_references_per_miss(tmp_path):
    """Caches off, 4-KiB second level: a nested miss reads 24 entries, a shadow miss 4."""
    rows, _, _ = run(tmp_path, {"nested": nic_group("nested"), "shadow": nic_group("shadow")},
                     host={"iotlb_entries": 0, "page_walk_cache": False,
                           "sl_page_size": "4k"}, duration_us=2000)
    for group, per_miss in (("nested", 24), ("shadow", 4)):
        r = rows[group]
        assert r["iotlb_misses"] > 0
        assert r["walk_refs"] == per_miss * r["iotlb_misses"], group


# The safety experiments (strict rogue DMAs that reach unmapped pages, lazy runs over several
# flush periods, oracle positive controls, balloon churn) live in tests/system/.


def test_shadow_forces_strict_and_says_so(tmp_path):
    """Asking lazy under shadow runs strict, with a note naming the group, and the summary
    shows strict behaviour: no lazy flush, one exit per map and per unmap (the longer check
    is tests/system/test_safety.py::test_shadow_forces_strict_in_behaviour)."""
    rows, _, cfg = run(tmp_path, {"sh": nic_group("shadow", "lazy")}, duration_us=600)
    r = rows["sh"]
    assert r["policy"] == "strict"
    assert any("sh" in n and "strict" in n for n in cfg.notes)
    assert r["maps"] > 0 and r["lazy_flushes"] == 0
    assert r["vm_exits"] == r["maps"] + r["unmaps"]


def test_same_config_and_seed_give_identical_tables(tmp_path):
    """A run is a pure function of (config, seed): summary and metrics are identical, and
    another seed gives other results."""
    vms = {"n": nic_group("nested", "lazy", rogue=0.02),
           "v": {"mode": "shadow", "memory_mib": 64,
                 "workload": {"kind": "nvme", "queue_depth": 4, "io_sizes": [4096, 16384],
                              "io_weights": [0.5, 0.5]}}}
    _, a, _ = run(tmp_path / "a", vms, duration_us=800)
    _, b, _ = run(tmp_path / "b", vms, duration_us=800)
    for table in ("summary", "metrics"):
        ta = pq.read_table(a.tables[table])
        tb = pq.read_table(b.tables[table])
        assert ta.num_rows > 0
        assert ta.equals(tb), table
    rows_c, _, _ = run(tmp_path / "c", vms, duration_us=800, seed=4)
    rows_a = {r["group"]: r for r in pq.read_table(a.tables["summary"]).to_pylist()}
    for g in ("n", "v"):
        assert (rows_a[g]["bytes"], rows_a[g]["dma_requests"]) != \
            (rows_c[g]["bytes"], rows_c[g]["dma_requests"]), g


def test_imported_ftrace_replays_with_equal_counts(tmp_path):
    """A trace imported from Linux iommu:map/unmap text replays with the same counts."""
    trace = tmp_path / "sample.msgpack"
    counts = import_ftrace(DATA / "iommu_map_unmap.trace.txt", trace)
    rows, _, _ = run(tmp_path, {"tr": {"mode": "nested", "memory_mib": 64,
                                       "workload": {"kind": "trace", "path": str(trace)}}},
                     duration_us=2000)
    # iommu:map fires per contiguous piece, iommu:unmap per unmap call; the mapping the
    # trace unmaps before mapping it is declared live and mapped first
    assert rows["tr"]["trace_live_maps"] == counts["live"] == 1
    assert rows["tr"]["iommu_map_events"] == counts["map"] + counts["live"]
    assert rows["tr"]["unmaps"] == counts["unmap"]
    assert rows["tr"]["maps"] < counts["map"]  # the scatter list was one map call
