"""`iommu-emu report`: the design table in four formats, what differs between runs, report.md
and its PNG plots (valid PNGs, each with data), IOTLB hit rates over real look-ups only."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest

from cluster.cli import main
from cluster.plots import PLOTS, draw_all
from cluster.report import design_table, format_summary, load_results, render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Three VMs whose data feeds every plot: lazy NIC with rogue DMAs (stale DMA, flush-queue
# bound, faults with the IOTLB off), NVMe at queue depths 1 and 8 (scaling); run twice,
# IOTLB off and on (IOTLB-size plot). 0.6 ms of virtual time each.
CONFIG = """\
[experiment]
name = "rep"
seed = 1
duration_us = 600
epoch_us = 100

[host]
memory_mib = 1024

[vm.lazy-nic]
mode = "nested"
policy = "lazy"
vcpus = 1
memory_mib = 64
[vm.lazy-nic.workload]
kind = "nic"
rogue_fraction = 0.05

[vm.qd1]
mode = "shadow"
vcpus = 1
memory_mib = 64
[vm.qd1.workload]
kind = "nvme"
queue_depth = 1
io_sizes = [4096]

[vm.qd8]
mode = "nested"
vcpus = 1
memory_mib = 64
[vm.qd8.workload]
kind = "nvme"
queue_depth = 8
io_sizes = [4096]
"""
IOTLB_SIZES = (0, 1024)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    cfg = base / "rep.toml"
    cfg.write_text(CONFIG)
    for entries in IOTLB_SIZES:
        assert main(["run", str(cfg), "--out", str(base / "out"), "--backend", "inproc",
                     "--set", f"host.iotlb_entries={entries}"]) == 0
    return base / "out" / "rep"


def test_report_writes_every_plot_as_a_png_with_data(experiment, tmp_path, capsys):
    from matplotlib import image

    out = tmp_path / "rpt"
    assert main(["report", str(experiment), "--out", str(out)]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "not drawn" not in md
    names = ["exits_per_io", "iotlb_size", "scaling", "stale_window", "faults_by_reason",
             "epochs"]
    assert len(names) == len(PLOTS)
    for name in names:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        pixels = image.imread(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01, f"{name} is blank"
        assert f"]({name}.png)" in md
    # every plot drew points (not only axes)
    plots = {p.name: p for p in draw_all(load_results(experiment), tmp_path / "again")}
    assert all(p.points > 0 and p.path is not None for p in plots.values()), plots
    assert "iommu-emu" in md and "Config (first run)" in md   # versions and config footer


def test_runs_are_told_apart_by_the_config_key_that_differs(experiment, capsys):
    assert main(["report", str(experiment)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("measured: 6 VMs in 2 runs, a window of 0.6 ms")
    header = text.splitlines()[1].split()
    assert header[:4] == ["config", "mode", "policy", "workload"]
    assert "host.iotlb_entries=0" in text and "host.iotlb_entries=1024" in text
    runs = text.split("runs:\n")[1].splitlines()
    assert len(runs) == 2 and all(": host.iotlb_entries=" in r for r in runs)


def test_iotlb_hit_rate_counts_real_lookups_only(experiment, capsys):
    """With the IOTLB off nothing hits it: coalesced requests of one batch are misses that
    walk, not hits; with it on the same run hits."""
    res = load_results(experiment)
    off = {r for r, m in res.manifests.items() if m["config"]["host"]["iotlb_entries"] == 0}
    rows = res.summary.to_pylist()
    for r in rows:
        if r["run"] in off:
            assert r["iotlb_hits"] == r["devtlb_hits"] == 0
            assert r["iotlb_misses"] > 0 and r["walk_refs"] >= r["iotlb_misses"]
    assert main(["report", str(experiment), "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rates = {(t["config"], t["workload"]): t["IOTLB hit [%]"] for t in table}
    assert all(v == 0 for (c, _), v in rates.items() if c == "host.iotlb_entries=0")
    assert all(v > 30 for (c, _), v in rates.items() if c == "host.iotlb_entries=1024")


def test_formats_and_grouping(experiment, capsys):
    assert main(["report", str(experiment), "--format", "csv", "--by", "vm"]) == 0
    got = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(got) == 6 and {g["vm"] for g in got} == {"1", "2", "3"}
    assert {"latency [µs]", "vCPU/IO [µs]", "xlate/DMA [ns]", "window [ms]"} <= set(got[0])
    assert all(float(g["window [ms]"]) == 0.6 for g in got)
    assert main(["report", str(experiment), "--format", "markdown", "--by", "mode"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("| ") for line in lines) and len(lines) == 2 + 4
    assert main(["report", str(experiment), "--by", "nosuch"]) == 2
    assert "--by: no column 'nosuch'" in capsys.readouterr().err


def test_plots_without_data_are_not_drawn_and_the_report_says_why(experiment, tmp_path):
    one_run = next((experiment / "_runs").iterdir())
    assert main(["report", str(one_run), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "not drawn (the runs have one IOTLB size" in md
    assert not (tmp_path / "iotlb_size.png").exists()
    assert (tmp_path / "exits_per_io.png").read_bytes()[:8] == PNG_MAGIC


def test_out_naming_a_file_is_a_user_error(experiment, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    assert main(["report", str(experiment), "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "keep"


def test_hit_rate_excludes_device_tlb_hits():
    """iotlb_hits in the summary includes device-TLB hits (no IOTLB look-up): 30 hits of
    which 20 from the device-TLB, 10 misses -> 10 / 20 = 50%."""
    t = pa.table({"vm": [1], "mode": ["nested"], "policy": ["strict"], "workload": ["nic"],
                  "sim_ns": [1000], "ios": [4], "bytes": [400], "vm_exits": [0],
                  "inv_descriptors": [0], "walk_refs": [40], "translations": [40],
                  "iotlb_hits": [30], "devtlb_hits": [20], "iotlb_misses": [10],
                  "stale_dma": [0], "cross_vm_dma": [0], "faults": [0]})
    assert format_summary(t).splitlines()[2].split()[8] == "50.0"
    rows = json.loads(render(design_table(t), "json"))
    assert rows[0]["IOTLB hit [%]"] == 50.0
