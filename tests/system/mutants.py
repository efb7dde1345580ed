"""Mutation check of the system tests: put each realistic bug into a private copy, run the
tests that should kill it, and report which did.

    .venv/bin/python tests/system/mutants.py [--copy DIR] [NAME ...]

It never touches the working tree: the committed tree (HEAD; with ``--worktree`` the working
tree, without .venv and .git) is copied into ``--copy`` (default /tmp/iommu-emu-mutants), the
unmodified copy must pass each mutant's tests, then each mutant's edit is applied there, its
tests run (they must fail), and the file restored.
A mutant whose text is no longer found in the model says so: update its pattern here.
docs/testing.md lists the mutants and the tests that kill them.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("nested-vmm-drops-psi", "vm_agent/vmm.py",
           "            else:\n                addr, npages = cmd.addr, 1 << cmd.am\n",
           "            else:\n                continue\n",
           ("tests/system/test_safety.py", "tests/vm_agent/test_vmm.py")),
    Mutant("shadow-vmm-no-vfio-unmap", "vm_agent/vmm.py",
           "self.log.add(t, OP_VFIO_UNMAP,",
           "None and self.log.add(t, OP_VFIO_UNMAP,",
           ("tests/system/test_safety.py", "tests/vm_agent/test_vmm.py")),
    Mutant("cross-vm-counter-zero", "host_iommu/server.py",
           "cross = ok & (owner != vm)",
           "cross = ok & False",
           ("tests/system/test_oracles.py", "tests/host_iommu/test_server.py")),
    Mutant("balloon-frees-without-flush", "host_iommu/nested.py",
           "t_done, nd = flush_derived(host, vm, gpa, npages, t_ns, ih=not freed)",
           "t_done, nd = t_ns, 0",
           ("tests/system/test_churn_safety.py", "tests/host_iommu/test_nested.py")),
    Mutant("lazy-timer-never-fires", "vm_agent/dma.py",
           "if t is not None and dom.fq.on_timer(t):",
           "if False:",
           ("tests/system/test_safety.py", "tests/vm_agent/test_dma.py")),
    Mutant("guest-ignores-seed", "vm_agent/agent.py",
           "default_rng([seed, ",
           "default_rng([0, ",
           ("tests/system/test_determinism.py", "tests/vm_agent/test_agent.py")),
    Mutant("pasid-inv-drops-domain-pwc", "host_iommu/iommu.py",
           "self.fl_pwc.inv_pasid(did, pasid)",
           "self.fl_pwc.inv_domain(did)",
           ("tests/host_iommu/test_invalidate.py", "tests/host_iommu/test_kernel_qi.py")),
    Mutant("churn-unknown-keys-dropped", "cluster/config.py",
           'churn = _build(churn_cls, table["churn"], ',
           'churn = _build(churn_cls, {k: v for k, v in dict(table["churn"]).items() if k in '
           '{f.name for f in dataclasses.fields(churn_cls)}}, ',
           ("tests/system/test_config_guards.py",)),
    Mutant("hwpt-invalidate-skips-devtlb", "host_iommu/nested.py",
           "ats = dom.sid in host.ats_sids",
           "ats = False",
           ("tests/system/test_safety.py", "tests/host_iommu/test_nested.py")),
    Mutant("vfio-unmap-skips-devtlb", "host_iommu/vfio.py",
           "ats = [sid for sid in dom.sids if sid in host.ats_sids]",
           "ats = []",
           ("tests/system/test_safety.py", "tests/host_iommu/test_vfio.py")),
    # The walker's differential test must not share code with its reference: a bug in the
    # walker's reserved-bit table or its paging-structure cache is caught by the reference.
    Mutant("walker-sl-snp-not-reserved", "host_iommu/pgtable.py",
           "bad = base | SL_SNP | SL_PS",
           "bad = base | SL_PS",
           ("tests/host_iommu/test_walk.py",)),
    Mutant("pwc-never-probes-the-top-level", "host_iommu/kernels/pwc.py",
           "for lv in range(PWC_MIN_LEVEL, int(levels[i]) + 1):",
           "for lv in range(PWC_MIN_LEVEL, int(levels[i])):",
           ("tests/host_iommu/test_walk.py",)),
    # The context/PASID-cache kernel and the QI's effect kernel against their references.
    Mutant("pasid-cache-ignores-pasid", "host_iommu/kernels/entrycache.py",
           "and st[HDR + P_PASID * lines + line] == pasid):",
           "):",
           ("tests/host_iommu/test_kernel_entrycache.py",)),
    Mutant("pasid-wide-flush-drops-whole-domain-pwc", "host_iommu/kernels/qiq.py",
           "_inv_range(fl_state, fl_counts, not every, did, not every, pasid, zero, whole,",
           "_inv_range(fl_state, fl_counts, not every, did, every, pasid, zero, whole,",
           ("tests/host_iommu/test_kernel_qi.py",)),
)


def pytest(copy: Path, tests: tuple[str, ...]) -> tuple[int, list[str]]:
    """Exit status of pytest on ``tests`` in ``copy``, and the ids of the failed tests."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    out = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, check=False)
    failed = [line.split()[1] for line in out.stdout.splitlines()
              if line.startswith("FAILED ")]
    return out.returncode, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copy", type=Path, default=Path("/tmp/iommu-emu-mutants"))
    ap.add_argument("--worktree", action="store_true",
                    help="copy the working tree, uncommitted changes included (default: HEAD)")
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if ROOT.is_relative_to(args.copy.resolve()) or args.copy.resolve().is_relative_to(ROOT):
        ap.error(f"--copy {args.copy} must lie outside the repository")
    shutil.rmtree(args.copy, ignore_errors=True)
    if args.worktree:
        shutil.copytree(ROOT, args.copy, ignore=shutil.ignore_patterns(
            ".venv", ".git", "results", "__pycache__", ".pytest_cache", ".hypothesis"))
    else:
        tree = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tree)) as tar:
            tar.extractall(args.copy, filter="data")
    survivors = 0
    for m in chosen:
        target = args.copy / m.path
        text = target.read_text()
        if text.count(m.old) != 1:
            print(f"{m.name:32} PATTERN NOT FOUND in {m.path}: update tests/system/mutants.py")
            survivors += 1
            continue
        if pytest(args.copy, m.tests)[0] != 0:
            print(f"{m.name:32} UNMODIFIED COPY FAILS {' '.join(m.tests)}")
            survivors += 1
            continue
        try:
            target.write_text(text.replace(m.old, m.new))
            shutil.rmtree(target.parent / "__pycache__", ignore_errors=True)
            rc, failed = pytest(args.copy, m.tests)
        finally:
            target.write_text(text)
            shutil.rmtree(target.parent / "__pycache__", ignore_errors=True)
        if rc == 1 and failed:
            print(f"{m.name:32} killed by {len(failed)}:")
            for test in failed:
                print(f"{'':36}{test}")
        else:
            print(f"{m.name:32} SURVIVED (pytest exit {rc})")
            survivors += 1
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
