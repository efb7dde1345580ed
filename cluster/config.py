"""Experiment configuration: TOML parsed into frozen dataclasses, validated, hashed, printed.

A pure description, like Mininet's topo.py: nothing here starts a VM or touches the IOMMU, so a
config can be validated, printed, hashed and swept without running it. The key reference is
docs/config.md. Policy rules follow Linux drivers/iommu/intel/iommu.c: under caching mode with
second-level (shadow) translation the driver forces strict invalidation ("IOMMU batching
disallowed due to virtualization"); only first-level (nested) guests may batch lazily.
About 780 lines, over the usual size: each section's ranges sit next to its dataclass so a key's
type, default, bounds and message live in one place, and validation must refuse everything a
run cannot build or finish.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from host_iommu.costs import CostModel
from host_iommu.defs import PAGE_SHIFT
from host_iommu.qi import QI_AM_MASK, QI_DESCS_PER_PAGE, QI_MAMV_DEFAULT, QI_MAX_QS
from vm_agent.flushq import DEFAULT_HZ, HZ_CHOICES

# --- Registries (one per kind: they feed validation messages and --help) -----------------
MODES = ("shadow", "nested", "passthrough")
POLICIES = ("strict", "lazy")
FLUSH_QUEUES = ("percpu", "single")
SL_PAGE_SIZES = ("4k", "2m", "1g")
SL_LEVELS = (3, 4, 5)
FL_LEVELS = (4, 5)
# Second-level input address width by levels (VT-d spec 3.7, CAP.SAGAW): 39/48/57 bits.
SL_WIDTH_BY_LEVELS = {3: 39, 4: 48, 5: 57}
HAW_MIN, HAW_MAX = 39, 52  # host address width (CAP.MGAW) range, VT-d spec 11.4.2
VCPUS_MAX = 256
HOST_SPREAD = -1  # a VM group without an explicit `host` index: its VMs are spread evenly
HOST_COUNT_MAX = 1024  # emulated hosts in one run (each is an actor with its own HostIommu)
HOST_VMS_MAX = 255  # VMs per host: each VM's devices sit on a PCI bus of their own (bus 1..255)
# IQA.QS 0..7 (VT-d spec 11.4.9.4): 2^QS 4-KiB pages of 256-bit descriptors (IQA.DW=1, as
# scalable mode needs): 128..16384 entries, exactly what host_iommu.qi.InvalidationQueue takes.
QI_ENTRIES = tuple(QI_DESCS_PER_PAGE << qs for qs in range(QI_MAX_QS + 1))
FAULT_RECORDS_MAX = 256     # CAP.NFR is 8 bits: 1..256 fault recording registers (spec 11.4.2)
# Bounds on what a run must allocate or iterate, so `validate` refuses what `run` cannot do:
HOST_MEMORY_MIB_MAX = 256 * 1024   # ~50 bytes of emulator state per 4-KiB host frame: ~3.5 GB
CACHE_ENTRIES_MAX = 1 << 20        # a cache holds numpy arrays of (sets, ways) per field
CACHE_WAYS_MAX = 64                # a lookup compares every way of a set for each request
ENTRY_CACHE_WAYS = 4               # PASID and context caches are 4-way (host_iommu/iommu.py)
VM_COUNT_MAX = 1024                # VMs per group
EXPERIMENT_NAME_MAX = 128          # run folder names must stay under NAME_MAX (255 bytes)
SEED_MAX = (1 << 64) - 1           # numpy SeedSequence entropy; printed in run folder names
DURATION_US_MAX = 600_000_000      # 10 minutes of virtual time
EPOCHS_MAX = 10_000_000            # duration_us / epoch_us: one host round per epoch
COST_NS_MAX = 1_000_000_000        # 1 s per operation keeps every time stamp within int64
CHURN_PAGES_MAX = 1 << 24          # second-level pages one VM's churn changes in a run

# Names that become folder names or table values: keep them path- and shell-safe.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HASH_CHARS = 12


class ClusterError(Exception):
    """Base of every error the cluster package raises for bad user input or results."""


class ConfigError(ClusterError):
    """One or more configuration problems, each naming its full key path.

    ``problems`` is a list of ``(key, message)``; ``key`` and ``message`` are those of the
    first. ``str()`` prints one ``key: message`` per line, so a user sees everything at once.
    """

    def __init__(self, key: str, message: str = "",
                 problems: Sequence[tuple[str, str]] | None = None) -> None:
        self.problems: list[tuple[str, str]] = list(problems) if problems else [(key, message)]
        self.key, self.message = self.problems[0]
        super().__init__(str(self))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.problems)

    def __str__(self) -> str:
        return "\n".join(f"{k}: {m}" if k else m for k, m in self.problems)


# --- The description ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExperimentConfig:
    """``[experiment]``: what this run is called and how long it runs (virtual time)."""

    name: str
    seed: int = 0
    duration_us: int = 10_000
    epoch_us: int = 100
    description: str = ""
    warmup_us: int = 0      # set-up before the measured window of duration_us (runs first)


@dataclass(frozen=True)
class HostConfig:
    """``[host]``: the physical machine and its IOMMU's cache sizes; ``count`` identical hosts."""

    count: int = 1
    memory_mib: int = 8192
    haw: int = 46
    iotlb_entries: int = 1024
    iotlb_ways: int = 8
    page_walk_cache: bool = True
    pwc_entries: int = 256
    pwc_ways: int = 4
    pasid_cache_entries: int = 64
    context_cache_entries: int = 64
    devtlb_entries: int = 64
    devtlb_ways: int = 4
    sl_page_size: str = "4k"
    sl_levels: int = 4
    fault_records: int = 256
    qi_entries: int = 256
    mamv: int = QI_MAMV_DEFAULT


