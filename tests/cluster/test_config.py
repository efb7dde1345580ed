"""Config parsing: defaults, hostile configs naming their key path, overrides, hashing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import (
    Config,
    ConfigError,
    apply_override,
    config_hash,
    config_to_dict,
    describe,
    load_config,
    parse_config,
    with_overrides,
)
from host_iommu.costs import CostModel


# --- A stand-in workload registry (the real one lives in workloads/) ----------------------
class Nvme:
    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        queues: int = 0
        queue_depth: int = 32
        io_sizes: tuple[int, ...] = (4096,)
        io_weights: tuple[float, ...] = (1.0,)
        read_fraction: float = 0.7

        def validate(self) -> list[tuple[str, str]]:
            out = []
            if self.queue_depth < 1:
                out.append(("queue_depth", "must be >= 1"))
            if len(self.io_sizes) != len(self.io_weights):
                out.append(("io_weights", "needs one weight per io_sizes entry"))
            return out


class Trace:
    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        path: str = ""
        loop: bool = False


@dataclass(frozen=True)
class Churn:
    kind: str = "balloon"
    interval_us: float = 1000.0
    pages: int = 256

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.kind in ("balloon", "unplug") else [("kind", "balloon or unplug")]


REG = SimpleNamespace(WORKLOADS={"nvme": Nvme, "trace": Trace}, CHURN_PARAMS=Churn)


def base() -> dict:
    return {
        "experiment": {"name": "t"},
        "vm": {"web": {"mode": "nested", "workload": {"kind": "nvme"}}},
    }


def parse(data: dict, overrides: tuple[str, ...] = ()) -> Config:
    return parse_config(data, overrides, workloads=REG)


def errors(data: dict, overrides: tuple[str, ...] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, overrides)
    return info.value


# --- Defaults ------------------------------------------------------------------------------
def test_minimal_config_fills_every_default():
    cfg = parse(base())
    assert cfg.experiment.seed == 0 and cfg.experiment.duration_us == 10_000
    assert cfg.experiment.epoch_us == 100
    assert cfg.host.iotlb_entries == 1024 and cfg.host.iotlb_ways == 8
    assert cfg.host.sl_page_size == "4k" and cfg.host.qi_entries == 256
    assert cfg.cost == CostModel()
    (g,) = cfg.vms
    assert (g.name, g.count, g.mode, g.policy, g.flush_queue) == (
        "web", 1, "nested", "strict", "percpu")
    assert (g.vcpus, g.memory_mib, g.fl_levels, g.ats) == (2, 1024, 4, False)
    assert g.workload.kind == "nvme" and g.workload.params == Nvme.Params()
    assert g.churn is None and cfg.notes == ()


def test_groups_sorted_by_name_and_values_typed():
    data = base()
    data["vm"]["a"] = {"mode": "shadow", "count": 3, "workload": {
        "kind": "nvme", "io_sizes": [4096, 65536], "io_weights": [1, 3], "read_fraction": 1}}
    cfg = parse(data)
    assert [g.name for g in cfg.vms] == ["a", "web"]
    p = cfg.vms[0].workload.params
    assert p.io_sizes == (4096, 65536) and p.io_weights == (1.0, 3.0)
    assert isinstance(p.read_fraction, float)
    assert cfg.vm_count == 4


def test_shadow_lazy_becomes_strict_with_a_note():
    data = base()
    data["vm"]["web"].update(mode="shadow", policy="lazy")
    cfg = parse(data)
    g = cfg.vms[0]
    assert g.policy == "strict" and g.policy_requested == "lazy"
    assert any("vm.web" in n and "strict" in n for n in cfg.notes)


def test_nested_lazy_stays_lazy():
    data = base()
    data["vm"]["web"]["policy"] = "lazy"
    assert parse(data).vms[0].policy == "lazy"


def test_churn_table_parsed_and_validated():
    data = base()
    data["vm"]["web"]["churn"] = {"kind": "unplug", "pages": 8}
    assert parse(data).vms[0].churn == Churn(kind="unplug", pages=8)
    data["vm"]["web"]["churn"] = {"kind": "melt"}
    assert errors(data).keys == ("vm.web.churn.kind",)


# --- Hostile configs: every problem names its key path ------------------------------------
@pytest.mark.parametrize(("path", "key", "value", "expected"), [
    (("experiment",), "colour", 1, "experiment.colour"),
    (("host",), "iotlb_size", 1, "host.iotlb_size"),
    (("vm", "web"), "cpus", 1, "vm.web.cpus"),
    (("vm", "web", "workload"), "queue_dpeth", 1, "vm.web.workload.queue_dpeth"),
    (("cost",), "exit_ns", 1, "cost.exit_ns"),
    ((), "hosts", {}, "hosts"),
])
def test_unknown_key_at_each_level(path, key, value, expected):
    data = base()
    data.setdefault("host", {})
    data.setdefault("cost", {})
    node = data
    for p in path:
        node = node[p]
    node[key] = value
    err = errors(data)
    assert err.keys == (expected,)
    assert "unknown" in str(err) and expected in str(err)


@pytest.mark.parametrize(("override", "expected"), [
    ("experiment.seed=-1", "experiment.seed"),
    ("experiment.seed=1.5", "experiment.seed"),
    ("experiment.name=[1]", "experiment.name"),
    ("experiment.name='a b'", "experiment.name"),
    ("experiment.epoch_us=20000", "experiment.epoch_us"),
    ("experiment.duration_us=0", "experiment.duration_us"),
    ("host.haw=60", "host.haw"),
    ("host.iotlb_ways=7", "host.iotlb_ways"),
    ("host.devtlb_ways=0", "host.devtlb_ways"),
    ("host.pwc_ways=3", "host.pwc_ways"),
    ("host.page_walk_cache=1", "host.page_walk_cache"),
    ("host.sl_page_size='8k'", "host.sl_page_size"),
    ("host.sl_levels=6", "host.sl_levels"),
    ("host.qi_entries=100", "host.qi_entries"),
    ("host.fault_records=0", "host.fault_records"),
    ("host.memory_mib=512", "host.memory_mib"),
    ("vm.web.count=-2", "vm.web.count"),
    ("vm.web.count='many'", "vm.web.count"),
    ("vm.web.mode=emulated", "vm.web.mode"),
    ("vm.web.policy=eager", "vm.web.policy"),
    ("vm.web.flush_queue=global", "vm.web.flush_queue"),
    ("vm.web.vcpus=0", "vm.web.vcpus"),
    ("vm.web.vcpus=257", "vm.web.vcpus"),
    ("vm.web.fl_levels=3", "vm.web.fl_levels"),
    ("vm.web.ats='yes'", "vm.web.ats"),
    ("vm.web.workload.kind=gpu", "vm.web.workload.kind"),
    ("vm.web.workload.queue_depth='deep'", "vm.web.workload.queue_depth"),
    ("vm.web.workload.queue_depth=true", "vm.web.workload.queue_depth"),
    ("vm.web.workload.queue_depth=0", "vm.web.workload.queue_depth"),
    ("vm.web.workload.io_sizes=[4096, 'x']", "vm.web.workload.io_sizes"),
    ("vm.web.workload.io_weights=[1.0, 2.0]", "vm.web.workload.io_weights"),
    ("vm.web.workload.read_fraction=nan", "vm.web.workload.read_fraction"),
    ("cost.vm_exit_ns=-5", "cost.vm_exit_ns"),
    ("cost.vm_exit_ns=1.5", "cost.vm_exit_ns"),
    ("vm.web.workload=3", "vm.web.workload"),
])
def test_bad_value_names_key(override, expected):
    err = errors(base(), (override,))
    assert expected in err.keys, str(err)
    assert str(err).startswith(expected)


def test_missing_required_keys():
    assert errors({"vm": base()["vm"]}).keys == ("experiment",)
    assert errors({"experiment": {}, "vm": base()["vm"]}).keys == ("experiment.name",)
    data = base()
    del data["vm"]["web"]["mode"]
    assert errors(data).keys == ("vm.web.mode",)
    data = base()
    del data["vm"]["web"]["workload"]
    assert errors(data).keys == ("vm.web.workload",)
    data = base()
    del data["vm"]["web"]["workload"]["kind"]
    assert errors(data).keys == ("vm.web.workload.kind",)
    assert errors({"experiment": {"name": "t"}}).keys == ("vm",)


def test_all_problems_reported_together_one_per_line():
    data = base()
    data["experiment"].update(epoch_us=50_000, typo=1)
    data["host"] = {"iotlb_ways": 5}
    data["vm"]["web"].update(count=-1, mode="emulated")
    data["vm"]["db"] = {"mode": "shadow", "workload": {"kind": "disk"}}
    err = errors(data)
    expected = {"experiment.typo", "experiment.epoch_us", "host.iotlb_ways", "vm.web.count",
                "vm.web.mode", "vm.db.workload.kind"}
    assert set(err.keys) == expected
    assert len(str(err).splitlines()) == len(expected)
    assert "disk" in str(err) and "nvme" in str(err)  # names the known kinds


def test_trace_path_resolved_relative_to_config_file(tmp_path):
    (tmp_path / "t.trace").write_bytes(b"")
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[experiment]\nname = "t"\n[vm.r]\nmode = "nested"\n'
                        '[vm.r.workload]\nkind = "trace"\npath = "t.trace"\n')
    cfg = load_config(cfg_file, workloads=REG)
    assert cfg.vms[0].workload.params.path == str((tmp_path / "t.trace").resolve())
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, ["vm.r.workload.path=missing.trace"], workloads=REG)
    assert info.value.key == "vm.r.workload.path" and "missing.trace" in str(info.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", workloads=REG)
    assert "nope.toml" in info.value.key
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, workloads=REG)
    assert "bad.toml" in info.value.key and "TOML" in str(info.value)


# --- Overrides ------------------------------------------------------------------------------
def test_override_nested_key_and_types():
    cfg = parse(base(), ("vm.web.count=4", "vm.web.workload.io_sizes=[512, 8192]",
                         "vm.web.workload.io_weights=[1, 1]", "host.page_walk_cache=false",
                         "vm.web.mode=shadow"))
    g = cfg.vms[0]
    assert g.count == 4 and g.mode == "shadow"
    assert g.workload.params.io_sizes == (512, 8192)
    assert cfg.host.page_walk_cache is False


def test_override_creates_missing_tables():
    cfg = parse(base(), ("vm.db.mode=passthrough", "vm.db.workload.kind=nvme",
                         "host.iotlb_entries=64", "cost.vm_exit_ns=1"))
    assert [g.name for g in cfg.vms] == ["db", "web"]
    assert cfg.vms[0].mode == "passthrough"
    assert cfg.host.iotlb_entries == 64 and cfg.cost.vm_exit_ns == 1


def test_override_does_not_mutate_input():
    data = base()
    parse(data, ("vm.web.count=2",))
    assert "count" not in data["vm"]["web"]


@pytest.mark.parametrize(("override", "key"), [
    ("vm.web.count", "vm.web.count"),
    ("=3", "<empty>"),
    ("vm..count=3", "vm..count"),
    ("experiment.name.x=1", "experiment.name"),
])
def test_bad_override_syntax(override, key):
    err = errors(base(), (override,))
    assert err.key == key


def test_apply_override_plain_string_fallback():
    data: dict = {}
    apply_override(data, "a.b.c=hello world")
    apply_override(data, "a.n=0x10")
    assert data == {"a": {"b": {"c": "hello world"}, "n": 16}}


# --- Hash and round trip --------------------------------------------------------------------
def test_hash_stable_and_sensitive():
    a, b = parse(base()), parse(base())
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 12
    assert config_hash(parse(base(), ("experiment.seed=1",))) != config_hash(a)
    assert config_hash(parse(base(), ("vm.web.workload.queue_depth=33",))) != config_hash(a)
    assert config_hash(parse(base(), ("cost.mem_ref_ns=91",))) != config_hash(a)
    # explicit defaults hash like omitted ones
    assert config_hash(parse(base(), ("host.haw=46", "vm.web.count=1"))) == config_hash(a)


def test_hash_independent_of_key_order():
    data = base()
    data["host"] = {"haw": 48, "iotlb_entries": 512}
    rev = {k: data[k] for k in reversed(list(data))}
    rev["host"] = {"iotlb_entries": 512, "haw": 48}
    assert config_hash(parse(data)) == config_hash(parse(rev))


def test_config_to_dict_is_json_and_round_trips():
    data = base()
    data["vm"]["web"]["churn"] = {"pages": 4}
    cfg = parse(data, ("vm.s.mode=shadow", "vm.s.policy=lazy", "vm.s.workload.kind=nvme"))
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["vm"]["s"]["policy"] == "strict"
    again = parse(d)
    assert config_to_dict(again) == d and config_hash(again) == config_hash(cfg)
    assert with_overrides(cfg, ["vm.web.count=2"], workloads=REG).vms[1].count == 2
    text = describe(cfg)
    assert "vm.s: shadow mode forces strict" in text and "web: 1 x nested/strict" in text


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), count=st.integers(1, 4),
       entries_log=st.integers(3, 12), ways_log=st.integers(0, 3))
def test_valid_values_accepted_and_hash_deterministic(seed, count, entries_log, ways_log):
    ov = (f"experiment.seed={seed}", f"vm.web.count={count}",
          f"host.iotlb_entries={1 << entries_log}", f"host.iotlb_ways={1 << ways_log}")
    cfg = parse(base(), ov)
    assert cfg.experiment.seed == seed and cfg.vms[0].count == count
    assert config_hash(cfg) == config_hash(parse(base(), ov))


def test_real_workload_registry():
    """The real workloads package: every kind's Params and the churn table parse."""
    data = base()
    data["vm"]["web"]["workload"] = {"kind": "nic", "packet_sizes": [64, 1500],
                                     "packet_weights": [1, 1]}
    data["vm"]["web"]["churn"] = {"kind": "unplug"}
    data["vm"]["db"] = {"mode": "shadow", "workload": {"kind": "nvme", "queue_depth": 4}}
    cfg = parse_config(data)
    assert cfg.vms[1].workload.params.packet_sizes == (64, 1500)
    assert cfg.vms[1].churn.kind == "unplug" and cfg.vms[0].workload.params.queue_depth == 4
    with pytest.raises(ConfigError) as info:
        parse_config(data, ["vm.web.workload.rx_fraction=2"])
    assert info.value.keys == ("vm.web.workload.rx_fraction",)


