"""The NIC and NVMe workloads' per-packet and per-command methods as they were written
before the hot paths were inlined (one call per step: ``schedule_at``, ``_gap``, ``_offer``,
``_raise_irq``, ``SizeSampler.draw``, ``Workload.device_dma``). The reference model for
test_nic_nvme_inlined.py: the inlined methods must make the same guest calls, random draws
and events, in the same order, at the same times.
"""

from __future__ import annotations

from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE, GuestContext
from workloads.nic import (
    DESC_BYTES,
    IRQ_ARMED,
    IRQ_IDLE,
    IRQ_NAPI,
    NicWorkload,
    SizeSampler,
    schedule_at,
)
from workloads.nic import _Queue as _NicQueue
from workloads.nvme import (
    CQE_BYTES,
    PAGE_SHIFT,
    PAGE_SIZE,
    PRP_ENTRY_BYTES,
    SQE_BYTES,
    NvmeWorkload,
    _Command,
    prp_layout,
    scattered_segments,
)
from workloads.nvme import _Queue as _NvmeQueue


class PlainNic(NicWorkload):
    """NicWorkload with its methods as first written."""

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
            qu = _NicQueue(q=q, cpu=q % ctx.vcpus, dev=dev)
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

    def _post_rx_buffer(self, ctx: GuestContext, qu: _NicQueue, t_ns: int) -> int:
        size = self.params.buffer_bytes
        gpa = ctx.alloc_buffer(size)
        iova, t_ns = ctx.dma_map(qu.cpu, qu.dev, gpa, size, DMA_FROM_DEVICE, t_ns)
        qu.rx_posted.append((gpa, iova, t_ns))
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
        if not qu.rx_posted or qu.rx_posted[0][2] > t_ns:
            self.rx_drops += 1
            return
        gpa, iova, _t_posted = qu.rx_posted.popleft()
        desc = qu.rx_ring_iova + (qu.rx_next_desc % self.params.rx_ring) * DESC_BYTES
        qu.rx_next_desc += 1
        ctx.device_dma(qu.dev, t_ns, desc, DESC_BYTES, False)
        self.device_dma(ctx, qu.dev, t_ns, iova, nbytes, True)
        ctx.device_dma(qu.dev, t_ns, desc, DESC_BYTES, True)
        qu.rx_pending.append((gpa, iova, nbytes, t_ns))
        self._raise_irq(ctx, qu, t_ns)

    # --- interrupts and NAPI -----------------------------------------------------------
    def _raise_irq(self, ctx: GuestContext, qu: _NicQueue, t_ns: int) -> None:
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
        late = ctx.stalled_until(cpu, max(t_ns, self._busy_until[cpu]))
        if late:
            schedule_at(ctx, late, self._napi_poll, q)
            return
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
        cpu = self.queues[q].cpu
        late = ctx.stalled_until(cpu, max(t_ns, self._busy_until[cpu]))
        if late:
            schedule_at(ctx, late, self._tx_generate, q)
            return
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


