"""Many hosts: where VMs are placed, what each host must hold, and hosts staying independent."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, parse_config, vm_placement
from cluster.runner import RunError, build, build_hosts, plan_vms, run_config


def nic(**extra) -> dict:
    return {"mode": "nested", "memory_mib": 64,
            "workload": {"kind": "nic", "offered_gbps": 2.0, "rx_ring": 32, "tx_ring": 32},
            **extra}


def cfg(vms: dict, hosts: int = 1, memory_mib: int = 512, duration_us: int = 300):
    return parse_config({"experiment": {"name": "pl", "seed": 4, "duration_us": duration_us},
                         "host": {"count": hosts, "memory_mib": memory_mib}, "vm": vms})


def test_pinned_groups_first_then_fewest_vms_lowest_index():
    c = cfg({"a": nic(count=3), "b": nic(count=2, host=1), "c": nic()}, hosts=3)
    # b fills host 1 first; then a0 -> 0, a1 -> 2, a2 -> 0 (tie 0/2: lowest), c0 -> 2
    assert vm_placement(c.vms, 3) == [("a", 0, 0), ("a", 1, 2), ("a", 2, 0), ("b", 0, 1),
                                      ("b", 1, 1), ("c", 0, 2)]
    assert [(p.vm, p.host) for p in plan_vms(c)] == [(1, 0), (2, 2), (3, 0), (4, 1), (5, 1),
                                                     (6, 2)]


def test_without_pins_vm_k_goes_to_host_k_mod_count():
    c = cfg({"a": nic(count=5)}, hosts=2)
    assert [p.host for p in plan_vms(c)] == [0, 1, 0, 1, 0]


def test_host_index_and_per_host_memory_are_checked():
    with pytest.raises(ConfigError) as e:
        cfg({"a": nic(host=2)}, hosts=2)
    assert e.value.key == "vm.a.host" and "host.count (2)" in e.value.message
    with pytest.raises(ConfigError) as e:
        cfg({"a": nic(host=-3)}, hosts=2)
    assert e.value.key == "vm.a.host"
    # 3 x 64 MiB on host 0 does not fit 160 MiB; spread over two hosts it does
    with pytest.raises(ConfigError) as e:
        cfg({"a": nic(count=3, host=0)}, hosts=2, memory_mib=160)
    assert e.value.key == "host.memory_mib" and "host 0" in e.value.message
    assert cfg({"a": nic(count=3)}, hosts=2, memory_mib=160).host.count == 2
    with pytest.raises(ConfigError) as e:
        cfg({"a": nic()}, hosts=0)
    assert e.value.key == "host.count"


def test_each_host_has_its_own_iommu_and_build_wants_one_host():
    c = cfg({"a": nic(host=0), "b": nic(host=1)}, hosts=2)
    hosts, _agents, _plans = build_hosts(c)
    assert sorted(hosts) == [0, 1] and hosts[0].iommu is not hosts[1].iommu
    assert sorted(hosts[0].counters) == [1] and sorted(hosts[1].counters) == [2]
    with pytest.raises(RunError, match="build_hosts"):
        build(c)


def test_a_vm_alone_on_its_host_runs_as_if_the_other_host_did_not_exist(tmp_path):
    """Hosts share nothing: VM 1 on host 0 gives the same counters with or without a busy
    second host, and different ones when that VM shares its host."""
    alone = run_config(cfg({"a": nic()}), tmp_path / "alone", "inproc").summary
    two = run_config(cfg({"a": nic(host=0), "b": nic(host=1, count=2)}, hosts=2),
                     tmp_path / "two", "inproc").summary
    shared = run_config(cfg({"a": nic(), "b": nic(count=2)}), tmp_path / "shared",
                        "inproc").summary
    skip = {"experiment", "host"}
    row = {k: v[0] for k, v in alone.to_pydict().items() if k not in skip}
    assert {k: v[0] for k, v in two.to_pydict().items() if k not in skip} == row
    assert two["host"].to_pylist() == [0, 1, 1]
    assert shared["iotlb_misses"][0].as_py() != row["iotlb_misses"] or \
        shared["walk_refs"][0].as_py() != row["walk_refs"]


def test_each_host_numbers_its_vms_pci_buses_and_holds_at_most_255_vms():
    c = cfg({"a": nic(count=4)}, hosts=2)
    assert [(p.vm, p.host, p.bus) for p in plan_vms(c)] == [(1, 0, 1), (2, 1, 1), (3, 0, 2),
                                                            (4, 1, 2)]
    one = cfg({"a": nic(count=3)})
    assert [p.bus for p in plan_vms(one)] == [1, 2, 3]  # one host: the bus is the VM id
    small = {"mode": "passthrough", "memory_mib": 1, "count": 256,
             "workload": {"kind": "nic", "offered_gbps": 1.0}}
    with pytest.raises(ConfigError) as e:
        cfg({"a": small}, memory_mib=4096)
    assert e.value.key == "host.count" and "256 VMs" in e.value.message
    two = cfg({"a": small}, hosts=2, memory_mib=4096)
    assert max(p.bus for p in plan_vms(two)) == 128