@dataclass(frozen=True)
class WorkloadConfig:
    """``[vm.<group>.workload]``: the kind (a ``workloads.WORKLOADS`` key) and its Params."""

    kind: str
    params: Any


@dataclass(frozen=True)
class VmGroupConfig:
    """``[vm.<group>]``: ``count`` identical VMs. ``policy`` is the effective policy."""

    name: str
    count: int
    mode: str
    policy: str
    flush_queue: str
    vcpus: int
    memory_mib: int
    fl_levels: int
    ats: bool
    workload: WorkloadConfig
    churn: Any = None
    policy_requested: str = ""
    host: int = HOST_SPREAD
    hz: int = DEFAULT_HZ


@dataclass(frozen=True)
class Config:
    """A whole experiment. ``vms`` is sorted by group name; ``notes`` are non-fatal remarks."""

    experiment: ExperimentConfig
    host: HostConfig
    vms: tuple[VmGroupConfig, ...]
    cost: CostModel
    notes: tuple[str, ...] = ()
    source: str = field(default="<dict>", compare=False)
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key path, values), key order

    @property
    def vm_count(self) -> int:
        return sum(g.count for g in self.vms)


# Keys of [vm.<group>] besides the sub-tables, with their defaults (VmGroupConfig minus name).
@dataclass(frozen=True)
class _VmGroupKeys:
    mode: str
    count: int = 1
    policy: str = "strict"
    flush_queue: str = "percpu"
    vcpus: int = 2
    memory_mib: int = 1024
    fl_levels: int = 4
    ats: bool = False
    host: int = HOST_SPREAD
    hz: int = DEFAULT_HZ


_REQUIRED = {ExperimentConfig: ("name",), _VmGroupKeys: ("mode",)}
_TOP_KEYS = ("experiment", "host", "vm", "cost", "sweep")


# --- Typed coercion driven by dataclass annotations ---------------------------------------
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"array of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[tuple[str, str]]) -> Any:
    """``value`` as type ``tp`` (int, float, str, bool, tuple[X, ...]); None after a problem."""
    got = type(value).__name__
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            problems.append((key, f"must be a finite number, got {value}"))
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, list | tuple):
            inner = args[0] if args else Any
            out = []
            for i, item in enumerate(value):
                sub: list[tuple[str, str]] = []
                v = _coerce(item, inner, key, sub)
                if sub:
                    problems.extend((k, f"element {i}: {m}") for k, m in sub)
                    return None
                out.append(v)
            return tuple(out)
    else:
        return value  # an annotation we do not check (Any, unions): taken as given
    problems.append((key, f"expected {_type_name(tp)}, got {got} {value!r}"))
    return None


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable string annotations: fall back to what is there
        return {f.name: f.type for f in fields(cls)}


