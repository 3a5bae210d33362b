"""tfpar.models.alexnet and LocalResponseNormalization: the paper's layout, variants, options, errors."""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.models

# Krizhevsky et al. 2012, one tower: (in channels, out channels, kernel) per convolution.
PAPER_CONVS = [(3, 96, 11), (96, 256, 5), (256, 384, 3), (384, 384, 3), (384, 256, 3)]
PAPER_FEATURE_SIDE = 6  # 227 -> conv1 55 -> pool 27 -> pool 13 -> pool 6


def paper_params(num_classes=1000, batch_norm=False):
    convs = sum(k * k * cin * cout + cout for cin, cout, k in PAPER_CONVS)
    bn = 4 * sum(cout for _, cout, _ in PAPER_CONVS) if batch_norm else 0
    flat = PAPER_FEATURE_SIDE * PAPER_FEATURE_SIDE * 256
    dense = flat * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * num_classes + num_classes
    return convs + bn + dense


@pytest.fixture
def free_memory():
    """Releases the full-size models (about 0.25 GB each) as soon as the test ends."""
    yield
    keras.backend.clear_session()
    gc.collect()


def test_lrn_variant_has_the_papers_parameter_count_and_sizes(free_memory):
    model = tfpar.models.alexnet(normalization="lrn")
    assert model.count_params() == paper_params() == 62_378_344
    sides = {name: model.get_layer(name).output.shape[1:] for name in
             ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")}
    assert sides == {
        "conv1": (55, 55, 96), "pool1": (27, 27, 96), "conv2": (27, 27, 256), "pool2": (13, 13, 256),
        "conv3": (13, 13, 384), "conv4": (13, 13, 384), "conv5": (13, 13, 256), "pool5": (6, 6, 256),
    }  # fmt: skip
    assert [layer.name for layer in model.layers] == [
        "input",
        "conv1", "lrn1", "pool1",
        "conv2", "lrn2", "pool2",
        "conv3", "conv4", "conv5", "pool5",
        "flatten", "fc1", "dropout1", "fc2", "dropout2", "predictions",
    ]  # fmt: skip
    lrn = model.get_layer("lrn1")
    assert (lrn.depth_radius, lrn.bias, lrn.alpha, lrn.beta) == (2, 2.0, 1e-4, 0.75)
    assert model.get_layer("conv1").get_config()["activation"] == "relu"
    assert model.get_layer("pool1").get_config()["pool_size"] == (3, 3)
    assert model.get_layer("pool1").get_config()["strides"] == (2, 2)
    assert model.get_layer("conv1").get_config()["strides"] == (4, 4)
    assert model.get_layer("dropout1").rate == model.get_layer("dropout2").rate == 0.5


def test_default_is_batchnorm_after_every_convolution(free_memory):
    model = tfpar.models.alexnet()
    assert model.name == "alexnet"
    assert model.input.shape == (None, 227, 227, 3) and model.output.shape == (None, 1000)
    assert model.count_params() == paper_params(batch_norm=True) == 62_383_848
    names = [layer.name for layer in model.layers]
    assert names == [
        "input",
        "conv1", "bn1", "relu1", "pool1",
        "conv2", "bn2", "relu2", "pool2",
        "conv3", "bn3", "relu3",
        "conv4", "bn4", "relu4",
        "conv5", "bn5", "relu5", "pool5",
        "flatten", "fc1", "dropout1", "fc2", "dropout2", "predictions",
    ]  # fmt: skip
    batchnorms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.synchronized for layer in batchnorms] == [True] * 5
    assert model.get_layer("conv1").get_config()["activation"] == "linear"


def test_224_input_also_gives_the_papers_6x6_features():
    model = tfpar.models.alexnet((224, 224, 3), 10, normalization=None, width=0.125)
    assert model.get_layer("pool5").output.shape == (None, 6, 6, 32)
    assert model.get_layer("pool1_pad").output.shape == (None, 55, 55, 12)


def test_no_normalization():
    model = tfpar.models.alexnet((64, 64, 3), 10, normalization=None, width=0.125, dropout=0)
    assert [layer.name for layer in model.layers] == [
        "input", "conv1", "pool1_pad", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5",
        "flatten", "fc1", "fc2", "predictions",
    ]  # fmt: skip


def test_sync_batchnorm_off():
    model = tfpar.models.alexnet((64, 64, 3), 10, width=0.125, sync_batchnorm=False)
    batchnorms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.synchronized for layer in batchnorms] == [False] * 5


