"""tfpar.horovod.keras checks on one process of a cluster (run by tests/test_horovod_keras.py).

Usage: ``python hvd_keras_checks.py OUT_DIR`` under ``tfpar.launch``; each rank writes
``OUT_DIR/rank<r>.json``. Every rank generates every rank's data (seeded by rank), so each rank
computes the single-process references itself.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tfpar.horovod.keras as hvd  # noqa: E402

hvd.init()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402
from tfpar.horovod import _engine, _state  # noqa: E402

OUT = sys.argv[1]
SIZE, RANK = hvd.size(), hvd.rank()
results = {}
errors = {}

# Every executed exchange (one TensorFlow collective per dtype) adds one, in eager code and in fit's graph.
EXCHANGES = tf.Variable(0, dtype=tf.int64, trainable=False)
_exchange = _engine.exchange


def counting_exchange(strategy, sum_groups, gathers):
    sums, gathered = _exchange(strategy, sum_groups, gathers)
    with tf.control_dependencies(tf.nest.flatten((sums, gathered))):
        EXCHANGES.assign_add(1)
    return sums, gathered


_engine.exchange = counting_exchange


def data(rank, n, seed=0):
    rng = np.random.default_rng(1000 * seed + rank)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (x @ np.arange(1, 6, dtype="float32")[:, None] / 5 + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def model_fn(seed=7):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])


def weights(model):
    return [w.astype("float64").tolist() for w in model.get_weights()]


# --- 1. k = 1: equal to tfpar.scope("multi_worker") fit on the same global batches ----------------
B, STEPS, EPOCHS = 8, 4, 3  # global batch, steps per epoch
local = B // SIZE
shards = [data(r, STEPS * local) for r in range(SIZE)]
# The global batch of step s: every rank's s-th local batch.
X = np.concatenate([np.concatenate([shards[r][0][s * local:(s + 1) * local] for r in range(SIZE)])
                    for s in range(STEPS)])
Y = np.concatenate([np.concatenate([shards[r][1][s * local:(s + 1) * local] for r in range(SIZE)])
                    for s in range(STEPS)])
model = model_fn()
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
EXCHANGES.assign(0)
history = model.fit(*shards[RANK], batch_size=local, epochs=EPOCHS, shuffle=False, verbose=0)
results["k1_exchanges"] = int(EXCHANGES.numpy())
results["k1_weights"] = weights(model)
results["k1_iterations"] = int(model.optimizer.iterations.numpy())
results["k1_class"] = [type(model.optimizer).__name__, isinstance(model.optimizer, keras.optimizers.SGD)]

with tfpar.scope(_state.strategy()):
    reference = model_fn()
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
reference.fit(X, Y, batch_size=B, epochs=EPOCHS, shuffle=False, verbose=0)
results["multi_worker_weights"] = weights(reference)

# Float64 single-process reference of the same steps (for the float32 noise of either run).
keras.config.set_floatx("float64")
exact = model_fn()
keras.config.set_floatx("float32")
exact.set_weights([w.astype("float64") for w in model_fn().get_weights()])
exact.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
exact.fit(X.astype("float64"), Y.astype("float64"), batch_size=B, epochs=EPOCHS, shuffle=False, verbose=0)
results["float64_weights"] = weights(exact)

# --- 2. backward_passes_per_step = 4: one all-reduce and one update per 4 local steps -------------
K, b = 4, 2  # passes per update, local batch
passes = 2 * K  # two updates per epoch
acc_shards = [data(r, passes * b, seed=1) for r in range(SIZE)]
model = model_fn()
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), backward_passes_per_step=K,
                                                 average_aggregated_gradients=True), loss="mse")
EXCHANGES.assign(0)
model.fit(*acc_shards[RANK], batch_size=b, epochs=2, shuffle=False, verbose=0)
results["k4_exchanges"] = int(EXCHANGES.numpy())
results["k4_iterations"] = int(model.optimizer.iterations.numpy())
results["k4_weights"] = weights(model)
# The reference: one plain SGD step per K passes on the K * b * SIZE examples of those passes.
plain = model_fn()
plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
for _epoch in range(2):
    for update in range(passes // K):
        rows = slice(update * K * b, (update + 1) * K * b)
        xb = np.concatenate([acc_shards[r][0][rows] for r in range(SIZE)])
        yb = np.concatenate([acc_shards[r][1][rows] for r in range(SIZE)])
        plain.train_on_batch(xb, yb)
results["k4_reference_weights"] = weights(plain)

# The same run with k = 1 counts K times the exchanges.
model = model_fn()
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
EXCHANGES.assign(0)
model.fit(*acc_shards[RANK], batch_size=b, epochs=2, shuffle=False, verbose=0)
results["k4_as_k1_exchanges"] = int(EXCHANGES.numpy())

# average_aggregated_gradients=False (Horovod's default): the K gradients are summed.
model = model_fn()
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1 / K), backward_passes_per_step=K),
              loss="mse")
model.fit(*acc_shards[RANK], batch_size=b, epochs=2, shuffle=False, verbose=0)
results["k4_sum_weights"] = weights(model)  # lr / K with the sum: the same update as the average


# --- 3. Callbacks ------------------------------------------------------------------------------
class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.lrs, self.logs, self.slots = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.slots.append([float(np.sum(v.numpy())) for v in getattr(self.model.optimizer, 'momentums', [])])

    def on_train_batch_end(self, batch, logs=None):
        self.slots[-1].append([float(np.sum(v.numpy())) for v in getattr(self.model.optimizer, 'momentums', [])])

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


x, y = data(RANK, 12, seed=2)
model = model_fn(seed=100 + RANK)  # different initial weights: the broadcast makes them rank 0's
initial0 = [w.tolist() for w in model_fn(seed=100).get_weights()]
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9)), loss="mse",
              metrics=["mae"])
before, after = Record(), Record()
broadcast = hvd.callbacks.BroadcastGlobalVariablesCallback(0)


class FirstWeights(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0 and not hasattr(self, "weights0"):
            self.weights0 = [w.tolist() for w in self.model.get_weights()]


first = FirstWeights()
warmup = hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.1, warmup_epochs=2)
model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
          callbacks=[broadcast, first, warmup, before, hvd.callbacks.MetricAverageCallback(), after])
results["broadcast_first_weights_are_rank0_initial"] = all(
    np.array_equal(np.asarray(a, "float32"), np.asarray(b, "float32")) for a, b in zip(first.weights0, initial0))
results["warmup_lrs"] = before.lrs
results["warmup_steps_per_epoch"] = warmup.steps_per_epoch
local_logs = hvd.allgather_object(before.logs)
results["metric_local_logs"] = local_logs
results["metric_averaged_logs"] = after.logs
results["callbacks_weights"] = weights(model)

schedule = hvd.callbacks.LearningRateScheduleCallback(initial_lr=0.1, multiplier=0.5, start_epoch=1)
record = Record()
model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[schedule, record])
results["schedule_lrs"] = record.lrs
results["schedule_slots"] = record.slots  # [sum at batch begin..., [sum at batch end]]

# --- 4. Saving: get_config round trip, hvd.load_model, plain keras loading --------------------------
opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.01), backward_passes_per_step=2)
clone = type(opt).from_config(opt.get_config())
results["from_config_distributed"] = [type(clone).__name__, type(clone) is type(opt),
                                      clone.get_config() == opt.get_config()]
model = model_fn()
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
path = os.path.join(OUT, "saved.keras")
if RANK == 0:
    model.save(path)
hvd.allreduce(0.0)  # a barrier: rank 0 has saved
loaded = hvd.load_model(path)
results["load_model"] = [type(loaded.optimizer).__name__, type(loaded.optimizer).__module__,
                         type(loaded.optimizer) is not keras.optimizers.Adam,
                         isinstance(loaded.optimizer, keras.optimizers.Adam),
                         int(loaded.optimizer.iterations.numpy()),
                         all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights()))]
EXCHANGES.assign(0)
loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)
results["load_model_exchanges"] = int(EXCHANGES.numpy())  # 3 steps, each all-reduced
results["load_model_weights"] = weights(loaded)
plain_loaded = keras.models.load_model(path)
results["plain_load"] = [type(plain_loaded.optimizer) is keras.optimizers.Adam,
                         int(plain_loaded.optimizer.iterations.numpy())]

# --- 5. Errors ------------------------------------------------------------------------------------
attempts = {
    "string_optimizer": lambda: hvd.DistributedOptimizer("adam"),
    "op_max": lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(), op=hvd.Max),
    "passes_zero": lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(), backward_passes_per_step=0),
    "twice": lambda: hvd.DistributedOptimizer(hvd.DistributedOptimizer(keras.optimizers.SGD())),
    "global_variables": lambda: hvd.broadcast_global_variables(0),
}
for name, attempt in attempts.items():
    try:
        attempt()
    except (TypeError, ValueError, NotImplementedError) as error:
        errors[name] = f"{type(error).__name__}: {error}"
    else:
        errors[name] = "no error"

with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as handle:
    json.dump({"results": results, "errors": errors}, handle)
print(f"rank {RANK} of {SIZE}: {len(results)} results written", flush=True)
