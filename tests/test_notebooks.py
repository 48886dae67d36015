"""The what-if notebooks in experiments/notebooks run top to bottom on the built-in defaults, and their
conclusions hold: each ends with a cell asserting what it concludes, which fails the notebook (and this test)
when a change to servesim makes the conclusion false."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "experiments" / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"what_if_2x_bandwidth", "token_budget_for_50ms_tbt", "replicas_for_10_qps"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "assert " in last.source, "a notebook ends by checking its conclusion"
