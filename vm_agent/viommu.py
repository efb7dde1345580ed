"""The guest-visible vIOMMU: its invalidation queue registers and caching mode.

Models what QEMU's intel-iommu device shows a guest (hw/i386/intel_iommu.c): Caching Mode
(CAP.CM, VT-d spec 6.1) under shadowing, scalable mode with first-level support under nesting.
The guest driver writes descriptors and moves the queue tail (Linux dmar.c qi_submit_sync); the
tail write is an MMIO access that traps to the VMM (a VM exit) in both vIOMMU modes. The vIOMMU
decodes each descriptor as the hardware would (host_iommu.qi.decode): a malformed one sets
IQE and stops the queue instead of reaching the VMM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from host_iommu import qi


@dataclass
class VIommu:
    """One guest's vIOMMU: caching mode, QI registers, descriptor counters."""

    caching_mode: bool
    iqe: bool = False
    tail_writes: int = 0
    descriptors: int = 0
    errors: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def submit(self, descs: list[np.void]) -> list[qi.InvCommand]:
        """Guest writes descriptors and the tail; returns what the VMM must emulate."""
        self.tail_writes += 1
        out: list[qi.InvCommand] = []
        if self.iqe:
            self.errors += 1
            return out
        for d in descs:
            cmd = qi.decode(d)
            if isinstance(cmd, qi.DescError):
                self.iqe = True
                self.errors += 1
                break
            self.descriptors += 1
            self.counts[cmd.name] = self.counts.get(cmd.name, 0) + 1
            out.append(cmd)
        return out

    def clear_iqe(self) -> None:
        self.iqe = False