# --- What `run` needs: every value `validate` accepts can be built and finishes ------------
@pytest.mark.parametrize(("override", "expected", "words"), [
    ("host.memory_mib=1073741824", "host.memory_mib", "1..262144"),
    ("host.iotlb_entries=1099511627776", "host.iotlb_entries", "0..1048576"),
    ("host.pwc_entries=68719476736", "host.pwc_entries", "0..1048576"),
    ("host.devtlb_ways=1024", "host.devtlb_ways", "1..64"),
    ("host.context_cache_entries=5", "host.context_cache_entries", "4-way"),
    ("host.pasid_cache_entries=6", "host.pasid_cache_entries", "4-way"),
    ("host.pasid_cache_entries=1099511627776", "host.pasid_cache_entries", "0..1048576"),
    ("host.qi_entries=8", "host.qi_entries", "128..16384"),
    ("host.qi_entries=64", "host.qi_entries", "128..16384"),
    ("host.qi_entries=32768", "host.qi_entries", "128..16384"),
    ("host.qi_entries=1099511627776", "host.qi_entries", "128..16384"),
    ("host.fault_records=257", "host.fault_records", "1..256"),
    (f"experiment.name='{'x' * 300}'", "experiment.name", "at most 128 characters"),
    ("experiment.seed=1180591620717411303424", "experiment.seed", "0..18446744073709551615"),
    ("cost.vm_exit_ns=4611686018427387904", "cost.vm_exit_ns", "0..1000000000 ns"),
    ("experiment.duration_us=1000000000000", "experiment.duration_us", "1..600000000"),
    ("vm.web.count=1099511627776", "vm.web.count", "1..1024"),
])
def test_values_run_cannot_handle_are_config_errors(override, expected, words):
    """Issue 7 finding 11: each of these passed validate, then crashed or never ended."""
    err = errors(base(), (override,))
    assert expected in err.keys and words in str(err), str(err)


