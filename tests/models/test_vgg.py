"""tfpar.models.vgg / vgg11 / vgg13 / vgg16 / vgg19: parameter counts, names, shapes, options, errors."""

from __future__ import annotations

import contextlib
import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.models

# The paper's configurations A, B, D, E (convolutions per block) and the filters of each block.
PAPER_BLOCKS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
PAPER_FILTERS = (64, 128, 256, 512, 512)
# Published parameter counts (torchvision's documentation; 138,357,544 is also keras' VGG16).
PUBLISHED = {11: 132_863_336, 13: 133_047_848, 16: 138_357_544, 19: 143_667_240}
BUILDERS = {11: tfpar.models.vgg11, 13: tfpar.models.vgg13, 16: tfpar.models.vgg16, 19: tfpar.models.vgg19}


def expected_params(depth, *, size=224, num_classes=1000, width=1.0, batch_norm=False):
    """Counts VGG parameters by hand: 3x3 convs with biases, 4 per channel for BN, 3 dense layers."""
    scale = lambda units: max(1, round(units * width))  # noqa: E731
    total, channels = 0, 3
    for convs, filters in zip(PAPER_BLOCKS[depth], PAPER_FILTERS):
        for _ in range(convs):
            total += 3 * 3 * channels * scale(filters) + scale(filters)
            total += 4 * scale(filters) if batch_norm else 0
            channels = scale(filters)
    side = size // 32
    fc = scale(4096)
    total += side * side * channels * fc + fc + fc * fc + fc + fc * num_classes + num_classes
    return total


@pytest.fixture
def free_memory():
    """Releases the full-size models (about 0.5 GB each) as soon as the test ends."""
    yield
    keras.backend.clear_session()
    gc.collect()


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_full_size_parameter_count_is_the_papers(depth, free_memory):
    model = BUILDERS[depth]()
    assert model.count_params() == expected_params(depth) == PUBLISHED[depth]
    assert model.name == f"vgg{depth}"
    assert model.output.shape == (None, 1000)
    del model


def test_vgg16_matches_keras_applications_layer_by_layer(free_memory):
    ours = tfpar.models.vgg16()
    reference = keras.applications.VGG16(weights=None)
    assert ours.count_params() == reference.count_params() == 138_357_544
    reference_layers = [layer for layer in reference.layers[1:]]
    our_layers = [layer for layer in ours.layers[1:] if not layer.name.startswith("dropout")]
    assert [layer.name for layer in our_layers] == [layer.name for layer in reference_layers]
    for mine, theirs in zip(our_layers, reference_layers):
        assert type(mine) is type(theirs)
        assert [w.shape for w in mine.weights] == [w.shape for w in theirs.weights], mine.name
    del ours, reference


def test_depth_argument_equals_named_builder():
    a = tfpar.models.vgg(13, (32, 32, 3), 10, width=0.125)
    b = tfpar.models.vgg13((32, 32, 3), 10, width=0.125)
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    assert a.count_params() == b.count_params() == expected_params(13, size=32, num_classes=10, width=0.125)


@pytest.mark.parametrize("depth", [11, 16])
def test_batch_norm_adds_four_parameters_per_channel(depth):
    model = tfpar.models.vgg(depth, (32, 32, 3), 10, batch_norm=True, width=0.25)
    assert model.count_params() == expected_params(
        depth, size=32, num_classes=10, width=0.25, batch_norm=True
    )
    assert model.name == f"vgg{depth}_bn"
    batchnorms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batchnorms) == sum(PAPER_BLOCKS[depth])
    # The trainable count of the BN layout, checked at full width against torchvision's vgg16_bn.
    if depth == 16:
        gamma_beta = 2 * sum(n * f for n, f in zip(PAPER_BLOCKS[16], PAPER_FILTERS))
        assert PUBLISHED[16] + gamma_beta == 138_365_992


