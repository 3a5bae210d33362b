"""Every interception of Keras / TensorFlow internals in tfpar, in one place.

Each interception below names the upstream issue it works around, the versions it was verified on,
and the test that fails without it. They are installed once, the first time a strategy is handed to
tfpar (:func:`manage`), and act only on models whose ``distribute_strategy`` tfpar manages: a model
built under a plain ``tf.distribute.MirroredStrategy().scope()`` keeps upstream behaviour.

Interceptions (verified on TensorFlow 2.21.0 / Keras 3.15.1):

1. **Exact gradients for batches that do not split evenly over replicas**
   (``tests/test_exactness.py``). Keras 3 scales each replica's *local mean* loss by
   ``1 / num_replicas`` (``keras.src.losses.loss.scale_loss_for_distribution``) and sums the
   gradients over replicas. That is the global mean only when every replica holds the same number
   of examples; on a final partial batch (98 samples, batch 32, 4 replicas) the weights drift from
   single-device training by 3.7e-2. Upstream: keras-team/keras#19891 (fixed only for even splits),
   tensorflow/tensorflow#36153. tfpar instead keeps the local mean loss, weights each replica's
   gradients by its example count ``n_r`` and all-reduces the counts *with* the gradients (one
   batch all-reduce, no extra collective), then divides by the global count ``N``:
   ``sum_r n_r * grad(mean_r) / N`` is exactly the single-device gradient. The reduction happens
   before gradient clipping and accumulation, so ``clipnorm`` also sees the global gradient.
   When the forward pass itself communicates across replicas (synchronized BatchNormalization),
   gradients of one replica's loss flow to the others, and under a loss-scale optimizer
   (mixed_float16) float16 backprop of an unweighted tiny batch can overflow; then the weight
   ``n_r / N`` is applied to the loss instead (``N`` from one extra scalar all-reduce per step).
   Hooks: ``scale/unscale_loss_for_distribution``, ``TFOptimizer.apply``,
   ``LossScaleOptimizer.apply``, ``TFOptimizer._all_reduce_sum_gradients`` and
   ``TensorFlowTrainer._make_function``.
2. **``steps_per_execution > 1`` under MirroredStrategy** (keras-team/keras#19246;
   ``tests/test_steps_per_execution.py``). Upstream traces a nested ``tf.function`` per step inside
   a ``tf.while_loop`` over ``tf.experimental.Optional`` values and fails with "You must feed a value
   for placeholder tensor ... while/cond". tfpar's step loop inlines the per-step function.
3. **Symbolic build from one replica's batch** (``tests/test_exactness.py``, 3 replicas;
   ``tests/test_multi_worker.py``). Before training, Keras builds the model from a first batch it
   averages over replicas with ``strategy.reduce("MEAN", batch)``: that fails when replicas hold
   different batch sizes (a global batch of 32 on 3 replicas: "Inputs to operation AddN ... must
   have the same size and shape") and, under MultiWorkerMirroredStrategy, with "Attempt to convert
   a value (PerReplica...)" (tensorflow/tensorflow#72388, keras-team/keras#20585). Only shapes and
   dtypes matter for the build, so tfpar builds from the first local replica's batch
   (hook: ``TensorFlowTrainer._maybe_symbolic_build``).
4. **Logs under MultiWorkerMirroredStrategy** (``tests/test_multi_worker.py``). Keras reduces
   each step's logs with ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars ("Invalid
   reduction dimension 0 for input with 0 dimensions"; tensorflow/tensorflow#72388). tfpar averages
   them over all replicas instead (hook: ``trainer.reduce_per_replica``), so every worker logs the
   same numbers.
5. **One shuffle for all workers** (``tests/test_multi_worker.py``). Keras shuffles numpy inputs
   with an unseeded permutation per worker, so under MultiWorkerMirroredStrategy the DATA shards
   overlap: some examples are trained on several times per epoch, others never
   (tensorflow/tensorflow#56513). tfpar draws each epoch's permutation from a seed shared by the
   workers (hooks: ``TFEpochIterator.__init__``, ``ArrayDataAdapter.get_tf_dataset``).
6. **Several MirroredStrategy objects in one process** (``tests/test_strategies.py``). Two
   strategies with different collective patterns share collective keys and fail with "Shape
   mismatch in the collective instance". TensorFlow's own tests bump
   ``MirroredStrategy._collective_key_base`` (tensorflow/python/distribute/strategy_combinations.py);
   tfpar does the same for every strategy it creates, so notebooks can re-run cells.
7. **Synchronized BatchNormalization by default inside ``tfpar.scope(..., sync_batchnorm=True)``**
   (``tests/test_batchnorm.py``). Unsynchronized BatchNormalization makes moving statistics depend
   on the replica count (13.2 vs 4e-6 with ``synchronized=True`` on 2 replicas). The scope option
   makes ``keras.layers.BatchNormalization(...)`` default to ``synchronized=True`` while it is open
   (hook: ``BatchNormalization.__init__``); fit under a multi-replica strategy warns once per model
   that still has unsynchronized layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import warnings
import weakref
import zlib
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

VERIFIED_VERSIONS = {"tensorflow": "2.21.0", "keras": "3.15.1"}

_LOCK = threading.Lock()
_INSTALLED = False
_MANAGED: "weakref.WeakSet[tf.distribute.Strategy]" = weakref.WeakSet()
_UPSTREAM: dict[str, Callable[..., Any]] = {}
_COLLECTIVE_KEY_STRIDE = 100_000


@dataclasses.dataclass(frozen=True)
class Interception:
    """One interception of Keras/TF internals, for `tfpar doctor` and the docs."""

    target: str
    upstream: str
    purpose: str


INTERCEPTIONS = (
    Interception(
        "keras.src.losses.loss.scale_loss_for_distribution / unscale_loss_for_distribution, "
        "keras.src.backend.tensorflow.optimizer.TFOptimizer.apply / _all_reduce_sum_gradients, "
        "keras.optimizers.LossScaleOptimizer.apply",
        "keras-team/keras#19891, tensorflow/tensorflow#36153",
        "exact gradients when a batch does not split evenly over the replicas",
    ),
    Interception(
        "keras.src.backend.tensorflow.trainer.TensorFlowTrainer._make_function",
        "keras-team/keras#19246",
        "steps_per_execution > 1 under MirroredStrategy; per-replica example counts",
    ),
    Interception(
        "keras.src.backend.tensorflow.trainer.TensorFlowTrainer._maybe_symbolic_build",
        "tensorflow/tensorflow#72388, keras-team/keras#20585",
        "build from one replica's batch (uneven replica batches; multi-worker)",
    ),
    Interception(
        "keras.src.backend.tensorflow.trainer.reduce_per_replica",
        "tensorflow/tensorflow#72388, keras-team/keras#20585",
        "scalar logs under MultiWorkerMirroredStrategy (identical on every worker)",
    ),
    Interception(
        "keras.src.backend.tensorflow.trainer.TFEpochIterator.__init__, "
        "keras.src.trainers.data_adapters.array_data_adapter.ArrayDataAdapter.get_tf_dataset",
        "tensorflow/tensorflow#56513",
        "one shuffle permutation shared by all workers (each example once per epoch)",
    ),
    Interception(
        "keras.layers.BatchNormalization.__init__ (default synchronized=True inside a scope)",
        "(no upstream issue: Keras 3 leaves BatchNormalization(synchronized=False) by default)",
        "batch statistics independent of the replica count",
    ),
    Interception(
        "tensorflow.python.distribute.mirrored_strategy.MirroredStrategy._collective_key_base",
        "(TF test practice: strategy_combinations._mirrored_strategy_with_collective_key_base)",
        "several MirroredStrategy objects in one process (notebooks re-running cells)",
    ),
)


# === Managed strategies ===


def manage(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Installs tfpar's interceptions (once) and applies them to models of `strategy`."""
    _install()
    _MANAGED.add(strategy)
    return strategy