def test_too_many_epochs_is_an_error_naming_the_fix():
    err = errors(base(), ("experiment.duration_us=600000000", "experiment.epoch_us=1"))
    assert err.keys == ("experiment.epoch_us",) and ">= 60" in err.message


def test_qi_entries_agree_with_the_invalidation_queue():
    """The config accepts exactly the queue sizes host_iommu.qi takes (IQA.QS 0..7)."""
    from host_iommu.qi import InvalidationQueue, QiError

    for log in range(21):
        entries = 1 << log
        try:
            InvalidationQueue(entries)
            builds = True
        except QiError:
            builds = False
        try:
            parse(base(), (f"host.qi_entries={entries}",))
            accepted = True
        except ConfigError:
            accepted = False
        assert accepted == builds, entries


def test_entry_cache_sizes_agree_with_the_host_caches():
    """PASID and context cache sizes the config accepts are the ones CacheSet can build."""
    from host_iommu.iommu import CacheSet, IommuParams

    for entries in range(40):
        for key in ("pasid_cache_entries", "context_cache_entries"):
            try:
                CacheSet(IommuParams(**{key: entries}))
                builds = True
            except ValueError:
                builds = False
            try:
                parse(base(), (f"host.{key}={entries}",))
                accepted = True
            except ConfigError:
                accepted = False
            assert accepted == builds, (key, entries)


