"""Device and traffic models that drive a guest's DMA API: NIC, NVMe, trace replay, churn.

See workloads/base.py for the Workload contract; ``WORKLOADS`` maps ``kind`` to class.
"""

from __future__ import annotations

from workloads.base import Device, GuestContext, Workload
from workloads.churn import Churn, ChurnParams
from workloads.nic import NicWorkload
from workloads.nvme import NvmeWorkload, prp_layout
from workloads.trace import (
    TraceError,
    TraceReader,
    TraceWorkload,
    import_ftrace,
    read_trace,
    write_trace,
)

# Workloads by ``[vm.<group>.workload] kind``.
WORKLOADS: dict[str, type[Workload]] = {
    NicWorkload.kind: NicWorkload,
    NvmeWorkload.kind: NvmeWorkload,
    TraceWorkload.kind: TraceWorkload,
}
CHURN_PARAMS = ChurnParams

__all__ = [
    "CHURN_PARAMS",
    "WORKLOADS",
    "Churn",
    "ChurnParams",
    "Device",
    "GuestContext",
    "NicWorkload",
    "NvmeWorkload",
    "TraceError",
    "TraceReader",
    "TraceWorkload",
    "Workload",
    "import_ftrace",
    "prp_layout",
    "read_trace",
    "write_trace",
]