def test_layer_names_without_batch_norm():
    model = tfpar.models.vgg11((32, 32, 3), 10, width=0.125)
    assert [layer.name for layer in model.layers] == [
        "input",
        "block1_conv1", "block1_pool",
        "block2_conv1", "block2_pool",
        "block3_conv1", "block3_conv2", "block3_pool",
        "block4_conv1", "block4_conv2", "block4_pool",
        "block5_conv1", "block5_conv2", "block5_pool",
        "flatten", "fc1", "dropout1", "fc2", "dropout2", "predictions",
    ]  # fmt: skip
    assert model.get_layer("block1_conv1").get_config()["activation"] == "relu"


def test_layer_names_with_batch_norm_put_relu_after_bn():
    model = tfpar.models.vgg13((32, 32, 3), 10, batch_norm=True, width=0.125, dropout=0)
    names = [layer.name for layer in model.layers]
    assert names[:9] == [
        "input",
        "block1_conv1", "block1_bn1", "block1_relu1",
        "block1_conv2", "block1_bn2", "block1_relu2",
        "block1_pool", "block2_conv1",
    ]  # fmt: skip
    assert names[-4:] == ["flatten", "fc1", "fc2", "predictions"]
    assert model.get_layer("block1_conv1").get_config()["activation"] == "linear"
    assert model.get_layer("block5_relu2").get_config()["activation"] == "relu"


def test_sync_batchnorm_default_and_off():
    synced = tfpar.models.vgg11((32, 32, 3), 10, batch_norm=True, width=0.125)
    local = tfpar.models.vgg11((32, 32, 3), 10, batch_norm=True, width=0.125, sync_batchnorm=False)
    bn = keras.layers.BatchNormalization
    assert [layer.synchronized for layer in synced.layers if isinstance(layer, bn)] == [True] * 8
    assert [layer.synchronized for layer in local.layers if isinstance(layer, bn)] == [False] * 8


def test_width_scales_channels_and_fc_units():
    model = tfpar.models.vgg16((32, 32, 3), 10, width=0.125)
    assert model.get_layer("block1_conv1").filters == 8
    assert model.get_layer("block5_conv3").filters == 64
    assert model.get_layer("fc1").units == 512
    assert model.get_layer("predictions").units == 10  # the classes are not scaled


