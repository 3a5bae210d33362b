"""tfpar.models.get / available / accepted_options / register, and the ResNet-50 builder."""

from __future__ import annotations

import gc

import keras
import pytest

import tfpar.models
from tfpar.models import registry


@pytest.fixture
def private_registry(monkeypatch):
    """Lets a test register names without leaking them into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.copy())


def test_available_lists_the_builtin_models():
    assert tfpar.models.available() == [
        "alexnet", "resnet50",
        "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "model_name", "first_conv", "has_bn"),
    [
        ("alexnet", "alexnet", "conv1", True),
        ("vgg11", "vgg11", "block1_conv1", False),
        ("VGG-13", "vgg13", "block1_conv1", False),
        ("vgg16_bn", "vgg16_bn", "block1_conv1", True),
        (" Vgg19 ", "vgg19", "block1_conv1", False),
    ],
)
def test_get_builds_the_named_model(name, model_name, first_conv, has_bn):
    size = 64
    model = tfpar.models.get(name, input_shape=(size, size, 3), num_classes=10, width=0.125)
    assert model.name == model_name
    assert model.output.shape == (None, 10)
    assert model.get_layer(first_conv) is not None
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == has_bn


def test_get_passes_options_through_to_the_builder():
    model = tfpar.models.get("vgg11", input_shape=(32, 32, 1), width=0.125, include_top=False)
    direct = tfpar.models.vgg11((32, 32, 1), width=0.125, include_top=False)
    assert [layer.name for layer in model.layers] == [layer.name for layer in direct.layers]
    assert model.count_params() == direct.count_params()


def test_unknown_name_lists_names_and_suggests_the_closest():
    with pytest.raises(ValueError, match=r"Unknown model 'alexnett'\. Did you mean 'alexnet'\? "
                       r"Available names: alexnet, resnet50, vgg11, .*vgg19_bn\. Received: name='alexnett'"):
        tfpar.models.get("alexnett")
    with pytest.raises(ValueError, match=r"Did you mean 'resnet50'\?"):
        tfpar.models.get("resnet")
    with pytest.raises(ValueError, match=r"Did you mean 'vgg16_bn'\?"):
        tfpar.models.get("VGG-16BNN")
    with pytest.raises(ValueError, match=r"Unknown model 'inception'\. Available names: .*Received: name='inception'"):
        tfpar.models.get("inception")


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match=r"Received: name=16 \(of type int\)"):
        tfpar.models.get(16)


def test_unaccepted_option_lists_the_accepted_ones():
    with pytest.raises(TypeError, match=r"Model 'resnet50' does not accept option\(s\) \['dropout', 'width'\]\. "
                       r"Accepted options: \['input_shape', 'num_classes', 'classifier_activation', "
                       r"'include_top', 'pooling', 'sync_batchnorm', 'name'\]\. "
                       r"Received: dropout=0\.1, width=0\.5"):
        tfpar.models.get("resnet50", width=0.5, dropout=0.1)


def test_preset_options_cannot_be_overridden():
    with pytest.raises(ValueError, match=r"Model 'vgg16_bn' fixes batch_norm=True; pick the registered "
                       r"name .*tfpar\.models\.available\(\) lists them\)\. Received: batch_norm=False"):
        tfpar.models.get("vgg16_bn", batch_norm=False)
    with pytest.raises(ValueError, match=r"Model 'vgg16' fixes depth=16; .*Received: depth=19"):
        tfpar.models.get("vgg16", depth=19)


def test_accepted_options():
    assert tfpar.models.accepted_options("alexnet") == [
        "input_shape", "num_classes", "normalization", "classifier_activation", "include_top",
        "pooling", "dropout", "width", "sync_batchnorm", "name",
    ]  # fmt: skip
    assert "depth" not in tfpar.models.accepted_options("vgg16")
    assert "batch_norm" in tfpar.models.accepted_options("vgg16")
    assert "batch_norm" not in tfpar.models.accepted_options("vgg16_bn")


def test_register_a_custom_builder(private_registry):
    def tiny(input_shape=(8, 8, 1), num_classes=2):
        inputs = keras.Input(input_shape)
        return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))

    tfpar.models.register("Tiny-Net", tiny)
    assert "Tiny-Net" in tfpar.models.available()
    assert tfpar.models.get("tinynet", num_classes=3).output.shape == (None, 3)
    with pytest.raises(ValueError, match=r"'Tiny-Net' is already registered\. Pass override=True .*Received: name='tiny_net'"):
        tfpar.models.register("tiny_net", tiny)
    tfpar.models.register("tiny_net", tiny, preset={"num_classes": 4}, override=True)
    assert tfpar.models.available().count("tiny_net") == 1 and "Tiny-Net" not in tfpar.models.available()
    assert tfpar.models.get("tiny_net").output.shape == (None, 4)


def test_register_a_builder_taking_any_keyword(private_registry):
    tfpar.models.register("vgg11_small", tfpar.models.vgg11, preset={"width": 0.125})
    model = tfpar.models.get("vgg11_small", input_shape=(32, 32, 3), num_classes=3)
    assert model.get_layer("block1_conv1").filters == 8


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((3, keras.Model), {}, TypeError, r"model `name` to be a string .*Received: name=3 \(of type int\)"),
        (("", keras.Model), {}, ValueError, r"Received: name=''"),
        (("my net", keras.Model), {}, ValueError, r"only letters, digits, '_' and '-'\. Received: name='my net'"),
        (("mynet", "vgg16"), {}, TypeError, r"`builder` to be a callable .*Received: builder='vgg16' \(of type str\)"),
        (("mynet", keras.Model), {"preset": [("width", 1)]}, TypeError, r"`preset` to be a dict .*\(of type list\)"),
    ],
)
def test_register_invalid_arguments(private_registry, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        tfpar.models.register(*args, **kwargs)


# === ResNet-50 ===


def test_resnet50_matches_keras_applications():
    ours = tfpar.models.resnet50((64, 64, 3), 10)
    reference = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    assert ours.count_params() == reference.count_params()
    assert [layer.name for layer in ours.layers[1:]] == [layer.name for layer in reference.layers[1:]]
    assert ours.layers[0].name == "input" and ours.name == "resnet50"
    batchnorms = [layer for layer in ours.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batchnorms) == 53 and all(layer.synchronized for layer in batchnorms)
    del ours, reference
    keras.backend.clear_session()
    gc.collect()


def test_resnet50_full_size_parameter_count():
    model = tfpar.models.get("resnet50")
    assert model.count_params() == 25_636_712
    assert model.output.shape == (None, 1000)
    del model
    keras.backend.clear_session()
    gc.collect()


def test_resnet50_options():
    plain = tfpar.models.resnet50((32, 32, 3), 10, sync_batchnorm=False, classifier_activation=None, name="r50")
    assert plain.name == "r50"
    assert not any(getattr(layer, "synchronized", False) for layer in plain.layers)
    assert plain.get_layer("predictions").get_config()["activation"] == "linear"
    features = tfpar.models.resnet50((64, 64, 3), include_top=False, pooling="max")
    assert features.output.shape == (None, 2048) and features.layers[-1].name == "max_pool"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_shape": (31, 64, 3)}, ValueError, r"resnet50 needs an input of at least 32x32 pixels .*Received: input_shape=\(31, 64, 3\)"),
        ({"num_classes": 0}, ValueError, r"resnet50: expected `num_classes` to be >= 1 .*Received: num_classes=0"),
        ({"pooling": "avg"}, ValueError, r"resnet50: `pooling` applies only .*Received: include_top=True, pooling='avg'"),
        ({"sync_batchnorm": None}, TypeError, r"Received: sync_batchnorm=None"),
    ],
)
def test_resnet50_invalid_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        tfpar.models.resnet50(**kwargs)


def test_resnet50_refuses_a_channels_first_keras_config():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        with pytest.raises(ValueError, match=r"keras\.config\.set_image_data_format\('channels_last'\).*"
                           r"Received: keras\.config\.image_data_format\(\)='channels_first'"):
            tfpar.models.resnet50((32, 32, 3), 10)
    finally:
        keras.config.set_image_data_format(previous)
