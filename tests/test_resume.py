"""BackupAndRestore under a tfpar strategy resumes exactly, also after a mid-epoch save
(the exact-resume interception, tfpar/_compat/resume.py); one process, 2 virtual CPUs."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import tfpar
import tfpar.testing

N = 101


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.at is not None and (self.epoch, batch) == self.at:
            raise KeyboardInterrupt("simulated crash")


def _fit(backup_dir, *, at=None, save_freq=2, strategy="mirrored", epochs=4):
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype("float32")
    y = rng.integers(0, 3, N)
    with tfpar.scope(strategy, devices=["cpu:0", "cpu:1"]) if strategy == "mirrored" else tfpar.scope(strategy):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [_Interrupt(at), keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=save_freq)]
    try:
        model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0, callbacks=callbacks)
    except KeyboardInterrupt:
        return None
    return model


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize(("at", "save_freq"), [((2, 2), 2), ((1, 3), "epoch"), ((0, 1), 1)])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, at, save_freq):
    reference = _fit(tmp_path / "reference", save_freq=save_freq)
    assert _fit(tmp_path / "backup", at=at, save_freq=save_freq) is None
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert {"epoch", "batch", "tfpar_steps_done", "tfpar_seed"} <= set(metadata)
    resumed = _fit(tmp_path / "backup", save_freq=save_freq)
    assert int(resumed.optimizer.iterations.numpy()) == int(reference.optimizer.iterations.numpy()) == 16
    assert _max_diff(reference, resumed) == 0.0
    assert not (tmp_path / "backup").exists()  # removed after the successful run, as upstream


def test_a_second_crash_in_a_resumed_epoch_records_that_epoch(tmp_path):
    """Upstream records epoch 0 for a mid-epoch save in the first epoch of a resumed run."""
    assert _fit(tmp_path / "backup", at=(2, 0)) is None
    assert _fit(tmp_path / "backup", at=(2, 3)) is None
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 2 and metadata["tfpar_steps_done"] == 2
    reference = _fit(tmp_path / "reference")
    resumed = _fit(tmp_path / "backup")
    assert _max_diff(reference, resumed) == 0.0


def test_upstream_replays_the_interrupted_epoch(tmp_path):
    """Without tfpar (plain default strategy), the resumed run trains the saved steps twice."""
    reference = _fit(tmp_path / "reference", strategy="default")
    interrupted = _fit(tmp_path / "backup", at=(2, 2), strategy="default")
    assert interrupted is None
    resumed = _fit(tmp_path / "backup", strategy="default")
    replayed = int(resumed.optimizer.iterations.numpy()) - int(reference.optimizer.iterations.numpy())
    tfpar.testing.skip_unless_reproduced(replayed != 0, "BackupAndRestore replays the interrupted epoch's saved steps")
    assert replayed == 2


def test_models_tfpar_does_not_manage_keep_upstream_backup_behaviour(tmp_path):
    """tfpar's BackupAndRestore hooks act on models of tfpar strategies only."""
    tfpar.get_strategy("mirrored", devices=["cpu:0", "cpu:1"])  # installs the interceptions
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    callback = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=1, delete_checkpoint=False)
    model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=2, verbose=0, callbacks=[callback])
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert "tfpar_steps_done" not in metadata
    assert metadata == {"epoch": 1, "batch": 1}  # upstream's own record, untouched
