"""A MultiWorkerMirroredStrategy custom training loop, run by tests/test_launch.py via the launcher.

Each worker builds a Keras Dense layer and SGD under the strategy, trains 3 steps on its shard of
a fixed global batch of 8 (strategy.run inside a tf.function; no model.fit) and prints one JSON
line prefixed with RESULT: a checksum of the final weights and their largest difference from the
same 3 steps of full-batch gradient descent computed with numpy in this process. Equal checksums
on every worker and a tiny difference prove TF_CONFIG, the cluster and the all-reduce work.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfpar import cluster  # noqa: E402

STEPS, GLOBAL_BATCH, FEATURES, LR = 3, 8, 4, 0.1

resolver = cluster.resolve("tf_config")
strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
workers = strategy.num_replicas_in_sync

rng = np.random.default_rng(0)
x = rng.normal(size=(STEPS * GLOBAL_BATCH, FEATURES)).astype("float32")
y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32") + 0.25).astype("float32")
kernel0 = rng.normal(size=(FEATURES, 1)).astype("float32")


def dataset_fn(context):
    # Worker i takes elements i, i + n, ...: each global batch of 8 is split evenly.
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.shard(context.num_input_pipelines, context.input_pipeline_id)
    return data.batch(context.get_per_replica_batch_size(GLOBAL_BATCH))


with strategy.scope():
    layer = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(kernel0))
    layer.build((None, FEATURES))
    optimizer = keras.optimizers.SGD(learning_rate=LR)
    optimizer.build(layer.trainable_variables)

iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))


@tf.function
def train_step(iterator):
    def replica_fn(inputs):
        features, labels = inputs
        with tf.GradientTape() as tape:
            per_example = tf.reduce_sum(tf.square(layer(features) - labels), axis=1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables))
        return loss

    losses = strategy.run(replica_fn, args=(next(iterator),))
    return strategy.reduce("SUM", losses, axis=None)


losses = [float(train_step(iterator)) for _ in range(STEPS)]

# The same training on one process: full-batch gradient descent on each global batch.
w, b = kernel0.astype("float64"), np.zeros((1,), "float64")
for step in range(STEPS):
    xb = x[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH].astype("float64")
    yb = y[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH].astype("float64")
    error = xb @ w + b - yb
    w, b = w - LR * 2 * xb.T @ error / GLOBAL_BATCH, b - LR * 2 * error.sum(0) / GLOBAL_BATCH

kernel, bias = (v.numpy() for v in layer.trainable_variables)
weights = np.concatenate([kernel.ravel(), bias.ravel()])
print("RESULT:" + json.dumps({
    "task": f"{resolver.task_type}:{resolver.task_id}",
    "replicas": workers,
    "checksum": float(np.sum(weights.astype("float64") * np.arange(1, weights.size + 1))),
    "weights": weights.tolist(),
    "max_diff_from_single_process": float(np.max(np.abs(weights - np.concatenate([w.ravel(), b])))),
    "moved": float(np.max(np.abs(kernel - kernel0))),
    "losses": losses,
}), flush=True)
