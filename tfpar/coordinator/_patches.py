"""The parameter-server interceptions, owned by the coordinator, installed through tfpar._compat.

They act only on models and variables of a ParameterServerStrategy tfpar manages
(``tfpar._compat.is_managed_ps``) and are installed by :func:`tfpar.coordinator.enable`:

* ``ps-loops``: Keras 3 has no parameter-server path (keras-team/keras#18624: the trainer never
  creates a ClusterCoordinator and fails with "To use this dataset, you need to pass this dataset
  to ClusterCoordinator.create_per_worker_dataset"). ``fit`` / ``evaluate`` / ``predict`` of such
  models run the coordinator's loops; other models go on to the layer below (Keras, or
  shared-shuffle's fit and empty-batches' evaluate / predict, which pass these models through).
* ``atomic-counters``: Keras 3's ``Variable.assign_add`` is ``assign(self + value)``, a
  read-modify-write that concurrent workers race on (steps, metric counts and Adam's bias
  correction lose updates). Inside parameter-server closures ``assign_add`` / ``assign_sub``
  become the variable's own atomic op on the ps, and ``v.assign(v + delta)`` (Keras's
  confusion-matrix metrics, IoU, R2Score) becomes ``v.assign_add(delta)``.
* ``sharded-variables``: with a ``variable_partitioner`` ParameterServerStrategy creates
  ShardedVariables, which Keras 3 cannot train, save or look up (tf-keras unwrapped them). tfpar
  differentiates with respect to the shards, shards optimizer slots like their variable, updates
  shard by shard, converts to numpy, and looks embeddings up shard-wise (only the rows a batch
  uses travel to the worker).
* ``coordinator-shutdown``: after a worker was lost and came back, TF 2.21's
  ``ClusterCoordinator.__del__`` waits forever at interpreter exit for a lock the frozen
  ``WorkerPreemptionHandler`` thread holds. An ``atexit`` hook stops the coordinators of tracked
  strategies while threads still run, and makes the second stop in ``__del__`` a no-op.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar import _compat
from tfpar.coordinator._evaluate import evaluate
from tfpar.coordinator._fit import fit
from tfpar.coordinator._predict import predict

_TRAINER = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer"
FIT, EVALUATE, PREDICT = f"{_TRAINER}.fit", f"{_TRAINER}.evaluate", f"{_TRAINER}.predict"
_VARIABLE = "keras.src.backend.tensorflow.core:Variable"
ASSIGN_ADD, ASSIGN_SUB, ASSIGN = f"{_VARIABLE}.assign_add", f"{_VARIABLE}.assign_sub", f"{_VARIABLE}.assign"
ADD, RADD, ARRAY = f"{_VARIABLE}.__add__", f"{_VARIABLE}.__radd__", f"{_VARIABLE}.__array__"
TAKE = "keras.src.backend.tensorflow.numpy:take"
GRADIENT = "tensorflow:GradientTape.gradient"
_OPTIMIZER = "keras.src.backend.tensorflow.optimizer:TFOptimizer"
SLOT = f"{_OPTIMIZER}.add_variable_from_reference"
UPDATE_STEP = f"{_OPTIMIZER}._distributed_tf_update_step"
_CLUSTER = "tensorflow.python.distribute.coordinator.cluster_coordinator"
COORDINATOR_DEL, CLUSTER_STOP = f"{_CLUSTER}:ClusterCoordinator.__del__", f"{_CLUSTER}:Cluster.stop"

_RMW_ATTRIBUTE = "_tfpar_read_modify_write"
_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


# === ps-loops ===


def _routed(model: Any) -> bool:
    return _compat.is_managed_ps(getattr(model, "_distribute_strategy", None))


def _routed_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
    if not _routed(self):
        return LOOPS.original(FIT)(self, *args, **kwargs)
    return fit(self, *args, **kwargs)


def _routed_evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
    if not _routed(self):
        return LOOPS.original(EVALUATE)(self, *args, **kwargs)
    return evaluate(self, *args, **kwargs)


def _routed_predict(self: Any, *args: Any, **kwargs: Any) -> Any:
    if not _routed(self):
        return LOOPS.original(PREDICT)(self, *args, **kwargs)
    return predict(self, *args, **kwargs)


# === atomic-counters ===


def _in_managed_ps_closure() -> bool:
    """Whether the current code runs in a replica context of a managed ParameterServerStrategy."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return _compat.is_managed_ps(tf.distribute.get_strategy())


