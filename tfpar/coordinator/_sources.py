"""Training sources of the coordinator loop: what one epoch schedules, for arrays or a dataset.

A :class:`TrainSource` plans an epoch as closure items, schedules an item on the workers, says how
many steps an item carries, and, under bounded staleness, which items re-run the steps a closure
gave back. :class:`ArraySource` sends index batches of arrays every worker holds (each example once
per epoch); :class:`DatasetSource` has every worker draw steps from its own repeated copy of a
dataset. The fit loop is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._inputs import Arrays, DatasetInput
from tfpar.coordinator._runner import Runner
from tfpar.coordinator._worker_inputs import BatchStream, WorkerArrays, gather, pack_closures

ArrayItem = tuple[np.ndarray, np.ndarray, int]  # (indices, splits, number of steps)


class TrainSource(Protocol):
    """What the fit loop needs from its input."""

    def plan_epoch(self, steps: int) -> list[Any]:
        """The closure items of an epoch of `steps` steps."""

    def steps_in(self, item: Any) -> int:
        """How many steps `item` carries."""

    def schedule(self, item: Any) -> Any:
        """Schedules a training closure for `item`; returns its RemoteValue."""

    def leftovers(self, ran: int, item: Any) -> list[Any]:
        """Items for the steps of `item` that its closure did not run (it ran `ran`)."""


def train_source(runner: Runner, data: Arrays | DatasetInput, shuffle: bool | str) -> TrainSource:
    """Builds the model from the input's structure, then the source that feeds its training.

    Example:
    >>> source = train_source(runner, arguments.data, arguments.shuffle)
    >>> remote = source.schedule(source.plan_epoch(10)[0])
    """
    spec = data.spec() if isinstance(data, Arrays) else _element_spec(runner, data)
    internals.symbolic_build(runner.model, runner.strategy, spec)
    if isinstance(data, Arrays):
        return ArraySource(runner, data, shuffle)
    return DatasetSource(runner, data, spec)


class ArraySource:
    """Index batches of arrays every worker holds; epochs continue one stream of passes."""

    def __init__(self, runner: Runner, arrays: Arrays, shuffle: bool | str) -> None:
        self.runner = runner
        self.arrays = arrays
        self.per_closure = int(runner.model.steps_per_execution)
        self.iterator = WorkerArrays(runner, arrays).iterator  # what every training closure reads
        self.stream = BatchStream(arrays, shuffle)
        spec = arrays.spec()
        self.function = runner.closures().get(
            "train_arrays", spec, lambda: _train_arrays_fn(runner, _output_structure(runner, spec))
        )

    def plan_epoch(self, steps: int) -> list[ArrayItem]:
        return pack_closures(self.stream.take(steps), self.per_closure, self.arrays.batch_size)

    def steps_in(self, item: ArrayItem) -> int:
        return item[2]

    def schedule(self, item: ArrayItem) -> Any:
        indices, splits, n = item
        return self.runner.coordinator.schedule(
            self.function, args=(self.iterator, tf.constant(indices), tf.constant(splits), n)
        )

    def leftovers(self, ran: int, item: ArrayItem) -> list[ArrayItem]:
        indices, splits, n = item
        if ran >= n:
            return []
        batches = [indices[splits[i] : splits[i + 1]] for i in range(ran, n)]
        return pack_closures(batches, len(splits) - 1, self.arrays.batch_size)


class DatasetSource:
    """Every worker draws steps from its own repeated copy of the dataset."""

    def __init__(self, runner: Runner, dataset: DatasetInput, element_spec: Any) -> None:
        self.runner = runner
        self.per_closure = int(runner.model.steps_per_execution)
        per_worker = runner.coordinator.create_per_worker_dataset(_per_worker_dataset(runner, dataset))
        self.iterator = iter(per_worker)
        self.function = runner.closures().get(
            "train_dataset", element_spec, lambda: _train_dataset_fn(runner, _output_structure(runner, element_spec))
        )

    def plan_epoch(self, steps: int) -> list[int]:
        return [min(self.per_closure, steps - s) for s in range(0, steps, self.per_closure)]

    def steps_in(self, item: int) -> int:
        return item

    def schedule(self, item: int) -> Any:
        return self.runner.coordinator.schedule(self.function, args=(self.iterator, item))

    def leftovers(self, ran: int, item: int) -> list[int]:
        return [item - ran] if ran < item else []


def _output_structure(runner: Runner, spec: Any) -> Any:
    """The train step's output structure, which bounded staleness needs for skipped closures."""
    if runner.staleness is None:
        return None
    return runner.output_structure(runner.model.train_step, spec)


def _element_spec(runner: Runner, dataset: DatasetInput) -> Any:
    if dataset.dataset_fn is None:
        return dataset.element_spec
    return _probe_element_spec(runner, dataset.dataset_fn)


def _probe_element_spec(runner: Runner, dataset_fn: Callable[..., Any]) -> Any:
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


def _per_worker_dataset(runner: Runner, dataset: DatasetInput) -> Any:
    strategy = runner.strategy
    if dataset.dataset is not None:
        return strategy.experimental_distribute_dataset(dataset.dataset.repeat())
    user_fn = dataset.dataset_fn
    assert user_fn is not None  # a DatasetInput holds a dataset or a dataset_fn
    workers = runner.workers

    def per_worker_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        own = tf.distribute.InputContext(workers, worker, context.num_replicas_in_sync)
        return user_fn(own).repeat()

    return lambda: strategy.distribute_datasets_from_function(per_worker_fn)


def _train_arrays_fn(runner: Runner, structure: Any) -> Callable[..., Any]:
    model = runner.model

    def train_arrays(iterator: Any, indices: tf.Tensor, splits: tf.Tensor, n: int) -> Any:
        data = next(iterator)

        def one_step(i: tf.Tensor) -> Any:
            batch = gather(data, indices[splits[i] : splits[i + 1]])
            return runner.step(model.train_step, batch)

        return runner.run_steps(n, one_step, structure)

    return train_arrays


def _train_dataset_fn(runner: Runner, structure: Any) -> Callable[..., Any]:
    model = runner.model

    def train_dataset(iterator: Any, n: int) -> Any:
        def one_step(i: tf.Tensor) -> Any:
            return runner.step(model.train_step, next(iterator))

        return runner.run_steps(n, one_step, structure)

    return train_dataset
