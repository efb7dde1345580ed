"""The fuzzer's checker catches what it claims to: positive controls on broken models.

Each test puts one deliberate bug into the model (monkeypatch, undone after the test), runs a
short scripted operation list through a Session and asserts the checker names the violation;
the same script on the unbroken model passes clean (the negative control).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import host_iommu.fault
import host_iommu.iommu
import host_iommu.nested
import host_iommu.qi
import host_iommu.server
import host_iommu.vfio
import tests.fuzz.checker
import vm_agent.flushq
import vm_agent.vmm
from host_iommu.defs import PAGE_SHIFT
from tests.fuzz import __main__ as cli
from tests.fuzz.checker import Session
from tests.fuzz.shrink import load, replay, save, shrink
from tests.fuzz.world import VmSpec, WorldSpec

HOST = {"memory_mib": 48, "iotlb_entries": 64, "sl_page_order": 0}


def spec(*modes: str, policy: str = "strict") -> WorldSpec:
    return WorldSpec(7, tuple(VmSpec(i + 1, m, policy) for i, m in enumerate(modes)), HOST)


def dma(vm: int, sid: int, addr: int, access: int = 1) -> dict:
    return {"k": "dma", "vm": vm, "wire": True, "sid": [sid], "pasid": [0], "addr": [addr],
            "access": [access], "dt": [0]}


def run(s: Session, ops: list[dict]) -> list:
    out = []
    for op in ops:
        out += s.step(op)[0]
    return out


def unmap_then_dma(s: Session, vm: int = 1, wait_ns: int = 5_000_000
                   ) -> tuple[list, list[dict]]:
    """Map a page, DMA to it (filling the IOTLB), unmap it strictly, wait, DMA again."""
    sid = s.world.devices[vm][0].sid
    script = [{"k": "map", "vm": vm, "dev": 0, "pages": 1, "write": True, "cpu": 0}]
    viols = run(s, script)
    ((_sid, iova),) = s.world.mappings[vm]
    rest = [dma(vm, sid, iova), {"k": "unmap", "vm": vm, "sid": sid, "iova": iova, "cpu": 0},
            {"k": "time", "ns": wait_ns}, dma(vm, sid, iova + 0x40)]
    script += rest
    return viols + run(s, rest), script


@pytest.mark.parametrize("mode", ["shadow", "nested"])
def test_clean_model_passes_the_script(mode):
    """Negative control: the unbroken model faults the DMA after a strict unmap."""
    s = Session(spec(mode, "shadow"))
    viols, _ = unmap_then_dma(s)
    assert viols == []
    assert s.world.server.counters[1]["faults"] >= 1  # the late DMA really was refused


@pytest.mark.parametrize("mode", ["shadow", "nested"])
def test_dropped_page_invalidation_is_caught(monkeypatch, mode):
    """A model whose page-selective IOTLB invalidations (0x2 / 0x6) do nothing: stale."""
    monkeypatch.setattr(host_iommu.iommu.CacheSet, "iotlb_page", lambda *a: None)
    monkeypatch.setattr(host_iommu.iommu.CacheSet, "piotlb_page", lambda *a: None)
    s = Session(spec(mode, "nested"))
    viols, _ = unmap_then_dma(s)
    assert [v.category for v in viols] == ["stale"]
    assert "after its unmap had to take effect" in viols[0].detail


def test_lazy_flush_timer_that_never_fires_is_caught(monkeypatch):
    """Nested lazy: a flush-queue timer that never flushes leaves the page reachable."""
    s = Session(spec("nested", "nested", policy="lazy"))
    viols, _ = unmap_then_dma(s, wait_ns=30_000_000)
    assert viols == [] and s.world.agents[1].stats["lazy_flushes"] == 1   # negative control
    monkeypatch.setattr(vm_agent.flushq.FlushQueue, "on_timer", lambda self, t: False)
    s = Session(spec("nested", "nested", policy="lazy"))
    viols, _ = unmap_then_dma(s, wait_ns=30_000_000)
    assert [v.category for v in viols] == ["stale"]


def test_vfio_unmap_without_flush_is_caught(monkeypatch):
    """VFIO unmap that clears the shadow table but queues no IOTLB invalidation: stale."""
    monkeypatch.setattr(host_iommu.vfio, "domain_flush_descs", lambda *a, **k: [])
    s = Session(spec("shadow", "shadow"))
    viols, _ = unmap_then_dma(s)
    assert [v.category for v in viols] == ["stale"]


def test_cross_vm_mapping_is_caught():
    """A second-level entry of VM 1 deliberately pointing at VM 2's frame: isolation."""
    s = Session(spec("passthrough", "passthrough"))
    h = s.world.server.iommu
    gpa = 0x10_0000
    other = int(h.vms[2].hpa_of[gpa >> PAGE_SHIFT])
    h.vms[1].sl.map(gpa, other << PAGE_SHIFT, 1 << PAGE_SHIFT, max_order=0)
    sid = s.world.devices[1][0].sid
    viols = run(s, [dma(1, sid, gpa), dma(1, sid, gpa + 0x2000)])
    assert [v.category for v in viols] == ["isolation"]
    assert "another VM's frame" in viols[0].detail
    assert f"{other << PAGE_SHIFT:#x}" in viols[0].detail


