"""The guest's fixed cost per VM-epoch: the epoch's batch framed in the compiled call.

- guest.frame_log / take_frame write protocol.pack_ops's msgpack frame of take_log's batch,
  byte for byte, on random logs of every size class msgpack encodes differently (n as a
  fixint, uint8, uint16, uint32; the records as bin 8, 16, 32), the empty log included;
  too small a buffer takes nothing.
- CompiledNicAgent / CompiledNvmeAgent ``run_epoch_frame`` gives the bytes of
  ``pack_ops(run_epoch(...))`` epoch by epoch, with the same stats and workload counters
  after, also with a frame buffer too small (the fallback) and arrays always short of room.
- The workload's counters live in the loop's array (``counters_in_array``): reads and
  writes go there, a pickled agent's workload reads its own copy.
- protocol: the empty batch's frame and its decoding are msgpack's; InProcTransport hands
  the host an empty OP_DTYPE batch for an idle VM.
"""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import parse_config
from cluster.engine import Engine, InProcTransport
from cluster.runner import build
from host_iommu import protocol
from host_iommu.protocol import OP_DTYPE, merge, pack_ops, unpack_ops
from tests.system.golden import _exp, _nic, _nvme
from vm_agent import compiled, compiled_nvme
from vm_agent.kernels import guest as kg
from vm_agent.kernels import nic as knic
from vm_agent.kernels import nvme as knvme


def _log(n: int, seed: int) -> kg.GuestArrays:
    rng = np.random.default_rng(seed)
    g = kg.new_arrays(int(rng.integers(1, 2**31 - 1)), 1, 64, log_rows=max(n, 1))
    g.log[:n] = rng.integers(-2**63, 2**63 - 1, size=(n, kg.LOG_COLUMNS), dtype=np.int64,
                             endpoint=True)
    g.ctl[kg.C_LOG_N] = n
    g.ctl[kg.C_SEQ0] = int(rng.integers(0, 2**40))
    return g


def _twin(g: kg.GuestArrays) -> kg.GuestArrays:
    return kg.GuestArrays(*(a.copy() for a in g))


def _check_frame(n: int, seed: int) -> None:
    g = _log(n, seed)
    h = _twin(g)
    want = pack_ops(kg.take_log(g))
    out = np.full(kg.frame_bytes(n), 0xAB, np.uint8)
    nb = kg.take_frame(h.ctl, h.log, out)
    assert out[:nb].tobytes() == want
    assert np.array_equal(g.ctl, h.ctl)           # taken the same: fill 0, seq0 advanced
    assert msgpack.packb({"dtype": "OP_DTYPE/1", "n": n, "data": b"\0" * 59 * n})[:nb - 59 * n] \
        == want[:nb - 59 * n]


@pytest.mark.parametrize("n", [0, 1, 4, 5, 127, 128, 255, 256, 1110, 1111, 65535, 65536])
def test_frame_boundaries(n: int) -> None:
    """Each of msgpack's size classes and their edges (n: fixint to uint32; 59 n bytes:
    bin 8 up to 4 rows, bin 16 up to 1110, bin 32 from 1111)."""
    _check_frame(n, n)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 2**32))
def test_frame_random(n: int, seed: int) -> None:
    _check_frame(n, seed)


def test_frame_too_small_takes_nothing() -> None:
    g = _log(10, 1)
    ctl = g.ctl.copy()
    out = np.zeros(kg.frame_bytes(10) - 1, np.uint8)
    assert kg.take_frame(g.ctl, g.log, out) == 0
    assert np.array_equal(g.ctl, ctl)


def test_empty_frame_is_msgpacks() -> None:
    empty = np.zeros(0, OP_DTYPE)
    frame = msgpack.packb({"dtype": "OP_DTYPE/1", "n": 0, "data": b""})
    assert pack_ops(empty) == frame
    a = unpack_ops(frame)
    assert a.dtype is OP_DTYPE and a.shape == (0,) and a.flags.writeable
    for other in (bytearray(frame), memoryview(frame)):   # the general path, same answer
        b = unpack_ops(other)
        assert b.dtype == OP_DTYPE and b.shape == (0,)
    with pytest.raises(protocol.ProtocolError, match="a frame is bytes"):
        unpack_ops(np.frombuffer(frame, np.uint8))


NIC = _exp("g-nic", {"a": {**_nic("nested", rx_ring=8, tx_ring=8, offered_gbps=20.0),
                           "count": 2},
                     "b": _nic("passthrough", request_response=True, packets=20)})
NVME = _exp("g-nvme", {"a": _nvme("nested", "lazy", io_sizes=[4096, 65536, 262144],
                                  io_weights=[0.5, 0.3, 0.2]),
                       "b": _nvme("passthrough")})


