"""A multi-queue NIC and its driver: RX/TX descriptor rings, per-packet map/unmap, NAPI.

Follows the shape of Linux's ixgbe/mlx5 drivers (a q_vector per queue pair, one MSI-X
interrupt per queue, interrupt moderation, napi_poll with a budget, RX buffer refill) and the
10 Gb/s NIC setup of Amit et al., "vIOMMU: Efficient IOMMU Emulation", USENIX ATC 2011.

Per queue ``q`` (driven by vCPU ``q % vcpus``):

- RX: ``rx_ring`` buffers of ``buffer_bytes`` are allocated and mapped DMA_FROM_DEVICE at
  start. Packets arrive as a Poisson process; the device reads the next RX descriptor
  (16 B), writes the packet into the posted buffer and writes the descriptor back (16 B). With
  no buffer posted the packet is dropped (``rx_drops``).
- Interrupt moderation: the queue's interrupt fires ``irq_coalesce_us`` after the first event
  (RX packet or TX completion) that finds the queue idle. The interrupt schedules NAPI; a poll
  cleans all TX completions, then handles up to ``napi_budget`` RX packets (unmap,
  ``cpu_per_packet_ns`` of stack work, io_done, refill with a fresh buffer, free the old one).
  A full budget reschedules the poll at once (interrupts stay masked); otherwise NAPI completes.
- TX: packets are generated at ``offered_gbps * (1 - rx_fraction)``; the vCPU allocates and
  maps the packet (DMA_TO_DEVICE) and writes a TX descriptor; the device, serialised at
  ``line_gbps``, reads the descriptor and the packet and writes the completion back. A full
  TX ring drops the packet at the qdisc (``tx_drops``).
- Request/response (``request_response``, netperf TCP_RR style): each queue carries one
  closed-loop flow. A request arrives (RX), NAPI hands it to the stack and the application
  answers at once with one response (TX); the peer sends the next request
  ``peer_turnaround_us`` after the response left the port (both wire hops plus the peer's
  stack). One round trip is one RX and one TX packet (two map/unmap pairs) and one I/O whose
  latency is the round-trip time the peer sees: request in to response out, plus the peer's
  turnaround. ``offered_gbps`` and ``rx_fraction`` do not apply.

- PASID-tagged queues (``pasid_queues = N``): queue ``q < N`` tags its DMAs with PASID
  ``q + 1`` and maps its rings and buffers in that PASID's own domain (a first-level table
  per PASID over the VM's one second level), as a driver with PASID-tagged queues attaches a
  domain per PASID (iommu_attach_device_pasid). A PASID-selective invalidation of one queue
  leaves the others' cached translations alone. Needs the nested (scalable-mode first
  level) vIOMMU; the config refuses it in shadow and pass-through mode.

State is bounded by the ring sizes: at most ``rx_ring + tx_ring`` buffers mapped per queue.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE, Device, GuestContext, Workload

DESC_BYTES = 16          # one RX/TX descriptor (ixgbe advanced descriptors: 16 bytes)
MIN_FRAME_BYTES = 60     # Ethernet minimum frame without FCS
MAX_FRAME_BYTES = 65536  # TSO/jumbo upper bound accepted here

# Queue interrupt states.
IRQ_IDLE = 0       # interrupts enabled, nothing pending
IRQ_ARMED = 1      # moderation timer running
IRQ_NAPI = 2       # interrupt fired, NAPI polling (interrupts masked)


def check_sizes_weights(sizes: Sequence[int], weights: Sequence[float], sizes_key: str,
                        weights_key: str, lo: int, hi: int) -> list[tuple[str, str]]:
    """Validate a size distribution: non-empty, sizes in [lo, hi], weights >= 0 summing > 0."""
    errors: list[tuple[str, str]] = []
    if len(sizes) == 0:
        errors.append((sizes_key, "must list at least one size"))
    if len(sizes) != len(weights):
        errors.append((weights_key, f"has {len(weights)} weights for {len(sizes)} sizes"))
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or not lo <= s <= hi:
            errors.append((sizes_key, f"size {s!r} is not an integer in [{lo}, {hi}]"))
    for w in weights:
        if not isinstance(w, int | float) or isinstance(w, bool) or not w >= 0.0:
            errors.append((weights_key, f"weight {w!r} is not a number >= 0"))
    if not errors and sum(weights) <= 0.0:
        errors.append((weights_key, "weights sum to zero"))
    return errors


def check_fraction(value: float, key: str) -> list[tuple[str, str]]:
    """A fraction must be a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        return [(key, f"{value!r} is not a fraction in [0, 1]")]
    return []