def test_dma_into_a_freed_frame_is_caught(monkeypatch):
    """A balloon that frees a frame the shadow table still maps (no pin check): isolation."""
    s = Session(spec("shadow", "shadow"))
    h = s.world.server.iommu
    sid = s.world.devices[1][0].sid
    run(s, [{"k": "map", "vm": 1, "dev": 0, "pages": 1, "write": True, "cpu": 0}])
    (((_sid, iova), (_n, ((gpa, _p),))),) = s.world.mappings[1].items()
    frame = int(h.vms[1].hpa_of[gpa >> PAGE_SHIFT])
    h.vms[1].hpa_of[gpa >> PAGE_SHIFT] = -1   # the host forgets the page and frees it
    h.mem.free(np.array([frame]))
    viols = run(s, [dma(1, sid, iova)])
    assert [v.category for v in viols] == ["isolation"]
    assert "a free frame" in viols[0].detail


def test_counter_moved_for_a_silent_vm_is_caught(monkeypatch):
    """A host that charges another VM for a batch it did not send: counters."""
    apply = host_iommu.server.HostServer.apply_epoch

    def leaky(self, ops):
        out = apply(self, ops)
        self.counters[2]["faults"] += 1
        return out

    monkeypatch.setattr(host_iommu.server.HostServer, "apply_epoch", leaky)
    s = Session(spec("passthrough", "passthrough"))
    viols = run(s, [dma(1, s.world.devices[1][0].sid, 0x10_0000)])
    assert [v.category for v in viols] == ["counters"]
    assert "VM 2 sent nothing" in viols[0].detail


def test_write_into_another_vms_tables_is_caught(monkeypatch):
    """An operation of VM 1 that changes a table page in VM 2's memory: writes."""
    apply = host_iommu.server.HostServer.apply_epoch

    def scribble(self, ops):
        out = apply(self, ops)
        if (ops["vm"] == 1).any():
            mem = self.iommu.mem
            frames = self.iommu.vms[2].hpa_of
            tables = frames[mem.slot_of[frames] >= 0]
            mem.slab[mem.slot_of[tables[0]], 7] ^= np.uint64(1)
        return out

    monkeypatch.setattr(host_iommu.server.HostServer, "apply_epoch", scribble)
    s = Session(spec("nested", "nested"))
    assert run(s, [{"k": "map", "vm": 2, "dev": 0, "pages": 1, "write": True, "cpu": 0}]) == []
    viols = run(s, [dma(1, s.world.devices[1][0].sid, 0x1000)])
    assert [v.category for v in viols] == ["writes"]


