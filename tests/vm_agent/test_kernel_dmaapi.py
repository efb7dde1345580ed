"""The compiled DMA API (vm_agent/kernels/dmaapi.py) against VmAgent's Python one, call by
call: the same random sequences of map, unmap, flush-queue timer and end-of-epoch calls on a
VmAgent and on the arrays ``freeze`` made of it give the same returns, stats, op-log rows
(times included), IOVAs and allocator state, table contents, tags and flush-queue state."""

from __future__ import annotations

import heapq

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu.costs import CostModel
from host_iommu.invalidate import psi_aligned
from vm_agent.agent import GUEST_COUNTERS, VmAgent
from vm_agent.flushq import FlushQueue
from vm_agent.kernels import dmaapi as K
from vm_agent.kernels import flushq as kfq
from vm_agent.kernels import guest as kg
from vm_agent.kernels import iova as kiova
from vm_agent.kernels import pgtable as kpg
from workloads.base import Workload

PAGE = 4096


class Bare(Workload):
    """One device and nothing else: the test drives the agent by hand."""

    kind = "bare"

    def start(self, ctx) -> None:
        self.dev = ctx.add_device("dev0")


def make_agent(mode: str, policy: str = "strict", vcpus: int = 2, ats: bool = False,
               levels: int = 4, percpu: bool = True, fq_size: int | None = None) -> VmAgent:
    a = VmAgent(1, mode=mode, policy=policy, flush_queue="percpu" if percpu else "single",
                vcpus=vcpus, memory_bytes=64 << 20, fl_levels=levels, ats=ats,
                workload=Bare(Bare.Params()), churn=None, costs=CostModel(), seed=0)
    a.setup()
    dom = a.dma.domains[a.workload.dev.sid] if mode != "passthrough" else None
    if dom is not None and dom.fq is not None and fq_size is not None:
        dom.fq = FlushQueue(vcpus, per_cpu=percpu, size=fq_size, hz=a.hz)
    return a


def guest_of(a: VmAgent) -> kg.GuestArrays:
    g = kg.new_arrays(a.vm, a.vcpus, a.mem.frames, log_rows=1 << 14)
    kg.load_memory(g, a.mem)
    g.stats[:] = [a.stats[n] for n in GUEST_COUNTERS]
    g.busy[:] = a.busy_until
    rows = a.log.rows
    n = len(rows) // 8
    g.ctl[kg.C_SEQ0] = a.log.seq0
    g.log[:n] = np.array([x & (2**64 - 1) for x in rows], np.uint64).view(np.int64).reshape(n, 8)
    g.ctl[kg.C_LOG_N] = n
    return g


def py_rows(a: VmAgent) -> np.ndarray:
    rows = a.log.rows
    return np.array([x & (2**64 - 1) for x in rows], np.uint64).view(np.int64).reshape(-1, 8)


def iova_state(tree, st, mag):
    """The allocator state with the tree's placement in its array left out."""
    n, base = int(st[kiova.S_NODES]), int(st[kiova.S_BASE])
    s = st.copy()
    s[kiova.S_BASE] = 0
    mags = [row[:1 + row[0]] for row in mag.tolist()]   # a magazine's pfns up to its size
    return tree[base:base + n].tolist(), s.tolist(), mags


