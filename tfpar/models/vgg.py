"""VGG-11/13/16/19 (Simonyan and Zisserman, ICLR 2015) as Keras functional models.

The architecture is the table below (convolutions per block; every convolution is 3x3 "same" with
a ReLU, every block ends in a 2x2 stride-2 max-pool), the classifier is fc1 and fc2 with 4096 units
and the predictions layer. Layer names are exactly keras.applications' (``block1_conv1``,
``block1_pool``, ``flatten``, ``fc1``, ``fc2``, ``predictions``), so ``vgg16()`` has the layers and
the 138,357,544 parameters of ``keras.applications.VGG16(weights=None)``; it adds the paper's
dropout after fc1 and fc2 (``dropout1``, ``dropout2``; no parameters).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import keras

from tfpar.models import _blocks

# depth -> convolutions in each of the five blocks (the paper's configurations A, B, D, E).
_CONVS_PER_BLOCK = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
_FILTERS = (64, 128, 256, 512, 512)
_FC_UNITS = 4096
# Five 2x2 stride-2 max-pools: the smallest image that keeps a 1x1 map after block5_pool.
MIN_INPUT_SIZE = 2 ** len(_FILTERS)
_MIN_SIZE_REASON = f"its {len(_FILTERS)} 2x2 stride-2 max-pools"


def vgg(
    depth: int = 16,
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    batch_norm: bool = False,
    *,
    classifier_activation: str | Callable[..., Any] | None = "softmax",
    include_top: bool = True,
    pooling: str | None = None,
    dropout: float = 0.5,
    width: float = 1.0,
    sync_batchnorm: bool = True,
    name: str | None = None,
) -> keras.Model:
    """Builds a randomly initialized VGG network of the given depth.

    Layers, with deterministic names (``B`` the block, ``N`` the convolution in the block)::

        input, blockB_convN [, blockB_bnN, blockB_reluN] ..., blockB_pool (B = 1..5),
        flatten, fc1, dropout1, fc2, dropout2, predictions

    With ``batch_norm=False`` (default) the ReLU is part of each convolution, as in
    keras.applications. With ``batch_norm=True`` every convolution is followed by a
    BatchNormalization and then its ReLU (``blockB_convN -> blockB_bnN -> blockB_reluN``, the
    "vgg16_bn" layout). ``dropout1``/``dropout2`` are absent with ``dropout=0``. Builds no placement:
    build it inside ``tfpar.scope(...)`` to train it in parallel.

    Args:
        depth: 11, 13, 16 or 19.
        input_shape: ``(height, width, channels)``, channels last; at least 32x32.
        num_classes: Number of output classes.
        batch_norm: Add a BatchNormalization after every convolution.
        classifier_activation: Activation of ``predictions``; None returns logits.
        include_top: Whether to include ``flatten``, ``fc1``, ``fc2`` and ``predictions``.
        pooling: With ``include_top=False``: None (the ``block5_pool`` feature map), ``"avg"`` or
            ``"max"`` (a global pooling layer named ``avg_pool``/``max_pool``).
        dropout: Dropout rate after fc1 and fc2 (the paper's 0.5); 0 for none.
        width: Multiplier for the channels of every convolution and the units of fc1/fc2, e.g.
            0.125 for quick CPU experiments; 1.0 is the published model.
        sync_batchnorm: With ``batch_norm=True``, create the BatchNormalization layers with
            ``synchronized=True``, so their statistics are those of the global batch under data
            parallelism.
        name: Model name; defaults to ``"vgg16"`` (``"vgg16_bn"`` with batch norm), etc.

    Returns:
        A new, uncompiled ``keras.Model``.

    Raises:
        TypeError: If an option has the wrong type.
        ValueError: If `depth` is not 11, 13, 16 or 19, another option has a wrong value, or the
            input is smaller than 32x32 (the message states the minimum and the received shape).

    Example:
        >>> with tfpar.scope("mirrored"):
        ...     model = tfpar.models.vgg(depth=11, input_shape=(32, 32, 3), num_classes=10,
        ...                              batch_norm=True, width=0.125)
    """
    valid = sorted(_CONVS_PER_BLOCK)
    if not isinstance(depth, numbers.Integral) or isinstance(depth, bool):
        raise TypeError(
            f"vgg: expected `depth` to be an int, one of {valid}. "
            f"Received: depth={depth!r} (of type {type(depth).__name__})"
        )
    if depth not in _CONVS_PER_BLOCK:
        raise ValueError(
            f"Unsupported VGG depth. Expected one of {valid}. Received: depth={depth}"
        )
    model = f"vgg{depth}"
    shape = _blocks.check_common(
        model=model,
        input_shape=input_shape,
        num_classes=num_classes,
        classifier_activation=classifier_activation,
        include_top=include_top,
        pooling=pooling,
        name=name,
        sync_batchnorm=sync_batchnorm,
        dropout=dropout,
        width=width,
    )
    if not isinstance(batch_norm, bool):
        raise TypeError(
            f"{model}: expected `batch_norm` to be True or False. "
            f"Received: batch_norm={batch_norm!r} (of type {type(batch_norm).__name__})"
        )
    _blocks.check_min_size(shape, MIN_INPUT_SIZE, model, _MIN_SIZE_REASON)

    fmt = _blocks.DATA_FORMAT
    inputs = keras.Input(shape=shape, name="input")
    x = inputs
    for block, (convs, filters) in enumerate(zip(_CONVS_PER_BLOCK[depth], _FILTERS), 1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                _blocks.scaled(filters, width),
                (3, 3),
                padding="same",
                activation=None if batch_norm else "relu",
                data_format=fmt,
                name=f"block{block}_conv{conv}",
            )(x)
            if batch_norm:
                x = _blocks.batch_norm(f"block{block}_bn{conv}", sync_batchnorm)(x)
                x = keras.layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
        x = keras.layers.MaxPooling2D(
            (2, 2), strides=(2, 2), data_format=fmt, name=f"block{block}_pool"
        )(x)

    outputs = _blocks.head(
        x,
        include_top=include_top,
        pooling=pooling,
        fc_units=_blocks.scaled(_FC_UNITS, width),
        num_classes=num_classes,
        classifier_activation=classifier_activation,
        dropout=dropout,
    )
    return keras.Model(inputs, outputs, name=name or (f"{model}_bn" if batch_norm else model))


def vgg11(
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    batch_norm: bool = False,
    **options: Any,
) -> keras.Model:
    """Builds VGG-11 (configuration A, 132,863,336 parameters at 224x224 with 1000 classes).

    Args:
        input_shape: ``(height, width, channels)``, channels last; at least 32x32.
        num_classes: Number of output classes.
        batch_norm: Add a BatchNormalization after every convolution.
        **options: The keyword options of `tfpar.models.vgg` (``classifier_activation``,
            ``include_top``, ``pooling``, ``dropout``, ``width``, ``sync_batchnorm``, ``name``).

    Returns:
        A new, uncompiled ``keras.Model``.

    Example:
        >>> model = tfpar.models.vgg11(input_shape=(32, 32, 3), num_classes=10, width=0.125)
    """
    return vgg(11, input_shape, num_classes, batch_norm, **options)


def vgg13(
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    batch_norm: bool = False,
    **options: Any,
) -> keras.Model:
    """Builds VGG-13 (configuration B, 133,047,848 parameters at 224x224 with 1000 classes).

    Args:
        input_shape: ``(height, width, channels)``, channels last; at least 32x32.
        num_classes: Number of output classes.
        batch_norm: Add a BatchNormalization after every convolution.
        **options: The keyword options of `tfpar.models.vgg` (``classifier_activation``,
            ``include_top``, ``pooling``, ``dropout``, ``width``, ``sync_batchnorm``, ``name``).

    Returns:
        A new, uncompiled ``keras.Model``.

    Example:
        >>> model = tfpar.models.vgg13(input_shape=(32, 32, 3), num_classes=10, width=0.25)
    """
    return vgg(13, input_shape, num_classes, batch_norm, **options)


def vgg16(
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    batch_norm: bool = False,
    **options: Any,
) -> keras.Model:
    """Builds VGG-16 (configuration D), with keras.applications.VGG16's 138,357,544 parameters.

    Args:
        input_shape: ``(height, width, channels)``, channels last; at least 32x32.
        num_classes: Number of output classes.
        batch_norm: Add a BatchNormalization after every convolution.
        **options: The keyword options of `tfpar.models.vgg` (``classifier_activation``,
            ``include_top``, ``pooling``, ``dropout``, ``width``, ``sync_batchnorm``, ``name``).

    Returns:
        A new, uncompiled ``keras.Model``.

    Example:
        >>> model = tfpar.models.vgg16(input_shape=(32, 32, 3), num_classes=10, width=0.25)
    """
    return vgg(16, input_shape, num_classes, batch_norm, **options)


def vgg19(
    input_shape: Sequence[int] = (224, 224, 3),
    num_classes: int = 1000,
    batch_norm: bool = False,
    **options: Any,
) -> keras.Model:
    """Builds VGG-19 (configuration E, 143,667,240 parameters at 224x224 with 1000 classes).

    Args:
        input_shape: ``(height, width, channels)``, channels last; at least 32x32.
        num_classes: Number of output classes.
        batch_norm: Add a BatchNormalization after every convolution.
        **options: The keyword options of `tfpar.models.vgg` (``classifier_activation``,
            ``include_top``, ``pooling``, ``dropout``, ``width``, ``sync_batchnorm``, ``name``).

    Returns:
        A new, uncompiled ``keras.Model``.

    Example:
        >>> model = tfpar.models.vgg19(input_shape=(32, 32, 3), num_classes=10, width=0.25)
    """
    return vgg(19, input_shape, num_classes, batch_norm, **options)


for _builder in (vgg, vgg11, vgg13, vgg16, vgg19):
    _blocks.declare_min_input_size(_builder, MIN_INPUT_SIZE, _MIN_SIZE_REASON)
del _builder
