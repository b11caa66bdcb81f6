"""The analysis notebooks run top to bottom (their own asserts check the numbers they show).

Each runs in its small mode (``NOTEBOOK_SMALL=1``: fewer documents and arms, the same checks; see each
notebook's first cell) and joins the session's Ray cluster (``RAY_ADDRESS``) instead of starting its
own. The outputs stored in the notebooks are those of the full run (``make notebooks``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch, ray_address: str):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
