"""Parameter-server training with plain Keras 3: the ClusterCoordinator loop behind ``model.fit``.

Keras 3 has no parameter-server path (keras-team/keras#18624): its trainer never creates a
``tf.distribute.coordinator.ClusterCoordinator``. Under a ParameterServerStrategy made by
:func:`parameter_server_strategy` (``tfpar.scope("parameter_server", ...)``), tfpar runs
``fit`` / ``evaluate`` / ``predict`` through a coordinator loop instead: this process (the
*coordinator*, the ``chief`` task) builds the model, keeps the variables on the ``ps`` tasks, and
schedules steps as closures that any free ``worker`` task runs.

The three modes of computation:

* **synchronous**: ``"mirrored"`` (one host) and ``"multi_worker"`` (several hosts). Every step
  all-reduces the gradients of all replicas; every replica applies the same update.
* **asynchronous**: ``"parameter_server"`` (``staleness=None``, the default). Each worker computes
  gradients on its own batch and applies them to the variables on the parameter servers as soon
  as it is done, with no waiting for the others. A slow worker never holds the others up; the
  price is that a worker's gradient may be computed on weights that others have changed since.
* **semi-asynchronous** (bounded staleness, SSP): ``"parameter_server"`` with ``staleness=k``. A
  worker may start a step only while it is at most ``k`` steps ahead of the slowest worker;
  ``k=0`` makes the workers advance in lockstep (each round, every worker does one step), as
  synchronous training does, while updates are still applied one worker at a time.

What ``fit`` does with each kind of input:

* **NumPy arrays / tensors** (``x``, ``y``, ``sample_weight`` as in Keras): every worker holds a
  copy of the arrays (sent once, as a constant of its input pipeline); the coordinator shuffles
  (``shuffle=True`` as in Keras; ``"batch"`` permutes whole batches) and schedules each batch as
  the row indices it contains. So every example is trained on exactly once per epoch, as in
  Keras, whichever worker runs it. ``steps_per_epoch`` defaults to one pass; with another value
  batches are drawn from a stream of passes that continues across epochs.
  ``validation_split`` and ``class_weight`` work as in Keras. The arrays are embedded in a
  TensorFlow graph, so they must be smaller than 2 GB; use a dataset for more.
* **A ``tf.data.Dataset``**: every worker iterates its own copy, repeated (TensorFlow's
  parameter-server input model: there is no shared queue of batches). An epoch is
  ``steps_per_epoch`` steps, by default the dataset's number of batches; an infinite or
  unknown-size dataset needs ``steps_per_epoch`` (ValueError otherwise). Within an epoch each
  worker draws from its own copy, so shuffle the dataset (without a fixed seed: identical seeds
  give every worker the same order) or shard it with a ``dataset_fn``.
* **A ``dataset_fn(input_context)``** returning a ``tf.data.Dataset``: called on every worker,
  with ``input_context.num_input_pipelines`` = the number of workers and
  ``input_context.input_pipeline_id`` = this worker's index (a scalar tensor), so
  ``dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)`` gives
  each worker a disjoint part. It is also traced (not run) once on the coordinator to learn the
  element structure. Needs ``steps_per_epoch``. Batch inside the function (per-worker batch
  size).

``evaluate``, ``predict`` and ``validation_data`` take arrays (each batch scheduled by index:
exact, ordered) or a finite ``tf.data.Dataset`` (``steps`` bounds an infinite one): every worker
runs the dataset and keeps the batches whose position ``i`` has ``i % workers == its index``, so
each batch is evaluated once and predictions come back in dataset order (the dataset must yield
the same batches on every worker: no unseeded shuffle). ``train_on_batch``, ``test_on_batch`` and
``predict_on_batch`` keep Keras's behaviour: they run the step in this process, reading and
updating the variables on the parameter servers.

Callbacks and logs (History, ModelCheckpoint, EarlyStopping, TensorBoard, BackupAndRestore,
custom ones) get the same calls as in Keras, with these differences, all due to asynchronous
execution:

* ``on_train_batch_begin`` is called when a step is scheduled. When some callback uses
  batch-level logs (it overrides ``on_train_batch_end`` / ``on_batch_end``; the progress bar
  only with ``verbose=1``), ``on_train_batch_end`` receives that step's own logs, in step order,
  at most ``2 * workers + 1`` steps behind scheduling (fetching a step's logs is a round trip to
  its worker, so ``verbose=1`` costs throughput); otherwise it is called at scheduling time with
  empty logs. ``stop_training`` set from a batch callback takes effect after the already
  scheduled steps.
* Epoch logs are the model's metrics over every step of the epoch, read from the parameter
  servers after all of the epoch's steps finished, plus ``applied_steps``: the optimizer updates
  the epoch applied. ``verbose="auto"`` means 2 (one line per epoch) for ``fit`` and
  ``evaluate``, as in tf-keras's parameter-server mode.
* ``steps_per_execution=s`` (``model.compile``) schedules ``s`` steps per closure.

Correctness under concurrent workers (``tfpar/_keras_compat.py``, interception 12): the step counter
(``optimizer.iterations``) and the metric accumulators are updated atomically on the parameter
servers, so 40 scheduled steps apply 40 updates and the metrics count every example. Model
weights and optimizer slots get asynchronous, lock-free updates (as in TensorFlow's
parameter-server training: that is what asynchronous means).

Fault tolerance: when a worker dies, ClusterCoordinator re-runs its unfinished closures on other
workers and re-admits the worker when it comes back (``tfpar launch --ps M --max-restarts K``
restarts it). A step that was interrupted after it had applied its update runs again: execution
is **at least once**, and ``applied_steps`` in History counts such repeats (it is then larger
than the number of steps scheduled). A restarted worker rebuilds its input pipeline: with a
dataset it starts its copy again from the beginning (arrays are unaffected, batches are sent as
indices), and an evaluation on a dataset waits for every worker to finish its share, so it may
count a restarted worker's batches twice. With ``staleness=k``, the other workers wait for a dead
worker (up to a minute per attempt, then they reschedule) until it is back. When a parameter
server fails, its variables are lost: ``fit`` raises :class:`ParameterServerError` naming the ps
task, the last finished epoch, and the ``keras.callbacks.BackupAndRestore`` backup to resume from
(restart the ps task and the coordinator; BackupAndRestore restores the weights, optimizer state
and epoch, and the interrupted epoch runs again from its start; without it, the error says how
to add it).

Example:
    import tfpar
    cluster = tfpar.local_cluster(workers=2, ps=1)        # or "tf_config" under tfpar launch
    with tfpar.scope("parameter_server", cluster=cluster, staleness=None):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=3, validation_split=0.1)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import math
import numbers
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar import _keras_compat as compat
from tfpar import cluster as cluster_lib

__all__ = [
    "ParameterServerError",
    "ParameterServerOptions",
    "VARIABLE_PARTITIONERS",
    "options",
    "parameter_server_strategy",
]

#: Names accepted by ``variable_partitioner`` besides an int (fixed shards) and a partitioner.
VARIABLE_PARTITIONERS = ("min_size",)
DEFAULT_MIN_SHARD_BYTES = 256 << 10
_DEFAULT_BATCH_SIZE = 32
_STALENESS_POLL_SECONDS = 0.002
_STALENESS_TIMEOUT_SECONDS = 60.0
_EVAL_BATCHES_PER_CLOSURE = 8


class ParameterServerError(RuntimeError):
    """A parameter server failed during training: its variables are lost.

    Attributes:
        ps_tasks: Indices of the failed ps tasks (empty when TensorFlow's message names none).
        epoch: The epoch that was running (0-based).
        last_finished_epoch: The last epoch that finished, or None.
        backup_dir: The BackupAndRestore directory holding the checkpoint to resume from, or
            None when the fit had no BackupAndRestore callback.
    """

    def __init__(
        self, message: str, *, ps_tasks: tuple[int, ...], epoch: int, last_finished_epoch: int | None,
        backup_dir: str | None,
    ) -> None:
        super().__init__(message)
        self.ps_tasks = ps_tasks
        self.epoch = epoch
        self.last_finished_epoch = last_finished_epoch
        self.backup_dir = backup_dir


@dataclasses.dataclass(frozen=True)
class ParameterServerOptions:
    """What :func:`parameter_server_strategy` was asked for (see :func:`options`).

    Attributes:
        staleness: None for asynchronous training; k >= 0 for bounded staleness.
        variable_partitioner: The partitioner given to ParameterServerStrategy, or None.
    """

    staleness: int | None = None
    variable_partitioner: Any = None


_OPTIONS: "weakref.WeakKeyDictionary[tf.distribute.Strategy, ParameterServerOptions]" = (
    weakref.WeakKeyDictionary()
)


def options(strategy: tf.distribute.Strategy) -> ParameterServerOptions:
    """The parameter-server options of `strategy` (defaults for one tfpar did not create).

    Args:
        strategy: A ``tf.distribute.ParameterServerStrategy``.

    Returns:
        Its :class:`ParameterServerOptions`.

    Raises:
        TypeError: If `strategy` is not a ParameterServerStrategy.

    Example:
    >>> strategy = tfpar.coordinator.parameter_server_strategy(tfpar.local_cluster(), staleness=1)
    >>> tfpar.coordinator.options(strategy).staleness
    1
    """
    if not isinstance(strategy, tf.distribute.ParameterServerStrategy):
        raise TypeError(
            "Expected a tf.distribute.ParameterServerStrategy. "
            f"Received: strategy={strategy!r} (of type {type(strategy).__name__})"
        )
    return _OPTIONS.get(strategy, ParameterServerOptions())


# =============================================================================================
# The strategy factory
# =============================================================================================


def parameter_server_strategy(
    cluster: str | Mapping[str, Any] | tf.distribute.cluster_resolver.ClusterResolver | tf.train.ClusterSpec = "tf_config",
    *,
    variable_partitioner: str | int | Callable[..., Any] | None = None,
    min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES,
    staleness: int | None = None,
) -> tf.distribute.ParameterServerStrategy:
    """Creates a ParameterServerStrategy whose Keras ``fit`` / ``evaluate`` / ``predict`` work.

    This process must be the coordinator: the ``chief`` task of the cluster (``tfpar launch
    --ps M`` runs the script there and servers in the worker and ps tasks), or a process outside
    the cluster spec (``tfpar.local_cluster()``, the TF tutorial's layout).

    Args:
        cluster: Where the cluster comes from, as for :func:`tfpar.cluster.resolve`:
            ``"tf_config"`` (default), ``"slurm"``, a dict cluster spec, a
            ``tf.train.ClusterSpec`` or a ClusterResolver such as ``tfpar.local_cluster()``.
            It must have at least one ``"worker"`` and one ``"ps"`` task.
        variable_partitioner: How variables are split over the ps tasks:

            * None: each variable lives whole on one ps (round-robin over the ps tasks).
            * ``"min_size"``: variables larger than `min_shard_bytes` are split along their
              first axis into shards of at least `min_shard_bytes`, at most one per ps
              (``tf.distribute.experimental.partitioners.MinSizePartitioner``): for big
              embeddings.
            * an int ``n`` >= 1: every variable of rank >= 1 is split into ``n`` shards
              (``FixedShardsPartitioner(n)``; fewer when its first axis is shorter).
            * a ``tf.distribute.experimental.partitioners.Partitioner`` (or any callable with
              its signature).

            Keras layers and optimizers train, save and load sharded variables under tfpar, and
            ``keras.layers.Embedding`` reads only the rows a batch uses from each shard.
        min_shard_bytes: The minimum shard size for ``variable_partitioner="min_size"``.
        staleness: None (default) for asynchronous training; an int ``k >= 0`` for
            semi-asynchronous training: no worker starts a step while it is more than ``k``
            steps ahead of the slowest (``k=0``: lockstep rounds). Counted in steps.

    Returns:
        The ``tf.distribute.ParameterServerStrategy``. Creating it connects to the cluster and,
        as TensorFlow does, sets ``TF_ENABLE_EAGER_CLIENT_STREAMING_ENQUEUE`` and
        ``TF_PS_DISABLE_ASYNC_EXECUTOR_GLOBALLY`` in this process's environment.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument has a wrong value, or the cluster has no worker or no ps
            task, or this process is one of its worker / ps tasks.

    Example:
    >>> strategy = tfpar.coordinator.parameter_server_strategy(
    ...     tfpar.local_cluster(workers=2, ps=2), variable_partitioner="min_size", staleness=1)
    >>> with tfpar.scope(strategy):
    ...     model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(100_000, 64)])
    """
    if staleness is not None and (isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral)):
        raise TypeError(
            "Expected staleness to be None (asynchronous) or an int >= 0 (bounded staleness). "
            f"Received: staleness={staleness!r} (of type {type(staleness).__name__})"
        )
    if staleness is not None and staleness < 0:
        raise ValueError(
            "Expected staleness >= 0: 0 is lockstep, k lets a worker run k steps ahead of the "
            f"slowest, None is fully asynchronous. Received: staleness={staleness}"
        )
    if isinstance(min_shard_bytes, bool) or not isinstance(min_shard_bytes, numbers.Integral):
        raise TypeError(f"Expected min_shard_bytes to be an int. Received: min_shard_bytes={min_shard_bytes!r}")
    if min_shard_bytes < 1:
        raise ValueError(f"Expected min_shard_bytes >= 1. Received: min_shard_bytes={min_shard_bytes}")
    _check_partitioner(variable_partitioner)
    resolver = cluster_lib.resolve(cluster)
    spec = resolver.cluster_spec().as_dict() if resolver.cluster_spec() else {}
    workers, ps = len(spec.get("worker", ())), len(spec.get("ps", ()))
    if workers < 1 or ps < 1:
        shape = {job: len(tasks) for job, tasks in spec.items()} or "no cluster (TF_CONFIG is unset or empty)"
        raise ValueError(
            "Strategy 'parameter_server' needs a cluster with at least one 'worker' and one 'ps' "
            f"task. Received: cluster={cluster!r} with {shape}. For a local try-out pass "
            "cluster=tfpar.local_cluster(workers=2, ps=1); for separate processes run the script "
            "under `tfpar launch --workers 2 --ps 1 -- python train.py`."
        )
    if resolver.task_type in ("worker", "ps"):
        raise ValueError(
            f"This process is task {resolver.task_type}:{resolver.task_id} of the cluster, but "
            "under parameter-server training only the coordinator (the 'chief' task) runs the "
            "training script; worker and ps tasks run TensorFlow servers "
            "(tfpar.launch.serve(), which `tfpar launch --ps M` starts for them). "
            f"Received: task_type={resolver.task_type!r}"
        )
    if resolver.task_type not in (None, "chief"):
        raise ValueError(
            "Expected the coordinator to be the 'chief' task (or outside the cluster spec). "
            f"Received: task_type={resolver.task_type!r}"
        )
    partitioner = _make_partitioner(variable_partitioner, min_shard_bytes, ps)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    _OPTIONS[strategy] = ParameterServerOptions(
        staleness=None if staleness is None else int(staleness), variable_partitioner=partitioner
    )
    return compat.manage(strategy)  # tfpar's fixes (and routing of fit) apply to its models


def _check_partitioner(value: Any) -> None:
    if value is None or callable(value):
        return
    if isinstance(value, str):
        if value not in VARIABLE_PARTITIONERS:
            raise ValueError(
                f"Unknown variable_partitioner {value!r}. Valid choices: None, 'min_size', an int "
                "number of shards, or a tf.distribute.experimental.partitioners.Partitioner. "
                f"Received: variable_partitioner={value!r}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            "Expected variable_partitioner to be None, 'min_size', an int number of shards or a "
            "tf.distribute.experimental.partitioners.Partitioner. "
            f"Received: variable_partitioner={value!r} (of type {type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"Expected a number of shards >= 1. Received: variable_partitioner={value}")


def _make_partitioner(value: Any, min_shard_bytes: int, num_ps: int) -> Any:
    partitioners = tf.distribute.experimental.partitioners
    if value is None or callable(value):
        return value
    if value == "min_size":
        return partitioners.MinSizePartitioner(min_shard_bytes=int(min_shard_bytes), max_shards=num_ps)
    return partitioners.FixedShardsPartitioner(int(value))


def _install() -> None:
    compat.install_parameter_server(fit=_fit, evaluate=_evaluate, predict=_predict)


def _enable(strategy: tf.distribute.ParameterServerStrategy) -> None:
    """Makes Keras fit/evaluate/predict work under a ParameterServerStrategy tfpar did not create.

    For ``tfpar.get_strategy(instance)`` / ``tfpar.scope(instance)`` (``_keras_compat.manage``):
    default options (asynchronous, the instance's own partitioner).
    """
    _install()
    compat.track(strategy)


# =============================================================================================
# Inputs
# =============================================================================================


@dataclasses.dataclass
class _Arrays:
    """In-memory inputs: a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` of arrays."""

    data: tuple[Any, ...]
    count: int
    batch_size: int

    def spec(self) -> Any:
        return tf.nest.map_structure(
            lambda a: tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype)), self.data
        )

    def num_batches(self) -> int:
        return max(1, math.ceil(self.count / self.batch_size))

    def ordered_batches(self) -> list[np.ndarray]:
        order = np.arange(self.count, dtype=np.int64)
        return [order[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]

    def shuffled_batches(self, shuffle: Any) -> list[np.ndarray]:
        if shuffle is True:
            order = np.random.permutation(self.count).astype(np.int64)
            return [order[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]
        batches = self.ordered_batches()
        if shuffle == "batch":
            return [batches[i] for i in np.random.permutation(len(batches))]
        return batches


@dataclasses.dataclass
class _Dataset:
    """A tf.data.Dataset, or a ``dataset_fn(input_context)`` run on every worker."""

    dataset: tf.data.Dataset | None
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset] | None
    element_spec: Any


def _is_array_like(value: Any) -> bool:
    return isinstance(value, (np.ndarray, tf.Tensor, numbers.Number)) or (
        hasattr(value, "__array__") and hasattr(value, "shape")
    )


def _to_arrays(value: Any, name: str) -> Any:
    def convert(leaf: Any) -> np.ndarray:
        if isinstance(leaf, (tf.SparseTensor, tf.RaggedTensor)):
            raise TypeError(
                f"Sparse and ragged tensors in `{name}` are not supported by parameter-server fit; "
                f"pass a tf.data.Dataset. Received: {type(leaf).__name__}"
            )
        if not _is_array_like(leaf):
            raise TypeError(
                f"Expected `{name}` to hold NumPy arrays or tensors. Received: an element of type "
                f"{type(leaf).__name__}. Supported inputs under 'parameter_server': arrays (or "
                "dicts/lists of arrays), a tf.data.Dataset, or (for fit) a dataset_fn(input_context)."
            )
        array = np.asarray(leaf)
        if array.ndim == 0:
            raise ValueError(f"Expected `{name}` to have a batch dimension. Received: a scalar {array!r}")
        return array

    if isinstance(value, list):
        value = tuple(value)
    return tf.nest.map_structure(convert, value)


def _array_input(x: Any, y: Any, sample_weight: Any, batch_size: Any, *, what: str) -> _Arrays:
    parts = [("x", x)] + ([("y", y)] if y is not None else []) + (
        [("sample_weight", sample_weight)] if sample_weight is not None else []
    )
    if sample_weight is not None and y is None:
        raise ValueError(f"`sample_weight` needs `y` in {what}. Received: y=None")
    data = tuple(_to_arrays(value, name) for name, value in parts)
    counts = {leaf.shape[0] for leaf in tf.nest.flatten(data)}
    if len(counts) != 1:
        sizes = {name: sorted({leaf.shape[0] for leaf in tf.nest.flatten(value)}) for name, value in zip(
            [n for n, _ in parts], data)}
        raise ValueError(
            f"Expected all arrays of {what} to have the same number of examples. Received sizes {sizes}"
        )
    count = counts.pop()
    if count == 0:
        raise ValueError(f"Expected at least one example in {what}. Received: 0 examples")
    if batch_size is None:
        batch_size = _DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"Expected batch_size to be an int >= 1. Received: batch_size={batch_size!r}")
    return _Arrays(data, count, int(batch_size))


def _dataset_input(x: Any, y: Any, sample_weight: Any, batch_size: Any, *, what: str, allow_fn: bool) -> _Dataset | None:
    """A _Dataset for a tf.data.Dataset or dataset_fn `x`, None for arrays."""
    is_fn = callable(x) and not isinstance(x, tf.data.Dataset) and not _is_array_like(x)
    if not isinstance(x, tf.data.Dataset) and not is_fn:
        return None
    kind = "a tf.data.Dataset" if isinstance(x, tf.data.Dataset) else "a dataset_fn"
    for name, value in (("y", y), ("sample_weight", sample_weight), ("batch_size", batch_size)):
        if value is not None:
            shown = value if isinstance(value, (int, float)) else f"<{type(value).__name__}>"
            raise ValueError(
                f"`{name}` must not be given when `x` is {kind} (the dataset yields batches of "
                f"(x, y) or (x, y, sample_weight)). Received: {name}={shown}"
            )
    if is_fn:
        if not allow_fn:
            raise TypeError(
                f"{what} takes arrays or a tf.data.Dataset under 'parameter_server'; a "
                f"dataset_fn is accepted by fit only. Received: x={x!r}"
            )
        return _Dataset(None, x, None)
    return _Dataset(x, None, x.element_spec)


def _check_input_type(x: Any, what: str) -> None:
    if x is None:
        raise ValueError(f"Expected data for {what}. Received: x=None")
    if isinstance(x, keras.utils.PyDataset) or hasattr(x, "__next__"):
        raise TypeError(
            f"{what} under 'parameter_server' takes NumPy arrays/tensors, a tf.data.Dataset, or "
            "(fit only) a dataset_fn(input_context): a Python generator or keras.utils.PyDataset "
            "runs in this process and cannot be shipped to the workers. Wrap it with "
            f"tf.data.Dataset.from_generator only if the generator can run on every worker. "
            f"Received: x of type {type(x).__name__}"
        )


def _with_class_weight(dataset: tf.data.Dataset, class_weight: Mapping[int, float]) -> tf.data.Dataset:
    table = _class_weight_table(class_weight)

    def add(*element: Any) -> Any:
        if len(element) == 1 and isinstance(element[0], tuple):
            element = element[0]
        if len(element) != 2:
            raise ValueError(
                "class_weight needs a dataset of (x, y) batches. Received elements of "
                f"{len(element)} components."
            )
        x, y = element
        return x, y, _label_weights(y, table)

    return dataset.map(add)


def _class_weight_table(class_weight: Mapping[int, float]) -> tf.Tensor:
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise TypeError(f"Expected class_weight to be a non-empty dict {{class: weight}}. Received: {class_weight!r}")
    size = max(int(k) for k in class_weight) + 1
    weights = np.ones(size, dtype=np.float32)
    for key, value in class_weight.items():
        weights[int(key)] = float(value)
    return tf.constant(weights)


def _label_weights(y: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    y = tf.convert_to_tensor(y)
    if y.shape.rank is not None and y.shape.rank > 1 and (y.shape[-1] or 0) > 1:
        labels = tf.argmax(y, axis=-1)
    else:
        labels = tf.reshape(y, [-1])
    return tf.gather(table, tf.cast(labels, tf.int32))


def _array_class_weights(y: Any, class_weight: Mapping[int, float]) -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise ValueError(
            "class_weight needs `y` to be a single array of class labels (or one-hot rows). "
            f"Received: y of type {type(y).__name__}"
        )
    return _label_weights(tf.constant(y), _class_weight_table(class_weight)).numpy()


def _cardinality(dataset: tf.data.Dataset) -> int:
    return int(dataset.cardinality().numpy())


# =============================================================================================
# Per-model state: closures (tf.functions) and staleness variables
# =============================================================================================


class _Closures:
    """The tf.functions scheduled on workers for one compiled model (rebuilt after compile)."""

    def __init__(self, compiled: tuple[Any, ...]) -> None:
        self.compiled = compiled  # what compile() created; a new compile means new functions
        self.functions: dict[Any, Any] = {}

    def get(self, name: str, spec: Any, build: Callable[[], Callable[..., Any]]) -> Any:
        """The tf.function `name` for inputs of structure `spec` (built once per structure)."""
        key = (name, repr(spec))
        if key not in self.functions:
            self.functions[key] = tf.function(build(), autograph=False, reduce_retracing=True)
        return self.functions[key]


class _Staleness:
    """Parameter-server state for bounded staleness: per-worker step clocks and running flags."""

    def __init__(self, strategy: tf.distribute.Strategy, workers: int, bound: int) -> None:
        self.workers = workers
        self.bound = bound
        with strategy.scope():
            # Scalars are never partitioned; the vectors are colocated with the first scalar so
            # that a variable_partitioner does not shard them either.
            self.started = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfpar_started")
            with strategy.extended.colocate_vars_with(self.started):
                self.planned = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfpar_planned")
                self.clock = tf.Variable(tf.zeros([workers], tf.int64), trainable=False, name="tfpar_clock")
                self.running = tf.Variable(tf.zeros([workers], tf.int64), trainable=False, name="tfpar_running")

    def reset(self) -> None:
        self.started.assign(0)
        self.planned.assign(0)
        self.clock.assign(tf.zeros([self.workers], tf.int64))
        self.running.assign(tf.zeros([self.workers], tf.int64))

    def plan(self, closures: int) -> None:
        if closures:
            self.planned.assign_add(closures)

    # -- graph pieces (inside closures) ---------------------------------------------------------

    def enter(self) -> tf.Operation:
        return self.started.assign_add(1, read_value=False)

    def gate(self, worker: tf.Tensor) -> tf.Tensor:
        """Waits until `worker` may start a step; False when it must give the step back."""
        bound = tf.constant(self.bound, tf.int64)
        start = tf.timestamp()

        def decide() -> tuple[tf.Tensor, tf.Tensor]:
            clock = self.clock.read_value()
            mine = tf.gather(clock, worker)
            allowed = mine - tf.reduce_min(clock) <= bound
            unstarted = self.planned.read_value() - self.started.read_value()
            slower = tf.less(clock, mine - bound)
            slower_running = tf.reduce_any(tf.logical_and(slower, self.running.read_value() > 0))
            in_time = tf.timestamp() - start < _STALENESS_TIMEOUT_SECONDS
            wait = tf.logical_and(
                tf.logical_not(allowed),
                tf.logical_and(tf.logical_or(unstarted > 0, slower_running), in_time),
            )
            return allowed, wait

        def body(allowed: tf.Tensor, wait: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.control_dependencies([_sleep(_STALENESS_POLL_SECONDS)]):
                return decide()

        allowed, _ = tf.while_loop(lambda allowed, wait: wait, body, decide())
        return allowed

    def begin_step(self, worker: tf.Tensor) -> Any:
        return self.running.scatter_update(tf.IndexedSlices(tf.ones([1], tf.int64), tf.reshape(worker, [1])))

    def end_step(self, worker: tf.Tensor) -> Any:
        index = tf.reshape(worker, [1])
        ticked = self.clock.scatter_add(tf.IndexedSlices(tf.ones([1], tf.int64), index))
        with tf.control_dependencies([ticked]):
            return self.running.scatter_update(tf.IndexedSlices(tf.zeros([1], tf.int64), index))


def _sleep(seconds: float) -> tf.Tensor:
    """A graph op that sleeps on the device running it (a one-element SleepDataset)."""
    dataset = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    variant = tf.raw_ops.SleepDataset(
        input_dataset=tf.data.experimental.to_variant(dataset),
        sleep_microseconds=tf.constant(int(seconds * 1e6), tf.int64),
        output_types=[tf.int64],
        output_shapes=[tf.TensorShape([])],
    )
    return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.int64)).get_single_element()


class _Runner:
    """Everything one model needs to run on one ParameterServerStrategy."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.ParameterServerStrategy) -> None:
        self.model = model
        self.strategy = strategy
        self.coordinator = compat.coordinator(strategy)
        self.workers = compat.num_workers(strategy)
        self.options = options(strategy)
        self._closures: _Closures | None = None
        self.staleness: _Staleness | None = None
        if self.options.staleness is not None:
            self.staleness = _Staleness(strategy, self.workers, self.options.staleness)

    # -- closures ------------------------------------------------------------------------------

    def closures(self) -> _Closures:
        # The traced functions capture the optimizer, compiled loss and metrics: a model compiled
        # again gets freshly traced ones. (Keras's own train_function etc. are left alone, so
        # train_on_batch and friends keep working.)
        compiled = compat.compiled_state(self.model)
        current = self._closures
        if current is None or len(current.compiled) != len(compiled) or any(
            a is not b for a, b in zip(current.compiled, compiled)
        ):
            current = self._closures = _Closures(compiled)
        return current

    def reduce_mean(self, outputs: Any) -> Any:
        def reduce(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return tf.reduce_mean(tf.stack(self.strategy.experimental_local_results(value)), axis=0)
            return value

        return tf.nest.map_structure(reduce, outputs)

    def reduce_concat(self, outputs: Any) -> Any:
        def reduce(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return tf.concat(self.strategy.experimental_local_results(value), axis=0)
            return value

        return tf.nest.map_structure(reduce, outputs)

    def step(self, method: Callable[[Any], Any], data: Any, reduce: str = "mean") -> Any:
        outputs = self.strategy.run(method, args=(data,))
        return self.reduce_mean(outputs) if reduce == "mean" else self.reduce_concat(outputs)

    # -- worker-side step loops ------------------------------------------------------------------

    def run_steps(self, count: int, one_step: Callable[[tf.Tensor], Any], structure: Any = None) -> tuple[tf.Tensor, Any]:
        """Runs ``one_step(i)`` for i < count inside a closure; returns (steps run, last outputs).

        `count` is a Python int (part of the traced function, so nothing is sent per closure;
        there are at most two values: steps_per_execution and an epoch's remainder). With bounded
        staleness every step first passes the gate; `structure` (the step's output structure,
        from :meth:`output_structure`) gives the outputs of a closure that ran no step.
        """
        staleness = self.staleness if structure is not None else None
        optimizer = self.model.optimizer
        n = tf.constant(count, tf.int64)
        one = tf.constant(1, tf.int64)
        if staleness is None and count == 1:
            return one, one_step(tf.constant(0, tf.int64))
        if staleness is None:
            def body(i: tf.Tensor, outputs: Any) -> tuple[Any, ...]:
                return i + 1, one_step(i)

            first = one_step(tf.constant(0, tf.int64))
            _, outputs = tf.while_loop(
                lambda i, outputs: i < n, body, (one, first),
                shape_invariants=(tf.TensorShape([]), _relaxed(first)),
            )
            return n, outputs

        # experimental_get_current_worker_index() fails inside tf.cond branches ("You must feed a
        # value for placeholder tensor 'cond/then/...'"), so it is read here, at the top level,
        # and steps are made conditional with while loops that run at most once.
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()

        def accounted(i: tf.Tensor) -> Any:
            with tf.control_dependencies([staleness.begin_step(worker)]):
                outputs = one_step(i)
            # The clock ticks after the optimizer's last update of this step.
            after = [optimizer.iterations.value.read_value()] if optimizer is not None else []
            with tf.control_dependencies(tf.nest.flatten(outputs) + after):
                done = staleness.end_step(worker)
            with tf.control_dependencies([done]):
                return tf.nest.map_structure(tf.identity, outputs)

        with tf.control_dependencies([staleness.enter()]):
            go = staleness.gate(worker)
        shapes = _shapes(structure)
        first = _run_if(go, lambda: accounted(tf.constant(0, tf.int64)), _zeros(structure), shapes)

        def gated_body(i: tf.Tensor, ran: tf.Tensor, alive: tf.Tensor, outputs: Any) -> tuple[Any, ...]:
            go = staleness.gate(worker)
            outputs = _run_if(go, lambda: accounted(i), outputs, shapes)
            return i + 1, ran + tf.cast(go, tf.int64), go, outputs

        _, ran, _, outputs = tf.while_loop(
            lambda i, ran, alive, outputs: tf.logical_and(i < n, alive),
            gated_body,
            (one, tf.cast(go, tf.int64), go, first),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape([]), shapes),
        )
        return ran, outputs

    def output_structure(self, method: Callable[[Any], Any], data_spec: Any, reduce: str = "mean") -> Any:
        """The (shape, dtype) structure of ``step(method, batch)``, from a trace on the coordinator."""
        function = tf.function(lambda data: self.step(method, data, reduce), autograph=False)
        with compat.tracing_outside_schedule(self.strategy):
            concrete = function.get_concrete_function(data_spec)
        return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs)


def _relaxed(structure: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorShape(None), structure)


def _zeros(structure: Any) -> Any:
    """Zeros for a structure of TensorSpecs (unknown dimensions become 0)."""
    return tf.nest.map_structure(_zeros_of_spec, structure)


def _zeros_of_spec(spec: tf.TensorSpec) -> tf.Tensor:
    shape = spec.shape
    if shape.rank is None:
        return tf.zeros([], spec.dtype)
    return tf.zeros([d if d is not None else 0 for d in shape.as_list()], spec.dtype)


def _run_if(pred: tf.Tensor, function: Callable[[], Any], otherwise: Any, shapes: Any) -> Any:
    """``function()`` if `pred` else `otherwise`, as a while loop that runs at most once.

    (Not tf.cond: a step inside a cond branch cannot use
    tf.distribute.coordinator.experimental_get_current_worker_index().) `shapes` are the static
    shapes the result may have (TensorShapes, unknown dimensions as None).
    """
    def body(go: tf.Tensor, outputs: Any) -> tuple[Any, ...]:
        return tf.constant(False), function()

    _, result = tf.while_loop(
        lambda go, outputs: go, body, (pred, otherwise), shape_invariants=(tf.TensorShape([]), shapes)
    )
    return result


def _shapes(structure: Any) -> Any:
    return tf.nest.map_structure(lambda spec: spec.shape, structure)


_RUNNERS: "weakref.WeakKeyDictionary[keras.Model, _Runner]" = weakref.WeakKeyDictionary()


def _runner(model: keras.Model) -> _Runner:
    strategy = model.distribute_strategy
    runner = _RUNNERS.get(model)
    if runner is None or runner.strategy is not strategy:
        runner = _Runner(model, strategy)
        _RUNNERS[model] = runner
    return runner


# =============================================================================================
# Per-worker inputs
# =============================================================================================


class _WorkerArrays:
    """Arrays on every worker (an endless per-worker dataset of the whole arrays)."""

    def __init__(self, runner: _Runner, arrays: _Arrays) -> None:
        self.arrays = arrays
        data = arrays.data

        def dataset_fn() -> tf.data.Dataset:
            return tf.data.Dataset.from_tensors(tf.nest.map_structure(tf.constant, data)).repeat()

        # Keep the per-worker dataset as long as its iterator: when it is garbage-collected, its
        # functions are removed from the cluster, which waits for the running steps (measured:
        # 0.9 s of a 1.5 s epoch when that happened mid-epoch).
        self.dataset = runner.coordinator.create_per_worker_dataset(dataset_fn)
        self.iterator = iter(self.dataset)


def _gather(data: Any, indices: tf.Tensor) -> Any:
    return tf.nest.map_structure(lambda array: tf.gather(array, indices), data)


def _pack_closures(batches: list[np.ndarray], per_closure: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Groups index batches into fixed-shape closure arguments: (indices, splits, n)."""
    width = per_closure * batch_size
    packed = []
    for start in range(0, len(batches), per_closure):
        group = batches[start : start + per_closure]
        flat = np.concatenate(group)
        indices = np.zeros(width, dtype=np.int64)
        indices[: len(flat)] = flat
        splits = np.full(per_closure + 1, len(flat), dtype=np.int64)
        splits[: len(group) + 1] = np.concatenate([[0], np.cumsum([len(b) for b in group])])
        packed.append((indices, splits, len(group)))
    return packed


class _BatchStream:
    """Index batches for fit on arrays: passes over the data, continuing across epochs."""

    def __init__(self, arrays: _Arrays, shuffle: Any) -> None:
        self.arrays = arrays
        self.shuffle = shuffle
        self.pending: collections.deque[np.ndarray] = collections.deque()

    def take(self, count: int) -> list[np.ndarray]:
        out = []
        while len(out) < count:
            if not self.pending:
                self.pending.extend(self.arrays.shuffled_batches(self.shuffle))
            out.append(self.pending.popleft())
        return out


# =============================================================================================
# Callback dispatch
# =============================================================================================


def _needs_batch_logs(callback: keras.callbacks.Callback) -> bool:
    base = keras.callbacks.Callback
    if isinstance(callback, keras.callbacks.History):
        return False
    if isinstance(callback, keras.callbacks.ProgbarLogger):
        return getattr(callback, "verbose", 1) == 1
    kind = type(callback)
    return kind.on_train_batch_end is not base.on_train_batch_end or kind.on_batch_end is not base.on_batch_end


def _needs_test_batch_logs(callback: keras.callbacks.Callback) -> bool:
    base = keras.callbacks.Callback
    if isinstance(callback, keras.callbacks.History):
        return False
    if isinstance(callback, keras.callbacks.ProgbarLogger):
        return getattr(callback, "verbose", 1) == 1
    return type(callback).on_test_batch_end is not base.on_test_batch_end


class _Lagged:
    """Delivers batch-end callbacks in step order, with each step's fetched logs."""

    def __init__(self, deliver: Callable[[int, Any], None], window: int, active: bool) -> None:
        self.deliver = deliver
        self.window = window
        self.active = active
        self.queue: collections.deque[tuple[int, Any]] = collections.deque()
        self.last_logs: Any = None

    def push(self, end_step: int, remote: Any) -> None:
        if not self.active:
            self.deliver(end_step, {})
            return
        self.queue.append((end_step, remote))
        while len(self.queue) > self.window:
            self._pop()

    def _pop(self) -> None:
        end_step, remote = self.queue.popleft()
        ran, logs = remote.fetch()
        if int(ran) > 0:
            self.last_logs = logs
        self.deliver(end_step, self.last_logs if self.last_logs is not None else {})

    def drain(self) -> None:
        while self.queue:
            self._pop()


def _resolve_verbose(verbose: Any) -> Any:
    return 2 if verbose == "auto" else verbose


def _callback_list(model: keras.Model, callbacks: Any, *, verbose: Any, epochs: int, steps: Any,
                   add_history: bool) -> keras.callbacks.CallbackList:
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    return keras.callbacks.CallbackList(
        callbacks, add_history=add_history, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps, model=model,
    )


# =============================================================================================
# Error translation
# =============================================================================================


@dataclasses.dataclass
class _Progress:
    epoch: int = 0
    last_finished_epoch: int | None = None
    backup_dir: str | None = None


def _ps_error(error: BaseException, progress: _Progress) -> ParameterServerError | None:
    tasks = compat.failed_ps_tasks(error)
    if tasks is None:
        return None
    names = ", ".join(f"ps:{t}" for t in sorted(tasks)) or "a ps task"
    finished = (
        f"the last finished epoch is {progress.last_finished_epoch + 1}"
        if progress.last_finished_epoch is not None
        else "no epoch had finished"
    )
    if progress.backup_dir:
        resume = (
            f"A checkpoint to resume from is in {progress.backup_dir!r} (keras.callbacks."
            "BackupAndRestore, saved at each epoch end): restart the ps task and run the same "
            "script again; fit restores the weights, optimizer state and epoch from it."
        )
    else:
        resume = (
            "This fit had no keras.callbacks.BackupAndRestore callback, so there is no checkpoint "
            "to resume from: pass callbacks=[keras.callbacks.BackupAndRestore(backup_dir)] so that "
            "a restarted coordinator resumes at the last finished epoch."
        )
    return ParameterServerError(
        f"Parameter server {names} failed during epoch {progress.epoch + 1} ({finished}); the "
        f"variables it held are lost, so training stopped. {resume} TensorFlow reported: "
        f"{type(error).__name__}: {_first_line(error)}",
        ps_tasks=tuple(sorted(tasks)), epoch=progress.epoch,
        last_finished_epoch=progress.last_finished_epoch, backup_dir=progress.backup_dir,
    )


def _first_line(error: BaseException) -> str:
    """The most telling line of a (long, nested) TensorFlow error message."""
    text = str(getattr(error, "message", None) or error).strip()
    if not text:
        return "(no message)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("failed to connect", "Socket closed", "Connection reset", "Connection refused", "UNAVAILABLE"):
        for line in lines:
            if marker in line:
                return line[:400]
    return lines[0][:400]


def _translating(progress: _Progress, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except (tf.errors.OpError, RuntimeError) as error:
        if isinstance(error, ParameterServerError):
            raise
        translated = _ps_error(error, progress)
        if translated is None:
            raise
        raise translated from error


def _backup_dir(callbacks: keras.callbacks.CallbackList) -> str | None:
    for callback in callbacks.callbacks:
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            return str(callback.backup_dir)
    return None


# =============================================================================================
# fit
# =============================================================================================


def _fit(model: keras.Model, **kwargs: Any) -> keras.callbacks.History:
    progress = _Progress()
    with _collecting_garbage():
        return _translating(progress, lambda: _fit_loop(model, progress, **kwargs))


@contextlib.contextmanager
def _collecting_garbage() -> Iterator[None]:
    """Collects garbage first, while no step runs on the workers.

    Input pipelines and functions left over by earlier calls are removed from the cluster when
    they are garbage-collected, and removing a function waits for the steps running at the time
    (measured: 0.9 s for the per-worker pipeline of a 24 MB in-memory dataset). Collected here,
    that happens before this call schedules anything instead of stalling one of its epochs.
    """
    gc.collect()
    yield


def _check_positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected {name} to be an int >= 1{' or None' if allow_none else ''}. Received: {name}={value!r}")


def _fit_loop(
    model: keras.Model, progress: _Progress, *, x: Any, y: Any, batch_size: Any, epochs: int, verbose: Any,
    callbacks: Any, validation_split: float, validation_data: Any, shuffle: Any, class_weight: Any,
    sample_weight: Any, initial_epoch: int, steps_per_epoch: Any, validation_steps: Any,
    validation_batch_size: Any, validation_freq: Any,
) -> keras.callbacks.History:
    compat.assert_compiled(model, "fit")
    _check_input_type(x, "fit")
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    _check_positive_int("validation_steps", validation_steps)
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"Expected epochs to be an int >= 0. Received: epochs={epochs!r}")
    max_epochs = keras.config.max_epochs() if hasattr(keras.config, "max_epochs") else None
    if max_epochs and max_epochs < epochs:
        epochs = max_epochs
    if shuffle not in (True, False, "batch"):
        raise ValueError(f"Expected shuffle to be True, False or 'batch'. Received: shuffle={shuffle!r}")
    if not isinstance(validation_freq, (int, list)) or isinstance(validation_freq, bool):
        raise ValueError(
            f"Expected `validation_freq` to be a list or int. Received: validation_freq={validation_freq!r}"
        )

    dataset = _dataset_input(x, y, sample_weight, batch_size, what="fit", allow_fn=True)
    if dataset is not None and validation_split:
        raise ValueError(
            "validation_split works with arrays only (as in Keras); with a dataset pass "
            f"validation_data. Received: validation_split={validation_split!r}"
        )
    arrays = None
    if dataset is None:
        if class_weight is not None:
            if sample_weight is not None:
                raise ValueError(
                    "Arguments `sample_weight` and `class_weight` cannot be specified at the same "
                    f"time. Received: sample_weight={type(sample_weight).__name__}, class_weight={class_weight}"
                )
            sample_weight = _array_class_weights(np.asarray(y) if _is_array_like(y) else y, class_weight)
        arrays = _array_input(x, y, sample_weight, batch_size, what="fit")
        if validation_split and validation_data is None:  # as Keras: validation_data wins
            if not 0 < validation_split < 1:
                raise ValueError(f"Expected 0 < validation_split < 1. Received: validation_split={validation_split}")
            split = int(arrays.count * (1.0 - validation_split))
            if split < 1 or split >= arrays.count:
                raise ValueError(
                    f"validation_split={validation_split} of {arrays.count} examples leaves an empty "
                    "training or validation set."
                )
            head = tf.nest.map_structure(lambda a: a[:split], arrays.data)
            tail = tf.nest.map_structure(lambda a: a[split:], arrays.data)
            arrays = _Arrays(head, split, arrays.batch_size)
            validation_data = tail
    elif class_weight is not None:
        if dataset.dataset is not None:
            dataset = _Dataset(_with_class_weight(dataset.dataset, class_weight), None, None)
            dataset.element_spec = dataset.dataset.element_spec
        else:
            user_fn = dataset.dataset_fn
            dataset = _Dataset(None, lambda context: _with_class_weight(user_fn(context), class_weight), None)

    runner = _runner(model)
    strategy = runner.strategy
    if dataset is not None and dataset.dataset_fn is not None:
        dataset.element_spec = _probe_element_spec(runner, dataset.dataset_fn)

    if arrays is not None:
        if steps_per_epoch is None:
            steps_per_epoch = arrays.num_batches()
    else:
        if steps_per_epoch is None:
            if dataset.dataset is None:
                raise ValueError(
                    "fit with a dataset_fn needs steps_per_epoch: the dataset is built on each "
                    "worker, so the coordinator cannot count its batches. Received: steps_per_epoch=None"
                )
            size = _cardinality(dataset.dataset)
            if size < 0:
                state = "infinite" if size == tf.data.INFINITE_CARDINALITY else "of unknown size"
                raise ValueError(
                    f"The dataset passed to fit is {state}, so an epoch has no natural end: pass "
                    "steps_per_epoch (the number of steps, over all workers, per epoch). "
                    "Received: steps_per_epoch=None"
                )
            if size == 0:
                raise ValueError("The dataset passed to fit is empty (0 batches).")
            steps_per_epoch = size

    validation = None
    if validation_data is not None:
        validation = _eval_input(
            validation_data, None, None, validation_batch_size or batch_size, validation_steps,
            what="validation_data", tuple_data=True,
        )

    spec = arrays.spec() if arrays is not None else dataset.element_spec
    compat.symbolic_build(model, strategy, spec)
    closures = runner.closures()
    spe = int(model.steps_per_execution)
    staleness = runner.staleness

    if arrays is not None:
        worker_data = _WorkerArrays(runner, arrays)
        stream = _BatchStream(arrays, shuffle)
        train = closures.get("train_arrays", arrays.spec(), lambda: _train_arrays_fn(
            runner, runner.output_structure(model.train_step, arrays.spec()) if staleness is not None else None))
    else:
        per_worker = runner.coordinator.create_per_worker_dataset(_per_worker_dataset(runner, dataset))
        iterator = iter(per_worker)
        train = closures.get("train_dataset", dataset.element_spec, lambda: _train_dataset_fn(
            runner, runner.output_structure(model.train_step, dataset.element_spec) if staleness is not None else None))
    validator = _Evaluator(runner, validation, closures) if validation is not None else None

    verbose = _resolve_verbose(verbose)
    callbacks = _callback_list(model, callbacks, verbose=verbose, epochs=epochs, steps=steps_per_epoch,
                               add_history=True)
    progress.backup_dir = _backup_dir(callbacks)
    lagged_logs = any(_needs_batch_logs(c) for c in callbacks.callbacks)
    window = 2 * runner.workers + 1
    model.stop_training = False
    if staleness is not None:
        staleness.reset()

    callbacks.on_train_begin()
    initial_epoch = compat.take_initial_epoch(model, initial_epoch)
    training_logs = None
    logs: Any = {}
    for epoch in range(initial_epoch, epochs):
        progress.epoch = epoch
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        applied_before = compat.optimizer_steps(model.optimizer)
        lagged = _Lagged(callbacks.on_train_batch_end, window, lagged_logs)
        # RemoteValues are kept only when needed: dropping many at once makes the coordinator
        # delete their tensors on the workers in a burst (measured: +10% epoch time when all of an
        # epoch's were kept). Bounded staleness needs each closure's count of steps run.
        scheduled: list[tuple[Any, Any]] = []  # (remote, what it carried), with staleness only
        last_remote = remote = None
        if arrays is not None:
            plan = _pack_closures(stream.take(steps_per_epoch), spe, arrays.batch_size)
        else:
            plan = [min(spe, steps_per_epoch - s) for s in range(0, steps_per_epoch, spe)]
        if staleness is not None:
            staleness.plan(len(plan))
        step = 0
        for item in plan:
            size = item[2] if arrays is not None else item
            callbacks.on_train_batch_begin(step)
            if arrays is not None:
                indices, splits, n = item
                remote = runner.coordinator.schedule(
                    train, args=(worker_data.iterator, tf.constant(indices), tf.constant(splits), n)
                )
            else:
                remote = runner.coordinator.schedule(train, args=(iterator, item))
            if staleness is not None:
                scheduled.append((remote, item))
            last_remote = remote
            step += size
            lagged.push(step - 1, remote)
            if model.stop_training:
                break
        if staleness is not None and len(scheduled) < len(plan):
            staleness.plan(len(scheduled) - len(plan))
        remote = None
        runner.coordinator.join()
        lagged.drain()
        if staleness is not None:
            _reschedule_skipped(runner, train, scheduled, arrays, worker_data if arrays is not None else None,
                                iterator if arrays is None else None)
        last = lagged.last_logs
        if last is None and last_remote is not None:
            last = _last_run_logs(scheduled or [(last_remote, None)])
        last_remote = None
        logs = last if last is not None else {}
        epoch_logs = compat.metrics_result_or_logs(model, logs)
        applied_after = compat.optimizer_steps(model.optimizer)
        if applied_before is not None and applied_after is not None:
            epoch_logs["applied_steps"] = applied_after - applied_before
        if validator is not None and _should_eval(epoch, validation_freq):
            val_logs = validator.evaluate(callbacks, verbose)
            epoch_logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        training_logs = epoch_logs
        progress.last_finished_epoch = epoch
        if model.stop_training:
            break

    optimizer = model.optimizer
    if optimizer is not None and epochs > 0 and getattr(optimizer, "use_ema", False):
        optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=training_logs)
    return model.history


def _probe_element_spec(runner: _Runner, dataset_fn: Callable[..., Any]) -> Any:
    """The element structure of a dataset_fn's datasets, from a trace (nothing runs).

    Tracing (rather than calling) lets the function use
    tf.distribute.coordinator.experimental_get_current_worker_index(), which only works in a
    function, and keeps its pipeline from doing any work on the coordinator.
    """
    workers, replicas = runner.workers, runner.strategy.num_replicas_in_sync
    returned: dict[str, Any] = {}

    def trace() -> tf.Tensor:
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        returned["dataset"] = dataset_fn(tf.distribute.InputContext(workers, worker, replicas))
        return tf.constant(0)

    tf.function(trace, autograph=False).get_concrete_function()
    result = returned["dataset"]
    if not isinstance(result, tf.data.Dataset):
        raise TypeError(
            "Expected dataset_fn(input_context) to return a tf.data.Dataset. "
            f"Received: {type(result).__name__}"
        )
    return result.element_spec


def _should_eval(epoch: int, validation_freq: Any) -> bool:
    epoch += 1
    if isinstance(validation_freq, int):
        return epoch % validation_freq == 0
    return epoch in validation_freq


def _last_run_logs(scheduled: list[tuple[Any, Any]]) -> Any:
    for remote, _ in reversed(scheduled):
        ran, logs = remote.fetch()
        if int(ran) > 0:
            return logs
    return None


def _reschedule_skipped(runner: _Runner, train: Any, scheduled: list[tuple[Any, Any]], arrays: _Arrays | None,
                        worker_data: _WorkerArrays | None, iterator: Any) -> None:
    """Bounded staleness: re-runs the steps that closures gave back (until none is left)."""
    staleness = runner.staleness
    pending = scheduled
    while True:
        leftovers = []
        for remote, item in pending:
            ran = int(remote.fetch()[0])
            if arrays is not None:
                indices, splits, n = item
                if ran < n:
                    batches = [indices[splits[i] : splits[i + 1]] for i in range(ran, n)]
                    leftovers.extend(_pack_closures(batches, len(splits) - 1, arrays.batch_size))
            elif ran < item:
                leftovers.append(item - ran)
        if not leftovers:
            return
        staleness.plan(len(leftovers))
        pending = []
        for item in leftovers:
            if arrays is not None:
                indices, splits, n = item
                remote = runner.coordinator.schedule(
                    train, args=(worker_data.iterator, tf.constant(indices), tf.constant(splits), n)
                )
            else:
                remote = runner.coordinator.schedule(train, args=(iterator, item))
            pending.append((remote, item))
        runner.coordinator.join()


def _per_worker_dataset(runner: _Runner, dataset: _Dataset) -> Any:
    strategy = runner.strategy
    if dataset.dataset is not None:
        return strategy.experimental_distribute_dataset(dataset.dataset.repeat())
    user_fn = dataset.dataset_fn
    workers = runner.workers

    def per_worker_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        own = tf.distribute.InputContext(workers, worker, context.num_replicas_in_sync)
        return user_fn(own).repeat()

    return lambda: strategy.distribute_datasets_from_function(per_worker_fn)


def _train_arrays_fn(runner: _Runner, structure: Any) -> Callable[..., Any]:
    model = runner.model

    def train_arrays(iterator: Any, indices: tf.Tensor, splits: tf.Tensor, n: int) -> Any:
        data = next(iterator)

        def one_step(i: tf.Tensor) -> Any:
            batch = _gather(data, indices[splits[i] : splits[i + 1]])
            return runner.step(model.train_step, batch)

        return runner.run_steps(n, one_step, structure)

    return train_arrays


def _train_dataset_fn(runner: _Runner, structure: Any) -> Callable[..., Any]:
    model = runner.model

    def train_dataset(iterator: Any, n: int) -> Any:
        def one_step(i: tf.Tensor) -> Any:
            return runner.step(model.train_step, next(iterator))

        return runner.run_steps(n, one_step, structure)

    return train_dataset


# =============================================================================================
# evaluate (and validation)
# =============================================================================================


def _eval_input(x: Any, y: Any, sample_weight: Any, batch_size: Any, steps: Any, *, what: str,
                tuple_data: bool = False) -> _Arrays | _Dataset:
    """Arrays or a finite dataset for evaluate / predict / validation_data."""
    if tuple_data and not isinstance(x, tf.data.Dataset):
        if not isinstance(x, (tuple, list)) or not 1 <= len(x) <= 3:
            raise ValueError(
                "Expected validation_data to be a tuple (x, y) or (x, y, sample_weight), or a "
                f"tf.data.Dataset. Received: validation_data of type {type(x).__name__}"
            )
        x, y, sample_weight = (tuple(x) + (None, None))[:3]
    _check_input_type(x, what)
    dataset = _dataset_input(x, y, sample_weight, None if isinstance(x, tf.data.Dataset) and tuple_data else batch_size,
                             what=what, allow_fn=False)
    if dataset is None:
        arrays = _array_input(x, y, sample_weight, batch_size, what=what)
        if steps is not None:
            arrays = _Arrays(
                tf.nest.map_structure(lambda a: a[: steps * arrays.batch_size], arrays.data),
                min(arrays.count, steps * arrays.batch_size), arrays.batch_size,
            )
        return arrays
    source = dataset.dataset
    if steps is not None:
        source = source.take(steps)
    size = _cardinality(source)
    if size == tf.data.INFINITE_CARDINALITY:
        option = "validation_steps" if what == "validation_data" else "steps"
        raise ValueError(
            f"The {what} dataset is infinite, so it has no end to evaluate up to: pass {option} "
            f"(the number of batches to use). Received: {option}=None"
        )
    return _Dataset(source, None, source.element_spec)


class _Evaluator:
    """Runs test steps for evaluate / validation over arrays or a sharded dataset."""

    def __init__(self, runner: _Runner, data: _Arrays | _Dataset, closures: _Closures) -> None:
        self.runner = runner
        self.data = data
        self.closures = closures
        if isinstance(data, _Arrays):
            self.worker_data = _WorkerArrays(runner, data)
            self.function = closures.get("test_arrays", data.spec(), lambda: _test_arrays_fn(runner))
        else:
            enumerated = data.dataset.enumerate()
            self.per_worker = runner.coordinator.create_per_worker_dataset(
                runner.strategy.experimental_distribute_dataset(enumerated)
            )
            self.function = closures.get("test_dataset", enumerated.element_spec, lambda: _test_dataset_fn(runner, enumerated.element_spec))

    def num_batches(self) -> int | None:
        if isinstance(self.data, _Arrays):
            return self.data.num_batches()
        size = _cardinality(self.data.dataset)
        return size if size >= 0 else None

    def evaluate(self, callbacks: keras.callbacks.CallbackList, verbose: Any) -> dict[str, Any]:
        model = self.runner.model
        coordinator = self.runner.coordinator
        model.stop_evaluating = False
        callbacks.on_test_begin()
        model.reset_metrics()
        lagged = _Lagged(callbacks.on_test_batch_end, 2 * self.runner.workers + 1,
                         any(_needs_test_batch_logs(c) for c in callbacks.callbacks))
        last_logs = None
        if isinstance(self.data, _Arrays):
            spe = int(model.steps_per_execution)
            plan = _pack_closures(self.data.ordered_batches(), spe, self.data.batch_size)
            step = 0
            remote = None  # only the last RemoteValue is kept (see the note in _fit_loop)
            for indices, splits, n in plan:
                callbacks.on_test_batch_begin(step)
                remote = coordinator.schedule(
                    self.function,
                    args=(self.worker_data.iterator, tf.constant(indices), tf.constant(splits), n),
                )
                step += n
                lagged.push(step - 1, remote)
                if model.stop_evaluating:
                    break
            coordinator.join()
            lagged.drain()
            last_logs = lagged.last_logs if lagged.last_logs is not None else (remote.fetch()[1] if remote else None)
        else:
            self._evaluate_dataset(callbacks)
            last_logs = model.get_metrics_result()
        logs = compat.metrics_result_or_logs(model, last_logs if last_logs is not None else {})
        logs = {name: _python(value) for name, value in logs.items()}
        callbacks.on_test_end(logs)
        return logs

    def _evaluate_dataset(self, callbacks: keras.callbacks.CallbackList) -> None:
        coordinator = self.runner.coordinator
        iterator = iter(self.per_worker)
        workers = self.runner.workers
        exhausted: set[int] = set()
        step = 0
        while len(exhausted) < workers:
            remotes = []
            for _ in range(2 * workers):
                callbacks.on_test_batch_begin(step)
                remotes.append(coordinator.schedule(
                    self.function, args=(iterator, _EVAL_BATCHES_PER_CLOSURE)
                ))
            coordinator.join()
            for remote in remotes:
                count, done, worker = (int(v) for v in remote.fetch())
                if done:
                    exhausted.add(worker)
                step += count
                callbacks.on_test_batch_end(max(step - 1, 0), {})
            if self.runner.model.stop_evaluating:
                break


def _python(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _test_arrays_fn(runner: _Runner) -> Callable[..., Any]:
    model = runner.model

    def test_arrays(iterator: Any, indices: tf.Tensor, splits: tf.Tensor, n: int) -> Any:
        data = next(iterator)

        def one_step(i: tf.Tensor) -> Any:
            return runner.step(model.test_step, _gather(data, indices[splits[i] : splits[i + 1]]))

        return runner.run_steps(n, one_step)

    return test_arrays


def _test_dataset_fn(runner: _Runner, element_spec: Any) -> Callable[..., Any]:
    model = runner.model
    workers = runner.workers

    def test_dataset(iterator: Any, limit: tf.Tensor) -> Any:
        """Runs up to `limit` of this worker's batches; returns (count, exhausted, worker index)."""
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        empty = tf.nest.map_structure(_zeros_of_spec, element_spec)

        def body(count: tf.Tensor, done: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            optional = iterator.get_next_as_optional()
            has = optional.has_value()
            position, batch = tf.cond(has, optional.get_value, lambda: empty)
            mine = tf.logical_and(has, tf.equal(tf.math.floormod(tf.cast(position, tf.int64), workers), worker))

            def run() -> tf.Tensor:
                effects = tf.nest.flatten(runner.step(model.test_step, batch))
                with tf.control_dependencies(effects):
                    return tf.constant(1, tf.int64)

            ran = _run_if(mine, run, tf.constant(0, tf.int64), tf.TensorShape([]))
            return count + ran, tf.logical_not(has)

        count, done = tf.while_loop(
            lambda count, done: tf.logical_and(count < limit, tf.logical_not(done)),
            body,
            (tf.constant(0, tf.int64), tf.constant(False)),
        )
        return count, done, worker

    return test_dataset


def _evaluate(model: keras.Model, *, x: Any, y: Any, batch_size: Any, verbose: Any, sample_weight: Any, steps: Any,
              callbacks: Any, return_dict: bool) -> Any:
    progress = _Progress()

    def run() -> Any:
        compat.assert_compiled(model, "evaluate")
        _check_positive_int("steps", steps)
        data = _eval_input(x, y, sample_weight, batch_size, steps, what="evaluate")
        runner = _runner(model)
        compat.symbolic_build(model, runner.strategy, data.spec() if isinstance(data, _Arrays) else data.element_spec)
        evaluator = _Evaluator(runner, data, runner.closures())
        level = _resolve_verbose(verbose)
        callback_list = _callback_list(model, callbacks, verbose=level, epochs=1, steps=evaluator.num_batches(),
                                       add_history=False)
        logs = evaluator.evaluate(callback_list, level)
        return logs if return_dict else compat.flatten_metrics_in_order(model, logs)

    with _collecting_garbage():
        return _translating(progress, run)


# =============================================================================================
# predict
# =============================================================================================


def _predict(model: keras.Model, *, x: Any, batch_size: Any, verbose: Any, steps: Any, callbacks: Any) -> Any:
    progress = _Progress()
    with _collecting_garbage():
        return _translating(progress, lambda: _predict_loop(model, x, batch_size, verbose, steps, callbacks))


def _predict_loop(model: keras.Model, x: Any, batch_size: Any, verbose: Any, steps: Any, callbacks: Any) -> Any:
    _check_positive_int("steps", steps)
    if isinstance(x, (tuple, list)) and len(x) in (2, 3) and not isinstance(x, tf.data.Dataset):
        x = x[0] if isinstance(x, tuple) else x
    data = _eval_input(x, None, None, batch_size, steps, what="predict")
    runner = _runner(model)
    coordinator = runner.coordinator
    if isinstance(data, _Arrays):
        x_spec = data.spec()[0]
    else:
        x_spec, _, _ = keras.utils.unpack_x_y_sample_weight(data.element_spec)
    compat.build_for_predict(model, runner.strategy, x_spec)
    closures = runner.closures()
    level = 1 if verbose == "auto" else verbose
    callback_list = _callback_list(model, callbacks, verbose=level, epochs=1,
                                   steps=data.num_batches() if isinstance(data, _Arrays) else None, add_history=False)
    model.stop_predicting = False
    callback_list.on_predict_begin()
    outputs: list[Any] = []
    if isinstance(data, _Arrays):
        worker_data = _WorkerArrays(runner, data)
        function = closures.get("predict_arrays", data.spec(), lambda: _predict_arrays_fn(runner))
        remotes = []
        for step, indices in enumerate(data.ordered_batches()):
            callback_list.on_predict_batch_begin(step)
            padded = np.zeros(data.batch_size, dtype=np.int64)
            padded[: len(indices)] = indices
            remotes.append(coordinator.schedule(
                function, args=(worker_data.iterator, tf.constant(padded), tf.constant(len(indices), tf.int64))
            ))
        for step, remote in enumerate(remotes):
            batch_outputs = remote.fetch()
            outputs.append(batch_outputs)
            callback_list.on_predict_batch_end(step, {"outputs": batch_outputs})
            if model.stop_predicting:
                break
        coordinator.join()
    else:
        outputs = _predict_dataset(runner, data, closures, callback_list)
    callback_list.on_predict_end()
    if not outputs:
        raise ValueError("predict got no batches: the dataset is empty.")
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *outputs)


def _predict_arrays_fn(runner: _Runner) -> Callable[..., Any]:
    model = runner.model

    def predict_arrays(iterator: Any, indices: tf.Tensor, size: tf.Tensor) -> Any:
        data = next(iterator)
        return runner.step(model.predict_step, _gather(data, indices[:size]), reduce="concat")

    return predict_arrays


def _predict_dataset(runner: _Runner, data: _Dataset, closures: _Closures,
                     callback_list: keras.callbacks.CallbackList) -> list[Any]:
    coordinator = runner.coordinator
    per_worker = coordinator.create_per_worker_dataset(
        runner.strategy.experimental_distribute_dataset(data.dataset.enumerate())
    )
    iterator = iter(per_worker)
    function = closures.get("predict_dataset", data.dataset.element_spec, lambda: _predict_dataset_fn(runner, data.dataset.enumerate().element_spec))
    workers = runner.workers
    exhausted: set[int] = set()
    found: dict[int, Any] = {}
    while len(exhausted) < workers:
        remotes = [coordinator.schedule(function, args=(iterator,)) for _ in range(2 * workers)]
        coordinator.join()
        for remote in remotes:
            has, position, done, worker, batch_outputs = remote.fetch()
            if done:
                exhausted.add(int(worker))
            if has:
                found[int(position)] = batch_outputs
        if runner.model.stop_predicting:
            break
    ordered = []
    for step, position in enumerate(sorted(found)):
        callback_list.on_predict_batch_begin(step)
        ordered.append(found[position])
        callback_list.on_predict_batch_end(step, {"outputs": found[position]})
    return ordered


def _predict_dataset_fn(runner: _Runner, element_spec: Any) -> Callable[..., Any]:
    model = runner.model
    workers = runner.workers
    x_spec, _, _ = keras.utils.unpack_x_y_sample_weight(element_spec[1])
    structure = runner.output_structure(model.predict_step, (x_spec,), reduce="concat")

    def predict_dataset(iterator: Any) -> Any:
        """Predicts this worker's next own batch: (found, position, exhausted, worker, outputs)."""
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        empty = tf.nest.map_structure(_zeros_of_spec, element_spec)

        # Advance this worker's copy to its next own batch (position % workers == worker index).
        def body(found: tf.Tensor, done: tf.Tensor, element: Any) -> tuple[Any, ...]:
            optional = iterator.get_next_as_optional()
            has = optional.has_value()
            element = tf.cond(has, optional.get_value, lambda: empty)
            position = tf.cast(element[0], tf.int64)
            mine = tf.logical_and(has, tf.equal(tf.math.floormod(position, workers), worker))
            return mine, tf.logical_not(has), element

        found, done, element = tf.while_loop(
            lambda found, done, element: tf.logical_and(tf.logical_not(found), tf.logical_not(done)),
            body,
            (tf.constant(False), tf.constant(False), empty),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), tf.nest.map_structure(lambda s: s.shape, element_spec)),
        )

        def predict() -> Any:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(element[1])
            return runner.step(model.predict_step, (x,), reduce="concat")

        outputs = _run_if(found, predict, _zeros(structure), _shapes(structure))
        return found, tf.cast(element[0], tf.int64), done, worker, outputs

    return predict_dataset
