"""Writes notebooks/results.ipynb: reading a run's or sweep's result datasets with pandas.

Run ``python notebooks/build.py`` after editing the cells below; tests/cluster/test_notebook.py
checks that the notebook equals what this script writes and executes it against a small run.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """\
# Reading iommu-emu results

Every result table of an experiment (or a sweep) is one Hive-partitioned Parquet dataset
(docs/results.md): `summary` (one row per VM), `metrics` (one row per VM per epoch) and
`faults` (one row per fault record), with `run` and the sweep parameters as columns. This
notebook reads them with pandas (and DuckDB if installed), rebuilds the main table of
`iommu-emu report` and draws two of its plots.

Set `IOMMU_EMU_RESULTS` to an experiment folder, e.g. after `make run`:
`IOMMU_EMU_RESULTS=results/quickstart jupyter lab notebooks/results.ipynb`."""),
    ("code", """\
import os
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

RESULTS = Path(os.environ.get("IOMMU_EMU_RESULTS", "../results/quickstart"))
summary = pd.read_parquet(RESULTS / "summary")
metrics = pd.read_parquet(RESULTS / "metrics")
print(f"{len(summary)} VMs in {summary['run'].nunique()} run(s), "
      f"{len(metrics)} metrics rows")
summary[["run", "vm", "group", "mode", "policy", "workload", "ios", "window_ns"]]"""),
    ("md", """\
## The report's main table

One row per design (mode, policy, workload), aggregated over its VMs and runs. Ratios are of
sums (exits per I/O = sum of `vm_exits` / sum of `ios`). The IOTLB hit rate counts real IOTLB
look-ups: `iotlb_hits` also counts device-TLB hits, which never look up the IOTLB, so those
are taken out. Throughput is modelled: bytes x 8 over the measured window (`window_ns`),
summed over the VMs, which run side by side."""),
    ("code", """\
keys = ["mode", "policy", "workload"]
s = summary.assign(gbps=summary["bytes"] * 8 / summary["window_ns"],
                   lat_ios=summary["io_latency_mean_ns"] * summary["ios"],
                   real_hits=summary["iotlb_hits"] - summary["devtlb_hits"])
g = s.groupby(keys).sum(numeric_only=True)


def ratio(num, den):
    return (num / den).where(den > 0)   # no I/O: no ratio (the report prints "-")


table = pd.DataFrame({
    "VMs": s.groupby(keys).size(),
    "I/Os": g["ios"],
    "Gb/s": g["gbps"],
    "latency [µs]": ratio(g["lat_ios"], g["ios"]) / 1e3,
    "exits/IO": ratio(g["vm_exits"], g["ios"]),
    "inv/IO": ratio(g["inv_descriptors"], g["ios"]),
    "walk refs/xlate": ratio(g["walk_refs"], g["translations"]),
    "IOTLB hit [%]": ratio(100 * g["real_hits"], g["real_hits"] + g["iotlb_misses"]),
    "stale DMA": g["stale_dma"],
    "faults": g["faults"],
})
table.round(2)"""),
    ("md", """\
The same numbers as `iommu-emu report` (its `--format json` output, read here through the
library): the notebook and the command agree."""),
    ("code", """\
import json

from cluster.report import design_table, load_results, render

report = pd.DataFrame(json.loads(render(design_table(load_results(RESULTS)), "json")))
report = report.set_index(keys).sort_index()
for col in ["I/Os", "latency [µs]", "exits/IO", "inv/IO", "walk refs/xlate", "IOTLB hit [%]"]:
    pd.testing.assert_series_equal(table[col].sort_index().astype(float),
                                   report[col].astype(float), check_names=False)
print("the notebook's table equals the report's")"""),
    ("md", """\
DuckDB reads the same dataset with SQL (skipped when DuckDB is not installed):"""),
    ("code", """\
try:
    import duckdb
except ImportError:
    duckdb = None
if duckdb is not None:
    print(duckdb.sql(
        f"SELECT mode, policy, workload, sum(vm_exits) / sum(ios) AS exits_per_io "
        f"FROM read_parquet('{RESULTS}/summary/**/*.parquet', hive_partitioning = true) "
        f"GROUP BY ALL ORDER BY ALL").df())"""),
    ("md", """\
## Plot 1: VM exits and invalidations per I/O

Shadowing (caching mode) makes the guest trap to the VMM on every map and unmap, so each
I/O costs several exits and invalidation descriptors; under nesting the guest writes its own
first-level table and traps only on invalidations. Lower bars mean less VMM work per I/O."""),
    ("code", """\
per_io = table[["exits/IO", "inv/IO"]].dropna()
ax = per_io.plot.bar(figsize=(7, 4), rot=20)
ax.set_xlabel("design (mode, policy, workload)")
ax.set_ylabel("count per I/O")
ax.set_title("VM exits and invalidation descriptors per I/O")
plt.tight_layout()
assert len(ax.patches) > 0"""),
    ("md", """\
## Plot 2: I/Os per epoch

From the metrics table (counters per epoch, not cumulative), summed over each design's VMs.
A slow start is the rings filling and the caches warming up; `experiment.warmup_us` keeps
that out of the summary's window."""),
    ("code", """\
m = metrics.merge(summary[["run", "vm", *keys]], on=["run", "vm"])
m["design"] = m["mode"] + "/" + m["policy"] + "/" + m["workload"]
series = m.pivot_table(index="t_end_ns", columns="design", values="ios", aggfunc="sum")
series.index = series.index / 1e6
ax = series.plot(figsize=(8, 4))
ax.set_xlabel("virtual time at epoch end (ms)")
ax.set_ylabel("I/Os per epoch")
ax.set_title("I/Os per epoch by design")
plt.tight_layout()
assert len(ax.lines) == series.shape[1] > 0"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                for kind, src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def text() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    (Path(__file__).resolve().parent / "results.ipynb").write_text(text())
