"""Data-parallel training reproduces single-device training, for every batch layout.

Each case shows the upstream failure (a plain tf.distribute.MirroredStrategy, which tfpar does not
touch) next to tfpar's result. See the exact-gradients interception (tfpar/_compat/exact_gradients.py).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.testing
from tfpar import _compat

ATOL = 1e-5


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 3, n)


def _build(*, batchnorm=False, clipnorm=None, optimizer="sgd", steps_per_execution=1, regularizer=None):
    keras.utils.set_random_seed(7)
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu", kernel_regularizer=regularizer)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(synchronized=True))
    layers.append(keras.layers.Dense(3))
    model = keras.Sequential(layers)
    opt = keras.optimizers.SGD(0.1, clipnorm=clipnorm) if optimizer == "sgd" else keras.optimizers.Adam(0.01, clipnorm=clipnorm)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))


def _fit(model, x, y, epochs=2):
    return model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)


def _upstream_strategy(devices):
    _compat.bump_collective_key_base()  # keep upstream's own strategy from clashing with ours
    strategy = tf.distribute.MirroredStrategy(devices)
    assert not _compat.is_managed(strategy)
    return strategy


CPUS4 = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


@pytest.mark.parametrize(
    ("n", "devices"),
    [
        (96, CPUS4),  # every batch splits evenly
        (98, CPUS4),  # last batch 2 -> replicas get 1/1/0/0
        (101, CPUS4),  # last batch 5 -> 2/2/1/0 (one empty replica)
        (97, ["cpu:0", "cpu:1"]),  # last batch 1 -> 1/0
        (99, ["cpu:0", "cpu:1", "cpu:2"]),  # 3 replicas, last batch 3
    ],
)
def test_numpy_fit_matches_single_device(n, devices):
    x, y = _data(n)
    reference = _build()
    reference_history = _fit(reference, x, y)
    with tfpar.scope("mirrored", devices=devices):
        model = _build()
    history = _fit(model, x, y)
    assert _max_diff(reference, model) <= ATOL
    np.testing.assert_allclose(history.history["loss"], reference_history.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history.history["accuracy"], reference_history.history["accuracy"], rtol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == int(reference.optimizer.iterations.numpy())


@pytest.mark.parametrize("n", [98, 101])
def test_upstream_mirrored_is_wrong_on_a_partial_last_batch(n):
    """The bug tfpar fixes: same data, plain MirroredStrategy, weights drift (and the loss hides it)."""
    x, y = _data(n)
    reference = _build()
    _fit(reference, x, y)
    with _upstream_strategy(CPUS4).scope():
        upstream = _build()
    _fit(upstream, x, y)
    drift = _max_diff(reference, upstream)
    tfpar.testing.skip_unless_reproduced(drift > 1e-3, f"MirroredStrategy's partial-batch scaling (drift {drift:.2g})")
    assert drift > 1e-3


def test_tf_data_input_matches_single_device():
    x, y = _data(101)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    reference = _build()
    reference.fit(dataset, epochs=2, verbose=0)
    with tfpar.scope("mirrored"):
        model = _build()
    model.fit(dataset, epochs=2, verbose=0)
    assert _max_diff(reference, model) <= ATOL
    np.testing.assert_allclose(model.evaluate(dataset, verbose=0), reference.evaluate(dataset, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(model.predict(dataset, verbose=0), reference.predict(dataset, verbose=0), atol=1e-5)


def test_sample_weights_regularizer_clipnorm_and_adam():
    x, y = _data(98)
    weights = np.linspace(0.1, 2.0, len(y)).astype("float32")
    kwargs = dict(optimizer="adam", clipnorm=0.05, regularizer=keras.regularizers.L2(1e-2))
    reference = _build(**kwargs)
    reference.fit(x, y, sample_weight=weights, batch_size=32, epochs=2, shuffle=False, verbose=0)
    with tfpar.scope("mirrored"):
        model = _build(**kwargs)
    model.fit(x, y, sample_weight=weights, batch_size=32, epochs=2, shuffle=False, verbose=0)
    # clipnorm acts on the global gradient, as on one device (upstream clips per-replica gradients).
    assert _max_diff(reference, model) <= ATOL


def test_synchronized_batchnorm_with_partial_batch():
    """Sync BN communicates in the forward pass: the per-replica loss weight goes on the loss."""
    x, y = _data(101)
    reference = _build(batchnorm=True, optimizer="adam")
    _fit(reference, x, y)
    with tfpar.scope("mirrored"):
        model = _build(batchnorm=True, optimizer="adam")
    _fit(model, x, y)
    assert _max_diff(reference, model) <= ATOL


def test_mixed_precision_loss_scale_optimizer_path():
    x, y = _data(98)
    with tfpar.scope("default", mixed_precision="mixed_float16"):
        reference = _build()
    _fit(reference, x, y)
    with tfpar.scope("mirrored", mixed_precision="mixed_float16"):
        model = _build()
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    _fit(model, x, y)
    # float16 arithmetic differs in summation order (even splits differ by ~1e-3 too);
    # upstream is off by ~8e-2 here.
    assert _max_diff(reference, model) <= 3e-3


def test_custom_train_step_without_keras_loss_keeps_upstream_semantics():
    """A train_step that computes its own loss (no compute_loss) is left as upstream sums it."""

    class Manual(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}

    def build():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((8,))
        model = Manual(inputs, keras.layers.Dense(1)(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        return model

    x, _ = _data(64)
    y = x.sum(axis=1, keepdims=True)
    with _upstream_strategy(["cpu:0", "cpu:1"]).scope():
        upstream = build()
    _fit(upstream, x, y, epochs=1)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        model = build()
    _fit(model, x, y, epochs=1)
    assert _max_diff(upstream, model) <= 1e-6


def _cnn(*, upstream_strategy=None):
    keras.utils.set_random_seed(3)
    model = tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=4, width=0.125, dropout=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return model


def test_cnn_with_empty_replicas_matches_single_device():
    """98 examples, batch 32, 4 replicas: the last batch (2) leaves two replicas empty. TF's
    oneDNN conv/max-pool kernels break on empty batches; tfpar routes them around (the empty-batches interception)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(98, 64, 64, 3)).astype("float32")
    y = rng.integers(0, 4, 98)
    reference = _cnn()
    reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    with tfpar.scope("mirrored"):
        model = _cnn()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert _max_diff(reference, model) <= ATOL
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=32, verbose=0), reference.evaluate(x, y, batch_size=32, verbose=0), rtol=1e-5)
    assert model.predict(x, batch_size=32, verbose=0).shape == (98, 4)
    assert model._tfpar_empty_guard and reference.get_layer("conv1").__dict__.get("_tfpar_empty_guard") is None


