"""The ``iommu-emu`` command line: run, sweep, submit, validate, import traces, report.

Like Mininet's bin/mn, names on the command line map to registries (config.MODES, the
workload registry, the runner's backends). User errors print ``error: ...`` naming the key or
file and exit 2, never a traceback; a run that fails midway exits 1 naming what failed and
where its manifest is; Ctrl-C exits 130 and SIGTERM (what batch schedulers send) 143, both
keeping the interrupted run's streamed metrics readable by ``iommu-emu report``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.config import MODES, ClusterError, describe, load_config

EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM   # 143, as a shell reports a process SIGTERM ended
DEFAULT_BACKENDS = ("ray", "inproc")
DEFAULT_BACKEND = "ray"


class UserError(ClusterError):
    """A command-line mistake that is not a config problem (missing file, bad backend)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds like Ctrl-C (runs keep their
    partial results, staging folders are cleaned up)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated("SIGTERM")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("iommu-emu")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _shipped_dir() -> Path | None:
    """The shipped configs: configs/ installed as cluster/shipped_configs (pyproject
    package-dir), or configs/ of a source checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "shipped_configs", here.parent / "configs"):
        if any(d.glob("*.toml")):
            return d
    return None


def shipped_configs() -> dict[str, Path]:
    """Bare name (``quickstart``) -> the shipped config file."""
    d = _shipped_dir()
    return {f.stem: f for f in sorted(d.glob("*.toml"))} if d else {}


def resolve_config(name: str) -> str:
    """``name`` as a path if that file exists, else a shipped config by name (``quickstart``
    or ``quickstart.toml``), else ``name`` (loading it then names the missing file)."""
    if Path(name).exists() or os.sep in name or "/" in name:
        return name
    shipped = shipped_configs().get(name.removesuffix(".toml"))
    return str(shipped) if shipped is not None else name


def _out_folder(out: str | Path, flag: str = "--out") -> Path:
    """A results folder that is (or can become) a folder: not a file."""
    p = Path(out)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise UserError(f"{flag}: {q} is a file, not a folder")
    return p


def _workload_kinds() -> str:
    try:
        kinds = getattr(importlib.import_module("workloads"), "WORKLOADS", {})
    except ImportError:
        kinds = {}
    return ", ".join(sorted(kinds)) or "(none registered)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iommu-emu",
        description="Emulate VMs doing device DMA through an emulated Intel VT-d IOMMU.",
        epilog=f"modes: {', '.join(MODES)}; workloads: {_workload_kinds()}. "
               "Config keys: docs/config.md; result columns: docs/results.md.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a config key, e.g. vm.web.count=4 (repeatable)")

    def backend(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", default=DEFAULT_BACKEND,
                       help="ray (actors; embedded local Ray unless --address) or inproc "
                            f"(one process, for debugging); default: {DEFAULT_BACKEND}")
        p.add_argument("--address", default=None,
                       help="Ray cluster to join (host:port or auto; default: RAY_ADDRESS, "
                            "else an embedded local Ray sized to this machine)")

    p = sub.add_parser("run", help="run one config and print its summary")
    p.add_argument("config", metavar="CONFIG",
                   help="TOML config file, or a shipped config's name (iommu-emu configs)")
    p.add_argument("--out", default="results", help="results folder (default: results)")
    overrides(p)
    backend(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder with the same run id")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run every point of a config's [sweep] table")
    p.add_argument("config", metavar="CONFIG", help="TOML config file with a [sweep] table")
    p.add_argument("--out", default="results", help="results folder (default: results)")
    overrides(p)
    backend(p)
    p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="runs at once on Ray (default: the cluster's CPUs)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("submit", help="run or sweep a config as a Ray job on a cluster")
    p.add_argument("config", metavar="CONFIG", help="TOML config file (run, or sweep if it "
                                                    "has a [sweep] table)")
    p.add_argument("--address", required=True,
                   help="the cluster's job server, e.g. http://HEAD:8265")
    p.add_argument("--out", default=None,
                   help="results folder on the cluster's shared storage (absolute; default: "
                        "./results made absolute)")
    overrides(p)
    p.add_argument("--follow", action="store_true", help="tail the job's logs until it ends")
    p.add_argument("--working-dir", default=None,
                   help="folder shipped as the job's working_dir (default: the iommu-emu "
                        "source tree)")
    p.add_argument("--python", default="python",
                   help="the Python the job runs on the cluster (default: python)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("validate", help="check a config and print what it resolves to")
    p.add_argument("config", metavar="CONFIG", help="TOML config file")
    overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("trace", help="trace file tools")
    tsub = p.add_subparsers(dest="trace_command", required=True, metavar="TRACE_COMMAND")
    t = tsub.add_parser("import", help="convert ftrace iommu:map/unmap text to a trace file")
    t.add_argument("ftrace_text", metavar="FTRACE_TEXT", help="ftrace text output")
    t.add_argument("-o", "--out", required=True, help="trace file to write")
    t.add_argument("--device", default=None, help="keep only events of this device")
    t.set_defaults(func=cmd_trace_import)

    p = sub.add_parser("report", help="summarise a run, an experiment or a sweep; write "
                                      "report.md and PNG plots with --out")
    p.add_argument("path", metavar="RESULTS",
                   help="a run folder (_runs/.../run=<id>), an experiment or a sweep folder")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write report.md and the PNG plots into DIR")
    p.add_argument("--format", default="text", choices=("text", "markdown", "csv", "json"),
                   help="how to print the table (default: text)")
    p.add_argument("--by", default=None, metavar="KEYS",
                   help="comma-separated summary columns to group by (default: "
                        "mode,policy,workload; vm for one row per VM)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("clean", help="remove staging folders (.tmp-run=*) that killed runs "
                                     "left behind")
    p.add_argument("path", metavar="RESULTS", help="a results folder (--out) or an experiment "
                                                   "folder")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("configs", help="list the shipped configs (run one by name: "
                                       "iommu-emu run quickstart)")
    p.set_defaults(func=cmd_configs)
    return parser


# --- Commands ------------------------------------------------------------------------------
def _print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"note: {note}")


def _runner(backend: str) -> Any:
    try:
        runner = importlib.import_module("cluster.runner")
    except ImportError as e:
        raise UserError(f"the runner is not available: {e}") from None
    backends = tuple(getattr(runner, "BACKENDS", DEFAULT_BACKENDS))
    if backend not in backends:
        raise UserError(f"--backend: unknown backend {backend!r} "
                        f"(one of: {', '.join(backends)})")
    return runner


def _session(backend: str, address: str | None) -> Any:
    """An embedded or joined Ray for the ray backend; nothing for the others."""
    if backend != "ray":
        return contextlib.nullcontext()
    try:
        from cluster.ray_runner import ray_session
    except ImportError as e:
        raise UserError(f"the ray backend needs ray[default] installed: {e}") from None
    return _sigterm_after(ray_session(address))


@contextlib.contextmanager
def _sigterm_after(session: Any) -> Any:
    """Enter ``session``, then take SIGTERM back: a Ray driver installs its own handler, which
    ends the process at once (losing the run's streamed metrics and its staging folder)."""
    with session:
        with contextlib.suppress(ValueError):   # not the main thread: leave SIGTERM alone
            signal.signal(signal.SIGTERM, _on_sigterm)
        yield


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_config(args.config), args.overrides)
    if cfg.sweep:
        raise UserError(f"{args.config} has a [sweep] table: use `iommu-emu sweep`")
    _out_folder(args.out)
    runner = _runner(args.backend)
    _print_notes(cfg.notes)
    from cluster.progress import Progress

    progress = Progress(cfg.experiment.name, "ms of virtual time")
    total_ms = cfg.experiment.duration_us / 1000
    kwargs: dict[str, Any] = {}
    if progress.enabled:
        kwargs["on_epoch"] = lambda ep: progress.update(ep.t_end_ns / 1e6, total_ms)
    if args.address:
        kwargs["address"] = args.address
    with _session(args.backend, args.address):
        try:
            outcome = runner.run_config(cfg, args.out, backend=args.backend,
                                        overwrite=args.overwrite, **kwargs)
        finally:
            progress.close()
    from cluster.report import format_summary, measured_line

    print(measured_line(outcome.summary))
    print(format_summary(outcome.summary))
    print(f"results: {Path(args.out) / cfg.experiment.name} (run folder: {outcome.path})")
    _note_leftovers(Path(args.out) / cfg.experiment.name)
    return 0


