"""optimizer-build: custom training loops build the optimizer outside the traced step.

A Keras 3 optimizer creates its slot variables (Adam's moments, ...) the first time it is used.
In a custom training loop that first use is ``optimizer.apply_gradients`` inside
``strategy.run`` inside a ``tf.function`` (TensorFlow's custom-training tutorial). There, under
MirroredStrategy and MultiWorkerMirroredStrategy, the mirrored slot variable of replica 1 is
initialized from replica 0's, a tensor of the function being traced, and the first step fails
with "You must feed a value for placeholder tensor 'cond/else/_1/cond/Placeholder'"
(keras-team/keras#19246; the workaround is ``optimizer.build(model.trainable_variables)`` before
the loop). Under a tfpar strategy the first ``apply`` in a replica of a traced function builds the
optimizer itself, once, outside the function (``merge_call``, then ``tf.init_scope`` under the
strategy's scope): exactly what the workaround does, at the point the tutorial's code reaches.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from keras.src import utils

from tfpar._compat import _context, _patching

APPLY = "keras.src.backend.tensorflow.optimizer:TFOptimizer.apply"  # exact-gradients patches it too
MAYBE_BUILD = "keras.src.layers.layer:Layer._maybe_build"


def _replica_context_to_build_in(built_object: Any) -> Any:
    """The replica context of a traced, managed multi-replica step that must build `built_object`."""
    if built_object.built or tf.executing_eagerly():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or not _context.is_managed(context.strategy):
        return None
    if context.num_replicas_in_sync == 1:
        return None
    return context


def _apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
    upstream = INTERCEPTION.original(APPLY)
    context = None if trainable_variables is None else _replica_context_to_build_in(self)
    if context is None:
        return upstream(self, grads, trainable_variables)
    trainable_variables = list(trainable_variables)
    strategy = context.strategy

    def build(_: Any) -> None:
        # Cross-replica context, once for all replicas; the variables are created eagerly.
        with tf.init_scope(), strategy.scope():
            if not self.built:
                from keras.src import backend

                with backend.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True

    context.merge_call(build)
    return upstream(self, grads, trainable_variables)


def _maybe_build(self: Any, call_spec: Any) -> Any:
    upstream = INTERCEPTION.original(MAYBE_BUILD)
    context = _replica_context_to_build_in(self)
    if context is None or utils.is_default(self.build):
        # A layer without its own build() is built by tracing its call symbolically; the
        # layers it calls come through here with their own build().
        return upstream(self, call_spec)
    strategy = context.strategy

    def build(_: Any) -> None:
        with tf.init_scope(), strategy.scope():
            upstream(self, call_spec)

    context.merge_call(build)
    return None


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="optimizer-build",
    summary="custom training loops: the optimizer is built outside the traced step on first use "
    "(mirrored slot variables would be initialized from a tensor of the function)",
    targets=(APPLY, MAYBE_BUILD),
    upstream_issue="keras-team/keras#19246",
    test="tests/test_custom_loops.py::test_tutorial_custom_loop_trains_without_building_first",
    patches={APPLY: _apply, MAYBE_BUILD: _maybe_build},
))
