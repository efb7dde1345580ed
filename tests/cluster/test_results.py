"""Result store: Hive-partitioned datasets, manifests, streams, failed runs; report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cluster.config import config_to_dict, parse_config
from cluster.report import ReportError, format_summary
from cluster.results import (
    META_CONFIG,
    META_RUN,
    META_SEED,
    META_VERSIONS,
    RunExistsError,
    RunWriter,
    is_complete,
    read_manifest,
    read_run,
    read_summaries,
    recover_stream,
    run_dir,
    run_id,
    run_status,
)


class Nic:
    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0


REG = SimpleNamespace(WORKLOADS={"nic": Nic}, CHURN_PARAMS=None)
SCHEMA = pa.schema([("epoch", pa.int64()), ("ios", pa.int64())])


def make_cfg(seed: int = 0):
    return parse_config({"experiment": {"name": "exp", "seed": seed},
                         "vm": {"a": {"mode": "nested", "workload": {"kind": "nic"}}}},
                        workloads=REG)


def batch(start: int, n: int) -> pa.RecordBatch:
    return pa.record_batch([pa.array(range(start, start + n)), pa.array([7] * n)],
                           schema=SCHEMA)


def visible(exp_dir) -> list[str]:
    return sorted(p.name for p in exp_dir.iterdir() if not p.name.startswith("."))


def test_run_id_deterministic():
    assert run_id(make_cfg()) == run_id(make_cfg())
    assert run_id(make_cfg()).startswith("exp-s0-")
    assert run_id(make_cfg(1)) != run_id(make_cfg())


def test_nothing_visible_before_commit(tmp_path):
    cfg = make_cfg()
    w = RunWriter(tmp_path, cfg)
    w.write_table("summary", pa.table({"vm": [1, 2]}))
    w.stream("metrics", SCHEMA).write_batch(batch(0, 3))
    assert visible(tmp_path / "exp") == []
    assert not is_complete(tmp_path, "exp", w.run_id)
    path = w.commit()
    assert path == tmp_path / "exp" / "_runs" / f"run={run_id(cfg)}"
    assert visible(tmp_path / "exp") == ["_runs", "metrics", "summary"]
    assert os.listdir(path) == ["manifest.json"]  # staging folder gone, tables published
    assert (tmp_path / "exp" / "summary" / f"run={w.run_id}" / "part-0.parquet").is_file()
    assert is_complete(tmp_path, "exp", w.run_id)
    (tmp_path / "exp" / "metrics" / f"run={w.run_id}" / "part-0.parquet").unlink()
    assert not is_complete(tmp_path, "exp", w.run_id)  # a table missing: not complete


def test_abort_leaves_nothing(tmp_path):
    w = RunWriter(tmp_path, make_cfg())
    w.write_table("summary", pa.table({"vm": [1]}))
    w.stream("metrics", SCHEMA).write_batch(batch(0, 2))
    w.abort()
    assert os.listdir(tmp_path / "exp") == []
    with RunWriter(tmp_path, make_cfg()) as w2:  # leaving the block uncommitted aborts
        w2.write_table("summary", pa.table({"vm": [1]}))
    assert os.listdir(tmp_path / "exp") == []


def test_metadata_and_manifest(tmp_path):
    cfg = make_cfg(seed=5)
    w = RunWriter(tmp_path, cfg)
    w.write_table("summary", pa.table({"vm": [1, 2]}))
    path = w.commit()
    meta = pq.read_schema(w.table_paths()["summary"]).metadata
    assert json.loads(meta[META_CONFIG]) == config_to_dict(cfg)
    assert meta[META_SEED] == b"5" and meta[META_RUN] == w.run_id.encode()
    assert set(json.loads(meta[META_VERSIONS])) == {"iommu-emu", "python", "numpy", "pyarrow"}
    m = read_manifest(path)
    assert m["run"] == w.run_id and m["experiment"] == "exp" and m["seed"] == 5
    assert m["status"] == "complete" and m["params"] == {}
    assert m["files"] == {"summary": {"path": f"summary/run={w.run_id}/part-0.parquet",
                                      "rows": 2}}
    assert m["config_hash"] in w.run_id


def test_stream_compacted_to_parquet(tmp_path):
    w = RunWriter(tmp_path, make_cfg())
    s = w.stream("metrics", SCHEMA)
    for i in range(4):
        s.write_batch(batch(10 * i, 10))
    w.stream("faults", SCHEMA)  # an empty stream still becomes a table
    path = w.commit()
    t = pq.read_table(w.table_paths()["metrics"])
    assert t.column("epoch").to_pylist() == list(range(40))
    assert META_RUN in t.schema.metadata
    assert pq.read_table(w.table_paths()["faults"]).num_rows == 0
    assert read_manifest(path)["files"]["metrics"]["rows"] == 40
    tables = read_run(path)
    assert set(tables) == {"metrics", "faults"} and tables["metrics"].num_rows == 40


def test_partition_key_columns_are_refused(tmp_path):
    from cluster.results import ResultsError

    w = RunWriter(tmp_path, make_cfg(), params=[("vm_a_mode", "shadow")])
    with pytest.raises(ResultsError, match="run"):
        w.write_table("summary", pa.table({"run": ["x"]}))
    with pytest.raises(ResultsError, match="vm_a_mode"):
        w.stream("metrics", pa.schema([("vm_a_mode", pa.string())]))
    w.abort()


def test_stream_rejects_wrong_schema(tmp_path):
    from cluster.results import ResultsError

    w = RunWriter(tmp_path, make_cfg())
    s = w.stream("metrics", SCHEMA)
    with pytest.raises(ResultsError):
        s.write_batch(pa.record_batch([pa.array([1.0])], names=["x"]))
    with pytest.raises(ResultsError):
        w.stream("metrics", SCHEMA)  # a second table of the same name
    w.abort()


def test_recover_stream_after_crash(tmp_path):
    w = RunWriter(tmp_path, make_cfg())
    s = w.stream("metrics", SCHEMA)
    for i in range(3):
        s.write_batch(batch(5 * i, 5))
    arrows = s.path
    # A crash: no end-of-stream marker, and half of a fourth batch on disk.
    size = arrows.stat().st_size
    s.write_batch(batch(15, 5))
    torn = arrows.read_bytes()[: size + (arrows.stat().st_size - size) // 2]
    crashed = tmp_path / "crashed.arrows"
    crashed.write_bytes(torn)
    t = recover_stream(crashed)
    assert t.column("epoch").to_pylist() == list(range(15))
    # without a torn tail (the writer died between batches) every batch comes back
    clean = tmp_path / "clean.arrows"
    clean.write_bytes(arrows.read_bytes())
    assert recover_stream(clean).num_rows == 20
    w.abort()


def test_failed_run_keeps_streamed_metrics_and_is_redone(tmp_path):
    cfg = make_cfg()
    w = RunWriter(tmp_path, cfg)
    w.stream("metrics", SCHEMA).write_batch(batch(0, 6))
    path = w.fail("VM actor died", ["VM actor for VM 1 (host 0)"])
    m = read_manifest(path)
    assert m["status"] == "failed" and m["failed"] == ["VM actor for VM 1 (host 0)"]
    assert m["error"] == "VM actor died" and m["files"]["metrics"]["rows"] == 6
    assert read_run(path)["metrics"].column("epoch").to_pylist() == list(range(6))
    assert run_status(tmp_path, "exp", w.run_id) == "failed"
    assert not (tmp_path / "exp" / "metrics").exists()  # nothing entered the dataset
    redo = RunWriter(tmp_path, cfg)  # a failed run is redone without --overwrite
    redo.write_table("summary", pa.table({"vm": [1]}))
    assert redo.commit() == path
    assert is_complete(tmp_path, "exp", w.run_id)
    assert os.listdir(path) == ["manifest.json"]  # the failed attempt's stream is gone


def test_existing_run_needs_overwrite(tmp_path):
    cfg = make_cfg()
    w = RunWriter(tmp_path, cfg)
    w.write_table("summary", pa.table({"v": [1]}))
    w.write_table("faults", pa.table({"v": [1]}))
    w.commit()
    with pytest.raises(RunExistsError):
        RunWriter(tmp_path, cfg)
    w2 = RunWriter(tmp_path, cfg, overwrite=True)
    w2.write_table("summary", pa.table({"v": [2]}))
    path = w2.commit()
    assert read_run(path)["summary"].column("v").to_pylist() == [2]
    assert not list((tmp_path / "exp" / "faults").rglob("*.parquet"))  # not in the new run
    assert sorted(os.listdir(tmp_path / "exp")) == ["_runs", "faults", "summary"]


def test_read_summaries_of_experiment_skips_temp(tmp_path):
    for seed in (0, 1):
        w = RunWriter(tmp_path, make_cfg(seed))
        w.write_table("summary", pa.table({"vm": [1], "ios": [seed + 10]}))
        w.commit()
    pending = RunWriter(tmp_path, make_cfg(2))
    pending.write_table("summary", pa.table({"vm": [1], "ios": [99]}))
    for where in (tmp_path / "exp", tmp_path / "exp" / "summary"):
        t = read_summaries(where)
        assert sorted(t.column("ios").to_pylist()) == [10, 11]
        assert sorted(set(t.column("run").to_pylist())) == sorted(
            [run_id(make_cfg(0)), run_id(make_cfg(1))])
    one = read_summaries(run_dir(tmp_path, "exp", run_id(make_cfg(1))))
    assert one.column("ios").to_pylist() == [11]
    pending.abort()


def test_sweep_params_are_hive_columns_for_every_reader(tmp_path):
    """One call per reader gives every run with ``run`` and the parameters as columns."""
    for seed, mode in ((0, "shadow"), (1, "nested")):
        w = RunWriter(tmp_path, make_cfg(seed), params=[("vm_a_mode", mode)])
        w.write_table("summary", pa.table({"vm": [1, 2], "ios": [seed, seed + 10]}))
        w.commit()
    folder = tmp_path / "exp" / "summary"
    expect = {(run_id(make_cfg(0)), "shadow", 0), (run_id(make_cfg(0)), "shadow", 10),
              (run_id(make_cfg(1)), "nested", 1), (run_id(make_cfg(1)), "nested", 11)}

    def rows(run, mode, ios) -> set:
        return set(zip(run, mode, ios, strict=True))

    t = ds.dataset(folder, partitioning="hive").to_table()
    assert rows(t["run"].to_pylist(), t["vm_a_mode"].to_pylist(),
                t["ios"].to_pylist()) == expect
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(folder)
    assert rows(df["run"].astype(str), df["vm_a_mode"].astype(str), df["ios"]) == expect
    pl = pytest.importorskip("polars")
    lf = pl.scan_parquet(folder / "**" / "*.parquet", hive_partitioning=True).collect()
    assert rows(lf["run"], lf["vm_a_mode"], lf["ios"]) == expect
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"SELECT run, vm_a_mode, ios FROM read_parquet('{folder}/**/*.parquet', "
                     "hive_partitioning = true)").fetchall()
    assert set(got) == expect


# --- report ------------------------------------------------------------------------------
def summary_table(**over) -> pa.Table:
    rows = {
        "run": ["r"] * 3, "vm": [1, 2, 3],
        "mode": ["shadow", "shadow", "nested"], "policy": ["strict", "strict", "lazy"],
        "workload": ["nic", "nic", "nic"], "sim_ns": [1000, 1000, 0],
        "ios": [10, 30, 0], "bytes": [1000, 3000, 0], "vm_exits": [40, 80, 0],
        "inv_descriptors": [20, 20, 0], "walk_refs": [100, 0, 0], "translations": [50, 50, 0],
        "iotlb_hits": [30, 45, 0], "iotlb_misses": [20, 5, 0], "stale_dma": [0, 1, 2],
        "cross_vm_dma": [0, 0, 1], "faults": [3, 0, 0],
    }
    rows.update(over)
    return pa.table(rows)


def test_format_summary_aggregates_by_design():
    text = format_summary(summary_table())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["mode", "policy", "workload"]
    assert len(lines) == 4  # header, rule, two groups
    nested, shadow = lines[2].split(), lines[3].split()
    # shadow: 2 VMs, 40 I/Os, 120/40 exits, 40/40 inv, 100/100 refs, 75/100 hits,
    # (8000 + 24000) / 1000 Gb/s, 1 stale, 0 cross, 3 faults
    assert shadow == ["shadow", "strict", "nic", "2", "40", "3.00", "1.00", "1.00", "75.0",
                      "32.00", "1", "0", "3"]
    # nested: no I/O, no time: every ratio is "-"
    assert nested == ["nested", "lazy", "nic", "1", "0", "-", "-", "-", "-", "-", "2", "1",
                      "0"]
    widths = {len(line) for line in lines[:2]}
    assert len(widths) == 1  # fixed width header and rule


def test_format_summary_splits_runs_and_checks_columns():
    text = format_summary(summary_table(run=["a", "b", "b"]))
    assert text.splitlines()[0].split()[0] == "run" and len(text.splitlines()) == 5
    with pytest.raises(ReportError, match="walk_refs"):
        format_summary(summary_table().drop_columns(["walk_refs"]))
    assert "no VMs" in format_summary(summary_table().slice(0, 0))