def _note_leftovers(exp_dir: Path) -> None:
    from cluster.results import leftover_staging

    left = leftover_staging(exp_dir)
    if left:
        print(f"note: {len(left)} staging folder(s) of killed runs in {exp_dir} "
              f"(e.g. {left[0].name}): remove them with `iommu-emu clean {exp_dir}`",
              file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> int:
    from cluster.progress import Progress
    from cluster.sweep import expand, run_sweep

    cfg = load_config(resolve_config(args.config), args.overrides)
    _out_folder(args.out)
    _runner(args.backend)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise UserError(f"--max-parallel: must be >= 1, got {args.max_parallel}")
    points = expand(cfg)
    _print_notes(cfg.notes)
    progress = Progress(f"sweep {cfg.experiment.name}", "runs")
    seen = [0]

    def on_point(p: Any, status: str, error: str) -> None:
        seen[0] += 1
        params = " ".join(f"{k}={v}" for k, v in p.params)
        progress.close()
        print(f"{status}: {params} (run {p.run_id})" + (f": {error}" if error else ""))
        progress.update(seen[0], len(todo), force=True)

    from cluster.results import is_complete

    todo = [p for p in points if not is_complete(args.out, cfg.experiment.name, p.run_id,
                                                 p.params)]
    with _session(args.backend, args.address):
        try:
            result = run_sweep(cfg, args.out, args.backend, address=args.address,
                               max_parallel=args.max_parallel, on_point=on_point)
        finally:
            progress.close()
    print(f"sweep {cfg.experiment.name}: {len(points)} runs, {len(result.complete)} run now, "
          f"{len(result.skipped)} already complete, {len(result.failed)} failed")
    print(f"results: {Path(args.out) / cfg.experiment.name}")
    _note_leftovers(Path(args.out) / cfg.experiment.name)
    return 0 if result.ok else EXIT_RUN_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.submit import submit

    return submit(args)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_config(args.config), args.overrides)
    print(describe(cfg))
    return 0


