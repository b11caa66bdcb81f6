"""Run notebooks top to bottom and store their outputs in place (`make notebooks`), so the outputs
kept in the repository are those of the code beside them. Each runs in the repository root with a
fresh NOTEBOOK_WORKDIR, as tests/test_notebooks.py runs them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix=f"{path.stem}-") as work:
        os.environ["NOTEBOOK_WORKDIR"] = work
        NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        raise SystemExit(f"{path}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    nbformat.write(notebook, path)
    print(f"{path.name}: executed, {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    os.environ.pop("NOTEBOOK_SMALL", None)  # the stored outputs are those of the full run
    for name in sys.argv[1:] or sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb")):
        execute(Path(name).resolve())
