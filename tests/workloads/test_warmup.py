"""experiment.warmup_us: set-up runs first; the summary covers the measured window only."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from cluster.config import ConfigError, parse_config
from cluster.runner import run_config

RX_RING = 64


def nic_run(tmp_path, warmup_us: int, duration_us: int = 2000):
    cfg = parse_config({
        "experiment": {"name": "warm", "seed": 5, "duration_us": duration_us,
                       "epoch_us": 100, "warmup_us": warmup_us},
        "host": {"memory_mib": 256},
        "vm": {"g": {"mode": "shadow", "vcpus": 2, "memory_mib": 64,
                     "workload": {"kind": "nic", "rx_ring": RX_RING, "tx_ring": RX_RING,
                                  "offered_gbps": 2.0}}}})
    out = run_config(cfg, tmp_path / f"w{warmup_us}")
    (row,) = out.summary.to_pylist()
    return row, out


def test_summary_covers_the_window_after_warmup(tmp_path):
    """With a warm-up the RX ring fill (2 queues x 64 maps) falls before the window: the
    window's maps and unmaps balance to within the ring, its counts equal the metrics of its
    epochs, and the row shows the window's length."""
    row, out = nic_run(tmp_path, warmup_us=3000)
    assert (row["sim_ns"], row["window_ns"]) == (5_000_000, 2_000_000)
    metrics = ds.dataset(out.tables["metrics"]).to_table().to_pylist()
    window = [m for m in metrics if m["t_end_ns"] > 3_000_000]
    assert len(window) == 20
    for col in ("ios", "maps", "unmaps", "vm_exits", "iotlb_misses", "walk_refs"):
        assert row[col] == sum(m[col] for m in window), col
    assert row["ios"] > 0 and abs(row["maps"] - row["unmaps"]) < RX_RING
    cold, _ = nic_run(tmp_path, warmup_us=0, duration_us=2000)
    assert cold["window_ns"] == cold["sim_ns"] == 2_000_000
    assert cold["maps"] - cold["unmaps"] >= 2 * RX_RING        # the ring fill is counted


@pytest.mark.parametrize(("warmup", "what"), [(-1, "0.."), (150, "multiple")])
def test_warmup_is_checked(warmup, what):
    """A negative warm-up, or one that does not end on an epoch boundary, is refused."""
    with pytest.raises(ConfigError, match=f"experiment.warmup_us.*{what}"):
        parse_config({"experiment": {"name": "x", "warmup_us": warmup, "epoch_us": 100},
                      "host": {"memory_mib": 64},
                      "vm": {"g": {"memory_mib": 16, "workload": {"kind": "nic"}}}})