def check_same(a: VmAgent, g, d) -> None:
    """Everything the DMA API keeps, Python against arrays."""
    assert g.ctl[kg.C_ERR] == 0
    assert dict(zip(GUEST_COUNTERS, g.stats.tolist(), strict=True)) == a.stats
    assert g.busy.tolist() == a.busy_until
    n = int(g.ctl[kg.C_LOG_N])
    assert int(g.ctl[kg.C_SEQ0]) == a.log.seq0
    assert g.log[:n].tolist() == py_rows(a).tolist()
    dma = a.dma
    sid = a.workload.dev.sid
    assert K.last_unmapped(d) == dma.last_unmapped.get(sid)
    assert K.stale_bound_ns(d) == dma.stale_bound_ns
    if a.mode == "passthrough":
        return
    dom = dma.domains[sid]
    assert d.ctl[K.D_NEXT_UNMAP_ID] == dma.next_unmap_id
    assert d.ctl[K.D_PCI32] == dom.pci_32bit_workaround
    assert iova_state(d.tree, d.ist, d.mag) == iova_state(*K._iova_arrays(dom, 0))
    # per-page bookkeeping, tags, retired ids, creation marks
    pg = {int(r[0]): r[1:].tolist() for r in d.pg if r[0] >= 0}
    assert len(pg) == d.ctl[K.D_PG_N]
    want = {}
    for (_k, p) in dma.mapped_pages:
        want.setdefault(p, [0, -1, -1, -1])[0] = 1
    for (_k, p), uid in dma.unmap_id_of.items():
        want.setdefault(p, [0, -1, -1, -1])[1] = uid
    for p, m in dom.mappings.items():
        want.setdefault(p, [0, -1, -1, -1])[2] = m.pages
    for p, t in dom.freed_ns.items():
        want.setdefault(p, [0, -1, -1, -1])[3] = t
    assert pg == want
    for p in want:
        assert K.unmap_tag(g, d, p) == dma.unmap_tag(sid, p)
    assert {int(r[0]): int(r[1]) for r in d.tg if r[0] >= 0} == dma.pages_tagged
    assert d.retired[:d.ctl[K.D_RETIRED_N]].tolist() == dma.retired
    made = [(p, s) for p, seqs in a._made.items() for s in seqs]
    assert sorted(map(tuple, d.made[:d.ctl[K.D_MADE_N]].tolist())) == sorted(made)
    # the table pages: the same rows, entries and counts
    store = dom.table.store
    slab = kpg.slab_of(d.pt)
    frames = int(d.pt[kpg.H_FRAMES])
    used = kpg.HEADER + frames
    for gpa, row in store._rows.items():
        assert d.pt[kpg.HEADER + (gpa >> 12)] == row
        assert np.array_equal(slab[row], store.pages[gpa])
        assert d.pt[used + row] == store.state[store._used_at + row]
    assert int((d.pt[kpg.HEADER:used] >= 0).sum()) == len(store._rows)
    assert d.ctl[K.D_NEXT_ROW] == store._next_row
    assert d.rows_free[:d.ctl[K.D_FREE_ROWS_N]].tolist() == store._free_rows
    assert int(g.ctl[kg.C_NEXT_FRAME]) == a.mem.next_frame
    if a.mode == "shadow":    # what the VMM shadowed, and its count per 2-MiB region
        tree = a.vmm.shadowed.get(sid, {})
        assert K.shadowed(d) == dict(tree)
        assert d.ctl[K.D_SH_N] == len(tree)
        regions: dict[int, int] = {}
        for p in tree:
            regions[p >> 9] = regions.get(p >> 9, 0) + 1
        assert {int(r[0]): int(r[1]) for r in d.sr if r[0] >= 0} == regions
        assert d.ctl[K.D_SR_N] == len(regions)
    if dom.fq is not None:
        s = dom.fq._st
        for k in range(kfq.S_START_CNT, kfq.S_MAX_PENDING + 1):
            assert d.fq[k] == s[k], k
        assert fq_entries(d.fq) == fq_entries(s)


def fq_entries(st) -> list:
    """Each ring's queued entries, head to tail, and the armed timer."""
    rings, rcap = int(st[kfq.S_RINGS]), int(st[kfq.S_RCAP])
    ring = kfq.ring_view(st)
    return [[ring[r, k & (rcap - 1)].tolist()
             for k in range(int(st[kfq.HEADER + r]), int(st[kfq.HEADER + rings + r]))]
            for r in range(rings)] + [int(st[kfq.S_ARMED]), int(st[kfq.S_DEADLINE_NS])]


op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 3), st.integers(0, 64 * PAGE - 1),
              st.integers(0, PAGE - 1), st.integers(0, 2), st.integers(0, 30_000)),
    st.tuples(st.just("unmap"), st.integers(0, 3), st.integers(0, 1 << 20), st.just(0),
              st.just(0), st.integers(0, 30_000)),
    st.tuples(st.just("bogus"), st.integers(0, 3), st.just(0), st.just(0), st.just(0),
              st.integers(0, 30_000)),
    st.tuples(st.just("timer"), st.just(0), st.just(0), st.just(0), st.just(0),
              st.integers(0, 30_000_000)),
    st.tuples(st.just("epoch"), st.just(0), st.just(0), st.just(0), st.just(0),
              st.integers(0, 30_000)),
)


