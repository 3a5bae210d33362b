"""Child process for tests/test_parameter_server.py: Keras fit/evaluate/predict under tfpar's
parameter_server strategy on an in-process cluster (tfpar.local_cluster), one scenario per run.

Usage: ps_fit_checks.py SCENARIO OUT_JSON
Scenarios: core, callbacks, partition, staleness, errors. Each writes OUT_JSON with what the test
asserts on. In-process servers cannot be shut down and ParameterServerStrategy writes environment
variables, hence a process per scenario.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402
from tfpar import coordinator  # noqa: E402

SCENARIO, OUT = sys.argv[1], sys.argv[2]
RESULT: dict = {}
N = 200  # examples in the array data


def strategy_for(cluster, **options):
    return tfpar.get_strategy(coordinator.parameter_server_strategy(cluster, **options))


def data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 8)).astype("float32")
    x = np.concatenate([np.arange(n, dtype="float32")[:, None], features], axis=1)  # column 0: example id
    y = (features[:, 0] + features[:, 1] > 0).astype("int64")
    return x, y


class CountSeen(keras.layers.Layer):
    """Counts how often each example id (column 0) is trained on, with Keras's assign_add."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def build(self, shape):
        self.seen = self.add_weight(shape=(self.n,), initializer="zeros", trainable=False, name="seen")

    def call(self, x, training=False):
        if training:
            ids = tf.cast(x[:, 0], tf.int32)
            self.seen.assign_add(tf.math.bincount(ids, minlength=self.n, maxlength=self.n, dtype=tf.float32))
        return x[:, 1:]


def classifier(n=N, seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((9,)), CountSeen(n), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
    )


def compile_model(model, spe=1, optimizer=None):
    # Optimizers (and so compile) belong to the strategy the model was built under.
    with model.distribute_strategy.scope() if model.distribute_strategy is not tf.distribute.get_strategy() else _nothing():
        _compile(model, spe, optimizer)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _compile(model, spe, optimizer):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=spe,
    )


def local_copy(model, n=N):
    """The same model outside any strategy, with the same weights."""
    copy = classifier(n)
    compile_model(copy)
    copy.build((None, 9))
    copy.set_weights(model.get_weights())
    return copy


def seen(model):
    return model.layers[0].seen.numpy().tolist()


# ---------------------------------------------------------------------------------------------


