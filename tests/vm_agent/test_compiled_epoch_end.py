"""The end of a compiled epoch (vm_agent/compiled.py run_epoch, kernels/nic.py end_here)
and the entry points agents share (CompiledNicAgent._kernels):
the loop ends the epoch in its own call (dmaapi.end_epoch: the retired unmap ids as
OP_UNMAP_RETIRE rows) when the log has their rows free, ST_ENDED; otherwise it returns
ST_DONE and Python grows the log and ends it. Both ways give the same batch, the same arrays
and the same stats; the NVMe loop shares end_here."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from host_iommu.protocol import OP_UNMAP_RETIRE
from tests.vm_agent.test_compiled_nic import CONFIGS, _agents, _epochs
from tests.vm_agent.test_compiled_nvme import CONFIGS as NVME_CONFIGS
from vm_agent import compiled
from vm_agent.kernels import dmaapi
from vm_agent.kernels import guest as kg


def _both_ways(agent: compiled.CompiledNicAgent, ids: list[int]) -> None:
    """Pending retired ``ids`` and an epoch end with no event before it, once with room in
    the log and once with none: the same results, the second through Python's _end."""
    a = agent
    b = pickle.loads(pickle.dumps(a))
    t_end = int(a.g.heap[0, kg.H_T]) if a.g.ctl[kg.C_HEAP_N] else a.now + 1
    for x in (a, b):
        n = int(x.d.ctl[dmaapi.D_RETIRED_N])
        x.d.retired[n:n + len(ids)] = ids
        x.d.ctl[dmaapi.D_RETIRED_N] = n + len(ids)
    used = int(b.g.ctl[kg.C_LOG_N])
    b.g = b.g._replace(log=np.ascontiguousarray(b.g.log[:used]))   # no row free
    ends = []
    real_end = b._end

    def counted(end, t):
        ends.append(t)
        return real_end(end, t)
    b._end = counted
    got_a, got_b = a.run_epoch(t_end), b.run_epoch(t_end)
    assert ends == [t_end]
    assert got_a.tobytes() == got_b.tobytes()
    assert (got_a["op"] == OP_UNMAP_RETIRE).sum() >= 1
    assert a.stats == b.stats and a.now == b.now == t_end
    for x, y in zip(a.g, b.g, strict=True):
        if x is not a.g.log:
            assert np.array_equal(x, y)
    assert a.d.ctl.tolist() == b.d.ctl.tolist()
    assert int(a.d.ctl[dmaapi.D_RETIRED_N]) == 0
    assert a.run_epoch(t_end + 100_000).tobytes() == b.run_epoch(t_end + 100_000).tobytes()


@pytest.mark.parametrize(("name", "ids"), [("ns-rr-limit", [90_001, 90_000, 90_002, 90_007]),
                                           ("nl-drops", [90_001, 90_000, 90_002, 90_007]),
                                           ("pt", [90_000])])
def test_nic_epoch_end_in_the_loop_or_in_python(name: str, ids: list[int]) -> None:
    h, agents = _agents(CONFIGS[name], True)
    _epochs(h, agents, 3)
    assert isinstance(agents[0], compiled.CompiledNicAgent) and agents[0].compiled
    _both_ways(agents[0], ids)


def test_nvme_epoch_end_in_the_loop_or_in_python() -> None:
    from vm_agent.compiled_nvme import CompiledNvmeAgent
    name = next(iter(NVME_CONFIGS))
    h, agents = _agents(NVME_CONFIGS[name], True)
    _epochs(h, agents, 3)
    assert isinstance(agents[0], CompiledNvmeAgent) and agents[0].compiled
    _both_ways(agents[0], [5, 3, 4][:len(agents[0].d.retired)])


def test_agents_of_the_same_array_types_share_entry_points() -> None:
    """_kernels types a VM's arrays once per fingerprint, not once per agent: agents of
    one config share the entry points; the NVMe loop's are its own; an unpickled agent
    finds them again with its Generator's words read anew."""
    from vm_agent.compiled_nvme import CompiledNvmeAgent
    _h, nics = _agents(CONFIGS["ns"], True)
    _h, nvmes = _agents(NVME_CONFIGS[next(iter(NVME_CONFIGS))], True)
    assert len(nics) >= 2 and all(a.compiled for a in nics + nvmes)
    assert nics[0]._kernels() is nics[1]._kernels()
    assert isinstance(nvmes[0], CompiledNvmeAgent)
    assert nvmes[0]._kernels()[0] is not nics[0]._kernels()[0]
    b = pickle.loads(pickle.dumps(nics[0]))
    assert "_entry" not in b.__dict__
    b.nic.rngp[:] = 0
    assert b._kernels() is nics[0]._kernels()
    assert b.nic.rngp.tolist() == kg.rng_words(b.rng).tolist()