def ceil_mode_max_pool(x, size=3, stride=2):
    """Reference 3x3/2 max-pool that rounds up (windows may run past the end), in numpy."""
    batch, height, width, channels = x.shape
    out_h = -(-(height - size) // stride) + 1
    out_w = -(-(width - size) // stride) + 1
    out = np.empty((batch, out_h, out_w, channels), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, i * stride : i * stride + size, j * stride : j * stride + size]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("normalization", ["batchnorm", "lrn", None])
def test_64x64_works_with_ceil_mode_pooling(normalization):
    model = tfpar.models.alexnet((64, 64, 3), 10, normalization=normalization, width=0.125)
    sides = [model.get_layer(n).output.shape[1] for n in ("conv1", "pool1", "pool2", "pool5")]
    assert sides == [14, 7, 3, 1]
    before = "relu1" if normalization == "batchnorm" else ("lrn1" if normalization else "conv1")
    probe = keras.Model(model.input, [model.get_layer(before).output, model.get_layer("pool1").output])
    features, pooled = probe(np.random.randn(2, 64, 64, 3).astype("float32"), training=True)
    features = np.asarray(features)
    assert features.min() >= 0  # what makes the zero pad exact
    np.testing.assert_allclose(np.asarray(pooled), ceil_mode_max_pool(features), rtol=1e-6)
    assert model.predict(np.random.rand(3, 64, 64, 3).astype("float32"), verbose=0).shape == (3, 10)


def test_minimum_input_is_55_and_non_square_inputs():
    assert tfpar.models.alexnet((55, 55, 1), 3, width=0.125).output.shape == (None, 3)
    wide = tfpar.models.alexnet((55, 300, 3), 3, width=0.125, include_top=False)
    assert wide.output.shape == (None, 1, 9, 32)  # width: 300 -> conv1 73 -> 36 -> 18 -> 9
    with pytest.raises(ValueError, match=r"alexnet needs an input of at least 55x55 pixels "
                       r"\(its stride-4 11x11 conv1 and three 3x3/2 max-pools\)\. "
                       r"Received: input_shape=\(300, 54, 3\)\. Use an input of at least \(55, 55, 3\)"):
        tfpar.models.alexnet((300, 54, 3))
    with pytest.raises(ValueError, match=r"channels-first.*pass input_shape=\(227, 227, 3\)"):
        tfpar.models.alexnet((3, 227, 227))


def test_width_scales_every_layer():
    model = tfpar.models.alexnet((64, 64, 3), 10, width=0.125)
    assert [model.get_layer(f"conv{i}").filters for i in range(1, 6)] == [12, 32, 48, 48, 32]
    assert model.get_layer("fc1").units == model.get_layer("fc2").units == 512
    assert model.get_layer("predictions").units == 10


def test_include_top_false_and_pooling():
    features = tfpar.models.alexnet((100, 100, 3), width=0.25, include_top=False)
    assert features.output.shape == (None, 2, 2, 64) and features.layers[-1].name == "pool5"
    avg = tfpar.models.alexnet((100, 100, 3), width=0.25, include_top=False, pooling="avg")
    assert avg.output.shape == (None, 64) and avg.layers[-1].name == "avg_pool"
    peak = tfpar.models.alexnet((100, 100, 3), width=0.25, include_top=False, pooling="max")
    assert peak.output.shape == (None, 64) and peak.layers[-1].name == "max_pool"


def test_classifier_activation_and_name():
    model = tfpar.models.alexnet((64, 64, 3), 4, classifier_activation=None, width=0.125, name="tiny")
    assert model.name == "tiny"
    assert model.get_layer("predictions").get_config()["activation"] == "linear"
    out = model.predict(np.random.rand(2, 64, 64, 3).astype("float32"), verbose=0)
    assert not np.allclose(out.sum(axis=1), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"normalization": "lrm"}, ValueError, r"`normalization` to be one of \['batchnorm', 'lrn', None\] .*Received: normalization='lrm'"),
        ({"normalization": "bn"}, ValueError, r"Received: normalization='bn'"),
        ({"num_classes": -1}, ValueError, r"alexnet: expected `num_classes` to be >= 1 .*Received: num_classes=-1"),
        ({"width": 0.0}, ValueError, r"alexnet: expected `width` > 0 .*Received: width=0\.0"),
        ({"dropout": 1}, ValueError, r"alexnet: expected `dropout` in \[0, 1\).*Received: dropout=1"),
        ({"pooling": "max"}, ValueError, r"alexnet: `pooling` applies only .*Received: include_top=True, pooling='max'"),
        ({"pooling": "sum", "include_top": False}, ValueError, r"Received: pooling='sum'"),
        ({"sync_batchnorm": "yes"}, TypeError, r"Received: sync_batchnorm='yes' \(of type str\)"),
        ({"input_shape": [64, 64, 3, 1]}, ValueError, r"Received: input_shape=\(64, 64, 3, 1\)"),
        ({"input_shape": "64x64"}, TypeError, r"Received: input_shape='64x64' \(of type str\)"),
        ({"classifier_activation": "nope"}, ValueError, r"Received: classifier_activation='nope'"),
    ],
)
def test_invalid_options_raise_before_building(kwargs, error, message, monkeypatch):
    options = {"input_shape": (64, 64, 3), "num_classes": 10, "width": 0.125}
    options.update(kwargs)

    def built(*args, **kwargs):
        raise AssertionError("a layer was built before the options were validated")

    for attribute in ("Input", "layers.Conv2D", "layers.Dense"):
        monkeypatch.setattr(f"keras.{attribute}", built)
    with pytest.raises(error, match=message):
        tfpar.models.alexnet(**options)


