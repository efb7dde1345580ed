"""The Ray back-end: one host actor per emulated host, VM actors beside it, the same Engine.

``RayMachine`` implements the Transport seam of cluster/engine.py (plus the runner's
``guest_stats`` / ``finish``) over the actors of cluster/actors.py, so the Engine, the merge
order and every result table are those of the in-process back-end. Placement follows Ray's
placement groups: each emulated host is one bundle, so a host and its VMs' actors share a node
(one bundle never spans nodes), and the bundles of a run form one SPREAD group so the hosts
land on different nodes where the cluster has them. Per epoch there is one call per actor,
and the data flows from actor to actor: the driver submits ``VmGroupActor.step`` for every
group (last epoch's report object in; batches and stats out as two objects), hands the batch
objects straight to ``HostActor.apply`` (Ray resolves them on the host actor; the host merges
by (t_ns, vm, seq)), whose per-group report objects go to the next epoch's ``step`` calls. The
driver fetches only the small stats and counters it writes as metrics. An actor that dies ends
the run with RunFailed naming it; nothing waits longer than ``timeout_s`` for an answer.

A host whose VMs form a single group is one ``HostVmsActor`` instead: its epoch is a single
call, and the only data leaving it are the stats and counters. By default a host's VMs form a
single group unless the host's share of the cluster has ``MIN_CPUS_TO_SPLIT`` CPUs or more.
Within an epoch the guests cannot overlap their host (the host needs every guest's batch, and
every guest the host's report of the last epoch: its unmap waits), so splitting the guests
only shortens the guest phase, at the price of two more hops per epoch; with two CPUs for one
host the split ran at 0.77-0.82x the speed of the single actor (docs/cluster.md).

Start-up is arranged so that the driver's waits overlap: the actor classes are made remote once
per process, every actor's ``setup`` and ``node_id`` go out in one round trip, and while the
actors start (worker processes importing the emulator) the driver does its own one-time work
(runner.warm_up_tables) instead of doing it after the first epoch.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from cluster.actors import HostActor, HostVmsActor, VmGroupActor
from cluster.config import Config
from cluster.runner import (
    MACHINE_ERRORS,
    FinalState,
    RunError,
    RunFailed,
    VmPlan,
    plan_vms,
    warm_up_tables,
)
from host_iommu.protocol import EpochReport

DEFAULT_TIMEOUT_S = 600.0       # longest wait for one epoch's answers from every actor
# A host's guests are split over several VM actors only when the host's share of the cluster
# has this many CPUs: one for the host actor and at least two for the guests (see below).
MIN_CPUS_TO_SPLIT = 3
# Where every host is one HostVmsActor, one call runs several epochs: as many as take about
# CALL_TARGET_S of wall time at the last call's pace, at most MAX_EPOCHS_PER_CALL.
CALL_TARGET_S = 0.25
MAX_EPOCHS_PER_CALL = 64
PLACEMENT_TIMEOUT_S = 3600.0    # longest wait for a run's placement group (queued runs)


def start_ray(address: str | None = None) -> bool:
    """Connect to Ray unless already connected; True if this call started or joined it.

    With ``address`` (or RAY_ADDRESS) it joins that cluster; otherwise it starts an embedded
    local Ray sized to this machine, without a dashboard.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, ValueError) as e:
            raise RunError(f"cannot join the Ray cluster at {address}: "
                           f"{str(e).splitlines()[0]}") from None
    else:
        # address="local": never attach to a cluster a `ray start` left on this machine, which
        # a bare ray.init() would join (Ray docs, "Starting Ray")
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level="ERROR")
    return True


def _check_reachable(address: str) -> None:
    """Fail at once, not after Ray's minute of retries, when nothing listens at host:port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return  # "auto", "ray://...", or a form Ray will judge itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise RunError(f"cannot join the Ray cluster at {address}: {e.strerror or e}") from None


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Ray for the duration of the block; shut down only if the block started it."""
    import ray

    started = start_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


_REMOTE: dict[type, Any] = {}


def _remote(cls: type) -> Any:
    """``ray.remote(cls)``, made once per process: each new remote class is exported to the
    cluster again (pickled and stored) at its first ``.remote()``."""
    import ray

    if cls not in _REMOTE:
        _REMOTE[cls] = ray.remote(cls)
    return _REMOTE[cls]


def _split(plans: list[VmPlan], parts: int) -> list[list[VmPlan]]:
    """``plans`` (in VM id order) cut into ``parts`` contiguous, nearly equal blocks."""
    size, extra = divmod(len(plans), parts)
    out, i = [], 0
    for k in range(parts):
        n = size + (1 if k < extra else 0)
        out.append(plans[i:i + n])
        i += n
    return [p for p in out if p]


