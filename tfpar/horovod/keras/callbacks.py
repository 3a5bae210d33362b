"""Horovod's Keras callbacks (``hvd.callbacks``) for Keras 3 ``fit``.

``BroadcastGlobalVariablesCallback``, ``MetricAverageCallback``, ``LearningRateScheduleCallback``
and ``LearningRateWarmupCallback``, with Horovod's arguments and schedule formulas. Differences
from Horovod are listed in each class's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat.horovod_keras import momentum_slots
from tfpar.horovod import _state
from tfpar.horovod.collectives import grouped_allreduce
from tfpar.horovod.functions import broadcast_variables

__all__ = [
    "BroadcastGlobalVariablesCallback",
    "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
    "MetricAverageCallback",
]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Gives every process root_rank's model and optimizer variables, once, when training starts.

    Difference from Horovod: the broadcast runs in ``on_train_begin`` (Keras 3 builds the model
    and the optimizer before it), so the first step already starts from identical weights;
    Horovod broadcasts after the first batch (TF1 created variables lazily), so its first update
    is computed from each process's own initial weights. If the model is not built yet at
    ``on_train_begin`` (no ``keras.Input``), the broadcast waits for the end of the first batch,
    as in Horovod. Keras 3 builds the optimizer only while tracing the first step when there
    is no strategy: the callback builds it at ``on_train_begin`` (as Keras does under a strategy)
    when the model is built. ``device`` places nothing (the collective runs on the process's device).

    Args:
        root_rank: The rank whose variables everyone gets.
        device: Accepted for compatibility.

    Example:
    >>> model.fit(x, y, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    """

    def __init__(self, root_rank: int, device: str = "") -> None:
        super().__init__()
        if isinstance(root_rank, bool) or not isinstance(root_rank, int):
            raise TypeError(f"Expected root_rank to be an int. Received: root_rank={root_rank!r}")
        self.root_rank = root_rank
        self.device = device
        self.broadcast_done = False

    def _broadcast(self) -> None:
        variables = list(self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            variables += list(optimizer.variables)
        broadcast_variables(variables, root_rank=self.root_rank)
        self.broadcast_done = True

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.broadcast_done or not self.model.built or not self.model.trainable_variables:
            return
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # Without a strategy Keras builds the optimizer while tracing the first step; built
            # now (as Keras does under a strategy), its variables are broadcast with the model's.
            optimizer.build(self.model.trainable_variables)
        self._broadcast()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if not self.broadcast_done:
            self._broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """Averages the epoch's logs (metrics, validation metrics) over the processes, in place.

    Put it before the callbacks that read metrics (ReduceLROnPlateau, EarlyStopping,
    ModelCheckpoint, TensorBoard), as in Horovod. Difference from Horovod: the values are
    averaged in one grouped all-reduce (Horovod: one per metric); the result is the same. Every
    process must log the same metric names.

    Args:
        device: Accepted for compatibility.

    Example:
    >>> callbacks = [hvd.callbacks.MetricAverageCallback(), keras.callbacks.ReduceLROnPlateau()]
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()
        self.device = device

    def _average_metrics_in_place(self, logs: dict[str, Any] | None) -> None:
        if not logs:
            return
        names = sorted(name for name, value in logs.items() if np.ndim(value) == 0 and _is_number(value))
        if not names or _state.size() == 1:
            return
        values = [tf.constant(float(logs[name]), tf.float64) for name in names]
        for name, value in zip(names, grouped_allreduce(values, name="MetricAverageCallback")):
            logs[name] = float(value.numpy())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._average_metrics_in_place(logs)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _get_lr(optimizer: Any) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Sets the learning rate to ``initial_lr * multiplier(epoch)`` from `start_epoch` to `end_epoch`.

    As in Horovod: a constant `multiplier` means ``multiplier ** (epoch - start_epoch)``; with
    ``staircase=True`` the rate changes at the first batch of each epoch (integer epochs), else at
    every batch with ``epoch + batch / steps_per_epoch``. With `momentum_correction`, the step
    after a change uses momentum scaled by ``new_lr / old_lr`` (Goyal et al. 2017).

    Differences from Horovod: Keras 3 optimizers have ``learning_rate`` (no ``lr``), which must be
    a number or variable, not a ``LearningRateSchedule``; and their ``momentum`` is a Python
    number compiled into the train step, so momentum correction scales the optimizer's momentum
    slots (velocities) by ``new_lr / old_lr`` before the batch instead: for ``SGD`` (without
    Nesterov) and ``RMSprop`` this is the same update as Horovod's; optimizers without momentum
    slots get no correction (as in Horovod, which corrects only optimizers with ``momentum``).
    ``steps_per_epoch`` is read from Keras's ``params["steps"]``.

    Args:
        initial_lr: The learning rate the multiplier scales (None: the optimizer's at train begin).
        multiplier: A number, or a function of the (possibly fractional) epoch.
        start_epoch: The first epoch adjusted.
        end_epoch: The first epoch no longer adjusted (None: never stops).
        staircase: Adjust once per epoch (True) or at every batch (False).
        momentum_correction: Apply momentum correction where the optimizer has momentum slots.
        steps_per_epoch: Batches per epoch, for ``staircase=False`` (default: Keras's count).

    Example:
    >>> hvd.callbacks.LearningRateScheduleCallback(initial_lr=0.1 * hvd.size(), multiplier=0.1,
    ...                                            start_epoch=30, end_epoch=60)
    """

    def __init__(
        self,
        initial_lr: float | None,
        multiplier: float | Callable[[float], float],
        start_epoch: int = 0,
        end_epoch: int | None = None,
        staircase: bool = True,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if initial_lr is not None and (isinstance(initial_lr, bool) or not isinstance(initial_lr, (int, float))):
            raise TypeError(f"Expected initial_lr to be a number. Received: initial_lr={initial_lr!r}")
        if not callable(multiplier) and (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))):
            raise TypeError(f"Expected multiplier to be a number or a function of the epoch. "
                            f"Received: multiplier={multiplier!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"Expected steps_per_epoch to be an int >= 1 or None. "
                             f"Received: steps_per_epoch={steps_per_epoch!r}")
        self.initial_lr = initial_lr
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch: int | None = None
        if callable(multiplier):
            self.multiplier = multiplier
        else:
            constant = float(multiplier)
            self.multiplier = lambda epoch: constant ** (epoch - start_epoch)

    def _optimizer(self) -> Any:
        optimizer = self.model.optimizer
        if isinstance(optimizer.learning_rate, keras.optimizers.schedules.LearningRateSchedule) or not hasattr(
            optimizer.learning_rate, "assign"
        ):
            raise TypeError(
                f"{type(self).__name__} sets the optimizer's learning rate, which must be a number. Received: "
                f"learning_rate={optimizer.learning_rate!r}. Pass a float learning rate to the optimizer."
            )
        return optimizer

    def _adjust_learning_rate(self, epoch: float) -> None:
        optimizer = self._optimizer()
        old_lr = _get_lr(optimizer)
        new_lr = float(self.initial_lr) * float(self.multiplier(epoch))  # type: ignore[arg-type]
        optimizer.learning_rate = new_lr
        has_momentum = bool(getattr(optimizer, "momentum", None))
        if self.momentum_correction and has_momentum and old_lr > 0 and new_lr != old_lr:
            for slot in momentum_slots(optimizer):
                slot.assign(slot * tf.cast(new_lr / old_lr, slot.dtype))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.initial_lr is None:
            self.initial_lr = _get_lr(self._optimizer())
        if not self.staircase and not self.steps_per_epoch:
            steps = (self.params or {}).get("steps")
            if not steps:
                raise ValueError(
                    f"{type(self).__name__} could not read the number of steps per epoch from Keras (an input "
                    "without a known length). Received: steps_per_epoch=None. Pass steps_per_epoch=..."
                )
            self.steps_per_epoch = int(steps)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        epoch = self.current_epoch if self.current_epoch is not None else 0
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return
        if self.staircase:
            if batch == 0:
                self._adjust_learning_rate(epoch)
        else:
            self._adjust_learning_rate(epoch + float(batch) / float(self.steps_per_epoch))  # type: ignore[arg-type]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["lr"] = _get_lr(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Gradual warmup (Goyal et al. 2017): ``initial_lr / size()`` rising to ``initial_lr`` over `warmup_epochs`.

    Horovod's formula: at fractional epoch ``e = epoch + (batch + 1) / steps_per_epoch``,
    ``lr = initial_lr / size() * (e * (size() - 1) / warmup_epochs + 1)``, adjusted at every batch
    of the first `warmup_epochs` epochs. Differences from Horovod: those of
    :class:`LearningRateScheduleCallback`.

    Args:
        initial_lr: The learning rate at the end of the warmup (usually ``base_lr * hvd.size()``).
        warmup_epochs: The number of warmup epochs.
        momentum_correction: Apply momentum correction where the optimizer has momentum slots.
        steps_per_epoch: Batches per epoch (default: Keras's count).
        verbose: 1: rank 0 prints when the warmup ends.

    Example:
    >>> hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.001 * hvd.size(), warmup_epochs=3, verbose=1)
    """

    def __init__(
        self,
        initial_lr: float | None,
        warmup_epochs: int = 5,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
        verbose: int = 0,
    ) -> None:
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 1:
            raise ValueError(f"Expected warmup_epochs to be an int >= 1. Received: warmup_epochs={warmup_epochs!r}")

        def multiplier(epoch: float) -> float:
            epoch += 1.0 / float(self.steps_per_epoch)  # type: ignore[arg-type]
            size = _state.size()
            return 1.0 / size * (epoch * (size - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and _state.rank() == 0:  # type: ignore[operator]
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {_get_lr(self.model.optimizer):g}.")
