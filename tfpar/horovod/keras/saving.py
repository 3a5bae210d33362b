"""``hvd.load_model``: loads a saved Keras model with its optimizer wrapped in ``hvd.DistributedOptimizer``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import keras

from tfpar.horovod import _state
from tfpar.horovod.compression import Compression, Compressor
from tfpar.horovod.keras.optimizer import check_options, distributed_class
from tfpar.horovod.ops import Average
from tfpar.horovod.process_sets import global_process_set

__all__ = ["load_model"]


def _keras_optimizers() -> list[type]:
    """The optimizer classes ``keras.optimizers`` exports (Horovod: those of the optimizer modules)."""
    return [obj for _, obj in inspect.getmembers(keras.optimizers, inspect.isclass)
            if issubclass(obj, keras.optimizers.Optimizer) and obj is not keras.optimizers.Optimizer]


def load_model(
    filepath: Any,
    custom_optimizers: Sequence[type] | None = None,
    custom_objects: dict[str, Any] | None = None,
    compression: type[Compressor] = Compression.none,
) -> keras.Model:
    """Loads a saved Keras model whose optimizer becomes a ``hvd.DistributedOptimizer`` (state included).

    Every optimizer class of ``keras.optimizers`` and of `custom_optimizers` is replaced, while
    loading, by its distributed subclass, so the optimizer and its saved variables are restored
    into a distributed optimizer (Horovod's default options, and `compression`).

    Differences from Horovod: Keras 3 formats (``.keras``; ``.h5`` as Keras 3 reads it); the
    replacements are classes (Keras 3 deserializes with ``from_config``), registered under the
    class name as Horovod does; entries of `custom_objects` win over them, as in Horovod.

    Args:
        filepath: The saved model (``.keras`` or ``.h5`` path), as for ``keras.models.load_model``.
        custom_optimizers: Optimizer classes of your own to wrap as well.
        custom_objects: Other custom classes or functions needed to load the model.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16`` for the gradients.

    Returns:
        The model, compiled with the distributed optimizer if it was saved compiled.

    Raises:
        ValueError: Before ``hvd.init()``.
        TypeError: If a custom optimizer is not a Keras optimizer class.

    Example:
    >>> model = hvd.load_model("checkpoint-5.keras")     # resume training on every process
    >>> model.fit(dataset, initial_epoch=5, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    """
    _state.require()
    classes = _keras_optimizers()
    for cls in custom_optimizers or ():
        if not (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)):
            raise TypeError("Expected custom_optimizers to be Keras optimizer classes. "
                            f"Received: {cls!r} in custom_optimizers")
        classes.append(cls)
    options = check_options(None, "", "", compression, False, 1.0, Average, 1, False, 0, None, global_process_set)
    objects: dict[str, Any] = {}
    for cls in classes:
        objects[cls.__name__] = distributed_class(cls, {**options, "name": "Distributed" + cls.__name__})
    objects.update(custom_objects or {})
    return keras.models.load_model(filepath, custom_objects=objects)
