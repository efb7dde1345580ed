"""Trace format round trip, error reporting, ftrace import and TraceWorkload replay."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workloads.trace import (
    OP_DMA_READ,
    OP_DMA_WRITE,
    OP_LIVE,
    OP_MAP,
    OP_UNMAP,
    TRACE_COLUMNS,
    TraceError,
    TraceWorkload,
    import_ftrace,
    read_trace,
    write_trace,
)

SAMPLE = Path(__file__).parent / "data" / "iommu_map_unmap.trace.txt"
HEADER = {"format": "iommu-emu-trace", "version": 2, "devices": ["nic0"]}


def batch(rows: list[tuple[int, ...]]) -> dict[str, list[int]]:
    """Columns of rows (t_ns, op, dev, iova, paddr, size[, call]); call 0 when left out."""
    return {c: [(*r, 0)[i] if i < len(r) + 1 else 0 for r in rows]
            for i, c in enumerate(TRACE_COLUMNS)}


ROWS = [  # t_ns, op, dev, iova, paddr, size
    (100, OP_MAP, 0, 0xFFFF_C000, 0x1_2345_6000, 4096),
    (150, OP_DMA_WRITE, 1, 0xFFFF_C100, 0, 1500),
    (200, OP_MAP, 1, 0xFFFE_0000, 0x2_0000_0800, 8192),
    (260, OP_DMA_READ, 1, 0xFFFE_0800, 0, 4096),
    (300, OP_UNMAP, 0, 0xFFFF_C000, 0, 4096),
    (300, OP_DMA_WRITE, 0, 0xFFFF_C000, 0, 64),
    (400, OP_UNMAP, 1, 0xFFFE_0000, 0, 8192),
    (450, OP_UNMAP, 1, 0xDEAD_0000, 0, 4096),
]


def write_sample(path: Path) -> None:
    write_trace(path, ["nic0", "nvme0"], [batch(ROWS[:3]), batch([]), batch(ROWS[3:])])


def test_round_trip(tmp_path):
    """write_trace then read_trace gives the same records, typed columns, batch by batch."""
    path = tmp_path / "t.trace"
    assert write_trace(path, ["nic0", "nvme0"], [batch(ROWS[:3]), batch(ROWS[3:])]) == 8
    got = list(read_trace(path))
    assert len(got) == 2
    for name, dtype in TRACE_COLUMNS.items():
        col = np.concatenate([b[name] for b in got])
        assert col.dtype == dtype
        assert col.tolist() == [(*r, 0)[list(TRACE_COLUMNS).index(name)] for r in ROWS]


def test_numpy_columns_and_big_addresses(tmp_path):
    """numpy columns are accepted and 64-bit IOVAs survive."""
    path = tmp_path / "t.trace"
    cols = {c: np.zeros(3, dtype=d) for c, d in TRACE_COLUMNS.items()}
    cols["iova"] = np.array([0, 1 << 63, (1 << 64) - 4096], dtype=np.uint64)
    cols["op"][:] = OP_DMA_READ
    write_trace(path, ["d"], [cols])
    (b,) = read_trace(path)
    assert b["iova"].tolist() == [0, 1 << 63, (1 << 64) - 4096]


def test_truncated_file_raises(tmp_path):
    """Cutting a trace anywhere raises TraceError, never a raw msgpack error."""
    path = tmp_path / "t.trace"
    write_sample(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.trace"
    for n in (0, 1, 5, len(data) // 2, len(data) - 12, len(data) - 1):
        cut.write_bytes(data[:n])
        with pytest.raises(TraceError) as err:
            list(read_trace(cut))
        assert str(cut) in str(err.value)
    # cut exactly at a frame boundary: the missing end frame is noticed
    header_len = len(msgpack.packb({"format": "iommu-emu-trace", "version": 2,
                                    "devices": ["nic0", "nvme0"]}))
    cut.write_bytes(data[:header_len])
    with pytest.raises(TraceError, match="no end frame"):
        list(read_trace(cut))


def test_random_bytes_raise(tmp_path):
    """Garbage raises TraceError whatever the bytes."""
    rng = np.random.default_rng(0)
    path = tmp_path / "g.trace"
    for _ in range(40):
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 300)),
                                      dtype=np.uint8).tobytes())
        with pytest.raises(TraceError):
            list(read_trace(path))


def test_garbled_body_bytes_raise(tmp_path):
    """Flipping bytes inside a valid trace raises TraceError (or reads cleanly)."""
    path = tmp_path / "t.trace"
    write_sample(path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    bad = tmp_path / "b.trace"
    raised = 0
    for _ in range(40):
        d = bytearray(data)
        for i in rng.integers(0, len(d), 3):
            d[int(i)] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(d))
        try:
            list(read_trace(bad))
        except TraceError:
            raised += 1
    assert raised > 0


def frames(*objs) -> bytes:
    return b"".join(msgpack.packb(o) for o in objs)


END1 = {"end": True, "batches": 1, "records": 1}
ONE = batch([(1, OP_MAP, 0, 0x1000, 0x2000, 4096)])


@pytest.mark.parametrize(("objs", "what"), [
    ([{"format": "pcap", "version": 1, "devices": ["a"]}, END1], "header"),
    ([[1, 2, 3]], "header"),
    ([{**HEADER, "version": 3}, END1], "version"),
    ([{**HEADER, "devices": []}, END1], "devices"),
    ([HEADER, {**ONE, "size": [1, 2]}, END1], "lengths differ"),
    ([HEADER, {k: v for k, v in ONE.items() if k != "paddr"}, END1], "missing"),
    ([HEADER, {**ONE, "extra": [1]}, END1], "unknown"),
    ([HEADER, {**ONE, "op": [7]}, END1], "'op'"),
    ([HEADER, {**ONE, "dev": [1]}, END1], "'dev'"),
    ([HEADER, {**ONE, "t_ns": [-1]}, END1], "'t_ns'"),
    ([HEADER, {**ONE, "size": ["x"]}, END1], "non-integers"),
    ([HEADER, {**ONE, "size": [1.5]}, END1], "non-integers"),
    ([HEADER, {**ONE, "iova": 5}, END1], "not arrays"),
    ([HEADER, batch([(5, 0, 0, 0, 0, 1), (4, 0, 0, 0, 0, 1)]), END1], "decreases"),
    ([HEADER, batch([(5, OP_UNMAP, 0, 0, 7, 1)]), END1], "paddr"),
    ([HEADER, "hello", END1], "not a map"),
    ([HEADER, ONE, {"end": True, "batches": 2, "records": 1}], "end frame counts"),
    ([HEADER, ONE, END1, ONE], "after the end"),
    ([HEADER, ONE], "no end frame"),
])
def test_bad_frames_raise(tmp_path, objs, what):
    """Wrong header, columns, lengths, types, ranges or time order each name the problem."""
    path = tmp_path / "bad.trace"
    path.write_bytes(frames(*objs))
    with pytest.raises(TraceError, match=what):
        list(read_trace(path))


def test_decreasing_time_across_batches(tmp_path):
    """Time must not go back from one batch to the next either."""
    path = tmp_path / "bad.trace"
    path.write_bytes(frames(HEADER, batch([(10, 0, 0, 0, 0, 1)]), batch([(9, 0, 0, 0, 0, 1)]),
                            {"end": True, "batches": 2, "records": 2}))
    with pytest.raises(TraceError, match="frame 2: t_ns decreases"):
        list(read_trace(path))


def test_write_rejects_bad_batches(tmp_path):
    """write_trace validates as read_trace does and leaves no file behind."""
    path = tmp_path / "w.trace"
    with pytest.raises(TraceError, match="'dev'"):
        write_trace(path, ["a"], [batch([(1, OP_MAP, 3, 0, 0, 1)])])
    with pytest.raises(TraceError, match="missing"):
        write_trace(path, ["a"], [{"t_ns": [1]}])
    assert list(tmp_path.iterdir()) == []


def test_import_sample_ftrace(tmp_path):
    """The sample's map/unmap events import with their counts, times and unmapped sizes."""
    out = tmp_path / "s.trace"
    counts = import_ftrace(SAMPLE, out, device="nvme0")
    text = SAMPLE.read_text().splitlines()
    assert counts["map"] == sum(": map: " in line for line in text) == 8
    assert counts["unmap"] == sum(": unmap: " in line for line in text) == 7
    assert counts["skipped"] == 1 and counts["live"] == 1 and counts["records"] == 16
    (b,) = read_trace(out)
    # the first unmap's IOVA was mapped before the trace began: declared live, first
    assert (int(b["op"][0]), int(b["iova"][0]), int(b["size"][0])) == (OP_LIVE, 0xFFFF_D000,
                                                                       4096)
    assert int(b["t_ns"][0]) == 5123_400108_000
    assert int(b["t_ns"][-1]) == 5123_400213_000
    first_map = int(np.flatnonzero(b["op"] == OP_MAP)[0])
    assert int(b["iova"][first_map]) == 0xFFFF_C000
    assert int(b["paddr"][first_map]) == 0x1_2345_6800
    assert int(b["size"][first_map]) == 2048
    unmap_sizes = b["size"][b["op"] == OP_UNMAP].tolist()
    assert unmap_sizes == [4096, 4096, 8192, 16384, 65536, 4096, 4096]   # unmapped_size


