"""PNG plots of a report: per-design costs, IOTLB size, scaling, stale DMA, faults, epochs.

Drawn with matplotlib's Agg backend (no display) from the tables cluster/report.py loads
(columns in docs/results.md). A plot whose data the runs do not have (one IOTLB size, one VM
count, no faults) is not drawn; its ``Plot`` says why, and report.md says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from cluster.report import Results

DPI = 100


@dataclass
class Plot:
    """One figure: its file (None when not drawn, with ``reason``) and how many points."""

    name: str
    title: str
    path: Path | None = None
    points: int = 0
    reason: str = ""
    caption: str = ""


def _rows(res: Results) -> list[dict[str, Any]]:
    return res.summary.to_pylist()


def _design(r: dict[str, Any]) -> str:
    return f"{r['mode']}/{r['policy']}/{r['workload']}"


def _save(fig: Any, out: Path, plot: Plot, points: int, footer: str) -> Plot:
    fig.text(0.01, 0.005, footer, fontsize=6, color="0.4", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / f"{plot.name}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    plot.path, plot.points = path, points
    return plot


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _sums(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
          cols: Sequence[str]) -> dict[Any, dict[str, float]]:
    out: dict[Any, dict[str, float]] = defaultdict(lambda: dict.fromkeys(cols, 0.0))
    for r in rows:
        g = out[key(r)]
        for c in cols:
            g[c] += float(r.get(c) or 0)
    return dict(sorted(out.items()))


def _hit_rate(s: dict[str, float]) -> float | None:
    """IOTLB hits over real IOTLB look-ups (device-TLB hits are no IOTLB look-up)."""
    hits = s["iotlb_hits"] - s["devtlb_hits"]
    return _ratio(100 * hits, hits + s["iotlb_misses"])


def exits_per_io(res: Results, out: Path, footer: str) -> Plot:
    plot = Plot("exits_per_io", "VM exits and invalidation descriptors per I/O by design",
                caption="Bars: sum of VM exits (left) and of invalidation descriptors the "
                        "guest queued (right) over sum of I/Os, per mode/policy/workload. "
                        "Shadowing traps on maps and unmaps, nesting only on invalidations.")
    sums = _sums(_rows(res), _design, ("ios", "vm_exits", "inv_descriptors"))
    sums = {k: v for k, v in sums.items() if v["ios"] > 0}
    if not sums:
        plot.reason = "no design completed an I/O"
        return plot
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sums)), 4))
    xs = range(len(sums))
    w = 0.4
    exits = [v["vm_exits"] / v["ios"] for v in sums.values()]
    invs = [v["inv_descriptors"] / v["ios"] for v in sums.values()]
    ax.bar([x - w / 2 for x in xs], exits, w, label="VM exits / I/O")
    ax.bar([x + w / 2 for x in xs], invs, w, label="invalidation descriptors / I/O")
    ax.set_xticks(list(xs), list(sums), rotation=20, ha="right", fontsize=8)
    ax.set_xlabel("design (mode/policy/workload)")
    ax.set_ylabel("count per I/O")
    ax.set_title(plot.title)
    ax.legend(fontsize=8)
    return _save(fig, out, plot, 2 * len(sums), footer)


def _run_value(res: Results, key: str) -> dict[str, Any]:
    return {run: res.config_value(run, key) for run in res.manifests}


def iotlb_size(res: Results, out: Path, footer: str) -> Plot:
    plot = Plot("iotlb_size", "Walk references per translation and IOTLB hit rate vs IOTLB size",
                caption="Per mode: page-walk memory references per translation (left) and "
                        "IOTLB hits over real IOTLB look-ups (right; device-TLB hits are not "
                        "IOTLB look-ups), by `host.iotlb_entries` (0: IOTLB disabled).")
    size = _run_value(res, "host.iotlb_entries")
    if len({v for v in size.values() if v is not None}) < 2:
        plot.reason = "the runs have one IOTLB size (vary host.iotlb_entries)"
        return plot
    rows = [r for r in _rows(res) if size.get(r.get("run")) is not None]
    sums = _sums(rows, lambda r: (r["mode"], size[r["run"]]),
                 ("walk_refs", "translations", "iotlb_hits", "devtlb_hits", "iotlb_misses"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    points = 0
    for mode in sorted({m for m, _ in sums}):
        pts = [(e, v) for (m, e), v in sums.items() if m == mode]
        refs = [(e, _ratio(v["walk_refs"], v["translations"])) for e, v in pts]
        hits = [(e, _hit_rate(v)) for e, v in pts]
        refs = [(e, y) for e, y in refs if y is not None]
        hits = [(e, y) for e, y in hits if y is not None]
        if refs:
            a1.plot(*zip(*refs, strict=True), marker="o", label=mode)
        if hits:
            a2.plot(*zip(*hits, strict=True), marker="o", label=mode)
        points += len(refs) + len(hits)
    for ax, ylabel in ((a1, "walk references per translation"), (a2, "IOTLB hit rate (%)")):
        ax.set_xlabel("IOTLB size (entries)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    a2.set_ylim(0, 100)
    fig.suptitle(plot.title, fontsize=10)
    if not points:
        plt.close(fig)
        plot.reason = "no translations"
        return plot
    return _save(fig, out, plot, points, footer)


def _queue_depth(res: Results, r: dict[str, Any]) -> Any:
    return res.config_value(r.get("run", ""), f"vm.{r.get('group')}.workload.queue_depth")


def scaling(res: Results, out: Path, footer: str) -> Plot:
    plot = Plot("scaling", "Throughput and I/O latency vs VM count or queue depth",
                caption="Per mode/policy/workload: modelled throughput (sum over a run's VMs "
                        "of bytes x 8 / window, averaged over the runs at that x) and mean I/O "
                        "latency (weighted by I/Os).")
    rows = _rows(res)
    vms = defaultdict(int)
    for r in rows:
        vms[r.get("run", "")] += 1
    depths = {_queue_depth(res, r) for r in rows} - {None}
    if len(set(vms.values())) > 1:
        xlabel, x_of = "VMs in the run", (lambda r: vms[r.get("run", "")])
    elif len(depths) > 1:
        xlabel, x_of = "NVMe queue depth (commands per queue)", (lambda r: _queue_depth(res, r))
        rows = [r for r in rows if _queue_depth(res, r) is not None]
    else:
        plot.reason = "neither the VM count nor the queue depth varies"
        return plot
    pts: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0] * 3))
    runs: dict[tuple[str, Any], set[str]] = defaultdict(set)
    for r in rows:
        window = int(r.get("window_ns") or r.get("sim_ns") or 0)
        acc = pts[_design(r)][x_of(r)]
        acc[0] += int(r["bytes"] or 0) * 8 / window if window else 0.0
        acc[1] += float(r.get("io_latency_mean_ns") or 0) * int(r["ios"] or 0)
        acc[2] += int(r["ios"] or 0)
        runs[(_design(r), x_of(r))].add(str(r.get("run", "")))
    for design, by_x in pts.items():   # runs that differ in other keys: their mean
        for x, acc in by_x.items():
            acc[0] /= len(runs[(design, x)])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    points = 0
    for design, by_x in sorted(pts.items()):
        xs = sorted(by_x)
        a1.plot(xs, [by_x[x][0] for x in xs], marker="o", label=design)
        lat = [(x, by_x[x][1] / by_x[x][2] / 1e3) for x in xs if by_x[x][2]]
        if lat:
            a2.plot(*zip(*lat, strict=True), marker="o", label=design)
        points += len(xs) + len(lat)
    a1.set_ylabel("throughput (Gb/s, modelled)")
    a2.set_ylabel("mean I/O latency (µs, modelled)")
    for ax in (a1, a2):
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.suptitle(plot.title, fontsize=10)
    return _save(fig, out, plot, points, footer)


def stale_window(res: Results, out: Path, footer: str) -> Plot:
    plot = Plot("stale_window", "Stale-DMA window vs the flush-queue bound, per VM",
                caption="Each point a VM: the longest unmap-to-stale-DMA time the oracle saw "
                        "(y) against the longest unmap-to-flush time of its flush queue (x). "
                        "Points on or under the diagonal stay within the lazy policy's bound.")
    rows = [r for r in _rows(res)
            if int(r.get("stale_window_max_ns") or 0) or int(r.get("stale_bound_ns") or 0)]
    if not rows:
        plot.reason = "no stale DMA and no flush-queue bound (strict runs, or no rogue DMA)"
        return plot
    fig, ax = plt.subplots(figsize=(6, 5))
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        by[_design(r)].append((int(r.get("stale_bound_ns") or 0) / 1e3,
                               int(r.get("stale_window_max_ns") or 0) / 1e3))
    for design, xy in sorted(by.items()):
        ax.scatter(*zip(*xy, strict=True), label=design)
    top = max(max(x, y) for xy in by.values() for x, y in xy) or 1.0
    ax.plot([0, top], [0, top], color="0.6", linestyle="--", label="window = bound")
    ax.set_xlabel("flush-queue bound: longest unmap-to-flush time (µs)")
    ax.set_ylabel("longest stale-DMA window (µs)")
    ax.set_title(plot.title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, out, plot, len(rows), footer)


def faults_by_reason(res: Results, out: Path, footer: str) -> Plot:
    plot = Plot("faults_by_reason", "DMA-remapping faults by reason",
                caption="Fault records by VT-d fault reason (scalable-mode codes), from the "
                        "faults table.")
    if res.faults is None or res.faults.num_rows == 0:
        plot.reason = "no fault records"
        return plot
    counts: dict[str, int] = defaultdict(int)
    names = res.faults.column("reason_name").to_pylist()
    codes = res.faults.column("reason").to_pylist()
    for name, code in zip(names, codes, strict=True):
        counts[f"{name} (0x{int(code):02X})"] += 1
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(counts)), 4))
    labels = sorted(counts)
    ax.bar(range(len(labels)), [counts[k] for k in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_xlabel("fault reason")
    ax.set_ylabel("fault records")
    ax.set_title(plot.title)
    return _save(fig, out, plot, len(labels), footer)


def epochs(res: Results, out: Path, footer: str) -> Plot:
    plot = Plot("epochs", "Per-epoch I/Os and VM exits by design",
                caption="From the metrics table: per-epoch counts summed over the VMs of each "
                        "design (and run), against the virtual time at the epoch's end.")
    m = res.metrics
    if m is None or m.num_rows == 0:
        plot.reason = "no metrics rows"
        return plot
    design = {(r.get("run", ""), int(r["vm"])): _design(r) for r in _rows(res)}
    multi = len(res.manifests) > 1
    series: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in m.to_pylist():
        d = design.get((r.get("run", ""), int(r["vm"])))
        if d is None:
            continue
        label = f"{d} {r['run'][-6:]}" if multi else d
        acc = series[label][int(r["t_end_ns"])]
        acc[0] += int(r["ios"] or 0)
        acc[1] += int(r["vm_exits"] or 0)
    if not series:
        plot.reason = "no metrics rows of the summary's VMs"
        return plot
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    points = 0
    for label, by_t in sorted(series.items()):
        ts = sorted(by_t)
        a1.plot([t / 1e6 for t in ts], [by_t[t][0] for t in ts], label=label)
        a2.plot([t / 1e6 for t in ts], [by_t[t][1] for t in ts], label=label)
        points += len(ts)
    a1.set_ylabel("I/Os per epoch")
    a2.set_ylabel("VM exits per epoch")
    a2.set_xlabel("virtual time at epoch end (ms)")
    a1.legend(fontsize=6)
    fig.suptitle(plot.title, fontsize=10)
    return _save(fig, out, plot, points, footer)


PLOTS: Sequence[Callable[[Results, Path, str], Plot]] = (
    exits_per_io, iotlb_size, scaling, stale_window, faults_by_reason, epochs)


def footer_of(res: Results) -> str:
    """Runs, config hash(es) and versions, printed at the bottom of every figure."""
    ms = [res.manifests[r] for r in sorted(res.manifests)]
    hashes = ", ".join(str(m.get("config_hash", "?")) for m in ms[:4])
    more = f" (+{len(ms) - 4})" if len(ms) > 4 else ""
    v = ms[0].get("versions", {}) if ms else {}
    vs = ", ".join(f"{k} {v[k]}" for k in sorted(v))
    return f"{res.path.name}: {len(ms)} run(s), config {hashes}{more}; {vs}"


def draw_all(res: Results, out: str | Path) -> list[Plot]:
    """Every plot of ``PLOTS`` into ``out`` (drawn or with the reason it was not)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    footer = footer_of(res)
    return [draw(res, folder, footer) for draw in PLOTS]
