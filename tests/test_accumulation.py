"""Gradient accumulation under tfpar: Keras's ``gradient_accumulation_steps=k`` all-reduces once per k
steps and equals one step on the k-times larger batch (tfpar/_compat/accumulation.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 3, n)


def _model(steps=None, momentum=0.0):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=momentum, gradient_accumulation_steps=steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize("n", [32, 30])  # 30: steps of 8, 8, 8 and 6 examples
def test_k_steps_equal_one_step_on_the_k_times_larger_batch(virtual_devices, n):
    x, y = _data(n)
    reference = _model()
    reference.fit(x, y, batch_size=n, epochs=2, shuffle=False, verbose=0)  # 2 updates on all n
    with tfpar.scope("mirrored", devices=virtual_devices[:2]):
        model = _model(steps=4, momentum=0.0)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # 8 steps, 2 updates
    assert int(model.optimizer.iterations.numpy()) == 2
    assert _max_diff(model, reference) <= 1e-6


def test_all_reduces_once_per_k_steps(virtual_devices, monkeypatch):
    """Counts the all-reduces that run (a counter incremented next to each one executed)."""
    counts = {}

    def run(steps):
        with tfpar.scope("mirrored", devices=virtual_devices[:2]) as strategy:
            model = _model(steps=steps)
            counter = tf.Variable(0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                                  aggregation=tf.VariableAggregation.SUM)
        upstream = tf.distribute.ReplicaContext.all_reduce

        def counted(self, reduce_op, value, options=None):
            counter.assign_add(1.0)
            return upstream(self, reduce_op, value, options)

        monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", counted)
        try:
            x, y = _data(64)
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        finally:
            monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", upstream)
        counts[steps] = float(strategy.reduce("SUM", counter, axis=None))

    run(None)
    run(4)
    # 8 steps on 2 replicas: 8 gradient all-reduces without accumulation, 2 with k=4.
    assert counts[None] == 2 * 8
    assert counts[4] == 2 * 2


def test_upstream_keras_accumulation_fails_under_mirrored(virtual_devices):
    """Keras 3 puts the all-reduce inside a tf.cond; MirroredStrategy's all-reduce is a merge_call."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices[:2])
    with strategy.scope():
        model = _model(steps=4)
    x, y = _data(32)
    try:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    except RuntimeError as error:
        assert "Cond" in str(error) or "merge_call" in str(error)
        return
    import tfpar.testing

    tfpar.testing.skip_unless_reproduced(False, "Keras gradient_accumulation_steps under MirroredStrategy")