def core():
    strategy = strategy_for(tfpar.local_cluster(workers=2, ps=1))
    x, y = data()
    with tfpar.scope(strategy):
        model = classifier()
        compile_model(model)
    history = model.fit(x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0)
    train_n = int(N * 0.75)
    RESULT["fit"] = {
        "history": history.history,
        "seen": seen(model),
        "train_n": train_n,
        "iterations": int(model.optimizer.iterations.numpy()),
        "steps_per_epoch": -(-train_n // 16),
        # The loss tracker counts examples; after fit it holds the last epoch's count.
        "loss_count": float(model.metrics[0].count.numpy()),
        "variable_devices": sorted({v.value.device for v in model.weights}),
        "strategy": type(strategy).__name__,
        "in_scope_strategy_is_model_strategy": model.distribute_strategy is strategy,
    }
    # evaluate / predict on arrays and on a dataset, against the same weights outside any strategy.
    local = local_copy(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
    RESULT["evaluate"] = {
        "arrays": model.evaluate(x, y, batch_size=24, verbose=0, return_dict=True),
        "arrays_list": model.evaluate(x, y, batch_size=24, verbose=0),
        "dataset": model.evaluate(dataset, verbose=0, return_dict=True),
        "steps": model.evaluate(dataset, steps=3, verbose=0, return_dict=True),
        "local": local.evaluate(x, y, batch_size=24, verbose=0, return_dict=True),
        "local_steps": local.evaluate(x[:72], y[:72], batch_size=24, verbose=0, return_dict=True),
        "metric_names": model.metrics_names,
    }
    expected = local.predict(x, verbose=0)
    RESULT["predict"] = {
        "arrays_diff": float(np.abs(model.predict(x, batch_size=24, verbose=0) - expected).max()),
        "dataset_diff": float(np.abs(model.predict(dataset, verbose=0) - expected).max()),
        "dataset_xy_shape": list(model.predict(dataset.map(lambda a, b: a), verbose=0).shape),
        "steps_shape": list(model.predict(x, batch_size=24, steps=2, verbose=0).shape),
    }
    # steps_per_execution: 3 steps per closure; 150 examples / 16 = 10 steps (the last one short).
    before = np.array(seen(model))
    compile_model(model, spe=3)
    history = model.fit(x[:150], y[:150], batch_size=16, epochs=2, shuffle=False, verbose=0)
    spe_local = local_copy(model)
    train_count = float(model.metrics[0].count.numpy())  # the last training epoch's examples
    RESULT["spe"] = {
        "train_loss_count": train_count,
        "evaluate": model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True),  # 13 batches: 3+3+3+3+1
        "evaluate_local": spe_local.evaluate(x, y, batch_size=16, verbose=0, return_dict=True),
        "loss_count": float(model.metrics[0].count.numpy()),  # the last evaluate's examples, each once
        "iterations": int(model.optimizer.iterations.numpy()),
        "applied_steps": history.history["applied_steps"],
        "seen_delta": (np.array(seen(model)) - before).tolist(),
    }
    # A finite dataset: one epoch = its number of batches (cardinality).
    compile_model(model)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(N).batch(20)
    validation = tf.data.Dataset.from_tensor_slices((x[:90], y[:90])).batch(20)  # 5 batches, the last of 10
    history = model.fit(ds, epochs=2, verbose=0, validation_data=validation)
    RESULT["dataset_fit"] = {"applied_steps": history.history["applied_steps"], "cardinality": 10,
                             "iterations": int(model.optimizer.iterations.numpy()),
                             "val_loss": history.history["val_loss"][-1],
                             "val_loss_local": local_copy(model).evaluate(x[:90], y[:90], verbose=0)[0]}
    # A dataset_fn, called per worker with num_input_pipelines = 2 and this worker's index.
    contexts = []

    def dataset_fn(context):
        contexts.append((context.num_input_pipelines, type(context.input_pipeline_id).__name__))
        ids = tf.data.Dataset.from_tensor_slices((x, y))
        return ids.shard(context.num_input_pipelines, context.input_pipeline_id).batch(16)

    compile_model(model)
    before = np.array(seen(model))
    history = model.fit(dataset_fn, steps_per_epoch=6, epochs=1, verbose=0)
    RESULT["dataset_fn"] = {
        "contexts": contexts,
        "seen_delta": (np.array(seen(model)) - before).tolist(),
        "applied_steps": history.history["applied_steps"],
    }
    # Confusion-matrix metrics accumulate with v.assign(v + delta) (P2 makes that atomic too):
    # 50 closures of 4 examples on 2 workers must count every example once.
    with tfpar.scope(strategy):
        keras.utils.set_random_seed(4)
        binary = keras.Sequential([keras.Input((9,)), keras.layers.Dense(1, activation="sigmoid")])
        binary.compile(optimizer="sgd", loss="binary_crossentropy", metrics=[
            keras.metrics.TruePositives(name="tp"), keras.metrics.FalsePositives(name="fp"),
            keras.metrics.TrueNegatives(name="tn"), keras.metrics.FalseNegatives(name="fn"),
            keras.metrics.AUC(name="auc")])
    binary_local = keras.Sequential([keras.Input((9,)), keras.layers.Dense(1, activation="sigmoid")])
    binary_local.compile(optimizer="sgd", loss="binary_crossentropy", metrics=[
        keras.metrics.TruePositives(name="tp"), keras.metrics.FalsePositives(name="fp"),
        keras.metrics.TrueNegatives(name="tn"), keras.metrics.FalseNegatives(name="fn"),
        keras.metrics.AUC(name="auc")])
    binary_local.set_weights(binary.get_weights())
    RESULT["confusion"] = {
        "ps": binary.evaluate(x, y, batch_size=4, verbose=0, return_dict=True),
        "local": binary_local.evaluate(x, y, batch_size=4, verbose=0, return_dict=True),
    }
    # class_weight on arrays: a zero weight for class 1 makes its examples contribute nothing.
    compile_model(model)
    weights_before = [w.copy() for w in model.get_weights()]
    only_ones = y == 1
    model.fit(x[only_ones], y[only_ones], batch_size=16, epochs=1, class_weight={0: 1.0, 1: 0.0}, verbose=0)
    RESULT["class_weight_max_change"] = max(
        float(np.abs(a - b).max()) for a, b in zip(model.get_weights()[1:], weights_before[1:])
    )


# ---------------------------------------------------------------------------------------------


class Recorder(keras.callbacks.Callback):
    """Records batch- and epoch-level calls with the logs it got."""

    def __init__(self):
        super().__init__()
        self.events = []

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(["epoch_begin", epoch, None])

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(["batch_begin", batch, None])

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(["batch_end", batch, {k: float(v) for k, v in (logs or {}).items()}])

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(["epoch_end", epoch, sorted(logs)])

    def on_test_begin(self, logs=None):
        self.events.append(["test_begin", None, None])


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError(f"interrupted at epoch {epoch}")


def callbacks():
    strategy = strategy_for(tfpar.local_cluster(workers=2, ps=1))
    x, y = data()
    directory = tempfile.mkdtemp()
    with tfpar.scope(strategy):
        model = classifier()
        compile_model(model)
    recorder = Recorder()
    checkpoint = os.path.join(directory, "best.keras")
    history = model.fit(
        x, y, batch_size=20, epochs=6, validation_data=(x[:60], y[:60]), verbose=0,
        callbacks=[
            recorder,
            keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=100.0),
            keras.callbacks.TensorBoard(os.path.join(directory, "tb")),
            keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        ],
    )
    restored = keras.models.load_model(checkpoint, custom_objects={"CountSeen": CountSeen})
    with open(os.path.join(directory, "log.csv")) as handle:
        csv_rows = handle.read().strip().splitlines()
    RESULT["fit"] = {
        "epochs_run": len(history.history["loss"]),
        "history_keys": sorted(history.history),
        "events": recorder.events,
        "csv_rows": csv_rows,
        "tensorboard": sorted(os.listdir(os.path.join(directory, "tb"))),
        "tensorboard_files": sum(len(files) for _, _, files in os.walk(os.path.join(directory, "tb"))),
        "checkpoint_predict_diff": float(np.abs(restored.predict(x, verbose=0) - model.predict(x, verbose=0)).max()),
    }
    # verbose=2 progress output goes through Keras's ProgbarLogger (one line per epoch).
    # BackupAndRestore: a fit interrupted at epoch 2 resumes there (epoch granularity).
    backup = os.path.join(directory, "backup")
    with tfpar.scope(strategy):
        resumed = classifier()
        compile_model(resumed)
    try:
        resumed.fit(x, y, batch_size=20, epochs=4, verbose=0,
                    callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(2)])
        interrupted = None
    except RuntimeError as error:
        interrupted = str(error)
    iterations_at_interrupt = int(resumed.optimizer.iterations.numpy())
    with tfpar.scope(strategy):
        fresh = classifier(seed=11)  # different initial weights: the backup must overwrite them
        compile_model(fresh)
    second = Recorder()
    history = fresh.fit(x, y, batch_size=20, epochs=4, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), second])
    RESULT["backup"] = {
        "interrupted": interrupted,
        "iterations_at_interrupt": iterations_at_interrupt,
        "resumed_epochs": [e[1] for e in second.events if e[0] == "epoch_begin"],
        "history_len": len(history.history["loss"]),
        "iterations_after": int(fresh.optimizer.iterations.numpy()),
        "backup_removed": not os.path.exists(backup),
    }