@pytest.mark.parametrize(("line", "what"), [
    ("garbage here", "not an ftrace event line"),
    ("  a-1  [000] .....  9999.000001: map: IOMMU: iova=0x1000 paddr=0x0 size=1", "bad map"),
    ("  a-1  [000] .....  9999.000001: unmap: IOMMU: iova=0x0000000000001000 - "
     "0x0000000000002000 size=4096", "bad unmap"),
    ("  a-1  [000] .....  9999.000001: map: IOMMU: iova=0x0000000000001000 - "
     "0x0000000000003000 paddr=0x0000000000005000 size=4096", "does not match size"),
    ("  a-1  [000] .....  0.000001: map: IOMMU: iova=0x0000000000001000 - "
     "0x0000000000002000 paddr=0x0000000000005000 size=4096", "backwards"),
])
def test_import_bad_line_names_line(tmp_path, line, what):
    """A malformed line raises TraceError naming its line number."""
    src = tmp_path / "bad.txt"
    src.write_text("# tracer: nop\n" + SAMPLE.read_text().splitlines()[12] + "\n" + line + "\n")
    with pytest.raises(TraceError, match=f"line 3: .*{what}"):
        import_ftrace(src, tmp_path / "o.trace")
    assert not (tmp_path / "o.trace").exists()


