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
   tensorflow/tensorflow#36153. tfpar instead scales each replica's local mean loss by its example
   count ``n_r`` (so backprop does the weighting), all-reduces the counts *with* the gradients
   (one batch all-reduce, no extra collective), then scales by ``1 / N``:
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
5. **One shuffle for all workers, a function of the epoch; explicit sharding** (``tests/test_multi_worker.py``,
   ``tests/test_fault_tolerance.py``). Keras shuffles numpy inputs with an unseeded permutation per
   worker, so under MultiWorkerMirroredStrategy the DATA shards overlap: some examples are trained
   on several times per epoch, others never (tensorflow/tensorflow#56513). tfpar's permutation of
   epoch ``e`` is a stateless shuffle seeded by ``(seed, e)``, the seed shared by the workers and
   saved with backups (hooks: ``TFEpochIterator.__init__``, ``ArrayDataAdapter.get_tf_dataset``,
   and ``TensorFlowTrainer.fit``, which adds the epoch clock). A ``tf.data.Dataset`` given to fit
   gets its auto-shard policy set explicitly (``tfpar.data.set_auto_shard_policy``): OFF on one
   worker, FILE or DATA otherwise, and a clear refusal when DATA sharding would meet a randomly
   ordered dataset (an unseeded shuffle) instead of silently overlapping shards.
6. **Chief-only files** (``tests/test_fault_tolerance.py``). Keras 3's ModelCheckpoint,
   BackupAndRestore and TensorBoard have no chief/worker logic (tf-keras had it), so under
   MultiWorkerMirroredStrategy every worker writes the same files. Every worker must still take
   part in a save, so on non-chief workers ``Model.save`` / ``save_weights`` write to a temporary
   sibling that is removed (``tfpar.cluster.write_path``), TensorBoard logs to one, BackupAndRestore
   writes its metadata and deletes the backup on the chief only, and ModelCheckpoint creates its
   directory idempotently (upstream races: "FileExistsError").
7. **Exact resume and preemption** (``tests/test_fault_tolerance.py``). Keras 3's BackupAndRestore
   restores at epoch granularity: after a mid-epoch save it replays the whole interrupted epoch on
   top of weights that already contain part of it, and a save in the first epoch of a resumed run
   records epoch 0 (keras-team/keras backup_and_restore.py: ``_current_epoch`` only moves at epoch
   end). Under tfpar the backup records how many steps of the epoch it contains and the shuffle
   seed; a resumed fit consumes those steps' data without training on them, so the result equals
   an uninterrupted run bit for bit. Under multi_worker a SIGTERM on any worker makes all workers
   save at an agreed step (``tf.distribute.experimental.PreemptionCheckpointHandler`` with a
   tfpar save function) and exit with code 42, for ``tfpar launch --max-restarts`` to restart.
8. **Several MirroredStrategy objects in one process** (``tests/test_strategies.py``). Two
   strategies with different collective patterns share collective keys and fail with "Shape
   mismatch in the collective instance". TensorFlow's own tests bump
   ``MirroredStrategy._collective_key_base`` (tensorflow/python/distribute/strategy_combinations.py);
   tfpar does the same for every strategy it creates, so notebooks can re-run cells.
9. **Synchronized BatchNormalization by default inside ``tfpar.scope(..., sync_batchnorm=True)``**
   (``tests/test_batchnorm.py``). Unsynchronized BatchNormalization makes moving statistics depend
   on the replica count (13.2 vs 4e-6 with ``synchronized=True`` on 2 replicas). The scope option
   makes ``keras.layers.BatchNormalization(...)`` default to ``synchronized=True`` while it is open
   (hook: ``BatchNormalization.__init__``); fit under a multi-replica strategy warns once per model
   that still has unsynchronized layers.
10. **Empty replica batches on CPU** (``tests/test_exactness.py``). A final batch smaller than the
   replica count leaves some replicas with 0 examples; TF 2.21's oneDNN CPU kernels then return a
   convolution's input as its output and abort the process in max-pooling's gradient. On CPU-only
   hosts, tfpar's multi-replica strategies let conv and pooling layers skip their kernels on an
   empty batch (hooks: ``BaseConv``/``BaseConvTranspose``/``BaseDepthwiseConv``/
   ``BaseSeparableConv``/``BasePooling.call``). The guard (a tf.cond per layer) costs time on CPU,
   so it is traced in only when the input can leave a replica empty (arrays whose last batch
   splits that way; datasets without a static batch size); ``TensorFlowTrainer.evaluate`` and
   ``predict`` are wrapped to know which model's input that is.
Parameter-server interceptions (verified on TensorFlow 2.21.0 / Keras 3.15.1; they act only on
models of a ParameterServerStrategy tfpar manages, see :func:`is_managed_ps`):

11. **``Model.fit`` / ``evaluate`` / ``predict`` under ParameterServerStrategy** (keras-team/keras#18624:
   "Parameter server training is not supported in Keras 3"; the trainer never creates a
   ClusterCoordinator and fails with "To use this dataset, you need to pass this dataset to
   ClusterCoordinator.create_per_worker_dataset"). tfpar routes them to the ClusterCoordinator
   loop of ``tfpar.coordinator`` (hooks: ``TensorFlowTrainer.fit / evaluate / predict``).
   Tests: ``tests/test_parameter_server.py`` (every fit/evaluate/predict case), and
   ``test_upstream_keras_fit_fails_under_parameter_server`` shows the upstream failure.
12. **Exact counters and metric accumulators under concurrent workers**
   (``test_iterations_and_metrics_count_every_step``,
   ``test_fit_on_arrays_trains_every_example_exactly_once_per_epoch``,
   ``test_confusion_matrix_metrics_count_every_example``). Keras 3's ``Variable.assign_add`` is
   ``assign(self + value)`` (keras/src/backend/common/variables.py): a read-modify-write that
   concurrent workers race on. Measured: 40 scheduled train steps on 2 workers left
   ``optimizer.iterations`` at 29-30 and the loss tracker's count at 960 of 1280 examples; the
   same race hits metric accumulators, learning-rate schedules and Adam's bias correction
   (keras-team/keras#18624 names the aggregation side). Without this interception the tests'
   scenario gives 28 of 30 optimizer steps and examples counted 1-3 times in 3 epochs, and the
   confusion-matrix counts of an evaluation come out at 69 and 93 true positives of 105 in two
   runs. Inside parameter-server closures tfpar
   makes ``assign_add`` / ``assign_sub`` the variable's own atomic ``AssignAddVariableOp`` on the
   parameter server, and rewrites ``v.assign(v + delta)`` (how Keras's confusion-matrix metrics:
   Precision, Recall, AUC, ...; IoU and R2Score accumulate) into ``v.assign_add(delta)`` (hooks:
   ``Variable.assign_add / assign_sub / assign / __add__ / __radd__`` of the TensorFlow backend).
13. **Partitioned variables** (``variable_partitioner``; ``test_sharded_training_equals_training_in_one_process``,
   ``test_sharded_embedding_lookup_reads_rows_not_whole_tables``, ``test_*_partitioner_*``). With a
   partitioner, ParameterServerStrategy creates a ``ShardedVariable`` (one shard per ps), which
   Keras 3 cannot train: ``GradientTape.gradient`` fails with "'ShardedVariable' object has no
   attribute 'handle'", optimizer slots are created unsharded on one ps (colocated with the
   variable), the update fails with "ShardedVariable doesn't support being used as a reference"
   and ``save_weights`` fails in ``__array__`` (tf-keras unwrapped ShardedVariables; Keras 3 has
   no support). tfpar differentiates with respect to the shards and joins their gradients
   (``tf.GradientTape.gradient``), shards the optimizer slots like the variable
   (``TFOptimizer.add_variable_from_reference``), updates sharded variables shard by shard
   (``TFOptimizer._distributed_tf_update_step``), converts them to numpy
   (``Variable.__array__``) and looks embeddings up shard-wise, reading only the rows a batch
   uses (``keras.src.backend.tensorflow.numpy.take``: upstream converts the whole table to a
   dense tensor, i.e. ships every shard to the worker at every step).
14. **Coordinator shutdown after a worker failure** (``test_the_coordinator_exits_after_a_worker_was_lost``).
   After a worker was lost and came back, TF 2.21's ``ClusterCoordinator.__del__`` ->
   ``Cluster.stop()`` waits forever at interpreter exit for a lock that the
   ``WorkerPreemptionHandler`` daemon thread holds (it is frozen during finalization); measured:
   a coordinator script that scheduled 300 closures, lost a worker, joined and returned hung
   until the launcher's timeout in 3 runs of 3 (TF's own ClusterCoordinator, with and without a
   tfpar strategy), and exited at once in every run with the hook. (Scripts that only call
   ``fit`` did not hang in 4 runs: other references keep ``__del__`` from running at exit.)
   For every ParameterServerStrategy tfpar created, an ``atexit`` hook
   stops its ClusterCoordinator while threads still run (bounded wait) and turns the second stop
   in ``__del__`` into a no-op (hook: ``atexit``, no TensorFlow code patched).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import random
import signal
import sys
import threading
import warnings
import weakref
import zlib
from collections.abc import Iterator
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfpar import cluster as cluster_lib

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
        "keras.Model.save / save_weights, keras.callbacks.ModelCheckpoint._save_model, "
        "TensorBoard.set_model / on_train_end, BackupAndRestore (on_train_begin, on_epoch_begin, "
        "on_train_batch_end, _save_model, on_train_end), TensorFlowTrainer.fit",
        "(Keras 3 callbacks have no chief/worker logic; BackupAndRestore replays epochs)",
        "chief-only files; exact resume; SIGTERM preemption at an agreed step",
    ),
    Interception(
        "keras.layers.BatchNormalization.__init__ (default synchronized=True inside a scope)",
        "(no upstream issue: Keras 3 leaves BatchNormalization(synchronized=False) by default)",
        "batch statistics independent of the replica count",
    ),
    Interception(
        "keras.src.layers.convolutional.base_*.Base*Conv*.call, "
        "keras.src.layers.pooling.base_pooling.BasePooling.call",
        "(TF 2.21 oneDNN kernels on empty batches; no upstream issue found)",
        "CNNs train when a replica's share of the final batch is empty (CPU)",
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
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        from tfpar import coordinator  # routes fit/evaluate/predict to the coordinator loop

        coordinator._enable(strategy)
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

        from keras.src.layers.convolutional import (
            base_conv,
            base_conv_transpose,
            base_depthwise_conv,
            base_separable_conv,
        )
        from keras.src.layers.pooling import base_pooling

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
            (tf_trainer.TensorFlowTrainer, "fit", _fit),
            (tf_trainer.TensorFlowTrainer, "evaluate", _evaluate),
            (tf_trainer.TensorFlowTrainer, "predict", _predict),
            (keras.Model, "save", _model_save),
            (keras.Model, "save_weights", _model_save_weights),
            (keras.callbacks.ModelCheckpoint, "_save_model", _checkpoint_save_model),
            (keras.callbacks.TensorBoard, "set_model", _tensorboard_set_model),
            (keras.callbacks.TensorBoard, "on_train_end", _tensorboard_on_train_end),
            (keras.callbacks.BackupAndRestore, "on_train_begin", _backup_on_train_begin),
            (keras.callbacks.BackupAndRestore, "on_epoch_begin", _backup_on_epoch_begin),
            (keras.callbacks.BackupAndRestore, "on_train_batch_end", _backup_on_train_batch_end),
            (keras.callbacks.BackupAndRestore, "_save_model", _backup_save_model),
            (keras.callbacks.BackupAndRestore, "on_train_end", _backup_on_train_end),
            (base_conv.BaseConv, "call", _empty_safe("BaseConv.call")),
            (base_conv_transpose.BaseConvTranspose, "call", _empty_safe("BaseConvTranspose.call")),
            (base_depthwise_conv.BaseDepthwiseConv, "call", _empty_safe("BaseDepthwiseConv.call")),
            (base_separable_conv.BaseSeparableConv, "call", _empty_safe("BaseSeparableConv.call")),
            (base_pooling.BasePooling, "call", _empty_safe("BasePooling.call")),
        ]
        missing = [f"{owner.__name__}.{name}" for owner, name, _ in targets if not hasattr(owner, name)]
        if missing:
            raise RuntimeError(
                f"tfpar cannot install its Keras fixes: this Keras "
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

    def loss_factor(self) -> tf.Tensor:
        """What the local mean loss is multiplied by: n_r / N, or n_r until the all-reduce."""
        if self.global_count is None:
            return self.count
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
    return value * tf.cast(step.loss_factor(), value.dtype)


def _unscale_loss_for_distribution(value: Any) -> Any:
    step = _current_step()
    if step is None:
        return _UPSTREAM["keras.src.losses.loss.unscale_loss_for_distribution"](value)
    return tf.math.divide_no_nan(value, tf.cast(step.loss_factor(), value.dtype))


def _scaled(gradient: Any, factor: tf.Tensor) -> Any:
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(_scaled(gradient.values, factor), gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


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
    # The loss carried n_r (backprop did the weighting for free): sum the gradients and the counts
    # in the same batch all-reduce (no extra collective), then scale once by 1 / N.
    # The count travels in the gradients' dtype: a batch all-reduce packs (concatenates) tensors.
    dtype = grads[present[0]].dtype if present else tf.float32
    count = tf.cast(step.count, dtype)
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present] + [count])
    inverse = tf.math.reciprocal(reduced[-1])
    for position, index in enumerate(present):
        out[index] = _scaled(reduced[position], inverse)
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
    training = getattr(step_function, "__name__", "") == "train_step"
    if training and strategy.num_replicas_in_sync > 1:
        _warn_unsynchronized_batchnorm(self, strategy)
        step_function = _exact_train_step(step_function, _needs_weighted_loss(self))
    if self.steps_per_execution == 1 or strategy.num_replicas_in_sync == 1:
        function = _UPSTREAM["TensorFlowTrainer._make_function"](self, step_function)
    else:
        # Multi-replica only (upstream fails there); the per-step function is inlined, so XLA
        # (jit_compile) is not applied to it.
        function = _multi_step_function(self, step_function, strategy)
    return _skipping(self, function) if training else function


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


