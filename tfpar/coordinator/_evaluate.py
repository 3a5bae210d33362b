"""evaluate (and validation) on the workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._callbacks import (
    Lagged,
    Progress,
    make_callback_list,
    needs_test_batch_logs,
    resolve_verbose,
    translating,
)
from tfpar.coordinator._common import EVAL_BATCHES_PER_CLOSURE, check_positive_int, keras_arguments
from tfpar.coordinator._inputs import Arrays, DatasetInput, array_input, cardinality, check_input_type, dataset_input
from tfpar.coordinator._runner import Closures, Runner, collecting_garbage, run_if, runner_for, zeros_of_spec
from tfpar.coordinator._worker_inputs import WorkerArrays, gather, pack_closures


def eval_input(x: Any, y: Any, sample_weight: Any, batch_size: Any, steps: Any, *, what: str,
                tuple_data: bool = False) -> Arrays | DatasetInput:
    """Arrays or a finite dataset for evaluate / predict / validation_data."""
    if tuple_data and not isinstance(x, tf.data.Dataset):
        if not isinstance(x, (tuple, list)) or not 1 <= len(x) <= 3:
            raise ValueError(
                "Expected validation_data to be a tuple (x, y) or (x, y, sample_weight), or a "
                f"tf.data.Dataset. Received: validation_data of type {type(x).__name__}"
            )
        x, y, sample_weight = (tuple(x) + (None, None))[:3]
    check_input_type(x, what)
    dataset = dataset_input(x, y, sample_weight, None if isinstance(x, tf.data.Dataset) and tuple_data else batch_size,
                             what=what, allow_fn=False)
    if dataset is None:
        arrays = array_input(x, y, sample_weight, batch_size, what=what)
        if steps is not None:
            arrays = Arrays(
                tf.nest.map_structure(lambda a: a[: steps * arrays.batch_size], arrays.data),
                min(arrays.count, steps * arrays.batch_size), arrays.batch_size,
            )
        return arrays
    source = dataset.dataset
    assert source is not None  # evaluation takes a dataset, never a dataset_fn
    if steps is not None:
        source = source.take(steps)
    size = cardinality(source)
    if size == tf.data.INFINITE_CARDINALITY:
        option = "validation_steps" if what == "validation_data" else "steps"
        raise ValueError(
            f"The {what} dataset is infinite, so it has no end to evaluate up to: pass {option} "
            f"(the number of batches to use). Received: {option}=None"
        )
    return DatasetInput(source, None, source.element_spec)


class Evaluator:
    """Runs test steps for evaluate / validation over arrays or a sharded dataset."""

    def __init__(self, runner: Runner, data: Arrays | DatasetInput, closures: Closures) -> None:
        self.runner = runner
        self.data = data
        self.closures = closures
        if isinstance(data, Arrays):
            self.worker_data = WorkerArrays(runner, data)
            self.function = closures.get("test_arrays", data.spec(), lambda: _test_arrays_fn(runner))
        else:
            assert data.dataset is not None  # evaluation takes a dataset, never a dataset_fn
            enumerated = data.dataset.enumerate()
            self.per_worker = runner.coordinator.create_per_worker_dataset(
                runner.strategy.experimental_distribute_dataset(enumerated)
            )
            spec = enumerated.element_spec
            self.function = closures.get("test_dataset", spec, lambda: _test_dataset_fn(runner, spec))

    def num_batches(self) -> int | None:
        if isinstance(self.data, Arrays):
            return self.data.num_batches()
        size = cardinality(self.data.dataset)
        return size if size >= 0 else None

    def evaluate(self, callbacks: keras.callbacks.CallbackList, verbose: Any) -> dict[str, Any]:
        model = self.runner.model
        coordinator = self.runner.coordinator
        model.stop_evaluating = False
        callbacks.on_test_begin()
        model.reset_metrics()
        lagged = Lagged(callbacks.on_test_batch_end, 2 * self.runner.workers + 1,
                         any(needs_test_batch_logs(c) for c in callbacks.callbacks))
        last_logs = None
        if isinstance(self.data, Arrays):
            spe = int(model.steps_per_execution)
            plan = pack_closures(self.data.ordered_batches(), spe, self.data.batch_size)
            step = 0
            remote = None  # only the last RemoteValue is kept (see the note in _fit_loop)
            for indices, splits, n in plan:
                callbacks.on_test_batch_begin(step)
                remote = coordinator.schedule(
                    self.function,
                    args=(self.worker_data.iterator, tf.constant(indices), tf.constant(splits), n),
                )
                step += n
                lagged.push(step - 1, remote)
                if model.stop_evaluating:
                    break
            coordinator.join()
            lagged.drain()
            last_logs = lagged.last_logs if lagged.last_logs is not None else (remote.fetch()[1] if remote else None)
        else:
            self._evaluate_dataset(callbacks)
            last_logs = model.get_metrics_result()
        logs = internals.metrics_result_or_logs(model, last_logs if last_logs is not None else {})
        logs = {name: _python(value) for name, value in logs.items()}
        callbacks.on_test_end(logs)
        return logs

    def _evaluate_dataset(self, callbacks: keras.callbacks.CallbackList) -> None:
        coordinator = self.runner.coordinator
        iterator = iter(self.per_worker)
        workers = self.runner.workers
        exhausted: set[int] = set()
        step = 0
        while len(exhausted) < workers:
            remotes = []
            for _ in range(2 * workers):
                callbacks.on_test_batch_begin(step)
                remotes.append(coordinator.schedule(
                    self.function, args=(iterator, EVAL_BATCHES_PER_CLOSURE)
                ))
            coordinator.join()
            for remote in remotes:
                count, done, worker = (int(v) for v in remote.fetch())
                if done:
                    exhausted.add(worker)
                step += count
                callbacks.on_test_batch_end(max(step - 1, 0), {})
            if self.runner.model.stop_evaluating:
                break


def _python(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _test_arrays_fn(runner: Runner) -> Callable[..., Any]:
    model = runner.model

    def test_arrays(iterator: Any, indices: tf.Tensor, splits: tf.Tensor, n: int) -> Any:
        data = next(iterator)

        def one_step(i: tf.Tensor) -> Any:
            return runner.step(model.test_step, gather(data, indices[splits[i] : splits[i + 1]]))

        return runner.run_steps(n, one_step)

    return test_arrays


def _test_dataset_fn(runner: Runner, element_spec: Any) -> Callable[..., Any]:
    model = runner.model
    workers = runner.workers

    def test_dataset(iterator: Any, limit: tf.Tensor) -> Any:
        """Runs up to `limit` of this worker's batches; returns (count, exhausted, worker index)."""
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        empty = tf.nest.map_structure(zeros_of_spec, element_spec)

        def body(count: tf.Tensor, done: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            optional = iterator.get_next_as_optional()
            has = optional.has_value()
            position, batch = tf.cond(has, optional.get_value, lambda: empty)
            mine = tf.logical_and(has, tf.equal(tf.math.floormod(tf.cast(position, tf.int64), workers), worker))

            def run() -> tf.Tensor:
                effects = tf.nest.flatten(runner.step(model.test_step, batch))
                with tf.control_dependencies(effects):
                    return tf.constant(1, tf.int64)

            ran = run_if(mine, run, tf.constant(0, tf.int64), tf.TensorShape([]))
            return count + ran, tf.logical_not(has)

        count, done = tf.while_loop(
            lambda count, done: tf.logical_and(count < limit, tf.logical_not(done)),
            body,
            (tf.constant(0, tf.int64), tf.constant(False)),
        )
        return count, done, worker

    return test_dataset


def evaluate(model: keras.Model, *args: Any, **kwargs: Any) -> Any:
    """Keras ``model.evaluate(*args, **kwargs)`` for a model of a managed ParameterServerStrategy."""
    return _evaluate(model, **keras_arguments("evaluate", model, args, kwargs))


def _evaluate(model: keras.Model, *, x: Any, y: Any, batch_size: Any, verbose: Any, sample_weight: Any, steps: Any,
              callbacks: Any, return_dict: bool) -> Any:
    progress = Progress()

    def run() -> Any:
        internals.assert_compiled(model, "evaluate")
        check_positive_int("steps", steps)
        data = eval_input(x, y, sample_weight, batch_size, steps, what="evaluate")
        runner = runner_for(model)
        internals.symbolic_build(model, runner.strategy, data.spec() if isinstance(data, Arrays) else data.element_spec)
        evaluator = Evaluator(runner, data, runner.closures())
        level = resolve_verbose(verbose)
        callback_list = make_callback_list(model, callbacks, verbose=level, epochs=1, steps=evaluator.num_batches(),
                                       add_history=False)
        logs = evaluator.evaluate(callback_list, level)
        return logs if return_dict else internals.flatten_metrics_in_order(model, logs)

    with collecting_garbage():
        return translating(progress, run)
