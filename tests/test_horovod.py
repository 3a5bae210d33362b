"""tfpar.horovod (issue 15): Horovod's TensorFlow API on TensorFlow's collectives, in real processes.

One launch per cluster size runs tests/scripts/hvd_collectives.py, which exercises every collective
eagerly and inside a tf.function and writes, per rank, each result beside the numpy result computed
from every rank's inputs: 2 workers, and 3 processes with a chief (rank 0 must be the chief). A
third run starts the script without a launcher (size 1, and Horovod's error before init()).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfpar import launch

SCRIPT = str(Path(__file__).parent / "scripts" / "hvd_collectives.py")
pytestmark = [pytest.mark.multiprocess]

# Checks whose result differs between ranks by design (each rank gets its own share).
PER_RANK = ("alltoall", "reducescatter")
# Float16 on the wire: compare at half precision.
HALF = ("fp16", "half")


def _launch(out: Path, workers: int, chief: bool) -> list[dict]:
    buffer = io.StringIO()
    code = launch.launch([sys.executable, SCRIPT, str(out)], workers=workers, chief=chief, timeout=300,
                         output=buffer)
    assert code == 0, buffer.getvalue()[-6000:]
    size = workers + int(chief)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(size)]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> dict[int, list[dict]]:
    """Rank-ordered results of a 2-worker cluster and of a chief + 2 workers cluster."""
    return {
        2: _launch(tmp_path_factory.mktemp("hvd2"), workers=2, chief=False),
        3: _launch(tmp_path_factory.mktemp("hvd3"), workers=2, chief=True),
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hvd1")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TFPAR_LAUNCH_TASK")}
    result = subprocess.run([sys.executable, SCRIPT, str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "single.json").read_text())


def _checks(run: dict) -> dict[str, tuple[list, list]]:
    return {name: value for name, value in run["results"].items()
            if isinstance(value, list) and len(value) == 2 and name not in ("topology", "built")
            and not name.startswith("training")}


def _assert_matches_numpy(run: dict, where: str) -> int:
    checks = _checks(run)
    failures = []
    for name, (got, expected) in checks.items():
        tolerance = 2e-3 if any(tag in name for tag in HALF) else 1e-5
        got_array, expected_array = np.asarray(got, dtype="float64"), np.asarray(expected, dtype="float64")
        if got_array.shape != expected_array.shape or not np.allclose(got_array, expected_array, rtol=tolerance,
                                                                        atol=tolerance):
            failures.append(f"{name}: got {got}, numpy {expected}")
    assert not failures, f"{where}: " + "\n".join(failures)
    return len(checks)


@pytest.mark.parametrize("size", [2, 3])
def test_every_collective_matches_numpy(clusters, size):
    for rank, run in enumerate(clusters[size]):
        count = _assert_matches_numpy(run, f"size {size}, rank {rank}")
        assert count >= 80, f"only {count} checks ran"
    names = set(_checks(clusters[size][0]))
    for mode in ("eager", "function"):  # each collective both eagerly and inside a tf.function
        for check in ("allreduce_Average", "allreduce_Sum", "allreduce_Min", "allreduce_Max", "grouped_sum_3",
                      "indexed_slices_average", "allgather_uneven", "broadcast_root_last", "tape_gradient_0",
                      "alltoall_splits", "reducescatter"):
            assert f"{mode}/{check}" in names


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_agree_bit_for_bit(clusters, size):
    runs = clusters[size]
    reference = _checks(runs[0])
    for rank, run in enumerate(runs[1:], start=1):
        for name, (got, _) in _checks(run).items():
            if not any(tag in name for tag in PER_RANK):
                assert got == reference[name][0], f"{name} differs between rank 0 and rank {rank}"
        assert run["results"]["training_weights"] == runs[0]["results"]["training_weights"]
        assert run["results"]["training_losses"] == runs[0]["results"]["training_losses"]


@pytest.mark.parametrize("size", [2, 3])
def test_sizes_ranks_and_local_ranks(clusters, size):
    for rank, run in enumerate(clusters[size]):
        # size, rank, local_size, local_rank, cross_size, cross_rank, is_initialized, is_homogeneous
        assert run["results"]["topology"] == [size, rank, size, rank, 1, 0, True, True]
        assert run["results"]["after_shutdown"] is False  # shutdown(), then init() again worked
    tasks = [run["results"]["task"] for run in clusters[size]]
    if size == 3:  # rank 0 is the chief, then the workers in order, as in Horovod's rank 0 = coordinator
        assert tasks == [{"type": "chief", "index": 0}, {"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    else:
        assert tasks == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]


def test_dtypes_and_sparse_gradients(clusters):
    results = clusters[2][0]["results"]
    for mode in ("eager", "function"):
        assert results[f"{mode}/int_average_dtype"] == "int32"  # integer Average keeps the dtype (truncates)
        assert results[f"{mode}/fp16_dtype"] == "float32"  # Compression.fp16 decompresses
        assert results[f"{mode}/tape_sparse_embedding_gradient"] is True  # IndexedSlices stay sparse
    assert results["tape_sparse_as_dense_is_dense"] is True


@pytest.mark.parametrize("size", [2, 3])
def test_horovod_training_step_trains_identical_replicas(clusters, size):
    losses = clusters[size][0]["results"]["training_losses"]
    assert losses[-1] < losses[0], losses


EXPECTED_ERRORS = {
    "adasum": ("NotImplementedError", "hvd.Average"),
    "join": ("NotImplementedError", "same number of steps"),
    "elastic": ("NotImplementedError", "--max-restarts"),
    "process_set": ("NotImplementedError", "global_process_set"),
    "slices_max": ("NotImplementedError", "hvd.Sum and hvd.Average"),
    "mpi": ("NotImplementedError", "no MPI"),
    "init_comm": ("NotImplementedError", "no MPI"),
    "timeline": ("NotImplementedError", "tf.profiler"),
    "sync_bn": ("NotImplementedError", "sync_batchnorm=True"),
    "scalar_allgather": ("ValueError", "tf.reshape(tensor, [1])"),
    "root_rank": ("ValueError", "Received: root_rank="),
}


@pytest.mark.parametrize("size", [1, 2])
def test_unsupported_features_raise_naming_the_alternative(clusters, single, size):
    run = single if size == 1 else clusters[size][1]
    for name, (kind, alternative) in EXPECTED_ERRORS.items():
        message = run["errors"][name]
        assert message.startswith(kind + ":") and alternative in message, f"{name}: {message}"
    assert run["results"]["built"] == [False, False, False, False]  # mpi/gloo built and enabled


def test_without_a_launcher_the_script_runs_as_size_one(single):
    assert single["results"]["topology"] == [1, 0, 1, 0, 1, 0, True, True]
    assert single["results"]["task"] is None
    _assert_matches_numpy(single, "size 1")
    assert single["errors"]["size_before_init"] == "Horovod has not been initialized; use hvd.init()."
    assert single["errors"]["allreduce_before_init"] == "Horovod has not been initialized; use hvd.init()."
