"""AlexNet (Krizhevsky, Sutskever and Hinton, NIPS 2012), single tower, as a Keras functional model.

The layer sizes are the paper's: conv1 96 11x11 stride 4, conv2 256 5x5, conv3 384, conv4 384 and
conv5 256 3x3; overlapping 3x3 stride-2 max-pooling after conv1, conv2 and conv5; fc1 and fc2 with
4096 units and dropout 0.5; the two GPU towers are merged into one (no grouped convolutions). With
``normalization="lrn"`` and the default 227x227 input it has the paper's 62,378,344 parameters.

The max-pools round up (Caffe's "ceil mode", as the reference bvlc_alexnet does): at 227x227 and
224x224 this is exactly the paper's 55 -> 27 -> 13 -> 6 layout, and it lets inputs down to 55x55
work (64x64 on a CPU, say). Where rounding up needs one more row or column, a zero-padding layer
``poolN_pad`` is inserted before ``poolN``; every pool input has passed a ReLU, so a zero pad never
wins the max and the pool is exactly a ceil-mode pool.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpar.models import _blocks

# (filters, kernel, stride, padding, local response normalization in the paper, max-pool after)
_CONVS = (
    (96, 11, 4, "valid", True, True),
    (256, 5, 1, "same", True, True),
    (384, 3, 1, "same", False, False),
    (384, 3, 1, "same", False, False),
    (256, 3, 1, "same", False, True),
)
_FC_UNITS = 4096
_POOL_SIZE, _POOL_STRIDE = 3, 2
_NORMALIZATIONS = ("batchnorm", "lrn", None)


def _pool_inputs(size: int) -> list[int]:
    """Spatial sizes entering the three max-pools for an input of `size`; [] if too small."""
    _, kernel, stride, _, _, _ = _CONVS[0]
    if size < kernel:
        return []
    size = (size - kernel) // stride + 1  # conv1 ("valid"); conv2..conv5 keep the size
    sizes = []
    for *_, pool_after in _CONVS:
        if not pool_after:
            continue
        if size < _POOL_SIZE:
            return []
        sizes.append(size)
        size = (size + _ceil_pad(size) - _POOL_SIZE) // _POOL_STRIDE + 1
    return sizes


def _ceil_pad(size: int) -> int:
    """The rows (or columns) a 3x3/2 pool needs at the end to round its output size up."""
    return (size - _POOL_SIZE) % _POOL_STRIDE


# The smallest height/width the layer sizes allow (55), derived from the table above.
MIN_INPUT_SIZE = next(n for n in range(1, 1024) if _pool_inputs(n))
_MIN_SIZE_REASON = "its stride-4 11x11 conv1 and three 3x3/2 max-pools"


@keras.saving.register_keras_serializable(package="tfpar")
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalization across channels (Krizhevsky et al. 2012, section 3.3).

    ``b[..., c] = a[..., c] / (bias + alpha * sum(a[..., c'] ** 2)) ** beta``, the sum running over
    the channels ``c - depth_radius .. c + depth_radius``; channels last. The defaults are the
    paper's (n=5 adjacent channels, k=2, alpha=1e-4, beta=0.75). Computed in float32 under
    mixed precision, since TensorFlow's LRN kernel has no bfloat16 CPU implementation.

    Args:
        depth_radius: Half-width of the channel window (the paper's ``n = 2 * depth_radius + 1``).
        bias: The paper's ``k`` (> 0).
        alpha: Scale of the sum of squares (>= 0).
        beta: Exponent (>= 0).
        **kwargs: Keras layer arguments (``name``, ``dtype``, ...).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range.

    Example:
        >>> layer = tfpar.models.LocalResponseNormalization(name="lrn1")
        >>> layer(keras.ops.ones((1, 4, 4, 8))).shape
        TensorShape([1, 4, 4, 8])
    """

    # Declared here: mypy cannot infer attributes assigned in __init__ of an untyped Keras base class.
    depth_radius: int
    bias: float
    alpha: float
    beta: float

    def __init__(
        self,
        depth_radius: int = 2,
        bias: float = 2.0,
        alpha: float = 1e-4,
        beta: float = 0.75,
        **kwargs: Any,
    ) -> None:
        if not isinstance(depth_radius, numbers.Integral) or isinstance(depth_radius, bool):
            raise TypeError(
                "Expected `depth_radius` to be an int >= 0. "
                f"Received: depth_radius={depth_radius!r} (of type {type(depth_radius).__name__})"
            )
        for arg, value in (("bias", bias), ("alpha", alpha), ("beta", beta)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(
                    f"Expected `{arg}` to be a number. "
                    f"Received: {arg}={value!r} (of type {type(value).__name__})"
                )
        finite = all(math.isfinite(value) for value in (bias, alpha, beta))
        if not finite or depth_radius < 0 or bias <= 0 or alpha < 0 or beta < 0:
            raise ValueError(
                "Expected depth_radius >= 0 and finite bias > 0, alpha >= 0 and beta >= 0 (the paper uses "
                "depth_radius=2, bias=2, alpha=1e-4, beta=0.75). Received: "
                f"depth_radius={depth_radius}, bias={bias}, alpha={alpha}, beta={beta}"
            )
        super().__init__(**kwargs)
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs: Any) -> Any:
        outputs = tf.nn.local_response_normalization(
            tf.cast(inputs, tf.float32),
            depth_radius=self.depth_radius,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )
        return tf.cast(outputs, inputs.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )
        return config