def check_positive(value: float, key: str, zero_ok: bool = False) -> list[tuple[str, str]]:
    """A size, rate or time must be a number > 0 (or >= 0 when ``zero_ok``)."""
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and (value >= 0 if zero_ok else value > 0))
    if not ok:
        return [(key, f"{value!r} must be {'>= 0' if zero_ok else '> 0'}")]
    return []


def schedule_at(ctx: GuestContext, t_ns: int, fn: Callable[..., None], *args: Any) -> None:
    """Schedule ``fn(ctx, t_ns, *args)`` at ``t_ns`` (``ctx.schedule`` calls ``fn(*args)``)."""
    ctx.schedule(t_ns, fn, ctx, t_ns, *args)


class SizeSampler:
    """Draws sizes by weight with one ``rng.random()`` per draw (deterministic per seed).

    The draw is ``sizes[searchsorted(cdf, u, side="right")]`` (clipped to the last size); it
    runs on plain Python floats and ints (``bisect_right`` finds the same index as numpy's
    searchsorted on the same float64 values), a few times cheaper per draw than numpy on a
    scalar. One size still takes its ``rng.random()``, so the generator's stream is the same.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float]) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        self.cdf = np.cumsum(w) / w.sum()
        self.mean = float((self.sizes * w).sum() / w.sum())
        self._cdf = self.cdf.tolist()
        self._sizes = [int(s) for s in self.sizes] + [int(self.sizes[-1])]  # index n: clip

    def draw(self, rng: np.random.Generator) -> int:
        # i = int(np.searchsorted(self.cdf, rng.random(), side="right"))
        # return int(self.sizes[min(i, len(self.sizes) - 1)])
        return self._sizes[bisect_right(self._cdf, rng.random())]


@dataclass
class _Queue:
    """One RX/TX queue pair and its q_vector."""

    q: int
    cpu: int
    dev: Device | None = None   # the device, or its PASID for a PASID-tagged queue
    rx_ring_iova: int = 0
    tx_ring_iova: int = 0
    rx_posted: deque[tuple[int, int]] = field(default_factory=deque)   # (gpa, iova)
    rx_next_desc: int = 0
    # received, awaiting NAPI: (gpa, iova, nbytes, t_arrive_ns)
    rx_pending: deque[tuple[int, int, int, int]] = field(default_factory=deque)
    tx_next_desc: int = 0
    tx_in_flight: int = 0
    # sent by the device, awaiting clean-up: (gpa, iova, nbytes, t_queued_ns)
    tx_done: deque[tuple[int, int, int, int]] = field(default_factory=deque)
    irq_state: int = IRQ_IDLE
    # request/response: arrival time and size of the request each queued response answers
    rr_requests: deque[tuple[int, int]] = field(default_factory=deque)


class NicWorkload(Workload):
    """A multi-queue 10 GbE NIC with per-packet streaming DMA mappings."""

    kind = "nic"
    SUMMARY_COLUMNS = ("nic_round_trips", "nic_rtt_sum_ns")

    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        queues: int = 0                 # 0: one queue per vCPU
        rx_ring: int = 256              # descriptors per RX ring
        tx_ring: int = 256              # descriptors per TX ring
        packet_sizes: tuple[int, ...] = (1500,)
        packet_weights: tuple[float, ...] = (1.0,)
        rx_fraction: float = 0.5        # share of offered load that is received
        offered_gbps: float = 10.0
        line_gbps: float = 10.0         # TX serialisation rate of the port
        napi_budget: int = 64           # Linux NAPI_POLL_WEIGHT
        irq_coalesce_us: float = 50.0   # ethtool rx-usecs
        cpu_per_packet_ns: int = 400    # network stack work per packet
        buffer_bytes: int = 2048        # RX buffer (ixgbe: 2 KiB half pages)
        packets: int = 0                # packets offered in all (RX + TX); 0: no limit
        request_response: bool = False  # closed-loop ping-pong per queue (netperf TCP_RR)
        peer_turnaround_us: float = 20.0  # response out -> next request in (wire + peer)
        pasid_queues: int = 0           # queues q < N tag their DMAs with PASID q + 1

        def validate(self) -> list[tuple[str, str]]:
            errors = check_fraction(self.rogue_fraction, "rogue_fraction")
            errors += check_fraction(self.rx_fraction, "rx_fraction")
            errors += check_positive(self.queues, "queues", zero_ok=True)
            errors += check_positive(self.packets, "packets", zero_ok=True)
            errors += check_positive(self.pasid_queues, "pasid_queues", zero_ok=True)
            errors += check_positive(self.peer_turnaround_us, "peer_turnaround_us",
                                     zero_ok=True)
            if not isinstance(self.request_response, bool):
                errors.append(("request_response", f"{self.request_response!r} is not a "
                               "boolean"))
            for key in ("rx_ring", "tx_ring", "napi_budget", "buffer_bytes"):
                errors += check_positive(getattr(self, key), key)
            errors += check_positive(self.offered_gbps, "offered_gbps", zero_ok=True)
            errors += check_positive(self.line_gbps, "line_gbps")
            errors += check_positive(self.irq_coalesce_us, "irq_coalesce_us", zero_ok=True)
            errors += check_positive(self.cpu_per_packet_ns, "cpu_per_packet_ns", zero_ok=True)
            errors += check_sizes_weights(self.packet_sizes, self.packet_weights,
                                          "packet_sizes", "packet_weights",
                                          MIN_FRAME_BYTES, MAX_FRAME_BYTES)
            if (not errors and (self.rx_fraction > 0.0 or self.request_response)
                    and max(self.packet_sizes) > self.buffer_bytes):
                errors.append(("packet_sizes", f"packet of {max(self.packet_sizes)} bytes "
                               f"does not fit an RX buffer of {self.buffer_bytes}"))
            return errors

    def __init__(self, params: NicWorkload.Params | None = None) -> None:
        super().__init__(params if params is not None else self.Params())
        self.queues: list[_Queue] = []
        self.dev: Device | None = None
        self.rx_packets = 0
        self.rx_drops = 0
        self.tx_packets = 0
        self.tx_drops = 0
        self.polls = 0
        self.max_poll_packets = 0
        self._busy_until: list[int] = []
        self._tx_wire_free_ns = 0
        self.offered = 0
        self.round_trips = 0
        self.rtt_sum_ns = 0

    def summary_counters(self) -> dict[str, int]:
        """Counts (so a measured window is end minus start): mean RTT = sum / round trips."""
        return {"nic_round_trips": self.round_trips, "nic_rtt_sum_ns": self.rtt_sum_ns}

    def _offer(self) -> bool:
        """Count one offered packet; False once ``packets`` have been offered (stop)."""
        if self.params.packets and self.offered >= self.params.packets:
            return False
        self.offered += 1
        return True

    # --- set-up ------------------------------------------------------------------------
    def start(self, ctx: GuestContext) -> None:
        p = self.params
        self._sizes = SizeSampler(p.packet_sizes, p.packet_weights)
        nq = p.queues or ctx.vcpus
        self.dev = ctx.add_device("nic0")
        self._busy_until = [0] * ctx.vcpus
        mean_bits = self._sizes.mean * 8.0
        # mean gap between packets on one queue: bits per packet / (Gb/s per queue) = ns
        rx_gbps = p.offered_gbps * p.rx_fraction / nq
        tx_gbps = p.offered_gbps * (1.0 - p.rx_fraction) / nq
        self._rx_gap_ns = mean_bits / rx_gbps if rx_gbps > 0 else 0.0
        self._tx_gap_ns = mean_bits / tx_gbps if tx_gbps > 0 else 0.0
        rr = p.request_response
        if rr:
            self._rx_gap_ns = self._tx_gap_ns = 0.0
        for q in range(nq):
            dev = ctx.add_pasid(self.dev, q + 1) if q < p.pasid_queues else self.dev
            qu = _Queue(q=q, cpu=q % ctx.vcpus, dev=dev)
            _, qu.rx_ring_iova = ctx.dma_alloc_coherent(dev, p.rx_ring * DESC_BYTES)
            _, qu.tx_ring_iova = ctx.dma_alloc_coherent(dev, p.tx_ring * DESC_BYTES)
            self.queues.append(qu)
            t = 0
            if p.rx_fraction > 0.0 or rr:
                for _ in range(p.rx_ring):
                    t = self._post_rx_buffer(ctx, qu, t)
            if rr:
                schedule_at(ctx, t + round(p.peer_turnaround_us * 1000.0), self._rx_arrival,
                            q)
            if self._rx_gap_ns > 0:
                schedule_at(ctx, t + self._gap(ctx, self._rx_gap_ns), self._rx_arrival, q)
            if self._tx_gap_ns > 0:
                schedule_at(ctx, t + self._gap(ctx, self._tx_gap_ns), self._tx_generate, q)

    @staticmethod
    def _gap(ctx: GuestContext, mean_ns: float) -> int:
        return max(1, round(float(ctx.rng.exponential(mean_ns))))

    def _cpu_start(self, ctx: GuestContext, cpu: int, t_ns: int) -> int:
        return max(t_ns, ctx.cpu_free_at(cpu), self._busy_until[cpu])

    def _post_rx_buffer(self, ctx: GuestContext, qu: _Queue, t_ns: int) -> int:
        size = self.params.buffer_bytes
        gpa = ctx.alloc_buffer(size)
        iova, t_ns = ctx.dma_map(qu.cpu, qu.dev, gpa, size, DMA_FROM_DEVICE, t_ns)
        qu.rx_posted.append((gpa, iova))
        return t_ns

    # --- RX ----------------------------------------------------------------------------
    def _rx_arrival(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        rr = self.params.request_response
        if not self._offer() or (rr and not self._offer()):    # a round trip: RX and TX
            return
        qu = self.queues[q]
        nbytes = self._sizes.draw(ctx.rng)
        if not rr:
            schedule_at(ctx, t_ns + self._gap(ctx, self._rx_gap_ns), self._rx_arrival, q)
        if not qu.rx_posted:
            self.rx_drops += 1
            return
        gpa, iova = qu.rx_posted.popleft()
        desc = qu.rx_ring_iova + (qu.rx_next_desc % self.params.rx_ring) * DESC_BYTES
        qu.rx_next_desc += 1
        ctx.device_dma(qu.dev, t_ns, desc, DESC_BYTES, False)
        self.device_dma(ctx, qu.dev, t_ns, iova, nbytes, True)
        ctx.device_dma(qu.dev, t_ns, desc, DESC_BYTES, True)
        qu.rx_pending.append((gpa, iova, nbytes, t_ns))
        self._raise_irq(ctx, qu, t_ns)

    # --- interrupts and NAPI -----------------------------------------------------------
    def _raise_irq(self, ctx: GuestContext, qu: _Queue, t_ns: int) -> None:
        if qu.irq_state == IRQ_IDLE:
            qu.irq_state = IRQ_ARMED
            delay_ns = round(self.params.irq_coalesce_us * 1000.0)
            schedule_at(ctx, t_ns + delay_ns, self._irq, qu.q)

    def _irq(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        self.queues[q].irq_state = IRQ_NAPI
        schedule_at(ctx, t_ns, self._napi_poll, q)

    def _napi_poll(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        p = self.params
        qu = self.queues[q]
        cpu = qu.cpu
        t = self._cpu_start(ctx, cpu, t_ns)
        self.polls += 1
        while qu.tx_done:                      # TX clean-up first, as ixgbe_poll does
            gpa, iova, nbytes, t_queued = qu.tx_done.popleft()
            t = ctx.dma_unmap(cpu, qu.dev, iova, nbytes, DMA_TO_DEVICE, t)
            ctx.free_buffer(gpa, nbytes)
            qu.tx_in_flight -= 1
            self.tx_packets += 1
            if not p.request_response:     # a round trip is counted when its response left
                ctx.io_done(t, nbytes, t - t_queued)
        done = 0
        while qu.rx_pending and done < p.napi_budget:
            gpa, iova, nbytes, t_arrive = qu.rx_pending.popleft()
            t = ctx.dma_unmap(cpu, qu.dev, iova, p.buffer_bytes, DMA_FROM_DEVICE, t)
            t += p.cpu_per_packet_ns
            if not p.request_response:     # a round trip is counted when its response left
                ctx.io_done(t, nbytes, t - t_arrive)
            self.rx_packets += 1
            t = self._post_rx_buffer(ctx, qu, t)
            ctx.free_buffer(gpa, p.buffer_bytes)
            done += 1
            if p.request_response:         # the application answers the request at once
                qu.rr_requests.append((t_arrive, nbytes))
                t = self._tx_send(ctx, q, t, self._sizes.draw(ctx.rng))
        self._busy_until[cpu] = max(self._busy_until[cpu], t)
        self.max_poll_packets = max(self.max_poll_packets, done)
        if qu.rx_pending:                      # budget spent: poll again, irqs stay masked
            schedule_at(ctx, t, self._napi_poll, q)
        else:                                  # napi_complete_done: re-enable the interrupt
            qu.irq_state = IRQ_IDLE

    # --- TX ----------------------------------------------------------------------------
    def _tx_generate(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        if not self._offer():
            return
        nbytes = self._sizes.draw(ctx.rng)
        schedule_at(ctx, t_ns + self._gap(ctx, self._tx_gap_ns), self._tx_generate, q)
        self._tx_send(ctx, q, t_ns, nbytes)

    def _tx_send(self, ctx: GuestContext, q: int, t_ns: int, nbytes: int) -> int:
        """Map one packet and post it to the TX ring; the time the vCPU is done."""
        p = self.params
        qu = self.queues[q]
        if qu.tx_in_flight >= p.tx_ring:
            self.tx_drops += 1
            return t_ns
        t = self._cpu_start(ctx, qu.cpu, t_ns)
        gpa = ctx.alloc_buffer(nbytes)
        iova, t = ctx.dma_map(qu.cpu, qu.dev, gpa, nbytes, DMA_TO_DEVICE, t)
        self._busy_until[qu.cpu] = max(self._busy_until[qu.cpu], t)
        desc = qu.tx_ring_iova + (qu.tx_next_desc % p.tx_ring) * DESC_BYTES
        qu.tx_next_desc += 1
        qu.tx_in_flight += 1
        # the doorbell write is at t; the port sends packets one after another at line rate
        t_start = max(t, self._tx_wire_free_ns)
        wire_ns = max(1, round(nbytes * 8 / p.line_gbps))
        self._tx_wire_free_ns = t_start + wire_ns
        schedule_at(ctx, t_start, self._tx_fetch, q, desc, gpa, iova, nbytes, t_ns, wire_ns)
        return t

    def _tx_fetch(self, ctx: GuestContext, t_ns: int, q: int, desc: int, gpa: int, iova: int,
                  nbytes: int, t_queued: int, wire_ns: int) -> None:
        dev = self.queues[q].dev
        ctx.device_dma(dev, t_ns, desc, DESC_BYTES, False)
        self.device_dma(ctx, dev, t_ns, iova, nbytes, False)
        schedule_at(ctx, t_ns + wire_ns, self._tx_complete, q, desc, gpa, iova, nbytes, t_queued)

    def _tx_complete(self, ctx: GuestContext, t_ns: int, q: int, desc: int, gpa: int,
                     iova: int, nbytes: int, t_queued: int) -> None:
        qu = self.queues[q]
        ctx.device_dma(qu.dev, t_ns, desc, DESC_BYTES, True)   # descriptor done write-back
        qu.tx_done.append((gpa, iova, nbytes, t_queued))
        self._raise_irq(ctx, qu, t_ns)
        if self.params.request_response and qu.rr_requests:
            t_request, req_bytes = qu.rr_requests.popleft()
            turnaround_ns = round(self.params.peer_turnaround_us * 1000.0)
            rtt_ns = t_ns - t_request + turnaround_ns
            self.round_trips += 1
            self.rtt_sum_ns += rtt_ns
            ctx.io_done(t_ns, req_bytes + nbytes, rtt_ns)
            schedule_at(ctx, t_ns + turnaround_ns, self._rx_arrival, q)
