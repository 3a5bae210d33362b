"""Read-only accessors of Keras / TensorFlow internals, for tfpar's fixes and its coordinator loop.

Private attributes are read here and nowhere else in tfpar, so a Keras or TensorFlow release that
moves one breaks one function, named after what it gives. Nothing here patches anything.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from tfpar._compat import _patching

_TRAINER = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer"


# === Models ===


def trainer_signature(method: str) -> inspect.Signature:
    """The signature of Keras's own ``TensorFlowTrainer.<method>`` (``"fit"``, ``"evaluate"``, ...).

    Tools that take Keras's arguments bind them against it, so no signature is copied by hand.
    """
    return inspect.signature(_patching.unpatched(f"{_TRAINER}.{method}"))


def flat_layers(model: Any) -> list[Any]:
    """Every layer inside `model` (nested ones included, `model` itself excluded)."""
    return list(model._flatten_layers(include_self=False))


def batchnorm_layers(model: Any) -> list[Any]:
    """The ``keras.layers.BatchNormalization`` layers inside `model`."""
    return [layer for layer in flat_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def all_layers_built(model: Any) -> bool:
    """Whether `model` and every layer in it has its variables."""
    return all(layer.built for layer in model._flatten_layers())


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
    if all_layers_built(model):
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


def user_random_seed() -> int | None:
    """The seed given to ``keras.utils.set_random_seed``, or None."""
    from keras.src.utils import rng_utils

    return rng_utils.get_random_seed()


# === Strategies ===


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning several workers."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def num_workers(strategy: tf.distribute.ParameterServerStrategy) -> int:
    """How many worker tasks the strategy schedules on."""
    return int(strategy._num_workers)


def ps_cluster_spec(strategy: tf.distribute.ParameterServerStrategy) -> dict[str, list[str]]:
    """The cluster spec (a dict) a ParameterServerStrategy connected to.

    Its public ``cluster_resolver`` property is None (TF 2.21); the resolver passed to the
    constructor is kept in ``_cluster_resolver``.
    """
    return strategy._cluster_resolver.cluster_spec().as_dict()


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


# === ClusterCoordinator errors ===


def is_worker_failure(error: BaseException) -> bool:
    """Whether ClusterCoordinator would treat `error` as the failure of a worker task.

    Its own classification (``_is_worker_failure``): a connection error from a ``/job:worker``
    task that is not relayed from a ps task. ClusterCoordinator re-runs a failed worker's steps.
    """
    from tensorflow.python.distribute.coordinator import cluster_coordinator

    return bool(cluster_coordinator._is_worker_failure(error))


def is_derived_cancellation(error: BaseException) -> bool:
    """A ``CancelledError`` a remote task relays after one of its RPCs failed.

    ClusterCoordinator ignores these (a transient worker-to-ps failure can surface this way) and
    retries the step (``_WorkerFailureHandler.wait_on_failure``).
    """
    return isinstance(error, tf.errors.CancelledError) and "/job:" in str(error)


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


@contextlib.contextmanager
def synchronous_executor() -> Iterator[None]:
    """Runs eager ops of this thread on a new synchronous executor, as each ClusterCoordinator
    worker thread does, so that a failed remote call leaves no error in the thread's executor
    (an asynchronous one would re-raise it on later ops)."""
    from tensorflow.python.eager import context, executor

    with context.executor_scope(executor.new_executor(enable_async=False)):
        yield


# === Coordination service (MultiWorkerMirroredStrategy starts it on every task) ===


def wait_at_barrier(barrier_id: str, timeout_seconds: float) -> None:
    """Blocks until every task of the cluster reached `barrier_id` (raises on timeout)."""
    from tensorflow.python.eager import context

    context.context().wait_at_barrier(barrier_id, int(timeout_seconds * 1000))


def set_key(key: str, value: str) -> None:
    """Sets `key` in the cluster's key-value store."""
    from tensorflow.python.eager import context

    context.context().set_config_key_value(key, value)


def get_key(key: str, timeout_seconds: float) -> str:
    """Waits (at most `timeout_seconds`) for `key` in the cluster's key-value store."""
    from tensorflow.python.eager import context

    return str(context.context().get_config_key_value(key, int(timeout_seconds * 1000)))


def delete_key(key: str) -> None:
    """Deletes `key` from the cluster's key-value store."""
    from tensorflow.python.eager import context

    context.context().delete_config_key_value(key)


def stop_preemption_watcher(handler: Any) -> None:
    """Ends a PreemptionCheckpointHandler's PeerTerminationWatcher thread, as its ``__del__`` does."""
    handler._stop_cluster_wise_termination_watcher_thread()
    handler._stop_poll_termination_signal_thread()


def preemption_keys() -> tuple[str, ...]:
    """The key-value store keys a PreemptionCheckpointHandler's watcher waits on."""
    from tensorflow.python.distribute.failure_handling import failure_handling

    return (failure_handling._INITIAL_RUN_COUNT_KEY, failure_handling._FINAL_RUN_COUNT_KEY)
