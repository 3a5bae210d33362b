"""Inputs of fit/evaluate/predict: arrays, datasets, dataset functions, class weights."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar.coordinator._common import DEFAULT_BATCH_SIZE


@dataclasses.dataclass
class Arrays:
    """In-memory inputs: a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` of arrays."""

    data: tuple[Any, ...]
    count: int
    batch_size: int

    def spec(self) -> Any:
        return tf.nest.map_structure(
            lambda a: tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype)), self.data
        )

    def num_batches(self) -> int:
        return max(1, math.ceil(self.count / self.batch_size))

    def ordered_batches(self) -> list[np.ndarray]:
        order = np.arange(self.count, dtype=np.int64)
        return [order[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]

    def shuffled_batches(self, shuffle: Any) -> list[np.ndarray]:
        if shuffle is True:
            order = np.random.permutation(self.count).astype(np.int64)
            return [order[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]
        batches = self.ordered_batches()
        if shuffle == "batch":
            return [batches[i] for i in np.random.permutation(len(batches))]
        return batches


@dataclasses.dataclass
class DatasetInput:
    """A tf.data.Dataset, or a ``dataset_fn(input_context)`` run on every worker."""

    dataset: tf.data.Dataset | None
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset] | None
    element_spec: Any


def is_array_like(value: Any) -> bool:
    return isinstance(value, (np.ndarray, tf.Tensor, numbers.Number)) or (
        hasattr(value, "__array__") and hasattr(value, "shape")
    )


def _to_arrays(value: Any, name: str) -> Any:
    def convert(leaf: Any) -> np.ndarray:
        if isinstance(leaf, (tf.SparseTensor, tf.RaggedTensor)):
            raise TypeError(
                f"Sparse and ragged tensors in `{name}` are not supported by parameter-server fit; "
                f"pass a tf.data.Dataset. Received: {type(leaf).__name__}"
            )
        if not is_array_like(leaf):
            raise TypeError(
                f"Expected `{name}` to hold NumPy arrays or tensors. Received: an element of type "
                f"{type(leaf).__name__}. Supported inputs under 'parameter_server': arrays (or "
                "dicts/lists of arrays), a tf.data.Dataset, or (for fit) a dataset_fn(input_context)."
            )
        array = np.asarray(leaf)
        if array.ndim == 0:
            raise ValueError(f"Expected `{name}` to have a batch dimension. Received: a scalar {array!r}")
        return array

    if isinstance(value, list):
        value = tuple(value)
    return tf.nest.map_structure(convert, value)


def array_input(x: Any, y: Any, sample_weight: Any, batch_size: Any, *, what: str) -> Arrays:
    parts = [("x", x)] + ([("y", y)] if y is not None else []) + (
        [("sample_weight", sample_weight)] if sample_weight is not None else []
    )
    if sample_weight is not None and y is None:
        raise ValueError(f"`sample_weight` needs `y` in {what}. Received: y=None")
    data = tuple(_to_arrays(value, name) for name, value in parts)
    counts = {leaf.shape[0] for leaf in tf.nest.flatten(data)}
    if len(counts) != 1:
        sizes = {name: sorted({leaf.shape[0] for leaf in tf.nest.flatten(value)}) for name, value in zip(
            [n for n, _ in parts], data)}
        raise ValueError(
            f"Expected all arrays of {what} to have the same number of examples. Received sizes {sizes}"
        )
    count = counts.pop()
    if count == 0:
        raise ValueError(f"Expected at least one example in {what}. Received: 0 examples")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"Expected batch_size to be an int >= 1. Received: batch_size={batch_size!r}")
    return Arrays(data, count, int(batch_size))


def dataset_input(
    x: Any, y: Any, sample_weight: Any, batch_size: Any, *, what: str, allow_fn: bool
) -> DatasetInput | None:
    """A DatasetInput for a tf.data.Dataset or dataset_fn `x`, None for arrays."""
    is_fn = callable(x) and not isinstance(x, tf.data.Dataset) and not is_array_like(x)
    if not isinstance(x, tf.data.Dataset) and not is_fn:
        return None
    kind = "a tf.data.Dataset" if isinstance(x, tf.data.Dataset) else "a dataset_fn"
    for name, value in (("y", y), ("sample_weight", sample_weight), ("batch_size", batch_size)):
        if value is not None:
            shown = value if isinstance(value, (int, float)) else f"<{type(value).__name__}>"
            raise ValueError(
                f"`{name}` must not be given when `x` is {kind} (the dataset yields batches of "
                f"(x, y) or (x, y, sample_weight)). Received: {name}={shown}"
            )
    if is_fn:
        if not allow_fn:
            raise TypeError(
                f"{what} takes arrays or a tf.data.Dataset under 'parameter_server'; a "
                f"dataset_fn is accepted by fit only. Received: x={x!r}"
            )
        return DatasetInput(None, x, None)
    return DatasetInput(x, None, x.element_spec)


def check_input_type(x: Any, what: str) -> None:
    if x is None:
        raise ValueError(f"Expected data for {what}. Received: x=None")
    if isinstance(x, keras.utils.PyDataset) or hasattr(x, "__next__"):
        raise TypeError(
            f"{what} under 'parameter_server' takes NumPy arrays/tensors, a tf.data.Dataset, or "
            "(fit only) a dataset_fn(input_context): a Python generator or keras.utils.PyDataset "
            "runs in this process and cannot be shipped to the workers. Wrap it with "
            f"tf.data.Dataset.from_generator only if the generator can run on every worker. "
            f"Received: x of type {type(x).__name__}"
        )


def with_class_weight(dataset: tf.data.Dataset, class_weight: Mapping[int, float]) -> tf.data.Dataset:
    table = _class_weight_table(class_weight)

    def add(*element: Any) -> Any:
        if len(element) == 1 and isinstance(element[0], tuple):
            element = element[0]
        if len(element) != 2:
            raise ValueError(
                "class_weight needs a dataset of (x, y) batches. Received elements of "
                f"{len(element)} components."
            )
        x, y = element
        return x, y, _label_weights(y, table)

    return dataset.map(add)


def _class_weight_table(class_weight: Mapping[int, float]) -> tf.Tensor:
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise TypeError(f"Expected class_weight to be a non-empty dict {{class: weight}}. Received: {class_weight!r}")
    size = max(int(k) for k in class_weight) + 1
    weights = np.ones(size, dtype=np.float32)
    for key, value in class_weight.items():
        weights[int(key)] = float(value)
    return tf.constant(weights)


def _label_weights(y: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    y = tf.convert_to_tensor(y)
    if y.shape.rank is not None and y.shape.rank > 1 and (y.shape[-1] or 0) > 1:
        labels = tf.argmax(y, axis=-1)
    else:
        labels = tf.reshape(y, [-1])
    return tf.gather(table, tf.cast(labels, tf.int32))


def array_class_weights(y: Any, class_weight: Mapping[int, float]) -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise ValueError(
            "class_weight needs `y` to be a single array of class labels (or one-hot rows). "
            f"Received: y of type {type(y).__name__}"
        )
    return _label_weights(tf.constant(y), _class_weight_table(class_weight)).numpy()


def cardinality(dataset: tf.data.Dataset) -> int:
    return int(dataset.cardinality().numpy())
