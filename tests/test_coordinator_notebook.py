"""notebooks/multi_worker_and_ps.ipynb runs top to bottom and shows what it says it shows:
a 2-process multi_worker fit through tfpar.launch, and parameter-server fit (asynchronous and with
bounded staleness) on tfpar.local_cluster in the notebook's own process."""

from __future__ import annotations

import os
import re

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "multi_worker_and_ps.ipynb")


@pytest.mark.notebook
@pytest.mark.multiprocess
def test_multi_worker_and_ps_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit with outputs cleared"
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[-1].cell_type == "markdown"
    assert "This notebook shows" in notebook.cells[0].source
    assert "Take-aways" in notebook.cells[-1].source

    client = nbclient.NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    # 1. multi_worker in two processes started by tfpar.launch
    assert "exit code 0" in text
    assert len(re.findall(r'^\[worker:[01]\] RESULT .*"replicas": 2', text, re.M)) == 2
    assert "identical weights on both workers: True" in text
    # 2. parameter server in the notebook process: exact epochs and step counts
    assert "variables live on: ['/job:ps/replica:0/task:0/device:CPU:0']" in text
    assert "applied steps per epoch: [15.0, 15.0, 15.0] | scheduled: 15" in text
    assert "optimizer iterations: 45 = 45" in text
    assert "every example trained once per epoch: True" in text
    assert "predict matches the model called here: True" in text
    accuracy = float(re.search(r"evaluate: \{'loss': [\d.]+, 'accuracy': ([\d.]+)\}", text).group(1))
    assert accuracy > 0.85
    # 3. the lead of the fast worker: unbounded, then at most staleness + 1
    leads = {
        mode: int(lead)
        for mode, lead in re.findall(r"^\s*(asynchronous|staleness=\d): .* largest lead over the slowest (\d+)", text, re.M)
    }
    assert set(leads) == {"asynchronous", "staleness=1", "staleness=0"}
    assert leads["asynchronous"] > 3
    assert leads["staleness=1"] <= 2 and leads["staleness=0"] <= 1
    assert text.count("applied 57 of 57 steps") == 3