def _atomic(variable: Any) -> bool:
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return variable._value is not None and not in_stateless_scope() and _in_managed_ps_closure()


def _assign_add(self: Any, value: Any) -> Any:
    if not _atomic(self):
        return ATOMIC_COUNTERS.original(ASSIGN_ADD)(self, value)
    delta = tf.cast(self._convert_to_tensor(value, dtype=self._dtype), self._value.dtype)
    return self._value.assign_add(delta)


def _assign_sub(self: Any, value: Any) -> Any:
    if not _atomic(self):
        return ATOMIC_COUNTERS.original(ASSIGN_SUB)(self, value)
    delta = tf.cast(self._convert_to_tensor(value, dtype=self._dtype), self._value.dtype)
    return self._value.assign_sub(delta)


def _tag_sum(self: Any, other: Any, result: Any) -> Any:
    # Remember that `result` is `self + other`, so that `self.assign(result)` can become atomic.
    if isinstance(result, tf.Tensor) and not isinstance(other, keras.Variable) and _atomic(self):
        try:
            setattr(result, _RMW_ATTRIBUTE, (weakref.ref(self), other))
        except AttributeError:  # an eager tensor or a type without attributes: nothing to tag
            pass
    return result


def _add(self: Any, other: Any) -> Any:
    return _tag_sum(self, other, ATOMIC_COUNTERS.original(ADD)(self, other))


def _radd(self: Any, other: Any) -> Any:
    return _tag_sum(self, other, ATOMIC_COUNTERS.original(RADD)(self, other))


def _assign(self: Any, value: Any) -> Any:
    tag = getattr(value, _RMW_ATTRIBUTE, None) if isinstance(value, tf.Tensor) else None
    if tag is not None and tag[0]() is self and _atomic(self):
        delta = tf.cast(self._convert_to_tensor(tag[1], dtype=self._dtype), self._value.dtype)
        delta = tf.broadcast_to(delta, self._value.shape)
        return self._value.assign_add(delta)
    return ATOMIC_COUNTERS.original(ASSIGN)(self, value)


# === sharded-variables ===


def _sharded_value(variable: Any) -> Any:
    """The ShardedVariable behind a Keras variable of a managed strategy, else None."""
    from tensorflow.python.distribute import sharded_variable

    value = getattr(variable, "_value", None)
    if not isinstance(value, sharded_variable.ShardedVariable):
        return None
    strategy = getattr(value, "_distribute_strategy", None)
    return value if _compat.is_managed_ps(strategy) else None


def _is_sharded(variable: Any) -> bool:
    return isinstance(variable, keras.Variable) and _sharded_value(variable) is not None


def _gradient(
    self: Any,
    target: Any,
    sources: Any,
    output_gradients: Any = None,
    unconnected_gradients: Any = tf.UnconnectedGradients.NONE,
) -> Any:
    upstream = SHARDED_VARIABLES.original(GRADIENT)
    flat = tf.nest.flatten(sources)
    if not any(_is_sharded(source) for source in flat):
        return upstream(self, target, sources, output_gradients, unconnected_gradients)
    expanded = [list(_sharded_value(s).variables) if _is_sharded(s) else s for s in flat]
    gradients = upstream(self, target, expanded, output_gradients, unconnected_gradients)
    joined = [
        _join_shard_gradients(source, list(gradient)) if _is_sharded(source) else gradient
        for source, gradient in zip(flat, gradients)
    ]
    return tf.nest.pack_sequence_as(sources, joined)


