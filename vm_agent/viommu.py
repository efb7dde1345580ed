"""The guest-visible vIOMMU: its invalidation queue registers, queue errors and caching mode.

Models what QEMU's intel-iommu device shows a guest (hw/i386/intel_iommu.c): Caching Mode
(CAP.CM, VT-d spec 6.1) under shadowing, scalable mode with first-level support under nesting.
The guest driver writes descriptors and moves the queue tail (Linux dmar.c qi_submit_sync); the
tail write is an MMIO access that traps to the VMM (a VM exit) in both vIOMMU modes. The vIOMMU
decodes each descriptor as the hardware would (host_iommu.qi.decode_words); the driver may write
a descriptor as its four words (qi.Words, plain ints) or as a DESC_DTYPE record.

Queue states (VT-d spec 6.5.2.10, 11.4.9.9 FSTS.IQE):

    fetching -> (malformed descriptor) IQE -> (software clears FSTS.IQE) fetching

A malformed descriptor sets IQE and stops fetching with the head on it: it and everything
written after it stay queued, and tail writes fetch nothing while IQE is set (QEMU
vtd_handle_iqt_write skips vtd_fetch_inv_desc under IQE). Software clears IQE after replacing
the bad descriptor, as Linux's qi_check_fault copies its wait descriptor over it; fetching then
resumes from the head at once, as the hardware does (QEMU defers the rest to the next tail
write), so no queued invalidation is ever lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from host_iommu import qi

_DECODED_MAX = 4096   # word descriptors one vIOMMU keeps decoded


@dataclass
class VIommu:
    """One guest's vIOMMU: caching mode, QI registers, descriptor and error counters.

    ``queued`` holds what was written but not fetched: empty while fetching, the faulting
    descriptor and everything after it while ``iqe`` is set (``iqe_error`` says why).
    """

    caching_mode: bool
    iqe: bool = False
    iqe_error: qi.DescError | None = None
    tail_writes: int = 0
    fsts_writes: int = 0
    descriptors: int = 0
    errors: int = 0               # queue errors raised (IQE set)
    counts: dict[str, int] = field(default_factory=dict)
    queued: list[np.void | qi.Words] = field(default_factory=list)

    # Well-formed word descriptors already decoded: words -> (command, type name). Decoding
    # is a pure function of the words (qi.decode_words), so a hit is what decoding gives.
    _decoded: dict = field(default_factory=dict, repr=False, compare=False)

    def submit(self, descs: list[np.void | qi.Words]) -> list[qi.InvCommand]:
        """Guest writes descriptors and the tail; returns what the VMM must emulate now."""
        self.tail_writes += 1
        if self.iqe or self.queued:
            self.queued.extend(descs)
            return [] if self.iqe else self._fetch()
        # Fetching with nothing queued (the guest's own submissions): ``_fetch`` over
        # ``descs`` without queueing them first; a malformed one and all after it stay queued.
        out: list[qi.InvCommand] = []
        counts = self.counts
        decoded = self._decoded
        for d in descs:
            hit = decoded.get(d) if type(d) is tuple else None
            if hit is None:
                cmd = qi.decode_words(*d) if type(d) is tuple else qi.decode(d)
                if isinstance(cmd, qi.DescError):
                    self.iqe, self.iqe_error = True, cmd
                    self.errors += 1
                    self.queued.extend(descs[len(out):])
                    return out
                hit = (cmd, cmd.name)
                if type(d) is tuple:
                    if len(decoded) >= _DECODED_MAX:
                        decoded.clear()
                    decoded[d] = hit
            cmd, name = hit
            self.descriptors += 1
            counts[name] = counts.get(name, 0) + 1
            out.append(cmd)
        return out

    def clear_iqe(self, replacement: np.void | qi.Words | None = None
                  ) -> list[qi.InvCommand]:
        """Guest writes 1 to FSTS.IQE after putting ``replacement`` over the bad descriptor
        (None drops it); returns the commands fetched on resuming (the VMM emulates them)."""
        self.fsts_writes += 1
        if not self.iqe:
            return []
        self.iqe, self.iqe_error = False, None
        if replacement is None:
            self.queued.pop(0)
        else:
            self.queued[0] = replacement
        return self._fetch()

    def _fetch(self) -> list[qi.InvCommand]:
        """Fetch from the head until the queue is empty or a descriptor is malformed."""
        out: list[qi.InvCommand] = []
        fetched = 0
        counts = self.counts
        for d in self.queued:
            # Words decode as the record holding them would (qi.decode reads a record's
            # words and calls decode_words; the encoders keep each word in 0..2^64-1).
            cmd = qi.decode_words(*d) if type(d) is tuple else qi.decode(d)
            if isinstance(cmd, qi.DescError):
                self.iqe, self.iqe_error = True, cmd
                self.errors += 1
                break
            fetched += 1
            self.descriptors += 1
            name = cmd.name
            counts[name] = counts.get(name, 0) + 1
            out.append(cmd)
        del self.queued[:fetched]
        return out
