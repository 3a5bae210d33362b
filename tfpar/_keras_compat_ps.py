"""Keras / TensorFlow interceptions for parameter-server training (a self-contained section).

This module is the temporary home of every interception that ``tfpar.coordinator`` needs; it is
written to be moved as one section into ``tfpar/_keras_compat.py``. Like the interceptions there,
each one below names the upstream issue, the versions it was verified on, and the test that fails
without it, and acts only on models whose ``distribute_strategy`` is a
``tf.distribute.ParameterServerStrategy`` that tfpar manages (:func:`is_managed_ps`): a model built
under a plain ``ParameterServerStrategy().scope()`` keeps upstream behaviour.

Interceptions (verified on TensorFlow 2.21.0 / Keras 3.15.1):

P1. **``Model.fit`` / ``evaluate`` / ``predict`` under ParameterServerStrategy** (keras-team/keras#18624:
    "Parameter server training is not supported in Keras 3"; the trainer never creates a
    ClusterCoordinator and fails with "To use this dataset, you need to pass this dataset to
    ClusterCoordinator.create_per_worker_dataset"). tfpar routes them to the ClusterCoordinator
    loop of ``tfpar.coordinator`` (hooks: ``TensorFlowTrainer.fit / evaluate / predict``).
    Tests: ``tests/test_parameter_server.py`` (every fit/evaluate/predict case), and
    ``test_upstream_keras_fit_fails_under_parameter_server`` shows the upstream failure.
P2. **Exact counters and metric accumulators under concurrent workers**
    (``test_iterations_and_metrics_count_every_step``,
    ``test_fit_on_arrays_trains_every_example_exactly_once_per_epoch``,
    ``test_confusion_matrix_metrics_count_every_example``). Keras 3's ``Variable.assign_add`` is
    ``assign(self + value)`` (keras/src/backend/common/variables.py): a read-modify-write that
    concurrent workers race on. Measured: 40 scheduled train steps on 2 workers left
    ``optimizer.iterations`` at 29-30 and the loss tracker's count at 960 of 1280 examples; the
    same race hits metric accumulators, learning-rate schedules and Adam's bias correction
    (keras-team/keras#18624 names the aggregation side). Without this interception the tests'
    scenario gives 28 of 30 optimizer steps and examples counted 1-3 times in 3 epochs, and the
    confusion-matrix counts of an evaluation come out at 69 and 93 true positives of 105 in two
    runs. Inside parameter-server closures tfpar
    makes ``assign_add`` / ``assign_sub`` the variable's own atomic ``AssignAddVariableOp`` on the
    parameter server, and rewrites ``v.assign(v + delta)`` (how Keras's confusion-matrix metrics:
    Precision, Recall, AUC, ...; IoU and R2Score accumulate) into ``v.assign_add(delta)`` (hooks:
    ``Variable.assign_add / assign_sub / assign / __add__ / __radd__`` of the TensorFlow backend).
P3. **Partitioned variables** (``variable_partitioner``; ``test_sharded_training_equals_training_in_one_process``,
    ``test_sharded_embedding_lookup_reads_rows_not_whole_tables``, ``test_*_partitioner_*``). With a
    partitioner, ParameterServerStrategy creates a ``ShardedVariable`` (one shard per ps), which
    Keras 3 cannot train: ``GradientTape.gradient`` fails with "'ShardedVariable' object has no
    attribute 'handle'", optimizer slots are created unsharded on one ps (colocated with the
    variable), the update fails with "ShardedVariable doesn't support being used as a reference"
    and ``save_weights`` fails in ``__array__`` (tf-keras unwrapped ShardedVariables; Keras 3 has
    no support). tfpar differentiates with respect to the shards and joins their gradients
    (``tf.GradientTape.gradient``), shards the optimizer slots like the variable
    (``TFOptimizer.add_variable_from_reference``), updates sharded variables shard by shard
    (``TFOptimizer._distributed_tf_update_step``), converts them to numpy
    (``Variable.__array__``) and looks embeddings up shard-wise, reading only the rows a batch
    uses (``keras.src.backend.tensorflow.numpy.take``: upstream converts the whole table to a
    dense tensor, i.e. ships every shard to the worker at every step).
P4. **Coordinator shutdown after a worker failure** (``test_the_coordinator_exits_after_a_worker_was_lost``).
    After a worker was lost and came back, TF 2.21's ``ClusterCoordinator.__del__`` ->
    ``Cluster.stop()`` waits forever at interpreter exit for a lock that the
    ``WorkerPreemptionHandler`` daemon thread holds (it is frozen during finalization); measured:
    a coordinator script that scheduled 300 closures, lost a worker, joined and returned hung
    until the launcher's timeout in 3 runs of 3 (TF's own ClusterCoordinator, with and without a
    tfpar strategy), and exited at once in every run with the hook. (Scripts that only call
    ``fit`` did not hang in 4 runs: other references keep ``__del__`` from running at exit.)
    For every ParameterServerStrategy tfpar created, an ``atexit`` hook
    stops its ClusterCoordinator while threads still run (bounded wait) and turns the second stop
    in ``__del__`` into a no-op (hook: ``atexit``, no TensorFlow code patched).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfpar import _keras_compat

VERIFIED_VERSIONS = {"tensorflow": "2.21.0", "keras": "3.15.1"}

_LOCK = threading.Lock()
_INSTALLED = False
_UPSTREAM: dict[str, Callable[..., Any]] = {}
_ROUTES: dict[str, Callable[..., Any]] = {}
_STRATEGIES: "weakref.WeakSet[Any]" = weakref.WeakSet()
_RMW_ATTRIBUTE = "_tfpar_read_modify_write"


@dataclasses.dataclass(frozen=True)
class Interception:
    """One interception of Keras/TF internals, for `tfpar doctor` and the docs."""

    target: str
    upstream: str
    purpose: str


INTERCEPTIONS = (
    Interception(
        "keras.src.backend.tensorflow.trainer.TensorFlowTrainer.fit / evaluate / predict",
        "keras-team/keras#18624",
        "Keras 3 fit/evaluate/predict under ParameterServerStrategy (ClusterCoordinator loop)",
    ),
    Interception(
        "keras.src.backend.tensorflow.core.Variable.assign_add / assign_sub / assign / __add__ / __radd__",
        "keras-team/keras#18624 (aggregation); read-modify-write in KerasVariable.assign_add",
        "exact optimizer.iterations and metric accumulators under concurrent workers",
    ),
    Interception(
        "tf.GradientTape.gradient, keras.src.backend.tensorflow.optimizer.TFOptimizer."
        "add_variable_from_reference / _distributed_tf_update_step, "
        "keras.src.backend.tensorflow.core.Variable.__array__, "
        "keras.src.backend.tensorflow.numpy.take",
        "(Keras 3 has no ShardedVariable support; tf-keras had)",
        "variable_partitioner: train, save and look up sharded variables",
    ),
    Interception(
        "atexit: ClusterCoordinator cluster stop before interpreter finalization",
        "(TF 2.21 WorkerPreemptionHandler holds _cluster_update_lock; __del__ waits forever)",
        "the coordinator process exits after a worker was lost and restarted",
    ),
)


# === Which models these interceptions act on ===


def is_managed_ps(strategy: Any) -> bool:
    """Whether `strategy` is a ParameterServerStrategy that tfpar manages."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy) and _keras_compat.is_managed(strategy)


