"""tfpar.data.distribute under MirroredStrategy: every replica gets its own, full batch."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.data as td


@pytest.fixture(scope="module")
def mirrored(virtual_devices):
    return tfpar.get_strategy("mirrored", devices=virtual_devices[:4])


def _per_replica(strategy, distributed):
    """Lists, for every step, each replica's batch as a python list."""
    steps = []
    for batch in distributed:
        steps.append([t.numpy().tolist() for t in strategy.experimental_local_results(batch)])
    return steps


def test_each_replica_gets_its_own_full_batch(mirrored):
    distributed = td.distribute(mirrored, tf.data.Dataset.range(70), 16, deterministic=True)
    steps = _per_replica(mirrored, distributed)
    assert len(steps) == 4  # 70 // 16 full global batches
    for step in steps:
        assert [len(b) for b in step] == [4, 4, 4, 4]
    flat = [v for step in steps for batch in step for v in batch]
    assert sorted(flat) == list(range(64)) and len(set(flat)) == 64
    # A global batch is 16 consecutive examples, as single-device batch(16) would give.
    assert [sorted(v for b in step for v in b) for step in steps] == [
        list(range(16 * s, 16 * s + 16)) for s in range(4)
    ]


def test_seeded_augmentation_under_distribute(mirrored):
    def augment(x, seed):
        return x * 1000 + tf.random.stateless_uniform([], seed, maxval=1000, dtype=tf.int64)

    def epoch(distributed):
        return sorted(v for step in _per_replica(mirrored, distributed) for b in step for v in b)

    def build():
        return td.distribute(mirrored, tf.data.Dataset.range(32), 8, shuffle=32, seed=5,
                             augment_fn=augment)

    distributed = build()
    first, second = epoch(distributed), epoch(distributed)
    assert [v // 1000 for v in first] == list(range(32)) == [v // 1000 for v in second]
    assert first != second  # new draws every epoch
    assert epoch(build()) == first  # reproducible from the seed


def test_keep_remainder_sees_every_example_once(mirrored):
    dataset = td.distribute(mirrored, tf.data.Dataset.range(70), 16, drop_remainder=False)
    flat = [v for step in _per_replica(mirrored, dataset) for batch in step for v in batch]
    assert sorted(flat) == list(range(70))


def test_dataset_function_gets_the_input_context(mirrored):
    contexts = []

    def dataset_fn(context):
        contexts.append(context)
        return tf.data.Dataset.range(32).map(lambda x: x * 10)

    steps = _per_replica(mirrored, td.distribute(mirrored, dataset_fn, 8, shuffle=32, seed=0))
    assert len(contexts) == 1 and contexts[0].num_input_pipelines == 1
    assert contexts[0].num_replicas_in_sync == 4
    flat = [v for step in steps for batch in step for v in batch]
    assert sorted(flat) == [10 * i for i in range(32)] and flat != sorted(flat)


def test_fit_on_distributed_data_matches_single_device(mirrored):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype("float32")
    y = rng.normal(size=(96, 1)).astype("float32")

    def build():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return model

    single = build()
    single.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    with mirrored.scope():
        parallel = build()
    # deterministic=True: the batches keep their order, as in single-device training.
    parallel.fit(td.distribute(mirrored, td.from_numpy(x, y), 16, deterministic=True), epochs=2,
                 verbose=0)
    for a, b in zip(single.get_weights(), parallel.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_global_batch_must_divide_by_replicas(mirrored):
    with pytest.raises(ValueError, match="Received: global_batch_size=18. Use 16 or 20 instead"):
        td.distribute(mirrored, tf.data.Dataset.range(8), 18)
    with pytest.raises(ValueError, match="Use 4 instead"):
        td.distribute(mirrored, tf.data.Dataset.range(8), 2)


def test_batched_input_is_refused(mirrored):
    with pytest.raises(ValueError, match="Expected unbatched examples"):
        td.distribute(mirrored, tf.data.Dataset.range(64).batch(4).prefetch(1), 16)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("not a strategy", tf.data.Dataset.range(4), 4), TypeError, "tf.distribute.Strategy"),
        ((None, [1, 2, 3], 4), TypeError, "tf.data.Dataset or a function"),
        ((None, tf.data.Dataset.range(4), 4.0), TypeError, "global_batch_size"),
    ],
)
def test_argument_errors(mirrored, args, error, match):
    strategy = mirrored if args[0] is None else args[0]
    with pytest.raises(error, match=match):
        td.distribute(strategy, *args[1:])


def test_file_cache_is_named_per_input_pipeline(mirrored, tmp_path):
    distributed = td.distribute(mirrored, tf.data.Dataset.range(32), 16, cache=str(tmp_path / "c"))
    first = sorted(v for step in _per_replica(mirrored, distributed) for b in step for v in b)
    assert first == list(range(32))
    assert any(name.startswith("c-0") for name in os.listdir(tmp_path))
