"""The ``iommu-emu`` command line: run, validate, import traces, report on results.

Like Mininet's bin/mn, names on the command line map to registries (config.MODES, the
workload registry, the runner's backends). User errors print ``error: ...`` naming the key or
file and exit 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.config import MODES, ClusterError, describe, load_config

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_BACKENDS = ("inproc",)


class UserError(ClusterError):
    """A command-line mistake that is not a config problem (missing file, bad backend)."""


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a config key, e.g. vm.web.count=4 (repeatable)")

    p = sub.add_parser("run", help="run one config and print its summary")
    p.add_argument("config", metavar="CONFIG", help="TOML config file")
    p.add_argument("--out", default="results", help="results folder (default: results)")
    overrides(p)
    p.add_argument("--backend", default="inproc", help="where to run (default: inproc)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder with the same run id")
    p.set_defaults(func=cmd_run)

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

    p = sub.add_parser("report", help="summarise a run folder or all runs of an experiment")
    p.add_argument("path", metavar="RUN_OR_EXPERIMENT_DIR")
    p.set_defaults(func=cmd_report)
    return parser


# --- Commands ------------------------------------------------------------------------------
def _print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"note: {note}")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        runner = importlib.import_module("cluster.runner")
    except ImportError as e:
        raise UserError(f"the runner is not available: {e}") from None
    backends = tuple(getattr(runner, "BACKENDS", DEFAULT_BACKENDS))
    if args.backend not in backends:
        raise UserError(f"--backend: unknown backend {args.backend!r} "
                        f"(one of: {', '.join(backends)})")
    _print_notes(cfg.notes)
    outcome = runner.run_config(cfg, args.out, backend=args.backend,
                                overwrite=args.overwrite)
    from cluster.report import format_summary

    print(format_summary(outcome.summary))
    print(f"results: {outcome.path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
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
            raise UserError(f"{src}: {e}") from None
        if isinstance(e, OSError):
            raise UserError(f"{e.filename or args.out}: {e.strerror or e}") from None
        raise
    _print_counts(result)
    print(f"trace: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cluster.report import format_summary
    from cluster.results import read_summaries

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such results folder")
    print(format_summary(read_summaries(path)))
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
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterError as e:  # ConfigError, ResultsError, UserError ...
        _error(str(e))
        return EXIT_USER_ERROR
