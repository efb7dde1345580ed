"""Build what a Config describes: VM plans, host servers and VM agents, in sorted order.

The steps both back-ends share (cluster/runner.py in process, cluster/actors.py in Ray actors):
VM ids 1.. in group-name order placed on hosts by config.vm_placement, one HostServer per
emulated host (its `[host]` table as HostIommu parameters), one VmAgent per VM, and the guest
counters a run records. Nothing here imports pyarrow or the result writer, so a Ray worker
starting an actor imports only the emulator (cluster/ray_runner.py, start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from cluster.config import Config, vm_placement
from host_iommu.defs import ORDER_BY_NAME
from host_iommu.iommu import IommuParams
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent
from vm_agent.compiled import CompiledNicAgent, eligible
from vm_agent.compiled_nvme import CompiledNvmeAgent
from vm_agent.compiled_nvme import eligible as nvme_eligible
from workloads import WORKLOADS, workload_summary
from workloads.churn import Churn


@dataclass(frozen=True)
class VmPlan:
    vm: int
    group: str
    index: int
    host: int = 0
    bus: int | None = None  # PCI bus of the VM's devices: 1.. per host, in VM id order


def plan_vms(cfg: Config) -> list[VmPlan]:
    """VM ids 1.. in group-name order, then index within the group; hosts as placed.

    Each host numbers the PCI buses of its VMs' devices from 1 in VM id order (each host has
    its own requester-id space), so on one host a VM's bus is its id.
    """
    on_host = [0] * cfg.host.count
    plans = []
    for k, (g, i, h) in enumerate(vm_placement(cfg.vms, cfg.host.count)):
        on_host[h] += 1
        plans.append(VmPlan(k + 1, g, i, h, on_host[h]))
    return plans


def host_params(cfg: Config) -> IommuParams:
    """The `[host]` table as HostIommu parameters (same names; the page size as an order)."""
    names = {f.name for f in fields(IommuParams)} - {"sl_page_order"}
    return IommuParams(**{n: getattr(cfg.host, n) for n in names},
                       sl_page_order=ORDER_BY_NAME[cfg.host.sl_page_size])


def make_host(cfg: Config, host: int) -> HostServer:
    return HostServer(host_params(cfg), cfg.cost, host)


def make_agent(cfg: Config, p: VmPlan) -> VmAgent:
    """The VM's agent: a CompiledNicAgent or CompiledNvmeAgent where the group is eligible
    for the compiled NIC or NVMe loop (vm_agent/compiled.py, vm_agent/compiled_nvme.py:
    the same results), else a VmAgent."""
    g = next(g for g in cfg.vms if g.name == p.group)
    workload = WORKLOADS[g.workload.kind](g.workload.params)
    churn = Churn(g.churn) if g.churn is not None else None
    cls = (CompiledNicAgent if eligible(g) else CompiledNvmeAgent if nvme_eligible(g)
           else VmAgent)
    return cls(p.vm, mode=g.mode, policy=g.policy, flush_queue=g.flush_queue,
               vcpus=g.vcpus, memory_bytes=g.memory_mib << 20, fl_levels=g.fl_levels,
               ats=g.ats, workload=workload, churn=churn, costs=cfg.cost,
               seed=cfg.experiment.seed, stream=p.index, hz=g.hz, bus=p.bus)


def guest_epoch_stats(agent: VmAgent) -> dict[str, int]:
    """A VM's counters after an epoch: its stats and its workload's summary counters."""
    return {**agent.stats, **workload_summary(agent.workload)}


def guest_final(agent: VmAgent) -> dict[str, int]:
    """A VM's counters at the end of a run (its stats plus the flush queue's stale bound)."""
    return {**guest_epoch_stats(agent), "stale_bound_ns": agent.dma.stale_bound_ns}