def run_pair(a: VmAgent, seq, slack: int = K._SLACK) -> tuple:
    """Drive ``a`` and its frozen arrays through ``seq``, comparing after each call; with
    ``slack`` 0 the arrays are grown (K.grown) whenever one call could fill one."""
    g = guest_of(a)
    d = K.freeze(a, slack)
    check_same(a, g, d)
    dev = a.workload.dev
    vcpus = a.vcpus
    live: list[tuple[int, int]] = []
    t = 0
    for kind, cpu, size, off, direction, dt in seq:
        t += dt
        cpu %= vcpus
        if not K.room_ok(g, d):     # as the event loop checks before each event
            d = K.grown(d, slack)
            assert K.room_ok(g, d)
        if kind == "unmap" and not live:
            kind = "map"
        if kind == "map":
            size = max(1, min(size, 64 * PAGE) - off) if a.mode != "passthrough" else size + 1
            gpa = a.alloc_buffer(size)
            assert kg.mem_alloc(g, max(1, -(-size // PAGE))) == gpa
            want = a.dma_map(cpu, dev, gpa + off, size, direction, t)
            got = K.dma_map(g, d, cpu, gpa + off, size, direction, t)
            assert got == want
            live.append((want[0], size))
        elif kind in ("unmap", "bogus"):
            if kind == "unmap":
                iova, n = live.pop(size % len(live))
            else:
                iova, n = (1 << 40) + size * PAGE, 1
            before = len(a._events)
            want = a.dma_unmap(cpu, dev, iova, n, 0, t)
            got = K.dma_unmap(g, d, cpu, iova, n, 0, t)
            assert got == want
            if d.ctl[K.D_TIMER_NS] >= 0:   # the timer Python scheduled inside unmap_range
                assert len(a._events) == before + 1
                ev = max(a._events, key=lambda e: e[1])
                assert (ev[0], ev[3][1]) == (d.ctl[K.D_TIMER_NS], d.ctl[K.D_TIMER_CPU])
                d.ctl[K.D_TIMER_NS] = -1
            else:
                assert len(a._events) == before
        elif kind == "timer":
            if a._events:
                _t, _s, fn, args = heapq.heappop(a._events)
                fn(*args)
                K.fq_timer(g, d, args[1])
        else:   # the end of an epoch: VmAgent.run_epoch's last steps, then the batches
            a._made.clear()
            a.dma.log_retired(t)
            K.end_epoch(g, d, t)
            check_same(a, g, d)
            want_ops = a.log.take()
            got_ops = kg.take_log(g)
            assert want_ops.tobytes() == got_ops.tobytes()
        check_same(a, g, d)
    return g, d


settings_ = settings(max_examples=60, deadline=None)


@settings_
@given(st.lists(op, max_size=40))
def test_passthrough_equals_python(seq):
    """Pass-through: dma-direct maps and unmaps, busy times and counters equal."""
    run_pair(make_agent("passthrough"), seq)


@settings_
@given(st.lists(op, max_size=60), st.integers(1, 3), st.booleans(), st.sampled_from([4, 5]),
       st.sampled_from([0, K._SLACK]))
def test_nested_strict_equals_python(seq, vcpus, ats, levels, slack):
    """Nested strict: IOVAs, table stores and their log rows, HWPT invalidations, unmap
    returns, tags, retired ids and the allocator equal after every call (also with arrays
    frozen without room, grown as they fill)."""
    run_pair(make_agent("nested", "strict", vcpus, ats, levels), seq, slack)


@settings_
@given(st.lists(op, max_size=60), st.integers(1, 3), st.booleans(), st.booleans(),
       st.sampled_from([2, 4, 256]), st.sampled_from([0, K._SLACK]))
def test_nested_lazy_equals_python(seq, vcpus, ats, percpu, fq_size, slack):
    """Nested lazy: flush-queue flushes (full ring, timer), PASID-wide invalidations, IOVAs
    freed late, stale bounds and the timer the unmap arms equal after every call (also
    with arrays frozen without room, grown as they fill)."""
    run_pair(make_agent("nested", "lazy", vcpus, ats, percpu=percpu, fq_size=fq_size), seq,
             slack)


def test_many_pages_reused():
    """Adversarial by hand: mappings of 1..64 pages on every CPU, unmapped out of order and
    mapped again (rcache reuse, freed_ns), across epochs."""
    rng = np.random.default_rng(5)
    seq = []
    for _ in range(400):
        r = rng.integers(0, 10)
        kind = "map" if r < 5 else "unmap" if r < 9 else "epoch"
        seq.append((kind, int(rng.integers(0, 4)), int(rng.integers(0, 64 * PAGE)),
                    int(rng.integers(0, PAGE)), int(rng.integers(0, 3)),
                    int(rng.integers(0, 3000))))
    seq += [("timer", 0, 0, 0, 0, 0)] * 3 + [("epoch", 0, 0, 0, 0, 0)]
    g, _d = run_pair(make_agent("nested", "strict", 3, ats=True), seq)
    s = dict(zip(GUEST_COUNTERS, g.stats.tolist(), strict=True))
    assert s["vmm_invalidate_calls"] == s["unmaps"] > 100 and s["pte_writes"] > 1000
    g, _d = run_pair(make_agent("nested", "lazy", 2, fq_size=4), seq, slack=0)
    s = dict(zip(GUEST_COUNTERS, g.stats.tolist(), strict=True))
    assert s["lazy_flushes"] > 20


def test_refusals_change_nothing():
    """A mapping beyond MAX_PAGES and a CPU outside the rcache are refused with C_ERR set
    and nothing changed."""
    a = make_agent("nested", "strict", 2)
    g = guest_of(a)
    d = K.freeze(a)
    before = (g.stats.copy(), g.busy.copy(), d.ist.copy(), d.pt.copy(), int(g.ctl[kg.C_LOG_N]))
    assert K.dma_map(g, d, 0, 1 << 20, (K.MAX_PAGES + 1) * PAGE, 0, 5) == (-1, 5)
    assert g.ctl[kg.C_ERR] == kg.E_DMA and g.ctl[kg.C_ERR_ARG] == K.R_PAGES
    g.ctl[kg.C_ERR] = 0
    assert K.dma_map(g, d, 7, 1 << 20, PAGE, 0, 5) == (-1, 5)
    assert g.ctl[kg.C_ERR_ARG] == K.R_CPU
    after = (g.stats, g.busy, d.ist, d.pt, int(g.ctl[kg.C_LOG_N]))
    for x, y in zip(before, after, strict=True):
        assert np.array_equal(x, y)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1023), min_size=1, max_size=60), st.integers(0, 1023),
       st.integers(1, 600))
