"""Readable summaries of result tables: per-design costs per I/O, hit rates, security counts.

Aggregates the per-VM ``summary`` table (columns in docs/results.md) by (mode, policy,
workload), the comparison of shadow, nested and pass-through designs: traps, invalidations and
page-walk references per I/O, IOTLB hit rate, modelled throughput, stale and cross-VM DMA, faults.
``load_results`` reads a run, an experiment or a sweep with its manifests; ``design_table``
groups by any columns and adds the modelled times; ``render`` writes text, Markdown, CSV or
JSON; ``write_report`` writes report.md beside the plots of cluster/plots.py.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from cluster.config import ClusterError
from cluster.results import (
    MANIFEST,
    META_PARTITION_KEYS,
    RUNS_DIR,
    ResultsError,
    read_manifest,
    read_summaries,
)

GROUP_KEYS = ("mode", "policy", "workload")
_SUMMED = ("ios", "vm_exits", "inv_descriptors", "walk_refs", "translations", "iotlb_hits",
           "iotlb_misses", "stale_dma", "cross_vm_dma", "faults")
REQUIRED_COLUMNS = (*GROUP_KEYS, "vm", "bytes", "sim_ns", *_SUMMED)
# summed when the table has them (older or hand-made tables may not)
_OPTIONAL = ("devtlb_hits", "translate_ns", "cpu_busy_ns", "window_ns", "stale_window_max_ns",
             "stale_bound_ns")
DASH = "-"
FORMATS = ("text", "markdown", "csv", "json")


class ReportError(ClusterError):
    """A table lacks the columns a report needs."""


@dataclass
class _Group:
    vms: int = 0
    gbps: float = 0.0
    gbps_vms: int = 0  # VMs with sim_ns > 0 (the others add no rate)
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMMED + _OPTIONAL, 0))
    latency_ios: float = 0.0   # sum over VMs of io_latency_mean_ns * ios
    present: frozenset[str] = frozenset()   # the summary's columns (a partial one lacks some)


def _ratio(num: float, den: float, fmt: str = "{:.2f}") -> str:
    return fmt.format(num / den) if den else DASH


def _iotlb_hits(g: _Group) -> int:
    """Look-ups the IOTLB answered: the summary's ``iotlb_hits`` also counts translations a
    device-TLB answered without any IOTLB look-up, so those are taken out."""
    return g.sums["iotlb_hits"] - g.sums["devtlb_hits"]


def _columns() -> Sequence[tuple[str, Callable[[_Group], str]]]:
    return (
        ("VMs", lambda g: str(g.vms)),
        ("I/Os", lambda g: str(g.sums["ios"])),
        ("exits/IO", lambda g: _ratio(g.sums["vm_exits"], g.sums["ios"])),
        ("inv/IO", lambda g: _ratio(g.sums["inv_descriptors"], g.sums["ios"])),
        ("walk refs/xlate", lambda g: _ratio(g.sums["walk_refs"], g.sums["translations"])),
        ("IOTLB hit %", lambda g: _ratio(100 * _iotlb_hits(g),
                                         _iotlb_hits(g) + g.sums["iotlb_misses"], "{:.1f}")),
        ("Gb/s", lambda g: f"{g.gbps:.2f}" if g.gbps_vms else DASH),
        ("stale DMA", lambda g: str(g.sums["stale_dma"])),
        ("cross-VM DMA", lambda g: str(g.sums["cross_vm_dma"])),
        ("faults", lambda g: str(g.sums["faults"])),
    )


def format_summary(summary: pa.Table) -> str:
    """A fixed-width table, one row per (mode, policy, workload), aggregated over VMs.

    Ratios are of sums over the group's VMs (exits/IO = sum vm_exits / sum ios); Gb/s is the
    sum over VMs of bytes * 8 / sim_ns (VMs run side by side). A zero denominator prints "-".
    When the table holds several runs (an experiment or sweep), rows are also split by run
    and by the sweep parameters (the Hive keys ``read_dataset`` names in the schema metadata),
    each only where it varies.
    """
    if summary.num_rows == 0:
        _check_columns(summary)
        return "(no VMs in summary)"
    keys, groups = _aggregate(summary, GROUP_KEYS)
    cols = _columns()
    header = [*keys, *(name for name, _ in cols)]
    rows = [[*key, *(fn(groups[key]) for _, fn in cols)] for key in sorted(groups)]
    return _text(header, rows, len(keys))


def _check_columns(summary: pa.Table, by: Sequence[str] = ()) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in summary.column_names]
    if missing:
        raise ReportError(f"summary table lacks columns: {', '.join(missing)}")
    unknown = [k for k in by if k not in summary.column_names]
    if unknown:
        raise ReportError(f"--by: no column {', '.join(map(repr, unknown))} in the summary "
                          f"(columns: {', '.join(summary.column_names)})")


def split_keys(summary: pa.Table) -> list[str]:
    """The partition keys (sweep parameters, run) that vary among the rows of ``summary``."""
    meta = (summary.schema.metadata or {}).get(META_PARTITION_KEYS)
    split = json.loads(meta) if meta else ["run"]
    cols = summary.column_names
    return [k for k in split if k in cols and len(set(summary.column(k).to_pylist())) > 1]


def _aggregate(summary: pa.Table, by: Sequence[str]
               ) -> tuple[list[str], dict[tuple[str, ...], _Group]]:
    """Sums per group of (varying partition keys, ``by``) over the summary's VM rows."""
    _check_columns(summary, by)
    data = summary.to_pydict()
    keys = [*(k for k in split_keys(summary) if k not in by), *by]
    groups: dict[tuple[str, ...], _Group] = {}
    for i in range(summary.num_rows):
        key = tuple(str(data[k][i]) for k in keys)
        g = groups.setdefault(key, _Group(present=frozenset(data)))
        g.vms += 1
        for c in (*_SUMMED, *(c for c in _OPTIONAL if c in data)):
            if c in ("stale_window_max_ns", "stale_bound_ns"):
                g.sums[c] = max(g.sums[c], int(data[c][i] or 0))
            else:
                g.sums[c] += int(data[c][i] or 0)
        g.latency_ios += float(data.get("io_latency_mean_ns", [0.0] * len(data["vm"]))[i]
                               or 0.0) * int(data["ios"][i] or 0)
        sim_ns = int(data.get("window_ns", data["sim_ns"])[i] or 0)   # the measured window
        if sim_ns > 0:
            g.gbps += int(data["bytes"][i] or 0) * 8 / sim_ns
            g.gbps_vms += 1
    return keys, groups


