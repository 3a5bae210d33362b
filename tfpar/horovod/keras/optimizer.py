"""``hvd.DistributedOptimizer`` for Keras 3 optimizers: gradients all-reduced before every update.

The returned optimizer is an instance of a class made on the fly: a subclass of the user's
optimizer class (same ``__name__``, ``__qualname__`` and ``__module__``, as in Horovod, so a saved
model loads without tfpar) whose ``apply`` (which ``apply_gradients`` and Keras's ``fit`` call)
all-reduces the gradients with :func:`tfpar.horovod.grouped_allreduce` (one TensorFlow
collective per dtype) and then runs the user's update. The Horovod options are class attributes,
so ``cls.from_config(config)`` (``hvd.load_model``, ``keras.models.clone_model``) makes another
distributed optimizer. No strategy scope is involved: each process builds a plain model.

With ``backward_passes_per_step=k`` the local gradients are summed in accumulators (plain
``tf.Variable`` objects, not optimizer variables, as in Horovod: a saved model and checkpoint
are those of the plain optimizer); every k-th call all-reduces the sums (divided by k when
``average_aggregated_gradients``) and applies them, the other calls only count
``optimizer.iterations`` up (Horovod's rule: ``iterations`` counts backward passes).
"""

from __future__ import annotations

import threading
from typing import Any

import keras
import tensorflow as tf

from tfpar.horovod import _state
from tfpar.horovod.collectives import grouped_allreduce
from tfpar.horovod.compression import Compression, Compressor
from tfpar.horovod.ops import Average, ReduceOp, Sum, resolve_op
from tfpar.horovod.process_sets import ProcessSet, check_process_set, global_process_set

__all__ = ["DistributedOptimizer", "distributed_class", "is_distributed"]

_CLASSES: dict[tuple[Any, ...], type] = {}
_LOCK = threading.Lock()


class _Accumulator:
    """Horovod's local gradient aggregation: one sum per gradient and a counter (untracked variables)."""

    def __init__(self) -> None:
        self.counter: Any = None
        self.sums: list[Any] = []

    def ensure(self, gradients: list[Any]) -> None:
        if self.counter is not None:
            return
        with tf.init_scope():  # variables made while fit traces its step are lifted out of the graph
            self.counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvd_backward_passes")
            self.sums = [None if g is None else tf.Variable(tf.zeros(g.shape, g.dtype), trainable=False,
                                                            name="hvd_aggregated_gradient")
                         for g in gradients]


class _DistributedOptimizerMixin:
    """The overrides of a distributed optimizer class (placed first in its bases)."""

    _hvd_options: dict[str, Any] = {}

    def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        """All-reduces `grads` over the Horovod processes, then applies them (Keras's ``apply``).

        With ``backward_passes_per_step=k > 1``: adds `grads` to the local sums; every k-th call
        all-reduces and applies the sums, the others only increment ``iterations``.
        """
        grads = list(grads)
        if not grads:
            return super().apply(grads, trainable_variables)  # type: ignore[misc]
        options = self._hvd_options
        dense = [self._densify(g, options) for g in grads]
        steps = options["backward_passes_per_step"]
        if steps == 1:
            return super().apply(self._hvd_allreduce(dense), trainable_variables)  # type: ignore[misc]
        if trainable_variables is not None and not self.built:  # type: ignore[attr-defined]
            trainable_variables = list(trainable_variables)
            self.build(trainable_variables)  # type: ignore[attr-defined]  # not inside the tf.cond below
        accumulator = self.__dict__.get("_hvd_accumulator")
        if accumulator is None:
            accumulator = _Accumulator()
            self.__dict__["_hvd_accumulator"] = accumulator  # not tracked: no optimizer variable
        accumulator.ensure(dense)
        for total, g in zip(accumulator.sums, dense):
            if total is not None:
                total.assign_add(tf.cast(g, total.dtype))
        accumulator.counter.assign_add(1)

        def reduce_and_apply() -> Any:
            summed = [None if t is None else t.read_value() for t in accumulator.sums]
            reduced = self._hvd_allreduce(summed)
            if options["average_aggregated_gradients"]:
                reduced = [None if g is None else g / tf.cast(steps, g.dtype) for g in reduced]
            super(_DistributedOptimizerMixin, self).apply(reduced, trainable_variables)  # type: ignore[misc]
            for total in accumulator.sums:
                if total is not None:
                    total.assign(tf.zeros_like(total))
            accumulator.counter.assign(0)
            return tf.constant(True)

        def count_only() -> Any:
            self.iterations.assign_add(1)  # type: ignore[attr-defined]
            return tf.constant(False)

        return tf.cond(tf.equal(accumulator.counter, steps), reduce_and_apply, count_only)

    @staticmethod
    def _densify(gradient: Any, options: dict[str, Any]) -> Any:
        if isinstance(gradient, tf.IndexedSlices):
            if options["sparse_as_dense"]:
                return tf.convert_to_tensor(gradient)
            if options["backward_passes_per_step"] > 1:
                raise ValueError(
                    "IndexedSlices gradients (from an Embedding layer) are not supported when "
                    "backward_passes_per_step > 1 and sparse_as_dense is False (as in Horovod). "
                    f"Received: backward_passes_per_step={options['backward_passes_per_step']}, "
                    "sparse_as_dense=False. Pass sparse_as_dense=True."
                )
        return gradient

    def _hvd_allreduce(self, grads: list[Any]) -> list[Any]:
        """Horovod's all-reduce of the gradients (None stays None), in one exchange."""
        options = self._hvd_options
        if _state.size() == 1 and options["op"] is Average:
            return grads
        chosen = [i for i, g in enumerate(grads) if g is not None]
        if not chosen:
            return grads
        factor = options["gradient_predivide_factor"]
        reduced = grouped_allreduce(
            [grads[i] for i in chosen], device_dense=options["device_dense"],
            device_sparse=options["device_sparse"], compression=options["compression"], op=options["op"],
            prescale_factor=1.0 / factor, postscale_factor=factor, name=options["name"],
        )
        out = list(grads)
        for i, value in zip(chosen, reduced):
            out[i] = value
        return out


