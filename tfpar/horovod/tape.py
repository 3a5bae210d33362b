"""``hvd.DistributedGradientTape``: a tape whose ``gradient()`` returns all-reduced gradients."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpar.horovod import _state
from tfpar.horovod.collectives import grouped_allreduce
from tfpar.horovod.compression import Compression, Compressor
from tfpar.horovod.ops import Average, ReduceOp, resolve_op
from tfpar.horovod.process_sets import ProcessSet, check_process_set, global_process_set

__all__ = ["DistributedGradientTape"]


class _DistributedGradientTape:
    """Wraps a ``tf.GradientTape``: ``gradient()`` all-reduces; everything else is the tape's."""

    def __init__(self, tape: Any, options: dict[str, Any], scale_local_gradients: bool) -> None:
        self._tape = tape
        self._options = options
        self._scale_local_gradients = scale_local_gradients
        self._local_sources: set[Any] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tape, name)

    def __enter__(self) -> _DistributedGradientTape:
        self._tape.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self._tape.__exit__(*exc_info)

    def register_local_source(self, source: Any) -> None:
        """Marks a variable as local to this process: its gradient is not all-reduced (Horovod's rule:
        divided by ``size()`` when ``scale_local_gradients``)."""
        self._local_sources.add(source.ref() if hasattr(source, "ref") else id(source))

    def _is_local(self, source: Any) -> bool:
        key = source.ref() if hasattr(source, "ref") else id(source)
        return key in self._local_sources

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None, **kwargs: Any) -> Any:
        """The tape's gradients, all-reduced over all processes (one exchange for all of them).

        Args:
            target: What to differentiate, as for ``tf.GradientTape.gradient``.
            sources: Variables or tensors (any nested structure).
            output_gradients: As for ``tf.GradientTape.gradient``.
            **kwargs: Passed to ``tf.GradientTape.gradient`` (``unconnected_gradients``);
                Horovod's ``use_generic_names`` is accepted and ignored (names do not matter here).

        Returns:
            The gradients in the structure of `sources`; None stays None (as in Horovod, a
            gradient that is None on every process).
        """
        kwargs.pop("use_generic_names", None)
        gradients = self._tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        flat_sources = tf.nest.flatten(sources)
        flat = tf.nest.flatten(gradients)
        size = _state.size()
        chosen = [i for i, g in enumerate(flat) if g is not None and not self._is_local(flat_sources[i])]
        sparse_as_dense = self._options["sparse_as_dense"]
        to_reduce = [tf.convert_to_tensor(flat[i]) if sparse_as_dense and isinstance(flat[i], tf.IndexedSlices)
                     else flat[i] for i in chosen]
        options = {k: v for k, v in self._options.items() if k != "sparse_as_dense"}
        reduced = grouped_allreduce(to_reduce, name="DistributedGradientTape", **options) if to_reduce else []
        for i, value in zip(chosen, reduced):
            flat[i] = value
        if self._scale_local_gradients and self._local_sources:
            for i, g in enumerate(flat):
                if g is not None and self._is_local(flat_sources[i]):
                    if isinstance(g, tf.IndexedSlices):
                        flat[i] = tf.IndexedSlices(g.values / size, g.indices, g.dense_shape)
                    else:
                        flat[i] = g / size
        return tf.nest.pack_sequence_as(gradients, flat)


def DistributedGradientTape(  # noqa: N802 - Horovod's name
    gradtape: Any,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    sparse_as_dense: bool = False,
    op: ReduceOp = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    process_set: ProcessSet = global_process_set,
    scale_local_gradients: bool = True,
) -> Any:
    """Wraps a ``tf.GradientTape`` so that ``gradient()`` returns gradients all-reduced over all processes.

    The gradients are reduced in one exchange (one packed TensorFlow all-reduce per dtype;
    ``tf.IndexedSlices`` all-gathered unless `sparse_as_dense`). Works eagerly and inside a
    ``tf.function``. The result is a wrapper, not a ``tf.GradientTape`` subclass: every other
    attribute is the wrapped tape's.

    Args:
        gradtape: The ``tf.GradientTape`` that recorded the forward pass.
        device_dense: Device for the scaling / compression ops of dense gradients.
        device_sparse: Device for the ops of sparse gradients.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        sparse_as_dense: Convert ``tf.IndexedSlices`` gradients to dense tensors first.
        op: ``hvd.Average`` (default) or ``hvd.Sum`` (also Min/Max/Product for dense gradients).
        gradient_predivide_factor: With Average, scales by ``1 / factor`` before the sum and by
            ``factor / size()`` after it.
        num_groups: Horovod's fusion hint, accepted; TensorFlow packs each dtype into one
            all-reduce (the result is the same).
        groups: Horovod's fusion hint, accepted like `num_groups`.
        process_set: Only ``hvd.global_process_set``.
        scale_local_gradients: Divide the gradients of sources registered with
            ``register_local_source`` by ``size()`` (Horovod's default).

    Returns:
        The distributed tape.

    Raises:
        ValueError: Before :func:`hvd.init`, or a predivide factor with an op other than Average.
        NotImplementedError: For ``hvd.Adasum`` or a process set.

    Example:
    >>> with tf.GradientTape() as tape:
    ...     loss = loss_fn(labels, model(images, training=True))
    >>> tape = hvd.DistributedGradientTape(tape)
    >>> grads = tape.gradient(loss, model.trainable_variables)     # averaged over the ranks
    """
    _state.require()
    op = resolve_op(op)
    check_process_set(process_set)
    if not isinstance(gradtape, tf.GradientTape):
        raise TypeError(f"Expected gradtape to be a tf.GradientTape. Received: {gradtape!r} (of type {type(gradtape).__name__})")
    factor = float(gradient_predivide_factor)
    if factor != 1.0 and op is not Average:
        raise ValueError(f"gradient_predivide_factor needs op=hvd.Average (as in Horovod). Received: op={op!r}")
    options = {
        "device_dense": device_dense,
        "device_sparse": device_sparse,
        "compression": compression,
        "op": op,
        "prescale_factor": 1.0 / factor,
        "postscale_factor": factor,
        "sparse_as_dense": bool(sparse_as_dense),
    }
    return _DistributedGradientTape(gradtape, options, bool(scale_local_gradients))
