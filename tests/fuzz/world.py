"""Seeded fuzz worlds: one host with 2-4 VMs in shadow, nested, pass-through or mixed modes.

A world is built exactly as the runner builds a run (cluster/runner.py build): a HostServer,
one VmAgent per VM whose workload creates its devices, and each agent's VmSetup sent to the
host through the control-message encoding (host_iommu/protocol.py pack/unpack). Operation
batches cross the wire encoding too (pack_ops/unpack_ops) and reach the host through
``HostServer.apply_epoch``, each VM's batch stamped with the sending VM, as a transport knows
who sent it. Nothing here judges anything; tests/fuzz/checker.py does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from host_iommu import protocol
from host_iommu.costs import CostModel
from host_iommu.iommu import IommuParams
from host_iommu.protocol import (
    OP_DTYPE,
    EpochReport,
    merge,
    pack,
    pack_ops,
    unpack,
    unpack_ops,
)
from host_iommu.server import HostServer
from vm_agent.agent import VmAgent
from workloads.base import Device, GuestContext, Workload

MODES = ("shadow", "nested", "passthrough")
KINDS = ("shadow", "nested", "passthrough", "mixed")
VM_MEMORY_MIB = 4          # small VMs: frames are freed and reused often
HOST_MEMORY_MIB = 48


class FuzzDevices(Workload):
    """A workload that only creates devices: the fuzzer drives the DMA API itself."""

    kind = "fuzz"

    @dataclass(frozen=True)
    class Params:
        devices: int = 1
        rogue_fraction: float = 0.0

    def start(self, ctx: GuestContext) -> None:
        for i in range(self.params.devices):
            ctx.add_device(f"fuzz{i}")


@dataclass(frozen=True)
class VmSpec:
    vm: int
    mode: str
    policy: str = "strict"       # "lazy" only matters for nested
    ats: bool = False
    devices: int = 1
    fl_levels: int = 4
    memory_mib: int = VM_MEMORY_MIB


@dataclass(frozen=True)
class WorldSpec:
    """Everything a world is built from; a world is a pure function of its spec."""

    seed: int
    vms: tuple[VmSpec, ...]
    host: dict[str, int] = field(default_factory=dict)  # IommuParams overrides

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "vms": [asdict(v) for v in self.vms], "host": self.host}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WorldSpec:
        return cls(int(d["seed"]), tuple(VmSpec(**v) for v in d["vms"]), dict(d["host"]))


def random_spec(rng: np.random.Generator, seed: int) -> WorldSpec:
    """2-4 VMs; all shadow, all nested, all pass-through or mixed; ATS on some VMs."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    n = int(rng.integers(2, 5))
    vms = []
    for i in range(n):
        mode = MODES[int(rng.integers(3))] if kind == "mixed" else kind
        vms.append(VmSpec(
            vm=i + 1, mode=mode,
            policy="lazy" if mode == "nested" and rng.random() < 0.3 else "strict",
            ats=bool(rng.random() < 0.4), devices=int(rng.integers(1, 3)),
            fl_levels=5 if rng.random() < 0.2 else 4))
    host = {
        "memory_mib": HOST_MEMORY_MIB,
        "iotlb_entries": int(rng.choice([16, 64, 256])),
        "iotlb_ways": 4,
        "pwc_entries": int(rng.choice([8, 32])),
        "pwc_ways": 4,
        "devtlb_entries": int(rng.choice([8, 32])),
        "devtlb_ways": 4,
        "pasid_cache_entries": int(rng.choice([8, 64])),
        "context_cache_entries": int(rng.choice([8, 64])),
        "fault_records": int(rng.choice([8, 256])),
        "qi_entries": int(rng.choice([128, 256])),
        "sl_page_order": 1 if rng.random() < 0.15 else 0,
    }
    return WorldSpec(seed, tuple(vms), host)


def protocol_refusal(exc: BaseException) -> bool:
    """What the protocol boundary may raise on a malformed frame or batch: ProtocolError
    (or, for a protocol module that has none yet, a plain ValueError of its own)."""
    perr = getattr(protocol, "ProtocolError", None)
    if perr is not None:
        return isinstance(exc, perr)
    return type(exc) is ValueError


