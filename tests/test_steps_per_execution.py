"""compile(steps_per_execution=k > 1) under MirroredStrategy: fails upstream, works and stays exact
under tfpar (the step-function interception, tfpar/_compat/step_function.py; keras-team/keras#19246)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.testing
from tfpar import _compat


def _build(steps_per_execution):
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss="mse",
        metrics=["mae"],
        steps_per_execution=steps_per_execution,
    )
    return model


def _data(n):
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, 6)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")


def test_upstream_mirrored_fails_with_steps_per_execution():
    _compat.bump_collective_key_base()
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        model = _build(4)
    x, y = _data(100)
    try:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    except tf.errors.InvalidArgumentError as error:
        assert "placeholder" in str(error)
    else:
        tfpar.testing.skip_unless_reproduced(False, "steps_per_execution under MirroredStrategy (keras-team/keras#19246)")


@pytest.mark.parametrize(("n", "steps"), [(100, 4), (101, 3), (64, 2), (97, 8)])
def test_tfpar_mirrored_steps_per_execution_is_exact(n, steps):
    x, y = _data(n)
    reference = _build(1)
    reference_history = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1", "cpu:2"]):
        model = _build(steps)
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=(x, y))
    assert int(model.optimizer.iterations.numpy()) == int(reference.optimizer.iterations.numpy())
    for expected, actual in zip(reference.get_weights(), model.get_weights()):
        np.testing.assert_allclose(actual, expected, atol=1e-5)
    np.testing.assert_allclose(history.history["loss"], reference_history.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), reference.evaluate(x, y, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5)
    assert "val_loss" in history.history


def test_steps_per_execution_with_an_infinite_dataset():
    x, y = _data(64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        model = _build(5)
    model.fit(dataset, steps_per_epoch=10, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 20
