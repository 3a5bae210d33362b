"""Keras 3 fit / evaluate / predict under tfpar's parameter_server strategy (tfpar/coordinator/
and its interceptions ps-loops, atomic-counters, sharded-variables and coordinator-shutdown in
tfpar/coordinator/_patches.py).

* Argument checks run here (they happen before any TensorFlow side effect).
* In-process clusters (tfpar.local_cluster) run in a child process per scenario
  (tests/scripts/ps_fit_checks.py): in-process servers cannot be shut down, and
  ParameterServerStrategy writes environment variables.
* Separate-process clusters are started with tfpar.launch (or by hand, for the ps failure), on
  127.0.0.1, with a timeout on every wait, and everything started is killed afterwards.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tfpar.testing
from tfpar import cluster as cluster_lib
from tfpar import coordinator, launch

PY = sys.executable
SCRIPTS = Path(__file__).parent / "scripts"
CHECKS = SCRIPTS / "ps_fit_checks.py"
LAUNCH_FIT = SCRIPTS / "ps_launch_fit.py"
SERVE = "import sys; from tfpar.launch import serve; sys.exit(serve())"


# =============================================================================================
# Argument checks (no cluster needed)
# =============================================================================================


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"staleness": -1}, ValueError, "Expected staleness >= 0"),
        ({"staleness": True}, TypeError, "Received: staleness=True (of type bool)"),
        ({"staleness": "1"}, TypeError, "Expected staleness to be None (asynchronous) or an int >= 0"),
        ({"variable_partitioner": "even"}, ValueError, "Valid choices: None, 'min_size', an int"),
        ({"variable_partitioner": 0}, ValueError, "Expected a number of shards >= 1"),
        ({"variable_partitioner": 2.5}, TypeError, "Received: variable_partitioner=2.5 (of type float)"),
        ({"min_shard_bytes": 0}, ValueError, "Expected min_shard_bytes >= 1"),
    ],
)
def test_bad_options_are_rejected_before_connecting(options, error, message):
    # The cluster argument is never reached: a typo in it would raise a different error.
    with pytest.raises(error, match=re.escape(message)):
        coordinator.parameter_server_strategy(cluster="not-reached", **options)


def _spec(workers: int, ps: int) -> dict:
    ports = cluster_lib.free_ports(workers + ps)
    spec = {"worker": [f"127.0.0.1:{p}" for p in ports[:workers]]}
    if ps:
        spec["ps"] = [f"127.0.0.1:{p}" for p in ports[workers:]]
    return spec


def test_a_cluster_without_ps_tasks_is_refused_with_the_fix():
    with pytest.raises(ValueError) as info:
        coordinator.parameter_server_strategy(_spec(2, 0))
    text = str(info.value)
    assert "needs a cluster with at least one 'worker' and one 'ps' task" in text
    assert "{'worker': 2}" in text
    assert "tfpar.local_cluster(workers=2, ps=1)" in text and "tfpar launch --workers 2 --ps 1" in text


def test_no_cluster_at_all_says_tf_config_is_unset(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=re.escape("no cluster (TF_CONFIG is unset or empty)")):
        coordinator.parameter_server_strategy()


def test_unknown_cluster_source_lists_valid_choices():
    with pytest.raises(ValueError, match=re.escape("Unknown cluster source 'kubernetes'. Valid choices: 'tf_config', 'slurm'")):
        coordinator.parameter_server_strategy("kubernetes")


@pytest.mark.parametrize("task", ["worker", "ps"])
def test_only_the_coordinator_runs_the_training_script(task):
    config = {"cluster": {**_spec(2, 1), "chief": [f"127.0.0.1:{cluster_lib.free_ports(1)[0]}"]},
              "task": {"type": task, "index": 0}}
    with pytest.raises(ValueError) as info:
        coordinator.parameter_server_strategy(config)
    assert f"This process is task {task}:0 of the cluster" in str(info.value)
    assert "tfpar.launch.serve()" in str(info.value)


def test_options_of_other_strategies_are_refused():
    import tensorflow as tf

    with pytest.raises(TypeError, match="Expected a tf.distribute.ParameterServerStrategy"):
        coordinator.options(tf.distribute.get_strategy())


@pytest.mark.parametrize("name", ["parameter_server", "ps"])
def test_the_registry_names_reach_this_factory(name):
    import tfpar

    with pytest.raises(ValueError, match="Expected staleness >= 0"):  # this factory's check, before connecting
        tfpar.get_strategy(name, staleness=-1)


# --- waiting until every worker reaches every ps (tfpar/coordinator/_reach.py) ----------------

_SPEC = {"worker": ["127.0.0.1:1001", "127.0.0.1:1002"], "ps": ["127.0.0.1:1003"]}


def _ps_unreachable():
    import tensorflow as tf

    return tf.errors.UnavailableError(
        None, None,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1003: Failed to connect "
        "to remote host: Connection refused\nAdditional GRPC error information from remote target "
        "/job:ps/replica:0/task:0/device:CPU:0 while calling /tensorflow.eager.EagerService/Enqueue:",
    )


class _FailingThenReading:
    def __init__(self, failures: int, error_factory=_ps_unreachable) -> None:
        self.failures, self.calls, self.error_factory = failures, 0, error_factory

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error_factory()
        return 1


def _read_from(reach, function, timeout: float = 30.0):
    return reach._read_from(1, function, 1, _SPEC, timeout, time.monotonic() + timeout)


def test_a_worker_whose_channel_to_the_ps_still_fails_is_retried_until_it_reads(monkeypatch, caplog):
    from tfpar.coordinator import _reach

    monkeypatch.setattr(_reach, "_RETRY_SECONDS", 0.0)
    function = _FailingThenReading(failures=3)
    with caplog.at_level("WARNING", logger="tfpar.coordinator"):
        assert _read_from(_reach, function) == 3
    assert function.calls == 4
    assert "worker:1 cannot reach ps task(s) [0] yet (failed to connect to all addresses" in caplog.text
    assert "worker:1 reaches every ps task now" in caplog.text


def test_a_cancellation_relayed_from_the_ps_path_is_retried_too(monkeypatch):
    import tensorflow as tf

    from tfpar.coordinator import _reach

    monkeypatch.setattr(_reach, "_RETRY_SECONDS", 0.0)
    relayed = _FailingThenReading(failures=2, error_factory=lambda: tf.errors.CancelledError(
        None, None, "Cancelled: [_Derived_]Function was cancelled before it was started; "
        "from remote target /job:ps/replica:0/task:0"))
    assert _read_from(_reach, relayed) == 2  # ClusterCoordinator also treats it as transient


def test_a_worker_that_never_reaches_the_ps_gives_an_error_naming_both_addresses(monkeypatch):
    from tfpar.coordinator import _reach

    monkeypatch.setattr(_reach, "_RETRY_SECONDS", 0.0)
    function = _FailingThenReading(failures=10**9)
    with pytest.raises(ConnectionError) as caught:
        _reach._read_from(0, function, 1, _SPEC, 5.0, time.monotonic() + 0.05)
    message = str(caught.value)
    assert "worker:0 (127.0.0.1:1001) could not reach ps:0 (127.0.0.1:1003) within 5 s" in message
    assert "check that the ps task is still running and that the ps address in the cluster spec" in message
    assert "TensorFlow reported: UnavailableError: failed to connect to all addresses" in message


def test_a_worker_that_does_not_answer_itself_is_left_to_cluster_coordinator(monkeypatch):
    import tensorflow as tf

    from tfpar.coordinator import _reach

    monkeypatch.setattr(_reach, "_RETRY_SECONDS", 0.0)
    worker_down = _FailingThenReading(failures=10**9, error_factory=lambda: tf.errors.UnavailableError(
        None, None, "failed to connect to all addresses\nAdditional GRPC error information from remote "
        "target /job:worker/replica:0/task:1 while calling /tensorflow.eager.EagerService/Enqueue:"))
    assert _read_from(_reach, worker_down) is None
    assert worker_down.calls == 1  # no waiting: the coordinator re-runs a dead worker's steps elsewhere


def test_an_unexpected_error_stops_the_check_with_a_warning_not_the_strategy(monkeypatch, caplog):
    import tensorflow as tf

    from tfpar.coordinator import _reach

    monkeypatch.setattr(_reach, "_RETRY_SECONDS", 0.0)
    odd = _FailingThenReading(failures=10**9, error_factory=lambda: tf.errors.InternalError(None, None, "odd"))
    with caplog.at_level("WARNING", logger="tfpar.coordinator"):
        assert _read_from(_reach, odd) is None
    assert odd.calls == 1
    assert "Could not check that worker:1 reaches the ps tasks: InternalError: odd" in caplog.text


# =============================================================================================
# In-process clusters, one child process per scenario
# =============================================================================================


def _scenario(name: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"ps_{name}") / "result.json"
    process = subprocess.Popen(
        [PY, str(CHECKS), name, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == 0 and out.exists(), log[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return _scenario("core", tmp_path_factory)


@pytest.fixture(scope="module")
def callbacks(tmp_path_factory):
    return _scenario("callbacks", tmp_path_factory)


@pytest.fixture(scope="module")
def partition(tmp_path_factory):
    return _scenario("partition", tmp_path_factory)


@pytest.fixture(scope="module")
def staleness(tmp_path_factory):
    return _scenario("staleness", tmp_path_factory)


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    return _scenario("errors", tmp_path_factory)


# --- fit / evaluate / predict ----------------------------------------------------------------


@pytest.mark.multiprocess
def test_fit_on_arrays_trains_every_example_exactly_once_per_epoch(core):
    fit = core["fit"]
    assert fit["strategy"] == "ParameterServerStrategyV2" and fit["in_scope_strategy_is_model_strategy"]
    assert fit["variable_devices"] == ["/job:ps/replica:0/task:0/device:CPU:0"]
    train_n = fit["train_n"]
    # 3 epochs over the first 75% (validation_split keeps the last 25% out, as Keras does).
    assert fit["seen"][:train_n] == [3.0] * train_n
    assert fit["seen"][train_n:] == [0.0] * (200 - train_n)


@pytest.mark.multiprocess
def test_iterations_and_metrics_count_every_step(core):
    """Interception 12: without atomic assign_add, 2 workers lose optimizer steps and metric counts."""
    fit, spe = core["fit"], core["spe"]
    assert fit["iterations"] == 3 * fit["steps_per_epoch"] == 30
    assert fit["history"]["applied_steps"] == [10.0, 10.0, 10.0]
    assert fit["loss_count"] == 50.0  # metrics hold the last validation pass: 50 examples, each once
    assert spe["train_loss_count"] == 150.0  # the last training epoch: 150 examples, each once
    assert spe["loss_count"] == 200.0  # ... and after evaluate: its 200 examples, each once


@pytest.mark.multiprocess
def test_confusion_matrix_metrics_count_every_example(core):
    """Interception 12: Precision/Recall/AUC-style metrics accumulate with v.assign(v + delta)."""
    ps, local = core["confusion"]["ps"], core["confusion"]["local"]
    assert ps["tp"] + ps["fp"] + ps["tn"] + ps["fn"] == 200.0
    for name in ("tp", "fp", "tn", "fn"):
        assert ps[name] == local[name]
    assert ps["auc"] == pytest.approx(local["auc"], abs=1e-6)


@pytest.mark.multiprocess
def test_history_has_keras_keys_plus_applied_steps(core):
    history = core["fit"]["history"]
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy", "applied_steps"}
    assert all(len(values) == 3 for values in history.values())
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] > 0.8


@pytest.mark.multiprocess
def test_evaluate_matches_the_same_weights_in_one_process(core):
    evaluate = core["evaluate"]
    local = evaluate["local"]
    for name in ("arrays", "dataset"):
        assert evaluate[name]["accuracy"] == pytest.approx(local["accuracy"], abs=1e-6)
        assert evaluate[name]["loss"] == pytest.approx(local["loss"], rel=1e-5)
    # steps=3 of a dataset of batches of 24: the first 72 examples.
    assert evaluate["steps"]["loss"] == pytest.approx(evaluate["local_steps"]["loss"], rel=1e-5)
    assert evaluate["arrays_list"] == pytest.approx([evaluate["arrays"]["loss"], evaluate["arrays"]["accuracy"]])


@pytest.mark.multiprocess
def test_predict_returns_every_batch_in_order(core):
    predict = core["predict"]
    assert predict["arrays_diff"] <= 1e-6
    assert predict["dataset_diff"] <= 1e-6  # (x, y) batches: predictions of x, in dataset order
    assert predict["dataset_xy_shape"] == [200, 2]
    assert predict["steps_shape"] == [48, 2]


@pytest.mark.multiprocess
def test_steps_per_execution_runs_several_steps_per_closure(core):
    spe = core["spe"]
    # 150 examples in batches of 16: 10 steps per epoch, scheduled as closures of 3, 3, 3 and 1.
    assert spe["applied_steps"] == [10.0, 10.0]
    assert spe["iterations"] == 20  # a recompile starts a new optimizer
    assert spe["seen_delta"] == [2.0] * 150 + [0.0] * 50
    # evaluate also runs steps_per_execution batches per closure (13 batches: 3+3+3+3+1).
    assert spe["evaluate"]["loss"] == pytest.approx(spe["evaluate_local"]["loss"], rel=1e-5)
    assert spe["evaluate"]["accuracy"] == pytest.approx(spe["evaluate_local"]["accuracy"], abs=1e-6)


@pytest.mark.multiprocess
def test_a_finite_dataset_epoch_is_its_number_of_batches(core):
    assert core["dataset_fit"]["applied_steps"] == [10.0, 10.0]
    assert core["dataset_fit"]["iterations"] == 20
    # validation_data as a dataset: every validation batch evaluated once, on the final weights
    assert core["dataset_fit"]["val_loss"] == pytest.approx(core["dataset_fit"]["val_loss_local"], rel=1e-5)


@pytest.mark.multiprocess
def test_dataset_fn_gets_the_worker_count_and_index_to_shard(core):
    dataset_fn = core["dataset_fn"]
    # Traced once on the coordinator (for its element structure) and once for the workers, with
    # the worker index as a tensor.
    assert dataset_fn["contexts"] == [[2, "SymbolicTensor"], [2, "SymbolicTensor"]]
    # 6 steps of 16 from two disjoint shards: 96 different examples, none twice.
    assert sorted(set(dataset_fn["seen_delta"])) == [0.0, 1.0]
    assert sum(dataset_fn["seen_delta"]) == 96.0
    assert dataset_fn["applied_steps"] == [6.0]


@pytest.mark.multiprocess
def test_class_weight_weights_the_loss(core):
    # Only class-1 examples, with class weight 0: the loss and so the gradients are zero.
    assert core["class_weight_max_change"] == 0.0


# --- callbacks --------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_batch_callbacks_get_each_steps_own_logs_in_step_order(callbacks):
    events = callbacks["fit"]["events"]
    for epoch in range(callbacks["fit"]["epochs_run"]):
        begin = events.index(["epoch_begin", epoch, None])
        end = next(i for i, e in enumerate(events) if e[0] == "epoch_end" and e[1] == epoch)
        inside = events[begin + 1 : end]
        assert [e[1] for e in inside if e[0] == "batch_begin"] == list(range(10))
        ends = [e for e in inside if e[0] == "batch_end"]
        assert [e[1] for e in ends] == list(range(10))
        assert all(set(e[2]) == {"loss", "accuracy"} and e[2]["loss"] > 0 for e in ends)
        assert ["test_begin", None, None] in inside  # validation runs before epoch end
    assert events[-1][2] == ["accuracy", "applied_steps", "loss", "val_accuracy", "val_loss"]


@pytest.mark.multiprocess
def test_early_stopping_checkpoint_tensorboard_and_csv_logger(callbacks):
    fit = callbacks["fit"]
    assert fit["epochs_run"] == 2  # EarlyStopping(min_delta=100, patience=0) of 6 epochs
    assert fit["checkpoint_predict_diff"] <= 1e-6  # ModelCheckpoint's .keras file reloads
    assert fit["tensorboard"] == ["train", "validation"] and fit["tensorboard_files"] >= 2
    assert fit["csv_rows"][0] == "epoch,accuracy,applied_steps,loss,val_accuracy,val_loss"
    assert len(fit["csv_rows"]) == 3


@pytest.mark.multiprocess
def test_backup_and_restore_resumes_at_the_interrupted_epoch(callbacks):
    backup = callbacks["backup"]
    assert backup["interrupted"] == "interrupted at epoch 2"
    assert backup["iterations_at_interrupt"] == 20
    assert backup["resumed_epochs"] == [2, 3] and backup["history_len"] == 2
    assert backup["iterations_after"] == 40  # the optimizer state came back with the weights
    assert backup["backup_removed"]


# --- variable_partitioner ---------------------------------------------------------------------


PS0, PS1 = "/job:ps/replica:0/task:0/device:CPU:0", "/job:ps/replica:0/task:1/device:CPU:0"


@pytest.mark.multiprocess
def test_creating_the_strategy_checks_that_every_worker_reaches_every_ps(partition):
    # Creating the strategy ran the check; run again on 2 workers x 2 in-process ps tasks, each
    # worker's first call reached both ps tasks.
    assert partition["reach"] == {"checked_when_created": True, "failed_calls_per_worker": {"0": 0, "1": 0}}


@pytest.mark.multiprocess
def test_min_size_partitioner_shards_big_variables_and_their_optimizer_slots(partition):
    result = partition["min_size"]
    assert result["embedding_shards"] == [PS0, PS1]  # 2000 x 8 floats: one shard per ps
    assert result["kernel_shards"] == [PS0]  # 24 x 2 floats, below min_shard_bytes: whole
    assert result["slot_shards"] == [[PS0, PS1], [PS0, PS1]]  # Adam's m and v, sharded alike


@pytest.mark.multiprocess
def test_fixed_shards_partitioner_shards_every_variable(partition):
    result = partition["fixed3"]
    assert len(result["embedding_shards"]) == 3 and len(result["kernel_shards"]) == 3
    assert set(result["embedding_shards"]) == {PS0, PS1}
    assert all(len(slot) == 3 for slot in result["slot_shards"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["min_size", "fixed3"])
def test_sharded_training_equals_training_in_one_process(partition, name):
    """Interception 13: gradients joined over shards, sharded slots and shard-wise updates are exact."""
    result = partition[name]
    assert result["moved"] > 0.01
    assert result["max_diff_from_one_process"] <= 1e-5
    assert result["iterations"] == 6
    assert result["reload_diff"] <= 1e-6  # save_weights of a sharded model loads into a plain one


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["min_size", "fixed3"])
def test_sharded_embedding_lookup_reads_rows_not_whole_tables(partition, name):
    ops = partition[name]["forward_ops"]
    assert "ResourceGather" in ops  # a row gather on each shard, on its ps
    assert "GatherV2" not in ops  # upstream reads every shard whole, then gathers


# --- staleness --------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_asynchronous_training_lets_the_fast_worker_run_ahead(staleness):
    result = staleness["async"]
    assert result["staleness"] is None
    # Worker 1 is made slow: without a bound worker 0 gets far ahead (this is what k bounds).
    assert max(result["lead"]) > 6
    assert result["counts"][0] > result["counts"][1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name, bound", [("k0", 0), ("k2", 2), ("k1_spe3", 1)])
def test_staleness_bounds_how_far_a_worker_runs_ahead_of_the_slowest(staleness, name, bound):
    result = staleness[name]
    assert result["staleness"] == bound
    # The probe counts a step when it starts, so a worker k steps ahead of the slowest's finished
    # steps shows a lead of at most k + 1 over the slowest's started ones.
    assert max(result["lead"]) <= bound + 1, result
    if bound == 0:
        assert result["counts"] == [30, 30]  # lockstep: every round each worker does one step


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["async", "k0", "k2", "k1_spe3"])
def test_every_scheduled_step_is_applied_exactly_once(staleness, name):
    result = staleness[name]
    assert result["iterations"] == result["scheduled"] == sum(result["counts"])
    assert result["applied_steps"] == [30.0, 30.0]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "case, kind, text",
    [
        ("infinite_fit", "ValueError", "The dataset passed to fit is infinite, so an epoch has no natural end: pass steps_per_epoch"),
        ("dataset_fn_fit", "ValueError", "fit with a dataset_fn needs steps_per_epoch"),
        ("generator_fit", "TypeError", "a Python generator or keras.utils.PyDataset runs in this process"),
        ("dataset_with_y", "ValueError", "`y` must not be given when `x` is a tf.data.Dataset"),
        ("infinite_evaluate", "ValueError", "The evaluate dataset is infinite, so it has no end to evaluate up to: pass steps"),
        ("dataset_fn_evaluate", "TypeError", "a dataset_fn is accepted by fit only"),
        ("mismatched_lengths", "ValueError", "Received sizes {'x': [200], 'y': [199]}"),
        ("uncompiled", "ValueError", "You must call `compile()` before"),
    ],
)
def test_bad_input_gets_a_clear_error(errors, case, kind, text):
    assert errors[case] is not None, f"{case} did not raise"
    assert errors[case][0] == kind
    assert text in errors[case][1]


@pytest.mark.multiprocess
def test_an_error_in_a_step_surfaces_and_training_goes_on(errors):
    kind, text = errors["step_error"]
    assert kind == "InvalidArgumentError" and "outside the valid range" in text
    assert errors["after_error_applied"] == [4.0]
    assert errors["train_on_batch_after_fit"] == ["accuracy", "loss"]


@pytest.mark.multiprocess
def test_a_hand_made_strategy_handed_to_tfpar_trains(errors):
    assert errors["instance_fit"] == [4.0, 4.0]


@pytest.mark.multiprocess
def test_upstream_keras_fit_fails_under_parameter_server(errors):
    """Interception 11: what a ParameterServerStrategy tfpar does not manage still does (keras-team/keras#18624)."""
    tfpar.testing.skip_unless_reproduced(
        errors["upstream_fit"] is not None, "Keras 3 fit under ParameterServerStrategy (keras-team/keras#18624)"
    )
    assert errors["upstream_fit"] == [
        "ValueError",
        "To use this dataset, you need to pass this dataset to ClusterCoordinator.create_per_worker_dataset.",
    ]


# =============================================================================================
# Separate processes: tfpar launch --workers 2 --ps 1 (the coordinator is the chief)
# =============================================================================================


def _servers(text: str, name: str) -> list[tuple[str, int]]:
    pattern = rf"^\[{name}\] tfpar: {name} server listening on (\S+) \(pid (\d+)\)$"
    return [(address, int(pid)) for address, pid in re.findall(pattern, text, re.M)]


def _wait_for(predicate, timeout: float, what: str, thread: threading.Thread | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"the launch ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.multiprocess
def test_fit_runs_as_the_chief_of_tfpar_launch(tmp_path):
    out, buffer = tmp_path / "result.json", io.StringIO()
    code = launch.launch([PY, str(LAUNCH_FIT), str(out), "--dataset"], workers=2, ps=1, output=buffer, timeout=180)
    text = buffer.getvalue()
    assert code == 0, text[-6000:]
    result = json.loads(out.read_text())
    assert result["task"] == "chief:0" and result["strategy"] == "ParameterServerStrategyV2"
    assert sorted(name for name in ("worker:0", "worker:1", "ps:0") if _servers(text, name)) == ["ps:0", "worker:0", "worker:1"]
    assert result["variable_devices"] == ["/job:ps/replica:0/task:0/device:CPU:0"]
    assert result["epochs_run"] == 3 and result["history"]["applied_steps"] == [8.0, 8.0, 8.0]
    assert result["iterations"] == 24
    assert result["evaluate"]["accuracy"] > 0.85
    assert result["predict_matches_local"] <= 1e-6


@pytest.mark.multiprocess
@pytest.mark.slow
def test_worker_killed_mid_training_loses_no_steps(tmp_path):
    """ClusterCoordinator re-runs the closures of a dead worker (at least once) and re-admits it
    when `tfpar launch` has restarted it; fit finishes every epoch and History counts the steps."""
    out, buffer, outcome = tmp_path / "result.json", io.StringIO(), {}

    def run() -> None:
        outcome["code"] = launch.launch(
            [PY, str(LAUNCH_FIT), str(out), "--epochs", "3", "--slow", "6", "--mark-epoch", "1"],
            workers=2, ps=1, max_restarts=1, output=buffer, timeout=180,
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait_for(lambda: "MARK epoch 1" in buffer.getvalue(), 150, "epoch 1 to start", thread)
        (address, pid), = _servers(buffer.getvalue(), "worker:0")
        os.kill(pid, signal.SIGKILL)
    finally:
        thread.join(timeout=200)
    text = buffer.getvalue()
    assert outcome.get("code") == 0, text[-6000:]
    assert f"worker:0 (server) exited with signal SIGKILL (exit code 137); restarting it in place on {address}" in text
    result = json.loads(out.read_text())
    assert result["epochs_run"] == 3  # no epoch lost
    applied = result["history"]["applied_steps"]
    assert all(steps >= 8 for steps in applied)  # at least every scheduled step ...
    assert result["iterations"] == sum(applied) >= 24  # ... and History counts any re-run
    assert result["evaluate"]["accuracy"] > 0.85


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_coordinator_exits_after_a_worker_was_lost(tmp_path):
    """Interception 14: without tfpar's exit hook this process deadlocks in ClusterCoordinator.__del__."""
    sentinel, buffer, outcome = tmp_path / "restarted", io.StringIO(), {}

    def run() -> None:
        outcome["code"] = launch.launch(
            [PY, str(SCRIPTS / "ps_exit_after_worker_loss.py"), "300", str(sentinel)], workers=2, ps=1,
            max_restarts=1, output=buffer, timeout=120,
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait_for(lambda: "[chief:0] scheduled" in buffer.getvalue(), 100, "the closures", thread)
        (address, pid), = _servers(buffer.getvalue(), "worker:1")
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: len(_servers(buffer.getvalue(), "worker:1")) == 2, 90, "worker:1 to restart", thread)
    finally:
        sentinel.touch()
        thread.join(timeout=150)
    text = buffer.getvalue()
    assert outcome.get("code") == 0, text[-6000:]  # 124 (timeout) when the exit deadlocks
    assert "[chief:0] exiting" in text
    result = json.loads(re.search(r"^\[chief:0\] RESULT:(.*)$", text, re.M).group(1))
    assert result["counter"] >= 300  # at least once


class _Task:
    """One process of a hand-made cluster, with its output collected by a thread."""

    def __init__(self, command: list[str], spec: dict, task: str, index: int) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   TF_CONFIG=json.dumps({"cluster": spec, "task": {"type": task, "index": index}}))
        self.lines: list[str] = []
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_ps_failure_stops_training_with_a_clear_error_and_a_backup_to_resume(tmp_path):
    ports = cluster_lib.free_ports(4)
    spec = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{p}" for p in ports[1:3]],
            "ps": [f"127.0.0.1:{ports[3]}"]}
    backup = tmp_path / "backup"
    options = ["--epochs", "4", "--slow", "6", "--backup", str(backup), "--mark-epoch", "2"]
    tasks = [_Task([PY, "-c", SERVE], spec, "worker", i) for i in range(2)]

    def restart(run: str) -> tuple[_Task, _Task]:
        # As a user (or Kubernetes) restarts the two after a ps failure, the workers kept running:
        # the coordinator first, the ps a little later, so that the workers' channels to the ps
        # may still be failing when the coordinator starts to train.
        chief = _Task([PY, str(LAUNCH_FIT), str(tmp_path / f"{run}.json"), *options], spec, "chief", 0)
        tasks.append(chief)
        time.sleep(2)
        ps = _Task([PY, "-c", SERVE], spec, "ps", 0)
        tasks.append(ps)
        return chief, ps

    def fails_at_epoch_2(chief: _Task, ps: _Task, finished: str) -> None:
        _wait_for(lambda: "MARK epoch 2" in chief.text() or chief.process.poll() is not None, 150, "epoch 2")
        assert "MARK epoch 2" in chief.text(), chief.text()[-6000:]
        ps.kill()
        assert chief.process.wait(timeout=120) != 0
        text = chief.text()
        message = next(line for line in chief.lines if line.startswith("tfpar.coordinator.ParameterServerError"))
        assert f"Parameter server ps:0 failed during epoch 3 ({finished})" in message
        assert f"A checkpoint to resume from is in '{backup}'" in message
        assert "restart the ps task and run the same script again" in message
        assert "TensorFlow reported: UnavailableError:" in message, text[-4000:]
        assert backup.is_dir()

    try:
        ps = _Task([PY, "-c", SERVE], spec, "ps", 0)
        tasks.append(ps)
        chief = _Task([PY, str(LAUNCH_FIT), str(tmp_path / "first.json"), *options], spec, "chief", 0)
        tasks.append(chief)
        fails_at_epoch_2(chief, ps, "the last finished epoch is 2")
        # Restarted, fit resumes at epoch 3 (0-based 2) from the backup; the ps fails again in it.
        fails_at_epoch_2(*restart("second"), "the last finished epoch is 2")
        # Restarted once more, it finishes: epochs 3 and 4 of 4.
        third, _ = restart("third")
        assert third.process.wait(timeout=180) == 0, third.text()[-6000:]
        result = json.loads((tmp_path / "third.json").read_text())
        assert result["epochs_run"] == 2  # epochs 3 and 4 of 4
        assert result["iterations"] == 4 * 8  # two restored epochs of optimizer steps + two new
        assert result["evaluate"]["accuracy"] > 0.85
    finally:
        for task in tasks:
            task.kill()
