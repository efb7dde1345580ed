"""Several devices in one guest: one workload per device, sharing the guest's vCPUs and memory.

As a Linux guest with two NICs, or a NIC and an NVMe drive, runs one driver per PCI function
(each with its own DMA domain under the vIOMMU) on the same CPUs: ``[[vm.<group>.workload]]``
lists them, and each part creates its own devices. The parts share the guest's clock, vCPUs,
random stream and counters; a second device of the same name is numbered on ("nic0", "nic1").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from workloads.base import Device, GuestContext, Workload


class _NamedContext:
    """The guest as one part sees it: device names made unique across the parts."""

    def __init__(self, ctx: GuestContext, taken: set[str]) -> None:
        self._ctx = ctx
        self._taken = taken

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._ctx, name)
        if inspect.ismethod(value):    # the guest's methods: found once, then called directly
            self.__dict__[name] = value
        return value

    def add_device(self, name: str, ats: bool = False) -> Device:
        base, k = name.rstrip("0123456789") or name, 0
        unique = name
        while unique in self._taken:
            unique = f"{base}{k}"
            k += 1
        self._taken.add(unique)
        return self._ctx.add_device(unique, ats)


class MultiWorkload(Workload):
    """The parts of a ``[[vm.<group>.workload]]`` list, started in list order."""

    kind = "multi"
    # kind -> workload class, set by the package (workloads.WORKLOADS)
    registry: ClassVar[Mapping[str, type[Workload]]] = {}

    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0     # unused: each part has its own
        parts: tuple[Any, ...] = ()     # WorkloadConfig-like: .kind and .params

        def validate(self) -> list[tuple[str, str]]:
            reg = MultiWorkload.registry
            if not self.parts:
                return [("parts", "a list of workloads needs at least one")]
            errors = []
            for i, part in enumerate(self.parts):
                kind = getattr(part, "kind", None)
                cls = reg.get(kind) if isinstance(kind, str) else None
                if cls is None or cls is MultiWorkload \
                        or not isinstance(getattr(part, "params", None), cls.Params):
                    errors.append((f"parts.{i}", "not a workload: list the devices as "
                                   "[[vm.<group>.workload]] tables"))
            return errors

    def __init__(self, params: MultiWorkload.Params | None = None,
                 make: Callable[[str, Any], Workload] | None = None) -> None:
        super().__init__(params if params is not None else self.Params())
        make = make or (lambda kind, p: self.registry[kind](p))
        self.parts = [make(p.kind, p.params) for p in self.params.parts]

    def start(self, ctx: GuestContext) -> None:
        taken: set[str] = set()
        for part in self.parts:
            part.start(_NamedContext(ctx, taken))

    def summary_counters(self) -> dict[str, int]:
        """The parts' counts, summed (workload summary columns are counts)."""
        sums: dict[str, int] = {}
        for part in self.parts:
            for k, v in part.summary_counters().items():
                sums[k] = sums.get(k, 0) + v
        return sums