def test_clear_4k_equals_unmap_kernel(mapped, first, pages):
    """The strict unmap's short path (_clear_4k) against the general unmap kernel on the
    same tables: the same stores listed in the same order and the same table state, or it
    declines (-1) and changes nothing; ranges inside and across a 2-MiB table, over present
    and empty entries."""
    a = make_agent("nested")
    store = a.dma.domains[a.workload.dev.sid].table.store
    for p in mapped:   # 4-KiB pages in two level-1 tables' 4 MiB, through the Python path
        a.dma.domains[a.workload.dev.sid].table.map((0x40000 + p) << 12, 0x100000, PAGE)
    start, end = (0x40000 + first) << 12, (0x40000 + first + pages) << 12
    ours, ref = store.state.copy(), store.state.copy()
    n = K._clear_4k(ours, start, end)
    code, stores, frees = kpg.unmap_range(ref, start, end)
    assert code == kpg.DONE
    if n < 0:
        assert first >> 9 != (first + pages - 1) >> 9 or pages >= 512
        assert np.array_equal(ours, store.state)
        return
    assert (n, 0) == (stores, frees)
    frames, rows = int(ref[kpg.H_FRAMES]), int(ref[kpg.H_ROWS])
    out = kpg.HEADER + frames + 2 * rows
    assert ours[out:out + 2 * n].tolist() == ref[out:out + 2 * n].tolist()
    ours[kpg.H_STAMP], ref[kpg.H_STAMP] = 0, 0      # the kernel's own marks aside
    ours[kpg.HEADER + frames + rows:out] = ref[kpg.HEADER + frames + rows:out]
    assert np.array_equal(ours, ref)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, (1 << 40) - 1), st.integers(1, 1 << 20))
