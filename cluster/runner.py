"""Realise a Config: build hosts and their VMs in sorted order, run the epochs, store results.

Like Mininet's net.py realising a topo: the description (cluster/config.py) is pure; this
module creates the objects (one HostServer per `[host]`, one VmAgent per VM, numbered 1.. in
group-name order and placed by config.vm_placement), runs them through the Engine on a
back-end's transport, and writes summary, metrics (streamed per epoch) and faults through the
RunWriter (cluster/results.py). Back-ends: ``inproc`` (everything in this process) and ``ray``
(host and VM actors, cluster/ray_runner.py); both produce identical tables. The build steps
themselves (VM plans, host servers, VM agents) are in cluster/build.py, which the Ray actors
import without this module's pyarrow and result writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from cluster.build import (  # re-exported: the build steps live where actors import them
    VmPlan,
    guest_epoch_stats,
    guest_final,
    host_params,
    make_agent,
    plan_vms,
)
from cluster.config import ClusterError, Config
from cluster.engine import Engine, Epoch, InProcTransport, Transport
from cluster.results import RunWriter, run_id
from host_iommu.defs import FaultReason, Stage
from host_iommu.memory import HostMemoryError
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent
from vm_agent.dma import DmaError
from vm_agent.memory import GuestMemoryError
from workloads import SUMMARY_COLUMNS as WORKLOAD_SUMMARY_COLUMNS

BACKENDS = ("ray", "inproc")
METRIC_COLUMNS = ("ios", "bytes", "maps", "unmaps", "vm_exits", "inv_descriptors",
                  "iotlb_hits", "iotlb_misses", "walk_refs", "faults", "stale_dma")
# Errors of the emulated machine that end a run (a config that does not fit at run time).
MACHINE_ERRORS = (HostMemoryError, GuestMemoryError, DmaError)


class RunError(ClusterError):
    """A run that cannot proceed (a config that does not fit, an unknown back-end)."""


class RunFailed(RunError):
    """A run that started and failed midway; ``failed`` names what failed (actors, VMs)."""

    def __init__(self, message: str, failed: Sequence[str] = (), path: Path | None = None):
        super().__init__(message)
        self.failed = list(failed)
        self.path = path


@dataclass
class RunOutcome:
    path: Path                      # the run's folder (manifest.json)
    summary: pa.Table
    run_id: str
    tables: dict[str, Path] = field(default_factory=dict)  # table -> its Parquet file


def make_host(cfg: Config, host: int) -> HostServer:
    """build.make_host, on this module's ``host_params`` (tests patch it to pick an engine)."""
    return HostServer(host_params(cfg), cfg.cost, host)


def build_hosts(cfg: Config) -> tuple[dict[int, HostServer], list[VmAgent], dict[int, VmPlan]]:
    """Create every host server and VM agent and set them up, in sorted order."""
    hosts = {h: make_host(cfg, h) for h in range(cfg.host.count)}
    agents: list[VmAgent] = []
    plans = {}
    for p in plan_vms(cfg):
        agent = make_agent(cfg, p)
        hosts[p.host].setup_vm(agent.setup())
        agents.append(agent)
        plans[p.vm] = p
    return hosts, agents, plans


def build(cfg: Config) -> tuple[HostServer, list[VmAgent], dict[int, VmPlan]]:
    """``build_hosts`` for a one-host config: the host server itself."""
    if cfg.host.count != 1:
        raise RunError(f"build() is for one host; host.count is {cfg.host.count} "
                       "(use build_hosts)")
    hosts, agents, plans = build_hosts(cfg)
    return hosts[0], agents, plans


# --- Back-ends -----------------------------------------------------------------------------
@dataclass
class FinalState:
    """Everything the summary and faults tables need, gathered from wherever the run ran."""

    guest: dict[int, dict[str, int]]            # vm -> guest_final
    host_counters: dict[int, dict[str, int]]    # vm -> HostServer counters
    faults: dict[int, dict[str, np.ndarray]]    # host -> fault_columns()
    placement: dict[str, Any] = field(default_factory=dict)  # e.g. host -> node id (ray)


class Machine(Transport, Protocol):
    """A transport that can also report guest stats per epoch and a final state."""

    def guest_stats(self) -> dict[int, dict[str, int]]: ...
    def finish(self) -> FinalState: ...
    def close(self) -> None: ...


class InProcMachine(InProcTransport):
    """The in-process back-end: one HostServer per host, each merging its own VMs' batches."""

    def __init__(self, cfg: Config) -> None:
        hosts, agents, plans = build_hosts(cfg)
        super().__init__(hosts, agents, {vm: p.host for vm, p in plans.items()})
        self._stats: dict[int, dict[str, int]] = {}

    def run_epochs(self, t_end_ns: int) -> dict[int, np.ndarray]:
        batches = super().run_epochs(t_end_ns)
        # Stats as each VM ends its epoch, before the host's report reaches it (receive
        # charges QI waits and counts faults), exactly where a VM actor takes them: the
        # warm-up window's start and the metrics rows are the same on every back-end.
        self._stats = {vm: guest_epoch_stats(a) for vm, a in self.agents.items()}
        return batches

    def guest_stats(self) -> dict[int, dict[str, int]]:
        return self._stats

    def finish(self) -> FinalState:
        counters: dict[int, dict[str, int]] = {}
        for h in sorted(self.hosts):
            self.hosts[h].iommu.drain()
            counters.update(self.hosts[h].counters)
        return FinalState({vm: guest_final(a) for vm, a in self.agents.items()}, counters,
                          {h: s.fault_columns() for h, s in sorted(self.hosts.items())})

    def close(self) -> None:
        pass


