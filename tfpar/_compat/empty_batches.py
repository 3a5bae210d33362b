"""empty-batches: conv and pooling layers skip empty replica batches on CPU.

A final batch smaller than the replica count leaves some replicas with 0 examples. TF 2.21's
oneDNN CPU kernels mishandle that: Conv2D / DepthwiseConv2D return their *input* (shape
(0, 16, 16, 3) instead of (0, 16, 16, 8)), so the next layer fails with "input depth must be
evenly divisible by filter depth", and MaxPool's gradient aborts the process ("Check failed:
dtype() == expected_dtype"). On CPU-only hosts, under a multi-replica tfpar strategy, these layers
skip their kernels on an empty batch (a tf.cond that keeps conv + bias + activation fused inside
the taken branch). The guard costs time on CPU, so it is traced in (with a warning) only when the
input can leave a replica empty: arrays whose last batch splits that way, and datasets whose
batches can (``drop_remainder=True``, an input that repeats forever and a known size whose last
batch splits fine are safe; a pipeline tfpar cannot read is guarded); ``TensorFlowTrainer.evaluate`` / ``predict`` are wrapped to know which model's input
that is (``fit``'s own wrapper is shared-shuffle's). No upstream issue found.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar._compat import _context, _patching, internals

_CONV = "keras.src.layers.convolutional"
LAYER_CALLS = (
    f"{_CONV}.base_conv:BaseConv.call",
    f"{_CONV}.base_conv_transpose:BaseConvTranspose.call",
    f"{_CONV}.base_depthwise_conv:BaseDepthwiseConv.call",
    f"{_CONV}.base_separable_conv:BaseSeparableConv.call",
    "keras.src.layers.pooling.base_pooling:BasePooling.call",
)
EVALUATE = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer.evaluate"
PREDICT = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer.predict"


def _guard_empty_batches() -> bool:
    context = tf.distribute.get_replica_context()
    return (
        context is not None
        and context.num_replicas_in_sync > 1
        and not tf.executing_eagerly()
        and _context.is_managed(context.strategy)
        and not tf.config.list_physical_devices("GPU")
    )


def _ceil_split_leaves_empty(batch: int, replicas: int) -> bool:
    # tf.distribute splits a batch of b into pieces of ceil(b / R): b=5 on 4 replicas is 2/2/1/0.
    return batch > 0 and -(-batch // replicas) * (replicas - 1) >= batch


def _empty_replicas_possible(adapter: Any, dataset: tf.data.Dataset, replicas: int) -> bool:
    from keras.src.trainers.data_adapters import array_data_adapter

    if replicas == 1:
        return False
    if isinstance(adapter, array_data_adapter.ArrayDataAdapter):
        full, last = int(adapter._batch_size), int(adapter._num_samples) % int(adapter._batch_size)
        return _ceil_split_leaves_empty(full, replicas) or _ceil_split_leaves_empty(last, replicas)
    leaves = [spec for spec in tf.nest.flatten(dataset.element_spec) if getattr(spec, "shape", None) is not None]
    batch = leaves[0].shape[0] if leaves and leaves[0].shape.rank else None
    if batch is not None:
        return _ceil_split_leaves_empty(int(batch), replicas)
    from tfpar.data import _batch_sizes

    # No static batch size (batch() without drop_remainder): read the pipeline. A batch of an
    # input that repeats forever, or of n examples where n % b splits fine, is safe.
    sizes = _batch_sizes.batch_sizes(dataset)
    if sizes is None:
        return True  # tfpar cannot tell: guard
    return any(_ceil_split_leaves_empty(size, replicas) for size in sizes)


def maybe_guard_empty_batches(adapter: Any, dataset: tf.data.Dataset, strategy: Any) -> None:
    """Turns the empty-batch guard on for the running model when its data can leave a replica empty.

    The guard costs real time on CPU (a tf.cond per conv/pooling layer breaks oneDNN's layout
    chaining), so it is only traced in when the input can produce a replica batch of 0 examples:
    arrays whose last batch splits that way, or a dataset whose batch size is not static.
    """
    model = _context.running_model()
    if model is None or getattr(model, "_tfpar_empty_guard", False) or tf.config.list_physical_devices("GPU"):
        return
    if not _empty_replicas_possible(adapter, dataset, strategy.num_replicas_in_sync):
        return
    layers = [layer for layer in internals.flat_layers(model) if _guarded_layer(layer)]
    if not layers:
        return
    for layer in layers:
        layer._tfpar_empty_guard = True
    model._tfpar_empty_guard = True
    warnings.warn(
        f"tfpar: on {strategy.num_replicas_in_sync} replicas this input can give a replica an empty "
        f"batch, which TensorFlow's oneDNN CPU kernels mishandle; the {len(layers)} conv/pooling "
        f"layers of model {model.name!r} now skip empty batches, at some cost in speed on CPU. To "
        "avoid it, use a dataset batched with drop_remainder=True, or a batch size whose last "
        "batch covers every replica.",
        stacklevel=2,
    )
    # Functions traced without the guard are traced again with it.
    model.train_function = model.test_function = model.predict_function = None


def _guarded_layer(layer: Any) -> bool:
    return isinstance(layer, _guarded_classes())


@functools.cache
def _guarded_classes() -> tuple[type, ...]:
    return tuple(_patching.resolve(target)[0] for target in LAYER_CALLS)


def _empty_safe(target: str) -> Callable[..., Any]:
    """A layer `call` that returns an empty batch of the right shape for an empty input batch."""

    def call(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        upstream = INTERCEPTION.original(target)
        if (
            not getattr(self, "_tfpar_empty_guard", False)
            or not isinstance(inputs, tf.Tensor)
            or not _guard_empty_batches()
        ):
            return upstream(self, inputs, *args, **kwargs)
        try:
            shape = tuple(self.compute_output_shape(tuple(inputs.shape)))
        except Exception:  # noqa: BLE001 - a layer that cannot say: leave it as upstream has it
            return upstream(self, inputs, *args, **kwargs)
        if any(dim is None for dim in shape[1:]):
            return upstream(self, inputs, *args, **kwargs)
        return tf.cond(
            tf.shape(inputs)[0] > 0,
            lambda: upstream(self, inputs, *args, **kwargs),
            lambda: tf.zeros((0, *shape[1:]), dtype=self.compute_dtype),
        )

    return call


def _evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
    with _context.running(self):
        return INTERCEPTION.original(EVALUATE)(self, *args, **kwargs)


def _predict(self: Any, *args: Any, **kwargs: Any) -> Any:
    with _context.running(self):
        return INTERCEPTION.original(PREDICT)(self, *args, **kwargs)


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="empty-batches",
    summary="CNNs train when a replica's share of the final batch is empty (CPU): conv and pooling "
    "layers skip their oneDNN kernels on an empty batch",
    targets=(*LAYER_CALLS, EVALUATE, PREDICT),
    upstream_issue="none found: TF 2.21 oneDNN CPU kernels on empty batches",
    test="tests/test_exactness.py::test_cnn_with_empty_replicas_matches_single_device",
    patches={**{target: _empty_safe(target) for target in LAYER_CALLS}, EVALUATE: _evaluate, PREDICT: _predict},
))
