"""NvmeWorkload: closed-loop queue depth, PRP1/PRP2/PRP lists, map_sg/unmap_sg, timing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workloads.nvme import CQE_BYTES, SQE_BYTES, NvmeWorkload, prp_layout

MS = 1_000_000
KIB = 1024
P = NvmeWorkload.Params


def run_nvme(make_ctx, params: NvmeWorkload.Params, t_ns: int = MS, seed: int = 1,
             vcpus: int = 2):
    ctx = make_ctx(vcpus=vcpus, seed=seed)
    nvme = NvmeWorkload(params)
    nvme.start(ctx)
    ctx.run_until(t_ns)
    return ctx, nvme


@pytest.mark.parametrize(("npages", "expected"), [
    (1, ()), (2, ()), (3, (2,)), (32, (31,)), (513, (512,)), (514, (512, 2)),
    (1024, (512, 513 - 1)), (1025, (512, 512, 2)),
])
def test_prp_layout(npages, expected):
    """A PRP list is used exactly above two pages; full list pages chain via their last slot."""
    assert prp_layout(npages) == expected
    counts = prp_layout(npages)
    # data entries in lists = npages - 1; each chained page gives one slot to the pointer
    assert sum(counts) - max(len(counts) - 1, 0) == (npages - 1 if counts else 0)


def test_keeps_queue_depth_outstanding(make_ctx):
    """Each queue keeps exactly queue_depth commands outstanding, closed loop."""
    ctx, nvme = run_nvme(make_ctx, P(queue_depth=8), vcpus=2)
    assert ctx.errors == []
    assert [q.outstanding for q in nvme.queues] == [8, 8]
    assert nvme.max_outstanding == 8
    assert nvme.completed > 20
    assert nvme.submitted == nvme.completed + 16
    assert len(ctx.ios) == nvme.completed
    assert len(ctx.map_sgs) - len(ctx.unmap_sgs) == 16 == ctx.live_mappings()


@pytest.mark.parametrize(("io_bytes", "uses_list", "list_pages"), [
    (4 * KIB, False, 0), (8 * KIB, False, 0), (12 * KIB, True, 1), (128 * KIB, True, 1),
    (2 * 1024 * KIB + 4 * KIB, True, 1), (2 * 1024 * KIB + 8 * KIB, True, 2),
])
def test_prp_lists_by_size(make_ctx, io_bytes, uses_list, list_pages):
    """PRP list pages are read by the device exactly when an I/O spans more than 2 pages."""
    ctx, nvme = run_nvme(make_ctx, P(queue_depth=2, io_sizes=(io_bytes,), queues=1),
                         t_ns=2 * MS)
    assert ctx.errors == []
    assert nvme.completed >= 2
    npages = io_bytes // (4 * KIB)
    # one segment per physically contiguous run, covering every page once
    assert all(sum(-(-n // 4096) for _, n in segs) == npages for segs in ctx.map_sgs)
    assert nvme.prp_list_commands == (nvme.submitted if uses_list else 0)
    assert nvme.prp_list_pages_used == nvme.submitted * list_pages
    sq = nvme.queues[0].sq_iova
    sq_end = sq + (2 + 1) * SQE_BYTES
    sqe_reads = [d for d in ctx.dmas if d.coherent and not d.write and sq <= d.iova < sq_end]
    prp_reads = [d for d in ctx.dmas if d.coherent and not d.write
                 and not sq <= d.iova < sq_end]
    assert all(d.size == SQE_BYTES for d in sqe_reads)
    fetched = len(sqe_reads)
    assert fetched >= nvme.completed
    assert len(prp_reads) == fetched * list_pages
    if uses_list:
        entries = sum(d.size for d in prp_reads[:list_pages]) // 8
        assert entries == sum(prp_layout(npages))
    # the pool holds at most one list set per outstanding command
    assert nvme.queues[0].prp_pool_pages <= 2 * list_pages


def test_data_moves_by_page_in_the_right_direction(make_ctx):
    """Reads make the device write memory, writes read it, one DMA per page, all mapped."""
    ctx, nvme = run_nvme(make_ctx, P(io_sizes=(16 * KIB,), read_fraction=0.5, queue_depth=4))
    data = [d for d in ctx.dmas if not d.coherent]
    assert data and all(d.mapped and d.size == 4096 for d in data)
    assert len(ctx.map_sgs) == nvme.submitted
    assert {d.write for d in data} == {True, False}
    cqes = [d for d in ctx.dmas if d.coherent and d.write]
    assert all(d.size == CQE_BYTES for d in cqes) and len(cqes) == nvme.completed


def test_unmap_sg_after_completion(make_ctx):
    """Every unmap_sg releases a mapped command's segments after its last data DMA."""
    ctx, _ = run_nvme(make_ctx, P(io_sizes=(8 * KIB, 64 * KIB), io_weights=(1.0, 1.0)))
    assert ctx.errors == []
    mapped = {tuple(segs) for segs in ctx.map_sgs}
    last_dma: dict[int, int] = {}
    for d in ctx.dmas:
        if not d.coherent:
            last_dma[d.iova] = max(last_dma.get(d.iova, 0), d.t_ns)
    assert ctx.unmap_sgs
    for t, segs in ctx.unmap_sgs:
        assert tuple(segs) in mapped
        assert all(last_dma[iova] <= t for iova, _ in segs)


