"""Horovod's tensor collectives on TensorFlow's: allreduce, grouped_allreduce, allgather, broadcast, ...

Every function works eagerly and inside a ``tf.function`` (the collectives join the traced
function, like the ops of ``tf.distribute``). Sums run as TensorFlow all-reduces (one packed
collective per dtype); ``Min``/``Max``/``Product`` and ``tf.IndexedSlices`` all-gather, as
Horovod's sparse path does. Differences from Horovod (docs: tfpar.horovod):

* collectives are matched between processes by the order they run in, not by ``name`` (Horovod
  negotiates by name, so its processes may issue them in different orders); ``name`` only names
  the ops;
* ``device_dense`` / ``device_sparse`` place the scaling and compression ops; the collective runs
  on the process's device (its GPU, else the CPU);
* the results are not differentiable (Horovod registers gradients for its ops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from tfpar.horovod import _dtypes, _engine, _state
from tfpar.horovod.compression import Compression, Compressor
from tfpar.horovod.ops import Average, Max, Min, Product, ReduceOp, Sum, resolve_op
from tfpar.horovod.process_sets import ProcessSet, check_process_set, global_process_set

__all__ = [
    "allgather", "allreduce", "alltoall", "broadcast", "grouped_allgather", "grouped_allreduce", "reducescatter",
]

_LOCAL_REDUCE = {Min: tf.reduce_min, Max: tf.reduce_max, Product: tf.reduce_prod}


def _exchange(sum_groups: Sequence[Sequence[Any]], gathers: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The engine's exchange, or its size-1 result (the inputs themselves) without a cluster."""
    strategy = _state.strategy()
    if strategy is None:
        return [list(group) for group in sum_groups], list(gathers)
    return _engine.exchange(strategy, sum_groups, gathers)


@contextlib.contextmanager
def _scope(name: str | None, default: str) -> Iterator[None]:
    with tf.name_scope(_op_name(name, default)):
        yield


def _op_name(name: str | None, default: str) -> str:
    if name is None:
        return default
    if not isinstance(name, str):
        raise TypeError(f"Expected name to be a str or None. Received: name={name!r}")
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name) or default


def _check_factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected {name} to be a number. Received: {name}={value!r}")
    return float(value)


def _check_compression(compression: Any) -> Any:
    if not (isinstance(compression, type) and issubclass(compression, Compressor)) and not isinstance(
        compression, Compressor
    ):
        raise TypeError(
            "Expected compression to be hvd.Compression.none or hvd.Compression.fp16. "
            f"Received: compression={compression!r}"
        )
    return compression


def _dense(tensor: Any, what: str) -> Any:
    try:
        return tf.convert_to_tensor(tensor)
    except (TypeError, ValueError) as error:
        raise TypeError(f"Expected a tf.Tensor, tf.Variable or array for {what}. Received: {tensor!r}") from error