def alexnet(
    input_shape: Sequence[int] = (227, 227, 3),
    num_classes: int = 1000,
    *,
    normalization: str | None = "batchnorm",
    classifier_activation: str | Callable[..., Any] | None = "softmax",
    include_top: bool = True,
    pooling: str | None = None,
    dropout: float = 0.5,
    width: float = 1.0,
    sync_batchnorm: bool = True,
    name: str | None = None,
) -> keras.Model:
    """Builds AlexNet (Krizhevsky et al. 2012, one tower) as a randomly initialized keras.Model.

    Layers, in order, with deterministic names (``poolN_pad`` only where a ceil-mode pool needs
    it, see the module docstring)::

        input, conv1, [bn1, relu1 | lrn1], [pool1_pad], pool1,
               conv2, [bn2, relu2 | lrn2], [pool2_pad], pool2,
               conv3, [bn3, relu3], conv4, [bn4, relu4], conv5, [bn5, relu5], [pool5_pad], pool5,
        flatten, fc1, dropout1, fc2, dropout2, predictions

    ``normalization="batchnorm"`` (default) puts a BatchNormalization after every convolution,
    followed by its ReLU (``conv -> bnN -> reluN``). ``"lrn"`` is the paper: the ReLU is part of the
    convolution and local response normalization follows conv1 and conv2. ``None`` has neither.
    ``dropout1``/``dropout2`` are absent with ``dropout=0``. Builds no placement: build it inside
    ``tfpar.scope(...)`` to train it in parallel.

    Args:
        input_shape: ``(height, width, channels)``, channels last; at least 55x55 (227x227 is the
            paper's).
        num_classes: Number of output classes.
        normalization: ``"batchnorm"``, ``"lrn"`` or None.
        classifier_activation: Activation of ``predictions``; None returns logits.
        include_top: Whether to include ``flatten``, ``fc1``, ``fc2`` and ``predictions``.
        pooling: With ``include_top=False``: None (the ``pool5`` feature map), ``"avg"`` or
            ``"max"`` (a global pooling layer named ``avg_pool``/``max_pool``).
        dropout: Dropout rate after fc1 and fc2 (the paper's 0.5); 0 for none.
        width: Multiplier for the channels of every convolution and the units of fc1/fc2, e.g.
            0.125 for quick CPU experiments; 1.0 is the paper's model.
        sync_batchnorm: Create the BatchNormalization layers with ``synchronized=True``, so their
            statistics are those of the global batch under data parallelism.
        name: Model name; defaults to ``"alexnet"``.

    Returns:
        A new, uncompiled ``keras.Model``.

    Raises:
        TypeError: If an option has the wrong type.
        ValueError: If an option has a wrong value or the input is smaller than 55x55 (the
            message states the minimum and the received shape).

    Example:
        >>> with tfpar.scope("mirrored"):
        ...     model = tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=10, width=0.125)
        ...     model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    """
    shape = _blocks.check_common(
        model="alexnet",
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
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"alexnet: expected `normalization` to be one of {list(_NORMALIZATIONS)} "
            "('lrn' is the paper's local response normalization). "
            f"Received: normalization={normalization!r}"
        )
    _blocks.check_min_size(shape, MIN_INPUT_SIZE, "alexnet", _MIN_SIZE_REASON)
    heights, widths = _pool_inputs(shape[0]), _pool_inputs(shape[1])

    fmt = _blocks.DATA_FORMAT
    batchnorm = normalization == "batchnorm"
    inputs = keras.Input(shape=shape, name="input")
    x = inputs
    pool = 0
    for index, (filters, kernel, stride, padding, paper_lrn, pool_after) in enumerate(_CONVS, 1):
        x = keras.layers.Conv2D(
            _blocks.scaled(filters, width),
            kernel,
            strides=stride,
            padding=padding,
            activation=None if batchnorm else "relu",
            data_format=fmt,
            name=f"conv{index}",
        )(x)
        if batchnorm:
            x = _blocks.batch_norm(f"bn{index}", sync_batchnorm)(x)
            x = keras.layers.Activation("relu", name=f"relu{index}")(x)
        elif normalization == "lrn" and paper_lrn:
            x = LocalResponseNormalization(name=f"lrn{index}")(x)
        if pool_after:
            pad = (_ceil_pad(heights[pool]), _ceil_pad(widths[pool]))
            if any(pad):
                x = keras.layers.ZeroPadding2D(
                    ((0, pad[0]), (0, pad[1])), data_format=fmt, name=f"pool{index}_pad"
                )(x)
            x = keras.layers.MaxPooling2D(
                _POOL_SIZE, _POOL_STRIDE, data_format=fmt, name=f"pool{index}"
            )(x)
            pool += 1

    outputs = _blocks.head(
        x,
        include_top=include_top,
        pooling=pooling,
        fc_units=_blocks.scaled(_FC_UNITS, width),
        num_classes=num_classes,
        classifier_activation=classifier_activation,
        dropout=dropout,
    )
    return keras.Model(inputs, outputs, name=name or "alexnet")


_blocks.declare_min_input_size(alexnet, MIN_INPUT_SIZE, _MIN_SIZE_REASON)