def _build(cls: type, table: Any, path: str, problems: list[tuple[str, str]],
           extra: Mapping[str, Any] | None = None) -> Any:
    """Instance of dataclass ``cls`` from ``table``; unknown keys and bad types are problems.

    Unknown keys are reported but do not stop the build (so range checks still run);
    returns None when the table is not a table or a value has the wrong type.
    """
    if not isinstance(table, Mapping):
        problems.append((path, f"expected a table, got {type(table).__name__}"))
        return None
    hints = _hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    for key in sorted(set(table) - set(names)):
        known = ", ".join(n for n in names if n not in (extra or {}))
        problems.append((f"{path}.{key}", f"unknown key (known: {known})"))
    before = len(problems)
    values = dict(extra or {})
    for name in names:
        if name in values:
            continue
        if name in table:
            v = _coerce(table[name], hints.get(name, Any), f"{path}.{name}", problems)
            values[name] = v
        elif name in _REQUIRED.get(cls, ()):
            problems.append((f"{path}.{name}", "required key is missing"))
    if len(problems) > before:
        return None
    try:
        return cls(**values)
    except TypeError as e:  # a field without default that the table lacks
        problems.append((path, str(e)))
        return None


def _check(problems: list[tuple[str, str]], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append((key, message))


def _choice(problems: list[tuple[str, str]], value: Any, choices: Sequence[Any],
            key: str) -> None:
    _check(problems, value in choices, key,
           f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def _in_range(problems: list[tuple[str, str]], value: int | float, lo: int | float,
              hi: int | float, key: str) -> None:
    _check(problems, lo <= value <= hi, key, f"must be in {lo}..{hi}, got {value}")


def _run_validate(obj: Any, path: str, problems: list[tuple[str, str]]) -> None:
    """Call ``obj.validate()`` if the Params dataclass defines it; its keys are relative."""
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    for key, message in validate() or ():
        problems.append((f"{path}.{key}" if key else path, message))


# --- Sections ------------------------------------------------------------------------------
def _experiment(table: Any, problems: list[tuple[str, str]]) -> ExperimentConfig | None:
    n = len(problems)
    exp = _build(ExperimentConfig, table, "experiment", problems)
    if exp is None:
        return None
    _check(problems, bool(_NAME_RE.match(exp.name)), "experiment.name",
           f"must match {_NAME_RE.pattern} (it names a results folder), got {exp.name!r}")
    _check(problems, len(exp.name) <= EXPERIMENT_NAME_MAX, "experiment.name",
           f"must be at most {EXPERIMENT_NAME_MAX} characters (it names a results folder), "
           f"got {len(exp.name)}")
    _in_range(problems, exp.seed, 0, SEED_MAX, "experiment.seed")
    _in_range(problems, exp.duration_us, 1, DURATION_US_MAX, "experiment.duration_us")
    _check(problems, exp.epoch_us > 0, "experiment.epoch_us",
           f"must be > 0, got {exp.epoch_us}")
    _check(problems, exp.epoch_us <= exp.duration_us or exp.duration_us <= 0,
           "experiment.epoch_us",
           f"must be <= experiment.duration_us ({exp.duration_us}), got {exp.epoch_us}")
    _in_range(problems, exp.warmup_us, 0, DURATION_US_MAX, "experiment.warmup_us")
    _check(problems, exp.epoch_us <= 0 or exp.warmup_us % exp.epoch_us == 0,
           "experiment.warmup_us", f"must be a multiple of experiment.epoch_us "
           f"({exp.epoch_us}), so the window starts at an epoch boundary; got {exp.warmup_us}")
    if exp.epoch_us > 0:
        epochs = -(-exp.duration_us // exp.epoch_us)
        _check(problems, epochs <= EPOCHS_MAX, "experiment.epoch_us",
               f"gives {epochs} epochs of experiment.duration_us; at most {EPOCHS_MAX} "
               f"(raise epoch_us to >= {-(-exp.duration_us // EPOCHS_MAX)})")
    return exp if len(problems) == n else None


def _ways(problems: list[tuple[str, str]], host: HostConfig, entries: str, ways: str) -> None:
    e, w = getattr(host, entries), getattr(host, ways)
    _in_range(problems, e, 0, CACHE_ENTRIES_MAX, f"host.{entries}")
    if not 1 <= w <= CACHE_WAYS_MAX:
        problems.append((f"host.{ways}", f"must be in 1..{CACHE_WAYS_MAX}, got {w}"))
    elif e > 0 and e % w:
        problems.append((f"host.{ways}", f"must divide host.{entries} ({e}), got {w}"))


def _host(table: Any, problems: list[tuple[str, str]]) -> HostConfig | None:
    n = len(problems)
    host = _build(HostConfig, table, "host", problems)
    if host is None:
        return None
    _check(problems, 1 <= host.count <= HOST_COUNT_MAX, "host.count",
           f"must be in 1..{HOST_COUNT_MAX}, got {host.count}")
    _in_range(problems, host.memory_mib, 1, HOST_MEMORY_MIB_MAX, "host.memory_mib")
    _check(problems, HAW_MIN <= host.haw <= HAW_MAX, "host.haw",
           f"must be in {HAW_MIN}..{HAW_MAX}, got {host.haw}")
    _ways(problems, host, "iotlb_entries", "iotlb_ways")
    _ways(problems, host, "pwc_entries", "pwc_ways")
    _ways(problems, host, "devtlb_entries", "devtlb_ways")
    for key in ("pasid_cache_entries", "context_cache_entries"):
        v = getattr(host, key)
        if not 0 <= v <= CACHE_ENTRIES_MAX:
            _in_range(problems, v, 0, CACHE_ENTRIES_MAX, f"host.{key}")
        else:
            _check(problems, v < ENTRY_CACHE_WAYS or v % ENTRY_CACHE_WAYS == 0, f"host.{key}",
                   f"must be below {ENTRY_CACHE_WAYS} or a multiple of {ENTRY_CACHE_WAYS} "
                   f"(the cache is {ENTRY_CACHE_WAYS}-way), got {v}")
    _choice(problems, host.sl_page_size, SL_PAGE_SIZES, "host.sl_page_size")
    _choice(problems, host.sl_levels, SL_LEVELS, "host.sl_levels")
    _in_range(problems, host.fault_records, 1, FAULT_RECORDS_MAX, "host.fault_records")
    _check(problems, host.qi_entries in QI_ENTRIES, "host.qi_entries",
           f"must be a power of two in {QI_ENTRIES[0]}..{QI_ENTRIES[-1]} (IQA.QS 0..{QI_MAX_QS}"
           f" with 256-bit descriptors), got {host.qi_entries}")
    _in_range(problems, host.mamv, 0, QI_AM_MASK, "host.mamv")
    if 0 < host.memory_mib <= HOST_MEMORY_MIB_MAX and HAW_MIN <= host.haw <= HAW_MAX:
        _check(problems, host.memory_mib << 20 <= 1 << host.haw, "host.memory_mib",
               f"{host.memory_mib} MiB does not fit in a {host.haw}-bit host address width")
    return host if len(problems) == n else None


def _cost(table: Any, problems: list[tuple[str, str]]) -> CostModel | None:
    n = len(problems)
    cost = _build(CostModel, table, "cost", problems)
    if cost is None:
        return None
    for f in fields(CostModel):
        name, v = f.name, getattr(cost, f.name)
        _check(problems, 0 <= v <= COST_NS_MAX, f"cost.{name}",
               f"must be in 0..{COST_NS_MAX} ns, got {v}")
    return cost if len(problems) == n else None


def _workload(table: Any, path: str, registry: Mapping[str, type], base_dir: Path | None,
              problems: list[tuple[str, str]]) -> WorkloadConfig | None:
    if not isinstance(table, Mapping):
        problems.append((path, f"expected a table, got {type(table).__name__}"))
        return None
    known = ", ".join(sorted(registry)) or "none registered"
    if "kind" not in table:
        problems.append((f"{path}.kind", f"required key is missing (one of: {known})"))
        return None
    kind = table["kind"]
    if not isinstance(kind, str) or kind not in registry:
        problems.append((f"{path}.kind", f"unknown workload kind {kind!r} (one of: {known})"))
        return None
    n = len(problems)
    params_cls = registry[kind].Params
    rest = {k: v for k, v in table.items() if k != "kind"}
    params = _build(params_cls, rest, path, problems)
    if params is None:
        return None
    if kind == "trace" and isinstance(getattr(params, "path", None), str) and params.path:
        params = _resolve_trace(params, path, base_dir, problems)  # before validate reads it
    _run_validate(params, path, problems)
    if len(problems) > n and problems[n][0] == f"{path}.path":     # the path is named once
        problems[n + 1:] = [p for p in problems[n + 1:] if p[0] != f"{path}.path"]
    return WorkloadConfig(kind, params) if len(problems) == n else None


def _workload_list(tables: list, path: str, registry: Mapping[str, type],
                   base_dir: Path | None, problems: list[tuple[str, str]]
                   ) -> WorkloadConfig | None:
    """Several devices in one VM: kind "multi" over one WorkloadConfig per table."""
    n = len(problems)
    parts = [_workload(t, f"{path}.{i}", registry, base_dir, problems)
             for i, t in enumerate(tables)]
    multi = registry.get("multi")
    _check(problems, multi is not None, path, "no multi-device workload is registered")
    _check(problems, bool(tables), path, "an empty list of workloads")
    if len(problems) > n or multi is None:
        return None
    params = multi.Params(parts=tuple(parts))
    _run_validate(params, path, problems)
    return WorkloadConfig("multi", params) if len(problems) == n else None


def _resolve_trace(params: Any, path: str, base_dir: Path | None,
                   problems: list[tuple[str, str]]) -> Any:
    """Trace files are named relative to the config file's folder; they must exist."""
    raw = params.path
    if not raw:
        problems.append((f"{path}.path", "a trace workload needs a trace file path"))
        return params
    p = Path(raw)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    p = p.resolve()
    if not p.is_file():
        problems.append((f"{path}.path", f"trace file not found: {p}"))
        return params
    return dataclasses.replace(params, path=str(p))


def _vm_group(name: str, table: Any, reg: Any, base_dir: Path | None, sl_levels: int,
              problems: list[tuple[str, str]], notes: list[str]) -> VmGroupConfig | None:
    path = f"vm.{name}"
    if not isinstance(table, Mapping):
        problems.append((path, f"expected a table, got {type(table).__name__}"))
        return None
    n = len(problems)
    _check(problems, bool(_NAME_RE.match(name)), path,
           f"group name must match {_NAME_RE.pattern}, got {name!r}")
    plain = {k: v for k, v in table.items() if k not in ("workload", "churn")}
    keys = _build(_VmGroupKeys, plain, path, problems)
    if isinstance(table.get("workload"), list):   # [[vm.<group>.workload]]: a device each
        workload = _workload_list(table["workload"], f"{path}.workload", _registry_kinds(reg),
                                  base_dir, problems)
    elif "workload" in table:
        workload = _workload(table["workload"], f"{path}.workload", _registry_kinds(reg),
                             base_dir, problems)
    else:
        problems.append((f"{path}.workload", "required table is missing"))
        workload = None
    churn = None
    if "churn" in table:
        churn_cls = getattr(reg, "CHURN_PARAMS", None)
        if churn_cls is None:
            problems.append((f"{path}.churn", "no churn model is registered"))
        else:
            churn = _build(churn_cls, table["churn"], f"{path}.churn", problems)
            if churn is not None:
                _run_validate(churn, f"{path}.churn", problems)
    if keys is None:
        return None
    _in_range(problems, keys.count, 1, VM_COUNT_MAX, f"{path}.count")
    _choice(problems, keys.mode, MODES, f"{path}.mode")
    _choice(problems, keys.policy, POLICIES, f"{path}.policy")
    _choice(problems, keys.flush_queue, FLUSH_QUEUES, f"{path}.flush_queue")
    _check(problems, 1 <= keys.vcpus <= VCPUS_MAX, f"{path}.vcpus",
           f"must be in 1..{VCPUS_MAX}, got {keys.vcpus}")
    _check(problems, keys.memory_mib > 0, f"{path}.memory_mib",
           f"must be > 0, got {keys.memory_mib}")
    _choice(problems, keys.fl_levels, FL_LEVELS, f"{path}.fl_levels")
    _choice(problems, keys.hz, HZ_CHOICES, f"{path}.hz")
    _check(problems, keys.host >= 0 or keys.host == HOST_SPREAD, f"{path}.host",
           f"must be a host index >= 0, got {keys.host}")
    width = SL_WIDTH_BY_LEVELS.get(sl_levels)
    if width is not None and keys.memory_mib > 0:
        _check(problems, keys.memory_mib << 20 <= 1 << width, f"{path}.memory_mib",
               f"{keys.memory_mib} MiB of GPA does not fit a {sl_levels}-level second level "
               f"({width} bits)")
    pasid_queues = getattr(getattr(workload, "params", None), "pasid_queues", 0)
    if isinstance(pasid_queues, int) and pasid_queues > 0:
        _check(problems, keys.mode == "nested", f"{path}.workload.pasid_queues",
               f"PASID-tagged queues need scalable mode with a first level (mode nested); "
               f"a {keys.mode} guest's DMA carries no PASID")
        nq = getattr(workload.params, "queues", 0) or keys.vcpus
        _check(problems, pasid_queues <= nq, f"{path}.workload.pasid_queues",
               f"{pasid_queues} PASID-tagged queues, but the NIC has {nq} queues")
    if len(problems) > n or workload is None:
        return None
    policy = keys.policy
    if keys.mode == "shadow" and policy == "lazy":
        notes.append(f"{path}: shadow mode forces strict invalidation "
                     "(Linux does under caching mode)")
        policy = "strict"
    elif keys.mode == "passthrough" and policy == "lazy":
        notes.append(f"{path}: passthrough has no vIOMMU, so the lazy policy has no effect")
    if keys.flush_queue == "single" and keys.mode != "passthrough":
        notes.append(f"{path}: the single flush queue is s390's (dma-iommu.c, shadow_on_flush); "
                     "Linux gives a VT-d guest per-CPU queues")
    if keys.fl_levels == 5 and keys.mode == "nested":
        notes.append(f"{path}: 5-level first-level paging under nesting is hardware-only: "
                     "QEMU 10's intel-iommu (x-flts) accepts 4-level first levels only")
    return VmGroupConfig(name=name, count=keys.count, mode=keys.mode, policy=policy,
                         flush_queue=keys.flush_queue, vcpus=keys.vcpus,
                         memory_mib=keys.memory_mib, fl_levels=keys.fl_levels, ats=keys.ats,
                         workload=workload, churn=churn, policy_requested=keys.policy,
                         host=keys.host, hz=keys.hz)


def vm_placement(groups: Sequence[VmGroupConfig],
                 host_count: int) -> list[tuple[str, int, int]]:
    """``(group, index, host)`` per VM, in group-name then index order.

    A group with an explicit ``host`` puts all its VMs there. The other VMs, in the same
    order, each go to the host holding the fewest VMs so far (ties: the lowest index), after
    the pinned groups are placed: so with no pins VM k lands on host k mod count.
    """
    ordered = sorted(groups, key=lambda g: g.name)
    load = [0] * host_count
    for g in ordered:
        if g.host != HOST_SPREAD:
            load[g.host] += g.count
    out: list[tuple[str, int, int]] = []
    for g in ordered:
        for i in range(g.count):
            if g.host != HOST_SPREAD:
                h = g.host
            else:
                h = min(range(host_count), key=lambda k: (load[k], k))
                load[h] += 1
            out.append((g.name, i, h))
    return out


def _sweep(table: Any, problems: list[tuple[str, str]]) -> tuple[tuple[str, tuple], ...]:
    """``[sweep]``: key path -> list of values (quoted ``"a.b" = [...]`` or nested tables)."""
    if not isinstance(table, Mapping):
        problems.append(("sweep", f"expected a table, got {type(table).__name__}"))
        return ()
    out: list[tuple[str, tuple]] = []

    def walk(node: Mapping, prefix: str) -> None:
        for key in sorted(node):
            path = f"{prefix}.{key}" if prefix else key
            value = node[key]
            if isinstance(value, Mapping):
                walk(value, path)
            elif not isinstance(value, list) or not value:
                problems.append((f"sweep.{path}", "must be a non-empty array of values"))
            elif path.split(".")[0] in ("sweep", "experiment") and \
                    path not in ("experiment.seed", "experiment.duration_us"):
                problems.append((f"sweep.{path}", "cannot be swept (it names the results)"))
            else:
                out.append((path, tuple(value)))

    walk(table, "")
    return tuple(out)


def _churn_bounds(g: VmGroupConfig, exp: ExperimentConfig,
                  problems: list[tuple[str, str]]) -> None:
    """Churn a run can finish: changes within the VM's memory, a bounded total in the run.

    The churn table's own ranges are its Params' ``validate`` (workloads/churn.py); this
    checks what needs the VM group and the experiment too.
    """
    churn = g.churn
    pages = getattr(churn, "pages", None)
    interval_us = getattr(churn, "interval_us", None)
    start_us = getattr(churn, "start_us", 0.0)
    if (not isinstance(pages, int) or not isinstance(interval_us, int | float)
            or not isinstance(start_us, int | float) or pages <= 0 or interval_us <= 0):
        return  # absent, or already reported by the Params' validate
    path = f"vm.{g.name}.churn"
    vm_pages = (g.memory_mib << 20) >> PAGE_SHIFT
    _check(problems, pages <= vm_pages, f"{path}.pages",
           f"must be <= the VM's {vm_pages} pages (vm.{g.name}.memory_mib), got {pages}")
    changes = max(0.0, (exp.duration_us - start_us) / interval_us + 1)
    total = changes * min(pages, vm_pages)
    _check(problems, total <= CHURN_PAGES_MAX, f"{path}.interval_us",
           f"{interval_us} gives about {changes:.3g} changes of {pages} pages in "
           f"experiment.duration_us, {total:.3g} pages in all; at most {CHURN_PAGES_MAX} "
           "(raise interval_us or lower pages)")


def _registry_kinds(reg: Any) -> Mapping[str, type]:
    kinds = getattr(reg, "WORKLOADS", None)
    return kinds if isinstance(kinds, Mapping) else {}


def _default_registry() -> Any:
    """The real ``workloads`` package (WORKLOADS, CHURN_PARAMS), imported when first needed."""
    return importlib.import_module("workloads")


# --- Public API ----------------------------------------------------------------------------
def apply_override(data: dict, override: str) -> dict:
    """Set ``a.b.c=VALUE`` in ``data`` (in place; returns it), creating missing tables.

    VALUE is parsed as a TOML value (``3``, ``true``, ``[1, 2]``, ``"x"``); anything that
    does not parse is taken as a plain string (``mode=nested``).
    """
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(str(override), "override must look like KEY=VALUE (a.b.c=VALUE)")
    key, _, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ConfigError(key or "<empty>", f"bad override key in {override!r}")
    parts = [p.strip() for p in parts]
    raw = raw.strip()
    try:
        value = tomllib.loads("v = " + raw)["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]),
                              f"override {override!r} needs a table here, found a value")
        node = nxt
    node[parts[-1]] = value
    return data


def parse_config(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>",
                 workloads: Any = None) -> Config:
    """Validate a TOML-shaped dict (after ``overrides``) into a Config, or raise ConfigError.

    ``workloads`` is the registry: any object with ``WORKLOADS`` (kind -> class with a
    ``Params`` dataclass) and ``CHURN_PARAMS``; None means the real ``workloads`` package.
    ``source`` is the config file (trace paths resolve against its folder).
    """
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a config is a table, got {type(data).__name__}")
    data = copy.deepcopy(dict(data))
    problems: list[tuple[str, str]] = []
    for ov in overrides:
        try:
            apply_override(data, ov)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError("", problems=problems)
    reg = workloads if workloads is not None else _default_registry()
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    notes: list[str] = []
    for key in sorted(set(data) - set(_TOP_KEYS)):
        problems.append((key, f"unknown top-level table (known: {', '.join(_TOP_KEYS)})"))
    if "experiment" not in data:
        problems.append(("experiment", "required table is missing (it needs at least name)"))
        exp = None
    else:
        exp = _experiment(data["experiment"], problems)
    host = _host(data.get("host", {}), problems)
    cost = _cost(data.get("cost", {}), problems)
    vm_table = data.get("vm")
    groups: list[VmGroupConfig] = []
    if vm_table is None or (isinstance(vm_table, Mapping) and not vm_table):
        problems.append(("vm", "at least one [vm.<group>] table is required"))
    elif not isinstance(vm_table, Mapping):
        problems.append(("vm", f"expected a table of groups, got {type(vm_table).__name__}"))
    else:
        sl_levels = host.sl_levels if host is not None else 0
        for name in sorted(vm_table):
            g = _vm_group(name, vm_table[name], reg, base_dir, sl_levels, problems, notes)
            if g is not None:
                groups.append(g)
    if host is not None and groups:
        for g in groups:
            _check(problems, g.host < host.count, f"vm.{g.name}.host",
                   f"must be < host.count ({host.count}), got {g.host}")
        if all(g.host < host.count for g in groups):
            total = [0] * host.count
            vms = [0] * host.count
            for name, _i, h in vm_placement(groups, host.count):
                total[h] += next(g.memory_mib for g in groups if g.name == name)
                vms[h] += 1
            for h, mib in enumerate(total):
                where = f"host {h}'s VMs'" if host.count > 1 else "the VMs'"
                _check(problems, mib <= host.memory_mib, "host.memory_mib",
                       f"{host.memory_mib} MiB cannot hold {where} {mib} MiB of guest memory")
                _check(problems, vms[h] <= HOST_VMS_MAX, "host.count",
                       f"host {h} would hold {vms[h]} VMs; a host gives each VM's devices a "
                       f"PCI bus of its own, 1..{HOST_VMS_MAX} (raise host.count)")
    if exp is not None:
        for g in groups:
            _churn_bounds(g, exp, problems)
    sweep = _sweep(data.get("sweep", {}), problems)
    if problems or exp is None or host is None or cost is None:
        raise ConfigError("", problems=problems or [("", "invalid config")])
    return Config(experiment=exp, host=host, vms=tuple(groups), cost=cost,
                  notes=tuple(notes), source=source, sweep=sweep)


def load_config(path: str | Path, overrides: Sequence[str] = (), workloads: Any = None) -> Config:
    """Read a TOML config file, apply ``overrides`` (``a.b=VALUE``) and validate it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), "config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), f"cannot read config file: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"invalid TOML: {e}") from None
    return parse_config(data, overrides, source=str(p), workloads=workloads)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The fully defaulted config as plain JSON-able data, shaped like the TOML input.

    Values are the effective ones (a shadow group's policy is "strict"), so
    ``parse_config(config_to_dict(cfg))`` describes the same run and has the same hash.
    """
    vms: dict[str, Any] = {}
    for g in cfg.vms:
        d = {k: getattr(g, k) for k in ("count", "mode", "policy", "flush_queue", "vcpus",
                                         "memory_mib", "fl_levels", "ats", "host", "hz")}
        w = g.workload
        d["workload"] = ([{"kind": p.kind, **_plain(p.params)} for p in w.params.parts]
                         if w.kind == "multi" else {"kind": w.kind, **_plain(w.params)})
        if g.churn is not None:
            d["churn"] = _plain(g.churn)
        vms[g.name] = d
    out = {"experiment": _plain(cfg.experiment), "host": _plain(cfg.host), "vm": vms,
           "cost": _plain(cfg.cost)}
    if cfg.sweep:
        out["sweep"] = {k: list(v) for k, v in cfg.sweep}
    return out


def config_hash(cfg: Config) -> str:
    """First 12 hex digits of the sha256 of the canonical JSON of ``config_to_dict``."""
    canon = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"),
                       ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()[:_HASH_CHARS]


def with_overrides(cfg: Config, overrides: Sequence[str], workloads: Any = None) -> Config:
    """A copy of ``cfg`` with ``overrides`` applied (one point of a sweep), re-validated."""
    return parse_config(config_to_dict(cfg), overrides, source=cfg.source, workloads=workloads)


def describe(cfg: Config) -> str:
    """A short human-readable account of a resolved config (for ``validate``)."""
    e, h = cfg.experiment, cfg.host
    lines = [
        f"experiment {e.name}  seed {e.seed}  duration {e.duration_us} us  "
        f"epoch {e.epoch_us} us  hash {config_hash(cfg)}",
        f"host: {h.count} x {h.memory_mib} MiB, haw {h.haw}, "
        f"IOTLB {h.iotlb_entries}x{h.iotlb_ways}-way, "
        f"second level {h.sl_levels}-level {h.sl_page_size} pages",
        f"{len(cfg.vms)} VM group(s), {cfg.vm_count} VM(s):",
    ]
    for g in cfg.vms:
        churn = "  churn " + str(getattr(g.churn, "kind", "yes")) if g.churn is not None else ""
        lines.append(
            f"  {g.name}: {g.count} x {g.mode}/{g.policy} ({g.flush_queue} flush queue, "
            f"HZ {g.hz}), "
            f"{g.vcpus} vCPU, {g.memory_mib} MiB, workload {g.workload.kind}"
            f"{', ATS' if g.ats else ''}{churn}")
    lines.extend(f"note: {n}" for n in cfg.notes)
    return "\n".join(lines)
