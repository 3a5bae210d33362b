"""ResNet-50 (He et al. 2015), built from ``keras.applications.ResNet50`` with tfpar's options."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras

from tfpar.models import _blocks


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
    shape = _blocks.check_common(
        model="resnet50",
        input_shape=input_shape,
        num_classes=num_classes,
        classifier_activation=classifier_activation,
        include_top=include_top,
        pooling=pooling,
        name=name,
        sync_batchnorm=sync_batchnorm,
    )
    min_size, reason = _blocks.MIN_INPUT_SIZES[resnet50]
    _blocks.check_min_size(shape, min_size, "resnet50", reason)
    data_format = keras.config.image_data_format()
    if data_format != _blocks.DATA_FORMAT:
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


_blocks.declare_min_input_size(resnet50, 32, "its five stride-2 stages")
