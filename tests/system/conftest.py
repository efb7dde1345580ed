"""Whole worlds in process for the system tests: build a config, run it, read every counter.

``simulate`` runs the same objects as ``iommu-emu run`` (cluster.runner.build and the epoch
Engine over the in-process transport, which round-trips every batch through the wire format)
but keeps the host and the agents, so a test can read any counter, not only the summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config import Config, parse_config
from cluster.engine import Engine, InProcTransport
from cluster.runner import build
from host_iommu.defs import ACCESS_READ, ACCESS_WRITE, PAGE_SHIFT
from host_iommu.iommu import IommuParams
from host_iommu.pgtable import PageTable
from host_iommu.protocol import OP_DMA, OP_GUEST_WRITE, EpochReport, OpLog, VmSetup, merge
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent
from vm_agent.memory import GuestMemory, GuestTableStore


@dataclass
class World:
    """A finished run: the host, its agents, and one merged counter dict per VM group."""

    cfg: Config
    host: HostServer
    agents: list[VmAgent]
    rows: dict[str, dict[str, int]]

    def __getitem__(self, group: str) -> dict[str, int]:
        return self.rows[group]


def experiment(vms: dict[str, dict], *, duration_us: int, seed: int = 3, epoch_us: int = 100,
               host: dict | None = None, name: str = "sys") -> Config:
    return parse_config({"experiment": {"name": name, "seed": seed,
                                        "duration_us": duration_us, "epoch_us": epoch_us},
                         "host": {"memory_mib": 512, **(host or {})}, "vm": vms})


def simulate(cfg: Config) -> World:
    """Run ``cfg`` to its end; counters are summed per group (guest stats + host counters)."""
    host, agents, plans = build(cfg)
    Engine(InProcTransport(host, agents), cfg.experiment.epoch_us * 1000).run(
        cfg.experiment.duration_us * 1000)
    host.iommu.drain()
    rows: dict[str, dict[str, Any]] = {}
    for a in agents:
        row = rows.setdefault(plans[a.vm].group, {})
        for k, v in (*a.stats.items(), *host.counters[a.vm].items()):
            row[k] = max(row.get(k, 0), v) if k.endswith("_max_ns") else row.get(k, 0) + v
        row["lazy_stale_bound_ns"] = max(row.get("lazy_stale_bound_ns", 0),
                                         a.dma.stale_bound_ns)
    return World(cfg, host, agents, rows)


def nic(mode: str, policy: str = "strict", *, gbps: float = 2.0, rogue: float = 0.0,
        ring: int = 64, **extra: Any) -> dict:
    """A NIC VM group (2 vCPUs, 64 MiB)."""
    return {"mode": mode, "policy": policy, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nic", "offered_gbps": gbps, "rx_ring": ring,
                         "tx_ring": ring, "rogue_fraction": rogue}, **extra}


def nvme(mode: str, policy: str = "strict", *, rogue: float = 0.0, depth: int = 4,
         **extra: Any) -> dict:
    """An NVMe VM group (2 vCPUs, 64 MiB), 4 KiB and 16 KiB I/Os."""
    return {"mode": mode, "policy": policy, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nvme", "queue_depth": depth, "io_sizes": [4096, 16384],
                         "io_weights": [0.5, 0.5], "rogue_fraction": rogue}, **extra}


class Bench:
    """A HostServer whose VMs are driven by hand: the operations a guest and its VMM would
    send, written into per-VM OpLogs and applied as one merged epoch by ``apply``.

    Nested VMs get a guest first-level table (``fl[vm]``) whose stores are logged as
    OP_GUEST_WRITE, as the agent does; shadow VMs only need VFIO operations.
    """

    def __init__(self, memory_mib: int = 128, **params: Any) -> None:
        self.server = HostServer(IommuParams(memory_mib=memory_mib, **params))
        self.h = self.server.iommu
        self.logs: dict[int, OpLog] = {}
        self.fl: dict[int, PageTable] = {}
        self.reports: dict[int, EpochReport] = {}

    def _vm(self, vm: int, memory_mib: int) -> tuple[OpLog, int]:
        self.logs[vm] = OpLog(vm)
        return self.logs[vm], memory_mib << 20

    def nested_vm(self, vm: int, sid: int, memory_mib: int = 8, ats: bool = False) -> PageTable:
        log, size = self._vm(vm, memory_mib)
        store = GuestTableStore(GuestMemory(size >> PAGE_SHIFT, first_frame=1024))
        store.on_write = lambda gpa, value: log.add(store.now, OP_GUEST_WRITE, a0=gpa,
                                                    a1=value)
        table = PageTable(store, "fl", 4, max_order=0)
        self.server.setup_vm(VmSetup(vm, size, "nested", (sid,), ats, 4, (table.root,)))
        self.fl[vm] = table
        return table

    def shadow_vm(self, vm: int, sid: int, memory_mib: int = 8, ats: bool = False) -> None:
        _log, size = self._vm(vm, memory_mib)
        self.server.setup_vm(VmSetup(vm, size, "shadow", (sid,), ats))

    def passthrough_vm(self, vm: int, sid: int, memory_mib: int = 8) -> None:
        _log, size = self._vm(vm, memory_mib)
        self.server.setup_vm(VmSetup(vm, size, "passthrough", (sid,)))

    def op(self, vm: int, t_ns: int, op: int, **fields: int) -> None:
        self.logs[vm].add(t_ns, op, **fields)

    def dma(self, vm: int, t_ns: int, sid: int, iova: int, *, write: bool = False,
            tag: int = -1, pasid: int = 0) -> None:
        """One 64-byte device DMA; ``tag`` is the id of the unmap that last covered it."""
        self.op(vm, t_ns, OP_DMA, sid=sid, pasid=pasid, a0=iova, a1=64,
                a2=ACCESS_WRITE if write else ACCESS_READ, a3=tag)

    def apply(self) -> dict[int, EpochReport]:
        ops = merge([self.logs[vm].take() for vm in sorted(self.logs)])
        self.reports = self.server.apply_epoch(ops)
        return self.reports

    def counters(self, vm: int) -> dict[str, int]:
        return self.server.counters[vm]
