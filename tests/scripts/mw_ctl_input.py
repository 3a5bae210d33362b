"""The multi-worker custom-loop tutorial's input, for tests/test_multi_worker.py.

Usage: mw_ctl_input.py OUT_DIR [--upstream]
Each worker iterates 2 epochs of strategy.distribute_datasets_from_function(dataset_fn), where
dataset_fn shuffles without a seed, then shards by input pipeline (as the tutorial does), and
writes OUT_DIR/<task>.json: the elements it got, per epoch.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402

N = 40
upstream = "--upstream" in sys.argv
strategy = tf.distribute.MultiWorkerMirroredStrategy() if upstream else tfpar.get_strategy("multi_worker")


def dataset_fn(input_context):
    dataset = tf.data.Dataset.range(N).shuffle(N)
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return dataset.batch(5)


distributed = strategy.distribute_datasets_from_function(dataset_fn)
epochs = []
for _ in range(2):
    seen = []
    for batch in distributed:
        for value in strategy.experimental_local_results(batch):
            seen.extend(int(v) for v in value.numpy())
    epochs.append(seen)
task = f"{tfpar.cluster.task_type()}{tfpar.cluster.task_index()}"
with open(os.path.join(sys.argv[1], f"{task}.json"), "w") as handle:
    json.dump(epochs, handle)