def _shuffle_seed(strategy: Any) -> int:
    """The shuffle seed of a fit: the same on every worker, and reproducible when seeded.

    With keras.utils.set_random_seed: derived from that seed (and, multi-worker, the cluster's
    shape). Otherwise random: on several workers, the sum of one random number per worker,
    all-reduced at the start of fit (every worker calls fit, so the collective is matched).
    """
    from keras.src.utils import rng_utils

    user_seed = rng_utils.get_random_seed()
    multi_worker = _in_multi_worker_mode(strategy)
    if user_seed is not None:
        if not multi_worker:
            return int(user_seed) & 0x7FFFFFFF
        spec = strategy.cluster_resolver.cluster_spec().as_dict()
        shape = json.dumps({job: len(tasks) for job, tasks in spec.items()}, sort_keys=True)
        return (zlib.crc32(shape.encode()) ^ int(user_seed)) & 0x7FFFFFFF
    draw = float(random.SystemRandom().getrandbits(20))
    if not multi_worker:
        return int(draw)

    def agree() -> tf.Tensor:
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.constant(draw, tf.float64)
        )

    total = strategy.experimental_local_results(strategy.run(agree))[0]
    return int(total.numpy()) & 0x7FFFFFFF


def _epoch_iterator_init(self: Any, distribute_strategy: Any = None, *args: Any, **kwargs: Any) -> None:
    if not is_managed(distribute_strategy):
        return _UPSTREAM["TFEpochIterator.__init__"](self, distribute_strategy, *args, **kwargs)
    from keras.src.trainers.epoch_iterator import EpochIterator

    from tfpar.data.shard import set_auto_shard_policy

    # Upstream's TFEpochIterator.__init__, with the auto-shard policy set explicitly before the
    # dataset is distributed: OFF on one worker (no-op warnings), FILE or DATA for several, and a
    # clear refusal for DATA sharding of a randomly ordered dataset (workers would overlap,
    # tensorflow/tensorflow#56513) or FILE sharding with fewer files than workers (#35878).
    EpochIterator.__init__(self, *args, **kwargs)
    self._distribute_strategy = distribute_strategy
    _SHARED_SHUFFLE.active = True  # the array adapter builds its dataset in get_tf_dataset()
    try:
        dataset = self.data_adapter.get_tf_dataset()
    finally:
        _SHARED_SHUFFLE.active = False
    if not isinstance(dataset, tf.distribute.DistributedDataset):
        _maybe_guard_empty_batches(self.data_adapter, dataset, distribute_strategy)
        workers = distribute_strategy.num_replicas_in_sync // max(
            1, len(distribute_strategy.extended.worker_devices)
        )
        dataset = set_auto_shard_policy(dataset, workers)
        dataset = distribute_strategy.experimental_distribute_dataset(dataset)
    self._distributed_dataset = dataset
    return None


