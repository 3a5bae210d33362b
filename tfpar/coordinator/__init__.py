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

Correctness under concurrent workers (the ``atomic-counters`` interception, docs/interceptions.md): the step counter
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
to add it). The workers may keep running: creating the strategy waits (up to a minute, with a
warning) until every worker reaches every ps task, because a worker's connection to a ps that was
just down keeps failing for a moment after the ps is back.

Example:
    import tfpar
    cluster = tfpar.local_cluster(workers=2, ps=1)        # or "tf_config" under tfpar launch
    with tfpar.scope("parameter_server", cluster=cluster, staleness=None):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=3, validation_split=0.1)

Modules (imports flow down this list, each from the ones above it): ``_common`` (constants,
:class:`ParameterServerError`, :func:`options`, binding Keras's arguments), ``_inputs`` (arrays,
datasets, class weights), ``_runner`` (per-model closures, staleness variables), ``_worker_inputs``
(arrays gathered on the workers), ``_callbacks`` (callback dispatch, error translation),
``_evaluate`` (evaluate and validation), ``_arguments`` (fit's arguments, checked and converted),
``_sources`` (what an epoch schedules, for arrays or a dataset), ``_fit`` (the epoch loop),
``_predict``, ``_reach`` (waiting until every worker reaches every ps), ``_patches`` (the
parameter-server interceptions, among them the one that hands Keras's ``fit`` / ``evaluate`` /
``predict`` to the loops), ``_strategy`` (the strategy factory and :func:`enable`, which installs
them).
"""

from __future__ import annotations

from tfpar.coordinator._common import (
    DEFAULT_MIN_SHARD_BYTES,  # noqa: F401 - the default shard size, re-exported
    VARIABLE_PARTITIONERS,
    ParameterServerError,
    ParameterServerOptions,
    options,
)
from tfpar.coordinator._strategy import enable, parameter_server_strategy

__all__ = [
    "ParameterServerError",
    "ParameterServerOptions",
    "VARIABLE_PARTITIONERS",
    "enable",
    "options",
    "parameter_server_strategy",
]

for _public in (ParameterServerError, ParameterServerOptions, enable, options, parameter_server_strategy):
    _public.__module__ = __name__  # shown as tfpar.coordinator.X, where users import it from
del _public