class World:
    """A host and its VMs, plus what the fuzzer knows it did (mappings, buffers, tables)."""

    def __init__(self, spec: WorldSpec) -> None:
        self.spec = spec
        self.server = HostServer(IommuParams(**spec.host), CostModel())
        self.agents: dict[int, VmAgent] = {}
        self.devices: dict[int, list[Device]] = {}
        self.now = 1_000_000
        for v in spec.vms:
            agent = VmAgent(v.vm, mode=v.mode, policy=v.policy, flush_queue="percpu", vcpus=2,
                            memory_bytes=v.memory_mib << 20, fl_levels=v.fl_levels, ats=v.ats,
                            workload=FuzzDevices(FuzzDevices.Params(v.devices)), churn=None,
                            costs=self.server.costs, seed=spec.seed)
            setup = unpack(pack(agent.setup()))
            self.server.setup_vm(setup)
            self.agents[v.vm] = agent
            self.devices[v.vm] = list(agent.devices)
        self.mode = {v.vm: v.mode for v in spec.vms}
        self.sid_owner = {d.sid: vm for vm, devs in self.devices.items() for d in devs}
        # The fuzzer's own record of live DMA API mappings: vm -> (sid, first IOVA) ->
        # (pages, ((buffer GPA, pages), ...)); each device has its own IOVA space, so two
        # devices may map the same IOVA.
        self.mappings: dict[int, dict[tuple[int, int], tuple[int, tuple]]] = {
            v: {} for v in self.agents}
        # Extra IOVAs/PASIDs worth aiming DMAs at (hostile table entries, binds).
        self.targets: dict[int, list[int]] = {v: [] for v in self.agents}
        self.pasids: dict[int, list[int]] = {v: [0] for v in self.agents}
        self.recent_unmaps: dict[int, list[tuple[int, int, int]]] = {v: [] for v in self.agents}
        # Every translation the host performs, as (sid, pasid, addr, access, t_ns, result,
        # backer, owner, kind): the checker judges what the IOMMU returned, not what the
        # server concluded. backer/owner/kind describe the frame each translation reached at
        # the moment it was made (a later operation of the same batch may free it): the VM
        # whose memory map the frame backed (-1: none), the allocator's owner, its kind.
        self.seen: list[tuple[np.ndarray, ...]] = []
        iommu = self.server.iommu
        translate = iommu.translate

        def spy(sid, pasid, addr, access, t_ns=None):
            res = translate(sid, pasid, addr, access, t_ns)
            n = np.asarray(sid).size
            t = np.zeros(n, np.int64) if t_ns is None else np.asarray(t_ns, np.int64)
            self.seen.append((np.array(sid, np.int64), np.array(pasid, np.int64),
                              np.array(addr, np.uint64), np.array(access, np.int64),
                              np.broadcast_to(t, (n,)).copy(), res.copy(),
                              *self._frames(res["hpa"])))
            return res

        iommu.translate = spy

    def _frames(self, hpa: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(backer, owner, kind) of the frames at ``hpa`` now; -1 past host memory."""
        mem = self.server.iommu.mem
        backer = np.full(mem.frames + 1, -1, np.int64)
        for vm, v in self.server.iommu.vms.items():
            backer[v.hpa_of[v.hpa_of >= 0]] = vm
        f = (np.asarray(hpa, np.uint64) >> np.uint64(12)).astype(np.int64)
        f = np.where((f >= 0) & (f < mem.frames), f, mem.frames)
        owner = np.append(mem.owner, -2)[f].astype(np.int64)
        kind = np.append(mem.kind, -1)[f].astype(np.int64)
        return backer[f], owner, kind

    @property
    def vms(self) -> list[int]:
        return sorted(self.agents)

    def tick(self, ns: int = 20_000) -> int:
        self.now += ns
        return self.now

    def collect(self, vm: int) -> np.ndarray:
        """Run the VM's due events (lazy flush timers) and take its logged operations."""
        agent = self.agents[vm]
        ops = agent.run_epoch(self.now + 1)
        agent.now = self.now
        return ops

    def apply(self, batches: dict[int, np.ndarray], wire: bool = True
              ) -> tuple[dict[int, EpochReport], dict[int, str]]:
        """Send each VM's batch, merge, apply on the host, deliver the reports.

        ``wire``: through pack_ops/unpack_ops (the in-process transport's path), where a
        malformed batch is refused whole (ProtocolError); otherwise the arrays go straight to
        the host, as a transport that ships numpy columns would. Returns (reports, refusals).
        """
        sent, refused = [], {}
        for vm in sorted(batches):
            ops = np.asarray(batches[vm], dtype=OP_DTYPE).copy()
            ops["vm"] = vm
            if wire:
                try:
                    ops = unpack_ops(pack_ops(ops))
                except Exception as exc:
                    if not protocol_refusal(exc):
                        raise
                    refused[vm] = str(exc)
                    continue
            sent.append(ops)
        merged = merge(sent)
        if merged.size:
            self.now = max(self.now, min(int(merged["t_ns"].max()), self.now + 10**9))
        reports = self.server.apply_epoch(merged)
        for vm, rep in reports.items():   # host -> guest: not what a hostile guest controls
            if vm in self.agents:
                self.agents[vm].receive(rep)
        return reports, refused
