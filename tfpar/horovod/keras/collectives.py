"""The collectives of ``horovod.tensorflow.keras``, with its signatures (a value in, a tensor out)."""

from __future__ import annotations

from typing import Any

from tfpar.horovod import collectives
from tfpar.horovod.compression import Compression, Compressor
from tfpar.horovod.ops import Average, ReduceOp

__all__ = ["allgather", "allreduce", "broadcast", "broadcast_global_variables", "reducescatter"]


def allreduce(value: Any, name: str | None = None, average: bool | None = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, op: ReduceOp | None = None,
              compression: type[Compressor] = Compression.none) -> Any:
    """Reduces a tensor-compatible value over all processes (``horovod.tensorflow.keras.allreduce``).

    Args:
        value: A number, array or tensor; same shape on every process.
        name: A name for the ops.
        average: Deprecated in Horovod: True for Average, False for Sum; use `op`.
        prescale_factor: Multiplies the value before the reduction.
        postscale_factor: Multiplies the result.
        op: ``hvd.Average`` (default when both are None) or ``hvd.Sum`` (also Min/Max/Product).
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.

    Returns:
        The reduced tensor (an eager tensor outside ``tf.function``; Horovod returns the same).

    Example:
    >>> hvd.allreduce(float(hvd.rank()), op=hvd.Sum)
    """
    return collectives.allreduce(value, average=average, compression=compression, op=op,
                                 prescale_factor=prescale_factor, postscale_factor=postscale_factor, name=name)


def allgather(value: Any, name: str | None = None) -> Any:
    """Concatenates every process's value along the first dimension (``horovod.tensorflow.keras.allgather``).

    Args:
        value: An array or tensor of rank >= 1 (the first dimension may differ).
        name: A name for the ops.

    Returns:
        The concatenation, in rank order.

    Example:
    >>> hvd.allgather([[hvd.rank()]])
    """
    return collectives.allgather(value, name=name)


def broadcast(value: Any, root_rank: int, name: str | None = None) -> Any:
    """Returns root_rank's value on every process (``horovod.tensorflow.keras.broadcast``).

    Args:
        value: A number, array or tensor; same shape on every process.
        root_rank: The rank that sends.
        name: A name for the ops.

    Returns:
        root_rank's value as a tensor.

    Example:
    >>> seed = int(hvd.broadcast(seed, root_rank=0))
    """
    return collectives.broadcast(value, root_rank, name=name)


def reducescatter(value: Any, name: str | None = None, op: ReduceOp = Average) -> Any:
    """Reduces a value and returns this rank's rows (``horovod.tensorflow.keras.reducescatter``).

    Args:
        value: An array or tensor of rank >= 1; same shape on every process.
        name: A name for the ops.
        op: ``hvd.Average`` (default) or ``hvd.Sum``.

    Returns:
        This rank's share of the first dimension.

    Example:
    >>> shard = hvd.reducescatter(tf.ones([4, 3]), op=hvd.Sum)
    """
    return collectives.reducescatter(value, op=op, name=name)


def broadcast_global_variables(root_rank: int) -> Any:
    """Horovod's TF1 global-variable broadcast: not available (Keras 3 has no global variables).

    Raises:
        NotImplementedError: Always, naming the alternatives.

    Example:
    >>> hvd.broadcast_variables(model.variables, root_rank=0)   # instead
    """
    raise NotImplementedError(
        "hvd.broadcast_global_variables needs TF1 global variables, which TensorFlow 2 / Keras 3 do not have "
        f"(Horovod raises too under TF2 eager). Received: root_rank={root_rank!r}. Use "
        "hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank) in fit, or "
        "hvd.broadcast_variables(model.variables + optimizer.variables, root_rank)."
    )
