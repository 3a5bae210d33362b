"""BatchNormalization under data parallelism: tfpar.scope(sync_batchnorm=True) and the warning."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import tfpar


def _model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(momentum=0.0), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _halves():
    # The two replicas get batches from very different distributions (as with unshuffled data).
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (8, 4)), rng.normal(5, 3, (8, 4))]).astype("float32")
    return x, rng.normal(size=(16, 1)).astype("float32")


def _moving_stats(model):
    layer = model.layers[0]
    return np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()])


def test_sync_batchnorm_scope_option_matches_single_device():
    x, y = _halves()
    reference = _model()
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"], sync_batchnorm=True):
        synced = _model()
    assert synced.layers[0].synchronized
    synced.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(_moving_stats(synced), _moving_stats(reference), atol=1e-5)
    for expected, actual in zip(reference.get_weights(), synced.get_weights()):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_unsynchronized_batchnorm_depends_on_replicas_and_warns_once():
    x, y = _halves()
    reference = _model()
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        plain = _model()
    assert not plain.layers[0].synchronized
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    messages = [str(w.message) for w in caught if "unsynchronized BatchNormalization" in str(w.message)]
    assert len(messages) == 1
    assert "2 replicas" in messages[0] and "sync_batchnorm=True" in messages[0]
    assert np.abs(_moving_stats(plain)[:4] - _moving_stats(reference)[:4]).max() > 1.0


def test_sync_batchnorm_applies_only_inside_the_scope():
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"], sync_batchnorm=True):
        inside = keras.layers.BatchNormalization()
        explicit = keras.layers.BatchNormalization(synchronized=False)
    outside = keras.layers.BatchNormalization()
    assert inside.synchronized and not explicit.synchronized and not outside.synchronized
    assert inside.get_config()["synchronized"] is True


def test_sync_batchnorm_must_be_bool():
    with pytest.raises(TypeError, match="sync_batchnorm to be a bool"), tfpar.scope("mirrored", sync_batchnorm="yes"):
        pass


def test_no_warning_on_one_replica():
    x, y = _halves()
    with tfpar.scope("one_device"):
        model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not [w for w in caught if "BatchNormalization" in str(w.message)]
