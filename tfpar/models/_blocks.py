"""What every tfpar model builder shares: option validation and the classifier head.

:func:`check_common` validates the options shared by :func:`tfpar.models.alexnet`,
:func:`tfpar.models.vgg` and :func:`tfpar.models.resnet50` *before* any layer is built, so that
every builder says the same thing about the same mistake. Each builder module declares the
smallest image side it accepts (:func:`declare_min_input_size`), so that the registry can check an
input size from a model *name* before anything is built (``tfpar train`` / ``tfpar plan``).

The module is private to ``tfpar.models``; its names are public because the builder modules
share them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import keras

# Every tfpar model is channels-last, whatever keras.config.image_data_format() says.
DATA_FORMAT = "channels_last"
POOLINGS = (None, "avg", "max")

# builder -> (smallest image side it accepts, why).
MIN_INPUT_SIZES: dict[Callable[..., Any], tuple[int, str]] = {}


# === Option validation (runs before any layer is built) ===


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_image_shape(input_shape: Any, model: str) -> tuple[int, int, int]:
    """Returns `input_shape` as a tuple of three positive ints (height, width, channels)."""
    if not isinstance(input_shape, (tuple, list)):
        raise TypeError(
            f"{model}: expected `input_shape` to be a tuple (height, width, channels), "
            f"e.g. (224, 224, 3). Received: input_shape={input_shape!r} "
            f"(of type {type(input_shape).__name__})"
        )
    if len(input_shape) != 3 or not all(is_int(d) for d in input_shape):
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


def check_min_size(shape: tuple[int, int, int], min_size: int, model: str, reason: str) -> None:
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


def declare_min_input_size(builder: Callable[..., Any], size: int, reason: str) -> None:
    """Records the smallest image side `builder` accepts (checked by :func:`tfpar.models.check_input_shape`)."""
    MIN_INPUT_SIZES[builder] = (size, reason)


def check_common(
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
    shape = check_image_shape(input_shape, model)
    if not is_int(num_classes):
        raise TypeError(
            f"{model}: expected `num_classes` to be an int >= 1. "
            f"Received: num_classes={num_classes!r} (of type {type(num_classes).__name__})"
        )
    if num_classes < 1:
        raise ValueError(
            f"{model}: expected `num_classes` to be >= 1 (the number of output classes). "
            f"Received: num_classes={num_classes}"
        )
    _check_classifier_activation(model, classifier_activation)
    if not isinstance(include_top, bool):
        raise TypeError(
            f"{model}: expected `include_top` to be True or False. "
            f"Received: include_top={include_top!r} (of type {type(include_top).__name__})"
        )
    if pooling not in POOLINGS:
        raise ValueError(
            f"{model}: expected `pooling` to be one of {list(POOLINGS)}. "
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
    if not is_real(dropout):
        raise TypeError(
            f"{model}: expected `dropout` to be a rate (float) in [0, 1). "
            f"Received: dropout={dropout!r} (of type {type(dropout).__name__})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"{model}: expected `dropout` in [0, 1); use 0 for no dropout. "
            f"Received: dropout={dropout!r}"
        )
    if not is_real(width):
        raise TypeError(
            f"{model}: expected `width` to be a positive number (channel multiplier, "
            f"e.g. 0.125). Received: width={width!r} (of type {type(width).__name__})"
        )
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(
            f"{model}: expected `width` > 0 (a channel multiplier; 1.0 is the published "
            f"model, 0.125 a small CPU experiment). Received: width={width!r}"
        )
    _check_name(model, name)
    return shape


def _check_classifier_activation(model: str, classifier_activation: Any) -> None:
    """Part of :func:`check_common`: None, a callable, or a known Keras activation name."""
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


def _check_name(model: str, name: Any) -> None:
    """Part of :func:`check_common`: None or a non-empty string."""
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


# === Layers shared by the builders ===


def scaled(units: int, width: float) -> int:
    """Channels or units scaled by the width multiplier (at least 1)."""
    return max(1, int(round(units * width)))


def batch_norm(name: str, synchronized: bool) -> keras.layers.BatchNormalization:
    # synchronized=True all-reduces the batch statistics over replicas, so a data-parallel run
    # normalizes with the statistics of the global batch, as single-device training does.
    return keras.layers.BatchNormalization(synchronized=synchronized, name=name)


def predictions_dtype() -> str | None:
    # Under a mixed-precision policy the output layer computes in float32 (numerically stable
    # softmax and loss), as the Keras mixed-precision guide prescribes.
    return "float32" if keras.config.dtype_policy().name.startswith("mixed") else None


def head(
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
            return keras.layers.GlobalAveragePooling2D(data_format=DATA_FORMAT, name="avg_pool")(x)
        if pooling == "max":
            return keras.layers.GlobalMaxPooling2D(data_format=DATA_FORMAT, name="max_pool")(x)
        return x
    x = keras.layers.Flatten(data_format=DATA_FORMAT, name="flatten")(x)
    for index in (1, 2):
        x = keras.layers.Dense(fc_units, activation="relu", name=f"fc{index}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout{index}")(x)
    return keras.layers.Dense(
        num_classes,
        activation=classifier_activation,
        dtype=predictions_dtype(),
        name="predictions",
    )(x)