def is_managed(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether tfpar's fixes apply to models trained under `strategy`."""
    return strategy is not None and strategy in _MANAGED


def bump_collective_key_base() -> None:
    """Gives the next MirroredStrategy collective keys no earlier strategy used."""
    with _LOCK:
        tf.distribute.MirroredStrategy._collective_key_base += _COLLECTIVE_KEY_STRIDE


def _install() -> None:
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from keras.src.backend.tensorflow import optimizer as tf_optimizer
        from keras.src.backend.tensorflow import trainer as tf_trainer
        from keras.src.losses import loss as loss_module

        from keras.src.trainers.data_adapters import array_data_adapter

        loss_scale_optimizer = keras.optimizers.LossScaleOptimizer

        targets = [
            (loss_module, "scale_loss_for_distribution", _scale_loss_for_distribution),
            (loss_module, "unscale_loss_for_distribution", _unscale_loss_for_distribution),
            (tf_optimizer.TFOptimizer, "apply", _optimizer_apply),
            (loss_scale_optimizer, "apply", _loss_scale_optimizer_apply),
            (tf_optimizer.TFOptimizer, "_all_reduce_sum_gradients", _all_reduce_sum_gradients),
            (tf_trainer.TensorFlowTrainer, "_make_function", _make_function),
            (tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build", _maybe_symbolic_build),
            (tf_trainer, "reduce_per_replica", _reduce_per_replica),
            (tf_trainer.TFEpochIterator, "__init__", _epoch_iterator_init),
            (array_data_adapter.ArrayDataAdapter, "get_tf_dataset", _array_dataset),
        ]
        missing = [f"{owner.__name__}.{name}" for owner, name, _ in targets if not hasattr(owner, name)]
        if missing:
            raise RuntimeError(
                f"tfpar {__package__} cannot install its Keras fixes: this Keras "
                f"({keras.__version__}) has no {', '.join(missing)}. tfpar was verified on "
                f"Keras {VERIFIED_VERSIONS['keras']} / TensorFlow {VERIFIED_VERSIONS['tensorflow']}; "
                "install a Keras 3 release in that line (pip install 'keras>=3.5,<4')."
            )
        for owner, name, replacement in targets:
            _UPSTREAM[f"{owner.__name__}.{name}"] = owner.__dict__.get(name, getattr(owner, name))
            setattr(owner, name, replacement)
        _INSTALLED = True


# === 1. Exact gradients for uneven batches ===


@dataclasses.dataclass
class _ReplicaStep:
    """What one replica's train step knows while it is being traced."""

    count: tf.Tensor  # local number of examples, float32
    # Set when the forward pass itself communicates across replicas (synchronized
    # BatchNormalization): then the loss must carry its weight n_r / N *before* backprop.
    global_count: tf.Tensor | None = None
    keras_loss: bool = False  # a Keras loss went through scale_loss_for_distribution
    reduced_apply: bool = False  # inside an apply whose gradients tfpar already all-reduced

    def loss_factor(self) -> tf.Tensor | None:
        if self.global_count is None:
            return None
        return tf.math.divide_no_nan(self.count, self.global_count)


_STEPS: dict[tuple[int, int], _ReplicaStep] = {}


def _replica_key() -> tuple[int, int] | None:
    context = tf.distribute.get_replica_context()
    if context is None:
        return None
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is None:
        return None
    return id(context.strategy), int(replica_id)


def _current_step() -> _ReplicaStep | None:
    key = _replica_key()
    return None if key is None else _STEPS.get(key)


def _local_batch_size(data: Any) -> tf.Tensor:
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    first = next(t for t in tf.nest.flatten(x, expand_composites=False) if t is not None)
    if isinstance(first, tf.SparseTensor):
        size = first.dense_shape[0]
    elif isinstance(first, tf.RaggedTensor):
        size = first.nrows()
    else:
        size = tf.shape(first)[0]
    return tf.cast(size, tf.float32)


def _exact_train_step(
    step_function: Callable[[Any], Any], cross_replica_forward: bool
) -> Callable[[Any], Any]:
    @functools.wraps(step_function)
    def train_step(data: Any) -> Any:
        key = _replica_key()
        if key is None:
            return step_function(data)
        step = _ReplicaStep(count=_local_batch_size(data))
        if cross_replica_forward:
            step.global_count = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, step.count
            )
        _STEPS[key] = step
        try:
            return step_function(data)
        finally:
            _STEPS.pop(key, None)

    return train_step


def _scale_loss_for_distribution(value: Any) -> Any:
    step = _current_step()
    if step is None:
        return _UPSTREAM["keras.src.losses.loss.scale_loss_for_distribution"](value)
    step.keras_loss = True
    factor = step.loss_factor()
    if factor is None:
        return value  # keep the local mean: the optimizer weights it by the local count
    return value * tf.cast(factor, value.dtype)


def _unscale_loss_for_distribution(value: Any) -> Any:
    step = _current_step()
    if step is None:
        return _UPSTREAM["keras.src.losses.loss.unscale_loss_for_distribution"](value)
    factor = step.loss_factor()
    if factor is None:
        return value
    return tf.math.divide_no_nan(value, tf.cast(factor, value.dtype))


def _weighted(gradient: Any, count: tf.Tensor) -> Any:
    # An empty replica (count 0) contributes nothing, even if its gradient is NaN (e.g. BatchNorm).
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(_weighted(gradient.values, count), gradient.indices, gradient.dense_shape)
    weight = tf.cast(count, gradient.dtype)
    return tf.where(count > 0, gradient * weight, tf.zeros_like(gradient))


def _divided(gradient: Any, total: tf.Tensor) -> Any:
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(_divided(gradient.values, total), gradient.indices, gradient.dense_shape)
    return tf.math.divide_no_nan(gradient, tf.cast(total, gradient.dtype))


def _global_mean_gradients(grads: list[Any], step: _ReplicaStep) -> list[Any]:
    """All-reduces gradients so every replica holds the single-device gradient."""
    present = [i for i, g in enumerate(grads) if g is not None]
    context = tf.distribute.get_replica_context()
    out = list(grads)
    if step.global_count is not None:
        # The loss already carried n_r / N: a plain sum is the global mean gradient.
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        for position, index in enumerate(present):
            out[index] = reduced[position]
        return out
    # Weight each replica's local-mean gradient by its example count and reduce the counts in the
    # same batch all-reduce (no extra collective), then divide by the global count.
    reduced = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [_weighted(grads[i], step.count) for i in present] + [step.count]
    )
    total = reduced[-1]
    for position, index in enumerate(present):
        out[index] = _divided(reduced[position], total)
    return out


