"""tfpar.data preprocessing: statistics equal numpy's; the layers transform and ship with the model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar.data as td
from tfpar.datasets import load_digits


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    values = rng.normal(loc=[100.0, -3.0, 0.5, 1e4], scale=[2.0, 10.0, 0.1, 5.0], size=(3000, 4))
    values[rng.random(values.shape) < 0.15] = np.nan
    return values


def _check(stats, values, median=True):
    np.testing.assert_allclose(stats.mean, np.nanmean(values, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, np.nanvar(values, axis=0), rtol=1e-9)
    np.testing.assert_array_equal(stats.count, np.sum(~np.isnan(values), axis=0))
    if median:
        np.testing.assert_array_equal(stats.median, np.nanmedian(values, axis=0))


def test_statistics_of_an_array_match_numpy(table):
    _check(td.compute_statistics(table, median=True), table)


def test_statistics_of_examples_batches_and_shards_match_numpy(table):
    examples = tf.data.Dataset.from_tensor_slices((table, np.arange(len(table))))
    batches = examples.batch(128)  # a final partial batch of 56
    shards = [td.shard(examples, 3, i) for i in range(3)]
    for data in (examples, batches, shards, [table[:1000], table[1000:]]):
        _check(td.compute_statistics(data, median=True), table)


def test_sentinel_missing_value_and_axis_none():
    values = np.array([[1.0, -1.0], [3.0, 5.0], [-1.0, 7.0]])
    stats = td.compute_statistics(values, missing_value=-1.0, median=True)
    np.testing.assert_array_equal(stats.mean, [2.0, 6.0])
    np.testing.assert_array_equal(stats.missing, [1, 1])
    whole = td.compute_statistics(values, axis=None)
    assert whole.mean.shape == () and float(whole.mean) == pytest.approx(values.mean())


def test_per_channel_statistics_of_images():
    images, _ = load_digits()
    rgb = np.concatenate([images, images * 2, images + 1], axis=-1).astype(np.float64)
    stats = td.compute_statistics(td.from_numpy(rgb).batch(100))
    np.testing.assert_allclose(stats.mean, rgb.reshape(-1, 3).mean(axis=0), rtol=1e-10)
    rows = td.compute_statistics(rgb, axis=-2)  # per column of the 8x8 image
    np.testing.assert_allclose(rows.mean, rgb.mean(axis=(0, 1, 3)), rtol=1e-10)


def test_standardization_and_centering_layers_transform_like_numpy(table):
    clean = np.nan_to_num(table, nan=0.0).astype("float32")
    mean, std = np.nanmean(table, axis=0), np.nanstd(table, axis=0)
    standardized = td.standardization(table)(clean).numpy()
    np.testing.assert_allclose(standardized, (clean - mean) / std, rtol=1e-4, atol=1e-4)
    centered = td.mean_centering(table)(clean).numpy()
    np.testing.assert_allclose(centered, clean - mean, rtol=1e-5, atol=1e-2)
    assert isinstance(td.standardization(table), keras.layers.Normalization)


@pytest.mark.parametrize("method", ["mean", "median"])
def test_imputation_fills_with_the_statistic(table, method):
    layer = td.imputation(td.from_numpy(table.astype("float32")), method=method)
    filled = layer(table.astype("float32")).numpy()
    reference = (np.nanmean if method == "mean" else np.nanmedian)(table.astype("float32"), axis=0)
    missing = np.isnan(table)
    assert not np.isnan(filled).any()
    np.testing.assert_allclose(filled[missing], np.broadcast_to(reference, table.shape)[missing], rtol=1e-5)
    np.testing.assert_array_equal(filled[~missing], table.astype("float32")[~missing])


def test_constant_imputation_with_a_sentinel_on_another_axis():
    layer = td.imputation(method="constant", fill_value=[0.0, 9.0], missing_value=-1.0, axis=-2)
    x = np.array([[[-1.0, 2.0], [-1.0, -1.0]]], dtype="float32")  # features on axis -2
    np.testing.assert_array_equal(layer(x).numpy(), [[[0.0, 2.0], [9.0, 9.0]]])


def test_preprocessing_ships_with_the_saved_model(tmp_path, table):
    inputs = keras.Input((4,))
    x = td.imputation(table, method="median")(inputs)
    x = td.standardization(table)(x)
    outputs = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    sample = table[:16].astype("float32")
    np.testing.assert_allclose(model.predict(sample, verbose=0), restored.predict(sample, verbose=0))
    assert not np.isnan(restored.predict(sample, verbose=0)).any()


def test_layers_work_inside_a_tf_data_map(table):
    layer = td.imputation(table)
    dataset = tf.data.Dataset.from_tensor_slices(table.astype("float32")).batch(64).map(layer)
    assert not any(np.isnan(b).any() for b in dataset.as_numpy_iterator())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: td.imputation(np.ones((2, 2)), method="mode"), ValueError, "method"),
        (lambda: td.imputation(method="constant"), ValueError, "needs fill_value"),
        (lambda: td.imputation(np.ones((2, 2)), fill_value=1.0), ValueError, "only applies"),
        (lambda: td.imputation(method="mean"), ValueError, "from `data`"),
        (lambda: td.standardization(np.array([[np.nan, 1.0]])), ValueError, r"feature\(s\) \[0\]"),
        (lambda: td.standardization(np.ones((2, 2)), axis=1), ValueError, r"`axis` to be a negative int .*Received: axis=1 \(of type int\)"),
        (lambda: td.standardization({"x": np.ones(2)}), TypeError, "not a dict"),
        (lambda: td.standardization(np.ones((0, 3))), ValueError, "non-empty"),
        (lambda: td.compute_statistics(np.ones(3), strategy="mirrored"), TypeError, "strategy"),
        (lambda: td.Imputation(fill_value=[1.0, float("nan")]), ValueError, "finite"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_imputation_layer_checks_the_feature_count():
    layer = td.Imputation(fill_value=[1.0, 2.0])
    with pytest.raises(ValueError, match="2 features"):
        layer(np.zeros((1, 3), "float32"))
