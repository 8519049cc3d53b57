"""The walkthrough notebook runs top to bottom (it asserts its own by-hand checks)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="test-only dependency: pip install -r requirements-test.txt")
nbclient = pytest.importorskip("nbclient", reason="test-only dependency: pip install -r requirements-test.txt")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "argmin by hand" in outputs and "recovered" in outputs