def _reduced_apply(upstream_key: str) -> Callable[..., Any]:
    # Optimizer.apply is the entry of every gradient update (apply_gradients calls it). tfpar
    # all-reduces there, first, so the loss-scale finiteness check, clipping, weight decay and
    # gradient accumulation all see the global gradient, as on one device.
    def apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
        upstream = _UPSTREAM[upstream_key]
        step = _current_step()
        if step is None or not step.keras_loss or step.reduced_apply:
            return upstream(self, grads, trainable_variables)
        grads = _global_mean_gradients(list(grads), step)
        step.reduced_apply = True
        try:
            return upstream(self, grads, trainable_variables)
        finally:
            step.reduced_apply = False

    return apply


_optimizer_apply = _reduced_apply("TFOptimizer.apply")
_loss_scale_optimizer_apply = _reduced_apply("LossScaleOptimizer.apply")


def _all_reduce_sum_gradients(self: Any, grads_and_vars: Any) -> Any:
    step = _current_step()
    if step is not None and step.reduced_apply:
        return list(grads_and_vars)  # already all-reduced (and averaged) by tfpar
    return _UPSTREAM["TFOptimizer._all_reduce_sum_gradients"](self, grads_and_vars)


# === 2. The step function: exactness wrapper and steps_per_execution ===


