"""A host whose VMs form one group runs in one HostVmsActor: same tables, same failures."""

from __future__ import annotations

import pytest

from cluster.config import parse_config
from cluster.results import read_manifest, read_run
from cluster.runner import RunFailed, run_config

TABLES = ("summary", "metrics", "faults")


def config(duration_us: int = 600, hosts: int = 1, name: str = "hv", warmup_us: int = 0):
    vm = {"mode": "nested", "policy": "strict", "vcpus": 2, "memory_mib": 64,
          "workload": {"kind": "nic", "offered_gbps": 2.0, "rx_ring": 64, "tx_ring": 64,
                       "rogue_fraction": 0.2}}
    sh = {"mode": "shadow", "vcpus": 2, "memory_mib": 64,
          "workload": {"kind": "nvme", "queue_depth": 4, "io_sizes": [4096, 16384],
                       "io_weights": [0.5, 0.5], "rogue_fraction": 0.3}}
    return parse_config({"experiment": {"name": name, "seed": 11, "duration_us": duration_us,
                                        "epoch_us": 100, "warmup_us": warmup_us},
                         "host": {"count": hosts, "memory_mib": 512},
                         "vm": {"n": {**vm, "count": 2}, "s": sh}})


def test_one_group_host_is_one_actor_with_inproc_tables(tmp_path, ray_local):
    """Three VMs in one group: a single actor carries the host and its VMs, and every table
    equals the in-process run's (and the run split into a host and VM actors). One host on
    two CPUs is one group by default (ray_runner.MIN_CPUS_TO_SPLIT)."""
    cfg = config()
    machine = {}
    a = run_config(cfg, tmp_path / "inproc", "inproc")
    b = run_config(cfg, tmp_path / "one", "ray",
                   machine_hook=lambda m: machine.setdefault("m", m))
    c = run_config(cfg, tmp_path / "split", "ray", vms_per_actor=2)
    m = machine["m"]
    assert not m.vm_actors and not m.host_actors and len(m.host_vms_actors) == 1
    placement = read_manifest(b.path)["placement"]
    assert list(placement["nodes"]) == ["host 0 actor with VMs 1,2,3"]
    assert placement["vms"] == {"host 0 actor with VMs 1,2,3": [1, 2, 3]}
    assert len(read_manifest(c.path)["placement"]["nodes"]) == 3  # host + two VM actors
    ta, tb, tc = read_run(a.path), read_run(b.path), read_run(c.path)
    for name in TABLES:
        assert ta[name].num_rows > 0, name
        assert ta[name].equals(tb[name]), name
        assert ta[name].equals(tc[name]), name


def test_mixed_hosts_one_actor_and_split(tmp_path, ray_local):
    """Two hosts: with two VM actors per host and with one actor per host, same tables."""
    cfg = config(hosts=2, duration_us=400, name="hv2")
    a = run_config(cfg, tmp_path / "inproc", "inproc")
    b = run_config(cfg, tmp_path / "one", "ray", vms_per_actor=8)
    c = run_config(cfg, tmp_path / "split", "ray", vms_per_actor=1)
    assert sorted(read_manifest(b.path)["placement"]["nodes"]) == \
        ["host 0 actor with VMs 1,3", "host 1 actor with VM 2"]
    ta, tb, tc = read_run(a.path), read_run(b.path), read_run(c.path)
    for name in TABLES:
        assert ta[name].equals(tb[name]), name
        assert ta[name].equals(tc[name]), name


def test_killed_host_vms_actor_fails_the_run_with_readable_metrics(tmp_path, kill_and_wait):
    """Killed midway: RunFailed naming it, a failed manifest, metrics up to the kill."""
    cfg = config(duration_us=2000, name="hvkill")
    machine = {}

    def kill_at_epoch_3(ep) -> None:
        if ep.index == 3:
            kill_and_wait(machine["m"].host_vms_actors[0][0])

    with pytest.raises(RunFailed) as info:  # one epoch per call: it fails at the next one
        run_config(cfg, tmp_path, "ray", vms_per_actor=8, epochs_per_call=1,
                   on_epoch=kill_at_epoch_3, machine_hook=lambda m: machine.setdefault("m", m))
    e = info.value
    assert e.failed == ["host 0 actor with VMs 1,2,3"]
    manifest = read_manifest(e.path)
    assert manifest["status"] == "failed" and "died" in manifest["error"]
    assert sorted(set(read_run(e.path)["metrics"]["epoch"].to_pylist())) == [0, 1, 2, 3]


def test_killed_actor_with_batched_epochs_fails_the_run(tmp_path, kill_and_wait):
    """Killed while later epochs are already computed: the run still fails naming it (at its
    next call, or at finish), the metrics hold every epoch handed out before, in order."""
    cfg = config(duration_us=2000, name="hvkill2")
    machine = {}

    def kill_at_epoch_3(ep) -> None:
        if ep.index == 3:
            kill_and_wait(machine["m"].host_vms_actors[0][0])

    with pytest.raises(RunFailed) as info:
        run_config(cfg, tmp_path, "ray", epochs_per_call=6, on_epoch=kill_at_epoch_3,
                   machine_hook=lambda m: machine.setdefault("m", m))
    e = info.value
    assert e.failed == ["host 0 actor with VMs 1,2,3"]
    assert read_manifest(e.path)["status"] == "failed"
    epochs = read_run(e.path)["metrics"]["epoch"].to_pylist()
    assert sorted(set(epochs)) == list(range(6))  # the first call computed epochs 0-5


@pytest.mark.parametrize("per_call", [None, 3, 64])
def test_batched_epochs_equal_inproc(tmp_path, ray_local, per_call):
    """Several epochs per call (adaptive, 3, more than the run has), with a warm-up window and
    the run's end inside a batch: every table equals the in-process run's."""
    cfg = config(hosts=2, duration_us=750, warmup_us=200, name=f"batch{per_call}")
    a = run_config(cfg, tmp_path / "inproc", "inproc")
    machine = {}
    b = run_config(cfg, tmp_path / "ray", "ray", epochs_per_call=per_call,
                   machine_hook=lambda m: machine.setdefault("m", m))
    assert machine["m"]._batched and not machine["m"]._ready
    ta, tb = read_run(a.path), read_run(b.path)
    for name in TABLES:
        assert ta[name].num_rows > 0, name
        assert ta[name].equals(tb[name]), name
    assert sorted(set(tb["metrics"]["epoch"].to_pylist())) == list(range(10))
