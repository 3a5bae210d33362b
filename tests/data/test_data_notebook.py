"""notebooks/input_pipeline.ipynb runs top to bottom and shows what it says it shows."""

from __future__ import annotations

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "input_pipeline.ipynb")


@pytest.mark.notebook
def test_input_pipeline_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].source.startswith("import tfpar; tfpar.configure_virtual_devices(2)")
    assert all(not c.outputs and c.execution_count is None for c in code), "commit with outputs cleared"
    assert notebook.cells[1].cell_type == "markdown" and notebook.cells[-1].cell_type == "markdown"
    assert "take away" in notebook.cells[-1].source

    client = nbclient.NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = "\n".join(
        output.get("text", "") for cell in code for output in cell.outputs if output.output_type == "stream"
    )
    assert text.count("disjoint and complete: True") == 2
    assert "2 workers -> policy 'file'" in text and "8 workers -> policy 'data'" in text
    assert "FILE sharding, shard 0 of 2" in text  # the logged decision
    assert "files of worker 0 of 2 (ids mod 4): [0, 2]" in text
    assert "ValueError: policy='file' needs at least as many files as shards" in text
    assert "shuffle has no seed" in text
    assert "sizes: [1437, 180, 180] sum: 1797" in text  # largest-remainder rounding of 0.8/0.1/0.1
    assert "same seed, same validation set: True" in text
    assert "augmentation differs between epochs: True" in text
    assert "per-replica batch shapes: [(32, 8, 8, 1), (32, 8, 8, 1)]" in text
    accuracy = float(text.split("validation accuracy:")[1].split()[0])
    assert accuracy > 0.7
    plots = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(plots) == 1
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