@pytest.mark.parametrize("size", [32, 33, 63, 64])
def test_small_inputs_output_shape(size):
    model = tfpar.models.vgg11((size, size, 1), 7, width=0.125)
    assert model.get_layer("block5_pool").output.shape == (None, size // 32, size // 32, 64)
    assert model.output.shape == (None, 7)
    out = model.predict(np.random.rand(2, size, size, 1).astype("float32"), verbose=0)
    assert out.shape == (2, 7)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_input_smaller_than_32_raises_with_minimum():
    with pytest.raises(ValueError, match=r"vgg11 needs an input of at least 32x32 pixels .*"
                       r"Received: input_shape=\(31, 64, 3\)"):
        tfpar.models.vgg11((31, 64, 3))


def test_channels_first_shape_gets_a_hint():
    with pytest.raises(ValueError, match=r"channels-first.*pass input_shape=\(224, 224, 3\)"):
        tfpar.models.vgg16((3, 224, 224))


def test_include_top_false_and_pooling():
    features = tfpar.models.vgg16((64, 96, 3), include_top=False, width=0.125)
    assert features.output.shape == (None, 2, 3, 64)
    assert features.layers[-1].name == "block5_pool"
    assert not {"flatten", "fc1", "predictions"} & {layer.name for layer in features.layers}
    avg = tfpar.models.vgg16((64, 64, 3), include_top=False, pooling="avg", width=0.125)
    assert avg.output.shape == (None, 64) and avg.layers[-1].name == "avg_pool"
    peak = tfpar.models.vgg16((64, 64, 3), include_top=False, pooling="max", width=0.125)
    assert peak.output.shape == (None, 64) and peak.layers[-1].name == "max_pool"
    x = np.random.rand(2, 64, 64, 3).astype("float32")
    np.testing.assert_allclose(peak(x), np.max(keras.Model(peak.input, peak.get_layer("block5_pool").output)(x), axis=(1, 2)), rtol=1e-6)


def test_classifier_activation_none_gives_logits_and_callable_is_used():
    x = np.random.rand(4, 32, 32, 3).astype("float32")
    logits = tfpar.models.vgg11((32, 32, 3), 5, classifier_activation=None, width=0.125, dropout=0)
    assert logits.get_layer("predictions").get_config()["activation"] == "linear"
    sigmoid = tfpar.models.vgg11((32, 32, 3), 5, classifier_activation=keras.activations.sigmoid, width=0.125)
    out = sigmoid.predict(x, verbose=0)
    assert ((out > 0) & (out < 1)).all() and not np.allclose(out.sum(axis=1), 1.0)


def test_dropout_rate_and_zero():
    model = tfpar.models.vgg11((32, 32, 3), 10, width=0.125, dropout=0.3)
    assert model.get_layer("dropout1").rate == model.get_layer("dropout2").rate == 0.3
    plain = tfpar.models.vgg11((32, 32, 3), 10, width=0.125, dropout=0.0)
    assert not [layer for layer in plain.layers if isinstance(layer, keras.layers.Dropout)]


def test_custom_name():
    assert tfpar.models.vgg19((32, 32, 3), width=0.125, name="tiny_vgg").name == "tiny_vgg"


def test_channels_last_even_when_keras_is_configured_channels_first():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = tfpar.models.vgg11((32, 48, 3), 10, width=0.125, include_top=False)
    finally:
        keras.config.set_image_data_format(previous)
    assert model.output.shape == (None, 1, 1, 64)


def test_mixed_precision_keeps_predictions_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = tfpar.models.vgg11((32, 32, 3), 10, width=0.125)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("fc1").compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    plain = tfpar.models.vgg11((32, 32, 3), 10, width=0.125)
    assert plain.get_layer("predictions").compute_dtype == "float32"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"depth": 17}, ValueError, r"Expected one of \[11, 13, 16, 19\]\. Received: depth=17"),
        ({"depth": "16"}, TypeError, r"`depth` to be an int, one of \[11, 13, 16, 19\]\. Received: depth='16' \(of type str\)"),
        ({"depth": True}, TypeError, r"Received: depth=True \(of type bool\)"),
        ({"num_classes": 0}, ValueError, r"`num_classes` to be >= 1 .*Received: num_classes=0"),
        ({"num_classes": 2.0}, TypeError, r"`num_classes` to be an int >= 1\. Received: num_classes=2\.0 \(of type float\)"),
        ({"width": 0}, ValueError, r"`width` > 0 .*Received: width=0"),
        ({"width": -0.5}, ValueError, r"Received: width=-0\.5"),
        ({"width": float("inf")}, ValueError, r"Received: width=inf"),
        ({"width": "half"}, TypeError, r"`width` to be a positive number .*Received: width='half' \(of type str\)"),
        ({"pooling": "mean"}, ValueError, r"`pooling` to be one of \[None, 'avg', 'max'\]\. Received: pooling='mean'"),
        ({"pooling": "avg"}, ValueError, r"pass include_top=False .*Received: include_top=True, pooling='avg'"),
        ({"include_top": "no"}, TypeError, r"`include_top` to be True or False\. Received: include_top='no'"),
        ({"dropout": 1.0}, ValueError, r"`dropout` in \[0, 1\); use 0 for no dropout\. Received: dropout=1\.0"),
        ({"dropout": -0.1}, ValueError, r"Received: dropout=-0\.1"),
        ({"dropout": None}, TypeError, r"`dropout` to be a rate .*Received: dropout=None \(of type NoneType\)"),
        ({"classifier_activation": "softmaxx"}, ValueError, r"unknown `classifier_activation`.*Received: classifier_activation='softmaxx'"),
        ({"classifier_activation": 3}, TypeError, r"Received: classifier_activation=3 \(of type int\)"),
        ({"input_shape": 32}, TypeError, r"`input_shape` to be a tuple .*Received: input_shape=32 \(of type int\)"),
        ({"input_shape": (32, 32)}, ValueError, r"three integers \(height, width, channels\).*Received: input_shape=\(32, 32\)"),
        ({"input_shape": (None, None, 3)}, ValueError, r"static image size\. Received: input_shape=\(None, None, 3\)"),
        ({"input_shape": (32, 32, 0)}, ValueError, r"positive .*Received: input_shape=\(32, 32, 0\)"),
        ({"batch_norm": "yes"}, TypeError, r"`batch_norm` to be True or False\. Received: batch_norm='yes'"),
        ({"sync_batchnorm": 1}, TypeError, r"`sync_batchnorm` to be True or False\. Received: sync_batchnorm=1"),
        ({"name": 5}, TypeError, r"`name` to be a string or None .*Received: name=5 \(of type int\)"),
        ({"name": " "}, ValueError, r"non-empty string .*Received: name=' '"),
    ],
)
def test_invalid_options_raise_before_building(kwargs, error, message, monkeypatch):
    options = {"depth": 11, "input_shape": (32, 32, 3), "num_classes": 10, "width": 0.125}
    options.update(kwargs)

    def built(*args, **kwargs):
        raise AssertionError("a layer was built before the options were validated")

    for attribute in ("Input", "layers.Conv2D", "layers.Dense"):
        monkeypatch.setattr(f"keras.{attribute}", built)
    with pytest.raises(error, match=message):
        tfpar.models.vgg(**options)