def _in_managed_ps_closure() -> bool:
    """Whether the current code runs in a replica context of a managed ParameterServerStrategy."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return is_managed_ps(tf.distribute.get_strategy())


def install(
    fit: Callable[..., Any], evaluate: Callable[..., Any], predict: Callable[..., Any]
) -> None:
    """Installs the parameter-server interceptions (once); `fit` etc. receive routed calls.

    Each route is called as ``route(model, **keras_arguments)`` for models whose strategy is a
    managed ParameterServerStrategy; every other model keeps the (possibly already intercepted)
    Keras method.
    """
    global _INSTALLED
    with _LOCK:
        _ROUTES.update(fit=fit, evaluate=evaluate, predict=predict)
        if _INSTALLED:
            return
        from keras.src.backend.tensorflow import core as tf_core
        from keras.src.backend.tensorflow import numpy as tf_numpy
        from keras.src.backend.tensorflow import optimizer as tf_optimizer
        from keras.src.backend.tensorflow import trainer as tf_trainer

        trainer = tf_trainer.TensorFlowTrainer
        targets = [
            (trainer, "fit", _routed_fit),
            (trainer, "evaluate", _routed_evaluate),
            (trainer, "predict", _routed_predict),
            (tf_core.Variable, "assign_add", _assign_add),
            (tf_core.Variable, "assign_sub", _assign_sub),
            (tf_core.Variable, "assign", _assign),
            (tf_core.Variable, "__add__", _add),
            (tf_core.Variable, "__radd__", _radd),
            (tf_core.Variable, "__array__", _array),
            (tf_numpy, "take", _take),
            (tf_optimizer.TFOptimizer, "add_variable_from_reference", _add_variable_from_reference),
            (tf_optimizer.TFOptimizer, "_distributed_tf_update_step", _distributed_tf_update_step),
            (tf.GradientTape, "gradient", _gradient),
        ]
        missing = [f"{_name(owner)}.{name}" for owner, name, _ in targets if not hasattr(owner, name)]
        if missing:
            raise RuntimeError(
                f"tfpar cannot install its parameter-server fixes: this Keras ({keras.__version__}) "
                f"/ TensorFlow ({tf.__version__}) has no {', '.join(missing)}. tfpar was verified on "
                f"Keras {VERIFIED_VERSIONS['keras']} / TensorFlow {VERIFIED_VERSIONS['tensorflow']}; "
                "install a Keras 3 / TensorFlow 2 release in that line."
            )
        for owner, name, replacement in targets:
            key = f"{_name(owner)}.{name}"
            _UPSTREAM[key] = owner.__dict__.get(name, getattr(owner, name))
            setattr(owner, name, replacement)
        atexit.register(_stop_coordinators)
        _INSTALLED = True


def _name(owner: Any) -> str:
    return getattr(owner, "__name__", str(owner)).rsplit(".", 1)[-1]


# === P1. Routing fit / evaluate / predict ===


def _routed_strategy(model: Any) -> Any:
    strategy = getattr(model, "_distribute_strategy", None)
    return strategy if is_managed_ps(strategy) else None


def _routed_fit(
    self: Any,
    x: Any = None,
    y: Any = None,
    batch_size: Any = None,
    epochs: int = 1,
    verbose: Any = "auto",
    callbacks: Any = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: Any = True,
    class_weight: Any = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: Any = None,
    validation_steps: Any = None,
    validation_batch_size: Any = None,
    validation_freq: Any = 1,
) -> Any:
    arguments = dict(
        x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
        validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
        class_weight=class_weight, sample_weight=sample_weight, initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
        validation_batch_size=validation_batch_size, validation_freq=validation_freq,
    )
    if _routed_strategy(self) is None:
        return _UPSTREAM["TensorFlowTrainer.fit"](self, **arguments)
    return _ROUTES["fit"](self, **arguments)


def _routed_evaluate(
    self: Any,
    x: Any = None,
    y: Any = None,
    batch_size: Any = None,
    verbose: Any = "auto",
    sample_weight: Any = None,
    steps: Any = None,
    callbacks: Any = None,
    return_dict: bool = False,
    **kwargs: Any,
) -> Any:
    arguments = dict(
        x=x, y=y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight,
        steps=steps, callbacks=callbacks, return_dict=return_dict,
    )
    if _routed_strategy(self) is None:
        return _UPSTREAM["TensorFlowTrainer.evaluate"](self, **arguments, **kwargs)
    if kwargs:
        raise ValueError(f"Arguments not recognized: {kwargs}")
    return _ROUTES["evaluate"](self, **arguments)


def _routed_predict(
    self: Any, x: Any, batch_size: Any = None, verbose: Any = "auto", steps: Any = None, callbacks: Any = None
) -> Any:
    arguments = dict(x=x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
    if _routed_strategy(self) is None:
        return _UPSTREAM["TensorFlowTrainer.predict"](self, **arguments)
    return _ROUTES["predict"](self, **arguments)


# Keras internals the coordinator loop needs (private attributes live here, not in coordinator.py).


def assert_compiled(model: Any, method: str) -> None:
    """Raises Keras's own error when `model` is not compiled."""
    model._assert_compile_called(method)