def test_churn_beyond_the_vm_or_without_end_is_an_error():
    data = base()
    data["vm"]["web"]["memory_mib"] = 64
    data["vm"]["web"]["churn"] = {"pages": 1 << 40}
    err = errors(data)
    assert err.keys == ("vm.web.churn.pages",) and "16384 pages" in err.message
    data["vm"]["web"]["churn"] = {"pages": 256, "interval_us": 1e-3}
    err = errors(data)
    assert err.keys == ("vm.web.churn.interval_us",) and "raise interval_us" in err.message
    data["vm"]["web"]["churn"] = {"pages": 256, "interval_us": 1e12}
    assert parse(data).vms[0].churn.interval_us == 1e12   # one change, then none: it ends


def test_unknown_churn_key_is_an_error_with_the_real_registry():
    """Issue 7: unknown keys in a churn table must never be dropped silently."""
    data = base()
    data["vm"]["web"]["workload"] = {"kind": "nvme"}
    data["vm"]["web"]["churn"] = {"kind": "balloon", "pagez": 8}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.keys == ("vm.web.churn.pagez",) and "unknown key" in str(info.value)


def test_largest_accepted_values_still_parse():
    ov = ("host.memory_mib=262144", "host.iotlb_entries=1048576", "host.iotlb_ways=64",
          "host.qi_entries=16384", "host.fault_records=256", f"experiment.name='{'n' * 128}'",
          "cost.vm_exit_ns=1000000000", "experiment.duration_us=600000000",
          "experiment.epoch_us=60", "host.context_cache_entries=3")
    cfg = parse(base(), ov)
    assert cfg.host.qi_entries == 16384 and len(cfg.experiment.name) == 128