def _join_shard_gradients(source: Any, parts: list[Any]) -> Any:
    """One gradient for the whole variable from its shards' gradients (first-axis shards)."""
    shards = _sharded_value(source).variables
    if all(part is None for part in parts):
        return None
    if not any(isinstance(part, tf.IndexedSlices) for part in parts):
        return tf.concat(
            [tf.zeros_like(shard) if part is None else part for shard, part in zip(shards, parts)], axis=0
        )
    values, indices, offset = [], [], 0
    for shard, part in zip(shards, parts):
        if part is not None:
            if not isinstance(part, tf.IndexedSlices):
                part = tf.IndexedSlices(part, tf.range(tf.shape(part, out_type=tf.int64)[0]))
            values.append(part.values)
            indices.append(tf.cast(part.indices, tf.int64) + offset)
        offset += int(shard.shape[0])
    return tf.IndexedSlices(
        tf.concat(values, axis=0), tf.concat(indices, axis=0), tf.constant(list(source.shape), tf.int64)
    )


def _add_variable_from_reference(
    self: Any, reference_variable: Any, name: Any = None, initializer: Any = "zeros"
) -> Any:
    if not _is_sharded(reference_variable):
        return SHARDED_VARIABLES.original(SLOT)(self, reference_variable, name, initializer)
    # Upstream colocates the slot with its variable, which turns off partitioning: the slot of a
    # sharded embedding would be one full-size variable on one ps. Created without colocation,
    # the strategy's partitioner shards it exactly like the variable (same shape and dtype).
    from keras.src.optimizers import base_optimizer

    return base_optimizer.BaseOptimizer.add_variable_from_reference(
        self, reference_variable, name=name, initializer=initializer
    )


def _distributed_tf_update_step(self: Any, distribution: Any, grads_and_vars: Any, learning_rate: Any) -> Any:
    from tensorflow.python.distribute import sharded_variable

    upstream = SHARDED_VARIABLES.original(UPDATE_STEP)
    pairs = list(grads_and_vars)
    sharded = [
        (g, v) for g, v in pairs
        if isinstance(v, sharded_variable.ShardedVariable)
        and _compat.is_managed_ps(getattr(v, "_distribute_strategy", None))
    ]
    if not sharded:
        return upstream(self, distribution, pairs, learning_rate)
    # strategy.extended.update colocates with the variable, which a ShardedVariable refuses; its
    # assign/scatter methods place each shard's update on that shard's ps themselves.
    for gradient, variable in sharded:
        self.update_step(gradient, variable, learning_rate)
    plain = [(g, v) for g, v in pairs if not any(v is s for _, s in sharded)]
    return upstream(self, distribution, plain, learning_rate)


def _array(self: Any, dtype: Any = None, copy: Any = None) -> Any:
    value = _sharded_value(self)
    if value is None:
        return SHARDED_VARIABLES.original(ARRAY)(self, dtype)
    return np.asarray(value.numpy(), dtype=dtype)


def _take(x: Any, indices: Any, axis: Any = None) -> Any:
    upstream = SHARDED_VARIABLES.original(TAKE)
    value = _sharded_value(x) if isinstance(x, keras.Variable) else None
    if value is None or axis != 0 or isinstance(indices, (tf.SparseTensor, tf.RaggedTensor)):
        return upstream(x, indices, axis=axis)
    ids = tf.convert_to_tensor(indices)
    if not ids.dtype.is_integer:
        return upstream(x, indices, axis=axis)
    rows = tf.cast(value.shape[0], ids.dtype)
    ids = tf.where(ids < 0, ids + rows, ids)  # Keras's "fill" handling of negative indices
    result = tf.nn.embedding_lookup(value, ids)
    return tf.cast(result, x.dtype) if result.dtype != tf.as_dtype(x.dtype) else result


# === coordinator-shutdown ===


