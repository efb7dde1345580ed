"""The docs agree with the code: docs/results.md lists every column of every table a run
writes with its type; a column has one type in every table; docs/config.md's examples run as
written."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest

from cluster.cli import main
from cluster.config import parse_config
from cluster.results import read_run

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("summary", "metrics", "faults")
DOC_TYPES = {"int": pa.int64(), "float": pa.float64(), "string": pa.string(),
             "int32": pa.int32(), "uint8": pa.uint8(), "uint16": pa.uint16(),
             "uint32": pa.uint32(), "uint64": pa.uint64()}
ROW = re.compile(r"^\| `(\w+)` \| (\w+) \|")


def documented(table: str) -> dict[str, str]:
    """``{column: type}`` of the table under ``## <table>`` in docs/results.md."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = re.split(r"^## ", text, flags=re.M)
    (body,) = [s for s in section if s.startswith(f"{table} ")]
    return {m[1]: m[2] for line in body.splitlines() if (m := ROW.match(line))}


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, pa.Table]:
    """Every table of a short run whose rogue NVMe devices also record faults."""
    out = tmp_path_factory.mktemp("docs")
    assert main(["run", str(ROOT / "configs" / "quickstart.toml"), "--out", str(out),
                 "--backend", "inproc", "--set", "experiment.duration_us=300",
                 "--set", "vm.nvme-nested.workload.rogue_fraction=0.2"]) == 0
    run = next((out / "quickstart" / "_runs").iterdir())
    got = read_run(run)
    assert got["faults"].num_rows > 0   # so the faults table's types are real values
    return got


@pytest.mark.parametrize("table", TABLES)
def test_results_md_lists_every_written_column_with_its_type(table, tables):
    doc = documented(table)
    assert doc.pop("run") == "string"   # the partition key, not a column of the files
    schema = tables[table].schema
    assert {"undocumented": sorted(set(schema.names) - set(doc)),
            "not written": sorted(set(doc) - set(schema.names))} == {
        "undocumented": [], "not written": []}
    wrong = {c: (t, str(schema.field(c).type)) for c, t in doc.items()
             if DOC_TYPES.get(t) != schema.field(c).type}
    assert not wrong, f"{table}: documented vs written types: {wrong}"


def test_a_column_has_one_type_in_every_table(tables):
    types: dict[str, set[str]] = {}
    for t in tables.values():
        for f in t.schema:
            types.setdefault(f.name, set()).add(str(f.type))
    assert {c: ts for c, ts in types.items() if len(ts) > 1} == {}
    assert types["vm"] == types["host"] == {"int32"}


def test_time_columns_carry_their_unit(tables):
    timed = ("time", "latency", "window", "wait", "busy", "rtt", "bound")
    for t in tables.values():
        for name in t.schema.names:
            if any(w in name for w in timed):
                assert name.endswith("_ns") or "_ns_" in name, name


def _examples(doc: str) -> tuple[list[str], list[str]]:
    """(shell commands, TOML blocks) of a doc: ```sh / indented `iommu-emu` lines, ```toml."""
    text = (ROOT / "docs" / doc).read_text()
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.M | re.S)
    sh = [ln.strip() for kind, b in blocks if kind in ("sh", "shell", "bash")
          for ln in b.splitlines() if ln.strip().startswith("iommu-emu ")]
    sh += [ln.strip() for ln in text.splitlines() if ln.startswith("    iommu-emu ")]
    return sh, [b for kind, b in blocks if kind == "toml"]


def test_config_md_commands_run_as_written(monkeypatch, capsys):
    commands, _ = _examples("config.md")
    assert commands
    monkeypatch.chdir(ROOT)
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        assert argv[0] == "validate", f"add a safe way to check: {cmd}"
        assert main(argv) == 0, (cmd, capsys.readouterr().err)


def test_config_md_toml_examples_are_valid_configs():
    _, blocks = _examples("config.md")
    assert blocks
    for block in blocks:
        cfg = parse_config(tomllib.loads(block), source="docs/config.md")
        assert cfg.vms, block


def test_files_cite_only_what_a_reader_can_open():
    """No file points at notes outside the repository (a design brief, a shared folder)."""
    private = re.compile(r"DESIGN\.md|/work/shared|STYLE\.md|the brief\b")
    this = Path(__file__).resolve()
    hits = [f"{f.relative_to(ROOT)}:{n}" for pattern in ("*.py", "*.md", "*.toml")
            for f in ROOT.glob(f"**/{pattern}")
            if not {".venv", "build", ".git", "node_modules"} & set(f.relative_to(ROOT).parts)
            and f.resolve() != this
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
            if private.search(line)]
    assert hits == []