def test_cnn_empty_batch_guard_is_only_traced_in_when_needed():
    """The guard costs speed on CPU: no guard and no warning where every replica batch is full
    (96 examples split evenly, as arrays or a dataset; a dataset that repeats forever); a guard
    and a warning that says how to avoid it where the last batch can leave a replica empty (98
    examples: a last batch of 2 on 4 replicas) or tfpar cannot tell (a filter)."""
    import warnings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(98, 64, 64, 3)).astype("float32")
    y = rng.integers(0, 4, 98)

    def guarded_after(data, **kwargs):
        with tfpar.scope("mirrored"):
            model = _cnn()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(data, epochs=1, verbose=0, **kwargs)
        warned = any("drop_remainder=True" in str(w.message) for w in caught)
        guarded = bool(getattr(model, "_tfpar_empty_guard", False))
        assert warned == guarded
        return guarded

    even = tf.data.Dataset.from_tensor_slices((x[:96], y[:96]))
    assert not guarded_after(x[:96], y=y[:96], batch_size=32)
    assert not guarded_after(even.batch(32))
    assert not guarded_after(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(32), steps_per_epoch=3)
    assert guarded_after(tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    assert guarded_after(even.filter(lambda image, label: label >= 0).batch(32))


@pytest.mark.multiprocess
def test_upstream_cnn_crashes_on_empty_replicas():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numpy as np, keras, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpu[0], [tf.config.LogicalDeviceConfiguration()] * 4)
        with tf.distribute.MirroredStrategy().scope():
            model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3),
                                      keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(2)])
            model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        model.fit(np.ones((34, 16, 16, 3), "float32"), np.zeros(34), batch_size=32, verbose=0)
        print("UPSTREAM-WORKED")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    # The crash comes from a oneDNN kernel and does not happen on every CPU (seen: not on an AVX2-only
    # AMD EPYC); tfpar's guard is tested everywhere by the tests above.
    tfpar.testing.skip_unless_reproduced(
        "UPSTREAM-WORKED" not in result.stdout, "a CNN crashes on a replica with an empty batch"
    )
    assert result.returncode != 0, result.stderr[-2000:]


def test_float64_models_train_exactly():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(37, 8)), rng.normal(size=(37, 1))

        def build():
            keras.utils.set_random_seed(2)
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            return model

        reference = build()
        reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
            model = build()
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        assert model.layers[0].kernel.dtype == "float64"
        # Keras computes the compiled loss in float32 even for float64 models (CompileLoss dtype).
        assert _max_diff(reference, model) <= 1e-8
    finally:
        keras.config.set_dtype_policy(previous)
