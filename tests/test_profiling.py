"""StepProfiler (issue 16): where a step's time goes, built on TensorFlow's profiler.

Checked here: the interval arithmetic against brute force; the parts add up to the step time
measured by the wall clock (two clocks: TensorFlow's trace and ``time.perf_counter``); a slow
input shows up as input wait; one device has no communication, two replicas do; a 2-worker
cluster reports every worker's breakdown with communication > 0; a parameter-server cluster
reports its workers and ps; a split model reports each stage's busy and bubble time; and
``tfpar train --profile``'s files (metrics.json, trace.json, the PNG, TensorFlow's trace).
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import launch
from tfpar.profiling import PARTS, StepProfiler, _breakdown, _intervals, _xplane

SCRIPT = Path(__file__).parent / "scripts" / "profile_cluster.py"
# The trace's windows and the wall clock's cover the same steps; they differ by the time
# between a TraceMe and perf_counter (measured: 0.2-1.5% on this VM, idle and under load).
CLOCK_TOLERANCE = 0.10  # relative
CLOCK_SLACK_MS = 1.0


def _model(side: int = 16, filters: int = 8) -> keras.Model:
    model = keras.Sequential([
        keras.Input((side, side, 3)), keras.layers.Conv2D(filters, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(n: int = 640, side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, side, side, 3), dtype=np.float32), rng.integers(0, 10, n)


def _assert_adds_up(report) -> None:
    breakdown = report.breakdown
    parts = breakdown.part_ms()
    assert all(value >= 0 for value in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(breakdown.step_ms, rel=1e-9)
    assert sum(breakdown.shares().values()) == pytest.approx(1.0)
    assert abs(breakdown.step_ms - report.wall_step_ms) <= CLOCK_TOLERANCE * report.wall_step_ms + CLOCK_SLACK_MS, (
        breakdown.step_ms, report.wall_step_ms)


# --- interval arithmetic -----------------------------------------------------------------------


def _points(intervals) -> set[int]:
    return {t for start, end in intervals for t in range(start, end)}


@pytest.mark.parametrize("seed", range(20))
def test_interval_sets_equal_brute_force(seed):
    rng = random.Random(seed)
    raw = lambda: [(s, s + rng.randint(0, 15)) for s in (rng.randint(0, 100) for _ in range(rng.randint(0, 12)))]  # noqa: E731
    a, b = _intervals.union(raw()), _intervals.union(raw())
    assert _points(a) == _points(raw_a := a) and all(x[1] < y[0] for x, y in zip(raw_a, raw_a[1:]))
    assert _points(_intervals.intersect(a, b)) == _points(a) & _points(b)
    assert _points(_intervals.subtract(a, b)) == _points(a) - _points(b)
    assert _intervals.length(a) == len(_points(a))


def test_events_are_put_in_their_part():
    event = lambda line, name: _xplane.Event(line, name, 0, 1)  # noqa: E731
    assert _breakdown.category(event("tf_Compute/1", "model/conv2d/Relu:_MklNativeFusedConv2D")) == "compute"
    assert _breakdown.category(event("collective_ops/3", "Loop")) == "communication"
    assert _breakdown.category(event("tf_Compute/1", "x/CollectiveReduceV2:CollectiveReduceV2")) == "communication"
    assert _breakdown.category(event("tf_Compute/1", "a/_Send:_Send")) == "communication"
    assert _breakdown.category(event("tf_data_iterator_get_next/1", "IteratorGetNextOp::DoCompute")) == "input"
    assert _breakdown.category(event("tf_Compute/1", "IteratorGetNext:IteratorGetNext")) == "input"
    # the input pipeline's own threads overlap the step: not part of it
    assert _breakdown.category(event("tf_data_iterator_resource/1", "map/EagerPyFunc:EagerPyFunc")) is None
    # a function call's time is that of its ops; the executor's loop is not an op
    assert _breakdown.category(event("tf_Compute/1", "StatefulPartitionedCall:StatefulPartitionedCall")) is None
    assert _breakdown.category(event("tf_Compute/1", "ExecutorState::Process")) is None
    assert _breakdown.category(event("python", "EagerService:Enqueue")) is None


def test_a_step_is_cut_on_the_training_thread_whatever_the_process_is_called():
    # TensorFlow names the training thread's line after the process ("python3", "tfpar", a
    # script's name): the step function's spans are found on the line with the step markers.
    ms = 1_000_000
    events = [
        _xplane.Event("tfpar", "tfpar_step", 0, 9 * ms, step=0), _xplane.Event("tfpar", "tfpar_step", 10 * ms, 19 * ms, step=1),
        _xplane.Event("tfpar", "EagerLocalExecute: __inference_one_step_on_iterator_1", 1 * ms, 9 * ms),
        _xplane.Event("tf_Compute/1", "m/dense/MatMul:_MklMatMul", 2 * ms, 4 * ms),           # compute 2 ms
        _xplane.Event("collective_ops/7", "x/CollectiveReduceV2:CollectiveReduceV2", 3 * ms, 6 * ms),  # 2 ms exposed
        _xplane.Event("tf_data_iterator_get_next/3", "IteratorGetNextOp::DoCompute", 1 * ms, 2 * ms),  # input 1 ms
        _xplane.Event("tf_data_iterator_resource/4", "map/Sleep:EagerPyFunc", 0, 10 * ms),    # pipeline: no part
    ]
    windows = _breakdown.step_windows(events)
    assert windows == [(1, 0, 10 * ms), (1, 10 * ms, 19 * ms)]
    breakdown = _breakdown.summarize(_breakdown.cut(events[:1] + events[2:], windows[:1]))
    assert breakdown.part_ms() == pytest.approx(
        {"input": 1.0, "compute": 2.0, "communication": 2.0, "idle": 3.0, "other": 2.0})
    assert breakdown.steps == 1 and breakdown.step_ms == pytest.approx(10.0)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="steps"):
        StepProfiler(steps=0)
    with pytest.raises((TypeError, ValueError), match="warmup_steps"):
        StepProfiler(warmup_steps=-1)


# --- one process -------------------------------------------------------------------------------


def test_one_device_parts_add_up_and_nothing_is_communication(tmp_path):
    x, y = _data()
    model = _model()
    profiler = StepProfiler(warmup_steps=4, steps=10, logdir=tmp_path, verbose=False)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[profiler], verbose=0)
    report = profiler.report
    _assert_adds_up(report)
    assert report.breakdown.steps == 10
    assert report.breakdown.compute_ms > 0
    assert report.breakdown.communication_ms <= 0.02 * report.breakdown.step_ms
    # TensorFlow's own trace, as TensorBoard's Profile tab reads it
    runs = _xplane.runs(tmp_path)
    assert runs and any(name.endswith(".xplane.pb") for name in map(str, runs[-1].iterdir()))


def test_two_replicas_communicate(tmp_path):
    x, y = _data()
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        model = _model()
    profiler = StepProfiler(warmup_steps=4, steps=10, verbose=False)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[profiler], verbose=0)
    _assert_adds_up(profiler.report)
    assert profiler.report.breakdown.communication_ms > 0  # the all-reduce ends after the last gradient


def test_a_slow_input_is_input_wait(tmp_path):
    x, y = _data(320)

    def slow(image, label):
        def sleep(value):
            time.sleep(0.004)
            return value

        image = tf.py_function(sleep, [image], tf.float32)
        image.set_shape((16, 16, 3))
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).map(slow).batch(16)
    profiler = StepProfiler(warmup_steps=3, steps=8, verbose=False)
    _model().fit(dataset, epochs=1, callbacks=[profiler], verbose=0)
    report = profiler.report
    _assert_adds_up(report)
    # 16 x 4 ms of sleep per batch against a step of a few ms: the step waits for its input
    assert report.breakdown.shares()["input"] > 0.5, report.table()
    assert "input" in report.verdict().split(" is ")[0]


def test_steps_per_execution_counts_steps_not_calls():
    x, y = _data()
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=4)
    profiler = StepProfiler(warmup_steps=4, steps=8, verbose=False)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[profiler], verbose=0)
    assert profiler.report.breakdown.steps == 8
    _assert_adds_up(profiler.report)


def test_a_profile_that_cannot_be_read_warns_and_the_fit_ends_normally(monkeypatch):
    x, y = _data(256)
    profiler = StepProfiler(warmup_steps=2, steps=3, verbose=False)
    monkeypatch.setattr(_xplane, "read_run", lambda run: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.warns(UserWarning, match="could not read its profile .*OSError: disk gone.*finished normally"):
        history = _model().fit(x, y, batch_size=32, epochs=2, callbacks=[profiler], verbose=0)
    assert len(history.history["loss"]) == 2 and profiler.report is None


def test_a_fit_that_raises_inside_the_window_leaves_no_session_behind(tmp_path):
    x, y = _data(256)
    model = _model()

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                raise KeyboardInterrupt

    profiler = StepProfiler(warmup_steps=1, steps=5, verbose=False)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=32, epochs=1, callbacks=[profiler, Boom()], verbose=0)
    # the next fit with the same profiler (or any other profiler) can profile
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[profiler], verbose=0)
    assert profiler.report is not None and profiler.report.breakdown.steps == 5
    tf.profiler.experimental.start(str(tmp_path))  # and no session is left running
    tf.profiler.experimental.stop()


def test_too_short_a_run_warns_and_reports_nothing():
    x, y = _data(64)
    profiler = StepProfiler(warmup_steps=50, steps=5, verbose=False)
    with pytest.warns(UserWarning, match="warmup_steps=50"):
        _model().fit(x, y, batch_size=32, epochs=1, callbacks=[profiler], verbose=0)
    assert profiler.report is None


def test_another_profiler_session_is_left_alone_and_training_goes_on(tmp_path):
    x, y = _data(256)
    model = _model()
    profiler = StepProfiler(warmup_steps=2, steps=3, verbose=False)
    tf.profiler.experimental.start(str(tmp_path))  # the user's own session, e.g. TensorBoard's
    try:
        with pytest.warns(UserWarning, match="could not start TensorFlow's profiler"):
            history = model.fit(x, y, batch_size=32, epochs=1, callbacks=[profiler], verbose=0)
    finally:
        tf.profiler.experimental.stop()
    assert len(history.history["loss"]) == 1
    assert profiler.report is None


def test_a_split_model_reports_each_stage(tmp_path):
    x, y = _data(256)
    model = keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(), keras.layers.Dense(10),
    ])
    placed = tfpar.parallel.split(model, ["cpu:0", "cpu:1"], microbatches=2)
    placed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    profiler = StepProfiler(warmup_steps=3, steps=6, verbose=False)
    placed.fit(x, y, batch_size=32, epochs=1, callbacks=[profiler], verbose=0)
    report = profiler.report
    stages = report.tasks[0].stages
    assert [stage.stage for stage in stages] == [0, 1]
    for stage in stages:
        assert stage.busy_ms > 0
        assert stage.busy_ms + stage.bubble_ms == pytest.approx(report.breakdown.step_ms, rel=1e-6)
        assert 0 < stage.predicted_bubble_share < 1
    assert "bubble" in report.table()
    data = report.to_json()
    assert [stage["stage"] for stage in data["stages"]] == [0, 1]
    report.plot(tmp_path / "stages.png")
    assert (tmp_path / "stages.png").stat().st_size > 0


# --- clusters ----------------------------------------------------------------------------------


def _cluster_report(tmp_path: Path, strategy: str, **options) -> tuple[dict, dict]:
    out = tmp_path / "report.json"
    buffer = io.StringIO()
    code = launch.launch([sys.executable, str(SCRIPT), str(out), strategy], timeout=300, output=buffer, **options)
    assert code == 0 and out.exists(), buffer.getvalue()[-6000:]
    return json.loads(out.read_text()), json.loads(out.with_name("trace.json").read_text())


@pytest.mark.multiprocess
def test_two_workers_report_every_worker_with_communication(tmp_path):
    report, trace = _cluster_report(tmp_path, "multi_worker", workers=2)
    assert set(report["per_task"]) == {"worker 0", "worker 1"}
    for task in report["per_task"].values():
        assert task["communication_ms"] > 0
        assert sum(task[f"{part}_ms"] for part in PARTS) == pytest.approx(task["step_ms"])
    assert abs(report["step_ms"] - report["wall_step_ms"]) <= CLOCK_TOLERANCE * report["wall_step_ms"] + CLOCK_SLACK_MS
    processes = {event["args"]["name"] for event in trace["traceEvents"] if event["name"] == "process_name"}
    assert processes == {"worker 0", "worker 1"}
    assert any(event.get("cat") == "communication" for event in trace["traceEvents"])


@pytest.mark.multiprocess
def test_parameter_server_reports_workers_and_ps(tmp_path):
    report, trace = _cluster_report(tmp_path, "parameter_server", workers=2, ps=1)
    assert set(report["per_task"]) == {"worker 0", "worker 1", "ps 0"}
    for _name, task in report["per_task"].items():
        assert sum(task[f"{part}_ms"] for part in PARTS) == pytest.approx(task["step_ms"])
        assert task["other_ms"] == 0  # no Python of the user's runs there
    assert sum(report["per_task"][w]["compute_ms"] for w in ("worker 0", "worker 1")) > 0
    assert report["mode"] == "parameter_server"


# --- tfpar train --profile ---------------------------------------------------------------------


def test_job_profile_writes_the_breakdown_trace_and_picture(tmp_path):
    config = tfpar.job.TrainConfig(epochs=2, width=0.125, profile=True, output_dir=str(tmp_path), verbose=0,
                                   strategy="mirrored", strategy_options={"devices": ["cpu:0", "cpu:1"]})
    lines: list[str] = []
    result = tfpar.job.train(config, log=lines.append)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    breakdown = metrics["step_breakdown"]
    assert {"step_ms", "input_ms", "compute_ms", "communication_ms", "other_ms", "per_task"} <= set(breakdown)
    assert result.step_breakdown == breakdown
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any(event["ph"] == "X" and event["cat"] == "compute" for event in trace["traceEvents"])
    assert (tmp_path / "step_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert any("== step breakdown" in line for line in lines)
