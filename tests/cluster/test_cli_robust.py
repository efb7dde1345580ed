"""The command line never surprises: clear errors (exit 2) naming the flag, signals exit
130/143 keeping the interrupted run readable, a closed pipe ends quietly, no litter left
unnoticed, --version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from cluster.config import load_config
from cluster.results import RunWriter, read_run

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
SHORT = ["--backend", "inproc", "--set", "experiment.duration_us=200"]
CLI = [sys.executable, "-m", "cluster"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _litter(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-run=*"))


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("iommu-emu ")


@pytest.mark.parametrize("command", [["run", QUICKSTART, *SHORT], ["sweep", QUICKSTART],
                                     ["report", "."]])
def test_out_naming_a_file_is_refused_by_flag(command, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    for out in (f, f / "below"):
        assert main([*command, "--out", str(out)]) == 2
        assert f"--out: {f} is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "keep" and sorted(tmp_path.iterdir()) == [f]


def test_a_second_run_names_the_overwrite_flag_and_overwrite_repeats(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["run", QUICKSTART, "--out", out, *SHORT]) == 0
    assert main(["run", QUICKSTART, "--out", out, *SHORT]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "(use --overwrite to replace it)" in err
    assert main(["run", QUICKSTART, "--out", out, *SHORT, "--overwrite"]) == 0  # make run
    assert "measured: 4 VMs in 1 run" in capsys.readouterr().out
    assert _litter(tmp_path) == []
    assert "--overwrite" in (ROOT / "Makefile").read_text().split("\nrun:")[1].split("\n\n")[0]


def test_trace_import_into_a_missing_folder_names_it(tmp_path, capsys):
    src = tmp_path / "ftrace.txt"
    src.write_text("             fio-1234    [001] .....     7.000000: map: IOMMU: "
                   "iova=0x0000000000001000 - 0x0000000000002000 paddr=0x0000000000005000 "
                   "size=4096\n")
    target = tmp_path / "missing" / "t.trace"
    assert main(["trace", "import", str(src), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "Traceback" not in err
    assert not target.parent.exists()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`iommu-emu report DIR | head`: the reader is gone before the first line."""
    out = tmp_path / "r"
    assert main(["run", QUICKSTART, "--out", str(out), *SHORT]) == 0
    r, w = os.pipe()
    os.close(r)   # the reader has gone: the first write fails with EPIPE
    try:
        p = subprocess.run([*CLI, "report", str(out / "quickstart"), "--by", "vm"],
                           stdout=w, stderr=subprocess.PIPE, env=_env(), timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 0, p.stderr
    assert b"Traceback" not in p.stderr and p.stderr == b""


@pytest.mark.parametrize(("sig", "code", "name", "backend"), [
    (signal.SIGTERM, EXIT_TERMINATED, "SIGTERM", "inproc"),
    (signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C", "inproc"),
    # a Ray driver installs its own SIGTERM handler; the CLI takes SIGTERM back
    (signal.SIGTERM, EXIT_TERMINATED, "SIGTERM", "ray")])
def test_a_signal_keeps_the_run_readable_and_leaves_no_staging(sig, code, name, backend,
                                                                tmp_path, capsys):
    if backend == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "r"
    args = ["run", QUICKSTART, "--out", str(out), "--backend", backend,
            "--set", "experiment.duration_us=500000"]
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env())
    try:
        # wait (polling, no time limit asserted) until the run has streamed an epoch's rows:
        # the stream file first holds only its schema, then grows by one batch per epoch
        # (a loaded machine may take seconds to start the run and load the kernels)
        streams: list = []
        while p.poll() is None and not streams:
            streams = list(out.glob("quickstart/.tmp-run=*/metrics.arrows"))
            time.sleep(0.2)
        header = streams[0].stat().st_size if streams else 0
        while p.poll() is None and streams and streams[0].stat().st_size <= header:
            time.sleep(0.2)
        time.sleep(0.5)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    err = err.decode()
    assert f"interrupted ({name}): partial results in" in err and "Traceback" not in err
    assert _litter(tmp_path) == []
    run_folder = next((out / "quickstart" / "_runs").iterdir())
    manifest = json.loads((run_folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == f"interrupted ({name})"
    assert read_run(run_folder)["metrics"].num_rows > 0   # nothing lost
    capsys.readouterr()
    assert main(["report", str(run_folder)]) == 0
    got = capsys.readouterr()
    assert "measured: 4 VMs in 1 run" in got.out and "did not complete" in got.err
    # the next attempt of the same config may redo it (no --overwrite needed)
    with RunWriter(out, load_config(QUICKSTART, ["experiment.duration_us=500000"])) as w:
        assert w.final_dir == run_folder
    assert _litter(tmp_path) == []


def test_leftover_staging_is_reported_and_cleaned(tmp_path, capsys):
    out = tmp_path / "r"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = out / "quickstart" / f".tmp-run=quickstart-s1-0123456789ab-{dead}-0badc0de"
    alive = out / "quickstart" / f".tmp-run=quickstart-s1-0123456789ab-{os.getpid()}-1badc0de"
    for d in (killed, alive):
        d.mkdir(parents=True)
        (d / "metrics.arrows").write_bytes(b"")
    assert main(["run", QUICKSTART, "--out", str(out), *SHORT]) == 0
    err = capsys.readouterr().err
    assert "note: 1 staging folder(s) of killed runs" in err and killed.name in err
    assert main(["clean", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"removed {killed}" in text and f"kept {alive}" in text
    assert not killed.exists() and alive.exists()
    assert main(["clean", str(tmp_path / "nothing")]) == 2