def _print_counts(result: Any) -> None:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    if isinstance(result, Mapping):
        for key in sorted(result):
            print(f"{key}: {result[key]}")
    elif isinstance(result, int):
        print(f"records: {result}")
    elif result is not None:
        print(result)


def cmd_trace_import(args: argparse.Namespace) -> int:
    src = Path(args.ftrace_text)
    if not src.is_file():
        raise UserError(f"{src}: no such ftrace text file")
    try:
        trace = importlib.import_module("workloads.trace")
    except ImportError as e:
        raise UserError(f"trace import is not available: {e}") from None
    trace_error = getattr(trace, "TraceError", None)
    kwargs = {"device": args.device} if args.device else {}
    try:
        result = trace.import_ftrace(str(src), args.out, **kwargs)
    except Exception as e:
        if trace_error is not None and isinstance(e, trace_error):
            raise UserError(str(e)) from None   # TraceError names its file (in or out)
        if isinstance(e, OSError):
            raise UserError(f"{e.filename or args.out}: {e.strerror or e}") from None
        raise
    _print_counts(result)
    print(f"trace: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cluster.report import (
        GROUP_KEYS,
        design_table,
        load_results,
        measured_line,
        render,
        runs_section,
        write_report,
    )

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such results folder")
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else list(GROUP_KEYS)
    if args.out:
        _out_folder(args.out)
    res = load_results(path)
    table = render(design_table(res, by), args.format)
    report = write_report(res, args.out, by) if args.out else None
    for run, m in sorted(res.manifests.items()):
        if m.get("status") != "complete":
            print(f"note: run {run} did not complete ({m.get('error') or m.get('status')}): "
                  "its numbers cover the epochs written before it stopped", file=sys.stderr)
    if args.format == "text":
        print(measured_line(res.summary))
        print(table)
        if len(res.manifests) > 1:
            print("runs:")
            for line in runs_section(res):
                print(f"  {line}")
        if report is not None:
            print(f"report: {report} (plots beside it)")
    else:
        print(table)
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    configs = shipped_configs()
    if not configs:
        raise UserError("no shipped configs found (the package was installed without them)")
    width = max(map(len, configs))
    for name, path in configs.items():
        # each config opens with a comment saying what question it answers
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines()
                      if ln.startswith("#")), "")
        print(f"{name.ljust(width)}  {first}")
    print(f"(in {next(iter(configs.values())).parent}; run one: iommu-emu run NAME --out DIR)")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    import shutil

    from cluster.results import staging_folders, writer_alive

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such results folder")
    removed = 0
    for f in staging_folders(path):
        if writer_alive(f):
            print(f"kept {f} (its run is still writing)")
            continue
        shutil.rmtree(f)
        removed += 1
        print(f"removed {f}")
    print(f"{removed} staging folder(s) removed from {path}")
    return 0


# --- Entry point ---------------------------------------------------------------------------
def _error(message: str) -> None:
    lines = message.splitlines() or [""]
    print(f"error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"error: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the command, return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        why = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        path = getattr(e, "path", None)
        where = (f": partial results in {path} (read them with `iommu-emu report {path}`; "
                 "the next run redoes it)" if path else "")
        print(f"interrupted ({why}){where}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:  # `iommu-emu report DIR | head`: the reader has what it wanted
        # Point stdout at /dev/null so the flush at exit does not fail again (Python docs,
        # "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ClusterError as e:  # ConfigError, ResultsError, UserError, RunFailed ...
        failed = getattr(e, "failed", None)
        if failed is not None:  # a run that started and failed (cluster.runner.RunFailed)
            _error(f"run failed: {e}")
            if getattr(e, "path", None) is not None:
                _error(f"its manifest and partial metrics: {e.path}")
            return EXIT_RUN_FAILED
        _error(str(e))
        return EXIT_USER_ERROR
    except OSError as e:  # a path that cannot be written or read: name it, no traceback
        _error(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        return EXIT_USER_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
