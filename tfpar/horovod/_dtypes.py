"""Casts that let TensorFlow's collectives carry every Horovod dtype, and Horovod's scaling rule."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["from_wire", "scale", "to_wire"]

_NATIVE = (tf.float16, tf.float32, tf.float64, tf.int32, tf.int64)
_WIDEN = {
    tf.bfloat16: tf.float32,
    tf.int8: tf.int64, tf.uint8: tf.int64, tf.int16: tf.int64, tf.uint16: tf.int64, tf.uint32: tf.int64,
    tf.bool: tf.int32,
}


def to_wire(tensor: Any, what: str) -> tuple[Any, Any]:
    """``(tensor in a dtype the collectives carry, its own dtype)``.

    Raises:
        TypeError: For dtypes no collective carries here (complex, string, uint64, ...).
    """
    dtype = tensor.dtype
    if dtype in _NATIVE:
        return tensor, dtype
    if dtype in _WIDEN:
        return tf.cast(tensor, _WIDEN[dtype]), dtype
    supported = sorted(d.name for d in (*_NATIVE, *_WIDEN))
    raise TypeError(f"Expected a tensor of one of the dtypes {supported} for {what}. Received: dtype={dtype.name}")


def from_wire(tensor: Any, dtype: Any) -> Any:
    """Casts a collective's result back to the caller's dtype (bool: any process's True)."""
    if tensor.dtype == dtype:
        return tensor
    if dtype == tf.bool:
        return tf.not_equal(tensor, 0)
    return tf.cast(tensor, dtype)


def scale(tensor: Any, factor: float) -> Any:
    """``tensor * factor`` in Horovod's way: half precision in float32, integers truncated toward zero."""
    if factor == 1.0:
        return tensor
    dtype = tensor.dtype
    if dtype in (tf.float16, tf.bfloat16):
        return tf.cast(tf.cast(tensor, tf.float32) * factor, dtype)
    if dtype.is_floating:
        return tensor * tf.constant(factor, dtype)
    if dtype.is_integer:
        return tf.cast(tf.cast(tensor, tf.float64) * factor, dtype)
    raise TypeError(f"Expected a numeric tensor to scale. Received: dtype={dtype.name}")
