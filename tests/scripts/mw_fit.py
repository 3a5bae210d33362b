"""A Keras 3 fit/evaluate/predict run, as a worker of `tfpar launch` or as one process.

Usage: mw_fit.py OUT_DIR N_EXAMPLES [--single] [--shuffle] [--strategy NAME] [--spe K]
Writes OUT_DIR/<task>.json with weights, history, evaluate/predict results and the number of times
each example was trained on (counted by a layer through a SUM-aggregated variable).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("n", type=int)
parser.add_argument("--single", action="store_true")
parser.add_argument("--shuffle", action="store_true")
parser.add_argument("--strategy", default="auto")
parser.add_argument("--spe", type=int, default=1)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--upstream", action="store_true", help="a plain MultiWorkerMirroredStrategy, no tfpar")
parser.add_argument("--no-seed", action="store_true", help="do not call keras.utils.set_random_seed")
parser.add_argument("--tfdata", choices=["seeded", "unseeded", "nondeterministic"], help="fit a shuffled tf.data.Dataset instead of arrays")
args = parser.parse_args()


class CountSeen(keras.layers.Layer):
    """Counts, over all replicas, how often each example id (column 0) was trained on."""

    def build(self, shape):
        self.seen = self.add_weight(shape=(args.n,), initializer="zeros", trainable=False, aggregation="sum", name="seen")

    def call(self, x, training=False):
        if training:
            ids = tf.cast(x[:, 0], tf.int32)
            # The raw tf.Variable's assign_add (Keras's is assign(self + value), not SUM-safe).
            self.seen.value.assign_add(tf.math.bincount(ids, minlength=args.n, maxlength=args.n, dtype=tf.float32))
        return x[:, 1:]


if args.upstream:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = tfpar.get_strategy("default" if args.single else args.strategy)
rng = np.random.default_rng(0)
x = np.concatenate([np.arange(args.n)[:, None], rng.normal(size=(args.n, 8))], axis=1).astype("float32")
y = rng.integers(0, 3, args.n)
with strategy.scope():
    if args.tfdata != "unseeded" and not args.no_seed:  # a global seed makes shuffles deterministic
        keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((9,)), CountSeen(), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=args.spe,
    )
if args.tfdata:
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(args.n, seed=None if args.tfdata == "unseeded" else 3)
    if args.tfdata == "nondeterministic":
        data = data.map(lambda a, b: (a, b), num_parallel_calls=2, deterministic=False)
    history = model.fit(data.batch(32), epochs=args.epochs, verbose=0, validation_data=(x, y))
else:
    history = model.fit(x, y, batch_size=32, epochs=args.epochs, shuffle=args.shuffle, verbose=0, validation_data=(x, y))
evaluation = model.evaluate(x, y, verbose=0)
predictions = model.predict(x, verbose=0)
task = "single" if args.single else f"{tfpar.cluster.task_type()}{tfpar.cluster.task_index()}"
result = {
    "strategy": "MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else type(strategy).__name__,
    "replicas": strategy.num_replicas_in_sync,
    "weights": [w.tolist() for w in model.get_weights()[1:]],
    "seen": model.layers[0].seen.numpy().tolist(),
    "history": history.history,
    "evaluate": evaluation,
    "predict": predictions.tolist(),
    "iterations": int(model.optimizer.iterations.numpy()),
}
with open(os.path.join(args.out, f"{task}.json"), "w") as handle:
    json.dump(result, handle)
print("done", task, file=sys.stderr)
