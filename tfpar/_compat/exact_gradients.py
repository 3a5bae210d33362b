"""exact-gradients: the single-device gradient when a batch does not split evenly over replicas.

Keras 3 scales each replica's *local mean* loss by ``1 / num_replicas`` and sums the gradients
over replicas: the global mean only when every replica holds as many examples as the others
(keras-team/keras#19891, fixed for even splits only; tensorflow/tensorflow#36153). tfpar scales
each replica's local mean loss by its example count ``n_r`` (backprop does the weighting),
all-reduces the counts *with* the gradients (no extra collective) and scales by ``1 / N``:
``sum_r n_r * grad(mean_r) / N`` is the single-device gradient. The reduction happens in
``Optimizer.apply``, before loss scaling checks, clipping and accumulation. When the forward pass
communicates (synchronized BatchNormalization) or backprop runs in float16 (a loss-scale
optimizer), the weight ``n_r / N`` goes on the loss instead (one scalar all-reduce per step).
The train step is wrapped by the step-function interception (:func:`exact_train_step`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tfpar._compat import _patching, accumulation, internals

_LOSS = "keras.src.losses.loss"
_OPTIMIZER = "keras.src.backend.tensorflow.optimizer:TFOptimizer"
SCALE_LOSS = f"{_LOSS}:scale_loss_for_distribution"
UNSCALE_LOSS = f"{_LOSS}:unscale_loss_for_distribution"
APPLY = f"{_OPTIMIZER}.apply"
LOSS_SCALE_APPLY = "keras:optimizers.LossScaleOptimizer.apply"
ALL_REDUCE = f"{_OPTIMIZER}._all_reduce_sum_gradients"


@dataclasses.dataclass
class _ReplicaStep:
    """What one replica's train step knows while it is being traced."""

    count: tf.Tensor  # local number of examples, float32
    # Set when the forward pass itself communicates across replicas (synchronized
    # BatchNormalization): then the loss must carry its weight n_r / N *before* backprop.
    global_count: tf.Tensor | None = None
    keras_loss: bool = False  # a Keras loss went through scale_loss_for_distribution
    # Gradient accumulation (tfpar/_compat/accumulation.py): this traced step only accumulates
    # ("accumulate") or all-reduces the k steps' sums and applies them ("update").
    accumulation_mode: str | None = None
    reduced_apply: bool = False  # inside an apply whose gradients tfpar already all-reduced

    def loss_factor(self) -> tf.Tensor:
        """What the local mean loss is multiplied by: n_r / N, or n_r until the all-reduce."""
        if self.global_count is None:
            return self.count
        return tf.math.divide_no_nan(self.count, self.global_count)


# Keyed by replica, not thread-local: MirroredStrategy traces each replica in its own thread.
_STEPS: dict[tuple[int, int], _ReplicaStep] = {}


def _replica_key() -> tuple[int, int] | None:
    context = tf.distribute.get_replica_context()
    if context is None:
        return None
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is None:
        return None
    return id(context.strategy), int(replica_id)


def _current_step() -> _ReplicaStep | None:
    key = _replica_key()
    return None if key is None else _STEPS.get(key)


def _local_batch_size(data: Any) -> tf.Tensor:
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    first = next(t for t in tf.nest.flatten(x, expand_composites=False) if t is not None)
    if isinstance(first, tf.SparseTensor):
        size = first.dense_shape[0]
    elif isinstance(first, tf.RaggedTensor):
        size = first.nrows()
    else:
        size = tf.shape(first)[0]
    return tf.cast(size, tf.float32)


def needs_weighted_loss(model: Any) -> bool:
    """Whether the per-replica weight ``n_r / N`` must go on the loss itself.

    That costs one scalar all-reduce per step, and is needed when (a) synchronized
    BatchNormalization all-reduces batch moments in the forward pass, so gradients of one
    replica's loss reach the others through it; or (b) a loss-scale optimizer (mixed_float16)
    backpropagates in float16, where the unweighted local mean of a tiny partial batch times the
    loss scale overflows where the single-device loss would not.
    """
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        return True
    return any(getattr(layer, "synchronized", False) for layer in internals.batchnorm_layers(model))


