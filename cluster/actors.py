"""Thin Ray actor shells over HostServer (one emulated host) and VmAgent (a host's guests).

Like Ray's own util/queue.py (a plain ``_QueueActor`` made remote only where it is created),
these are plain classes: cluster/ray_runner.py wraps them with ``ray.remote(...).options(...)``.
Every method is one call per actor per epoch and carries whole batches in the protocol's wire
encoding (host_iommu/protocol.py: ``pack_ops`` msgpack frames of OP_DTYPE columns, ``pack``
for control messages), never one remote call per operation. Batches and reports go from actor
to actor: a VM actor's ``step`` returns its batches and its small stats as separate objects
(``num_returns=2``), the host's ``apply`` takes every group's batches and returns one report
object per group plus its small counters, so the driver fetches the counters only.

A VM actor carries several VMs of one host: a Ray actor is a worker process (about 100 MiB
resident before any emulation state), so one process per VM would cap a 24 GiB machine near
200 VMs, and every VM would add a remote call per epoch. The VMs of an actor run their epochs
one after another, in id order, exactly as the in-process back-end does; results do not depend
on how VMs are grouped into actors.

Where a host's VMs form a single group (a host's share of the cluster is one CPU: one core,
or as many hosts as cores), ``HostVmsActor`` runs that group and the host in one process: an
epoch is then one call (run the VMs, apply their merged batches, keep the reports for the next
epoch) instead of a VM call, a host call and the hand-over of batches and reports between
them. With one CPU per host the two processes could not run at once anyway, so nothing is lost
in parallelism; the same plain classes do the same work in the same order.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from cluster.build import VmPlan, guest_epoch_stats, guest_final, make_agent, make_host
from cluster.config import Config
from host_iommu.protocol import EpochReport, merge, pack, unpack, unpack_ops


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class HostActor:
    """One emulated host: a HostServer applying its VMs' merged batches each epoch."""

    def __init__(self, cfg: Config, host: int) -> None:
        self.host = host
        self.server = make_host(cfg, host)

    def node_id(self) -> str:
        return _node_id()

    def setup_vms(self, frames: dict[int, bytes]) -> None:
        """``VmSetup`` control messages, applied in VM id order."""
        for vm in sorted(frames):
            self.server.setup_vm(unpack(frames[vm]))

    def apply(self, *groups: dict[int, bytes], t_start_ns: int | None = None
              ) -> tuple[Any, ...]:
        """One epoch: each VM group's packed batches (``VmGroupActor.step``'s first return) in,
        merged by (t_ns, vm, seq) as the in-process back-end merges them, applied as the epoch
        starting at ``t_start_ns`` (HostServer.apply_epoch). Out: per group its
        VMs' packed EpochReports, then ``(counters per VM, operations applied, wall seconds of
        emulation)``; the wall time is for overhead accounting, never for results."""
        t0 = time.perf_counter()
        ops = merge([unpack_ops(g[vm]) for g in groups for vm in sorted(g)])
        reports = self.server.apply_epoch(ops, t_start_ns)
        out = tuple({vm: pack(reports[vm]) for vm in sorted(g)} for g in groups)
        counters = {vm: r.counters for vm, r in reports.items()}
        return (*out, (counters, int(ops.size), time.perf_counter() - t0))

    def finish(self) -> tuple[dict[int, dict[str, int]], dict[str, Any], int]:
        """Drain the QI; the host counters per VM, the fault columns, and peak RSS."""
        self.server.iommu.drain()
        return self.server.counters, self.server.fault_columns(), _peak_rss_bytes()


class VmGroupActor:
    """Several VMs of one host; ``step`` delivers last epoch's reports and runs the next."""

    def __init__(self, cfg: Config, plans: list[VmPlan]) -> None:
        self.agents = [make_agent(cfg, p) for p in sorted(plans, key=lambda p: p.vm)]

    def node_id(self) -> str:
        return _node_id()

    def setup(self) -> tuple[dict[int, bytes], str]:
        """Start every VM's workload; their packed ``VmSetup`` messages, and this actor's
        node id (so that starting an actor is one round trip)."""
        return {a.vm: pack(a.setup()) for a in self.agents}, _node_id()

    def step(self, t_end_ns: int, reports: dict[int, bytes]
             ) -> tuple[dict[int, bytes], tuple[dict[int, dict[str, int]], float]]:
        """Deliver ``reports`` (packed EpochReports from ``HostActor.apply``, none before the
        first epoch), run every VM to ``t_end_ns``. Two returns: per VM its packed operation
        batch (for the host actor), and per VM its stats with the wall seconds it took (for
        the driver)."""
        t0 = time.perf_counter()
        self._receive(reports)
        frames, stats = {}, {}
        for a in self.agents:
            frames[a.vm] = a.run_epoch_frame(t_end_ns)
            stats[a.vm] = guest_epoch_stats(a)
        return frames, (stats, time.perf_counter() - t0)

    def _receive(self, reports: dict[int, bytes]) -> None:
        for a in self.agents:
            if a.vm in reports:
                r = unpack(reports[a.vm])
                assert isinstance(r, EpochReport)
                a.receive(r)

    def finish(self, reports: dict[int, bytes]) -> tuple[dict[int, dict[str, int]], int]:
        """Deliver the last reports; each VM's final counters, and this actor's peak RSS."""
        self._receive(reports)
        return {a.vm: guest_final(a) for a in self.agents}, _peak_rss_bytes()


class HostVmsActor:
    """One emulated host with all of its VMs (a single group): ``epoch`` is one call.

    It composes the two plain classes above and calls them exactly as the separate actors
    are called, batches and reports crossing the wire encoding in between, so its tables are
    those of a ``VmGroupActor`` beside a ``HostActor``.
    """

    def __init__(self, cfg: Config, host: int, plans: list[VmPlan]) -> None:
        self.host = HostActor(cfg, host)
        self.vms = VmGroupActor(cfg, plans)
        self._reports: dict[int, bytes] = {}  # last epoch's packed reports, delivered next
        self._t_start_ns = 0                   # the coming epoch's start: the last one's end

    def node_id(self) -> str:
        return _node_id()

    def setup(self) -> str:
        """Every VM's ``VmSetup``, applied by the host in VM id order; the node id."""
        frames, node = self.vms.setup()
        self.host.setup_vms(frames)
        return node

    def epoch(self, t_end_ns: int) -> tuple[dict[int, dict[str, int]], float,
                                            dict[int, dict[str, int]], int, float]:
        """``VmGroupActor.step`` then ``HostActor.apply``: the VMs' stats and wall seconds,
        then the host counters per VM, operations applied and the host's wall seconds."""
        frames, (stats, vm_s) = self.vms.step(t_end_ns, self._reports)
        self._reports, (counters, n_ops, host_s) = self.host.apply(
            frames, t_start_ns=self._t_start_ns)
        self._t_start_ns = t_end_ns
        return stats, vm_s, counters, n_ops, host_s

    def epochs(self, t_ends: list[int]) -> list[tuple[dict[int, dict[str, int]], float,
                                                    dict[int, dict[str, int]], int, float]]:
        """``epoch`` for each end in ``t_ends``, in order, in one call: what each returned.
        Nothing outside this actor takes part in its epochs, so the driver may ask for
        several at once (ray_runner.RayMachine batches them)."""
        return [self.epoch(t) for t in t_ends]

    def finish(self) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, int]],
                              dict[str, Any], int]:
        """The VMs' final counters (last reports delivered), then ``HostActor.finish``."""
        guest, _rss = self.vms.finish(self._reports)
        counters, faults, rss = self.host.finish()
        return guest, counters, faults, rss