def test_psi_equals_invalidate_helper(addr, npages):
    """The range an invalidation covers: invalidate.psi_aligned(mamv=None), value for value."""
    assert K._psi(addr << 12, npages) == psi_aligned(addr << 12, npages, mamv=None)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200))
def test_hash_table_equals_dict(ops):
    """The open-addressing table (linear probing, backward-shift deletion) on a small
    table full of collisions: after each insert or delete every key is found with its
    value, as in a dict, and no other key is."""
    tab = np.full((16, 2), -1, np.int64)   # keys k and k + 16 share a home slot
    want: dict[int, int] = {}
    for i, (insert, key) in enumerate(ops):
        s = K._h_find(tab, key)
        assert (s >= 0) == (key in want)
        if insert and s < 0 and len(want) < 12:
            tab[-1 - s] = (key, i)
            want[key] = i
        elif not insert and s >= 0:
            K._h_delete(tab, s)
            del want[key]
        for k in range(41):
            s = K._h_find(tab, k)
            assert (int(tab[s, 1]) if s >= 0 else None) == want.get(k)


def test_32bit_space_exhausted():
    """With all but a few pages below 4 GiB reserved, maps fill the 32-bit space, the
    first failure there drops the pci_32bit_workaround for good, and later maps (and the
    rcache flush the full aperture allows) equal the Python path's."""
    for policy in ("strict", "lazy"):
        a = make_agent("nested", policy, 2)
        a.dma.domains[a.workload.dev.sid].iovad.reserve_iova(1, 0xFFFF0 - 1)
        seq = [("map", k % 2, PAGE * (1 + k % 3), 0, 0, 100) for k in range(12)]
        seq += [("unmap", k % 2, k, 0, 0, 100) for k in range(6)]
        seq += [("map", k % 2, PAGE, 0, 0, 100) for k in range(12)] + [("epoch", 0, 0, 0, 0, 0)]
        _g, d = run_pair(a, seq)
        assert d.ctl[K.D_PCI32] == 0 and not a.dma.domains[a.workload.dev.sid].pci_32bit_workaround


# --- scatter lists: map_sg / unmap_sg against dma_map_sg / dma_unmap_sg -------------------
sg_op = st.one_of(
    st.tuples(st.just("sg"), st.integers(0, 3), st.integers(1, 64 * PAGE),
              st.lists(st.floats(0, 1), min_size=63, max_size=63), st.integers(0, 2),
              st.integers(0, 30_000)),
    st.tuples(st.just("coherent"), st.just(0), st.integers(1, 4 * PAGE), st.just([]),
              st.just(0), st.integers(0, 30_000)),
    st.tuples(st.just("unmap"), st.integers(0, 3), st.integers(0, 1 << 20), st.just([]),
              st.integers(0, 2), st.integers(0, 30_000)),
    st.tuples(st.just("timer"), st.just(0), st.just(0), st.just([]), st.just(0),
              st.integers(0, 30_000_000)),
    st.tuples(st.just("epoch"), st.just(0), st.just(0), st.just([]), st.just(0),
              st.integers(0, 30_000)),
)