def open_machine(cfg: Config, backend: str, address: str | None = None,
                 vms_per_actor: int | None = None,
                 epochs_per_call: int | None = None) -> Machine:
    """Build ``cfg`` on a back-end; a config that does not fit raises RunError.
    ``vms_per_actor`` and ``epochs_per_call`` fix the Ray layout and batching
    (cluster/ray_runner.py RayMachine); None: chosen by the machine."""
    if backend not in BACKENDS:
        raise RunError(f"unknown backend {backend!r} (one of: {', '.join(BACKENDS)})")
    try:
        if backend == "inproc":
            return InProcMachine(cfg)
        from cluster.ray_runner import RayMachine

        return RayMachine(cfg, address=address, vms_per_actor=vms_per_actor,
                          epochs_per_call=epochs_per_call)
    except MACHINE_ERRORS as e:
        raise RunError(f"the config does not fit: {e}") from None


# --- Running -------------------------------------------------------------------------------
METRICS_SCHEMA = pa.schema([("experiment", pa.string()), ("host", pa.int32()),
                            ("vm", pa.int32()), ("epoch", pa.int64()), ("t_end_ns", pa.int64()),
                            *[(c, pa.int64()) for c in METRIC_COLUMNS]])


def warm_up_tables() -> None:
    """Pay the driver's one-time cost of its first metrics row now: pyarrow's first conversion
    of Python values imports pandas (0.3-0.7 s here). The Ray back-end calls this while its
    actors start, so the wait covers it instead of the first epoch."""
    pa.array([0], pa.int64())


def _metric_values(s: dict[str, int], host_c: dict[str, int]) -> dict[str, int]:
    return {"ios": s["ios"], "bytes": s["bytes"], "maps": s["maps"], "unmaps": s["unmaps"],
            "vm_exits": s["vm_exits"], "inv_descriptors": s["inv_descriptors"],
            "iotlb_hits": host_c.get("iotlb_hits", 0),
            "iotlb_misses": host_c.get("iotlb_misses", 0),
            "walk_refs": host_c.get("walk_refs", 0), "faults": host_c.get("faults", 0),
            "stale_dma": host_c.get("stale_dma", 0)}


def run_config(cfg: Config, out_dir: str | Path, backend: str = "inproc",
               overwrite: bool = False, *, address: str | None = None,
               params: Sequence[tuple[str, str]] = (),
               on_epoch: Callable[[Epoch], None] | None = None,
               vms_per_actor: int | None = None,
               epochs_per_call: int | None = None,
               machine_hook: Callable[[Machine], None] | None = None) -> RunOutcome:
    """Run one config to completion and publish its tables.

    ``params`` are the sweep's (column, value) Hive partition keys of this run. A run that
    fails after it started publishes a manifest with ``status: failed`` naming what failed,
    keeps the metrics streamed so far, and raises RunFailed. ``machine_hook`` sees the
    machine once it is built (tests use it to find actors).
    """
    if backend not in BACKENDS:
        raise RunError(f"unknown backend {backend!r} (one of: {', '.join(BACKENDS)})")
    rid = run_id(cfg)
    with RunWriter(out_dir, cfg, rid, overwrite=overwrite, params=params) as writer:
        try:
            machine = open_machine(cfg, backend, address, vms_per_actor, epochs_per_call)
        except RunError as e:  # did not fit, or an actor died while starting
            failed = getattr(e, "failed", [])
            raise RunFailed(str(e), failed, writer.fail(str(e), failed)) from None
        try:
            if machine_hook is not None:
                machine_hook(machine)
            outcome = _run(cfg, rid, machine, writer, on_epoch)
        except RunFailed as e:
            e.path = writer.fail(str(e), e.failed)
            raise
        finally:
            machine.close()
    return outcome