def test_replay_sample_counts(tmp_path, make_ctx):
    """Replaying the imported sample gives the trace's map and unmap counts; the IOVA
    unmapped before any map is a live mapping made at the start, so the replay unmaps it."""
    out = tmp_path / "s.trace"
    counts = import_ftrace(SAMPLE, out)
    ctx = make_ctx(vcpus=2)
    w = TraceWorkload(TraceWorkload.Params(path=str(out)))
    w.start(ctx)
    assert len(ctx.maps) == w.live_maps == counts["live"] == 1     # before any traced event
    ctx.run_until(10**12)
    assert (w.maps, w.unmaps) == (counts["map"], counts["unmap"])
    # no dma:* events, so calls are not known: the three contiguous pieces are taken as one
    assert len(ctx.map_sgs) == 1 and len(ctx.map_sgs[0]) == 3
    assert len(ctx.maps) + sum(len(s) for s in ctx.map_sgs) == counts["map"] + w.live_maps
    assert w.unmatched_unmaps == 0
    # ...and the one traced unmap covering them is one dma_unmap_sg
    assert len(ctx.unmap_sgs) == 1
    assert w.unmap_calls == len(ctx.unmaps) + len(ctx.unmap_sgs) == counts["unmap"]
    assert ctx.live_mappings() == 0
    assert ctx.errors == []


def test_unmatched_unmap_touches_nothing(tmp_path, make_ctx):
    """An unmap of a traced IOVA never mapped (and not declared live) is counted and not
    replayed, even when its raw value equals the emulated IOVA of a live mapping."""
    IOVA_BASE = 1 << 32           # the fake guest's first IOVA (tests/workloads/conftest.py)
    path = tmp_path / "t.trace"
    write_trace(path, ["nic0"], [batch([(10, OP_MAP, 0, 0xFFFF_0000, 0x5000, 4096),
                                        (20, OP_UNMAP, 0, IOVA_BASE, 0, 4096),
                                        (1000, OP_UNMAP, 0, 0xFFFF_0000, 0, 4096)])])
    ctx = make_ctx()
    w = TraceWorkload(TraceWorkload.Params(path=str(path)))
    w.start(ctx)
    ctx.run_until(5)
    assert ctx.maps[0][1] == IOVA_BASE          # the emulated IOVA equals the raw unmap's
    ctx.run_until(15)
    assert w.unmatched_unmaps == 1 and ctx.unmaps == [] and ctx.live_mappings() == 1
    ctx.run_until(10**6)
    assert len(ctx.unmaps) == 1 and ctx.live_mappings() == 0 and ctx.errors == []
    assert w.summary_counters()["trace_unmatched_unmaps"] == 1