def track(strategy: tf.distribute.ParameterServerStrategy) -> None:
    """Stops the strategy's ClusterCoordinator (if any) at exit, before finalization."""
    _TRACKED.add(strategy)


def _stop_coordinators() -> None:
    for strategy in list(_TRACKED):
        item = getattr(strategy, "_cluster_coordinator", None)
        cluster = getattr(item, "_cluster", None)
        if cluster is None:
            continue
        stopper = threading.Thread(target=cluster.stop, name="tfpar-coordinator-stop", daemon=True)
        stopper.start()
        stopper.join(timeout=10)
        # ClusterCoordinator.__del__ calls stop() again during finalization; after a successful
        # stop that second call no longer waits, and after a failed one it must not run at all.
        item.__class__ = _StoppedCoordinator


class _StoppedCoordinator(tf.distribute.coordinator.ClusterCoordinator):
    """A ClusterCoordinator whose cluster tfpar already stopped (no second stop in ``__del__``)."""

    def __del__(self) -> None:
        return None


# === Declarations ===

_PS_TEST = "tests/test_parameter_server.py::"

LOOPS = _compat.Interception(
    slug="ps-loops",
    summary="Keras 3 fit / evaluate / predict under ParameterServerStrategy run a ClusterCoordinator loop",
    targets=(FIT, EVALUATE, PREDICT),
    upstream_issue="keras-team/keras#18624",
    test=_PS_TEST + "test_fit_on_arrays_trains_every_example_exactly_once_per_epoch",
    patches={FIT: _routed_fit, EVALUATE: _routed_evaluate, PREDICT: _routed_predict},
)
ATOMIC_COUNTERS = _compat.Interception(
    slug="atomic-counters",
    summary="exact optimizer.iterations and metric accumulators under concurrent workers (atomic "
    "assign_add on the parameter servers)",
    targets=(ASSIGN_ADD, ASSIGN_SUB, ASSIGN, ADD, RADD),
    upstream_issue="keras-team/keras#18624 (aggregation); read-modify-write in KerasVariable.assign_add",
    test=_PS_TEST + "test_iterations_and_metrics_count_every_step",
    patches={ASSIGN_ADD: _assign_add, ASSIGN_SUB: _assign_sub, ASSIGN: _assign, ADD: _add, RADD: _radd},
)
SHARDED_VARIABLES = _compat.Interception(
    slug="sharded-variables",
    summary="variable_partitioner: Keras trains, saves and looks up sharded variables (embedding "
    "lookups read only the rows a batch uses)",
    targets=(GRADIENT, SLOT, UPDATE_STEP, ARRAY, TAKE),
    upstream_issue="none: Keras 3 has no ShardedVariable support; tf-keras had it",
    test=_PS_TEST + "test_sharded_training_equals_training_in_one_process",
    patches={GRADIENT: _gradient, SLOT: _add_variable_from_reference, UPDATE_STEP: _distributed_tf_update_step,
             ARRAY: _array, TAKE: _take},
)
def _register_shutdown() -> None:
    atexit.register(_stop_coordinators)


COORDINATOR_SHUTDOWN = _compat.Interception(
    slug="coordinator-shutdown",
    summary="the coordinator process exits after a worker was lost and restarted (its ClusterCoordinator "
    "is stopped at exit, before interpreter finalization)",
    targets=(COORDINATOR_DEL, CLUSTER_STOP),
    upstream_issue="none found: TF 2.21 WorkerPreemptionHandler holds _cluster_update_lock at exit",
    test=_PS_TEST + "test_the_coordinator_exits_after_a_worker_was_lost",
    on_install=_register_shutdown,
)

INTERCEPTIONS = tuple(
    _compat.declare(interception)
    for interception in (LOOPS, ATOMIC_COUNTERS, SHARDED_VARIABLES, COORDINATOR_SHUTDOWN)
)


def install() -> None:
    """Installs the parameter-server interceptions (once)."""
    _compat.install(*INTERCEPTIONS)

