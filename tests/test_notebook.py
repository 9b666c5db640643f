"""The example notebooks run as a user runs them: executed cell by cell by a Jupyter kernel, so the Python
API they document cannot drift from the code."""

from __future__ import annotations

import os
import re

import pytest
from conftest import REPO

NOTEBOOK = REPO / "examples" / "transfer_learning.ipynb"


def _stdout(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


@pytest.mark.slow
def test_the_transfer_learning_notebook_runs_and_learns(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    # the kernel imports this checkout's package, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "stored with outputs"
    )
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # a cell that raises fails the test with its traceback

    out = _stdout(nb)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    head = re.search(r"head on frozen features: val accuracy ([0-9.]+)", out)
    assert head and float(head.group(1)) > 0.3, out  # ten classes: chance is 0.1
    assert re.search(r"refit: the best config trained as run \S+ · val accuracy", out), out
    marks = re.findall(r"^([✓✗]) test_", out, flags=re.M)
    assert len(marks) == 6 and marks.count("✓") >= 3, out
    tuned = re.search(r"fine-tuned: val accuracy ([0-9.]+) before, ([0-9.]+) after", out)
    assert tuned and float(tuned.group(2)) >= float(tuned.group(1)) - 1e-9, out  # never worse on val
    assert "check passed: True" in out, out
    assert list((tmp_path / "cache" / "runs" / "finetune").glob("*/export/model.keras"))
