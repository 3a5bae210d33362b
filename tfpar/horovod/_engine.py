"""The one primitive every collective is made of: sums and all-gathers in the strategy's replica context.

``exchange(strategy, sum_groups, gathers)`` runs, in ``strategy.run``, one
``ReplicaContext.all_reduce(SUM, group)`` per group (a group is one dtype: TensorFlow packs a
group into one collective) and one ``ReplicaContext.all_gather(t, axis=0)`` per gathered tensor
(TensorFlow pads a first dimension that differs between processes, gathers and slices). Inside a
``tf.function`` it adds the collectives to the function being traced; outside, it calls a cached
``tf.function`` (TensorFlow's all-gather needs a graph, and eager replica calls are slow).
Collectives are matched between processes by their order, as everywhere in ``tf.distribute``.
"""

from __future__ import annotations

import collections
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = ["exchange"]

_EAGER: weakref.WeakKeyDictionary[Any, collections.OrderedDict[Any, Any]] = weakref.WeakKeyDictionary()
_MAX_EAGER_FUNCTIONS = 256


def _replica_fn(sum_groups: Sequence[Sequence[Any]], gathers: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    context = tf.distribute.get_replica_context()
    # tf.identity: a value made in the replica function is on the replica's device (a function
    # input has none, and a one-device reduction needs one). stop_gradient: TensorFlow's
    # all_reduce gradient needs a replica context, which the caller's gradient has not.
    sums = [
        context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.identity(tf.stop_gradient(t)) for t in group])
        for group in sum_groups
    ]
    gathered = [context.all_gather(tf.identity(tf.stop_gradient(t)), axis=0) for t in gathers]
    return sums, gathered


def _local(strategy: Any, value: Any) -> Any:
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], value)


def exchange(strategy: Any, sum_groups: Sequence[Sequence[Any]], gathers: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """All-reduces (sum) each group and all-gathers (axis 0) each tensor of `gathers`.

    Args:
        strategy: The MultiWorkerMirroredStrategy (one device per process).
        sum_groups: Non-empty lists of tensors of one dtype each; the shapes must match between processes.
        gathers: Tensors of rank >= 1; the first dimension may differ between processes.

    Returns:
        ``(sums, gathered)``: the summed groups (same structure), the gathered tensors.
    """
    sum_groups = [list(group) for group in sum_groups]
    gathers = list(gathers)
    if tf.inside_function():
        return _local(strategy, strategy.run(_replica_fn, args=(sum_groups, gathers)))
    # One tf.function per signature (each traced once): a Horovod script's eager collectives come
    # in a few shapes, and one Function retraced for each would warn about retracing.
    functions = _EAGER.setdefault(strategy, collections.OrderedDict())
    key = (_signature(sum_groups), _signature([gathers]))
    function = functions.get(key)
    if function is None:
        # A partial, not a closure: TensorFlow counts retracing per code object, and each of these
        # functions is traced once.
        function = functions[key] = tf.function(functools.partial(_run, strategy), autograph=False)
        if len(functions) > _MAX_EAGER_FUNCTIONS:
            functions.popitem(last=False)
    else:
        functions.move_to_end(key)
    sums, gathered = function(sum_groups, gathers)
    return list(sums), list(gathered)


def _run(strategy: Any, groups: Any, tensors: Any) -> Any:
    return _local(strategy, strategy.run(_replica_fn, args=(groups, tensors)))


def _signature(groups: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    return tuple(tuple((t.dtype, tuple(t.shape)) for t in group) for group in groups)
