"""The Ray back-end gives the in-process tables value for value, and fails fast and cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import load_config, parse_config
from cluster.results import is_complete, read_manifest, read_run, run_status
from cluster.runner import RunFailed, run_config

TABLES = ("summary", "metrics", "faults")


def nic(mode: str, policy: str = "strict", **extra) -> dict:
    return {"mode": mode, "policy": policy, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nic", "offered_gbps": 2.0, "rx_ring": 64, "tx_ring": 64,
                         "rogue_fraction": 0.2}, **extra}


def nvme(mode: str, **extra) -> dict:
    return {"mode": mode, "vcpus": 2, "memory_mib": 64,
            "workload": {"kind": "nvme", "queue_depth": 4, "io_sizes": [4096, 16384],
                         "io_weights": [0.5, 0.5], "rogue_fraction": 0.3}, **extra}


def config(vms: dict, hosts: int = 1, duration_us: int = 600, name: str = "ray"):
    return parse_config({"experiment": {"name": name, "seed": 7, "duration_us": duration_us,
                                        "epoch_us": 100},
                         "host": {"count": hosts, "memory_mib": 512}, "vm": vms})


def tables(outcome) -> dict:
    return read_run(outcome.path)


def assert_same_tables(a, b) -> None:
    ta, tb = tables(a), tables(b)
    assert set(ta) == set(tb) == set(TABLES)
    for name in TABLES:
        assert ta[name].num_rows > 0, name
        assert ta[name].equals(tb[name]), name


def test_one_host_tables_equal_inproc(tmp_path, ray_local):
    """Summary, metrics and faults of a shadow+nested run: identical on Ray and in process."""
    cfg = config({"n": nic("nested", "lazy"), "s": nic("shadow"), "v": nvme("nested")})
    a = run_config(cfg, tmp_path / "inproc", "inproc")
    b = run_config(cfg, tmp_path / "ray", "ray", vms_per_actor=1)  # a host and VM actors
    assert_same_tables(a, b)
    assert set(a.summary["host"].to_pylist()) == {0}
    nodes = read_manifest(b.path)["placement"]["nodes"]
    assert {"host 0 actor"} <= set(nodes) and len(nodes) == 4


def test_warmup_window_tables_equal_inproc(tmp_path, ray_local):
    """With a warm-up the summary is a window (end minus start counters): the start is taken
    at the same point of an epoch on both back-ends, so strict unmaps' host QI waits and the
    vCPU time they stall count alike."""
    cfg = load_config(Path(__file__).parents[2] / "configs" / "quickstart.toml",
                      ["experiment.duration_us=500", "host.count=2"])
    assert cfg.experiment.warmup_us > 0
    a = run_config(cfg, tmp_path / "inproc", "inproc")
    b = run_config(cfg, tmp_path / "ray", "ray")
    ta, tb = tables(a), tables(b)
    for name in TABLES:             # quickstart has no faults: compare, don't require rows
        assert ta[name].equals(tb[name]), name
    assert any(a.summary["unmap_qi_wait_ns"].to_pylist())


def test_two_hosts_tables_equal_inproc_and_carry_host(tmp_path, ray_local):
    """Two hosts, one group pinned to host 1, the others spread: same tables, host ids."""
    cfg = config({"a": nic("nested", "lazy", count=2), "b": nic("shadow"),
                  "p": nvme("shadow", host=1)}, hosts=2)
    a = run_config(cfg, tmp_path / "inproc", "inproc")
    b = run_config(cfg, tmp_path / "ray", "ray")
    assert_same_tables(a, b)
    s = a.summary.to_pydict()
    # p (VM 4) is pinned to host 1; a0, a1, b (VMs 1-3) fill the hosts evenly: 0, 0, 1
    assert dict(zip(s["vm"], s["host"], strict=True)) == {1: 0, 2: 0, 3: 1, 4: 1}
    m = tables(b)["metrics"].to_pydict()
    assert {(v, h) for v, h in zip(m["vm"], m["host"], strict=True)} == \
        {(1, 0), (2, 0), (3, 1), (4, 1)}
    f = tables(b)["faults"].to_pydict()
    assert all((v in (1, 2)) == (h == 0) for v, h in zip(f["vm"], f["host"], strict=True))


@pytest.mark.parametrize("victim", ["VM", "host"])
def test_killed_actor_fails_the_run_with_readable_metrics(tmp_path, kill_and_wait, victim):
    """An actor killed midway: RunFailed naming it, a failed manifest, partial metrics; a
    rerun redoes the run and completes it."""
    cfg = config({"n": nic("nested"), "s": nic("shadow")}, duration_us=2000, name="kill")
    machine = {}

    def kill_at_epoch_3(ep) -> None:
        if ep.index == 3:
            m = machine["m"]
            actor = m.vm_actors[0][0] if victim == "VM" else m.host_actors[0]
            kill_and_wait(actor)

    with pytest.raises(RunFailed) as info:  # split: a host actor and VM actors
        run_config(cfg, tmp_path, "ray", on_epoch=kill_at_epoch_3, vms_per_actor=1,
                   machine_hook=lambda m: machine.setdefault("m", m))
    e = info.value
    assert e.failed and all(victim in name for name in e.failed)
    manifest = read_manifest(e.path)
    assert manifest["status"] == "failed" and manifest["failed"] == e.failed
    assert "died" in manifest["error"]
    metrics = read_run(e.path)["metrics"].to_pydict()
    assert sorted(set(metrics["epoch"])) == [0, 1, 2, 3]  # written before the kill
    assert run_status(tmp_path, "kill", e.path.name.removeprefix("run=")) == "failed"
    again = run_config(cfg, tmp_path, "inproc")  # no --overwrite needed for a failed run
    assert is_complete(tmp_path, "kill", again.run_id)
    assert json.loads((again.path / "manifest.json").read_text())["status"] == "complete"