def _array_dataset(self: Any) -> tf.data.Dataset:
    """Keras's array dataset, with a permutation that is a function of (seed, epoch).

    Keras shuffles numpy inputs with an unseeded ``tf.random.shuffle`` per epoch. Under
    MultiWorkerMirroredStrategy each worker then draws a different permutation and keeps the DATA
    shard of its own, so in an epoch some examples are seen several times and others never
    (measured: 101 examples, 3 epochs, 2 workers: counts from 0 to 6 instead of 3 each;
    tensorflow/tensorflow#56513 reports the same symptom). And after a restart no run can redo an
    epoch with the permutation it had. Under tfpar strategies the permutation of epoch ``e`` is a
    stateless shuffle seeded by ``(seed, e)``: identical on every worker (see :func:`_shuffle_seed`),
    new every epoch, and reproducible on resume (the seed is saved with backups), as PyTorch's
    DistributedSampler does.
    """
    upstream = _UPSTREAM["ArrayDataAdapter.get_tf_dataset"]
    state = getattr(_SHARED_SHUFFLE, "fit_state", None)
    leaves = keras.tree.flatten(self._inputs)
    dense = all(isinstance(leaf, (np.ndarray, tf.Tensor)) for leaf in leaves)
    if (
        not getattr(_SHARED_SHUFFLE, "active", False)
        or state is None
        or self._shuffle in (False, "batch")
        or not dense
    ):
        return upstream(self)
    inputs = keras.tree.map_structure(tf.convert_to_tensor, keras.tree.lists_to_tuples(self._inputs))
    count, batch_size = int(self._num_samples), int(self._batch_size)
    seed, epoch = state.seed, state.epoch

    def permutation(_: Any) -> tf.Tensor:
        return tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([seed.read_value(), epoch.read_value()])
        )

    order = tf.data.Dataset.from_tensors(0).map(permutation)
    batches = order.flat_map(lambda indices: tf.data.Dataset.from_tensor_slices(indices).batch(batch_size))
    dataset = batches.map(
        lambda indices: keras.tree.map_structure(lambda t: tf.gather(t, indices), inputs),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # The permutation reads two variables; they are the same on every worker by construction.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


# === 6. fit: epoch clock, shuffle seed, exact resume ===


@dataclasses.dataclass
class _FitState:
    """Per-fit state tfpar keeps for a managed model."""

    seed: tf.Variable  # shuffle seed (int64); shared by workers, saved with backups
    epoch: tf.Variable  # the epoch being trained (int64), read by the shuffle permutation
    skip_steps: int = 0  # steps of the first (resumed) epoch that a backup already contains
    current_epoch: int = 0


_FIT_STATES: "weakref.WeakKeyDictionary[Any, _FitState]" = weakref.WeakKeyDictionary()


def fit_state(model: Any) -> _FitState | None:
    """The state of the `fit` running on `model` under a tfpar strategy, if any."""
    return _FIT_STATES.get(model)


class _EpochClock(keras.callbacks.Callback):
    def __init__(self, state: _FitState) -> None:
        super().__init__()
        self._state = state

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._state.current_epoch = epoch
        self._state.epoch.assign(epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._state.skip_steps = 0


def _fit(self: Any, *args: Any, **kwargs: Any) -> Any:
    upstream = _UPSTREAM["TensorFlowTrainer.fit"]
    strategy = self.distribute_strategy
    if not is_managed(strategy) or isinstance(strategy, tf.distribute.ParameterServerStrategy):
        return upstream(self, *args, **kwargs)  # parameter servers: the coordinator loop
    bound = inspect.signature(upstream).bind(self, *args, **kwargs)
    seed = _shuffle_seed(strategy)
    with tf.init_scope():
        state = _FitState(
            seed=tf.Variable(seed, dtype=tf.int64, trainable=False),
            epoch=tf.Variable(0, dtype=tf.int64, trainable=False),
        )
    callbacks = bound.arguments.get("callbacks")
    clock = _EpochClock(state)
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(clock)
    else:
        bound.arguments["callbacks"] = [*(callbacks or []), clock]
    _FIT_STATES[self] = state
    _SHARED_SHUFFLE.fit_state = state
    try:
        with _running(self):
            return upstream(*bound.args, **bound.kwargs)
    finally:
        _SHARED_SHUFFLE.fit_state = None
        _FIT_STATES.pop(self, None)


_CURRENT = threading.local()


@contextlib.contextmanager
def _running(model: Any) -> Iterator[None]:
    """Marks `model` as the one whose fit / evaluate / predict runs in this thread."""
    previous = getattr(_CURRENT, "model", None)
    _CURRENT.model = model
    try:
        yield
    finally:
        _CURRENT.model = previous


def _evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
    with _running(self):
        return _UPSTREAM["TensorFlowTrainer.evaluate"](self, *args, **kwargs)


def _predict(self: Any, *args: Any, **kwargs: Any) -> Any:
    with _running(self):
        return _UPSTREAM["TensorFlowTrainer.predict"](self, *args, **kwargs)


def resume(model: Any, epoch: int, steps_done: int, seed: int | None) -> None:
    """Makes the running fit continue at `epoch`, skipping its first `steps_done` steps."""
    model._initial_epoch = epoch
    state = _FIT_STATES.get(model)
    if state is None:
        return
    state.skip_steps = steps_done
    if seed is not None:
        state.seed.assign(seed)


def _skipping(model: Any, function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Consumes, without training, the steps a resumed epoch already trained before its backup."""

    def train_function(iterator: Any) -> Any:
        state = _FIT_STATES.get(model)
        if state is None or state.skip_steps <= 0:
            return function(iterator)
        for _ in range(min(state.skip_steps, int(model.steps_per_execution))):
            next(iterator)
            state.skip_steps -= 1
        return model.get_metrics_result()

    return train_function


# === 7. Chief-only files under MultiWorkerMirroredStrategy ===


def _non_chief_worker(model: Any) -> bool:
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or not is_managed(strategy) or not _in_multi_worker_mode(strategy):
        return False
    return not cluster_lib.is_chief(strategy.cluster_resolver)


def _chief_only_save(upstream_key: str) -> Callable[..., Any]:
    # Every worker must take part in a save (reading some variables all-reduces), but only the
    # chief may write the real file: the others write to a temporary sibling that is removed
    # (the multi-worker tutorial's write_filepath pattern; tf-keras did this, Keras 3 does not).
    def save(self: Any, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        upstream = _UPSTREAM[upstream_key]
        if not _non_chief_worker(self):
            return upstream(self, filepath, *args, **kwargs)
        resolver = self._distribute_strategy.cluster_resolver
        target = cluster_lib.write_path(str(filepath), cluster=resolver)
        try:
            return upstream(self, target, *args, **kwargs)
        finally:
            cluster_lib.cleanup_write_path(str(filepath), cluster=resolver)

    return save


_model_save = _chief_only_save("Model.save")
_model_save_weights = _chief_only_save("Model.save_weights")


def _checkpoint_save_model(self: Any, epoch: int, batch: Any, logs: Any) -> None:
    # Upstream checks `exists(dir)` then calls os.makedirs: two workers on one filesystem race
    # ("FileExistsError: ... ckpt"). Creating it idempotently first closes the race.
    if _managed_model(self):
        directory = os.path.dirname(self._get_file_path(epoch, batch, logs))
        if directory:
            tf.io.gfile.makedirs(directory)
    _UPSTREAM["ModelCheckpoint._save_model"](self, epoch, batch, logs)


def _tensorboard_set_model(self: Any, model: Any) -> None:
    _UPSTREAM["TensorBoard.set_model"](self, model)
    self._tfpar_temp_log_dir = None
    if _non_chief_worker(model):
        resolver = model._distribute_strategy.cluster_resolver
        self._tfpar_temp_log_dir = self.log_dir
        self._log_write_dir = cluster_lib.write_path(self.log_dir, cluster=resolver)
        self._train_dir = os.path.join(self._log_write_dir, "train")
        self._val_dir = os.path.join(self._log_write_dir, "validation")


def _tensorboard_on_train_end(self: Any, logs: Any = None) -> None:
    _UPSTREAM["TensorBoard.on_train_end"](self, logs)
    if getattr(self, "_tfpar_temp_log_dir", None):
        cluster_lib.cleanup_write_path(
            self._tfpar_temp_log_dir, cluster=self.model._distribute_strategy.cluster_resolver
        )


# === 8. BackupAndRestore: chief-only, exact resume, preemption ===

PREEMPTED_EXIT_CODE = 42  # what a preempted worker exits with after the agreed save


def _managed_model(callback: Any) -> bool:
    model = getattr(callback, "model", None)
    return model is not None and is_managed(getattr(model, "_distribute_strategy", None))


def _backup_on_train_begin(self: Any, logs: Any = None) -> None:
    _UPSTREAM["BackupAndRestore.on_train_begin"](self, logs)
    if not _managed_model(self):
        return
    self._tfpar_in_batch = False
    metadata = {}
    if tf.io.gfile.exists(self._training_metadata_path):
        with tf.io.gfile.GFile(self._training_metadata_path) as handle:
            metadata = json.loads(handle.read())
    if "tfpar_steps_done" in metadata:
        resume(self.model, int(metadata["epoch"]), int(metadata["tfpar_steps_done"]), metadata.get("tfpar_seed"))
        self._current_epoch = int(metadata["epoch"])
        self._last_batch_seen = int(metadata["batch"])
    self._tfpar_previous_sigterm = signal.getsignal(signal.SIGTERM)
    self._tfpar_preemption = _preemption_handler(self)


def _backup_on_epoch_begin(self: Any, epoch: int, logs: Any = None) -> None:
    # Upstream only updates _current_epoch at epoch end, so a mid-epoch save in the first epoch of
    # a resumed run records epoch 0 and a second restart starts over.
    if _managed_model(self):
        self._current_epoch = epoch


def _backup_on_train_batch_end(self: Any, batch: int, logs: Any = None) -> None:
    self._tfpar_in_batch, self._tfpar_batch = True, batch
    try:
        _UPSTREAM["BackupAndRestore.on_train_batch_end"](self, batch, logs)
        handler = getattr(self, "_tfpar_preemption", None)
        if handler is not None:
            handler.save_checkpoint_if_preempted()
    finally:
        self._tfpar_in_batch = False


def _backup_save_model(self: Any) -> None:
    if not _managed_model(self):
        return _UPSTREAM["BackupAndRestore._save_model"](self)
    chief = not _non_chief_worker(self.model)
    if chief:
        tf.io.gfile.makedirs(self.backup_dir)
        if self.double_checkpoint:
            for path in (self._weights_path, self._training_metadata_path):
                if tf.io.gfile.exists(path):
                    tf.io.gfile.copy(path, f"{path}.bkp", overwrite=True)
    self.model.save_weights(filepath=self._weights_path, overwrite=True)  # chief-only inside
    if not chief:
        return None
    in_batch = getattr(self, "_tfpar_in_batch", False)
    batch = getattr(self, "_tfpar_batch", self._last_batch_seen) if in_batch else 0
    state = fit_state(self.model)
    metadata = {
        "epoch": self._current_epoch,
        "batch": batch,
        # Steps of `epoch` the saved weights contain (0 at an epoch boundary): a resumed run
        # skips them instead of training them twice (upstream replays the whole epoch).
        "tfpar_steps_done": batch + 1 if in_batch else 0,
        "tfpar_seed": int(state.seed.numpy()) if state is not None else None,
    }
    with tf.io.gfile.GFile(self._training_metadata_path, "w") as handle:
        handle.write(json.dumps(metadata))
    return None


def _backup_on_train_end(self: Any, logs: Any = None) -> None:
    if getattr(self, "_tfpar_preemption", None) is not None:
        # The handler took over SIGTERM for this fit; give it back (its peer-watcher thread is a
        # daemon blocked on the coordination service and ends with the process).
        signal.signal(signal.SIGTERM, self._tfpar_previous_sigterm)
        self._tfpar_preemption = None
    if _managed_model(self) and _non_chief_worker(self.model):
        return  # only the chief removes the backup directory
    _UPSTREAM["BackupAndRestore.on_train_end"](self, logs)


def _preemption_handler(callback: Any) -> Any:
    """A PreemptionCheckpointHandler that saves through the callback at an agreed step."""
    strategy = callback.model._distribute_strategy
    if not _in_multi_worker_mode(strategy) or threading.current_thread() is not threading.main_thread():
        return None

    def save() -> None:
        callback._tfpar_in_batch = True
        callback._save_model()
        # TF removes a non-chief's checkpoint directory after the save; tfpar saved through the
        # callback instead of TF's manager (and cleaned up after itself), so recreate it.
        tf.io.gfile.makedirs(handler._write_checkpoint_manager.directory)

    config = tf.distribute.experimental.TerminationConfig(
        exit_fn=lambda: sys.exit(PREEMPTED_EXIT_CODE), save_fn=save
    )
    # The handler restores its step counter from (and, non-chief, writes to a temporary sibling
    # of) this directory; tfpar's own save goes through `save` above.
    counter = tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64))
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver,
        counter,
        checkpoint_dir=os.path.join(callback.backup_dir, "preemption"),
        termination_config=config,
    )
    return handler


# === 9. Empty replica batches on CPU (oneDNN) ===


def _guard_empty_batches() -> bool:
    context = tf.distribute.get_replica_context()
    return (
        context is not None
        and context.num_replicas_in_sync > 1
        and not tf.executing_eagerly()
        and is_managed(context.strategy)
        and not tf.config.list_physical_devices("GPU")
    )


def _ceil_split_leaves_empty(batch: int, replicas: int) -> bool:
    # tf.distribute splits a batch of b into pieces of ceil(b / R): b=5 on 4 replicas is 2/2/1/0.
    return batch > 0 and -(-batch // replicas) * (replicas - 1) >= batch


def _empty_replicas_possible(adapter: Any, dataset: tf.data.Dataset, replicas: int) -> bool:
    from keras.src.trainers.data_adapters import array_data_adapter

    if replicas == 1:
        return False
    if isinstance(adapter, array_data_adapter.ArrayDataAdapter):
        full, last = int(adapter._batch_size), int(adapter._num_samples) % int(adapter._batch_size)
        return _ceil_split_leaves_empty(full, replicas) or _ceil_split_leaves_empty(last, replicas)
    leaves = [spec for spec in tf.nest.flatten(dataset.element_spec) if getattr(spec, "shape", None) is not None]
    batch = leaves[0].shape[0] if leaves and leaves[0].shape.rank else None
    if batch is None:
        return True  # the last batch's size is unknown (no drop_remainder)
    return _ceil_split_leaves_empty(int(batch), replicas)


def _maybe_guard_empty_batches(adapter: Any, dataset: tf.data.Dataset, strategy: Any) -> None:
    """Turns the empty-batch guard on for the running model when its data can leave a replica empty.

    The guard costs real time on CPU (a tf.cond per conv/pooling layer breaks oneDNN's layout
    chaining: measured 32 -> 45 ms per step for a small CNN on 2 workers), so it is only traced in
    when the input can produce a replica batch of 0 examples: arrays whose last batch splits that
    way, or a dataset whose batch size is not static (a partial last batch of unknown size).
    """
    model = getattr(_CURRENT, "model", None)
    if model is None or getattr(model, "_tfpar_empty_guard", False) or tf.config.list_physical_devices("GPU"):
        return
    if not _empty_replicas_possible(adapter, dataset, strategy.num_replicas_in_sync):
        return
    layers = [layer for layer in model._flatten_layers(include_self=False) if _guarded_layer(layer)]
    if not layers:
        return
    for layer in layers:
        layer._tfpar_empty_guard = True
    model._tfpar_empty_guard = True
    warnings.warn(
        f"tfpar: on {strategy.num_replicas_in_sync} replicas this input can give a replica an empty "
        f"batch, which TensorFlow's oneDNN CPU kernels mishandle; the {len(layers)} conv/pooling "
        f"layers of model {model.name!r} now skip empty batches, at some cost in speed on CPU. To "
        "avoid it, use a dataset batched with drop_remainder=True, or a batch size whose last "
        "batch covers every replica.",
        stacklevel=2,
    )
    # Functions traced without the guard are traced again with it.
    model.train_function = model.test_function = model.predict_function = None


def _guarded_layer(layer: Any) -> bool:
    from keras.src.layers.convolutional import (
        base_conv,
        base_conv_transpose,
        base_depthwise_conv,
        base_separable_conv,
    )
    from keras.src.layers.pooling import base_pooling

    return isinstance(
        layer,
        (
            base_conv.BaseConv,
            base_conv_transpose.BaseConvTranspose,
            base_depthwise_conv.BaseDepthwiseConv,
            base_separable_conv.BaseSeparableConv,
            base_pooling.BasePooling,
        ),
    )


def _empty_safe(upstream_key: str) -> Callable[..., Any]:
    """A layer `call` that returns an empty batch of the right shape for an empty input batch.

    When a final batch is smaller than the replica count, some replicas get 0 examples. TF 2.21's
    oneDNN CPU kernels mishandle that: Conv2D / DepthwiseConv2D return their *input* (shape
    (0, 16, 16, 3) instead of (0, 16, 16, 8)), so the next layer fails with "input depth must be
    evenly divisible by filter depth", and MaxPool's gradient aborts the process ("Check failed:
    dtype() == expected_dtype"). On CPU-only hosts, under a multi-replica tfpar strategy, these
    layers skip their kernels on an empty batch (a tf.cond that keeps conv + bias + activation
    fused inside the taken branch). No upstream issue found; verified on TF 2.21.0.
    """

    def call(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        upstream = _UPSTREAM[upstream_key]
        if (
            not getattr(self, "_tfpar_empty_guard", False)
            or not isinstance(inputs, tf.Tensor)
            or not _guard_empty_batches()
        ):
            return upstream(self, inputs, *args, **kwargs)
        try:
            shape = tuple(self.compute_output_shape(tuple(inputs.shape)))
        except Exception:  # noqa: BLE001 - a layer that cannot say: leave it as upstream has it
            return upstream(self, inputs, *args, **kwargs)
        if any(dim is None for dim in shape[1:]):
            return upstream(self, inputs, *args, **kwargs)
        return tf.cond(
            tf.shape(inputs)[0] > 0,
            lambda: upstream(self, inputs, *args, **kwargs),
            lambda: tf.zeros((0, *shape[1:]), dtype=self.compute_dtype),
        )

    return call


# === 10. BatchNormalization under data parallelism ===


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


# === 11-14. Parameter-server training (keras-team/keras#18624) ===

_PS_LOCK = threading.Lock()
_PS_INSTALLED = False
_PS_UPSTREAM: dict[str, Callable[..., Any]] = {}
_STRATEGIES: "weakref.WeakSet[Any]" = weakref.WeakSet()
_RMW_ATTRIBUTE = "_tfpar_read_modify_write"
_ROUTES: dict[str, Callable[..., Any]] = {}
_STRATEGIES: "weakref.WeakSet[Any]" = weakref.WeakSet()
_RMW_ATTRIBUTE = "_tfpar_read_modify_write"


PS_INTERCEPTIONS = (
    Interception(
        "keras.src.backend.tensorflow.trainer.TensorFlowTrainer.fit / evaluate / predict",
        "keras-team/keras#18624",
        "Keras 3 fit/evaluate/predict under ParameterServerStrategy (ClusterCoordinator loop)",
    ),
    Interception(
        "keras.src.backend.tensorflow.core.Variable.assign_add / assign_sub / assign / __add__ / __radd__",
        "keras-team/keras#18624 (aggregation); read-modify-write in KerasVariable.assign_add",
        "exact optimizer.iterations and metric accumulators under concurrent workers",
    ),
    Interception(
        "tf.GradientTape.gradient, keras.src.backend.tensorflow.optimizer.TFOptimizer."
        "add_variable_from_reference / _distributed_tf_update_step, "
        "keras.src.backend.tensorflow.core.Variable.__array__, "
        "keras.src.backend.tensorflow.numpy.take",
        "(Keras 3 has no ShardedVariable support; tf-keras had)",
        "variable_partitioner: train, save and look up sharded variables",
    ),
    Interception(
        "atexit: ClusterCoordinator cluster stop before interpreter finalization",
        "(TF 2.21 WorkerPreemptionHandler holds _cluster_update_lock; __del__ waits forever)",
        "the coordinator process exits after a worker was lost and restarted",
    ),
)


# === Which models these interceptions act on ===


def is_managed_ps(strategy: Any) -> bool:
    """Whether `strategy` is a ParameterServerStrategy that tfpar manages."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy) and is_managed(strategy)


def _in_managed_ps_closure() -> bool:
    """Whether the current code runs in a replica context of a managed ParameterServerStrategy."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return is_managed_ps(tf.distribute.get_strategy())


def install_parameter_server(
    fit: Callable[..., Any], evaluate: Callable[..., Any], predict: Callable[..., Any]
) -> None:
    """Installs the parameter-server interceptions (once); `fit` etc. receive routed calls.

    Each route is called as ``route(model, **keras_arguments)`` for models whose strategy is a
    managed ParameterServerStrategy; every other model keeps the (possibly already intercepted)
    Keras method.
    """
    global _PS_INSTALLED
    with _PS_LOCK:
        _ROUTES.update(fit=fit, evaluate=evaluate, predict=predict)
        if _PS_INSTALLED:
            return
        from keras.src.backend.tensorflow import core as tf_core
        from keras.src.backend.tensorflow import numpy as tf_numpy
        from keras.src.backend.tensorflow import optimizer as tf_optimizer
        from keras.src.backend.tensorflow import trainer as tf_trainer

        trainer = tf_trainer.TensorFlowTrainer
        targets = [
            (trainer, "fit", _routed_fit),
            (trainer, "evaluate", _routed_evaluate),
            (trainer, "predict", _routed_predict),
            (tf_core.Variable, "assign_add", _assign_add),
            (tf_core.Variable, "assign_sub", _assign_sub),
            (tf_core.Variable, "assign", _assign),
            (tf_core.Variable, "__add__", _add),
            (tf_core.Variable, "__radd__", _radd),
            (tf_core.Variable, "__array__", _array),
            (tf_numpy, "take", _take),
            (tf_optimizer.TFOptimizer, "add_variable_from_reference", _add_variable_from_reference),
            (tf_optimizer.TFOptimizer, "_distributed_tf_update_step", _distributed_tf_update_step),
            (tf.GradientTape, "gradient", _gradient),
        ]
        missing = [f"{_name(owner)}.{name}" for owner, name, _ in targets if not hasattr(owner, name)]
        if missing:
            raise RuntimeError(
                f"tfpar cannot install its parameter-server fixes: this Keras ({keras.__version__}) "
                f"/ TensorFlow ({tf.__version__}) has no {', '.join(missing)}. tfpar was verified on "
                f"Keras {VERIFIED_VERSIONS['keras']} / TensorFlow {VERIFIED_VERSIONS['tensorflow']}; "
                "install a Keras 3 / TensorFlow 2 release in that line."
            )
        for owner, name, replacement in targets:
            key = f"{_name(owner)}.{name}"
            _PS_UPSTREAM[key] = owner.__dict__.get(name, getattr(owner, name))
            setattr(owner, name, replacement)
        atexit.register(_stop_coordinators)
        _PS_INSTALLED = True


def _name(owner: Any) -> str:
    return getattr(owner, "__name__", str(owner)).rsplit(".", 1)[-1]


# === P1. Routing fit / evaluate / predict ===


def _routed_strategy(model: Any) -> Any:
    strategy = getattr(model, "_distribute_strategy", None)
    return strategy if is_managed_ps(strategy) else None


def _routed_fit(
    self: Any,
    x: Any = None,
    y: Any = None,
    batch_size: Any = None,
    epochs: int = 1,
    verbose: Any = "auto",
    callbacks: Any = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: Any = True,
    class_weight: Any = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: Any = None,
    validation_steps: Any = None,
    validation_batch_size: Any = None,
    validation_freq: Any = 1,
) -> Any:
    arguments = dict(
        x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
        validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
        class_weight=class_weight, sample_weight=sample_weight, initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
        validation_batch_size=validation_batch_size, validation_freq=validation_freq,
    )
    if _routed_strategy(self) is None:
        return _PS_UPSTREAM["TensorFlowTrainer.fit"](self, **arguments)
    return _ROUTES["fit"](self, **arguments)


def _routed_evaluate(
    self: Any,
    x: Any = None,
    y: Any = None,
    batch_size: Any = None,
    verbose: Any = "auto",
    sample_weight: Any = None,
    steps: Any = None,
    callbacks: Any = None,
    return_dict: bool = False,
    **kwargs: Any,
) -> Any:
    arguments = dict(
        x=x, y=y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight,
        steps=steps, callbacks=callbacks, return_dict=return_dict,
    )
    if _routed_strategy(self) is None:
        return _PS_UPSTREAM["TensorFlowTrainer.evaluate"](self, **arguments, **kwargs)
    if kwargs:
        raise ValueError(f"Arguments not recognized: {kwargs}")
    return _ROUTES["evaluate"](self, **arguments)


def _routed_predict(
    self: Any, x: Any, batch_size: Any = None, verbose: Any = "auto", steps: Any = None, callbacks: Any = None
) -> Any:
    arguments = dict(x=x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
    if _routed_strategy(self) is None:
        return _PS_UPSTREAM["TensorFlowTrainer.predict"](self, **arguments)
    return _ROUTES["predict"](self, **arguments)


# Keras internals the coordinator loop needs (private attributes live here, not in tfpar.coordinator).


def assert_compiled(model: Any, method: str) -> None:
    """Raises Keras's own error when `model` is not compiled."""
    model._assert_compile_called(method)


def symbolic_build(model: Any, strategy: tf.distribute.Strategy, data_spec: Any) -> None:
    """Builds the model, its compiled loss/metrics and optimizer on the coordinator (no data)."""
    with strategy.scope():
        model._symbolic_build(data_batch=data_spec)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)


def build_for_predict(model: Any, strategy: tf.distribute.Strategy, x_spec: Any) -> None:
    """Creates the model's variables on the coordinator from input specs (loss/metrics untouched)."""
    if all(layer.built for layer in model._flatten_layers()):
        return
    from keras.src import backend

    symbolic = tf.nest.map_structure(lambda spec: backend.KerasTensor(spec.shape, spec.dtype.name), x_spec)
    with strategy.scope():
        backend.compute_output_spec(model, symbolic, training=False)


def compiled_state(model: Any) -> tuple[Any, ...]:
    """The objects ``model.compile`` creates (optimizer, compiled loss and metrics)."""
    return (model.optimizer, model._compile_loss, model._compile_metrics)


def take_initial_epoch(model: Any, default: int) -> int:
    """The epoch fit starts at: what BackupAndRestore restored (``model._initial_epoch``), else `default`."""
    return getattr(model, "_initial_epoch", None) or default


def metrics_result_or_logs(model: Any, logs: Any) -> dict[str, Any]:
    """Keras's rule: the model's metrics, unless a custom step returned other keys."""
    return dict(model._get_metrics_result_or_logs(logs))


def flatten_metrics_in_order(model: Any, logs: dict[str, Any]) -> Any:
    """``evaluate(return_dict=False)``'s list, in Keras's metric order."""
    return model._flatten_metrics_in_order(logs)


def optimizer_steps(optimizer: Any) -> int | None:
    """The raw number of optimizer applications (``optimizer._iterations``), or None."""
    variable = getattr(optimizer, "_iterations", None)
    return None if variable is None else int(variable.numpy())


def num_workers(strategy: tf.distribute.ParameterServerStrategy) -> int:
    """How many worker tasks the strategy schedules on."""
    return int(strategy._num_workers)


def track(strategy: tf.distribute.ParameterServerStrategy) -> None:
    """Stops the strategy's ClusterCoordinator (if any) at exit, before finalization (P4)."""
    _STRATEGIES.add(strategy)


def ps_cluster_spec(strategy: tf.distribute.ParameterServerStrategy) -> dict[str, list[str]]:
    """The cluster spec (a dict) a ParameterServerStrategy connected to.

    Its public ``cluster_resolver`` property is None (TF 2.21); the resolver passed to the
    constructor is kept in ``_cluster_resolver``.
    """
    return strategy._cluster_resolver.cluster_spec().as_dict()


def coordinator(strategy: tf.distribute.ParameterServerStrategy) -> tf.distribute.coordinator.ClusterCoordinator:
    """The strategy's (singleton) ClusterCoordinator, stopped at exit before finalization (P4)."""
    track(strategy)
    return tf.distribute.coordinator.ClusterCoordinator(strategy)


@contextlib.contextmanager
def tracing_outside_schedule(strategy: tf.distribute.ParameterServerStrategy) -> Iterator[None]:
    """Traces a step function on the coordinator (to learn its output structure) without
    ParameterServerStrategy's warning that ``run`` is invoked outside ``schedule``."""
    extended = strategy.extended
    previous = extended._being_scheduled
    extended._being_scheduled = True
    try:
        yield
    finally:
        extended._being_scheduled = previous


def is_worker_failure(error: BaseException) -> bool:
    """Whether ClusterCoordinator would treat `error` as the failure of a worker task.

    Its own classification (``_is_worker_failure``): a connection error from a ``/job:worker``
    task that is not relayed from a ps task. ClusterCoordinator re-runs a failed worker's steps.
    """
    from tensorflow.python.distribute.coordinator import cluster_coordinator

    return bool(cluster_coordinator._is_worker_failure(error))


def is_derived_cancellation(error: BaseException) -> bool:
    """A ``CancelledError`` a remote task relays after one of its RPCs failed.

    ClusterCoordinator ignores these (a transient worker-to-ps failure can surface this way) and
    retries the step (``_WorkerFailureHandler.wait_on_failure``).
    """
    return isinstance(error, tf.errors.CancelledError) and "/job:" in str(error)


@contextlib.contextmanager
def synchronous_executor() -> Iterator[None]:
    """Runs eager ops of this thread on a new synchronous executor, as each ClusterCoordinator
    worker thread does, so that a failed remote call leaves no error in the thread's executor
    (an asynchronous one would re-raise it on later ops)."""
    from tensorflow.python.eager import context, executor

    with context.executor_scope(executor.new_executor(enable_async=False)):
        yield


def failed_ps_tasks(error: BaseException) -> set[int] | None:
    """The ps task indices a coordinator error blames, or None when it is not a ps failure.

    Uses ClusterCoordinator's own classification (``_is_ps_failure``): an ``UnavailableError``
    (or ``Aborted`` / ``InvalidArgument`` after a fast restart) carrying gRPC error information
    from a ``/job:ps`` task. An empty set means a ps failure whose task the message does not name.
    """
    from tensorflow.python.distribute.coordinator import cluster_coordinator

    if not cluster_coordinator._is_ps_failure(error):
        return None
    original = getattr(error, "original_exception", error)
    return cluster_coordinator._extract_failed_ps_instances(str(original))


# === P2. Atomic assign_add / assign_sub inside parameter-server closures ===


def _atomic(variable: Any) -> bool:
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return variable._value is not None and not in_stateless_scope() and _in_managed_ps_closure()


def _assign_add(self: Any, value: Any) -> Any:
    if not _atomic(self):
        return _PS_UPSTREAM["Variable.assign_add"](self, value)
    delta = tf.cast(self._convert_to_tensor(value, dtype=self._dtype), self._value.dtype)
    return self._value.assign_add(delta)


def _assign_sub(self: Any, value: Any) -> Any:
    if not _atomic(self):
        return _PS_UPSTREAM["Variable.assign_sub"](self, value)
    delta = tf.cast(self._convert_to_tensor(value, dtype=self._dtype), self._value.dtype)
    return self._value.assign_sub(delta)


def _tag_sum(self: Any, other: Any, result: Any) -> Any:
    # Remember that `result` is `self + other`, so that `self.assign(result)` can become atomic.
    if isinstance(result, tf.Tensor) and not isinstance(other, keras.Variable) and _atomic(self):
        try:
            setattr(result, _RMW_ATTRIBUTE, (weakref.ref(self), other))
        except AttributeError:  # an eager tensor or a type without attributes: nothing to tag
            pass
    return result


def _add(self: Any, other: Any) -> Any:
    return _tag_sum(self, other, _PS_UPSTREAM["Variable.__add__"](self, other))


def _radd(self: Any, other: Any) -> Any:
    return _tag_sum(self, other, _PS_UPSTREAM["Variable.__radd__"](self, other))


def _assign(self: Any, value: Any) -> Any:
    tag = getattr(value, _RMW_ATTRIBUTE, None) if isinstance(value, tf.Tensor) else None
    if tag is not None and tag[0]() is self and _atomic(self):
        delta = tf.cast(self._convert_to_tensor(tag[1], dtype=self._dtype), self._value.dtype)
        delta = tf.broadcast_to(delta, self._value.shape)
        return self._value.assign_add(delta)
    return _PS_UPSTREAM["Variable.assign"](self, value)


# === P3. Sharded variables (variable_partitioner) ===


def _sharded_value(variable: Any) -> Any:
    """The ShardedVariable behind a Keras variable of a managed strategy, else None."""
    from tensorflow.python.distribute import sharded_variable

    value = getattr(variable, "_value", None)
    if not isinstance(value, sharded_variable.ShardedVariable):
        return None
    strategy = getattr(value, "_distribute_strategy", None)
    return value if is_managed_ps(strategy) else None


def _is_sharded(variable: Any) -> bool:
    return isinstance(variable, keras.Variable) and _sharded_value(variable) is not None


def _gradient(
    self: Any,
    target: Any,
    sources: Any,
    output_gradients: Any = None,
    unconnected_gradients: Any = tf.UnconnectedGradients.NONE,
) -> Any:
    upstream = _PS_UPSTREAM["GradientTape.gradient"]
    flat = tf.nest.flatten(sources)
    if not any(_is_sharded(source) for source in flat):
        return upstream(self, target, sources, output_gradients, unconnected_gradients)
    expanded = [list(_sharded_value(s).variables) if _is_sharded(s) else s for s in flat]
    gradients = upstream(self, target, expanded, output_gradients, unconnected_gradients)
    joined = [
        _join_shard_gradients(source, list(gradient)) if _is_sharded(source) else gradient
        for source, gradient in zip(flat, gradients)
    ]
    return tf.nest.pack_sequence_as(sources, joined)


def _join_shard_gradients(source: Any, parts: list[Any]) -> Any:
    """One gradient for the whole variable from its shards' gradients (first-axis shards)."""
    shards = _sharded_value(source).variables
    if all(part is None for part in parts):
        return None
    if not any(isinstance(part, tf.IndexedSlices) for part in parts):
        return tf.concat(
            [tf.zeros_like(shard) if part is None else part for shard, part in zip(shards, parts)], axis=0
        )
    values, indices, offset = [], [], 0
    for shard, part in zip(shards, parts):
        if part is not None:
            if not isinstance(part, tf.IndexedSlices):
                part = tf.IndexedSlices(part, tf.range(tf.shape(part, out_type=tf.int64)[0]))
            values.append(part.values)
            indices.append(tf.cast(part.indices, tf.int64) + offset)
        offset += int(shard.shape[0])
    return tf.IndexedSlices(
        tf.concat(values, axis=0), tf.concat(indices, axis=0), tf.constant(list(source.shape), tf.int64)
    )


def _add_variable_from_reference(
    self: Any, reference_variable: Any, name: Any = None, initializer: Any = "zeros"
) -> Any:
    if not _is_sharded(reference_variable):
        return _PS_UPSTREAM["TFOptimizer.add_variable_from_reference"](self, reference_variable, name, initializer)
    # Upstream colocates the slot with its variable, which turns off partitioning: the slot of a
    # sharded embedding would be one full-size variable on one ps. Created without colocation,
    # the strategy's partitioner shards it exactly like the variable (same shape and dtype).
    from keras.src.optimizers import base_optimizer

    return base_optimizer.BaseOptimizer.add_variable_from_reference(
        self, reference_variable, name=name, initializer=initializer
    )


def _distributed_tf_update_step(self: Any, distribution: Any, grads_and_vars: Any, learning_rate: Any) -> Any:
    from tensorflow.python.distribute import sharded_variable

    pairs = list(grads_and_vars)
    sharded = [
        (g, v) for g, v in pairs
        if isinstance(v, sharded_variable.ShardedVariable) and is_managed_ps(getattr(v, "_distribute_strategy", None))
    ]
    if not sharded:
        return _PS_UPSTREAM["TFOptimizer._distributed_tf_update_step"](self, distribution, pairs, learning_rate)
    # strategy.extended.update colocates with the variable, which a ShardedVariable refuses; its
    # assign/scatter methods place each shard's update on that shard's ps themselves.
    for gradient, variable in sharded:
        self.update_step(gradient, variable, learning_rate)
    plain = [(g, v) for g, v in pairs if not any(v is s for _, s in sharded)]
    return _PS_UPSTREAM["TFOptimizer._distributed_tf_update_step"](self, distribution, plain, learning_rate)


def _array(self: Any, dtype: Any = None, copy: Any = None) -> Any:
    value = _sharded_value(self)
    if value is None:
        return _PS_UPSTREAM["Variable.__array__"](self, dtype)
    return np.asarray(value.numpy(), dtype=dtype)


def _take(x: Any, indices: Any, axis: Any = None) -> Any:
    upstream = _PS_UPSTREAM["numpy.take"]
    value = _sharded_value(x) if isinstance(x, keras.Variable) else None
    if value is None or axis != 0 or isinstance(indices, (tf.SparseTensor, tf.RaggedTensor)):
        return upstream(x, indices, axis=axis)
    ids = tf.convert_to_tensor(indices)
    if not ids.dtype.is_integer:
        return upstream(x, indices, axis=axis)
    rows = tf.cast(value.shape[0], ids.dtype)
    ids = tf.where(ids < 0, ids + rows, ids)  # Keras's "fill" handling of negative indices
    result = tf.nn.embedding_lookup(value, ids)
    return tf.cast(result, x.dtype) if result.dtype != tf.as_dtype(x.dtype) else result


# === P4. Stop coordinators before interpreter finalization ===


def _stop_coordinators() -> None:
    for strategy in list(_STRATEGIES):
        item = getattr(strategy, "_cluster_coordinator", None)
        cluster = getattr(item, "_cluster", None)
        if cluster is None:
            continue
        stopper = threading.Thread(target=cluster.stop, name="tfpar-coordinator-stop", daemon=True)
        stopper.start()
        stopper.join(timeout=10)
        # ClusterCoordinator.__del__ calls stop() again during finalization; after a successful
        # stop that second call no longer waits, and after a failed one it must not run at all.
        item.__class__ = _StoppedCoordinator


class _StoppedCoordinator(tf.distribute.coordinator.ClusterCoordinator):
    """A ClusterCoordinator whose cluster tfpar already stopped (no second stop in ``__del__``)."""

    def __del__(self) -> None:
        return None


INTERCEPTIONS = INTERCEPTIONS + PS_INTERCEPTIONS
