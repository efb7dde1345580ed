"""The wheel ships every package, the configs and docs, and the licence; installed outside the
repo, `iommu-emu configs` and `iommu-emu run quickstart` work from what it installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "vm_agent", "host_iommu", "workloads")
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "results", "*.egg-info",
                              "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                              "tests", "benchmarks", "notebooks", "fuzz-failures")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel . --no-deps`` of a copy of the source tree (the repo's build/ untouched)."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(base / "w"),
                        "--no-deps", "-q"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    (found,) = (base / "w").glob("iommu_emu-*.whl")
    return found


def test_wheel_holds_every_module_config_doc_and_the_licence(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    src = wheel.parent.parent / "src"   # the copy the wheel was built from
    modules = {str(f.relative_to(src)) for pkg in PACKAGES for f in (src / pkg).rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    configs = {f"cluster/shipped_configs/{f.name}" for f in (ROOT / "configs").glob("*.toml")}
    docs = {f"cluster/shipped_docs/{f.name}" for f in (ROOT / "docs").glob("*.md")}
    assert configs and configs <= names and docs <= names
    assert "cluster/shipped_configs/quickstart.toml" in names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text and "Author:" in text
    lic = next(n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n)
    assert b"Apache License" in zipfile.ZipFile(wheel).read(lic)
    assert b"Version 2.0" in (ROOT / "LICENSE").read_bytes()[:300]


def test_installed_wheel_runs_quickstart_by_name_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)

    where = subprocess.run([sys.executable, "-c", "import cluster; print(cluster.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site))        # the installed copy, not the checkout
    listed = cli("configs")
    assert listed.returncode == 0, listed.stderr
    assert "quickstart" in listed.stdout and str(site) in listed.stdout
    ran = cli("run", "quickstart", "--out", "res", "--backend", "inproc",
              "--set", "experiment.duration_us=200")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (work / "res" / "quickstart" / "summary").is_dir()
    assert "measured: 4 VMs in 1 run" in ran.stdout
    missing = cli("run", "no-such-config", "--backend", "inproc")
    assert missing.returncode == 2 and "no-such-config" in missing.stderr