class PlainNvme(NvmeWorkload):
    """NvmeWorkload with its methods as first written."""

    def start(self, ctx: GuestContext) -> None:
        p = self.params
        self._sizes = SizeSampler(p.io_sizes, p.io_weights)
        self.dev = ctx.add_device("nvme0")
        self._busy_until = [0] * ctx.vcpus
        # NVMe 1.4 4.1.3: a queue of N entries is full with N-1, so depth + 1 entries.
        entries = p.queue_depth + 1
        for q in range(p.queues or ctx.vcpus):
            qu = _NvmeQueue(q=q, cpu=q % ctx.vcpus)
            _, qu.sq_iova = ctx.dma_alloc_coherent(self.dev, entries * SQE_BYTES)
            _, qu.cq_iova = ctx.dma_alloc_coherent(self.dev, entries * CQE_BYTES)
            self.queues.append(qu)
        for qu in self.queues:
            for _ in range(p.queue_depth):
                schedule_at(ctx, 0, self._submit, qu.q)

    # --- host side ---------------------------------------------------------------------
    def _prp_page(self, ctx: GuestContext, qu: _NvmeQueue) -> tuple[int, int]:
        """A PRP list page from the queue's dma_pool (grown on demand, never unmapped)."""
        if qu.prp_pool:
            return qu.prp_pool.pop()
        qu.prp_pool_pages += 1
        return ctx.dma_alloc_coherent(self.dev, PAGE_SIZE)

    def _submit(self, ctx: GuestContext, t_ns: int, q: int) -> None:
        p = self.params
        if p.ios and self.submitted >= p.ios:
            return
        qu = self.queues[q]
        cpu = qu.cpu
        t = t_start = max(t_ns, ctx.cpu_free_at(cpu), self._busy_until[cpu])
        nbytes = self._sizes.draw(ctx.rng)
        read = bool(ctx.rng.random() < p.read_fraction)
        gpa = ctx.alloc_buffer(nbytes)
        npages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        sg = scattered_segments(gpa, nbytes, ctx.rng.random(max(npages - 1, 0)),
                                p.page_contiguity)   # merge_contiguous(scattered_pages(..))
        direction = DMA_FROM_DEVICE if read else DMA_TO_DEVICE
        segs, t = ctx.dma_map_sg(cpu, self.dev, sg, direction, t)
        pages = [a for iova, length in segs
                 for a in range(iova, iova + length, PAGE_SIZE)]
        counts = prp_layout(len(pages))
        lists = [self._prp_page(ctx, qu) for _ in counts]
        if counts:
            self.prp_list_commands += 1
            self.prp_list_pages_used += len(counts)
        sqe = qu.sq_iova + (qu.sq_tail % (p.queue_depth + 1)) * SQE_BYTES
        qu.sq_tail += 1
        self._cid += 1
        cmd = _Command(q, self._cid, nbytes, read, gpa, segs, pages, lists, counts, sqe,
                       t_start)
        qu.outstanding += 1
        self.submitted += 1
        self.max_outstanding = max(self.max_outstanding, qu.outstanding)
        self._busy_until[cpu] = max(self._busy_until[cpu], t)
        schedule_at(ctx, t, self._fetch, cmd)      # SQ tail doorbell (MMIO, no DMA)

    # --- device side -------------------------------------------------------------------
    def _fetch(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        ctx.device_dma(self.dev, t_ns, cmd.sqe_iova, SQE_BYTES, False)
        for (_, iova), n in zip(cmd.prp_lists, cmd.prp_counts, strict=True):
            ctx.device_dma(self.dev, t_ns, iova, n * PRP_ENTRY_BYTES, False)
        if cmd.read:
            t_media = t_ns + round(self.params.read_latency_us * 1000.0)
            schedule_at(ctx, t_media, self._transfer, cmd)
        else:
            self._transfer(ctx, t_ns, cmd)

    def _transfer(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        """One device DMA event per data page, back to back at the drive's bandwidth."""
        bw = self.params.bandwidth_gbps
        t = max(t_ns, self._media_free_ns)
        page_ns = max(1, round(PAGE_SIZE * 8 / bw))
        dma, dev, read = self.device_dma, self.dev, cmd.read
        for i, addr in enumerate(cmd.pages):
            size = min(PAGE_SIZE, cmd.nbytes - (i << PAGE_SHIFT))
            # the event runs self.device_dma(ctx, dev, t, addr, size, read) at t
            ctx.schedule(t, dma, ctx, dev, t, addr, size, read)
            t += page_ns if size == PAGE_SIZE else max(1, round(size * 8 / bw))
        self._media_free_ns = t
        if not cmd.read:
            t += round(self.params.write_latency_us * 1000.0)
        schedule_at(ctx, t, self._complete, cmd)

    def _complete(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        p = self.params
        qu = self.queues[cmd.q]
        cqe = qu.cq_iova + (qu.cq_head % (p.queue_depth + 1)) * CQE_BYTES
        qu.cq_head += 1
        ctx.device_dma(self.dev, t_ns, cqe, CQE_BYTES, True)
        # MSI-X interrupt -> nvme_irq on the queue's vCPU: reap the completion
        late = ctx.stalled_until(qu.cpu, max(t_ns, self._busy_until[qu.cpu]))
        if late:
            schedule_at(ctx, late, self._reap, cmd)
            return
        self._reap(ctx, t_ns, cmd)

    def _reap(self, ctx: GuestContext, t_ns: int, cmd: _Command) -> None:
        p = self.params
        qu = self.queues[cmd.q]
        cpu = qu.cpu
        t = max(t_ns, ctx.cpu_free_at(cpu), self._busy_until[cpu])
        direction = DMA_FROM_DEVICE if cmd.read else DMA_TO_DEVICE
        t = ctx.dma_unmap_sg(cpu, self.dev, cmd.segs, direction, t)
        ctx.free_buffer(cmd.gpa, cmd.nbytes)
        qu.prp_pool.extend(cmd.prp_lists)
        t += p.cpu_per_io_ns
        ctx.io_done(t, cmd.nbytes, t - cmd.t_submit_ns)
        qu.outstanding -= 1
        self.completed += 1
        self._busy_until[cpu] = max(self._busy_until[cpu], t)
        self._submit(ctx, t, cmd.q)
