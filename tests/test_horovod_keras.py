"""tfpar.horovod.keras (issue 15, Keras part): Horovod's Keras API in real 2-process clusters.

Two launches: tests/scripts/hvd_keras_checks.py (DistributedOptimizer against tfpar.scope
("multi_worker") fit and a float64 reference, backward_passes_per_step against one step on the
k-times larger batch with the executed collectives counted, the callbacks, saving, errors), and
tests/scripts/hvd_keras_mnist.py, Horovod's examples/tensorflow2/tensorflow2_keras_mnist.py changed
only in the import lines, offline data and step counts (and marked Keras 3 / test lines).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tfpar import launch

SCRIPTS = Path(__file__).parent / "scripts"
pytestmark = [pytest.mark.multiprocess]

# Measured: the Horovod run equals tfpar.scope("multi_worker") fit to 0.0 and a float64 reference
# to 1.2e-7; k=4 accumulation equals its reference to 3e-8 (weights of magnitude ~1).
FLOAT32_NOISE = 1e-6


def _run(script: str, args: list[str]) -> str:
    buffer = io.StringIO()
    code = launch.launch([sys.executable, str(SCRIPTS / script), *args], workers=2, timeout=240, output=buffer)
    assert code == 0, buffer.getvalue()[-6000:]
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("hvd_keras")
    _run("hvd_keras_checks.py", [str(out)])
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _flat(weights: list) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(w, "float64")) for w in weights])


def _max_diff(a: list, b: list) -> float:
    return float(np.max(np.abs(_flat(a) - _flat(b))))


def test_ranks_hold_identical_weights(checks):
    first, second = (run["results"] for run in checks)
    names = [name for name in first if name.endswith("weights")]
    assert len(names) >= 8
    for name in names:
        assert first[name] == second[name], name


def test_distributed_optimizer_equals_multi_worker_fit(checks):
    results = checks[0]["results"]
    assert _max_diff(results["k1_weights"], results["multi_worker_weights"]) <= FLOAT32_NOISE
    assert _max_diff(results["k1_weights"], results["float64_weights"]) <= FLOAT32_NOISE
    assert _max_diff(results["k1_weights"], results["float64_weights"]) > 0  # float32 against float64
    assert results["k1_exchanges"] == 12 == results["k1_iterations"]  # 3 epochs x 4 steps, one all-reduce each
    assert results["k1_class"] == ["SGD", True]  # Horovod's rule: a subclass named like the optimizer


def test_backward_passes_per_step_equals_one_step_on_k_times_the_batch(checks):
    results = checks[0]["results"]
    assert _max_diff(results["k4_weights"], results["k4_reference_weights"]) <= FLOAT32_NOISE
    # The all-reduce count drops by k: 16 passes, 4 exchanges (k=1 on the same data: 16).
    assert results["k4_exchanges"] == 4
    assert results["k4_as_k1_exchanges"] == 16
    assert results["k4_iterations"] == 16  # Horovod counts every backward pass
    # average_aggregated_gradients=False sums the k gradients: lr / k gives the same weights.
    assert _max_diff(results["k4_sum_weights"], results["k4_weights"]) <= FLOAT32_NOISE


def test_broadcast_and_metric_average_callbacks(checks):
    first, second = (run["results"] for run in checks)
    assert first["broadcast_first_weights_are_rank0_initial"] and second["broadcast_first_weights_are_rank0_initial"]
    local = first["metric_local_logs"]  # each rank's own epoch logs, before the callback
    for results in (first, second):
        for epoch, logs in enumerate(results["metric_averaged_logs"]):
            for name in ("loss", "mae"):
                assert logs[name] == pytest.approx((local[0][epoch][name] + local[1][epoch][name]) / 2, rel=1e-6)
    assert local[0][0]["loss"] != local[1][0]["loss"]  # the ranks saw different data


def test_learning_rate_warmup_follows_horovods_formula(checks):
    results = checks[0]["results"]
    steps, size, warmup, initial = results["warmup_steps_per_epoch"], 2, 2, 0.1
    assert steps == 3
    expected = []
    for epoch in range(3):
        for batch in range(steps):
            if epoch < warmup:
                e = epoch + batch / steps + 1 / steps
                expected.append(initial / size * (e * (size - 1) / warmup + 1))
            else:
                expected.append(expected[-1])
    assert results["warmup_lrs"] == pytest.approx(expected, rel=1e-6)
    assert expected[warmup * steps - 1] == pytest.approx(initial)


def test_learning_rate_schedule_with_momentum_correction(checks):
    results = checks[0]["results"]
    # multiplier 0.5 from epoch 1 (staircase): epoch 1 at 0.1 * 0.5**0, epoch 2 at 0.1 * 0.5**1.
    assert results["schedule_lrs"] == pytest.approx([0.1] * 6 + [0.05] * 3, rel=1e-6)
    slots = results["schedule_slots"]  # per batch: slot sums at batch begin, then [at batch end]
    # At epoch 2's first batch the velocities are scaled by new_lr / old_lr = 0.5 (Horovod's correction).
    assert slots[6][:4] == pytest.approx([0.5 * v for v in slots[5][4]], rel=1e-5)
    assert slots[3][:4] == pytest.approx(slots[2][4], rel=1e-6)  # unchanged rate: no correction


def test_saving_and_load_model(checks):
    results = checks[0]["results"]
    assert results["from_config_distributed"] == ["Adam", True, True]
    name, _, distributed, is_adam, iterations, same_weights = results["load_model"]
    assert (name, distributed, is_adam, iterations, same_weights) == ("Adam", True, True, 3, True)
    assert results["load_model_exchanges"] == 3  # the loaded optimizer all-reduces every step
    assert results["plain_load"] == [True, 3]  # the saved file loads without tfpar as plain Adam


EXPECTED_ERRORS = {
    "string_optimizer": ("TypeError", "Received: optimizer='adam'"),
    "op_max": ("ValueError", "Received: op=hvd.Max"),
    "passes_zero": ("ValueError", "Received: backward_passes_per_step=0"),
    "twice": ("ValueError", "Wrap the plain optimizer once"),
    "global_variables": ("NotImplementedError", "BroadcastGlobalVariablesCallback"),
}


def test_errors_say_expected_and_received(checks):
    errors = checks[1]["errors"]
    for name, (kind, text) in EXPECTED_ERRORS.items():
        assert errors[name].startswith(kind + ":") and text in errors[name], f"{name}: {errors[name]}"


def test_horovod_keras_mnist_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes checkpoints and results into its working directory
    output = _run("hvd_keras_mnist.py", [])
    runs = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]
    assert runs[0]["weights"] == runs[1]["weights"]  # bit-identical models on both ranks
    assert runs[0]["history"] == runs[1]["history"]  # MetricAverageCallback: the same logs
    losses = runs[0]["history"]["loss"]
    assert losses[-1] < losses[0], losses
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*.keras")) == [
        f"checkpoint-{epoch}.keras" for epoch in range(1, 5)]  # rank 0 only writes them
    assert "finished gradual learning rate warmup" in output