def exact_train_step(
    step_function: Callable[[Any], Any], cross_replica_forward: bool, accumulation_mode: str | None = None
) -> Callable[[Any], Any]:
    """Wraps a replica's train step so that its loss and gradients are weighted exactly."""

    @functools.wraps(step_function)
    def train_step(data: Any) -> Any:
        key = _replica_key()
        if key is None:
            return step_function(data)
        step = _ReplicaStep(count=_local_batch_size(data), accumulation_mode=accumulation_mode)
        if cross_replica_forward:
            step.global_count = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, step.count
            )
        _STEPS[key] = step
        try:
            return step_function(data)
        finally:
            _STEPS.pop(key, None)

    return train_step


def _scale_loss_for_distribution(value: Any) -> Any:
    step = _current_step()
    if step is None:
        return INTERCEPTION.original(SCALE_LOSS)(value)
    step.keras_loss = True
    return value * tf.cast(step.loss_factor(), value.dtype)


def _unscale_loss_for_distribution(value: Any) -> Any:
    step = _current_step()
    if step is None:
        return INTERCEPTION.original(UNSCALE_LOSS)(value)
    return tf.math.divide_no_nan(value, tf.cast(step.loss_factor(), value.dtype))


def _scaled(gradient: Any, factor: tf.Tensor) -> Any:
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(_scaled(gradient.values, factor), gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def _global_mean_gradients(grads: list[Any], step: _ReplicaStep) -> list[Any]:
    """All-reduces gradients so every replica holds the single-device gradient."""
    present = [i for i, g in enumerate(grads) if g is not None]
    context = tf.distribute.get_replica_context()
    out = list(grads)
    if step.global_count is not None:
        # The loss already carried n_r / N: a plain sum is the global mean gradient.
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        for position, index in enumerate(present):
            out[index] = reduced[position]
        return out
    # The loss carried n_r (backprop did the weighting for free): sum the gradients and the counts
    # in the same batch all-reduce (no extra collective), then scale once by 1 / N.
    # The count travels in the gradients' dtype: a batch all-reduce packs (concatenates) tensors.
    dtype = grads[present[0]].dtype if present else tf.float32
    count = tf.cast(step.count, dtype)
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present] + [count])
    inverse = tf.math.reciprocal(reduced[-1])
    for position, index in enumerate(present):
        out[index] = _scaled(reduced[position], inverse)
    return out


def _reduced_apply(target: str) -> Callable[..., Any]:
    # Optimizer.apply is the entry of every gradient update (apply_gradients calls it). tfpar
    # all-reduces there, first, so the loss-scale finiteness check, clipping, weight decay and
    # gradient accumulation all see the global gradient, as on one device.
    def apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
        upstream = INTERCEPTION.original(target)
        step = _current_step()
        if step is None or not step.keras_loss or step.reduced_apply:
            return upstream(self, grads, trainable_variables)
        grads = list(grads)
        if step.accumulation_mode is not None and target == APPLY and trainable_variables is not None:
            # gradient_accumulation_steps=k: one all-reduce per k steps (tfpar/_compat/accumulation.py)
            step.reduced_apply = True
            try:
                return accumulation.accumulating_apply(
                    self, grads, list(trainable_variables), step.count, _scaled, step.accumulation_mode == "update"
                )
            finally:
                step.reduced_apply = False
        grads = _global_mean_gradients(grads, step)
        step.reduced_apply = True
        try:
            return upstream(self, grads, trainable_variables)
        finally:
            step.reduced_apply = False

    return apply


def _all_reduce_sum_gradients(self: Any, grads_and_vars: Any) -> Any:
    step = _current_step()
    if step is not None and step.reduced_apply:
        return list(grads_and_vars)  # already all-reduced (and averaged) by tfpar
    return INTERCEPTION.original(ALL_REDUCE)(self, grads_and_vars)


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="exact-gradients",
    summary="exact gradients when a batch does not split evenly over the replicas (each replica's "
    "loss weighted by its example count, counts all-reduced with the gradients)",
    targets=(SCALE_LOSS, UNSCALE_LOSS, APPLY, LOSS_SCALE_APPLY, ALL_REDUCE),
    upstream_issue="keras-team/keras#19891, tensorflow/tensorflow#36153",
    test="tests/test_exactness.py::test_numpy_fit_matches_single_device",
    patches={
        SCALE_LOSS: _scale_loss_for_distribution,
        UNSCALE_LOSS: _unscale_loss_for_distribution,
        APPLY: _reduced_apply(APPLY),
        LOSS_SCALE_APPLY: _reduced_apply(LOSS_SCALE_APPLY),
        ALL_REDUCE: _all_reduce_sum_gradients,
    },
))
