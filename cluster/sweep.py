"""Sweeps: the cross product of a config's ``[sweep]`` values as independent, resumable runs.

Like gem5's or Mininet's parameter studies, a sweep is a list of plain configs: the base config
with one override per swept key path (cluster/config.py ``with_overrides``). Each point is a
run with its own run id (the hash of its config) whose tables land in the experiment's
datasets under Hive keys ``<param>=<value>/run=<id>`` (cluster/results.py), so one
``read_parquet`` of ``<out>/<experiment>/summary`` sees every point with the parameters as
columns. A rerun skips points whose run is complete and redoes missing and failed ones. On Ray
the points run in parallel as tasks across the cluster; in process, one after another.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import Config, ConfigError, with_overrides
from cluster.results import STATUS_COMPLETE, STATUS_FAILED, run_id, run_status

SWEEP_MANIFEST = "_sweep.json"
_VALUE_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Columns of the result tables: a parameter column must not shadow one of them.
RESERVED_COLUMNS = frozenset({
    "run", "experiment", "host", "vm", "group", "mode", "policy", "workload", "epoch",
    "t_end_ns", "time_ns", "sid", "pasid", "addr", "access", "reason", "reason_name", "stage"})


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its partition keys, the overrides that make it, its config."""

    params: tuple[tuple[str, str], ...]   # (column, value text), in sweep key order
    overrides: tuple[str, ...]
    cfg: Config
    run_id: str

    @property
    def key(self) -> str:
        """The point's partition path, ``<param>=<value>/...``: unique within a sweep (two
        points may share a run id when they resolve to the same config, e.g. shadow with
        policy lazy, which runs strict)."""
        return "/".join(f"{k}={v}" for k, v in self.params)


@dataclass
class SweepResult:
    """Points by ``SweepPoint.key``."""

    complete: list[str] = field(default_factory=list)   # run now
    skipped: list[str] = field(default_factory=list)    # complete before
    failed: dict[str, str] = field(default_factory=dict)  # -> error

    @property
    def ok(self) -> bool:
        return not self.failed


def param_column(key: str) -> str:
    """The column (and Hive key) of a swept key path: ``vm.web.mode`` -> ``vm_web_mode``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def value_text(value: Any) -> str:
    """A swept value as a folder-safe Hive partition value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "_".join(value_text(v) for v in value)
    return str(value)


def expand(cfg: Config) -> list[SweepPoint]:
    """Every point of ``cfg``'s sweep (the cross product, first key varying slowest)."""
    if not cfg.sweep:
        raise ConfigError("sweep", "the config has no [sweep] table (use `iommu-emu run`)")
    problems: list[tuple[str, str]] = []
    columns: dict[str, str] = {}
    for key, values in cfg.sweep:
        col = param_column(key)
        if col in RESERVED_COLUMNS:
            problems.append((f"sweep.{key}", f"its column {col!r} is a result column"))
        if col in columns:
            problems.append((f"sweep.{key}", f"its column {col!r} is also {columns[col]}'s"))
        columns[col] = key
        for v in values:
            if not _VALUE_RE.match(value_text(v)):
                problems.append((f"sweep.{key}", f"value {v!r} cannot name a folder "
                                 "(letters, digits, _ . + - only)"))
    if problems:
        raise ConfigError("", problems=problems)
    base = dataclasses.replace(cfg, sweep=())
    points: list[SweepPoint] = []
    keys = [k for k, _ in cfg.sweep]
    for combo in itertools.product(*(values for _, values in cfg.sweep)):
        overrides = tuple(f"{k}={json.dumps(v)}" for k, v in zip(keys, combo, strict=True))
        try:
            point = with_overrides(base, overrides)
        except ConfigError as e:
            where = ", ".join(overrides)
            raise ConfigError("", problems=[(f"sweep ({where}): {k}" if k else f"sweep ({where})",
                                             m) for k, m in e.problems]) from None
        params = tuple((param_column(k), value_text(v))
                       for k, v in zip(keys, combo, strict=True))
        points.append(SweepPoint(params, overrides, point, run_id(point)))
    return points


def _run_inproc(point: SweepPoint, out: str, backend: str) -> tuple[str, str]:
    from cluster.runner import RunError, run_config

    try:
        run_config(point.cfg, out, backend, params=point.params)
    except RunError as e:
        return STATUS_FAILED, str(e)
    return STATUS_COMPLETE, ""


def run_sweep(cfg: Config, out_dir: str | Path, backend: str = "inproc", *,
              address: str | None = None, max_parallel: int | None = None,
              on_point: Callable[[SweepPoint, str, str], None] | None = None) -> SweepResult:
    """Run every point not yet complete; ``on_point(point, status, error)`` after each.

    inproc runs points one after another; ray runs up to ``max_parallel`` (default: the
    cluster's CPUs) at once as tasks. The sweep manifest ``<experiment>/_sweep.json`` lists
    every point's parameters, run id and last status.
    """
    points = expand(cfg)
    out = str(Path(out_dir).resolve())
    exp = cfg.experiment.name
    result = SweepResult()
    status: dict[str, tuple[str, str]] = {}
    todo: list[SweepPoint] = []
    for p in points:
        if run_status(out, exp, p.run_id, p.params) == STATUS_COMPLETE:
            result.skipped.append(p.key)
            status[p.key] = (STATUS_COMPLETE, "")
        else:
            todo.append(p)

    def done(p: SweepPoint, st: str, err: str) -> None:
        status[p.key] = (st, err)
        if st == STATUS_COMPLETE:
            result.complete.append(p.key)
        else:
            result.failed[p.key] = err
        _write_manifest(out, cfg, points, status)
        if on_point is not None:
            on_point(p, st, err)

    if backend == "ray":
        _run_ray(todo, out, address, max_parallel, done)
    else:
        for p in todo:
            done(p, *_run_inproc(p, out, backend))
    _write_manifest(out, cfg, points, status)
    return result


def _run_ray(todo: Sequence[SweepPoint], out: str, address: str | None,
             max_parallel: int | None,
             done: Callable[[SweepPoint, str, str], None]) -> None:
    import ray
    from ray.exceptions import RayError

    from cluster.ray_runner import ray_session

    with ray_session(address):
        task = ray.remote(num_cpus=0, max_retries=0)(_run_inproc)
        limit = max_parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, SweepPoint] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                p = queue.pop(0)
                pending[task.remote(p, out, "ray")] = p
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p = pending.pop(ref)
                try:
                    st, err = ray.get(ref)
                except RayError as e:  # the task's worker died
                    st, err = STATUS_FAILED, f"{type(e).__name__}: {str(e).splitlines()[0]}"
                done(p, st, err)


def _write_manifest(out: str, cfg: Config, points: Sequence[SweepPoint],
                    status: dict[str, tuple[str, str]]) -> None:
    folder = Path(out) / cfg.experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    data = {"experiment": cfg.experiment.name,
            "sweep": {k: list(v) for k, v in cfg.sweep},
            "points": [{"run": p.run_id, "params": dict(p.params),
                        "status": status.get(p.key, ("pending", ""))[0],
                        "error": status.get(p.key, ("", ""))[1]} for p in points]}
    tmp = folder / f".{SWEEP_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / SWEEP_MANIFEST)