# ---------------------------------------------------------------------------------------------


def embedding_model(vocabulary, seed=5):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((3,), dtype="int64"),
        keras.layers.Embedding(vocabulary, 8, name="embedding"),
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="dense"),
    ])


def shard_devices(variable):
    value = variable.value
    parts = getattr(value, "variables", None)
    return [v.device for v in parts] if parts is not None else [value.device]


def gather_ops(function, *args):
    graph = function.get_concrete_function(*args).graph
    ops = [op.type for op in graph.get_operations()]
    for inner in graph._functions.values():  # noqa: SLF001  (nested function bodies)
        ops += [node.op for node in inner.definition.node_def]
    return ops


def partition():
    cluster = tfpar.local_cluster(workers=2, ps=2)
    vocabulary = 2000
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocabulary, (96, 3))
    y = (ids[:, 0] % 2).astype("int64")
    for name, options in [("min_size", {"variable_partitioner": "min_size", "min_shard_bytes": 4096}),
                          ("fixed3", {"variable_partitioner": 3})]:
        strategy = strategy_for(cluster, **options)
        if name == "min_size":
            from tfpar.coordinator import _reach, _strategy

            RESULT["reach"] = {
                "checked_when_created": strategy in _strategy._CONNECTED,
                "failed_calls_per_worker": _reach.wait_until_workers_reach_ps(cluster.cluster_spec().as_dict()),
            }
        with tfpar.scope(strategy):
            model = embedding_model(vocabulary)
            model.compile(optimizer=keras.optimizers.Adam(0.05),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.build((None, 3))
        initial = model.get_weights()
        local = embedding_model(vocabulary)
        local.compile(optimizer=keras.optimizers.Adam(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        local.build((None, 3))
        local.set_weights(initial)
        # 6 steps of 16 in one closure: one worker runs them in order, so the result is
        # deterministic and must equal training the same model in one process.
        with tfpar.scope(strategy):
            model.compile(optimizer=keras.optimizers.Adam(0.05), steps_per_execution=6,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(ids, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        local.fit(ids, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        embedding, kernel = model.get_layer("embedding").embeddings, model.get_layer("dense").kernel
        slots = [v for v in model.optimizer.variables if "embedding" in v.path]
        path = os.path.join(tempfile.mkdtemp(), "w.weights.h5")
        model.save_weights(path)
        reloaded = embedding_model(vocabulary, seed=9)
        reloaded.build((None, 3))
        reloaded.load_weights(path)
        lookup = tf.function(lambda batch: model(batch))  # noqa: B023 -- traced and used in this iteration only
        RESULT[name] = {
            "embedding_shards": shard_devices(embedding),
            "kernel_shards": shard_devices(kernel),
            "slot_shards": [shard_devices(v) for v in slots],
            "max_diff_from_one_process": max(
                float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), local.get_weights())
            ),
            "moved": max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), initial)),
            "reload_diff": float(np.abs(reloaded.predict(ids, verbose=0) - local.predict(ids, verbose=0)).max()),
            "iterations": int(model.optimizer.iterations.numpy()),
            "forward_ops": sorted(set(op for op in gather_ops(lookup, tf.constant(ids[:4])) if "Gather" in op or op == "ConcatV2")),
        }


# ---------------------------------------------------------------------------------------------


class Probe(keras.layers.Layer):
    """Independent step counters: counts started steps per worker, records each worker's largest
    lead over the slowest when it starts a step, and makes worker 1 slow."""

    def __init__(self, workers, **kwargs):
        super().__init__(**kwargs)
        self.workers = workers

    def build(self, shape):
        self.count = self.add_weight(shape=(self.workers,), initializer="zeros", trainable=False,
                                     dtype="int64", name="count")
        self.lead = self.add_weight(shape=(self.workers,), initializer="zeros", trainable=False,
                                    dtype="int64", name="lead")

    def call(self, x, training=False):
        if not training:
            return x
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        index = tf.reshape(worker, [1])
        started = self.count.value.scatter_add(tf.IndexedSlices(tf.ones([1], tf.int64), index))
        with tf.control_dependencies([started]):
            counts = self.count.value.read_value()
        lead = tf.gather(counts, worker) - tf.reduce_min(counts)
        recorded = self.lead.value.scatter_max(tf.IndexedSlices(tf.reshape(lead, [1]), index))
        matrix = tf.random.stateless_normal([300, 300], seed=[1, 2]) + tf.reduce_sum(x) * 0.0
        products = tf.where(tf.equal(worker, 1), 25, 0)
        slow = tf.while_loop(lambda i, m: i < products, lambda i, m: (i + 1, tf.linalg.normalize(m @ m)[0]),
                             (tf.constant(0), matrix))[1]
        with tf.control_dependencies([recorded]):
            return x + tf.reduce_sum(slow) * 0.0


def staleness():
    cluster = tfpar.local_cluster(workers=2, ps=1)
    x, y = data(n=480)
    for name, bound, spe in [("async", None, 1), ("k0", 0, 1), ("k2", 2, 1), ("k1_spe3", 1, 3)]:
        strategy = strategy_for(cluster, staleness=bound)
        with tfpar.scope(strategy):
            probe = Probe(2)
            model = keras.Sequential([keras.Input((9,)), probe, keras.layers.Dense(2)])
            model.compile(optimizer=keras.optimizers.SGD(0.05), steps_per_execution=spe,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        RESULT[name] = {
            "staleness": coordinator.options(strategy).staleness,
            "counts": probe.count.numpy().tolist(),
            "lead": probe.lead.numpy().tolist(),
            "iterations": int(model.optimizer.iterations.numpy()),
            "applied_steps": history.history["applied_steps"],
            "scheduled": 2 * 30,
        }


# ---------------------------------------------------------------------------------------------


def error_of(function):
    try:
        function()
    except Exception as error:  # noqa: BLE001  (the test asserts on type and message)
        return [type(error).__name__, str(error)]
    return None


def errors():
    resolver = tfpar.local_cluster(workers=2, ps=1)
    strategy = strategy_for(resolver)
    x, y = data()
    with tfpar.scope(strategy):
        model = classifier()
        compile_model(model)
    infinite = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()

    def generator():
        while True:
            yield x[:16], y[:16]

    RESULT["infinite_fit"] = error_of(lambda: model.fit(infinite, epochs=1, verbose=0))
    RESULT["dataset_fn_fit"] = error_of(lambda: model.fit(lambda context: infinite, epochs=1, verbose=0))
    RESULT["generator_fit"] = error_of(lambda: model.fit(generator(), epochs=1, verbose=0))
    RESULT["dataset_with_y"] = error_of(lambda: model.fit(infinite, y, steps_per_epoch=2, verbose=0))
    RESULT["infinite_evaluate"] = error_of(lambda: model.evaluate(infinite, verbose=0))
    RESULT["dataset_fn_evaluate"] = error_of(lambda: model.evaluate(lambda context: infinite, verbose=0))
    RESULT["mismatched_lengths"] = error_of(lambda: model.fit(x, y[:-1], epochs=1, verbose=0))
    RESULT["uncompiled"] = error_of(lambda: make_uncompiled(strategy).fit(x, y, verbose=0))
    # A user error inside the step (labels out of range) surfaces from the workers; no hang.
    RESULT["step_error"] = error_of(lambda: model.fit(x, y + 5, epochs=1, verbose=0))
    # Training still works after that error.
    history = model.fit(infinite, steps_per_epoch=4, epochs=1, verbose=0)
    RESULT["after_error_applied"] = history.history["applied_steps"]
    # Keras's *_on_batch methods keep working next to tfpar's fit (they run on the coordinator).
    RESULT["train_on_batch_after_fit"] = sorted(model.train_on_batch(x[:10], y[:10], return_dict=True))
    # A ParameterServerStrategy made by hand and handed to tfpar (what tfpar.get_strategy does).
    instance = tfpar.get_strategy(tf.distribute.ParameterServerStrategy(resolver))
    coordinator.enable(instance)
    with tfpar.scope(instance):
        handed = classifier()
        compile_model(handed)
    RESULT["instance_fit"] = handed.fit(x, y, batch_size=50, epochs=2, verbose=0).history["applied_steps"]
    # Upstream Keras under a ParameterServerStrategy tfpar does not manage.
    plain = tf.distribute.ParameterServerStrategy(resolver)
    with plain.scope():
        upstream = classifier()
        compile_model(upstream)
    RESULT["upstream_fit"] = error_of(lambda: upstream.fit(x, y, epochs=1, verbose=0))


def make_uncompiled(strategy):
    with tfpar.scope(strategy):
        return classifier()


{"core": core, "callbacks": callbacks, "partition": partition, "staleness": staleness, "errors": errors}[SCENARIO]()
with open(OUT, "w") as handle:
    json.dump(RESULT, handle)
print("done", SCENARIO, file=sys.stderr)