def _make_function(self: Any, step_function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    strategy = self.distribute_strategy
    if not is_managed(strategy):
        return _UPSTREAM["TensorFlowTrainer._make_function"](self, step_function)
    if getattr(step_function, "__name__", "") == "train_step" and strategy.num_replicas_in_sync > 1:
        _warn_unsynchronized_batchnorm(self, strategy)
        step_function = _exact_train_step(step_function, _needs_weighted_loss(self))
    if self.steps_per_execution == 1:
        return _UPSTREAM["TensorFlowTrainer._make_function"](self, step_function)
    return _multi_step_function(self, step_function, strategy)


def _multi_step_function(
    model: Any, step_function: Callable[[Any], Any], strategy: tf.distribute.Strategy
) -> Callable[[Any], Any]:
    from keras.src.backend.tensorflow import trainer as tf_trainer

    steps = int(model.steps_per_execution)

    def one_step_on_data(data: Any) -> Any:
        outputs = strategy.run(step_function, args=(data,))
        return tf_trainer.reduce_per_replica(outputs, strategy, reduction="auto")

    def multi_step_on_iterator(iterator: Any) -> Any:
        # The per-step function is inlined (not a nested tf.function): a nested one inside the
        # while loop is what fails upstream (keras-team/keras#19246).
        outputs = one_step_on_data(iterator.get_next())
        for _ in tf.range(steps - 1):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            outputs = one_step_on_data(optional.get_value())
        return outputs

    if not model.run_eagerly:
        multi_step_on_iterator = tf.function(multi_step_on_iterator, reduce_retracing=True)
        single_step = tf.function(one_step_on_data, reduce_retracing=True)
    else:
        single_step = one_step_on_data

    def function(iterator: Any) -> Any:
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            return multi_step_on_iterator(iterator)
        outputs = None
        for _, data in zip(range(steps), iterator):
            outputs = single_step(data)
        return outputs

    return function


# === 3. Symbolic build from one replica's batch ===


def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> None:
    strategy = self._distribute_strategy
    if strategy is None or not is_managed(strategy):
        return _UPSTREAM["TensorFlowTrainer._maybe_symbolic_build"](self, iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, step_iterator in iterator:
            batch = next(step_iterator)
            # Building needs shapes and dtypes only: one local replica's batch is enough.
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues)
                else value,
                batch,
            )
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)
    return None