def grouped_allreduce(
    tensors: Sequence[Any],
    average: bool | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    ignore_name_scope: bool = False,
    name: str | None = None,
) -> list[Any]:
    """All-reduces a list of tensors (and ``tf.IndexedSlices``) in one exchange.

    Dense tensors of one dtype go into one packed TensorFlow all-reduce. Shapes and dtypes must
    match between processes position by position.

    Args:
        tensors: ``tf.Tensor``, ``tf.Variable`` (its value) or ``tf.IndexedSlices`` values.
        average: Deprecated in Horovod: True for Average, False for Sum; use `op`.
        device_dense: Device for the scaling / compression ops of dense tensors ('' : default).
        device_sparse: Device for the ops of ``tf.IndexedSlices``.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        op: ``hvd.Average`` (default), ``hvd.Sum``, ``hvd.Min``, ``hvd.Max`` or ``hvd.Product``.
        prescale_factor: Multiplies every tensor before the reduction.
        postscale_factor: Multiplies the result (Average multiplies it by ``1 / size()`` too).
        process_set: Only ``hvd.global_process_set``.
        ignore_name_scope: Accepted for compatibility (names do not match collectives here).
        name: A name for the ops.

    Returns:
        The reduced values, in order: tensors of the inputs' shapes and dtypes (integer averages
        are truncated toward zero, as in Horovod), and ``tf.IndexedSlices`` holding every
        process's slices (values divided by ``size()`` for Average).

    Raises:
        ValueError: Before :func:`hvd.init`.
        NotImplementedError: For ``hvd.Adasum``; for Min/Max/Product or pre/postscale factors
            with ``tf.IndexedSlices`` (as in Horovod); for a process set.

    Example:
    >>> loss_mean, count_sum = hvd.grouped_allreduce([loss, count], op=hvd.Sum)
    """
    topology = _state.require()
    op = resolve_op(op, average)
    check_process_set(process_set)
    compression = _check_compression(compression)
    prescale = _check_factor("prescale_factor", prescale_factor)
    postscale = _check_factor("postscale_factor", postscale_factor)
    if isinstance(tensors, (tf.Tensor, tf.IndexedSlices, tf.Variable)) or not isinstance(tensors, Sequence):
        raise TypeError(f"Expected tensors to be a list of tensors. Received: tensors={tensors!r}")
    items = [t if isinstance(t, tf.IndexedSlices) else _dense(t, "allreduce") for t in tensors]
    if not items:
        return []
    if any(isinstance(t, tf.IndexedSlices) for t in items):
        if op not in (Sum, Average):
            raise NotImplementedError(
                f"Only hvd.Sum and hvd.Average are supported with tf.IndexedSlices (as in Horovod). Received: op={op!r}. "
                "Convert the slices with tf.convert_to_tensor (sparse_as_dense=True) to use other operations."
            )
        if prescale != 1.0 or postscale != 1.0:
            raise NotImplementedError(
                "Pre/postscale_factor are not supported with tf.IndexedSlices (as in Horovod). Received: "
                f"prescale_factor={prescale}, postscale_factor={postscale}. Scale the values yourself."
            )
    post = postscale / topology.size if op is Average else postscale
    with _scope(name, "HorovodGroupedAllreduce"):
        # What each item sends: ("sum", group key, position) or ("gather", position).
        groups: dict[Any, list[Any]] = {}
        gathers: list[Any] = []
        plans: list[tuple[Any, ...]] = []
        for item in items:
            if isinstance(item, tf.IndexedSlices):
                with tf.device(device_sparse or None):
                    values, dtype = _dtypes.to_wire(item.values, "allreduce of tf.IndexedSlices")
                    plans.append(("sparse", len(gathers), dtype, item.dense_shape))
                    gathers += [values, tf.cast(item.indices, tf.int64)]
                continue
            with tf.device(device_dense or None):
                compressed, ctx = compression.compress(item)
                wire, dtype = _dtypes.to_wire(_dtypes.scale(compressed, prescale), "allreduce")
                if op in (Sum, Average):
                    group = groups.setdefault(wire.dtype, [])
                    plans.append(("sum", wire.dtype, len(group), dtype, ctx, item.dtype))
                    group.append(wire)
                else:
                    plans.append(("gather", len(gathers), dtype, ctx, item.dtype))
                    gathers.append(wire[tf.newaxis])
        keys = list(groups)
        sums, gathered = _exchange([groups[k] for k in keys], gathers)
        results = []
        for item, plan in zip(items, plans):
            if plan[0] == "sparse":
                _, at, dtype, dense_shape = plan
                with tf.device(device_sparse or None):
                    values = _dtypes.from_wire(gathered[at], dtype)
                    if op is Average:
                        values = values / tf.cast(topology.size, values.dtype)
                    indices = tf.cast(gathered[at + 1], item.indices.dtype)
                    results.append(tf.IndexedSlices(values, indices, dense_shape))
                continue
            with tf.device(device_dense or None):
                if plan[0] == "sum":
                    _, key, at, dtype, ctx, _ = plan
                    reduced = sums[keys.index(key)][at]
                else:
                    _, at, dtype, ctx, _ = plan
                    reduced = _LOCAL_REDUCE[op](gathered[at], axis=0)
                reduced = _dtypes.scale(_dtypes.from_wire(reduced, dtype), post)
                results.append(compression.decompress(reduced, ctx))
        return results


def allreduce(
    tensor: Any,
    average: bool | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
    ignore_name_scope: bool = False,
) -> Any:
    """All-reduces a tensor or ``tf.IndexedSlices`` over all processes (Horovod's ``allreduce``).

    A dense tensor is summed with TensorFlow's all-reduce (``Min``/``Max``/``Product``: all-gathered
    and reduced locally); ``tf.IndexedSlices`` are all-gathered (values and indices), as in
    Horovod. See :func:`grouped_allreduce` for the arguments.

    Args:
        tensor: A ``tf.Tensor``, ``tf.Variable`` (its value) or ``tf.IndexedSlices``; same shape
            and dtype on every process (IndexedSlices: any number of slices).
        average: Deprecated in Horovod: True for Average, False for Sum; use `op`.
        device_dense: Device for the scaling / compression ops of a dense tensor.
        device_sparse: Device for the ops of ``tf.IndexedSlices``.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        op: ``hvd.Average`` (default), ``hvd.Sum``, ``hvd.Min``, ``hvd.Max`` or ``hvd.Product``.
        prescale_factor: Multiplies the tensor before the reduction.
        postscale_factor: Multiplies the result (Average multiplies it by ``1 / size()`` too).
        name: A name for the ops (collectives are matched by order, not name).
        process_set: Only ``hvd.global_process_set``.
        ignore_name_scope: Accepted for compatibility.

    Returns:
        The reduced tensor (same shape and dtype), or ``tf.IndexedSlices``.

    Raises:
        ValueError: Before :func:`hvd.init`.
        NotImplementedError: For ``hvd.Adasum`` (use ``hvd.Average``), a process set, or
            Min/Max/Product / scale factors with ``tf.IndexedSlices``.

    Example:
    >>> hvd.allreduce(tf.constant(float(hvd.rank())), op=hvd.Sum)     # 0 + 1 + ... + size-1
    """
    return grouped_allreduce(
        [tensor], average, device_dense, device_sparse, compression, op, prescale_factor, postscale_factor,
        process_set, ignore_name_scope, name=_op_name(name, "HorovodAllreduce"),
    )[0]


