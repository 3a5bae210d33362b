"""fit's arguments: Keras's call bound once, validated and converted for the coordinator loop.

:func:`parse_fit_arguments` binds a ``model.fit(...)`` call against Keras's own signature (so the
parameter list is written nowhere in tfpar), runs every check that needs no cluster, and
converts the inputs: arrays or a dataset, class weights, the validation split, the number of
steps per epoch and the validation data.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._common import check_positive_int, keras_arguments
from tfpar.coordinator._evaluate import eval_input
from tfpar.coordinator._inputs import (
    Arrays,
    DatasetInput,
    array_class_weights,
    array_input,
    cardinality,
    check_input_type,
    dataset_input,
    is_array_like,
    with_class_weight,
)


@dataclasses.dataclass(frozen=True)
class FitArguments:
    """A ``model.fit(...)`` call, validated and with its inputs converted.

    Attributes:
        data: The training input: in-memory arrays, or a dataset / dataset_fn.
        epochs: The epoch to stop before (``keras.config.max_epochs()`` applied).
        initial_epoch: The epoch to start at (before BackupAndRestore's restore).
        steps_per_epoch: Steps per epoch, over all workers.
        shuffle: True, False or ``"batch"`` (arrays only).
        verbose: As given to fit (``"auto"`` unresolved).
        callbacks: As given to fit.
        validation: The validation input (arrays or a finite dataset), or None.
        validation_freq: An int (every n epochs) or a list of 1-based epochs.
    """

    data: Arrays | DatasetInput
    epochs: int
    initial_epoch: int
    steps_per_epoch: int
    shuffle: bool | str
    verbose: Any
    callbacks: Any
    validation: Arrays | DatasetInput | None
    validation_freq: int | list[int]


def parse_fit_arguments(model: keras.Model, *args: Any, **kwargs: Any) -> FitArguments:
    """Binds, checks and converts the arguments of ``model.fit(*args, **kwargs)``.

    Args:
        model: A compiled model of a ParameterServerStrategy.
        *args: Positional arguments of Keras's ``fit``.
        **kwargs: Keyword arguments of Keras's ``fit``.

    Returns:
        The :class:`FitArguments`.

    Raises:
        TypeError: For an argument Keras's fit does not take, or an input of the wrong kind.
        ValueError: For an argument with a wrong value (Keras's messages where Keras checks it).

    Example:
    >>> arguments = parse_fit_arguments(model, x, y, batch_size=32, epochs=3, validation_split=0.1)
    >>> arguments.steps_per_epoch, arguments.epochs
    (29, 3)
    """
    given = keras_arguments("fit", model, args, kwargs)
    internals.assert_compiled(model, "fit")
    check_input_type(given["x"], "fit")
    epochs = _check_options(given)
    data, validation_data = _training_input(given)
    steps = _steps_per_epoch(data, given["steps_per_epoch"])
    validation = None
    if validation_data is not None:
        validation = eval_input(
            validation_data, None, None, given["validation_batch_size"] or given["batch_size"],
            given["validation_steps"], what="validation_data", tuple_data=True,
        )
    return FitArguments(
        data=data, epochs=epochs, initial_epoch=given["initial_epoch"], steps_per_epoch=steps,
        shuffle=given["shuffle"], verbose=given["verbose"], callbacks=given["callbacks"],
        validation=validation, validation_freq=given["validation_freq"],
    )


def _check_options(given: dict[str, Any]) -> int:
    """Checks the scalar options; returns the number of epochs (capped by Keras's max_epochs)."""
    check_positive_int("steps_per_epoch", given["steps_per_epoch"])
    check_positive_int("validation_steps", given["validation_steps"])
    epochs = given["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"Expected epochs to be an int >= 0. Received: epochs={epochs!r}")
    max_epochs = keras.config.max_epochs() if hasattr(keras.config, "max_epochs") else None
    if max_epochs and max_epochs < epochs:
        epochs = max_epochs
    shuffle = given["shuffle"]
    if shuffle not in (True, False, "batch"):
        raise ValueError(f"Expected shuffle to be True, False or 'batch'. Received: shuffle={shuffle!r}")
    frequency = given["validation_freq"]
    if not isinstance(frequency, (int, list)) or isinstance(frequency, bool):
        raise ValueError(f"Expected `validation_freq` to be a list or int. Received: validation_freq={frequency!r}")
    return epochs


def _training_input(given: dict[str, Any]) -> tuple[Arrays | DatasetInput, Any]:
    """The training input and the validation data (from the validation split, for arrays)."""
    x, y, sample_weight = given["x"], given["y"], given["sample_weight"]
    class_weight, validation_split = given["class_weight"], given["validation_split"]
    dataset = dataset_input(x, y, sample_weight, given["batch_size"], what="fit", allow_fn=True)
    if dataset is None:
        return _array_training_input(given)
    if validation_split:
        raise ValueError(
            "validation_split works with arrays only (as in Keras); with a dataset pass "
            f"validation_data. Received: validation_split={validation_split!r}"
        )
    if class_weight is not None:
        dataset = _dataset_with_class_weight(dataset, class_weight)
    return dataset, given["validation_data"]


def _dataset_with_class_weight(dataset: DatasetInput, class_weight: Any) -> DatasetInput:
    if dataset.dataset is not None:
        weighted = with_class_weight(dataset.dataset, class_weight)
        return DatasetInput(weighted, None, weighted.element_spec)
    user_fn = dataset.dataset_fn
    assert user_fn is not None  # a DatasetInput holds a dataset or a dataset_fn
    return DatasetInput(None, lambda context: with_class_weight(user_fn(context), class_weight), None)


def _array_training_input(given: dict[str, Any]) -> tuple[Arrays, Any]:
    x, y, sample_weight, class_weight = given["x"], given["y"], given["sample_weight"], given["class_weight"]
    if class_weight is not None:
        if sample_weight is not None:
            raise ValueError(
                "Arguments `sample_weight` and `class_weight` cannot be specified at the same "
                f"time. Received: sample_weight={type(sample_weight).__name__}, class_weight={class_weight}"
            )
        sample_weight = array_class_weights(np.asarray(y) if is_array_like(y) else y, class_weight)
    arrays = array_input(x, y, sample_weight, given["batch_size"], what="fit")
    validation_split, validation_data = given["validation_split"], given["validation_data"]
    if not validation_split or validation_data is not None:  # as Keras: validation_data wins
        return arrays, validation_data
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
    return Arrays(head, split, arrays.batch_size), tail


def _steps_per_epoch(data: Arrays | DatasetInput, steps_per_epoch: int | None) -> int:
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    if isinstance(data, Arrays):
        return data.num_batches()
    if data.dataset is None:
        raise ValueError(
            "fit with a dataset_fn needs steps_per_epoch: the dataset is built on each "
            "worker, so the coordinator cannot count its batches. Received: steps_per_epoch=None"
        )
    size = cardinality(data.dataset)
    if size < 0:
        state = "infinite" if size == tf.data.INFINITE_CARDINALITY else "of unknown size"
        raise ValueError(
            f"The dataset passed to fit is {state}, so an epoch has no natural end: pass "
            "steps_per_epoch (the number of steps, over all workers, per epoch). "
            "Received: steps_per_epoch=None"
        )
    if size == 0:
        raise ValueError("The dataset passed to fit is empty (0 batches).")
    return size