# === 4. Step outputs under MultiWorkerMirroredStrategy ===


def _in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def _reduce_per_replica(values: Any, strategy: tf.distribute.Strategy, reduction: str) -> Any:
    upstream = _UPSTREAM["keras.src.backend.tensorflow.trainer.reduce_per_replica"]
    if reduction not in ("auto", "mean") or not is_managed(strategy) or not _in_multi_worker_mode(strategy):
        return upstream(values, strategy, reduction)

    # Upstream reduces every log value with strategy.reduce("MEAN", v, axis=0), which fails on the
    # scalar logs ("Invalid reduction dimension 0 for input with 0 dimensions"). Average them over
    # the replicas of all workers instead (every worker runs every step, so this collective is
    # matched), which leaves every worker with the same logs.
    def reduce(value: Any) -> Any:
        if not isinstance(value, (tf.Tensor, tf.distribute.DistributedValues)):
            return value
        if not value.dtype.is_floating:
            return strategy.experimental_local_results(value)[0]
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

    return tf.nest.map_structure(reduce, values)


# === 5. The same shuffle on every worker for array inputs ===

_SHARED_SHUFFLE = threading.local()


def _shared_shuffle_seed(strategy: Any) -> int | None:
    if strategy is None or not is_managed(strategy) or not _in_multi_worker_mode(strategy):
        return None
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return zlib.crc32(json.dumps(spec, sort_keys=True).encode()) & 0x7FFFFFFF


def _epoch_iterator_init(self: Any, distribute_strategy: Any = None, *args: Any, **kwargs: Any) -> None:
    _SHARED_SHUFFLE.seed = _shared_shuffle_seed(distribute_strategy)
    try:
        _UPSTREAM["TFEpochIterator.__init__"](self, distribute_strategy, *args, **kwargs)
    finally:
        _SHARED_SHUFFLE.seed = None


