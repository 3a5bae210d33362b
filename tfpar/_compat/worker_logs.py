"""multi-worker-logs: step logs under MultiWorkerMirroredStrategy.

Keras reduces each step's logs with ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalar
logs ("Invalid reduction dimension 0 for input with 0 dimensions"; tensorflow/tensorflow#72388).
tfpar averages floating-point logs over the replicas of all workers instead (every worker runs
every step, so the collective is matched) and takes integer logs from the first local replica,
so every worker logs the same numbers.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpar._compat import _context, _patching, internals

REDUCE_PER_REPLICA = "keras.src.backend.tensorflow.trainer:reduce_per_replica"


def _reduce_per_replica(values: Any, strategy: tf.distribute.Strategy, reduction: str) -> Any:
    upstream = INTERCEPTION.original(REDUCE_PER_REPLICA)
    if (
        reduction not in ("auto", "mean")
        or not _context.is_managed(strategy)
        or not internals.in_multi_worker_mode(strategy)
    ):
        return upstream(values, strategy, reduction)

    def reduce(value: Any) -> Any:
        if not isinstance(value, (tf.Tensor, tf.distribute.DistributedValues)):
            return value
        if not value.dtype.is_floating:
            return strategy.experimental_local_results(value)[0]
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

    return tf.nest.map_structure(reduce, values)


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="multi-worker-logs",
    summary="scalar step logs under MultiWorkerMirroredStrategy, identical on every worker",
    targets=(REDUCE_PER_REPLICA,),
    upstream_issue="tensorflow/tensorflow#72388, keras-team/keras#20585",
    test="tests/test_multi_worker.py::test_workers_end_with_identical_weights_and_logs",
    patches={REDUCE_PER_REPLICA: _reduce_per_replica},
))
