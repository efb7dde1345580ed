"""A real two-node Ray cluster on this machine: hosts on different nodes, equal tables, jobs.

The module starts a head (``ray start --head --block``, dashboard and job server on free
ports) and a second node (``ray start --address ... --resources '{"node2": 1}'``), one CPU
each, each in its own process group, with a token of its own (RAY_AUTH_MODE=token) and its
own temp dir. The runs are driven by ``iommu-emu`` subprocesses joining that cluster, so the
test session's shared local Ray is untouched. At the end exactly the two process groups it
started are terminated (never ``ray stop``, which would stop every Ray on the machine), and any
process still running from its temp dir is killed by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.results import read_manifest, read_run, run_dir, run_id
from cluster.runner import run_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
START_TIMEOUT_S = 180
OVERRIDES = ["experiment.duration_us=500", "host.count=2", "host.memory_mib=1024"]

pytestmark = pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node listens on, free ones: two nodes share this machine."""
    out = ["--node-ip-address", "127.0.0.1"]
    for flag in ("--node-manager-port", "--object-manager-port", "--ray-client-server-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"):
        out += [flag, str(free_port())]
    return out


class TwoNodes:
    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: socket paths
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = free_port()
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": os.urandom(16).hex()}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: str) -> None:
        with open(self.temp / log, "wb") as f:
            self.procs.append(subprocess.Popen([str(RAY), "start", "--block", *args],
                                               env=self.env, stdout=f,
                                               stderr=subprocess.STDOUT, cwd=self.temp,
                                               start_new_session=True))

    def alive_nodes(self) -> int:
        r = subprocess.run([sys.executable, "-c",
                            f"import ray; ray.init(address={self.gcs!r}, "
                            "logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"],
                           env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_for(self, nodes: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}; see {self.temp}")
            if self.alive_nodes() >= nodes:
                return
            time.sleep(2)
        raise RuntimeError(f"the cluster did not reach {nodes} nodes; logs in {self.temp}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:  # a node drains for up to 30 s on SIGTERM: the test has nothing to drain
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        # Workers started by these nodes carry our temp dir in their command line.
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(self.temp).encode() in cmd:
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    c = TwoNodes()
    try:
        c.start(["--head", f"--port={c.gcs.rsplit(':', 1)[1]}", "--num-cpus=1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={c.dashboard}", f"--temp-dir={c.temp}", *node_ports()],
                "head.log")
        c.wait_for(1)
        c.start([f"--address={c.gcs}", "--num-cpus=1", '--resources={"node2": 1}',
                 *node_ports()], "node2.log")
        c.wait_for(2)
        yield c
    finally:
        c.stop()


def iommu_emu(c: TwoNodes, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], env=c.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_two_hosts_land_on_two_nodes_with_inproc_tables(tmp_path, two_nodes):
    cfg_path = ROOT / "configs" / "quickstart.toml"
    overrides = [a for ov in OVERRIDES for a in ("--set", ov)]
    r = iommu_emu(two_nodes, "run", str(cfg_path), "--out", str(tmp_path / "ray"),
                  "--address", two_nodes.gcs, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(cfg_path, OVERRIDES)
    rid = run_id(cfg)
    path = run_dir(tmp_path / "ray", cfg.experiment.name, rid)
    nodes = read_manifest(path)["placement"]["nodes"]
    by_host = {h: {n for name, n in nodes.items() if f"host {h}" in name} for h in (0, 1)}
    assert all(len(v) == 1 for v in by_host.values())  # a host and its VMs share a node
    assert by_host[0] != by_host[1]                      # the hosts do not
    local = run_config(cfg, tmp_path / "inproc", "inproc")
    ours, theirs = read_run(local.path), read_run(path)
    for table in ("summary", "metrics", "faults"):
        assert ours[table].equals(theirs[table]), table
    assert set(ours["summary"]["host"].to_pylist()) == {0, 1}


def test_submit_runs_a_job_and_its_results_appear(tmp_path, two_nodes):
    out = tmp_path / "job-results"
    r = iommu_emu(two_nodes, "submit", "configs/quickstart.toml", "--address",
                  f"http://127.0.0.1:{two_nodes.dashboard}", "--out", str(out),
                  "--python", sys.executable, "--follow",
                  *[a for ov in OVERRIDES for a in ("--set", ov)], timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "job: " in r.stdout and f"results: {out}/quickstart" in r.stdout
    assert "SUCCEEDED" in r.stdout
    cfg = load_config(ROOT / "configs" / "quickstart.toml", OVERRIDES)
    manifest = read_manifest(run_dir(out, "quickstart", run_id(cfg)))
    assert manifest["status"] == "complete"
    assert json.loads(json.dumps(manifest["placement"]["nodes"]))  # ran on Ray actors
