"""The epoch engine: advances every VM and the host through epochs of virtual time.

A run is a sequence of epochs [t, t + epoch). In each, every VM (in sorted id order) runs its
events and returns its operations; the host applies all of them merged by (t_ns, vm, seq)
(host_iommu/protocol.py merge) and answers each VM with a report. Nothing depends on the order
in which VMs answer: the merge key is in the data. The transport is what differs between
back-ends: ``InProcTransport`` calls the objects directly (round-tripping batches through
their wire encoding, so tests exercise the protocol); the Ray back-end calls actors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from host_iommu.protocol import EpochReport, merge, pack, pack_ops, unpack, unpack_ops
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent


class Transport(Protocol):
    def vm_ids(self) -> list[int]: ...
    def run_epochs(self, t_end_ns: int) -> dict[int, np.ndarray]: ...
    def host_apply(self, ops: np.ndarray) -> dict[int, EpochReport]: ...
    def deliver(self, reports: dict[int, EpochReport]) -> None: ...


class InProcTransport:
    """Everything in one process; batches still cross the wire encoding."""

    def __init__(self, host: HostServer, agents: Sequence[VmAgent]) -> None:
        self.host = host
        self.agents = {a.vm: a for a in agents}

    def vm_ids(self) -> list[int]:
        return sorted(self.agents)

    def run_epochs(self, t_end_ns: int) -> dict[int, np.ndarray]:
        return {vm: unpack_ops(pack_ops(self.agents[vm].run_epoch(t_end_ns)))
                for vm in self.vm_ids()}

    def host_apply(self, ops: np.ndarray) -> dict[int, EpochReport]:
        return self.host.apply_epoch(ops)

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

    def step(self) -> Epoch:
        t_end = self.now + self.epoch_ns
        batches = self.transport.run_epochs(t_end)
        ops = merge([batches[vm] for vm in sorted(batches)])
        reports = self.transport.host_apply(ops)
        self.transport.deliver(reports)
        ep = Epoch(self.index, t_end, int(ops.size), reports)
        self.now = t_end
        self.index += 1
        return ep

    def run(self, until_ns: int, on_epoch: Callable[[Epoch], None] | None = None) -> None:
        while self.now < until_ns:
            ep = self.step()
            if on_epoch is not None:
                on_epoch(ep)
