"""Incremental training: each new example is trained on exactly once, across restarts."""

from __future__ import annotations

import contextlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar.data as td


def _write_round(directory, first_id, count, name):
    ids = np.arange(first_id, first_id + count)
    x = np.stack([ids, ids * 0.5], axis=1).astype("float32") / 100.0
    return td.write_tfrecords({"id": ids, "x": x, "y": ids % 2}, str(directory), num_files=1,
                              prefix=name)[0]


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


class _Recorder:
    """make_dataset that records every example id actually read during training."""

    def __init__(self):
        self.seen: list[int] = []
        self.calls: list[list[str]] = []

    def _note(self, ids):
        self.seen.extend(int(i) for i in ids.numpy())
        return ids

    def __call__(self, files):
        self.calls.append(list(files))
        dataset = td.read_tfrecords(files, features="infer")

        def to_xy(example):
            ids = tf.py_function(self._note, [example["id"]], tf.int64)
            with tf.control_dependencies([ids]):
                return tf.identity(example["x"]), tf.cast(example["y"], tf.float32)

        return dataset.batch(4).map(to_xy)


def test_rounds_train_each_new_example_once_and_survive_restarts(tmp_path):
    data, checkpoints = tmp_path / "incoming", str(tmp_path / "ckpt")
    pattern = str(data / "*.tfrecord")
    _write_round(data, 0, 10, "day1")
    _write_round(data, 10, 6, "day2")

    recorder = _Recorder()
    trainer = td.IncrementalTrainer(_model(), pattern, recorder, checkpoints)
    assert trainer.restored_from is None
    first = trainer.fit_new_data(epochs=1, verbose=0)
    assert [os.path.basename(f) for f in first] == [
        "day1-00000-of-00001.tfrecord", "day2-00000-of-00001.tfrecord"]
    assert sorted(recorder.seen) == list(range(16))
    assert trainer.fit_new_data(verbose=0) == []  # nothing new: nothing read, nothing saved
    weights, steps = trainer.model.get_weights(), int(trainer.model.optimizer.iterations)

    # A new process: fresh model, restored from the checkpoint, then new data arrives.
    _write_round(data, 16, 5, "day3")
    recorder2 = _Recorder()
    restarted = td.IncrementalTrainer(_model(), pattern, recorder2, checkpoints)
    assert restarted.restored_from is not None
    for a, b in zip(weights, restarted.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(restarted.model.optimizer.iterations) == steps
    assert len(restarted.files.consumed_files()) == 2
    new = restarted.fit_new_data(epochs=1, verbose=0)
    assert [os.path.basename(f) for f in new] == ["day3-00000-of-00001.tfrecord"]
    assert sorted(recorder2.seen) == [16, 17, 18, 19, 20]
    assert sorted(recorder.seen + recorder2.seen) == list(range(21))  # each example exactly once

    # Asked for: replay everything (old and new) once more.
    _write_round(data, 21, 3, "day4")
    recorder3 = _Recorder()
    replaying = td.IncrementalTrainer(_model(), pattern, recorder3, checkpoints)
    assert [os.path.basename(f) for f in replaying.fit_new_data(replay=True, verbose=0)] == [
        "day4-00000-of-00001.tfrecord"]
    assert sorted(recorder3.seen) == list(range(24))


def test_a_crashed_round_is_redone_from_the_previous_checkpoint(tmp_path):
    data, checkpoints = tmp_path / "incoming", str(tmp_path / "ckpt")
    pattern = str(data / "*.tfrecord")
    _write_round(data, 0, 8, "a")
    td.IncrementalTrainer(_model(), pattern, _Recorder(), checkpoints).fit_new_data(verbose=0)
    _write_round(data, 8, 4, "b")

    def crash(files):
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        td.IncrementalTrainer(_model(), pattern, crash, checkpoints).fit_new_data(verbose=0)
    recorder = _Recorder()
    redo = td.IncrementalTrainer(_model(), pattern, recorder, checkpoints)
    redo.fit_new_data(verbose=0)
    assert sorted(recorder.seen) == [8, 9, 10, 11]


def test_changed_files_are_reported(tmp_path):
    data, checkpoints = tmp_path / "incoming", str(tmp_path / "ckpt")
    path = _write_round(data, 0, 4, "a")
    trainer = td.IncrementalTrainer(_model(), str(data / "*.tfrecord"), _Recorder(), checkpoints)
    trainer.fit_new_data(verbose=0)
    _write_round(data, 0, 9, "a")  # rewritten in place with more records
    assert os.path.exists(path)
    with pytest.raises(ValueError, match="changed after the model was trained on them"):
        trainer.fit_new_data(verbose=0)


def test_incremental_files_state_round_trips_through_a_checkpoint(tmp_path):
    data = tmp_path / "incoming"
    first = _write_round(data, 0, 2, "a")
    files = td.IncrementalFiles(str(data / "*.tfrecord"))
    assert files.new_files() == [first]
    files.mark_consumed([first])
    checkpoint = tf.train.Checkpoint(data=files)
    saved = checkpoint.write(str(tmp_path / "state"))
    restored = td.IncrementalFiles(str(data / "*.tfrecord"))
    tf.train.Checkpoint(data=restored).read(saved).assert_consumed()
    assert restored.consumed_files() == [first] and restored.new_files() == []


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda p, c: td.IncrementalTrainer("model", p, lambda f: None, c), TypeError, "keras.Model"),
        (lambda p, c: td.IncrementalTrainer(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
                                            p, lambda f: None, c), RuntimeError, "compiled"),
        (lambda p, c: td.IncrementalTrainer(_model(), p, "not callable", c), TypeError, "make_dataset"),
        (lambda p, c: td.IncrementalFiles([]), TypeError, "non-empty list"),
    ],
)
def test_errors(tmp_path, build, error, match):
    with pytest.raises(error, match=match):
        build(str(tmp_path / "*.tfrecord"), str(tmp_path / "ckpt"))


