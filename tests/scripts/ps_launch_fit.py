"""The coordinator (chief) of a parameter-server job under `tfpar launch --workers N --ps M`.

Usage: ps_launch_fit.py OUT_JSON [--epochs E] [--examples N] [--slow PRODUCTS] [--backup DIR]
                        [--mark-epoch K] [--dataset] [--staleness K] [--wait-file PATH]

Trains a small classifier with Keras `model.fit` under tfpar's parameter_server strategy (the
cluster comes from TF_CONFIG), then evaluates and predicts, and writes OUT_JSON with the history,
the optimizer's step counter, how many steps were scheduled, the model's predictions and where the
variables live. With --mark-epoch K it prints "MARK epoch K" (flushed) when epoch K begins, so a
test can kill a task while that epoch's steps run. With --slow each training step also multiplies
matrices (on the worker), so that epochs take a while. With --wait-file the process waits for
that file before it exits normally (after a worker failure, that exit is what used to hang).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402
from tfpar import coordinator  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--examples", type=int, default=256)
parser.add_argument("--slow", type=int, default=0, help="matrix products per training step")
parser.add_argument("--backup", default=None)
parser.add_argument("--mark-epoch", type=int, default=None)
parser.add_argument("--dataset", action="store_true", help="train on a tf.data.Dataset instead of arrays")
parser.add_argument("--staleness", type=int, default=None)
parser.add_argument("--wait-file", default=None, help="before exiting, wait (<= 60 s) for this file")
args = parser.parse_args()


class Slow(keras.layers.Layer):
    """Identity that also multiplies matrices while training (on whichever worker runs the step)."""

    def call(self, x, training=False):
        if not training or not args.slow:
            return x
        matrix = tf.random.stateless_normal([256, 256], seed=[1, 2]) + tf.reduce_sum(x) * 0.0
        for _ in range(args.slow):
            matrix = tf.linalg.normalize(matrix @ matrix)[0]
        return x + tf.reduce_sum(matrix) * 0.0


class Mark(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == args.mark_epoch:
            print(f"MARK epoch {epoch}", flush=True)


rng = np.random.default_rng(0)
x = rng.normal(size=(args.examples, 8)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int64")
strategy = coordinator.parameter_server_strategy("tf_config", staleness=args.staleness)
with tfpar.scope(strategy):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((8,)), Slow(), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
callbacks = [Mark()]
if args.backup:
    callbacks.append(keras.callbacks.BackupAndRestore(args.backup))
if args.dataset:
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(args.examples).batch(32)
    history = model.fit(data, epochs=args.epochs, callbacks=callbacks, verbose=2)
else:
    history = model.fit(x, y, batch_size=32, epochs=args.epochs, callbacks=callbacks, verbose=2)
steps_per_epoch = -(-args.examples // 32)
result = {
    "task": f"{tfpar.cluster.task_type()}:{tfpar.cluster.task_index()}",
    "strategy": type(strategy).__name__,
    "history": history.history,
    "epochs_run": len(history.history["loss"]),
    "iterations": int(model.optimizer.iterations.numpy()),
    "steps_per_epoch": steps_per_epoch,
    "evaluate": model.evaluate(x, y, verbose=0, return_dict=True),
    "predict_matches_local": float(np.abs(model.predict(x, verbose=0) - model(x).numpy()).max()),
    "variable_devices": sorted({v.value.device for v in model.weights}),
}
with open(args.out, "w") as handle:
    json.dump(result, handle)
print("RESULT written", file=sys.stderr, flush=True)
if args.wait_file:
    deadline = time.monotonic() + 60
    while not os.path.exists(args.wait_file) and time.monotonic() < deadline:
        time.sleep(0.05)
