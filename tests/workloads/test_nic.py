"""NicWorkload: rings, per-packet map/unmap balance, NAPI budget, offered load, rogue DMA."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from workloads.base import DMA_FROM_DEVICE, DMA_TO_DEVICE
from workloads.nic import DESC_BYTES, NicWorkload

MS = 1_000_000
P = NicWorkload.Params


def run_nic(make_ctx, params: NicWorkload.Params, t_ns: int = 2 * MS, seed: int = 1,
            vcpus: int = 2):
    ctx = make_ctx(vcpus=vcpus, seed=seed)
    nic = NicWorkload(params)
    nic.start(ctx)
    ctx.run_until(t_ns)
    return ctx, nic


def test_start_maps_rx_rings(make_ctx):
    """Start posts rx_ring mapped buffers per queue (one queue per vCPU)."""
    ctx, nic = run_nic(make_ctx, P(rx_ring=32, tx_ring=16), t_ns=0, vcpus=3)
    assert len(nic.queues) == 3
    assert [q.cpu for q in nic.queues] == [0, 1, 2]
    assert len(ctx.maps) == 3 * 32
    assert all(m[3] == DMA_FROM_DEVICE and m[2] == 2048 for m in ctx.maps)
    assert ctx.errors == []


def test_maps_and_unmaps_balance(make_ctx):
    """Every packet unmapped was mapped; what stays mapped is bounded by the rings."""
    p = P(rx_ring=64, tx_ring=64, offered_gbps=8.0)
    ctx, nic = run_nic(make_ctx, p)
    assert ctx.errors == []
    assert nic.rx_packets > 100 and nic.tx_packets > 100
    outstanding = len(ctx.maps) - len(ctx.unmaps)
    assert outstanding == ctx.live_mappings()
    assert outstanding <= len(nic.queues) * (p.rx_ring + p.tx_ring)
    assert outstanding >= len(nic.queues) * p.rx_ring - sum(len(q.rx_pending)
                                                           for q in nic.queues)
    tx_maps = sum(1 for m in ctx.maps if m[3] == DMA_TO_DEVICE)
    assert tx_maps - nic.tx_packets == sum(q.tx_in_flight for q in nic.queues)
    # buffers: posted + pending RX, in-flight TX, plus the coherent rings
    live = sum(len(q.rx_posted) + len(q.rx_pending) + q.tx_in_flight for q in nic.queues)
    assert ctx.live_buffers() == live + 2 * len(nic.queues)


def test_data_dmas_hit_mapped_iovas(make_ctx):
    """With rogue_fraction 0 every device DMA targets a currently mapped IOVA."""
    ctx, _ = run_nic(make_ctx, P(rx_ring=32, offered_gbps=9.0))
    assert ctx.dmas
    assert all(d.mapped and not d.rogue for d in ctx.dmas)
    # descriptor reads and write-backs go to the coherent rings, 16 bytes each
    assert any(d.coherent and d.size == DESC_BYTES and d.write for d in ctx.dmas)
    assert any(d.coherent and d.size == DESC_BYTES and not d.write for d in ctx.dmas)


def test_rogue_fraction_half(make_ctx):
    """rogue_fraction 0.5 sends about half the data DMAs to the last unmapped IOVA."""
    ctx, _ = run_nic(make_ctx, P(rogue_fraction=0.5, offered_gbps=9.0))
    data = [d for d in ctx.dmas if not d.coherent]
    rogue = [d for d in data if d.rogue]
    assert len(data) > 400
    assert 0.4 < len(rogue) / len(data) < 0.6
    assert all(d.size <= 64 for d in rogue)
    # a rogue DMA goes to an IOVA that was unmapped at some point before
    unmapped = {u[1] for u in ctx.unmaps}
    assert all(d.iova in unmapped for d in rogue)


def test_offered_load_respected(make_ctx):
    """Over 10 ms, received and sent bytes match offered_gbps and rx_fraction within 10%."""
    p = P(offered_gbps=4.0, rx_fraction=0.75, packet_sizes=(64, 1500),
          packet_weights=(0.5, 0.5))
    ctx, nic = run_nic(make_ctx, p, t_ns=10 * MS)
    assert nic.rx_drops == 0 and nic.tx_drops == 0
    rx_bytes = sum(d.size for d in ctx.dmas if not d.coherent and d.write)
    tx_bytes = sum(d.size for d in ctx.dmas if not d.coherent and not d.write)
    assert rx_bytes * 8 / (10 * MS) == pytest.approx(3.0, rel=0.1)
    assert tx_bytes * 8 / (10 * MS) == pytest.approx(1.0, rel=0.1)
    sizes = {d.size for d in ctx.dmas if not d.coherent}
    assert sizes == {64, 1500}


def test_napi_budget_respected(make_ctx):
    """No poll handles more than napi_budget packets; a full budget polls again."""
    p = P(napi_budget=8, irq_coalesce_us=200.0, rx_fraction=1.0, offered_gbps=9.0,
          queues=1)
    ctx, nic = run_nic(make_ctx, p)
    assert nic.max_poll_packets == 8
    assert nic.polls > nic.rx_packets / 8
    assert ctx.errors == []


def test_rx_drops_when_no_buffer(make_ctx):
    """A tiny RX ring and slow interrupts drop packets, and the count says so."""
    p = P(rx_ring=4, irq_coalesce_us=500.0, rx_fraction=1.0, queues=1)
    ctx, nic = run_nic(make_ctx, p)
    assert nic.rx_drops > 0
    assert ctx.live_mappings() <= 4


def test_tx_line_rate_serialises(make_ctx):
    """At offered load above line rate, TX DMA reads are spaced by the wire time."""
    p = P(rx_fraction=0.0, offered_gbps=20.0, line_gbps=10.0, queues=1, tx_ring=64)
    ctx, nic = run_nic(make_ctx, p)
    reads = sorted(d.t_ns for d in ctx.dmas if not d.coherent and not d.write)
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert min(gaps) >= 1200          # 1500 B * 8 / 10 Gb/s
    assert nic.tx_drops > 0


def test_deterministic(make_ctx):
    """The same seed gives the same records; another seed differs."""
    p = P(rogue_fraction=0.1, offered_gbps=5.0, packet_sizes=(64, 512, 1500),
          packet_weights=(1.0, 1.0, 2.0))
    a, _ = run_nic(make_ctx, p, t_ns=MS, seed=7)
    b, _ = run_nic(make_ctx, p, t_ns=MS, seed=7)
    c, _ = run_nic(make_ctx, p, t_ns=MS, seed=8)
    assert a.dmas == b.dmas and a.maps == b.maps and a.ios == b.ios
    assert a.dmas != c.dmas


@pytest.mark.parametrize(("change", "key"), [
    ({"rogue_fraction": 1.5}, "rogue_fraction"),
    ({"rx_fraction": -0.1}, "rx_fraction"),
    ({"rx_ring": 0}, "rx_ring"),
    ({"queues": -1}, "queues"),
    ({"packet_sizes": (64, 1500), "packet_weights": (1.0,)}, "packet_weights"),
    ({"packet_sizes": (-5,)}, "packet_sizes"),
    ({"packet_weights": (0.0,)}, "packet_weights"),
    ({"packet_sizes": (4000,)}, "packet_sizes"),
    ({"line_gbps": 0.0}, "line_gbps"),
    ({"offered_gbps": -1.0}, "offered_gbps"),
    ({"irq_coalesce_us": float("nan")}, "irq_coalesce_us"),
])
def test_validate_rejects(change, key):
    """validate() names the bad key."""
    assert key in [k for k, _ in replace(P(), **change).validate()]


def test_validate_defaults_ok():
    """The defaults are valid."""
    assert P().validate() == []


def test_packets_limit_offers_exactly_that_many(make_ctx):
    """With `packets`, the NIC offers that many packets in all, then goes quiet."""
    _ctx, nic = run_nic(make_ctx, P(rx_ring=64, tx_ring=64, offered_gbps=4.0, packets=40),
                        t_ns=5 * MS)
    assert nic.offered == 40
    assert nic.rx_packets + nic.tx_packets + nic.rx_drops + nic.tx_drops == 40
    assert P(packets=-1).validate()


def test_request_response_one_rx_and_one_tx_per_round_trip(make_ctx):
    """Ping-pong: each round trip is one RX and one TX packet (one map/unmap pair each) and
    one I/O whose latency is the round-trip time, at least the peer's turnaround."""
    p = P(queues=1, rx_ring=8, tx_ring=8, request_response=True, packets=40,
          peer_turnaround_us=20.0, irq_coalesce_us=10.0)
    ctx, nic = run_nic(make_ctx, p, t_ns=50 * MS, vcpus=1)
    assert ctx.errors == [] and ctx.pending_events() == 0
    assert nic.round_trips == nic.rx_packets == nic.tx_packets == 20 == len(ctx.ios)
    assert nic.rx_drops == nic.tx_drops == 0
    tx_maps = [m for m in ctx.maps if m[3] == DMA_TO_DEVICE]
    rx_maps = [m for m in ctx.maps if m[3] == DMA_FROM_DEVICE]
    assert len(tx_maps) == 20 and len(rx_maps) == 8 + 20          # ring fill + refills
    assert len(ctx.unmaps) == 40 and ctx.live_mappings() == 8
    rtts = [lat for _, _, lat in ctx.ios]
    assert min(rtts) > 20_000 + 10_000      # turnaround + interrupt moderation, at least
    cols = nic.summary_counters()
    assert cols["nic_round_trips"] == 20 and cols["nic_rtt_sum_ns"] == sum(rtts)
    # closed loop: a request arrives only after the previous response left
    assert [t for t, _, _ in ctx.ios] == sorted(t for t, _, _ in ctx.ios)


def test_request_response_rtt_grows_with_turnaround(make_ctx):
    """A slower peer lengthens every round trip by the added turnaround."""
    base = P(queues=1, rx_ring=4, tx_ring=4, request_response=True, packets=20,
             irq_coalesce_us=0.0)
    fast = run_nic(make_ctx, replace(base, peer_turnaround_us=10.0), t_ns=50 * MS, vcpus=1)[1]
    slow = run_nic(make_ctx, replace(base, peer_turnaround_us=30.0), t_ns=50 * MS, vcpus=1)[1]
    assert fast.round_trips == slow.round_trips == 10
    diff = slow.rtt_sum_ns - fast.rtt_sum_ns
    assert diff == 10 * 20_000