def _vm_list(vms: list[int]) -> str:
    if len(vms) <= 4:
        return "VM " + ",".join(map(str, vms)) if len(vms) == 1 else \
            "VMs " + ",".join(map(str, vms))
    return f"{len(vms)} VMs {vms[0]},{vms[1]},...,{vms[-1]}"


class RayMachine:
    """Host and VM actors for one run. ``vms_per_actor`` None: one ``HostVmsActor`` per host
    when the host's share of the cluster's CPUs is under ``MIN_CPUS_TO_SPLIT``, else a host
    actor and one VM actor per further CPU of that share."""

    def __init__(self, cfg: Config, *, address: str | None = None,
                 vms_per_actor: int | None = None, epochs_per_call: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if epochs_per_call is not None and epochs_per_call < 1:
            raise RunError(f"epochs_per_call must be >= 1, not {epochs_per_call}")
        self._started = start_ray(address)
        self.timeout_s = timeout_s
        self.epochs_per_call = epochs_per_call  # None: adapt to CALL_TARGET_S
        self._k = 1                             # epochs the next batched call asks for
        self._ready: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self.emulation_s = 0.0  # critical path of emulation work (slowest actor per phase)
        hosts = cfg.host.count
        plans = plan_vms(cfg)
        self._host_of = {p.vm: p.host for p in plans}
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        node_cpus = [float(n.get("Resources", {}).get("CPU", 0.0))
                     for n in ray.nodes() if n.get("Alive")]
        bundle_cpu = round(min(1.0, cpus / hosts), 4)
        per_host_cpus = max(1, math.floor(cpus / hosts))
        self.actors: list[Any] = []
        self.names: list[str] = []
        self.vm_actors: list[tuple[Any, str, list[int]]] = []
        self.host_actors: dict[int, Any] = {}
        self.host_vms_actors: list[tuple[Any, str, list[int]]] = []  # hosts of one group
        self.pg: Any = None
        try:
            if not node_cpus or max(node_cpus) < bundle_cpu:
                raise RunError(f"no Ray node has {bundle_cpu} CPU for a host's actors")
            self.pg = placement_group([{"CPU": bundle_cpu}] * hosts, strategy="SPREAD")
            self._wait_placement()
            setups: dict[str, Any] = {}
            for h in range(hosts):
                mine = [p for p in plans if p.host == h]
                if vms_per_actor:
                    parts = max(1, -(-len(mine) // vms_per_actor))
                elif per_host_cpus < MIN_CPUS_TO_SPLIT:  # guests cannot overlap the host
                    parts = 1
                else:  # the host actor keeps a CPU, the guests share the others
                    parts = max(1, min(len(mine), per_host_cpus - 1))
                groups = _split(mine, parts)
                share = round(bundle_cpu / (1 + len(groups)), 4)
                opts = {"num_cpus": share, "max_restarts": 0, "max_task_retries": 0,
                        "scheduling_strategy": PlacementGroupSchedulingStrategy(
                            self.pg, placement_group_bundle_index=h)}
                if len(groups) == 1:  # the host and its one group in one process
                    vms = [p.vm for p in groups[0]]
                    opts["num_cpus"] = bundle_cpu
                    actor = _remote(HostVmsActor).options(**opts).remote(cfg, h, groups[0])
                    name = f"host {h} actor with {_vm_list(vms)}"
                    self.host_vms_actors.append((actor, name, vms))
                    self._add(actor, name)
                    setups[name] = actor.setup.remote()
                    continue
                host = _remote(HostActor).options(**opts).remote(cfg, h)
                self.host_actors[h] = host
                self._add(host, f"host {h} actor")
                for g in groups:
                    vms = [p.vm for p in g]
                    actor = _remote(VmGroupActor).options(**opts).remote(cfg, g)
                    name = f"VM actor for {_vm_list(vms)} (host {h})"
                    self.vm_actors.append((actor, name, vms))
                    self._add(actor, name)
                    setups[name] = actor.setup.remote()
            # one round trip for every actor's start (each setup returns its node id, a host
            # actor answers its node id); the driver's own warm-up runs meanwhile
            setups.update({f"host {h} actor": a.node_id.remote()
                           for h, a in self.host_actors.items()})
            warm_up_tables()
            got = self._get(setups)
            frames: dict[int, dict[int, bytes]] = {h: {} for h in self.host_actors}
            for _a, name, _vms in self.vm_actors:
                vm_frames, got[name] = got[name]  # VmSetup frames, node id
                for vm, f in vm_frames.items():
                    frames[self._host_of[vm]][vm] = f
            if self.host_actors:
                self._get({f"host {h} actor": self.host_actors[h].setup_vms.remote(frames[h])
                           for h in sorted(self.host_actors)})
            nodes = {name: got[name] for name in self.names}
        except BaseException:
            self.close()
            raise
        self.nodes = nodes
        self._reports: dict[str, Any] = {}  # VM actor name -> its last epoch's report object
        self._t_start_ns = 0                # the coming epoch's start: the last one's end
        self._stats: dict[int, dict[str, int]] = {}
        # method handles with their options, made once: one ``.options`` per call costs
        self._step = {name: a.step.options(num_returns=2) for a, name, _v in self.vm_actors}
        self._apply: dict[int, Any] = {}
        for h, a in self.host_actors.items():
            n = sum(1 for _a, _n, vms in self.vm_actors if self._host_of[vms[0]] == h)
            self._apply[h] = a.apply.options(num_returns=n + 1)
        self._upstream = frozenset(n for _a, n, _v in self.vm_actors)
        self._host_vms_names = frozenset(n for _a, n, _v in self.host_vms_actors)
        # every host is one actor: nothing crosses between actors within an epoch
        self._batched = not self.host_actors

    def _add(self, actor: Any, name: str) -> None:
        self.actors.append(actor)
        self.names.append(name)

    def _wait_placement(self) -> None:
        t0 = time.monotonic()
        while not self.pg.wait(timeout_seconds=10):
            if time.monotonic() - t0 > PLACEMENT_TIMEOUT_S:
                raise RunError(f"the cluster found no room for {self.pg.bundle_specs} "
                               f"within {PLACEMENT_TIMEOUT_S:.0f} s")

    def _get(self, refs: dict[str, Any], upstream: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Every answer, or RunFailed naming the actors that died or did not answer. When one
        of the ``upstream`` actors failed, only those are named: the others' calls took its
        output as their input and failed with it."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        names = list(refs)
        try:  # the common case: one round trip
            return dict(zip(names, ray.get([refs[n] for n in names], timeout=self.timeout_s),
                            strict=True))
        except (RayActorError, RayTaskError, GetTimeoutError) as e:
            if isinstance(e, MACHINE_ERRORS):
                raise
        # Something failed: find out what, giving the others a moment to answer.
        _ready, late = ray.wait([refs[n] for n in names], num_returns=len(names),
                                timeout=min(self.timeout_s, 30.0))
        late_ids = {r.hex() for r in late}
        out: dict[str, Any] = {}
        failed: list[str] = []
        why: list[str] = []
        for n in names:
            if refs[n].hex() in late_ids:
                failed.append(n)
                why.append(f"{n}: no answer within {self.timeout_s:.0f} s")
                continue
            try:
                out[n] = ray.get(refs[n])
            except MACHINE_ERRORS:
                raise
            except RayActorError as e:
                failed.append(n)
                why.append(f"{n} died ({type(e).__name__}: {str(e).splitlines()[0]})")
            except RayTaskError as e:
                failed.append(n)
                why.append(f"{n} raised {e.cause!r}")
        if failed:
            if upstream & set(failed):
                why = [w for n, w in zip(failed, why, strict=True) if n in upstream]
                failed = [n for n in failed if n in upstream]
            raise RunFailed("; ".join(why), failed)
        return out

    # --- Transport ---------------------------------------------------------------------------
    def vm_ids(self) -> list[int]:
        return sorted(self._host_of)

    def host_of(self) -> dict[int, int]:
        return dict(self._host_of)

    def epoch(self, t_end_ns: int, until_ns: int | None = None
              ) -> tuple[int, dict[int, EpochReport]]:
        """One epoch (Engine.step); the operations applied and, per VM, an EpochReport
        carrying its host counters (the faults went to the VM actors).

        Where every host is one ``HostVmsActor`` its epochs involve no other actor, so one call
        runs several (``_fetch_epochs``) and the next epochs' answers wait here; each is
        accounted when the engine steps to it, so every metrics row and the warm-up snapshot
        are those of per-epoch calls. Otherwise the epoch goes actor to actor."""
        if self._batched:
            if not self._ready:
                self._fetch_epochs(t_end_ns, until_ns)
            t, got = self._ready.popleft()
            if t != t_end_ns:
                raise RuntimeError(f"epoch ending at {t_end_ns} ns asked, {t} ns computed")
            return self._account(got, critical_path=False)
        by_host: dict[int, list[tuple[str, Any]]] = {h: [] for h in self.host_actors}
        infos: dict[str, Any] = {}
        for a, name, _vms in self.host_vms_actors:  # host and VMs in one call
            infos[name] = a.epoch.remote(t_end_ns)
        for _a, name, vms in self.vm_actors:  # no ray.get: the refs go on to the host actor
            frames, infos[name] = self._step[name].remote(t_end_ns,
                                                          self._reports.get(name, {}))
            by_host[self._host_of[vms[0]]].append((name, frames))
        for h, groups in by_host.items():
            if not groups:
                continue
            refs = self._apply[h].remote(*[frames for _n, frames in groups],
                                         t_start_ns=self._t_start_ns)
            for (name, _f), report in zip(groups, refs[:-1], strict=True):
                self._reports[name] = report
            infos[f"host {h} actor"] = refs[-1]
        self._t_start_ns = t_end_ns
        return self._account(self._get(infos, upstream=self._upstream))

    def _fetch_epochs(self, t_end_ns: int, until_ns: int | None) -> None:
        """Run the epochs ending at ``t_end_ns`` and after, up to the run's end, on every
        ``HostVmsActor`` in one call each; queue their answers. How many: ``epochs_per_call``,
        or as many as took CALL_TARGET_S at the last call's pace (wall time picks only the
        batching, which no result depends on)."""
        length = t_end_ns - self._t_start_ns
        ends = [t_end_ns]
        k = self.epochs_per_call or self._k
        while len(ends) < k and until_ns is not None and ends[-1] < until_ns:
            ends.append(ends[-1] + length)
        t0 = time.perf_counter()
        got = self._get({name: a.epochs.remote(ends) for a, name, _v in self.host_vms_actors})
        per_epoch_s = (time.perf_counter() - t0) / len(ends)
        self._k = max(1, min(MAX_EPOCHS_PER_CALL, int(CALL_TARGET_S / max(per_epoch_s, 1e-6))))
        for i, t in enumerate(ends):
            self._ready.append((t, {name: infos[i] for name, infos in got.items()}))
        # each actor ran its epochs back to back: the call's critical path is the busiest
        # actor's sum, not the sum of each epoch's busiest
        self.emulation_s += max(sum(info[1] + info[4] for info in infos)
                                for infos in got.values())
        self._t_start_ns = ends[-1]

    def _account(self, got_infos: dict[str, Any], critical_path: bool = True
                 ) -> tuple[int, dict[int, EpochReport]]:
        """One epoch's answers: stats kept for the driver, emulation time on the critical
        path added up (unless the batch it came in was counted whole); the operations
        applied and the reports."""
        busiest_vm = busiest_host = busiest_both = 0.0
        ops = 0
        reports: dict[int, EpochReport] = {}
        for name, info in got_infos.items():
            if name in self._host_vms_names:  # VMs then host, one after the other
                stats, vm_s, counters, n, host_s = info
                ops += n
                busiest_both = max(busiest_both, vm_s + host_s)
                self._stats.update(stats)
                reports.update({vm: EpochReport(vm, c) for vm, c in counters.items()})
            elif name.startswith("host "):
                counters, n, busy_s = info
                ops += n
                busiest_host = max(busiest_host, busy_s)
                reports.update({vm: EpochReport(vm, c) for vm, c in counters.items()})
            else:
                stats, busy_s = info
                busiest_vm = max(busiest_vm, busy_s)
                self._stats.update(stats)
        if critical_path:
            self.emulation_s += max(busiest_vm + busiest_host, busiest_both)
        return ops, reports

    # --- Runner ------------------------------------------------------------------------------
    def guest_stats(self) -> dict[int, dict[str, int]]:
        return self._stats

    def finish(self) -> FinalState:
        guest_refs = {name: a.finish.remote(self._reports.get(name, {}))
                      for a, name, _vms in self.vm_actors}
        host_refs = {f"host {h} actor": a.finish.remote() for h, a in self.host_actors.items()}
        both_refs = {name: a.finish.remote() for a, name, _vms in self.host_vms_actors}
        got = self._get({**guest_refs, **host_refs, **both_refs})
        guest: dict[int, dict[str, int]] = {}
        counters: dict[int, dict[str, int]] = {}
        faults: dict[int, dict[str, np.ndarray]] = {}
        rss: dict[str, int] = {}
        for name in guest_refs:
            final, rss[name] = got[name]
            guest.update(final)
        for h in sorted(self.host_actors):
            c, f, rss[f"host {h} actor"] = got[f"host {h} actor"]
            counters.update(c)
            faults[h] = f
        for _a, name, vms in self.host_vms_actors:
            final, c, f, rss[name] = got[name]
            guest.update(final)
            counters.update(c)
            faults[self._host_of[vms[0]]] = f
        faults = dict(sorted(faults.items()))
        placement = {"nodes": self.nodes, "peak_rss_bytes": rss,
                     "vms": {name: vms for _a, name, vms in
                             [*self.vm_actors, *self.host_vms_actors]}}
        return FinalState(guest, counters, faults, placement)

    def close(self) -> None:
        """Kill this run's actors and free its placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.pg)
            self.pg = None
        if self._started:
            ray.shutdown()
            self._started = False
