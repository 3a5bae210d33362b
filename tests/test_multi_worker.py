"""Keras 3 fit/evaluate/predict under tfpar.scope("multi_worker"): real 2-worker clusters on
127.0.0.1 started by tfpar.launch (the replica-build, multi-worker-logs and shared-shuffle interceptions
in tfpar/_compat/)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tfpar.testing
from tfpar import launch

SCRIPT = str(Path(__file__).parent / "scripts" / "mw_fit.py")
pytestmark = [pytest.mark.multiprocess]


def _run_cluster(out: Path, *args: str, timeout: float = 240) -> tuple[int, str]:
    buffer = io.StringIO()
    code = launch.launch([sys.executable, SCRIPT, str(out), *args], workers=2, timeout=timeout, output=buffer)
    return code, buffer.getvalue()


def _run_single(out: Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, SCRIPT, str(out), *args, "--single"], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "single.json").read_text())


def _load(out: Path, task: str) -> dict:
    return json.loads((out / f"{task}.json").read_text())


def _max_weight_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.array(x) - np.array(y)).max()) for x, y in zip(a["weights"], b["weights"]))


@pytest.fixture(scope="module")
def unshuffled(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw_unshuffled")
    code, log = _run_cluster(out, "101")
    assert code == 0, log[-4000:]
    single_dir = tmp_path_factory.mktemp("mw_single")
    return _load(out, "worker0"), _load(out, "worker1"), _run_single(single_dir, "101")


def test_auto_picks_multi_worker_under_launch(unshuffled):
    worker0, worker1, _ = unshuffled
    assert worker0["strategy"] == worker1["strategy"] == "MultiWorkerMirroredStrategy"
    assert worker0["replicas"] == worker1["replicas"] == 2


def test_workers_end_with_identical_weights_and_logs(unshuffled):
    worker0, worker1, _ = unshuffled
    assert _max_weight_diff(worker0, worker1) == 0.0
    assert worker0["history"] == worker1["history"]
    assert worker0["evaluate"] == worker1["evaluate"]
    assert set(worker0["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_same_weights_as_one_process_on_the_same_global_batch(unshuffled):
    """101 examples, global batch 32: the last batch (5) splits 3/2 over the workers."""
    worker0, _, single = unshuffled
    assert _max_weight_diff(worker0, single) <= 1e-5
    assert worker0["iterations"] == single["iterations"] == 8
    np.testing.assert_allclose(worker0["history"]["loss"], single["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(worker0["evaluate"], single["evaluate"], rtol=1e-5)
    np.testing.assert_allclose(worker0["predict"], single["predict"], atol=1e-5)
    assert np.array(worker0["seen"]).tolist() == [2.0] * 101


def test_shuffled_epochs_cover_every_example_once(tmp_path):
    """With shuffle=True, upstream workers draw different permutations and overlap."""
    code, log = _run_cluster(tmp_path, "101", "--shuffle", "--epochs", "3", "--spe", "3")
    assert code == 0, log[-4000:]
    worker0, worker1 = _load(tmp_path, "worker0"), _load(tmp_path, "worker1")
    assert worker0["seen"] == worker1["seen"] == [3.0] * 101
    assert _max_weight_diff(worker0, worker1) == 0.0
    assert worker0["iterations"] == 12  # 4 steps per epoch, steps_per_execution=3 included


def test_unseeded_shuffle_is_agreed_between_workers(tmp_path):
    """Without keras.utils.set_random_seed the workers agree on a random seed at the start of fit."""
    code, log = _run_cluster(tmp_path, "101", "--shuffle", "--no-seed", "--epochs", "2")
    assert code == 0, log[-4000:]
    assert _load(tmp_path, "worker0")["seen"] == _load(tmp_path, "worker1")["seen"] == [2.0] * 101


def test_upstream_keras_fit_fails_under_multi_worker(tmp_path):
    code, log = _run_cluster(tmp_path, "64", "--upstream", timeout=180)
    tfpar.testing.skip_unless_reproduced(code != 0, "Keras 3 fit under MultiWorkerMirroredStrategy (tensorflow#72388)")
    assert "Attempt to convert a value (PerReplica" in log


def test_tf_data_input_seeded_shuffle_is_sharded_exactly(tmp_path):
    code, log = _run_cluster(tmp_path, "101", "--tfdata", "seeded", "--epochs", "2")
    assert code == 0, log[-4000:]
    assert _load(tmp_path, "worker0")["seen"] == [2.0] * 101


def test_tf_data_input_unseeded_shuffle_is_agreed_between_workers(tmp_path):
    """The multi-worker tutorial's input: shuffle() without a seed, left at AUTO sharding.

    Upstream, each worker draws its own order and DATA sharding makes them overlap
    (tensorflow/tensorflow#56513); tfpar gives the shuffle one seed agreed by the workers.
    """
    code, log = _run_cluster(tmp_path, "101", "--tfdata", "unseeded", "--epochs", "3")
    assert code == 0, log[-4000:]
    assert _load(tmp_path, "worker0")["seen"] == _load(tmp_path, "worker1")["seen"] == [3.0] * 101
    assert log.count("shuffle(s) without a seed; all 2 workers now shuffle with seed") == 1
    assert "Traceback" not in log


def test_tf_data_input_that_cannot_be_ordered_is_refused_with_the_alternatives(tmp_path):
    """A parallel map with deterministic=False cannot be made the same on every worker."""
    code, log = _run_cluster(tmp_path, "101", "--tfdata", "nondeterministic", timeout=180)
    assert code != 0
    assert "deterministic=False" in log and "left at AUTO" in log and "AutoShardPolicy.OFF" in log


def _ctl_input_epochs(out: Path, *args: str) -> tuple[list, list]:
    buffer = io.StringIO()
    script = str(Path(__file__).parent / "scripts" / "mw_ctl_input.py")
    code = launch.launch([sys.executable, script, str(out), *args], workers=2, timeout=180, output=buffer)
    assert code == 0, buffer.getvalue()[-4000:]
    return _load(out, "worker0"), _load(out, "worker1")


def test_custom_loop_input_with_an_unseeded_shuffle_is_partitioned_every_epoch(tmp_path):
    """The multi_worker_with_ctl tutorial: shuffle() without a seed, then shard(pipeline id)."""
    worker0, worker1 = _ctl_input_epochs(tmp_path)
    for epoch in range(2):
        assert sorted(worker0[epoch] + worker1[epoch]) == list(range(40))
    assert worker0[0] != worker0[1]  # still a new order every epoch
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    worker0, worker1 = _ctl_input_epochs(upstream, "--upstream")
    overlap = set(worker0[0]) & set(worker1[0])
    tfpar.testing.skip_unless_reproduced(bool(overlap), "unseeded shuffle before shard overlaps between workers")