# === LocalResponseNormalization ===


def reference_lrn(a, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75):
    """The paper's formula, section 3.3, written out in numpy."""
    out = np.empty_like(a)
    channels = a.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - depth_radius), min(channels - 1, c + depth_radius)
        squares = (a[..., lo : hi + 1] ** 2).sum(axis=-1)
        out[..., c] = a[..., c] / (bias + alpha * squares) ** beta
    return out


def test_lrn_matches_the_papers_formula():
    x = (np.random.RandomState(0).rand(2, 3, 3, 11) * 60).astype("float32")
    layer = tfpar.models.LocalResponseNormalization()
    np.testing.assert_allclose(np.asarray(layer(x)), reference_lrn(x), rtol=1e-5)
    custom = tfpar.models.LocalResponseNormalization(depth_radius=1, bias=1.0, alpha=1e-3, beta=0.5)
    np.testing.assert_allclose(
        np.asarray(custom(x)), reference_lrn(x, 1, 1.0, 1e-3, 0.5), rtol=1e-5
    )


def test_lrn_keeps_16_bit_dtypes():
    x = np.random.rand(1, 2, 2, 6).astype("float16")
    layer = tfpar.models.LocalResponseNormalization(dtype="mixed_float16")
    out = layer(x)
    assert out.dtype == "float16"
    np.testing.assert_allclose(np.asarray(out, "float32"), reference_lrn(x.astype("float32")), rtol=2e-3)
    bf16 = tfpar.models.LocalResponseNormalization(dtype="mixed_bfloat16")
    assert bf16(x.astype("float32")).dtype == "bfloat16"


def test_lrn_model_saves_and_loads(tmp_path):
    model = tfpar.models.alexnet((64, 64, 3), 5, normalization="lrn", width=0.125)
    path = tmp_path / "alexnet.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.get_layer("lrn2"), tfpar.models.LocalResponseNormalization)
    x = np.random.rand(2, 64, 64, 3).astype("float32")
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"depth_radius": 1.5}, TypeError, r"`depth_radius` to be an int >= 0\. Received: depth_radius=1\.5 \(of type float\)"),
        ({"depth_radius": -1}, ValueError, r"depth_radius >= 0 and finite bias > 0.*Received: depth_radius=-1"),
        ({"bias": 0}, ValueError, r"Received: depth_radius=2, bias=0,"),
        ({"alpha": -1e-4}, ValueError, r"alpha=-0\.0001"),
        ({"bias": float("nan")}, ValueError, r"finite bias.*Received: depth_radius=2, bias=nan,"),
        ({"alpha": float("inf")}, ValueError, r"alpha=inf"),
        ({"beta": float("-inf")}, ValueError, r"beta=-inf"),
        ({"beta": "0.75"}, TypeError, r"`beta` to be a number\. Received: beta='0\.75' \(of type str\)"),
    ],
)
def test_lrn_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        tfpar.models.LocalResponseNormalization(**kwargs)


# === Data-parallel training (tfpar.scope) ===


@pytest.mark.parametrize("normalization", ["batchnorm", "lrn"])
def test_tiny_alexnet_fits_under_mirrored_on_two_cpus(normalization):
    rng = np.random.RandomState(0)
    x = rng.rand(32, 64, 64, 3).astype("float32")
    y = rng.randint(0, 10, 32)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]) as strategy:
        model = tfpar.models.alexnet((64, 64, 3), 10, normalization=normalization, width=0.125)
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    assert strategy.num_replicas_in_sync == 2
    assert isinstance(model.get_layer("conv1").kernel.value, tf.distribute.DistributedValues)
    batchnorms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.synchronized for layer in batchnorms] == ([True] * 5 if normalization == "batchnorm" else [])
    before = model.get_layer("conv2").kernel.numpy().copy()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(model.get_layer("conv2").kernel.numpy(), before)
