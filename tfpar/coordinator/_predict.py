"""predict on the workers, batches returned in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._callbacks import Progress, make_callback_list, translating
from tfpar.coordinator._common import check_positive_int, keras_arguments
from tfpar.coordinator._evaluate import eval_input
from tfpar.coordinator._inputs import Arrays, DatasetInput
from tfpar.coordinator._runner import (
    Closures,
    Runner,
    collecting_garbage,
    run_if,
    runner_for,
    spec_shapes,
    spec_zeros,
    zeros_of_spec,
)
from tfpar.coordinator._worker_inputs import WorkerArrays, gather


def predict(model: keras.Model, *args: Any, **kwargs: Any) -> Any:
    """Keras ``model.predict(*args, **kwargs)`` for a model of a managed ParameterServerStrategy."""
    return _predict(model, **keras_arguments("predict", model, args, kwargs))


def _predict(model: keras.Model, *, x: Any, batch_size: Any, verbose: Any, steps: Any, callbacks: Any) -> Any:
    progress = Progress()
    with collecting_garbage():
        return translating(progress, lambda: _predict_loop(model, x, batch_size, verbose, steps, callbacks))


def _predict_loop(model: keras.Model, x: Any, batch_size: Any, verbose: Any, steps: Any, callbacks: Any) -> Any:
    check_positive_int("steps", steps)
    if isinstance(x, (tuple, list)) and len(x) in (2, 3) and not isinstance(x, tf.data.Dataset):
        x = x[0] if isinstance(x, tuple) else x
    data = eval_input(x, None, None, batch_size, steps, what="predict")
    runner = runner_for(model)
    coordinator = runner.coordinator
    if isinstance(data, Arrays):
        x_spec = data.spec()[0]
    else:
        x_spec, _, _ = keras.utils.unpack_x_y_sample_weight(data.element_spec)
    internals.build_for_predict(model, runner.strategy, x_spec)
    closures = runner.closures()
    level = 1 if verbose == "auto" else verbose
    callback_list = make_callback_list(model, callbacks, verbose=level, epochs=1,
                                   steps=data.num_batches() if isinstance(data, Arrays) else None, add_history=False)
    model.stop_predicting = False
    callback_list.on_predict_begin()
    outputs: list[Any] = []
    if isinstance(data, Arrays):
        worker_data = WorkerArrays(runner, data)
        function = closures.get("predict_arrays", data.spec(), lambda: _predict_arrays_fn(runner))
        remotes = []
        for step, indices in enumerate(data.ordered_batches()):
            callback_list.on_predict_batch_begin(step)
            padded = np.zeros(data.batch_size, dtype=np.int64)
            padded[: len(indices)] = indices
            remotes.append(coordinator.schedule(
                function, args=(worker_data.iterator, tf.constant(padded), tf.constant(len(indices), tf.int64))
            ))
        for step, remote in enumerate(remotes):
            batch_outputs = remote.fetch()
            outputs.append(batch_outputs)
            callback_list.on_predict_batch_end(step, {"outputs": batch_outputs})
            if model.stop_predicting:
                break
        coordinator.join()
    else:
        outputs = _predict_dataset(runner, data, closures, callback_list)
    callback_list.on_predict_end()
    if not outputs:
        raise ValueError("predict got no batches: the dataset is empty.")
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *outputs)


def _predict_arrays_fn(runner: Runner) -> Callable[..., Any]:
    model = runner.model

    def predict_arrays(iterator: Any, indices: tf.Tensor, size: tf.Tensor) -> Any:
        data = next(iterator)
        return runner.step(model.predict_step, gather(data, indices[:size]), reduce="concat")

    return predict_arrays


def _predict_dataset(runner: Runner, data: DatasetInput, closures: Closures,
                     callback_list: keras.callbacks.CallbackList) -> list[Any]:
    coordinator = runner.coordinator
    dataset = data.dataset
    assert dataset is not None  # predict takes a dataset, never a dataset_fn
    per_worker = coordinator.create_per_worker_dataset(
        runner.strategy.experimental_distribute_dataset(dataset.enumerate())
    )
    iterator = iter(per_worker)
    function = closures.get(
        "predict_dataset", dataset.element_spec,
        lambda: _predict_dataset_fn(runner, dataset.enumerate().element_spec),
    )
    workers = runner.workers
    exhausted: set[int] = set()
    found: dict[int, Any] = {}
    while len(exhausted) < workers:
        remotes = [coordinator.schedule(function, args=(iterator,)) for _ in range(2 * workers)]
        coordinator.join()
        for remote in remotes:
            has, position, done, worker, batch_outputs = remote.fetch()
            if done:
                exhausted.add(int(worker))
            if has:
                found[int(position)] = batch_outputs
        if runner.model.stop_predicting:
            break
    ordered = []
    for step, position in enumerate(sorted(found)):
        callback_list.on_predict_batch_begin(step)
        ordered.append(found[position])
        callback_list.on_predict_batch_end(step, {"outputs": found[position]})
    return ordered


def _predict_dataset_fn(runner: Runner, element_spec: Any) -> Callable[..., Any]:
    model = runner.model
    workers = runner.workers
    x_spec, _, _ = keras.utils.unpack_x_y_sample_weight(element_spec[1])
    structure = runner.output_structure(model.predict_step, (x_spec,), reduce="concat")

    def predict_dataset(iterator: Any) -> Any:
        """Predicts this worker's next own batch: (found, position, exhausted, worker, outputs)."""
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        empty = tf.nest.map_structure(zeros_of_spec, element_spec)

        # Advance this worker's copy to its next own batch (position % workers == worker index).
        def body(found: tf.Tensor, done: tf.Tensor, element: Any) -> tuple[Any, ...]:
            optional = iterator.get_next_as_optional()
            has = optional.has_value()
            element = tf.cond(has, optional.get_value, lambda: empty)
            position = tf.cast(element[0], tf.int64)
            mine = tf.logical_and(has, tf.equal(tf.math.floormod(position, workers), worker))
            return mine, tf.logical_not(has), element

        found, done, element = tf.while_loop(
            lambda found, done, element: tf.logical_and(tf.logical_not(found), tf.logical_not(done)),
            body,
            (tf.constant(False), tf.constant(False), empty),
            shape_invariants=(
                tf.TensorShape([]), tf.TensorShape([]), tf.nest.map_structure(lambda s: s.shape, element_spec)
            ),
        )

        def predict() -> Any:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(element[1])
            return runner.step(model.predict_step, (x,), reduce="concat")

        outputs = run_if(found, predict, spec_zeros(structure), spec_shapes(structure))
        return found, tf.cast(element[0], tf.int64), done, worker, outputs

    return predict_dataset
