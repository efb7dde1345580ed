"""Readable summaries of result tables: per-design costs per I/O, hit rates, security counts.

Aggregates the per-VM ``summary`` table (columns in docs/results.md) by (mode, policy,
workload), the comparison DESIGN.md section 1 asks for: traps, invalidations and page-walk
references per I/O, IOTLB hit rate, modelled throughput, stale and cross-VM DMA, faults.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from cluster.config import ClusterError
from cluster.results import META_PARTITION_KEYS

GROUP_KEYS = ("mode", "policy", "workload")
_SUMMED = ("ios", "vm_exits", "inv_descriptors", "walk_refs", "translations", "iotlb_hits",
           "iotlb_misses", "stale_dma", "cross_vm_dma", "faults")
REQUIRED_COLUMNS = (*GROUP_KEYS, "vm", "bytes", "sim_ns", *_SUMMED)
DASH = "-"


class ReportError(ClusterError):
    """A table lacks the columns a report needs."""


@dataclass
class _Group:
    vms: int = 0
    gbps: float = 0.0
    gbps_vms: int = 0  # VMs with sim_ns > 0 (the others add no rate)
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMMED, 0))


def _ratio(num: float, den: float, fmt: str = "{:.2f}") -> str:
    return fmt.format(num / den) if den else DASH


def _columns() -> Sequence[tuple[str, Callable[[_Group], str]]]:
    return (
        ("VMs", lambda g: str(g.vms)),
        ("I/Os", lambda g: str(g.sums["ios"])),
        ("exits/IO", lambda g: _ratio(g.sums["vm_exits"], g.sums["ios"])),
        ("inv/IO", lambda g: _ratio(g.sums["inv_descriptors"], g.sums["ios"])),
        ("walk refs/xlate", lambda g: _ratio(g.sums["walk_refs"], g.sums["translations"])),
        ("IOTLB hit %", lambda g: _ratio(100 * g.sums["iotlb_hits"],
                                         g.sums["iotlb_hits"] + g.sums["iotlb_misses"],
                                         "{:.1f}")),
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
    missing = [c for c in REQUIRED_COLUMNS if c not in summary.column_names]
    if missing:
        raise ReportError(f"summary table lacks columns: {', '.join(missing)}")
    if summary.num_rows == 0:
        return "(no VMs in summary)"
    data = summary.to_pydict()
    meta = (summary.schema.metadata or {}).get(META_PARTITION_KEYS)
    split = json.loads(meta) if meta else ["run"]
    split = [k for k in split if k in data and len(set(data[k])) > 1]
    groups: dict[tuple[str, ...], _Group] = {}
    for i in range(summary.num_rows):
        key = tuple(str(data[k][i]) for k in (*split, *GROUP_KEYS))
        g = groups.setdefault(key, _Group())
        g.vms += 1
        for c in _SUMMED:
            g.sums[c] += int(data[c][i] or 0)
        sim_ns = int(data.get("window_ns", data["sim_ns"])[i] or 0)   # the measured window
        if sim_ns > 0:
            g.gbps += int(data["bytes"][i] or 0) * 8 / sim_ns
            g.gbps_vms += 1
    cols = _columns()
    header = [*split, *GROUP_KEYS, *(name for name, _ in cols)]
    rows = [[*key, *(fn(groups[key]) for _, fn in cols)] for key in sorted(groups)]
    n_text = len(header) - len(cols)  # left-aligned text columns, then right-aligned numbers
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j < n_text else c.rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)