def symbolic_build(model: Any, strategy: tf.distribute.Strategy, data_spec: Any) -> None:
    """Builds the model, its compiled loss/metrics and optimizer on the coordinator (no data)."""
    with strategy.scope():
        model._symbolic_build(data_batch=data_spec)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)


def build_for_predict(model: Any, strategy: tf.distribute.Strategy, x_spec: Any) -> None:
    """Creates the model's variables on the coordinator from input specs (loss/metrics untouched)."""
    if all(layer.built for layer in model._flatten_layers()):
        return
    from keras.src import backend

    symbolic = tf.nest.map_structure(lambda spec: backend.KerasTensor(spec.shape, spec.dtype.name), x_spec)
    with strategy.scope():
        backend.compute_output_spec(model, symbolic, training=False)


def compiled_state(model: Any) -> tuple[Any, ...]:
    """The objects ``model.compile`` creates (optimizer, compiled loss and metrics)."""
    return (model.optimizer, model._compile_loss, model._compile_metrics)


def take_initial_epoch(model: Any, default: int) -> int:
    """The epoch fit starts at: what BackupAndRestore restored (``model._initial_epoch``), else `default`."""
    return getattr(model, "_initial_epoch", None) or default


def metrics_result_or_logs(model: Any, logs: Any) -> dict[str, Any]:
    """Keras's rule: the model's metrics, unless a custom step returned other keys."""
    return dict(model._get_metrics_result_or_logs(logs))


