"""Gradient accumulation that all-reduces once per k steps (Keras's ``gradient_accumulation_steps``).

Keras 3 accumulates gradients in mirrored variables and, under tfpar, the exact-gradients
interception all-reduces every step's gradients before they are accumulated: k all-reduces per
update, the cost accumulation is meant to save (on 2 CPU cores TensorFlow's collective costs
~9 ms per step per worker). Here each replica accumulates its *own* example-weighted gradient sum
and example count in replica-local variables, and every k-th step all-reduces both in one
collective and applies ``sum / count``: exactly one step on the k-times larger batch (also with
partial batches, where Keras's average of k per-step means is not), with k times fewer
all-reduces. The collective cannot sit in a ``tf.cond`` (MirroredStrategy's all-reduce is a
``merge_call``, which control flow does not allow; Keras's own accumulation puts it there), so
the train step is traced twice, an accumulating step and an updating one, and the host calls the
one the optimizer's step counter asks for (:func:`alternating_function`). Used for models of a
managed multi-replica strategy whose optimizer has ``gradient_accumulation_steps=k``, with
``steps_per_execution=1``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import tensorflow as tf

# optimizer -> (gradient accumulators by variable key, example-count accumulator). Kept outside the
# optimizer so that they are not tracked (and not saved) with it: they are replica-local scratch.
_ACCUMULATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def accumulates(model: Any, cross_replica_forward: bool) -> bool:
    """Whether tfpar accumulates for this model (else Keras's own accumulation runs, per step)."""
    optimizer = model.optimizer
    if not getattr(optimizer, "gradient_accumulation_steps", None) or getattr(optimizer, "use_ema", False):
        return False
    if cross_replica_forward or int(model.steps_per_execution) != 1:
        return False  # the loss carries n_r / N (sync BN, loss scaling), or k steps per call
    return not any(getattr(v, "overwrite_with_gradient", False) for v in model.trainable_variables)


def alternating_function(model: Any, accumulate: Callable[[Any], Any], update: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The train function: `update` on every k-th optimizer step, `accumulate` otherwise."""
    optimizer = model.optimizer
    steps = int(optimizer.gradient_accumulation_steps)

    def function(iterator: Any) -> Any:
        done = int(optimizer._iterations.numpy())
        return (update if (done + 1) % steps == 0 else accumulate)(iterator)

    return function


def _accumulators(optimizer: Any, pairs: list[tuple[Any, Any]]) -> tuple[list[tf.Variable], tf.Variable]:
    keys = [optimizer._var_key(variable) for _, variable in pairs]
    known = _ACCUMULATORS.get(optimizer)
    if known is None or any(key not in known[0] for key in keys):
        context = tf.distribute.get_replica_context()
        strategy = context.strategy

        def create(_: Any) -> None:
            with tf.init_scope(), strategy.scope():
                def local(value: tf.Tensor) -> tf.Variable:
                    return tf.Variable(value, trainable=False,
                                       synchronization=tf.VariableSynchronization.ON_READ,
                                       aggregation=tf.VariableAggregation.NONE)

                grads_by_key = dict(known[0]) if known else {}
                for key, (gradient, _) in zip(keys, pairs):
                    if key not in grads_by_key:
                        grads_by_key[key] = local(tf.zeros(gradient.shape, gradient.dtype))
                count = known[1] if known else local(tf.zeros((), tf.float32))
                _ACCUMULATORS[optimizer] = (grads_by_key, count)

        context.merge_call(create)
        known = _ACCUMULATORS[optimizer]
    return [known[0][key] for key in keys], known[1]


def accumulating_apply(
    optimizer: Any,
    grads: list[Any],
    trainable_variables: list[Any],
    local_count: tf.Tensor,
    scaled: Callable[[Any, tf.Tensor], Any],
    update: bool,
) -> None:
    """One train step's ``Optimizer.apply`` with accumulation over k steps (see the module doc).

    Args:
        optimizer: The Keras optimizer (built), with ``gradient_accumulation_steps = k``.
        grads: This replica's gradients of its loss weighted by its example count (the
            exact-gradients convention), not yet all-reduced.
        trainable_variables: The variables, aligned with `grads`.
        local_count: This replica's number of examples in the step.
        scaled: Multiplies a gradient by a scalar (exact-gradients' helper).
        update: Whether this traced step is the k-th (all-reduce and apply) or only accumulates.
    """
    pairs = [(g, v) for g, v in zip(grads, trainable_variables) if g is not None]
    if any(isinstance(g, tf.IndexedSlices) for g, _ in pairs):
        pairs = [(tf.convert_to_tensor(g), v) for g, v in pairs]  # accumulators are dense
    accumulators, count_accumulator = _accumulators(optimizer, pairs)
    sums = [accumulator.read_value() + gradient for accumulator, (gradient, _) in zip(accumulators, pairs)]
    count = count_accumulator.read_value() + tf.cast(local_count, tf.float32)
    if not update:
        for accumulator, total in zip(accumulators, sums):
            accumulator.assign(total)
        count_accumulator.assign(count)
        optimizer._iterations.assign_add(1)
        return
    context = tf.distribute.get_replica_context()
    dtype = sums[0].dtype if sums else tf.float32
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [*sums, tf.cast(count, dtype)])
    inverse = tf.math.reciprocal(reduced[-1])
    mean_grads = [scaled(total, inverse) for total in reduced[:-1]]
    variables = [variable for _, variable in pairs]
    if optimizer.loss_scale_factor is not None:
        mean_grads = [g / optimizer.loss_scale_factor for g in mean_grads]
    mean_grads = optimizer._clip_gradients(mean_grads)
    optimizer._apply_weight_decay(variables)
    optimizer._backend_update_step(mean_grads, variables, optimizer.learning_rate)
    for variable in variables:
        if variable.constraint is not None:
            variable.assign(variable.constraint(variable))
    for accumulator in accumulators:
        accumulator.assign(tf.zeros_like(accumulator))
    count_accumulator.assign(0.0)
    optimizer._iterations.assign_add(1)