def test_live_records_replay_first_and_must_lead(tmp_path, make_ctx):
    """Declared live mappings are mapped before the first traced event; a live record after
    another record is refused when read."""
    path = tmp_path / "t.trace"
    write_trace(path, ["nvme0"], [batch([(100, OP_LIVE, 0, 0xFFF0_0000, 0, 8192, 1),
                                         (100, OP_LIVE, 0, 0xFFF1_0000, 0, 4096, 2),
                                         (500, OP_UNMAP, 0, 0xFFF1_0000, 0, 4096, 3),
                                         (700, OP_UNMAP, 0, 0xFFF0_0000, 0, 8192, 4)])])
    ctx = make_ctx()
    w = TraceWorkload(TraceWorkload.Params(path=str(path)))
    w.start(ctx)
    assert [m[2] for m in ctx.maps] == [8192, 4096] and w.live_maps == 2 and w.maps == 0
    ctx.run_until(10**6)
    assert [u[2] for u in ctx.unmaps] == [4096, 8192] and w.unmatched_unmaps == 0
    assert [u[0] for u in ctx.unmaps][1] >= 600      # (700 - 100) after the start
    bad = tmp_path / "b.trace"
    with pytest.raises(TraceError, match="live record follows"):
        write_trace(bad, ["a"], [batch([(1, OP_MAP, 0, 0, 0x1000, 1)]),
                                 batch([(2, OP_LIVE, 0, 0, 0, 1)])])


def test_replay_dmas_follow_mappings(tmp_path, make_ctx):
    """DMAs go to the emulated IOVA + offset while mapped; a DMA or unmap of an IOVA that is
    not mapped is counted, never sent to the raw traced address."""
    path = tmp_path / "t.trace"
    write_sample(path)
    ctx = make_ctx(vcpus=1)
    w = TraceWorkload(TraceWorkload.Params(path=str(path), time_scale=2.0))
    w.start(ctx)
    ctx.run_until(10**9)
    assert (w.maps, w.unmaps, w.dmas) == (2, 3, 3)
    assert [d.dev for d in ctx.dmas] == ["nvme0"]
    (dma,) = ctx.dmas
    assert dma.t_ns == 320                                    # (260 - 100) * 2
    nvme_map = ctx.maps[1]
    assert dma.mapped and dma.iova == nvme_map[1] + 0x800 and not dma.write
    assert (w.unmatched_dmas, w.unmatched_unmaps) == (2, 1)
    # the same traced paddr maps the same guest buffer offset
    assert nvme_map[1] % 4096 == 0x800
    assert ctx.errors == []


def test_replay_loop(tmp_path, make_ctx):
    """loop=True replays the file again after its end, counts doubling per pass."""
    path = tmp_path / "t.trace"
    write_sample(path)
    ctx = make_ctx()
    w = TraceWorkload(TraceWorkload.Params(path=str(path), loop=True))
    w.start(ctx)
    ctx.run_until(1000)
    assert w.passes >= 3
    assert w.maps >= 2 * (w.passes - 1) and w.unmaps >= 3 * (w.passes - 1)


def test_params_validate(tmp_path):
    """validate() catches a missing path, an unreadable file and a bad time scale."""
    bad = tmp_path / "x.trace"
    bad.write_bytes(b"\x01\x02")
    assert [k for k, _ in TraceWorkload.Params().validate()] == ["path"]
    assert [k for k, _ in TraceWorkload.Params(path=str(tmp_path / "no")).validate()] \
        == ["path"]
    assert [k for k, _ in TraceWorkload.Params(path=str(bad)).validate()] == ["path"]
    good = tmp_path / "g.trace"
    write_sample(good)
    assert TraceWorkload.Params(path=str(good)).validate() == []
    assert [k for k, _ in TraceWorkload.Params(path=str(good), time_scale=0).validate()] \
        == ["time_scale"]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([0, 1, 2, 3, 5]),
                          st.integers(0, 1), st.integers(0, (1 << 64) - 1),
                          st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
                          st.integers(0, (1 << 64) - 1)), max_size=40),
       st.integers(1, 5))