# --- The guest kernel's HZ and the flush queues ---------------------------------------------
def test_hz_defaults_to_250_and_takes_only_kernel_choices():
    assert parse(base()).vms[0].hz == 250
    assert parse(base(), ("vm.web.hz=1000",)).vms[0].hz == 1000
    err = errors(base(), ("vm.web.hz=200",))
    assert err.keys == ("vm.web.hz",) and "100, 250, 300, 1000" in err.message


def test_single_flush_queue_gets_a_note_for_a_vtd_guest():
    """The single queue is s390's (shadow_on_flush): kept, but a VT-d guest gets a note."""
    cfg = parse(base(), ("vm.web.policy=lazy", "vm.web.flush_queue=single"))
    assert cfg.vms[0].flush_queue == "single"
    assert any("vm.web" in n and "s390" in n for n in cfg.notes)
    assert not any("s390" in n for n in parse(base(), ("vm.web.policy=lazy",)).notes)


def test_hz_reaches_the_guest_flush_queue():
    """The runner builds each lazy guest's flush queue with its group's HZ."""
    from cluster.runner import make_agent, plan_vms

    data = base()
    data["vm"]["web"].update(policy="lazy", hz=100, workload={"kind": "nvme"})
    cfg = parse_config(data)
    agent = make_agent(cfg, plan_vms(cfg)[0])
    agent.setup()
    fq = next(iter(agent.dma.domains.values())).fq
    assert fq.hz == 100 and fq.queue(0, 1, 1, 0).timer_deadline_ns == 20_000_000