def _text(header: Sequence[str], rows: Sequence[Sequence[str]], n_text: int) -> str:
    """Fixed-width: ``n_text`` left-aligned text columns, then right-aligned numbers."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j < n_text else c.rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


# --- Reports of a run, an experiment or a sweep ------------------------------------------
@dataclass
class Results:
    """Every table of the runs under one folder, with their manifests (run id -> manifest)."""

    path: Path
    summary: pa.Table
    metrics: pa.Table | None
    faults: pa.Table | None
    manifests: dict[str, dict[str, Any]]

    @property
    def differences(self) -> dict[str, dict[str, str]]:
        return config_differences(self.manifests)

    def config_value(self, run: str, key: str) -> Any:
        """The defaulted config value at dotted ``key`` ("host.iotlb_entries") of ``run``."""
        node: Any = self.manifests.get(run, {}).get("config", {})
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


def _manifests(path: Path) -> dict[str, dict[str, Any]]:
    if (path / MANIFEST).is_file():
        found = [path / MANIFEST]
    else:
        exp = path if (path / RUNS_DIR).is_dir() else path.parent
        found = sorted((exp / RUNS_DIR).rglob(MANIFEST)) if (exp / RUNS_DIR).is_dir() else []
    out: dict[str, dict[str, Any]] = {}
    for f in found:
        m = read_manifest(f.parent)
        out[str(m.get("run", f.parent.name.removeprefix("run=")))] = m
    return out


def _with_run(table: pa.Table, runs: Sequence[str]) -> pa.Table:
    """One run read from its own folder has no ``run`` column: add it (for joins)."""
    if "run" in table.column_names or len(runs) != 1:
        return table
    return table.append_column("run", pa.array([runs[0]] * table.num_rows, pa.string()))


def load_results(path: str | Path) -> Results:
    """The summary, metrics and faults of a run folder, an experiment or a sweep folder."""
    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{p}: no such results folder")
    manifests = _manifests(p)
    runs = sorted(manifests)
    try:
        summary = _with_run(read_summaries(p, "summary"), runs)
    except ResultsError:
        if len(manifests) != 1 or not (p / MANIFEST).is_file():
            raise
        # an interrupted or failed run: per-VM sums of the metrics streamed so far
        summary = _partial_summary(read_summaries(p, "metrics"), manifests[runs[0]])
    # report only the runs whose summaries were read (a folder may hold failed runs' manifests)
    seen = set(summary.column("run").to_pylist()) if "run" in summary.column_names else set()
    manifests = {r: m for r, m in manifests.items() if r in seen} or manifests

    def optional(table: str) -> pa.Table | None:
        try:
            return _with_run(read_summaries(p, table), runs)
        except ResultsError:
            return None

    return Results(p, summary, optional("metrics"), optional("faults"), manifests)


def _partial_summary(metrics: pa.Table, manifest: Mapping[str, Any]) -> pa.Table:
    """Summary rows of a run that stopped early, from its metrics: each VM's per-epoch counts
    summed, its design from the manifest's config (VM ids as cluster.config.vm_placement
    numbers them), ``window_ns`` the virtual time of its last epoch; the summary columns the
    metrics lack (translations, cross-VM DMA) are 0."""
    from cluster.config import parse_config, vm_placement

    cfg = parse_config(manifest.get("config", {}))
    groups = {g.name: g for g in cfg.vms}
    design = {k + 1: groups[name] for k, (name, _, _) in
              enumerate(vm_placement(cfg.vms, cfg.host.count))}
    data = metrics.to_pydict()
    rows: dict[int, dict[str, Any]] = {}
    for i, vm in enumerate(data.get("vm", [])):
        g = design.get(int(vm))
        if g is None:
            continue
        r = rows.setdefault(int(vm), {
            "run": str(manifest.get("run", "")), "vm": int(vm), "group": g.name,
            "mode": g.mode, "policy": g.policy, "workload": g.workload.kind, "sim_ns": 0,
            **dict.fromkeys(("bytes", *_SUMMED), 0)})
        r["sim_ns"] = max(r["sim_ns"], int(data["t_end_ns"][i]))
        for c in ("bytes", *_SUMMED):
            r[c] += int(data[c][i] or 0) if c in data else 0
    out = [{**r, "window_ns": r["sim_ns"]} for _, r in sorted(rows.items())]
    cols = ["run", "vm", "group", *GROUP_KEYS, "sim_ns", "window_ns", "bytes", *_SUMMED]
    return pa.table({c: [r[c] for r in out] for c in cols})


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, Mapping):
        out: dict[str, str] = {}
        for k in sorted(node):
            out.update(_flatten(node[k], f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(node)}


def config_differences(manifests: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """For each run, the config keys (dotted) whose values differ between the runs."""
    flat = {run: _flatten({**m.get("config", {}), "seed": m.get("seed")})
            for run, m in manifests.items()}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if len({f.get(k, "(unset)") for f in flat.values()}) > 1]
    return {run: {k: flat[run].get(k, "(unset)") for k in varying} for run in sorted(flat)}


def _label_runs(res: Results) -> pa.Table:
    """The summary with ``run`` replaced by the config keys that tell its runs apart (when the
    runs are not already told apart by sweep parameters)."""
    summary = res.summary
    split = split_keys(summary)
    diff = res.differences
    if split != ["run"] or not diff or not next(iter(diff.values())):
        return summary
    runs = summary.column("run").to_pylist()
    keys = list(next(iter(diff.values())))
    labels = [" ".join(f"{k}={diff[r][k]}" for k in keys) if r in diff else r for r in runs]
    if len(set(labels)) != len(set(runs)):
        return summary
    meta = {**(summary.schema.metadata or {}), META_PARTITION_KEYS: b'["config"]'}
    return summary.append_column("config", pa.array(labels, pa.string())
                                 ).replace_schema_metadata(meta)


# (column, unit, value): numbers stay numbers for CSV and JSON; None is "-"
Number = int | float | None


def _design_columns() -> Sequence[tuple[str, str, Callable[[_Group], Number]]]:
    def r(num: float, den: float) -> float | None:
        return num / den if den else None

    def t(col: str, num: Callable[[_Group], float], den: str, scale: float = 1.0
          ) -> Callable[[_Group], float | None]:
        """A modelled time per unit, "-" when the table has no ``col`` (a partial run)."""
        return lambda g: (r(num(g) / scale, g.sums[den]) if col in g.present else None)

    return (
        ("VMs", "", lambda g: g.vms),
        ("I/Os", "", lambda g: g.sums["ios"]),
        ("window", "ms", lambda g: g.sums["window_ns"] / 1e6 / g.vms if g.vms else None),
        ("Gb/s", "", lambda g: g.gbps if g.gbps_vms else None),
        ("latency", "µs", t("io_latency_mean_ns", lambda g: g.latency_ios, "ios", 1e3)),
        ("vCPU/IO", "µs", t("cpu_busy_ns", lambda g: g.sums["cpu_busy_ns"], "ios", 1e3)),
        ("xlate/DMA", "ns", t("translate_ns", lambda g: g.sums["translate_ns"], "translations")),
        ("exits/IO", "", lambda g: r(g.sums["vm_exits"], g.sums["ios"])),
        ("inv/IO", "", lambda g: r(g.sums["inv_descriptors"], g.sums["ios"])),
        ("walk refs/xlate", "", lambda g: r(g.sums["walk_refs"], g.sums["translations"])),
        ("IOTLB hit", "%", lambda g: r(100 * _iotlb_hits(g),
                                       _iotlb_hits(g) + g.sums["iotlb_misses"])),
        ("stale DMA", "", lambda g: g.sums["stale_dma"]),
        ("cross-VM DMA", "", lambda g: g.sums["cross_vm_dma"]),
        ("faults", "", lambda g: g.sums["faults"]),
    )


@dataclass
class DesignTable:
    """Rows of text keys, then numbers; ``header`` names every column (units in brackets)."""

    keys: list[str]
    header: list[str]
    rows: list[tuple[list[str], list[Number]]]


def design_table(res: Results | pa.Table, by: Sequence[str] = GROUP_KEYS) -> DesignTable:
    """One row per group of ``by`` (default: mode, policy, workload; ["vm"] for per VM),
    split by what tells the runs apart, with the modelled times beside the counts."""
    summary = _label_runs(res) if isinstance(res, Results) else res
    if summary.num_rows == 0:
        _check_columns(summary, by)
        return DesignTable(list(by), list(by), [])
    keys, groups = _aggregate(summary, by)
    cols = _design_columns()
    header = [*keys, *(f"{n} [{u}]" if u else n for n, u, _ in cols)]
    rows = [(list(key), [fn(groups[key]) for _, _, fn in cols]) for key in sorted(groups)]
    return DesignTable(keys, header, rows)


def _cell(v: Number) -> str:
    if v is None:
        return DASH
    if isinstance(v, int):
        return str(v)
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"


def render(table: DesignTable, fmt: str = "text") -> str:
    """The table as fixed-width text, a Markdown table, CSV or JSON (a list of objects)."""
    if fmt not in FORMATS:
        raise ReportError(f"--format: unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    if not table.rows and fmt in ("text", "markdown"):
        return "(no VMs in summary)"
    cells = [[*k, *map(_cell, v)] for k, v in table.rows]
    if fmt == "text":
        return _text(table.header, cells, len(table.keys))
    if fmt == "markdown":
        rule = ["---"] * len(table.keys) + ["--:"] * (len(table.header) - len(table.keys))
        return "\n".join("| " + " | ".join(r) + " |" for r in [table.header, rule, *cells])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.header)
        w.writerows([*k, *("" if x is None else x for x in v)] for k, v in table.rows)
        return buf.getvalue().rstrip("\n")
    return json.dumps([dict(zip(table.header, [*k, *v], strict=True)) for k, v in table.rows],
                      indent=1)


def measured_line(summary: pa.Table) -> str:
    """What the numbers cover: VMs, runs and the measured window of virtual time."""
    if summary.num_rows == 0:
        return "measured: no VMs"
    cols = summary.column_names
    window = summary.column("window_ns" if "window_ns" in cols else "sim_ns").to_pylist()
    runs = len(set(summary.column("run").to_pylist())) if "run" in cols else 1
    lo, hi = min(window) / 1e6, max(window) / 1e6
    span = f"{hi:g} ms" if lo == hi else f"{lo:g}-{hi:g} ms"
    return (f"measured: {summary.num_rows} VMs in {runs} run{'s' * (runs != 1)}, "
            f"a window of {span} of modelled virtual time per VM (I/O counts, rates and "
            "modelled times cover that window)")


def runs_section(res: Results) -> list[str]:
    """One line per run: its id, its sweep parameters and the config keys that differ."""
    lines = []
    for run, diff in res.differences.items():
        params = res.manifests[run].get("params") or {}
        what = [f"{k}={v}" for k, v in sorted(params.items())] or [
            f"{k}={v}" for k, v in diff.items()]
        lines.append(f"{run} [{res.manifests[run].get('status', '?')}]: "
                     + (", ".join(what) or "(same config)"))
    return lines


def write_report(res: Results, out_dir: str | Path, by: Sequence[str] = GROUP_KEYS) -> Path:
    """report.md (the design table, what differs between runs, the plots, the config and
    versions) and the PNG plots, in ``out_dir``. Returns report.md's path."""
    from cluster.plots import draw_all

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out: {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = draw_all(res, out)
    md = [f"# Report: {res.path}", "", measured_line(res.summary), "",
          render(design_table(res, by), "markdown"), ""]
    if len(res.manifests) > 1:
        md += ["## Runs", "", *(f"- {line}" for line in runs_section(res)), ""]
    md += ["## Plots", ""]
    for p in plots:
        md += ([f"### {p.title}", "", f"![{p.title}]({p.path.name})", "", p.caption, ""]
               if p.path else [f"- {p.title}: not drawn ({p.reason})."])
    md += ["", "---", ""]
    first = res.manifests[min(res.manifests)] if res.manifests else {}
    versions = first.get("versions") or {}
    md.append("Versions: " + (", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
                              or "unknown"))
    md += ["", "Config (first run):", "", "```json",
           json.dumps(first.get("config", {}), indent=1, sort_keys=True), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
