"""shared-shuffle: one shuffle for all workers, a function of the epoch; explicit dataset sharding.

Keras shuffles numpy inputs with an unseeded permutation per worker, so under
MultiWorkerMirroredStrategy the DATA shards overlap: some examples are trained on several times
per epoch, others never (tensorflow/tensorflow#56513). Under tfpar the permutation of epoch ``e``
is a stateless shuffle seeded by ``(seed, e)``: the seed is the same on every worker
(:func:`shuffle_seed`) and saved with backups, so a resumed run redoes an epoch with its own
permutation, as PyTorch's DistributedSampler does. ``fit`` keeps that per-fit state (the epoch
clock) in the fit context. A ``tf.data.Dataset`` given to fit gets its auto-shard policy set
explicitly (``tfpar.data.set_auto_shard_policy``): OFF on one worker, FILE or DATA otherwise. Under
DATA sharding, shuffles without a seed get the fit's agreed seed (:func:`_agree_unseeded_shuffles`);
what cannot be ordered the same way on every worker is refused, with the fix.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar import cluster as cluster_lib
from tfpar._compat import _context, _patching, empty_batches, internals

logger = logging.getLogger(__name__)

_TRAINER = "keras.src.backend.tensorflow.trainer"
FIT = f"{_TRAINER}:TensorFlowTrainer.fit"
EPOCH_ITERATOR_INIT = f"{_TRAINER}:TFEpochIterator.__init__"
ARRAY_DATASET = "keras.src.trainers.data_adapters.array_data_adapter:ArrayDataAdapter.get_tf_dataset"
FROM_FUNCTION = (
    "tensorflow.python.distribute.collective_all_reduce_strategy:"
    "CollectiveAllReduceStrategy.distribute_datasets_from_function"
)


def shuffle_seed(strategy: Any) -> int:
    """The shuffle seed of a fit: the same on every worker, and reproducible when seeded.

    With keras.utils.set_random_seed: derived from that seed (and, multi-worker, the cluster's
    shape). Otherwise random: on several workers, the sum of one random number per worker,
    all-reduced at the start of fit (every worker calls fit, so the collective is matched).
    """
    user_seed = internals.user_random_seed()
    multi_worker = internals.in_multi_worker_mode(strategy)
    if user_seed is not None:
        if not multi_worker:
            return int(user_seed) & 0x7FFFFFFF
        spec = strategy.cluster_resolver.cluster_spec().as_dict()
        shape = json.dumps({job: len(tasks) for job, tasks in spec.items()}, sort_keys=True)
        return (zlib.crc32(shape.encode()) ^ int(user_seed)) & 0x7FFFFFFF
    draw = float(random.SystemRandom().getrandbits(20))
    if not multi_worker:
        return int(draw)

    def agree() -> tf.Tensor:
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.constant(draw, tf.float64)
        )

    total = strategy.experimental_local_results(strategy.run(agree))[0]
    return int(total.numpy()) & 0x7FFFFFFF


class _EpochClock(keras.callbacks.Callback):
    def __init__(self, state: _context.FitState) -> None:
        super().__init__()
        self._state = state

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._state.current_epoch = epoch
        self._state.epoch.assign(epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._state.skip_steps = 0


def _fit(self: Any, *args: Any, **kwargs: Any) -> Any:
    upstream = INTERCEPTION.original(FIT)
    strategy = self.distribute_strategy
    if not _context.is_managed(strategy) or isinstance(strategy, tf.distribute.ParameterServerStrategy):
        return upstream(self, *args, **kwargs)  # parameter servers: the coordinator's layer
    bound = internals.trainer_signature("fit").bind(self, *args, **kwargs)
    seed = shuffle_seed(strategy)
    with tf.init_scope():
        state = _context.FitState(
            seed=tf.Variable(seed, dtype=tf.int64, trainable=False),
            epoch=tf.Variable(0, dtype=tf.int64, trainable=False),
        )
    callbacks = bound.arguments.get("callbacks")
    clock = _EpochClock(state)
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(clock)
    else:
        bound.arguments["callbacks"] = [*(callbacks or []), clock]
    with _context.running(self, state):
        return upstream(*bound.args, **bound.kwargs)


def _epoch_iterator_init(self: Any, distribute_strategy: Any = None, *args: Any, **kwargs: Any) -> None:
    if not _context.is_managed(distribute_strategy):
        return INTERCEPTION.original(EPOCH_ITERATOR_INIT)(self, distribute_strategy, *args, **kwargs)
    from keras.src.trainers.epoch_iterator import EpochIterator

    from tfpar.data.shard import set_auto_shard_policy

    # Upstream's TFEpochIterator.__init__, with the auto-shard policy set explicitly before the
    # dataset is distributed: OFF on one worker (no-op warnings), FILE or DATA for several, and a
    # clear refusal for DATA sharding of a randomly ordered dataset (workers would overlap,
    # tensorflow/tensorflow#56513) or FILE sharding with fewer files than workers (#35878).
    EpochIterator.__init__(self, *args, **kwargs)
    self._distribute_strategy = distribute_strategy
    with _context.building_epoch_dataset():  # the array adapter builds its dataset here
        dataset = self.data_adapter.get_tf_dataset()
    if not isinstance(dataset, tf.distribute.DistributedDataset):
        empty_batches.maybe_guard_empty_batches(self.data_adapter, dataset, distribute_strategy)
        workers = distribute_strategy.num_replicas_in_sync // max(
            1, len(distribute_strategy.extended.worker_devices)
        )
        if workers > 1:
            dataset = _agree_unseeded_shuffles(dataset, distribute_strategy)
        dataset = set_auto_shard_policy(dataset, workers)
        dataset = distribute_strategy.experimental_distribute_dataset(dataset)
    self._distributed_dataset = dataset
    return None


def _agree_unseeded_shuffles(dataset: tf.data.Dataset, strategy: Any) -> tf.data.Dataset:
    """Seeds a multi-worker dataset's unseeded shuffles with one seed agreed by all workers.

    TensorFlow's AUTO policy shards such a dataset by DATA (every worker keeps every n-th
    element), which needs the same order on every worker; an unseeded shuffle draws a different
    one per worker, so examples are trained on twice or never (tensorflow/tensorflow#56513). The
    fit's shuffle seed is agreed through the cluster (:func:`shuffle_seed`), and the rewritten
    shuffles still reshuffle every epoch, the same way on every worker.
    """
    if dataset.options().experimental_distribute.auto_shard_policy != tf.data.experimental.AutoShardPolicy.AUTO:
        return dataset  # the user chose a policy; set_auto_shard_policy keeps it
    state = _context.shuffle_state()
    return _seed_for_all_workers(
        dataset, strategy, lambda: int(state.seed.numpy()) if state is not None else shuffle_seed(strategy)
    )


def _seed_for_all_workers(dataset: tf.data.Dataset, strategy: Any, agreed_seed: Any) -> tf.data.Dataset:
    from tfpar.data import _dataset_graph, _reseed

    problems, _ = _dataset_graph.find_nondeterminism(dataset)
    if not any(problem.endswith("has no seed") for problem in problems):
        return dataset
    with tf.init_scope():
        seed = int(agreed_seed())
    seeded, count = _reseed.seed_unseeded(dataset, seed)
    if count and not _AGREED_LOGGED and cluster_lib.is_chief(strategy.cluster_resolver):
        _AGREED_LOGGED.append(True)
        workers = strategy.num_replicas_in_sync // max(1, len(strategy.extended.worker_devices))
        logger.warning(
            "tfpar: the input has %d shuffle(s) without a seed; all %d workers now shuffle with "
            "seed %d (a new order every epoch, the same on every worker), so that each example "
            "is trained on once per epoch. Pass shuffle(..., seed=) to choose the seed.",
            count, workers, seed,
        )
    return seeded


def _distribute_datasets_from_function(self: Any, dataset_fn: Any, options: Any = None) -> Any:
    """The custom-loop tutorial's input: shuffle(), then shard(input_pipeline_id), per worker.

    Each worker's unseeded shuffle draws its own order, so its shard overlaps the others'. Under
    a managed multi-worker strategy the shuffles of the datasets `dataset_fn` returns get one
    seed, agreed once per call (every worker calls this).
    """
    upstream = INTERCEPTION.original(FROM_FUNCTION)
    if not _context.is_managed(self) or not internals.in_multi_worker_mode(self):
        return upstream(self, dataset_fn, options)
    seed = shuffle_seed(self)

    def seeded_dataset_fn(input_context: Any) -> Any:
        dataset = dataset_fn(input_context)
        if isinstance(dataset, tf.data.Dataset):
            dataset = _seed_for_all_workers(dataset, self, lambda: seed)
        return dataset

    return upstream(self, seeded_dataset_fn, options)


_AGREED_LOGGED: list[bool] = []


def _array_dataset(self: Any) -> tf.data.Dataset:
    """Keras's array dataset, with a permutation that is a function of (seed, epoch)."""
    state = _context.shuffle_state()
    leaves = keras.tree.flatten(self._inputs)
    dense = all(isinstance(leaf, (np.ndarray, tf.Tensor)) for leaf in leaves)
    if (
        not _context.CONTEXT.building_epoch_dataset
        or state is None
        or self._shuffle in (False, "batch")
        or not dense
    ):
        return INTERCEPTION.original(ARRAY_DATASET)(self)
    inputs = keras.tree.map_structure(tf.convert_to_tensor, keras.tree.lists_to_tuples(self._inputs))
    count, batch_size = int(self._num_samples), int(self._batch_size)
    seed, epoch = state.seed, state.epoch

    def permutation(_: Any) -> tf.Tensor:
        return tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([seed.read_value(), epoch.read_value()])
        )

    order = tf.data.Dataset.from_tensors(0).map(permutation)
    batches = order.flat_map(lambda indices: tf.data.Dataset.from_tensor_slices(indices).batch(batch_size))
    dataset = batches.map(
        lambda indices: keras.tree.map_structure(lambda t: tf.gather(t, indices), inputs),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # The permutation reads two variables; they are the same on every worker by construction.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="shared-shuffle",
    summary="one shuffle permutation per epoch shared by all workers (each example once per epoch), "
    "reproducible on resume; explicit auto-shard policies for tf.data input",
    targets=(FIT, EPOCH_ITERATOR_INIT, ARRAY_DATASET, FROM_FUNCTION),
    upstream_issue="tensorflow/tensorflow#56513",
    test="tests/test_multi_worker.py::test_shuffled_epochs_cover_every_example_once",
    patches={
        FIT: _fit,
        EPOCH_ITERATOR_INIT: _epoch_iterator_init,
        ARRAY_DATASET: _array_dataset,
        FROM_FUNCTION: _distribute_datasets_from_function,
    },
))
