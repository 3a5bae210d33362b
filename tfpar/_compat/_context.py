"""What every fix asks: is this strategy tfpar's, which model's fit runs in this thread, its state.

One thread-local, :data:`CONTEXT`, holds the running fit / evaluate / predict calls of this thread
(a stack: a callback may call another model's fit) and whether a managed epoch iterator is
building its dataset. Keras runs a fit's step functions and (non-async) callbacks in the thread
that called fit, which is where the fixes read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from tfpar import cluster as cluster_lib
from tfpar._compat import internals

_MANAGED: weakref.WeakSet[tf.distribute.Strategy] = weakref.WeakSet()


def add_managed(strategy: tf.distribute.Strategy) -> None:
    """Makes tfpar's fixes apply to models trained under `strategy`."""
    _MANAGED.add(strategy)


def is_managed(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether tfpar's fixes apply to models trained under `strategy`."""
    return strategy is not None and strategy in _MANAGED


def is_managed_ps(strategy: Any) -> bool:
    """Whether `strategy` is a ParameterServerStrategy that tfpar manages."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy) and is_managed(strategy)


def non_chief_worker(model: Any) -> bool:
    """Whether `model` trains on a non-chief worker of a managed multi-worker strategy."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or not is_managed(strategy) or not internals.in_multi_worker_mode(strategy):
        return False
    return not cluster_lib.is_chief(strategy.cluster_resolver)


def multi_worker_chief(model: Any) -> bool:
    """Whether `model` trains on the chief of a managed multi-worker strategy."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or not is_managed(strategy) or not internals.in_multi_worker_mode(strategy):
        return False
    return bool(cluster_lib.is_chief(strategy.cluster_resolver))


def managed_model(callback: Any) -> bool:
    """Whether `callback` is attached to a model of a managed strategy."""
    model = getattr(callback, "model", None)
    return model is not None and is_managed(getattr(model, "_distribute_strategy", None))


@dataclasses.dataclass
class FitState:
    """Per-fit state tfpar keeps for a managed model."""

    seed: tf.Variable  # shuffle seed (int64); shared by workers, saved with backups
    epoch: tf.Variable  # the epoch being trained (int64), read by the shuffle permutation
    skip_steps: int = 0  # steps of the first (resumed) epoch that a backup already contains
    current_epoch: int = 0


@dataclasses.dataclass(frozen=True)
class _Call:
    model: Any
    state: FitState | None


class FitContext(threading.local):
    """The fit / evaluate / predict calls running in this thread, innermost last."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.building_epoch_dataset = False


CONTEXT = FitContext()


@contextlib.contextmanager
def running(model: Any, state: FitState | None = None) -> Iterator[None]:
    """Marks `model` as the one whose fit (with `state`) / evaluate / predict runs in this thread."""
    CONTEXT.calls.append(_Call(model, state))
    try:
        yield
    finally:
        CONTEXT.calls.pop()


def running_model() -> Any:
    """The model whose fit / evaluate / predict runs innermost in this thread, or None."""
    return CONTEXT.calls[-1].model if CONTEXT.calls else None


def fit_state(model: Any) -> FitState | None:
    """The state of the `fit` running on `model` under a tfpar strategy, if any."""
    for call in reversed(CONTEXT.calls):
        if call.model is model and call.state is not None:
            return call.state
    return None


def shuffle_state() -> FitState | None:
    """The state of the innermost managed fit running in this thread, if any."""
    for call in reversed(CONTEXT.calls):
        if call.state is not None:
            return call.state
    return None


@contextlib.contextmanager
def building_epoch_dataset() -> Iterator[None]:
    """Marks that a managed epoch iterator builds its dataset (the array adapter reads this)."""
    CONTEXT.building_epoch_dataset = True
    try:
        yield
    finally:
        CONTEXT.building_epoch_dataset = False