# === Data-parallel training (tfpar.scope) ===


def test_tiny_vgg11_fits_under_mirrored_on_two_cpus():
    rng = np.random.RandomState(0)
    x = rng.rand(64, 32, 32, 3).astype("float32")
    y = rng.randint(0, 10, 64)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]) as strategy:
        model = tfpar.models.vgg11((32, 32, 3), 10, batch_norm=True, width=0.125)
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    assert strategy.num_replicas_in_sync == 2
    assert isinstance(model.get_layer("block1_conv1").kernel.value, tf.distribute.DistributedValues)
    assert all(layer.synchronized for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = model.get_layer("fc1").kernel.numpy().copy()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert 0.0 <= history.history["accuracy"][0] <= 1.0
    assert not np.allclose(model.get_layer("fc1").kernel.numpy(), before)


@pytest.mark.filterwarnings("ignore:.*unsynchronized BatchNormalization")
def test_sync_batchnorm_gives_the_single_device_statistics_under_mirrored():
    # The two replicas see very different halves of the batch: N(0, 1) and N(5, 3) images.
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.normal(0, 1, (4, 32, 32, 3)), rng.normal(5, 3, (4, 32, 32, 3))]).astype("float32")
    y = np.arange(8) % 10
    initial = tfpar.models.vgg11((32, 32, 3), 10, batch_norm=True, width=0.125).get_weights()

    def moving_statistics(sync_batchnorm, devices=None):
        """One step with lr=0 (only the moving statistics change), from the same weights."""
        context = tfpar.scope("mirrored", devices=devices) if devices else contextlib.nullcontext()
        with context:
            model = tfpar.models.vgg11(
                (32, 32, 3), 10, batch_norm=True, width=0.125, sync_batchnorm=sync_batchnorm
            )
            model.set_weights(initial)
            model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return np.concatenate([
            np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()])
            for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
        ])  # fmt: skip

    single = moving_statistics(sync_batchnorm=False)
    synced = moving_statistics(sync_batchnorm=True, devices=["cpu:0", "cpu:1"])
    local = moving_statistics(sync_batchnorm=False, devices=["cpu:0", "cpu:1"])
    assert np.abs(synced - single).max() < 1e-5
    assert np.abs(local - single).max() > 1e-3  # the failure sync_batchnorm=True prevents