def test_latency_and_bandwidth(make_ctx):
    """A lone 4 KiB read completes after the media latency plus transfer and CPU time."""
    p = P(queue_depth=1, queues=1, read_fraction=1.0, read_latency_us=80.0,
          bandwidth_gbps=32.0, cpu_per_io_ns=2000)
    ctx, _ = run_nvme(make_ctx, p, t_ns=MS, vcpus=1)
    latencies = {lat for _, _, lat in ctx.ios}
    # map 300 + media 80_000 + 4096*8/32 = 1024 + unmap 200 + cpu 2000
    assert latencies == {300 + 80_000 + 1024 + 200 + 2000}
    assert all(len(segs) == 1 for segs in ctx.map_sgs)


def test_bandwidth_caps_throughput(make_ctx):
    """Large I/Os at depth are limited by bandwidth_gbps shared by all queues."""
    p = P(io_sizes=(128 * KIB,), queue_depth=16, bandwidth_gbps=8.0, read_latency_us=10.0,
          write_latency_us=5.0)
    ctx, _ = run_nvme(make_ctx, p, t_ns=5 * MS)
    moved = sum(d.size for d in ctx.dmas if not d.coherent)
    assert moved * 8 / (5 * MS) == pytest.approx(8.0, rel=0.05)


def test_deterministic(make_ctx):
    """The same seed gives the same records; another seed other sizes and directions."""
    p = P(io_sizes=(4 * KIB, 16 * KIB, 128 * KIB), io_weights=(3.0, 2.0, 1.0),
          rogue_fraction=0.2)
    a, _ = run_nvme(make_ctx, p, seed=3)
    b, _ = run_nvme(make_ctx, p, seed=3)
    c, _ = run_nvme(make_ctx, p, seed=4)
    assert a.dmas == b.dmas and a.ios == b.ios and a.map_sgs == b.map_sgs
    assert a.dmas != c.dmas and a.map_sgs != c.map_sgs


@pytest.mark.parametrize(("change", "key"), [
    ({"queue_depth": 0}, "queue_depth"),
    ({"io_sizes": (1000,)}, "io_sizes"),
    ({"io_sizes": (0,)}, "io_sizes"),
    ({"io_sizes": (4096, 8192)}, "io_weights"),
    ({"io_weights": (-1.0,)}, "io_weights"),
    ({"read_fraction": 2.0}, "read_fraction"),
    ({"bandwidth_gbps": 0}, "bandwidth_gbps"),
    ({"read_latency_us": -1.0}, "read_latency_us"),
])
def test_validate_rejects(change, key):
    """validate() names the bad key."""
    assert key in [k for k, _ in replace(P(), **change).validate()]
    assert P().validate() == []


