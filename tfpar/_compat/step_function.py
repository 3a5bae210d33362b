"""step-function: the train step of a managed model, and ``steps_per_execution > 1``.

Keras builds its train/test/predict functions in ``TensorFlowTrainer._make_function``. For models
of a managed multi-replica strategy tfpar wraps the train step for exact gradients
(exact-gradients), warns about unsynchronized BatchNormalization (batchnorm-default), lets a
resumed epoch skip the steps its backup already holds (exact-resume), and runs
``steps_per_execution > 1`` with the per-step function inlined: upstream traces a nested
``tf.function`` per step inside a ``tf.while_loop`` over ``tf.experimental.Optional`` values and
fails with "You must feed a value for placeholder tensor ... while/cond" (keras-team/keras#19246).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar._compat import _context, _patching, accumulation, batchnorm, exact_gradients, resume

MAKE_FUNCTION = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer._make_function"


def _make_function(self: Any, step_function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    upstream = INTERCEPTION.original(MAKE_FUNCTION)
    strategy = self.distribute_strategy
    if not _context.is_managed(strategy):
        return upstream(self, step_function)
    training = getattr(step_function, "__name__", "") == "train_step"
    if training and strategy.num_replicas_in_sync > 1:
        batchnorm.warn_unsynchronized_batchnorm(self, strategy)
        cross_replica_forward = exact_gradients.needs_weighted_loss(self)
        if accumulation.accumulates(self, cross_replica_forward):
            function = accumulation.alternating_function(
                self,
                upstream(self, exact_gradients.exact_train_step(step_function, cross_replica_forward, "accumulate")),
                upstream(self, exact_gradients.exact_train_step(step_function, cross_replica_forward, "update")),
            )
            return resume.skipping(self, function)
        step_function = exact_gradients.exact_train_step(step_function, cross_replica_forward)
    if self.steps_per_execution == 1 or strategy.num_replicas_in_sync == 1:
        function = upstream(self, step_function)
    else:
        # Multi-replica only (upstream fails there); the per-step function is inlined, so XLA
        # (jit_compile) is not applied to it.
        function = _multi_step_function(self, step_function, strategy)
    return resume.skipping(self, function) if training else function


def _multi_step_function(
    model: Any, step_function: Callable[[Any], Any], strategy: tf.distribute.Strategy
) -> Callable[[Any], Any]:
    from keras.src.backend.tensorflow import trainer as tf_trainer

    steps = int(model.steps_per_execution)

    def one_step_on_data(data: Any) -> Any:
        outputs = strategy.run(step_function, args=(data,))
        return tf_trainer.reduce_per_replica(outputs, strategy, reduction="auto")

    def multi_step_on_iterator(iterator: Any) -> Any:
        # The per-step function is inlined (not a nested tf.function): a nested one inside the
        # while loop is what fails upstream (keras-team/keras#19246).
        outputs = one_step_on_data(iterator.get_next())
        for _ in tf.range(steps - 1):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            outputs = one_step_on_data(optional.get_value())
        return outputs

    if not model.run_eagerly:
        multi_step_on_iterator = tf.function(multi_step_on_iterator, reduce_retracing=True)
        single_step = tf.function(one_step_on_data, reduce_retracing=True)
    else:
        single_step = one_step_on_data

    def function(iterator: Any) -> Any:
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            return multi_step_on_iterator(iterator)
        outputs = None
        for _, data in zip(range(steps), iterator):
            outputs = single_step(data)
        return outputs

    return function


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="step-function",
    summary="steps_per_execution > 1 under MirroredStrategy (the per-step function inlined); the "
    "exact, resumable train step of managed models",
    targets=(MAKE_FUNCTION,),
    upstream_issue="keras-team/keras#19246",
    test="tests/test_steps_per_execution.py::test_tfpar_mirrored_steps_per_execution_is_exact",
    patches={MAKE_FUNCTION: _make_function},
))
