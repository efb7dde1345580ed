"""A multi-queue NIC and its driver: RX/TX descriptor rings, per-packet map/unmap, NAPI.

Follows the shape of Linux's ixgbe/mlx5 drivers (a q_vector per queue pair, one MSI-X
interrupt per queue, interrupt moderation, napi_poll with a budget, RX buffer refill) and the
10 Gb/s NIC setup of Amit et al., "vIOMMU: Efficient IOMMU Emulation", USENIX ATC 2011.

Per queue ``q`` (driven by vCPU ``q % vcpus``):

- RX: ``rx_ring`` buffers of ``buffer_bytes`` are allocated and mapped DMA_FROM_DEVICE at
  start. Packets arrive as a Poisson process; the device reads the next RX descriptor
  (16 B), writes the packet into the posted buffer and writes the descriptor back (16 B). With
  no buffer posted the packet is dropped (``rx_drops``). A refilled buffer counts as posted
  from the time its dma_map completed (the poll runs whole when its event is handled, its
  calls stamped at the vCPU's time): a packet arriving before that finds it not yet posted.
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

- vCPU stalls: the NAPI poll and the application's send run on the queue's vCPU; when it is
  busy (or spinning on the host's invalidation queue, GuestContext.stalled_until) past the
  epoch's end they wait for it, while packets keep arriving on the wire (and drop once the
  RX ring has no buffer posted) and sent ones complete on the device's clock. A stalled
  sender generates its next packet once it runs again (no burst of the packets it missed).

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
    # (gpa, iova, t_posted_ns): the device may use a buffer once its map completed
    rx_posted: deque[tuple[int, int, int]] = field(default_factory=deque)
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
        # the hot paths draw inline: SizeSampler.draw's lists, and per-run constants
        self._size_cdf, self._size_of = self._sizes._cdf, self._sizes._sizes
        self._rogue = p.rogue_fraction > 0.0     # else Workload.device_dma draws nothing
        self._irq_delay_ns = round(p.irq_coalesce_us * 1000.0)
        self._turnaround_ns = round(p.peer_turnaround_us * 1000.0)
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
                schedule_at(ctx, t + self._turnaround_ns, self._rx_arrival, q)
            if self._rx_gap_ns > 0:
                schedule_at(ctx, t + self._gap(ctx, self._rx_gap_ns), self._rx_arrival, q)
            if self._tx_gap_ns > 0:
                schedule_at(ctx, t + self._gap(ctx, self._tx_gap_ns), self._tx_generate, q)

    # The per-packet methods below inline ``schedule_at`` (``ctx.schedule(t, fn, ctx, t,
    # ...)``), ``_gap``, ``_offer``, ``_cpu_start``, ``_raise_irq``, ``_post_rx_buffer`` and
    # ``SizeSampler.draw``, and call ``ctx.device_dma`` directly when ``rogue_fraction`` is 0
    # (``Workload.device_dma`` then draws nothing): the same calls on the guest, the same
    # random draws in the same order, the same event times and scheduling order, with fewer
    # Python calls per packet. tests/workloads/test_nic_nvme_inlined.py checks them against
    # the plain versions (tests/workloads/nic_nvme_plain.py).

    @staticmethod
    def _gap(ctx: GuestContext, mean_ns: float) -> int:
        return max(1, round(float(ctx.rng.exponential(mean_ns))))

    def _cpu_start(self, ctx: GuestContext, cpu: int, t_ns: int) -> int:
        return max(t_ns, ctx.cpu_free_at(cpu), self._busy_until[cpu])

    def _post_rx_buffer(self, ctx: GuestContext, qu: _Queue, t_ns: int) -> int:
        size = self.params.buffer_bytes
        gpa = ctx.alloc_buffer(size)
        iova, t_ns = ctx.dma_map(qu.cpu, qu.dev, gpa, size, DMA_FROM_DEVICE, t_ns)
        qu.rx_posted.append((gpa, iova, t_ns))
        return t_ns

    # --- RX ----------------------------------------------------------------------------
    def _rx_arrival(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        p = self.params
        rr = p.request_response
        limit = p.packets                      # _offer, once (twice for a round trip)
        if limit and self.offered >= limit:
            return
        self.offered += 1
        if rr:
            if limit and self.offered >= limit:
                return
            self.offered += 1
        qu = self.queues[q]
        rng = ctx.rng
        nbytes = self._size_of[bisect_right(self._size_cdf, rng.random())]
        if not rr:
            t_next = t_ns + max(1, round(rng.exponential(self._rx_gap_ns)))
            ctx.schedule(t_next, self._rx_arrival, ctx, t_next, q)
        if not qu.rx_posted or qu.rx_posted[0][2] > t_ns:   # none posted by now
            self.rx_drops += 1
            return
        gpa, iova, _t_posted = qu.rx_posted.popleft()
        desc = qu.rx_ring_iova + (qu.rx_next_desc % p.rx_ring) * DESC_BYTES
        qu.rx_next_desc += 1
        dev = qu.dev
        device_dma = ctx.device_dma
        device_dma(dev, t_ns, desc, DESC_BYTES, False)
        if self._rogue:
            self.device_dma(ctx, dev, t_ns, iova, nbytes, True)
        else:
            device_dma(dev, t_ns, iova, nbytes, True)
        device_dma(dev, t_ns, desc, DESC_BYTES, True)
        qu.rx_pending.append((gpa, iova, nbytes, t_ns))
        if qu.irq_state == IRQ_IDLE:           # _raise_irq
            qu.irq_state = IRQ_ARMED
            t_irq = t_ns + self._irq_delay_ns
            ctx.schedule(t_irq, self._irq, ctx, t_irq, q)

    # --- interrupts and NAPI -----------------------------------------------------------
    def _raise_irq(self, ctx: GuestContext, qu: _Queue, t_ns: int) -> None:
        if qu.irq_state == IRQ_IDLE:
            qu.irq_state = IRQ_ARMED
            t_irq = t_ns + self._irq_delay_ns
            ctx.schedule(t_irq, self._irq, ctx, t_irq, qu.q)

    def _irq(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        self.queues[q].irq_state = IRQ_NAPI
        ctx.schedule(t_ns, self._napi_poll, ctx, t_ns, q)

    def _napi_poll(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        p = self.params
        qu = self.queues[q]
        cpu = qu.cpu
        dev = qu.dev
        busy_until = self._busy_until
        late = ctx.stalled_until(cpu, max(t_ns, busy_until[cpu]))
        if late:                               # the vCPU cannot start it in this epoch
            ctx.schedule(late, self._napi_poll, ctx, late, q)
            return
        t = max(t_ns, ctx.cpu_free_at(cpu), busy_until[cpu])
        self.polls += 1
        rr = p.request_response
        dma_unmap, free_buffer, io_done = ctx.dma_unmap, ctx.free_buffer, ctx.io_done
        tx_done = qu.tx_done
        while tx_done:                         # TX clean-up first, as ixgbe_poll does
            gpa, iova, nbytes, t_queued = tx_done.popleft()
            t = dma_unmap(cpu, dev, iova, nbytes, DMA_TO_DEVICE, t)
            free_buffer(gpa, nbytes)
            qu.tx_in_flight -= 1
            self.tx_packets += 1
            if not rr:                         # a round trip is counted when its response left
                io_done(t, nbytes, t - t_queued)
        done = 0
        rx_pending = qu.rx_pending
        if rx_pending:
            budget = p.napi_budget
            size = p.buffer_bytes
            stack_ns = p.cpu_per_packet_ns
            alloc_buffer, dma_map, posted = ctx.alloc_buffer, ctx.dma_map, qu.rx_posted
            while rx_pending and done < budget:
                gpa, iova, nbytes, t_arrive = rx_pending.popleft()
                t = dma_unmap(cpu, dev, iova, size, DMA_FROM_DEVICE, t)
                t += stack_ns
                if not rr:                     # a round trip is counted when its response left
                    io_done(t, nbytes, t - t_arrive)
                self.rx_packets += 1
                new_gpa = alloc_buffer(size)   # _post_rx_buffer: refill the ring
                new_iova, t = dma_map(cpu, dev, new_gpa, size, DMA_FROM_DEVICE, t)
                posted.append((new_gpa, new_iova, t))
                free_buffer(gpa, size)
                done += 1
                if rr:                         # the application answers the request at once
                    qu.rr_requests.append((t_arrive, nbytes))
                    t = self._tx_send(ctx, q, t, self._size_of[
                        bisect_right(self._size_cdf, ctx.rng.random())])
        if t > busy_until[cpu]:
            busy_until[cpu] = t
        if done > self.max_poll_packets:
            self.max_poll_packets = done
        if rx_pending:                         # budget spent: poll again, irqs stay masked
            ctx.schedule(t, self._napi_poll, ctx, t, q)
        else:                                  # napi_complete_done: re-enable the interrupt
            qu.irq_state = IRQ_IDLE

    # --- TX ----------------------------------------------------------------------------
    def _tx_generate(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        cpu = self.queues[q].cpu               # the application sends on the queue's vCPU
        late = ctx.stalled_until(cpu, max(t_ns, self._busy_until[cpu]))
        if late:                               # stalled: it generates once it runs again
            ctx.schedule(late, self._tx_generate, ctx, late, q)
            return
        limit = self.params.packets            # _offer
        if limit and self.offered >= limit:
            return
        self.offered += 1
        rng = ctx.rng
        nbytes = self._size_of[bisect_right(self._size_cdf, rng.random())]
        t_next = t_ns + max(1, round(rng.exponential(self._tx_gap_ns)))
        ctx.schedule(t_next, self._tx_generate, ctx, t_next, q)
        self._tx_send(ctx, q, t_ns, nbytes)

    def _tx_send(self, ctx: GuestContext, q: int, t_ns: int, nbytes: int) -> int:
        """Map one packet and post it to the TX ring; the time the vCPU is done."""
        p = self.params
        qu = self.queues[q]
        if qu.tx_in_flight >= p.tx_ring:
            self.tx_drops += 1
            return t_ns
        cpu = qu.cpu
        busy_until = self._busy_until
        t = max(t_ns, ctx.cpu_free_at(cpu), busy_until[cpu])
        gpa = ctx.alloc_buffer(nbytes)
        iova, t = ctx.dma_map(cpu, qu.dev, gpa, nbytes, DMA_TO_DEVICE, t)
        if t > busy_until[cpu]:
            busy_until[cpu] = t
        desc = qu.tx_ring_iova + (qu.tx_next_desc % p.tx_ring) * DESC_BYTES
        qu.tx_next_desc += 1
        qu.tx_in_flight += 1
        # the doorbell write is at t; the port sends packets one after another at line rate
        t_start = max(t, self._tx_wire_free_ns)
        wire_ns = max(1, round(nbytes * 8 / p.line_gbps))
        self._tx_wire_free_ns = t_start + wire_ns
        ctx.schedule(t_start, self._tx_fetch, ctx, t_start, q, desc, gpa, iova, nbytes, t_ns,
                     wire_ns)
        return t

    def _tx_fetch(self, ctx: GuestContext, t_ns: int, q: int, desc: int, gpa: int, iova: int,
                  nbytes: int, t_queued: int, wire_ns: int) -> None:
        dev = self.queues[q].dev
        ctx.device_dma(dev, t_ns, desc, DESC_BYTES, False)
        if self._rogue:
            self.device_dma(ctx, dev, t_ns, iova, nbytes, False)
        else:
            ctx.device_dma(dev, t_ns, iova, nbytes, False)
        t_done = t_ns + wire_ns
        ctx.schedule(t_done, self._tx_complete, ctx, t_done, q, desc, gpa, iova, nbytes,
                     t_queued)

    def _tx_complete(self, ctx: GuestContext, t_ns: int, q: int, desc: int, gpa: int,
                     iova: int, nbytes: int, t_queued: int) -> None:
        qu = self.queues[q]
        ctx.device_dma(qu.dev, t_ns, desc, DESC_BYTES, True)   # descriptor done write-back
        qu.tx_done.append((gpa, iova, nbytes, t_queued))
        if qu.irq_state == IRQ_IDLE:           # _raise_irq
            qu.irq_state = IRQ_ARMED
            t_irq = t_ns + self._irq_delay_ns
            ctx.schedule(t_irq, self._irq, ctx, t_irq, q)
        if self.params.request_response and qu.rr_requests:
            t_request, req_bytes = qu.rr_requests.popleft()
            turnaround_ns = self._turnaround_ns
            rtt_ns = t_ns - t_request + turnaround_ns
            self.round_trips += 1
            self.rtt_sum_ns += rtt_ns
            ctx.io_done(t_ns, req_bytes + nbytes, rtt_ns)
            t_next = t_ns + turnaround_ns
            ctx.schedule(t_next, self._rx_arrival, ctx, t_next, q)