def _run(cfg: Config, rid: str, machine: Machine, writer: RunWriter,
         on_epoch: Callable[[Epoch], None] | None) -> RunOutcome:
    exp = cfg.experiment
    host_of = machine.host_of()
    vms = machine.vm_ids()
    engine = Engine(machine, exp.epoch_us * 1000)
    sink = writer.stream("metrics", writer.with_metadata(METRICS_SCHEMA))
    prev: dict[int, dict[str, int]] = {vm: dict.fromkeys(METRIC_COLUMNS, 0) for vm in vms}
    warmup_ns = exp.warmup_us * 1000
    start: dict[int, tuple[dict[str, int], dict[str, int]]] = {}   # counters at warm-up end

    def record(ep: Epoch) -> None:
        rows: dict[str, list] = {f.name: [] for f in METRICS_SCHEMA}
        stats = machine.guest_stats()
        for vm in vms:
            cur = _metric_values(stats[vm], ep.reports[vm].counters)
            rows["experiment"].append(exp.name)
            rows["host"].append(host_of[vm])
            rows["vm"].append(vm)
            rows["epoch"].append(ep.index)
            rows["t_end_ns"].append(ep.t_end_ns)
            for c in METRIC_COLUMNS:
                rows[c].append(cur[c] - prev[vm][c])
            prev[vm] = cur
        sink.write_batch(pa.record_batch(rows, schema=METRICS_SCHEMA))
        if warmup_ns and not start and ep.t_end_ns >= warmup_ns:
            start.update({vm: (dict(stats[vm]), dict(ep.reports[vm].counters)) for vm in vms})
        if on_epoch is not None:
            on_epoch(ep)

    try:
        engine.run(warmup_ns + exp.duration_us * 1000, record)
    except MACHINE_ERRORS as e:
        raise RunFailed(f"run stopped at {engine.now} ns of virtual time: {e} "
                        "(raise vm.memory_mib or host.memory_mib)") from None
    final = machine.finish()
    summary = summary_table(cfg, final, host_of, engine.now, start)
    writer.write_table("summary", summary)
    writer.write_table("faults", faults_table(cfg, final))
    writer.placement = final.placement
    path = writer.commit()
    return RunOutcome(path, summary, rid, writer.table_paths())


# Summary columns that are levels or maxima, not counts: a window keeps their end value.
NOT_WINDOWED = frozenset({"stale_window_max_ns", "stale_bound_ns", "pinned_pages"})


def _windowed(end: dict[str, int], start: dict[str, int] | None) -> dict[str, int]:
    """Counts of the measured window: end minus start (levels and maxima kept)."""
    if start is None:
        return end
    return {k: v if k in NOT_WINDOWED else v - start.get(k, 0) for k, v in end.items()}


def summary_table(cfg: Config, final: FinalState, host_of: dict[int, int],
                  sim_ns: int, start: dict[int, tuple[dict, dict]] | None = None) -> pa.Table:
    """One row per VM over the measured window (after ``experiment.warmup_us``)."""
    warmup_ns = cfg.experiment.warmup_us * 1000 if start else 0
    groups = {g.name: g for g in cfg.vms}
    plans = {p.vm: p for p in plan_vms(cfg)}
    rows: list[dict] = []
    for vm in sorted(final.guest):
        g = groups[plans[vm].group]
        s = _windowed(final.guest[vm], start[vm][0] if start else None)
        hc = _windowed(final.host_counters[vm], start[vm][1] if start else None)
        rows.append({
            "experiment": cfg.experiment.name, "host": host_of[vm], "vm": vm,
            "group": g.name, "mode": g.mode, "policy": g.policy,
            "workload": g.workload.kind, "sim_ns": sim_ns,
            "window_ns": sim_ns - warmup_ns, "ios": s["ios"],
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
            "rogue_faulted": hc["rogue_faulted"], "rogue_stale": hc["rogue_stale"],
            "rogue_in_flight": hc["rogue_in_flight"],
            "rogue_misdirected": hc["rogue_misdirected"],
            "rogue_cross_vm": hc["rogue_cross_vm"],
            "lazy_flushes": s["lazy_flushes"], "iommu_map_events": s["iommu_map_events"],
            "qi_errors": s["qi_errors"], "dma_map_errors": s["dma_map_errors"],
            "unmap_qi_wait_ns": s["unmap_qi_wait_ns"],
            "translate_ns": hc["translate_ns"],
            "sl_unmap_refused": hc["sl_unmap_refused"],
            "foreign_sid_refused": hc["foreign_sid_refused"], "ops_refused": hc["ops_refused"],
            "stale_bound_ns": s["stale_bound_ns"],
            **{c: s.get(c, 0) for c in WORKLOAD_SUMMARY_COLUMNS},
        })
    return pa.Table.from_pylist(rows)


def faults_table(cfg: Config, final: FinalState) -> pa.Table:
    parts = []
    for h in sorted(final.faults):
        cols = final.faults[h]
        n = len(cols["time_ns"])
        reason_name = [FaultReason(int(r)).name if int(r) in FaultReason._value2member_map_
                       else f"0x{int(r):02x}" for r in cols["reason"].tolist()]
        stage_name = [Stage(int(s)).name for s in cols["stage"].tolist()]
        parts.append(pa.table({
            "experiment": pa.array([cfg.experiment.name] * n, pa.string()),
            "host": pa.array([h] * n, pa.int32()),
            "time_ns": cols["time_ns"], "vm": cols["vm"], "sid": cols["sid"],
            "pasid": cols["pasid"], "addr": cols["addr"], "access": cols["access"],
            "reason": cols["reason"], "reason_name": pa.array(reason_name, pa.string()),
            "stage": pa.array(stage_name, pa.string()),
        }))
    return pa.concat_tables(parts)
