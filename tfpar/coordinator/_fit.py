"""fit: the ClusterCoordinator training loop behind Keras ``model.fit``."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._callbacks import _Lagged, _Progress, _backup_dir, _callback_list, _needs_batch_logs, _resolve_verbose, _translating
from tfpar.coordinator._evaluate import _Evaluator, _eval_input
from tfpar.coordinator._inputs import _Arrays, _Dataset, _array_class_weights, _array_input, _cardinality, _check_input_type, _dataset_input, _is_array_like, _with_class_weight
from tfpar.coordinator._common import _check_positive_int, keras_arguments
from tfpar.coordinator._runner import _Runner, _collecting_garbage, _runner
from tfpar.coordinator._worker_inputs import _BatchStream, _WorkerArrays, _gather, _pack_closures


def fit(model: keras.Model, *args: Any, **kwargs: Any) -> keras.callbacks.History:
    """Keras ``model.fit(*args, **kwargs)`` for a model of a managed ParameterServerStrategy."""
    return _fit(model, **keras_arguments("fit", model, args, kwargs))


def _fit(model: keras.Model, **kwargs: Any) -> keras.callbacks.History:
    progress = _Progress()
    with _collecting_garbage():
        return _translating(progress, lambda: _fit_loop(model, progress, **kwargs))


def _fit_loop(
    model: keras.Model, progress: _Progress, *, x: Any, y: Any, batch_size: Any, epochs: int, verbose: Any,
    callbacks: Any, validation_split: float, validation_data: Any, shuffle: Any, class_weight: Any,
    sample_weight: Any, initial_epoch: int, steps_per_epoch: Any, validation_steps: Any,
    validation_batch_size: Any, validation_freq: Any,
) -> keras.callbacks.History:
    internals.assert_compiled(model, "fit")
    _check_input_type(x, "fit")
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    _check_positive_int("validation_steps", validation_steps)
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"Expected epochs to be an int >= 0. Received: epochs={epochs!r}")
    max_epochs = keras.config.max_epochs() if hasattr(keras.config, "max_epochs") else None
    if max_epochs and max_epochs < epochs:
        epochs = max_epochs
    if shuffle not in (True, False, "batch"):
        raise ValueError(f"Expected shuffle to be True, False or 'batch'. Received: shuffle={shuffle!r}")
    if not isinstance(validation_freq, (int, list)) or isinstance(validation_freq, bool):
        raise ValueError(
            f"Expected `validation_freq` to be a list or int. Received: validation_freq={validation_freq!r}"
        )

    dataset = _dataset_input(x, y, sample_weight, batch_size, what="fit", allow_fn=True)
    if dataset is not None and validation_split:
        raise ValueError(
            "validation_split works with arrays only (as in Keras); with a dataset pass "
            f"validation_data. Received: validation_split={validation_split!r}"
        )
    arrays = None
    if dataset is None:
        if class_weight is not None:
            if sample_weight is not None:
                raise ValueError(
                    "Arguments `sample_weight` and `class_weight` cannot be specified at the same "
                    f"time. Received: sample_weight={type(sample_weight).__name__}, class_weight={class_weight}"
                )
            sample_weight = _array_class_weights(np.asarray(y) if _is_array_like(y) else y, class_weight)
        arrays = _array_input(x, y, sample_weight, batch_size, what="fit")
        if validation_split and validation_data is None:  # as Keras: validation_data wins
            if not 0 < validation_split < 1:
                raise ValueError(f"Expected 0 < validation_split < 1. Received: validation_split={validation_split}")
            split = int(arrays.count * (1.0 - validation_split))
            if split < 1 or split >= arrays.count:
                raise ValueError(
                    f"validation_split={validation_split} of {arrays.count} examples leaves an empty "
                    "training or validation set."
                )
            head = tf.nest.map_structure(lambda a: a[:split], arrays.data)
            tail = tf.nest.map_structure(lambda a: a[split:], arrays.data)
            arrays = _Arrays(head, split, arrays.batch_size)
            validation_data = tail
    elif class_weight is not None:
        if dataset.dataset is not None:
            dataset = _Dataset(_with_class_weight(dataset.dataset, class_weight), None, None)
            dataset.element_spec = dataset.dataset.element_spec
        else:
            user_fn = dataset.dataset_fn
            dataset = _Dataset(None, lambda context: _with_class_weight(user_fn(context), class_weight), None)

    runner = _runner(model)
    strategy = runner.strategy
    if dataset is not None and dataset.dataset_fn is not None:
        dataset.element_spec = _probe_element_spec(runner, dataset.dataset_fn)

    if arrays is not None:
        if steps_per_epoch is None:
            steps_per_epoch = arrays.num_batches()
    else:
        if steps_per_epoch is None:
            if dataset.dataset is None:
                raise ValueError(
                    "fit with a dataset_fn needs steps_per_epoch: the dataset is built on each "
                    "worker, so the coordinator cannot count its batches. Received: steps_per_epoch=None"
                )
            size = _cardinality(dataset.dataset)
            if size < 0:
                state = "infinite" if size == tf.data.INFINITE_CARDINALITY else "of unknown size"
                raise ValueError(
                    f"The dataset passed to fit is {state}, so an epoch has no natural end: pass "
                    "steps_per_epoch (the number of steps, over all workers, per epoch). "
                    "Received: steps_per_epoch=None"
                )
            if size == 0:
                raise ValueError("The dataset passed to fit is empty (0 batches).")
            steps_per_epoch = size

    validation = None
    if validation_data is not None:
        validation = _eval_input(
            validation_data, None, None, validation_batch_size or batch_size, validation_steps,
            what="validation_data", tuple_data=True,
        )

    spec = arrays.spec() if arrays is not None else dataset.element_spec
    internals.symbolic_build(model, strategy, spec)
    closures = runner.closures()
    spe = int(model.steps_per_execution)
    staleness = runner.staleness

    if arrays is not None:
        source = _WorkerArrays(runner, arrays).iterator  # what every training closure reads
        stream = _BatchStream(arrays, shuffle)
        train = closures.get("train_arrays", arrays.spec(), lambda: _train_arrays_fn(
            runner, runner.output_structure(model.train_step, arrays.spec()) if staleness is not None else None))
    else:
        per_worker = runner.coordinator.create_per_worker_dataset(_per_worker_dataset(runner, dataset))
        source = iter(per_worker)
        train = closures.get("train_dataset", dataset.element_spec, lambda: _train_dataset_fn(
            runner, runner.output_structure(model.train_step, dataset.element_spec) if staleness is not None else None))
    validator = _Evaluator(runner, validation, closures) if validation is not None else None

    verbose = _resolve_verbose(verbose)
    callbacks = _callback_list(model, callbacks, verbose=verbose, epochs=epochs, steps=steps_per_epoch,
                               add_history=True)
    progress.backup_dir = _backup_dir(callbacks)
    lagged_logs = any(_needs_batch_logs(c) for c in callbacks.callbacks)
    window = 2 * runner.workers + 1
    model.stop_training = False
    if staleness is not None:
        staleness.reset()

    progress.epoch = initial_epoch  # a ps failure while BackupAndRestore restores names it
    callbacks.on_train_begin()
    initial_epoch = internals.take_initial_epoch(model, initial_epoch)
    if initial_epoch > 0:  # resumed (BackupAndRestore) or told to start later: those epochs are done
        progress.last_finished_epoch = initial_epoch - 1
    training_logs = None
    logs: Any = {}
    for epoch in range(initial_epoch, epochs):
        progress.epoch = epoch
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        applied_before = internals.optimizer_steps(model.optimizer)
        lagged = _Lagged(callbacks.on_train_batch_end, window, lagged_logs)
        # RemoteValues are kept only when needed: dropping many at once makes the coordinator
        # delete their tensors on the workers in a burst (measured: +10% epoch time when all of an
        # epoch's were kept). Bounded staleness needs each closure's count of steps run.
        scheduled: list[tuple[Any, Any]] = []  # (remote, what it carried), with staleness only
        last_remote = remote = None
        if arrays is not None:
            plan = _pack_closures(stream.take(steps_per_epoch), spe, arrays.batch_size)
        else:
            plan = [min(spe, steps_per_epoch - s) for s in range(0, steps_per_epoch, spe)]
        if staleness is not None:
            staleness.plan(len(plan))
        step = 0
        for item in plan:
            size = item[2] if arrays is not None else item
            callbacks.on_train_batch_begin(step)
            remote = _schedule_train(runner, train, source, item)
            if staleness is not None:
                scheduled.append((remote, item))
            last_remote = remote
            step += size
            lagged.push(step - 1, remote)
            if model.stop_training:
                break
        if staleness is not None and len(scheduled) < len(plan):
            staleness.plan(len(scheduled) - len(plan))
        remote = None
        runner.coordinator.join()
        lagged.drain()
        if staleness is not None:
            _reschedule_skipped(runner, train, scheduled, arrays, source)
        last = lagged.last_logs
        if last is None and last_remote is not None:
            last = _last_run_logs(scheduled or [(last_remote, None)])
        last_remote = None
        logs = last if last is not None else {}
        epoch_logs = internals.metrics_result_or_logs(model, logs)
        applied_after = internals.optimizer_steps(model.optimizer)
        if applied_before is not None and applied_after is not None:
            epoch_logs["applied_steps"] = applied_after - applied_before
        if validator is not None and _should_eval(epoch, validation_freq):
            val_logs = validator.evaluate(callbacks, verbose)
            epoch_logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        training_logs = epoch_logs
        progress.last_finished_epoch = epoch
        if model.stop_training:
            break

    optimizer = model.optimizer
    if optimizer is not None and epochs > 0 and getattr(optimizer, "use_ema", False):
        optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=training_logs)
    return model.history


def _probe_element_spec(runner: _Runner, dataset_fn: Callable[..., Any]) -> Any:
    """The element structure of a dataset_fn's datasets, from a trace (nothing runs).

    Tracing (rather than calling) lets the function use
    tf.distribute.coordinator.experimental_get_current_worker_index(), which only works in a
    function, and keeps its pipeline from doing any work on the coordinator.
    """
    workers, replicas = runner.workers, runner.strategy.num_replicas_in_sync
    returned: dict[str, Any] = {}

    def trace() -> tf.Tensor:
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        returned["dataset"] = dataset_fn(tf.distribute.InputContext(workers, worker, replicas))
        return tf.constant(0)

    tf.function(trace, autograph=False).get_concrete_function()
    result = returned["dataset"]
    if not isinstance(result, tf.data.Dataset):
        raise TypeError(
            "Expected dataset_fn(input_context) to return a tf.data.Dataset. "
            f"Received: {type(result).__name__}"
        )
    return result.element_spec


def _should_eval(epoch: int, validation_freq: Any) -> bool:
    epoch += 1
    if isinstance(validation_freq, int):
        return epoch % validation_freq == 0
    return epoch in validation_freq


def _last_run_logs(scheduled: list[tuple[Any, Any]]) -> Any:
    for remote, _ in reversed(scheduled):
        ran, logs = remote.fetch()
        if int(ran) > 0:
            return logs
    return None


def _schedule_train(runner: _Runner, train: Any, source: Any, item: Any) -> Any:
    """Schedules one training closure reading the per-worker iterator `source`; returns its
    RemoteValue. `item` is (indices, splits, n) for in-memory arrays, else a number of steps."""
    if isinstance(item, tuple):
        indices, splits, n = item
        return runner.coordinator.schedule(train, args=(source, tf.constant(indices), tf.constant(splits), n))
    return runner.coordinator.schedule(train, args=(source, item))


def _reschedule_skipped(runner: _Runner, train: Any, scheduled: list[tuple[Any, Any]], arrays: _Arrays | None,
                        source: Any) -> None:
    """Bounded staleness: re-runs the steps that closures gave back (until none is left)."""
    staleness = runner.staleness
    pending = scheduled
    while True:
        leftovers = []
        for remote, item in pending:
            ran = int(remote.fetch()[0])
            if arrays is not None:
                indices, splits, n = item
                if ran < n:
                    batches = [indices[splits[i] : splits[i + 1]] for i in range(ran, n)]
                    leftovers.extend(_pack_closures(batches, len(splits) - 1, arrays.batch_size))
            elif ran < item:
                leftovers.append(item - ran)
        if not leftovers:
            return
        staleness.plan(len(leftovers))
        pending = []
        for item in leftovers:
            pending.append((_schedule_train(runner, train, source, item), item))
        runner.coordinator.join()


def _per_worker_dataset(runner: _Runner, dataset: _Dataset) -> Any:
    strategy = runner.strategy
    if dataset.dataset is not None:
        return strategy.experimental_distribute_dataset(dataset.dataset.repeat())
    user_fn = dataset.dataset_fn
    workers = runner.workers

    def per_worker_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        own = tf.distribute.InputContext(workers, worker, context.num_replicas_in_sync)
        return user_fn(own).repeat()

    return lambda: strategy.distribute_datasets_from_function(per_worker_fn)


def _train_arrays_fn(runner: _Runner, structure: Any) -> Callable[..., Any]:
    model = runner.model

    def train_arrays(iterator: Any, indices: tf.Tensor, splits: tf.Tensor, n: int) -> Any:
        data = next(iterator)

        def one_step(i: tf.Tensor) -> Any:
            batch = _gather(data, indices[splits[i] : splits[i + 1]])
            return runner.step(model.train_step, batch)

        return runner.run_steps(n, one_step, structure)

    return train_arrays


def _train_dataset_fn(runner: _Runner, structure: Any) -> Callable[..., Any]:
    model = runner.model

    def train_dataset(iterator: Any, n: int) -> Any:
        def one_step(i: tf.Tensor) -> Any:
            return runner.step(model.train_step, next(iterator))

        return runner.run_steps(n, one_step, structure)

    return train_dataset
