"""The epoch engine: advances every VM and every host through epochs of virtual time.

A run is a sequence of epochs [t, t + epoch). In each, every VM (in sorted id order) runs its
events and returns its operations; each host applies its own VMs' operations merged by
(t_ns, vm, seq) (host_iommu/protocol.py merge) and answers each of its VMs with a report.
Nothing depends on the order in which VMs or hosts answer: the merge key is in the data and
results are keyed by id. The transport is what differs between back-ends: ``InProcTransport``
calls the objects directly (round-tripping batches through their wire encoding, so tests
exercise the protocol); the Ray back-end (cluster/ray_runner.py) calls actors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from host_iommu.protocol import EpochReport, merge, pack, unpack, unpack_ops
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent


class Transport(Protocol):
    """What a back-end provides. ``host_of`` maps every VM id to its host index. A back-end
    whose hosts merge their VMs' batches themselves provides ``epoch(t_end_ns, until_ns) ->
    (operations applied, reports)`` instead of the three per-phase calls, and Engine.step
    uses it; ``until_ns`` (None when unknown) is the end of the run, which no epoch it runs
    ahead may start at or after."""

    def vm_ids(self) -> list[int]: ...
    def host_of(self) -> dict[int, int]: ...
    def run_epochs(self, t_end_ns: int) -> dict[int, np.ndarray]: ...
    def host_apply(self, ops: dict[int, np.ndarray], t_start_ns: int | None = None
                   ) -> dict[int, EpochReport]: ...
    def deliver(self, reports: dict[int, EpochReport]) -> None: ...


class InProcTransport:
    """Everything in one process; batches still cross the wire encoding.

    ``hosts`` is one HostServer (every VM on host 0) or a mapping host index -> HostServer
    with ``host_of`` naming each VM's host.
    """

    def __init__(self, hosts: HostServer | Mapping[int, HostServer], agents: Sequence[VmAgent],
                 host_of: Mapping[int, int] | None = None) -> None:
        self.hosts = dict(hosts) if isinstance(hosts, Mapping) else {0: hosts}
        self.agents = {a.vm: a for a in agents}
        self._host_of = {vm: (host_of or {}).get(vm, 0) for vm in self.agents}

    def vm_ids(self) -> list[int]:
        return sorted(self.agents)

    def host_of(self) -> dict[int, int]:
        return dict(self._host_of)

    def run_epochs(self, t_end_ns: int) -> dict[int, np.ndarray]:
        agents = self.agents
        return {vm: unpack_ops(agents[vm].run_epoch_frame(t_end_ns)) for vm in self.vm_ids()}

    def host_apply(self, ops: dict[int, np.ndarray], t_start_ns: int | None = None
                   ) -> dict[int, EpochReport]:
        reports: dict[int, EpochReport] = {}
        for h in sorted(ops):
            reports.update(self.hosts[h].apply_epoch(ops[h], t_start_ns))
        return reports

    def deliver(self, reports: dict[int, EpochReport]) -> None:
        for vm in self.vm_ids():
            self.agents[vm].receive(unpack(pack(reports[vm])))


@dataclass
class Epoch:
    index: int
    t_end_ns: int
    ops: int
    reports: dict[int, EpochReport]


class Engine:
    """``step()`` runs one epoch; ``run(until_ns)`` runs epochs until virtual time ``until``."""

    def __init__(self, transport: Transport, epoch_ns: int) -> None:
        if epoch_ns <= 0:
            raise ValueError("epoch length must be positive")
        self.transport = transport
        self.epoch_ns = epoch_ns
        self.now = 0
        self.index = 0
        self.until_ns: int | None = None  # the end of the run, once ``run`` knows it
        by_host: dict[int, list[int]] = {}
        for vm, h in sorted(transport.host_of().items()):
            by_host.setdefault(h, []).append(vm)
        self.vms_by_host = by_host

    def step(self) -> Epoch:
        t_end = self.now + self.epoch_ns
        direct = getattr(self.transport, "epoch", None)
        if direct is not None:  # hosts merge their own VMs' batches (cluster/ray_runner.py)
            n_ops, reports = direct(t_end, self.until_ns)
        else:
            batches = self.transport.run_epochs(t_end)
            ops = {h: merge([batches[vm] for vm in vms])
                   for h, vms in sorted(self.vms_by_host.items())}
            reports = self.transport.host_apply(ops, self.now)
            self.transport.deliver(reports)
            n_ops = sum(int(o.size) for o in ops.values())
        ep = Epoch(self.index, t_end, n_ops, reports)
        self.now = t_end
        self.index += 1
        return ep

    def run(self, until_ns: int, on_epoch: Callable[[Epoch], None] | None = None) -> None:
        self.until_ns = until_ns
        while self.now < until_ns:
            ep = self.step()
            if on_epoch is not None:
                on_epoch(ep)
