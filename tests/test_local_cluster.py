"""Tests of tfpar.cluster.local_cluster: in-process servers + a real ParameterServerStrategy.

Each case runs in a child process: in-process TensorFlow servers cannot be shut down, and
ParameterServerStrategy reconfigures the process's eager context and environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "local_cluster_ps.py"


def _run(chief: bool, closures: int) -> dict:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(int(chief)), str(closures)],
        capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT:")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    return json.loads(lines[0][len("RESULT:"):])


@pytest.fixture(scope="module", params=[False, True], ids=["tutorial-layout", "chief"])
def run(request):
    return request.param, _run(request.param, closures=12)


@pytest.mark.multiprocess
def test_parameter_server_strategy_runs_closures_on_the_local_cluster(run):
    chief, result = run
    assert result["counter"] == 12  # every scheduled closure ran exactly once (no failures)
    assert result["total"] == sum(range(12))
    assert result["variable_device"] == "/job:ps/replica:0/task:0/device:CPU:0"
    assert result["rpc_layer"] == "grpc"
    jobs = {"worker": 2, "ps": 1, **({"chief": 1} if chief else {})}
    assert {job: len(tasks) for job, tasks in result["spec"].items()} == jobs
    if chief:
        assert (result["task_type"], result["task_id"]) == ("chief", 0)
    else:  # the TF tutorial's layout: TensorFlow adds the coordinator's chief job itself
        assert (result["task_type"], result["task_id"]) == (None, None)


@pytest.mark.multiprocess
def test_repeated_calls_reuse_the_cluster_and_other_shapes_say_restart(run):
    chief, result = run
    assert result["again_spec"] == result["spec"]
    error = result["other_shape_error"]
    assert error is not None
    assert f"already runs an in-process cluster with workers=2, ps=1, chief={chief}" in error
    assert "Restart the Python process (or notebook kernel)" in error
    assert f"tfpar.local_cluster(workers=2, ps=1, chief={chief}) to reuse" in error


@pytest.mark.multiprocess
def test_addresses_are_loopback_and_servers_listen(run):
    _, result = run
    addresses = [a for tasks in result["spec"].values() for a in tasks]
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    for job in ("worker", "ps"):
        for address in result["spec"][job]:
            assert result["listening"][address.rsplit(":", 1)[1]], f"no server on {address}"


@pytest.mark.multiprocess
def test_tensorflow_servers_listen_on_all_interfaces_as_documented(run):
    # TensorFlow hard-codes "0.0.0.0:<port>" as the gRPC listening address (grpc_server_lib.cc),
    # whatever host the cluster spec names. tfpar's docs say so; if this fails, TensorFlow now
    # binds the spec's host and the security notes in tfpar/cluster/ (the package docstring and
    # local_cluster) and in tfpar.launch must change.
    _, result = run
    for job in ("worker", "ps"):
        for address in result["spec"][job]:
            port = address.rsplit(":", 1)[1]
            assert set(result["listening"][port]) <= {f"[::]:{port}", f"0.0.0.0:{port}"}