def run_sg_pair(a: VmAgent, seq, contiguity: float, slack: int = K._SLACK) -> None:
    """Drive ``a`` (VmAgent.dma_map_sg of workloads/nvme.py's scattered_segments lists,
    dma_alloc_coherent, dma_unmap_sg, timers, epoch ends) and its frozen arrays (map_sg,
    map_sg uncharged, unmap_sg, ...) through ``seq``, comparing after each call."""
    from workloads.nvme import scattered_segments
    g = guest_of(a)
    d = K.freeze(a, slack)
    dev = a.workload.dev
    live: list[tuple[int, int]] = []
    out = np.zeros((K.MAX_PAGES, 2), np.int64)
    t = 0
    for kind, cpu, nbytes, draws, direction, dt in seq:
        t += dt
        cpu %= a.vcpus
        if not K.room_ok(g, d):
            d = K.grown(d, slack)
            assert K.room_ok(g, d)
        if kind == "unmap" and not live:
            kind, nbytes = "coherent", 1 + nbytes % (4 * PAGE)
        if kind in ("sg", "coherent"):
            if kind == "sg":
                gpa = a.alloc_buffer(nbytes)
                npages = -(-nbytes // PAGE)
                sg = scattered_segments(gpa, nbytes, draws[:npages - 1], contiguity)
                want_segs, want_t = a.dma_map_sg(cpu, dev, sg, direction, t)
                charge = 1
            else:       # at the event's time, vCPU 0's rcache, no vCPU charged
                a.now = t
                busy = list(a.busy_until)
                gpa, iova = a.dma_alloc_coherent(dev, nbytes)
                assert a.busy_until == busy
                sg = [(gpa, nbytes)]
                want_segs, want_t = [(iova, nbytes)], None
                charge, cpu, direction = 0, 0, 0
            assert kg.mem_alloc(g, max(1, -(-nbytes // PAGE))) == gpa
            arr = np.array(sg, np.int64)
            got_iova, got_t = K.map_sg(g, d, cpu, arr, len(sg), direction, t, out, charge)
            assert out[:len(sg)].tolist() == [list(s) for s in want_segs]
            assert got_iova == want_segs[0][0]
            if want_t is not None:
                assert got_t == want_t
            live.append((want_segs[0][0], direction))
        elif kind == "unmap":
            iova, direction = live.pop(nbytes % len(live))
            before = len(a._events)
            want = a.dma_unmap_sg(cpu, dev, [(iova, 1)], direction, t)
            got = K.unmap_sg(g, d, cpu, iova, direction, t)
            assert got == want
            if d.ctl[K.D_TIMER_NS] >= 0:
                assert len(a._events) == before + 1
                d.ctl[K.D_TIMER_NS] = -1
        elif kind == "timer":
            if a._events:
                _t, _s, fn, args = heapq.heappop(a._events)
                fn(*args)
                K.fq_timer(g, d, args[1])
        else:
            a._made.clear()
            a.dma.log_retired(t)
            K.end_epoch(g, d, t)
            check_same(a, g, d)
            assert a.log.take().tobytes() == kg.take_log(g).tobytes()
        check_same(a, g, d)


@settings_
@given(st.lists(sg_op, max_size=40), st.sampled_from([0.0, 0.1, 0.7, 1.0]))
def test_sg_passthrough_equals_python(seq, contiguity):
    """Pass-through scatter lists: dma-direct, each segment its GPA, one call each."""
    run_sg_pair(make_agent("passthrough"), seq, contiguity)


@settings_
@given(st.lists(sg_op, max_size=50), st.sampled_from([0.0, 0.1, 0.7, 1.0]),
       st.integers(1, 3), st.booleans(), st.sampled_from([4, 5]),
       st.sampled_from([0, K._SLACK]))
def test_sg_nested_strict_equals_python(seq, contiguity, vcpus, ats, levels, slack):
    """Nested strict scatter lists: one IOVA range per list, each segment mapped at the
    next pages of it (an iommu:map each), coherent maps at ``now`` without charging a
    vCPU, one unmap (and one invalidation) of the whole range."""
    run_sg_pair(make_agent("nested", "strict", vcpus, ats, levels), seq, contiguity, slack)


@settings_
@given(st.lists(sg_op, max_size=50), st.sampled_from([0.0, 0.1, 1.0]), st.integers(1, 3),
       st.booleans(), st.sampled_from([2, 256]), st.sampled_from([0, K._SLACK]))
def test_sg_nested_lazy_equals_python(seq, contiguity, vcpus, percpu, fq_size, slack):
    """Nested lazy scatter lists: the flush queue takes the whole range as one entry."""
    run_sg_pair(make_agent("nested", "lazy", vcpus, percpu=percpu, fq_size=fq_size), seq,
                contiguity, slack)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["passthrough", "nested"]), st.integers(0, 1), st.integers(1, 60),
       st.integers(0, PAGE - 1), st.integers(0, 2), st.integers(0, 5000))
def test_map_sg_of_one_segment_is_dma_map(mode, cpu, pages, off, direction, t):
    """map_sg of one segment changes the arrays exactly as dma_map of it does."""
    a = make_agent(mode)
    gpa = a.alloc_buffer(pages * PAGE)
    size = max(1, pages * PAGE - off)
    one = (guest_of(a), K.freeze(a))
    two = (guest_of(a), K.freeze(a))
    for g in (one[0], two[0]):
        kg.mem_alloc(g, pages)
    want = K.dma_map(*one, cpu, gpa + off, size, direction, t)
    out = np.zeros((1, 2), np.int64)
    got = K.map_sg(*two, cpu, np.array([[gpa + off, size]], np.int64), 1, direction, t, out,
                   1)
    assert got == want and out[0].tolist() == [want[0], size]
    for x, y in zip((*one[0], *one[1]), (*two[0], *two[1]), strict=True):
        assert np.array_equal(x, y)


def test_sg_many_lists_reused():
    """Adversarial by hand: scatter lists of 1..64 pages in 1..64 segments on every CPU,
    coherent pages between them, unmapped out of order and mapped again, across epochs."""
    rng = np.random.default_rng(7)
    seq = []
    for _ in range(300):
        r = rng.integers(0, 12)
        kind = "sg" if r < 5 else "coherent" if r < 6 else "unmap" if r < 11 else "epoch"
        seq.append((kind, int(rng.integers(0, 4)), int(rng.integers(1, 64 * PAGE + 1)),
                    rng.random(63).tolist(), int(rng.integers(0, 3)),
                    int(rng.integers(0, 3000))))
    seq += [("timer", 0, 0, [], 0, 0)] * 3 + [("epoch", 0, 0, [], 0, 0)]
    for policy, contiguity in (("strict", 0.1), ("lazy", 0.5)):
        a = make_agent("nested", policy, 3, ats=True, fq_size=4)
        run_sg_pair(a, seq, contiguity)
        assert a.stats["iommu_map_events"] > 2 * a.stats["maps"] > 200


# --- shadow (caching mode) ------------------------------------------------------------------
@settings_
@given(st.lists(op, max_size=60), st.integers(1, 3), st.booleans(),
       st.sampled_from(["strict", "lazy"]), st.sampled_from([0, K._SLACK]))
def test_shadow_equals_python(seq, vcpus, ats, policy, slack):
    """Shadow: second-level table stores (no op-log rows), the page-selective invalidation
    after every map and unmap, the trap, and the VMM's shadow walk over the range (its VFIO
    map / unmap rows, times and counters) equal after every call; lazy is strict here, as
    Linux forces it under caching mode (also with arrays frozen without room)."""
    run_pair(make_agent("shadow", policy, vcpus, ats), seq, slack)


@settings_
@given(st.lists(sg_op, max_size=50), st.sampled_from([0.0, 0.1, 0.7, 1.0]),
       st.integers(1, 3), st.booleans(), st.sampled_from([0, K._SLACK]))
def test_sg_shadow_equals_python(seq, contiguity, vcpus, ats, slack):
    """Shadow scatter lists: one IOVA range per list, one invalidation (and one shadow walk)
    for the whole list after its segments' stores, coherent maps included."""
    run_sg_pair(make_agent("shadow", "strict", vcpus, ats), seq, contiguity, slack)


def test_shadow_many_pages_reused():
    """Adversarial by hand under shadow: mappings of 1..64 pages on every CPU, unmapped out
    of order and mapped again (a page shadowed again at another GPA, invalidation ranges
    wider than the mapping), across epochs."""
    rng = np.random.default_rng(11)
    seq = []
    for _ in range(400):
        r = rng.integers(0, 10)
        kind = "map" if r < 5 else "unmap" if r < 9 else "epoch"
        seq.append((kind, int(rng.integers(0, 4)), int(rng.integers(0, 64 * PAGE)),
                    int(rng.integers(0, PAGE)), int(rng.integers(0, 3)),
                    int(rng.integers(0, 3000))))
    seq += [("epoch", 0, 0, 0, 0, 0)]
    g, _d = run_pair(make_agent("shadow", "strict", 3, ats=True), seq, 0)
    s = dict(zip(GUEST_COUNTERS, g.stats.tolist(), strict=True))
    assert s["vmm_map_calls"] > 1000 and s["vmm_unmap_calls"] > 1000
    assert s["vm_exits"] == s["maps"] + s["unmaps"] - s["dma_api_errors"]