def test_ios_limit_completes_exactly_that_many(make_ctx):
    """``ios`` stops new submissions after N commands; all N complete and unmap."""
    ctx, nvme = run_nvme(make_ctx, P(queue_depth=8, ios=37), t_ns=20 * MS)
    assert nvme.submitted == nvme.completed == len(ctx.ios) == 37
    assert len(ctx.map_sgs) == len(ctx.unmap_sgs) == 37 and ctx.live_mappings() == 0
    assert ctx.pending_events() == 0 and ctx.errors == []


def test_64k_ios_make_13_to_16_map_events(make_ctx):
    """A 64 KiB I/O's 16 pages are physically scattered, some runs contiguous: dma_map_sg
    gets one segment (one iommu:map event) per contiguous run, 13-16 as on a real guest."""
    ctx, _ = run_nvme(make_ctx, P(queue_depth=4, io_sizes=(64 * KIB,)), t_ns=5 * MS)
    events = [len(segs) for segs in ctx.map_sgs]
    assert len(events) > 30 and all(sum(n for _, n in s) == 64 * KIB for s in ctx.map_sgs)
    assert max(events) == 16 and min(events) < 16
    assert 13.0 <= sum(events) / len(events) <= 15.9
    scattered = run_nvme(make_ctx, P(queue_depth=4, io_sizes=(64 * KIB,), page_contiguity=0.0),
                         t_ns=MS)[0]
    assert {len(s) for s in scattered.map_sgs} == {16}
    whole = run_nvme(make_ctx, P(queue_depth=4, io_sizes=(64 * KIB,), page_contiguity=1.0),
                     t_ns=MS)[0]
    assert {len(s) for s in whole.map_sgs} == {1}


def test_scattered_pages_cover_the_buffer_and_merge_by_runs():
    """Every page appears once; runs follow the draws; merging gives one segment per run."""
    from workloads.nvme import merge_contiguous, scattered_pages

    base = 1 << 30
    sg = scattered_pages(base, 6 * 4096, [0.0, 0.9, 0.0, 0.0, 0.9], contiguity=0.5)
    assert sorted(g for g, _ in sg) == [base + i * 4096 for i in range(6)]
    # runs [0,1] [2,3,4] [5], listed last first
    assert merge_contiguous(sg) == [(base + 5 * 4096, 4096), (base + 2 * 4096, 3 * 4096),
                                    (base, 2 * 4096)]
    assert merge_contiguous([(base + 100, 200), (base + 300, 100)]) == [
        (base + 100, 200), (base + 300, 100)]       # not at a page boundary: kept apart


def test_guest_counts_one_map_event_per_contiguous_run(tmp_path):
    """In a full shadow guest, 64 KiB I/Os with ``ios`` fixed give 13-16 iommu:map events
    per map call on average, and exactly ``ios`` I/Os."""
    from cluster.config import parse_config
    from cluster.runner import run_config

    cfg = parse_config({
        "experiment": {"name": "prp", "seed": 2, "duration_us": 3000, "epoch_us": 100},
        "host": {"memory_mib": 256},
        "vm": {"g": {"mode": "shadow", "memory_mib": 64, "vcpus": 1,
                     "workload": {"kind": "nvme", "queue_depth": 4, "queues": 1, "ios": 24,
                                  "io_sizes": [64 * KIB], "read_latency_us": 20.0}}}})
    (row,) = run_config(cfg, tmp_path).summary.to_pylist()
    assert row["ios"] == 24
    data_maps = 24                                  # plus the rings' and PRP lists' maps
    setup_maps = row["maps"] - data_maps
    per_io = (row["iommu_map_events"] - setup_maps) / data_maps
    assert 13.0 <= per_io < 16.0
