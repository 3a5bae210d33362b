"""Horovod's reduction operations (``hvd.Average``, ``hvd.Sum``, ...) and the ``average=`` shim.

The operations are small named constants, as in Horovod. ``Average`` and ``Sum`` all-reduce with a
sum (TensorFlow's ring or NCCL collective); ``Min``, ``Max`` and ``Product`` all-gather and reduce
locally (TensorFlow's collectives only sum); ``Adasum`` is not implemented.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Adasum", "Average", "Max", "Min", "Product", "ReduceOp", "Sum", "resolve_op"]


class ReduceOp:
    """A Horovod reduction operation (compare with ``is`` or ``==``; the name is for messages).

    Example:
    >>> hvd.allreduce(tf.constant([1.0, 2.0]), op=hvd.Sum)
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"hvd.{self.name}"

    def __reduce__(self) -> str:  # pickles as the module-level constant
        return self.name


Average = ReduceOp("Average")
Sum = ReduceOp("Sum")
Min = ReduceOp("Min")
Max = ReduceOp("Max")
Product = ReduceOp("Product")
Adasum = ReduceOp("Adasum")

_SUPPORTED = (Average, Sum, Min, Max, Product)


def resolve_op(op: Any, average: Any = None, *, default: ReduceOp = Average) -> ReduceOp:
    """The operation `op` and the deprecated `average` flag select (Horovod's rule), checked.

    Args:
        op: ``hvd.Average``, ``hvd.Sum``, ``hvd.Min``, ``hvd.Max``, ``hvd.Product`` or None.
        average: Horovod's deprecated flag: True means Average, False means Sum.
        default: The operation when both are None.

    Raises:
        ValueError: If both are given.
        NotImplementedError: For ``hvd.Adasum``.
        TypeError: If `op` is not one of the operations.
    """
    if op is not None and average is not None:
        raise ValueError(
            f"Expected either op= or the deprecated average=, not both. Received: op={op!r}, average={average!r}"
        )
    if average is not None:
        if not isinstance(average, bool):
            raise TypeError(f"Expected average to be a bool (deprecated: use op=). Received: average={average!r}")
        return Average if average else Sum
    if op is None:
        return default
    if op is Adasum:
        raise NotImplementedError(
            "hvd.Adasum is not supported by tfpar.horovod: TensorFlow's collectives have no Adasum "
            "reduction. Use op=hvd.Average (the default), which is what Horovod uses without Adasum."
        )
    if op not in _SUPPORTED:
        raise TypeError(
            "Expected op to be one of hvd.Average, hvd.Sum, hvd.Min, hvd.Max, hvd.Product. "
            f"Received: op={op!r} (of type {type(op).__name__})"
        )
    return op
