"""Realise a Config: build the host and its VMs in sorted order, run the epochs, store results.

Like Mininet's net.py realising a topo: the description (cluster/config.py) is pure; this
module creates the objects (HostServer, one VmAgent per VM, numbered 1.. in group-name order),
runs them through the Engine on a transport, and writes summary, metrics (streamed per epoch)
and faults through the atomic RunWriter (cluster/results.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa

from cluster.config import ClusterError, Config
from cluster.engine import Engine, Epoch, InProcTransport
from cluster.results import RunWriter, run_id
from host_iommu.defs import ORDER_BY_NAME, FaultReason, Stage
from host_iommu.iommu import IommuParams
from host_iommu.memory import HostMemoryError
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent
from vm_agent.dma import DmaError
from vm_agent.memory import GuestMemoryError
from workloads import WORKLOADS
from workloads.churn import Churn

BACKENDS = ("inproc",)
METRIC_COLUMNS = ("ios", "bytes", "maps", "unmaps", "vm_exits", "inv_descriptors",
                  "iotlb_hits", "iotlb_misses", "walk_refs", "faults", "stale_dma")

class RunError(ClusterError):
    """A run that cannot proceed (a config that does not fit, an unknown back-end)."""


@dataclass
class RunOutcome:
    path: Path
    summary: pa.Table
    run_id: str


@dataclass(frozen=True)
class VmPlan:
    vm: int
    group: str
    index: int


def plan_vms(cfg: Config) -> list[VmPlan]:
    """VM ids 1.. in group-name order, then index within the group."""
    out: list[VmPlan] = []
    for g in sorted(cfg.vms, key=lambda g: g.name):
        for i in range(g.count):
            out.append(VmPlan(len(out) + 1, g.name, i))
    return out


def host_params(cfg: Config) -> IommuParams:
    """The `[host]` table as HostIommu parameters (same names; the page size as an order)."""
    names = {f.name for f in fields(IommuParams)} - {"sl_page_order"}
    return IommuParams(**{n: getattr(cfg.host, n) for n in names},
                       sl_page_order=ORDER_BY_NAME[cfg.host.sl_page_size])


def build(cfg: Config) -> tuple[HostServer, list[VmAgent], dict[int, VmPlan]]:
    """Create the host server and every VM agent, set them up, in sorted order."""
    host = HostServer(host_params(cfg), cfg.cost)
    groups = {g.name: g for g in cfg.vms}
    agents: list[VmAgent] = []
    plans = {}
    for p in plan_vms(cfg):
        g = groups[p.group]
        workload = WORKLOADS[g.workload.kind](g.workload.params)
        churn = Churn(g.churn) if g.churn is not None else None
        agent = VmAgent(p.vm, mode=g.mode, policy=g.policy, flush_queue=g.flush_queue,
                        vcpus=g.vcpus, memory_bytes=g.memory_mib << 20, fl_levels=g.fl_levels,
                        ats=g.ats, workload=workload, churn=churn, costs=cfg.cost,
                        seed=cfg.experiment.seed, stream=p.index)
        setup = agent.setup()
        host.setup_vm(setup)
        agents.append(agent)
        plans[p.vm] = p
    return host, agents, plans


METRICS_SCHEMA = pa.schema([("experiment", pa.string()), ("run", pa.string()),
                            ("vm", pa.int32()), ("epoch", pa.int64()), ("t_end_ns", pa.int64()),
                            *[(c, pa.int64()) for c in METRIC_COLUMNS]])


def _metric_values(agent: VmAgent, host_c: dict[str, int]) -> dict[str, int]:
    s = agent.stats
    return {"ios": s["ios"], "bytes": s["bytes"], "maps": s["maps"], "unmaps": s["unmaps"],
            "vm_exits": s["vm_exits"], "inv_descriptors": s["inv_descriptors"],
            "iotlb_hits": host_c.get("iotlb_hits", 0),
            "iotlb_misses": host_c.get("iotlb_misses", 0),
            "walk_refs": host_c.get("walk_refs", 0), "faults": host_c.get("faults", 0),
            "stale_dma": host_c.get("stale_dma", 0)}


def run_config(cfg: Config, out_dir: str | Path, backend: str = "inproc",
               overwrite: bool = False) -> RunOutcome:
    """Run one config to completion and publish its run folder."""
    if backend not in BACKENDS:
        raise RunError(f"unknown backend {backend!r} (one of: {', '.join(BACKENDS)})")
    rid = run_id(cfg)
    exp = cfg.experiment
    with RunWriter(out_dir, cfg, rid, overwrite=overwrite) as writer:
        try:
            host, agents, plans = build(cfg)
        except (HostMemoryError, GuestMemoryError) as e:
            raise RunError(f"the config does not fit: {e}") from None
        engine = Engine(InProcTransport(host, agents), exp.epoch_us * 1000)
        sink = writer.stream("metrics", writer.with_metadata(METRICS_SCHEMA))
        prev: dict[int, dict[str, int]] = {a.vm: dict.fromkeys(METRIC_COLUMNS, 0)
                                           for a in agents}

        def on_epoch(ep: Epoch) -> None:
            rows: dict[str, list] = {f.name: [] for f in METRICS_SCHEMA}
            for a in agents:
                cur = _metric_values(a, ep.reports[a.vm].counters)
                rows["experiment"].append(exp.name)
                rows["run"].append(rid)
                rows["vm"].append(a.vm)
                rows["epoch"].append(ep.index)
                rows["t_end_ns"].append(ep.t_end_ns)
                for c in METRIC_COLUMNS:
                    rows[c].append(cur[c] - prev[a.vm][c])
                prev[a.vm] = cur
            sink.write_batch(pa.record_batch(rows, schema=METRICS_SCHEMA))

        try:
            engine.run(exp.duration_us * 1000, on_epoch)
        except (HostMemoryError, GuestMemoryError, DmaError) as e:
            raise RunError(f"run stopped at {engine.now} ns of virtual time: {e} "
                           "(raise vm.memory_mib or host.memory_mib)") from None
        host.iommu.drain()
        summary = summary_table(cfg, rid, host, agents, plans, engine.now)
        writer.write_table("summary", summary)
        writer.write_table("faults", faults_table(cfg, rid, host))
        path = writer.commit()
    return RunOutcome(path, summary, rid)


def summary_table(cfg: Config, rid: str, host: HostServer, agents: list[VmAgent],
                  plans: dict[int, VmPlan], sim_ns: int) -> pa.Table:
    groups = {g.name: g for g in cfg.vms}
    rows: list[dict] = []
    for a in agents:
        g = groups[plans[a.vm].group]
        s = a.stats
        hc = host.counters[a.vm]
        rows.append({
            "experiment": cfg.experiment.name, "run": rid, "host": 0, "vm": a.vm,
            "group": g.name, "mode": g.mode, "policy": g.policy,
            "workload": g.workload.kind, "sim_ns": sim_ns, "ios": s["ios"],
            "bytes": s["bytes"], "maps": s["maps"], "unmaps": s["unmaps"],
            "vm_exits": s["vm_exits"], "vmm_map_calls": s["vmm_map_calls"],
            "vmm_unmap_calls": s["vmm_unmap_calls"],
            "vmm_invalidate_calls": s["vmm_invalidate_calls"],
            "inv_descriptors": s["inv_descriptors"],
            "iotlb_hits": hc["iotlb_hits"], "iotlb_misses": hc["iotlb_misses"],
            "devtlb_hits": hc["devtlb_hits"], "translations": hc["translations"],
            "walk_refs": hc["walk_refs"], "ctx_refs": hc["ctx_refs"],
            "pte_writes": s["pte_writes"], "pinned_pages": hc["pinned_pages"],
            "faults": hc["faults"], "stale_dma": hc["stale_dma"],
            "cross_vm_dma": hc["cross_vm_dma"],
            "stale_window_max_ns": hc["stale_window_max_ns"],
            "io_latency_mean_ns": (s["io_latency_sum_ns"] / s["ios"]) if s["ios"] else 0.0,
            "cpu_busy_ns": s["cpu_busy_ns"],
            "host_inv_descriptors": hc["host_inv_descriptors"],
            "dma_requests": s["dma_requests"], "rogue_dma": s["rogue_dma"],
            "lazy_flushes": s["lazy_flushes"], "iommu_map_events": s["iommu_map_events"],
            "translate_ns": hc["translate_ns"],
            "stale_bound_ns": a.dma.stale_bound_ns,
        })
    return pa.Table.from_pylist(rows)


def faults_table(cfg: Config, rid: str, host: HostServer) -> pa.Table:
    cols = host.fault_columns()
    n = len(cols["time_ns"])
    reason_name = [FaultReason(int(r)).name if int(r) in FaultReason._value2member_map_
                   else f"0x{int(r):02x}" for r in cols["reason"].tolist()]
    stage_name = [Stage(int(s)).name for s in cols["stage"].tolist()]
    return pa.table({
        "experiment": pa.array([cfg.experiment.name] * n, pa.string()),
        "run": pa.array([rid] * n, pa.string()),
        "time_ns": cols["time_ns"], "vm": cols["vm"], "sid": cols["sid"],
        "pasid": cols["pasid"], "addr": cols["addr"], "access": cols["access"],
        "reason": cols["reason"], "reason_name": pa.array(reason_name, pa.string()),
        "stage": pa.array(stage_name, pa.string()),
    })


