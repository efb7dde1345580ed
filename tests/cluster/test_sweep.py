"""Sweeps: the cross product as resumable runs whose tables read as one dataset per table."""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

import cluster.runner
from cluster.cli import main
from cluster.config import ConfigError, load_config, parse_config
from cluster.results import read_manifest, run_dir
from cluster.runner import RunFailed
from cluster.sweep import expand, param_column, run_sweep

SWEEP_TOML = """
[experiment]
name = "sw"
seed = 2
duration_us = 300
epoch_us = 100

[host]
memory_mib = 512

[vm.web]
mode = "shadow"
memory_mib = 64
[vm.web.workload]
kind = "nic"
offered_gbps = 2.0
rx_ring = 32
tx_ring = 32
rogue_fraction = 0.05

[sweep]
"vm.web.mode" = ["shadow", "nested"]
"vm.web.policy" = ["strict", "lazy"]
"vm.web.count" = [1, 2]
"""
PARAMS = ("vm_web_count", "vm_web_mode", "vm_web_policy")


@pytest.fixture
def sweep_cfg(tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text(SWEEP_TOML)
    return load_config(p)


@pytest.fixture
def small_cfg(tmp_path):
    """mode x policy only: four points."""
    p = tmp_path / "small.toml"
    p.write_text(SWEEP_TOML.replace('"vm.web.count" = [1, 2]', ""))
    return load_config(p)


def test_expand_cross_product_and_param_columns(sweep_cfg):
    points = expand(sweep_cfg)
    assert len(points) == 8 and len({p.key for p in points}) == 8
    # shadow runs strict whatever the policy asks: those two points are one config
    assert len({p.run_id for p in points}) == 6
    assert [k for k, _ in points[0].params] == list(PARAMS)
    combos = {tuple(v for _, v in p.params) for p in points}
    assert ("2", "nested", "lazy") in combos and ("1", "shadow", "strict") in combos
    two = next(p for p in points if p.params == (("vm_web_count", "2"),
                                                ("vm_web_mode", "nested"),
                                                ("vm_web_policy", "lazy")))
    assert two.cfg.vm_count == 2 and two.cfg.vms[0].policy == "lazy" and not two.cfg.sweep
    assert param_column("vm.a-b.mode") == "vm_a_b_mode"


def test_bad_sweeps_name_the_key():
    base = {"experiment": {"name": "x"}, "vm": {"w": {"mode": "shadow",
                                                      "workload": {"kind": "nic"}}}}
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "sweep": {"vm.w.mode": []}})
    assert e.value.key == "sweep.vm.w.mode"
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "sweep": {"experiment.name": ["a", "b"]}})
    assert e.value.key == "sweep.experiment.name"
    with pytest.raises(ConfigError) as e:
        expand(parse_config({**base, "sweep": {"vm.w.mode": ["shadow", "bogus"]}}))
    assert "vm.w.mode" in str(e.value) and "bogus" in str(e.value)
    with pytest.raises(ConfigError, match="result column"):
        expand(parse_config({**base, "sweep": {"run": [1, 2]}}))


def test_sweep_datasets_read_in_one_call_by_every_reader(tmp_path, sweep_cfg):
    """summary/metrics/faults each read in one call with run and the parameters as columns."""
    out = tmp_path / "out"
    result = run_sweep(sweep_cfg, out, "inproc")
    assert result.ok and len(result.complete) == 8
    exp = out / "sw"
    summary = ds.dataset(exp / "summary", partitioning="hive").to_table()
    # one row per VM: 4 points with one VM, 4 with two
    assert summary.num_rows == 12 and len(set(summary["run"].to_pylist())) == 6
    rows = set(zip(*(summary[c].to_pylist() for c in (*PARAMS, "mode", "policy")),
                   strict=True))
    # the parameter columns agree with what each run really ran (shadow forces strict)
    assert all(mode == pm and policy == ("strict" if pm == "shadow" else pp)
               for _c, pm, pp, mode, policy in rows)
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    for table in ("summary", "metrics", "faults"):
        n = ds.dataset(exp / table, partitioning="hive").count_rows()
        df = pd.read_parquet(exp / table)
        assert len(df) == n and {"run", *PARAMS} <= set(df.columns)
        lf = pl.scan_parquet(exp / table / "**" / "*.parquet", hive_partitioning=True)
        assert lf.select(pl.len()).collect().item() == n
        assert {"run", *PARAMS} <= set(lf.collect_schema().names())
        got = duckdb.sql(f"SELECT count(*), count(DISTINCT run), count(DISTINCT vm_web_mode) "
                         f"FROM read_parquet('{exp / table}/**/*.parquet', "
                         "hive_partitioning = true)").fetchall()[0]
        if table != "faults":  # these short runs record no faults (empty files, same schema)
            assert n > 0 and got == (n, 6, 2)
    sweep_manifest = json.loads((exp / "_sweep.json").read_text())
    assert {p["status"] for p in sweep_manifest["points"]} == {"complete"}


