"""The model registry, ResNet-50, and the options every tfpar builder shares.

The registry maps a model name (``"alexnet"``, ``"vgg16"``, ``"resnet50"``, ...) to a builder, so
that ``tfpar train --model NAME`` and ``tfpar plan NAME`` can build any of them from a string.
Names are matched case-insensitively and without ``-``/``_``/space separators (``"VGG-16"`` is
``"vgg16"``); an unknown name lists the available ones and suggests the closest.

The private helpers below validate the options shared by :func:`tfpar.models.alexnet`,
:func:`tfpar.models.vgg` and :func:`resnet50` *before* any layer is built, and build the shared
classifier head, so that every builder says the same thing about the same mistake.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import keras

# Every tfpar model is channels-last, whatever keras.config.image_data_format() says.
_DATA_FORMAT = "channels_last"
_POOLINGS = (None, "avg", "max")

# name -> (builder, preset options). Filled by tfpar/models/__init__.py through register().
_BUILDERS: dict[str, tuple[Callable[..., keras.Model], dict[str, Any]]] = {}
# builder -> (smallest image side it accepts, why). Each builder module declares its own, so that
# an input size can be checked from a model *name* before anything is built (tfpar train / plan).
_MIN_INPUT_SIZES: dict[Callable[..., Any], tuple[int, str]] = {}


# === Option validation (shared by all builders; runs before any layer is built) ===


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_input_shape(input_shape: Any, model: str) -> tuple[int, int, int]:
    """Returns `input_shape` as a tuple of three positive ints (height, width, channels)."""
    if not isinstance(input_shape, (tuple, list)):
        raise TypeError(
            f"{model}: expected `input_shape` to be a tuple (height, width, channels), "
            f"e.g. (224, 224, 3). Received: input_shape={input_shape!r} "
            f"(of type {type(input_shape).__name__})"
        )
    if len(input_shape) != 3 or not all(_is_int(d) for d in input_shape):
        raise ValueError(
            f"{model}: expected `input_shape` to be three integers (height, width, channels), "
            f"channels last, e.g. (224, 224, 3); tfpar models need a static image size. "
            f"Received: input_shape={tuple(input_shape)!r}"
        )
    shape = tuple(int(d) for d in input_shape)
    if min(shape) < 1:
        raise ValueError(
            f"{model}: expected `input_shape` to be positive (height, width, channels), "
            f"e.g. (224, 224, 3). Received: input_shape={shape!r}"
        )
    return shape  # type: ignore[return-value]


def _check_min_size(shape: tuple[int, int, int], min_size: int, model: str, reason: str) -> None:
    """Raises a ValueError stating the minimum size when an image is too small for the model."""
    height, width, channels = shape
    if height >= min_size and width >= min_size:
        return
    hint = f"Use an input of at least ({min_size}, {min_size}, {channels}) or resize your images."
    if height <= 4 and channels > 4:
        # (3, 224, 224) is a channels-first shape, the most common way to get here.
        hint = (
            "This looks like a channels-first shape; tfpar models are channels-last: pass "
            f"input_shape=({width}, {channels}, {height})."
        )
    raise ValueError(
        f"{model} needs an input of at least {min_size}x{min_size} pixels ({reason}). "
        f"Received: input_shape={shape!r}. {hint}"
    )


def _declare_min_input_size(builder: Callable[..., Any], size: int, reason: str) -> None:
    """Records the smallest image side `builder` accepts (checked by :func:`check_input_shape`)."""
    _MIN_INPUT_SIZES[builder] = (size, reason)


def _check_common(
    *,
    model: str,
    input_shape: Any,
    num_classes: Any,
    classifier_activation: Any,
    include_top: Any,
    pooling: Any,
    name: Any,
    sync_batchnorm: Any = True,
    dropout: Any = 0.0,
    width: Any = 1.0,
) -> tuple[int, int, int]:
    """Validates the options every builder shares; returns the normalized input shape."""
    shape = _check_input_shape(input_shape, model)
    if not _is_int(num_classes):
        raise TypeError(
            f"{model}: expected `num_classes` to be an int >= 1. "
            f"Received: num_classes={num_classes!r} (of type {type(num_classes).__name__})"
        )
    if num_classes < 1:
        raise ValueError(
            f"{model}: expected `num_classes` to be >= 1 (the number of output classes). "
            f"Received: num_classes={num_classes}"
        )
    if classifier_activation is not None and not (
        isinstance(classifier_activation, str) or callable(classifier_activation)
    ):
        raise TypeError(
            f"{model}: expected `classifier_activation` to be an activation name such as "
            "'softmax', a callable, or None for logits. "
            f"Received: classifier_activation={classifier_activation!r} "
            f"(of type {type(classifier_activation).__name__})"
        )
    if isinstance(classifier_activation, str):
        try:
            keras.activations.get(classifier_activation)
        except ValueError as error:
            raise ValueError(
                f"{model}: unknown `classifier_activation`; expected a Keras activation name "
                "such as 'softmax' or 'sigmoid', or None for logits. "
                f"Received: classifier_activation={classifier_activation!r}"
            ) from error
    if not isinstance(include_top, bool):
        raise TypeError(
            f"{model}: expected `include_top` to be True or False. "
            f"Received: include_top={include_top!r} (of type {type(include_top).__name__})"
        )
    if pooling not in _POOLINGS:
        raise ValueError(
            f"{model}: expected `pooling` to be one of {list(_POOLINGS)}. "
            f"Received: pooling={pooling!r}"
        )
    if include_top and pooling is not None:
        raise ValueError(
            f"{model}: `pooling` applies only to the feature extractor; pass include_top=False "
            f"to use it, or pooling=None. Received: include_top=True, pooling={pooling!r}"
        )
    if not isinstance(sync_batchnorm, bool):
        raise TypeError(
            f"{model}: expected `sync_batchnorm` to be True or False. "
            f"Received: sync_batchnorm={sync_batchnorm!r} "
            f"(of type {type(sync_batchnorm).__name__})"
        )
    if not _is_real(dropout):
        raise TypeError(
            f"{model}: expected `dropout` to be a rate (float) in [0, 1). "
            f"Received: dropout={dropout!r} (of type {type(dropout).__name__})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"{model}: expected `dropout` in [0, 1); use 0 for no dropout. "
            f"Received: dropout={dropout!r}"
        )
    if not _is_real(width):
        raise TypeError(
            f"{model}: expected `width` to be a positive number (channel multiplier, "
            f"e.g. 0.125). Received: width={width!r} (of type {type(width).__name__})"
        )
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(
            f"{model}: expected `width` > 0 (a channel multiplier; 1.0 is the published "
            f"model, 0.125 a small CPU experiment). Received: width={width!r}"
        )
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"{model}: expected `name` to be a string or None (for the default name). "
            f"Received: name={name!r} (of type {type(name).__name__})"
        )
    if name is not None and not name.strip():
        raise ValueError(
            f"{model}: expected `name` to be a non-empty string or None (for the default name). "
            f"Received: name={name!r}"
        )
    return shape


# === Layers shared by the builders ===


def _scaled(units: int, width: float) -> int:
    """Channels or units scaled by the width multiplier (at least 1)."""
    return max(1, int(round(units * width)))


def _batch_norm(name: str, synchronized: bool) -> keras.layers.BatchNormalization:
    # synchronized=True all-reduces the batch statistics over replicas, so a data-parallel run
    # normalizes with the statistics of the global batch, as single-device training does.
    return keras.layers.BatchNormalization(synchronized=synchronized, name=name)


def _predictions_dtype() -> str | None:
    # Under a mixed-precision policy the output layer computes in float32 (numerically stable
    # softmax and loss), as the Keras mixed-precision guide prescribes.
    return "float32" if keras.config.dtype_policy().name.startswith("mixed") else None


def _head(
    x: Any,
    *,
    include_top: bool,
    pooling: str | None,
    fc_units: int,
    num_classes: int,
    classifier_activation: Any,
    dropout: float,
) -> Any:
    """flatten, fc1, [dropout1], fc2, [dropout2], predictions; or the optional global pooling."""
    if not include_top:
        if pooling == "avg":
            return keras.layers.GlobalAveragePooling2D(data_format=_DATA_FORMAT, name="avg_pool")(x)
        if pooling == "max":
            return keras.layers.GlobalMaxPooling2D(data_format=_DATA_FORMAT, name="max_pool")(x)
        return x
    x = keras.layers.Flatten(data_format=_DATA_FORMAT, name="flatten")(x)
    for index in (1, 2):
        x = keras.layers.Dense(fc_units, activation="relu", name=f"fc{index}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout{index}")(x)
    return keras.layers.Dense(
        num_classes,
        activation=classifier_activation,
        dtype=_predictions_dtype(),
        name="predictions",
    )(x)


# === ResNet-50 ===


def resnet50(
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    *,
    classifier_activation: str | Callable[..., Any] | None = "softmax",
    include_top: bool = True,
    pooling: str | None = None,
    sync_batchnorm: bool = True,
    name: str | None = None,
) -> keras.Model:
    """Builds ResNet-50 (He et al. 2015) from `keras.applications.ResNet50`, randomly initialized.

    A thin builder for data-parallel examples: the architecture, layer names and parameter count
    (25,636,712 at 224x224 with 1000 classes) are those of ``keras.applications.ResNet50(weights=None)``.
    With ``sync_batchnorm=True`` every BatchNormalization layer is rebuilt with
    ``synchronized=True`` so that its statistics are those of the global batch under data
    parallelism. The input layer is named ``"input"``. Width and dropout are not options here.

    Args:
        input_shape: ``(height, width, channels)``, channels last; at least 32x32.
        num_classes: Number of output classes (``include_top=True``).
        classifier_activation: Activation of the ``predictions`` layer; None returns logits.
        include_top: Whether to include the classifier (``avg_pool`` and ``predictions``).
        pooling: With ``include_top=False``: None (4-D feature map), ``"avg"`` or ``"max"``.
        sync_batchnorm: Synchronize BatchNormalization statistics across replicas.
        name: Model name; defaults to ``"resnet50"``.

    Returns:
        A new, uncompiled ``keras.Model``.

    Raises:
        TypeError: If an option has the wrong type.
        ValueError: If an option has a wrong value, the input is smaller than 32x32, or Keras is
            configured channels-first.

    Example:
        >>> with tfpar.scope("mirrored"):
        ...     model = tfpar.models.resnet50(input_shape=(64, 64, 3), num_classes=10)
    """
    shape = _check_common(
        model="resnet50",
        input_shape=input_shape,
        num_classes=num_classes,
        classifier_activation=classifier_activation,
        include_top=include_top,
        pooling=pooling,
        name=name,
        sync_batchnorm=sync_batchnorm,
    )
    _check_min_size(shape, _MIN_INPUT_SIZES[resnet50][0], "resnet50", _MIN_INPUT_SIZES[resnet50][1])
    data_format = keras.config.image_data_format()
    if data_format != _DATA_FORMAT:
        raise ValueError(
            "resnet50 builds keras.applications.ResNet50, which follows the global image data "
            "format; tfpar models are channels-last. Call "
            "keras.config.set_image_data_format('channels_last') first. "
            f"Received: keras.config.image_data_format()={data_format!r}"
        )
    model = keras.applications.ResNet50(
        include_top=include_top,
        weights=None,
        input_tensor=keras.Input(shape=shape, name="input"),
        pooling=pooling,
        classes=num_classes,
        classifier_activation=classifier_activation,
        name=name or "resnet50",
    )
    if not sync_batchnorm:
        return model

    def synchronized(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    # Rebuilding from configs keeps every layer name; the unsynchronized original is discarded.
    return keras.models.clone_model(model, clone_function=synchronized)


_declare_min_input_size(resnet50, 32, "its five stride-2 stages")


# === Registry ===


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def register(
    name: str,
    builder: Callable[..., keras.Model],
    *,
    preset: dict[str, Any] | None = None,
    override: bool = False,
) -> None:
    """Registers a model builder under a name, for `tfpar.models.get` and ``tfpar train --model``.

    Args:
        name: The model name (letters, digits, ``_``, ``-``); matched case-insensitively and
            without separators, so ``"vgg16_bn"`` is also found as ``"VGG16-BN"``.
        builder: A callable taking keyword options and returning a ``keras.Model``.
        preset: Options fixed by this name (an alias), e.g. ``{"batch_norm": True}`` for
            ``"vgg16_bn"``; callers cannot override them.
        override: Replace an existing entry of the same name instead of raising.

    Raises:
        TypeError: If `name` is not a string, `builder` is not callable or `preset` not a dict.
        ValueError: If `name` is empty or malformed, or already registered and
            ``override=False``.

    Example:
        >>> tfpar.models.register("vgg16_small", tfpar.models.vgg16, preset={"width": 0.25})
        >>> model = tfpar.models.get("vgg16_small", input_shape=(32, 32, 3), num_classes=10)
    """
    if not isinstance(name, str):
        raise TypeError(
            "Expected the model `name` to be a string such as 'alexnet'. "
            f"Received: name={name!r} (of type {type(name).__name__})"
        )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(
            "Expected the model `name` to start with a letter or digit and contain only letters, "
            f"digits, '_' and '-'. Received: name={name!r}"
        )
    if not callable(builder):
        raise TypeError(
            "Expected `builder` to be a callable returning a keras.Model. "
            f"Received: builder={builder!r} (of type {type(builder).__name__})"
        )
    if preset is not None and not isinstance(preset, dict):
        raise TypeError(
            "Expected `preset` to be a dict of options or None. "
            f"Received: preset={preset!r} (of type {type(preset).__name__})"
        )
    existing = {_key(n): n for n in _BUILDERS}
    if _key(name) in existing and not override:
        raise ValueError(
            f"A model named {existing[_key(name)]!r} is already registered. "
            f"Pass override=True to replace it. Received: name={name!r}"
        )
    _BUILDERS.pop(existing.get(_key(name), name), None)
    _BUILDERS[name] = (builder, dict(preset or {}))


def available() -> list[str]:
    """Lists the registered model names, sorted.

    Returns:
        The names accepted by `tfpar.models.get`, e.g. ``["alexnet", "resnet50", "vgg11", ...]``.

    Example:
        >>> "vgg16" in tfpar.models.available()
        True
    """
    return sorted(_BUILDERS)


def accepted_options(name: str) -> list[str]:
    """Lists the options the model `name` accepts in `tfpar.models.get` (presets excluded).

    Args:
        name: A registered model name.

    Returns:
        The option names, in the builder's signature order.

    Raises:
        TypeError: If `name` is not a string.
        ValueError: If `name` is not registered (the error lists the available names).

    Example:
        >>> "width" in tfpar.models.accepted_options("vgg16")
        True
    """
    builder, preset = _BUILDERS[_lookup(name)]
    return [p for p in _parameters(builder) if p not in preset]


def min_input_size(name: str) -> int | None:
    """The smallest image side (height and width, in pixels) the model `name` accepts.

    Args:
        name: A registered model name.

    Returns:
        The minimum side, or None for a model registered without a declared minimum.

    Raises:
        TypeError: If `name` is not a string.
        ValueError: If `name` is not registered (the error lists the available names).

    Example:
        >>> tfpar.models.min_input_size("alexnet"), tfpar.models.min_input_size("vgg16")
        (55, 32)
    """
    builder, _ = _BUILDERS[_lookup(name)]
    entry = _MIN_INPUT_SIZES.get(builder)
    return None if entry is None else entry[0]


def check_input_shape(name: str, input_shape: Any) -> tuple[int, ...]:
    """Checks an input shape for the model `name` without building anything.

    Runs the same checks, with the same messages, as the model's builder: three positive ints
    (height, width, channels) at least :func:`min_input_size` pixels high and wide, with a hint
    when the shape looks channels-first. Cheap and free of TensorFlow side effects, so
    ``tfpar train`` / ``tfpar plan`` refuse a bad size before they build models or read data.

    Args:
        name: A registered model name.
        input_shape: The shape to check, e.g. ``(64, 64, 3)``.

    Returns:
        The shape as a tuple of ints (unchecked for a model registered without a declared
        minimum size).

    Raises:
        TypeError: If `name` is not a string or `input_shape` is not a tuple or list.
        ValueError: If `name` is unknown, or the shape is malformed or too small.

    Example:
        >>> tfpar.models.check_input_shape("alexnet", (64, 64, 3))
        (64, 64, 3)
        >>> tfpar.models.check_input_shape("alexnet", (8, 8, 3))
        Traceback (most recent call last):
        ValueError: alexnet needs an input of at least 55x55 pixels ...
    """
    key = _lookup(name)
    builder, _ = _BUILDERS[key]
    entry = _MIN_INPUT_SIZES.get(builder)
    if entry is None:
        return tuple(input_shape)
    shape = _check_input_shape(input_shape, key)
    _check_min_size(shape, entry[0], key, entry[1])
    return shape


def get(name: str, **options: Any) -> keras.Model:
    """Builds the registered model `name` with the given options.

    Args:
        name: A model name from `tfpar.models.available()` (case and ``-``/``_`` insensitive).
        **options: Keyword options of that builder, e.g. ``input_shape``, ``num_classes``,
            ``width``; `tfpar.models.accepted_options(name)` lists them.

    Returns:
        A new ``keras.Model``.

    Raises:
        TypeError: If `name` is not a string or an option is not accepted by the model.
        ValueError: If `name` is unknown (the error lists the available names and suggests the
            closest), an option overrides a preset of the name, or the builder rejects a value.

    Example:
        >>> model = tfpar.models.get("vgg11", input_shape=(32, 32, 3), num_classes=10, width=0.125)
    """
    key = _lookup(name)
    builder, preset = _BUILDERS[key]
    clashing = sorted(set(options) & set(preset))
    if clashing:
        fixed = ", ".join(f"{k}={preset[k]!r}" for k in clashing)
        received = ", ".join(f"{k}={options[k]!r}" for k in clashing)
        raise ValueError(
            f"Model {key!r} fixes {fixed}; pick the registered name that has the value you want "
            f"(tfpar.models.available() lists them). Received: {received}"
        )
    accepted = _parameters(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown and not _takes_any_keyword(builder):
        received = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise TypeError(
            f"Model {key!r} does not accept option(s) {unknown}. Accepted options: "
            f"{[p for p in accepted if p not in preset]}. Received: {received}"
        )
    return builder(**preset, **options)


def _lookup(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(
            "Expected the model `name` to be a string such as 'vgg16'. "
            f"Received: name={name!r} (of type {type(name).__name__})"
        )
    by_key = {_key(n): n for n in _BUILDERS}
    if _key(name) in by_key:
        return by_key[_key(name)]
    close = difflib.get_close_matches(_key(name), sorted(by_key), n=1, cutoff=0.7)
    hint = f" Did you mean {by_key[close[0]]!r}?" if close else ""
    raise ValueError(
        f"Unknown model name.{hint} Available names: {', '.join(sorted(_BUILDERS))}. "
        f"Received: name={name!r}"
    )


def _parameters(builder: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(builder).parameters.values() if p.kind in kinds]


def _takes_any_keyword(builder: Callable[..., Any]) -> bool:
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(builder).parameters.values()
    )
