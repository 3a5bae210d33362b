"""Custom training loops (strategy.run inside a tf.function) under tfpar strategies.

The loop is TensorFlow's custom-training tutorial's: optimizer and loss made in the scope, the
model and optimizer built lazily at the first step. Upstream, that first step fails with "You must
feed a value for placeholder tensor 'cond/else/_1/cond/Placeholder'" (keras-team/keras#19246);
tfpar builds them outside the traced step (the optimizer-build interception). And
``tfpar.training.compute_average_loss`` is exact on a partial last batch, where
``tf.nn.compute_average_loss(global_batch_size=...)`` is not.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.testing

GLOBAL_BATCH = 8


def _data(n=21, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 3, n)


def _model(kind: str) -> keras.Model:
    if kind == "sequential":
        return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])
    if kind == "dense":
        return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(8, activation="relu"),
                                 keras.layers.Dense(3)])
    if kind == "unbuilt":  # no Input: built at the first call, inside the traced replica step
        return keras.Sequential([keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                                 keras.layers.Dense(3)])

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, activation="relu")
            self.flatten = keras.layers.Flatten()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(self.flatten(self.conv(x)))

    return Subclassed()


def _custom_loop(strategy, kind="sequential", *, build_first=False, exact_loss=False, epochs=2, float64=False):
    """The tutorial's loop; returns the weights after `epochs` and the per-epoch mean losses."""
    x, y = _data()
    if float64:
        x = x.astype("float64")
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH))
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = _model(kind)
        loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)  # slot variables, as Adam has
        if build_first:  # the workaround the issue names
            model(tf.zeros((1, 6, 6, 1)))  # builds every kind of model
            optimizer.build(model.trainable_variables)

    def compute_loss(labels, predictions):
        per_example_loss = loss_object(labels, predictions)
        if exact_loss:
            return tfpar.training.compute_average_loss(per_example_loss)
        return tf.nn.compute_average_loss(per_example_loss, global_batch_size=GLOBAL_BATCH)

    def train_step(inputs):
        images, labels = inputs
        with tf.GradientTape() as tape:
            loss = compute_loss(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def distributed_train_step(inputs):
        per_replica_losses = strategy.run(train_step, args=(inputs,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_losses, axis=None)

    losses = []
    for _ in range(epochs):
        total, batches = 0.0, 0
        for batch in dataset:
            total += float(distributed_train_step(batch))
            batches += 1
        losses.append(total / batches)
    return [np.asarray(w) for w in model.get_weights()], losses


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["sequential", "unbuilt", "subclassed"])
def test_tutorial_custom_loop_trains_without_building_first(virtual_devices, kind):
    """Same weights as the upstream workaround (model.build + optimizer.build before the loop)."""
    strategy = tfpar.get_strategy("mirrored", devices=virtual_devices[:2])
    weights, losses = _custom_loop(strategy, kind)
    workaround, workaround_losses = _custom_loop(strategy, kind, build_first=True)
    assert _max_diff(weights, workaround) <= 1e-6
    np.testing.assert_allclose(losses, workaround_losses, rtol=1e-6)
    assert losses[1] < losses[0]


def test_upstream_custom_loop_fails_at_the_first_step(virtual_devices):
    strategy = tf.distribute.MirroredStrategy(virtual_devices[:2])
    try:
        _custom_loop(strategy, epochs=1)
    except tf.errors.InvalidArgumentError as error:
        assert "You must feed a value for placeholder tensor" in str(error)
        return
    tfpar.testing.skip_unless_reproduced(False, "custom loop under MirroredStrategy (keras-team/keras#19246)")


def test_compute_average_loss_is_exact_on_a_partial_last_batch(virtual_devices):
    """21 examples, global batch 8, 4 replicas: the last batch (5) splits 2/2/1/0."""
    one_device = tf.distribute.get_strategy()
    single_weights, _ = _custom_loop(one_device, "dense", exact_loss=True)
    keras.backend.set_floatx("float64")
    try:
        reference, _ = _custom_loop(one_device, "dense", exact_loss=True, float64=True)
    finally:
        keras.backend.set_floatx("float32")
    strategy = tfpar.get_strategy("mirrored", devices=virtual_devices[:4])
    exact, _ = _custom_loop(strategy, "dense", exact_loss=True)
    tfpar.testing.assert_within_float32_noise(exact, single_weights, reference)
    # TensorFlow's helper divides the last batch's 5 examples by 8: a different model.
    tutorial, _ = _custom_loop(strategy, "dense")
    assert _max_diff(tutorial, single_weights) > 100 * _max_diff(exact, single_weights) + 1e-4


def test_compute_average_loss_checks_its_input():
    with pytest.raises(ValueError, match="Received: a scalar per_example_loss"):
        tfpar.training.compute_average_loss(tf.constant(1.0))
    # Outside a strategy it is the plain mean, with weights divided by the example count.
    value = tfpar.training.compute_average_loss([1.0, 2.0, 3.0], sample_weight=[1.0, 0.0, 1.0])
    assert float(value) == pytest.approx(4.0 / 3.0)
