"""replica-build: build the model from one replica's batch.

Before training, Keras builds the model from a first batch it averages over replicas with
``strategy.reduce("MEAN", batch)``. That fails when replicas hold different batch sizes (a global
batch of 32 on 3 replicas: "Inputs to operation AddN ... must have the same size and shape") and,
under MultiWorkerMirroredStrategy, with "Attempt to convert a value (PerReplica...)"
(tensorflow/tensorflow#72388, keras-team/keras#20585). Building needs shapes and dtypes only, so
tfpar builds from the first local replica's batch.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpar._compat import _context, _patching

MAYBE_SYMBOLIC_BUILD = "keras.src.backend.tensorflow.trainer:TensorFlowTrainer._maybe_symbolic_build"


def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> None:
    strategy = self._distribute_strategy
    if strategy is None or not _context.is_managed(strategy):
        return INTERCEPTION.original(MAYBE_SYMBOLIC_BUILD)(self, iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, step_iterator in iterator:
            batch = next(step_iterator)
            # Building needs shapes and dtypes only: one local replica's batch is enough.
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues)
                else value,
                batch,
            )
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)
    return None


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="replica-build",
    summary="the model is built from one replica's batch (uneven replica batches; multi-worker)",
    targets=(MAYBE_SYMBOLIC_BUILD,),
    upstream_issue="tensorflow/tensorflow#72388, keras-team/keras#20585",
    test="tests/test_exactness.py::test_numpy_fit_matches_single_device",
    patches={MAYBE_SYMBOLIC_BUILD: _maybe_symbolic_build},
))
