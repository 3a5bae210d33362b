"""fit: the ClusterCoordinator training loop behind Keras ``model.fit``.

The arguments are bound and checked by :func:`parse_fit_arguments`, the input is fed by a
:class:`TrainSource` (arrays or a dataset), and this module runs the epochs: schedule an epoch's
closures, deliver batch callbacks in step order, re-run steps that bounded staleness gave back,
then the epoch's logs, validation and epoch callbacks.
"""

from __future__ import annotations

from typing import Any

import keras

from tfpar._compat import internals
from tfpar.coordinator._arguments import FitArguments, parse_fit_arguments
from tfpar.coordinator._callbacks import (
    Lagged,
    Progress,
    backup_dir,
    make_callback_list,
    needs_batch_logs,
    resolve_verbose,
    translating,
)
from tfpar.coordinator._evaluate import Evaluator
from tfpar.coordinator._runner import Runner, collecting_garbage, runner_for
from tfpar.coordinator._sources import TrainSource, train_source


def fit(model: keras.Model, *args: Any, **kwargs: Any) -> keras.callbacks.History:
    """Keras ``model.fit(*args, **kwargs)`` for a model of a managed ParameterServerStrategy.

    Args:
        model: The model whose ``fit`` was called.
        *args: Positional arguments of Keras's ``fit``.
        **kwargs: Keyword arguments of Keras's ``fit``.

    Returns:
        The model's ``History``; epoch logs add ``applied_steps``.

    Raises:
        ParameterServerError: If a parameter server failed.

    Example:
    >>> with tfpar.scope("parameter_server", cluster=tfpar.local_cluster()):
    ...     model = build_and_compile()
    >>> model.fit(x, y, epochs=2)  # Keras calls tfpar.coordinator's fit
    """
    progress = Progress()
    with collecting_garbage():
        return translating(progress, lambda: _fit(model, parse_fit_arguments(model, *args, **kwargs), progress))


def _fit(model: keras.Model, arguments: FitArguments, progress: Progress) -> keras.callbacks.History:
    runner = runner_for(model)
    source = train_source(runner, arguments.data, arguments.shuffle)
    validator = None if arguments.validation is None else Evaluator(runner, arguments.validation, runner.closures())
    verbose = resolve_verbose(arguments.verbose)
    callbacks = make_callback_list(model, arguments.callbacks, verbose=verbose, epochs=arguments.epochs,
                              steps=arguments.steps_per_epoch, add_history=True)
    progress.backup_dir = backup_dir(callbacks)
    lagged_logs = any(needs_batch_logs(c) for c in callbacks.callbacks)
    model.stop_training = False
    if runner.staleness is not None:
        runner.staleness.reset()

    progress.epoch = arguments.initial_epoch  # a ps failure while BackupAndRestore restores names it
    callbacks.on_train_begin()
    initial_epoch = internals.take_initial_epoch(model, arguments.initial_epoch)
    if initial_epoch > 0:  # resumed (BackupAndRestore) or told to start later: those epochs are done
        progress.last_finished_epoch = initial_epoch - 1
    training_logs = None
    for epoch in range(initial_epoch, arguments.epochs):
        progress.epoch = epoch
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        applied_before = internals.optimizer_steps(model.optimizer)
        epoch_logs = internals.metrics_result_or_logs(
            model, _train_epoch(runner, source, callbacks, arguments.steps_per_epoch, lagged_logs)
        )
        applied_after = internals.optimizer_steps(model.optimizer)
        if applied_before is not None and applied_after is not None:
            epoch_logs["applied_steps"] = applied_after - applied_before
        if validator is not None and _should_eval(epoch, arguments.validation_freq):
            val_logs = validator.evaluate(callbacks, verbose)
            epoch_logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        training_logs = epoch_logs
        progress.last_finished_epoch = epoch
        if model.stop_training:
            break

    optimizer = model.optimizer
    if optimizer is not None and arguments.epochs > 0 and getattr(optimizer, "use_ema", False):
        optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=training_logs)
    return model.history


def _train_epoch(runner: Runner, source: TrainSource, callbacks: keras.callbacks.CallbackList, steps: int,
                 lagged_logs: bool) -> Any:
    """Schedules one epoch, waits for it and returns the logs of its last step that ran."""
    model, staleness = runner.model, runner.staleness
    lagged = Lagged(callbacks.on_train_batch_end, 2 * runner.workers + 1, lagged_logs)
    # RemoteValues are kept only when needed: dropping many at once makes the coordinator delete
    # their tensors on the workers in a burst (measured: +10% epoch time when all of an epoch's
    # were kept). Bounded staleness needs each closure's count of steps run.
    scheduled: list[tuple[Any, Any]] = []  # (remote, item), with staleness only
    last_remote = None
    plan = source.plan_epoch(steps)
    if staleness is not None:
        staleness.plan(len(plan))
    step = 0
    for item in plan:
        callbacks.on_train_batch_begin(step)
        last_remote = source.schedule(item)
        if staleness is not None:
            scheduled.append((last_remote, item))
        step += source.steps_in(item)
        lagged.push(step - 1, last_remote)
        if model.stop_training:
            break
    if staleness is not None and len(scheduled) < len(plan):
        staleness.plan(len(scheduled) - len(plan))
    runner.coordinator.join()
    lagged.drain()
    if staleness is not None:
        _reschedule_skipped(runner, source, scheduled)
    last = lagged.last_logs
    if last is None and last_remote is not None:
        last = _last_run_logs(scheduled or [(last_remote, None)])
    return last if last is not None else {}


def _reschedule_skipped(runner: Runner, source: TrainSource, scheduled: list[tuple[Any, Any]]) -> None:
    """Bounded staleness: re-runs the steps that closures gave back (until none is left)."""
    pending = scheduled
    staleness = runner.staleness
    assert staleness is not None  # closures give steps back only under bounded staleness
    while True:
        leftovers = [left for remote, item in pending for left in source.leftovers(int(remote.fetch()[0]), item)]
        if not leftovers:
            return
        staleness.plan(len(leftovers))
        pending = [(source.schedule(item), item) for item in leftovers]
        runner.coordinator.join()


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
