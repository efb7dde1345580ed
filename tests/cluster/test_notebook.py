"""notebooks/results.ipynb executes against a small run (every cell, the venv's kernel) and is
what notebooks/build.py writes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "results.ipynb"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def _build_module():
    spec = importlib.util.spec_from_file_location("nb_build", ROOT / "notebooks" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebook_is_what_build_writes():
    assert NOTEBOOK.read_text() == _build_module().text(), "run python notebooks/build.py"


def test_notebook_executes_against_a_small_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["run", str(ROOT / "configs" / "quickstart.toml"), "--out", str(out),
                 "--backend", "inproc", "--set", "experiment.duration_us=400"]) == 0
    monkeypatch.setenv("IOMMU_EMU_RESULTS", str(out / "quickstart"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('prefix', sys.prefix)"))
    # kernel "python3": jupyter_client starts it with this interpreter (sys.executable)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError naming the cell that failed
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []))
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "4 VMs in 1 run(s)" in text
    assert "the notebook's table equals the report's" in text
    assert not any(o.get("output_type") == "error" for c in nb.cells
                   for o in c.get("outputs", []))
    assert f"prefix {sys.prefix}" in text   # the kernel ran in this venv
