"""Agreeing on measured numbers between the workers of a multi-worker job.

Every worker of a ``MultiWorkerMirroredStrategy`` job runs the same search. Their clocks differ a
little, so a worker deciding from its own timings could stop the search (or pick a setting) where
another continues, and the next collective would wait forever. :meth:`Agreement.mean` all-reduces
the numbers every decision is made from, so every worker decides from the same values. In one
process (mirrored, one device, a split model) it returns its input.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = ["Agreement", "is_multi_worker"]


def is_multi_worker(strategy: Any) -> bool:
    """Whether `strategy` runs in several processes that must agree (MultiWorkerMirroredStrategy)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _mean_over_replicas(values: tf.Tensor) -> tf.Tensor:
    context = tf.distribute.get_replica_context()
    # tf.identity: a value on the replica's device (a function input has none).
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(values))
    return total / tf.cast(context.num_replicas_in_sync, total.dtype)


def _run(strategy: Any, values: tf.Tensor) -> tf.Tensor:
    return strategy.experimental_local_results(strategy.run(_mean_over_replicas, args=(values,)))[0]


class Agreement:
    """The mean over all workers of a few numbers (each worker passes its own).

    Args:
        strategy: The job's strategy; only a MultiWorkerMirroredStrategy all-reduces.

    Example:
        >>> agreement = tfpar.tuning.Agreement(tf.distribute.get_strategy())  # doctest: +SKIP
        >>> agreement.mean([elapsed, failed])  # the same list on every worker  # doctest: +SKIP
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.active = is_multi_worker(strategy)
        self._functions: dict[int, Any] = {}

    def mean(self, values: Sequence[float]) -> list[float]:
        """Every worker's `values` averaged element-wise (the same length on every worker)."""
        values = [float(v) for v in values]
        if not self.active:
            return values
        function = self._functions.get(len(values))
        if function is None:
            # A partial, not a closure: one trace per length, no retracing warnings.
            function = self._functions[len(values)] = tf.function(
                functools.partial(_run, self.strategy), autograph=False
            )
        result = function(tf.constant(values, tf.float64))
        return [float(v) for v in result.numpy()]
