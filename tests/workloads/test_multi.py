"""Several devices in one VM: ``[[vm.<group>.workload]]`` lists one workload per device."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, config_hash, config_to_dict, load_config, parse_config
from cluster.runner import build, run_config
from workloads import MultiWorkload, NicWorkload, NvmeWorkload

TOML = """
[experiment]
name = "multi"
seed = 4
duration_us = 4000
epoch_us = 100

[host]
memory_mib = 256

[vm.g]
mode = "shadow"
vcpus = 2
memory_mib = 64

[[vm.g.workload]]
kind = "nic"
queues = 1
rx_ring = 16
tx_ring = 16
request_response = true
packets = 40
peer_turnaround_us = 10.0

[[vm.g.workload]]
kind = "nvme"
queues = 1
queue_depth = 4
ios = 25
read_latency_us = 20.0
"""


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "multi.toml"
    path.write_text(TOML)
    return load_config(path)


def test_a_nic_and_an_nvme_in_one_vm(cfg, tmp_path):
    """One VM drives a NIC and an NVMe drive: two devices with their own requester ids,
    and the summary adds up both devices' fixed work."""
    _, agents, _ = build(cfg)
    (agent,) = agents
    assert [d.name for d in agent.devices] == ["nic0", "nvme0"]
    assert len({d.sid for d in agent.devices}) == 2
    assert isinstance(agent.workload, MultiWorkload)
    (row,) = run_config(cfg, tmp_path / "out").summary.to_pylist()
    assert row["workload"] == "multi"
    assert row["nic_round_trips"] == 20
    assert row["ios"] == 20 + 25                 # round trips + NVMe commands
    assert row["vm_exits"] == row["maps"] + row["unmaps"]     # shadow: a trap each


def test_two_nics_get_distinct_names_and_sum(tmp_path):
    """Two NICs in one VM: nic0 and nic1, each its own flow; round trips add up."""
    nic = {"kind": "nic", "queues": 1, "rx_ring": 8, "tx_ring": 8, "request_response": True,
           "packets": 20}
    cfg = parse_config({"experiment": {"name": "two", "duration_us": 3000},
                        "host": {"memory_mib": 256},
                        "vm": {"g": {"mode": "nested", "memory_mib": 64,
                                     "workload": [nic, {**nic, "packets": 30}]}}})
    _, agents, _ = build(cfg)
    assert [d.name for d in agents[0].devices] == ["nic0", "nic1"]
    (row,) = run_config(cfg, tmp_path).summary.to_pylist()
    assert row["nic_round_trips"] == 10 + 15


def test_list_round_trips_through_config_to_dict(cfg):
    """A workload list serialises back to a list: same config, same hash."""
    again = parse_config(config_to_dict(cfg), source=cfg.source)
    assert config_hash(again) == config_hash(cfg)
    parts = again.vms[0].workload.params.parts
    assert [p.kind for p in parts] == ["nic", "nvme"]
    assert isinstance(parts[0].params, NicWorkload.Params)
    assert isinstance(parts[1].params, NvmeWorkload.Params) and parts[1].params.ios == 25


def test_bad_part_names_its_index():
    """A bad key in the second device is reported with its index in the key path."""
    with pytest.raises(ConfigError) as err:
        parse_config({"experiment": {"name": "x"}, "host": {"memory_mib": 256},
                      "vm": {"g": {"memory_mib": 64,
                                   "workload": [{"kind": "nic"},
                                                {"kind": "nvme", "queue_depth": 0}]}}})
    assert "vm.g.workload.1.queue_depth" in str(err.value)
    with pytest.raises(ConfigError, match=r"vm\.g\.workload"):
        parse_config({"experiment": {"name": "x"}, "host": {"memory_mib": 256},
                      "vm": {"g": {"memory_mib": 64,
                                   "workload": {"kind": "multi", "parts": [1]}}}})
