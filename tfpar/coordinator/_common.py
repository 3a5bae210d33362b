"""Constants, the public error and options types of the parameter-server loop."""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import weakref
from typing import Any

import tensorflow as tf

from tfpar._compat import internals

#: Names accepted by ``variable_partitioner`` besides an int (fixed shards) and a partitioner.
VARIABLE_PARTITIONERS = ("min_size",)
DEFAULT_MIN_SHARD_BYTES = 256 << 10
DEFAULT_BATCH_SIZE = 32
STALENESS_POLL_SECONDS = 0.002
STALENESS_TIMEOUT_SECONDS = 60.0
EVAL_BATCHES_PER_CLOSURE = 8


class ParameterServerError(RuntimeError):
    """A parameter server failed during training: its variables are lost.

    Attributes:
        ps_tasks: Indices of the failed ps tasks (empty when TensorFlow's message names none).
        epoch: The epoch that was running (0-based).
        last_finished_epoch: The last epoch that finished, or None.
        backup_dir: The BackupAndRestore directory holding the checkpoint to resume from, or
            None when the fit had no BackupAndRestore callback.
    """

    def __init__(
        self, message: str, *, ps_tasks: tuple[int, ...], epoch: int, last_finished_epoch: int | None,
        backup_dir: str | None,
    ) -> None:
        super().__init__(message)
        self.ps_tasks = ps_tasks
        self.epoch = epoch
        self.last_finished_epoch = last_finished_epoch
        self.backup_dir = backup_dir


@dataclasses.dataclass(frozen=True)
class ParameterServerOptions:
    """What :func:`parameter_server_strategy` was asked for (see :func:`options`).

    Attributes:
        staleness: None for asynchronous training; k >= 0 for bounded staleness.
        variable_partitioner: The partitioner given to ParameterServerStrategy, or None.
    """

    staleness: int | None = None
    variable_partitioner: Any = None


STRATEGY_OPTIONS: weakref.WeakKeyDictionary[tf.distribute.Strategy, ParameterServerOptions] = (
    weakref.WeakKeyDictionary()
)


def options(strategy: tf.distribute.Strategy) -> ParameterServerOptions:
    """The parameter-server options of `strategy` (defaults for one tfpar did not create).

    Args:
        strategy: A ``tf.distribute.ParameterServerStrategy``.

    Returns:
        Its :class:`ParameterServerOptions`.

    Raises:
        TypeError: If `strategy` is not a ParameterServerStrategy.

    Example:
    >>> strategy = tfpar.coordinator.parameter_server_strategy(tfpar.local_cluster(), staleness=1)
    >>> tfpar.coordinator.options(strategy).staleness
    1
    """
    if not isinstance(strategy, tf.distribute.ParameterServerStrategy):
        raise TypeError(
            "Expected a tf.distribute.ParameterServerStrategy. "
            f"Received: strategy={strategy!r} (of type {type(strategy).__name__})"
        )
    return STRATEGY_OPTIONS.get(strategy, ParameterServerOptions())


def check_positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"Expected {name} to be an int >= 1{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )


def keras_arguments(method: str, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a Keras ``model.<method>(*args, **kwargs)`` call, by name, defaults filled.

    Bound against Keras's own signature (``tfpar._compat.internals.trainer_signature``), so
    Keras's parameter list is written nowhere in tfpar. Extra keywords a Keras method collects in
    ``**kwargs`` (only ``evaluate`` has them) are refused as Keras refuses them.
    """
    signature = internals.trainer_signature(method)
    bound = signature.bind(model, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # the model itself
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = arguments.pop(parameter.name)
            if extra:
                raise ValueError(f"Arguments not recognized: {extra}")
    return arguments