def test_escaping_exception_and_hang_are_caught(monkeypatch):
    """A model that raises, and one that never returns: exception, then hang (wall budget)."""
    def boom(self, *a, **k):
        raise KeyError(12345)

    monkeypatch.setattr(host_iommu.iommu.HostIommu, "translate", boom)
    s = Session(spec("passthrough", "passthrough"))
    viols = run(s, [dma(1, s.world.devices[1][0].sid, 0x10_0000)])
    assert [v.category for v in viols] == ["exception"]
    assert viols[0].key.startswith("KeyError@")
    assert s.broken

    def spin(self, *a, **k):
        while True:
            pass

    monkeypatch.setattr(host_iommu.iommu.HostIommu, "translate", spin)
    s = Session(spec("passthrough", "passthrough"), budget_s=0.3)
    viols = run(s, [dma(1, s.world.devices[1][0].sid, 0x10_0000)])
    assert [v.category for v in viols] == ["hang"]


def test_shrink_saves_a_minimal_replayable_reproducer(monkeypatch, tmp_path, capsys):
    """Noise around a stale-DMA bug shrinks away; the saved file replays to the violation."""
    monkeypatch.setattr(host_iommu.iommu.CacheSet, "iotlb_page", lambda *a: None)
    sp = spec("shadow", "shadow")
    s = Session(sp)
    sid2 = s.world.devices[2][0].sid
    noise = [{"k": "map", "vm": 2, "dev": 0, "pages": 2, "write": True, "cpu": 1},
             {"k": "time", "ns": 50_000}, dma(2, sid2, 0x1234_5000)]
    viols = run(s, noise)
    v, script = unmap_then_dma(s)
    assert [x.category for x in v] == ["stale"]
    last = script[-1]   # hide the late request among 40 that fault
    wide = {f: [last[f][0]] * 40 for f in ("sid", "pasid", "access", "dt")}
    wide["addr"] = [0x4000_0000 + (i << PAGE_SHIFT) for i in range(40)]
    wide["addr"][17] = last["addr"][0]
    ops = [*noise, *script[:-1], {**last, **wide}]
    v[0].step = len(ops) - 1
    small = shrink(sp, ops, v[0], budget_s=120)
    assert viols == [] and len(small) <= 5
    assert all(op["vm"] == 1 for op in small if "vm" in op)
    assert small[-1]["addr"] == last["addr"]   # the batch shrank to the one request
    path = save(tmp_path, 7, sp, small, v[0], 0)
    assert json.loads(path.read_text())["violation"]["category"] == "stale"
    spec2, ops2 = load(path)
    assert spec2 == sp and [x.category for x in replay(spec2, ops2)] == ["stale"]
    assert cli.main(["--replay", str(path)]) == 1
    assert "violation stale:stale" in capsys.readouterr().out


def test_faults_never_reported_are_caught(monkeypatch):
    """A host that never hands the recorded faults to their VM: faults."""
    take = host_iommu.fault.FaultLog.take_for_vm
    monkeypatch.setattr(host_iommu.fault.FaultLog, "take_for_vm",
                        lambda self, vm: take(self, -12345))
    monkeypatch.setattr(host_iommu.fault.FaultLog, "take_all",
                        lambda self: take(self, -12345), raising=False)
    s = Session(spec("passthrough", "passthrough"))
    viols = run(s, [dma(1, s.world.devices[1][0].sid, 1 << 40)])
    assert {v.key for v in viols} == {"pending", "unreported"}
    assert all(v.category == "faults" for v in viols)


def test_unbounded_host_work_is_caught(monkeypatch):
    """One guest operation whose VMM emits more host operations than the budget: unbounded."""
    monkeypatch.setattr(tests.fuzz.checker, "MAX_BATCH_OPS", 16)
    s = Session(spec("nested", "nested"))
    viols = run(s, [{"k": "map", "vm": 1, "dev": 0, "pages": 64, "write": True, "cpu": 0}])
    assert [v.category for v in viols] == ["unbounded"]
    assert s.world.agents[1].stats["pte_writes"] > 16


