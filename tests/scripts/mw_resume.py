"""A 2-worker Keras fit with BackupAndRestore that can be interrupted, for tests/test_fault_tolerance.py.

Usage: mw_resume.py OUT_DIR --mode none|kill|sigterm [--save-freq epoch|N] [--at EPOCH STEP]
On the first launch attempt (TFPAR_LAUNCH_RESTART=0), worker 1 kills itself (SIGKILL) or receives
SIGTERM (preemption) after training step STEP of epoch EPOCH. Every attempt that finishes writes
OUT_DIR/<task>.json: weights, how often each example was trained on, optimizer iterations.
"""

import argparse
import json
import os
import signal
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--mode", choices=["none", "kill", "sigterm"], default="none")
parser.add_argument("--save-freq", default="epoch")
parser.add_argument("--at", type=int, nargs=2, default=(2, 1), metavar=("EPOCH", "STEP"))
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--slow-worker", type=float, default=0.0,
                    help="worker 1 removes its temporary files this many seconds late, and exits late")
args = parser.parse_args()
N = 101
save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)


class CountSeen(keras.layers.Layer):
    def build(self, shape):
        self.seen = self.add_weight(shape=(N,), initializer="zeros", trainable=False, aggregation="sum", name="seen")

    def call(self, x, training=False):
        if training:
            ids = tf.cast(x[:, 0], tf.int32)
            self.seen.value.assign_add(tf.math.bincount(ids, minlength=N, maxlength=N, dtype=tf.float32))
        return x[:, 1:]


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        first_attempt = os.environ.get("TFPAR_LAUNCH_RESTART", "0") == "0"
        if args.mode == "none" or not first_attempt or tfpar.cluster.task_index() != 1:
            return
        if (self.epoch, batch) == tuple(args.at):
            os.kill(os.getpid(), signal.SIGKILL if args.mode == "kill" else signal.SIGTERM)


backup_present_during_cleanup = []
if args.slow_worker and tfpar.cluster.task_index() == 1:
    # A slow worker 1: its cleanup inside the backup directory comes seconds after the chief's
    # last save (upstream, the chief removes the directory meanwhile).
    _cleanup = tfpar.cluster.cleanup_write_path

    def slow_cleanup(path, **kwargs):
        time.sleep(args.slow_worker)
        backup_present_during_cleanup.append(os.path.isdir(os.path.join(args.out, "backup")))
        return _cleanup(path, **kwargs)

    tfpar.cluster.cleanup_write_path = slow_cleanup

keras.utils.set_random_seed(7)
strategy = tfpar.get_strategy("multi_worker")
rng = np.random.default_rng(0)
x = np.concatenate([np.arange(N)[:, None], rng.normal(size=(N, 8))], axis=1).astype("float32")
y = rng.integers(0, 3, N)
with tfpar.scope(strategy):
    model = keras.Sequential([keras.Input((9,)), CountSeen(), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
callbacks = [
    Interrupt(),  # before BackupAndRestore: a preempted step is saved by the agreed-step logic
    keras.callbacks.BackupAndRestore(os.path.join(args.out, "backup"), save_freq=save_freq),
    keras.callbacks.ModelCheckpoint(os.path.join(args.out, "ckpt", "e{epoch}.weights.h5"), save_weights_only=True),
    keras.callbacks.TensorBoard(os.path.join(args.out, "tb"), write_graph=False),
]
model.fit(x, y, batch_size=32, epochs=args.epochs, shuffle=True, verbose=0, callbacks=callbacks)
model.save(os.path.join(args.out, "final.keras"))
# The TensorFlow tutorial's next step: every worker loads what the chief saved, at once.
loaded = keras.models.load_model(os.path.join(args.out, "final.keras"), custom_objects={"CountSeen": CountSeen})
task = f"{tfpar.cluster.task_type()}{tfpar.cluster.task_index()}"
with open(os.path.join(args.out, f"{task}.json"), "w") as handle:
    json.dump(
        {
            "weights": [w.tolist() for w in model.get_weights()[1:]],
            "seen": model.layers[0].seen.numpy().tolist(),
            "iterations": int(model.optimizer.iterations.numpy()),
            "attempt": int(os.environ.get("TFPAR_LAUNCH_RESTART", "0")),
            "loaded_equals_trained": all(
                np.array_equal(a, b) for a, b in zip(loaded.get_weights()[1:], model.get_weights()[1:])
            ),
            "backup_present_during_cleanup": backup_present_during_cleanup,
        },
        handle,
    )
if args.slow_worker and tfpar.cluster.task_index() == 1:
    time.sleep(args.slow_worker)  # the chief exits first: no watcher thread may complain