def test_incremental_rounds_under_a_mirrored_strategy_match_single_device(tmp_path, virtual_devices):
    import tfpar

    data = tmp_path / "incoming"
    pattern = str(data / "*.tfrecord")
    _write_round(data, 0, 16, "a")
    strategy = tfpar.get_strategy("mirrored", devices=virtual_devices[:2])

    def sgd_model():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return model

    def make(files, calls):
        calls.append([os.path.basename(f)[0] for f in files])
        dataset = td.read_tfrecords(files, features="infer")
        return dataset.map(lambda e: (e["x"], tf.cast(e["y"], tf.float32))).batch(4)

    def rounds(scope, checkpoints):  # scope: a function returning a fresh context manager
        # Round 1, a restart, new data, round 2: each time a fresh model restored from disk.
        calls, weights = [], None
        for _ in range(2):
            with scope():
                model = sgd_model()
            trainer = td.IncrementalTrainer(model, pattern, lambda f: make(f, calls), checkpoints)
            if weights is not None:
                for a, b in zip(weights, model.get_weights()):
                    np.testing.assert_array_equal(a, b)
            trainer.fit_new_data(epochs=1, verbose=0)
            weights = model.get_weights()
            if not os.path.exists(data / "b-00000-of-00001.tfrecord"):
                _write_round(data, 16, 8, "b")
        return calls, weights

    mirrored_calls, mirrored = rounds(strategy.scope, str(tmp_path / "ckpt_mirrored"))
    os.remove(data / "b-00000-of-00001.tfrecord")  # the same arrival again, without a strategy
    single_calls, single = rounds(contextlib.nullcontext, str(tmp_path / "ckpt_single"))
    assert mirrored_calls == single_calls == [["a"], ["b"]]  # only the new file, once
    for a, b in zip(single, mirrored):  # the same examples, once each, in the same order
        np.testing.assert_allclose(a, b, atol=1e-5)