def test_model_oracle_false_alarm_is_caught(monkeypatch):
    """A server whose cross-VM counter moves although nothing crossed: oracle."""
    dma_ = host_iommu.server.HostServer._dma

    def noisy(self, ops):
        dma_(self, ops)
        self.counters[int(ops["vm"][0])]["cross_vm_dma"] += 1

    monkeypatch.setattr(host_iommu.server.HostServer, "_dma", noisy)
    s = Session(spec("passthrough", "passthrough"))
    viols = run(s, [dma(1, s.world.devices[1][0].sid, 0x10_0000)])
    assert [v.category for v in viols] == ["oracle"]


def test_nested_vmm_dropping_page_invalidations_is_caught(monkeypatch):
    """A nested VMM that forwards no page-selective 0x6 (strict unmaps never reach the host)."""
    handle = vm_agent.vmm.NestedVmm.handle

    def lossy(self, cmds, *a, **k):
        keep = [c for c in cmds if not (c.type == host_iommu.qi.QI_EIOTLB_TYPE
                                        and c.gran == host_iommu.qi.QI_GRAN_PSI_PASID)]
        return handle(self, keep, *a, **k)

    monkeypatch.setattr(vm_agent.vmm.NestedVmm, "handle", lossy)
    s = Session(spec("nested", "shadow"))
    viols, _ = unmap_then_dma(s)
    assert [v.category for v in viols] == ["stale"]


def test_balloon_without_flush_is_caught(monkeypatch):
    """A balloon that frees frames without flushing what was derived from them: isolation."""
    def script(s: Session) -> list:
        sid = s.world.devices[1][0].sid
        return run(s, [dma(1, sid, 0x20_0000), {"k": "balloon", "vm": 1, "gpa": 0x20_0000,
                                                "pages": 1, "map": False},
                       dma(1, sid, 0x20_0040)])

    assert script(Session(spec("passthrough", "passthrough"))) == []   # negative control
    monkeypatch.setattr(host_iommu.nested, "flush_derived", lambda h, vm, g, n, t, **k: (t, 0))
    viols = script(Session(spec("passthrough", "passthrough")))
    assert [v.category for v in viols] == ["isolation"]
    assert "a free frame" in viols[0].detail


def test_device_tlb_kept_across_a_balloon_is_caught(monkeypatch):
    """Nested ATS, PASID 5: a second-level change whose device-TLB flush forgets the PASID
    (issue 7 finding 2's shape) leaves a device-TLB entry onto a freed frame: isolation."""
    def script(s: Session) -> list:
        w = s.world
        dev = w.devices[1][0]
        table = w.agents[1].dma.domains[dev.sid].table
        run(s, [{"k": "map", "vm": 1, "dev": 0, "pages": 1, "write": True, "cpu": 0},
                {"k": "bind", "vm": 1, "dev": 0, "pasid": 5, "root": table.root,
                 "levels": table.levels}])
        (((_sid, iova), (_n, ((gpa, _p),))),) = w.mappings[1].items()
        return run(s, [{"k": "probe", "vm": 1, "sid": dev.sid, "pasid": 5, "iova": iova,
                        "gpa": gpa, "back": False}])

    ats = WorldSpec(7, (VmSpec(1, "nested", ats=True), VmSpec(2, "nested")), HOST)
    assert script(Session(ats)) == []   # negative control
    flush = host_iommu.nested.devtlb_flush_descs
    monkeypatch.setattr(host_iommu.nested, "devtlb_flush_descs",
                        lambda sid, pasid, *a, **k: flush(sid, 0, *a, **k))
    viols = script(Session(ats))
    assert [v.category for v in viols] == ["isolation"]
    assert "pasid=0x5" in viols[0].detail and "a free frame" in viols[0].detail