def test_interrupted_sweep_reruns_only_missing_runs(tmp_path, small_cfg):
    out = tmp_path / "out"
    done: list[str] = []

    def stop_after_two(point, status, error) -> None:
        done.append(point.key)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(small_cfg, out, "inproc", on_point=stop_after_two)
    again = run_sweep(small_cfg, out, "inproc")
    assert sorted(again.skipped) == sorted(done)
    assert len(again.complete) == 2 and not set(again.complete) & set(done)
    assert run_sweep(small_cfg, out, "inproc").complete == []  # all complete now


def test_failed_point_is_recorded_and_only_it_is_redone(tmp_path, small_cfg, monkeypatch):
    out = tmp_path / "out"
    sweep_cfg = small_cfg
    victim = expand(sweep_cfg)[2]
    real = cluster.runner.run_config

    def failing(cfg, out_dir, backend="inproc", **kw):
        if cfg == victim.cfg:
            raise RunFailed("VM actor for VM 1 (host 0) died", ["VM actor for VM 1 (host 0)"])
        return real(cfg, out_dir, backend, **kw)

    monkeypatch.setattr(cluster.runner, "run_config", failing)
    first = run_sweep(sweep_cfg, out, "inproc")
    assert list(first.failed) == [victim.key] and len(first.complete) == 3
    points = json.loads((out / "sw" / "_sweep.json").read_text())["points"]
    assert [p["status"] for p in points].count("failed") == 1
    monkeypatch.setattr(cluster.runner, "run_config", real)
    second = run_sweep(sweep_cfg, out, "inproc")
    assert second.complete == [victim.key] and len(second.skipped) == 3


def test_cli_sweep_and_report(tmp_path, capsys, small_cfg):
    cfg = tmp_path / "small.toml"
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--backend", "inproc"]) == 0
    text = capsys.readouterr().out
    assert text.count("complete: ") == 4 and "4 runs, 4 run now" in text
    assert main(["sweep", str(cfg), "--out", str(out), "--backend", "inproc"]) == 0
    assert "4 already complete" in capsys.readouterr().out
    assert main(["report", str(out / "sw")]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0].startswith("measured: 4 VMs in ")
    report = report[1:report.index("runs:")]
    # one row per point: the parameters split runs that share a run id (shadow lazy/strict)
    assert report[0].split()[:3] == ["vm_web_mode", "vm_web_policy", "run"]
    assert len(report) == 2 + 4


def test_ray_sweep_runs_points_in_parallel_with_the_same_tables(tmp_path, ray_local):
    """On Ray the points run as tasks; the datasets equal those of the in-process sweep."""
    cfg = parse_config({"experiment": {"name": "rs", "seed": 1, "duration_us": 300},
                        "host": {"memory_mib": 256},
                        "vm": {"w": {"mode": "shadow", "memory_mib": 64,
                                     "workload": {"kind": "nvme", "queue_depth": 2}}},
                        "sweep": {"vm.w.mode": ["shadow", "nested"]}})
    a = run_sweep(cfg, tmp_path / "a", "inproc")
    b = run_sweep(cfg, tmp_path / "b", "ray")
    assert sorted(a.complete) == sorted(b.complete) and len(b.complete) == 2
    for table in ("summary", "metrics", "faults"):
        ta = ds.dataset(tmp_path / "a" / "rs" / table, partitioning="hive").to_table()
        tb = ds.dataset(tmp_path / "b" / "rs" / table, partitioning="hive").to_table()
        key = [("run", "ascending"), ("vm", "ascending")]
        if "epoch" in ta.column_names:
            key.append(("epoch", "ascending"))
        if "time_ns" in ta.column_names:
            key.append(("time_ns", "ascending"))
        assert ta.sort_by(key).equals(tb.sort_by(key)), table
    for p in expand(cfg):
        assert read_manifest(run_dir(tmp_path / "b", "rs", p.run_id, p.params))["placement"]
