"""One worker of the multi-worker input test (run by test_data_multiworker.py, not by pytest).

Usage: python mw_input_worker.py RECORD_DIR
TF_CONFIG (set by the parent) names the cluster and this task. Prints one line ``RESULT <json>``;
writes ``MARKER naive-distribute`` to stderr before the deliberately naive part, so the parent can
tell TensorFlow's logs about tfpar's datasets from those about the naive one.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf

import tfpar.data as td


def _collect(strategy, distributed):
    """Each local replica's ids, and the all-reduced sum of ids per step (a real collective)."""

    @tf.function
    def step(batch):
        def replica_fn(values):
            context = tf.distribute.get_replica_context()
            return context.all_reduce("SUM", tf.reduce_sum(values))

        return strategy.run(replica_fn, args=(batch,))

    ids, total = [], 0
    for batch in distributed:
        for local in strategy.experimental_local_results(batch):
            ids.extend(int(v) for v in local.numpy())
        total += int(strategy.experimental_local_results(step(batch))[0])
    return ids, total


def main() -> None:
    record_dir = sys.argv[1]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    result = {"task": task, "replicas": strategy.num_replicas_in_sync}

    # FILE: 4 record files over 2 workers.
    records = td.read_tfrecords(os.path.join(record_dir, "*.tfrecord"), features="infer")
    ids = records.map(lambda e: e["id"])
    result["file_policy"] = td.choose_policy(ids, 2)
    result["file_ids"], result["file_sum"] = _collect(
        strategy, td.distribute(strategy, ids, global_batch_size=4)
    )

    # DATA: 51 in-memory examples; shards trimmed to equal length, full global batches.
    memory = tf.data.Dataset.range(51)
    result["data_policy"] = td.choose_policy(memory, 2)
    result["data_ids"], result["data_sum"] = _collect(
        strategy, td.distribute(strategy, memory, global_batch_size=4, shuffle=30, seed=1)
    )

    # Preprocessing adapted on each worker's own shard, combined across workers.
    rng = np.random.default_rng(0)
    table = rng.normal(size=(301, 3))
    table[rng.random(table.shape) < 0.2] = np.nan
    shard = td.shard(tf.data.Dataset.from_tensor_slices(table), 2, task)
    stats = td.compute_statistics(shard, median=True, strategy=strategy)
    result["stats"] = {k: getattr(stats, k).tolist() for k in ("count", "mean", "variance", "median")}
    layer = td.standardization(shard, strategy=strategy)
    result["layer_mean"] = np.asarray(layer.input_mean).tolist()

    # One file for two workers: TensorFlow's AUTO policy insists on FILE and fails
    # (tensorflow/tensorflow#36846); tfpar's explicit policy picks DATA and works.
    single = os.path.join(record_dir, "single", "*.tfrecord")
    one_file = td.read_tfrecords(single, features="infer").map(lambda e: e["id"]).batch(2)
    explicit = td.set_auto_shard_policy(one_file, 2)
    result["explicit_policy"] = int(explicit.options().experimental_distribute.auto_shard_policy)
    result["explicit_ids"] = [
        int(v)
        for batch in strategy.experimental_distribute_dataset(explicit)
        for local in strategy.experimental_local_results(batch)
        for v in local.numpy()
    ]
    sys.stderr.write("MARKER naive-distribute\n")
    sys.stderr.flush()
    try:
        result["naive_batches"] = sum(1 for _ in strategy.experimental_distribute_dataset(one_file))
    except tf.errors.OpError as error:
        result["naive_error"] = error.message

    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