def flatten_metrics_in_order(model: Any, logs: dict[str, Any]) -> Any:
    """``evaluate(return_dict=False)``'s list, in Keras's metric order."""
    return model._flatten_metrics_in_order(logs)


def optimizer_steps(optimizer: Any) -> int | None:
    """The raw number of optimizer applications (``optimizer._iterations``), or None."""
    variable = getattr(optimizer, "_iterations", None)
    return None if variable is None else int(variable.numpy())


def num_workers(strategy: tf.distribute.ParameterServerStrategy) -> int:
    """How many worker tasks the strategy schedules on."""
    return int(strategy._num_workers)


def track(strategy: tf.distribute.ParameterServerStrategy) -> None:
    """Stops the strategy's ClusterCoordinator (if any) at exit, before finalization (P4)."""
    _STRATEGIES.add(strategy)


def coordinator(strategy: tf.distribute.ParameterServerStrategy) -> tf.distribute.coordinator.ClusterCoordinator:
    """The strategy's (singleton) ClusterCoordinator, stopped at exit before finalization (P4)."""
    track(strategy)
    return tf.distribute.coordinator.ClusterCoordinator(strategy)


@contextlib.contextmanager
def tracing_outside_schedule(strategy: tf.distribute.ParameterServerStrategy) -> Iterator[None]:
    """Traces a step function on the coordinator (to learn its output structure) without
    ParameterServerStrategy's warning that ``run`` is invoked outside ``schedule``."""
    extended = strategy.extended
    previous = extended._being_scheduled
    extended._being_scheduled = True
    try:
        yield
    finally:
        extended._being_scheduled = previous


def failed_ps_tasks(error: BaseException) -> set[int] | None:
    """The ps task indices a coordinator error blames, or None when it is not a ps failure.

    Uses ClusterCoordinator's own classification (``_is_ps_failure``): an ``UnavailableError``
    (or ``Aborted`` / ``InvalidArgument`` after a fast restart) carrying gRPC error information
    from a ``/job:ps`` task. An empty set means a ps failure whose task the message does not name.
    """
    from tensorflow.python.distribute.coordinator import cluster_coordinator

    if not cluster_coordinator._is_ps_failure(error):
        return None
    original = getattr(error, "original_exception", error)
    return cluster_coordinator._extract_failed_ps_instances(str(original))


# === P2. Atomic assign_add / assign_sub inside parameter-server closures ===


def _atomic(variable: Any) -> bool:
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return variable._value is not None and not in_stateless_scope() and _in_managed_ps_closure()