def is_distributed(optimizer: Any) -> bool:
    """Whether `optimizer` came from :func:`DistributedOptimizer` (or ``hvd.load_model``)."""
    return isinstance(optimizer, _DistributedOptimizerMixin)


def distributed_class(base: type, options: dict[str, Any]) -> Any:
    """The distributed subclass of the optimizer class `base` for `options` (one class per pair).

    Args:
        base: A ``keras.optimizers.Optimizer`` subclass.
        options: The checked options of :func:`DistributedOptimizer`.

    Returns:
        A subclass named like `base` whose ``apply`` all-reduces first.
    """
    if issubclass(base, _DistributedOptimizerMixin):
        raise ValueError(
            f"Expected a Keras optimizer that is not distributed yet. Received: an instance of the distributed "
            f"{base.__name__} (hvd.DistributedOptimizer was already applied). Wrap the plain optimizer once."
        )
    key = (base, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _LOCK:
        cls = _CLASSES.get(key)
        if cls is None:
            namespace = {"_hvd_options": dict(options), "__module__": base.__module__,
                         "__qualname__": base.__qualname__, "__doc__": base.__doc__}
            cls = _CLASSES[key] = type(base.__name__, (_DistributedOptimizerMixin, base), namespace)
        return cls


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {name} to be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"Expected {name} >= {minimum}. Received: {name}={value}")
    return value