def _gatherable(tensor: Any, what: str) -> Any:
    tensor = _dense(tensor, what)
    if tensor.shape.rank == 0:
        raise ValueError(
            f"Expected a tensor of rank >= 1 for {what} (it concatenates along the first dimension). "
            f"Received: a scalar {tensor!r}. Use tf.reshape(tensor, [1])."
        )
    return tensor


def grouped_allgather(
    tensors: Sequence[Any],
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> list[Any]:
    """All-gathers a list of tensors in one exchange; see :func:`allgather`.

    Args:
        tensors: Tensors of rank >= 1.
        name: A name for the ops.
        ignore_name_scope: Accepted for compatibility.
        process_set: Only ``hvd.global_process_set``.

    Returns:
        The gathered tensors, in order.

    Example:
    >>> features, labels = hvd.grouped_allgather([features, labels])
    """
    _state.require()
    check_process_set(process_set)
    with _scope(name, "HorovodGroupedAllgather"):
        wires = [_dtypes.to_wire(_gatherable(t, "allgather"), "allgather") for t in tensors]
        _, gathered = _exchange([], [wire for wire, _ in wires])
        return [_dtypes.from_wire(g, dtype) for g, (_, dtype) in zip(gathered, wires)]


def allgather(
    tensor: Any,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> Any:
    """Concatenates every process's tensor along the first dimension, in rank order.

    The first dimension may differ between processes (TensorFlow's all-gather pads and slices);
    the other dimensions must match.

    Args:
        tensor: A tensor of rank >= 1.
        name: A name for the ops.
        ignore_name_scope: Accepted for compatibility.
        process_set: Only ``hvd.global_process_set``.

    Returns:
        The concatenation, first dimension the sum of the processes' first dimensions.

    Raises:
        ValueError: Before :func:`hvd.init`, or for a scalar.

    Example:
    >>> hvd.allgather(tf.fill([hvd.rank() + 1, 2], hvd.rank()))    # rank r sends r + 1 rows
    """
    return grouped_allgather([tensor], name=_op_name(name, "HorovodAllgather"), process_set=process_set)[0]


def _check_root(root_rank: Any, size: int) -> int:
    if isinstance(root_rank, bool) or not isinstance(root_rank, int):
        raise TypeError(f"Expected root_rank to be an int. Received: root_rank={root_rank!r}")
    if not 0 <= root_rank < size:
        raise ValueError(f"Expected root_rank in [0, {size - 1}] (hvd.size() is {size}). Received: root_rank={root_rank}")
    return root_rank


def broadcast_tensors(tensors: Sequence[Any], root_rank: int) -> list[Any]:
    """Every process gets root_rank's tensors: one all-reduce per dtype, the others sending zeros."""
    topology = _state.require()
    root_rank = _check_root(root_rank, topology.size)
    wires = [_dtypes.to_wire(_dense(t, "broadcast"), "broadcast") for t in tensors]
    if topology.size == 1:
        return [_dense(t, "broadcast") for t in tensors]
    mine = topology.rank == root_rank
    groups: dict[Any, list[Any]] = {}
    places = []
    for wire, _ in wires:
        group = groups.setdefault(wire.dtype, [])
        places.append((wire.dtype, len(group)))
        group.append(wire if mine else tf.zeros_like(wire))
    keys = list(groups)
    sums, _ = _exchange([groups[k] for k in keys], [])
    return [_dtypes.from_wire(sums[keys.index(key)][at], dtype) for (key, at), (_, dtype) in zip(places, wires)]


def broadcast(
    tensor: Any,
    root_rank: int,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> Any:
    """Returns root_rank's tensor on every process.

    Runs as a TensorFlow all-reduce in which the other processes send zeros: exact for every value
    (a root's ``-0.0`` arrives as ``0.0``). Shape and dtype must match between processes.

    Args:
        tensor: The tensor (its value on `root_rank` is the result).
        root_rank: The rank that sends.
        name: A name for the ops.
        ignore_name_scope: Accepted for compatibility.
        process_set: Only ``hvd.global_process_set``.

    Returns:
        root_rank's tensor.

    Raises:
        ValueError: Before :func:`hvd.init`, or if root_rank is not a rank.

    Example:
    >>> seed = hvd.broadcast(tf.constant(seed), root_rank=0)
    """
    check_process_set(process_set)
    with _scope(name, "HorovodBroadcast"):
        return broadcast_tensors([tensor], root_rank)[0]


def alltoall(
    tensor: Any,
    splits: Any = None,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: ProcessSet = global_process_set,
) -> tuple[Any, Any]:
    """Scatters slices of the first dimension to the processes and gathers what they send.

    Rank r's ``tensor[sum(splits[:j]) : sum(splits[:j + 1])]`` goes to rank j. Built on
    all-gather (every process receives every slice, then keeps its own), so it moves ``size()``
    times the data of a native all-to-all: fine for small tensors.

    Args:
        tensor: A tensor of rank >= 1.
        splits: Rows for each rank (length ``size()``, summing to the first dimension); None
            splits evenly (the first dimension must then be a multiple of ``size()``).
        name: A name for the ops.
        ignore_name_scope: Accepted for compatibility.
        process_set: Only ``hvd.global_process_set``.

    Returns:
        ``(received, received_splits)``: the slices sent to this rank in rank order, and how many
        rows came from each rank (int32), as in Horovod >= 0.24.

    Example:
    >>> received, counts = hvd.alltoall(tf.range(2 * hvd.size()))
    """
    topology = _state.require()
    check_process_set(process_set)
    size = topology.size
    with _scope(name, "HorovodAlltoall"):
        tensor = _gatherable(tensor, "alltoall")
        rows = tf.shape(tensor, out_type=tf.int64)[0]
        if splits is None:
            tf.debugging.assert_equal(rows % size, tf.constant(0, tf.int64),
                                      message=f"alltoall without splits needs a first dimension divisible by hvd.size()={size}")
            splits = tf.fill([size], rows // size)
        splits = tf.cast(tf.reshape(_dense(splits, "alltoall splits"), [-1]), tf.int64)
        if splits.shape[0] is not None and splits.shape[0] != size:
            raise ValueError(f"Expected {size} splits (one per rank). Received: splits of shape {splits.shape}")
        tf.debugging.assert_equal(tf.reduce_sum(splits), rows, message="alltoall splits must sum to the first dimension")
        wire, dtype = _dtypes.to_wire(tensor, "alltoall")
        _, (everything, all_splits) = _exchange([], [wire, splits])
        all_splits = tf.reshape(all_splits, [size, size])
        starts = tf.cumsum(tf.reduce_sum(all_splits, axis=1), exclusive=True)
        offsets = tf.cumsum(all_splits, axis=1, exclusive=True)
        me = topology.rank
        pieces = [everything[starts[r] + offsets[r, me]: starts[r] + offsets[r, me] + all_splits[r, me]]
                  for r in range(size)]
        return _dtypes.from_wire(tf.concat(pieces, axis=0), dtype), tf.cast(all_splits[:, me], tf.int32)


def reducescatter(
    tensor: Any,
    device_dense: str = "",
    compression: type[Compressor] = Compression.none,
    op: ReduceOp = Average,
    name: str | None = None,
    process_set: ProcessSet = global_process_set,
    ignore_name_scope: bool = False,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Any:
    """Reduces a tensor over all processes and returns this rank's share of the first dimension.

    Rank r gets rows ``[r * n // size ...]`` as in Horovod: the first ``n % size`` ranks get one
    row more. Built on a full all-reduce followed by a slice (no bandwidth saving).

    Args:
        tensor: A tensor of rank >= 1, same shape on every process.
        device_dense: Device for the scaling / compression ops.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        op: ``hvd.Average`` (default) or ``hvd.Sum`` (also Min/Max/Product).
        name: A name for the ops.
        process_set: Only ``hvd.global_process_set``.
        ignore_name_scope: Accepted for compatibility.
        prescale_factor: Multiplies the tensor before the reduction.
        postscale_factor: Multiplies the result.

    Returns:
        This rank's rows of the reduced tensor.

    Example:
    >>> shard = hvd.reducescatter(tf.ones([4, 3]), op=hvd.Sum)
    """
    topology = _state.require()
    reduced = allreduce(_gatherable(tensor, "reducescatter"), device_dense=device_dense, compression=compression,
                        op=op, prescale_factor=prescale_factor, postscale_factor=postscale_factor, name=name,
                        process_set=process_set)
    rows = tf.shape(reduced)[0]
    base, extra = rows // topology.size, rows % topology.size
    r = topology.rank
    start = r * base + tf.minimum(r, extra)
    length = base + tf.cast(r < extra, base.dtype)
    return reduced[start: start + length]