def _assign_add(self: Any, value: Any) -> Any:
    if not _atomic(self):
        return _UPSTREAM["Variable.assign_add"](self, value)
    delta = tf.cast(self._convert_to_tensor(value, dtype=self._dtype), self._value.dtype)
    return self._value.assign_add(delta)


def _assign_sub(self: Any, value: Any) -> Any:
    if not _atomic(self):
        return _UPSTREAM["Variable.assign_sub"](self, value)
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
    return _tag_sum(self, other, _UPSTREAM["Variable.__add__"](self, other))


def _radd(self: Any, other: Any) -> Any:
    return _tag_sum(self, other, _UPSTREAM["Variable.__radd__"](self, other))


def _assign(self: Any, value: Any) -> Any:
    tag = getattr(value, _RMW_ATTRIBUTE, None) if isinstance(value, tf.Tensor) else None
    if tag is not None and tag[0]() is self and _atomic(self):
        delta = tf.cast(self._convert_to_tensor(tag[1], dtype=self._dtype), self._value.dtype)
        delta = tf.broadcast_to(delta, self._value.shape)
        return self._value.assign_add(delta)
    return _UPSTREAM["Variable.assign"](self, value)


# === P3. Sharded variables (variable_partitioner) ===


def _sharded_value(variable: Any) -> Any:
    """The ShardedVariable behind a Keras variable of a managed strategy, else None."""
    from tensorflow.python.distribute import sharded_variable

    value = getattr(variable, "_value", None)
    if not isinstance(value, sharded_variable.ShardedVariable):
        return None
    strategy = getattr(value, "_distribute_strategy", None)
    return value if is_managed_ps(strategy) else None


def _is_sharded(variable: Any) -> bool:
    return isinstance(variable, keras.Variable) and _sharded_value(variable) is not None


def _gradient(
    self: Any,
    target: Any,
    sources: Any,
    output_gradients: Any = None,
    unconnected_gradients: Any = tf.UnconnectedGradients.NONE,
) -> Any:
    upstream = _UPSTREAM["GradientTape.gradient"]
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
        return _UPSTREAM["TFOptimizer.add_variable_from_reference"](self, reference_variable, name, initializer)
    # Upstream colocates the slot with its variable, which turns off partitioning: the slot of a
    # sharded embedding would be one full-size variable on one ps. Created without colocation,
    # the strategy's partitioner shards it exactly like the variable (same shape and dtype).
    from keras.src.optimizers import base_optimizer

    return base_optimizer.BaseOptimizer.add_variable_from_reference(
        self, reference_variable, name=name, initializer=initializer
    )


def _distributed_tf_update_step(self: Any, distribution: Any, grads_and_vars: Any, learning_rate: Any) -> Any:
    from tensorflow.python.distribute import sharded_variable

    pairs = list(grads_and_vars)
    sharded = [
        (g, v) for g, v in pairs
        if isinstance(v, sharded_variable.ShardedVariable) and is_managed_ps(getattr(v, "_distribute_strategy", None))
    ]
    if not sharded:
        return _UPSTREAM["TFOptimizer._distributed_tf_update_step"](self, distribution, pairs, learning_rate)
    # strategy.extended.update colocates with the variable, which a ShardedVariable refuses; its
    # assign/scatter methods place each shard's update on that shard's ps themselves.
    for gradient, variable in sharded:
        self.update_step(gradient, variable, learning_rate)
    plain = [(g, v) for g, v in pairs if not any(v is s for _, s in sharded)]
    return _UPSTREAM["TFOptimizer._distributed_tf_update_step"](self, distribution, plain, learning_rate)


def _array(self: Any, dtype: Any = None, copy: Any = None) -> Any:
    value = _sharded_value(self)
    if value is None:
        return _UPSTREAM["Variable.__array__"](self, dtype)
    return np.asarray(value.numpy(), dtype=dtype)


def _take(x: Any, indices: Any, axis: Any = None) -> Any:
    upstream = _UPSTREAM["numpy.take"]
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


# === P4. Stop coordinators before interpreter finalization ===


def _stop_coordinators() -> None:
    for strategy in list(_STRATEGIES):
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

