"""Command line: user errors exit 2 with "error:" and the key; run/validate/report/trace."""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pyarrow as pa
import pytest

import cluster.config
from cluster.cli import build_parser, main
from cluster.results import RunWriter


class Nvme:
    @dataclass(frozen=True)
    class Params:
        rogue_fraction: float = 0.0
        queue_depth: int = 32


REG = SimpleNamespace(WORKLOADS={"nvme": Nvme}, CHURN_PARAMS=None)

GOOD = """\
[experiment]
name = "cli"
[vm.web]
mode = "shadow"
policy = "lazy"
count = 2
[vm.web.workload]
kind = "nvme"
"""

SUMMARY = pa.table({
    "vm": [1], "mode": ["shadow"], "policy": ["strict"], "workload": ["nvme"],
    "sim_ns": [1000], "ios": [4], "bytes": [4096], "vm_exits": [8], "inv_descriptors": [8],
    "walk_refs": [0], "translations": [4], "iotlb_hits": [4], "iotlb_misses": [0],
    "stale_dma": [0], "cross_vm_dma": [0], "faults": [0],
})


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setattr(cluster.config, "_default_registry", lambda: REG)


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    return p


@pytest.fixture
def fake_runner(monkeypatch):
    calls = []
    mod = ModuleType("cluster.runner")
    mod.BACKENDS = ("inproc",)

    def run_config(cfg, out_dir, backend="inproc", overwrite=False, **kwargs):
        calls.append((cfg, out_dir, backend, overwrite))
        w = RunWriter(out_dir, cfg, overwrite=overwrite)
        w.write_table("summary", SUMMARY)
        return SimpleNamespace(path=w.commit(), summary=SUMMARY)

    mod.run_config = run_config
    monkeypatch.setitem(sys.modules, "cluster.runner", mod)
    return calls


def user_error(capsys, argv) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "error:" in out.err and "Traceback" not in out.err
    return out.err


