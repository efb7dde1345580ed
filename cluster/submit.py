"""``iommu-emu submit``: a run or sweep as a Ray job (Ray Jobs API, JobSubmissionClient).

The job ships a working_dir runtime environment (the iommu-emu source tree by default, without
results, virtual environments or git data) and runs ``python -m cluster run|sweep CONFIG
--backend ray`` as its entrypoint on the cluster; the job's driver joins the cluster through
the RAY_ADDRESS that Ray sets for it. Results land in ``--out``, which must be storage every
node writes to the same way (a shared file system) on a real cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import time
from pathlib import Path

from cluster.config import ClusterError, load_config

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "results", "**/__pycache__", ".pytest_cache", "*.egg-info",
            "benchmarks/results", ".hypothesis"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ClusterError):
    """A job that cannot be submitted (no job server, config outside the working dir)."""


def entrypoint(python: str, command: str, config: str, out: str,
               overrides: list[str]) -> str:
    """The shell command the job runs in its working_dir."""
    args = [python, "-m", "cluster", command, config, "--out", out, "--backend", "ray"]
    for ov in overrides:
        args += ["--set", ov]
    return shlex.join(args)


def submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fail here, not on the cluster
    working_dir = Path(args.working_dir or ROOT).resolve()
    config = Path(args.config).resolve()
    try:
        rel = config.relative_to(working_dir)
    except ValueError:
        raise SubmitError(f"{args.config}: the config must be inside the working dir "
                          f"{working_dir} (or pass --working-dir)") from None
    out = str(Path(args.out or "results").resolve())
    if args.out and not Path(args.out).is_absolute():
        raise SubmitError(f"--out {args.out}: give an absolute path on the cluster's shared "
                          "storage (a relative one would land in the job's temporary dir)")
    command = "sweep" if cfg.sweep else "run"
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise SubmitError(f"submit needs ray[default] installed: {e}") from None
    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(
            entrypoint=entrypoint(args.python, command, str(rel), out, args.overrides),
            runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES},
            metadata={"experiment": cfg.experiment.name})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"cannot submit to {args.address}: {e}") from None
    print(f"job: {job_id}")
    print(f"results: {out}/{cfg.experiment.name} (on the cluster's storage)")
    print(f"logs: ray job logs --address {args.address} {job_id}")
    if not args.follow:
        return 0
    return follow(client, job_id)


def follow(client: object, job_id: str) -> int:
    """Print the job's logs as they come; 0 if it succeeded, 1 otherwise."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):  # type: ignore[attr-defined]
            print(lines, end="", flush=True)

    with contextlib.suppress(Exception):  # the log stream may close before the job ends
        asyncio.run(tail())
    status = str(client.get_job_status(job_id))  # type: ignore[attr-defined]
    while status.rsplit(".", 1)[-1] not in TERMINAL:
        time.sleep(1)
        status = str(client.get_job_status(job_id))  # type: ignore[attr-defined]
    status = status.rsplit(".", 1)[-1]
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