def check_options(
    name: str | None, device_dense: str, device_sparse: str, compression: Any, sparse_as_dense: bool,
    gradient_predivide_factor: float, op: Any, backward_passes_per_step: int, average_aggregated_gradients: bool,
    num_groups: int, groups: Any, process_set: ProcessSet,
) -> dict[str, Any]:
    """Validates :func:`DistributedOptimizer`'s options (Horovod's rules) into a dict."""
    check_process_set(process_set)
    op = resolve_op(op)
    if op not in (Average, Sum):
        raise ValueError(f"Expected op to be hvd.Average or hvd.Sum (as in Horovod). Received: op={op!r}")
    if not (isinstance(compression, type) and issubclass(compression, Compressor)):
        raise TypeError("Expected compression to be hvd.Compression.none or hvd.Compression.fp16. "
                        f"Received: compression={compression!r}")
    if isinstance(gradient_predivide_factor, bool) or not isinstance(gradient_predivide_factor, (int, float)) \
            or gradient_predivide_factor <= 0:
        raise ValueError(f"Expected gradient_predivide_factor to be a number > 0. "
                         f"Received: gradient_predivide_factor={gradient_predivide_factor!r}")
    if float(gradient_predivide_factor) != 1.0 and op is not Average:
        raise ValueError(f"gradient_predivide_factor needs op=hvd.Average (as in Horovod). Received: op={op!r}")
    _check_int("backward_passes_per_step", backward_passes_per_step, 1)
    _check_int("num_groups", num_groups, 0)
    if groups is not None and not isinstance(groups, list) and not (isinstance(groups, int) and groups > 0):
        raise ValueError("Expected groups to be a positive int or a list of lists of variables (as in Horovod). "
                         f"Received: groups={groups!r}")
    for what, device in (("device_dense", device_dense), ("device_sparse", device_sparse)):
        if not isinstance(device, str):
            raise TypeError(f"Expected {what} to be a device name ('' for the default). Received: {what}={device!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"Expected name to be a str or None. Received: name={name!r}")
    return {
        "name": name, "device_dense": device_dense, "device_sparse": device_sparse, "compression": compression,
        "sparse_as_dense": bool(sparse_as_dense), "gradient_predivide_factor": float(gradient_predivide_factor),
        "op": op, "backward_passes_per_step": backward_passes_per_step,
        "average_aggregated_gradients": bool(average_aggregated_gradients),
    }


def DistributedOptimizer(  # noqa: N802 - Horovod's name
    optimizer: keras.optimizers.Optimizer,
    name: str | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    sparse_as_dense: bool = False,
    gradient_predivide_factor: float = 1.0,
    op: ReduceOp = Average,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = False,
    num_groups: int = 0,
    groups: Any = None,
    process_set: ProcessSet = global_process_set,
    scale_local_gradients: bool = True,
) -> keras.optimizers.Optimizer:
    """A Keras 3 optimizer whose updates use gradients all-reduced over the Horovod processes.

    Use it as in Horovod, without any strategy scope: every process builds its model, compiles it
    with ``optimizer=hvd.DistributedOptimizer(opt)`` and calls ``fit``; each step's gradients are
    averaged over the processes (one TensorFlow collective per dtype) before the update, so after
    the initial broadcast (``hvd.callbacks.BroadcastGlobalVariablesCallback(0)``) every process
    holds the same weights. Works in ``fit`` and with ``optimizer.apply_gradients`` in a custom
    loop, eagerly or in a ``tf.function``.

    Differences from Horovod:

    * The result is a new optimizer built from ``optimizer.get_config()`` (as in Horovod): state
      of an already built `optimizer` (its slots) is not carried over.
    * The class keeps the name of `optimizer`'s class, as in Horovod; `name` names the all-reduce
      ops only (the optimizer's own ``name``, and so its variable paths, are unchanged).
    * ``device_dense`` / ``device_sparse`` place the scaling and compression ops; the collective
      runs on the process's device. ``num_groups`` / ``groups`` are fusion hints, accepted and
      validated: TensorFlow packs each dtype into one all-reduce (same result).
    * ``process_set`` must be ``hvd.global_process_set``; ``scale_local_gradients`` is accepted
      (there is no ``register_local_source`` on Keras optimizers here).
    * Under ``jit_compile=True`` (XLA, Keras's default on GPUs) the collectives are compiled by XLA;
      only CPU runs without XLA are tested.

    Args:
        optimizer: A Keras 3 optimizer instance (``keras.optimizers.Adam(...)``, ...).
        name: A name for the all-reduce ops (default: ``"Distributed" + class name``).
        device_dense: Device for the scaling / compression ops of dense gradients.
        device_sparse: Device for the ops of ``tf.IndexedSlices`` gradients.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        sparse_as_dense: Convert ``tf.IndexedSlices`` gradients to dense tensors first.
        gradient_predivide_factor: With Average, scales by ``1 / factor`` before the sum and by
            ``factor / size()`` after it.
        op: ``hvd.Average`` (default) or ``hvd.Sum``.
        backward_passes_per_step: k: sum k local gradients and all-reduce + apply once per k
            calls (the all-reduce count drops by k); the other calls only increment
            ``optimizer.iterations``. ``tf.IndexedSlices`` need ``sparse_as_dense=True``.
        average_aggregated_gradients: With k > 1, divide the summed gradients by k (then k steps
            of batch b with SGD equal one step of batch k * b).
        num_groups: Horovod's deprecated fusion hint (an int >= 0), accepted.
        groups: Horovod's fusion hint (a positive int or lists of variables), accepted.
        process_set: Only ``hvd.global_process_set``.
        scale_local_gradients: Accepted for compatibility.

    Returns:
        The distributed optimizer (an instance of a subclass of `optimizer`'s class).

    Raises:
        TypeError: If `optimizer` is not a Keras 3 optimizer, or an option has the wrong type.
        ValueError: Before ``hvd.init()``, for an op other than Average/Sum, a predivide factor
            with Sum, ``backward_passes_per_step < 1``, or an optimizer already distributed.
        NotImplementedError: For a process set other than the global one, or ``hvd.Adasum``.

    Example:
    >>> import tfpar.horovod.keras as hvd
    >>> hvd.init()
    >>> opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.001 * hvd.size()))
    >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    >>> model.fit(dataset, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    """
    _state.require()
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "Expected optimizer to be a Keras 3 optimizer instance (keras.optimizers.Adam(...), ...). "
            f"Received: optimizer={optimizer!r} (of type {type(optimizer).__name__}). A string such as "
            "'adam' works with keras.optimizers.get('adam')."
        )
    options = check_options(name, device_dense, device_sparse, compression, sparse_as_dense,
                            gradient_predivide_factor, op, backward_passes_per_step,
                            average_aggregated_gradients, num_groups, groups, process_set)
    if options["name"] is None:
        options["name"] = "Distributed" + type(optimizer).__name__
    return distributed_class(type(optimizer), options).from_config(optimizer.get_config())
