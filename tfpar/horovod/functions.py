"""Horovod's helpers on top of the collectives: broadcast_variables, broadcast_object, allgather_object."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from tfpar.horovod import _state
from tfpar.horovod.collectives import allgather, broadcast_tensors
from tfpar.horovod.process_sets import ProcessSet, check_process_set, global_process_set

__all__ = ["allgather_object", "broadcast_object", "broadcast_variables"]


def broadcast_variables(
    variables: Iterable[Any],
    root_rank: int,
    process_set: ProcessSet = global_process_set,
    inplace: bool = False,
) -> Any:
    """Assigns root_rank's values to the variables on every process (one all-reduce per dtype).

    Works on ``tf.Variable`` and Keras 3 variables (``model.variables``), eagerly (Horovod's TF2
    examples call it after the first step) and inside a ``tf.function``.

    Args:
        variables: The variables, in the same order on every process.
        root_rank: The rank whose values everyone gets.
        process_set: Only ``hvd.global_process_set``.
        inplace: Accepted for compatibility (the values are always assigned in place).

    Returns:
        The grouped assignments (None eagerly), as Horovod's ``tf.group``.

    Raises:
        ValueError: Before :func:`hvd.init`, or if root_rank is not a rank.

    Example:
    >>> hvd.broadcast_variables(model.variables, root_rank=0)
    """
    _state.require()
    check_process_set(process_set)
    variables = list(variables)
    for variable in variables:
        if not hasattr(variable, "assign"):
            raise TypeError(f"Expected variables (with .assign). Received: {variable!r} (of type {type(variable).__name__})")
    if not variables:
        return tf.group()
    with tf.name_scope("HorovodBroadcastVariables"):
        values = broadcast_tensors([tf.convert_to_tensor(v) for v in variables], root_rank)
        return tf.group(*[variable.assign(value) for variable, value in zip(variables, values)])


def _eager_only(what: str) -> None:
    if tf.inside_function():
        raise RuntimeError(f"hvd.{what} exchanges Python objects and runs eagerly only. Call it outside tf.function.")


def _to_words(data: bytes) -> Any:
    padded = data + b"\0" * (-len(data) % 8)
    return tf.constant(np.frombuffer(padded, dtype=np.int64))


def broadcast_object(obj: Any, root_rank: int = 0, session: Any = None, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Returns root_rank's Python object (pickled) on every process. Eager only.

    Args:
        obj: Any picklable object (only root_rank's is used).
        root_rank: The rank that sends.
        session: TF1 sessions are not supported (must be None).
        name: Accepted for compatibility.
        process_set: Only ``hvd.global_process_set``.

    Returns:
        root_rank's object.

    Example:
    >>> start_epoch = hvd.broadcast_object(start_epoch, root_rank=0)
    """
    topology = _state.require()
    check_process_set(process_set)
    if session is not None:
        raise NotImplementedError("TF1 sessions are not supported by tfpar.horovod; call it eagerly (session=None).")
    _eager_only("broadcast_object")
    data = pickle.dumps(obj) if topology.rank == root_rank else b""
    (length,) = broadcast_tensors([tf.constant(len(data), tf.int64)], root_rank)
    words = int(length.numpy() + 7) // 8
    payload = _to_words(data) if data else tf.zeros([words], tf.int64)
    (received,) = broadcast_tensors([payload], root_rank)
    return pickle.loads(received.numpy().tobytes()[: int(length.numpy())])  # noqa: S301 - root's own pickle


def allgather_object(obj: Any, session: Any = None, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Returns every process's Python object (pickled), in rank order. Eager only.

    Args:
        obj: Any picklable object.
        session: TF1 sessions are not supported (must be None).
        name: Accepted for compatibility.
        process_set: Only ``hvd.global_process_set``.

    Returns:
        The list of objects, one per rank.

    Example:
    >>> hosts = hvd.allgather_object(socket.gethostname())
    """
    _state.require()
    check_process_set(process_set)
    if session is not None:
        raise NotImplementedError("TF1 sessions are not supported by tfpar.horovod; call it eagerly (session=None).")
    _eager_only("allgather_object")
    data = pickle.dumps(obj)
    lengths = allgather(tf.constant([len(data)], tf.int64)).numpy()
    words = allgather(_to_words(data)).numpy()
    result, at = [], 0
    for length in lengths:
        count = (int(length) + 7) // 8
        result.append(pickle.loads(words[at: at + count].tobytes()[: int(length)]))  # noqa: S301 - the job's own pickles
        at += count
    return result