@pytest.mark.parametrize(("text", "key"), [
    (GOOD + "colour = 1\n", "vm.web.workload.colour"),
    (GOOD.replace("count = 2", "count = -2"), "vm.web.count"),
    (GOOD.replace('"shadow"', '"emulated"'), "vm.web.mode"),
    (GOOD.replace('"nvme"', '"gpu"'), "vm.web.workload.kind"),
    (GOOD + "queue_depth = 'x'\n", "vm.web.workload.queue_depth"),
    (GOOD + "[host]\niotlb_ways = 3\n", "host.iotlb_ways"),
    (GOOD.replace('name = "cli"', 'name = "cli"\nepoch_us = 99999'), "experiment.epoch_us"),
    (GOOD + "[bogus]\n", "bogus"),
    # Issue 7 finding 11: values `run` cannot build or finish are refused before it starts.
    (GOOD + "[host]\nqi_entries = 8\n", "host.qi_entries"),
    (GOOD + "[host]\ncontext_cache_entries = 5\n", "host.context_cache_entries"),
    (GOOD + "[host]\niotlb_entries = 1099511627776\n", "host.iotlb_entries"),
    (GOOD.replace('name = "cli"', f'name = "{"x" * 300}"'), "experiment.name"),
    (GOOD + "[cost]\nvm_exit_ns = 4611686018427387904\n", "cost.vm_exit_ns"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_hostile_configs_exit_2_naming_key(tmp_path, capsys, fake_runner, text, key, command):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    err = user_error(capsys, [command, str(p), "--out", str(tmp_path / "r")]
                     if command == "run" else [command, str(p)])
    assert key in err
    assert fake_runner == []


@pytest.mark.parametrize(("override", "key"), [
    ("vm.web.count", "vm.web.count"),
    ("=1", "<empty>"),
    ("vm.web.vcpus=0", "vm.web.vcpus"),
])
def test_bad_set_exits_2(capsys, cfg_file, override, key):
    assert key in user_error(capsys, ["validate", str(cfg_file), "--set", override])


def test_missing_and_unparsable_files(tmp_path, capsys):
    assert "nope.toml" in user_error(capsys, ["validate", str(tmp_path / "nope.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\n")
    assert "bad.toml" in user_error(capsys, ["validate", str(bad)])
    assert "nothing" in user_error(capsys, ["report", str(tmp_path / "nothing")])
    assert "no summary results" in user_error(capsys, ["report", str(tmp_path)])


def test_validate_prints_resolved_config(capsys, cfg_file):
    assert main(["validate", str(cfg_file), "--set", "vm.web.count=3"]) == 0
    out = capsys.readouterr().out
    assert "web: 3 x shadow/strict" in out and "nvme" in out
    assert "note: vm.web: shadow mode forces strict" in out


def test_run_calls_runner_and_prints_summary(tmp_path, capsys, cfg_file, fake_runner):
    out_dir = tmp_path / "res"
    assert main(["run", str(cfg_file), "--out", str(out_dir), "--set", "vm.web.count=1",
                 "--backend", "inproc"]) == 0
    (cfg, out, backend, overwrite) = fake_runner[0]
    assert cfg.vms[0].count == 1 and out == str(out_dir)
    assert (backend, overwrite) == ("inproc", False)
    text = capsys.readouterr().out
    assert "note: vm.web" in text and "shadow" in text and "results: " in text
    # the same run again: the existing folder is a user error unless --overwrite
    assert "already exists" in user_error(capsys, ["run", str(cfg_file), "--out",
                                                   str(out_dir), "--set", "vm.web.count=1",
                                                   "--backend", "inproc"])
    assert main(["run", str(cfg_file), "--out", str(out_dir), "--set", "vm.web.count=1",
                 "--overwrite", "--backend", "inproc"]) == 0
    capsys.readouterr()
    # report over one run and over the experiment
    (run_dir,) = (out_dir / "cli" / "_runs").iterdir()
    for target in (run_dir, out_dir / "cli"):
        assert main(["report", str(target)]) == 0
        assert "shadow" in capsys.readouterr().out


def test_ray_is_the_default_backend():
    args = build_parser().parse_args(["run", "c.toml"])
    assert (args.backend, args.address) == ("ray", None)
    args = build_parser().parse_args(["sweep", "c.toml", "--backend", "inproc"])
    assert args.backend == "inproc"


def test_run_refuses_a_sweep_config(tmp_path, capsys, cfg_file, fake_runner):
    swept = tmp_path / "s.toml"
    swept.write_text(cfg_file.read_text() + '\n[sweep]\n"vm.web.vcpus" = [1, 2]\n')
    assert "iommu-emu sweep" in user_error(capsys, ["run", str(swept), "--backend", "inproc"])
    assert fake_runner == []


def test_unknown_backend(capsys, cfg_file, fake_runner):
    err = user_error(capsys, ["run", str(cfg_file), "--backend", "slurm"])
    assert "slurm" in err and "inproc" in err and fake_runner == []


def test_keyboard_interrupt_exits_130(monkeypatch, capsys, cfg_file, fake_runner):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["cluster.runner"], "run_config", interrupted)
    assert main(["run", str(cfg_file), "--backend", "inproc"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_usage_error_and_help_return_codes(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "shadow, nested, passthrough" in capsys.readouterr().out


@pytest.fixture
def fake_trace(monkeypatch):
    mod = ModuleType("workloads.trace")

    class TraceError(Exception):
        pass

    def import_ftrace(text_path, out_path, device=None):
        if "garbage" in Path(text_path).read_text():
            raise TraceError(f"{text_path}: line 1: not an iommu:map/unmap event")
        return {"maps": 2, "unmaps": 1, "device": device}

    mod.TraceError = TraceError
    mod.import_ftrace = import_ftrace
    monkeypatch.setitem(sys.modules, "workloads.trace", mod)


def test_trace_import(tmp_path, capsys, fake_trace):
    src = tmp_path / "ftrace.txt"
    src.write_text("ok\n")
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t.msgpack"),
                 "--device", "0000:00:03.0"]) == 0
    out = capsys.readouterr().out
    assert "maps: 2" in out and "unmaps: 1" in out and "0000:00:03.0" in out
    src.write_text("garbage\n")
    err = user_error(capsys, ["trace", "import", str(src), "-o", str(tmp_path / "t")])
    assert "not an iommu:map/unmap event" in err and "ftrace.txt" in err
    assert "missing.txt" in user_error(capsys, ["trace", "import", str(tmp_path / "missing.txt"),
                                                "-o", str(tmp_path / "t")])


def test_progress_is_quiet_off_a_terminal_and_draws_on_one():
    import io

    from cluster.progress import Progress

    pipe = io.StringIO()
    p = Progress("sweep x", "runs", stream=pipe)
    p.update(1, 4, force=True)
    p.close()
    assert pipe.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress("sweep x", "runs", stream=tty)
    p.update(1, 4, force=True)
    p.update(4, 4)
    p.close()
    text = tty.getvalue()
    assert "sweep x: 1/4 runs (25%), ETA" in text and "4/4 runs (100%)" in text
    assert text.endswith("\n")


def test_unreachable_ray_address_is_a_user_error(capsys, cfg_file, tmp_path):
    """Nothing listens at the address: a clear error at once (no minute of Ray retries).

    The port stays bound (never listening) for the whole test, so no other process (another
    Ray, whose non-GCS listener ray.init would wait on for many minutes) can take it: a
    connection to it is refused at once."""
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already connected in this process")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        dead = f"127.0.0.1:{held.getsockname()[1]}"
        t0 = time.monotonic()
        err = user_error(capsys, ["run", str(cfg_file), "--out", str(tmp_path),
                                  "--address", dead])
        assert time.monotonic() - t0 < 120  # not Ray's minutes of retries
    assert f"cannot join the Ray cluster at {dead}" in err
