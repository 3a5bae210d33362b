"""Every notebook in notebooks/ runs top to bottom (nbclient, a fresh kernel each)."""

from __future__ import annotations

from pathlib import Path

import pytest

ALL_NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# Notebooks with a test of their own, which runs them and checks their results.
DEDICATED = {
    "model_parallel": "tests/parallel/test_parallel_notebook.py",
    "input_pipeline": "tests/data/test_data_notebook.py",
    "multi_worker_and_ps": "tests/test_coordinator_notebook.py",
}
NOTEBOOKS = [p for p in ALL_NOTEBOOKS if p.stem not in DEDICATED]
pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def test_every_notebook_is_run_by_some_test():
    root = Path(__file__).parent.parent
    assert ALL_NOTEBOOKS, "no notebooks found"
    for stem, test in DEDICATED.items():
        assert (root / test).exists(), test
        assert f"{stem}.ipynb" in (root / test).read_text(), (stem, test)
    assert NOTEBOOKS, "the generic runner has nothing left to run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name} is committed with outputs; clear them"
    # A fresh kernel (its own process): the notebook configures its own virtual devices.
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.chdir(tmp_path)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