def test_round_trip_property(tmp_path, rows, nbatches):
    """Any valid records survive write/read unchanged, however they are batched."""
    rows = sorted(rows)
    rows = [(t, op, d, iova, paddr if op == OP_MAP else 0, size, call)
            for t, op, d, iova, paddr, size, call in rows]
    step = -(-len(rows) // nbatches) or 1
    path = tmp_path / "p.trace"
    write_trace(path, ["a", "b"], [batch(rows[i:i + step]) for i in range(0, len(rows), step)])
    got = [tuple(int(b[c][i]) for c in TRACE_COLUMNS)
           for b in read_trace(path) for i in range(len(b["t_ns"]))]
    assert got == rows


@pytest.mark.parametrize(("columns", "what"), [
    ({**ONE, "iova": 5}, "not arrays"),
    ("not a map", "not a map"),
    ({**ONE, "size": [1, 2]}, "lengths differ"),
])
def test_write_rejects_bad_columns(tmp_path, columns, what):
    """write_trace names bad column containers instead of crashing."""
    with pytest.raises(TraceError, match=what):
        write_trace(tmp_path / "w.trace", ["a"], [columns])


def _good_then(tail: bytes) -> bytes:
    """A valid header and first batch, then ``tail`` as frame 2, then an end frame."""
    return (frames(HEADER, ONE) + tail
            + msgpack.packb({"end": True, "batches": 2, "records": 2}))


def _nested(depth: int) -> bytes:
    """A batch whose ``call`` column is an array nested ``depth`` deep."""
    body = b"".join(msgpack.packb(c) + msgpack.packb(ONE[c]) for c in list(TRACE_COLUMNS)[:-1])
    return b"\x87" + body + msgpack.packb("call") + b"\x91" * depth + b"\x00"


@pytest.mark.parametrize(("tail", "what"), [
    (msgpack.packb({**ONE, "size": [None]}), "non-integers"),
    # a 2^31-element array header with almost nothing behind it
    (b"\x87" + msgpack.packb("t_ns") + b"\xdd\x7f\xff\xff\xff" + b"\x00" * 64, "max_array_len"),
    (_nested(100_000), "nested too deeply"),
    (_nested(50), "non-integers"),
])
def test_later_malformed_batch_is_named_and_fails_validate(tmp_path, tail, what):
    """A trace whose header and first batch are fine but whose second batch is malformed
    raises TraceError naming the file and frame 2 when read, and validate (which scans the
    whole file) reports it, so a run never starts on it."""
    path = tmp_path / "later.trace"
    path.write_bytes(_good_then(tail))
    with pytest.raises(TraceError, match=f"later.trace: frame 2: .*{what}"):
        list(read_trace(path))
    errors = TraceWorkload.Params(path=str(path)).validate()
    assert [k for k, _ in errors] == ["path"] and "frame 2" in errors[0][1]


def test_version_1_files_still_read(tmp_path):
    """A version 1 file (no call column) reads with call 0: calls not known."""
    path = tmp_path / "v1.trace"
    v1 = {c: ONE[c] for c in TRACE_COLUMNS if c != "call"}
    path.write_bytes(frames({**HEADER, "version": 1}, v1, END1))
    (b,) = read_trace(path)
    assert b["call"].tolist() == [0] and b["paddr"].tolist() == [0x2000]
    path.write_bytes(frames({**HEADER, "version": 1}, ONE, END1))
    with pytest.raises(TraceError, match="unknown \\['call'\\]"):
        list(read_trace(path))


def test_import_errors_blame_the_right_file(tmp_path, capsys):
    """A missing input names the input; an output that cannot be written names the output;
    the command line prints the file once."""
    from cluster.cli import main

    with pytest.raises(TraceError) as err:
        import_ftrace(tmp_path / "none.txt", tmp_path / "o.trace")
    assert err.value.path == str(tmp_path / "none.txt") and "cannot read" in str(err.value)
    out = tmp_path / "no" / "dir" / "o.trace"
    with pytest.raises(TraceError) as err:
        import_ftrace(SAMPLE, out)
    assert err.value.path == str(out) and "cannot write" in str(err.value)
    assert str(SAMPLE) not in str(err.value)
    bad = tmp_path / "bad.txt"
    bad.write_text("garbage\n")
    assert main(["trace", "import", str(bad), "-o", str(tmp_path / "o.trace")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count(str(bad)) == 1 and "line 1" in stderr


def test_run_id_covers_trace_content_and_paths_resolve_against_the_config(tmp_path,
                                                                          monkeypatch):
    """A relative trace path resolves against the config file's folder whatever the working
    directory, and re-importing different content under the same name changes the run id."""
    from cluster.config import load_config
    from cluster.results import run_id

    cfg_dir = tmp_path / "exp"
    cfg_dir.mkdir()
    write_sample(cfg_dir / "w.trace")
    (cfg_dir / "c.toml").write_text(
        '[experiment]\nname = "t"\nduration_us = 100\n[host]\nmemory_mib = 64\n'
        '[vm.g]\nmode = "nested"\nmemory_mib = 16\n'
        '[vm.g.workload]\nkind = "trace"\npath = "w.trace"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_dir / "c.toml")
    assert cfg.vms[0].workload.params.path == str(cfg_dir / "w.trace")
    first = run_id(cfg)
    assert run_id(load_config(cfg_dir / "c.toml")) == first
    write_trace(cfg_dir / "w.trace", ["nic0", "nvme0"], [batch(ROWS[:3])])
    assert run_id(load_config(cfg_dir / "c.toml")) != first