class SmallOut(compiled.CompiledNicAgent):
    """A frame buffer of 16 bytes: every non-empty epoch takes the fallback."""

    def run_epoch_frame(self, t_end_ns: int) -> bytes:
        if self.compiled:
            self._out = np.zeros(16, np.uint8)
        return super().run_epoch_frame(t_end_ns)


class Tight(compiled.CompiledNicAgent):
    """The log grown only to the room one step needs: the loop stops for room often."""

    stops = 0

    def _grown_guest(self, g: kg.GuestArrays) -> kg.GuestArrays:
        Tight.stops += 1
        n = int(g.ctl[kg.C_LOG_N])
        log = np.zeros((n + int(g.ctl[kg.C_LOG_SLACK]), kg.LOG_COLUMNS), np.int64)
        log[:n] = g.log[:n]
        heap = g.heap if kg.has_room(g._replace(log=log)) else kg.grown(g).heap
        return g._replace(log=log, heap=heap)


def _run(raw: dict, framed: bool, n: int, cls: type | None = None) -> list[bytes]:
    host, agents, _ = build(parse_config(raw))
    if cls is not None:
        for a in agents:
            assert a.compiled
        agents = [_rebuilt(a, cls) for a in agents]
    out: list[bytes] = []
    for k in range(n):
        t_end = (k + 1) * 100_000
        frames = {a.vm: (a.run_epoch_frame(t_end) if framed else pack_ops(a.run_epoch(t_end)))
                  for a in agents}
        out.extend(frames.values())
        for a in agents:
            names = knvme.W_NAMES if a.workload.kind == "nvme" else knic.W_NAMES
            out.append(repr(sorted(a.stats.items())).encode())
            out.append(repr([getattr(a.workload, x) for x in names]).encode())
            out.append(repr(a.dma.stale_bound_ns).encode())
        reports = host.apply_epoch(merge([unpack_ops(f) for f in frames.values()]),
                                   t_end - 100_000)
        for a in agents:
            a.receive(reports[a.vm])
    return out


def _rebuilt(a: compiled.CompiledNicAgent, cls: type) -> compiled.CompiledNicAgent:
    """The same agent as an instance of ``cls`` (a CompiledNicAgent subclass)."""
    b = pickle.loads(pickle.dumps(a))
    b.__class__ = cls
    if cls is Tight:     # the log as small as the next step allows
        b.g = b._grown_guest(b.g)
    return b


@pytest.mark.parametrize("raw", [NIC, NVME], ids=["nic", "nvme"])
def test_run_epoch_frame_same_bytes(raw: dict) -> None:
    want = _run(raw, False, 12)
    assert _run(raw, True, 12) == want
    assert any(len(f) > 1200 for f in want)
    if raw is NIC:       # VM b goes idle once its packets are sent
        assert any(f == protocol._EMPTY_FRAME for f in want)


def test_run_epoch_frame_fallbacks() -> None:
    """A frame that does not fit, and a loop stopped for room again and again."""
    want = _run(NIC, False, 8)
    assert _run(NIC, True, 8, SmallOut) == want
    Tight.stops = 0
    assert _run(NIC, True, 8, Tight) == want
    assert Tight.stops >= 4


def test_counters_in_array() -> None:
    _h, agents, _ = build(parse_config(NIC))
    a = agents[0]
    assert a.compiled and type(a.workload) is compiled.NicWorkloadOnArrays
    a.run_epoch_frame(300_000)
    wl = a.workload
    assert [getattr(wl, x) for x in knic.W_NAMES] == a.nic.w.tolist()
    assert wl.rx_packets > 0 and type(wl.rx_packets) is int
    wl.polls = 12345
    assert a.nic.w[knic.W_NAMES.index("polls")] == 12345
    b = pickle.loads(pickle.dumps(a))
    assert b.workload._w is b.nic.w and b.workload.polls == 12345
    _h, nv, _ = build(parse_config(NVME))
    assert type(nv[0].workload) is compiled_nvme.NvmeWorkloadOnArrays


def test_engine_idle_vm() -> None:
    """A VM that logs nothing in an epoch: its batch is an empty OP_DTYPE array and the
    run goes on as the Python path's (an idle pass-through VM: nothing offered)."""
    raw = _exp("g-idle", {"a": _nic("nested"), "b": _nic("passthrough", packets=1)},
               duration_us=600)
    host, agents, _ = build(parse_config(raw))
    tr = InProcTransport(host, agents)
    seen: list[dict] = []
    run = tr.run_epochs

    def spy(t_end_ns: int) -> dict:
        out = run(t_end_ns)
        seen.append(out)
        return out
    tr.run_epochs = spy
    Engine(tr, 100_000).run(600_000)
    empties = [b for s in seen for b in s.values() if b.size == 0]
    assert empties and all(b.dtype is OP_DTYPE for b in empties)
