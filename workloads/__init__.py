"""Device and traffic models that drive a guest's DMA API: NIC, NVMe, trace replay, churn.

See workloads/base.py for the Workload contract; ``WORKLOADS`` maps ``kind`` to class.
"""

from __future__ import annotations

from typing import Any

from workloads.base import Device, GuestContext, Workload
from workloads.churn import Churn, ChurnParams
from workloads.ftrace import import_ftrace
from workloads.multi import MultiWorkload
from workloads.nic import NicWorkload
from workloads.nvme import NvmeWorkload, prp_layout
from workloads.trace import (
    TraceError,
    TraceReader,
    TraceWorkload,
    read_trace,
    scan_trace,
    trace_digest,
    write_trace,
)

# Workloads by ``[vm.<group>.workload] kind``.
WORKLOADS: dict[str, type[Workload]] = {
    NicWorkload.kind: NicWorkload,
    NvmeWorkload.kind: NvmeWorkload,
    TraceWorkload.kind: TraceWorkload,
    MultiWorkload.kind: MultiWorkload,      # [[vm.<group>.workload]]: several devices
}
MultiWorkload.registry = WORKLOADS
CHURN_PARAMS = ChurnParams

# Workload summary columns of every kind, in a fixed order (0 where a kind has none).
SUMMARY_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(
    c for cls in WORKLOADS.values() for c in cls.SUMMARY_COLUMNS))


def workload_summary(workload: Workload) -> dict[str, int]:
    """Every column of ``SUMMARY_COLUMNS`` for one VM's workload (0 where it has none)."""
    own = workload.summary_counters()
    return {c: int(own.get(c, 0)) for c in SUMMARY_COLUMNS}


def input_digest(kind: str, params: Any) -> str:
    """A digest of the files a workload reads ("" when it reads none): a run id covers it."""
    if kind == TraceWorkload.kind and getattr(params, "path", ""):
        return trace_digest(params.path)
    if kind == MultiWorkload.kind:
        return "+".join(input_digest(p.kind, p.params) for p in params.parts).strip("+")
    return ""


__all__ = [
    "CHURN_PARAMS",
    "SUMMARY_COLUMNS",
    "WORKLOADS",
    "Churn",
    "ChurnParams",
    "Device",
    "GuestContext",
    "MultiWorkload",
    "NicWorkload",
    "NvmeWorkload",
    "TraceError",
    "TraceReader",
    "TraceWorkload",
    "Workload",
    "import_ftrace",
    "input_digest",
    "prp_layout",
    "read_trace",
    "scan_trace",
    "trace_digest",
    "workload_summary",
    "write_trace",
]