def _array_dataset(self: Any) -> tf.data.Dataset:
    """Keras's array dataset, with a permutation every worker agrees on (multi-worker only).

    Keras shuffles numpy inputs with an unseeded ``tf.random.shuffle`` per epoch; under
    MultiWorkerMirroredStrategy each worker then draws a different permutation and keeps the
    DATA shard of its own, so in an epoch some examples are seen several times and others never
    (measured: 101 examples, 3 epochs, 2 workers: counts from 0 to 6 instead of 3 each;
    tensorflow/tensorflow#56513 reports the same symptom). Here the permutation of epoch e is a
    stateless shuffle seeded by a per-epoch number from ``Dataset.random(seed)``, with `seed`
    derived from the cluster definition: identical on every worker, new every epoch, as PyTorch's
    DistributedSampler does.
    """
    seed = getattr(_SHARED_SHUFFLE, "seed", None)
    upstream = _UPSTREAM["ArrayDataAdapter.get_tf_dataset"]
    leaves = keras.tree.flatten(self._inputs)
    dense = all(isinstance(leaf, (np.ndarray, tf.Tensor)) for leaf in leaves)
    if seed is None or self._shuffle in (False, "batch") or not dense:
        return upstream(self)
    inputs = keras.tree.map_structure(tf.convert_to_tensor, keras.tree.lists_to_tuples(self._inputs))
    count, batch_size = int(self._num_samples), int(self._batch_size)

    def permutation(epoch_seed: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([epoch_seed, tf.constant(seed, tf.int64)])
        )

    order = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1).map(permutation)
    batches = order.flat_map(lambda indices: tf.data.Dataset.from_tensor_slices(indices).batch(batch_size))
    dataset = batches.map(
        lambda indices: keras.tree.map_structure(lambda t: tf.gather(t, indices), inputs),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


# === 7. BatchNormalization under data parallelism ===


def _batchnorm_layers(model: Any) -> list[Any]:
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _needs_weighted_loss(model: Any) -> bool:
    # The per-replica weight n_r / N must go on the loss itself (one extra scalar all-reduce per
    # step) when (a) synchronized BatchNormalization all-reduces batch moments in the forward
    # pass, so gradients of one replica's loss reach the others through it; or (b) a loss-scale
    # optimizer (mixed_float16) backpropagates in float16, where the unweighted local mean of a
    # tiny partial batch times the loss scale overflows where the single-device loss would not.
    if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        return True
    return any(getattr(layer, "synchronized", False) for layer in _batchnorm_layers(model))


_SYNC_BN = threading.local()


def _batchnorm_init(self: Any, *args: Any, **kwargs: Any) -> None:
    if getattr(_SYNC_BN, "depth", 0) > 0 and "synchronized" not in kwargs:
        kwargs["synchronized"] = True
    _UPSTREAM["BatchNormalization.__init__"](self, *args, **kwargs)


class synchronized_batchnorm:  # noqa: N801 (a context manager used like a function)
    """Makes BatchNormalization layers created inside default to ``synchronized=True``."""

    def __enter__(self) -> None:
        _install_batchnorm_default()
        _SYNC_BN.depth = getattr(_SYNC_BN, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _SYNC_BN.depth -= 1


def _install_batchnorm_default() -> None:
    with _LOCK:
        if "BatchNormalization.__init__" in _UPSTREAM:
            return
        _UPSTREAM["BatchNormalization.__init__"] = keras.layers.BatchNormalization.__init__
        keras.layers.BatchNormalization.__init__ = _batchnorm_init


_WARNED_BN: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _warn_unsynchronized_batchnorm(model: Any, strategy: tf.distribute.Strategy) -> None:
    if model in _WARNED_BN:
        return
    names = [
        layer.name for layer in _batchnorm_layers(model) if not getattr(layer, "synchronized", False)
    ]
    if names:
        _WARNED_BN.add(model)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(
            f"Model {model.name!r} trains on {strategy.num_replicas_in_sync} replicas with "
            f"{len(names)} unsynchronized BatchNormalization layer(s) ({shown}): their batch "
            "statistics are computed per replica, so moving mean/variance depend on the replica "
            "count. Build the model under tfpar.scope(..., sync_batchnorm=True) or pass "
            "BatchNormalization(synchronized=True) to match single-device training.",
            stacklevel=4,
        )
